"""A networkx view of an FX graph, for analyses that want graph algorithms.

Pure analysis: reads the graph, never changes it. Each networkx node is keyed by the FX
node's name and carries ``node`` (the FX node), ``op``, ``target`` and, when shape
propagation ran, ``shape`` and ``dtype``.
"""

from __future__ import annotations

import networkx as nx
import torch

__all__ = ["shared_input_groups", "to_networkx"]


def to_networkx(graph: torch.fx.Graph) -> nx.DiGraph:
    """Return a directed graph with an edge from each node to each of its users."""
    g = nx.DiGraph()
    for node in graph.nodes:
        val = node.meta.get("val")
        attrs = {"node": node, "op": node.op, "target": node.target}
        if isinstance(val, torch.Tensor):
            attrs.update(shape=tuple(val.shape), dtype=val.dtype)
        g.add_node(node.name, **attrs)
    for node in graph.nodes:
        for user in node.users:
            g.add_edge(node.name, user.name)
    return g


def shared_input_groups(input_of: dict[str, str | None]) -> list[list[str]]:
    """Group keys whose values (input node names) are equal, keeping first-seen order.

    Used to let weight uses that read the same activation (q/k/v, gate/up) share one
    calibration covariance. Keys mapped to ``None`` get a group of their own.
    """
    groups: dict[object, list[str]] = {}
    for key, inp in input_of.items():
        groups.setdefault(inp if inp is not None else ("solo", key), []).append(key)
    return list(groups.values())
