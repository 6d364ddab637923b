"""Where a block's tuning runs: a memory estimate per device, and the plan derived from it.

Pure functions and frozen dataclasses. The pipeline tunes one decoder block at a time, so the
peak memory of a device is the peak of one block's tuning step (plus the calibration cache when
it lives there). The estimate counts, in bytes:

per quantized linear (``O`` outputs, ``I`` inputs, ``I'`` = ``I`` padded to whole groups of ``g``,
``G = I'/g`` groups, ``e`` = bytes of the model dtype):
  weight ``O·I·e`` (+ bias ``O·e``); float32 grouped copy and its range ``4·O·(I' + 2G)``;
  tunables v/min/max ``4·O·(I' + 2G)``; their gradients (the same, min/max only when tuned);
  two snapshots of the tunables (the RTN state and the best iterate); what autograd keeps for the
  fake-quantized weight (two float32 ``O·I'`` tensors and the cast weight ``O·I·e``); and, while it
  runs, a transient of two float32 ``O·I'`` tensors (counted once per device: linears run in turn).
  Sign-SGD has no optimizer state.
a linear on another device than the block also holds its input and output for one batch.

per block, on the block's (primary) device:
  the non-linear parameters (norms); one batch of inputs and targets and the float32 loss
  terms ``B·S·H·(2e + 12)``; saved activations for the backward ``B·S·(6H + 2(Hq + 2Hkv))·e``,
  the float32 RMSNorm copies ``B·S·4H·4``, the MLP ``B·S·4I_mlp·e``, and with eager attention the
  score matrices ``2·B·heads·S²·e``.
calibration cache: four ``nsamples·S·H·e`` lists (inputs of both chains, the float targets and the
  next quantized inputs), on the primary device or on the CPU.
the CPU always holds the float model (it stays where it was loaded; each block visits the device).

Everything is an estimate of what PyTorch allocates; the allocator's fragmentation and the CUDA
context (a few hundred MiB) come on top, hence :data:`DEFAULT_RESERVE`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from auto_quant.errors import DeviceError, PlacementError

GiB = 1 << 30
DEFAULT_RESERVE = 1 << 30  # per GPU, kept free for the CUDA context and fragmentation
CACHE_COPIES = 4  # x_fp, x_q, targets, x_q_next are alive together at the end of a block


# --------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class LinearShape:
    name: str  # name inside the block, e.g. "self_attn.q_proj"
    out_features: int
    in_features: int
    bias: bool = False


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int
    linears: tuple[LinearShape, ...]
    block_other_params: int  # parameters of a block outside its linears (norms)
    outside_params: int  # embeddings, final norm, output head
    block_prefix: str = "model.layers"

    @property
    def block_params(self) -> int:
        return self.block_other_params + sum(l.out_features * l.in_features + (l.out_features if l.bias else 0)
                                             for l in self.linears)

    @property
    def total_params(self) -> int:
        return self.num_layers * self.block_params + self.outside_params

    @classmethod
    def from_config(cls, config, block_prefix: str = "model.layers") -> "ModelShape":
        """A Llama-style decoder (q/k/v/o attention, gate/up/down MLP) from a transformers config."""
        h = int(config.hidden_size)
        inter = int(config.intermediate_size)
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        hd = int(getattr(config, "head_dim", None) or h // heads)
        vocab = int(config.vocab_size)
        qkv_bias = bool(getattr(config, "attention_bias", getattr(config, "model_type", "") == "qwen2"))
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        linears = (
            LinearShape("self_attn.q_proj", heads * hd, h, qkv_bias),
            LinearShape("self_attn.k_proj", kv * hd, h, qkv_bias),
            LinearShape("self_attn.v_proj", kv * hd, h, qkv_bias),
            LinearShape("self_attn.o_proj", h, heads * hd, qkv_bias and getattr(config, "model_type", "") != "qwen2"),
            LinearShape("mlp.gate_proj", inter, h, mlp_bias),
            LinearShape("mlp.up_proj", inter, h, mlp_bias),
            LinearShape("mlp.down_proj", h, inter, mlp_bias),
        )
        tied = bool(getattr(config, "tie_word_embeddings", False))
        outside = vocab * h * (1 if tied else 2) + h
        return cls(h, inter, int(config.num_hidden_layers), heads, kv, vocab, hd, linears, 2 * h, outside, block_prefix)

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelShape":
        """The real linears of the model's first block (any architecture the discovery finds)."""
        from auto_quant.models.discovery import find_block_list, quantizable_layers, weight_as_out_in

        blist = find_block_list(model)
        block = blist.blocks[0]
        linears = tuple(
            LinearShape(name, *weight_as_out_in(m).shape, getattr(m, "bias", None) is not None)
            for name, m in quantizable_layers(block).items()
        )
        cfg = getattr(model, "config", None)
        lin_params = sum(l.out_features * l.in_features + (l.out_features if l.bias else 0) for l in linears)
        block_params = sum(p.numel() for p in block.parameters())
        total = sum(p.numel() for p in model.parameters())
        h = int(getattr(cfg, "hidden_size", 0) or linears[0].in_features)
        heads = int(getattr(cfg, "num_attention_heads", 0) or 1)
        return cls(
            hidden_size=h,
            intermediate_size=int(getattr(cfg, "intermediate_size", 0) or max(l.out_features for l in linears)),
            num_layers=len(blist.blocks),
            num_heads=heads,
            num_kv_heads=int(getattr(cfg, "num_key_value_heads", 0) or heads),
            vocab_size=int(getattr(cfg, "vocab_size", 0) or 0),
            head_dim=int(getattr(cfg, "head_dim", 0) or h // heads),
            linears=linears,
            block_other_params=block_params - lin_params,
            outside_params=total - len(blist.blocks) * block_params,
            block_prefix=blist.name,
        )


@dataclass(frozen=True)
class PlanSettings:
    """The tuning settings that drive memory. ``cache``: "auto" (device if it fits, else CPU),
    "device" (must stay on the device) or "cpu" (``low_gpu_mem_usage``)."""

    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 8
    dtype: torch.dtype = torch.bfloat16
    group_size: int = 128
    tune_minmax: bool = True
    cache: str = "auto"
    eager_attention: bool = False

    def __post_init__(self):
        if self.cache not in ("auto", "device", "cpu"):
            raise PlacementError(f"cache={self.cache!r} is invalid; use 'auto', 'device' or 'cpu'")

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class DeviceBudget:
    name: str  # "cuda:0", "cpu"
    free_bytes: int | None  # None: no limit known


# --------------------------------------------------------------------------- arithmetic
def _groups(in_features: int, group_size: int) -> tuple[int, int]:
    g = in_features if group_size in (-1, 0) or group_size >= in_features else group_size
    n = math.ceil(in_features / g)
    return n * g, n  # padded in_features, groups


@dataclass(frozen=True)
class LinearCost:
    name: str
    weight: int
    grouped: int  # float32 grouped weight + its range
    tunables: int
    grads: int
    snapshots: int
    autograd: int
    transient: int

    @property
    def resident(self) -> int:
        return self.weight + self.grouped + self.tunables + self.grads + self.snapshots + self.autograd


def linear_cost(shape: LinearShape, s: PlanSettings) -> LinearCost:
    o, i = shape.out_features, shape.in_features
    padded, g = _groups(i, s.group_size)
    v = 4 * o * padded
    mm = 4 * 2 * o * g
    return LinearCost(
        name=shape.name,
        weight=o * i * s.elem + (o * s.elem if shape.bias else 0),
        grouped=v + mm,
        tunables=v + mm,
        grads=v + (mm if s.tune_minmax else 0),
        snapshots=2 * (v + mm),
        autograd=2 * v + o * i * s.elem,
        transient=2 * v,
    )


def transfer_bytes(shape: LinearShape, s: PlanSettings) -> int:
    """Input and output of one batch held by a linear that runs off the block's device."""
    return s.batch_size * s.seqlen * (shape.in_features + shape.out_features) * s.elem


def block_base_bytes(m: ModelShape, s: PlanSettings) -> int:
    """What the block's own device holds besides its linears and the cache."""
    b, t, h, e = s.batch_size, s.seqlen, m.hidden_size, s.elem
    hq, hkv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    params = m.block_other_params * e
    batch = b * t * h * (2 * e + 12)
    acts = b * t * ((6 * h + 2 * (hq + 2 * hkv)) * e + 4 * h * 4 + 4 * m.intermediate_size * e)
    scores = 2 * b * m.num_heads * t * t * e if s.eager_attention else 0
    return params + batch + acts + scores


def cache_bytes(m: ModelShape, s: PlanSettings) -> int:
    return CACHE_COPIES * s.nsamples * s.seqlen * m.hidden_size * s.elem


# --------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class PlacementPlan:
    primary: str  # the device each block runs on (norms, attention, the loss)
    devices: tuple[str, ...]
    cache: str  # "device" or "cpu"
    assignment: tuple[tuple[str, str], ...]  # (full layer name, device), every quantizable linear of every block
    peak: tuple[tuple[str, int], ...]  # estimated peak bytes per device, CPU included
    free: tuple[tuple[str, int | None], ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def spread(self) -> bool:
        return any(d != self.primary for _, d in self.assignment)

    def device_for(self, name: str) -> str:
        for n, d in self.assignment:
            if n == name:
                return d
        return self.primary

    def cache_device(self) -> torch.device:
        return torch.device(self.primary if self.cache == "device" else "cpu")

    def describe(self) -> str:
        """The plan as lines: per-linear devices (grouped over blocks when alike), cache, peaks."""
        by_suffix: dict[str, set[str]] = {}
        for name, dev in self.assignment:
            suffix = re.sub(r"^.*?\.\d+\.", "", name)
            by_suffix.setdefault(suffix, set()).add(dev)
        free = dict(self.free)
        lines = [f"placement: blocks run on {self.primary}; calibration cache on "
                 f"{self.primary if self.cache == 'device' else 'cpu'}"]
        for suffix, devs in by_suffix.items():
            lines.append(f"  {suffix:<24} -> {', '.join(sorted(devs))}")
        for dev, peak in self.peak:
            cap = free.get(dev)
            lines.append(f"  peak {dev:<8} {peak / GiB:8.2f} GiB" + ("" if cap is None else f" of {cap / GiB:.2f} GiB free"))
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _pins_for(names: list[str], rules: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The device each layer name is pinned to by ``rules`` (exact name first, else the last matching regex)."""
    out = {}
    for n in names:
        exact = [d for p, d in rules if p == n]
        if exact:
            out[n] = exact[-1]
            continue
        matched = [d for p, d in rules if re.search(p, n)]
        if matched:
            out[n] = matched[-1]
    return out


def _assign(costs: dict[str, dict[str, int]], pins: dict[str, str], budgets: dict[str, int | None],
            primary: str) -> dict[str, str] | None:
    """Linears → devices: all on the primary when they fit there, else largest first onto the device
    with the most room left (pinned layers stay where they are pinned). None when something doesn't fit.
    ``costs[name][device]``: what the linear holds on that device; ``budgets``: room per device (None: no limit)."""
    left = dict(budgets)

    def take(dev, c):
        if left[dev] is not None:
            left[dev] -= c

    out = dict(pins)
    for n, d in pins.items():
        take(d, costs[n][d])
    rest = [n for n in costs if n not in pins]
    need = sum(costs[n][primary] for n in rest)
    if left[primary] is None or need <= left[primary]:
        out.update({n: primary for n in rest})
        take(primary, need)
    else:
        for n in sorted(rest, key=lambda n: -costs[n][primary]):
            room = {d: (math.inf if v is None else v) - costs[n][d] for d, v in left.items()}
            best = max(room, key=lambda d: (room[d], d == primary))
            if room[best] < 0:
                return None
            out[n] = best
            take(best, costs[n][best])
    return out if all(v is None or v >= 0 for v in left.values()) else None


def _try_plan(m: ModelShape, s: PlanSettings, devices: Sequence[DeviceBudget], cpu_free: int | None,
              rules: Sequence[tuple[str, str]], reserve: int) -> PlacementPlan | str:
    """A plan, or the reason there is none."""
    primary = devices[0].name
    names = [d.name for d in devices]
    unknown = {d for _, d in rules} - set(names)
    if unknown:
        raise PlacementError(f"device_map names device(s) {sorted(unknown)} that are not among the tuning devices "
                             f"{names}; list every device in the device list too")
    lin = {l.name: l for l in m.linears}
    lcost = {n: linear_cost(l, s) for n, l in lin.items()}
    base = block_base_bytes(m, s)
    cache = cache_bytes(m, s)
    model_bytes = m.total_params * s.elem

    def budgets_with(cache_on_device: bool):
        out = {}
        for d in devices:
            if d.free_bytes is None:
                out[d.name] = None
                continue
            avail = d.free_bytes - (reserve if d.name.startswith("cuda") else 0)
            if d.name == primary:
                avail -= base + (cache if cache_on_device else 0)
            out[d.name] = avail
        return out

    locations = {"auto": ("device", "cpu"), "device": ("device",), "cpu": ("cpu",)}[s.cache]
    if primary == "cpu":
        locations = ("cpu",)
    reason = ""
    for loc in locations:
        on_dev = loc == "device" and primary != "cpu"
        budgets = budgets_with(on_dev)
        if budgets[primary] is not None and budgets[primary] < 0:
            reason = (f"{primary} has {devices[0].free_bytes / GiB:.2f} GiB free but the block's activations"
                      + (" and the calibration cache" if on_dev else "") + f" alone need "
                      f"{(base + (cache if on_dev else 0) + (reserve if primary.startswith('cuda') else 0)) / GiB:.2f} GiB")
            continue
        cpu_need = model_bytes + (0 if on_dev else cache)
        if not on_dev and cpu_free is not None and cpu_need > cpu_free:
            reason = (f"the calibration cache ({cache / GiB:.2f} GiB) does not fit on {primary} nor in CPU memory "
                      f"(model {model_bytes / GiB:.2f} GiB + cache > {cpu_free / GiB:.2f} GiB free) and would have to go "
                      f"to disk, which auto_quant does not do")
            continue
        costs = {n: {d: lcost[n].resident + (0 if d == primary else transfer_bytes(lin[n], s)) for d in names}
                 for n in lin}
        assignment: dict[str, str] = {}
        peaks = {d: 0 for d in names}
        memo: dict[tuple, dict[str, str] | None] = {}
        ok = True
        for b in range(m.num_layers):
            full = {f"{m.block_prefix}.{b}.{n}": n for n in lin}
            pins = _pins_for(list(full), rules)
            key = tuple(sorted((full[k], v) for k, v in pins.items()))
            if key not in memo:
                memo[key] = _assign(costs, dict(key), budgets, primary)
            got = memo[key]
            if got is None:
                ok = False
                break
            per_dev = {d: 0 for d in names}
            trans = {d: 0 for d in names}
            for suffix, d in got.items():
                per_dev[d] += lcost[suffix].resident + (0 if d == primary else transfer_bytes(lin[suffix], s))
                trans[d] = max(trans[d], lcost[suffix].transient)
            per_dev[primary] += base + (cache if on_dev else 0)
            for d in names:
                peaks[d] = max(peaks[d], per_dev[d] + trans[d])
            for k, suffix in full.items():
                assignment[k] = got[suffix]
        if not ok:
            need = sum(c.resident for c in lcost.values())
            total_free = sum(v for v in budgets.values() if v is not None)
            reason = (f"one block's linears need {need / GiB:.2f} GiB to tune and the listed devices have "
                      f"{max(0, total_free) / GiB:.2f} GiB left after the block's activations"
                      + (" and the cache" if on_dev else ""))
            continue
        # transients may overflow a device the resident sums fit in
        over = [d for d in devices if d.free_bytes is not None and peaks[d.name] + (reserve if d.name.startswith("cuda") else 0) > d.free_bytes]
        if over:
            d = over[0]
            reason = f"{d.name} would peak at {peaks[d.name] / GiB:.2f} GiB with {d.free_bytes / GiB:.2f} GiB free"
            continue
        notes = []
        if on_dev is False and s.cache == "auto" and primary != "cpu":
            notes.append(f"calibration cache ({cache / GiB:.2f} GiB) moved to the CPU: it does not fit on {primary} "
                         "next to the block (as low_gpu_mem_usage=True)")
        peak_rows = [(d, peaks[d]) for d in names if d != "cpu"]
        cpu_peak = model_bytes + (0 if on_dev else cache) + peaks.get("cpu", 0)
        peak_rows.append(("cpu", cpu_peak))
        free_rows = [(d.name, d.free_bytes) for d in devices if d.name != "cpu"] + [("cpu", cpu_free)]
        return PlacementPlan(primary=primary, devices=tuple(names), cache="device" if on_dev else "cpu",
                             assignment=tuple(assignment.items()), peak=tuple(peak_rows), free=tuple(free_rows),
                             notes=tuple(notes))
    return reason


def _suggestions(m: ModelShape, s: PlanSettings, devices: Sequence[DeviceBudget], cpu_free, rules, reserve) -> list[str]:
    def fits(s2=s, devs=devices):
        return isinstance(_try_plan(m, s2, devs, cpu_free, rules, reserve), PlacementPlan)

    out = []
    if s.cache == "device" and fits(replace(s, cache="cpu")):
        out.append("low_gpu_mem_usage=True (keep the calibration cache on the CPU)")
    for b in range(s.batch_size - 1, 0, -1):
        if fits(replace(s, batch_size=b)):
            out.append(f"batch_size={b}")
            break
    # the largest nsamples that fits at this batch size (the cache grows with nsamples: monotone)
    lo, hi = s.batch_size - 1, s.nsamples - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(replace(s, nsamples=mid)):
            lo = mid
        else:
            hi = mid - 1
    if lo >= s.batch_size:
        out.append(f"nsamples={lo}")
    gpus = [d for d in devices if d.name.startswith("cuda") and d.free_bytes is not None]
    if gpus:
        biggest = max(gpus, key=lambda d: d.free_bytes)
        extra = list(devices)
        for k in range(1, 17):
            extra.append(DeviceBudget(f"cuda:{len(devices) + k - 1}", biggest.free_bytes))
            if fits(devs=extra):
                out.append(f"{k} more GPU(s) with {biggest.free_bytes / GiB:.0f} GiB free ({len(gpus) + k} in all)")
                break
    return out


def plan_placement(model: ModelShape, settings: PlanSettings, devices: Sequence[DeviceBudget],
                   cpu_free_bytes: int | None = None, rules: Sequence[tuple[str, str]] = (),
                   reserve_bytes: int = DEFAULT_RESERVE) -> PlacementPlan:
    """Plan where each block's linears and the calibration cache go; :class:`PlacementError` when nothing fits.

    ``devices[0]`` is the primary device: every block's non-linear parts and the loss run there.
    ``rules``: ``(layer-name pattern, device)`` pins from a ``device_map`` dict.
    """
    if not devices:
        raise PlacementError("no tuning device given; list at least one (e.g. 'cuda:0' or 'cpu')")
    got = _try_plan(model, settings, devices, cpu_free_bytes, rules, reserve_bytes)
    if isinstance(got, PlacementPlan):
        return got
    tips = _suggestions(model, settings, devices, cpu_free_bytes, rules, reserve_bytes)
    msg = f"the tuning does not fit: {got}"
    msg += ("; what would fit: " + "; or ".join(tips)) if tips else "; no smaller setting fits either: use larger GPUs"
    raise PlacementError(msg)


# --------------------------------------------------------------------------- device_map
@dataclass(frozen=True)
class DeviceRequest:
    """A parsed ``device_map``: the tuning devices (first = primary) and layer-name pins."""

    devices: tuple[str, ...]
    rules: tuple[tuple[str, str], ...] = field(default=())


def _one_device(value, cuda_count: int) -> str:
    if isinstance(value, bool):
        raise DeviceError(f"device {value!r} is not a device; use a GPU index, 'cuda:N' or 'cpu'")
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, torch.device):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip().lower()
    else:
        raise DeviceError(f"device {value!r} is not a device; use a GPU index, 'cuda:N' or 'cpu'")
    if text.isdigit():
        text = f"cuda:{text}"
    if text == "cuda":
        text = "cuda:0"
    if text == "cpu":
        return text
    mt = re.fullmatch(r"cuda:(\d+)", text)
    if not mt:
        raise DeviceError(f"unknown device {value!r}; use 'cpu', 'cuda:N' or a GPU index such as 0")
    idx = int(mt.group(1))
    if idx >= cuda_count:
        have = "no CUDA device" if cuda_count == 0 else f"CUDA devices 0..{cuda_count - 1}"
        raise DeviceError(f"device {value!r} does not exist: this machine has {have}; "
                          + ("use 'cpu'" if cuda_count == 0 else f"use indices below {cuda_count}"))
    return text


def parse_device_map(device_map, cuda_count: int | None = None) -> DeviceRequest | None:
    """``"0,1"`` / ``[0, 1]`` / ``["cuda:0", "cpu"]`` / ``{"layer pattern": device}`` → :class:`DeviceRequest`.

    None, "" and "auto" give None (the single tuning device). A dict's devices are listed in the order
    they first appear; layers no pattern matches are placed by the planner.
    """
    if device_map is None or (isinstance(device_map, str) and device_map.strip().lower() in ("", "auto")):
        return None
    if cuda_count is None:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if isinstance(device_map, Mapping):
        if not device_map:
            raise DeviceError("device_map is an empty dict; give {layer-name pattern: device} entries or a device list")
        rules = []
        for pattern, dev in device_map.items():
            if not isinstance(pattern, str) or not pattern:
                raise DeviceError(f"device_map key {pattern!r} must be a layer name or regular expression")
            try:
                re.compile(pattern)
            except re.error as e:
                raise DeviceError(f"device_map key {pattern!r} is not a valid regular expression: {e}") from None
            rules.append((pattern, _one_device(dev, cuda_count)))
        devices = tuple(dict.fromkeys(d for _, d in rules))
        return DeviceRequest(devices=devices, rules=tuple(rules))
    if isinstance(device_map, str):
        items = [x for x in (p.strip() for p in device_map.split(",")) if x]
    elif isinstance(device_map, (list, tuple)):
        items = list(device_map)
    else:
        items = [device_map]
    if not items:
        raise DeviceError(f"device_map {device_map!r} lists no device")
    devices = tuple(_one_device(x, cuda_count) for x in items)
    if len(set(devices)) != len(devices):
        raise DeviceError(f"device_map {device_map!r} lists a device twice; list each once")
    return DeviceRequest(devices=devices)


def device_budgets(devices: Sequence[str]) -> list[DeviceBudget]:
    """Free memory of each device now (``torch.cuda.mem_get_info``); the CPU is unbounded here."""
    out = []
    for d in devices:
        if d.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(d))
            out.append(DeviceBudget(d, int(free)))
        else:
            out.append(DeviceBudget(d, None))
    return out


def available_cpu_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


__all__ = [
    "CACHE_COPIES", "DEFAULT_RESERVE", "DeviceBudget", "DeviceRequest", "LinearCost", "LinearShape", "ModelShape",
    "PlacementPlan", "PlanSettings", "available_cpu_bytes", "block_base_bytes", "cache_bytes", "device_budgets",
    "linear_cost", "parse_device_map", "plan_placement", "transfer_bytes",
]


# --------------------------------------------------------------------------- runtime (used by the pipeline)
def spread_block(layers: Mapping[str, nn.Module], plan: PlacementPlan | None, primary: torch.device) -> list[nn.Module]:
    """Move the linears ``plan`` puts off the primary device there, with accelerate hooks that move
    their inputs in and their outputs back; returns the hooked modules (for :func:`unhook`)."""
    if plan is None or not plan.spread:
        return []
    out = []
    for name, layer in layers.items():
        dev = torch.device(plan.device_for(name))
        if dev != primary:
            out.append(hook_on(layer.to(dev), dev))
    return out


def hook_on(module: nn.Module, device: torch.device) -> nn.Module:
    """Run ``module`` on ``device``; its outputs go back to where its inputs came from."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    return add_hook_to_module(module, AlignDevicesHook(execution_device=device, io_same_device=True))


def unhook(modules: Sequence[nn.Module]) -> None:
    from accelerate.hooks import remove_hook_from_module

    for m in modules:
        remove_hook_from_module(m)
        # accelerate puts the old forward back as an instance attribute, a bound method of the module itself: a
        # reference cycle that kept a freed wrapper's tunables on its GPU until Python's cycle collector ran
        if getattr(m.__dict__.get("forward"), "__self__", None) is m:
            del m.forward
