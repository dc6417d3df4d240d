"""Build the English pretraining corpus of statetune's tiny RWKV-7 from permissively licensed Debian packages.

Why Debian packages: they are real English prose, installable offline from a package mirror, versioned,
and every one carries a machine-readable licence file (``/usr/share/doc/<pkg>/copyright``) that this
script checks before it reads a byte of the package's text. The sources and their licences:

* ``fortunes`` (fortune-mod, BSD): quotations and jokes, ``%``-separated;
* ``wordnet-base`` (WordNet 3.0 licence): dictionary glosses and example sentences;
* ``python3.X-doc`` (PSF licence): the Python documentation, HTML converted to plain text;
* ``libreoffice-help-en-us`` (MPL-2.0): the LibreOffice help pages, HTML converted to plain text.

Output (``--out``, default ``corpus/``): ``train.txt`` and ``val.txt`` (documents separated by one blank
line, no blank line inside a document; a deterministic shuffle, 1% of the documents held out) and
``sources.json`` (per source: package, version, licence, the copyright file it was verified from, bytes and
documents). Run as root and missing packages are installed with apt-get; otherwise they must be present.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

#: Fortune files left out: ascii-art is pictures, not prose; translate-me is not English; ethnic is
#: jokes about ethnic groups, which a model shipped as a library asset has no need to learn.
FORTUNE_SKIP = {"ascii-art", "translate-me", "ethnic"}
#: Python documentation pages that are not prose (indexes, the search page, the raw changelog of issue
#: numbers, licence texts).
PYDOC_SKIP = re.compile(r"(^|/)(genindex[^/]*|py-modindex|search|license|whatsnew/changelog)\.html$")
WORDNET_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
SYNSETS_PER_DOC = 20


@dataclass
class Source:
    """One Debian package: how to find it, how to check its licence, and how to read its documents."""

    name: str
    packages: tuple[str, ...]   # candidates, the first installed (or installable) one is used
    licence: str
    licence_markers: tuple[str, ...]   # every one must appear in the copyright file
    read: Callable[[Path, str], Iterator[str]]   # (root, package) -> documents
    line_dedupe: bool = False   # drop repeated lines (boilerplate of generated HTML help)
    stats: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- cleaning


def clean_document(text: str, min_line_alpha: int = 2) -> str:
    """Normalise whitespace inside lines, drop empty and garbage lines (fewer than ``min_line_alpha``
    letters, or mostly non-letters), and join what is left with single newlines."""
    lines = []
    for raw in text.splitlines():
        line = " ".join(raw.split())
        if not line:
            continue
        letters = sum(ch.isalpha() for ch in line)
        if letters < min_line_alpha or letters < 0.4 * len(line):
            continue
        lines.append(line)
    return "\n".join(lines)


def is_useful(doc: str, min_chars: int = 40, min_alpha: float = 0.55) -> bool:
    """Keep documents with some substance that are mostly letters (drops tables of numbers, stubs)."""
    if len(doc) < min_chars:
        return False
    letters = sum(ch.isalpha() for ch in doc)
    return letters >= min_alpha * len(doc.replace(" ", "").replace("\n", ""))


# --------------------------------------------------------------------------------------------- packages


def run(cmd: list[str]) -> str:
    """Run a command, returning stdout (raises on failure)."""
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def installed_version(package: str) -> str | None:
    """The installed Debian version of ``package``, or None when it is not installed."""
    try:
        out = run(["dpkg-query", "-W", "-f", "${Status}\t${Version}", package])
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    status, _, version = out.partition("\t")
    return version if status.endswith(" installed") else None


def ensure_installed(packages: Iterable[str], install: bool) -> None:
    """apt-get install the packages that are missing (only as root, and only when ``install``)."""
    missing = [p for p in packages if installed_version(p) is None]
    if not missing:
        return
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"missing Debian packages: {' '.join(missing)} (install them, or run as root "
                         f"with --install)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"apt-get install {' '.join(missing)}", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True, env=env)


def pick_package(source: Source, install: bool) -> str:
    """The first candidate package that is installed; else the first one apt knows about, installed."""
    for p in source.packages:
        if installed_version(p) is not None:
            return p
    for p in source.packages:
        try:
            policy = run(["apt-cache", "policy", p])
        except (subprocess.CalledProcessError, FileNotFoundError):
            continue
        if "Candidate:" in policy and "Candidate: (none)" not in policy:
            ensure_installed([p], install)
            return p
    raise SystemExit(f"{source.name}: none of the packages {', '.join(source.packages)} is available")


def verify_licence(root: Path, package: str, source: Source) -> str:
    """Check the package's copyright file names the expected licence; return its path (for the record)."""
    rel = f"usr/share/doc/{package}/copyright"
    path = root / rel
    if not path.is_file():
        raise SystemExit(f"{package}: no copyright file at /{rel}; refusing to use text of unknown licence")
    text = path.read_text(encoding="utf-8", errors="replace")
    missing = [m for m in source.licence_markers if m not in text]
    if missing:
        raise SystemExit(f"{package}: /{rel} does not contain {missing}; licence not verified")
    return "/" + rel


# --------------------------------------------------------------------------------------------- readers


def read_fortunes(root: Path, package: str) -> Iterator[str]:
    """Each fortune (the text between ``%`` lines) of every data file the package installs."""
    files = sorted(Path(p) for p in run(["dpkg-query", "-L", package]).split()
                   if "/games/fortunes/" in p and not p.endswith((".dat", ".u8")))
    for rel in files:
        path = root / rel.relative_to("/")
        if not path.is_file() or path.name in FORTUNE_SKIP:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        yield from re.split(r"^%\s*$", text, flags=re.M)


def _wordnet_lemma(word: str) -> str:
    return re.sub(r"\((a|p|ip)\)$", "", word).replace("_", " ")


def read_wordnet(root: Path, package: str) -> Iterator[str]:
    """Synset glosses ("words (part of speech): definition; "example""), 20 synsets of one
    lexicographer file (a semantic domain: animals, feelings, ...) per document."""
    for stem, pos in WORDNET_POS.items():
        path = root / "usr/share/wordnet" / f"data.{stem}"
        group: list[str] = []
        group_key = None
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or " | " not in line:
                    continue   # the licence header lines, or a synset without a gloss
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                lex_file, n_words = fields[1], int(fields[3], 16)
                words = [_wordnet_lemma(fields[4 + 2 * i]) for i in range(n_words)]
                entry = f"{', '.join(words)} ({pos}): {gloss.strip()}"
                if group and (lex_file != group_key or len(group) >= SYNSETS_PER_DOC):
                    yield "\n".join(group)
                    group = []
                group_key = lex_file
                group.append(entry)
        if group:
            yield "\n".join(group)


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track",
        "wbr"}
BLOCK = {"p", "div", "li", "dt", "dd", "tr", "br", "section", "table", "ul", "ol", "dl", "blockquote",
         "h1", "h2", "h3", "h4", "h5", "h6", "pre", "caption", "figcaption", "td", "th"}


class TextExtractor(HTMLParser):
    """Plain text of the main content of an HTML page, split into documents at section headings.

    ``is_root(tag, attrs)`` marks the element whose content is kept; ``is_skipped(tag, attrs)`` marks
    subtrees dropped entirely (navigation, scripts, code listings, hidden variants); a start tag in
    ``split_at`` begins a new document.
    """

    def __init__(self, is_root: Callable[[str, dict], bool], is_skipped: Callable[[str, dict], bool],
                 split_at: set[str]):
        super().__init__(convert_charrefs=True)
        self.is_root, self.is_skipped, self.split_at = is_root, is_skipped, split_at
        self.stack: list[tuple[str, bool, bool]] = []   # (tag, opens root, opens skip)
        self.in_root = self.skipping = 0
        self.docs: list[list[str]] = [[]]

    def handle_starttag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        attrs = {k: (v or "") for k, v in attrs_list}
        root = not self.in_root and self.is_root(tag, attrs)
        skip = bool(self.in_root or root) and self.is_skipped(tag, attrs)
        if self.in_root and not self.skipping:
            if tag in self.split_at:
                self.docs.append([])
            if tag in BLOCK:
                self.docs[-1].append("\n")
            elif tag in ("td", "th"):
                self.docs[-1].append(" ")
        if tag in VOID:
            return
        self.stack.append((tag, root, skip))
        self.in_root += root
        self.skipping += skip

    def handle_startendtag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        if self.in_root and not self.skipping and tag in BLOCK:
            self.docs[-1].append("\n")

    def handle_endtag(self, tag: str) -> None:
        if not any(t == tag for t, _, _ in self.stack):
            return   # a stray end tag
        while self.stack:
            t, root, skip = self.stack.pop()
            self.in_root -= root
            self.skipping -= skip
            if t == tag:
                break
        if self.in_root and not self.skipping and tag in BLOCK:
            self.docs[-1].append("\n")

    def handle_data(self, data: str) -> None:
        if self.in_root and not self.skipping:
            self.docs[-1].append(data.replace("\n", " "))

    def documents(self) -> list[str]:
        return ["".join(parts) for parts in self.docs]


def _classes(attrs: dict) -> set[str]:
    return set(attrs.get("class", "").split())


def _html_documents(path: Path, is_root: Callable[[str, dict], bool], is_skipped: Callable[[str, dict], bool],
                    split_at: set[str]) -> list[str]:
    parser = TextExtractor(is_root, is_skipped, split_at)
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    return parser.documents()


def read_python_docs(root: Path, package: str) -> Iterator[str]:
    """Sections (split at h1/h2) of the Python documentation's HTML pages, without code listings."""
    listed = sorted(Path(p) for p in run(["dpkg-query", "-L", package]).split() if p.endswith("/html"))
    dirs = [root / d.relative_to("/") for d in listed if (root / d.relative_to("/")).is_dir()]
    if not dirs:
        raise SystemExit(f"{package}: no html folder among its files")
    base = dirs[0]

    def is_root(tag: str, attrs: dict) -> bool:
        return tag == "div" and "body" in _classes(attrs) and attrs.get("role") == "main"

    def is_skipped(tag: str, attrs: dict) -> bool:
        cls = _classes(attrs)
        return (tag in ("script", "style", "pre", "nav") or "headerlink" in cls or "highlight" in cls
                or "linenos" in cls or "toctree-wrapper" in cls)

    for path in sorted(base.rglob("*.html")):
        rel = path.relative_to(base).as_posix()
        if rel.startswith(("_", "genindex")) or PYDOC_SKIP.search(rel):
            continue
        yield from _html_documents(path, is_root, is_skipped, {"h1", "h2"})


def read_libreoffice_help(root: Path, package: str) -> Iterator[str]:
    """One document per LibreOffice help page (the ``DisplayArea``), without hidden platform variants,
    code samples, icons and the debug footer."""
    pages = sorted(Path(p) for p in run(["dpkg-query", "-L", package]).split() if p.endswith(".html"))

    def is_root(tag: str, attrs: dict) -> bool:
        return tag == "div" and attrs.get("id") == "DisplayArea"

    def is_skipped(tag: str, attrs: dict) -> bool:
        cls = _classes(attrs)
        return (tag in ("script", "style", "pre", "footer", "nav", "aside", "header") or "hidden" in attrs
                or attrs.get("id") in ("SearchFrame", "DonationFrame") or "noteicon" in cls
                or "bascode" in cls or "debug" in cls)

    for rel in pages:
        path = root / rel.relative_to("/")
        if path.name == "noscript.html":
            continue
        yield from _html_documents(path, is_root, is_skipped, {"h1"})


SOURCES = [
    Source("fortunes", ("fortunes",), "BSD-3-Clause (fortune-mod; The Regents of the University of California)",
           ("BSD copyright", "Redistribution and use in source and binary forms"), read_fortunes),
    Source("wordnet", ("wordnet-base",), "WordNet-3.0 (Princeton University; permissive)",
           ("License: WordNet3.0", "WordNet 3.0 Copyright 2006 by Princeton University"), read_wordnet),
    Source("python-docs", ("python3.11-doc", "python3-doc"), "PSF-2.0 (Python Software Foundation License)",
           ("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2",), read_python_docs, line_dedupe=True),
    Source("libreoffice-help", ("libreoffice-help-en-us",), "MPL-2.0 (LibreOffice help)",
           ("License: MPL-2.0",), read_libreoffice_help, line_dedupe=True),
]


# --------------------------------------------------------------------------------------------- main


def collect(source: Source, root: Path, install: bool) -> list[str]:
    """Install/verify one source and return its cleaned, deduplicated documents."""
    package = source.packages[0] if root != Path("/") else pick_package(source, install)
    version = installed_version(package) if root == Path("/") else "unknown"
    copyright_file = verify_licence(root, package, source)
    seen_lines: set[str] = set()
    docs = []
    for raw in source.read(root, package):
        doc = clean_document(raw)
        if source.line_dedupe:
            kept = []
            for line in doc.split("\n"):
                if line not in seen_lines:
                    seen_lines.add(line)
                    kept.append(line)
            doc = "\n".join(kept)
        if is_useful(doc):
            docs.append(doc)
    source.stats = {"package": package, "version": version, "licence": source.licence,
                    "copyright_file": copyright_file}
    return docs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=None, help="output folder (default: corpus/ in the repository)")
    ap.add_argument("--root", default="/", help="filesystem root holding the installed packages")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the document shuffle")
    ap.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out")
    ap.add_argument("--no-install", action="store_true", help="never call apt-get; fail if a package is missing")
    args = ap.parse_args(argv)
    root = Path(args.root)
    out = Path(args.out) if args.out else Path(__file__).resolve().parent.parent / "corpus"

    if root == Path("/"):
        needed = [p for s in SOURCES if len(s.packages) == 1 for p in s.packages]
        ensure_installed(needed, install=not args.no_install)

    all_docs: list[tuple[str, str]] = []
    seen: set[bytes] = set()
    for source in SOURCES:
        docs = collect(source, root, install=not args.no_install)
        kept = 0
        n_bytes = 0
        for doc in docs:
            h = hashlib.sha1(doc.lower().encode("utf-8")).digest()
            if h in seen:
                continue
            seen.add(h)
            all_docs.append((source.name, doc))
            kept += 1
            n_bytes += len(doc.encode("utf-8"))
        source.stats.update(documents=kept, bytes=n_bytes)
        print(f"{source.name:18s} {source.stats['package']} {source.stats['version']}: {kept} documents, "
              f"{n_bytes / 1e6:.2f} MB", file=sys.stderr)

    rng = random.Random(args.seed)
    rng.shuffle(all_docs)
    n_val = max(1, round(len(all_docs) * args.val_fraction))
    val, train = all_docs[:n_val], all_docs[n_val:]

    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, part in (("train", train), ("val", val)):
        text = "\n\n".join(doc for _, doc in part) + "\n"
        tmp = out / f".{name}.txt.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / f"{name}.txt")
        sizes[name] = {"bytes": len(text.encode("utf-8")), "documents": len(part)}
    meta = {
        "description": "English text from permissively licensed Debian packages, built by scripts/build_corpus.py",
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "splits": sizes,
        "total_bytes": sizes["train"]["bytes"] + sizes["val"]["bytes"],
        "sources": {s.name: s.stats for s in SOURCES},
        "excluded": {"fortunes": sorted(FORTUNE_SKIP), "python-docs": PYDOC_SKIP.pattern},
    }
    (out / "sources.json").write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(f"train {sizes['train']['bytes'] / 1e6:.2f} MB ({sizes['train']['documents']} docs), "
          f"val {sizes['val']['bytes'] / 1e6:.2f} MB ({sizes['val']['documents']} docs) -> {out}/",
          file=sys.stderr)


if __name__ == "__main__":
    main()
