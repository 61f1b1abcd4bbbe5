"""The error every transform family reports, in one unit, so the solver can add them.

Replacing a site's weight W (as the out × in matrix of its linear map, rows × dim for tables)
by W − Δ costs, per use of the site:

- linear-like use with input second moment C: output error per row ``tr(Δ C Δᵀ)``;
- lookup use with counts c: mean squared row error ``Σ_t (c_t + 1)‖Δ_t‖² / Σ_t (c_t + 1)``.

With loss sensitivities (``SiteStats.sensitivity``: E‖∂L/∂y‖²/out per using module) the error
is the predicted loss increase ``Σ_uses ½ · sensitivity · output error`` (nats per token for a
language model). With calibration but no sensitivities it is the sum over uses of the relative
output error; without calibration, the relative weight error ‖Δ‖²/‖W‖². ``passes.lowrank``
computes the same quantity in closed form for every rank at once; its tests check it agrees
with this function.
"""

from __future__ import annotations

import torch

from cost_model.calibration import SiteStats
from ir import UseKind, WeightSite

__all__ = ["perturbation_error"]


def perturbation_error(site: WeightSite, stats: SiteStats | None, w: torch.Tensor, delta: torch.Tensor) -> float:
    """Error of replacing ``w`` by ``w − delta`` at ``site`` (both out × in, any float dtype).

    Args:
        site: the weight site.
        stats: its calibration statistics, or ``None`` for the data-free estimate.
        w: the original weight as a matrix (see the module docstring for the orientation).
        delta: the perturbation, same shape.
    """
    w, delta = w.double(), delta.double()
    if stats is None:
        return (delta.pow(2).sum() / w.pow(2).sum().clamp_min(1e-300)).item()
    parts: list[tuple[list, float, float]] = []
    linears = [u for u in site.uses if u.kind is not UseKind.EMBEDDING]
    lookups = [u for u in site.uses if u.kind is UseKind.EMBEDDING]
    if linears and stats.covariance is not None:
        c = stats.covariance
        parts.append((linears, ((delta @ c) * delta).sum().item(), ((w @ c) * w).sum().item()))
    if lookups and stats.token_counts is not None:
        d = (stats.token_counts + 1.0)[:, None]
        norm = d.sum().item()
        parts.append((lookups, (d * delta.pow(2)).sum().item() / norm, (d * w.pow(2)).sum().item() / norm))
    # Quadratic forms in a PSD covariance: clamp the rounding below zero of a ~0 perturbation.
    if stats.sensitivity:
        return max(0.0, sum(0.5 * sum(stats.sensitivity.get(u.module, 0.0) for u in uses) * err for uses, err, _ in parts))
    return max(0.0, sum(err / max(total, 1e-300) for _, err, total in parts))
