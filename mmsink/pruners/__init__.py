"""Pruner registry: importing this package registers every built-in method."""

from . import cdpruner, dart, divprune, fastv, pdrop, replay, scope, simple, visionzip, visipruner, vispruner  # noqa: F401
from .base import REGISTRY, Pruner, register
from .orthorank import OrthoRank  # noqa: F401
from .sparsevlm import SparseVLM  # noqa: F401

__all__ = ["REGISTRY", "Pruner", "register"]
