"""Calibration statistics: what the activation-aware error estimates are computed from.

For every weight site, one forward pass over the calibration batches accumulates either
the second moment of the layer's input, ``C = XᵀX / rows`` (fp64), or, for a table used
only by lookups, how often each row was looked up. Sites whose ops read the same
activation (q/k/v, gate/up) share one accumulator, found on the graph by
``ir.shared_input_groups``, so the shared covariance is computed once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ir import UseKind, WeightSite, shared_input_groups, split_inputs

__all__ = ["SiteStats", "CalibrationError", "check_calibration", "collect_statistics"]


class CalibrationError(ValueError):
    """Calibration batches do not fit the model or its example inputs."""


@dataclass
class SiteStats:
    """Calibration statistics of one site.

    Attributes:
        covariance: ``XᵀX / rows`` of the input of the site's first non-lookup use, (in, in)
            fp64; ``None`` for lookup-only tables. Shared (same object) between sites that read
            the same activation.
        token_counts: lookups per row, fp64, for lookup-only tables; else ``None``.
        rows: activation rows (or lookups) accumulated.
    """

    covariance: torch.Tensor | None
    token_counts: torch.Tensor | None
    rows: int


def _describe(tree: Any) -> list[tuple[str, torch.dtype | None, int | None]]:
    leaves, _ = torch.utils._pytree.tree_flatten(tree)
    return [(type(x).__name__, getattr(x, "dtype", None), getattr(x, "dim", lambda: None)()) for x in leaves]


def check_calibration(example_inputs: Any, batches: Sequence[Any]) -> None:
    """Check, before any heavy work, that every batch has the example inputs' form.

    Same nesting, same leaf types, same dtypes and the same number of dimensions; sizes
    may differ (batch, sequence length).

    Raises:
        CalibrationError: naming the first batch that differs and how.
    """
    if len(batches) == 0:
        raise CalibrationError("calibration is empty; pass at least one batch, or None for the data-free estimate")
    want_args, want_kwargs = split_inputs(example_inputs)
    want = _describe((want_args, want_kwargs))
    for i, batch in enumerate(batches):
        try:
            args, kwargs = split_inputs(batch)
        except TypeError as exc:
            raise CalibrationError(f"calibration batch {i}: {exc}") from None
        if set(kwargs) != set(want_kwargs):
            raise CalibrationError(
                f"calibration batch {i} has keyword inputs {sorted(kwargs)}, example_inputs has {sorted(want_kwargs)}"
            )
        got = _describe((args, {k: kwargs[k] for k in want_kwargs}))
        if got != want:
            raise CalibrationError(
                f"calibration batch {i} does not match example_inputs: got (type, dtype, ndim) {got}, expected {want}"
            )


def _rows_of(x: torch.Tensor, kind: UseKind) -> torch.Tensor:
    if kind is UseKind.CONV1X1:  # (B, C, H, W) -> (B·H·W, C)
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def collect_statistics(
    model: nn.Module, sites: Sequence[WeightSite], batches: Iterable[Any], *, progress: bool = True
) -> dict[str, SiteStats]:
    """Run ``model`` over ``batches`` and accumulate each site's statistics.

    Args:
        model: the model the sites were found on (hooks are added and removed; nothing else
            about it changes).
        sites: weight sites from :func:`ir.find_weight_sites`.
        batches: calibration batches in the form of the example inputs.
        progress: show a progress bar.

    Returns:
        Site name -> statistics.
    """
    primary = {}
    for site in sites:
        dense_uses = [u for u in site.uses if u.kind is not UseKind.EMBEDDING]
        primary[site.name] = dense_uses[0] if dense_uses else site.uses[0]
    groups = shared_input_groups({name: use.input_node for name, use in primary.items()})
    leader_of = {name: group[0] for group in groups for name in group}

    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook_for(name: str, kind: UseKind, size: int):
        def hook(_module, inputs):
            x = inputs[0]
            if kind is UseKind.EMBEDDING:
                counts = torch.bincount(x.reshape(-1).cpu(), minlength=size).double()
                sums[name] = sums[name] + counts if name in sums else counts
                rows[name] = rows.get(name, 0) + x.numel()
                return
            flat = _rows_of(x.detach(), kind).float()
            # fp32 per batch is exact enough for one batch; the running sum is kept in fp64.
            second = (flat.T @ flat).double().cpu()
            sums[name] = sums[name] + second if name in sums else second
            rows[name] = rows.get(name, 0) + flat.shape[0]

        return hook

    handles = []
    site_by_name = {s.name: s for s in sites}
    for name, use in primary.items():
        if leader_of[name] != name:
            continue
        size = site_by_name[name].shape[0]
        module = model.get_submodule(use.module)
        handles.append(module.register_forward_pre_hook(hook_for(name, use.kind, size)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(tqdm(list(batches), desc="calibration", unit="batch", disable=not progress)):
                args, kwargs = split_inputs(batch)
                try:
                    model(*args, **kwargs)
                except Exception as exc:  # any failure here means the batch does not fit the model
                    raise CalibrationError(
                        f"calibration batch {i} does not run through {type(model).__name__}: {type(exc).__name__}: {exc}"
                    ) from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    stats: dict[str, SiteStats] = {}
    shared: dict[str, SiteStats] = {}
    for name, use in primary.items():
        leader = leader_of[name]
        if leader not in sums:
            raise CalibrationError(f"calibration never reached {use.module} (site {name}); is that module unused?")
        if leader not in shared:
            n = rows[leader]
            if use.kind is UseKind.EMBEDDING:
                shared[leader] = SiteStats(None, sums[leader], n)
            else:
                shared[leader] = SiteStats(sums[leader] / n, None, n)
        stats[name] = shared[leader]
    return stats
