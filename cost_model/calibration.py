"""Calibration statistics: what the activation-aware error estimates are computed from.

For every weight site, one forward pass over the calibration batches accumulates either
the second moment of the layer's input, ``C = XᵀX / rows`` (fp64), or, for a table used
only by lookups, how often each row was looked up. Linear-like inputs also get their
per-feature absolute maximum and a small sample of rows (for LLM.int8()-style pricing).
Sites whose ops read the same activation (q/k/v, gate/up) share one accumulator, found on
the graph by ``ir.shared_input_groups``, so the shared statistics are computed once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ir import UseKind, WeightSite, WeightUse, shared_input_groups, split_inputs

__all__ = ["INPUT_SAMPLE_ROWS", "CalibrationError", "SiteStats", "calibration_loss", "check_calibration", "collect_statistics"]

#: Rows of each linear-like input kept in ``SiteStats.input_sample``: random rows, spread evenly
#: over the calibration batches (a per-token quantity with a heavy tail: on SmolLM2's inputs,
#: 256 rows give its mean within ±10%, 128 within ±25%).
INPUT_SAMPLE_ROWS = 256
_FP16_MAX = 65504.0


class CalibrationError(ValueError):
    """Calibration batches do not fit the model or its example inputs."""


@dataclass
class SiteStats:
    """Calibration statistics of one site.

    Attributes:
        covariance: ``XᵀX / rows`` of the input of the site's first linear-like use, (in, in)
            fp64; ``None`` for lookup-only tables. Shared (same tensor) between sites that read
            the same activation.
        token_counts: lookups per row (fp64) of the site's first lookup use, else ``None``.
        rows: activation rows accumulated for the covariance (lookups for a lookup-only table).
        sensitivity: per using module, the mean squared gradient of the calibration loss with
            respect to one coordinate of that module's output, ``E‖∂L/∂y‖² / out_dim`` — the
            diagonal-Fisher scale that turns an output error into a predicted loss increase.
            Empty when sensitivities were not collected.
        input_absmax: per input feature, ``max |x_j|`` over every calibration row of the same
            input as ``covariance`` (in,) fp32 (LLM.int8() outlier features); shared like it.
        input_sample: up to :data:`INPUT_SAMPLE_ROWS` rows of that input, drawn at random
            (seeded) evenly over the batches, stored as fp16 (clamped to ±65504), to simulate
            activation quantization on; shared like it.
    """

    covariance: torch.Tensor | None
    token_counts: torch.Tensor | None
    rows: int
    sensitivity: dict[str, float] = field(default_factory=dict)
    input_absmax: torch.Tensor | None = None
    input_sample: torch.Tensor | None = None


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


def calibration_loss(output: Any, args: tuple, kwargs: dict, generator: torch.Generator) -> torch.Tensor:
    """The scalar whose gradients define the sensitivities.

    A language model (an output with ``.logits`` and integer ``input_ids``) gets its own
    next-token cross-entropy, summed over tokens (the empirical Fisher). Any other model gets
    a random projection ``⟨r, y⟩`` of its first output tensor, r ~ N(0, I): its squared
    gradient, averaged over r, measures how a perturbation shows up in the output itself.
    """
    logits = getattr(output, "logits", None)
    ids = kwargs.get("input_ids", args[0] if args else None)
    if logits is not None and isinstance(ids, torch.Tensor) and not ids.is_floating_point() and logits.dim() == 3:
        shift = logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(
            shift.reshape(-1, shift.shape[-1]), ids[:, 1:].reshape(-1).to(shift.device), reduction="sum"
        )
    first = next(t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point())
    r = torch.randn(first.shape, generator=generator, dtype=torch.float32).to(first.device)
    return (first.float() * r).sum()


def collect_statistics(
    model: nn.Module,
    sites: Sequence[WeightSite],
    batches: Iterable[Any],
    *,
    progress: bool = True,
    sensitivity_batches: int = 2,
) -> dict[str, SiteStats]:
    """Run ``model`` over ``batches`` and accumulate each site's statistics.

    Args:
        model: the model the sites were found on (hooks are added and removed, parameters'
            ``requires_grad`` flags are restored; nothing else about it changes).
        sites: weight sites from :func:`ir.find_weight_sites`.
        batches: calibration batches in the form of the example inputs.
        progress: show a progress bar.
        sensitivity_batches: how many of the first batches also run a backward pass for the
            sensitivities (0: none; the estimates are then relative output errors).

    Returns:
        Site name -> statistics.
    """
    batches = list(batches)
    cov_uses: dict[str, WeightUse] = {}  # site -> the linear-like use whose input is measured
    count_uses: dict[str, WeightUse] = {}  # site -> the lookup use whose ids are counted
    for site in sites:
        for use in site.uses:
            target = count_uses if use.kind is UseKind.EMBEDDING else cov_uses
            target.setdefault(site.name, use)
    groups = shared_input_groups({name: use.input_node for name, use in cov_uses.items()})
    leader_of = {name: group[0] for group in groups for name in group}
    site_by_name = {s.name: s for s in sites}

    sums: dict[tuple[str, str], torch.Tensor] = {}
    rows: dict[tuple[str, str], int] = {}
    absmax: dict[str, torch.Tensor] = {}  # leader site -> running max |x| per input feature
    samples: dict[str, list[torch.Tensor]] = {}  # leader site -> sampled input rows
    per_call = -(-INPUT_SAMPLE_ROWS // max(len(batches), 1))
    sampler = torch.Generator().manual_seed(0)  # its own stream: calibration_loss's stays as it was

    def add(key, value, n):
        sums[key] = sums[key] + value if key in sums else value
        rows[key] = rows.get(key, 0) + n

    def cov_hook(name: str, kind: UseKind):
        def hook(_module, inputs):
            flat = _rows_of(inputs[0].detach(), kind).float()
            # fp32 per batch is exact enough for one batch; the running sum is kept in fp64.
            add(("cov", name), (flat.T @ flat).double().cpu(), flat.shape[0])
            amax = flat.abs().amax(0).cpu()
            absmax[name] = torch.maximum(absmax[name], amax) if name in absmax else amax
            taken = sum(len(x) for x in samples.setdefault(name, []))
            if taken < INPUT_SAMPLE_ROWS:  # random rows, not strided: a stride can alias the sequence length
                k = min(per_call, INPUT_SAMPLE_ROWS - taken, flat.shape[0])
                pick = torch.randperm(flat.shape[0], generator=sampler)[:k].to(flat.device)
                samples[name].append(flat[pick].clamp(-_FP16_MAX, _FP16_MAX).half().cpu())

        return hook

    def count_hook(name: str, size: int):
        def hook(_module, inputs):
            ids = inputs[0].reshape(-1).cpu()
            add(("count", name), torch.bincount(ids, minlength=size).double(), ids.numel())

        return hook

    outputs: dict[str, torch.Tensor] = {}

    def output_hook(path: str):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                outputs[path] = output

        return hook

    handles = []
    for name, use in cov_uses.items():
        if leader_of[name] == name:
            handles.append(model.get_submodule(use.module).register_forward_pre_hook(cov_hook(name, use.kind)))
    for name, use in count_uses.items():
        module = model.get_submodule(use.module)
        handles.append(module.register_forward_pre_hook(count_hook(name, site_by_name[name].shape[0])))
    use_paths = sorted({u.module for s in sites for u in s.uses})
    for path in use_paths:
        handles.append(model.get_submodule(path).register_forward_hook(output_hook(path)))

    grad_sq: dict[str, float] = {}
    grad_rows: dict[str, int] = {}
    generator = torch.Generator().manual_seed(0)
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(tqdm(batches, desc="calibration", unit="batch", disable=not progress)):
            args, kwargs = split_inputs(batch)
            backward = i < sensitivity_batches
            outputs.clear()
            if backward:
                for p in flags:  # gradients must flow through the graph; only outputs' grads are taken
                    p.requires_grad_(True)
            try:
                with torch.set_grad_enabled(backward):
                    out = model(*args, **kwargs)
                    if backward:
                        loss = calibration_loss(out, args, kwargs, generator)
                        paths = list(outputs)
                        grads = torch.autograd.grad(loss, [outputs[p] for p in paths], allow_unused=True)
                        for path, g in zip(paths, grads):
                            if g is not None:
                                flat = g.detach().reshape(-1, g.shape[-1]) if g.dim() != 4 else g.detach().movedim(1, -1).reshape(-1, g.shape[1])
                                grad_sq[path] = grad_sq.get(path, 0.0) + flat.double().pow(2).sum().item()
                                grad_rows[path] = grad_rows.get(path, 0) + flat.numel()
            except Exception as exc:  # any failure here means the batch does not fit the model
                raise CalibrationError(
                    f"calibration batch {i} does not run through {type(model).__name__}: {type(exc).__name__}: {exc}"
                ) from exc
            finally:
                outputs.clear()
                for p, flag in flags.items():
                    p.requires_grad_(flag)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    stats: dict[str, SiteStats] = {}
    covariances: dict[str, torch.Tensor] = {}
    sample_of = {name: torch.cat(rows_taken) for name, rows_taken in samples.items()}
    for site in sites:
        name = site.name
        covariance = counts = input_absmax = input_sample = None
        n = 0
        if name in cov_uses:
            key = ("cov", leader_of[name])
            if key not in sums:
                raise CalibrationError(f"calibration never reached {cov_uses[name].module} (site {name}); is it unused?")
            if key not in covariances:
                covariances[key] = sums[key] / rows[key]
            covariance, n = covariances[key], rows[key]
            input_absmax, input_sample = absmax[leader_of[name]], sample_of[leader_of[name]]
        if name in count_uses:
            key = ("count", name)
            if key not in sums:
                raise CalibrationError(f"calibration never reached {count_uses[name].module} (site {name}); is it unused?")
            counts = sums[key]
            n = n or rows[key]
        sensitivity = {u.module: grad_sq[u.module] / grad_rows[u.module] for u in site.uses if u.module in grad_sq}
        stats[name] = SiteStats(covariance, counts, n, sensitivity, input_absmax, input_sample)
    return stats
