"""Quantization of the vision tower (fake quantization on CPU; see ``fake``)."""
