"""The tuner's picks kept on disk, so that a new process serving the same model on the same GPU does not time every
candidate again (tens of candidates per layer shape and row bucket: seconds each on an H100, more when they compile
for the first time).

One JSON file per version of the kernel sources (``<sources hash>.json`` in the cache folder): a change to any file
of this package (kernels, tiles, dispatch rules) starts a new file, so a pick is never reused by other kernels than
the ones it was timed on. Inside, each entry is keyed by the GPU (name, compute capability, multiprocessor count),
the torch and Triton versions and the tuner's own key (format, activation dtype, row bucket, N, K), and holds the
pick's :class:`~auto_quant.kernels.dispatch.KernelConfig` fields. Writes go to a temporary file renamed over the
old one (a reader never sees half a file) and merge with what is there, so processes sharing the folder add to one
another's picks; an unreadable or foreign file is ignored with a warning and replaced on the next write. Reading
or writing never fails a matmul: an unusable folder only costs the re-tuning.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from auto_quant.errors import ConfigError
from auto_quant.paths import replace_file, user_cache_dir

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def default_tuner_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/auto_quant/tuner`` (``~/.cache`` without it)."""
    return user_cache_dir("tuner")


@functools.cache
def sources_fingerprint(folder: str | None = None) -> str:
    """A hash of every ``.py`` file of the kernel package (``folder``: another folder, for tests)."""
    root = Path(folder) if folder is not None else Path(__file__).parent
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for path in sorted(root.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def device_fingerprint(device: torch.device) -> str:
    """What a pick depends on beyond the kernel sources: the GPU model and size, torch and Triton."""
    import triton

    p = torch.cuda.get_device_properties(device)
    return (f"{p.name}|sm{p.major}{p.minor}|{p.multi_processor_count}sm|torch {torch.__version__}"
            f"|triton {triton.__version__}")


def entry_key(device_id: str, key: tuple) -> str:
    """The tuner's key as a JSON-safe string, its device replaced by ``device_id``."""
    return json.dumps([device_id] + [str(v) if isinstance(v, torch.dtype) else v for v in key
                                     if not isinstance(v, torch.device)])


def tuner_cache(spec: str | os.PathLike | None) -> TunerCache | None:
    """``"auto"``: the default folder (:func:`default_tuner_cache_dir`); ``None``: no cache; else a folder."""
    if spec is None:
        return None
    if spec == "auto":
        return TunerCache(default_tuner_cache_dir())
    if isinstance(spec, (str, os.PathLike)):
        return TunerCache(spec)
    raise ConfigError(f"tuning_cache is 'auto', None or a folder (str or Path), not {spec!r}")


class TunerCache:
    """Picks on disk in ``cache_dir`` (see the module docstring). ``sources``: the kernel sources' hash (default:
    this package's)."""

    def __init__(self, cache_dir: str | os.PathLike, sources: str | None = None):
        self.cache_dir = Path(cache_dir)
        self._sources = sources
        self._entries: dict[str, dict] | None = None

    @property
    def path(self) -> Path:
        """The file of these kernel sources (hashed on first use, not when a model is loaded)."""
        return self.cache_dir / f"{self._sources or sources_fingerprint()}.json"

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(
                    data.get("entries"), dict):
                raise ValueError("not a tuner cache of this version")
            return data["entries"]
        except FileNotFoundError:
            return {}
        except Exception as e:  # a corrupt or foreign file: ignored, replaced on the next write
            log.warning("auto_quant: kernel tuning cache %s is unreadable (%s); ignoring it", self.path, e)
            return {}

    def _loaded(self) -> dict[str, dict]:
        """The file's entries, read on first use."""
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def get(self, device_id: str, key: tuple):
        """The cached pick for ``key`` on the device ``device_id``, or None."""
        from auto_quant.kernels.dispatch import KernelConfig

        fields = self._loaded().get(entry_key(device_id, key))
        if fields is None:
            return None
        try:
            return KernelConfig(**fields)
        except Exception as e:  # an entry these kernels do not take (edited by hand, say): tune again
            log.warning("auto_quant: ignoring cached kernel pick %s (%s)", fields, e)
            return None

    def picks(self, device_id: str) -> list[tuple[tuple, object]]:
        """Every cached pick for the device ``device_id``: (the tuner's key without its device, the
        :class:`~auto_quant.kernels.dispatch.KernelConfig`); entries this code cannot read are left out."""
        from auto_quant.kernels.dispatch import KernelConfig

        found = []
        for k, fields in self._loaded().items():
            try:
                dev, bits, group_size, has_zero, dtype, bucket, n, k_in = json.loads(k)
                if dev != device_id:
                    continue
                act = getattr(torch, dtype.removeprefix("torch."))
                if not isinstance(act, torch.dtype):
                    raise ValueError(f"{dtype} is not a torch dtype")
                found.append(((bits, group_size, has_zero, act, bucket, n, k_in), KernelConfig(**fields)))
            except Exception as e:  # an entry of another layout or edited by hand: not compiled ahead
                log.debug("skipping tuner cache entry %s: %s", k, e)
        return found

    def put(self, device_id: str, key: tuple, cfg) -> None:
        """Store ``cfg`` for ``key``, merged with the file's current entries (atomic rename)."""
        k = entry_key(device_id, key)
        try:
            entries = self._read()
            entries[k] = dataclasses.asdict(cfg)
            text = json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=0, sort_keys=True)
            replace_file(self.path, lambda tmp: tmp.write_text(text))
            self._entries = entries
        except OSError as e:  # a read-only or full disk: the pick stays in memory only
            log.warning("auto_quant: could not write the kernel tuning cache %s (%s)", self.path, e)
            if self._entries is not None:
                self._entries[k] = dataclasses.asdict(cfg)
