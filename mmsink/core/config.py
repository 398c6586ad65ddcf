"""Settings from a calibration file (written by ``mmsink calibrate``), merged into ``wrap``'s arguments."""

from __future__ import annotations

import json
from pathlib import Path


def load_config(path) -> dict:
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"mmsink: cannot read the calibration file {path}: {e}") from None
    if not isinstance(cfg, dict) or "sink_dims" not in cfg:
        raise ValueError(f"mmsink: {path} is not a calibration file written by `mmsink calibrate`")
    return cfg


def apply_config(path, prune, budget, var, sink_forward, options: dict):
    """(var, sink_forward, options) with the file's sink dimensions, ViT-sink threshold and fusion layer
    where the call does not give them."""
    cal = load_config(path)
    if var is True or (isinstance(var, dict) and "sink_dims" not in var):
        var = {**(var if isinstance(var, dict) else {}), "sink_dims": cal["sink_dims"]}
    if sink_forward is True and cal.get("vit_sink_threshold"):
        sink_forward = {"threshold": cal["vit_sink_threshold"]}
    if prune == "visipruner" and budget is not None and cal.get("fusion_layer") is not None:
        options = {"fallback_layer": cal["fusion_layer"], **options}
    return var, sink_forward, options
