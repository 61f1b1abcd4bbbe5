"""FLOPs and roofline latency estimates for matrix ops on a device profile.

The estimate of one op is ``max(flops / peak, bytes / bandwidth) + kernels × launch``: what
limits a GEMV (batch-1 decode) is the weight bytes, what limits a GEMM (prefill) is the
FLOPs, and a low-rank pair pays a second launch. A rewritten op's cost may carry a second
estimate, ``fused``: the same op as its fused Triton kernel (``codegen``: one launch, the
intermediates on chip), which is what runs on a GPU; profiles with ``kernels=True`` (``h100``)
price that one, the others (``cpu``: the torch reference runs there) the first. Profiles carry nominal peaks; the ``cpu``
one was measured on the 2-core development machine (fp32 GEMM 2048×576×1536: 135-195
GFLOP/s; a streamed 3.5 MB GEMV: ~54 GB/s in cache, ~15 GB/s from DRAM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ir import UseKind, WeightSite

__all__ = ["PROFILES", "DeviceProfile", "MatmulCost", "dense_cost", "get_profile", "matmul_cost", "roofline_seconds"]


@dataclass(frozen=True)
class DeviceProfile:
    """Peak throughputs of a device.

    Attributes:
        name: profile name.
        flops_per_s: peak FLOP/s by compute dtype (fp32 entries are used for unlisted dtypes).
        bytes_per_s: sustained memory bandwidth.
        launch_s: fixed cost per kernel launch / op dispatch.
        kernels: the rewritten layers run their fused kernels here (a CUDA device), so a cost's
            ``fused`` estimate applies.
    """

    name: str
    flops_per_s: dict[torch.dtype, float]
    bytes_per_s: float
    launch_s: float
    kernels: bool = False

    def peak(self, dtype: torch.dtype) -> float:
        return self.flops_per_s.get(dtype, self.flops_per_s[torch.float32])


PROFILES: dict[str, DeviceProfile] = {
    "cpu": DeviceProfile(
        "cpu", {torch.float32: 150e9, torch.bfloat16: 150e9, torch.float16: 75e9}, bytes_per_s=15e9, launch_s=5e-6
    ),
    # H100 SXM dense peaks (no sparsity): fp32 on CUDA cores, tf32 not assumed.
    "h100": DeviceProfile(
        "h100",
        {torch.float32: 67e12, torch.bfloat16: 989e12, torch.float16: 989e12},
        bytes_per_s=3.35e12,
        launch_s=4e-6,
        kernels=True,
    ),
}


def get_profile(name: str | DeviceProfile) -> DeviceProfile:
    """Look a profile up by name (``cpu``, ``h100``) or pass one through."""
    if isinstance(name, DeviceProfile):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown device profile {name!r}; known: {sorted(PROFILES)}") from None


@dataclass(frozen=True)
class MatmulCost:
    """FLOPs, bytes moved and kernel launches of an op (or a chain of ops).

    ``fused``: the same op run as its fused kernel, where that differs (fewer launches, no
    intermediates through memory); None when the op is the same either way. Sums keep it: the
    fused estimate of a sum is the sum of each part's fused (or only) estimate.
    """

    flops: int
    bytes: int
    kernels: int
    fused: MatmulCost | None = None

    def __add__(self, other: MatmulCost) -> MatmulCost:
        fused = None
        if self.fused is not None or other.fused is not None:
            fused = (self.fused or self._plain()) + (other.fused or other._plain())
        return MatmulCost(self.flops + other.flops, self.bytes + other.bytes, self.kernels + other.kernels, fused)

    def _plain(self) -> MatmulCost:
        return MatmulCost(self.flops, self.bytes, self.kernels)

    def on(self, profile: DeviceProfile) -> MatmulCost:
        """The estimate that applies on ``profile``: the fused one where its kernels run."""
        return self.fused if profile.kernels and self.fused is not None else self._plain()


def matmul_cost(rows: int, k: int, n: int, weight_bytes: int, act_size: int = 4) -> MatmulCost:
    """Cost of ``(rows × k) @ (k × n)`` with a stored weight of ``weight_bytes`` bytes."""
    return MatmulCost(2 * rows * k * n, weight_bytes + act_size * rows * (k + n), 1)


def roofline_seconds(cost: MatmulCost, profile: DeviceProfile, dtype: torch.dtype = torch.float32) -> float:
    """Roofline time of ``cost`` on ``profile`` (its fused estimate where the kernels run)."""
    cost = cost.on(profile)
    return max(cost.flops / profile.peak(dtype), cost.bytes / profile.bytes_per_s) + cost.kernels * profile.launch_s


def dense_cost(site: WeightSite) -> MatmulCost:
    """Cost of a site's ops with the weight kept dense."""
    out, inn = site.matrix_shape
    size = site.nbytes // site.numel
    total = MatmulCost(0, 0, 0)
    for use in site.uses:
        if use.kind is UseKind.EMBEDDING:
            total = total + MatmulCost(0, use.rows * inn * size * 2, 1)
        else:
            total = total + matmul_cost(use.rows, inn, out, site.nbytes, size)
    return total
