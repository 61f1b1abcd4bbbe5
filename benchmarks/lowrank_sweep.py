"""Low-rank on SmolLM2-135M: the solver's plan vs uniform truncation at the same stored bytes.

EVAL.md protocol: perplexity over the first 8,192 Wikipedia evaluation tokens in 512-token
windows; calibration from the calibration split (32 × 256 tokens by default, as in the
issue's reference table). For each whole-model budget it prints the perplexity and the
measured stored bytes of

  (a) passes.optimize's plan (activation-aware estimates, solver picks per-layer ranks),
  (b) uniform whitened (activation-aware) SVD: every linear layer keeps the same fraction of
      its parameters, embedding untouched, fraction chosen to store no more than (a),
  (c) uniform plain SVD at the same ranks as (b),

and each plan's total estimated error (sum of per-layer relative output errors), to check
that the estimate orders plans as perplexity does.

    python benchmarks/lowrank_sweep.py [--budgets 0.92 0.84 0.68] [--calibration 32]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import passes
from cost_model import collect_statistics, stored_bytes
from ir import UseKind, capture, find_weight_sites
from passes import evaluate, zoo
from passes.lowrank import LowRankConfig, LowRankTransform
from passes.pipeline import _rewrite
from passes.transform import Workspace


def uniform_plan(sites, fraction: float, aware: bool) -> passes.Plan:
    """Every linear site keeps ``fraction`` of its parameters; tables stay dense."""
    entries = {}
    for s in sites:
        out, inn = s.matrix_shape
        rank = int(fraction * out * inn / (out + inn))
        linear = all(u.kind is UseKind.LINEAR for u in s.uses)
        entries[s.name] = LowRankConfig(rank, aware) if linear and rank >= 1 else passes.KeepConfig()
    return passes.Plan(entries)


def plan_bytes(model, sites, plan) -> int:
    total = stored_bytes(model)
    for s in sites:
        c = plan.entries.get(s.name)
        if isinstance(c, LowRankConfig):
            out, inn = s.matrix_shape
            total += c.rank * (out + inn) * 4 - s.nbytes
    return total


def estimated_error(model, sites, plan, ws) -> float:
    return sum(
        LowRankTransform.error(s, model, ws, plan.entries[s.name])
        for s in sites
        if isinstance(plan.entries.get(s.name), LowRankConfig)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.92, 0.84, 0.68])
    parser.add_argument("--calibration", type=int, default=32, help="calibration sequences of 256 tokens")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tok = zoo.load_smollm2()
    tokens = zoo.wiki_tokens(tok, "evaluation", args.eval_tokens)
    batches = zoo.calibration_batches(tok, n_seqs=args.calibration, seq_len=256)
    example = (batches[0][0][:1, :32],)
    dense_bytes = stored_bytes(model)
    dense_ppl = evaluate.perplexity(model, tokens, progress=False)
    print(f"SmolLM2-135M fp32: {dense_bytes} bytes, perplexity {dense_ppl:.2f}")

    # One capture and one calibration pass serve the uniform baselines (the solver runs its own).
    sites, _ = find_weight_sites(capture(model, example), model)
    aware_ws = Workspace(stats=collect_statistics(model, sites, batches, progress=False))
    plain_ws = Workspace()

    rows = []
    for budget in args.budgets:
        t0 = time.perf_counter()
        opt = passes.optimize(
            model, example, target_memory=budget, calibration=batches, transforms=("lowrank",), progress=False
        )
        opt_time = time.perf_counter() - t0
        opt_bytes = stored_bytes(opt)
        results = {"solver": (evaluate.perplexity(opt, tokens, progress=False), opt_bytes, opt.report.solver["objective"])}
        del opt
        lo, hi = 0.0, 1.0  # largest uniform fraction that stores no more than the solver's plan
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if plan_bytes(model, sites, uniform_plan(sites, mid, True)) <= opt_bytes else (lo, mid)
        for name, aware, ws in (("uniform whitened", True, aware_ws), ("uniform plain SVD", False, plain_ws)):
            plan = uniform_plan(sites, lo, aware)
            rewritten = _rewrite(copy.deepcopy(model), sites, plan, ws, progress=False)
            results[name] = (
                evaluate.perplexity(rewritten, tokens, progress=False),
                stored_bytes(rewritten),
                estimated_error(model, sites, plan, ws),
            )
            del rewritten
        rows.append((budget, lo, opt_time, results))
        for name, (ppl, nbytes, est) in results.items():
            print(
                f"budget {budget:.2f} | {name:<18} | ppl {ppl:>12.2f} | bytes {nbytes:>11} ({nbytes / dense_bytes:.3f}x) "
                f"| est. error {est:8.3f}" + (f" | optimize {opt_time:.0f}s" if name == "solver" else f" | linear kept {lo:.3f}"),
                flush=True,
            )

    print("\n| budget | solver ppl | uniform whitened ppl | uniform plain-SVD ppl | stored bytes (solver / uniform) | linear params kept (uniform) |")
    print("|---|---|---|---|---|---|")
    for budget, frac, _, r in rows:
        print(
            f"| {budget:.2f} | {r['solver'][0]:.2f} | {r['uniform whitened'][0]:.2f} | {r['uniform plain SVD'][0]:.4g} "
            f"| {r['solver'][1] / dense_bytes:.3f} / {r['uniform whitened'][1] / dense_bytes:.3f} | {frac:.3f} |"
        )
    print(f"\ndense perplexity {dense_ppl:.2f}; calibration {args.calibration} x 256 tokens")


if __name__ == "__main__":
    main()
