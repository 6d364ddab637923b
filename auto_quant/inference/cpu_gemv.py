"""The ``cpu_gemv`` backend: auto_quant's hand-vectorised C GEMV/GEMM for 2/3/4/8-bit layers on CPU.

``kernels/cpu_gemv.c`` (package data of ``auto_quant.kernels``) is compiled at first use with
``gcc -O3 -march=native -shared -fPIC`` (plus ``-fopenmp`` where it links) into
``$XDG_CACHE_HOME/auto_quant/kernels/`` (``~/.cache`` without it) and called through ctypes.
The library's name is keyed by a hash of the source, the flags, the compiler's version and the
host CPU's feature flags, so a changed source or another machine sharing the home directory
builds its own; the build goes to a temporary file first and is renamed into place, so two
processes may race.

Numerics: activations are quantized per row and block of 32 to int8 (absmax / 127, like
llama.cpp's Q8_0), the integer dot of each block with the codes is exact, and the zero
point is subtracted in integers; scales are kept in fp16. The output differs from the float32
reference by the activation rounding, about 5e-3 relative on random data (bf16: 3e-3), as with
llama.cpp's Q8 activations. It is chosen automatically for float32 models too (the exact reference
dequantizes the whole weight on every call: 20-300x slower); ``AutoRoundConfig(backend="torch")``
keeps the exact reference.

Packing contract (:func:`pack_weight`, once per layer; the checkpoint buffers stay untouched).
Output rows are grouped in tiles of 16 (``out`` padded with zero rows of scale 0), the 16 int32
lanes of an AVX-512 register. The layout's bit width ``bits`` (:attr:`PackedWeight.bits`) is 4, for
any code of at most 4 bits (2/3/4-bit layers), or 8, one byte per code (8-bit layers). One uint8
tensor ``data`` holds, in this order, per tile and block of 32 inputs:

* ``codes``, ``bits = 4``: uint8 ``[tiles, in / 32, 4, 16, 4]``: byte ``(t, b, u, r, i)`` holds the
  code of row ``16 t + r`` at input ``32 b + 4 u + i`` in its low nibble and the one at input
  ``32 b + 16 + 4 u + i`` in its high nibble (one 64-byte word gives 4 + 4 inputs of 16 rows).
* ``codes``, ``bits = 8``: uint8 ``[tiles, in / 32, 8, 16, 4]``: byte ``(t, b, u, r, i)`` is the code
  of row ``16 t + r`` at input ``32 b + 4 u + i`` (one 64-byte word gives 4 inputs of 16 rows,
  used by ``vpdpbusd`` as they are).
* ``scales`` fp16 ``[tiles, in / 32, 16]``: each block's group scale (repeated over a group's
  blocks, so any group size that is a multiple of 32 costs the same as 32).
* ``zeros`` uint8 ``[tiles, in / 32, 16]`` per-block integer zero points, only with ``zero = -1``.
  Otherwise one constant ``zero`` serves every block: symmetric weights, and asymmetric ones whose
  ``code - zero + 2 ** (bits - 1)`` fits in the layout's codes (every 2/3-bit layer), which are folded
  into the codes with ``zero = 2 ** (bits - 1)`` (8, or 128 for ``bits = 8``).

``w[n, k] = (code[n, k] - zero[n, k // 32]) * scale[n, k // 32]``; ``in_features % 32 == 0`` and
the group size (``in_features`` for per-channel) a multiple of 32.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from auto_quant.errors import BackendError
from auto_quant.inference.backends import find_c_compiler, find_compiler
from auto_quant.paths import user_cache_dir

log = logging.getLogger(__name__)

BLOCK = 32  # inputs per activation block and per scale
TILE_N = 16  # weight rows interleaved in one tile
NATIVE = "-march=native"
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c11")


class LayerArgs(ctypes.Structure):
    """``aq_layer`` of cpu_gemv.c: a prepared layer's constant arguments."""

    _fields_ = [("N", ctypes.c_int64), ("K", ctypes.c_int64), ("data", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("bits", ctypes.c_int32), ("zero", ctypes.c_int32)]


GEMM_LAYER_ARGTYPES = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32]
GEMM_ARGTYPES = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                 ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32]


# ----------------------------------------------------------------------------------------- build


def source_path() -> Path:
    return Path(str(resources.files("auto_quant.kernels").joinpath("cpu_gemv.c")))


def cache_dir() -> Path:
    return user_cache_dir("kernels")


@functools.cache
def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _host_cpu_flags() -> str:
    """The CPU feature flags (-march=native builds are only valid on the same kind of CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.machine() + platform.processor()


def cached_build_path(stem: str, *parts: bytes) -> Path:
    """``<cache dir>/<stem>-<hash of parts>.so``: where a build from these inputs lives."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
        h.update(b"\0")
    return cache_dir() / f"{stem}-{h.hexdigest()[:16]}.so"


def library_path(cc: str, flags: tuple[str, ...]) -> Path:
    """Where the library built from this source with these flags and compiler lives."""
    return cached_build_path("cpu_gemv", source_path().read_bytes(), " ".join(flags).encode(),
                             _compiler_version(cc).encode(), _host_cpu_flags().encode())


def _compile(argv: list[str], out: Path) -> str | None:
    """Run the compiler command ``argv`` with ``-o`` a temporary file, then move that to ``out``; None on
    success, else what went wrong."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*argv, "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            os.replace(tmp, out)  # atomic: a racing process sees either no file or a whole one
            return None
        return proc.stderr.strip()[-2000:] or f"exit status {proc.returncode}, no output"
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_library(cc: str | None = None, march: str = NATIVE) -> Path:
    """Compile the kernel (with OpenMP if it links, else without) unless already cached; returns its path.

    ``march`` picks the instruction set (tests build ``-march=x86-64`` for the scalar path)."""
    cc = cc or find_c_compiler()
    if cc is None:
        raise BackendError("the cpu_gemv backend compiles a C kernel at first use but no C compiler was found "
                           "(looked for $CC, gcc, cc); install gcc (e.g. apt-get install gcc) or pass backend='auto'")
    variants = (BASE_FLAGS + (march, "-fopenmp"), BASE_FLAGS + (march,))
    for flags in variants:
        if library_path(cc, flags).exists():
            return library_path(cc, flags)
    errors = []
    for flags in variants:
        failure = _compile([cc, *flags, str(source_path()), "-lm"], library_path(cc, flags))
        if failure is None:
            return library_path(cc, flags)
        errors.append(f"$ {cc} {' '.join(flags)}: {failure}")
    raise BackendError("the cpu_gemv backend could not compile its C kernel " + str(source_path()) + ":\n"
                       + "\n".join(errors) + "\ninstall a working gcc (e.g. apt-get install gcc) or pass backend='auto'")


@functools.cache
def load_library(march: str = NATIVE) -> ctypes.CDLL:
    """The compiled kernel library (built on the first call of the process; cached)."""
    return open_library(build_library(march=march))


def open_library(path: Path) -> ctypes.CDLL:
    """A built kernel library with its functions' argument and result types declared."""
    lib = ctypes.CDLL(str(path))
    lib.aq_gemm.argtypes = GEMM_ARGTYPES
    lib.aq_gemm.restype = ctypes.c_int
    lib.aq_gemm_layer.argtypes = GEMM_LAYER_ARGTYPES
    lib.aq_gemm_layer.restype = ctypes.c_int
    lib.aq_path.restype = ctypes.c_int
    return lib


def vector_path(lib: ctypes.CDLL | None = None) -> str:
    """Which path a compiled kernel uses: ``avx512_vnni``, ``avx2`` or ``scalar``."""
    return {2: "avx512_vnni", 1: "avx2", 0: "scalar"}[(lib or load_library()).aq_path()]


# --------------------------------------------------------------------------------------- packing


def layout_bits(bits: int) -> int:
    """The packed layout for ``bits``-bit codes: 4 (nibbles) up to 4 bits, 8 (bytes) up to 8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cpu_gemv serves codes of at most 8 bits (got {bits}-bit codes)")
    return 4 if bits <= 4 else 8


def tile_bytes(bits: int) -> int:
    """Packed code bytes of one tile and block of 32 inputs in the ``bits`` layout (4 or 8)."""
    return BLOCK * TILE_N * bits // 8


@dataclass(frozen=True)
class PackedWeight:
    """A layer in the kernel's layout (see the module docstring): one uint8 buffer, so that a
    compiled graph guards one tensor per layer."""

    data: torch.Tensor  # uint8: codes, scales (fp16 bytes), then per-block zeros when zero < 0
    bits: int  # the layout's code width: 4 (nibbles, any code of at most 4 bits) or 8 (bytes)
    zero: int  # the constant zero point, or -1: per-block zeros in ``data``
    out_features: int
    in_features: int

    @property
    def tiles(self) -> int:
        return -(-self.out_features // TILE_N)

    @property
    def tile_blocks(self) -> int:
        """How many (tile, block of 32 inputs) pairs the layer has."""
        return self.tiles * (self.in_features // BLOCK)

    @property
    def codes(self) -> torch.Tensor:
        """uint8 ``[tiles, in / 32, bits, 16, 4]`` (a view of ``data``; 4 or 8 words per block)."""
        words = tile_bytes(self.bits) // (TILE_N * 4)  # 64-byte words per block: 4 of nibbles, 8 of bytes
        return self.data[: self.tile_blocks * tile_bytes(self.bits)].view(self.tiles, -1, words, TILE_N, 4)

    @property
    def scales(self) -> torch.Tensor:
        """float16 ``[tiles, in / 32, 16]`` (a view of ``data``)."""
        start = self.tile_blocks * tile_bytes(self.bits)
        return self.data[start: start + self.tile_blocks * TILE_N * 2].view(torch.float16).view(self.tiles, -1, TILE_N)

    @property
    def zeros(self) -> torch.Tensor | None:
        """uint8 ``[tiles, in / 32, 16]`` per-block zero points (a view of ``data``), or None."""
        start = self.tile_blocks * (tile_bytes(self.bits) + TILE_N * 2)
        return None if self.zero >= 0 else self.data[start:].view(self.tiles, -1, TILE_N)


def check_shape(in_features: int, group_size: int) -> None:
    gs = in_features if group_size == -1 else group_size
    if in_features % BLOCK or gs % BLOCK:
        raise ValueError(f"cpu_gemv needs in_features and the group size to be multiples of {BLOCK} "
                         f"(got in_features={in_features}, group size {group_size})")


def block_values(per_group: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """``[out, n_groups]`` -> ``[out, in / 32]``: each 32-input block's group value."""
    gs = in_features if group_size == -1 else group_size
    which = torch.arange(in_features // BLOCK) * BLOCK // gs
    return per_group[:, which]


def pad_rows(t: torch.Tensor) -> torch.Tensor:
    """Pad dim 0 with zero rows to a multiple of the tile height (padded rows have scale 0)."""
    extra = -t.shape[0] % TILE_N
    return torch.cat([t, t.new_zeros((extra, *t.shape[1:]))]) if extra else t


def tile_blocks(per_block: torch.Tensor) -> torch.Tensor:
    """``[out, in / 32]`` per-row block values -> ``[tiles, in / 32, 16]`` (16 rows side by side)."""
    t = pad_rows(per_block)
    return t.reshape(-1, TILE_N, t.shape[1]).transpose(1, 2).contiguous()


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes ``[out, in]`` in [0, 15] -> uint8 ``[tiles, in / 32, 4, 16, 4]``.

    Byte ``(t, b, u, r, i)`` = code of row ``16 t + r`` at input ``32 b + 4 u + i`` (low nibble)
    | the one at input ``32 b + 16 + 4 u + i`` (high nibble) << 4.
    """
    c = pad_rows(codes.to(torch.uint8))
    tiles, nb = c.shape[0] // TILE_N, c.shape[1] // BLOCK
    c = c.reshape(tiles, TILE_N, nb, 2, 4, 4)  # (t, r, b, low/high half, u, i)
    packed = c[:, :, :, 0] | (c[:, :, :, 1] << 4)  # (t, r, b, u, i)
    return packed.permute(0, 2, 3, 1, 4).contiguous()


def pack_code_bytes(codes: torch.Tensor) -> torch.Tensor:
    """codes ``[out, in]`` in [0, 255] -> uint8 ``[tiles, in / 32, 8, 16, 4]``.

    Byte ``(t, b, u, r, i)`` = code of row ``16 t + r`` at input ``32 b + 4 u + i``.
    """
    c = pad_rows(codes.to(torch.uint8))
    tiles, nb = c.shape[0] // TILE_N, c.shape[1] // BLOCK
    c = c.reshape(tiles, TILE_N, nb, 8, 4)  # (t, r, b, u, i)
    return c.permute(0, 2, 3, 1, 4).contiguous()


def pack_weight(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int) -> PackedWeight:
    """Repack ``w = (codes - zero) * scale`` (``codes [out, in]``, ``zero``/``scale [out, n_groups]``)."""
    out_f, in_f = codes.shape
    check_shape(in_f, group_size)
    layout = layout_bits(bits)
    top, middle = 2 ** layout - 1, 2 ** (layout - 1)
    if int(codes.min()) < 0 or int(codes.max()) > top:
        raise ValueError(f"cpu_gemv packs {bits}-bit codes in [0, {top}] "
                         f"(got [{int(codes.min())}, {int(codes.max())}])")
    codes = codes.to(torch.int32)
    z = block_values(zero.to(torch.int32), in_f, group_size)  # [out, in / 32]
    scales = block_values(scale.to(torch.float32), in_f, group_size).to(torch.float16)
    if not bool(torch.isfinite(scales).all()):
        raise BackendError("cpu_gemv keeps scales in fp16 and this layer's scales overflow it; "
                           "pass backend='torch_cpu_int4' (bf16 scales) or 'torch'")
    zeros, const = None, int(z.flatten()[0]) if z.numel() else 0
    if bool((z != const).any()):
        shifted = codes - z.repeat_interleave(BLOCK, dim=1) + middle
        if bool((shifted >= 0).all()) and bool((shifted <= top).all()):
            codes, const = shifted, middle  # fold the zeros into the codes: one constant zero
        else:
            zeros, const = tile_blocks(z.to(torch.uint8)), -1
    packed_codes = pack_codes(codes) if layout == 4 else pack_code_bytes(codes)
    parts = [packed_codes, tile_blocks(scales).view(torch.uint8)] + ([zeros] if zeros is not None else [])
    return PackedWeight(torch.cat([p.flatten() for p in parts]), layout, const, out_f, in_f)


# ------------------------------------------------------------------------------------------- run


def gemm(x2: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None, threads: int,
         lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``x2 [M, in]`` float32 contiguous -> float32 ``[M, out]`` through the C kernel (``lib``: another build)."""
    return _gemm(x2, w.data, w.bits, w.zero, bias, w.out_features, threads, lib)


def _gemm(x2: torch.Tensor, data: torch.Tensor, bits: int, zero: int, bias: torch.Tensor | None, out_features: int,
          threads: int, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """One ``aq_gemm`` call on a float32 contiguous ``x2 [M, in]``; float32 ``[M, out]``."""
    m, in_f = x2.shape
    y = torch.empty((m, out_features), dtype=torch.float32)
    if (lib or load_library()).aq_gemm(x2.data_ptr(), y.data_ptr(), m, out_features, in_f, data.data_ptr(), bits,
                                       zero, None if bias is None else bias.data_ptr(), threads):
        raise MemoryError(f"cpu_gemv could not allocate scratch for {m} activation rows")
    return y


# The op torch.compile sees. Defined with torch.library.Library rather than torch.library.custom_op:
# custom_op's Python autograd wrapper costs about 14 µs per call (3 ms per SmolLM2 decode step of
# ~210 calls), a plain CPU kernel about 2 µs. The layer is inference-only: no autograd formula.
_LIB = torch.library.Library("auto_quant", "FRAGMENT")
_LIB.define("cpu_gemv(Tensor x, Tensor data, int bits, int zero, Tensor? bias, int out_features) -> Tensor")


def cpu_gemv_python(x: torch.Tensor, data: torch.Tensor, bits: int, zero: int, bias: torch.Tensor | None,
                    out_features: int) -> torch.Tensor:
    """The op's Python implementation, registered for CompositeExplicitAutograd (the C++ CPU kernel of
    :func:`load_native_op` takes precedence over it once loaded): ``x [..., in]`` (any float dtype) @ w^T + bias in
    x's dtype; ``data``/``bits``/``zero`` as in :class:`PackedWeight`."""
    if x.device.type != "cpu" or data.device.type != "cpu":
        raise BackendError(f"auto_quant::cpu_gemv takes CPU tensors (got x on {x.device}, data on {data.device})")
    if x.dtype is not torch.float32 or not x.is_contiguous():
        return cpu_gemv_python(x.contiguous().to(torch.float32), data, bits, zero, bias, out_features).to(x.dtype)
    y = _gemm(x.reshape(-1, x.shape[-1]), data, bits, zero, bias, out_features, torch.get_num_threads())
    return y.reshape(*x.shape[:-1], out_features)


_LIB.impl("cpu_gemv", cpu_gemv_python, "CompositeExplicitAutograd")


@torch.library.register_fake("auto_quant::cpu_gemv", lib=_LIB)
def _cpu_gemv_fake(x, data, bits, zero, bias, out_features):
    load_native_op()  # a trace is what makes compiled calls: give them the C++ kernel (built once per machine)
    return x.new_empty((*x.shape[:-1], out_features))


# ------------------------------------------------------------------------- the op's C++ kernel


def native_op_source() -> Path:
    return Path(str(resources.files("auto_quant.kernels").joinpath("cpu_gemv_op.cpp")))


def find_cxx_compiler() -> str | None:
    """The C++ compiler on PATH: ``$CXX`` if set, else g++ or c++ (None: none)."""
    return find_compiler("CXX", ("g++", "c++"))


def native_op_argv(cxx: str, c_library: Path) -> list[str]:
    """The command (less ``-o``) that builds the op's C++ kernel against this torch, linked to ``c_library``."""
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [cxx, "-O2", "-shared", "-fPIC", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            str(native_op_source()), str(c_library), f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu",
            f"-Wl,-rpath,{torch_dir / 'lib'}", f"-Wl,-rpath,{c_library.parent}"]


def build_native_op(cxx: str | None = None) -> Path:
    """Compile the op's C++ kernel unless already cached (keyed like :func:`library_path`, plus this source,
    the C library it links and torch's version); returns its path."""
    cxx = cxx or find_cxx_compiler()
    if cxx is None:
        raise BackendError("no C++ compiler was found (looked for $CXX, g++, c++); install g++ "
                           "(e.g. apt-get install g++)")
    c_library = build_library()
    argv = native_op_argv(cxx, c_library)
    out = cached_build_path("cpu_gemv_op", native_op_source().read_bytes(), " ".join(argv).encode(),
                            torch.__version__.encode(), _compiler_version(cxx).encode())
    if out.exists():
        return out
    failure = _compile(argv, out)
    if failure is not None:
        raise BackendError(f"the C++ kernel {native_op_source()} did not build:\n$ {' '.join(argv)}: {failure}\n"
                           "install a working g++ (e.g. apt-get install g++)")
    return out


@functools.cache
def load_native_op() -> str | None:
    """Build (once per machine) and load the op's C++ CPU kernel; None once loaded, else why not. Without it
    compiled graphs call the Python implementation, about 30 µs more a call (logged once)."""
    try:
        torch.ops.load_library(str(build_native_op()))
    except (BackendError, OSError) as e:
        log.warning("cpu_gemv: compiled graphs call the kernel through Python (about 30 µs more a call): %s", e)
        return str(e)
    return None


class CpuGemvLinear:
    """A QuantLinear's forward through the C kernel.

    Eager float32 contiguous inputs call the library directly with the layer's constant arguments
    prepared once (about 3 µs of Python per call; a decode step makes ~210 of them); other dtypes
    and strides are converted first; under torch.compile the call is the ``auto_quant::cpu_gemv``
    custom op.
    """

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None):
        self.weight = weight
        # flat attributes: what a compiled graph reads is guarded, one attribute at a time
        self.data, self.bits, self.zero = weight.data, weight.bits, weight.zero
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self.args = LayerArgs(self.out_features, self.in_features, self.data.data_ptr(),
                              None if self.bias is None else self.bias.data_ptr(), self.bits, self.zero)
        self.args_ptr = ctypes.addressof(self.args)
        self.gemm_layer = load_library().aq_gemm_layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.auto_quant.cpu_gemv(x, self.data, self.bits, self.zero, self.bias, self.out_features)
        if x.dtype is not torch.float32 or not x.is_contiguous():
            return self(x.contiguous().to(torch.float32)).to(x.dtype)
        y = torch.empty(*x.shape[:-1], self.out_features)
        if self.gemm_layer(self.args_ptr, x.data_ptr(), y.data_ptr(), x.numel() // self.in_features,
                           torch.get_num_threads()):
            raise MemoryError(f"cpu_gemv could not allocate scratch for {x.numel() // self.in_features} rows")
        return y


def prepare(module, ctx=None) -> CpuGemvLinear:
    """Repack a QuantLinear once for the kernel (its checkpoint buffers stay as they are)."""
    codes, zero, scale = module.unpack()
    return CpuGemvLinear(pack_weight(codes, zero, scale, module.bits, module.group_size), module.bias)
