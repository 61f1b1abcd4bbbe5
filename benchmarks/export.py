"""SmolLM2-135M optimized to half its memory, exported to ONNX, run by ONNX Runtime.

Prints, measured in one run:

- the optimized model's stored bytes (``cost_model.stored_bytes``) beside the .onnx file's
  bytes (target: file ≤ 1.1 × stored) and which initializers hold the tied 49,152-row
  embedding / lm_head table (target: stored once);
- perplexity on the EVAL.md protocol (first 8,192 Wikipedia evaluation tokens, 512-token
  windows) of the optimized torch model and of the ONNX file in ONNX Runtime (target:
  within 0.5%), with the runner's fp32 accuracy level for fused quantized matmuls and with
  ONNX Runtime's default (level 4: int8 activations in the MatMulNBits it fuses from int8
  DequantizeLinear → MatMul);
- one ONNX file serving several sequence lengths (the windows are 512 tokens; the export
  was traced at 16);
- wall times of export, session creation and the perplexity passes.

    python benchmarks/export.py [--target-memory 0.5] [--calibration 16] [--out /tmp/decomp-export]
    python benchmarks/export.py --mixed --out /tmp/decomp-export-mixed

``--out`` keeps the optimized model (``passes.save``) and the .onnx file; a rerun with the
same ``--out`` restores the model with ``passes.load`` instead of optimizing again.

On SmolLM2 the solver's plan at 0.5 is int4 g32 on every linear layer and a dense tied table
(its weights lie on a 4-bit grid in blocks of 32, EVAL.md). ``--mixed`` instead applies a
fixed plan that puts every stored format on the real model (no solver, no calibration):
the linear layers cycle through int8, int4 g64, int3 g64 with double-quantized constants,
NF4 g64 and LQ (rank 16 + int4 g64, plain SVD), one layer is int2 g32, and the tied
embedding / lm_head table is NF4 g64 with double-quantized constants.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import passes
from cost_model import format_bytes, stored_bytes
from passes import evaluate, zoo
from passes.export import OnnxModule


def mixed_plan(model) -> passes.Plan:
    """Every format on SmolLM2 (module docstring)."""
    from passes.quant_storage import Int8Config, IntNConfig, NF4Config

    cycle = [
        Int8Config(),
        IntNConfig(4, 64),
        IntNConfig(3, 64, double_quant=True),
        NF4Config(64),
        passes.LQConfig(16, 4, 64, activation_aware=False),
    ]
    linears = [n for n, p in model.named_parameters() if n.endswith("proj.weight")]
    entries = {name: cycle[i % len(cycle)] for i, name in enumerate(linears)}
    entries["model.layers.0.self_attn.k_proj.weight"] = IntNConfig(2, 32)
    entries["model.embed_tokens.weight"] = NF4Config(64, double_quant=True)
    return passes.Plan(entries, {"source": "benchmarks/export.py --mixed"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target-memory", type=float, default=0.5)
    parser.add_argument("--calibration", type=int, default=16, help="calibration sequences of 256 tokens")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("/tmp/decomp-export"))
    parser.add_argument("--mixed", action="store_true", help="a fixed plan with every format instead of optimize")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = zoo.load_smollm2()
    tokens = zoo.wiki_tokens(tokenizer, "evaluation", args.eval_tokens)
    saved = args.out / "optimized"
    start = time.perf_counter()
    if (saved / "plan.json").exists():
        opt = passes.load(saved, model)
        how = f"restored from {saved}"
    elif args.mixed:
        opt = passes.apply(model, mixed_plan(model), progress=False)
        how = "the --mixed plan applied"
        print(f"{how}: {sorted({c.describe() for c in opt.plan.entries.values()})}")
    else:
        batches = zoo.calibration_batches(tokenizer, n_seqs=args.calibration, seq_len=256)
        opt = passes.optimize(model, batches[0], target_memory=args.target_memory, calibration=batches, progress=False)
        passes.save(opt, saved)
        how = f"optimized with {passes.DEFAULT_TRANSFORMS}, {args.calibration} x 256 calibration tokens"
    what = "with every format (--mixed)" if args.mixed else f"at {args.target_memory} of its memory"
    print(f"SmolLM2-135M {what}: {how} in {time.perf_counter() - start:.0f}s")
    if hasattr(opt, "report"):
        print(opt.report)

    start = time.perf_counter()
    result = passes.export_onnx(opt, (torch.randint(0, 1000, (2, 16)),), args.out / "smollm2.onnx")
    export_s = time.perf_counter() - start
    stored = stored_bytes(opt)
    print(f"\nexport: {export_s:.0f}s, inputs {result.inputs}, opset {result.opset}")
    print(f"ops: {result.op_types}")
    print(
        f"stored bytes {stored} ({format_bytes(stored)}), file {result.file_bytes} ({format_bytes(result.file_bytes)}): "
        f"file / stored = {result.file_bytes / stored:.4f} (target <= 1.1)"
    )
    import onnx

    proto = onnx.load(str(result.path), load_external_data=False)
    table = [(i.name, list(i.dims), i.data_type) for i in proto.graph.initializer if 49152 in i.dims]
    print(f"initializers with the 49,152-row tied table: {table}")
    init_bytes = sum(len(i.raw_data) for i in proto.graph.initializer)
    print(f"initializer bytes {init_bytes}, graph and metadata {result.file_bytes - init_bytes}")
    del proto

    start = time.perf_counter()
    torch_ppl = evaluate.perplexity(opt, tokens, progress=False)
    torch_s = time.perf_counter() - start
    rows = [("torch (optimized model)", torch_ppl, torch_s, 0.0)]
    for label, level in (("ONNX Runtime, fp32 matmuls (level 1)", 1), ("ONNX Runtime, default session", None)):
        start = time.perf_counter()
        session = OnnxModule(result.path, threads=args.threads, accuracy_level=level)
        init_s = time.perf_counter() - start
        start = time.perf_counter()
        rows.append((label, evaluate.perplexity(session, tokens, progress=False), time.perf_counter() - start, init_s))
        del session

    print(f"\nperplexity, {len(tokens)} evaluation tokens in 512-token windows (EVAL.md):")
    for label, ppl, seconds, init_s in rows:
        rel = (ppl - torch_ppl) / torch_ppl * 100
        init = f", session {init_s:.1f}s" if init_s else ""
        print(f"  {label:40s} {ppl:10.5f}  ({rel:+.4f}% vs torch; {seconds:.0f}s{init})")


if __name__ == "__main__":
    main()
