"""The load-time request: IPEX-LLM keyword arguments and ITREX's ``WeightOnlyQuantConfig``, resolved
into one frozen :class:`~auto_quant.transformers.convert.LowBitSettings`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from auto_quant.errors import ConfigError
from auto_quant.transformers.convert import LowBitSettings
from auto_quant.transformers.qtypes import QType, resolve_qtype

log = logging.getLogger(__name__)

# ITREX weight_dtype (and scheme) → auto_quant qtype
WOQ_WEIGHT_DTYPES = {
    ("int8", "sym"): "sym_int8",
    ("int4", "sym"): "sym_int4",
    ("int4_fullrange", "sym"): "sym_int4",
    ("int4", "asym"): "asym_int4",
    ("int4_fullrange", "asym"): "asym_int4",
    ("int5", "sym"): "sym_int5",
    ("int5", "asym"): "asym_int5",
    ("nf4", "sym"): "nf4",
    ("nf3", "sym"): "nf3",
    ("fp4", "sym"): "fp4",
    ("fp4_e2m1", "sym"): "fp4",
    ("fp6", "sym"): "fp6",
    ("fp8", "sym"): "fp8_e4m3",
    ("fp8_e4m3", "sym"): "fp8_e4m3",
    ("fp8_e5m2", "sym"): "fp8_e5m2",
}
WOQ_REFUSED_WEIGHT_DTYPES = {
    "int4_clip": "restricted-range int4 is not implemented; int4_fullrange stores the same bits with one more level",
    "fp4_e2m1_bnb": "bitsandbytes' FP4 grid is not implemented; use fp4 (OCP e2m1) or nf4",
}
WOQ_COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WOQ_SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WOQ_ALGORITHMS = ("RTN",)
# ITREX runtime switches that do not change the numerics here; accepted and ignored
WOQ_IGNORED = ("use_neural_speed", "use_ggml", "use_quant", "device", "low_bit_model", "calib_iters")


def woq_supported_table() -> str:
    rows = [f"weight_dtype={w!r} scheme={s!r} -> {q}" for (w, s), q in WOQ_WEIGHT_DTYPES.items()]
    return ("; ".join(rows) + f"; compute_dtype in {sorted(WOQ_COMPUTE_DTYPES)}; scale_dtype in {sorted(WOQ_SCALE_DTYPES)}; "
            f"algorithm in {list(WOQ_ALGORITHMS)} (mse_range=True adds a clipping search); group_size a positive int or -1")


@dataclass(frozen=True, init=False)
class WeightOnlyQuantConfig:
    """Intel Extension for Transformers' weight-only config, accepted as ``quantization_config=``.

    ``weight_dtype``/``scheme`` pick the qtype (see :data:`WOQ_WEIGHT_DTYPES`), ``group_size`` and
    ``scale_dtype`` override its defaults, ``compute_dtype`` is the dtype of the rest of the model
    and of the activations, ``algorithm``/``alg`` must be ``RTN`` (``mse_range=True`` adds an
    error-minimising clipping search). Anything else is refused with the supported table.
    """

    weight_dtype: str = "int4"
    compute_dtype: str = "fp32"
    algorithm: str = "RTN"
    group_size: int = 32
    scale_dtype: str = "fp32"
    scheme: str = "sym"
    llm_int8_skip_modules: tuple[str, ...] = ()
    mse_range: bool = False
    use_double_quant: bool = False
    qtype: QType = field(default=None, repr=False)  # resolved

    def __init__(self, weight_dtype: str | None = None, compute_dtype: str | torch.dtype | None = None,
                 algorithm: str | None = None, group_size: int = 32, scale_dtype: str | torch.dtype | None = None,
                 scheme: str = "sym", llm_int8_skip_modules=None, mse_range: bool = False,
                 use_double_quant: bool = False, alg: str | None = None, **kwargs):
        unknown = sorted(k for k in kwargs if k not in WOQ_IGNORED)
        if unknown:
            raise ConfigError(f"WeightOnlyQuantConfig got unsupported arguments {unknown}; supported: weight_dtype, "
                              "compute_dtype, algorithm (alg), group_size, scale_dtype, scheme, llm_int8_skip_modules, "
                              "mse_range, use_double_quant")
        if algorithm is not None and alg is not None and algorithm.upper() != alg.upper():
            raise ConfigError(f"WeightOnlyQuantConfig got algorithm={algorithm!r} and alg={alg!r}; pass one")
        algo = (algorithm or alg or "RTN").upper()
        wd = (weight_dtype or "int4").lower()
        cd = _dtype_name(compute_dtype or "fp32")
        sd = _dtype_name(scale_dtype or "fp32")
        sch = str(scheme).lower()
        if wd in WOQ_REFUSED_WEIGHT_DTYPES:
            raise ConfigError(f"WeightOnlyQuantConfig(weight_dtype={wd!r}) is not supported: {WOQ_REFUSED_WEIGHT_DTYPES[wd]}. "
                              f"Supported: {woq_supported_table()}")
        if (wd, sch) not in WOQ_WEIGHT_DTYPES:
            raise ConfigError(f"WeightOnlyQuantConfig(weight_dtype={wd!r}, scheme={sch!r}) is not supported. "
                              f"Supported: {woq_supported_table()}")
        if cd not in WOQ_COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype={cd!r} is not supported (activations stay in floating point); "
                              f"use one of {sorted(WOQ_COMPUTE_DTYPES)}")
        if sd not in WOQ_SCALE_DTYPES:
            raise ConfigError(f"scale_dtype={sd!r} is not supported; use one of {sorted(WOQ_SCALE_DTYPES)}")
        if algo not in WOQ_ALGORITHMS:
            raise ConfigError(f"algorithm={algo!r} is not available at load time (RTN only); for calibrated "
                              "quantization run auto_quant.AutoRound on the model and load the saved checkpoint")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size == 0 or group_size < -1:
            raise ConfigError(f"group_size={group_size!r} is invalid; use a positive integer (32, 64, 128) or -1")
        if use_double_quant:
            raise ConfigError("use_double_quant=True is not supported; scales are stored in scale_dtype")
        if not isinstance(mse_range, bool):
            raise ConfigError(f"mse_range={mse_range!r} must be True or False")
        skip = _names(llm_int8_skip_modules, "llm_int8_skip_modules")
        for k, v in {"weight_dtype": wd, "compute_dtype": cd, "algorithm": algo, "group_size": group_size,
                     "scale_dtype": sd, "scheme": sch, "llm_int8_skip_modules": skip, "mse_range": mse_range,
                     "use_double_quant": use_double_quant,
                     "qtype": resolve_qtype(WOQ_WEIGHT_DTYPES[(wd, sch)])}.items():
            object.__setattr__(self, k, v)

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return WOQ_COMPUTE_DTYPES[self.compute_dtype]

    def to_dict(self) -> dict:
        return {"weight_dtype": self.weight_dtype, "compute_dtype": self.compute_dtype, "algorithm": self.algorithm,
                "group_size": self.group_size, "scale_dtype": self.scale_dtype, "scheme": self.scheme,
                "llm_int8_skip_modules": list(self.llm_int8_skip_modules), "mse_range": self.mse_range}


def _dtype_name(v) -> str:
    if isinstance(v, torch.dtype):
        return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(v, str(v))
    s = str(v).lower().removeprefix("torch.")
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16", "float": "fp32"}.get(s, s)


def _names(value, arg: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{arg} must be a list of module names such as ['lm_head'], got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class Request:
    settings: LowBitSettings | None  # None: plain float load
    dtype: torch.dtype | None  # from WeightOnlyQuantConfig.compute_dtype
    passthrough_quantization_config: object | None  # a foreign quantization_config for transformers
    cpu_embedding: bool = False


def resolve_request(load_in_4bit=False, load_in_low_bit=None, quantization_config=None, modules_to_not_convert=None,
                    cpu_embedding=False, embedding_qtype=None, mixed_precision=False) -> Request:
    """Check the IPEX-LLM / ITREX arguments together and resolve them to one set of settings."""
    for arg, v in (("load_in_4bit", load_in_4bit), ("cpu_embedding", cpu_embedding), ("mixed_precision", mixed_precision)):
        if not isinstance(v, bool):
            raise ConfigError(f"{arg}={v!r} must be True or False")
    skip = _names(modules_to_not_convert, "modules_to_not_convert")
    woq = quantization_config if isinstance(quantization_config, WeightOnlyQuantConfig) else None
    qt = resolve_qtype(load_in_low_bit) if load_in_low_bit is not None else None
    if woq is not None:
        if qt is not None and qt.name != woq.qtype.name:
            raise ConfigError(f"load_in_low_bit={load_in_low_bit!r} conflicts with quantization_config (weight_dtype="
                              f"{woq.weight_dtype!r} → {woq.qtype.name}); pass only one of them")
        qt = woq.qtype
    if load_in_4bit:
        if qt is None:
            qt = resolve_qtype("sym_int4")
        elif qt.bits != 4 or qt.kind == "float":
            raise ConfigError(f"load_in_4bit=True conflicts with load_in_low_bit={qt.name!r} ({qt.bits}-bit); pass only "
                              "one of them (load_in_low_bit alone picks the type)")
    foreign = quantization_config if (quantization_config is not None and woq is None) else None
    if foreign is not None and qt is not None:
        raise ConfigError(f"quantization_config={type(foreign).__name__} cannot be combined with load_in_4bit / "
                          "load_in_low_bit; pass a WeightOnlyQuantConfig or drop one of them")
    emb_qt = resolve_qtype(embedding_qtype) if embedding_qtype is not None else None
    if qt is None:
        if emb_qt is not None or skip or mixed_precision:
            raise ConfigError("embedding_qtype / modules_to_not_convert / mixed_precision need load_in_4bit=True or "
                              "load_in_low_bit=...")
        return Request(None, None, foreign, cpu_embedding)
    settings = LowBitSettings(
        qtype=qt,
        group_size=woq.group_size if woq is not None else None,
        scale_dtype=WOQ_SCALE_DTYPES[woq.scale_dtype] if woq is not None else torch.float16,
        search=bool(woq.mse_range) if woq is not None else False,
        modules_to_not_convert=skip + (woq.llm_int8_skip_modules if woq is not None else ()),
        mixed_precision=mixed_precision,
        embedding_qtype=emb_qt,
        cpu_embedding=cpu_embedding,
    )
    return Request(settings, woq.torch_compute_dtype if woq is not None else None, None, cpu_embedding)


__all__ = ["Request", "WeightOnlyQuantConfig", "WOQ_WEIGHT_DTYPES", "resolve_request", "woq_supported_table"]
