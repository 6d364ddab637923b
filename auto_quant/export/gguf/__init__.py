"""GGUF export: llama.cpp files written from auto_quant's tuned integer weights.

``gguf:<type>`` formats (``gguf:q4_k_m``, ``gguf:q4_0``, ``gguf:f16`` …) are registered in
:data:`auto_quant.export.EXPORTERS`. Tune in the file type's own grids with
``AutoRound(..., scheme="gguf:q4_k_m")`` (see :func:`gguf_quant_config`), then
``save_quantized(dir, format="gguf:q4_k_m")``.
"""

from auto_quant.export.gguf.arch import SUPPORTED_MODEL_TYPES, check_model
from auto_quant.export.gguf.plan import GgufPlan, plan_gguf
from auto_quant.export.gguf.scheme import gguf_quant_config, is_gguf_scheme
from auto_quant.export.gguf.types import FILE_TYPES, TENSOR_TYPES, file_type, tensor_type_of_spec
from auto_quant.export.gguf.writer import GgufCapabilities, GgufExporter, exporters, gguf_file_name, write_gguf

__all__ = [
    "FILE_TYPES",
    "SUPPORTED_MODEL_TYPES",
    "TENSOR_TYPES",
    "GgufCapabilities",
    "GgufExporter",
    "GgufPlan",
    "check_model",
    "exporters",
    "file_type",
    "gguf_file_name",
    "gguf_quant_config",
    "is_gguf_scheme",
    "plan_gguf",
    "tensor_type_of_spec",
    "write_gguf",
]
