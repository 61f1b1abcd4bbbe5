"""Correctness on CUDA: every kernel against eager torch, both against an fp64 evaluation; the
rewritten modules and ``torch.compile(backend="decomp")`` with epilogue fusion against eager."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .common import FAILURES, _buffers, _format, _packed

__all__ = ["check_dequant", "check_lowrank", "check_modules_and_compile", "check_monarch"]


def _verdict(name, out, ref, truth) -> None:
    out, ref_f, truth = out.float(), ref.float(), truth.float()
    eps = torch.finfo(ref.dtype).eps
    scale = truth.abs().max().clamp_min(1.0)
    err = (out - truth).abs().max().item()
    eager = (ref_f - truth).abs().max().item()
    bound = 2 * eager + 4 * eps * scale.item()
    ok = bool(torch.isfinite(out).all()) and err <= bound
    if not ok:
        FAILURES.append(f"{name}: error {err:.3g} > bound {bound:.3g}")
    print(f"{'PASS' if ok else 'FAIL'}  {name:58s} max|err| {err:.3g}  (eager torch {eager:.3g}, bound {bound:.3g})", flush=True)


def _judge(name, kernel, reference, args_of, device, dtype) -> None:
    """``kernel`` and its ``reference`` on ``args_of(cast)`` with ``cast`` moving the float operands to
    ``device`` in ``dtype``, judged (:func:`_verdict`) against the reference on the same operands in fp64.
    ``args_of`` is called here and now, so a lambda over loop variables sees this iteration's (B023 is
    silenced at the call sites for that reason)."""
    args = args_of(lambda t: t.to(device, dtype))
    truth = reference(*args_of(lambda t: t.to(device, torch.float64)))
    _verdict(name, kernel(*args), reference(*args), truth)


def check_lowrank(device):
    from codegen.kernels import lowrank as K

    g = torch.Generator().manual_seed(0)
    shapes = ((1, 576, 64, 1536, ""), (37, 70, 5, 45, ""), (300, 576, 72, 1536, "silu,mul"))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for m, k, r, n, ep in shapes if dtype == torch.float16 else shapes[1:]:
            x, down, up, bias = (torch.randn(*s, generator=g) for s in ((m, k), (r, k), (n, r), (n,)))
            down, up = down / k**0.5, up / r**0.5
            aux = [torch.randn(m, n, generator=g)] if ep else []
            _judge(f"lowrank {str(dtype)[6:]} {m}x{k}x{r}x{n} {ep or 'bias'}", K.lowrank_linear, K.lowrank_linear_ref,
                   lambda c: (c(x), c(down), c(up), c(bias), ep, [c(a) for a in aux]), device, dtype)  # noqa: B023  # fmt: skip


def check_dequant(device):
    from codegen.kernels import dequant as D

    g = torch.Generator().manual_seed(1)
    cases = [
        (f, torch.float16) for f in ("int8", "int4g32", "int4g128dq", "int3g64", "int2g128", "nf4g64", "nf4g32dq", "int3g32dq")
    ]
    cases += [("int4g32", torch.bfloat16), ("int4g32", torch.float32)]
    out_f, inn = 1536, 576 + 70  # ragged against every group size
    for spec, dtype in cases:
        pw, _ = _packed(_format(spec), out_f, inn, dtype, device)
        codes, constants, fmt = _buffers(pw)
        for m in (1, 3, 64, D.DEQUANT_FIRST_M) if spec == "int4g32" else (1, 64, D.DEQUANT_FIRST_M):
            x = torch.randn(m, inn, generator=g).to(device, dtype)
            bias = torch.randn(out_f, generator=g).to(device, dtype)
            path = "gemv" if m <= D.GEMV_MAX_M else "gemm" if m < D.DEQUANT_FIRST_M else "decode once + matmul"
            _judge(f"dequant {fmt} {str(dtype)[6:]} m={m} ({path})", D.quant_linear, D.quant_linear_ref,
                   lambda c: (c(x), codes, constants, fmt, inn, c(bias)), device, dtype)  # noqa: B023  # fmt: skip
    # LQ: int3 + rank-16 term, SwiGLU epilogue
    pw, _ = _packed(_format("int3g64"), 576, 1536, torch.float16, device)
    codes, constants, fmt = _buffers(pw)
    for m in (1, 64):
        x, down, up, aux = (torch.randn(*s, generator=g) for s in ((m, 1536), (16, 1536), (576, 16), (m, 576)))
        x, down, up, aux = (t.to(device, torch.float16) for t in (x, down / 40, up / 4, aux))
        _judge(f"dequant LQ int3g64+r16 fp16 m={m} silu,mul", D.quant_linear, D.quant_linear_ref,
               lambda c: (c(x), codes, constants, fmt, 1536, None, c(down), c(up), "silu,mul", [c(aux)]), device, torch.float16)  # noqa: B023  # fmt: skip


def check_monarch(device):
    from codegen.kernels import monarch as K

    g = torch.Generator().manual_seed(2)
    shapes = [(1, 1024, 1024, 32, 1), (64, 70, 45, 4, 2), (37, 300, 260, 16, 1)]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for m, inn, out, b, k in shapes + [(256, 4096, 4096, 64, 1)] if dtype == torch.float16 else shapes[1:]:
            p, s = -(-inn // b), -(-out // b)
            L, R = (torch.randn(b, s, b * k, generator=g) / (b * k) ** 0.5, torch.randn(b, k * b, p, generator=g) / p**0.5)
            x, bias = torch.randn(m, inn, generator=g), torch.randn(out, generator=g)
            _judge(f"monarch {str(dtype)[6:]} {m}x{inn}->{out} b={b} k={k}", K.monarch_linear, K.monarch_linear_ref,
                   lambda c: (c(x), c(L), c(R), out, c(bias)), device, dtype)  # noqa: B023  # fmt: skip


def check_blockdiag(device):
    from codegen.kernels import blockdiag as K
    from passes.blockdiag import _output_positions

    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for m, inn, out, b in ((1, 4096, 4096, 4), (300, 1000, 700, 8)):
            p, s = -(-inn // b), -(-out // b)
            blocks, x, bias = (
                torch.randn(b, s, p, generator=g) / p**0.5,
                torch.randn(m, inn, generator=g),
                torch.randn(out, generator=g),
            )
            in_index = torch.randperm(b * p, generator=g).int().to(device)
            out_pos = _output_positions(torch.randperm(b * s, generator=g)[:out].int(), b * s).to(device)
            _judge(f"blockdiag {str(dtype)[6:]} {m}x{inn}->{out} b={b}", K.blockdiag_linear, K.blockdiag_linear_ref,
                   lambda c: (c(x), c(blocks), out, in_index, out_pos, c(bias)), device, dtype)  # noqa: B023  # fmt: skip


def check_kronecker(device):
    from codegen.kernels import kronecker as K

    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for m, (r, a_out, a_in, b_out, b_in) in (
            (1, (1, 64, 64, 64, 64)),
            (300, (3, 20, 25, 25, 24)),
            (64, (2, 128, 16, 32, 256)),
        ):
            A, B = torch.randn(r, a_out, a_in, generator=g) / a_in**0.5, torch.randn(r, b_out, b_in, generator=g) / b_in**0.5
            x, bias = torch.randn(m, a_in * b_in - 3, generator=g), torch.randn(a_out * b_out - 5, generator=g)
            _judge(f"kronecker {str(dtype)[6:]} {m} rows, r={r} {a_out}x{a_in} ⊗ {b_out}x{b_in}", K.kronecker_linear,
                   K.kronecker_linear_ref, lambda c: (c(x), c(A), c(B), bias.numel(), c(bias)), device, dtype)  # noqa: B023  # fmt: skip


def check_int8_outlier(device):
    from codegen.kernels import int8_outlier as K
    from passes.int8_outlier import Int8OutlierConfig, Int8OutlierWeight

    g = torch.Generator().manual_seed(4)
    config = Int8OutlierConfig()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for m, inn, out, n_out in ((1, 4096, 4096, 40), (300, 1000, 700, 7), (64, 512, 256, 0)):
            outliers = torch.randperm(inn, generator=g)[:n_out]
            pw = Int8OutlierWeight(config, (out, inn), dtype, config.encode(torch.randn(out, inn, generator=g) / 32, outliers))
            bufs = [b.to(device) for b in (pw.codes, pw.scale, pw.input_index, pw.outlier_columns, pw.outlier_weight)]
            x, bias = torch.randn(m, inn, generator=g), torch.randn(out, generator=g)
            x[:, outliers] *= 30
            xd, bd = x.to(device, dtype), bias.to(device, dtype)  # the fp64 truth from the same rounded inputs
            _judge(f"int8 outliers {str(dtype)[6:]} {m}x{inn}->{out} ({n_out} outliers)", K.int8_outlier_linear,
                   K.int8_outlier_linear_ref, lambda c: (c(xd), *bufs, c(bd)), device, dtype)  # noqa: B023  # fmt: skip


def _swiglu_block(d, hidden, device, dtype, rank=None, spec="int4g32"):
    """x + down(silu(gate(x)) * up(x)) with rewritten projections (low-rank when ``rank``, else quantized)."""
    from torch import nn

    from passes.lowrank import LowRankLinear
    from passes.quant_storage import QuantizedLinear

    def lowrank(o, i, seed):
        g = torch.Generator().manual_seed(seed)
        return LowRankLinear(nn.Parameter(torch.randn(rank, i, generator=g) / i**0.5),
                             nn.Parameter(torch.randn(o, rank, generator=g) / rank**0.5), None)  # fmt: skip

    def quant(o, i, seed):
        return QuantizedLinear(_packed(_format(spec), o, i, dtype, "cpu", seed)[0], None)

    make = lowrank if rank else quant

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = (make(hidden, d, 1), make(hidden, d, 2), make(d, hidden, 3))

        def forward(self, x):
            return x + self.down(F.silu(self.gate(x)) * self.up(x))

    return Block().to(device=device, dtype=dtype).eval()


def _ensure_backend() -> None:
    """Register ``backend="decomp"`` when the package's entry point is absent (repo not pip-installed)."""
    from torch._dynamo.backends.registry import lookup_backend, register_backend

    try:
        lookup_backend("decomp")
    except Exception:  # noqa: BLE001 — InvalidBackend: no entry point in this environment
        from passes.backend import decomp_backend

        register_backend(compiler_fn=decomp_backend, name="decomp")


def check_modules_and_compile(device, blocks=("int4g32", "lowrank r64")):
    """The module hooks on CUDA, and torch.compile(backend="decomp") with epilogue fusion, vs eager torch."""
    import copy

    import codegen.fusion
    from codegen import dispatch

    x = torch.randn(4, 7, 576, device=device, dtype=torch.float16)
    for label in blocks:
        rank = 64 if label.startswith("lowrank") else None
        block = _swiglu_block(576, 1536, device, torch.float16, rank=rank)
        with torch.no_grad():
            with dispatch.force_kernels(False):
                eager = block(x)
                truth = copy.deepcopy(block).float()(x.float())  # packed codes stay; they dequantize to fp32
            calls = _count_op_calls()
            with calls:
                kernels = block(x)  # CUDA input: the modules call the kernels
            _verdict(f"modules {label} SwiGLU block (kernels)", kernels, eager, truth)
            print(f"      module hooks called the decomp ops {calls.n} time(s) (expected 3); "
                  f"use_kernels(x) = {dispatch.use_kernels(x)}", flush=True)  # fmt: skip
            if calls.n != 3:
                FAILURES.append(f"modules {label}: the hooks called the ops {calls.n} times, expected 3")
            reports, graphs = [], []
            real = codegen.fusion.fuse_epilogues

            def spy(gm, _r=real, graphs=graphs, reports=reports, **kw):
                graphs.append([f"{n.op}:{n.target}" for n in gm.graph.nodes if n.op.startswith("call")])
                reports.append(_r(gm, **kw))
                return reports[-1]

            codegen.fusion.fuse_epilogues = spy
            try:
                _ensure_backend()
                torch._dynamo.reset()
                t = time.time()
                compiled = torch.compile(block, backend="decomp")(x)
                seconds = time.time() - t
            finally:
                codegen.fusion.fuse_epilogues = real
            fused = reports[0] if reports else None
            _verdict(f"compile(backend='decomp') {label} block ({seconds:.0f} s compile)", compiled, eager, truth)
            print(f"      fusion: {fused}" if fused else "      fusion: did not run (no CUDA inputs?)", flush=True)
            if not fused or fused.kernels_removed != 3:
                FAILURES.append(f"compile {label}: expected 3 fused elementwise steps, got {fused}")
                for i, nodes in enumerate(graphs):  # what the backend saw, to see why nothing matched
                    print(f"      graph {i}: {nodes}"[:3000], flush=True)


class _count_op_calls:
    """Counts calls of ``dispatch.lowrank_linear``/``quant_linear``/``monarch_linear`` within the block."""

    def __enter__(self):
        from codegen import dispatch

        self.n, self.saved = 0, {}
        for name in ("lowrank_linear", "quant_linear", "monarch_linear"):
            real = self.saved[name] = getattr(dispatch, name)

            def counted(*a, _real=real, **k):
                self.n += 1
                return _real(*a, **k)

            setattr(dispatch, name, counted)
        return self

    def __exit__(self, *exc):
        from codegen import dispatch

        for name, real in self.saved.items():
            setattr(dispatch, name, real)
        return False
