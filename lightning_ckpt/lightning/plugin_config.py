"""The plugins' config arguments (``config``, ``remote_config``, ``storage_options``): a dataclass or a plain dict
(YAML, Python), checked field by field by ``config_fields``."""

from __future__ import annotations

from typing import Any, Mapping

from lightning_ckpt.config import CheckpointerConfig
from lightning_ckpt.config_fields import ConfigTypeError, as_config
from lightning_ckpt.remote import RemoteConfig


def coerce_config(value: Any, where: str) -> CheckpointerConfig:
    """``value`` as a ``CheckpointerConfig``; a (nested) dict is built into one, every field type-checked.

    Raises:
        ValueError: an unknown field, a value of the wrong type (``ConfigTypeError``, a ``TypeError`` too) or out
            of range, named as ``<where>.<field>``.
    """
    return CheckpointerConfig() if value is None else _as(CheckpointerConfig, value, where)


def coerce_remote_config(value: Any, where: str) -> RemoteConfig:
    """``value`` as a ``RemoteConfig`` (None: the defaults; a dict from YAML is built into one), checked as
    ``coerce_config`` checks."""
    return RemoteConfig() if value is None else _as(RemoteConfig, value, where)


def coerce_storage_options(value: Any, where: str) -> dict[str, Any]:
    """``value`` (fsspec options) as a new dict; None gives an empty one.

    Raises:
        ConfigTypeError: not a mapping with str keys, named ``where``.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigTypeError(f"{where} must be a dict of fsspec options with str keys (endpoint_url, key, secret, "
                              f"client_kwargs, ...), got {type(value).__name__} {value!r}")
    return dict(value)


def _as(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, (cls, Mapping)):  # the plugins' own wording, kept for their users' scripts
        raise ConfigTypeError(f"{where} must be a {cls.__name__} or a dict, got {type(value).__name__} {value!r}")
    return as_config(cls, value, where)
