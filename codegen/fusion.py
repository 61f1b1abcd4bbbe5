"""Epilogue fusion: a rewritten linear and the elementwise chain after it become one kernel.

Where it sits: after the rewrite (the graph calls ``decomp::*`` operators, or — in the
``torch.compile`` backend — the rewritten modules), before inductor or eager execution.
Preconditions: an FX graph at torch level (dynamo's) or aten level (``torch.export``'s); node
shapes in ``meta["example_value"]`` or ``meta["val"]`` for the binary steps. Postconditions:
every matched chain is one operator call whose ``epilogue`` argument names the fused steps;
the graph is linted and recompiled.

The pattern, from each ``decomp::{lowrank,quant,monarch,blockdiag,kronecker,int8_outlier}_linear`` node whose epilogue is still
empty: follow the single user while it is

- an activation (SiLU, GELU exact or tanh, ReLU) of the chain, or
- a ``mul``/``add`` of the chain with another tensor of exactly the chain's shape (the SwiGLU
  gate product ``silu(gate(x)) * up(x)``, a residual ``h + o_proj(a)``).

Each step fused is one elementwise kernel fewer and one ``M × N`` intermediate that is neither
written to nor read back from global memory (:class:`Fused` counts them). The kernels are then
generated from the templates with that epilogue (``codegen.template``).

Then (``group=True``) :mod:`codegen.siblings` launches sibling quantized linears together at
decode sizes and folds the RMSNorm before them in.

Calls of rewritten modules (``LowRankLinear``, ``QuantizedLinear``, ``LQLinear``,
``MonarchLinear``, ``BlockDiagLinear``, ``KroneckerLinear``, ``Int8OutlierLinear``: ``call_module`` nodes, or the ``torch.compile`` backend's runners) are first
lowered to their operator; other modules are left alone.

Importing this module imports neither triton nor the operators.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

__all__ = ["Fused", "FusionReport", "fuse_epilogues", "lower_modules", "should_fuse"]


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
class FusionReport:
    """What :func:`fuse_epilogues` did to a graph."""

    lowered: int = 0
    fused: list[Fused] = field(default_factory=list)
    grouped: list = field(default_factory=list)  # codegen.siblings.Grouped

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
_EPILOGUE_ARG = {
    "lowrank_linear": (4, 5),
    "quant_linear": (8, 9),
    "monarch_linear": (5, 6),
    "blockdiag_linear": (6, 7),
    "int8_outlier_linear": (7, 8),
    "kronecker_linear": (5, 6),
}


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


def _quant_args(module, x, t):
    spec, names, cols = module.packed.kernel_args
    low_rank = (t("down"), t("up")) if type(module).__name__ == "LQLinear" else (None, None)
    return "quant_linear", (x, t("packed.codes"), [t(f"packed.{n}") for n in names], spec, cols, t("bias"), *low_rank)


def _int8_outlier_args(module, x, t):
    if not module.packed.input_index.numel():  # every column an outlier: nothing for the kernel
        return None
    names = ("codes", "scale", "input_index", "outlier_columns", "outlier_weight")
    return "int8_outlier_linear", (x, *(t(f"packed.{n}") for n in names), t("bias"))


#: Rewritten module class name -> ``(module, x, tensor getter) -> (operator name, its arguments up to
#: the epilogue)``, or None where the module keeps its own code.
_LOWERINGS = {
    "LowRankLinear": lambda m, x, t: ("lowrank_linear", (x, t("down"), t("up"), t("bias"))),
    "QuantizedLinear": _quant_args,
    "LQLinear": _quant_args,
    "MonarchLinear": lambda m, x, t: ("monarch_linear", (x, t("L"), t("R"), m.out_features, t("bias"))),
    "BlockDiagLinear": lambda m, x, t: (
        "blockdiag_linear",
        (x, t("blocks"), m.out_features, t("in_index"), t("out_pos"), t("bias")),
    ),
    "KroneckerLinear": lambda m, x, t: ("kronecker_linear", (x, t("A"), t("B"), m.out_features, t("bias"))),
    "Int8OutlierLinear": _int8_outlier_args,
}


def _rewritten_module(gm: fx.GraphModule, node: fx.Node):
    """(module, tensor-name → graph value) when ``node`` runs a rewritten linear on one input.

    Two forms: ``call_module`` (the module's tensors read with ``get_attr``), and the
    ``torch.compile`` backend's runners — a ``call_function`` whose target carries ``module``
    and ``names`` and takes ``(x, *tensors)`` in that order (``passes.backend._Replacement``).
    """
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        module = gm.get_submodule(node.target)
        if type(module).__name__ not in _LOWERINGS:
            return None
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        return module, {name: (lambda n=name: gm.graph.get_attr(f"{node.target}.{n}")) for name in tensors}
    module, names = (getattr(node.target, "module", None), getattr(node.target, "names", None))
    if node.op == "call_function" and type(module).__name__ in _LOWERINGS and names is not None and not node.kwargs:
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

    def t(name):
        return tensors[name]() if name in tensors else None  # an absent bias is None

    lowered = _LOWERINGS[type(module).__name__](module, node.args[0], t)
    if lowered is None:
        return None
    name, args = lowered
    return getattr(torch.ops.decomp, name).default, (*args, "", [])  # no epilogue yet, no aux


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
        group: then launch sibling quantized linears together (:func:`codegen.siblings.group_siblings`).

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
        from codegen.siblings import group_siblings

        report.grouped = group_siblings(gm)
    gm.graph.lint()
    gm.recompile()
    return report


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
