"""Op-rule infrastructure: the rule interface, the context rules talk to, the registry.

An :class:`OpRule` is the one home of what graphprune knows about an op. Only ``analyze`` is
required; everything else has a default that means "nothing to say", so most rules stay small.

- ``analyze(ctx)``: how the channels of the inputs map onto the outputs (ties, pins, roles,
  factor blocks) through a :class:`RuleContext`. An axis it leaves alone is pinned (fail closed).
- ``rewrite(rctx)``: fix attributes and shape constants after channels were removed.
- ``shape_inputs``: input positions that carry shapes or indices, not data.
- ``cost_terms(node, spatial)``: the node's multiply-accumulates as :class:`CostTerm` products
  of axis sizes (default: none). ``spatial`` maps a tensor name to static spatial sizes to use
  for axes that are dynamic (see ``cost.spatial_hints``); ``spatial_tensor(node)`` names the
  tensor whose spatial axes the cost counts (default: none).
- ``weight_layout(node)``: the contraction view of a weighted op as a :class:`WeightLayout`
  (which input is the weight, which of its axes hold output and input channels, groups,
  transposes, the bias input). Cost, activation statistics, compensation and latency tables read
  it; ``None`` (the default) means the op has no weight it contracts with an activation.
- ``scale_inputs``: input positions whose per-channel constants multiply the channel (a BN / norm
  scale, a Mul constant); the bn-scale criterion scores those.

Rules are looked up per node with :func:`rule_for`; a rule registered as a plain function
(:func:`register_op_rule`) keeps the cost, layout and roles of the rule it replaces.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..cost import CostTerm
from ..graph import const_values, tensor_shape
from ..rule_context import FactorBlock, RuleContext

__all__ = ["OpRule", "RuleContext", "RewriteContext", "OpRuleRegistry", "FactorBlock", "register_op_rule",
           "WeightLayout", "rule_for", "with_scales"]


@dataclass(frozen=True)
class WeightLayout:
    """How a weighted op contracts its weight with an activation (its contraction view).

    ``kind`` names the contraction ("conv": im2col columns in the weight's ``W.reshape(O, -1)``
    order; "conv_transpose"; "gemm"; "matmul": ``x[..., K] @ W[..., K, N]``). Axes may be negative
    (from the end). With ``groups > 1`` one of the channel axes counts channels per group: the
    input axis when ``in_per_group`` (Conv), else the output axis (ConvTranspose).
    """

    kind: str
    weight: int               # input index of the weight
    out_axis: int             # weight axis of the output channels
    in_axis: int              # weight axis contracted with the activation's channels
    x: int = 0                # input index of the activation
    x_axis: int = 1           # the activation's channel axis
    y_axis: int = -1          # the output's channel axis
    groups: int = 1
    in_per_group: bool = True
    kernel_axes: tuple = ()   # weight axes of the kernel window
    trans_b: int = 0          # gemm: the weight is stored [N, K]
    alpha: float = 1.0        # gemm: scale of the product
    bias: int | None = None   # input index of an additive per-output bias (None: no bias input)
    bias_scale_attr: str | None = None  # attribute that scales the bias (Gemm's beta)

    def input_channels(self, w_shape) -> int:
        """Channels of the activation that a weight of this shape contracts."""
        n = int(w_shape[self.in_axis])
        return n * self.groups if self.in_per_group else n

    def inputs_per_group(self, w_shape) -> int:
        n = int(w_shape[self.in_axis])
        return n if self.in_per_group else n // max(self.groups, 1)

    def is_depthwise(self, w_shape, x_channels) -> bool:
        """One input channel per group, as many groups as input channels."""
        return self.groups > 1 and self.groups == x_channels and self.inputs_per_group(w_shape) == 1


class OpRule:
    """How one op maps the channels of its inputs onto its outputs, and what else graphprune
    knows about it (cost, weight layout, roles; see the module docstring).

    `analyze` ties/pins/tags axes through the :class:`RuleContext`; any axis of size
    > 1 it leaves untouched is pinned (fail closed). `rewrite` fixes attributes and
    shape constants after channels were removed; sliced weights are handled for it.
    """

    shape_inputs: tuple = ()  # input positions that carry shapes/indices, not data
    scale_inputs: tuple = ()  # input positions whose per-channel constants scale the channel

    def analyze(self, ctx: "RuleContext") -> None:
        raise NotImplementedError

    def rewrite(self, rctx: "RewriteContext") -> None:
        return None

    def is_shape_input(self, node: gs.Node, tensor: gs.Tensor) -> bool:
        return any(i < len(node.inputs) and node.inputs[i] is tensor for i in self.shape_inputs)

    def cost_terms(self, node: gs.Node, spatial: dict | None = None) -> list[CostTerm]:
        """MACs of `node` (batch counted as 1; dynamic axes as 1 unless `spatial` gives sizes)."""
        return []

    def spatial_tensor(self, node: gs.Node) -> gs.Tensor | None:
        """The tensor whose spatial axes `cost_terms` counts (for spatial hints), if any."""
        return None

    def weight_layout(self, node: gs.Node) -> WeightLayout | None:
        """The contraction view of `node`'s weight, or None for an op without one."""
        return None


def with_scales(rule: OpRule, inputs: tuple) -> OpRule:
    """`rule` with `inputs` declared as per-channel scales (the bn-scale criterion's role)."""
    rule.scale_inputs = tuple(inputs)
    return rule


class FunctionRule(OpRule):
    """A rule given as functions; cost, layout and roles come from `inherit` (the rule it replaced)."""

    def __init__(self, analyze: Callable, rewrite: Callable | None = None, shape_inputs: tuple = (),
                 inherit: OpRule | None = None):
        self._analyze, self._rewrite, self.shape_inputs = analyze, rewrite, shape_inputs
        self._inherit = inherit
        if inherit is not None:
            self.scale_inputs = inherit.scale_inputs

    def analyze(self, ctx):
        self._analyze(ctx)

    def rewrite(self, rctx):
        if self._rewrite:
            self._rewrite(rctx)

    def cost_terms(self, node, spatial=None):
        return self._inherit.cost_terms(node, spatial) if self._inherit else []

    def spatial_tensor(self, node):
        return self._inherit.spatial_tensor(node) if self._inherit else None

    def weight_layout(self, node):
        return self._inherit.weight_layout(node) if self._inherit else None


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
    reg = registry or _GLOBAL
    if not isinstance(rule, OpRule):
        rule = FunctionRule(rule, rewrite, inherit=reg.lookup(domain, op_type, since))
    reg.register(op_type, rule, domain=domain, since=since, until=until)
    return rule


def rule_for(node: gs.Node, opset: int = 0, registry: OpRuleRegistry | None = None) -> OpRule | None:
    """The rule for `node` at `opset` (0: the newest registered) in `registry` (default: global)."""
    return (registry or _GLOBAL).lookup(node.domain or "", node.op, opset)


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
