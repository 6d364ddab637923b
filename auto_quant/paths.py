"""Where auto_quant keeps files between runs."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/auto_quant/<name>`` (``~/.cache`` without it): calibration tokens, corpora, compiled CPU
    kernels, kernel tuning picks."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "auto_quant" / name
