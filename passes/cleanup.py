"""Dead-node removal and shape refresh, run once at the end of the rewrite."""
from __future__ import annotations

from graphprune.graph import Model
from graphprune.pipeline import Pass, PassResult, PruneContext

__all__ = ["DeadNodeCleanupPass"]


class DeadNodeCleanupPass(Pass):
    name = "cleanup"

    def call(self, ctx: PruneContext) -> PassResult:
        graph = ctx.model.graph
        before = len(graph.nodes)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        ctx.model = Model.from_proto(ctx.model.to_proto(infer=False, materialize_data=False), ctx.model.meta)
        return PassResult(modified=len(ctx.model.graph.nodes) != before)
