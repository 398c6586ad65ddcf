"""The ``mmsink`` model of lmms-eval: lmms-eval's own adapter, its model wrapped with ``mmsink.wrap``.

    lmms-eval --model mmsink \\
        --model_args pretrained=PATH,family=llava_hf,prune=fastv,budget=64,k=3 --tasks pope --log_samples

``--model_args`` keys:

- ``family``: the lmms-eval adapter that loads the model, prompts and decodes (default ``llava_hf``: LLaVA-1.5
  and LLaVA-NeXT; ``qwen2_5_vl`` / ``qwen2_vl`` for Qwen). Its chat class unless ``--force_simple``.
- the adapter's own constructor arguments (``pretrained``, ``device``, ``dtype``, ``device_map``, ...)
  go to it unchanged;
- ``prune``, ``budget``, ``var``, ``sink_forward``, ``config``, ``varlen``, ``kv`` go to ``mmsink.wrap``;
- every other key is a method option of ``wrap`` (``k=3``, ``seed=1``, ...).

Values are JSON where they parse (``var={"sink_dims":[1415,2533]}``, ``sink_forward=true``, ``k=3``), text
otherwise; ``prune=none`` (or no ``prune``) keeps every token, the plan machinery still running.

Each sample's visual tokens kept and prefill FLOPs (``mmsink.stats`` after its generate) go into its
``token_counts`` entry of lmms-eval's logged samples (key ``mmsink``), and their means into the run's
``throughput`` summary (``avg_mmsink_*``).

``--batch_size N`` batches through mmsink, not through the adapter (lmms-eval's ``llava_hf`` asserts batch
size 1; its Qwen adapters have batch bugs): the adapter still builds and decodes each request, and
``generate`` runs on N requests at once (``batching.py``); each sample's facts are its own.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics

import mmsink
from mmsink.evals import vqa
from mmsink.lmms.batching import Capture, generate_batch, settings_of

WRAP_KEYS = ("prune", "budget", "var", "sink_forward", "config", "varlen", "kv")
FAMILIES = ("llava_hf", "qwen2_5_vl", "qwen2_vl")


@dataclass
class MMSinkCounts(TokenCounts):
    """lmms-eval's per-request token counts plus this sample's mmsink facts (in the logged sample)."""

    mmsink: dict = field(default_factory=dict)

    def to_dict(self):
        d = super().to_dict()
        d["mmsink"] = self.mmsink
        return d


def parse_value(value):
    """lmms-eval turns ints, floats and true/false into Python values; JSON for the rest."""
    return vqa.parse_value(value) if isinstance(value, str) else value


def split_args(adapter_cls, kwargs: dict) -> tuple[dict, dict]:
    """(the adapter's constructor arguments, ``mmsink.wrap``'s arguments)."""
    params = inspect.signature(adapter_cls.__init__).parameters
    own = {n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}
    adapter, wrap = {}, {}
    for key, value in kwargs.items():
        if key in own:
            adapter[key] = value
        else:
            wrap[key] = parse_value(value)
    prune = wrap.get("prune")
    if prune is None or str(prune).lower() in ("none", "full", ""):
        wrap["prune"] = None
    if "budget" in wrap:
        wrap["budget"] = vqa.parse_budget(None if wrap["budget"] is None else str(wrap["budget"]))
    return adapter, wrap


def sample_facts(model, i: int = 0) -> dict:
    """The last prefill's facts for its sample ``i``, as ``mmsink eval`` writes them."""
    s = mmsink.stats(model)
    per_layer = [layer[i] for layer in s.kept_tokens]
    return {
        "method": s.method,
        "budget": s.budget,
        "visual_tokens": s.visual_tokens[i],
        "kept_tokens": round(sum(per_layer) / len(per_layer), 3),  # mean over the decoder layers
        "kept_tokens_final": per_layer[-1],  # after the last pruning step
        "kept_tokens_per_layer": per_layer,
        "prefill_flops": int(s.extra["sample_prefill_flops"][i]),
        "baseline_prefill_flops": int(s.extra["sample_baseline_prefill_flops"][i]),
    }


def summary(facts: list[dict]) -> dict:
    n = len(facts)
    return {
        "mmsink_kept_tokens": sum(f["kept_tokens"] for f in facts) / n,
        "mmsink_kept_tokens_final": sum(f["kept_tokens_final"] for f in facts) / n,
        "mmsink_prefill_flops": sum(f["prefill_flops"] for f in facts) / n,
        "mmsink_flops_ratio": sum(f["prefill_flops"] / f["baseline_prefill_flops"] for f in facts) / n,
    }


class Recording:
    """Mixed in before the adapter's class: requests in batches of ``mmsink_batch`` (see batching.py),
    each answer with its sample's facts."""

    mmsink_settings: dict = {}
    mmsink_batch = 1
    mmsink_capture = None

    @property
    def model(self):
        return self.mmsink_capture if self.mmsink_capture is not None else super().model

    def generate_until(self, requests):
        out, facts = [], []
        for start in range(0, len(requests), self.mmsink_batch):
            for result, fact in self.answer_batch(requests[start : start + self.mmsink_batch]):
                facts.append(fact)
                text, counts = (
                    (result, None) if isinstance(result, str) else (result.text, result.token_counts)
                )
                base = counts.to_dict() if counts is not None else {}
                out.append(GenerationResult(text=text, token_counts=MMSinkCounts(**base, mmsink=fact)))
        if facts:
            log_metrics(
                total_gen_tokens=0, total_elapsed_time=0.0, avg_speed=0.0, additional_metrics=summary(facts)
            )
        return out

    def answer_batch(self, requests) -> list[tuple]:
        """(the adapter's result, the sample's facts) per request; one ``generate`` per settings."""
        real = self.model
        capture = Capture(real)
        self.mmsink_capture = capture
        try:
            for req in requests:  # the adapter builds each request's inputs; nothing is generated
                super().generate_until([req])
            if len(capture.calls) != len(requests):
                raise RuntimeError(
                    f"mmsink: the adapter generated {len(capture.calls)} times for {len(requests)} requests"
                )
            groups = {}
            for i, call in enumerate(capture.calls):
                groups.setdefault(repr(settings_of(call)), []).append(i)
            answers, facts = [None] * len(requests), [None] * len(requests)
            pad_id = self.tokenizer.pad_token_id
            for members in groups.values():
                calls = [capture.calls[i] for i in members]
                for j, (i, reply) in enumerate(zip(members, generate_batch(real, calls, pad_id or 0))):
                    answers[i], facts[i] = reply, {**sample_facts(real, j), "batch_size": len(calls)}
            capture.replies = answers
            results = [super(Recording, self).generate_until([req])[0] for req in requests]
        finally:
            self.mmsink_capture = None
        return list(zip(results, facts))


def filelock_compat() -> None:
    """lmms-eval 0.7.3's evaluator patches ``filelock._api`` (filelock 3.x) so that its own and datasets'
    locks share instances; filelock 4.x has no ``_api`` and the run stops there. With filelock 4.x the patch
    is marked done (nothing changes for one offline process; several processes may take a lock twice)."""
    try:
        import filelock._api  # noqa: F401
    except ImportError:
        from lmms_eval import evaluator

        evaluator._enable_reentrant_filelocks._patched = True


def build(family: str, force_simple: bool, kwargs: dict):
    """lmms-eval's ``family`` adapter built from its own arguments, its model wrapped with the rest."""
    from lmms_eval.models import get_model

    filelock_compat()
    if family not in FAMILIES:
        raise ValueError(f"mmsink: family {family!r}: tested families are {', '.join(FAMILIES)}")
    adapter_cls = get_model(family, force_simple=force_simple)
    adapter_args, wrap_args = split_args(adapter_cls, kwargs)
    batch = int(adapter_args.get("batch_size", 1) or 1)
    adapter_args["batch_size"] = 1  # the adapter sees one request at a time; Recording batches them
    cls = type(f"MMSink_{adapter_cls.__name__}", (Recording, adapter_cls), {"mmsink_batch": batch})
    obj = cls(**adapter_args)
    mmsink.wrap(obj.model, **wrap_args)
    obj.mmsink_settings = {"family": family, "batch_size": batch, **wrap_args}
    return obj


class MMSink(lmms):
    """``--model mmsink`` (chat adapters). Constructing it returns the wrapped adapter instance."""

    is_simple = False

    def __new__(cls, family: str = "llava_hf", **kwargs):
        return build(family, cls.is_simple, kwargs)


class MMSinkSimple(MMSink):
    """``--model mmsink --force_simple``: the adapter's simple (prompt-string) class."""

    is_simple = True
