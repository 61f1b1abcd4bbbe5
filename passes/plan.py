"""A plan: the chosen config for every candidate weight, by canonical parameter name."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from passes.config import KeepConfig, TransformConfig, config_from_dict, config_to_dict

__all__ = ["Plan"]

_FORMAT = "decomp.plan/1"


@dataclass
class Plan:
    """Per-parameter choices, re-applicable with :func:`passes.apply`.

    Attributes:
        entries: canonical parameter name -> config (``KeepConfig`` where the weight stays dense).
        meta: free-form facts about how the plan was made (budget, transforms, calibration).
    """

    entries: dict[str, TransformConfig]
    meta: dict[str, Any] = field(default_factory=dict)

    def changed(self) -> dict[str, TransformConfig]:
        """The entries that rewrite something."""
        return {k: v for k, v in self.entries.items() if not isinstance(v, KeepConfig)}

    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "meta": self.meta, "entries": {k: config_to_dict(v) for k, v in self.entries.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if data.get("format") != _FORMAT:
            raise ValueError(f"not a decomp plan (format {data.get('format')!r}, expected {_FORMAT!r})")
        return cls({k: config_from_dict(v) for k, v in data["entries"].items()}, dict(data.get("meta", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_json(Path(path).read_text())
