"""Epilogue fusion: a rewritten linear and the elementwise chain after it become one kernel.

Where it sits: after the rewrite (the graph calls ``decomp::*`` operators, or — in the
``torch.compile`` backend — the rewritten modules), before inductor or eager execution.
Preconditions: an FX graph at torch level (dynamo's) or aten level (``torch.export``'s); node
shapes in ``meta["example_value"]`` or ``meta["val"]`` for the binary steps. Postconditions:
every matched chain is one operator call whose ``epilogue`` argument names the fused steps;
the graph is linted and recompiled.

The pattern, from each ``decomp::{lowrank,quant,monarch}_linear`` node whose epilogue is still
empty: follow the single user while it is

- an activation (SiLU, GELU exact or tanh, ReLU) of the chain, or
- a ``mul``/``add`` of the chain with another tensor of exactly the chain's shape (the SwiGLU
  gate product ``silu(gate(x)) * up(x)``, a residual ``h + o_proj(a)``).

Each step fused is one elementwise kernel fewer and one ``M × N`` intermediate that is neither
written to nor read back from global memory (:class:`Fused` counts them). The kernels are then
generated from the templates with that epilogue (``codegen.template``).

Then, at decode sizes (at most ``GEMV_MAX_M`` rows), sibling quantized linears — same input
node, same format and input size, no bias or low-rank term — become one
``decomp::quant_linear_group`` launch (:class:`Grouped`): a SwiGLU pair (``gate`` fused with
``silu,mul`` of an ``up`` used nowhere else) computes ``silu(gate)·up`` in one kernel, up's output
never stored; other siblings (q/k/v) two or three to a launch, each output its own tensor. When
a group's input is an RMSNorm's output used nowhere else — HF Llama's ``LlamaRMSNorm`` as dynamo
traces it, matched op by op (fp32 cast, ``pow(2)``, ``mean(-1, keepdim)``, ``+ eps``, ``rsqrt``,
the product, the cast back, ``weight ·``) — the norm is folded into the group's kernel too.

Calls of rewritten modules (``LowRankLinear``, ``QuantizedLinear``, ``LQLinear``,
``MonarchLinear``: ``call_module`` nodes, or the ``torch.compile`` backend's runners) are first
lowered to their operator; other modules are left alone.

Importing this module imports neither triton nor the operators.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

__all__ = ["Fused", "FusionReport", "Grouped", "fuse_epilogues", "group_siblings", "lower_modules", "should_fuse"]


@dataclass
class Fused:
    """One fused chain: the operator, the steps folded into it, the nodes they replaced."""

    op: str
    steps: tuple[str, ...]
    replaced: tuple[str, ...]

    @property
    def kernels_removed(self) -> int:
        """Elementwise kernels no longer launched (one per step, as eager runs them)."""
        return len(self.steps)

    @property
    def round_trips_avoided(self) -> int:
        """``M × N`` intermediates no longer written to and read back from global memory."""
        return len(self.steps)


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


@dataclass
class FusionReport:
    """What :func:`fuse_epilogues` did to a graph."""

    lowered: int = 0
    fused: list[Fused] = field(default_factory=list)
    grouped: list[Grouped] = field(default_factory=list)

    @property
    def kernels_removed(self) -> int:
        return sum(f.kernels_removed for f in [*self.fused, *self.grouped])

    @property
    def round_trips_avoided(self) -> int:
        return sum(f.round_trips_avoided for f in [*self.fused, *self.grouped])

    def __str__(self) -> str:
        head = (
            f"lowered {self.lowered} module(s); fused {len(self.fused)} chain(s), grouped {len(self.grouped)} sibling "
            f"set(s): {self.kernels_removed} kernel(s) and {self.round_trips_avoided} global round trip(s) removed"
        )
        lines = [head]
        lines += [f"  {f.op} + {','.join(f.steps)}  ({' → '.join(f.replaced)})" for f in self.fused]
        lines += [
            f"  {'SwiGLU pair' if g.pair else 'one launch'}: {' + '.join(g.members)}{' (RMSNorm folded in)' if g.norm else ''}"
            for g in self.grouped
        ]
        return "\n".join(lines)


# ---- the operators and their epilogue arguments ---------------------------------------------

# op name -> (index of the epilogue argument, index of aux)
_EPILOGUE_ARG = {"lowrank_linear": (4, 5), "quant_linear": (8, 9), "monarch_linear": (5, 6)}


def _decomp_op(node: fx.Node) -> str | None:
    """The ``decomp::*`` linear operator ``node`` calls, if any (overload or packet)."""
    if node.op != "call_function":
        return None
    target = node.target
    packet = getattr(target, "_overloadpacket", target)
    qualified = getattr(packet, "_qualified_op_name", "")
    if qualified.startswith("decomp::") and qualified[len("decomp::") :] in _EPILOGUE_ARG:
        return qualified[len("decomp::") :]
    return None


def _activation(node: fx.Node, src: fx.Node) -> str | None:
    t = node.target
    args = node.args
    if not args or args[0] is not src:
        return None
    if node.op == "call_method":
        return "relu" if t == "relu" and len(args) == 1 else None
    if node.op != "call_function":
        return None
    if t in (F.silu, torch.ops.aten.silu.default):
        return "silu"
    if t in (F.relu, torch.relu, torch.ops.aten.relu.default):
        return "relu"
    if t in (F.gelu, torch.ops.aten.gelu.default):
        approx = node.kwargs.get("approximate", args[1] if len(args) > 1 else "none")
        return "gelu_tanh" if approx == "tanh" else "gelu" if approx == "none" else None
    return None


_MUL = {operator.mul, torch.mul, torch.ops.aten.mul.Tensor}
_ADD = {operator.add, torch.add, torch.ops.aten.add.Tensor}


def _shape(node) -> tuple | None:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    meta = node.meta.get("tensor_meta")  # torch.fx.passes.shape_prop.ShapeProp
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _binary(node: fx.Node, src: fx.Node) -> tuple[str, fx.Node] | None:
    """(``"mul"``/``"add"``, the other operand) when ``node`` multiplies/adds ``src`` and a same-shape tensor."""
    if node.op == "call_function" and (node.target in _MUL or node.target in _ADD):
        kind = "mul" if node.target in _MUL else "add"
        if node.kwargs or len(node.args) != 2:
            return None  # alpha=…, out=…
    elif node.op == "call_method" and node.target in ("mul", "add") and len(node.args) == 2 and not node.kwargs:
        kind = node.target
    else:
        return None
    a, b = node.args
    other = b if a is src else a if b is src else None
    if other is None or other is src or not isinstance(other, fx.Node):
        return None
    shape = _shape(src)
    if shape is None or _shape(other) != shape or _shape(node) != shape:
        return None  # broadcasting (or unknown shapes) stays unfused
    return kind, other


def _chain(start: fx.Node) -> tuple[list[str], list[fx.Node], list[fx.Node]]:
    """(steps, aux operands, nodes replaced) of the fusable chain after ``start``."""
    steps, aux, nodes = [], [], []
    cur = start
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        act = _activation(user, cur)
        if act is not None:
            steps.append(act)
        else:
            found = _binary(user, cur)
            if found is None:
                break
            steps.append(found[0])
            aux.append(found[1])
        nodes.append(user)
        cur = user
    return steps, aux, nodes


# ---- lowering rewritten modules to their operators --------------------------------------------


_MODULES = ("LowRankLinear", "QuantizedLinear", "LQLinear", "MonarchLinear")


def _rewritten_module(gm: fx.GraphModule, node: fx.Node):
    """(module, tensor-name → graph value) when ``node`` runs a rewritten linear on one input.

    Two forms: ``call_module`` (the module's tensors read with ``get_attr``), and the
    ``torch.compile`` backend's runners — a ``call_function`` whose target carries ``module``
    and ``names`` and takes ``(x, *tensors)`` in that order (``passes.backend._Replacement``).
    """
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        module = gm.get_submodule(node.target)
        if type(module).__name__ not in _MODULES:
            return None
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        return module, {name: (lambda n=name: gm.graph.get_attr(f"{node.target}.{n}")) for name in tensors}
    module, names = (getattr(node.target, "module", None), getattr(node.target, "names", None))
    if node.op == "call_function" and type(module).__name__ in _MODULES and names is not None and not node.kwargs:
        if len(node.args) != 1 + len(names):
            return None
        return module, {name: (lambda v=value: v) for name, value in zip(names, node.args[1:])}
    return None


def _module_call(gm: fx.GraphModule, node: fx.Node):
    """(op, args) calling the operator that replaces ``node``'s rewritten linear, else None."""
    found = _rewritten_module(gm, node)
    if found is None:
        return None
    module, tensors = found
    kind = type(module).__name__

    def t(name):
        return tensors[name]() if name in tensors else None  # an absent bias is None

    x = node.args[0]
    ops = torch.ops.decomp
    if kind == "LowRankLinear":
        return ops.lowrank_linear.default, (x, t("down"), t("up"), t("bias"), "", [])
    if kind == "MonarchLinear":
        return ops.monarch_linear.default, (x, t("L"), t("R"), module.out_features, t("bias"), "", [])
    spec, names, cols = module.packed.kernel_args
    constants = [t(f"packed.{n}") for n in names]
    low_rank = (t("down"), t("up")) if kind == "LQLinear" else (None, None)
    return ops.quant_linear.default, (x, t("packed.codes"), constants, spec, cols, t("bias"), *low_rank, "", [])


def lower_modules(gm: fx.GraphModule) -> int:
    """Replace calls of rewritten linears (modules or backend runners) by their ``decomp::*``
    operator; returns the count."""
    import codegen.ops  # noqa: F401  (registers the operators)

    count = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_module", "call_function"):
            continue
        with gm.graph.inserting_before(node):
            found = _module_call(gm, node)
            if found is None:
                continue
            call = gm.graph.call_function(found[0], found[1])
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        count += 1
    return count


# ---- the pass ---------------------------------------------------------------------------------


def fuse_epilogues(gm: fx.GraphModule, *, lower: bool = True, group: bool = True) -> FusionReport:
    """Fuse every rewritten linear's elementwise tail into its kernel, in place.

    Args:
        gm: the graph (torch or aten level).
        lower: first lower ``call_module`` nodes of rewritten linears to their operators.
        group: then launch sibling quantized linears together (:func:`group_siblings`).

    Returns:
        A :class:`FusionReport` (chains fused, siblings grouped, kernels and round trips removed).
    """
    report = FusionReport()
    if lower:
        report.lowered = lower_modules(gm)
    for node in list(gm.graph.nodes):
        op = _decomp_op(node)
        if op is None:
            continue
        ep_i, aux_i = _EPILOGUE_ARG[op]
        args = list(node.args)
        if len(args) <= aux_i or args[ep_i] != "" or list(args[aux_i]):
            continue  # already fused, or called with keywords we do not rewrite
        steps, aux, chain = _chain(node)
        if not steps:
            continue
        args[ep_i] = ",".join(steps)
        args[aux_i] = aux
        last = chain[-1]
        with gm.graph.inserting_before(last):
            fused = gm.graph.call_function(node.target, tuple(args))
        fused.meta.update(last.meta)
        last.replace_all_uses_with(fused)
        for n in reversed(chain):
            gm.graph.erase_node(n)
        gm.graph.erase_node(node)
        report.fused.append(Fused(op, tuple(steps), tuple(n.name for n in [node, *chain])))
    if group:
        report.grouped = group_siblings(gm)
    gm.graph.lint()
    gm.recompile()
    return report


# ---- sibling quantized linears ----------------------------------------------------------------


def _sibling_key(node: fx.Node) -> tuple | None:
    """(input node, format, columns) of a ``decomp::quant_linear`` call the grouped kernel can take:
    positional arguments, no bias or low-rank term, tensor nodes, a known row count ≤ ``GEMV_MAX_M``."""
    if _decomp_op(node) != "quant_linear" or node.kwargs or len(node.args) != 10:
        return None
    x, codes, constants, fmt, cols, bias, down, up, _, _ = node.args
    if bias is not None or down is not None or up is not None or not isinstance(x, fx.Node):
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
    return x, fmt, cols


def _group_call(gm: fx.GraphModule, before: fx.Node, members: list[fx.Node], pair: bool, epilogue: str, aux) -> list[fx.Node]:
    """Insert the group op before ``before`` and one ``getitem`` per output; returns the getitems."""
    x, _, _, fmt, cols = members[0].args[:5]
    codes = [n.args[1] for n in members]
    constants = [c for n in members for c in n.args[2]]
    with gm.graph.inserting_before(before):
        call = gm.graph.call_function(
            torch.ops.decomp.quant_linear_group.default, (x, codes, constants, fmt, cols, pair, epilogue, list(aux), None, 0.0)
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
        if not isinstance(up, fx.Node) or _sibling_key(up) != key or up.args[8] != "" or up.args[9] or len(up.users) != 1:
            continue
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
            tensors = [t for n in members for t in (n.args[1], *n.args[2])]
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
        node.args = (h, *node.args[1:8], weight, eps)
        chain, erased = [x], set()
        while chain:  # the norm's nodes, now unused, from the output back
            n = chain.pop()
            if n.users or n in erased or n is h or n is weight:
                continue
            chain += list(n.all_input_nodes)
            gm.graph.erase_node(n)
            erased.add(n)
        record.norm = True


def should_fuse(example_inputs) -> bool:
    """Whether a compiled graph with these inputs will run the kernels (CUDA tensors, triton,
    kernels enabled, no gradient needed), i.e. whether fusing pays."""
    from codegen import dispatch

    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    if not tensors or not any(t.is_cuda for t in tensors):
        return dispatch._FORCE is True
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return dispatch.use_kernels(next(t for t in tensors if t.is_cuda))
