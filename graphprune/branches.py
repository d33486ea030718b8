"""Residual branches: y = x + f(x) through an Add whose shortcut x is the identity.

The branch f is the sub-graph that only f needs: walking back from the Add's f input, a
node belongs to the branch when every consumer of every output it has is in the branch
(or is the Add, through its f input). A graph output ends the walk, except a KV-cache
output (present keys/values) that a removed attention sub-layer stops producing. The
shortcut must read x itself: the branch's external inputs include x, so a projection
shortcut (a strided 1x1 conv on x's way to the Add) is not a branch. This covers pre-norm
transformers (the LayerNorm/RMSNorm before the sub-layer is in f), post-norm ones (the
LayerNorm after the Add reads y, not f, so it stays), attention and MLP sub-layers
separately, fused contrib ops inside f (com.microsoft Attention, MultiHeadAttention, ...),
and CNN residual blocks with an identity shortcut.

Removing a branch replaces y by x and deletes what only f needed; cache inputs/outputs
that only the removed nodes read or wrote leave the graph's inputs/outputs too.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .cost import model_cost
from .graph import Model, tensor_shape
from .kv_cache import cache_io

__all__ = ["ResidualBranch", "find_branches", "remove_branches", "zero_branches", "protected_branches"]


@dataclass
class ResidualBranch:
    """One residual branch: `add` computes `output` = `shortcut` + `branch_output`."""

    id: int
    add: str            # the Add node's name
    shortcut: str       # x
    branch_output: str  # f(x)
    output: str         # y
    nodes: list = field(default_factory=list)  # names of the nodes only f needs, in graph order
    macs: float = 0.0
    params: float = 0.0
    cache_inputs: list = field(default_factory=list)
    cache_outputs: list = field(default_factory=list)

    @property
    def kind(self) -> str:
        ops = set(self.ops)
        if ops & {"Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention"}:
            return "attention"
        if ops & {"Conv", "ConvTranspose"}:
            return "conv"
        return "mlp"

    ops: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"id": self.id, "add": self.add, "kind": self.kind, "shortcut": self.shortcut,
                "branch_output": self.branch_output, "output": self.output, "nodes": list(self.nodes),
                "macs": int(self.macs), "params": int(self.params), "cache_inputs": list(self.cache_inputs),
                "cache_outputs": list(self.cache_outputs)}


def _node_name(node: gs.Node) -> str:
    return node.name or node.outputs[0].name


def _same_shape(a: gs.Tensor, b: gs.Tensor) -> bool:
    sa, sb = tensor_shape(a), tensor_shape(b)
    return sa is not None and sb is not None and len(sa) == len(sb) and all(
        x == y and x is not None for x, y in zip(sa, sb))


def _branch_nodes(graph: gs.Graph, add: gs.Node, f: gs.Tensor, order: dict, cache: set) -> list | None:
    """Nodes only `f` needs (None when f has other readers or no producer)."""
    outputs = {t.name for t in graph.outputs}
    if f.name in outputs or len(f.inputs) != 1 or any(c is not add for c in f.outputs):
        return None
    member: set[int] = set()
    stack = [f.inputs[0]]
    candidates: dict[int, gs.Node] = {}
    while stack:  # ancestors of f, visited latest first so consumers are decided before producers
        n = stack.pop()
        if id(n) in candidates:
            continue
        candidates[id(n)] = n
        for t in n.inputs:
            if isinstance(t, gs.Variable) and t.inputs:
                stack.append(t.inputs[0])
    for n in sorted(candidates.values(), key=lambda n: -order[id(n)]):
        ok = True
        for t in n.outputs:
            if t.name in outputs and t.name not in cache:
                ok = False
                break
            for c in t.outputs:
                if c is add and t is f:
                    continue
                if id(c) not in member:
                    ok = False
                    break
            if not ok:
                break
        if ok:
            member.add(id(n))
    return [n for n in graph.nodes if id(n) in member]


def find_branches(model: Model, shape: dict | None = None) -> list[ResidualBranch]:
    """Every residual branch of the graph (see the module docstring)."""
    graph = model.graph
    graph.toposort()
    order = {id(n): k for k, n in enumerate(graph.nodes)}
    cache = cache_io(graph)
    per_node = model_cost(model, shape=shape).per_node  # at the concrete input shape (cost.input_shapes)
    graph_inputs = {t.name for t in graph.inputs}
    branches: list[ResidualBranch] = []
    for add in graph.nodes:
        if not (add.op == "Add" and len(add.inputs) == 2 and len(add.outputs) == 1) and not _fused_skip(model, add):
            continue
        y = add.outputs[0]
        for x, f in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            if not isinstance(x, gs.Variable) or not isinstance(f, gs.Variable) or not _same_shape(x, y):
                continue
            nodes = _branch_nodes(graph, add, f, order, cache)
            if not nodes:
                continue
            inside = {id(n) for n in nodes}
            reads = {t.name for n in nodes for t in n.inputs if isinstance(t, gs.Variable)}
            if x.name not in reads:
                continue  # the shortcut is not the branch's input (a projection shortcut, or unrelated)
            macs = sum(per_node.get(_node_name(n), 0.0) for n in nodes)
            if macs <= 0:
                continue  # nothing to save (a bias or scale, not a sub-layer)
            params = 0.0
            for n in nodes:
                for t in n.inputs:
                    if isinstance(t, gs.Constant) and all(id(c) in inside for c in t.outputs):
                        params += float(np.prod(t.shape)) if t.shape is not None else 0.0
            cache_in = sorted({t.name for n in nodes for t in n.inputs if t.name in graph_inputs and t.name in cache
                               and all(id(c) in inside for c in t.outputs)})
            cache_out = sorted({t.name for n in nodes for t in n.outputs if t.name in cache})
            branches.append(ResidualBranch(len(branches), _node_name(add), x.name, f.name, y.name,
                                           [_node_name(n) for n in nodes], macs, params, cache_in, cache_out,
                                           ops=[n.op for n in nodes]))
            break
    return branches


def _fused_skip(model: Model, node: gs.Node) -> bool:
    """com.microsoft SkipLayerNormalization: LayerNorm(input + skip + bias), the residual Add fused in.
    A branch through it is removable where the op becomes a LayerNormalization (opset >= 17) and its
    mean / inv_std_var outputs are unused."""
    if node.op != "SkipLayerNormalization" or (node.domain or "") != "com.microsoft" or model.opset < 17:
        return False
    return all(not t.outputs and t.name not in {o.name for o in model.graph.outputs}
               for t in node.outputs[1:3] if t.name)


def _unfuse_skip(graph: gs.Graph, node: gs.Node, x: gs.Tensor) -> None:
    """SkipLayerNormalization(x, f, gamma, beta, bias) without f: LayerNormalization(x + bias)."""
    ins = list(node.inputs) + [gs.Variable.empty()] * (5 - len(node.inputs))
    gamma, beta, bias = ins[2], ins[3], ins[4]
    src = x
    if bias.name:
        src = gs.Variable(f"{node.name}_gp_biased", dtype=x.dtype, shape=x.shape)
        graph.nodes.append(gs.Node("Add", name=f"{node.name}_gp_bias", inputs=[x, bias], outputs=[src]))
    outs = list(node.outputs)
    if len(outs) > 3 and outs[3].name:  # input_skip_bias_sum is now x (+ bias)
        total = outs[3]
        graph.nodes.append(gs.Node("Identity", name=f"{node.name}_gp_sum", inputs=[src], outputs=[total]))
    node.op, node.domain = "LayerNormalization", None
    node.attrs = {"axis": -1, "epsilon": float(node.attrs.get("epsilon", 1e-12))}
    node.inputs.clear()
    node.inputs.extend([src, gamma] + ([beta] if beta.name else []))
    node.outputs.clear()
    node.outputs.extend(outs[:1])


def protected_branches(branches: list[ResidualBranch], patterns) -> set[int]:
    """Ids of the branches containing a node (or whose Add is) matched by a --protect glob."""
    pats = list(patterns or ())
    return {b.id for b in branches
            if any(fnmatch.fnmatchcase(name, p) for name in [b.add, *b.nodes] for p in pats)}


def remove_branches(model: Model, chosen: list[ResidualBranch]) -> Model:
    """A copy of `model` without the chosen branches: y replaced by x, then dead-node cleanup."""
    out = model.copy()
    graph = out.graph
    tensors = graph.tensors()
    nodes = {_node_name(n): n for n in graph.nodes}
    output_names = {t.name for t in graph.outputs}
    drop_out = {name for b in chosen for name in b.cache_outputs}
    drop_in = {name for b in chosen for name in b.cache_inputs}
    for b in chosen:
        add = nodes[b.add]
        x, y = tensors[b.shortcut], tensors[b.output]
        if add.op == "SkipLayerNormalization":
            _unfuse_skip(graph, add, x)
        elif b.output in output_names:  # keep the output's name: y = Identity(x)
            add.op, add.attrs = "Identity", {}
            add.inputs.clear()
            add.inputs.append(x)
        else:
            for consumer in list(y.outputs):
                for k, t in enumerate(consumer.inputs):
                    if t is y:
                        consumer.inputs[k] = x
            add.outputs.clear()
            add.inputs.clear()
    graph.outputs = [t for t in graph.outputs if t.name not in drop_out]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    used = {t.name for n in graph.nodes for t in n.inputs}
    graph.inputs = [t for t in graph.inputs if t.name not in drop_in or t.name in used]
    return out


def zero_branches(proto: onnx.ModelProto, chosen: list[ResidualBranch]) -> onnx.ModelProto:
    """The oracle's reference: the original with the chosen branches' outputs multiplied by zero."""
    ref = onnx.ModelProto()
    ref.CopyFrom(proto)
    names = {b.branch_output: b for b in chosen}
    adds = {b.add for b in chosen}
    dtypes = {vi.name: vi.type.tensor_type.elem_type for vi in
              list(ref.graph.value_info) + list(ref.graph.input) + list(ref.graph.output)}
    new_nodes = []
    for node in ref.graph.node:
        if (node.name or node.output[0]) in adds:
            for k, t in enumerate(node.input):
                if t in names:
                    zero = f"{t}__gp_zero"
                    scaled = f"{t}__gp_zeroed"
                    dt = dtypes.get(t, onnx.TensorProto.FLOAT) or onnx.TensorProto.FLOAT
                    ref.graph.initializer.append(onnx.numpy_helper.from_array(
                        np.zeros((), onnx.helper.tensor_dtype_to_np_dtype(dt)), zero))
                    new_nodes.append(onnx.helper.make_node("Mul", [t, zero], [scaled], name=f"{t}__gp_zero_mul"))
                    node.input[k] = scaled
        new_nodes.append(node)
    del ref.graph.node[:]
    ref.graph.node.extend(new_nodes)
    return ref
