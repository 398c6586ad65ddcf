"""The mechanism every method shares, in reading order: ``layout`` (where each sample's image tokens
are), ``plan`` (the per-layer token plan: segments, Prefill, Decode), ``hooks`` (the handle that applies
it to one model instance), ``attention`` (the registered attention entries and the grouped log-sum-exp
primitive), ``cache`` (PlanCache), ``flops`` and ``stats``; ``family`` is the protocol a model family
implements (in ``mmsink.patches``). Nothing here imports a family, a tool, the evals or the demo."""
