"""Compile every kernel variant for a GPU architecture ahead of time — no GPU needed.

Triton compiles for a target it is told about (``GPUTarget("cuda", 90, 32)`` = H100) down to a
cubin with its bundled ``ptxas``; this catches what Triton's CPU interpreter cannot (layouts of
``tl.join``/``tl.reshape``, shared memory per config, unsupported casts) before a GPU run.

    python benchmarks/kernels_aot.py             # sm_90, every template × formats × tuning configs
    python benchmarks/kernels_aot.py --arch 80 --quick
    python benchmarks/kernels_aot.py --quick --sass "dequant gemv"   # + loop instruction counts (SASS)
    python benchmarks/kernels_aot.py --launch    # the operators' own launches, through Triton's JIT

The default mode compiles each template from a signature written here (every pointer typed);
``--launch`` calls the operators' launch code itself on CPU tensors with a stand-in for the CUDA
driver (the target is sm_90, kernels compile for real, the final C launch does nothing): the
arguments, Triton's specialization of them (None pointers become constexprs, 16-divisible sizes
are marked) and the default config are exactly what a GPU run compiles.

Prints one line per variant (shared memory bytes; with ``--sass``, registers and spills too) and a
summary; exits non-zero if any variant fails to compile or needs more shared memory than the
architecture has.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("DECOMP_AUTOTUNE", "0")  # build untuned kernels: we compile the configs ourselves

SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TY = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _signature(fn, pointers: dict, constexprs: dict) -> tuple[dict, dict]:
    sig, const = {}, {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name], const[name] = "constexpr", constexprs[name]
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, pointers["default"])
        else:
            sig[name] = "i32"
    return sig, const


#: Integer arguments that are not multiples of 16 in the runs we compile for (row counts, ranks);
#: every other integer and every pointer gets the 16-divisibility the JIT infers from real
#: arguments — without it Triton cannot prove 16-byte alignment, so loads stay scalar and the
#: loop pipeliner (cp.async) never fires, and the compiled code is not what a GPU run gets.
NOT_DIVISIBLE = {"M", "M_CLASS", "R", "K_TERMS", "KP_DIV", "NO"}


def _compile(kernel, pointers, constexprs, config, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.autotuner import Autotuner

    fn = kernel.fn.fn if isinstance(kernel.fn, Autotuner) else kernel.fn
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    sig, const = _signature(fn, pointers, {**constexprs, **meta})
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if sig[name] != "constexpr" and name not in NOT_DIVISIBLE
    }
    src = triton.compiler.ASTSource(fn, sig, const, attrs=attrs)
    options = {"num_warps": config.get("num_warps", 4), "num_stages": config.get("num_stages", 2)}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def variants(quick: bool):
    """(label, kernel, pointer types, constexprs, configs) for every template and format we ship."""
    from codegen.kernels import blockdiag, dequant, int8_outlier, kronecker, lowrank, monarch
    from codegen.template import Epilogue

    ep = Epilogue.parse("silu,mul")
    out = []
    for dt in ("fp16", "bf16", "fp32"):
        full = dt == "fp16" and not quick
        for r_pad, given in ((16, False), (64, False), (256, False), (256, True)) if full else ((64, False), (64, True)):
            for e in (Epilogue(), ep) if dt == "fp16" else (Epilogue(),):
                consts = {"HAS_BIAS": True, "IEEE": dt == "fp32", "UPCAST": False, "R_PAD": r_pad, "T_GIVEN": given}
                configs = lowrank.CONFIGS if full else lowrank.CONFIGS[:1]
                label = f"lowrank {dt} r_pad={r_pad}{' t given' if given else ''} ep={e.spec or '-'}"
                out.append((label, lowrank.kernel(e), {"default": TY[dt]}, consts, configs))
    formats = ["int8", "int4g32", "int4g128dq", "int3g64", "int2g128", "nf4g64dq", "int3g32dq", "nf4g128"]
    for fmt in formats if not quick else formats[:3]:
        f = dequant.QuantFormat.parse(fmt)
        for dt in ("fp16", "bf16", "fp32") if fmt == "int4g32" else ("fp16",):
            code_ty = "*i8" if f.kind == 2 else "*u8"
            const_ty = "*u8" if f.dq else "*fp16"
            pointers = {
                "default": TY[dt],
                "codes_ptr": code_ty,
                "c0_ptr": const_ty,
                "c1_ptr": "*fp32" if f.dq else TY[dt],
                "c2_ptr": const_ty,
                "c3_ptr": "*fp32" if f.dq else TY[dt],
            }
            for has_lr in (False, True) if fmt == "int3g64" else (False,):
                consts = {
                    "KIND": f.kind, "BITS": f.bits, "GROUP": max(f.group, 1), "DQ": f.dq, "HAS_BIAS": True,
                    "HAS_LR": has_lr, "R_PAD": 32, "IEEE": dt == "fp32", "UPCAST": False,
                    "WORDS": f.kind == 0 and f.bits == 4 and dt == "fp16", "ASM": True,  # as dequant._word_flags on a GPU
                }  # fmt: skip
                full = dt == "fp16" and not quick
                for label, kern, configs in (
                    ("gemv", dequant.gemv_kernel(ep if has_lr else Epilogue()), dequant.GEMV_CONFIGS),
                    ("gemm", dequant.gemm_kernel(ep if has_lr else Epilogue()), dequant.GEMM_CONFIGS),
                ):
                    out.append(
                        (f"dequant {label} {fmt} {dt} lr={has_lr}", kern, pointers, consts, configs if full else configs[:1])
                    )
            decode = {k: consts[k] for k in ("KIND", "BITS", "GROUP", "DQ")}  # the weight decoded once (prefill)
            out.append((f"dequant weight {fmt} {dt}", dequant.dequant_kernel(), pointers, decode,
                        dequant.DEQUANT_CONFIGS if dt == "fp16" and not quick else dequant.DEQUANT_CONFIGS[:1]))  # fmt: skip
            if fmt in ("int8", "int4g32", "nf4g64dq"):  # the grouped GEMV: q/k/v outputs, the SwiGLU pair
                group_pointers = {"default": TY[dt]}
                for w in range(3):
                    group_pointers |= {f"{s}{w}_ptr": pointers[f"c{i}_ptr"] for i, s in enumerate("abcd")}
                    group_pointers[f"w{w}_ptr"] = code_ty
                group_consts = {k: consts[k] for k in ("KIND", "BITS", "GROUP", "DQ", "WORDS", "ASM")} | {"HAS_BIAS": False}
                full = dt == "fp16" and not quick
                for w, pair, bias in ((3, False, False), (2, True, False), (3, False, True)):  # as decode runs them
                    out.append((f"dequant gemv group {'pair' if pair else 'w3'}{' bias' if bias else ''} norm {fmt} {dt}",
                                dequant.gemv_group_kernel(), group_pointers,
                                group_consts | {"W": w, "PAIR": pair, "NORM": True, "HAS_BIAS": bias},
                                dequant.GEMV_CONFIGS if full else dequant.GEMV_CONFIGS[:1]))  # fmt: skip
    for dt in ("fp16", "bf16", "fp32") if not quick else ("fp16",):
        full = dt == "fp16" and not quick
        flags = {"IEEE": dt == "fp32", "UPCAST": False}
        for ai, bi in ((64, 64), (16, 256)) if full else ((64, 64),):
            out.append((f"kronecker {dt} AI={ai} BI={bi}", kronecker.kernel(ep), {"default": TY[dt]},
                        {**flags, "HAS_BIAS": True, "AI": ai, "BI": bi}, kronecker.CONFIGS if full else kronecker.CONFIGS[:1]))  # fmt: skip
        out.append((f"int8 outlier quant {dt}", int8_outlier.quant_kernel(), {"default": TY[dt], "index_ptr": "*i64",
                    "outl_ptr": "*i32", "q_ptr": "*i8", "sx_ptr": "*fp32", "xo_ptr": "*fp32"}, {"HAS_OUTLIERS": True, "KP_ALIGN": 8},
                    int8_outlier.QUANT_CONFIGS if full else int8_outlier.QUANT_CONFIGS[:1]))  # fmt: skip
        out.append((f"int8 outlier {dt}", int8_outlier.kernel(ep.parse("add")), {"default": TY[dt], "q_ptr": "*i8",
                    "sx_ptr": "*fp32", "codes_ptr": "*i8", "scale_ptr": "*fp16", "xo_ptr": "*fp32", "outw_ptr": "*fp16"},
                    {"HAS_OUTLIERS": True, "HAS_BIAS": True, "KP_ALIGN": 8}, int8_outlier.CONFIGS if full else int8_outlier.CONFIGS[:1]))  # fmt: skip
        for permuted in (True, False) if full else (True,):
            out.append((f"blockdiag {dt} permuted={permuted}", blockdiag.kernel(ep), {"default": TY[dt], "in_index_ptr": "*i32",
                        "out_pos_ptr": "*i32"}, {**flags, "HAS_BIAS": True, "GATHER": permuted, "SCATTER": permuted},
                        blockdiag.CONFIGS if full else blockdiag.CONFIGS[:1]))  # fmt: skip
        out.append((f"monarch stage1 {dt}", monarch.stage1_kernel(), {"default": TY[dt]}, flags,
                    monarch.STAGE1_CONFIGS if full else monarch.STAGE1_CONFIGS[:1]))  # fmt: skip
        out.append((f"monarch stage2 {dt}", monarch.stage2_kernel(ep), {"default": TY[dt]}, {**flags, "HAS_BIAS": True},
                    monarch.STAGE2_CONFIGS if full else monarch.STAGE2_CONFIGS[:1]))  # fmt: skip
        for bb, bp in ((64, 64), (64, 128), (4, 1024)) if full else ((64, 64),):
            out.append((f"monarch gemv {dt} b={bb} p={bp}", monarch.gemv_kernel(ep), {"default": TY[dt]},
                        {"HAS_BIAS": True, "BB": bb, "BP": bp}, monarch.GEMV_CONFIGS if full else monarch.GEMV_CONFIGS[:1]))  # fmt: skip
    return out


_INSTR = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")
_BACK_BRANCH = re.compile(r"BRA `\((\.L_x_\d+)\)")


def _cubin_tool(tool: str, flag: str, cubin: bytes) -> str | None:
    """stdout of one of Triton's bundled CUDA binary tools run on ``cubin``; None without the tool."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    if not path.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(path), flag, f.name], capture_output=True, text=True, check=False).stdout


def resources(cubin: bytes) -> str:
    """Registers per thread and local (spilled) bytes, from the cubin (``cuobjdump``, bundled with
    Triton): what bounds the programs resident per SM, without a GPU. Empty without the tool."""
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", _cubin_tool("cuobjdump", "--dump-resource-usage", cubin) or "")
    return f", {m.group(1)} regs, {m.group(2)} B spilled" if m else ""


def loop_stats(cubin: bytes) -> dict | None:
    """Instruction counts of the kernel's largest loop, from its SASS (``nvdisasm``, bundled with
    Triton): what one iteration costs per thread, without a GPU. None when there is no loop or no
    disassembler."""
    sass = _cubin_tool("nvdisasm", "-c", cubin)
    if sass is None:
        return None
    lines = [ln for ln in sass.splitlines() if _INSTR.match(ln) or ln.strip().startswith(".L_x")]
    body = None
    for j, line in enumerate(lines):
        m = _BACK_BRANCH.search(line)
        if m is None:
            continue
        starts = [k for k in range(j) if lines[k].strip().startswith(m.group(1) + ":")]
        if starts and (body is None or j + 1 - starts[0] > len(body)):
            body = lines[starts[0] : j + 1]
    if body is None:
        return None
    ops = collections.Counter(m.group(1) for ln in body if (m := _INSTR.match(ln)))
    return {
        "instructions": sum(ops.values()),
        "barriers": ops["BAR"],
        "global loads": ops["LDG"] + ops["LDGSTS"],
        "shared loads/stores": ops["LDS"] + ops["STS"] + ops["STSM"],
        "int->float conversions": ops["I2F"] + ops["I2FP"],
        "fp16->fp32 conversions": ops["HADD2"],
    }


class _StubUtils:
    def __init__(self, arch: int):
        self.arch = arch

    def load_binary(self, name, kernel, shared, device):
        return (1, 1, 64, 0, 1024)  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": SHARED_LIMIT.get(self.arch, 99 * 1024), "multiprocessor_count": 132}


class _StubDriver:
    """What Triton's JIT asks of the active driver to compile and launch, for an ``arch`` GPU that
    is not there: kernels compile for it, and a launch records its kernel name instead of running."""

    def __init__(self, arch: int):
        self.arch = arch
        self.utils = _StubUtils(arch)
        self.launched: list[str] = []

    def launcher_cls(self, src, metadata):
        name = getattr(getattr(src, "fn", None), "__name__", "?")
        return lambda *args, **kwargs: self.launched.append(name)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)


def launch_cases():
    """(label, call) for each launch path of the operators, on CPU tensors (values do not matter)."""
    import torch

    from codegen.kernels import blockdiag, dequant, int8_outlier, kronecker, lowrank, monarch
    from passes.blockdiag import _output_positions
    from passes.int8_outlier import Int8OutlierConfig, Int8OutlierWeight
    from passes.quant_storage import Int8Config, IntNConfig, NF4Config, PackedWeight

    g = torch.Generator().manual_seed(0)
    cases = []
    for config in (Int8Config(), IntNConfig(4, 32), IntNConfig(3, 64, double_quant=True), NF4Config(64, double_quant=True)):
        f = dequant.QuantFormat.of(config)
        for dt in (torch.float16, torch.bfloat16, torch.float32) if f.spec == "int4g32" else (torch.float16,):
            w = PackedWeight(config, (192, 256), dt, config.encode(torch.randn(192, 256, generator=g)))
            codes, consts = w.codes, [getattr(w, n) for n in f.constant_names()]
            down, up = torch.randn(16, 256).to(dt), torch.randn(192, 16).to(dt)
            bias = torch.randn(192).to(dt)
            for m in (1, 64, dequant.DEQUANT_FIRST_M):
                x = torch.randn(m, 256).to(dt)
                path = "gemv" if m <= dequant.GEMV_MAX_M else "gemm" if m < dequant.DEQUANT_FIRST_M else "decode-first"
                cases.append(
                    (
                        f"quant_linear {path} {f.spec} {dt}",
                        lambda x=x, c=codes, k=consts, s=f.spec: dequant.quant_linear(x, c, k, s, 256),
                    )
                )
                cases.append(
                    (
                        f"quant_linear {path} {f.spec} {dt} bias+lowrank+silu,mul",
                        lambda x=x, c=codes, k=consts, s=f.spec, b=bias, d=down, u=up: dequant.quant_linear(
                            x, c, k, s, 256, b, d, u, "silu,mul", [torch.empty(x.shape[0], 192, dtype=x.dtype)]
                        ),
                    )
                )
            x = torch.randn(1, 256).to(dt)
            nw = torch.randn(256).to(dt)
            cases.append(
                (
                    f"quant_linear_group q/k/v {f.spec} {dt}",
                    lambda x=x, c=codes, k=consts, s=f.spec: dequant.quant_linear_group(x, [c] * 3, [k] * 3, s, 256, False),
                )
            )
            cases.append((f"quant_linear_group q/k/v biased {f.spec} {dt}",
                          lambda x=x, c=codes, k=consts, s=f.spec, b=bias: dequant.quant_linear_group(x, [c] * 3, [k] * 3, s, 256, False,
                                                                                                    biases=[b] * 3)))  # fmt: skip
            cases.append(
                (
                    f"quant_linear_group pair+norm {f.spec} {dt}",
                    lambda x=x, c=codes, k=consts, s=f.spec, nw=nw: dequant.quant_linear_group(
                        x, [c] * 2, [k] * 2, s, 256, True, norm_weight=nw, eps=1e-5
                    ),
                )
            )
    for dt in (torch.float16, torch.float32):
        down, up = torch.randn(64, 512).to(dt), torch.randn(384, 64).to(dt)
        for m in (1, 512):
            x = torch.randn(m, 512).to(dt)
            cases.append((f"lowrank_linear m={m} {dt}", lambda x=x, d=down, u=up: lowrank.lowrank_linear(x, d, u)))
            cases.append(
                (
                    f"lowrank_linear m={m} {dt} bias+gelu",
                    lambda x=x, d=down, u=up: lowrank.lowrank_linear(x, d, u, torch.zeros(384, dtype=x.dtype), "gelu"),
                )
            )
        b = 16
        L, R = torch.randn(b, 32, b).to(dt), torch.randn(b, b, 32).to(dt)
        for m in (1, 256):
            x = torch.randn(m, 512).to(dt)
            cases.append((f"monarch_linear m={m} {dt}", lambda x=x, L=L, R=R: monarch.monarch_linear(x, L, R, 512)))
            cases.append(
                (
                    f"monarch_linear m={m} {dt} bias",
                    lambda x=x, L=L, R=R: monarch.monarch_linear(x, L, R, 512, torch.zeros(512, dtype=x.dtype)),
                )
            )
        for r, (a_out, a_in, b_out, b_in) in ((1, (64, 64, 64, 64)), (3, (20, 25, 25, 24)), (2, (128, 16, 32, 256))):
            A, B = torch.randn(r, a_out, a_in).to(dt), torch.randn(r, b_out, b_in).to(dt)
            for m in (1, 64):
                x = torch.randn(m, a_in * b_in - 3).to(dt)
                cases.append((f"kronecker_linear m={m} r={r} {a_out}x{a_in} ⊗ {b_out}x{b_in} {dt} bias+silu,mul",
                              lambda x=x, A=A, B=B, n=a_out * b_out: kronecker.kronecker_linear(x, A, B, n, torch.zeros(n, dtype=x.dtype),
                                                                                                 "silu,mul", [torch.empty(x.shape[0], n, dtype=x.dtype)])))  # fmt: skip
        config = Int8OutlierConfig()
        pw = Int8OutlierWeight(config, (384, 500), dt, config.encode(torch.randn(384, 500, generator=g), torch.tensor([3, 77])))
        bufs = (pw.codes, pw.scale, pw.input_index, pw.outlier_columns, pw.outlier_weight)
        for m in (1, 256):
            x = torch.randn(m, 500).to(dt)
            cases.append((f"int8_outlier_linear m={m} {dt}", lambda x=x, b=bufs: int8_outlier.int8_outlier_linear(x, *b)))
            cases.append((f"int8_outlier_linear m={m} {dt} bias+add", lambda x=x, b=bufs: int8_outlier.int8_outlier_linear(
                x, *b, torch.zeros(384, dtype=x.dtype), "add", [torch.empty(x.shape[0], 384, dtype=x.dtype)])))  # fmt: skip
        nobufs = (pw.codes, pw.scale, pw.input_index, pw.outlier_columns[:0], pw.outlier_weight[:, :0])
        cases.append(
            (f"int8_outlier_linear m=1 {dt} no outliers", lambda x=x, b=nobufs: int8_outlier.int8_outlier_linear(x[:1], *b))
        )
        blocks = torch.randn(4, 100, 128).to(dt)
        in_index, out_pos = torch.randperm(512).int(), _output_positions(torch.randperm(400)[:384].int(), 400)
        for m in (1, 256):
            x = torch.randn(m, 500).to(dt)
            for perm in (False, True):
                idx = (in_index, out_pos) if perm else (None, None)
                cases.append((f"blockdiag_linear m={m} permuted={perm} {dt} bias+silu,mul",
                              lambda x=x, w=blocks, i=idx: blockdiag.blockdiag_linear(x, w, 384, *i, torch.zeros(384, dtype=x.dtype),
                                                                                  "silu,mul", [torch.empty(x.shape[0], 384, dtype=x.dtype)])))  # fmt: skip
    return cases


def launch_check(arch: int) -> int:
    """Run every :func:`launch_cases` launch through Triton's JIT for ``arch`` (stand-in driver)."""
    from triton.runtime import driver

    stub = _StubDriver(arch)
    saved = driver._active
    driver.set_active(stub)
    failures, start = [], time.time()
    try:
        cases = launch_cases()
        for label, call in cases:
            before = len(stub.launched)
            try:
                call()
            except Exception as e:  # noqa: BLE001 — report every failing launch, then fail
                failures.append(label)
                print(
                    f"FAIL  {label}: {type(e).__name__}: {str(e)[:3000] if os.environ.get('AOT_VERBOSE') else str(e).splitlines()[0][:300]}",
                    flush=True,
                )
                continue
            print(f"ok    {label}: {', '.join(stub.launched[before:])}", flush=True)
    finally:
        driver._active = saved
    print(
        f"\n{len(cases) - len(failures)}/{len(cases)} operator launches compiled for sm_{arch} through the JIT in {time.time() - start:.0f} s"
    )
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability × 10 (90 = H100, 80 = A100)")
    parser.add_argument("--quick", action="store_true", help="one config per variant, fewer formats")
    parser.add_argument("--sass", default="", metavar="LABEL",
                        help="also print the SASS loop statistics of the variants whose label starts with LABEL, "
                             "e.g. 'dequant gemv int4g32 fp16' (per thread and iteration)")  # fmt: skip
    parser.add_argument("--launch", action="store_true",
                        help="compile the operators' own launches through Triton's JIT (stand-in driver)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.launch:
        return launch_check(args.arch)
    limit = SHARED_LIMIT.get(args.arch, 99 * 1024)
    failures, n, start = [], 0, time.time()
    for label, kernel, pointers, consts, configs in variants(args.quick):
        for config in configs:
            n += 1
            name = f"{label} {config}"
            try:
                compiled = _compile(kernel, pointers, consts, config, args.arch)
            except Exception as e:  # noqa: BLE001 — report every failing variant, then fail
                failures.append(name)
                print(
                    f"FAIL  {name}: {type(e).__name__}: {str(e)[:3000] if os.environ.get('AOT_VERBOSE') else str(e).splitlines()[0][:300]}",
                    flush=True,
                )
                continue
            shared = compiled.metadata.shared
            over = shared > limit
            if over:
                failures.append(name)
            copies = compiled.asm["ptx"].count("cp.async.")  # loads pipelined through shared memory
            usage = resources(compiled.asm["cubin"]) if args.sass else ""
            print(f"{'OVER' if over else 'ok  '}  {name}: shared {shared} B, {copies} async copies{usage}", flush=True)
            if args.sass and label.startswith(args.sass):
                stats = loop_stats(compiled.asm["cubin"])
                print("      loop: " + (", ".join(f"{k} {v}" for k, v in stats.items()) if stats else "none found"), flush=True)
    print(f"\n{n - len(failures)}/{n} variants compiled for sm_{args.arch} in {time.time() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
