"""What the structured families share: exact pricing, real bytes, exclusions, and the solver mixing them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toy_models import Wrap, tiny_gpt2

import passes
from cost_model import collect_statistics, perturbation_error, stored_bytes
from ir import sites_from_modules
from passes.blockdiag import (
    BlockDiagConfig,
    BlockDiagLinear,
    BlockDiagTransform,
    blockdiag_dense,
)
from passes.kronecker import (
    KroneckerConfig,
    KroneckerLinear,
    KroneckerTransform,
    kronecker_dense,
)
from passes.monarch import MonarchConfig, MonarchLinear, MonarchTransform, monarch_dense
from passes.transform import Workspace

FAMILIES = [MonarchTransform(), KroneckerTransform(), BlockDiagTransform()]
MODULES = (MonarchLinear, KroneckerLinear, BlockDiagLinear)


def _anisotropic_batches(dim, n=4, rows=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5
    return [((torch.randn(rows, dim, generator=g) * torch.logspace(0, -2, dim)) @ mix,) for _ in range(n)]


@pytest.mark.parametrize("transform", FAMILIES, ids=lambda t: t.name)
@pytest.mark.parametrize("sensitivity_batches", [0, 2])
def test_priced_error_is_the_rewritten_modules_perturbation_error(transform, sensitivity_batches):
    torch.manual_seed(0)
    model = Wrap(nn.Linear(48, 40))
    batches = _anisotropic_batches(48)
    site = sites_from_modules(model, ["layer.weight"])[0]
    stats = collect_statistics(model, [site], batches, progress=False, sensitivity_batches=sensitivity_batches)
    ws = Workspace(stats=stats)
    cands = transform.candidates(site, model, ws)
    assert cands and all(c.config.activation_aware for c in cands)
    w = model.layer.weight.detach().clone()
    for cand in cands[:: max(1, len(cands) // 3)]:
        rewritten = Wrap(nn.Linear(48, 40))
        rewritten.load_state_dict(model.state_dict())
        transform.rewrite(rewritten, site, cand.config, ws)
        assert isinstance(rewritten.layer, MODULES)
        dense = rewritten.layer.dense().detach().double()
        want = perturbation_error(site, stats[site.name], w, w.double() - dense)
        assert cand.error == pytest.approx(want, rel=1e-4, abs=1e-9)
        x = batches[0][0]
        torch.testing.assert_close(rewritten(x), x @ dense.float().T + model.layer.bias, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("transform", FAMILIES, ids=lambda t: t.name)
def test_data_free_error_is_the_relative_weight_error(transform):
    torch.manual_seed(0)
    model = Wrap(nn.Linear(40, 48, bias=False))
    site = sites_from_modules(model, ["layer.weight"])[0]
    ws = Workspace()
    for cand in transform.candidates(site, model, ws)[:3]:
        assert not cand.config.activation_aware
        factors = transform.factorize(site, model, cand.config, ws)
        module = transform.build(factors, None, cand.config, 48, 40)
        w = model.layer.weight.detach().double()
        assert cand.error == pytest.approx(((w - module.dense()).square().sum() / w.square().sum()).item(), rel=1e-6)


@pytest.mark.parametrize("transform", FAMILIES, ids=lambda t: t.name)
def test_stored_bytes_move_exactly_by_the_priced_bytes(transform):
    torch.manual_seed(0)
    model = Wrap(nn.Linear(96, 64))
    site = sites_from_modules(model, ["layer.weight"])[0]
    ws = Workspace()
    for cand in transform.candidates(site, model, ws)[-2:]:
        copy = Wrap(nn.Linear(96, 64))
        before = stored_bytes(copy)
        transform.rewrite(copy, site, cand.config, ws)
        assert stored_bytes(copy) == before - site.nbytes + cand.nbytes
        assert cand.nbytes < site.nbytes


class _Tagger(nn.Module):
    """A lookup table, a square layer and a 3-output head: two sites a structure cannot take."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 32)
        self.mix = nn.Linear(32, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, ids):
        return self.head(torch.relu(self.mix(self.embed(ids))))


def test_sites_a_structure_cannot_take_are_excluded_and_reported():
    torch.manual_seed(0)
    model = _Tagger().eval()
    batches = [(torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    opt = passes.optimize(
        model, batches[0], target_memory=0.9, calibration=batches, transforms=("monarch", "blockdiag"), progress=False
    )
    excluded = {(site, t): reason for site, t, reason in opt.report.excluded}
    assert set(excluded) == {(s, t) for s in ("embed.weight", "head.weight") for t in ("monarch", "blockdiag")}
    assert "lookup table" in excluded[("embed.weight", "monarch")] and "3×32" in excluded[("head.weight", "monarch")]
    assert "no options from a requested transform" in str(opt.report) and "lookup table" in str(opt.report)
    assert passes.Report.from_dict(opt.report.to_dict()).excluded == opt.report.excluded
    site = sites_from_modules(model, ["embed.weight"])[0]
    with pytest.raises(ValueError, match="lookup table"):
        MonarchTransform().rewrite(model, site, MonarchConfig(4, 1, False), Workspace())
    tiny = Wrap(nn.Linear(3, 3))
    site = sites_from_modules(tiny, ["layer.weight"])[0]
    ws = Workspace()
    assert all(t.candidates(site, tiny, ws) == [] for t in FAMILIES)
    assert [t for _, t, _ in ws.excluded] == ["monarch", "kronecker", "blockdiag"]
    with pytest.raises(ValueError, match="at most 3"):
        MonarchTransform().rewrite(tiny, site, MonarchConfig(8, 1, False), Workspace())


def test_gpt2_conv1d_sites_are_rewritten():
    model = tiny_gpt2()
    site = sites_from_modules(model, ["transformer.h.0.mlp.c_fc.weight"])[0]
    x = torch.randn(2, 5, 64)
    for transform, config in [
        (MonarchTransform(), MonarchConfig(4, 2, False)),
        (KroneckerTransform(), KroneckerConfig(8, 8, 2, False)),
        (BlockDiagTransform(), BlockDiagConfig(4, True, False)),
    ]:
        copy = tiny_gpt2()
        transform.rewrite(copy, site, config, Workspace())
        layer = copy.transformer.h[0].mlp.c_fc
        torch.testing.assert_close(layer(x), x @ layer.dense().T + layer.bias)


def test_the_solver_mixes_structured_families_with_the_others():
    """Planted structures: each exact layer takes its own family; the rest low-rank/quantized."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    mon = nn.Linear(64, 64)
    mon.weight.data = monarch_dense(torch.randn(8, 8, 8, generator=g), torch.randn(8, 8, 8, generator=g), 64, 64) / 8
    kron = nn.Linear(64, 64)
    kron.weight.data = kronecker_dense(torch.randn(1, 8, 8, generator=g), torch.randn(1, 8, 8, generator=g), 64, 64) / 8
    block = nn.Linear(64, 64)
    perm = torch.randperm(64, generator=g).int()
    block.weight.data = blockdiag_dense(torch.randn(4, 16, 16, generator=g), 64, 64, perm, perm) / 4
    dense = nn.Linear(64, 64)
    model = nn.Sequential(mon, nn.Tanh(), kron, nn.Tanh(), block, nn.Tanh(), dense).eval()
    batches = _anisotropic_batches(64, n=3)
    opt = passes.optimize(
        model,
        batches[0],
        target_memory=0.45,
        calibration=batches,
        transforms=("lowrank", "quantize", "monarch", "kronecker", "blockdiag"),
        progress=False,
    )
    families = {name: type(c).__name__ for name, c in opt.plan.entries.items()}
    assert families["0.weight"] == "MonarchConfig"
    assert families["2.weight"] == "KroneckerConfig"
    assert families["4.weight"] == "BlockDiagConfig"
    assert opt.report.bytes_after <= opt.report.target_bytes
    x = batches[1][0]
    assert ((opt(x) - model(x)).norm() / model(x).norm()).item() < 0.05
    replayed = passes.apply(model, opt.plan, calibration=batches, progress=False)
    torch.testing.assert_close(replayed(x), opt(x))


def _every_structure(out: int):
    """(model, plan, rewritten model): a 3-layer MLP with one Monarch, one Kronecker, one block-diagonal layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.GELU(), nn.Linear(64, out)).eval()
    plan = passes.Plan(
        {
            "0.weight": MonarchConfig(4, 2, False),
            "2.weight": KroneckerConfig(8, 8, 3, False),
            "4.weight": BlockDiagConfig(4, True, False),
        }
    )
    return model, plan, passes.apply(model, plan, progress=False)


def test_save_and_load_restore_structured_factors(tmp_path):
    model, plan, optimized = _every_structure(out=64)
    passes.save(optimized, tmp_path)
    restored = passes.load(tmp_path, model)
    x = torch.randn(5, 64)
    assert torch.equal(restored(x), optimized(x))
    assert passes.Plan.from_json(plan.to_json()).entries == plan.entries


def test_structured_modules_export_to_onnx_runtime(tmp_path):
    pytest.importorskip("onnxruntime")
    from passes.export import OnnxModule

    _, _, optimized = _every_structure(out=40)
    passes.export_onnx(optimized, (torch.randn(5, 64),), tmp_path / "model.onnx")
    x = torch.randn(7, 64)  # another batch size: the export is dynamic
    torch.testing.assert_close(OnnxModule(tmp_path / "model.onnx")(x), optimized(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("transform", "config"),
    [
        (MonarchTransform(), MonarchConfig(4, 2)),
        (KroneckerTransform(), KroneckerConfig(4, 6, 4)),
        (BlockDiagTransform(), BlockDiagConfig(4)),
    ],
    ids=lambda x: getattr(x, "name", ""),
)
def test_the_ridge_keeps_fits_from_amplifying_unseen_directions(transform, config):
    """Inputs whose spectrum spans six decades: an undamped least-squares fit buys calibration
    error with directions the inputs barely excite (on SmolLM2 that made a perplexity of 1.3M)."""
    from passes.structured_base import Problem

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=g, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))[0]
    x = (torch.randn(200, 48, generator=g, dtype=torch.float64) * torch.logspace(0, -6, 48, dtype=torch.float64)) @ rotation
    c = x.T @ x / 200

    def fitted(damping):
        fit = transform.fit(Problem(w, c, 1.0, damping), [config])[0]
        return transform.build(fit.factors, None, config, 32, 48).dense(), fit.squared_error

    undamped, _ = fitted(0.0)
    damped, priced = fitted(None)
    d = w - damped
    assert priced == pytest.approx(((d @ c) * d).sum().item(), rel=1e-6)  # exact for C, not the damped C
    assert damped.norm() < 1.35 * w.norm() < undamped.norm()
    assert d.square().sum() < 0.6 * (w - undamped).square().sum()
