"""Multiple-choice knapsack instances and the convex-hull greedy that gives CP-SAT its start.

Used by ``cost_model.solver``; split out to keep each file one concept. The greedy alone is
also what ``solve`` falls back to when CP-SAT finds nothing in time.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Problem", "greedy_choice", "local_objective"]


@dataclass
class Problem:
    """Validated, array-shaped instance; per-node arrays may be pruned copies."""

    nodes: list[str]
    rows: tuple[str, ...]
    budgets: dict[str, int]
    fixed: dict[str, int]
    capacity: np.ndarray  # (R,) int64: budget minus fixed cost, per row
    index: list[np.ndarray]  # per node: the caller's option index of each kept option
    errors: list[np.ndarray]  # per node: (n,) float64
    costs: list[np.ndarray]  # per node: (n, R) int64


def local_objective(problem: Problem, choice: np.ndarray) -> float:
    return math.fsum(float(e[i]) for e, i in zip(problem.errors, choice))


def _lower_hull(agg: list[float], err: list[float]) -> list[int]:
    """Indices on the lower convex hull of (aggregate cost, error), cheapest first.

    Only points that strictly lower the error as cost grows are kept, so consecutive hull
    points have strictly increasing cost and the marginal gains along the hull shrink.
    """
    hull: list[int] = []
    for i in sorted(range(len(agg)), key=lambda i: (agg[i], err[i])):
        if hull and err[i] >= err[hull[-1]]:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (agg[b] - agg[a]) * (err[i] - err[a]) - (err[b] - err[a]) * (agg[i] - agg[a])
            if cross > 0:
                break
            hull.pop()
        hull.append(i)
    return hull


def greedy_choice(problem: Problem) -> np.ndarray | None:
    """Convex-hull marginal greedy (the Lagrangian heuristic for multiple-choice knapsack).

    Rows are folded into one aggregate cost, each weighted by the inverse of its slack above
    the cheapest plan. With several rows the right weighting depends on which row binds,
    which is unknown up front, so the balanced weighting and one leaning on each row in turn
    are all tried and the best feasible plan kept (on the two-row benchmark, leaning on the
    binding row took the greedy from 1.9e-3 above CP-SAT's plan to within 1e-5 of it).

    Returns:
        Local option indices, or ``None`` when every weighting's cheapest start violates a
        row (possible only with several rows).
    """
    minimum = np.zeros(len(problem.rows), dtype=np.int64)
    for c in problem.costs:
        minimum += c.min(axis=0)
    inverse_slack = 1.0 / np.maximum(problem.capacity - minimum, 1).astype(np.float64)
    weightings = [inverse_slack]
    if len(problem.rows) > 1:
        # The small share left on the other rows keeps their costs from looking free.
        weightings += [(one_hot + 1e-3) * inverse_slack for one_hot in np.eye(len(problem.rows))]

    # Per-node Python lists, shared by every weighting: the loops below index single items.
    lists = ([e.tolist() for e in problem.errors], [c.tolist() for c in problem.costs])
    best, best_error = None, math.inf
    for weights in weightings:
        choice = _greedy_with_weights(problem, weights, *lists)
        if choice is not None and (error := local_objective(problem, choice)) < best_error:
            best, best_error = choice, error
    return best


def _greedy_with_weights(
    problem: Problem, weights: np.ndarray, errors: list[list[float]], costs: list[list[list[int]]]
) -> np.ndarray | None:
    """One greedy run for a fixed row weighting; see ``greedy_choice``.

    Every node starts at its cheapest hull point; then the upgrade with the largest error
    decrease per aggregate-cost increase is taken while every row still fits. A final pass
    swaps each node to its lowest-error option that still fits, which catches options off
    the hull. The hot loop uses Python ints: with a handful of rows, numpy's per-call
    overhead on length-R arrays cost more than the arithmetic.
    """
    capacity = [int(v) for v in problem.capacity]
    rows = range(len(capacity))
    hulls, aggs = [], []
    choice = np.empty(len(problem.nodes), dtype=np.int64)
    totals = [0] * len(capacity)
    heap: list[tuple[float, int, int]] = []
    for k, (e, c) in enumerate(zip(errors, problem.costs)):
        agg = (c.astype(np.float64) @ weights).tolist()
        hull = _lower_hull(agg, e)
        hulls.append(hull)
        aggs.append(agg)
        choice[k] = hull[0]
        totals = [t + v for t, v in zip(totals, costs[k][hull[0]])]
        if len(hull) > 1:
            a, b = hull[0], hull[1]
            heap.append((-(e[a] - e[b]) / (agg[b] - agg[a]), k, 0))
    if any(t > cap for t, cap in zip(totals, capacity)):
        return None

    heapq.heapify(heap)
    while heap:
        _, k, pos = heapq.heappop(heap)
        hull, c = hulls[k], costs[k]
        a, b = hull[pos], hull[pos + 1]
        moved = [t + c[b][r] - c[a][r] for r, t in enumerate(totals)]
        if all(moved[r] <= capacity[r] for r in rows):
            totals = moved
            choice[k] = b
            if pos + 2 < len(hull):
                e, agg, n = errors[k], aggs[k], hull[pos + 2]
                heapq.heappush(heap, (-(e[b] - e[n]) / (agg[n] - agg[b]), k, pos + 1))
        # Otherwise the node stays put: its later hull steps cost more still (in aggregate;
        # the pass below catches any single option that happens to fit every row).

    room = np.array(capacity, dtype=np.int64) - np.array(totals, dtype=np.int64)
    for k, (e, c) in enumerate(zip(problem.errors, problem.costs)):
        current = choice[k]
        delta = c - c[current]
        candidates = np.flatnonzero((e < e[current]) & np.all(delta <= room, axis=1))
        if candidates.size:
            j = candidates[np.argmin(e[candidates])]
            room -= delta[j]
            choice[k] = j
    return choice
