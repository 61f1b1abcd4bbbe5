"""optimize / apply / save / load end to end on small models, and every bad input."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from toy_models import tiny_llama, token_batches

import passes
from cost_model import CalibrationError, stored_bytes
from passes.lowrank import LowRankLinear

LR = ("lowrank",)  # these tests check low-rank specifics; mixing families is tested with each family


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_optimize_mlp_meets_budget_and_leaves_input_alone(mlp, mlp_batches):
    before = _state(mlp)
    x = mlp_batches[0][0]
    opt = passes.optimize(mlp, (x,), target_memory=0.6, calibration=mlp_batches, transforms=LR, progress=False)
    _assert_same_state(before, _state(mlp))
    assert all(type(m).__name__ != "LowRankLinear" for m in mlp.modules())
    changed = opt.plan.changed()
    assert len(changed) == sum(isinstance(m, LowRankLinear) for m in opt.modules()) >= 1
    assert stored_bytes(opt) <= 0.6 * stored_bytes(mlp)
    assert opt.report.bytes_after == stored_bytes(opt)
    # predicted bytes are exact: fixed part + chosen options
    predicted = stored_bytes(mlp) - sum(s.bytes_before - s.bytes_after for s in opt.report.sites)
    assert predicted == stored_bytes(opt)
    # lossy but bounded: the solver's total relative error estimate bounds what we see
    ref, out = mlp(x), opt(x)
    rel = ((ref - out).norm() / ref.norm()).item()
    assert 0 < rel < 0.5
    assert opt.report.solver["status"] in {"OPTIMAL", "FEASIBLE"}


def test_plan_json_round_trip_and_replay(mlp, mlp_batches):
    opt = passes.optimize(
        mlp, mlp_batches[0], target_memory=0.5, calibration=mlp_batches, transforms=LR, progress=False
    )
    again = passes.Plan.from_json(opt.plan.to_json())
    assert again == opt.plan
    replay = passes.apply(mlp, again, calibration=mlp_batches, progress=False)
    _assert_same_state(_state(opt), _state(replay))
    with pytest.raises(ValueError, match="calibration"):
        passes.apply(mlp, again)


def test_save_load_restores_without_data(tmp_path, mlp, mlp_batches):
    opt = passes.optimize(
        mlp, mlp_batches[0], target_memory=0.5, calibration=mlp_batches, transforms=LR, progress=False
    )
    passes.save(opt, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "plan.json", "report.json", "report.txt"}
    restored = passes.load(tmp_path, mlp)
    x = mlp_batches[1][0]
    torch.testing.assert_close(restored(x), opt(x), rtol=0, atol=0)
    assert restored.report.bytes_after == opt.report.bytes_after


def test_tied_llama_end_to_end(tmp_path):
    model = tiny_llama(tied=True, layers=2)
    batches = token_batches()
    opt = passes.optimize(
        model, (batches[0][0][:1, :16],), target_memory=0.75, calibration=batches, transforms=LR, progress=False
    )
    assert stored_bytes(opt) <= 0.75 * stored_bytes(model)
    assert len(opt.plan.entries) == 15  # one decision for the tied table
    passes.save(opt, tmp_path)
    restored = passes.load(tmp_path, model)
    ids = batches[1][0]
    torch.testing.assert_close(restored(ids).logits, opt(ids).logits, rtol=0, atol=0)


def test_data_free_and_cnn(cnn):
    x = torch.randn(2, 3, 8, 8)
    opt = passes.optimize(cnn, (x,), target_memory=0.9, transforms=LR, progress=False)
    assert "data-free" in opt.report.calibration
    assert all(not c.activation_aware for c in opt.plan.changed().values())
    assert stored_bytes(opt) <= 0.9 * stored_bytes(cnn)
    replay = passes.apply(cnn, opt.plan, progress=False)
    torch.testing.assert_close(replay(x), opt(x), rtol=0, atol=0)


def test_latency_budget_row():
    from toy_models import MLP

    from cost_model.solver import InfeasibleBudgetError

    torch.manual_seed(0)
    model = MLP(512, 512, 512).eval()
    x = torch.randn(256, 512)
    batches = [(torch.randn(256, 512),)]
    opt = passes.optimize(
        model, (x,), target_memory=1.0, target_latency=0.5, calibration=batches, transforms=LR, progress=False
    )
    lat = opt.report.latency
    assert lat["after_s"] <= 0.5 * lat["before_s"] + 1e-9 and opt.plan.changed()
    with pytest.raises(InfeasibleBudgetError, match="target_latency of 0.010 is infeasible") as info:
        passes.optimize(model, (x,), target_memory=1.0, target_latency=0.01, transforms=LR, progress=False)
    assert info.value.row == "latency_ns"


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, math.nan, "half", True, None, 10**12])
def test_bad_target_memory(mlp, bad):
    with pytest.raises(ValueError, match="target_memory must be"):
        passes.optimize(mlp, (torch.randn(2, 48),), target_memory=bad, transforms=LR, progress=False)


def test_infeasible_budget_names_the_minimum(mlp):
    from cost_model.solver import InfeasibleBudgetError

    with pytest.raises(InfeasibleBudgetError) as info:
        passes.optimize(mlp, (torch.randn(2, 48),), target_memory=1000, transforms=LR, progress=False)
    minimum = info.value.minimum
    assert str(minimum) in str(info.value) and minimum > 1000
    opt = passes.optimize(mlp, (torch.randn(2, 48),), target_memory=minimum, transforms=LR, progress=False)
    assert stored_bytes(opt) == minimum


@pytest.mark.parametrize(
    "batches, match",
    [
        ([(torch.randint(0, 5, (4, 48)),)], "does not match"),  # integer dtype
        ([(torch.randn(4, 2, 48),)], "does not match"),  # extra dimension
        ([{"x": torch.randn(4, 48)}], "keyword inputs"),
        ([(torch.randn(4, 17),)], "does not run through"),  # wrong feature size
        ([], "empty"),
    ],
)
def test_bad_calibration(mlp, batches, match):
    with pytest.raises(CalibrationError, match=match):
        passes.optimize(
            mlp, (torch.randn(2, 48),), target_memory=0.5, calibration=batches, transforms=LR, progress=False
        )


def test_nan_weight_is_named(mlp):
    mlp.fc2.weight.data[3, 4] = float("nan")
    with pytest.raises(ValueError, match="fc2.weight"):
        passes.optimize(mlp, (torch.randn(2, 48),), target_memory=0.5, transforms=LR, progress=False)


def test_unknown_transform(mlp):
    with pytest.raises(ValueError, match="available"):
        passes.optimize(mlp, (torch.randn(2, 48),), target_memory=0.5, transforms=("lowrnak",), progress=False)


def test_plan_naming_a_missing_parameter(mlp):
    plan = passes.Plan({"nope.weight": passes.LowRankConfig(4, False)})
    with pytest.raises(ValueError, match="nope.weight"):
        passes.apply(mlp, plan)


def test_import_is_light():
    code = (
        "import sys, torch, passes, ir, cost_model; "
        "heavy = [m for m in ('triton', 'ortools', 'onnx', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy; assert not torch.cuda.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
