"""Bad input to the core API raises a typed auto_quant error that names the problem and the fix."""

import pytest

from auto_quant import AutoRound
from auto_quant.errors import (
    AutoQuantError,
    CalibrationError,
    ConfigError,
    ExportError,
    LayerConfigError,
    ModelLoadError,
)
from tiny_models import tiny_model, token_data


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(bits=7), ConfigError, "bits"),
    (dict(bits=1), ConfigError, "bits"),
    (dict(group_size=0), ConfigError, "group_size"),
    (dict(group_size=-2), ConfigError, "group_size"),
    (dict(iters=-1), ConfigError, "iters"),
    (dict(nsamples=0), ConfigError, "nsamples"),
    (dict(lr=-0.1), ConfigError, "lr"),
    (dict(scale_dtype="int8"), ConfigError, "scale_dtype"),
    (dict(layer_config={"no_such_layer_xyz": {"bits": 8}}), LayerConfigError, "matches no"),
    (dict(layer_config={"self_attn": {"bits": 9}}), LayerConfigError, "bits"),
    (dict(layer_config={"self_attn": {"bitz": 8}}), LayerConfigError, "unknown keys"),
    (dict(layer_config={"(": {"bits": 8}}), LayerConfigError, "regular expression"),
    (dict(not_an_option=1), ConfigError, "not_an_option"),
])
def test_bad_config(model, kwargs, exc, words):
    with pytest.raises(exc) as e:
        AutoRound(model, None, progress=False, **kwargs)
    assert words in str(e.value)
    assert isinstance(e.value, AutoQuantError)


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        AutoRound(str(tmp_path / "nope"), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        AutoRound(str(tmp_path / "empty"), None)


def test_output_dir_not_empty(model, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.txt").write_text("keep me")
    ar = AutoRound(model, None, iters=0, progress=False)
    with pytest.raises(ExportError, match="not empty"):
        ar.quantize_and_save(tmp_path / "out")
    assert (tmp_path / "out" / "x.txt").read_text() == "keep me"


def test_empty_dataset(model):
    ar = AutoRound(model, None, iters=2, nsamples=2, seqlen=16, dataset=[], progress=False)
    with pytest.raises(CalibrationError, match="empty"):
        ar.quantize()


def test_text_dataset_without_tokenizer(model):
    ar = AutoRound(model, None, iters=2, nsamples=2, seqlen=16, dataset=["some text"], progress=False)
    with pytest.raises(CalibrationError, match="tokenizer"):
        ar.quantize()


def test_failed_export_leaves_no_directory(model, tmp_path, monkeypatch):
    from auto_quant.export import auto_round as ar_mod

    ar = AutoRound(model, None, iters=0, progress=False)
    ar.quantize()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ar_mod, "save_config_and_tokenizer", boom)
    with pytest.raises(RuntimeError):
        ar.save_quantized(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_save_before_quantize(model, tmp_path):
    with pytest.raises(ConfigError, match="quantize"):
        AutoRound(model, None, iters=0, progress=False).save_quantized(tmp_path / "o")


def test_unknown_format_refused_before_tuning(model, tmp_path):
    from auto_quant.errors import FormatNotAvailableError

    ar = AutoRound(model, None, iters=2, nsamples=2, seqlen=16, dataset=token_data(), progress=False)
    with pytest.raises(FormatNotAvailableError, match="available formats"):
        ar.quantize_and_save(tmp_path / "o", format="no_such_format")
    assert ar.outcome is None  # no tuning time was spent
