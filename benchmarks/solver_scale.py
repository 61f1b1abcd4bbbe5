"""Scale benchmark for the budgeted option solver (cost_model.solver.solve).

Builds truncated-SVD-like instances: every node is a weight matrix with a random decaying
singular spectrum; its options are ranks, costing bytes proportional to the rank and erring
by the spectral energy left out. Memory is budgeted at a fraction of the all-max-rank total;
a second run adds a latency row whose cost is a per-kernel overhead plus a tile-quantised
term, so it does not simply track bytes.

Usage:
    python benchmarks/solver_scale.py [--nodes 1000] [--options 30] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cost_model import solver  # noqa: E402  (path set up above for running as a script)
from cost_model.solver import Option, solve  # noqa: E402

__all__ = ["main", "make_instance"]

_BYTES_PER_ELEMENT = 2  # fp16 factors
_TILE = 16  # tensor-core tile: latency rises in steps of 16 ranks


def make_instance(
    num_nodes: int, num_options: int, seed: int, with_latency: bool
) -> dict[str, list[Option]]:
    """Random truncated-SVD-like instance.

    Args:
        num_nodes: Number of layers.
        num_options: Ranks offered per layer, spread geometrically up to full rank.
        seed: Seed for the spectra and shapes.
        with_latency: Also price each option in a ``latency_ns`` row.

    Returns:
        Node name -> options, ordered by increasing rank.
    """
    rng = np.random.default_rng(seed)
    options: dict[str, list[Option]] = {}
    for k in range(num_nodes):
        m, n = (int(d) for d in rng.choice([256, 512, 768, 1024, 2048, 4096], size=2))
        full = min(m, n)
        decay = rng.uniform(0.3, 1.5)
        spectrum = np.arange(1, full + 1, dtype=np.float64) ** -decay * rng.lognormal(0, 0.2, size=full)
        spectrum = np.sort(spectrum)[::-1]
        energy = spectrum**2
        # Energy left out after keeping r = 1..full; clipped because cumsum rounding can dip below 0.
        left_out = np.maximum(energy.sum() - np.cumsum(energy), 0.0) / energy.sum()
        ranks = np.unique(np.geomspace(1, full, num_options).round().astype(int))
        while len(ranks) < num_options:  # small matrices: top up with unused ranks
            extra = rng.choice(np.setdiff1d(np.arange(1, full + 1), ranks))
            ranks = np.sort(np.append(ranks, extra))
        sensitivity = rng.lognormal(0, 1)  # layers differ in how much their error matters
        node_options = []
        for r in ranks:
            costs = {"memory": int(r * (m + n) * _BYTES_PER_ELEMENT)}
            if with_latency:
                tiles = -(-int(r) // _TILE)
                costs["latency_ns"] = int(2000 + 0.05 * tiles * _TILE * (m + n))
            node_options.append(Option(key=int(r), error=float(sensitivity * left_out[r - 1]), costs=costs))
        options[f"layer{k}"] = node_options
    return options


_COLUMNS = [("case", 16), ("status", 10), ("wall_s", 8), ("objective", 14), ("bound", 14), ("gap", 10),
            ("greedy", 14), ("greedy_gap", 12)]


def _format_row(cells: list[str]) -> str:
    """First column left-aligned, the rest right-aligned, widths from ``_COLUMNS``."""
    return "".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, (_, w)) in enumerate(zip(cells, _COLUMNS)))


def _all_max(options: dict[str, list[Option]], row: str) -> int:
    return sum(max(o.costs.get(row, 0) for o in opts) for opts in options.values())


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print one table row per case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--options", type=int, default=30)
    parser.add_argument("--memory-fraction", type=float, default=0.5)
    parser.add_argument("--latency-fraction", type=float, default=0.5)
    parser.add_argument("--time-limit", type=float, default=4.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    print(f"{args.nodes} nodes x {args.options} options, {args.workers} workers, time limit {args.time_limit} s")
    header = _format_row([name for name, _ in _COLUMNS])
    print(header)
    print("-" * len(header))
    for case, with_latency in (("memory", False), ("memory+latency", True)):
        options = make_instance(args.nodes, args.options, args.seed, with_latency)
        budgets = {"memory": int(args.memory_fraction * _all_max(options, "memory"))}
        if with_latency:
            budgets["latency_ns"] = int(args.latency_fraction * _all_max(options, "latency_ns"))
        result = solve(options, budgets, time_limit_s=args.time_limit, workers=args.workers, seed=args.seed)
        # The greedy start is private; reached here only to show how much CP-SAT adds to it.
        greedy = solver._greedy_solution(options, budgets)
        cells = [
            case,
            result.status,
            f"{result.wall_time_s:.2f}",
            f"{result.objective:.6g}",
            f"{result.bound:.6g}",
            f"{(result.objective - result.bound) / result.objective:.2e}",
            f"{greedy.objective:.6g}" if greedy else "none",
            f"{(greedy.objective - result.objective) / result.objective:.2e}" if greedy else "",
        ]
        print(_format_row(cells))


if __name__ == "__main__":
    main()
