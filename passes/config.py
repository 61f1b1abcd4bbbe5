"""Transform configs: small frozen dataclasses, validated on construction, JSON-serialisable.

Every config class is registered by its class name so a plan can round-trip through JSON,
and each transform registers which config type it handles (``passes.transform``): dispatch
is on the config's type, never on a mode string.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["KeepConfig", "TransformConfig", "config_from_dict", "config_to_dict", "register_config"]

_CONFIG_TYPES: dict[str, type[TransformConfig]] = {}


@dataclass(frozen=True)
class TransformConfig:
    """Base class of all transform configs."""

    #: short label of the transform family, used in reports.
    family: ClassVar[str] = "?"

    def describe(self) -> str:
        """One short human-readable label of this choice, for reports."""
        fields = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.family}({fields})"


def register_config(cls: type[TransformConfig]) -> type[TransformConfig]:
    """Class decorator: make ``cls`` loadable from JSON by its name."""
    if cls.__name__ in _CONFIG_TYPES and _CONFIG_TYPES[cls.__name__] is not cls:
        raise ValueError(f"a different config class named {cls.__name__} is already registered")
    _CONFIG_TYPES[cls.__name__] = cls
    return cls


@register_config
@dataclass(frozen=True)
class KeepConfig(TransformConfig):
    """Keep the weight as it is. Lossless: error 0."""

    family: ClassVar[str] = "dense"

    def describe(self) -> str:
        return "dense"


def config_to_dict(config: TransformConfig) -> dict[str, Any]:
    """``{"type": <class name>, **fields}``."""
    return {"type": type(config).__name__, **dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]) -> TransformConfig:
    """Inverse of :func:`config_to_dict`.

    Raises:
        ValueError: unknown config type (lists the known ones) or bad fields.
    """
    data = dict(data)
    name = data.pop("type", None)
    cls = _CONFIG_TYPES.get(name)
    if cls is None:
        raise ValueError(f"unknown config type {name!r}; known: {sorted(_CONFIG_TYPES)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ValueError(f"bad fields for {name}: {exc}") from None
