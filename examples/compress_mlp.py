"""Compress a small MLP to half its memory with activation-aware low-rank, save and restore it.

    python examples/compress_mlp.py
"""

import tempfile

import torch
from torch import nn

import passes

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 64)).eval()
# Inputs that live near a 32-dimensional subspace: what makes real activations compressible.
basis = torch.randn(32, 256)
batches = [(torch.randn(128, 32) @ basis + 0.01 * torch.randn(128, 256),) for _ in range(8)]

optimized = passes.optimize(model, batches[0], target_memory=0.5, calibration=batches, progress=False)
print(optimized.report)

x = torch.randn(64, 32) @ basis
rel = ((optimized(x) - model(x)).norm() / model(x).norm()).item()
print(f"\nrelative output error on fresh inputs: {rel:.4f}")

with tempfile.TemporaryDirectory() as out:
    passes.save(optimized, out)
    restored = passes.load(out, model)
    assert torch.equal(restored(x), optimized(x))
    print(f"saved and restored from {out}: identical outputs")
