"""Sink-aware KV caches (issue 17): the sink + window cache (StreamingLLM) for ``wrap(model, kv=...)``."""

from .config import KVConfig, make_config
from .window import WindowCache, policy, rotate, turn_of

__all__ = ["KVConfig", "make_config", "WindowCache", "policy", "rotate", "turn_of"]
