"""Reading GGUF back: ``from_gguf`` reproduces the exported model; broken files fail with a typed error."""

import shutil

import gguf
import numpy as np
import pytest
import torch

from auto_quant import AutoRound
from auto_quant.errors import GGUFFileError, ModelLoadError
from auto_quant.gguf import from_gguf, open_gguf
from test_gguf_helpers import (
    GGUF_ARCHS,
    GGUF_MOE_ARCHS,
    eval_text,
    gguf_model,
    only_gguf,
    tiny_tokenizer,
    token_windows,
    torch_threads,
)


def _export(tmp_path, arch, scheme="gguf:q4_k_m"):
    tok = tiny_tokenizer()
    m = gguf_model(arch)
    ar = AutoRound(m, tok, scheme=scheme, iters=0, init_search=False, progress=False)  # plain RTN: no calibration
    ar.quantize()
    out = ar.save_quantized(tmp_path / arch, format=scheme)[scheme]
    return ar, only_gguf(out)


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_from_gguf_rebuilds_the_exported_model(tmp_path, arch):
    ar, path = _export(tmp_path, arch)
    model, tok = from_gguf(path)
    assert model.config.model_type in (arch, "gemma3_text", "llama")
    ref = ar.model
    # the file holds the fake-quantized linears as tuned, and token_embd / output as the exporter quantized them
    with torch.no_grad():
        ref.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight)
        ref.get_output_embeddings().weight.copy_(model.get_output_embeddings().weight)
        ids = torch.tensor([token_windows(eval_text(), 1, 40)[0]])
        a, b = ref(ids).logits, model(ids).logits
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    text = "def foo(x):\n    return x  # ok"
    assert tok(text)["input_ids"] == tiny_tokenizer()(text)["input_ids"]


def test_truncated_and_corrupted_files_raise_typed_errors(tmp_path):
    _, path = _export(tmp_path, "qwen2", "gguf:q8_0")
    data = path.read_bytes()
    reader = gguf.GGUFReader(path)
    data_start = reader.data_offset
    cases = {
        "empty": b"",
        "header": data[:10],
        "metadata": data[: data_start // 2],
        "tensor_data": data[: data_start + (len(data) - data_start) // 2],
        "one_byte_short": data[:-1],
        "magic": b"GGUX" + data[4:],
        "version": data[:4] + (99).to_bytes(4, "little") + data[8:],
        "not_gguf": b"PK\x03\x04" + bytes(200),
    }
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(blob)
        with pytest.raises(GGUFFileError, match=name + r"\.gguf"):
            open_gguf(bad)
        with pytest.raises(GGUFFileError):
            from_gguf(bad)
    with pytest.raises(ModelLoadError, match="does not exist"):
        from_gguf(tmp_path / "missing.gguf")


def test_non_finite_tensor_data_is_reported(tmp_path):
    _, path = _export(tmp_path, "gemma", "gguf:q8_0")
    reader = gguf.GGUFReader(path, "r+")
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    norm.data[3] = np.nan
    del reader
    with pytest.raises(GGUFFileError, match="non-finite"):
        from_gguf(path)


def test_autoround_requantizes_a_gguf_model(tmp_path):
    _, path = _export(tmp_path, "qwen2", "gguf:q8_0")
    ar = AutoRound(str(path), bits=4, group_size=32, sym=True, iters=0, init_search=False, progress=False)
    assert ar.tokenizer is not None
    ar.quantize()
    out = ar.save_quantized(tmp_path / "requant", format="auto_round,gguf:q4_0")
    assert only_gguf(out["gguf:q4_0"]).stat().st_size < path.stat().st_size
    broken = tmp_path / "broken" / "x.gguf"
    broken.parent.mkdir()
    shutil.copy(path, broken)
    with open(broken, "r+b") as f:
        f.truncate(broken.stat().st_size // 3)
    with pytest.raises(GGUFFileError, match="truncated|cannot be parsed"):
        AutoRound(str(broken), iters=0)


@pytest.mark.slow
def test_smollm2_reads_the_same_through_both_readers():
    from auto_quant.models.loading import default_model_path

    try:
        src = default_model_path()
    except Exception as e:  # pragma: no cover - the demo model is optional
        pytest.skip(str(e))
    with torch_threads(1):
        ours, tok = from_gguf(src, backend="auto_quant")
        theirs, _ = from_gguf(src, backend="transformers")
        ids = torch.tensor([tok("The State of the Union is strong.")["input_ids"]])
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)
    # a plain float model, not one marked GGUF-quantized: it saves and reloads as such
    assert theirs.hf_quantizer is None and not hasattr(theirs.config, "quantization_config")


@pytest.mark.parametrize("arch", GGUF_MOE_ARCHS)
def test_moe_gguf_reads_back_exactly(tmp_path, arch):
    """Mixture-of-experts files (a llama file with experts is a Mixtral, not a dense Llama): the stacked expert
    tensors are sliced back into per-expert linears and the model computes what it was exported from."""
    from auto_quant.export import ExportContext, export
    from auto_quant.models.moe import SplitExperts
    from auto_quant.quant import QuantSpec

    m = gguf_model(arch)
    ids = torch.tensor([token_windows(eval_text(), 1, 32)[0]])
    with torch.no_grad():
        ref = m(ids).logits
    out = export(ExportContext(m, tiny_tokenizer(), {}, ["model.layers"], QuantSpec(), {}), tmp_path / "o", "gguf:f32")
    back, tok = from_gguf(only_gguf(out["gguf:f32"]))
    assert back.config.model_type == arch and isinstance(back.model.layers[1].mlp.experts, SplitExperts)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref, rtol=1e-5, atol=1e-5)
