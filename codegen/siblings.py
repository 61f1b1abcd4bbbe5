"""Sibling grouping: quantized linears that read the same input launch as one kernel.

Where it sits: the last step of :func:`codegen.fusion.fuse_epilogues` (after epilogue fusion, so a
SwiGLU ``gate`` already carries its ``silu,mul`` epilogue), on the same FX graphs (torch level,
dynamo's; node shapes in ``meta["example_value"]``/``meta["val"]``). Postconditions: each group is
one ``decomp::quant_linear_group`` call followed by a ``getitem`` per output; the caller lints and
recompiles.

At decode sizes (at most ``GEMV_MAX_M`` rows, known statically), sibling quantized linears — same
input node, same format and input size, no low-rank term, all with a bias or none — become one launch
(:class:`Grouped`): a SwiGLU pair (``gate`` fused with ``silu,mul`` of an ``up`` used nowhere else)
computes ``silu(gate)·up`` in one kernel, up's output never stored; other siblings (q/k/v) two or
three to a launch, each output its own tensor. When a group's input is an RMSNorm's output used
nowhere else — HF Llama's ``LlamaRMSNorm`` as dynamo traces it, matched op by op (fp32 cast,
``pow(2)``, ``mean(-1, keepdim)``, ``+ eps``, ``rsqrt``, the product, the cast back, ``weight ·``)
— the norm is folded into the group's kernel too.

Importing this module imports neither triton nor the operators.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from codegen.fusion import _ADD, _MUL, _decomp_op, _shape

__all__ = ["Grouped", "group_siblings"]


@dataclass
class Grouped:
    """Sibling quantized linears launched as one ``decomp::quant_linear_group`` kernel (``norm``:
    with the RMSNorm before them folded in)."""

    members: tuple[str, ...]
    pair: bool
    norm: bool = False

    @property
    def kernels_removed(self) -> int:
        return len(self.members) - 1 + self.norm

    @property
    def round_trips_avoided(self) -> int:
        """A pair's ``up`` output, a folded norm's output: neither stored nor read back."""
        return int(self.pair) + int(self.norm)


def _sibling_key(node: fx.Node) -> tuple | None:
    """(input node, format, columns, has bias) of a ``decomp::quant_linear`` call the grouped kernel
    can take: positional arguments, no low-rank term, tensor nodes, a known row count ≤
    ``GEMV_MAX_M``. Biased linears (Qwen2's q/k/v) group only with biased ones, and never as a pair."""
    if _decomp_op(node) != "quant_linear" or node.kwargs or len(node.args) != 10:
        return None
    x, codes, constants, fmt, cols, bias, down, up, _, _ = node.args
    if down is not None or up is not None or not isinstance(x, fx.Node):
        return None
    if bias is not None and not isinstance(bias, fx.Node):
        return None
    if not isinstance(codes, fx.Node) or not all(isinstance(c, fx.Node) for c in constants):
        return None
    from codegen.kernels.dequant import GEMV_MAX_M  # no triton import

    shape = _shape(x)
    if shape is None or not all(type(d) is int for d in shape):
        return None  # symbolic shapes: the row count may grow past the GEMV path
    rows = 1
    for d in shape[:-1]:
        rows *= d
    if not 0 < rows <= GEMV_MAX_M:
        return None
    return x, fmt, cols, bias is not None


def _group_call(gm: fx.GraphModule, before: fx.Node, members: list[fx.Node], pair: bool, epilogue: str, aux) -> list[fx.Node]:
    """Insert the group op before ``before`` and one ``getitem`` per output; returns the getitems."""
    x, _, _, fmt, cols = members[0].args[:5]
    codes = [n.args[1] for n in members]
    constants = [c for n in members for c in n.args[2]]
    biases = [n.args[5] for n in members if n.args[5] is not None]
    with gm.graph.inserting_before(before):
        call = gm.graph.call_function(
            torch.ops.decomp.quant_linear_group.default,
            (x, codes, constants, fmt, cols, pair, epilogue, list(aux), None, 0.0, biases),
        )
        items = [gm.graph.call_function(operator.getitem, (call, i)) for i in range(1 if pair else len(members))]
    vals = [n.meta.get("val", n.meta.get("example_value")) for n in ([before] if pair else members)]
    for key in ("val", "example_value"):
        if all(isinstance(v, torch.Tensor) for v in vals) and any(key in n.meta for n in members):
            call.meta[key] = vals
    return items


def group_siblings(gm: fx.GraphModule) -> list[Grouped]:
    """Launch sibling quantized linears (same input node, format and columns; decode sizes) as one
    ``decomp::quant_linear_group`` kernel, in place: SwiGLU pairs first (``gate`` carrying the
    ``silu,mul`` epilogue of an ``up`` used only there), then the rest two or three at a time;
    then fold an RMSNorm that feeds a group and nothing else into it. Returns what was grouped.
    The graph is linted and recompiled by the caller."""
    import codegen.ops  # noqa: F401  (registers the operators)

    grouped: dict[fx.Node, Grouped] = {}  # group call -> record
    for node in list(gm.graph.nodes):
        key = _sibling_key(node)
        if key is None:
            continue
        steps, aux = node.args[8].split(","), list(node.args[9])
        if steps[:2] != ["silu", "mul"] or not aux:
            continue
        up = aux[0]
        if (
            key[3]
            or not isinstance(up, fx.Node)
            or _sibling_key(up) != key
            or up.args[8] != ""
            or up.args[9]
            or len(up.users) != 1
        ):
            continue  # (a pair takes no biases)
        (item,) = _group_call(gm, node, [node, up], True, ",".join(steps[2:]), aux[1:])
        item.meta.update(node.meta)
        node.replace_all_uses_with(item)
        gm.graph.erase_node(node)
        gm.graph.erase_node(up)
        grouped[item.args[0]] = Grouped((node.name, up.name), True)

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    siblings: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        key = _sibling_key(node)
        if key is not None and node.args[8] == "" and not node.args[9]:
            siblings.setdefault(key, []).append(node)
    for nodes in siblings.values():
        for start in range(0, len(nodes) - 1, 3):
            members = nodes[start : start + 3]
            if len(members) < 2:
                continue
            first = members[0]
            tensors = [t for n in members for t in (n.args[1], *n.args[2], *([n.args[5]] if n.args[5] is not None else []))]
            late = [t for t in tensors if order[t] > order[first]]
            if any(t.op != "get_attr" for t in late):
                continue  # a weight computed between the siblings: leave them
            for t in late:
                first.prepend(t)  # get_attr reads nothing: safe to move earlier
            items = _group_call(gm, first, members, False, "", [])
            for item, n in zip(items, members):
                item.meta.update(n.meta)
                n.replace_all_uses_with(item)
                gm.graph.erase_node(n)
            grouped[items[0].args[0]] = Grouped(tuple(n.name for n in members), False)
    _fold_norms(gm, grouped)
    return list(grouped.values())


def _is_call(node, method: str, functions=()) -> bool:
    """``node`` calls tensor method ``method`` or one of ``functions``."""
    if not isinstance(node, fx.Node):
        return False
    return (node.op == "call_method" and node.target == method) or (node.op == "call_function" and node.target in functions)


def _cast_to(node) -> torch.dtype | None:
    """The dtype of a ``.to(dtype)`` call (positional or keyword, nothing else), else None."""
    if not _is_call(node, "to") or len(node.args) > 2 or set(node.kwargs) - {"dtype"}:
        return None
    dtype = node.args[1] if len(node.args) == 2 else node.kwargs.get("dtype")
    return dtype if isinstance(dtype, torch.dtype) else None


def _dtype(node) -> torch.dtype | None:
    val = node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _rms_norm(node: fx.Node) -> tuple[fx.Node, fx.Node, float] | None:
    """``(input, weight, eps)`` when ``node`` is HF Llama's RMSNorm as dynamo traces it:
    ``weight * (h.to(f32) * rsqrt(h.to(f32).pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)``,
    every intermediate used only inside the norm; None for anything else."""
    if not (node.op == "call_function" and node.target in _MUL and len(node.args) == 2 and not node.kwargs):
        return None
    a, b = node.args
    weight, cast = (a, b) if isinstance(a, fx.Node) and a.op in ("placeholder", "get_attr") else (b, a)
    if not isinstance(weight, fx.Node) or weight.op not in ("placeholder", "get_attr"):
        return None
    if _cast_to(cast) is None or len(cast.users) != 1:
        return None
    scaled = cast.args[0]
    if not (_is_call(scaled, "mul", _MUL) and len(scaled.args) == 2 and not scaled.kwargs and len(scaled.users) == 1):
        return None
    hf, r = scaled.args if _is_call(scaled.args[1], "rsqrt", (torch.rsqrt,)) else scaled.args[::-1]
    if not _is_call(r, "rsqrt", (torch.rsqrt,)) or len(r.args) != 1 or len(r.users) != 1:
        return None
    add = r.args[0]
    if not (_is_call(add, "add", _ADD) and len(add.args) == 2 and not add.kwargs and len(add.users) == 1):
        return None
    var, eps = add.args
    if not isinstance(eps, (int, float)) or not _is_call(var, "mean") or len(var.users) != 1:
        return None
    if (
        var.args[1:] not in ((-1,), (-1, True))
        or var.kwargs not in ({"keepdim": True}, {})
        or len(var.args) + len(var.kwargs) != 3
    ):
        return None
    sq = var.args[0]
    if not (_is_call(sq, "pow", (torch.pow,)) and sq.args[1:] == (2,) and not sq.kwargs and len(sq.users) == 1):
        return None
    if sq.args[0] is not hf or _cast_to(hf) is not torch.float32 or set(hf.users) != {sq, scaled}:
        return None
    h = hf.args[0]
    dtype, shape = _dtype(h), _shape(h)
    if (
        dtype is None
        or shape is None
        or _cast_to(cast) is not dtype
        or _dtype(weight) is not dtype
        or _shape(weight) != shape[-1:]
    ):
        return None
    return h, weight, float(eps)


def _fold_norms(gm: fx.GraphModule, grouped: dict[fx.Node, Grouped]) -> None:
    """Fold the RMSNorm feeding each new group (and nothing else) into the group's kernel."""
    for node, record in grouped.items():
        x = node.args[0]
        found = _rms_norm(x) if isinstance(x, fx.Node) and len(x.users) == 1 else None
        if found is None:
            continue
        h, weight, eps = found
        node.args = (h, *node.args[1:8], weight, eps, *node.args[10:])
        chain, erased = [x], set()
        while chain:  # the norm's nodes, now unused, from the output back
            n = chain.pop()
            if n.users or n in erased or n is h or n is weight:
                continue
            chain += list(n.all_input_nodes)
            gm.graph.erase_node(n)
            erased.add(n)
        record.norm = True
