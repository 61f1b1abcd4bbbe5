"""Capture an ``nn.Module`` and example inputs as an FX graph.

First stage of the pipeline. Preconditions: none beyond a module that runs eagerly on the
example inputs. Postconditions: an ``ExportedProgram`` whose graph carries shapes and dtypes
(``node.meta["val"]``, fake tensors) and whose weight-using nodes are mapped to their
parameter names by :func:`ir.sites.find_weight_sites`.

``torch.fx.symbolic_trace`` breaks on current transformers models (data-dependent control
flow, cache objects), so capture goes through ``torch.export`` in non-strict mode, which runs
the Python code of the model and records the aten ops it dispatches.
"""

from __future__ import annotations

import inspect
import sys
import traceback
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["CaptureError", "capture", "split_inputs"]


class CaptureError(RuntimeError):
    """The model could not be captured as a graph.

    Attributes:
        module: dotted name of the innermost submodule that was running when capture failed
            (``""`` for the root, ``None`` when unknown).
        location: ``file:line`` inside that module's code, when known.
    """

    def __init__(self, message: str, module: str | None = None, location: str | None = None):
        super().__init__(message)
        self.module = module
        self.location = location


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Normalise example inputs to ``(args, kwargs)``.

    Accepted forms: a tuple or list of positional inputs, a dict of keyword inputs, or a
    single tensor (one positional input).
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        "example_inputs must be a tensor, a tuple/list of positional inputs or a dict of keyword "
        f"inputs, got {type(example_inputs).__name__}"
    )


def _no_cache_kwargs(model: nn.Module, kwargs: dict) -> dict:
    # transformers models return cache objects that torch.export cannot flatten; the cache is
    # irrelevant to which weights are used, so capture without it.
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "use_cache") or "use_cache" in kwargs:
        return kwargs
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    accepts = "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {**kwargs, "use_cache": False} if accepts else kwargs


def _failing_module(model: nn.Module, tb) -> tuple[str | None, str | None]:
    """Find the innermost submodule of ``model`` whose code was on the stack when it failed."""
    names = {id(m): name for name, m in model.named_modules()}
    found: tuple[str | None, str | None] = (None, None)
    for frame, lineno in traceback.walk_tb(tb):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names and isinstance(owner, nn.Module):
            found = (names[id(owner)], f"{frame.f_code.co_filename}:{lineno}")
    return found


def capture(model: nn.Module, example_inputs: Any, dynamic_shapes: Any = None) -> torch.export.ExportedProgram:
    """Capture ``model`` on ``example_inputs`` with ``torch.export`` (non-strict).

    The model is not modified. Transformers models are captured with ``use_cache=False``.

    Args:
        model: the module to capture.
        example_inputs: positional inputs (tuple/list/tensor) or keyword inputs (dict).
        dynamic_shapes: passed to ``torch.export.export`` (default: static shapes).

    Returns:
        The exported program; ``node.meta["val"]`` holds each node's fake tensor (shape, dtype).

    Raises:
        CaptureError: naming the submodule and source line where tracing failed, with the
            original error chained.
    """
    args, kwargs = split_inputs(example_inputs)
    added = _no_cache_kwargs(model, kwargs).keys() - kwargs.keys()
    kwargs = _no_cache_kwargs(model, kwargs)
    if isinstance(dynamic_shapes, Mapping):  # the added use_cache flag has no dynamic dimension
        dynamic_shapes = {**dynamic_shapes, **{name: None for name in added}}
    try:
        with torch.no_grad():
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # torch.export raises many unrelated types; all mean "not capturable"
        module, location = _failing_module(model, sys.exc_info()[2])
        where = (
            f" in submodule '{module or '<root>'}' ({type(model.get_submodule(module)).__name__})"
            f" at {location}"
            if module is not None
            else ""
        )
        raise CaptureError(
            f"could not capture {type(model).__name__} with torch.export{where}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
            "Make the model run eagerly on the example inputs first; then check that code for "
            "data-dependent Python control flow or non-tensor outputs (return tensors, or wrap "
            "the model in a module that does).",
            module=module,
            location=location,
        ) from exc
