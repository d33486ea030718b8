"""Analyze: build the channel dependency graph and its prunable groups."""
from __future__ import annotations

import fnmatch

import onnx_graphsurgeon as gs

from graphprune.dependency import DependencyGraph
from graphprune.errors import BadInputError
from graphprune.pipeline import Pass, PassResult, PruneContext

__all__ = ["AnalyzePass", "group_nodes", "protect_nodes"]


def group_nodes(ctx: PruneContext) -> dict[int, set[str]]:
    """Node names whose weights or outputs belong to each group."""
    tensors = {m.tensor for g in ctx.groups for m in g.members}
    users: dict[str, set[str]] = {name: set() for name in tensors}
    for node in ctx.model.graph.nodes:
        for t in list(node.inputs) + list(node.outputs):
            if t.name in users and (isinstance(t, gs.Constant) or t in node.outputs):
                users[t.name].add(node.name)
    return {g.id: set().union(*(users[m.tensor] for m in g.members)) for g in ctx.groups}


def protect_nodes(ctx: PruneContext, patterns: list[str]) -> set[int]:
    """Protect every group touching a node whose name matches one of the glob patterns."""
    nodes = group_nodes(ctx)
    hit = set()
    for gid, names in nodes.items():
        if any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns):
            hit.add(gid)
    ctx.protected |= hit
    return hit


class AnalyzePass(Pass):
    name = "analyze"
    ensures = ("dependency", "groups")

    def call(self, ctx: PruneContext) -> PassResult:
        policy = dict(ctx.option("policy", {}) or {})
        ctx.dependency = DependencyGraph(ctx.model, ctx.registry, policy=policy)
        ctx.groups = ctx.dependency.groups()
        for g in ctx.groups:
            g.nodes = []
        nodes = group_nodes(ctx)
        for g in ctx.groups:
            g.nodes = sorted(nodes[g.id])
        patterns = list(ctx.option("protect", ()) or ())
        if patterns:
            all_nodes = {n.name for n in ctx.model.graph.nodes}
            missing = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in all_nodes)]
            if missing:
                raise BadInputError(f"--protect: no node named {missing[0]!r} in the model")
            protect_nodes(ctx, patterns)
        return PassResult(info={"groups": len(ctx.groups), "pinned": len(ctx.dependency.pinned)})
