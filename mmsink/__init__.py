"""mmsink: attention-sink aware visual-token pruning for LLaVA-style models in transformers.

model = mmsink.wrap(model, prune="visipruner")
out = model.generate(**inputs)
mmsink.stats(model)       # what the last prefill did
with mmsink.disabled(model): ...
mmsink.unwrap(model)
mmsink.generate_fast(model, max_new_tokens=64, **inputs)   # greedy, static caches (CUDA graph on GPU)
"""

from ._source import install_source_folders

install_source_folders(__name__, __path__)

from .api import disabled, methods, stats, unwrap, wrap  # noqa: E402
from .core.stats import Stats  # noqa: E402
from .fast import generate_fast  # noqa: E402

__all__ = ["wrap", "unwrap", "disabled", "stats", "methods", "generate_fast", "Stats"]
__version__ = "0.1.0"
