"""mmsink: attention-sink aware visual-token pruning for LLaVA-style models in transformers.

model = mmsink.wrap(model, prune="visipruner")
out = model.generate(**inputs)
mmsink.stats(model)       # what the last prefill did
with mmsink.disabled(model): ...
mmsink.unwrap(model)
"""

from .api import disabled, stats, unwrap, wrap
from .api import methods as methods
from .stats import Stats

__all__ = ["wrap", "unwrap", "disabled", "stats", "methods", "Stats"]
__version__ = "0.1.0"
