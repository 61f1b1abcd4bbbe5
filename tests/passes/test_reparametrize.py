"""reparametrize: a trainable structured copy, initialised by projection; the user's model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import passes
from passes.blockdiag import BlockDiagLinear
from passes.kronecker import KroneckerLinear
from passes.lowrank import LowRankLinear
from passes.monarch import MonarchLinear

CONFIGS = [
    (passes.MonarchConfig(4, 2), MonarchLinear),
    (passes.LowRankConfig(8), LowRankLinear),
    (passes.KroneckerConfig(8, 8, 2), KroneckerLinear),
    (passes.BlockDiagConfig(4), BlockDiagLinear),
]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 8))


def _data(seed=1, n=256):
    """Inputs near a 12-dimensional subspace (what makes activation-aware fits pay), a smooth target."""
    basis = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g) @ basis + 0.01 * torch.randn(n, 64, generator=g)
    return x, torch.tanh(x[:, :8])


@pytest.mark.parametrize(("config", "cls"), CONFIGS, ids=lambda c: type(c).__name__)
def test_returns_a_trainable_structured_copy_whose_loss_goes_down(config, cls):
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    structured = passes.reparametrize(model, config, layers=["0", "2"])
    assert isinstance(structured[0], cls) and isinstance(structured[2], cls) and isinstance(structured[4], nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and isinstance(model[0], nn.Linear)
    assert set(structured.plan.entries) == {"0.weight", "2.weight"}
    x, y = _data()
    opt = torch.optim.Adam(structured.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.mse_loss(structured(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_projection_start_is_the_projection():
    model = _mlp()
    structured = passes.reparametrize(model, passes.MonarchConfig(4, 2), layers=["0"])
    from passes.monarch import monarch_dense, project_monarch

    L, R = project_monarch(model[0].weight.detach().double(), 4, 2)
    torch.testing.assert_close(structured[0].dense().double(), monarch_dense(L, R, 128, 64), rtol=1e-5, atol=1e-6)


def test_factors_only_trains_only_the_factors():
    model = _mlp()
    structured = passes.reparametrize(model, passes.MonarchConfig(4, 2), layers=["0", "2"], factors_only=True)
    trainable = sorted(n for n, p in structured.named_parameters() if p.requires_grad)
    assert trainable == ["0.L", "0.R", "2.L", "2.R"]
    frozen = {n: p.detach().clone() for n, p in structured.named_parameters() if not p.requires_grad}
    x, y = _data()
    opt = torch.optim.SGD([p for p in structured.parameters() if p.requires_grad], lr=0.1)
    nn.functional.mse_loss(structured(x), y).backward()
    opt.step()
    assert all(torch.equal(frozen[n], p) for n, p in structured.named_parameters() if n in frozen)


def test_calibration_makes_the_projection_activation_aware():
    model = _mlp()
    x, _ = _data()
    plain = passes.reparametrize(model, passes.MonarchConfig(4, 2), layers=["0"])
    aware = passes.reparametrize(model, passes.MonarchConfig(4, 2), layers=["0"], calibration=[(x[:128],), (x[128:],)])
    assert aware.plan.entries["0.weight"].activation_aware and not plain.plan.entries["0.weight"].activation_aware
    xs, _ = _data(seed=7)
    ref = model[0](xs)

    def err(m):
        return ((m[0](xs) - ref).norm() / ref.norm()).item()

    assert err(aware) < 0.8 * err(plain)


def test_patterns_mappings_and_skipped_layers():
    model = _mlp()
    structured = passes.reparametrize(model, {"0": passes.MonarchConfig(4, 2), "*": passes.LowRankConfig(4)})
    assert isinstance(structured[0], MonarchLinear) and isinstance(structured[2], LowRankLinear)
    assert isinstance(structured[4], LowRankLinear)
    # a config that cannot take a layer: skipped (reported) when it came from a pattern ...
    skipping = passes.reparametrize(model, passes.MonarchConfig(16, 1))
    assert isinstance(skipping[0], MonarchLinear) and isinstance(skipping[4], nn.Linear)
    assert [name for name, _ in skipping.skipped] == ["4"] and "at most 8" in skipping.skipped[0][1]
    # ... an error when the layer was named exactly
    with pytest.raises(ValueError, match="4 cannot take"):
        passes.reparametrize(model, passes.MonarchConfig(16, 1), layers=["4"])


def test_bad_input_is_a_typed_error():
    model = _mlp()
    with pytest.raises(TypeError, match="trainable"):
        passes.reparametrize(model, passes.IntNConfig(4, 32))
    with pytest.raises(ValueError, match="matches no module"):
        passes.reparametrize(model, passes.MonarchConfig(4), layers=["nope"])
    with pytest.raises(ValueError, match="Linear and Conv1D"):
        passes.reparametrize(model, passes.MonarchConfig(4), layers=["1"])
    with pytest.raises(ValueError, match="no layer selected"):
        passes.reparametrize(model, lambda path, module: None)
