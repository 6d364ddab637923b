"""The backend registry, as data: which kernel serves which QuantLinear.

Each :class:`Backend` entry declares what it serves (devices, bits, group sizes, sym/asym,
checkpoint layouts, activation dtypes, shape multiples), its priority and the packages it
needs. Selection is a pure function over the table; :func:`attach_backends` runs it per
layer, lets the chosen backend repack the layer once (``prepare``), logs the choice once per
distinct configuration, and says in one line when a better backend would apply if a package
were installed.

A backend's implementation lives in its own module, imported only when the backend is used:
``impl = "module:function"`` names ``prepare(module, ctx) -> run`` where ``run(x)`` computes
the layer's output. An empty ``impl`` is the torch reference path of
:class:`~auto_quant.inference.qlinear.QuantLinear`.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn

from auto_quant.errors import BackendError

if TYPE_CHECKING:
    from auto_quant.kernels.tuner_cache import TunerCache

log = logging.getLogger(__name__)

FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})
HALFS = frozenset({torch.float16, torch.bfloat16})
ALL_LAYOUTS = frozenset({"gptq", "gptq_v2", "awq"})
GPTQ_LAYOUTS = frozenset({"gptq", "gptq_v2"})


@dataclass(frozen=True)
class LayerKey:
    """What selection looks at in a quantized layer."""

    in_features: int
    out_features: int
    bits: int
    group_size: int
    sym: bool
    layout: str

    @classmethod
    def of(cls, layer) -> "LayerKey":
        return cls(layer.in_features, layer.out_features, layer.bits, layer.group_size, bool(layer.sym), layer.layout)

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return (f"{self.bits}-bit {g} {'sym' if self.sym else 'asym'} {self.layout}-layout "
                f"{self.in_features}->{self.out_features}")


@dataclass(frozen=True)
class Backend:
    """One inference backend and everything it serves."""

    name: str
    devices: frozenset[str]  # torch device types: "cpu", "cuda", "xpu", "hpu", "mps"
    bits: frozenset[int]
    group_sizes: frozenset[int] | None = None  # explicit set (-1: per channel); None: any
    group_multiple: int = 1  # the group size (in_features when -1) must be a multiple of this
    sym: bool = True
    asym: bool = True
    layouts: frozenset[str] = ALL_LAYOUTS
    act_dtypes: frozenset[torch.dtype] = FLOATS
    in_multiple: int = 1  # in_features must be a multiple of this
    out_multiple: int = 1  # out_features must be a multiple of this
    priority: int = 0  # higher wins
    requires: tuple[str, ...] = ()  # importable modules; ANY one of them suffices
    torch_ops: tuple[str, ...] = ()  # torch.ops.aten operators that must exist
    requires_compiler: bool = False  # builds a C kernel at first use: needs a C compiler on PATH
    min_capability: tuple[int, int] | None = None  # CUDA compute capability
    pip: str = ""  # how to get ``requires`` ("pip install ...")
    suggest: bool = True  # may the "a better backend would apply" line recommend installing it
    impl: str = ""  # "module:prepare"; "" = the QuantLinear reference forward
    summary: str = ""

    def available(self) -> bool:
        """The packages and operators this backend needs import here (tries the import)."""
        if self.requires and not any(_imports(m) for m in self.requires):
            return False
        if self.requires_compiler and not c_compiler_found():
            return False
        return all(hasattr(torch.ops.aten, op) for op in self.torch_ops)

    def mismatches(self, layer: LayerKey, device: str, act_dtype: torch.dtype | None = None) -> list[str]:
        """Why this backend cannot serve ``layer`` on ``device`` (empty: it can)."""
        why = []
        if device not in self.devices:
            why.append(f"runs on {'/'.join(sorted(self.devices))}, not {device}")
        if layer.bits not in self.bits:
            why.append(f"serves {'/'.join(map(str, sorted(self.bits)))} bits, not {layer.bits}")
        gs = layer.in_features if layer.group_size == -1 else layer.group_size
        if self.group_sizes is not None and layer.group_size not in self.group_sizes:
            why.append(f"serves group sizes {sorted(self.group_sizes)}, not {layer.group_size}")
        elif gs % self.group_multiple:
            why.append(f"needs group sizes that are multiples of {self.group_multiple}, not {gs}")
        if layer.sym and not self.sym:
            why.append("serves asymmetric weights only")
        if not layer.sym and not self.asym:
            why.append("serves symmetric weights only")
        if layer.layout not in self.layouts:
            why.append(f"reads {'/'.join(sorted(self.layouts))} layouts, not {layer.layout}")
        if act_dtype is not None and act_dtype not in self.act_dtypes:
            names = "/".join(sorted(str(d).replace("torch.", "") for d in self.act_dtypes))
            why.append(f"takes {names} activations, not {str(act_dtype).replace('torch.', '')}")
        if layer.in_features % self.in_multiple:
            why.append(f"needs in_features divisible by {self.in_multiple} (got {layer.in_features})")
        if layer.out_features % self.out_multiple:
            why.append(f"needs out_features divisible by {self.out_multiple} (got {layer.out_features})")
        return why

    def serves(self, layer, device: str, act_dtype: torch.dtype | None = None) -> bool:
        key = layer if isinstance(layer, LayerKey) else LayerKey.of(layer)
        return not self.mismatches(key, device, act_dtype)

    def install_hint(self) -> str:
        if self.requires_compiler and not self.requires:
            return self.pip or "install a C compiler (gcc)"
        return self.pip or "install " + " or ".join(self.requires)


def find_compiler(env_var: str, names: tuple[str, ...]) -> str | None:
    """The compiler on PATH that ``$env_var`` names if set, else the first of ``names`` found (None: none)."""
    names = (os.environ[env_var],) if os.environ.get(env_var) else names
    return next((path for path in map(shutil.which, names) if path), None)


def find_c_compiler() -> str | None:
    """The C compiler on PATH: ``$CC`` if set, else gcc or cc (None: none)."""
    return find_compiler("CC", ("gcc", "cc"))


def c_compiler_found() -> bool:
    return find_c_compiler() is not None


def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # a package that is present but broken (IPEX next to a newer torch) is not installed
        return False
    return True


BACKENDS: tuple[Backend, ...] = (
    Backend(
        name="torch",
        devices=frozenset({"cpu", "cuda", "xpu", "hpu", "mps"}),
        bits=frozenset({2, 3, 4, 5, 6, 8}),
        priority=0,
        summary="reference: dequantize the whole weight, then F.linear",
    ),
    Backend(
        name="torch_cpu_int4",
        devices=frozenset({"cpu"}),
        bits=frozenset({2, 3, 4}),
        group_multiple=32,
        in_multiple=32,
        out_multiple=16,
        # it computes in bf16 internally (outputs about 3e-3 relative from the float32 reference)
        priority=20,
        torch_ops=("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"),
        impl="auto_quant.inference.cpu_int4:prepare",
        summary="PyTorch's native int4 CPU matmul (bf16 activations inside)",
    ),
    Backend(
        name="cpu_gemv",
        devices=frozenset({"cpu"}),
        bits=frozenset({2, 3, 4, 8}),
        group_multiple=32,
        in_multiple=32,
        # activations are quantized to int8 per block of 32, like llama.cpp's (outputs about 5e-3 relative from the
        # float32 reference); backend="torch" keeps the exact reference, which dequantizes every call: 20-300x slower
        priority=22,
        requires_compiler=True,
        pip="install a C compiler (e.g. apt-get install gcc)",
        impl="auto_quant.inference.cpu_gemv:prepare",
        summary="auto_quant's AVX-512 VNNI / AVX2 C GEMV on int8-quantized activations (compiled at first use)",
    ),
    Backend(
        name="triton",
        devices=frozenset({"cuda"}),
        bits=frozenset({2, 3, 4, 8}),
        group_sizes=frozenset({32, 64, 128, -1}),
        act_dtypes=HALFS,
        priority=30,
        requires=("triton",),
        min_capability=(8, 0),
        pip="pip install triton",
        impl="auto_quant.inference.triton_backend:prepare",
        summary="auto_quant's fused dequantize-in-registers Triton GEMV/GEMM; dequantize + cuBLAS for large M",
    ),
    Backend(
        name="marlin",
        devices=frozenset({"cuda"}),
        bits=frozenset({4, 8}),
        group_sizes=frozenset({32, 64, 128, -1}),
        asym=False,
        layouts=GPTQ_LAYOUTS,
        act_dtypes=HALFS,
        in_multiple=128,
        out_multiple=64,
        # below triton: GPTQModel 7.6's Marlin measured 1.1-1.75x slower than the triton backend on every Llama-3-8B
        # shape at 1, 16 and 256 rows (docs/bench/kernels.md, session 27); it serves where Triton is missing
        priority=28,
        requires=("gptqmodel", "vllm"),
        min_capability=(8, 0),
        pip="pip install gptqmodel (or vllm)",
        impl="auto_quant.inference.marlin:prepare",
        summary="Marlin kernels through GPTQModel or vLLM",
    ),
    Backend(
        name="ipex",
        devices=frozenset({"cpu", "xpu"}),
        bits=frozenset({2, 3, 4, 5, 6, 8}),
        priority=10,  # below torch_cpu_int4: IPEX is end-of-life and never needed
        requires=("intel_extension_for_pytorch",),
        suggest=False,
        pip="pip install intel-extension-for-pytorch",
        impl="auto_quant.inference.dense:prepare",
        summary="with IPEX importable: dequantize once at load time, dense matmul on CPU/XPU",
    ),
    Backend(
        name="hpu",
        devices=frozenset({"hpu"}),
        bits=frozenset({2, 3, 4, 5, 6, 8}),
        priority=25,
        requires=("habana_frameworks.torch",),
        suggest=False,
        pip="install the Intel Gaudi software stack (habana_frameworks)",
        impl="auto_quant.inference.dense:prepare",
        summary="Gaudi: dequantize once at load time, dense matmul on the HPU",
    ),
)

# names other tools use for the same backends (auto-round, GPTQModel)
ALIASES = {
    "auto_round:torch": "torch", "torch_fp": "torch", "auto_round:triton": "triton", "tritonv2": "triton",
    "auto_round:tritonv2": "triton", "gptqmodel:marlin": "marlin", "auto_round:gptqmodel:marlin": "marlin",
    "gptq:marlin": "marlin", "cpu": "torch_cpu_int4", "torch_int4": "torch_cpu_int4", "gemv_cpu": "cpu_gemv", "auto_round:ipex": "ipex",
    "auto_round:hpu": "hpu",
}


def canonical_name(name: str | None, table: Iterable[Backend] = BACKENDS) -> str:
    n = (name or "auto").strip().lower()
    if n in ("auto", ""):
        return "auto"
    n = ALIASES.get(n, n)
    known = [b.name for b in table]
    if n not in known:
        raise BackendError(f"unknown backend {name!r}; use 'auto' or one of: {', '.join(known)}")
    return n


def _capability_ok(b: Backend, device: torch.device | str) -> bool:
    dev = torch.device(device)
    if b.min_capability is None or dev.type != "cuda" or not torch.cuda.is_available():
        return True
    return torch.cuda.get_device_capability(dev) >= b.min_capability


@dataclass
class Availability:
    """Which backends can run here, asked once per attach (imports are tried at most once)."""

    table: tuple[Backend, ...] = BACKENDS
    _seen: dict[str, bool] = field(default_factory=dict)

    def __call__(self, b: Backend) -> bool:
        if b.name not in self._seen:
            self._seen[b.name] = b.available()
        return self._seen[b.name]

    def failed(self, b: Backend, why: str) -> None:
        """``b`` could not prepare a layer here (a kernel that does not build): skip it for the rest of the attach."""
        self._seen[b.name] = False
        log.warning("auto_quant: backend %s is unavailable here, using the next one: %s", b.name,
                    why.splitlines()[0] if why else "")


def candidates(layer, device: str, table: tuple[Backend, ...] = BACKENDS, act_dtype=None) -> list[Backend]:
    """Every backend that serves ``layer`` (installed or not), best first."""
    key = layer if isinstance(layer, LayerKey) else LayerKey.of(layer)
    return sorted((b for b in table if not b.mismatches(key, device, act_dtype)), key=lambda b: -b.priority)


def select_backend(layer, device: str | torch.device, forced: str = "auto", table: tuple[Backend, ...] = BACKENDS,
                   act_dtype: torch.dtype | None = None, available: Callable[[Backend], bool] | None = None) -> Backend:
    """The backend for one layer: the forced one (checked) or the best installed one that serves it."""
    key = layer if isinstance(layer, LayerKey) else LayerKey.of(layer)
    dev = torch.device(device)
    available = available or Availability(table)
    forced = canonical_name(forced, table)
    if forced != "auto":
        b = next(x for x in table if x.name == forced)
        why = b.mismatches(key, dev.type, act_dtype)
        if why:
            others = [x.name for x in candidates(key, dev.type, table, act_dtype) if available(x)]
            raise BackendError(
                f"backend {forced!r} cannot serve a {key.describe()} layer on {dev.type}: it {'; it '.join(why)}. "
                f"Backends that can: {', '.join(others) or 'none'}; pass backend='auto' or one of them"
            )
        if not available(b):
            raise BackendError(f"backend {forced!r} is not available here; {b.install_hint()} (or pass backend='auto')")
        if not _capability_ok(b, dev):
            raise BackendError(f"backend {forced!r} needs CUDA compute capability >= {b.min_capability}; "
                               "pass backend='auto'")
        return b
    serving = candidates(key, dev.type, table, act_dtype)
    # best first, and lazily: a lower backend's package (GPTQModel's import sets environment variables) is imported
    # only when every better one is missing
    best = next((b for b in serving if available(b) and _capability_ok(b, dev)), None)
    if best is not None:
        return best
    if serving:
        hints = ", ".join(f"{b.name} ({b.install_hint()})" for b in serving)
        raise BackendError(f"no installed backend serves a {key.describe()} layer on {dev.type}; "
                           f"these would: {hints}")
    elsewhere = sorted({d for b in table for d in b.devices
                        if not b.mismatches(key, d, act_dtype) and d != dev.type})
    dt = f" with {str(act_dtype).replace('torch.', '')} activations" if act_dtype is not None else ""
    if elsewhere:
        fix = f"it could run on {', '.join(elsewhere)}: move the model there"
    else:
        fix = (f"re-quantize with bits in {sorted({n for x in table for n in x.bits if x.devices & {dev.type}})} "
               f"or another group size / activation dtype")
    raise BackendError(f"no backend serves a {key.describe()} layer on {dev.type}{dt}; {fix}")


def better_if_installed(layer, device: str, chosen: Backend, table: tuple[Backend, ...] = BACKENDS, act_dtype=None,
                        available: Callable[[Backend], bool] | None = None) -> Backend | None:
    """The best backend that would serve ``layer`` if its package (or the compiler it builds with) were installed,
    when it beats ``chosen``."""
    available = available or Availability(table)
    for b in candidates(layer, device, table, act_dtype):
        if b.priority <= chosen.priority:
            return None
        if (b.requires or b.requires_compiler) and not available(b) and b.suggest:
            return b
    return None


def load_impl(b: Backend) -> Callable[..., Any] | None:
    if not b.impl:
        return None
    mod, _, attr = b.impl.partition(":")
    return getattr(importlib.import_module(mod), attr)


@dataclass
class AttachContext:
    """Per-model state shared by the layers of one attach (Triton tuning cache, scratch buffers). ``tuning_cache``:
    where the Triton backend's tuner keeps its picks across processes
    (:class:`~auto_quant.kernels.tuner_cache.TunerCache`; None: in memory only)."""

    forced: str = "auto"
    act_dtype: torch.dtype | None = None
    table: tuple[Backend, ...] = BACKENDS
    available: Availability = field(default_factory=Availability)
    resources: dict[str, Any] = field(default_factory=dict)
    moved_warned: bool = False
    tuning_cache: TunerCache | None = None

    def resource(self, name: str, factory: Callable[[], Any]) -> Any:
        if name not in self.resources:
            self.resources[name] = factory()
        return self.resources[name]


class Attached:
    """What a QuantLinear calls instead of its reference forward: one backend's prepared layer."""

    def __init__(self, backend: Backend, run: Callable[[torch.Tensor], torch.Tensor] | None, device: torch.device,
                 ctx: AttachContext):
        self.backend = backend
        self.run = run
        self.device = device
        self.ctx = ctx

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.device != self.device:  # the model moved after loading: choose and prepare again
            if not self.ctx.moved_warned:
                self.ctx.moved_warned = True
                log.warning("auto_quant: quantized layers moved from %s to %s after loading; re-selecting backends",
                            self.device, x.device)
            attach_layer(module, x.device, self.ctx)
            return module(x)
        if self.run is None:
            return module.forward_reference(x)
        return self.run(x)

    def __repr__(self) -> str:
        return f"Attached({self.backend.name} on {self.device})"


def attach_layer(module: nn.Module, device: torch.device | str, ctx: AttachContext) -> Backend:
    """Select, prepare and attach a backend to one QuantLinear."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    while True:
        b = select_backend(module, device, ctx.forced, ctx.table, ctx.act_dtype, ctx.available)
        prepare = load_impl(b)
        try:
            run = prepare(module, ctx) if prepare is not None else None
            break
        except BackendError as e:  # automatic selection moves on; a forced backend's failure is the user's error
            if ctx.forced != "auto":
                raise
            ctx.available.failed(b, str(e))
    module.kernel = Attached(b, run, device, ctx)
    module.backend = b.name
    return b


def model_act_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype the model computes in: its first floating-point parameter's."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def attach_backends(model: nn.Module, backend: str = "auto", act_dtype: torch.dtype | None = None,
                    table: tuple[Backend, ...] = BACKENDS, tuning_cache: str | os.PathLike | None = "auto",
                    compile_ahead: bool = True) -> dict[str, str]:
    """Pick and prepare a backend for every QuantLinear of ``model``; returns ``{layer name: backend}``.

    Logs each distinct choice once, and once which package would enable a better backend.
    ``backend`` forces one (a clear :class:`BackendError` if it cannot serve a layer). ``tuning_cache``: where the
    Triton backend keeps the kernel picks it timed, for the next process on the same GPU (``"auto"``:
    ``~/.cache/auto_quant/tuner``; None: keep them in memory only; else a folder). ``compile_ahead``: compile the
    kernels that cache picked for these layers now, side by side, rather than one by one at the first calls.
    """
    from auto_quant.inference.qlinear import QuantLinear
    from auto_quant.kernels.tuner_cache import tuner_cache

    ctx = AttachContext(forced=canonical_name(backend, table), act_dtype=act_dtype or model_act_dtype(model),
                        table=table, available=Availability(table), tuning_cache=tuner_cache(tuning_cache))
    chosen: dict[str, str] = {}
    triton_layers = []
    groups: Counter = Counter()
    better: Counter = Counter()
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        device = mod.qweight.device
        try:
            b = attach_layer(mod, device, ctx)
        except BackendError as e:
            raise BackendError(f"layer {name}: {e}") from None
        chosen[name] = b.name
        if b.name == "triton":
            triton_layers.append(mod.kernel.run)
        groups[(b.name, mod.bits, mod.group_size, mod.sym, device.type)] += 1
        if ctx.forced == "auto":
            up = better_if_installed(mod, device.type, b, table, ctx.act_dtype, ctx.available)
            if up is not None:
                better[(up.name, up.install_hint(), b.name)] += 1
    if compile_ahead and triton_layers:
        from auto_quant.inference.triton_backend import compile_cached_picks

        compile_cached_picks(triton_layers)
    for (bname, bits, gs, sym, dev), n in sorted(groups.items()):
        log.info("auto_quant: backend %s for %d %d-bit g%d %s layers on %s", bname, n, bits, gs,
                 "sym" if sym else "asym", dev)
    if better:
        parts = [f"{n} layers would use {up} instead of {cur} ({hint})" for (up, hint, cur), n in sorted(better.items())]
        log.info("auto_quant: faster backends are available: %s", "; ".join(parts))
    return chosen


def detach_backends(model: nn.Module) -> None:
    """Return every QuantLinear to the torch reference path."""
    from auto_quant.inference.qlinear import QuantLinear

    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.kernel = None
            mod.backend = "torch"
