"""Static evaluation of shape sub-graphs (Shape -> Gather -> Concat ...).

Exporters often compute reshape targets, slice bounds and expand shapes at run time
from `Shape` of a tensor. Where the tensor's shape is known up to symbolic axes, the
sub-graph is evaluated twice with different sizes for the symbols; entries that agree
are static. This is what lets a rule read such values without folding them away.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

__all__ = ["ShapeEvaluator", "evaluate_node"]

_MAX_ELEMENTS = 4096
_SKIP = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def evaluate_node(node: gs.Node, feeds: dict, opsets: list) -> list[np.ndarray]:
    """Run one node with onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    proto = OnnxExporter.export_node(node)
    inputs = [t for t in node.inputs if t.name]
    graph = onnx.helper.make_graph(
        [proto], "eval",
        [onnx.helper.make_tensor_value_info(t.name, onnx.helper.np_dtype_to_tensor_dtype(feeds[t.name].dtype), None)
         for t in inputs],
        [onnx.helper.make_tensor_value_info(t.name, onnx.TensorProto.UNDEFINED, None) for t in node.outputs if t.name],
    )
    model = onnx.helper.make_model(graph, opset_imports=opsets)
    return ReferenceEvaluator(model).run(None, {t.name: feeds[t.name] for t in inputs})


class ShapeEvaluator:
    """Evaluates small integer tensors computed from shapes; None where it cannot."""

    def __init__(self, graph: gs.Graph, opsets: list, resize: dict | None = None):
        """`resize`: (tensor, axis) -> (num, den): `Shape` reads that axis as size * num / den
        (what the graph computes at run time once channels were removed)."""
        self.opsets = opsets
        self.resize = resize or {}
        self.producer: dict[str, gs.Node] = {}
        for node in graph.nodes:
            for t in node.outputs:
                self.producer[t.name] = node
        self._memo: list[dict] = [{}, {}]

    @staticmethod
    def _symbol_value(name: str, run: int) -> int:
        parts = [p.strip() for p in name.split("*")]
        if len(parts) > 1 and all(p.isdigit() or p.isidentifier() for p in parts):
            # a product symbol ('batch*seq') is the product of its factors' values
            return int(np.prod([int(p) if p.isdigit() else ShapeEvaluator._symbol_value(p, run) for p in parts]))
        h = sum(ord(c) * (i + 1) for i, c in enumerate(name)) % 997
        return (6007 if run == 0 else 7919) + h * (13 if run == 0 else 17)

    @classmethod
    def _dim_value(cls, name: str, run: int) -> int:
        """A symbolic size's value in one run; a product such as '4*batch' (a batch axis merged
        with a static factor, written by the shape refinement) is the product of its parts."""
        parts = [q.strip() for q in name.split("*")]
        if len(parts) > 1 and all(q.isdigit() or q.isidentifier() for q in parts):
            return int(np.prod([int(q) if q.isdigit() else cls._symbol_value(q, run) for q in parts]))
        return cls._symbol_value(name, run)

    def _value(self, t: gs.Tensor, run: int, depth: int = 0):
        if isinstance(t, gs.Constant):
            v = np.asarray(t.values)
            return v if v.size <= _MAX_ELEMENTS else None
        memo = self._memo[run]
        if t.name in memo:
            return memo[t.name]
        memo[t.name] = None  # guards cycles
        node = self.producer.get(t.name)
        result = None
        if node is not None and depth < 200:
            result = self._node_value(node, t, run, depth)
        memo[t.name] = result
        return result

    def _node_value(self, node: gs.Node, t: gs.Tensor, run: int, depth: int):
        if node.op in ("Shape", "Size"):
            shape = node.inputs[0].shape
            if shape is None:
                return None
            dims = []
            for d in shape:
                if isinstance(d, (int, np.integer)) and d >= 0:
                    dims.append(int(d))
                elif isinstance(d, str):  # named or inferred (unk__N) symbols alike
                    dims.append(self._dim_value(d, run))
                else:
                    return None
            for k in range(len(dims)):
                num, den = self.resize.get((node.inputs[0].name, k), (1, 1))
                dims[k] = dims[k] * num // den
            if node.op == "Size":
                return np.array(int(np.prod(dims)), dtype=np.int64)
            r = len(dims)
            start = int(node.attrs.get("start", 0))
            end = node.attrs.get("end", None)
            start = max(0, start + r if start < 0 else start)
            end = r if end is None else (int(end) + r if int(end) < 0 else min(int(end), r))
            return np.array(dims[start:end], dtype=np.int64)
        if (node.domain or "") not in ("", "ai.onnx") or node.op in _SKIP:
            return None
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            return None
        feeds = {}
        for inp in node.inputs:
            if not inp.name:
                continue
            v = self._value(inp, run, depth + 1)
            if v is None:
                return None
            feeds[inp.name] = np.asarray(v)
        try:
            outs = evaluate_node(node, feeds, self.opsets)
        except Exception:
            return None
        memo = self._memo[run]
        named = [o for o in node.outputs if o.name]
        for o, v in zip(named, outs):
            v = np.asarray(v)
            memo[o.name] = v if v.size <= _MAX_ELEMENTS else None
        return memo.get(t.name)

    def symbolic(self, t: gs.Tensor, symbols) -> list | None:
        """Entries as ints (static), symbol names (equal to that symbol's size) or None."""
        a, b = self._value(t, 0), self._value(t, 1)
        if a is None or b is None or a.shape != b.shape or a.ndim != 1:
            return None
        out = []
        for x, y in zip(a.tolist(), b.tolist()):
            if x == y:
                out.append(int(x))
                continue
            found = next((s for s in symbols if self._dim_value(s, 0) == x and self._dim_value(s, 1) == y), None)
            if found is None:  # k * symbol: a symbolic axis merged with static ones (batch * heads),
                # or a symbol the input holds only inside such a product
                bases = sorted({q.strip() for s in symbols for q in s.split("*") if q.strip().isidentifier()})
                for s in bases:
                    v0, v1 = self._symbol_value(s, 0), self._symbol_value(s, 1)
                    if x % v0 == 0 and y % v1 == 0 and x // v0 == y // v1 >= 1:
                        found = s if x // v0 == 1 else f"{x // v0}*{s}"
                        break
            out.append(found)
        return out

    def runs(self, t: gs.Tensor):
        """The tensor's values in the two evaluation runs (symbols at different sizes), or None."""
        a, b = self._value(t, 0), self._value(t, 1)
        return None if a is None or b is None or a.shape != b.shape else (a, b)

    def static(self, t: gs.Tensor):
        """(values, static_mask) of a 1-D or scalar int tensor, or None if not evaluable."""
        a, b = self._value(t, 0), self._value(t, 1)
        if a is None or b is None or a.shape != b.shape:
            return None
        return a, (a == b)

    def value(self, t: gs.Tensor):
        """The tensor's value if it is the same whatever the symbolic sizes are; else None."""
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        s = self.static(t)
        if s is None or not np.all(s[1]):
            return None
        return s[0]
