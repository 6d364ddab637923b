"""Recipes: shipped files load, precedence, k/iters rates, bit-conditional overrides, conflicts, bad files."""

from __future__ import annotations

import pytest

from auto_quant.cli.plan import parse_layer_config_arg, select_recipes
from auto_quant.errors import ConfigError
from auto_quant.recipes import available_recipes, builtin_defaults, load_recipe, parse_recipe, resolve


def test_shipped_recipes_load():
    assert {"default", "best", "light", "rtn", "w2g64", "w3g128", "w4g128"} <= set(available_recipes())
    for name in available_recipes():
        r = load_recipe(name)
        assert r.name == name and r.kind in ("tuning", "scheme")
    assert dict(load_recipe("default").settings) == {"iters": 200, "nsamples": 128, "seqlen": 2048, "batch_size": 8,
                                                     "lr": "1/iters"}


def test_defaults_come_from_autoround():
    d = builtin_defaults()
    assert (d["bits"], d["group_size"], d["sym"], d["seed"], d["format"]) == (4, 128, True, 42, "auto_round")


def test_precedence_and_rates():
    default = load_recipe("default")
    r = resolve([default], {"iters": 50})
    assert r.settings["iters"] == 50 and r.settings["lr"] == pytest.approx(1 / 50)
    assert r.origin["iters"] == "flag" and r.origin["nsamples"] == "recipe default"
    assert resolve([default], {"iters": 50, "lr": 0.3}).settings["lr"] == 0.3  # a flag beats the recipe
    assert resolve([default], {"iters": 0}).settings["lr"] is None  # RTN has no rate
    light = resolve([load_recipe("light")], {"iters": 7}).settings
    assert light["lr"] == 5e-3 and light["iters"] == 7


def test_best_raises_lr_at_three_bits_or_fewer():
    best = load_recipe("best")
    assert resolve([best], {}).settings["lr"] == pytest.approx(1 / 1000)
    assert resolve([best], {"bits": 3}).settings["lr"] == pytest.approx(2 / 1000)
    r = resolve([best, load_recipe("w2g64")], {})  # the scheme recipe's bits decide the override too
    assert (r.settings["bits"], r.settings["group_size"], r.settings["lr"]) == (2, 64, pytest.approx(2 / 1000))
    assert resolve([best], {"bits": 2, "lr": 0.01}).settings["lr"] == 0.01


def test_recipe_selection_and_conflicts():
    assert [r.name for r in select_recipes("auto-round", "default", None)] == ["default"]
    assert [r.name for r in select_recipes("auto-round", "default", "best,w2g64")] == ["best", "w2g64"]
    assert [r.name for r in select_recipes("auto-round-best", "best", "w3g128")] == ["best", "w3g128"]
    with pytest.raises(ConfigError, match="conflicts with --recipe light"):
        select_recipes("auto-round-best", "best", "light")
    with pytest.raises(ConfigError, match="conflicting recipes"):
        resolve([load_recipe("w2g64"), load_recipe("w3g128")], {})
    with pytest.raises(ConfigError, match="unknown recipe 'bset'"):
        load_recipe("bset")


@pytest.mark.parametrize("data, match", [
    ({"name": "x", "settings": {"iterations": 5}}, "unknown key 'iterations'"),
    ({"name": "x", "settings": {"iters": "5"}}, "wrong type"),
    ({"name": "x", "settings": {"sym": 1}}, "wrong type"),
    ({"name": "x", "settings": {"lr": "1/iter"}}, "k/iters"),
    ({"name": "x", "kind": "magic"}, "kind='magic'"),
    ({"name": "x", "extra": 1}, "unknown key"),
    ({"name": "x", "overrides": [{"when": {"group_size": 4}, "set": {}}]}, "unknown key 'group_size'"),
    ({"name": "x", "overrides": [{"when": {"bits": "about 3"}, "set": {}}]}, "comparison"),
    (["not", "a", "mapping"], "mapping"),
])
def test_bad_recipes(data, match):
    with pytest.raises(ConfigError, match=match):
        parse_recipe(data, "x.yaml")


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("settings: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(p)


def test_layer_config_forms(tmp_path):
    assert parse_layer_config_arg('{"mlp.down_proj": {"bits": 8}}') == {"mlp.down_proj": {"bits": 8}}
    assert parse_layer_config_arg("{mlp.down_proj:{bits:8,group_size:32}}") == {"mlp.down_proj": {"bits": 8, "group_size": 32}}
    f = tmp_path / "lc.yaml"
    f.write_text("lm_head:\n  bits: 8\n")
    assert parse_layer_config_arg(str(f)) == {"lm_head": {"bits": 8}}
    with pytest.raises(ConfigError, match="neither a file nor a mapping"):
        parse_layer_config_arg("[1, 2]")


def _plan(argv, tmp_path):
    from auto_quant.cli.args import build_parser, parse
    from auto_quant.cli.plan import plan_quantize

    args = parse(build_parser("auto-round", "default"), [*argv, "--output_dir", str(tmp_path / "o"), "--disable_eval"])
    return plan_quantize(args, "auto-round", "default")


def test_scheme_flag(tmp_path):
    p = _plan(["--scheme", "W3A16"], tmp_path)
    assert p.settings["bits"] == 3 and p.origin["bits"] == "flag"
    with pytest.raises(ConfigError, match="conflicting --scheme W3A16 and --bits 4"):
        _plan(["--scheme", "W3A16", "--bits", "4"], tmp_path)
    with pytest.raises(ConfigError, match="not supported"):
        _plan(["--scheme", "MXFP4"], tmp_path)
    from auto_quant.cli.plan import _accepts_scheme

    if _accepts_scheme():  # as auto-round: a gguf:<type> format implies that scheme
        p = _plan(["--format", "gguf:q4_k_m"], tmp_path)
        assert p.settings["scheme"] == "gguf:q4_k_m" and p.origin["scheme"] == "implied by --format"
