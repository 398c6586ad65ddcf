"""The shape of the code (issue 14): the import graph has no circle and the core imports no family, tool,
eval or demo; no core function is longer than 60 lines; a pruner written outside the package (in the
vision stage or before the LLM) runs on every family through its own file alone; what ``wrap`` binds on
an instance is restored exactly; the installed names are ``mmsink.evals`` / ``mmsink.demo``."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import batch, next_batch, prompt, qwen_batch, tiny_llava, tiny_llava_next, tiny_qwen

import mmsink
from mmsink.pruners import REGISTRY
from mmsink.pruners.base import Pruner, VisionPruner, budget_tokens, per_image

ROOT = Path(__file__).resolve().parent.parent
# source folder -> installed package name
PACKAGES = {
    ROOT / "mmsink": "mmsink",
    ROOT / "patches": "mmsink.patches",
    ROOT / "evals": "mmsink.evals",
    ROOT / "demo": "mmsink.demo",
}


def modules() -> dict:
    """{module name: path} of every module that installs under ``mmsink``."""
    out = {}
    for folder, pkg in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def imports(name: str, path: Path, known: set) -> set:
    """The mmsink modules ``name`` imports (at any depth of its code), resolved to known module names."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            # ``from pkg import mod`` imports the module; ``from mod import name`` imports the module
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known) for m, p in mods.items()}


def test_no_import_circle(graph):
    """Tarjan's strongly connected components: every one is a single module."""
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    # a package importing its own submodules is not a circle when they do not import it back
    assert not circles, circles


def test_core_imports_no_family_tool_eval_or_demo(graph):
    banned = ("mmsink.patches", "mmsink.tools", "mmsink.evals", "mmsink.demo", "mmsink.fast", "mmsink.api")
    bad = {
        m: sorted(t for t in deps if t.startswith(banned))
        for m, deps in graph.items()
        if m.startswith("mmsink.core")
    }
    assert not {m: d for m, d in bad.items() if d}


def test_no_core_function_over_60_lines():
    long = []
    for path in (ROOT / "mmsink" / "core").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert not long, long


def test_api_holds_public_functions_only():
    tree = ast.parse((ROOT / "mmsink" / "api.py").read_text())
    assert not [n.name for n in tree.body if isinstance(n, ast.ClassDef)]


# ---------------------------------------------------------------- a pruner from outside the package


class TopScores(VisionPruner):
    """A vision-stage method written outside mmsink: per image, the ``budget`` tokens the family scores
    highest (no merging)."""

    name = "test-top-scores"
    seen: list = []  # per call, the tokens kept per image (as the rows of each image add up)

    def select(self, ctx, tokens):
        s = tokens.scores.float()
        if tokens.present is not None:
            s = s.masked_fill(~tokens.present, float("-inf"))
        k = [budget_tokens(self.budget, n) for n in tokens.sizes]
        keep = torch.zeros_like(s, dtype=torch.bool)
        for r, kr in enumerate(k):  # rows are few in a test
            keep[r, s[r].topk(kr).indices] = True
        self.seen.append(per_image(k, tokens.parts))
        return tokens.features, keep


class FirstTokens(Pruner):
    """A before-LLM method written outside mmsink: the first ``budget`` tokens of each image."""

    name = "test-first-tokens"

    @dataclasses.dataclass
    class Options:
        pass

    def final_layer(self, ctx):
        return 0

    def before_llm(self, ctx, embeds):
        img = ctx.image_of()
        rank = torch.zeros_like(img)
        for m in range(ctx.layout.counts.shape[1]):
            cand = img == m
            rank = torch.where(cand, cand.long().cumsum(1) - 1, rank)
        ctx.decide(ctx.keep_text(ctx.visual() & (rank < self.budget)))
        return None


CASES = {
    "llava": (lambda: tiny_llava(), lambda m: batch([prompt(5, 9, seed=1), prompt(3, 4, seed=2)])),
    "llava_next": (
        lambda: tiny_llava_next(),
        lambda m: next_batch(m, [(4, 6, [(28, 56)]), (2, 3, [(56, 56)])], seed=1)[0],
    ),
    "qwen2_vl": (
        lambda: tiny_qwen("qwen2_vl"),
        lambda m: qwen_batch([(4, 6, [(8, 12)]), (2, 3, [(4, 8)])])[0],
    ),
}


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.parametrize("cls", [TopScores, FirstTokens])
def test_outside_pruner_runs_on_every_family(monkeypatch, family, cls):
    """Registered from here, the method runs like a built-in one: each image keeps ``budget`` tokens, and
    the logits equal those of the same plan replayed through the plan mechanism alone (``replay``)."""
    monkeypatch.setitem(REGISTRY, cls.name, cls)
    monkeypatch.setattr(TopScores, "seen", [])
    build, make = CASES[family]
    model = build()
    inputs = make(model)
    with torch.no_grad():
        mmsink.wrap(model, prune=cls.name, budget=3)
        out = model(**inputs).logits[:, -1]
        st = mmsink.stats(model)
        mmsink.wrap(model, prune="replay", plan=st.kept_indices)
        ref = model(**inputs).logits[:, -1]
        mmsink.unwrap(model)
    lay = mmsink.core.layout.build_layout(
        inputs["input_ids"], inputs.get("attention_mask"), model.config.image_token_id, None, None
    )
    if cls is FirstTokens:
        want = [3 * len(s) for s in lay.sizes]
    else:
        it = iter(TopScores.seen[0])
        want = [sum(next(it) for _ in s) for s in lay.sizes]
    assert st.kept_tokens[-1] == want
    torch.testing.assert_close(out, ref)


def test_vision_scores_are_the_cls_attention(monkeypatch):
    """LLaVA's vision-stage scores are the [CLS] row of the feature layer's attention, mean over heads: the
    outside method keeps the top tokens of that row as an eager tower computes it."""
    monkeypatch.setitem(REGISTRY, TopScores.name, TopScores)
    model = tiny_llava(attn="eager")
    model.model.vision_tower.set_attn_implementation("eager")
    inputs = batch([prompt(5, 9, seed=3)])
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
        layer = model.config.vision_feature_layer  # hidden state -2: the output of the last layer but one
        att = out.attentions[layer % (len(out.attentions) + 1) - 1]
        cls = att[0, :, 0, 1:].mean(0)
        want = sorted((cls.topk(4).indices + int(inputs["input_ids"][0].tolist().index(100))).tolist())
        mmsink.wrap(model, prune=TopScores.name, budget=4)
        model(**inputs)
        got = mmsink.stats(model).kept_indices[-1][0]
        mmsink.unwrap(model)
    assert got == want


# ---------------------------------------------------------------- instance patching


def test_unwrap_restores_the_instances_own_methods():
    """A user's own instance-level ``generate`` survives wrap / unwrap; wrapped, generate goes through it."""
    model = tiny_llava()
    calls = []
    own = model.generate

    def mine(*args, **kwargs):
        calls.append(1)
        return own(*args, **kwargs)

    model.generate = mine
    inner = model.model
    mmsink.wrap(model, prune="fastv", budget=4)
    model.generate(**batch([prompt(5, 9, seed=1)]), max_new_tokens=2, do_sample=False)
    assert calls == [1]
    mmsink.unwrap(model)
    assert model.__dict__["generate"] is mine
    assert "get_placeholder_mask" not in inner.__dict__


def test_unwrap_inside_disabled_restores_the_attention_entry():
    model = tiny_llava()
    mmsink.wrap(model, prune="fastv", budget=4)
    with mmsink.disabled(model):
        mmsink.unwrap(model)
    assert model.config.text_config._attn_implementation == "sdpa"


# ---------------------------------------------------------------- installed names


def test_evals_and_demo_live_under_mmsink(tmp_path):
    """Installed (not a checkout on PYTHONPATH): ``import evals`` / ``import demo`` find nothing."""
    import importlib.metadata
    import os

    try:
        importlib.metadata.version("mmsink")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mmsink is not installed here (a checkout on PYTHONPATH)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import importlib.util as u, mmsink.evals.eval, mmsink.demo.app, mmsink.patches;"
        "print(u.find_spec('evals') is None, u.find_spec('demo') is None)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_demo_script_runs_from_its_path(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "demo" / "app.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "--model" in out.stdout
