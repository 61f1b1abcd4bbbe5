"""Importing the package, the dispatch and the fusion pass stays light: no triton, no operators,
no CUDA; ``import passes`` (which the modules' hooks come through) neither."""

from __future__ import annotations

import subprocess
import sys


def test_light_imports():
    code = (
        "import sys, torch, passes, codegen, codegen.dispatch, codegen.fusion, codegen.siblings, codegen.template; "
        "heavy = [m for m in ('triton', 'codegen.ops', 'onnx', 'ortools') if m in sys.modules]; "
        "assert not heavy, heavy; assert not torch.cuda.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_operators_register_without_running_a_kernel():
    code = (
        "import sys, torch, codegen.ops; "
        "assert {'lowrank_linear', 'quant_linear', 'quant_linear_group', 'monarch_linear'} <= set(dir(torch.ops.decomp)); "
        "assert not torch.cuda.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
