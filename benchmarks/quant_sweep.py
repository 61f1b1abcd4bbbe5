"""Quantization on SmolLM2-135M and MiniLM: the solver's mixed plan vs uniform formats at the same bytes.

Budgets are average stored bits per weight over the compressible matrices (the weight sites
``passes.optimize`` sees; SmolLM2's tied embedding/lm_head counts once):

    target bytes = stored bytes of everything that is not a weight site + bits/8 × site elements

For each budget it prints the metric and the measured stored bytes (``cost_model.stored_bytes``
of the rewritten model) of

  1. the solver's mixed plan: ``passes.optimize`` over every available family of
     ("lowrank", "quantize", "lq"), calibration 32 × 256 tokens of the calibration split;
  2. the best uniform round-to-nearest format (one ``passes.quant_storage`` format on every
     site): among the formats whose total bytes fit, the one with the lowest total estimated
     error (the quantize family's own estimates, shared unit);
  3. uniform activation-aware low-rank: every site, the embedding included, keeps the same
     fraction of its parameters (rank ≥ 1), the largest fraction that fits;
  4. uniform LQ (only if the "lq" transform is registered): one LQ option of that family's own
     grid on every site, chosen like (2);
  5. peer: torchao weight-only int8 (per row) and its CPU int4 path, on every Linear except
     SmolLM2's tied lm_head (quantizing it would untie it and store a second table), at
     torchao's own bytes.

It also reproduces the issue's reference rows for uniform RTN (fp16 constants per group):
on SmolLM2 every linear layer except the embedding/lm_head, bytes relative to those layers'
fp32 bytes; on MiniLM every Linear and Embedding, whole-model bytes ratio.

Metrics (EVAL.md): SmolLM2 perplexity over the first 8,192 Wikipedia evaluation tokens in
512-token windows (its fp32 weights sit on a 4-bit grid of group 32, Q4_1, so int4 g32 RTN
is nearly free on it); MiniLM mean cosine (and nearest-neighbour agreement) of its sentence
vectors to the original's on 512 held-out sentences. MiniLM is calibrated as the CLI does
it: (input_ids,) rows of the calibration split's token stream.

One capture, one calibration pass and one enumeration of every family's options per model
(``passes.optimize``'s own steps, timed and printed) serve the solver at every budget and
every uniform baseline: the solver's plan at a budget is what ``passes.optimize`` returns
for it, without enumerating the same options four times.

    python benchmarks/quant_sweep.py [--models smollm2 minilm] [--bits 8 4.25 3.25 2.75]
                                     [--calibration 32] [--skip-torchao] [--skip-reference]

Every torchao row is followed by the solver's plan at exactly that row's stored bytes.
"""

from __future__ import annotations

import argparse
import collections
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import passes
from cost_model import collect_statistics, stored_bytes
from cost_model.solver import InfeasibleBudgetError
from ir import UseKind, capture, find_weight_sites
from passes import evaluate, zoo
from passes.lowrank import LowRankConfig, LowRankTransform, candidate_ranks
from passes.pipeline import _enumerate_options, _rewrite, _solve
from passes.quant_storage import Int8Config, IntNConfig
from passes.transform import Workspace, transform_for

#: The issue's reference formats for uniform RTN (fp16 scale and minimum per group).
REFERENCE_FORMATS = (
    Int8Config(),
    IntNConfig(4, 64),
    IntNConfig(4, 32),
    IntNConfig(3, 64),
    IntNConfig(3, 32),
    IntNConfig(2, 32),
)
#: The issue's numbers for those rows, measured elsewhere (SmolLM2 dense 15.01 there).
REFERENCE_ISSUE = {
    "smollm2": ("15.05 (int8 g64)", "20.91", "15.01", "157.3", "68.2", "314,190"),
    "minilm": ("0.9999", "0.955", "0.968", "0.786", "0.857", "0.278"),
}
SOLVER_FAMILIES = ("lowrank", "quantize", "lq")


@dataclass
class Row:
    """One evaluated model: what it is, what it stores, how good it is."""

    method: str
    choice: str
    nbytes: int
    metric: dict[str, float]
    estimate: float | None = None
    seconds: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Bench:
    """One model under test, with everything the baselines share."""

    name: str
    model: torch.nn.Module
    example: tuple
    batches: list
    measure: Callable[[torch.nn.Module], dict[str, float]]  # model -> {"ppl": ...} or {"cosine": ..., "nn": ...}
    sites: list
    ws: Workspace
    fixed: int  # stored bytes that are not weight sites
    elements: int  # elements of all weight sites
    dense_bytes: int
    options: dict  # site name -> [Candidate] of every solver family, keep first
    quant: dict  # site name -> {QuantConfig: Candidate}
    lq: dict | None  # site name -> {LQConfig: Candidate}, None without the family
    prep_s: dict = field(default_factory=dict)

    def bits(self, nbytes: int) -> float:
        """Average stored bits per weight-site element of a model storing ``nbytes``."""
        return (nbytes - self.fixed) * 8 / self.elements


# ---- the models ---------------------------------------------------------------------------


def load(name: str, n_calibration: int, eval_tokens: int, n_sentences: int):
    """(model, example inputs, calibration batches, metric function) of a packaged model."""
    model, tok = zoo.load_packaged(name)
    # Both models are calibrated as the CLI does it: (input_ids,) rows of the calibration stream.
    batches = zoo.calibration_batches(tok, n_seqs=n_calibration, seq_len=256)
    if name == "smollm2":
        tokens = zoo.wiki_tokens(tok, "evaluation", eval_tokens)
        example = (batches[0][0][:1, :32],)

        def measure(m):
            return {"ppl": evaluate.perplexity(m, tokens, progress=False)}

    else:
        sentences = zoo.wiki_sentences("evaluation", n_sentences)
        example = (zoo.wiki_tokens(tok, "calibration", 32)[None],)

        def measure(m):
            f = evaluate.embedding_fidelity(model, m, tok, sentences)
            return {"cosine": f["cosine"], "nn": f["nn_agreement"]}

    return model, example, batches, measure


def metric_text(metric: dict[str, float]) -> str:
    if "ppl" in metric:
        return f"ppl {metric['ppl']:.4g}" if metric["ppl"] >= 1e4 else f"ppl {metric['ppl']:.2f}"
    return f"cos {metric['cosine']:.4f} nn {metric['nn']:.3f}"


def prepare(name: str, args) -> Bench:
    torch.manual_seed(0)
    model, example, batches, measure = load(name, args.calibration, args.eval_tokens, args.sentences)
    sites, _ = find_weight_sites(capture(model, example), model)
    t0 = time.perf_counter()
    ws = Workspace(stats=collect_statistics(model, sites, batches, progress=False))
    t_stats = time.perf_counter() - t0
    dense_bytes = stored_bytes(model)
    # One enumeration of every family's options serves the solver at every budget and every
    # uniform baseline: it is exactly what ``passes.optimize`` computes in its "options" step.
    families = tuple(f for f in SOLVER_FAMILIES if f in passes.TRANSFORMS)
    t0 = time.perf_counter()
    options = _enumerate_options(model, sites, families, ws, progress=True)
    t_options = time.perf_counter() - t0

    def by_family(name: str) -> dict:
        return {site: {c.config: c for c in cands[1:] if transform_for(c.config).name == name} for site, cands in options.items()}

    quant = by_family("quantize")
    lq = by_family("lq") if "lq" in families else None
    bench = Bench(
        name,
        model,
        example,
        batches,
        measure,
        sites,
        ws,
        fixed=dense_bytes - sum(s.nbytes for s in sites),
        elements=sum(s.numel for s in sites),
        dense_bytes=dense_bytes,
        options=options,
        quant=quant,
        lq=lq,
    )
    bench.prep_s = {"calibration": t_stats, "options": t_options}
    print(
        f"{name}: {len(sites)} weight sites, {bench.elements} elements; {dense_bytes} stored bytes "
        f"({bench.fixed} outside the sites); calibration {t_stats:.0f}s, options of {'+'.join(families)} {t_options:.0f}s",
        flush=True,
    )
    return bench


# ---- uniform baselines --------------------------------------------------------------------


def evaluate_plan(b: Bench, method: str, choice: str, plan: passes.Plan, estimate: float) -> Row:
    rewritten = _rewrite(copy.deepcopy(b.model), b.sites, plan, b.ws, progress=False)
    row = Row(method, choice, stored_bytes(rewritten), b.measure(rewritten), estimate)
    del rewritten
    return row


def uniform_choice(b: Bench, options: dict, sites, budget: int | None):
    """The config on every site of ``sites`` with the least total error whose bytes fit.

    A site the family offers no such option for (it would not save bytes there, e.g. MiniLM's
    2 × 384 token-type table) stays dense; a config must be offered on sites holding 99% of
    the elements to count as uniform. Returns ``(config, total bytes, total error, dense
    sites)`` or ``None`` when none fits.
    """
    names = {s.name for s in sites}
    rest = sum(s.nbytes for s in b.sites if s.name not in names)
    elements = sum(s.numel for s in sites)
    best = None
    for config in {c for s in sites for c in options[s.name]}:
        offered = [s for s in sites if config in options[s.name]]
        if sum(s.numel for s in offered) < 0.99 * elements:
            continue
        nbytes = b.fixed + rest + sum(options[s.name][config].nbytes if s in offered else s.nbytes for s in sites)
        error = sum(options[s.name][config].error for s in offered)
        if (budget is None or nbytes <= budget) and (best is None or error < best[2]):
            best = (config, nbytes, error, [s for s in sites if s not in offered])
    return best


def lowrank_plan(sites, fraction: float) -> passes.Plan:
    """Every site (tables included) keeps ``fraction`` of its parameters, rank at least 1."""
    entries = {}
    for s in sites:
        out, inn = s.matrix_shape
        rank = max(1, int(fraction * out * inn / (out + inn)))
        useful = candidate_ranks(out, inn)
        entries[s.name] = LowRankConfig(rank) if useful and rank <= useful[-1] else passes.KeepConfig()
    return passes.Plan(entries)


def lowrank_bytes(b: Bench, plan: passes.Plan) -> int:
    total = b.dense_bytes
    for s in b.sites:
        c = plan.entries[s.name]
        if isinstance(c, LowRankConfig):
            out, inn = s.matrix_shape
            total += c.rank * (out + inn) * (s.nbytes // s.numel) - s.nbytes
    return total


def uniform_lowrank(b: Bench, budget: int) -> Row | None:
    if lowrank_bytes(b, lowrank_plan(b.sites, 0.0)) > budget:
        return None
    lo, hi = 0.0, 1.0  # largest fraction that fits
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if lowrank_bytes(b, lowrank_plan(b.sites, mid)) <= budget else (lo, mid)
    plan = lowrank_plan(b.sites, lo)
    estimate = sum(
        LowRankTransform.error(s, b.model, b.ws, c) for s in b.sites if isinstance(c := plan.entries[s.name], LowRankConfig)
    )
    return evaluate_plan(b, "uniform low-rank", f"{lo:.3f} of params", plan, estimate)


def uniform_format(b: Bench, options: dict, method: str, budget: int) -> Row | None:
    best = uniform_choice(b, options, b.sites, budget)
    if best is None:
        return None
    config, _, error, dense = best
    plan = passes.Plan({s.name: config for s in b.sites if s not in dense})
    choice = config.describe() + (f" ({len(dense)} tiny dense)" if dense else "")
    return evaluate_plan(b, method, choice, plan, error)


# ---- torchao ------------------------------------------------------------------------------


def torchao_bytes(model: torch.nn.Module) -> int:
    """Stored bytes of a model holding torchao tensor subclasses.

    ``stored_bytes`` cannot be used: a torchao weight is a wrapper subclass whose own storage
    is empty; its data live in inner tensors (e.g. ``qdata``, ``scale``, ``zero_point``) that
    ``__tensor_flatten__`` names. Each state_dict tensor is flattened recursively to plain
    tensors, and every distinct storage is counted once (tied tensors and views included),
    as ``stored_bytes`` does for plain tensors.
    """
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    def leaves(t):
        if is_traceable_wrapper_subclass(t):
            for attr in t.__tensor_flatten__()[0]:
                yield from leaves(getattr(t, attr))
        else:
            yield t

    seen: dict[int, int] = {}
    for tensor in model.state_dict(keep_vars=True).values():
        for leaf in leaves(tensor):
            storage = leaf.untyped_storage()
            key = storage.data_ptr() or id(leaf)
            seen[key] = max(seen.get(key, 0), storage.nbytes())
    return sum(seen.values())


def torchao_rows(b: Bench) -> list[Row]:
    try:
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            quantize_,
        )
        from torchao.quantization.granularity import PerGroup
        from torchao.quantization.quant_primitives import MappingType
        from torchao.quantization.quantize_.workflows.int4.int4_packing_format import (
            Int4PackingFormat,
        )
    except ImportError as exc:
        print(f"{b.name}: torchao skipped: {exc}", flush=True)
        return []

    def not_tied_head(module, fqn):
        # SmolLM2's lm_head shares the embedding table: torchao would replace it by an untied copy.
        return isinstance(module, torch.nn.Linear) and fqn != "lm_head"

    configs = [("torchao int8 weight-only", "per row", Int8WeightOnlyConfig())]
    probe = torch.nn.Sequential(torch.nn.Linear(64, 64))
    reasons = []
    for packing in Int4PackingFormat:  # the real int4 (packed, tinygemm-style) path, on CPU
        try:
            quantize_(copy.deepcopy(probe), Int4WeightOnlyConfig(group_size=32, int4_packing_format=packing))
            configs.append(("torchao int4 weight-only", f"g32 {packing.value}", Int4WeightOnlyConfig(32, int4_packing_format=packing)))
            break
        except (ImportError, AssertionError, NotImplementedError, RuntimeError) as exc:  # what torchao raises
            reasons.append(f"{packing.value}: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}")
    else:
        print(f"{b.name}: torchao Int4WeightOnlyConfig skipped, no packing runs on this CPU build: " + "; ".join(reasons))
        configs.append(
            (
                "torchao intx int4 (CPU path)",
                "asym g32, codes in int8",
                IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32), mapping_type=MappingType.ASYMMETRIC),
            )
        )
    rows = []
    for method, choice, config in configs:
        m = copy.deepcopy(b.model)
        t0 = time.perf_counter()
        quantize_(m, config, filter_fn=not_tied_head)
        seconds = time.perf_counter() - t0
        rows.append(Row(method, choice, torchao_bytes(m), b.measure(m), seconds=seconds))
        del m
    return rows


# ---- the sweep ----------------------------------------------------------------------------


def print_row(b: Bench, label: str, row: Row) -> None:
    est = "" if row.estimate is None else f" | est. {row.estimate:8.4f}"
    sec = "" if row.seconds is None else f" | {row.seconds:.0f}s"
    print(
        f"{b.name} {label:>9} | {row.method:<28} | {row.choice:<24} | bytes {row.nbytes:>11} "
        f"({row.nbytes / b.dense_bytes:.3f}x, {b.bits(row.nbytes):5.2f} bits/w) | {metric_text(row.metric)}{est}{sec}",
        flush=True,
    )


def plan_summary(plan: passes.Plan) -> str:
    """The solver plan's families with site counts, e.g. ``quantize 180, lq 25, keep 6``."""
    counts = collections.Counter(type(c).family if hasattr(type(c), "family") else "keep" for c in plan.entries.values())
    return ", ".join(f"{k} {v}" for k, v in counts.most_common())


def reference_rows(b: Bench) -> list[tuple[Row, float]]:
    """The issue's uniform RTN rows: (row, bytes ratio as the issue states it)."""
    if b.name == "smollm2":  # every linear layer except the tied embedding/lm_head
        sites = [s for s in b.sites if all(u.kind is UseKind.LINEAR for u in s.uses)]
    else:
        sites = b.sites
    fp32 = sum(s.nbytes for s in sites)
    rows = []
    for config in REFERENCE_FORMATS:
        stored = sum(b.quant[s.name][config].nbytes for s in sites)
        error = sum(b.quant[s.name][config].error for s in sites)
        plan = passes.Plan({s.name: config for s in sites})
        label = "int8 per-channel" if isinstance(config, Int8Config) else config.describe()
        row = evaluate_plan(b, "uniform RTN (issue rows)", label, plan, error)
        ratio = stored / fp32 if b.name == "smollm2" else row.nbytes / b.dense_bytes
        print_row(b, "reference", row)
        rows.append((row, ratio))
    return rows


def sweep(b: Bench, bits_list, args) -> dict:
    dense = b.measure(b.model) if b.name == "smollm2" else {"cosine": 1.0, "nn": 1.0}
    print(f"{b.name} dense fp32: {b.dense_bytes} bytes, {metric_text(dense)}", flush=True)
    reference = [] if args.skip_reference else reference_rows(b)
    result = {"dense": dense, "reference": reference, "budgets": [], "torchao": [], "optimize_s": []}
    families = tuple(f for f in SOLVER_FAMILIES if f in passes.TRANSFORMS)
    for bits in bits_list:
        budget = b.fixed + int(bits / 8 * b.elements)
        label = f"{bits:g} bits"
        print(f"{b.name} {label}: target {budget} bytes ({budget / b.dense_bytes:.3f}x)", flush=True)
        rows = {}
        rows["solver"], solution = solver_row(b, budget, label, families)
        if solution is not None:
            result["optimize_s"].append((bits, solution.wall_time_s, solution.status))
        rows["rtn"] = uniform_format(b, b.quant, "uniform RTN (best fitting)", budget)
        rows["lowrank"] = uniform_lowrank(b, budget)
        rows["lq"] = uniform_format(b, b.lq, "uniform LQ (best fitting)", budget) if b.lq is not None else None
        for key, row in rows.items():
            if row is not None:
                if key != "solver":
                    print_row(b, label, row)
            elif key == "lq" and b.lq is None:
                print(f"{b.name} {label:>9} | uniform LQ: the lq transform is not registered", flush=True)
            elif key != "solver":
                print(f"{b.name} {label:>9} | uniform {key}: cannot reach {budget} bytes", flush=True)
        result["budgets"].append((bits, budget, rows))
    if not args.skip_torchao:
        for row in torchao_rows(b):
            print_row(b, "torchao", row)
            result["torchao"].append(row)
            # the peer comparison: our solver at exactly the peer's stored bytes
            ours, _ = solver_row(b, row.nbytes, f"{row.method} bytes", families)
            if ours is not None:
                ours.method = f"solver at the bytes of {row.method}"
                result["torchao"].append(ours)
    return result


def solver_row(b: Bench, budget: int, label: str, families) -> tuple[Row | None, object]:
    """The solver's plan at ``budget`` bytes (over the options enumerated once), evaluated."""
    t0 = time.perf_counter()
    try:
        solution = _solve(b.options, {k: [0] * len(v) for k, v in b.options.items()}, budget, None,
                          fixed_bytes=b.fixed, time_limit_s=10.0)  # fmt: skip
    except InfeasibleBudgetError as exc:  # it names the smallest feasible budget
        print(f"{b.name} {label} | solver: {exc}", flush=True)
        return None, None
    chosen = {name: b.options[name][i] for name, i in solution.choice.items()}
    plan = passes.Plan({name: c.config for name, c in chosen.items()})
    row = evaluate_plan(b, f"solver ({'+'.join(families)})", plan_summary(plan), plan, solution.objective)
    row.seconds = time.perf_counter() - t0
    print_row(b, label, row)
    print(f"{b.name} {label} | solver {solution.status} in {solution.wall_time_s:.1f}s", flush=True)
    return row, solution


# ---- README tables ------------------------------------------------------------------------


def cell(row: Row | None, b: Bench) -> str:
    if row is None:
        return "cannot reach | – | –"
    return f"{metric_text(row.metric).removeprefix('ppl ').removeprefix('cos ')} | {b.bits(row.nbytes):.2f} | {row.choice}"


def tables(b: Bench, r: dict) -> None:
    lm = b.name == "smollm2"
    metric = "perplexity" if lm else "cosine / nn-agreement"
    dense = f"{r['dense']['ppl']:.2f}" if lm else "1"
    print(f"\n#### {b.name}: uniform RTN, the issue's rows ({'linear layers except embedding/lm_head' if lm else 'Linear + Embedding, whole model'})\n")
    print(f"| format | bytes vs fp32 | {metric} (here, dense {dense}) | issue's reference |")
    print("|---|---|---|---|")
    for (row, ratio), ref in zip(r["reference"], REFERENCE_ISSUE[b.name]):
        print(f"| {row.choice} | {ratio:.3f} | {metric_text(row.metric).removeprefix('ppl ').removeprefix('cos ')} | {ref} |")
    print(f"\n#### {b.name}: at the same stored bits per weight (over all {len(b.sites)} weight sites)\n")
    print(f"| bits/w budget | method | {metric} | bits/w stored | choice | est. error |")
    print("|---|---|---|---|---|---|")
    for bits, _, rows in r["budgets"]:
        for key, name in (("solver", "solver (mixed)"), ("rtn", "uniform RTN"), ("lowrank", "uniform low-rank"), ("lq", "uniform LQ")):
            row = rows.get(key)
            if key == "lq" and b.lq is None:
                continue
            est = "–" if row is None or row.estimate is None else f"{row.estimate:.3g}"
            print(f"| {bits:g} | {name} | {cell(row, b)} | {est} |")
    for row in r["torchao"]:
        print(f"| (own) | {row.method} | {cell(row, b)} | – |")
    prep = ", ".join(f"{k} {v:.0f} s" for k, v in b.prep_s.items())
    print(f"\n{b.name}: shared steps of passes.optimize: {prep}; per budget the solver took:")
    for bits, seconds, status in r["optimize_s"]:
        print(f"  {bits:g} bits: {seconds:.1f} s ({status})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"], choices=["smollm2", "minilm"])
    parser.add_argument("--bits", type=float, nargs="*", default=[8, 4.25, 3.25, 2.75], help="budgets (none: peer rows only)")
    parser.add_argument("--calibration", type=int, default=32, help="calibration sequences of 256 tokens")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--sentences", type=int, default=512, help="held-out sentences for MiniLM")
    parser.add_argument("--skip-torchao", action="store_true")
    parser.add_argument("--skip-reference", action="store_true", help="skip the issue's uniform RTN reference rows")
    args = parser.parse_args()

    start = time.perf_counter()
    print(f"families registered: {sorted(passes.TRANSFORMS)}; solver uses "
          f"{[f for f in SOLVER_FAMILIES if f in passes.TRANSFORMS]}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    done = []
    for name in args.models:
        b = prepare(name, args)
        done.append((b, sweep(b, args.bits, args)))
        b.model = b.ws = b.batches = None  # the tables need only sizes and results
    for b, r in done:
        tables(b, r)
    print(f"\ncalibration {args.calibration} x 256 tokens; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
