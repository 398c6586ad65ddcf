"""mmsink as an lmms-eval model (``pip install -e ".[lmms]"``; tested with lmms-eval 0.7.3).

    lmms-eval --model mmsink --model_args pretrained=PATH,family=llava_hf,prune=fastv,budget=64 --tasks ...

lmms-eval finds the model through the ``lmms_eval.models`` entry point, which calls :func:`manifest`.
``model.py`` builds lmms-eval's own adapter (``family``) and wraps the model it loaded; ``export.py`` is
``mmsink export-lmms`` (synthvqa as a dataset on disk and a task in lmms-eval's VQAv2 format).
Nothing here is imported by mmsink itself: lmms-eval is an optional extra.
"""

from __future__ import annotations


def manifest():
    """The entry point's payload: ``mmsink`` as a chat model (the default) and a simple one
    (``lmms-eval --force_simple``), each building the adapter of the family it is given."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id="mmsink",
        simple_class_path="mmsink.lmms.model.MMSinkSimple",
        chat_class_path="mmsink.lmms.model.MMSink",
    )
