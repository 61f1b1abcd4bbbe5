"""Exact storage bytes, measured from the tensors a module really stores."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["dtype_size", "format_bytes", "stored_bytes"]


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def stored_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages behind ``module.state_dict()``.

    Tied tensors (one storage under several names) count once, so do views. This is what
    ``torch.save``/safetensors write, give or take headers; it is the number every memory
    claim of decomp is measured with.
    """
    seen: dict[tuple[int, str], int] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if tensor.device.type == "meta":
            raise ValueError(f"state_dict entry {name} is on the meta device; it stores nothing to measure")
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), str(tensor.device)) if storage.data_ptr() else (id(tensor), "")
        seen[key] = max(seen.get(key, 0), storage.nbytes())
    return sum(seen.values())


def format_bytes(n: float) -> str:
    """Human-readable byte count (powers of 1024)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
