"""Op-rule infrastructure: the rule interface, the context rules talk to, the registry."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph import const_values, tensor_shape
from ..rule_context import FactorBlock, RuleContext

__all__ = ["OpRule", "RuleContext", "RewriteContext", "OpRuleRegistry", "FactorBlock", "register_op_rule"]


class OpRule:
    """How one op maps the channels of its inputs onto its outputs.

    `analyze` ties/pins/tags axes through the :class:`RuleContext`; any axis of size
    > 1 it leaves untouched is pinned (fail closed). `rewrite` fixes attributes and
    shape constants after channels were removed; sliced weights are handled for it.
    """

    shape_inputs: tuple = ()  # input positions that carry shapes/indices, not data

    def analyze(self, ctx: "RuleContext") -> None:
        raise NotImplementedError

    def rewrite(self, rctx: "RewriteContext") -> None:
        return None

    def is_shape_input(self, node: gs.Node, tensor: gs.Tensor) -> bool:
        return any(i < len(node.inputs) and node.inputs[i] is tensor for i in self.shape_inputs)


class FunctionRule(OpRule):
    def __init__(self, analyze: Callable, rewrite: Callable | None = None, shape_inputs: tuple = ()):
        self._analyze, self._rewrite, self.shape_inputs = analyze, rewrite, shape_inputs

    def analyze(self, ctx):
        self._analyze(ctx)

    def rewrite(self, rctx):
        if self._rewrite:
            self._rewrite(rctx)


@dataclass
class _Entry:
    rule: OpRule
    since: int
    until: int


class OpRuleRegistry:
    """Rules keyed by (domain, op_type) and opset range; copy it to customise one analysis."""

    def __init__(self):
        self._rules: dict[tuple[str, str], list[_Entry]] = {}

    def register(self, op_type: str, rule: OpRule, *, domain: str = "", since: int = 1, until: int = 10**6) -> None:
        domain = "" if domain == "ai.onnx" else domain
        self._rules.setdefault((domain, op_type), []).insert(0, _Entry(rule, since, until))

    def lookup(self, domain: str, op_type: str, opset: int) -> OpRule | None:
        domain = "" if domain == "ai.onnx" else domain
        for e in self._rules.get((domain, op_type), ()):
            if e.since <= (opset or e.since) <= e.until:
                return e.rule
        return None

    def ops(self) -> list[tuple[str, str]]:
        return sorted(self._rules)

    def copy(self) -> "OpRuleRegistry":
        new = OpRuleRegistry()
        new._rules = {k: list(v) for k, v in self._rules.items()}
        return new


_GLOBAL = OpRuleRegistry()


def register_op_rule(op_type: str, rule: "OpRule | Callable", *, domain: str = "", since: int = 1,
                     until: int = 10**6, rewrite: Callable | None = None,
                     registry: OpRuleRegistry | None = None) -> OpRule:
    """Register `rule` (an OpRule, or an analyze(ctx) function) for `op_type` in `domain`.

    Without `registry`, the rule goes to the global registry that every later analysis
    copies; pass a registry to keep it local to one run.
    """
    if not isinstance(rule, OpRule):
        rule = FunctionRule(rule, rewrite)
    (registry or _GLOBAL).register(op_type, rule, domain=domain, since=since, until=until)
    return rule


class RewriteContext:
    """What an op rule sees of one node after channels were removed."""

    def __init__(self, node: gs.Node, kept: dict, orig_shapes: dict, graph: gs.Graph, namer, opset: int,
                 value=const_values, folded: dict | None = None, runs=None, runs_after=None):
        self.folded = folded or {}  # (tensor, axis) -> static units of a folded axis (dynamic x units)
        self.runs = runs  # runs(tensor) -> a shape tensor's values at two sets of symbol sizes, or None
        self.runs_after = runs_after  # the same, as the pruned graph computes them (Shape of pruned tensors)
        self.node = node
        self.graph_opset = opset
        self.value = value  # value(tensor) -> np.ndarray | None (constants and static shape values)
        self._kept = kept
        self._orig = orig_shapes
        self.graph = graph
        self._namer = namer

    def kept(self, t: gs.Tensor | None, axis: int) -> np.ndarray | None:
        """Kept element indices of t's axis, or None if the axis is unchanged."""
        if t is None:
            return None
        shape = self._orig.get(t.name)
        if shape is not None and axis < 0:
            axis += len(shape)
        return self._kept.get((t.name, axis))

    def orig_shape(self, t: gs.Tensor | None):
        return None if t is None else self._orig.get(t.name)

    def new_size(self, t: gs.Tensor, axis: int):
        if self.is_folded(t, axis):  # its size is dynamic x kept units: a rule must rewrite it itself
            raise ValueError(f"{self.node.op} {self.node.name}: no static size for the folded axis {axis} of {t.name}")
        k = self.kept(t, axis)
        if k is not None:
            return len(k)
        shape = self.orig_shape(t)
        return None if shape is None else shape[axis]

    def changed(self, t: gs.Tensor | None) -> bool:
        shape = self.orig_shape(t)
        return t is not None and shape is not None and any(self.kept(t, a) is not None for a in range(len(shape)))

    def is_folded(self, t: gs.Tensor | None, axis: int) -> bool:
        shape = self.orig_shape(t)
        if t is None or shape is None:
            return False
        return (t.name, axis + len(shape) if axis < 0 else axis) in self.folded

    def scale_shape_entries(self, index: int, ratios: dict[int, tuple[int, int]]) -> None:
        """Multiply entries of the run-time 1-D shape input `index` by num/den in exact integer
        arithmetic (a folded axis batch*H becomes batch*H'); entries < 1 (-1: inferred, 0: copied)
        are kept: Where(shape > 0, Div(Mul(shape, num), den), shape)."""
        if not ratios:
            return
        t = self.node.inputs[index]
        rank = (tensor_shape(t) or [None])[0]
        if not isinstance(rank, int):
            raise ValueError(f"cannot rewrite the run-time shape of {self.node.name}: unknown length")
        num, den = np.ones(rank, np.int64), np.ones(rank, np.int64)
        for k, (a, b) in ratios.items():
            num[k], den[k] = a, b
        base = self.node.name or self.node.op

        def var(hint, dtype=np.int64):
            return gs.Variable(self._namer(f"{base}_{hint}"), dtype=dtype, shape=[rank])

        mul, div, pos, out = var("shape_mul"), var("shape_div"), var("shape_pos", np.bool_), var("shape")
        if self.graph_opset >= 9:
            steps = (("Mul", [t, self.constant(num, "num")], mul, {}),
                     ("Div", [mul, self.constant(den, "den")], div, {}),
                     ("Greater", [t, self.constant(np.zeros(rank, np.int64), "zero")], pos, {}),
                     ("Where", [pos, div, t], out, {}))
        else:  # no Where, and Greater on floats only: t + int(float(t) > 0) * (div - t)
            tf, posi, diff, step = var("shape_f", np.float32), var("shape_posi"), var("shape_diff"), var("shape_step")
            steps = (("Mul", [t, self.constant(num, "num")], mul, {}),
                     ("Div", [mul, self.constant(den, "den")], div, {}),
                     ("Cast", [t], tf, {"to": onnx.TensorProto.FLOAT}),
                     ("Greater", [tf, self.constant(np.zeros(rank, np.float32), "zero")], pos, {}),
                     ("Cast", [pos], posi, {"to": onnx.TensorProto.INT64}),
                     ("Sub", [div, t], diff, {}),
                     ("Mul", [posi, diff], step, {}),
                     ("Add", [t, step], out, {}))
        for op, inputs, output, attrs in steps:
            self.graph.nodes.append(gs.Node(op, name=self._namer(f"{base}_{op.lower()}"), attrs=attrs,
                                            inputs=inputs, outputs=[output]))
        self.node.inputs[index] = out

    def constant(self, values: np.ndarray, hint: str = "c") -> gs.Constant:
        return gs.Constant(self._namer(f"{self.node.name or self.node.op}_{hint}"), np.asarray(values))

    def set_shape_entries(self, index: int, updates: dict[int, int]) -> None:
        """Set entries of the 1-D shape/sizes input `index` to new constants.

        A constant input is replaced by a fresh constant (it may be shared); a tensor
        computed at run time is kept for its other entries through Where(mask, new, old),
        so dynamic axes stay dynamic.
        """
        if not updates:
            return
        t = self.node.inputs[index]
        vals = const_values(t)
        if vals is not None:
            new = np.array(vals, copy=True)
            for k, v in updates.items():
                new[k] = v
            self.node.inputs[index] = self.constant(new.astype(vals.dtype), "shape")
            return
        rank = (tensor_shape(t) or [None])[0]
        if not isinstance(rank, int):
            raise ValueError(f"cannot rewrite the run-time shape of {self.node.name}: unknown length")
        mask = np.zeros(rank, dtype=bool)
        new = np.zeros(rank, dtype=np.int64)
        for k, v in updates.items():
            mask[k], new[k] = True, v
        base = self.node.name or self.node.op
        out = gs.Variable(self._namer(f"{base}_shape"), dtype=np.int64, shape=[rank])
        if self.graph_opset >= 9:
            where = gs.Node("Where", name=self._namer(f"{base}_shape_where"),
                            inputs=[self.constant(mask, "mask"), self.constant(new, "new"), t], outputs=[out])
            self.graph.nodes.append(where)
        else:  # Where is opset 9: t * (1 - mask) + new, in int64
            kept = gs.Variable(self._namer(f"{base}_shape_kept"), dtype=np.int64, shape=[rank])
            self.graph.nodes.append(gs.Node("Mul", name=self._namer(f"{base}_shape_mul"), outputs=[kept],
                                            inputs=[t, self.constant((~mask).astype(np.int64), "keep")]))
            self.graph.nodes.append(gs.Node("Add", name=self._namer(f"{base}_shape_add"), outputs=[out],
                                            inputs=[kept, self.constant(new, "new")]))
        self.node.inputs[index] = out
