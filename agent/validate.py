"""A small declarative validator for frozen, slotted config dataclasses.

A section is a `@dataclass(frozen=True, slots=True, kw_only=True)` subclass of `Section`. Its
annotations say what each key takes: `int`, `float`, `bool`, `str`, `Path`, `SecretStr`, a
`Literal[...]` of strings, `tuple[X, ...]`, another section, `X | None`, and
`Annotated[X, Rule(...)]` for bounds, lengths, a conversion before and a check after.
`build(cls, data)` turns plain TOML/JSON data into a section, rejecting unknown keys and naming
every problem with where it is (`Problem.loc`). The wording is pydantic's, which this replaced
and which the operators' messages were written around (tests/config_messages.json pins them).
A section built in code (`MqttSettings(port=1884)`, `dataclasses.replace`) runs only its
cross-field check: mypy checks the types of what code passes.

Values are converted as leniently as the TOML file and `EDGE_AGENT__...` variables need: "1884"
is a port, "yes" a boolean, 2.0 an integer; true/false is never a number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import operator
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin


class SecretStr:
    """A secret that never shows in a repr, a log line or `check-config` output."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"SecretStr({str(self)!r})"

    def __str__(self) -> str:
        """Masked; an empty secret shows as empty, as it hides nothing."""
        return "**********" if self._value else ""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretStr) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """What a field takes beyond its type: bounds (checked le, lt, ge, gt, so NaN fails the
    first), length bounds, `before` (raw value -> value, e.g. a size with units) and `check`
    (raises ValueError on a converted value it refuses)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    before: Callable[[object], object] | None = None
    check: Callable[[Any], None] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong, at `loc` (keys and list indexes) with the `value` given there."""

    loc: tuple[str | int, ...]
    kind: Literal["invalid", "missing", "unknown"]
    message: str
    value: object


class Invalid(Exception):
    """The data does not make the section; `problems` lists every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(f"{dotted(p.loc)}: {p.message}" for p in problems))
        self.problems = problems

    def under(self, key: str | int) -> list[Problem]:
        """The problems, located under `key`."""
        return [dataclasses.replace(p, loc=(key, *p.loc)) for p in self.problems]


def dotted(loc: tuple[str | int, ...]) -> str:
    """`('streams', 0, 'topic')` as 'streams[0].topic'; () as '(top level)'."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    return text.removeprefix(".") or "(top level)"


@dataclasses.dataclass(frozen=True, slots=True)
class Section:
    """Base of the config sections. `build` converts and checks each field of what it reads;
    the cross-field check runs at every construction, `dataclasses.replace` included. Code that
    builds a section directly is trusted with the field values, as mypy checks their types
    (the simulation uses a Receive Maximum of 3, below what an operator may configure)."""

    def __post_init__(self) -> None:
        problem = self.cross_check()
        if problem is not None:
            raise Invalid([Problem((), "invalid", problem, {})])

    def cross_check(self) -> str | None:
        """What is wrong across this section's fields, or None."""
        return None

    def dump(self) -> dict[str, Any]:
        """The fields as JSON-ready data: secrets masked, paths as text, tuples as lists."""
        return {f.name: _dumped(getattr(self, f.name)) for f in dataclasses.fields(self)}


S = TypeVar("S", bound=Section)


def build(cls: type[S], data: object) -> S:
    """A `cls` from plain data (a TOML table); raises Invalid naming every problem."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise Invalid(
            [_invalid(f"Input should be a valid dictionary or instance of {cls.__name__}", data)]
        )
    names = {f.name for f in dataclasses.fields(cls)}
    allowed = f"unknown key (allowed here: {', '.join(sorted(names))})"
    unknown = [Problem((key,), "unknown", allowed, data[key]) for key in data if key not in names]
    try:
        values = _field_values(cls, data)
    except Invalid as e:
        raise Invalid(e.problems + unknown) from None
    if unknown:
        raise Invalid(unknown)
    return cls(**values)  # runs the cross-field check, whose Invalid is at loc (): this table


def _field_values(cls: type[Section], data: Mapping[str, object]) -> dict[str, object]:
    """The fields of `cls` given in `data`, converted and checked, in field order."""
    values: dict[str, object] = {}
    problems: list[Problem] = []
    for name, (convert, required) in _converters(cls).items():
        if name not in data:
            if required:
                problems.append(Problem((name,), "missing", "required key is missing", None))
            continue
        try:
            values[name] = convert(data[name])
        except Invalid as e:
            problems += e.under(name)
    if problems:
        raise Invalid(problems)
    return values


Converter = Callable[[object], object]


_CONVERTERS: dict[type[Section], dict[str, tuple[Converter, bool]]] = {}


def _converters(cls: type[Section]) -> dict[str, tuple[Converter, bool]]:
    """Per field of `cls`: its converter and whether it is required (worked out once)."""
    if cls not in _CONVERTERS:
        _CONVERTERS[cls] = _field_converters(cls)
    return _CONVERTERS[cls]


def _field_converters(cls: type[Section]) -> dict[str, tuple[Converter, bool]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {
        f.name: (
            _converter(hints[f.name]),
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    }


def _converter(annotation: Any) -> Converter:
    """What converts and checks a raw value for a field of this annotation."""
    rule = Rule()
    if get_origin(annotation) is Annotated:
        annotation, *meta = get_args(annotation)
        rule = next(m for m in meta if isinstance(m, Rule))
    optional = False
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = (a for a in get_args(annotation) if a is not type(None))
        optional = True
    convert = _type_converter(annotation)
    numeric = annotation in (int, float)

    def checked(value: object) -> object:
        if optional and value is None:
            return None
        raw = value
        try:
            if numeric and isinstance(value, bool):
                raise ValueError("expected a number, not true/false")
            if rule.before is not None:
                value = rule.before(value)
            value = _bounded(convert(value), rule)
            if isinstance(value, float) and not math.isfinite(value):
                # After the bounds, whose message names the range (`timeout_s = inf`: "less
                # than or equal to 600"); a key bounded below only would take inf, and an
                # infinite backoff or timeout turns into a NaN delay later.
                raise ValueError("Input should be a finite number")
            if rule.check is not None:
                rule.check(value)
        except ValueError as e:
            raise Invalid([_invalid(str(e), raw)]) from None
        return value

    return checked


def _invalid(message: str, value: object) -> Problem:
    return Problem((), "invalid", message, value)


_BOUNDS: tuple[tuple[str, Callable[[float, float], bool], str], ...] = (
    ("le", operator.le, "less than or equal to"),
    ("lt", operator.lt, "less than"),
    ("ge", operator.ge, "greater than or equal to"),
    ("gt", operator.gt, "greater than"),
)


def _bounded(value: object, rule: Rule) -> object:
    if isinstance(value, int | float):
        for name, ok, words in _BOUNDS:
            bound = getattr(rule, name)
            if bound is not None and not ok(value, bound):
                raise ValueError(f"Input should be {words} {bound}")
    if isinstance(value, str | tuple):
        what, unit = ("String", "character") if isinstance(value, str) else ("Tuple", "item")
        extra = f" after validation, not {len(value)}" if isinstance(value, tuple) else ""
        if rule.min_length is not None and len(value) < rule.min_length:
            raise ValueError(f"{what} should have at least {_count(rule.min_length, unit)}{extra}")
        if rule.max_length is not None and len(value) > rule.max_length:
            raise ValueError(f"{what} should have at most {_count(rule.max_length, unit)}{extra}")
    return value


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


# Numbers convert within a 64-bit integer's range (as pydantic did, in its words).
_I64 = range(-(2**63), 2**63)
# "1884", " 1884 ", "+1_884" and "1884.00" are integers; "1.5" and "0x10" are not.
_INT_TEXT = re.compile(r"^\s*([+-]?[0-9][0-9_]*)(?:\.0+)?\s*$")


def _to_int(value: object) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("Input should be a finite number")
        if not value.is_integer():
            raise ValueError("Input should be a valid integer, got a number with a fractional part")
        if int(value) not in _I64:
            raise ValueError("Unable to parse input string as an integer, exceeded maximum size")
        return int(value)
    if isinstance(value, str):
        m = _INT_TEXT.match(value)
        if m is not None:
            with contextlib.suppress(ValueError):  # "1__8"
                return int(m.group(1))
        raise ValueError("Input should be a valid integer, unable to parse string as an integer")
    raise ValueError("Input should be a valid integer")


def _to_float(value: object) -> float:
    if isinstance(value, float):
        return value
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:  # 400 digits: past any bound, and the bounds say which
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        if value.isascii():  # float() reads other scripts' digits too
            with contextlib.suppress(ValueError):
                return float(value)
        raise ValueError("Input should be a valid number, unable to parse string as a number")
    raise ValueError("Input should be a valid number")


_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def _to_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if (isinstance(value, int) and value in _I64) or isinstance(value, str):
        text = str(value).lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ValueError("Input should be a valid boolean, unable to interpret input")
    raise ValueError("Input should be a valid boolean")


_NUL = "Input should not contain NUL (U+0000)"


def _to_str(value: object) -> str:
    """Text that goes on the wire as it is: MQTT forbids U+0000 in its strings (a broker drops
    the connection), and an `EDGE_AGENT__...` variable holding bytes that are not UTF-8 reads
    as lone surrogates, which no encoder takes."""
    if not isinstance(value, str):
        raise ValueError("Input should be a valid string")
    if "\0" in value:
        raise ValueError(_NUL)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("Input should be UTF-8 text (it holds bytes that are not UTF-8)") from None
    return value


def _to_path(value: object) -> Path:
    """A path; no NUL (no system call takes one). Bytes that are not UTF-8 are fine in a file
    name: Python hands them back to the system as they were."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise ValueError("Input is not a valid path for <class 'pathlib.Path'>")
    if "\0" in value:
        raise ValueError(_NUL)
    return Path(value)


def _to_secret(value: object) -> SecretStr:
    return value if isinstance(value, SecretStr) else SecretStr(_to_str(value))


def _to_literal(choices: tuple[str, ...], value: object) -> str:
    for choice in choices:
        if isinstance(value, str) and value == choice:
            return choice
    quoted = [repr(c) for c in choices]
    listed = f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else quoted[0]
    raise ValueError(f"Input should be {listed}")


def _to_tuple(item: Converter, value: object) -> tuple[object, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError("Input should be a valid tuple")
    items: list[object] = []
    problems: list[Problem] = []
    for i, raw in enumerate(value):
        try:
            items.append(item(raw))
        except Invalid as e:
            problems += e.under(i)
    if problems:
        raise Invalid(problems)
    return tuple(items)


_SIMPLE: dict[Any, Converter] = {
    int: _to_int,
    float: _to_float,
    bool: _to_bool,
    str: _to_str,
    Path: _to_path,
    SecretStr: _to_secret,
}


def _type_converter(annotation: Any) -> Converter:
    if annotation in _SIMPLE:
        return _SIMPLE[annotation]
    origin = get_origin(annotation)
    if origin is Literal:
        return functools.partial(_to_literal, get_args(annotation))
    if origin is tuple:
        item, _ = get_args(annotation)
        return functools.partial(_to_tuple, _converter(item))
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return functools.partial(build, annotation)
    raise TypeError(f"no converter for {annotation!r}")


def _dumped(value: object) -> object:
    if isinstance(value, Section):
        return value.dump()
    if isinstance(value, tuple):
        return [_dumped(v) for v in value]
    if isinstance(value, SecretStr | Path):
        return str(value)
    return value
