"""What the structured-matrix families (Monarch, Kronecker, block-diagonal) share.

Where it sits: the base of ``passes.monarch``, ``passes.kronecker`` and ``passes.blockdiag``
(it is not a transform itself and registers nothing). A structured family proposes, for a
weight site whose every use is linear-like (``nn.Linear`` or GPT-2's ``Conv1D``), a grid of
configs; fits factors W' for each; prices each option by the exact error of the factors it
would store; and rewrites the site into a module that stores only those factors.

The fitting problem (:class:`Problem`). With calibration, the output error of replacing W by
W' on the calibration inputs is ``tr((W − W') C (W − W')ᵀ)``, C = XᵀX / rows (fp64), and the
families minimise it over their structure (each in its own way: closed form where the
structure survives the weighting, alternating exact least-squares steps otherwise). Without
calibration they minimise ‖W − W'‖²_F, where all three have closed-form optima.

The error unit (what the solver adds across sites and families) is exactly
``cost_model.perturbation_error(site, stats, W, W − W')`` for the factors produced, computed
without a fresh ``out·in²`` product per option: ``Problem.scale`` times the squared error the
family returns (predicted loss increase ``½ · Σ_uses sensitivity · tr(ΔCΔᵀ)`` with
sensitivities, ``tr(ΔCΔᵀ) / tr(WCWᵀ)`` without them, ``‖Δ‖² / ‖W‖²`` without calibration).
The tests check both agree.

Sites the structures cannot take (lookup tables, 1×1 convolutions, shapes too small to save
bytes) get no options and are recorded in ``Workspace.excluded`` with the reason; the report
lists them.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cost_model import MatmulCost, SiteStats
from ir import UseKind, WeightSite
from passes.config import TransformConfig
from passes.transform import Candidate, Transform, Workspace, replace_module

__all__ = ["DAMPING", "FactorSpec", "Fit", "Problem", "StructuredTransform", "fit_threads", "linear_only_reason", "make_problem", "single_threaded"]


#: Ridge added to C for fitting, relative to its mean diagonal (:class:`Problem`).
DAMPING = 1e-2


@dataclass
class Problem:
    """One weight's fitting problem, shared by every option of a site.

    The fits minimise ``tr(ΔC_fΔᵀ)`` with the damped ``C_f = C + δI`` (δ = :data:`DAMPING` ×
    the mean diagonal of C), i.e. the calibration output error plus ``δ‖Δ‖²``; the errors
    they report are exact for C: ``tr(ΔC_fΔᵀ) − δ‖Δ‖²``. Without the ridge a least-squares
    step may use directions the calibration inputs (nearly) never excite: on SmolLM2's
    layer-18 o_proj (C numerically singular) an undamped Monarch fit reached a 0.04 relative
    calibration error with ‖W'‖ = 8,300 ‖W‖, a relative error of 20,000 on evaluation text and
    a perplexity of 1.3 million; damped by 1e-4 to 1e-2 it priced 0.16, measured 0.24-0.30
    on evaluation text, perplexity 15.1 (dense 13.6). Low-rank needs no ridge: its
    projections never amplify a direction.

    Attributes:
        w: the weight as the (out × in) matrix of its linear map, fp64.
        covariance: calibration input second moment C (in × in, fp64), or ``None`` (data-free:
            minimise the Frobenius error).
        scale: multiplies a squared error (``tr(ΔCΔᵀ)``, or ``‖Δ‖²`` data-free) into the
            shared error unit.
        damping: δ; ``None`` sets it from C.
    """

    w: torch.Tensor
    covariance: torch.Tensor | None
    scale: float
    damping: float | None = None
    _fit_c: torch.Tensor | None = None
    _fit_wc: torch.Tensor | None = None

    def __post_init__(self):
        if self.damping is None:
            self.damping = 0.0 if self.covariance is None else DAMPING * self.covariance.diagonal().mean().item()

    @property
    def fit_covariance(self) -> torch.Tensor:
        """``C_f = C + δI``, what the weighted fits minimise with."""
        if self._fit_c is None:
            assert self.covariance is not None
            self._fit_c = self.covariance + self.damping * torch.eye(self.covariance.shape[0], dtype=self.covariance.dtype)
        return self._fit_c

    @property
    def fit_wc(self) -> torch.Tensor:
        """``W·C_f`` (computed once per site; the least-squares right-hand sides)."""
        if self._fit_wc is None:
            self._fit_wc = self.w @ self.fit_covariance
        return self._fit_wc

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)

    def exact(self, fit_error: float, delta_sq: float) -> float:
        """The exact ``tr(ΔCΔᵀ)`` from a fit's ``tr(ΔC_fΔᵀ)`` and ``‖Δ‖²``."""
        return max(0.0, fit_error - self.damping * delta_sq)

    def squared_error(self, w_new: torch.Tensor) -> float:
        """Exact squared error of ``w_new`` (fp64, dense): ``tr(ΔCΔᵀ)`` or ``‖Δ‖²``.

        An ``out·in²`` product; families with a cheaper exact form use that instead.
        """
        delta = self.w - w_new
        if self.covariance is None:
            return delta.square().sum().item()
        return max(0.0, ((delta @ self.covariance) * delta).sum().item())


def make_problem(site: WeightSite, model: nn.Module, stats: SiteStats | None) -> Problem:
    """The problem of ``site``; ``stats`` ``None`` gives the data-free one."""
    w = site.as_matrix(model.get_parameter(site.name).detach()).double()
    if stats is None or stats.covariance is None:
        return Problem(w, None, 1.0 / max(w.square().sum().item(), 1e-300))
    c = stats.covariance.double()
    if stats.sensitivity:
        scale = 0.5 * sum(stats.sensitivity.get(u.module, 0.0) for u in site.uses)
    else:
        scale = 1.0 / max(((w @ c) * w).sum().item(), 1e-300)
    return Problem(w, c, scale)


@dataclass
class Fit:
    """Factors of one option (fp64, the module's layout) and their exact squared error."""

    config: TransformConfig
    factors: dict[str, torch.Tensor]
    squared_error: float


@dataclass(frozen=True)
class FactorSpec:
    """Shape and kind of one stored tensor of a structured module.

    Attributes:
        shape: tensor shape.
        trainable: a Parameter in the weight's dtype (True) or an int32 index buffer (False).
    """

    shape: tuple[int, ...]
    trainable: bool = True


#: Fits of weights with at most this many elements run on one thread (:func:`fit_threads`).
SINGLE_THREAD_NUMEL = 1 << 22


@contextlib.contextmanager
def single_threaded(enabled: bool = True) -> Iterator[None]:
    """Run the enclosed torch ops on one thread (when ``enabled``).

    Threading inside a 64 × 64 eigendecomposition buys nothing, and when the cores are busy
    OpenMP's waiting makes a batch up to 100× slower (measured: 24 eigh of 48 × 48 took 2 s
    with two threads on a shared 2-core machine, 8 ms with one).
    """
    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_threads(out: int, inn: int) -> contextlib.AbstractContextManager:
    """The threading a fit of an (out × in) weight runs under.

    A fit is a long sequence of mid-sized batched ops (tile eigendecompositions, small
    solves, ``b·k × in`` products); on SmolLM2's layers one thread fitted all Monarch options
    of a site 5-8× faster than two on the shared 2-core machine (q_proj 2.2 s vs 17.8 s,
    down_proj 9.5 s vs 45 s). Larger weights, whose products are big enough to use every
    core, keep torch's setting.
    """
    return single_threaded(out * inn <= SINGLE_THREAD_NUMEL)


def linear_only_reason(site: WeightSite) -> str | None:
    """Why a structured family cannot take ``site`` (``None`` when it can)."""
    kinds = {u.kind for u in site.uses}
    if UseKind.EMBEDDING in kinds:
        return "a lookup table (structured matrices are offered for linear-like uses only)"
    if UseKind.CONV1X1 in kinds:
        return "a 1×1 convolution (structured modules replace Linear and Conv1D only)"
    return None


class StructuredTransform(Transform):
    """A structured-matrix family: grid, fit, exact pricing, factor-only modules."""

    # ---- what a family provides ----------------------------------------------------------

    @abc.abstractmethod
    def grid(self, out: int, inn: int) -> tuple[list[TransformConfig], str | None]:
        """Configs offered for an (out × in) weight, each storing fewer elements than dense,
        and, when there are none, why."""

    @abc.abstractmethod
    def fit(self, problem: Problem, configs: list[TransformConfig]) -> list[Fit]:
        """Factors of every config (in the same order), fitted to ``problem``."""

    @abc.abstractmethod
    def factor_specs(self, config: TransformConfig, out: int, inn: int) -> dict[str, FactorSpec]:
        """The tensors the module of ``config`` stores (their bytes are the option's bytes)."""

    @abc.abstractmethod
    def build(self, factors: dict[str, nn.Parameter | torch.Tensor], bias: Any, config: TransformConfig,
              out: int, inn: int) -> nn.Module:
        """The module computing ``x ↦ x W'ᵀ + bias`` from ``factors``."""

    @abc.abstractmethod
    def op_cost(self, config: TransformConfig, rows: int, out: int, inn: int, size: int) -> MatmulCost:
        """FLOPs, bytes moved and launches of one use at ``rows`` activation rows."""

    @abc.abstractmethod
    def check_fits(self, config: TransformConfig, out: int, inn: int) -> None:
        """Raise ``ValueError`` (saying what would fit) when ``config`` cannot take this shape."""

    # ---- shared machinery ------------------------------------------------------------------

    def nbytes(self, config: TransformConfig, out: int, inn: int, size: int) -> int:
        """Exact stored bytes of ``config``'s factors (int32 index buffers included)."""
        total = 0
        for spec in self.factor_specs(config, out, inn).values():
            numel = 1
            for d in spec.shape:
                numel *= d
            total += numel * (size if spec.trainable else 4)
        return total

    def _exclude(self, site: WeightSite, ws: Workspace, reason: str) -> None:
        ws.excluded.append((site.name, self.name, reason))

    def candidates(self, site: WeightSite, model: nn.Module, ws: Workspace) -> list[Candidate]:
        reason = linear_only_reason(site)
        out, inn = site.matrix_shape
        configs: list[TransformConfig] = []
        if reason is None:
            configs, reason = self.grid(out, inn)
        if not configs:
            self._exclude(site, ws, reason or "no option stores fewer bytes than the dense weight")
            return []
        stats = ws.stats.get(site.name) if ws.stats else None
        problem = make_problem(site, model, stats)
        aware = problem.covariance is not None
        configs = [dataclasses.replace(c, activation_aware=aware) for c in configs]
        size = site.nbytes // site.numel
        with fit_threads(out, inn):
            fits = self.fit(problem, configs)
        result = []
        for fit in fits:
            cost = MatmulCost(0, 0, 0)
            for use in site.uses:
                cost = cost + self.op_cost(fit.config, use.rows, out, inn, size)
            error = max(0.0, problem.scale * fit.squared_error)
            result.append(Candidate(fit.config, self.nbytes(fit.config, out, inn, size), error, cost))
        return result

    def error(self, site: WeightSite, model: nn.Module, ws: Workspace, config: TransformConfig) -> float:
        """Estimated error of ``config`` on ``site`` in the shared unit (as ``candidates`` prices it)."""
        problem = make_problem(site, model, self._stats(site, ws, config))
        with fit_threads(*site.matrix_shape):
            return max(0.0, problem.scale * self.fit(problem, [config])[0].squared_error)

    def factorize(self, site: WeightSite, model: nn.Module, config: TransformConfig, ws: Workspace) -> dict[str, torch.Tensor]:
        """The fp64 factors ``config`` stores for ``site`` (as ``rewrite`` stores them)."""
        out, inn = site.matrix_shape
        self.check_fits(config, out, inn)
        problem = make_problem(site, model, self._stats(site, ws, config))
        with fit_threads(out, inn):
            return self.fit(problem, [config])[0].factors

    def _stats(self, site: WeightSite, ws: Workspace, config: TransformConfig) -> SiteStats | None:
        if not getattr(config, "activation_aware", False):
            return None
        stats = ws.stats.get(site.name) if ws.stats else None
        if stats is None:
            raise ValueError(
                f"activation-aware {self.name} for {site.name} needs calibration statistics; pass calibration= "
                "(the batches the plan was made with), or use activation_aware=False"
            )
        return stats

    def rewrite(self, model: nn.Module, site: WeightSite, config: TransformConfig, ws: Workspace) -> None:
        if not isinstance(config, self.config_types):
            raise TypeError(f"the {self.name} transform does not handle {type(config).__name__}")
        reason = linear_only_reason(site)
        if reason is not None:
            raise ValueError(f"{site.name} cannot take {config.describe()}: it is {reason}")
        out, inn = site.matrix_shape
        self.check_fits(config, out, inn)
        weight = model.get_parameter(site.name)
        specs = self.factor_specs(config, out, inn)
        if ws.materialize:
            values = self.factorize(site, model, config, ws)
        else:
            values = {
                name: torch.empty(spec.shape, dtype=torch.float64 if spec.trainable else torch.int32)
                for name, spec in specs.items()
            }
        # One set of tensors serves every use, so a weight shared by several modules stays shared.
        factors: dict[str, nn.Parameter | torch.Tensor] = {}
        for name, spec in specs.items():
            value = values[name]
            if tuple(value.shape) != spec.shape:
                raise AssertionError(f"{name}: fitted shape {tuple(value.shape)} != declared {spec.shape}")
            if spec.trainable:
                tensor = value.to(device=weight.device, dtype=weight.dtype).contiguous()
                factors[name] = nn.Parameter(tensor, requires_grad=weight.requires_grad)
            else:
                factors[name] = value.to(device=weight.device, dtype=torch.int32).contiguous()
        for use in site.uses:
            module = model.get_submodule(use.module)
            replace_module(model, use.module, self.build(factors, module.bias, config, out, inn))
