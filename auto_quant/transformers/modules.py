"""Low-bit modules of the load-time API and the functions that build them from float weights.

* Integer linears become :class:`auto_quant.inference.qlinear.QuantLinear` (``gptq_v2`` layout),
  so the backend registry picks their kernels.
* :class:`LowBitLinear` holds codebook (nf/fp), k-quant (llama.cpp blocks) and fp16/bf16 weights.
* :class:`LowBitEmbedding` holds an embedding table in any type, row-major, and decodes only the
  rows it looks up.

All buffers are stored exactly as ``save_low_bit`` writes them; ``layer_args`` returns what is
needed to rebuild an empty module of the same shape for ``load_low_bit``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from auto_quant.export import packing
from auto_quant.inference.qlinear import QuantLinear, linear_in_row_slices
from auto_quant.quant import QuantSpec, dequantize, quantize_weight
from auto_quant.quant.lowbit_formats import dequantize_codebook, get_codebook, quantize_codebook
from auto_quant.quant.search import search_clip_coef
from auto_quant.transformers import ggml_quants
from auto_quant.transformers.qtypes import QType, resolve_qtype


ROW_CHUNK = 2048  # rows encoded at a time; a multiple of 32 so packed zero words never straddle chunks


@dataclass(frozen=True)
class LayerTarget:
    """What one layer becomes: a concrete (non-mix) qtype and its parameters."""

    qtype: QType
    group_size: int
    scale_dtype: torch.dtype = torch.float16
    search: bool = False  # importance-weighted clip / scale search (RTN when False and no imatrix)

    def describe(self) -> str:
        return self.qtype.name if self.qtype.kind in ("float", "ggml") else f"{self.qtype.name}/g{self.group_size}"


# ------------------------------------------------------------------------------------------
# row-major storage shared by LowBitLinear and LowBitEmbedding
# ------------------------------------------------------------------------------------------


def _n_groups(in_features: int, group_size: int) -> int:
    gs = in_features if group_size == -1 else group_size
    return -(-in_features // gs)


def _storage_bits(qt: QType) -> int:
    return get_codebook(qt.codebook).bits if qt.kind == "codebook" else qt.bits


class _RowQuantized(nn.Module):
    """Buffers for a ``[rows, cols]`` weight in one qtype, each row independent."""

    def _storage_device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def _init_storage(self, rows: int, cols: int, qtype: str, group_size: int, scale_dtype: torch.dtype,
                      device=None) -> None:
        qt = resolve_qtype(qtype)
        if qt.kind == "mix":
            raise ValueError(f"{qt.name} is a per-layer mix; resolve it to a concrete type first")
        self.qtype = qt.name
        self.kind = qt.kind
        self.rows, self.cols = rows, cols
        self.group_size = group_size
        self.scale_dtype = scale_dtype
        if qt.kind == "float":
            self.register_buffer("fweight", torch.empty(rows, cols, dtype=qt.float_dtype, device=device))
        elif qt.kind == "ggml":
            if cols % ggml_quants.QK_K:
                raise ValueError(f"{qt.name} needs rows that are a multiple of {ggml_quants.QK_K} long, got {cols}")
            nbytes = ggml_quants.GGML_TYPES[qt.ggml_type].row_bytes(cols)
            self.register_buffer("qweight", torch.empty(rows, nbytes, dtype=torch.uint8, device=device))
        else:
            bits = _storage_bits(qt)
            g = _n_groups(cols, group_size)
            self.register_buffer("qweight", torch.empty(rows, packing.packed_length(cols, bits), dtype=torch.int32, device=device))
            self.register_buffer("scales", torch.empty(rows, g, dtype=scale_dtype, device=device))
            if qt.kind == "int":
                self.register_buffer("qzeros", torch.empty(rows, g, dtype=torch.uint8, device=device))

    @property
    def _qt(self) -> QType:
        return resolve_qtype(self.qtype)

    def _fill(self, w: torch.Tensor, importance: torch.Tensor | None, search: bool) -> None:
        """Quantize the float ``w`` (``[rows, cols]``) into the buffers, :data:`ROW_CHUNK` rows at a time
        (the encoders' float and int64 temporaries stay a few times one chunk, not the whole matrix)."""
        for r0 in range(0, w.shape[0], ROW_CHUNK):
            self._fill_rows(r0, w[r0:r0 + ROW_CHUNK], importance, search)

    def _fill_rows(self, r0: int, w: torch.Tensor, importance, search: bool) -> None:
        qt = self._qt
        r1 = r0 + w.shape[0]
        w = w.detach().to(torch.float32)
        if qt.kind == "float":
            self.fweight[r0:r1].copy_(w.to(qt.float_dtype))
        elif qt.kind == "ggml":
            self.qweight[r0:r1].copy_(ggml_quants.quantize_rows(w, qt.ggml_type, importance))
        elif qt.kind == "codebook":
            cw = quantize_codebook(w, qt.codebook, self.group_size, self.scale_dtype, importance, search)
            self.qweight[r0:r1].copy_(packing.pack_bitstream(cw.codes, _storage_bits(qt), dim=1))
            self.scales[r0:r1].copy_(cw.scale)
        else:
            spec = self._spec()
            coef = search_clip_coef(w, spec, importance) if (search or importance is not None) else 1.0
            qw = quantize_weight(w, spec, None, coef, coef)
            self.qweight[r0:r1].copy_(packing.pack_bitstream(qw.codes, qt.bits, dim=1))
            self.scales[r0:r1].copy_(qw.scale)
            self.qzeros[r0:r1].copy_(qw.zero)

    def _spec(self) -> QuantSpec:
        qt = self._qt
        return QuantSpec(qt.bits, self.group_size, qt.sym, self.scale_dtype)

    def decode_rows(self, rows: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float rows (all when ``rows`` is None)."""
        qt = self._qt
        pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
        if qt.kind == "float":
            return pick(self.fweight).to(dtype)
        if qt.kind == "ggml":
            return ggml_quants.dequantize_rows(pick(self.qweight), qt.ggml_type, self.cols, dtype)
        codes = packing.unpack_bitstream(pick(self.qweight), _storage_bits(qt), self.cols, dim=1)
        if qt.kind == "codebook":
            return dequantize_codebook(codes, pick(self.scales), qt.codebook, self.group_size, dtype)
        return dequantize(codes, pick(self.scales), pick(self.qzeros), self._spec(), dtype)

    def storage_args(self) -> dict:
        return {"qtype": self.qtype, "group_size": self.group_size, "scale_dtype": str(self.scale_dtype).removeprefix("torch.")}


class LowBitLinear(_RowQuantized):
    """``y = x @ W^T + b`` with ``W`` in a codebook, k-quant, integer (row-major) or 16-bit float format;
    the torch path dequantizes and runs ``F.linear`` on any device."""

    def __init__(self, in_features: int, out_features: int, qtype: str, bias: bool, group_size: int = -1,
                 scale_dtype: torch.dtype = torch.float16, bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_storage(out_features, in_features, qtype, group_size, scale_dtype, device)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    def extra_repr(self) -> str:
        g = "" if self.kind in ("float", "ggml") else f", group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}{g}"

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.decode_rows(None, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize, then ``F.linear``, in slices of output rows for a large weight (bounded memory)."""

        def weight_rows(start: int, stop: int) -> torch.Tensor:
            if start == 0 and stop == self.out_features:
                return self.dequantize_weight(x.dtype)
            rows = torch.arange(start, stop, device=self._storage_device())
            return self.decode_rows(rows, x.dtype)

        return linear_in_row_slices(x, weight_rows, self.out_features, self.in_features, self.bias)

    def layer_args(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "bias_dtype": str(self.bias.dtype).removeprefix("torch.") if self.bias is not None else None,
                **self.storage_args()}


class LowBitEmbedding(_RowQuantized):
    """An embedding table in a low-bit type; a lookup decodes only the rows it needs.

    ``cpu_resident`` keeps the table on the CPU when the model moves (IPEX-LLM's ``cpu_embedding``):
    lookups run on the CPU and the result moves to the ids' device.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: str, padding_idx: int | None = None,
                 group_size: int = -1, scale_dtype: torch.dtype = torch.float16,
                 output_dtype: torch.dtype = torch.float32, cpu_resident: bool = False, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.output_dtype = output_dtype
        self.cpu_resident = cpu_resident
        self._init_storage(num_embeddings, embedding_dim, qtype, group_size, scale_dtype, device)

    @property
    def weight(self) -> torch.Tensor:  # for code that reads ``embed.weight.dtype/device``
        return self.decode_rows(None, self.output_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}, cpu_resident={self.cpu_resident}"

    def _apply(self, fn, recurse=True):
        if self.cpu_resident:
            return self
        return super()._apply(fn, recurse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        dev = self._storage_device()
        flat = ids.reshape(-1).to(dev)
        out = self.decode_rows(flat, self.output_dtype).reshape(*ids.shape, self.embedding_dim)
        return out.to(ids.device)

    def layer_args(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx, "output_dtype": str(self.output_dtype).removeprefix("torch."),
                "cpu_resident": self.cpu_resident, **self.storage_args()}


class CPUEmbedding(nn.Embedding):
    """A float embedding that stays on the CPU when the model moves (IPEX-LLM's ``cpu_embedding``)."""

    def _apply(self, fn, recurse=True):
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids.to(self.weight.device)).to(ids.device)

    def layer_args(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx, "dtype": str(self.weight.dtype).removeprefix("torch.")}


# ------------------------------------------------------------------------------------------
# building low-bit modules from float weights
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def build_linear(weight: torch.Tensor, bias: torch.Tensor | None, target: LayerTarget,
                 importance: torch.Tensor | None = None, bias_dtype: torch.dtype | None = None) -> nn.Module:
    """The low-bit replacement of a linear layer whose weight is ``weight`` (``[out, in]``)."""
    qt = target.qtype
    out_f, in_f = weight.shape
    device = weight.device
    bdt = bias_dtype or (bias.dtype if bias is not None else torch.float32)
    if qt.kind == "int":
        return _build_quant_linear(weight, bias, target, importance, bdt)
    mod = LowBitLinear(in_f, out_f, qt.name, bias is not None, target.group_size, target.scale_dtype, bdt, device=device)
    mod._fill(weight, importance, target.search)
    if bias is not None:
        mod.bias.copy_(bias.detach().to(bdt))
    return mod


def _build_quant_linear(weight: torch.Tensor, bias, target: LayerTarget, importance, bias_dtype) -> QuantLinear:
    """An integer linear in the ``gptq_v2`` layout (true zeros), encoded :data:`ROW_CHUNK` output rows at a time.

    GPTQ packs codes along the input dimension, so a chunk of output rows is a column slice of
    ``qweight``/``scales``; zeros pack along the output dimension, and a chunk that starts at a
    multiple of 32 rows starts on a word boundary for every bit width.
    """
    qt = target.qtype
    out_f, in_f = weight.shape
    spec = QuantSpec(qt.bits, target.group_size, qt.sym, target.scale_dtype)
    mod = QuantLinear(in_f, out_f, spec.bits, spec.group_size, spec.sym, bias is not None, layout="gptq_v2",
                      scale_dtype=spec.scale_dtype, bias_dtype=bias_dtype, device=weight.device)
    for r0 in range(0, out_f, ROW_CHUNK):
        w = weight[r0:r0 + ROW_CHUNK].detach().to(torch.float32)
        r1 = r0 + w.shape[0]
        coef = search_clip_coef(w, spec, importance) if (target.search or importance is not None) else 1.0
        qw = quantize_weight(w, spec, None, coef, coef)
        t = packing.pack_gptq(qw.codes, qw.zero, qw.scale, spec.bits, 0, spec.scale_dtype)
        mod.qweight[:, r0:r1].copy_(t["qweight"])
        z0 = r0 * spec.bits // 32
        mod.qzeros[:, z0:z0 + t["qzeros"].shape[1]].copy_(t["qzeros"])
        mod.scales[:, r0:r1].copy_(t["scales"])
    if bias is not None:
        mod.bias.copy_(bias.detach().to(bias_dtype))
    return mod


@torch.no_grad()
def build_embedding(weight: torch.Tensor, padding_idx: int | None, target: LayerTarget, output_dtype: torch.dtype,
                    cpu_resident: bool = False, importance: torch.Tensor | None = None) -> LowBitEmbedding:
    num, dim = weight.shape
    device = torch.device("cpu") if cpu_resident else weight.device
    mod = LowBitEmbedding(num, dim, target.qtype.name, padding_idx, target.group_size, target.scale_dtype,
                          output_dtype, cpu_resident, device=device)
    mod._fill(weight.to(device), importance, target.search)
    return mod


def make_cpu_embedding(emb: nn.Embedding, copy: bool = False) -> CPUEmbedding:
    """A :class:`CPUEmbedding` over ``emb``'s weight (moved to the CPU; cloned when ``copy``)."""
    new = CPUEmbedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device="meta")
    w = emb.weight
    if copy or w.device.type != "cpu":
        w = nn.Parameter(w.detach().to("cpu", copy=True), requires_grad=False)
    new.weight = w
    return new


def empty_module(cls_name: str, args: dict) -> nn.Module:
    """An empty module (on the meta device) of a class ``save_low_bit`` recorded, for ``load_low_bit``."""
    dt = {k: (getattr(torch, v) if isinstance(v, str) else v) for k, v in args.items()
          if k in ("scale_dtype", "bias_dtype", "output_dtype", "dtype") and v is not None}
    if cls_name == "QuantLinear":
        return QuantLinear(args["in_features"], args["out_features"], args["bits"], args["group_size"], args["sym"],
                           args["bias"], layout=args["layout"], scale_dtype=dt.get("scale_dtype", torch.float16),
                           bias_dtype=dt.get("bias_dtype", torch.float16), device="meta")
    if cls_name == "LowBitLinear":
        return LowBitLinear(args["in_features"], args["out_features"], args["qtype"], args["bias"], args["group_size"],
                            dt["scale_dtype"], dt.get("bias_dtype", torch.float32), device="meta")
    if cls_name == "LowBitEmbedding":
        return LowBitEmbedding(args["num_embeddings"], args["embedding_dim"], args["qtype"], args["padding_idx"],
                               args["group_size"], dt["scale_dtype"], dt["output_dtype"], args["cpu_resident"],
                               device="meta")
    if cls_name == "CPUEmbedding":
        return CPUEmbedding(args["num_embeddings"], args["embedding_dim"], args["padding_idx"], device="meta",
                            dtype=dt["dtype"])
    raise ValueError(f"unknown low-bit module class {cls_name!r}")


def layer_record(mod: nn.Module) -> tuple[str, dict] | None:
    """``(class name, constructor args)`` of a low-bit module, None for anything else."""
    if isinstance(mod, QuantLinear):
        return "QuantLinear", {
            "in_features": mod.in_features, "out_features": mod.out_features, "bits": mod.bits,
            "group_size": mod.group_size, "sym": mod.sym, "bias": mod.bias is not None, "layout": mod.layout,
            "scale_dtype": str(mod.scales.dtype).removeprefix("torch."),
            "bias_dtype": str(mod.bias.dtype).removeprefix("torch.") if mod.bias is not None else None,
        }
    if isinstance(mod, (LowBitLinear, LowBitEmbedding, CPUEmbedding)):
        return type(mod).__name__, mod.layer_args()
    return None


LOWBIT_MODULES = (QuantLinear, LowBitLinear, LowBitEmbedding, CPUEmbedding)

__all__ = [
    "CPUEmbedding",
    "LOWBIT_MODULES",
    "LayerTarget",
    "LowBitEmbedding",
    "LowBitLinear",
    "build_embedding",
    "build_linear",
    "empty_module",
    "layer_record",
    "make_cpu_embedding",
]
