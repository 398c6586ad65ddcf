"""Attention-sink methods that act with any pruner: VAR (``var``) and ViT-sink forwarding (``vitsink``)."""
