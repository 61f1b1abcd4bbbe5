"""Structured matrices (Monarch, Kronecker, block-diagonal): optimality, speed, solver choices, training.

Four sections, each printing its table (run one with ``--sections``):

``optimality``  On small shapes, the closed-form Frobenius projections against a gradient-
                descent search over the same structure from many random starts (Adam, then
                a decaying step): ours must be no worse than the best search result by more
                than 1e-6 relative. Also the activation-aware fits against the same search on
                the weighted objective ``tr(ΔCΔᵀ)``, where no closed form exists (reported,
                no target).
``speed``       ``MonarchLinear`` forward (two bmm's, ``passes.monarch.monarch_forward``) against
                the dense matmul of the materialised matrix, 4096 × 4096, 64 blocks, 2048 rows,
                fp32 CPU, interleaved repeats, medians; the outputs compared.
``models``      SmolLM2-135M and MiniLM: every family's options enumerated once (16 × 256
                calibration tokens), then the solver at each budget for several sets of
                transforms; per plan: options chosen per family, stored bytes, estimated error,
                and the metric (SmolLM2 perplexity on 8,192 Wikipedia tokens, MiniLM mean cosine
                of sentence vectors). Also, per family, on how many sites one of its options is
                on the site's (bytes, error) Pareto front among low-rank and structured options.
``training``    ``passes.reparametrize`` on a small MLP trained on a synthetic task with a
                low-rank and a full-rank target: loss after the projection, after fine-tuning,
                fine-tuning the factors only, and the same structure from a random start.

    python benchmarks/structured.py [--sections optimality speed models training]
                                    [--models smollm2 minilm] [--budgets 0.9 0.7] [--calibration 16]
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import passes
from cost_model import collect_statistics, stored_bytes
from cost_model.solver import InfeasibleBudgetError
from ir import capture, find_weight_sites
from passes import evaluate, zoo
from passes.blockdiag import BlockDiagConfig
from passes.kronecker import KroneckerConfig, kronecker_dense, project_kronecker
from passes.monarch import MonarchConfig, MonarchLinear, monarch_dense, project_monarch
from passes.pipeline import _enumerate_options, _rewrite, _solve
from passes.transform import Workspace, transform_for

STRUCTURED = ("monarch", "kronecker", "blockdiag")


# ---- optimality -----------------------------------------------------------------------------


def _search(loss_fn, shapes, starts: int, steps: int, seed: int = 0) -> float:
    """Best loss of Adam (then a decaying learning rate) from ``starts`` random points."""
    best = math.inf
    for start in range(starts):
        g = torch.Generator().manual_seed(seed + start)
        params = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]
        opt = torch.optim.Adam(params, lr=0.05)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn(*params)
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            best = min(best, loss_fn(*params).item())
    return best


def _compare(family, cfg, w, cov, c, starts, steps) -> tuple[float, float, str]:
    """(our error, the search's best error, label) of one case, on ``tr(ΔCΔᵀ)``."""
    out, inn = w.shape

    def objective(dense):
        d = w - dense
        return ((d @ c) * d).sum()

    if family == "monarch":
        b, k = cfg
        s, p = -(-out // b), -(-inn // b)
        ours = objective(monarch_dense(*project_monarch(w, b, k, cov), out, inn)).item()
        found = _search(lambda L, R: objective(monarch_dense(L, R, out, inn)), [(b, s, b * k), (b, k * b, p)], starts, steps)
        return ours, found, f"b={b} k={k}"
    (a_out, a_in), r = cfg
    b_out, b_in = -(-out // a_out), -(-inn // a_in)
    ours = objective(kronecker_dense(*project_kronecker(w, (a_out, a_in), r, cov), out, inn)).item()
    found = _search(lambda A, B: objective(kronecker_dense(A, B, out, inn)), [(r, a_out, a_in), (r, b_out, b_in)], starts, steps)
    return ours, found, f"A {a_out}×{a_in}, r={r}"


def optimality(starts: int, steps: int) -> None:
    print("\n## Projection optimality: closed form vs gradient-descent search (best of "
          f"{starts} starts × {steps} steps)\n")
    print("| structure | shape | objective | ours (relative) | search (relative) | ours / search − 1 |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    cases = []
    for out, inn, b, k in [(8, 8, 2, 1), (12, 16, 4, 1), (16, 16, 4, 2), (10, 14, 3, 1)]:
        cases.append(("monarch", out, inn, (b, k)))
    for out, inn, shape, r in [(6, 6, (2, 3), 2), (12, 8, (3, 2), 1), (16, 16, (4, 4), 3), (9, 15, (3, 5), 2)]:
        cases.append(("kronecker", out, inn, (shape, r)))
    worst = -math.inf
    for family, out, inn, cfg in cases:
        w = torch.randn(out, inn, generator=g, dtype=torch.float64)
        x = torch.randn(4 * inn, inn, generator=g, dtype=torch.float64) * torch.logspace(0, -1, inn, dtype=torch.float64)
        x = x @ torch.randn(inn, inn, generator=g, dtype=torch.float64) / inn**0.5
        for cov in (None, x.T @ x / x.shape[0]):
            c = torch.eye(inn, dtype=torch.float64) if cov is None else cov
            total = ((w @ c) * w).sum().item()
            ours, found, label = _compare(family, cfg, w, cov, c, starts, steps)
            gap = ours / found - 1
            if cov is None:
                worst = max(worst, gap)
            name = "‖Δ‖² (closed form)" if cov is None else "tr(ΔCΔᵀ) (weighted fit)"
            print(f"| {family} {label} | {out}×{inn} | {name} | {ours / total:.6g} | {found / total:.6g} | {gap:+.2e} |", flush=True)
    print(f"\nclosed forms: worst ours/search − 1 = {worst:+.2e} (target ≤ 1e-6): {'met' if worst <= 1e-6 else 'NOT met'}")


# ---- speed ----------------------------------------------------------------------------------


def speed(repeats: int) -> None:
    print(f"\n## Monarch forward vs dense matmul (CPU fp32, {torch.get_num_threads()} threads, median of {repeats})\n")
    print("| shape | blocks | rank | rows | dense ms | monarch ms | speed-up | max rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for n, b, k, rows in [(4096, 64, 1, 2048), (4096, 64, 2, 2048), (4096, 16, 4, 2048), (4096, 64, 1, 128)]:
        g = torch.Generator().manual_seed(0)
        s = p = n // b
        L = torch.randn(b, s, b * k, generator=g) / (b * k) ** 0.5
        R = torch.randn(b, k * b, p, generator=g) / p**0.5
        module = MonarchLinear(nn.Parameter(L), nn.Parameter(R), None, n, n)
        w = module.dense().detach().contiguous()
        x = torch.randn(rows, n, generator=g)
        times = {"dense": [], "monarch": []}
        with torch.no_grad():
            for _ in range(repeats):
                for name, fn in (("dense", functools.partial(F.linear, x, w)), ("monarch", functools.partial(module, x))):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            ref, got = F.linear(x, w), module(x)
        diff = ((got - ref).abs().max() / ref.abs().max()).item()
        td, tm = statistics.median(times["dense"]), statistics.median(times["monarch"])
        print(f"| {n}×{n} | {b} | {k} | {rows} | {td * 1e3:.1f} | {tm * 1e3:.1f} | {td / tm:.1f}× | {diff:.1e} |", flush=True)


# ---- models ---------------------------------------------------------------------------------


def _load(name: str, n_calibration: int):
    model, tok = zoo.load_packaged(name)
    batches = zoo.calibration_batches(tok, n_seqs=n_calibration, seq_len=256)
    if name == "smollm2":
        tokens = zoo.wiki_tokens(tok, "evaluation", 8192)
        example = (batches[0][0][:1, :32],)

        def measure(m):
            return f"ppl {evaluate.perplexity(m, tokens, progress=False):.2f}"

    else:
        sentences = zoo.wiki_sentences("evaluation", 512)
        example = (zoo.wiki_tokens(tok, "calibration", 32)[None],)

        def measure(m):
            f = evaluate.embedding_fidelity(model, m, tok, sentences)
            return f"cos {f['cosine']:.4f} nn {f['nn_agreement']:.3f}"

    return model, example, batches, measure


def _family(config) -> str:
    return transform_for(config).name if not isinstance(config, passes.KeepConfig) else "dense"


def _pareto_families(cands) -> set[str]:
    """Families with an option on the (bytes, error) Pareto front of one site."""
    front = set()
    for c in cands:
        dominated = any(
            o is not c and o.nbytes <= c.nbytes and o.error <= c.error and (o.nbytes < c.nbytes or o.error < c.error)
            for o in cands
        )
        if not dominated:
            front.add(_family(c.config))
    return front


def models(names, budgets, n_calibration: int) -> None:
    subsets = {
        "lowrank": ("lowrank",),
        "lowrank+structured": ("lowrank", *STRUCTURED),
        "structured": STRUCTURED,
        "monarch": ("monarch",),
        "lowrank+quantize": ("lowrank", "quantize"),
        "lowrank+quantize+structured": ("lowrank", "quantize", *STRUCTURED),
    }
    for name in names:
        torch.manual_seed(0)
        model, example, batches, measure = _load(name, n_calibration)
        sites, _ = find_weight_sites(capture(model, example), model)
        t0 = time.perf_counter()
        ws = Workspace(stats=collect_statistics(model, sites, batches, progress=False))
        print(f"\n## {name}: {len(sites)} weight sites, calibration {n_calibration}×256 tokens ({time.perf_counter() - t0:.0f}s)\n")
        per_family: dict[str, dict[str, list]] = {}
        seconds = {}
        for family in ("lowrank", "quantize", *STRUCTURED):
            t0 = time.perf_counter()
            opts = _enumerate_options(model, sites, (family,), ws, progress=False)
            seconds[family] = time.perf_counter() - t0
            per_family[family] = {site: cands[1:] for site, cands in opts.items()}
            n = sum(len(c) for c in per_family[family].values())
            print(f"{name}: {family} options: {n} over {sum(bool(c) for c in per_family[family].values())} sites, {seconds[family]:.0f}s", flush=True)
        keep = {site: opts[site][0] for site in opts}
        excluded = collections.Counter((t, r) for _, t, r in ws.excluded)
        for (t, r), n in excluded.items():
            print(f"{name}: {t} excluded {n} site(s): {r}")

        fronts = collections.Counter()
        for site, dense_option in keep.items():
            cands = [dense_option] + [c for f in ("lowrank", *STRUCTURED) for c in per_family[f][site]]
            fronts.update(_pareto_families(cands) - {"dense"})
        print(f"\n{name}: sites where a family has an option on the (bytes, error) Pareto front of low-rank + structured "
              f"options ({len(keep)} sites): " + ", ".join(f"{f} {fronts[f]}" for f in ("lowrank", *STRUCTURED)))

        dense_bytes = stored_bytes(model)
        fixed = dense_bytes - sum(s.nbytes for s in sites)
        print(f"\n{name} dense: {dense_bytes} bytes, {measure(model)}\n")
        print("| budget | transforms | chosen per family | stored | est. error | metric |")
        print("|---|---|---|---|---|---|")
        evaluated: dict[tuple, str] = {}
        for budget in budgets:
            target = int(budget * dense_bytes)
            for label, families in subsets.items():
                options = {site: [keep[site]] + [c for f in families for c in per_family[f][site]] for site in keep}
                try:
                    solution = _solve(options, {k: [0] * len(v) for k, v in options.items()}, target, None,
                                      fixed_bytes=fixed, time_limit_s=10.0)
                except InfeasibleBudgetError as exc:
                    print(f"| {budget} | {label} | infeasible: {exc} | | | |", flush=True)
                    continue
                chosen = {site: options[site][i] for site, i in solution.choice.items()}
                plan = passes.Plan({site: c.config for site, c in chosen.items()})
                counts = collections.Counter(_family(c.config) for c in chosen.values())
                key = tuple(sorted((s, repr(c)) for s, c in plan.entries.items()))
                nbytes = fixed + sum(c.nbytes for c in chosen.values())
                if key not in evaluated:
                    rewritten = _rewrite(copy.deepcopy(model), sites, plan, ws, progress=False)
                    nbytes = stored_bytes(rewritten)
                    evaluated[key] = measure(rewritten)
                    del rewritten
                summary = ", ".join(f"{f} {n}" for f, n in sorted(counts.items(), key=lambda kv: -kv[1]))
                print(f"| {budget} | {label} | {summary} | {nbytes / dense_bytes:.3f} | {solution.objective:.4g} | {evaluated[key]} |", flush=True)
        print(f"\n{name}: options time per family: " + ", ".join(f"{f} {s:.0f}s" for f, s in seconds.items()))


# ---- training -------------------------------------------------------------------------------


def _closest(family: str, out: int, inn: int, ratio: float):
    """A config of ``family`` storing about ``ratio`` of an (out × in) weight."""
    target = ratio * out * inn
    if family == "monarch":
        s, p = -(-out // 4), -(-inn // 4)
        k = max(1, round(target / (16 * (s + p))))
        return MonarchConfig(4, min(k, min(s, p) - 1))
    if family == "lowrank":
        return passes.LowRankConfig(max(1, round(target / (out + inn))))
    if family == "kronecker":
        a_out, a_in = 4, 4
        per = a_out * a_in + (-(-out // a_out)) * (-(-inn // a_in))
        return KroneckerConfig(a_out, a_in, max(1, round(target / per)))
    return BlockDiagConfig(max(2, round(1 / ratio)))


class _Task:
    """A regression task y = teacher(x) + noise with anisotropic, correlated inputs."""

    def __init__(self, width: int, d_in: int = 96, d_out: int = 48):
        torch.manual_seed(0)
        self.mixing = torch.randn(d_in, d_in) * torch.logspace(0, -1.5, d_in)
        self.teacher = nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, d_out))
        self.x_eval, self.y_eval = self.batch(4096)

    def batch(self, n: int = 128):
        x = torch.randn(n, self.mixing.shape[0]) @ self.mixing
        with torch.no_grad():
            y = self.teacher(x)
        return x, y + 0.01 * torch.randn_like(y)

    def loss(self, model: nn.Module) -> float:
        with torch.no_grad():
            return F.mse_loss(model(self.x_eval), self.y_eval).item()

    def train(self, model: nn.Module, steps: int) -> nn.Module:
        model.train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(steps):
            x, y = self.batch()
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
        return model.eval()


def _redrawn(model: nn.Module) -> nn.Module:
    """The same structure and biases with every factor redrawn at its projected scale."""
    scratch = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in scratch.named_parameters():
            if not n.endswith("bias"):
                p.copy_(torch.randn_like(p) * p.std())
    return scratch


def training(steps: int, pretrain: int) -> None:
    print(f"\n## Training from the reparametrised start (MLP 96-384-48, ~1/4 of the weights, {steps} Adam steps)\n")
    for target_kind, width in (("low-rank target", 24), ("full-rank target", 384)):
        task = _Task(width)
        dense = task.train(nn.Sequential(nn.Linear(96, 384), nn.GELU(), nn.Linear(384, 48)), pretrain)
        calibration = [(task.batch()[0],) for _ in range(4)]
        more = task.loss(task.train(copy.deepcopy(dense), steps))
        print(f"{target_kind}: dense eval MSE {task.loss(dense):.4f} after {pretrain} steps ({more:.4f} after {steps} more)\n")
        print("| structure | weights | projected | fine-tuned | factors only | random start |")
        print("|---|---|---|---|---|---|")
        for family in ("monarch", "lowrank", "kronecker", "blockdiag"):
            structure = functools.partial(_structure_for, family)
            m = passes.reparametrize(dense, structure, calibration=calibration)
            weights = sum(p.numel() for n, p in m.named_parameters() if not n.endswith("bias"))
            tuned = task.loss(task.train(copy.deepcopy(m), steps))
            frozen = passes.reparametrize(dense, structure, calibration=calibration, factors_only=True)
            only = task.loss(task.train(frozen, steps))
            fresh = task.loss(task.train(_redrawn(m), steps))
            configs = " / ".join(sorted({c.describe() for c in m.plan.entries.values()}))
            print(f"| {configs} | {weights} | {task.loss(m):.4f} | {tuned:.4f} | {only:.4f} | {fresh:.4f} |", flush=True)
        print()


def _structure_for(family: str, path: str, module: nn.Module):
    return _closest(family, module.out_features, module.in_features, 0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", default=["optimality", "speed", "models", "training"])
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.9, 0.7])
    parser.add_argument("--calibration", type=int, default=16)
    parser.add_argument("--starts", type=int, default=30)
    parser.add_argument("--search-steps", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--train-steps", type=int, default=600)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; the machine may be shared: times are medians or single runs")
    if "optimality" in args.sections:
        optimality(args.starts, args.search_steps)
    if "speed" in args.sections:
        speed(args.repeats)
    if "training" in args.sections:
        training(args.train_steps, pretrain=1000)
    if "models" in args.sections:
        models(args.models, args.budgets, args.calibration)


if __name__ == "__main__":
    main()
