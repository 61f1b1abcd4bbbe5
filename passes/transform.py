"""The contract between the pipeline and a transform family, and the registry.

A transform proposes :class:`Candidate` options for a weight site (each with exact stored
bytes, an error estimate and its op cost) and rewrites a model for a chosen config. The
pipeline looks transforms up by name (``transforms=("lowrank",)``) and rewriters by config
type. A transform never imports another transform.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from cost_model import MatmulCost, SiteStats
from ir import WeightSite
from passes.config import TransformConfig

__all__ = [
    "TRANSFORMS",
    "Candidate",
    "Transform",
    "Workspace",
    "get_transform",
    "register_transform",
    "replace_module",
    "transform_for",
]


@dataclass(frozen=True)
class Candidate:
    """One option for one site.

    Attributes:
        config: what to do.
        nbytes: exact bytes the site's weight stores with this option (biases excluded: no
            transform changes them).
        error: estimated error, normalised as documented in ``passes.lowrank`` so that
            options of different sites and families compare.
        cost: FLOPs, bytes moved and launches of the site's ops on the example inputs.
    """

    config: TransformConfig
    nbytes: int
    error: float
    cost: MatmulCost


@dataclass
class Workspace:
    """What transforms share during one optimize/apply run.

    Attributes:
        stats: calibration statistics by site name, or ``None`` (data-free).
        cache: per-transform scratch (e.g. a site's SVD, computed once for all ranks).
        materialize: when False, rewrites allocate factors of the right shapes without
            computing them (restoring a saved model whose values come from a file).
        excluded: ``(site, transform, reason)`` for every site a transform offered nothing
            for because it cannot take it (shape, kind of use); shown in the report.
    """

    stats: dict[str, SiteStats] | None = None
    cache: dict[Any, Any] = field(default_factory=dict)
    materialize: bool = True
    excluded: list[tuple[str, str, str]] = field(default_factory=list)


class Transform(abc.ABC):
    """A transform family: candidate enumeration plus rewrite, keyed by its config types."""

    name: ClassVar[str]
    config_types: ClassVar[tuple[type[TransformConfig], ...]]

    @abc.abstractmethod
    def candidates(self, site: WeightSite, model: nn.Module, ws: Workspace) -> list[Candidate]:
        """Options this family offers for ``site`` (empty when none saves bytes)."""

    @abc.abstractmethod
    def rewrite(self, model: nn.Module, site: WeightSite, config: TransformConfig, ws: Workspace) -> None:
        """Replace the modules using ``site`` in ``model`` (in place) according to ``config``."""


TRANSFORMS: dict[str, Transform] = {}
_BY_CONFIG: dict[type, Transform] = {}


def register_transform(transform: Transform) -> Transform:
    """Make ``transform`` available by name and by config type."""
    TRANSFORMS[transform.name] = transform
    for config_type in transform.config_types:
        _BY_CONFIG[config_type] = transform
    return transform


def get_transform(name: str) -> Transform:
    """Look a transform up by its ``transforms=`` name."""
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise ValueError(f"unknown transform {name!r}; available: {sorted(TRANSFORMS)}") from None


def transform_for(config: TransformConfig) -> Transform:
    """The transform that rewrites ``config``."""
    try:
        return _BY_CONFIG[type(config)]
    except KeyError:
        raise ValueError(f"no transform handles {type(config).__name__}") from None


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``path`` of ``model`` (in place)."""
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path), child, new)
