"""The load-time low-bit API in the IPEX-LLM / ITREX style.

    from auto_quant.transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, load_in_low_bit="nf4")
    model.save_low_bit("out")
    model = AutoModelForCausalLM.load_low_bit("out")
    model, tokenizer = AutoModelForCausalLM.from_gguf("model.gguf", low_bit="sym_int4")

See docs/lowbit.md for the qtype table.
"""

from auto_quant.transformers.config import WeightOnlyQuantConfig
from auto_quant.transformers.imatrix import compute_imatrix, load_imatrix, write_imatrix_dat
from auto_quant.transformers.lowbit_io import load_low_bit, save_low_bit
from auto_quant.transformers.model import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForNextSentencePrediction,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForSpeechSeq2Seq,
    AutoModelForTokenClassification,
    quantize_model,
)
from auto_quant.transformers.modules import CPUEmbedding, LowBitEmbedding, LowBitLinear
from auto_quant.transformers.qtypes import QTYPES, QType, resolve_qtype

__all__ = [
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForImageTextToText",
    "AutoModelForMaskedLM",
    "AutoModelForMultipleChoice",
    "AutoModelForNextSentencePrediction",
    "AutoModelForQuestionAnswering",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification",
    "AutoModelForSpeechSeq2Seq",
    "AutoModelForTokenClassification",
    "CPUEmbedding",
    "LowBitEmbedding",
    "LowBitLinear",
    "QTYPES",
    "QType",
    "WeightOnlyQuantConfig",
    "compute_imatrix",
    "load_imatrix",
    "load_low_bit",
    "quantize_model",
    "resolve_qtype",
    "save_low_bit",
    "write_imatrix_dat",
]
