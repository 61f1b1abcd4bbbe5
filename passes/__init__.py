"""decomp's public API: plan and apply structured-matrix rewrites of a PyTorch model.

```python
import passes
opt = passes.optimize(model, example_inputs, target_memory=0.5, calibration=batches)
opt.plan, opt.report          # per-weight choices (JSON round-trip), readable summary
passes.apply(model, opt.plan, calibration=batches)   # replay without solving
passes.save(opt, "out/"); passes.load("out/", model) # restore without solving or data
passes.export_onnx(opt, example_inputs, "model.onnx")  # ONNX Runtime file, weights still packed
```

Importing this package pulls in torch, networkx and tqdm only: no triton, OR-Tools, onnx or
transformers, and it does not touch CUDA.
"""

from passes.blockdiag import BlockDiagConfig
from passes.config import KeepConfig, TransformConfig
from passes.export import OnnxExportError, export_onnx
from passes.gptq import GPTQConfig
from passes.int8_outlier import Int8OutlierConfig
from passes.kronecker import KroneckerConfig
from passes.lowrank import LowRankConfig
from passes.lq import LQConfig
from passes.monarch import MonarchConfig
from passes.pipeline import DEFAULT_TRANSFORMS, RewriteError, apply, load, optimize, save
from passes.plan import Plan
from passes.quant_storage import Int8Config, IntNConfig, NF4Config
from passes.reparametrize import reparametrize
from passes.report import Report
from passes.transform import TRANSFORMS

__all__ = [
    "DEFAULT_TRANSFORMS",
    "TRANSFORMS",
    "BlockDiagConfig",
    "GPTQConfig",
    "Int8Config",
    "Int8OutlierConfig",
    "IntNConfig",
    "KeepConfig",
    "KroneckerConfig",
    "LQConfig",
    "LowRankConfig",
    "MonarchConfig",
    "NF4Config",
    "OnnxExportError",
    "Plan",
    "Report",
    "RewriteError",
    "TransformConfig",
    "apply",
    "export_onnx",
    "load",
    "optimize",
    "reparametrize",
    "save",
]
