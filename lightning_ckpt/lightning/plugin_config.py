"""The plugins' ``config`` argument: a ``CheckpointerConfig`` or a plain dict (YAML, Python), checked field by field."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, Union

from lightning_ckpt.config import CheckpointerConfig


def coerce_config(value: Any, where: str) -> CheckpointerConfig:
    """``value`` as a ``CheckpointerConfig``; a (nested) dict is built into one, every field type-checked.

    Raises:
        ValueError: an unknown field, a value of the wrong type or out of range, named as ``<where>.<field>``.
    """
    if value is None:
        return CheckpointerConfig()
    if isinstance(value, CheckpointerConfig):
        return value
    if isinstance(value, Mapping):
        return build_dataclass(CheckpointerConfig, value, where)
    raise ValueError(f"{where} must be a CheckpointerConfig or a dict, got {type(value).__name__} {value!r}")


def build_dataclass(cls: type, mapping: Mapping, where: str) -> Any:
    """An instance of dataclass ``cls`` from ``mapping`` (nested dataclass fields may be dicts too)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(str(k) for k in mapping if k not in names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; {cls.__name__} has {names}")
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in mapping.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if tp is Any:
        return value
    if typing.get_origin(tp) in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {options}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return build_dataclass(tp, value, where)
        raise ValueError(f"{where} must be a {tp.__name__} or a dict, got {value!r}")
    base = typing.get_origin(tp) or tp
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(base, type) and (not isinstance(value, base) or (base is int and isinstance(value, bool))):
        raise ValueError(f"{where} must be {_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))
