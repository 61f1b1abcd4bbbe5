"""The optimisation report: what was chosen, what it stores, what it is estimated to cost."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from cost_model import format_bytes

__all__ = ["Report", "SiteReport"]


@dataclass
class SiteReport:
    """One weight site's outcome."""

    name: str
    shape: tuple[int, int]
    choice: str
    bytes_before: int
    bytes_after: int
    error: float


@dataclass
class Report:
    """Readable summary of an optimisation; ``str(report)`` prints it.

    Memory numbers are measured from the stored tensors (``cost_model.stored_bytes``); errors
    and latencies are the cost model's estimates.
    """

    model: str
    sites: list[SiteReport]
    skipped: list[tuple[str, str]]
    bytes_before: int
    bytes_after: int
    target_bytes: int
    solver: dict[str, Any]
    calibration: str
    error_units: str = "relative squared output error"
    latency: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    #: (site, transform, reason) for sites a requested transform could not take.
    excluded: list[tuple[str, str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        data = dict(data)
        data["sites"] = [SiteReport(**{**s, "shape": tuple(s["shape"])}) for s in data["sites"]]
        data["skipped"] = [tuple(x) for x in data["skipped"]]
        data["excluded"] = [tuple(x) for x in data.get("excluded", [])]
        return cls(**data)

    def groups(self) -> list[dict[str, Any]]:
        """Sites summarised by layer pattern (digits of the name replaced by ``*``)."""
        out: dict[str, dict[str, Any]] = {}
        for s in self.sites:
            key = re.sub(r"\.\d+\.", ".*.", s.name)
            g = out.setdefault(key, {"pattern": key, "count": 0, "changed": 0, "before": 0, "after": 0, "error": 0.0, "choices": {}})
            g["count"] += 1
            g["changed"] += s.choice != "dense"
            g["before"] += s.bytes_before
            g["after"] += s.bytes_after
            g["error"] += s.error
            g["choices"][s.choice] = g["choices"].get(s.choice, 0) + 1
        return list(out.values())

    def __str__(self) -> str:
        return self.to_text()

    def to_text(self) -> str:
        lines = [f"decomp report — {self.model}"]
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else float("nan")
        lines.append(
            f"memory (measured from stored tensors): {format_bytes(self.bytes_before)} -> "
            f"{format_bytes(self.bytes_after)} ({ratio:.3f}x; target {format_bytes(self.target_bytes)}, "
            f"{self.target_bytes / self.bytes_before:.3f}x)"
        )
        s = self.solver
        lines.append(
            f"solver: {s.get('status')} in {s.get('wall_time_s', 0):.2f}s, total estimated error "
            f"{s.get('objective', 0):.4g} (bound {s.get('bound', 0):.4g}) over {len(self.sites)} sites"
        )
        lines.append(f"calibration: {self.calibration}")
        lines.append(f"est. err = {self.error_units}, summed over each group")
        if self.latency:
            lat = self.latency
            lines.append(
                f"estimated latency of the rewritten layers on {lat['profile']} at {lat['rows']} rows: "
                f"{lat['before_s'] * 1e3:.3f} ms -> {lat['after_s'] * 1e3:.3f} ms"
            )
        lines.append("")
        header = f"{'layer pattern':<44} {'n':>4} {'changed':>7} {'bytes before':>13} {'bytes after':>13} {'est. err':>9}  choices"
        lines += [header, "-" * len(header)]
        for g in self.groups():
            top = sorted(g["choices"].items(), key=lambda kv: -kv[1])
            choices = ", ".join(f"{c} ×{n}" for c, n in top[:3]) + (f", +{len(top) - 3} more" if len(top) > 3 else "")
            lines.append(
                f"{g['pattern']:<44} {g['count']:>4} {g['changed']:>7} {format_bytes(g['before']):>13} "
                f"{format_bytes(g['after']):>13} {g['error']:>9.4f}  {choices}"
            )
        if self.skipped:
            lines.append("")
            lines.append(f"not rewritable ({len(self.skipped)}):")
            lines += [f"  {name}: {reason}" for name, reason in self.skipped[:20]]
            if len(self.skipped) > 20:
                lines.append(f"  ... and {len(self.skipped) - 20} more")
        if self.excluded:
            by_reason: dict[tuple[str, str], list[str]] = {}
            for site, transform, reason in self.excluded:
                by_reason.setdefault((transform, reason), []).append(site)
            lines.append("")
            lines.append(f"no options from a requested transform ({len(self.excluded)} site-transform pairs):")
            for (transform, reason), names in by_reason.items():
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                lines.append(f"  {transform}: {', '.join(names[:3])}{more}: {reason}")
        if self.metrics:
            lines.append("")
            for metric, values in self.metrics.items():
                lines.append(f"{metric}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        if self.timings:
            lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        return "\n".join(lines)
