"""Fused Triton kernels for the rewritten subgraphs, and the pass that fuses their epilogues.

```python
from codegen import dispatch, fusion
dispatch.use_kernels(x)            # what the rewritten modules ask before calling a kernel
fusion.fuse_epilogues(gm)          # linear → bias → SiLU/GELU → ·gate → +residual, as one kernel;
                                   # then decode-size sibling int linears (q/k/v, gate·up) as one launch
```

- ``codegen.kernels``: one file per kernel (low-rank, dequant GEMV/GEMM, Monarch), each with
  its Triton template, launch wrapper and eager torch reference ``<op>_ref``.
- ``codegen.template``: epilogue slots, generated source files, the compiled-kernel cache,
  autotuning per shape class.
- ``codegen.ops``: the ``decomp::*`` operators (``torch.library.triton_op``), CUDA → kernel,
  CPU → interpreter (``TRITON_INTERPRET=1``) or reference.
- ``codegen.dispatch``: when modules use the operators (light; ``passes`` imports it).
- ``codegen.fusion``: the FX pass matching rewritten linears and their elementwise tails.
- ``codegen.siblings``: its last step, sibling quantized linears as one ``decomp::quant_linear_group``
  launch with the RMSNorm before them folded in.

Importing ``codegen`` (or ``dispatch``/``fusion``) imports neither triton nor the operators.
"""

__all__ = ["dispatch", "fusion", "siblings", "template"]
