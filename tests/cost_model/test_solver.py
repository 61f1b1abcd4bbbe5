"""Tests for cost_model.solver: CP-SAT equals brute force, budgets hold, errors are typed."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cost_model import solver as solver_module
from cost_model.solver import (
    InfeasibleBudgetError,
    Option,
    Solution,
    solve,
    solve_brute_force,
)

__all__: list[str] = []

REPO_ROOT = Path(__file__).resolve().parents[2]


def _opt(error: float, key: object = None, **costs: int) -> Option:
    return Option(key=key, error=error, costs=costs)


def _check_plan(options, budgets, fixed, solution: Solution) -> None:
    """Recompute totals and objective from the inputs and check every budget holds."""
    fixed = fixed or {}
    assert set(solution.choice) == set(options)
    for row, budget in budgets.items():
        total = fixed.get(row, 0) + sum(
            options[node][i].costs.get(row, 0) for node, i in solution.choice.items()
        )
        assert total == solution.totals[row]
        assert total <= budget, f"{row}: {total} > {budget}"
    objective = math.fsum(options[node][i].error for node, i in solution.choice.items())
    assert solution.objective == objective
    assert solution.bound <= solution.objective


@st.composite
def _instances(draw):
    num_rows = draw(st.integers(1, 2))
    rows = ["memory", "latency_ns"][:num_rows]
    # A small grid of error values makes exact ties (and tie-breaking) common.
    error = st.one_of(st.floats(0, 10, allow_nan=False), st.integers(0, 6).map(float))
    options = {}
    for k in range(draw(st.integers(2, 5))):
        node_options = []
        for i in range(draw(st.integers(2, 5))):
            # Each row is sometimes absent from an option: it must then cost 0.
            costs = {r: draw(st.integers(0, 40)) for r in rows if draw(st.booleans()) or r == "memory"}
            node_options.append(Option(key=(k, i), error=draw(error), costs=costs))
        options[f"n{k}"] = node_options
    fixed = {r: draw(st.integers(0, 20)) for r in rows}
    budgets = {}
    for r in rows:
        low = fixed[r] + sum(min(o.costs.get(r, 0) for o in opts) for opts in options.values())
        high = fixed[r] + sum(max(o.costs.get(r, 0) for o in opts) for opts in options.values())
        # Mostly tight budgets, so that CP-SAT (not the every-best-option-fits shortcut) answers.
        budgets[r] = draw(st.integers(low - 3, (low + high) // 2 + 1))
    return options, budgets, fixed


# About half the drawn instances reach CP-SAT; the rest are infeasible or loose (shortcut).
@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(_instances())
def test_solve_matches_brute_force(instance):
    options, budgets, fixed = instance
    try:
        expected = solve_brute_force(options, budgets, fixed=fixed)
    except InfeasibleBudgetError as reference:
        with pytest.raises(InfeasibleBudgetError) as caught:
            solve(options, budgets, fixed=fixed, workers=1)
        assert (caught.value.row, caught.value.minimum) == (reference.row, reference.minimum)
        return
    got = solve(options, budgets, fixed=fixed, workers=1, seed=0)
    _check_plan(options, budgets, fixed, expected)
    _check_plan(options, budgets, fixed, got)
    assert math.isclose(got.objective, expected.objective, rel_tol=1e-9, abs_tol=1e-12)
    assert got.status == "OPTIMAL"
    assert math.isclose(got.bound, got.objective, rel_tol=1e-6, abs_tol=1e-9)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(_instances())
def test_greedy_start_is_feasible_and_no_better_than_optimum(instance):
    options, budgets, fixed = instance
    try:
        expected = solve_brute_force(options, budgets, fixed=fixed)
    except InfeasibleBudgetError:
        return
    greedy = solver_module._greedy_solution(options, budgets, fixed=fixed)
    if greedy is None:
        assert len(budgets) > 1, "with one row the cheapest start always fits"
        return
    _check_plan(options, budgets, fixed, greedy)
    assert greedy.objective >= expected.objective - 1e-12


def test_row_infeasible_names_exact_minimum():
    options = {
        "a": [_opt(0.0, memory=500), _opt(1.0, memory=300)],
        "b": [_opt(0.0, memory=900), _opt(2.0, memory=734)],
    }
    with pytest.raises(InfeasibleBudgetError) as caught:
        solve(options, {"memory": 1000}, fixed={"memory": 200})
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.row, error.budget, error.minimum) == ("memory", 1000, 1234)
    assert "1234" in str(error) and "1.2 KB" in str(error) and "target_memory" in str(error)
    with pytest.raises(InfeasibleBudgetError) as caught:
        solve_brute_force(options, {"memory": 1000}, fixed={"memory": 200})
    assert caught.value.minimum == 1234


def test_exact_minimum_budget_is_feasible():
    options = {
        "a": [_opt(0.0, memory=500), _opt(1.0, memory=300)],
        "b": [_opt(0.0, memory=900), _opt(2.0, memory=734)],
    }
    solution = solve(options, {"memory": 1234}, fixed={"memory": 200})
    assert solution.choice == {"a": 1, "b": 1}
    assert solution.totals == {"memory": 1234}


def test_second_row_infeasible_names_that_row():
    options = {"a": [_opt(0.0, memory=10, latency_ns=70), _opt(1.0, memory=5, latency_ns=50)]}
    with pytest.raises(InfeasibleBudgetError) as caught:
        solve(options, {"memory": 100, "latency_ns": 40}, fixed={"latency_ns": 5})
    assert (caught.value.row, caught.value.minimum) == ("latency_ns", 55)
    assert "55" in str(caught.value)


def test_jointly_infeasible_rows():
    # Each row alone can be met (take the option that is free in it) but not both at once.
    node = [_opt(0.0, memory=10, latency_ns=0), _opt(0.0, memory=0, latency_ns=10)]
    options = {"a": node, "b": node}
    budgets = {"memory": 10, "latency_ns": 9}
    for run in (solve, solve_brute_force):
        with pytest.raises(InfeasibleBudgetError) as caught:
            run(options, budgets)
        error = caught.value
        assert error.row is None and error.budget is None and error.minimum is None
        assert error.minimums == {"memory": 0, "latency_ns": 0}
        assert "jointly infeasible" in str(error)


def test_dominated_options_map_back_to_caller_indices():
    options = {
        # 0 is dominated by 2 (same memory, more error); 1 and 3 are exact ties.
        "a": [
            _opt(5.0, "a0", memory=40),
            _opt(1.0, "a1", memory=60),
            _opt(2.0, "a2", memory=40),
            _opt(1.0, "a3", memory=60),
        ],
        "b": [_opt(9.0, "b0", memory=30), _opt(3.0, "b1", memory=10), _opt(0.0, "b2", memory=50)],
    }
    solution = solve(options, {"memory": 70}, workers=1)
    assert solution.choice == {"a": 1, "b": 1}
    assert solution.objective == 4.0
    assert solution.choice == solve_brute_force(options, {"memory": 70}).choice
    problem = solver_module._prune_dominated(solver_module._validate(options, {"memory": 70}, None))
    assert [idx.tolist() for idx in problem.index] == [[1, 2], [1, 2]]


def test_option_lacking_a_row_costs_zero_in_it():
    options = {
        "a": [_opt(0.0, memory=10, latency_ns=100), _opt(1.0, memory=10)],
        "b": [_opt(0.0, memory=5, latency_ns=100), _opt(3.0, memory=5, latency_ns=1)],
    }
    solution = solve(options, {"memory": 100, "latency_ns": 101})
    assert solution.choice == {"a": 1, "b": 0}
    assert solution.totals == {"memory": 15, "latency_ns": 100}


def test_unbudgeted_rows_are_ignored():
    options = {"a": [_opt(0.0, memory=10, latency_ns=10**9), _opt(1.0, memory=1)]}
    solution = solve(options, {"memory": 10})
    assert solution.choice == {"a": 0}
    assert solution.totals == {"memory": 10}


def test_no_nodes():
    solution = solve({}, {"memory": 10}, fixed={"memory": 4})
    assert (solution.choice, solution.objective, solution.status) == ({}, 0.0, "OPTIMAL")
    assert solution.totals == {"memory": 4}


def test_empty_option_list_names_the_node():
    with pytest.raises(ValueError, match="'layer3'"):
        solve({"layer1": [_opt(0.0, memory=1)], "layer3": []}, {"memory": 10})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_bad_error_names_node_and_option(bad):
    options = {"fc": [_opt(0.0, memory=1), _opt(bad, "rank8", memory=1)]}
    for run in (solve, solve_brute_force):
        with pytest.raises(ValueError, match=r"node 'fc' option 1 \(key='rank8'\)"):
            run(options, {"memory": 10})


def test_negative_cost_rejected():
    with pytest.raises(ValueError, match="costs must be >= 0"):
        solve({"fc": [_opt(0.0, memory=-1)]}, {"memory": 10})


def test_brute_force_refuses_large_instances():
    options = {f"n{k}": [_opt(float(i), memory=i) for i in range(10)] for k in range(7)}
    with pytest.raises(ValueError, match="10000000 plans"):
        solve_brute_force(options, {"memory": 10})


def test_importing_solver_does_not_import_ortools():
    code = "import sys, cost_model.solver; assert 'ortools' not in sys.modules, 'ortools imported'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def _spectra_instance(num_nodes: int, num_options: int, seed: int) -> dict[str, list[Option]]:
    """Errors decreasing and convex in bytes, like truncated-SVD spectra."""
    rng = np.random.default_rng(seed)
    options = {}
    for k in range(num_nodes):
        width = int(rng.integers(64, 1024))
        ranks = np.arange(1, num_options + 1) * max(1, width // num_options)
        decay = rng.uniform(0.5, 2.0)
        errors = rng.lognormal(0, 1) * np.exp(-decay * np.arange(num_options) / 4)
        options[f"layer{k}"] = [
            Option(key=int(r), error=float(e), costs={"memory": int(r) * width * 4})
            for r, e in zip(ranks, errors)
        ]
    return options


def test_two_hundred_by_thirty_respects_budget():
    options = _spectra_instance(200, 30, seed=0)
    all_max = sum(max(o.costs["memory"] for o in opts) for opts in options.values())
    budgets = {"memory": int(0.4 * all_max)}
    solution = solve(options, budgets, time_limit_s=10.0)
    assert solution.status in ("OPTIMAL", "FEASIBLE")
    _check_plan(options, budgets, None, solution)
    greedy = solver_module._greedy_solution(options, budgets)
    assert solution.objective <= greedy.objective


def test_deterministic_with_one_worker():
    options = _spectra_instance(40, 12, seed=1)
    all_max = sum(max(o.costs["memory"] for o in opts) for opts in options.values())
    budgets = {"memory": int(0.5 * all_max)}
    first = solve(options, budgets, workers=1, seed=3)
    second = solve(options, budgets, workers=1, seed=3)
    assert first.status == "OPTIMAL"
    assert (first.choice, first.objective) == (second.choice, second.objective)


def test_returns_greedy_when_cp_sat_finds_nothing(monkeypatch):
    options = _spectra_instance(10, 6, seed=2)
    budgets = {"memory": int(0.5 * sum(max(o.costs["memory"] for o in opts) for opts in options.values()))}
    monkeypatch.setattr(solver_module, "_solve_cpsat", lambda *args: ("UNKNOWN", None, None))
    solution = solve(options, budgets)
    assert solution.status == "GREEDY"
    _check_plan(options, budgets, None, solution)
    assert solution.objective == solver_module._greedy_solution(options, budgets).objective


def test_loose_budget_takes_every_best_option():
    options = _spectra_instance(5, 4, seed=3)
    solution = solve(options, {"memory": 10**12})
    assert solution.status == "OPTIMAL" and solution.bound == solution.objective
    assert all(i == int(np.argmin([o.error for o in options[n]])) for n, i in solution.choice.items())
