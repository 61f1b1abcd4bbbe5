"""Weight sites: which parameters feed which matrix-like ops, found on the captured graph.

Runs after :func:`ir.capture.capture`. Writes ``node.meta["decomp_param"]`` (the canonical
parameter name) on every weight-using node and returns one :class:`WeightSite` per distinct
parameter tensor, so tied weights (SmolLM2's embedding and lm_head) are one site: one
decision, counted once. Sites are what the transforms propose options for.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import nn

from ir.graph import to_networkx

__all__ = ["SkippedParameter", "UseKind", "WeightSite", "WeightUse", "find_weight_sites", "sites_from_modules"]

aten = torch.ops.aten


class UseKind(enum.Enum):
    """How an op consumes a weight, in the orientation a rewrite needs."""

    LINEAR = "linear"  # nn.Linear: y = x Wᵀ, W is (out, in)
    CONV1D = "conv1d"  # transformers Conv1D (GPT-2): y = x W, W is (in, out)
    CONV1X1 = "conv1x1"  # nn.Conv2d with a 1×1 kernel, groups=1: W is (out, in, 1, 1)
    EMBEDDING = "embedding"  # nn.Embedding: row lookup, W is (num, dim)


_MODULE_FOR_KIND = {
    UseKind.LINEAR: "Linear",
    UseKind.CONV1D: "Conv1D",
    UseKind.CONV1X1: "Conv2d",
    UseKind.EMBEDDING: "Embedding",
}


@dataclass(frozen=True)
class WeightUse:
    """One op of the graph that reads a site's weight.

    Attributes:
        module: dotted path of the module whose ``.weight`` the op reads.
        kind: how the op consumes it.
        node: name of the graph node.
        input_node: name of the node feeding the op's activation (uses that share it share
            calibration statistics), ``None`` for embeddings.
        rows: how many activation rows the op processed on the example inputs (tokens, or
            pixels for a 1×1 conv) — the ``M`` of its matmul.
    """

    module: str
    kind: UseKind
    node: str
    input_node: str | None
    rows: int


@dataclass(frozen=True)
class WeightSite:
    """A parameter tensor used as a matrix by one or more ops.

    Attributes:
        name: canonical parameter name (first name in ``named_parameters`` order).
        aliases: every name of the same tensor (tied weights have several).
        shape: the parameter's shape.
        dtype: the parameter's dtype.
        uses: the ops reading it.
    """

    name: str
    aliases: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    uses: tuple[WeightUse, ...]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(out, in)`` of the weight as the matrix of a linear map (rows, cols for embeddings)."""
        kinds = {u.kind for u in self.uses}
        if kinds == {UseKind.CONV1D}:
            return self.shape[1], self.shape[0]
        return self.shape[0], math.prod(self.shape[1:])

    def as_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (this site's parameter, or a tensor of its shape) as the ``matrix_shape`` matrix."""
        if {u.kind for u in self.uses} == {UseKind.CONV1D}:
            return weight.t()
        return weight.reshape(weight.shape[0], -1)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def rows(self) -> int:
        """Activation rows processed per forward of the example inputs, over all uses."""
        return sum(u.rows for u in self.uses)


@dataclass(frozen=True)
class SkippedParameter:
    """A matrix-shaped parameter no transform may rewrite, and why (shown in the report)."""

    name: str
    reason: str


def _kind_of(node: torch.fx.Node, placeholder: str) -> UseKind | None:
    args = node.args
    name_at = lambda i: getattr(args[i], "name", None) if len(args) > i else None  # noqa: E731
    if node.target == aten.linear.default and name_at(1) == placeholder:
        return UseKind.LINEAR
    if node.target == aten.addmm.default and name_at(2) == placeholder:
        return UseKind.CONV1D
    if node.target in (aten.mm.default, aten.matmul.default) and name_at(1) == placeholder:
        return UseKind.CONV1D
    if node.target == aten.embedding.default and name_at(0) == placeholder:
        return UseKind.EMBEDDING
    if node.target in (aten.conv2d.default, aten.convolution.default) and name_at(1) == placeholder:
        weight = args[1].meta.get("val")
        groups = args[6] if node.target == aten.conv2d.default and len(args) > 6 else 1
        if node.target == aten.convolution.default:
            groups = args[8] if len(args) > 8 else 1
        if weight is not None and tuple(weight.shape[2:]) == (1, 1) and groups == 1:
            return UseKind.CONV1X1
    return None


def _activation_input(node: torch.fx.Node, kind: UseKind) -> str | None:
    if kind is UseKind.EMBEDDING:
        return None
    arg = node.args[1] if kind is UseKind.CONV1D and node.target == aten.addmm.default else node.args[0]
    # Conv1D reshapes its input before addmm; look through the view so that q/k/v-style
    # siblings reading the same tensor are recognised as sharing it.
    while isinstance(arg, torch.fx.Node) and arg.target in (aten.view.default, aten.reshape.default):
        arg = arg.args[0]
    return getattr(arg, "name", None)


def _rows(node: torch.fx.Node, kind: UseKind) -> int:
    val = node.meta.get("val")
    if val is None:
        return 0
    shape = tuple(val.shape)
    if kind is UseKind.CONV1X1:
        return shape[0] * math.prod(shape[2:])
    return math.prod(shape[:-1])


def _module_path(node: torch.fx.Node, aliases: tuple[str, ...]) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        if any(a.rpartition(".")[0] == path for a in aliases):
            return path
    # Fall back to the parameter's own owner when the op was not attributed to a module.
    owners = [a.rpartition(".")[0] for a in aliases if a.endswith(".weight")]
    return owners[0] if len(owners) == 1 else None


def find_weight_sites(
    program: torch.export.ExportedProgram, model: nn.Module
) -> tuple[list[WeightSite], list[SkippedParameter]]:
    """Map the weight-using nodes of ``program`` to parameters of ``model``.

    A parameter is a site when every op reading it is a supported matrix use (linear,
    Conv1D, 1×1 conv, embedding) of the module that owns it as ``.weight``. Other
    matrix-shaped parameters are returned as skipped, with the reason.

    Args:
        program: the result of :func:`ir.capture.capture` on ``model``.
        model: the captured module.

    Returns:
        ``(sites, skipped)``, sites in graph order of their first use.
    """
    by_id: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(fqn)
        params[id(p)] = p
    fqn_to_id = {fqn: pid for pid, names in by_id.items() for fqn in names}
    placeholder_to_fqn = program.graph_signature.inputs_to_parameters

    graph = program.graph
    nx_graph = to_networkx(graph)
    uses: dict[int, list[WeightUse]] = {}
    bad: dict[int, str] = {}
    for placeholder, fqn in placeholder_to_fqn.items():
        pid = fqn_to_id.get(fqn)
        if pid is None or params[pid].dim() < 2:
            continue
        aliases = tuple(by_id[pid])
        for user_name in nx_graph.successors(placeholder):
            node = nx_graph.nodes[user_name]["node"]
            kind = _kind_of(node, placeholder)
            if kind is None:
                bad.setdefault(pid, f"read by {node.target} (node {node.name}), which no transform rewrites")
                continue
            module = _module_path(node, aliases)
            owner = model.get_submodule(module) if module is not None else None
            if owner is None or getattr(owner, "weight", None) is not params[pid]:
                bad.setdefault(pid, f"op {node.name} reads it outside a module owning it as .weight")
                continue
            if type(owner).__name__ != _MODULE_FOR_KIND[kind]:
                bad.setdefault(pid, f"owner {module} is a {type(owner).__name__}, expected {_MODULE_FOR_KIND[kind]}")
                continue
            node.meta["decomp_param"] = aliases[0]
            uses.setdefault(pid, []).append(
                WeightUse(module, kind, node.name, _activation_input(node, kind), _rows(node, kind))
            )

    order = {node.name: i for i, node in enumerate(graph.nodes)}
    sites, skipped = [], []
    for pid, site_uses in uses.items():
        names = tuple(by_id[pid])
        if pid in bad:
            skipped.append(SkippedParameter(names[0], bad.pop(pid)))
            continue
        kinds = {u.kind for u in site_uses}
        if UseKind.CONV1D in kinds and len(kinds) > 1:
            skipped.append(SkippedParameter(names[0], "used both as Conv1D and in another orientation"))
            continue
        p = params[pid]
        site_uses.sort(key=lambda u: order[u.node])
        sites.append(WeightSite(names[0], names, tuple(p.shape), p.dtype, tuple(site_uses)))
    skipped += [SkippedParameter(by_id[pid][0], reason) for pid, reason in bad.items()]
    sites.sort(key=lambda s: order[s.uses[0].node])
    return sites, skipped


def _kind_of_module(module: nn.Module) -> UseKind | None:
    name = type(module).__name__
    if isinstance(module, nn.Linear):
        return UseKind.LINEAR
    if isinstance(module, nn.Embedding):
        return UseKind.EMBEDDING
    if isinstance(module, nn.Conv2d):
        ok = tuple(module.kernel_size) == (1, 1) and module.groups == 1
        return UseKind.CONV1X1 if ok else None
    if name == "Conv1D":  # transformers.pytorch_utils.Conv1D, matched by name to avoid importing transformers
        return UseKind.CONV1D
    return None


def sites_from_modules(model: nn.Module, names: list[str]) -> list[WeightSite]:
    """Rebuild the sites of the given parameters from the module tree, without capturing.

    Used to replay a saved plan: which modules own a parameter as ``.weight`` determines how
    it is used. ``input_node`` is unknown (``None``) and ``rows`` is 0.

    Raises:
        ValueError: a name that is not a parameter of ``model``, or one owned by a module
            no transform can rewrite.
    """
    by_id: dict[int, list[str]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(fqn)
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append((path, module))
    sites = []
    for name in names:
        try:
            p = model.get_parameter(name)
        except AttributeError:
            raise ValueError(f"the plan names {name}, which is not a parameter of this {type(model).__name__}") from None
        uses = []
        for path, module in owners.get(id(p), []):
            kind = _kind_of_module(module)
            if kind is None:
                raise ValueError(f"{name} is the weight of {path} ({type(module).__name__}), which no transform rewrites")
            uses.append(WeightUse(path, kind, path, None, 0))
        if not uses:
            raise ValueError(f"{name} is not the .weight of any module; no transform can rewrite it")
        sites.append(WeightSite(by_id[id(p)][0], tuple(by_id[id(p)]), tuple(p.shape), p.dtype, tuple(uses)))
    return sites
