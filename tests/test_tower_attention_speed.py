"""``evals/tower_attention_speed.py --tiny`` on the CPU: every shape and variant in the JSON with finite
numbers or an n/a reason, the padded outputs equal to the unpadded ones (the script's own check and one
made here), and the tower layout's strides the ones transformers' attention modules hand to SDPA."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from evals import tower_attention_speed as tas


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("tower_attention")
    tas.main(["--tiny", "--out", str(out), "--reps", "2"])
    assert (out / "tower_attention_speed.md").read_text().startswith("Command: ")
    return json.loads((out / "tower_attention_speed.json").read_text())


def finite(*xs):
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def test_every_shape_and_variant(result):
    assert [s["shape"] for s in result["shapes"]] == [t[0] for t in tas.TINY]
    for s, (_, b, _, _, d, kind) in zip(result["shapes"], tas.TINY):
        layouts = ["tower", "contiguous"] + [f"pad {p}" for p in tas.pads(d)]
        want = {f"{bk} / {lay}" for bk in tas.BACKENDS for lay in layouts}
        if kind == "qwen" and b > 1:
            want |= {tas.SPLIT, tas.SPLIT + ", eager"}
        assert set(s["variants"]) == want, s["shape"]
        assert set(s["prep_ms"]) == set(layouts) - {"tower"}
        assert finite(*s["prep_ms"].values())
        ran = 0
        for key, v in s["variants"].items():
            if "na" in v:
                assert isinstance(v["na"], str) and v["na"], key
            else:
                ran += 1
                assert finite(v["ms"], v["tflops"], v["max_diff"]) and v["ms"] > 0, key
                assert v["max_diff"] < 1e-5, key  # fp32 on the CPU: every kernel agrees with the default
        assert ran >= len(layouts)  # at least the default ran on every layout
        assert s["default_pick"]["tower"]["ops"], "the profiler saw no SDPA op"


def test_padded_outputs_equal_unpadded(result):
    for s in result["shapes"]:
        checked = s["pad_check"]
        ran = {k for k, v in s["variants"].items() if "ms" in v and "pad" in k}
        assert set(checked) == ran and ran, s["shape"]
        for key, c in checked.items():
            assert c["max_diff"] < 1e-6, (s["shape"], key, c)
    # and independently: the script's padding (scale kept at the real head dim) against the math kernel
    q, k, v = (torch.randn(2, 3, 11, 20) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    for p in tas.pads(20):
        out = tas.attention(None, *(tas.padded(x, p) for x in (q, k, v)), 20**-0.5, 20)()
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_tower_layout_is_transformers(result, monkeypatch):
    from transformers.models.clip.configuration_clip import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPAttention
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionAttention

    seen = []
    plain = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append([list(x.stride()) for x in (q, k, v)])
        return plain(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    shapes = {s["shape"]: s for s in result["shapes"]}
    _, b, h, n, d, _ = tas.TINY[0]  # one Qwen image
    cfg = Qwen2VLVisionConfig(embed_dim=h * d, num_heads=h)
    cfg._attn_implementation = "sdpa"
    angle = torch.rand(n, d)
    with torch.no_grad():
        VisionAttention(cfg)(torch.randn(n, h * d), torch.tensor([0, n]), (angle.cos(), angle.sin()))
    assert seen.pop() == shapes[tas.TINY[0][0]]["tower_strides"]

    _, b, h, n, d, _ = tas.TINY[2]  # CLIP
    cfg = CLIPVisionConfig(hidden_size=h * d, num_attention_heads=h)
    cfg._attn_implementation = "sdpa"
    with torch.no_grad():
        CLIPAttention(cfg)(torch.randn(b, n, h * d))
    assert seen.pop() == shapes[tas.TINY[2][0]]["tower_strides"]
