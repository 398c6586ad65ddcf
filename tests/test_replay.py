"""replay (the benchmark's ideal row): a recorded plan applied with no selection work reproduces the
method's kept tokens at every layer and its logits exactly; bad plans are refused."""

import pytest
import torch
from tiny import batch, prompt, tiny_llava

import mmsink


@pytest.mark.parametrize(
    "method,opts", [("fastv", dict(budget=6)), ("pdrop", {}), ("random", dict(budget=9)), ("visipruner", {})]
)
def test_replay_reproduces_the_plan(method, opts):
    model = tiny_llava()
    inputs = batch([prompt(5, 7, seed=1), prompt(2, 4, seed=2)])
    mmsink.wrap(model, prune=method, **opts)
    with torch.no_grad():
        ref = model(**inputs).logits
    st = mmsink.stats(model)
    mmsink.wrap(model, prune="replay", plan=st.kept_indices)
    with torch.no_grad():
        got = model(**inputs).logits
    again = mmsink.stats(model)
    assert again.kept_indices == st.kept_indices
    if method == "visipruner":
        return  # its shallow stage also reweights attention, which is work, not part of the plan
    text = ~(inputs["input_ids"] == 100)  # dropped visual positions carry zeros; text rows must match
    torch.testing.assert_close(got[text], ref[text], atol=1e-5, rtol=1e-5)
    assert again.prefill_flops <= st.prefill_flops  # no selection work


def test_replay_refuses_bad_plans():
    model = tiny_llava()
    with pytest.raises(ValueError, match="plan"):
        mmsink.wrap(model, prune="replay")
    with pytest.raises(ValueError, match="layers"):
        mmsink.wrap(model, prune="replay", plan=[[[1, 2]]])
    inputs = batch([prompt(5, 7, seed=1)])
    mmsink.wrap(model, prune="replay", plan=[[[10, 11], [10]]] * 8)
    with pytest.raises(ValueError, match="samples"), torch.no_grad():
        model(**inputs)
