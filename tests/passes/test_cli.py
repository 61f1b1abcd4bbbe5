"""The decomp command line on a factory model (the packaged real models run in the demo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import passes
from passes.cli import main

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _factories_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def test_optimize_then_report(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["optimize", "factories:mlp_with_data", "--target-memory", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "memory (measured from stored tensors)" in printed and "predicted loss increase" in printed  # factory data
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "plan.json", "report.json", "report.txt"}
    assert main(["report", str(out)]) == 0
    assert "fc2.weight" in capsys.readouterr().out

    from factories import mlp_with_data

    model, example, _ = mlp_with_data()
    restored = passes.load(out, model)
    assert restored.report.bytes_after <= 0.5 * restored.report.bytes_before
    assert torch.isfinite(restored(example[0])).all()


def test_target_memory_in_bytes(tmp_path):
    assert main(["optimize", "factories:mlp_with_data", "--target-memory", "40000", "--out", str(tmp_path)]) == 0
    assert passes.Plan.load(tmp_path / "plan.json").meta["target_bytes"] == 40000


@pytest.mark.parametrize(
    "argv, message",
    [
        (["optimize", "factories:mlp_only", "--target-memory", "0.5", "--out", "x"], "returned only a model"),
        (["optimize", "factories:nope", "--target-memory", "0.5", "--out", "x"], "cannot load factory"),
        (["optimize", "no-such-model", "--target-memory", "0.5", "--out", "x"], "unknown MODEL"),
        (["optimize", "factories:mlp_with_data", "--target-memory", "half", "--out", "x"], "fraction in"),
        (["report", "/nonexistent"], "not found"),
    ],
)
def test_errors(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_infeasible_budget_is_one_line_naming_the_minimum(tmp_path, capsys):
    """A typed API error reaches the user as one line on stderr and exit code 2, no traceback."""
    code = main(["optimize", "factories:mlp_with_data", "--target-memory", "16", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "InfeasibleBudgetError" in err and "raise target_memory to at least" in err
    assert "Traceback" not in err
