"""CPU checks of the sink-reference LM pipeline: corpus extraction and storage, tokenizer round trip,
training lowers the loss, resuming continues from saved weights, and the phenomena probe matches a
plain eager computation and a case whose answer is known in closed form."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import torch
from mmsink.evals import corpus as C
from mmsink.evals import train_sinks as T

PROSE = [
    "The kernel schedules every runnable task on one of the processors and balances the load.",
    "A dictionary gives the meaning of a word, its origin, and examples of the way writers have used it.",
    "Mail that arrives while the machine is down waits in the queue until the next delivery succeeds.",
    "Every paragraph in this fixture is ordinary English prose, long enough to pass the cleaning filter.",
]


def _sources(tmp_path):
    root = tmp_path / "pkg"
    return [
        dict(
            name="rst",
            kind="local",
            root=str(root),
            package="fixture",
            version="0",
            licence="test",
            fmt="rst",
            globs=["doc/*.rst.gz"],
        ),
        dict(
            name="html",
            kind="local",
            root=str(root),
            package="fixture",
            version="0",
            licence="test",
            fmt="html",
            globs=["doc/*.html"],
        ),
        dict(
            name="mail",
            kind="local",
            root=str(root),
            package="fixture",
            version="0",
            licence="test",
            fmt="email",
            globs=["doc/c.txt"],
        ),
    ]


def _fixture(tmp_path):
    root = tmp_path / "pkg"
    (root / "doc").mkdir(parents=True)
    rst = (
        "Title\n=====\n\n.. note:: directive text that must go\n\n" + PROSE[0] + " See :ref:`the scheduler"
        " <sched>` for ``details``.\n\n    int main(void) { return x[0]->y; }\n\n" + PROSE[1] + "\n"
    )
    (root / "doc" / "a.rst.gz").write_bytes(gzip.compress(rst.encode()))
    html = (
        "<html><head><title>t</title><style>p {color: red}</style></head><body><p>"
        + PROSE[2]
        + " &amp; more. "
        + PROSE[3]
        + "</p><pre>for (;;) { x++; }</pre><p>"
        + PROSE[1]
        + "</p></body></html>"
    )
    (root / "doc" / "b.html").write_text(html)
    email = (
        "From: a@b\nSubject: A question about queues\n\n"
        + PROSE[3]
        + " "
        + PROSE[0]
        + "\n> quoted text is dropped here ok\n"
    )
    (root / "doc" / "c.txt").write_text(email)
    for k in range(8):
        long_doc = "\n\n".join(
            f"Document {k} part {i} says: {PROSE[i % 4]} Extra words {i} {i * 7}." for i in range(8)
        )
        (root / "doc" / f"d{k}.rst.gz").write_bytes(gzip.compress(long_doc.encode()))
    return _sources(tmp_path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    out = tmp / "corpus"
    meta = C.build(out, tmp / "cache", _fixture(tmp), vocab_size=400, val_share=0.5, log=lambda *_: None)
    return out, meta


def test_extraction_cleans_and_dedups(tmp_path):
    srcs = _fixture(tmp_path)
    seen: set[bytes] = set()
    docs = {d: t for s in srcs for d, t in C.documents(tmp_path / "pkg", s, seen)}
    text = "\n".join(docs.values())
    assert "directive text" not in text and "int main" not in text and "x++" not in text
    assert "color: red" not in text and "quoted text" not in text and "<p>" not in text
    assert "See the scheduler for details." in text
    paragraphs = [p for t in docs.values() for p in t.split("\n\n")]
    assert paragraphs.count(PROSE[1]) == 1  # in a.rst; its copy in b.html is a duplicate and goes
    assert paragraphs.count(PROSE[2] + " & more. " + PROSE[3]) == 1
    assert "A question about queues" in text


def test_build_split_and_tokenizer_round_trip(built):
    out, meta = built
    tok, tr, va, meta2 = C.load_corpus(out)
    assert meta2 == meta and tok.get_vocab_size() == 400
    assert [tok.token_to_id(s) for s in C.SPECIALS] == [0, 1, 2, 3, 4]
    assert meta["train"]["documents"] > 0 and meta["val"]["documents"] > 0
    assert tr.size == meta["train"]["tokens"] and va.size == meta["val"]["tokens"]
    assert int((tr == C.EOS).sum()) == meta["train"]["documents"]  # one </s> after each document
    assert not (tr == C.BOS).any()  # <s> is added by the training windows only
    sample = PROSE[1] + " Naïve café, 42 % & {braces}."
    assert tok.decode(tok.encode(sample).ids) == sample
    # the stream decodes back to the training documents, in order
    seen: set[bytes] = set()
    root = out.parent / "pkg"
    docs = [(d, t) for s in _sources(out.parent) for d, t in C.documents(root, s, seen)]
    want = [t for d, t in docs if not C.is_validation(d, 0.5)]
    ends = (tr == C.EOS).nonzero()[0].tolist()
    got = [tok.decode(tr[a + 1 if i else 0 : b].tolist()) for i, (a, b) in enumerate(zip([0] + ends, ends))]
    assert got == want


def _tiny_args(corpus, out, *extra):
    return [
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--layers",
        "2",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--ffn",
        "64",
        "--max-pos",
        "64",
        "--ctx",
        "32",
        "--batch",
        "8",
        "--lr",
        "1e-2",
        "--warmup",
        "5",
        "--val-windows",
        "4",
        "--probe-windows",
        "2",
        "--probe-len",
        "24",
        "--probe-offset",
        "4",
        "--shard",
        "100KB",
        *extra,
    ]


def test_training_lowers_loss_and_resumes(built, tmp_path):
    corpus, _ = built
    rec = T.main(_tiny_args(corpus, tmp_path / "a", "--steps", "40", "--eval-every", "20"))
    losses = [p["val_loss"] for p in rec["probes"]]
    assert losses[-1] < losses[0] - 0.5, losses
    assert rec["global_step"] == 40 and len(rec["probes"]) == 3
    saved = json.loads((tmp_path / "a" / "training.json").read_text())
    assert saved["global_step"] == 40
    assert list((tmp_path / "a").glob("*.safetensors"))

    # probing the saved (bf16) checkpoint with the training probe's setting repeats its numbers
    probe = T.main(
        _tiny_args(corpus, tmp_path / "p.json", "--init", str(tmp_path / "a"), "--probe-only", "4:24:2")
    )
    assert probe["probes"][0]["first_attn"] == pytest.approx(rec["probes"][-1]["first_attn"], abs=2e-3)
    assert json.loads((tmp_path / "p.json").read_text())["probes"][0]["len"] == 24

    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    rec2 = T.main(
        _tiny_args(
            corpus,
            tmp_path / "b",
            "--init",
            str(tmp_path / "a"),
            "--steps",
            "10",
            "--eval-every",
            "10",
            "--lr",
            "1e-9",
            "--warmup",
            "1",
        )
    )
    assert rec2["global_step"] == 50 and rec2["previous"][0]["global_step"] == 40
    # with a vanishing lr the resumed run starts where the first ended (same weights, same probe)
    assert abs(rec2["probes"][0]["val_loss"] - losses[-1]) < 0.05
    assert rec2["probes"][0]["first_attn"] == pytest.approx(rec["probes"][-1]["first_attn"], abs=2e-3)
    m2 = LlamaForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32)
    assert m2.config.num_hidden_layers == 2
    w1, w2 = m.model.layers[0].mlp.up_proj.weight, m2.model.layers[0].mlp.up_proj.weight
    assert (w1 - w2).abs().max() < 1e-2


def test_state_resume_is_exact(built, tmp_path):
    """A run paused by its time budget and resumed from --state ends with the same weights and
    probes as the same schedule run in one go (optimizer, data order and lr schedule carry over)."""
    corpus, _ = built
    common = ("--steps", "20", "--eval-every", "10", "--no-save")
    whole = T.main(_tiny_args(corpus, tmp_path / "whole", *common))
    state = str(tmp_path / "st.pt")
    first = T.main(_tiny_args(corpus, tmp_path / "p1", *common, "--state", state, "--time-budget", "1e-6"))
    assert first["paused_at"] == 10 and first["global_step"] == 10
    second = T.main(_tiny_args(corpus, tmp_path / "p2", *common, "--resume", state))
    assert second["global_step"] == 20 and second["resumed_at"] == [10]
    assert [p["step"] for p in second["probes"]] == [p["step"] for p in whole["probes"]]
    assert second["probes"][-1]["val_loss"] == whole["probes"][-1]["val_loss"]
    assert second["probes"][-1]["first_attn"] == whole["probes"][-1]["first_attn"]


def _model(layers=3, hidden=32, heads=4, vocab=64):
    torch.manual_seed(0)
    m = T.build_model(vocab, layers, hidden, heads, 64, 64).eval()
    return m


def test_measure_matches_plain_eager_forward():
    m = _model()
    x = torch.randint(5, 64, (3, 20))
    x[:, 0] = C.BOS
    res = T.measure(m, x, offset=5)
    assert m.config._attn_implementation == "sdpa"  # restored after the probe
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM(m.config.__class__(**{**m.config.to_dict(), "attn_implementation": "eager"}))
    plain.load_state_dict(m.state_dict())
    with torch.no_grad():
        out = plain.eval()(input_ids=x, output_attentions=True, output_hidden_states=True)
    for layer, att in enumerate(out.attentions):
        want = att[:, :, 5:, 0].mean()
        assert res["first_attn"][layer] == pytest.approx(float(want), abs=1e-4)
    heads = torch.stack([a[:, :, 5:, 0].mean((0, 2)) for a in out.attentions])
    assert res["sink_rate"] == pytest.approx(float((heads > 0.3).float().mean()), abs=1e-4)
    for layer in range(len(out.attentions) - 1):  # the last hidden state HF returns is after the final norm
        h = out.hidden_states[layer + 1]
        want = (h.abs() / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).max()
        assert res["max_ratio"][layer] == pytest.approx(float(want), rel=1e-3, abs=0.01)


def test_measure_known_answers():
    """q = k = 0 gives uniform causal attention (1 / (t + 1) on position 0); zero o_proj and down_proj keep
    the residual stream equal to the embeddings, where one channel of <s> is planted large."""
    m = _model(layers=2, hidden=64, heads=2)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.zero_()
            layer.self_attn.k_proj.weight.zero_()
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = m.model.embed_tokens.weight
        emb[C.BOS].fill_(0.01)
        emb[C.BOS, 7] = 5.0
    x = torch.randint(5, 64, (2, 12))
    x[:, 0] = C.BOS
    res = T.measure(m, x, offset=3)
    want = sum(1 / (t + 1) for t in range(3, 12)) / 9
    assert res["first_attn"] == pytest.approx([want, want], abs=1e-5)
    assert res["sink_rate"] == 0.0  # 1/4 at t = 3 and less after: no head over 0.3
    e = emb[C.BOS].detach()
    ratio = float(5.0 / e.pow(2).mean().add(1e-6).sqrt())
    for row in res["hidden"]:
        assert row["max"] == pytest.approx(ratio, rel=1e-3) and row["pos"] == 0 and row["chan"] == 7
        assert row["max_pos0"] == row["max"] and row["max_rest"] < row["max"]
        assert row["abs_max"] == pytest.approx(5.0, rel=1e-3)
    res3 = T.measure(m, x, offset=1)
    assert res3["sink_rate"] == pytest.approx(0.0) and res3["first_attn"][0] > want


MAN = r""".\" Copyright line that must go
.TH open 2 2023-02-05 "Linux man-pages"
.SH NAME
open \- open and possibly create a file
.SH SYNOPSIS
.nf
.BI "int open(const char *" pathname ", int " flags );
.fi
.SH DESCRIPTION
The
.BR open ()
system call opens the file specified by
.IR pathname .
It returns a \fBfile descriptor\fP, a small \(lqnonnegative\(rq integer.
.PP
.EX
fd = open("x", O_RDONLY);
.EE
.TP
.B O_APPEND
The file is opened in append mode before each write.
.SH SEE ALSO
.BR close (2),
.BR read (2)
"""

MDOC = r""".Dd August 28, 2020
.Dt MALLOC 9
.Sh NAME
.Nm malloc
.Nd kernel memory management routines
.Sh SYNOPSIS
.Fn malloc "size_t size" "int flags"
.Sh DESCRIPTION
The
.Fn malloc
function allocates memory from a specific
.Xr numa 4
domain, and
.Fl v
prints more.
.Bd -literal
p = malloc(10, M_TEMP, M_WAITOK);
.Ed
.Bl -tag -width indent
.It Dv M_ZERO
Causes the allocated memory to be set to all zeros.
.El
"""

VIMHELP = """*usr_05.txt*\tFor Vim version 9.0.

\t\t     VIM USER MANUAL - by Bram Moolenaar

==============================================================================
*05.1*\tThe vimrc file\t\t\t\t\t*vimrc-intro*

You probably got tired of typing commands, see |vimrc| for where it lives.
If you want it always on, add this line: >

\tset incsearch
<
For this new line to take effect you need to restart Vim.
"""


def test_man_and_vimhelp_extraction_keep_prose_only():
    man = C.clean_document(C.man_text(MAN))
    assert man.split("\n\n") == [
        "open - open and possibly create a file",
        "The open() system call opens the file specified by pathname. It returns a file descriptor, a small"
        ' "nonnegative" integer.',
        "O_APPEND The file is opened in append mode before each write.",
    ]
    mdoc = C.clean_document(C.man_text(MDOC))
    assert mdoc.split("\n\n") == [
        "kernel memory management routines",
        "The malloc function allocates memory from a specific numa(4) domain, and -v prints more.",
        "M_ZERO Causes the allocated memory to be set to all zeros.",
    ]
    vim = C.clean_document(C.vimhelp_text(VIMHELP))
    assert vim.split("\n\n") == [
        "VIM USER MANUAL - by Bram Moolenaar",
        "You probably got tired of typing commands, see vimrc for where it lives. If you want it always on,"
        " add this line:",
        "For this new line to take effect you need to restart Vim.",  # the example between them goes
    ]


def test_source_sets_extend_the_first_and_name_packages_exactly():
    assert C.SETS[1] is C.SOURCES and C.SETS[2][: len(C.SOURCES)] == C.SOURCES
    names = [s["name"] for s in C.SETS[2]]
    assert len(names) == len(set(names))
    for s in C.SETS[2]:
        assert s["fmt"] in C.EXTRACT or s["fmt"] == "fortune"
        assert s["version"] and s["licence"] and s["globs"]
    with pytest.raises(SystemExit, match="unknown source"):
        C.main(["build", "--out", "/nonexistent", "--set", "1", "--only", "manpages"])


def test_fetch_uses_only_the_exact_package_version(tmp_path, monkeypatch):
    """A cached .deb of another version is not taken for the pinned one (epochs are %3a in file names)."""
    (tmp_path / "pkg_1.0-1_all.deb").write_bytes(b"old")
    calls = []

    def fake_run(cmd, cwd=None, **kw):
        calls.append(cmd)
        if cmd[:2] == ["apt-get", "download"]:
            (tmp_path / "pkg_2%3a1.0-2_all.deb").write_bytes(b"new")
        elif cmd[0] == "dpkg":
            Path(cmd[3]).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(C.subprocess, "run", fake_run)
    src = dict(name="p", kind="deb", package="pkg", version="2:1.0-2")
    root, digest = C.fetch(src, tmp_path)
    assert calls[0] == ["apt-get", "download", "pkg=2:1.0-2"]
    assert calls[1][:2] == ["dpkg", "-x"] and calls[1][2].endswith("pkg_2%3a1.0-2_all.deb")
    assert digest == hashlib.sha256(b"new").hexdigest()
