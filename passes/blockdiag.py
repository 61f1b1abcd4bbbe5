"""Block-diagonal weights with learned input and output permutations, for Linear and Conv1D.

Where it sits: beside ``passes.monarch`` (same base, ``passes.structured_base``); the
``"blockdiag"`` transform is the cheapest structured option: b blocks keep 1/b of the
weight, computed as one batched matmul.

The structure. Inputs are permuted and cut into b groups of p = ⌈in/b⌉ (zero-padded), each
group feeds one dense (s × p) block producing s = ⌈out/b⌉ outputs, and outputs are permuted
back::

    blocks: (b, s, p)     in_index: (b·p,) int32     out_index: (out,) int32
    y = (blockdiag(blocks) · x_pad[in_index])[out_index] + bias

``permute=False`` stores no index buffers (contiguous groups); with ``permute=True`` the two
int32 buffers are stored and counted in the option's bytes.

The fit. For fixed groups, the best blocks are closed-form: the weight's own entries
(Frobenius), or with calibration the exact least-squares regression of each output group
on its input group, ``B_g = W_g C[:, g] (C[g, g])⁻¹`` (minimises ``tr(ΔCΔᵀ)`` over the
support, with the damped C of ``passes.structured_base.Problem``). The groups are chosen to keep the most
"energy" ``Σ_g Σ_{r ∈ R_g, c ∈ C_g} W[r, c]² · C[c, c]`` (C = I without calibration), a
balanced co-clustering: alternately reassign the input columns given the output groups and
the rows given the input groups, each by a greedy balanced assignment (largest gains
first), for at most :data:`ALTERNATIONS` rounds, keeping the best. The priced error is the
exact ``tr(ΔCΔᵀ)`` (or ‖Δ‖²) of the blocks produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from codegen import dispatch
from codegen.kernels.blockdiag import KERNEL_MAX_M
from cost_model import MatmulCost
from passes.config import TransformConfig, register_config
from passes.structured_base import FactorSpec, Fit, Problem, StructuredTransform, single_threaded
from passes.transform import register_transform

__all__ = [
    "BlockDiagConfig",
    "BlockDiagLinear",
    "BlockDiagTransform",
    "blockdiag_dense",
    "blockdiag_forward",
    "candidate_configs",
    "co_cluster",
]

#: Rounds of alternating column / row reassignment, at most.
ALTERNATIONS = 6


@register_config
@dataclass(frozen=True)
class BlockDiagConfig(TransformConfig):
    """Keep ``nblocks`` dense diagonal blocks of a (permuted) weight: 1/nblocks of its entries.

    Attributes:
        nblocks: b ≥ 2 blocks.
        permute: learn input/output permutations (stored as int32 indices); False keeps
            contiguous groups.
        activation_aware: fit the blocks and groups to the calibration inputs.

    Expected error: above low-rank of the same bytes on pretrained weights, which spread
    their energy over all entries. SmolLM2 layer 5 with 2 blocks (half the bytes), relative
    output error: q_proj 0.052 vs low-rank's 0.028, o_proj 0.13 vs 0.06, up_proj 0.26 vs
    0.18, down_proj 0.20 vs 0.19. The cheapest structure to compute, and a good start for
    training (``passes.reparametrize``).
    """

    family: ClassVar[str] = "blockdiag"
    nblocks: int
    permute: bool = True
    activation_aware: bool = True

    def __post_init__(self):
        if isinstance(self.nblocks, bool) or not isinstance(self.nblocks, int) or self.nblocks < 2:
            raise ValueError(f"BlockDiagConfig.nblocks must be an int >= 2, got {self.nblocks!r}")
        for name in ("permute", "activation_aware"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"BlockDiagConfig.{name} must be a bool, got {getattr(self, name)!r}")

    def describe(self) -> str:
        perm = " perm" if self.permute else ""
        return f"blockdiag b={self.nblocks}{perm}" + ("" if self.activation_aware else " (svd)")

    def blocks(self, out: int, inn: int) -> tuple[int, int]:
        """``(s, p)``: block rows and columns for an (out × in) weight."""
        return -(-out // self.nblocks), -(-inn // self.nblocks)


# ---- the module ---------------------------------------------------------------------------


def blockdiag_forward(
    x: torch.Tensor,
    blocks: torch.Tensor,
    out_features: int,
    in_index: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x ↦ x W'ᵀ + bias`` for the permuted block-diagonal W' (layout: module docstring)."""
    b, s, p = blocks.shape
    lead, n_in = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, n_in)
    if n_in < b * p:
        x = F.pad(x, (0, b * p - n_in))
    if in_index is not None:
        x = x.index_select(1, in_index)
    n = x.shape[0]
    y = torch.bmm(blocks, x.reshape(n, b, p).permute(1, 2, 0)).reshape(b * s, n)  # (b·s, N)
    y = y.index_select(0, out_index) if out_index is not None else y[:out_features]
    y = y.t()
    if bias is not None:
        y = y + bias
    return y.contiguous().reshape(*lead, out_features)


def _output_positions(out_index: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """``out_index`` (output → block row) inverted: ``(rows,)`` int32 output column of each block
    row, −1 for block rows that are no output; None for contiguous rows. An index not yet loaded
    (``passes.load`` builds modules on uninitialised buffers, then loads them) gives all −1."""
    if out_index is None:
        return None
    pos = torch.full((rows,), -1, dtype=torch.int32, device=out_index.device)
    if out_index.device.type != "meta" and out_index.numel() and (out_index.min() >= 0) & (out_index.max() < rows):
        pos[out_index.long()] = torch.arange(out_index.numel(), dtype=torch.int32, device=out_index.device)
    return pos


def blockdiag_dense(
    blocks: torch.Tensor,
    out_features: int,
    in_features: int,
    in_index: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The (out × in) matrix ``blockdiag_forward`` applies."""
    b, _, p = blocks.shape
    w = torch.block_diag(*blocks)  # (b·s, b·p), columns in permuted order
    w = w.index_select(0, out_index) if out_index is not None else w[:out_features]
    if in_index is not None:
        dense = torch.zeros(out_features, b * p, dtype=w.dtype, device=w.device)
        dense[:, in_index.long()] = w
        w = dense
    return w[:, :in_features]


class BlockDiagLinear(nn.Module):
    """A Linear (or GPT-2 Conv1D) whose weight is permuted block-diagonal; stores the blocks (and indices)."""

    def __init__(
        self,
        blocks: nn.Parameter,
        bias: nn.Parameter | None,
        out_features: int,
        in_features: int,
        in_index: torch.Tensor | None = None,
        out_index: torch.Tensor | None = None,
    ):
        super().__init__()
        b, s, p = blocks.shape
        if b * s < out_features or b * p < in_features:
            raise ValueError(f"blocks {tuple(blocks.shape)} do not cover a {out_features}×{in_features} weight")
        self.blocks = blocks
        self.bias = bias
        self.out_features = out_features
        self.in_features = in_features
        self.register_buffer("in_index", in_index)
        self.register_buffer("out_index", out_index)
        # out_index inverted (block row -> output column, -1: padding), what the kernel stores through;
        # derived, so not saved (recomputed after a state_dict load)
        self.register_buffer("out_pos", _output_positions(out_index, b * s), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.use_kernels(x, self.blocks, self.bias):
            return dispatch.blockdiag_linear(x, self.blocks, self.out_features, self.in_index, self.out_pos, self.bias)
        return blockdiag_forward(x, self.blocks, self.out_features, self.in_index, self.out_index, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._buffers["out_pos"] = _output_positions(self.out_index, self.blocks.shape[0] * self.blocks.shape[1])

    def dense(self) -> torch.Tensor:
        """The materialised (out × in) weight."""
        return blockdiag_dense(self.blocks, self.out_features, self.in_features, self.in_index, self.out_index)

    def extra_repr(self) -> str:
        b, s, p = self.blocks.shape
        return (
            f"in={self.in_features}, out={self.out_features}, nblocks={b}, block={s}x{p}, "
            f"permuted={self.in_index is not None}, bias={self.bias is not None}"
        )


# ---- the fit --------------------------------------------------------------------------------


def _assign(gain: np.ndarray, capacity: int) -> np.ndarray:
    """Greedy balanced assignment of items (rows of ``gain``) to groups of ``capacity``.

    Items in decreasing order of their best gain each take their best group with room left
    (one pass over the items; a pass over all item-group pairs was 20× slower on SmolLM2).
    """
    n, b = gain.shape
    room = np.full(b, capacity, dtype=np.int64)
    group = np.empty(n, dtype=np.int64)
    for item in np.argsort(-gain.max(axis=1), kind="stable"):
        g = int(np.argmax(np.where(room > 0, gain[item], -np.inf)))
        group[item] = g
        room[g] -= 1
    return group


def co_cluster(score: torch.Tensor, b: int, rounds: int = ALTERNATIONS) -> tuple[np.ndarray, np.ndarray, float]:
    """Balanced groups of rows and columns keeping the most of ``score`` (b·s × b·p, ≥ 0) on the diagonal.

    Returns:
        ``(row_group, col_group, kept)``: a group in [0, b) per row and per column (each group
        exactly s rows and p columns) and the score kept.
    """
    rows, cols = score.shape
    s, p = rows // b, cols // b
    sc = score.double().numpy()

    def kept(rg, cg):
        return float(sum(sc[np.ix_(rg == g, cg == g)].sum() for g in range(b)))

    best = None
    for row_group in (np.arange(rows) // s, _spectral_rows(sc, b, s)):
        col_group = np.full(cols, -1)
        for _ in range(rounds):
            new_cols = _assign(sc.T @ np.eye(b)[row_group], p)
            if np.array_equal(new_cols, col_group):
                break
            col_group = new_cols
            value = kept(row_group, col_group)
            if best is None or value > best[2]:
                best = (row_group, col_group, value)
            row_group = _assign(sc @ np.eye(b)[col_group], s)
    return best


def _spectral_rows(score: np.ndarray, b: int, s: int) -> np.ndarray:
    """A start for the rows: groups of rows whose scores point the same way in the top-b
    singular subspace (spectral co-clustering, Dhillon 2001), balanced by :func:`_assign`.

    Contiguous groups are an arbitrary start; on a permuted block-diagonal matrix this one
    finds the planted blocks.
    """
    rng = np.random.default_rng(0)
    q = rng.standard_normal((score.shape[1], min(b + 4, score.shape[1])))
    for _ in range(8):  # subspace iteration on SᵀS
        q, _ = np.linalg.qr(score.T @ (score @ q))
    u = score @ q[:, :b]
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-300)
    seeds = [int(np.argmax(np.abs(u).sum(1)))]
    for _ in range(b - 1):  # farthest point: the row least like every seed so far
        seeds.append(int(np.argmin(np.max(u @ u[seeds].T, axis=1))))
    centers = u[seeds]
    group = _assign(u @ centers.T + 1.0, s)
    for _ in range(8):  # balanced k-means (cosine) from the seeds
        centers = np.eye(b)[group].T @ u
        centers /= np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-300)
        new = _assign(u @ centers.T + 1.0, s)
        if np.array_equal(new, group):
            break
        group = new
    return group


def _fit(problem: Problem, config: BlockDiagConfig) -> Fit:
    out, inn = problem.shape
    b = config.nblocks
    s, p = config.blocks(out, inn)
    w = F.pad(problem.w, (0, b * p - inn, 0, b * s - out))
    # the damped C (see passes.structured_base.Problem): keeps the regressions bounded
    cov = None if problem.covariance is None else F.pad(problem.fit_covariance, (0, b * p - inn, 0, b * p - inn))
    if config.permute:
        weight = torch.ones(b * p, dtype=w.dtype) if cov is None else cov.diagonal()
        row_group, col_group, _ = co_cluster(w.square() * weight, b)
    else:
        row_group, col_group = np.arange(b * s) // s, np.arange(b * p) // p
    row_order = np.concatenate([np.flatnonzero(row_group == g) for g in range(b)])
    col_order = np.concatenate([np.flatnonzero(col_group == g) for g in range(b)])
    rows = torch.from_numpy(row_order).view(b, s)
    cols = torch.from_numpy(col_order).view(b, p)
    wg = w[rows]  # (b, s, in_pad): every output group's full rows
    if cov is None:
        blocks = torch.stack([wg[g][:, cols[g]] for g in range(b)])
        err = max(0.0, w.square().sum().item() - blocks.square().sum().item())
    else:
        cgg = torch.stack([cov[cols[g]][:, cols[g]] for g in range(b)])  # (b, p, p)
        wc_g = torch.stack([(wg[g] @ cov[:, cols[g]]) for g in range(b)])  # W_g C[:, g]: (b, s, p)
        ridge = 1e-12 * cgg.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-300)
        with single_threaded():
            blocks = torch.linalg.solve(cgg + ridge[:, None, None] * torch.eye(p, dtype=w.dtype), wc_g.transpose(1, 2)).transpose(
                1, 2
            )
        # tr(WC_fWᵀ) − 2⟨W', WC_f⟩ + Σ_g tr(B_g C_gg B_gᵀ), then the ridge's δ‖Δ‖² taken off
        quad = (blocks * (blocks @ cgg)).sum().item()
        fit = max(0.0, (problem.w * problem.fit_wc).sum().item() - 2 * (blocks * wc_g).sum().item() + quad)
        kept = torch.stack([wg[g][:, cols[g]] for g in range(b)])
        delta_sq = w.square().sum() - kept.square().sum() + (blocks - kept).square().sum()
        err = problem.exact(fit, delta_sq.item())
    factors = {"blocks": blocks.contiguous()}
    if config.permute:
        position = np.empty(b * s, dtype=np.int64)
        position[row_order] = np.arange(b * s)
        factors["in_index"] = torch.from_numpy(col_order.astype(np.int32))
        factors["out_index"] = torch.from_numpy(position[:out].astype(np.int32))
    return Fit(config, factors, err)


def _check(config: BlockDiagConfig, out: int, inn: int) -> None:
    if config.nblocks > min(out, inn):
        raise ValueError(
            f"nblocks={config.nblocks} exceeds the smaller side of the {out}×{inn} weight; use at most {min(out, inn)}"
        )


#: The most blocks offered (1/32 of the weight; the greedy co-clustering costs ~rows·b steps).
MAX_BLOCKS = 32


def candidate_configs(out: int, inn: int) -> list[BlockDiagConfig]:
    """2, 4, … :data:`MAX_BLOCKS` blocks (permuted), while a block keeps at least 4 rows and columns."""
    configs = []
    b = 2
    while b <= min(out // 4, inn // 4, MAX_BLOCKS):
        configs.append(BlockDiagConfig(b))
        b *= 2
    return configs


class BlockDiagTransform(StructuredTransform):
    """The ``"blockdiag"`` transform."""

    name = "blockdiag"
    config_types = (BlockDiagConfig,)

    def grid(self, out: int, inn: int) -> tuple[list[TransformConfig], str | None]:
        configs = candidate_configs(out, inn)
        return list(configs), None if configs else f"{out}×{inn} is too small for 2 blocks of at least 4×4"

    def fit(self, problem: Problem, configs: list[TransformConfig]) -> list[Fit]:
        return [_fit(problem, c) for c in configs]

    def factor_specs(self, config: TransformConfig, out: int, inn: int) -> dict[str, FactorSpec]:
        b = config.nblocks
        s, p = config.blocks(out, inn)
        specs = {"blocks": FactorSpec((b, s, p))}
        if config.permute:
            specs["in_index"] = FactorSpec((b * p,), trainable=False)
            specs["out_index"] = FactorSpec((out,), trainable=False)
        return specs

    def check_fits(self, config: TransformConfig, out: int, inn: int) -> None:
        _check(config, out, inn)

    def build(self, factors: dict[str, Any], bias: Any, config: TransformConfig, out: int, inn: int) -> nn.Module:
        return BlockDiagLinear(factors["blocks"], bias, out, inn, factors.get("in_index"), factors.get("out_index"))

    def op_cost(self, config: TransformConfig, rows: int, out: int, inn: int, size: int) -> MatmulCost:
        b = config.nblocks
        s, p = config.blocks(out, inn)
        gathers = 2 if config.permute else 0
        weights = self.nbytes(config, out, inn, size)
        moved = weights + size * rows * (b * p * (1 + gathers) + b * s + out * (1 + gathers))
        # decomp::blockdiag_linear (GPU): one launch, the permutations in its loads and store, up to
        # KERNEL_MAX_M rows (the torch path beyond)
        fused = MatmulCost(2 * rows * b * s * p, weights + size * rows * (inn + out), 1) if rows <= KERNEL_MAX_M else None
        return MatmulCost(2 * rows * b * s * p, moved, 2 + gathers, fused)


register_transform(BlockDiagTransform())
