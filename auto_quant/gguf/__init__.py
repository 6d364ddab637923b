"""Reading GGUF files: ``from_gguf(path) -> (float transformers model, tokenizer)``.

``AutoRound(model="file.gguf")`` re-quantizes a GGUF model (its weights are dequantized first).
Truncated or corrupted files raise :class:`auto_quant.errors.GGUFFileError`.
"""

from auto_quant.gguf.loader import config_from_gguf, from_gguf, model_from_gguf
from auto_quant.gguf.reader import field_value, open_gguf, tensor_array

__all__ = ["config_from_gguf", "field_value", "from_gguf", "model_from_gguf", "open_gguf", "tensor_array"]
