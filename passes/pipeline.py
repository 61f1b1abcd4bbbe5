"""The pipeline: capture → calibrate → enumerate options → solve → rewrite, and its replays.

``optimize`` is the one straight list of named steps; ``apply`` replays a plan without
solving; ``save``/``load`` write and restore an optimized model without recomputing it.
The user's model is never modified: rewrites happen on a deep copy.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cost_model import check_calibration, collect_statistics, dense_cost, get_profile, roofline_seconds, stored_bytes
from ir import WeightSite, capture, find_weight_sites, sites_from_modules, split_inputs
from passes import blockdiag as _blockdiag  # noqa: F401
from passes import gptq as _gptq  # noqa: F401
from passes import kronecker as _kronecker  # noqa: F401
from passes import lowrank as _lowrank  # noqa: F401  (registers the "lowrank" transform)
from passes import lq as _lq  # noqa: F401
from passes import monarch as _monarch  # noqa: F401
from passes import quantize as _quantize  # noqa: F401
from passes.config import KeepConfig
from passes.plan import Plan
from passes.report import Report, SiteReport
from passes.transform import Candidate, Workspace, get_transform, transform_for

__all__ = ["DEFAULT_TRANSFORMS", "RewriteError", "apply", "load", "optimize", "resolve_target_memory", "save"]

DEFAULT_TRANSFORMS: tuple[str, ...] = ("lowrank", "quantize", "lq")


class RewriteError(RuntimeError):
    """A rewrite failed or produced a model that no longer runs like the original."""


def resolve_target_memory(target_memory: Any, original_bytes: int) -> int:
    """Turn ``target_memory`` into bytes.

    Accepted: a float in (0, 1] (fraction of the original parameter + buffer bytes) or an int
    number of bytes in [1, original bytes].

    Raises:
        ValueError: anything else, saying what is accepted.
    """
    accepted = (
        f"target_memory must be a float in (0, 1] (fraction of the model's {original_bytes} stored bytes) "
        f"or an int number of bytes in [1, {original_bytes}]"
    )
    if isinstance(target_memory, bool) or not isinstance(target_memory, numbers.Real):
        raise ValueError(f"{accepted}; got {type(target_memory).__name__} {target_memory!r}")
    if isinstance(target_memory, numbers.Integral):
        if not 1 <= int(target_memory) <= original_bytes:
            raise ValueError(f"{accepted}; got {target_memory}")
        return int(target_memory)
    value = float(target_memory)
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"{accepted}; got {target_memory!r}")
    return int(value * original_bytes)


def _check_finite(model: nn.Module) -> None:
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = (~torch.isfinite(tensor)).sum().item()
            raise ValueError(f"{name} has {bad} NaN/Inf values; fix or reload the weights before optimizing")


def _enumerate_options(
    model: nn.Module, sites: Sequence[WeightSite], transforms: Sequence[str], ws: Workspace, progress: bool
) -> dict[str, list[Candidate]]:
    families = [get_transform(name) for name in transforms]
    options = {}
    for site in tqdm(sites, desc="options", unit="site", disable=not progress):
        keep = Candidate(KeepConfig(), site.nbytes, 0.0, dense_cost(site))
        options[site.name] = [keep] + [c for t in families for c in t.candidates(site, model, ws)]
    return options


def _rewrite(model: nn.Module, sites: Sequence[WeightSite], plan: Plan, ws: Workspace, progress: bool) -> nn.Module:
    todo = [s for s in sites if not isinstance(plan.entries.get(s.name, KeepConfig()), KeepConfig)]
    for site in tqdm(todo, desc="rewrite", unit="site", disable=not progress):
        config = plan.entries[site.name]
        try:
            transform_for(config).rewrite(model, site, config, ws)
        except Exception as exc:
            raise RewriteError(f"rewriting {site.name} with {config.describe()} failed: {exc}") from exc
    return model


def _check_runs(model: nn.Module, rewritten: nn.Module, example_inputs: Any) -> None:
    """The one post-rewrite check: the rewritten model runs and gives outputs of the same shapes."""
    args, kwargs = split_inputs(example_inputs)

    def shapes(out: Any) -> list[tuple[int, ...]]:
        return [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]

    with torch.no_grad():
        want = shapes(model(*args, **kwargs))
        try:
            got = shapes(rewritten(*args, **kwargs))
        except Exception as exc:
            raise RewriteError(f"the rewritten model no longer runs on the example inputs: {exc}") from exc
    if want != got:
        raise RewriteError(f"the rewritten model's outputs changed shape: {got} instead of {want}")


def optimize(
    model: nn.Module,
    example_inputs: Any,
    *,
    target_memory: float | int,
    calibration: Iterable[Any] | None = None,
    transforms: Sequence[str] = DEFAULT_TRANSFORMS,
    target_latency: float | None = None,
    device: str = "cpu",
    time_limit_s: float = 10.0,
    progress: bool = True,
) -> nn.Module:
    """Compress ``model`` to ``target_memory`` with the least estimated error.

    The model is not modified; a rewritten deep copy is returned, with ``.plan`` (a
    :class:`Plan`) and ``.report`` (a :class:`Report`) attached.

    Args:
        model: any module that runs on ``example_inputs``.
        example_inputs: positional inputs (tuple/list/tensor) or keyword inputs (dict).
        target_memory: float in (0, 1], fraction of the model's stored parameter + buffer
            bytes, or int bytes. The result stores at most this.
        calibration: batches in the form of ``example_inputs``. With them the error estimates
            are activation-aware; without, data-free (weight-space).
        transforms: transform names to consider (see ``passes.TRANSFORMS``).
        target_latency: optional float in (0, 1]: the rewritten layers' estimated latency on
            ``device`` at the example inputs' size, as a fraction of their dense latency.
        device: device profile for latency estimates (``"cpu"``, ``"h100"``).
        time_limit_s: solver time limit.
        progress: show progress bars.

    Raises:
        ValueError: bad ``target_memory``/``target_latency``, NaN/Inf weights, unknown transform.
        cost_model.solver.InfeasibleBudgetError: the budget is below the smallest plan (named).
        cost_model.CalibrationError: calibration batches that do not fit the model.
        ir.CaptureError: the model cannot be captured (names the module).
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[step] = timings.get(step, 0.0) + now - clock
        clock = now

    bytes_before = stored_bytes(model)
    target_bytes = resolve_target_memory(target_memory, bytes_before)
    _check_target_latency(target_latency)
    for name in transforms:
        get_transform(name)
    profile = get_profile(device)
    batches = list(calibration) if calibration is not None else None
    if batches is not None:
        check_calibration(example_inputs, batches)
    _check_finite(model)

    sites, skipped = find_weight_sites(capture(model, example_inputs), model)
    lap("capture")
    ws = Workspace(stats=collect_statistics(model, sites, batches, progress=progress) if batches else None)
    lap("calibration")
    options = _enumerate_options(model, sites, transforms, ws, progress)
    lap("options")
    latency = {name: [int(roofline_seconds(c.cost, profile) * 1e9) for c in cands] for name, cands in options.items()}
    fixed = bytes_before - sum(s.nbytes for s in sites)
    solution = _solve(options, latency, target_bytes, target_latency, fixed_bytes=fixed, time_limit_s=time_limit_s)
    chosen = {name: options[name][i] for name, i in solution.choice.items()}
    plan = Plan(
        {name: c.config for name, c in chosen.items()},
        {
            "model": type(model).__name__,
            "target_bytes": target_bytes,
            "transforms": list(transforms),
            "calibration_rows": next(iter(ws.stats.values())).rows if ws.stats else 0,
        },
    )
    lap("solve")
    optimized = _rewrite(copy.deepcopy(model), sites, plan, ws, progress)
    _check_runs(model, optimized, example_inputs)
    lap("rewrite")

    optimized.plan = plan
    optimized.report = Report(
        model=type(model).__name__,
        sites=[
            SiteReport(
                s.name,
                s.matrix_shape,
                chosen[s.name].config.describe(),
                s.nbytes,
                chosen[s.name].nbytes,
                chosen[s.name].error,
            )
            for s in sites
        ],
        skipped=[(p.name, p.reason) for p in skipped],
        excluded=list(ws.excluded),
        bytes_before=bytes_before,
        bytes_after=stored_bytes(optimized),
        target_bytes=target_bytes,
        solver={
            "status": solution.status,
            "objective": solution.objective,
            "bound": solution.bound,
            "wall_time_s": solution.wall_time_s,
            "options": sum(len(c) for c in options.values()),
        },
        calibration=(
            f"{len(batches)} batches, {plan.meta['calibration_rows']} rows per layer (activation-aware estimates)"
            if batches
            else "none (data-free weight-space estimates)"
        ),
        error_units=(
            "predicted loss increase (nats per token for a language model; Fisher-weighted output error)"
            if ws.stats and any(st.sensitivity for st in ws.stats.values())
            else "relative squared error (data-free: weight space)"
        ),
        latency={
            "profile": profile.name,
            "rows": max((s.rows for s in sites), default=0),
            "before_s": sum(lat[0] for lat in latency.values()) * 1e-9,
            "after_s": sum(latency[name][i] for name, i in solution.choice.items()) * 1e-9,
        },
        timings=timings,
    )
    return optimized


def _check_target_latency(target_latency: Any) -> None:
    if target_latency is None:
        return
    if (
        isinstance(target_latency, bool)
        or not isinstance(target_latency, numbers.Real)
        or math.isnan(target_latency)
        or not 0 < target_latency <= 1
    ):
        raise ValueError(f"target_latency must be None or a float in (0, 1], got {target_latency!r}")


def _solve(options, latency, target_bytes, target_latency, *, fixed_bytes, time_limit_s):
    """One option per site: memory row always, latency row when asked; errors in user terms."""
    from cost_model.solver import InfeasibleBudgetError, Option, solve  # imports OR-Tools only when it runs

    latency_dense_ns = sum(lat[0] for lat in latency.values())
    budgets = {"memory": target_bytes}
    if target_latency is not None:
        budgets["latency_ns"] = int(target_latency * latency_dense_ns)
    problem = {
        name: [
            Option(c.config, c.error, {"memory": c.nbytes, "latency_ns": latency[name][i]}) for i, c in enumerate(cands)
        ]
        for name, cands in options.items()
    }
    try:
        return solve(problem, budgets, fixed={"memory": fixed_bytes}, time_limit_s=time_limit_s)
    except InfeasibleBudgetError as exc:
        if exc.row == "latency_ns":
            least = math.ceil(exc.minimum / latency_dense_ns * 1000) / 1000
            message = (
                f"target_latency of {exc.budget / latency_dense_ns:.3f} is infeasible: the fastest plan with these "
                f"transforms is estimated at {exc.minimum / latency_dense_ns:.3f} of the dense latency; raise "
                f"target_latency to at least {least}"
            )
        elif exc.row == "memory":
            message = (
                f"target_memory of {exc.budget} bytes is infeasible: the smallest plan with these transforms stores "
                f"{exc.minimum} bytes ({exc.minimum / 2**20:.2f} MiB); raise target_memory to at least {exc.minimum}"
            )
        else:
            raise
        raise InfeasibleBudgetError(
            message, row=exc.row, budget=exc.budget, minimum=exc.minimum, minimums=exc.minimums
        ) from None


def apply(
    model: nn.Module, plan: Plan, *, calibration: Iterable[Any] | None = None, progress: bool = True
) -> nn.Module:
    """Rewrite a copy of ``model`` as ``plan`` says, without solving.

    Activation-aware configs recompute their factors from ``calibration``: pass the batches
    the plan was made with to get the same model (or use :func:`save`/:func:`load`, which
    restore the stored factors and need no data).

    Raises:
        ValueError: a plan entry that names no parameter of ``model``, or activation-aware
            entries without calibration.
    """
    sites = sites_from_modules(model, list(plan.changed()))
    batches = list(calibration) if calibration is not None else None
    needs_data = any(getattr(c, "activation_aware", False) for c in plan.changed().values())
    if needs_data and not batches:
        raise ValueError(
            "this plan has activation-aware entries; pass calibration= (the batches it was made with) to "
            "recompute their factors, or restore a saved model with passes.load"
        )
    stats = collect_statistics(model, sites, batches, progress=progress) if needs_data else None
    optimized = _rewrite(copy.deepcopy(model), sites, plan, Workspace(stats=stats), progress)
    optimized.plan = plan
    return optimized


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write an optimized model: ``model.safetensors``, ``plan.json``, ``report.json``/``report.txt``."""
    from safetensors.torch import save_model

    plan = getattr(model, "plan", None)
    if not isinstance(plan, Plan):
        raise ValueError("save() takes a model returned by passes.optimize/apply (it carries .plan)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / "model.safetensors"))
    plan.save(directory / "plan.json")
    report = getattr(model, "report", None)
    if isinstance(report, Report):
        (directory / "report.json").write_text(json.dumps(report.to_dict(), indent=1))
        (directory / "report.txt").write_text(report.to_text() + "\n")
    return directory


def load(directory: str | Path, model: nn.Module) -> nn.Module:
    """Restore a model written by :func:`save` onto a copy of the original ``model``, without solving.

    Raises:
        FileNotFoundError: the directory lacks ``plan.json`` or ``model.safetensors``.
    """
    from safetensors.torch import load_model

    directory = Path(directory)
    for required in ("plan.json", "model.safetensors"):
        if not (directory / required).exists():
            raise FileNotFoundError(
                f"{directory / required} is missing; is {directory} a `decomp optimize --out` folder?"
            )
    plan = Plan.load(directory / "plan.json")
    sites = sites_from_modules(model, list(plan.changed()))
    restored = _rewrite(copy.deepcopy(model), sites, plan, Workspace(materialize=False), progress=False)
    load_model(restored, str(directory / "model.safetensors"))
    restored.plan = plan
    if (directory / "report.json").exists():
        restored.report = Report.from_dict(json.loads((directory / "report.json").read_text()))
    return restored
