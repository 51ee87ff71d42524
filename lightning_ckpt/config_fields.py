"""Config field checks, in one place: each value against its annotation and range, named ``Class.field``."""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import re
import threading
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Union


class ConfigTypeError(TypeError, ValueError):
    """A config value of the wrong type (a ``ValueError`` too: every bad config value is one here)."""


@dataclass(frozen=True)
class Range:
    """Bounds of a number (None: unbounded on that side); ``real``: any int or finite float is taken whatever the
    field's annotation (a duration in seconds is one, even where the seed annotates it ``int``)."""

    gt: float | None = None
    ge: float | None = None
    le: float | None = None
    real: bool = False

    def holds(self, value: float) -> bool:
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.le is None or value <= self.le))

    def __str__(self) -> str:
        parts = [f"> {self.gt:g}" if self.gt is not None else "", f">= {self.ge:g}" if self.ge is not None else "",
                 f"<= {self.le:.0f}" if self.le is not None else ""]
        return " and ".join(p for p in parts if p)


POSITIVE = Range(gt=0)
AT_LEAST_ONE = Range(ge=1)
TIMEOUT = Range(gt=0, le=threading.TIMEOUT_MAX, real=True)  # longer waits overflow threading's and selectors' timeouts


def check_fields(config: Any, ranges: Mapping[str, Range] | None = None) -> None:
    """Check every field of dataclass instance ``config`` against its annotation, then its range: ``ranges``, else
    the class's ``FIELD_RANGES`` (a ``ClassVar`` mapping field names to ``Range``).

    Bools must be real bools (not ``"no"``, not 1), ints not bools, numbers finite, nested dataclass fields instances.

    Raises:
        ConfigTypeError: a value of the wrong type, named ``Class.field`` with the value and what is expected.
        ValueError: a number out of its range, named the same way.
    """
    cls = type(config)
    hints = _hints(cls)
    ranges = _ranges(cls) if ranges is None else ranges
    for f in dataclasses.fields(cls):
        if f.init and f.name in hints:
            value = getattr(config, f.name)
            check_value(hints[f.name], value, f"{cls.__name__}.{f.name}", ranges.get(f.name))
            if dataclasses.is_dataclass(value):  # a nested config changed since it checked itself
                check_fields(value)


def check_value(tp: Any, value: Any, where: str, bounds: Range | None = None) -> None:
    """Check one value against annotation ``tp`` (and ``bounds`` for a number); see ``check_fields``."""
    real = bounds is not None and bounds.real
    if not (real and _is_real(value)) and not _matches(tp, value):
        expected = "a finite number (seconds)" if real else describe(tp)
        raise ConfigTypeError(f"{where} must be {expected}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # an int is finite (and may exceed a float)
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    if bounds is not None and _is_real(value) and not bounds.holds(value):
        raise ValueError(f"{where} must be {bounds}, got {value!r}")


def build_config(cls: type, mapping: Mapping, where: str) -> Any:
    """An instance of config dataclass ``cls`` from ``mapping`` (YAML, Python); nested config fields may be
    mappings too, ints are taken for floats. Each value is checked as ``check_value`` does, then ``cls`` runs its
    own checks.

    Raises:
        ConfigTypeError, ValueError: as ``check_fields``, prefixed with ``where`` (the argument that was given);
            an unknown key, naming the known ones.
    """
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(str(k) for k in mapping if k not in names)
    if unknown:
        raise ValueError(f"{where} has unknown keys, unknown field(s) {unknown}; {cls.__name__} takes {names}")
    kwargs, ranges = {}, _ranges(cls)
    for name, value in mapping.items():
        tp = hints.get(name, Any)
        value = _convert(tp, value, f"{where}.{name}")
        check_value(tp, value, f"{where}.{name}", ranges.get(name))
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise (ConfigTypeError if isinstance(e, TypeError) else ValueError)(f"{where}: {e}") from e


def as_config(cls: type, value: Any, where: str) -> Any:
    """``value`` as a ``cls``: an instance is checked (``check_fields``), a mapping built (``build_config``).

    Raises:
        ConfigTypeError: anything else, named ``where``.
    """
    if isinstance(value, cls):
        try:
            check_fields(value)
        except ValueError as e:  # ConfigTypeError too
            raise type(e)(f"{where}: {e}") from e
        return value
    if isinstance(value, Mapping):
        return build_config(cls, value, where)
    raise ConfigTypeError(f"{where} must be a {cls.__name__} or a dict of its fields, got "
                          f"{type(value).__name__} {value!r}")


def check_call_args(target: Callable, args: Mapping[str, Any], where: str,
                    ranges: Mapping[str, Range] | None = None) -> None:
    """Check ``args`` as keyword arguments of ``target`` (a class: its constructor): known names, values of the
    annotated types, numbers in ``ranges``.

    Raises:
        ConfigTypeError, ValueError: naming ``where[<name>]``, the value and what is expected (an unknown name:
            the names ``target`` takes).
    """
    if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
        raise ConfigTypeError(f"{where} must be a dict with str keys, got {type(args).__name__} {args!r}")
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # no signature to check against
        return
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    known = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(args) - set(known))
    if unknown and not takes_any:
        raise ValueError(f"{where} has unknown argument(s) {unknown}; {getattr(target, '__name__', target)} "
                         f"takes {known}")
    hints = _call_hints(target)  # annotations that do not resolve here: names are checked, types are not
    for name, value in args.items():
        check_value(hints.get(name, Any), value, f"{where}[{name!r}]", (ranges or {}).get(name))


def coerce_int_args(target: Callable, args: Mapping[str, Any], aliases: Mapping[str, str] | None = None) -> dict:
    """``args`` with the values of ``target``'s int parameters that are whole numbers of another type (a numpy
    int, a string of digits from YAML or the environment) turned into ints; anything else is left for
    ``check_call_args`` to refuse. ``aliases`` maps former argument names to ``target``'s."""
    hints = _call_hints(target)
    out = dict(args)
    for name, value in args.items():
        tp = hints.get((aliases or {}).get(name, name))
        takes_int = tp is not None and _matches(tp, 1) and not _matches(tp, 0.5)  # an int parameter, not a float
        if takes_int and not _matches(tp, value):
            whole = _whole_number(value)
            if whole is not None:
                out[name] = whole
    return out


def _call_hints(target: Callable) -> dict[str, Any]:
    """The parameter annotations of ``target`` (a class: its constructor's); {} where they do not resolve."""
    try:
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # noqa: BLE001 - a forward reference or a builtin without annotations
        return {}


def _whole_number(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,18}\s*", value):  # ASCII digits; int64 range
        return int(value)
    return None


def describe(tp: Any) -> str:
    """What annotation ``tp`` asks for, in words (``int``, ``float or None``, ``one of ['dir', 'file']``)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        return " or ".join(describe(o) for o in options if o is not type(None)) + \
            (" or None" if type(None) in options else "")
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    if dataclasses.is_dataclass(tp):
        return f"a {tp.__name__} (or a dict of its fields)"
    if (origin or tp) is dict:
        return "a dict with str keys"
    if tp is float:
        return "float (a finite number)"
    return getattr(tp, "__name__", str(tp))


def _matches(tp: Any, value: Any) -> bool:
    if tp is Any or isinstance(tp, typing.TypeVar):
        return True
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(option, value) for option in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp is type(None) or tp is None:
        return value is None
    base = origin or tp
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if isinstance(base, type):
        return isinstance(value, base)
    return True  # a form we do not check (a Protocol alias, a Callable): left to the component


def _convert(tp: Any, value: Any, where: str) -> Any:
    """A mapping for a nested config dataclass built into it; an int for a float widened; else unchanged."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        options = typing.get_args(tp)
        configs = [o for o in options if dataclasses.is_dataclass(o)]
        if len(configs) == 1 and isinstance(value, Mapping):
            return _convert(configs[0], value, where)
        return _convert(float, value, where) if float in options and int not in options else value
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return build_config(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _is_real(value: Any) -> bool:
    """An int or a float (numpy's float64 is one), not a bool: what every wait of the library takes as seconds
    (a Fraction, Decimal or numpy float32 is not: ``threading``'s waits refuse some of them)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ranges(cls: type) -> Mapping[str, Range]:
    return getattr(cls, "FIELD_RANGES", None) or {}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)
