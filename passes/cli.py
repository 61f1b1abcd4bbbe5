"""The ``decomp`` command line: optimize a model and save it, print a saved report, export it to ONNX.

```
decomp optimize smollm2 --target-memory 0.9 --calibration 64 --out out/smollm2
decomp report out/smollm2
decomp export out/smollm2 --out smollm2.onnx
```
MODEL is a packaged real model (``smollm2``, ``minilm``), a local transformers folder, or
``module:factory`` where ``factory()`` returns a model, ``(model, example_inputs)`` or
``(model, example_inputs, calibration_batches)``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["main", "resolve_model"]


class _Loaded:
    """A model to optimize, with what the CLI knows how to feed and evaluate it."""

    def __init__(self, model: nn.Module, example_inputs: Any, tokenizer: Any = None, calibration: Any = None):
        self.model = model
        self.example_inputs = example_inputs
        self.tokenizer = tokenizer
        self.calibration = calibration

    @property
    def is_causal_lm(self) -> bool:
        return self.tokenizer is not None and hasattr(self.model, "lm_head")


def _from_transformers_dir(path: Path) -> tuple[nn.Module, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = AutoModelForCausalLM if causal else AutoModel
    return cls.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def resolve_model(spec: str) -> _Loaded:
    """Load MODEL as the CLI understands it (see the module docstring)."""
    from passes import zoo

    if spec in zoo.PACKAGED_MODELS or Path(spec).is_dir():
        model, tokenizer = zoo.load_packaged(spec) if spec in zoo.PACKAGED_MODELS else _from_transformers_dir(Path(spec))
        ids = zoo.wiki_tokens(tokenizer, "calibration", 32)[None]
        return _Loaded(model, (ids,), tokenizer)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise SystemExit(f"decomp: cannot load factory {spec!r}: {exc}") from None
        made = factory()
        if isinstance(made, nn.Module):
            raise SystemExit(f"decomp: {spec} returned only a model; return (model, example_inputs[, calibration])")
        return _Loaded(made[0], made[1], calibration=made[2] if len(made) > 2 else None)
    raise SystemExit(
        f"decomp: unknown MODEL {spec!r}: use one of {sorted(zoo.PACKAGED_MODELS)}, a transformers folder, "
        "or module:factory"
    )


def _evaluate(loaded: _Loaded, original: nn.Module, optimized: nn.Module, eval_tokens: int) -> dict[str, dict[str, float]]:
    from passes import evaluate, zoo

    if loaded.is_causal_lm:
        tokens = zoo.wiki_tokens(loaded.tokenizer, "evaluation", eval_tokens)
        before = evaluate.perplexity(original, tokens)
        after = evaluate.perplexity(optimized, tokens)
        return {f"perplexity (wikipedia, {len(tokens)} tokens)": {"before": before, "after": after}}
    sentences = zoo.wiki_sentences("evaluation", 512)
    fidelity = evaluate.embedding_fidelity(original, optimized, loaded.tokenizer, sentences)
    return {f"sentence-vector fidelity vs original ({len(sentences)} sentences)": fidelity}


def _parse_target(text: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise SystemExit(f"decomp: --target-memory takes a fraction in (0, 1] or a byte count, got {text!r}") from None


def _cmd_optimize(args: argparse.Namespace) -> int:
    import passes
    from passes import zoo

    start = time.perf_counter()
    loaded = resolve_model(args.model)
    calibration = loaded.calibration
    if args.calibration and calibration is None:
        if loaded.tokenizer is None:
            raise SystemExit("decomp: --calibration N needs a text model; a factory must return its own batches")
        calibration = zoo.calibration_batches(loaded.tokenizer, n_seqs=args.calibration, seq_len=args.seq_len)
    target = _parse_target(args.target_memory)
    optimized = passes.optimize(
        loaded.model,
        loaded.example_inputs,
        target_memory=target,
        calibration=calibration,
        transforms=tuple(args.transforms.split(",")),
        target_latency=args.target_latency,
        device=args.device,
        time_limit_s=args.time_limit,
    )
    if args.eval and loaded.tokenizer is not None:
        optimized.report.metrics.update(_evaluate(loaded, loaded.model, optimized, args.eval_tokens))
    optimized.report.timings["total"] = time.perf_counter() - start
    optimized.plan.meta["source"] = args.model  # lets `decomp export` rebuild the base model
    passes.save(optimized, args.out)
    print(optimized.report)
    print(f"\nsaved to {args.out} (restore with passes.load({str(args.out)!r}, model))")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from passes.report import Report

    path = Path(args.dir) / "report.json"
    if not path.exists():
        raise SystemExit(f"decomp: {path} not found; is {args.dir} a `decomp optimize --out` folder?")
    print(Report.from_dict(json.loads(path.read_text())))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import passes
    from passes import zoo

    directory = Path(args.dir)
    if not (directory / "plan.json").exists():
        raise SystemExit(f"decomp: {directory / 'plan.json'} not found; is {args.dir} a `decomp optimize --out` folder?")
    source = args.model or passes.Plan.load(directory / "plan.json").meta.get("source")
    if source is None:
        raise SystemExit("decomp: the plan does not say which model it was made for; pass --model MODEL")
    loaded = resolve_model(source)
    restored = passes.load(directory, loaded.model)
    example = loaded.example_inputs
    if loaded.tokenizer is not None:  # batch and length ≥ 2, so that both stay dynamic
        example = (zoo.wiki_tokens(loaded.tokenizer, "calibration", 32).view(2, 16),)
    result = passes.export_onnx(restored, example, args.out)
    print(
        f"wrote {result.path}: {result.file_bytes} bytes for {result.stored_bytes} stored "
        f"({result.size_ratio:.3f}x), opset {result.opset}, inputs {result.inputs}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="decomp", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    opt = sub.add_parser("optimize", help="plan and apply rewrites under a memory budget, save the result")
    opt.add_argument("model", help="smollm2 | minilm | a transformers folder | module:factory")
    opt.add_argument("--target-memory", required=True, help="fraction in (0, 1] (e.g. 0.5) or bytes (e.g. 300000000)")
    opt.add_argument("--calibration", type=int, default=0, metavar="N", help="calibration sequences (0: data-free)")
    opt.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    opt.add_argument("--transforms", default=",".join(__import__("passes").DEFAULT_TRANSFORMS))
    opt.add_argument("--target-latency", type=float, default=None, help="fraction in (0, 1] of the dense estimate")
    opt.add_argument("--device", default="cpu", help="device profile for latency estimates: cpu | h100")
    opt.add_argument("--time-limit", type=float, default=10.0, help="solver time limit, seconds")
    opt.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True, help="measure quality before/after")
    opt.add_argument("--eval-tokens", type=int, default=8192, help="evaluation tokens for perplexity")
    opt.add_argument("--out", required=True, type=Path, help="output folder")
    opt.set_defaults(func=_cmd_optimize)
    rep = sub.add_parser("report", help="print the report of a saved optimization")
    rep.add_argument("dir")
    rep.set_defaults(func=_cmd_report)
    exp = sub.add_parser("export", help="write a saved optimization as an ONNX file (ONNX Runtime runs it)")
    exp.add_argument("dir", help="a `decomp optimize --out` folder")
    exp.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    exp.add_argument("--model", default=None, help="the MODEL given to `decomp optimize` (default: recorded in the plan)")
    exp.set_defaults(func=_cmd_export)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as exc:  # what the user can fix: one line, no traceback
        print(f"decomp {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """The typed errors our API raises for bad input (budgets, models, data, plans, export)."""
    from cost_model.solver import InfeasibleBudgetError
    from ir.capture import CaptureError
    from passes.export import OnnxExportError
    from passes.pipeline import RewriteError
    from passes.zoo import MissingDataPackageError

    return (InfeasibleBudgetError, CaptureError, OnnxExportError, RewriteError, MissingDataPackageError, ValueError, FileNotFoundError)


if __name__ == "__main__":
    sys.exit(main())
