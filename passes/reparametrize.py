"""Train-time reparametrisation: swap chosen layers for structured ones, initialised by projection.

Where it sits: beside ``passes.apply`` (it is the same rewrite, driven by the user's choice of
layers instead of a solved plan), before a training loop. Structured matrices (Monarch,
low-rank, Kronecker, block-diagonal) were invented to be *trained*: starting them from the
projection of a pretrained dense layer instead of from random values keeps what the dense
model learned, and a short fine-tune recovers most of what the projection lost (WeLore, Jaiswal
et al. 2024, found that low-rank factors alone fine-tune as well as the full model; Monarch
fine-tuning from projected weights is Dao et al. 2022's "dense-to-sparse" recipe).

    model = passes.reparametrize(dense, passes.MonarchConfig(nblocks=4, rank=8))
    model.train()
    ...  # any training loop: the factors are ordinary nn.Parameters

The returned model is a deep copy (the given one is untouched) carrying ``.plan`` (the
layers rewritten, re-applicable with ``passes.apply``) and ``.skipped`` (layers left dense,
with the reason).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from cost_model import collect_statistics
from ir import sites_from_modules
from passes.blockdiag import BlockDiagConfig
from passes.config import TransformConfig
from passes.kronecker import KroneckerConfig
from passes.lowrank import LowRankConfig
from passes.monarch import MonarchConfig
from passes.plan import Plan
from passes.transform import Workspace, transform_for

__all__ = ["TRAINABLE_CONFIGS", "reparametrize"]

#: Configs whose modules store trainable factors (quantized storage is not trainable).
TRAINABLE_CONFIGS = (MonarchConfig, LowRankConfig, KroneckerConfig, BlockDiagConfig)

Structure = TransformConfig | Mapping[str, TransformConfig] | Callable[[str, nn.Module], TransformConfig | None]


def _linear_like(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) matched by name, so transformers need not be imported
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _config_for(structure: Structure, path: str, module: nn.Module) -> TransformConfig | None:
    if isinstance(structure, TransformConfig):
        return structure
    if isinstance(structure, Mapping):
        for pattern, config in structure.items():
            if fnmatch.fnmatchcase(path, pattern):
                return config
        return None
    return structure(path, module)


def reparametrize(
    model: nn.Module,
    structure: Structure,
    *,
    layers: Sequence[str] | None = None,
    calibration: Iterable[Any] | None = None,
    factors_only: bool = False,
    progress: bool = False,
) -> nn.Module:
    """A trainable copy of ``model`` whose chosen layers are structured, initialised by projection.

    Args:
        model: any module; it is not modified.
        structure: one config for every chosen layer (``MonarchConfig``, ``LowRankConfig``,
            ``KroneckerConfig``, ``BlockDiagConfig``), or a mapping from module-path patterns
            (``fnmatch``, first match wins) to configs, or a function ``(path, module) ->
            config | None``.
        layers: module paths or ``fnmatch`` patterns to consider; ``None``: every
            ``nn.Linear`` and GPT-2 ``Conv1D``. A layer a config cannot take (a shape too
            small, a tied lookup table) is left dense and listed in ``.skipped``, unless it was
            named exactly in ``layers``: then that is an error.
        calibration: batches to fit the projection to (activation-aware: the output error on
            these inputs is minimised). Without them the projection minimises the Frobenius
            error. This decides the configs' ``activation_aware`` flag.
        factors_only: train only the structured factors (every other parameter, biases
            included, gets ``requires_grad=False``); else every parameter trains.
        progress: show a progress bar while collecting calibration statistics.

    Returns:
        The copy, with ``.plan`` (a :class:`Plan` of the rewritten layers) and ``.skipped``
        (``[(layer, reason)]``). Its training mode is the given model's.

    Raises:
        TypeError: a config whose storage is not trainable (quantized) or of an unknown type.
        ValueError: a layer named exactly in ``layers`` that is missing, not linear-like, or
            cannot take its config; or no layer selected at all.
    """
    aware = calibration is not None
    exact = set(layers or ()) & {path for path, _ in model.named_modules()}
    chosen: dict[str, TransformConfig] = {}
    skipped: list[tuple[str, str]] = []
    for pattern in layers or ():
        if not any(fnmatch.fnmatchcase(path, pattern) for path, _ in model.named_modules()):
            raise ValueError(f"layers names {pattern!r}, which matches no module of this {type(model).__name__}")
    for path, module in model.named_modules():
        if layers is not None and not any(fnmatch.fnmatchcase(path, p) for p in layers):
            continue
        if not _linear_like(module):
            if path in exact:
                raise ValueError(f"{path} is a {type(module).__name__}; reparametrize rewrites Linear and Conv1D layers")
            continue
        config = _config_for(structure, path, module)
        if config is None:
            continue
        if not isinstance(config, TRAINABLE_CONFIGS):
            raise TypeError(
                f"reparametrize takes {', '.join(c.__name__ for c in TRAINABLE_CONFIGS)}; "
                f"{type(config).__name__} does not store trainable factors"
            )
        chosen[f"{path}.weight"] = dataclasses.replace(config, activation_aware=aware)
    if not chosen:
        raise ValueError("no layer selected: pass layers= patterns that match Linear/Conv1D modules, or a structure that returns a config")

    sites = sites_from_modules(model, list(chosen))
    batches = list(calibration) if calibration is not None else None
    stats = collect_statistics(model, sites, batches, progress=progress, sensitivity_batches=0) if batches else None
    ws = Workspace(stats=stats)
    result = copy.deepcopy(model)
    done: dict[str, TransformConfig] = {}
    for site in sites:
        config = chosen[site.name]
        path = site.name.rpartition(".")[0]
        try:
            transform_for(config).rewrite(result, site, config, ws)
        except ValueError as exc:
            if path in exact:
                raise ValueError(f"{path} cannot take {config.describe()}: {exc}") from exc
            skipped.append((path, str(exc)))
            continue
        done[site.name] = config

    rewritten = {id(p) for name in done for use in _uses(result, name, sites) for p in use.parameters()}
    for name, param in result.named_parameters():
        if factors_only:
            is_factor = id(param) in rewritten and not name.endswith(".bias")
            param.requires_grad_(is_factor)
        elif id(param) in rewritten:
            param.requires_grad_(True)
    result.plan = Plan(done, {"model": type(model).__name__, "reparametrize": True})
    result.skipped = skipped
    return result


def _uses(model: nn.Module, name: str, sites) -> list[nn.Module]:
    site = next(s for s in sites if s.name == name)
    return [model.get_submodule(u.module) for u in site.uses]
