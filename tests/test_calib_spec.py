"""The calibration spec language: typed parse results, positioned errors, print/parse round trip."""

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auto_quant.calib.spec import KEYS, DatasetSpec, SourceSpec, parse_dataset_spec
from auto_quant.errors import CalibrationError, CalibrationSpecError, ConfigError


def test_issue_examples_parse_to_typed_results():
    spec = parse_dataset_spec("sotu:num=256,concat=True,./mine.jsonl:num=64")
    assert spec == DatasetSpec((SourceSpec("sotu", num=256, concat=True), SourceSpec("./mine.jsonl", num=64, concat=True)))
    assert parse_dataset_spec("name:split=train+validation").sources[0].split == ("train", "validation")
    s = parse_dataset_spec('name:apply_chat_template:system_prompt="You are terse."').sources[0]
    assert s.apply_chat_template is True and s.system_prompt == "You are terse."
    s = parse_dataset_spec("self:num=32:temperature=0.7:length=128:batch=4:seed=3").sources[0]
    assert (s.num, s.temperature, s.length, s.batch, s.seed) == (32, 0.7, 128, 4, 3)


def test_global_option_applies_only_where_not_set():
    spec = parse_dataset_spec("a:concat=false,num=5,b")
    assert [(s.source, s.num, s.concat) for s in spec.sources] == [("a", 5, False), ("b", 5, None)]
    spec = parse_dataset_spec("a:num=2,self,temperature=0.5")  # self-only key goes to self alone
    assert spec.sources[0].temperature is None and spec.sources[1].temperature == 0.5


def test_quoted_values_hold_separators_and_escapes():
    spec = parse_dataset_spec("""'C:\\data\\a,b=c.txt':num=2,x:apply_chat_template:system_prompt="say \\"hi\\": a, b=c" """)
    assert spec.sources[0].source == "C:\\data\\a,b=c.txt"
    assert spec.sources[1].system_prompt == 'say "hi": a, b=c'
    assert parse_dataset_spec(str(spec)) == spec


def test_whitespace_around_separators_is_ignored_but_kept_inside_values():
    spec = parse_dataset_spec("  my data : num = 3 ,  x:apply_chat_template:system_prompt= Be  brief.  ")
    assert spec.sources[0].source == "my data" and spec.sources[0].num == 3
    assert spec.sources[1].system_prompt == "Be  brief."
    assert parse_dataset_spec('x:apply_chat_template:system_prompt="  padded "').sources[0].system_prompt == "  padded "


def test_bools_and_printing():
    for raw, want in [("concat", True), ("concat=TRUE", True), ("concat=false", False), ("concat=0", False)]:
        assert parse_dataset_spec(f"a:{raw}").sources[0].concat is want
    spec = parse_dataset_spec("a:concat=false:num=3,b:concat")
    assert str(spec) == "a:num=3:concat=false,b:concat"


BAD = [
    ("", 0, "found the end"),
    ("a,", 2, "found the end"),
    ("a:num=abc", 6, "whole number"),
    ("a:num=0", 6, "at least 1"),
    ("a:num=-1", 6, "whole number"),
    ("a:nmu=3", 2, "did you mean 'num'"),
    ("a:num", 2, "needs a value"),
    ("a:num=1:num=2", 8, "given twice"),
    ('"abc', 0, "never closed"),
    ('a:"x"', 2, "option name"),
    ("a:split=x++y", 10, "empty part"),
    ("a:temperature=0.5", 2, "only applies to the 'self'"),
    ("self:split=train", 5, "does not apply to the 'self'"),
    ("self:temperature=nan", 17, "non-negative number"),
    ("a:system_prompt=hi", 2, "apply_chat_template"),
    ("a:concat=maybe", 9, "true or false"),
    ("ab\"c", 2, "quote inside"),
    ("a=b", 0, "unknown option 'a'"),
    ("num=3", 0, "names no source"),
    ("a,temperature=1", 2, "applies to no source"),
    ('"a" b', 4, "after the quoted"),
    ("a:num=1=2", 7, "unexpected '='"),
]


@pytest.mark.parametrize("text,pos,fragment", BAD)
def test_malformed_specs_give_positioned_typed_errors(text, pos, fragment):
    with pytest.raises(CalibrationSpecError) as ei:
        parse_dataset_spec(text)
    e = ei.value
    assert (e.position, fragment in e.message) == (pos, True), str(e)
    assert isinstance(e, CalibrationError) and isinstance(e, ValueError)
    assert not isinstance(e, ConfigError)
    if text:
        assert str(e).splitlines()[-1] == "  " + " " * pos + "^"


# ---------------------------------------------------------------------------------------------- properties
_value_chars = st.text(alphabet=string.ascii_letters + string.digits + " ./-_+~\\:,='\"\t", min_size=1, max_size=12)
_split = st.lists(st.text(alphabet=string.ascii_letters + "_-:, =", min_size=1, max_size=6), min_size=1, max_size=3)


@st.composite
def source_specs(draw):
    is_self = draw(st.booleans())
    source = "self" if is_self else draw(_value_chars.filter(lambda s: s.strip() and s != "self"))
    kw = {}
    if draw(st.booleans()):
        kw["num"] = draw(st.integers(1, 10**6))
    if draw(st.booleans()):
        kw["seed"] = draw(st.integers(0, 10**9))
    if draw(st.booleans()):
        kw["concat"] = draw(st.booleans())
    if is_self:
        if draw(st.booleans()):
            kw["temperature"] = draw(st.floats(0, 100, allow_nan=False, allow_infinity=False))
        if draw(st.booleans()):
            kw["length"] = draw(st.integers(1, 4096))
        if draw(st.booleans()):
            kw["batch"] = draw(st.integers(1, 64))
    else:
        if draw(st.booleans()):
            kw["split"] = tuple(draw(_split))
        if draw(st.booleans()):
            kw["apply_chat_template"] = True
            if draw(st.booleans()):
                kw["system_prompt"] = draw(st.text(max_size=20))
    return SourceSpec(source, **kw)


@settings(max_examples=300, deadline=None)
@given(st.lists(source_specs(), min_size=1, max_size=4))
def test_print_parse_round_trip(items):
    spec = DatasetSpec(tuple(items))
    text = str(spec)
    assert parse_dataset_spec(text) == spec
    assert str(parse_dataset_spec(text)) == text


def _check_total(text):
    try:
        spec = parse_dataset_spec(text)
    except CalibrationSpecError as e:
        assert 0 <= e.position <= len(text)
        assert e.message and str(e)
        return
    assert isinstance(spec, DatasetSpec) and spec.sources
    assert parse_dataset_spec(str(spec)) == spec


_noise = st.text(alphabet=",:=\"'\\ \t\nabcnum=splitconcat+0123456789self", max_size=40)


@settings(max_examples=500, deadline=None)
@given(_noise)
def test_random_strings_parse_or_fail_with_a_position(text):
    _check_total(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=30))
def test_arbitrary_unicode_parses_or_fails_with_a_position(text):
    _check_total(text)


@settings(max_examples=400, deadline=None)
@given(st.lists(source_specs(), min_size=1, max_size=3), st.data())
def test_mutated_valid_specs_parse_or_fail_with_a_position(items, data):
    text = str(DatasetSpec(tuple(items)))
    i = data.draw(st.integers(0, len(text)))
    op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
    ch = data.draw(st.sampled_from(list(",:=\"'\\ x0") + list(KEYS)))
    if op == "insert":
        text = text[:i] + ch + text[i:]
    elif op == "delete":
        text = text[:i] + text[i + 1:]
    else:
        text = text[:i] + ch + text[i + 1:]
    _check_total(text)


def test_non_string_spec_is_a_typed_error():
    with pytest.raises(CalibrationSpecError):
        parse_dataset_spec(42)  # type: ignore[arg-type]
