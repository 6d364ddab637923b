"""The calibration dataset spec language: parse, validate and print.

Grammar (whitespace around ``,`` ``:`` ``=`` and at the ends is insignificant; inside an
unquoted value it is kept as written)::

    spec    := item ("," item)*
    item    := source (":" option)*  |  KEY "=" value      the second form is a global option
    source  := value
    option  := KEY ("=" value)?
    KEY     := [A-Za-z_][A-Za-z0-9_]*
    value   := QUOTED | BARE
    QUOTED  := '"' ... '"' | "'" ... "'"    a backslash escapes the quote character and itself
    BARE    := characters other than , : = " ' (leading and trailing whitespace not included)

A global option (an item ``key=value`` with no source) applies to every source that does not set
that key itself and accepts it: ``sotu:num=256,concat=True,./mine.jsonl:num=64`` packs both
sources. Examples: ``name:split=train+validation``,
``name:apply_chat_template:system_prompt="You are terse."``, ``self:num=32:temperature=0.8``.

:func:`parse_dataset_spec` returns a typed :class:`DatasetSpec` or raises
:class:`~auto_quant.errors.CalibrationSpecError` with the 0-based position of the offending
character. Printing folds global options into the sources, and
``parse_dataset_spec(str(spec)) == spec`` for every parsed spec.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, fields

from auto_quant.errors import CalibrationSpecError

SELF_SOURCE = "self"

_SPECIAL = ',:="\''
_WS = " \t\r\n"
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT_RE = re.compile(r"[0-9]+")
_FLOAT_RE = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")

# key -> kind; the kinds decide parsing and printing
KEYS: dict[str, str] = {
    "num": "int>=1",
    "split": "split",
    "concat": "bool",
    "apply_chat_template": "bool",
    "system_prompt": "str",
    "seed": "int>=0",
    "temperature": "float>=0",
    "length": "int>=1",
    "batch": "int>=1",
}
SELF_ONLY_KEYS = frozenset({"temperature", "length", "batch"})
NOT_FOR_SELF_KEYS = frozenset({"split", "apply_chat_template", "system_prompt"})


@dataclass(frozen=True)
class SourceSpec:
    """One comma-separated item: a source and its typed options (None = not given)."""

    source: str
    num: int | None = None
    split: tuple[str, ...] | None = None
    concat: bool | None = None  # None: long texts truncated, short ones packed; True: pack all; False: never pack
    apply_chat_template: bool = False
    system_prompt: str | None = None
    seed: int | None = None
    temperature: float | None = None  # ``self`` only
    length: int | None = None  # ``self`` only: generated tokens per text
    batch: int | None = None  # ``self`` only: sequences generated at once
    # where the item starts in the spec string, and where each key was written (for later errors)
    position: int = field(default=0, compare=False)
    key_positions: tuple[tuple[str, int], ...] = field(default=(), compare=False)

    def key_position(self, key: str) -> int:
        return dict(self.key_positions).get(key, self.position)

    def options(self) -> dict:
        """The options that were given, in canonical order."""
        out = {}
        for f in fields(self):
            if f.name in KEYS:
                v = getattr(self, f.name)
                if v is not None and not (f.name == "apply_chat_template" and v is False):
                    out[f.name] = v
        return out

    def __str__(self) -> str:
        parts = [_quote(self.source)]
        for key, v in self.options().items():
            kind = KEYS[key]
            if kind == "bool":
                parts.append(key if v else f"{key}=false")
            elif kind == "split":
                parts.append(f"{key}={_quote('+'.join(v))}")
            elif kind == "float>=0":
                parts.append(f"{key}={float(v)!r}")
            else:
                parts.append(f"{key}={_quote(str(v))}")
        return ":".join(parts)


@dataclass(frozen=True)
class DatasetSpec:
    sources: tuple[SourceSpec, ...]

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.sources)


def _quote(value: str) -> str:
    """``value`` as the parser reads it back: bare when it is safe, else double-quoted."""
    if value and not any(c in _SPECIAL or c == "\\" for c in value) and value[0] not in _WS and value[-1] not in _WS:
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_dataset_spec(spec: DatasetSpec | SourceSpec) -> str:
    return str(spec)


class _Parser:
    def __init__(self, text: str):
        self.s = text
        self.i = 0

    def error(self, message: str, pos: int | None = None):
        raise CalibrationSpecError(message, self.s, self.i if pos is None else pos)

    def skip_ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in _WS:
            self.i += 1

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def value(self, what: str) -> tuple[str, int]:
        """A quoted or bare value; returns (text, start position)."""
        self.skip_ws()
        start = self.i
        c = self.peek()
        if c in ("'", '"'):
            self.i += 1
            out = []
            while True:
                if self.i >= len(self.s):
                    self.error(f"the quote opened here is never closed; end {what} with {c}", start)
                ch = self.s[self.i]
                if ch == "\\" and self.i + 1 < len(self.s) and self.s[self.i + 1] in (c, "\\"):
                    out.append(self.s[self.i + 1])
                    self.i += 2
                elif ch == c:
                    self.i += 1
                    break
                else:
                    out.append(ch)
                    self.i += 1
            self.skip_ws()
            if self.peek() not in ("", ",", ":"):
                self.error(f"unexpected {self.peek()!r} after the quoted {what}; expected ',' or ':' or the end")
            return "".join(out), start
        while self.i < len(self.s) and self.s[self.i] not in _SPECIAL:
            self.i += 1
        raw = self.s[start : self.i]
        text = raw.rstrip(_WS)
        if self.peek() in ("'", '"'):
            self.error(f"a quote inside an unquoted value ({what}); quote the whole value instead")
        if self.peek() == "=":
            self.error(f"unexpected '=' in an unquoted value ({what}); quote a value that contains '='")
        if not text:
            if self.peek() == "":
                self.error(f"expected {what} here, found the end of the spec")
            self.error(f"expected {what} here, found {self.peek()!r}")
        return text, start

    def parse(self) -> DatasetSpec:
        items: list[tuple[str, int, dict, dict]] = []
        globals_: dict[str, tuple[object, int]] = {}
        while True:
            self.skip_ws()
            m = _KEY_RE.match(self.s, self.i)
            j = m.end() if m else self.i
            while j < len(self.s) and self.s[j] in _WS:
                j += 1
            if m and self.s[j : j + 1] == "=":  # a global option: key=value with no source
                key, kpos = self.option_key()
                if key in globals_:
                    self.error(f"global option {key!r} is given twice", kpos)
                self.skip_ws()
                self.i += 1  # the '='
                raw, vpos = self.value(f"the value of {key!r}")
                globals_[key] = (_convert(key, raw, self, vpos), kpos)
                self.skip_ws()
                if self.peek() == ":":
                    self.error("a global option (key=value with no source) takes no ':' options; "
                               "quote the source name if it contains '='")
            else:
                items.append(self.item())
            if self.peek() == ",":
                self.i += 1
                continue
            if self.peek() == "":
                break
            self.error(f"unexpected {self.peek()!r}")  # pragma: no cover - value() stops only at , : or end
        if not items:
            self.error("the spec names no source; write e.g. 'sotu:num=64' before global options", 0)
        for key, (value, kpos) in globals_.items():
            used = False
            for source, _, given, key_pos in items:
                if key in given or not _applies(key, source):
                    continue
                given[key] = value
                key_pos[key] = kpos
                used = True
            if not used:
                self.error(f"global option {key!r} applies to no source of this spec", kpos)
        out = []
        for source, pos, given, key_pos in items:
            _check_item(source, given, key_pos, self)
            out.append(SourceSpec(source=source, position=pos, key_positions=tuple(key_pos.items()), **given))
        return DatasetSpec(tuple(out))

    def option_key(self) -> tuple[str, int]:
        self.skip_ws()
        kpos = self.i
        m = _KEY_RE.match(self.s, self.i)
        if not m:
            found = repr(self.peek()) if self.peek() else "the end of the spec"
            self.error(f"expected an option name (one of {', '.join(KEYS)}), found {found}")
        key = m.group(0)
        self.i = m.end()
        if key not in KEYS:
            near = difflib.get_close_matches(key, list(KEYS), n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}? " if near else ""
            self.error(f"unknown option {key!r}; {hint}options are {', '.join(KEYS)}", kpos)
        return key, kpos

    def item(self) -> tuple[str, int, dict, dict]:
        source, pos = self.value("a source name or path")
        given: dict[str, object] = {}
        key_pos: dict[str, int] = {}
        while self.peek() == ":":
            self.i += 1
            key, kpos = self.option_key()
            if key in given:
                self.error(f"option {key!r} is given twice for source {source!r}", kpos)
            self.skip_ws()
            if self.peek() == "=":
                self.i += 1
                raw, vpos = self.value(f"the value of {key!r}")
                given[key] = _convert(key, raw, self, vpos)
            else:
                if KEYS[key] != "bool":
                    self.error(f"option {key!r} needs a value: write {key}=...", kpos)
                given[key] = True
            key_pos[key] = kpos
            self.skip_ws()
        if self.peek() not in ("", ","):  # pragma: no cover - value() stops only at , : or end
            self.error(f"unexpected {self.peek()!r}")
        return source, pos, given, key_pos


def _convert(key: str, raw: str, p: _Parser, pos: int):
    kind = KEYS[key]
    if kind.startswith("int"):
        if not _INT_RE.fullmatch(raw):
            p.error(f"{key} must be a whole number, got {raw!r}", pos)
        v = int(raw)
        lo = int(kind[-1])
        if v < lo:
            p.error(f"{key} must be at least {lo}, got {v}", pos)
        return v
    if kind == "float>=0":
        if not _FLOAT_RE.fullmatch(raw) or not math.isfinite(float(raw)):
            p.error(f"{key} must be a non-negative number, got {raw!r}", pos)
        return float(raw)
    if kind == "bool":
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        p.error(f"{key} must be true or false, got {raw!r}", pos)
    if kind == "split":
        parts = raw.split("+")
        offset = pos + (1 if p.s[pos : pos + 1] in ("'", '"') else 0)
        for part in parts:
            if not part:
                p.error(f"split has an empty part in {raw!r}; join split names with '+', e.g. train+validation", offset)
            offset += len(part) + 1
        return tuple(parts)
    return raw  # str


def _applies(key: str, source: str) -> bool:
    if source == SELF_SOURCE:
        return key not in NOT_FOR_SELF_KEYS
    return key not in SELF_ONLY_KEYS


def _check_item(source: str, given: dict, key_pos: dict, p: _Parser) -> None:
    for key in given:
        if not _applies(key, source):
            if source == SELF_SOURCE:
                p.error(f"option {key!r} does not apply to the 'self' source (it generates its own text)", key_pos[key])
            p.error(f"option {key!r} only applies to the 'self' source (text generated by the model)", key_pos[key])
    if "system_prompt" in given and not given.get("apply_chat_template"):
        p.error("system_prompt only applies with a chat template; add ':apply_chat_template'", key_pos["system_prompt"])


def parse_dataset_spec(text: str) -> DatasetSpec:
    """Parse a spec string such as ``"sotu:num=64,shakespeare"`` into a :class:`DatasetSpec`."""
    if not isinstance(text, str):
        raise CalibrationSpecError(f"a spec must be a string, got {type(text).__name__}", "", 0)
    return _Parser(text).parse()
