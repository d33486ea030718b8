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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph import const_values, tensor_shape

if TYPE_CHECKING:  # pragma: no cover
    from ..dependency import DependencyGraph

__all__ = ["OpRule", "RuleContext", "RewriteContext", "OpRuleRegistry", "FactorBlock", "register_op_rule",
           "CostTerm", "WeightLayout", "rule_for", "ROLE_OUT", "ROLE_REDUCE", "ROLE_PARAM", "static_size", "volume", "with_scales"]


# roles of a weight axis (GroupMember.role): produces channels, reduces them, or scales/shifts them
ROLE_OUT, ROLE_REDUCE, ROLE_PARAM = "out", "reduce", "param"


@dataclass
class CostTerm:
    """coef * prod(sizes of `axes`), axes being (tensor, axis) pairs."""

    node: str
    coef: float
    axes: list = field(default_factory=list)


def static_size(d) -> int:
    """A static axis size, or 1 for a dynamic / unknown one."""
    return d if isinstance(d, int) and d > 0 else 1


def volume(shape) -> float:
    """Product of the static sizes of `shape` (dynamic axes count as 1)."""
    return float(np.prod([static_size(d) for d in shape])) if shape else 1.0


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


class RuleContext:
    """What an op rule sees of one node during analysis."""

    def __init__(self, dg: "DependencyGraph", node: gs.Node):
        self.dg = dg
        self.node = node
        self.touched: set[tuple[str, int]] = set()
        self.exempt: set[str] = set()

    # -- reading --------------------------------------------------------------
    @property
    def op(self) -> str:
        return self.node.op

    @property
    def attrs(self) -> dict:
        return self.node.attrs

    @property
    def opset(self) -> int:
        return self.dg.model.opset

    def input(self, i: int) -> gs.Tensor | None:
        if i < len(self.node.inputs) and self.node.inputs[i].name:
            return self.node.inputs[i]
        return None

    def output(self, i: int) -> gs.Tensor | None:
        if i < len(self.node.outputs) and self.node.outputs[i].name:
            return self.node.outputs[i]
        return None

    @staticmethod
    def shape(t: gs.Tensor | None):
        return None if t is None else tensor_shape(t)

    @staticmethod
    def is_const(t: gs.Tensor | None) -> bool:
        """A constant, or a quantized constant read through DequantizeLinear (a weight either way)."""
        if isinstance(t, gs.Constant):
            return True
        if t is None:
            return False
        from .quant import dequant_source

        return dequant_source(t) is not None

    def value(self, t: gs.Tensor | None) -> np.ndarray | None:
        """A constant's values, or a run-time shape expression's value when it is static."""
        return None if t is None else self.dg.model.value(t)

    def policy(self, key: str, default=None):
        return self.dg.policy.get(key, default)

    # -- relating -------------------------------------------------------------
    def _dim(self, t: gs.Tensor, axis: int) -> int | None:
        shape = tensor_shape(t)
        if shape is None:
            return None
        axis = axis + len(shape) if axis < 0 else axis
        self.touched.add((t.name, axis))
        return self.dg.dim(t.name, axis)

    def tie(self, a: gs.Tensor, ax_a: int, b: gs.Tensor, ax_b: int,
            idx_a: np.ndarray | None = None, idx_b: np.ndarray | None = None) -> None:
        """Element idx_a[i] of a's axis is the same channel as element idx_b[i] of b's axis.

        Without indices: identity when sizes match; a size-1 side broadcasts and is left
        alone; any other mismatch pins both.
        """
        da, db = self._dim(a, ax_a), self._dim(b, ax_b)
        if da is None or db is None:
            return
        dg = self.dg
        if da in dg.dim_fold or db in dg.dim_fold:
            self._tie_folded(da, db, idx_a is None and idx_b is None)
            return
        if idx_a is None and idx_b is None:
            sa, sb = dg.dim_size[da], dg.dim_size[db]
            oa, ob = dg.dim_opaque[da], dg.dim_opaque[db]
            if oa or ob:
                if oa and ob:
                    dg.ties.append((da, np.zeros(1, np.int64), db, np.zeros(1, np.int64)))
                else:
                    for d in (da, db):
                        if dg.dim_size[d] != 1 or dg.dim_opaque[d]:
                            dg.pin(d, f"{self.op} {self.node.name}: dynamic axis meets static axis")
                return
            if sa == sb:
                idx_a = idx_b = np.arange(sa, dtype=np.int64)
            elif sa == 1 or sb == 1:
                return  # broadcast
            else:
                dg.pin(da, f"{self.op} {self.node.name}: axis sizes {sa} and {sb} do not match")
                dg.pin(db, f"{self.op} {self.node.name}: axis sizes {sa} and {sb} do not match")
                return
        dg.ties.append((da, np.asarray(idx_a, np.int64), db, np.asarray(idx_b, np.int64)))

    def _tie_folded(self, da: int, db: int, identity: bool) -> None:
        """A tie where one side is a folded axis (dynamic factor x static units): identity only,
        with another folded axis of the same units or a dynamic axis that becomes folded."""
        dg = self.dg
        fa, fb = dg.dim_fold.get(da), dg.dim_fold.get(db)
        f = fa or fb
        other = db if fa is not None else da
        if identity and fb is None and dg.dim_opaque[db]:
            ok = dg.fold(db, *f)
        elif identity and fa is None and dg.dim_opaque[da]:
            ok = dg.fold(da, *f)
        elif identity and fa is not None and fb is not None:
            ok = fa == fb
        elif identity and dg.dim_size[other] == 1 and not dg.dim_opaque[other]:
            return  # broadcast
        else:
            ok = False
        if ok:
            n = f[1]
            dg.ties.append((da, np.arange(n, dtype=np.int64), db, np.arange(n, dtype=np.int64)))
            return
        for d in (da, db):
            dg.pin(d, f"{self.op} {self.node.name}: folded axis (dynamic x {f[1]} units) meets an axis "
                      f"it cannot map to")

    def units(self, t: gs.Tensor, axis: int) -> None:
        """Mark an axis whose channels come in multi-element units (attention heads)."""
        d = self._dim(t, axis)
        if d is not None:
            self.dg.carriers.add(d)

    def statistics(self, t: gs.Tensor, axis: int) -> None:
        """Mark an input axis the op takes statistics over (a mean, variance, max): it may lose
        elements (the op then runs over the kept ones), and the oracle computes it that way."""
        d = self._dim(t, axis)
        if d is not None and d in self.dg.dim_fold:
            self.dg.pin(d, f"{self.op} {self.node.name}: statistics over a folded axis")
            return
        if d is not None and self.node.outputs:
            self.dg.stat_axes.setdefault(self.node.outputs[0].name, set()).add(d)

    def role(self, t: gs.Tensor, axis: int, role: str) -> None:
        if not isinstance(t, gs.Constant):
            from .quant import dequant_source

            src = dequant_source(t)  # a quantized weight: the integer constant behind the DQ takes the role
            if src is None:
                self._dim(t, axis)
                return
            t = src[0]
        d = self._dim(t, axis)
        if d is not None and isinstance(t, gs.Constant):
            self.dg.dim_role.setdefault(d, role)

    def pin(self, t: gs.Tensor | None, axis: int | None, reason: str) -> None:
        if t is None:
            return
        shape = tensor_shape(t)
        axes = range(len(shape or ())) if axis is None else [axis]
        for ax in axes:
            d = self._dim(t, ax)
            if d is not None:
                self.dg.pin(d, f"{self.op} {self.node.name}: {reason}")

    def skip(self, t: gs.Tensor | None, axis: int | None = None) -> None:
        """Declare an axis handled without a tie (e.g. a shape input); not auto-pinned."""
        if t is None:
            return
        if axis is None:
            self.exempt.add(t.name)
        else:
            shape = tensor_shape(t) or ()
            self.touched.add((t.name, axis + len(shape) if axis < 0 else axis))

    def factor(self, a: gs.Tensor, axes_a: list[int], b: gs.Tensor, axes_b: list[int]) -> None:
        """a's axes (row-major block) hold the same elements as b's axes (a Reshape block)."""
        dims_a = [self._dim(a, x) for x in axes_a]
        dims_b = [self._dim(b, x) for x in axes_b]
        if any(d is None for d in dims_a + dims_b):
            return
        self.dg.factors.append(FactorBlock(self.node.name, self.op, dims_a, dims_b))

    def pin_all(self, reason: str) -> None:
        for t in list(self.node.inputs) + list(self.node.outputs):
            if t.name:
                shape = tensor_shape(t)
                for ax in range(len(shape or ())):
                    d = self.dg.dim(t.name, ax)
                    if d is not None:
                        self.dg.pin(d, reason)

    def finish(self) -> None:
        """Pin every axis of size > 1 that the rule did not account for."""
        for t in list(self.node.inputs) + list(self.node.outputs):
            if not t.name or t.name in self.exempt:
                continue
            shape = tensor_shape(t)
            for ax, size in enumerate(shape or ()):
                if (t.name, ax) in self.touched or size == 1:
                    continue
                d = self.dg.dim(t.name, ax)
                if d is not None:
                    self.dg.pin(d, f"{self.op} {self.node.name}: axis {ax} of {t.name} is not a channel axis for {self.op}")

    # helpers shared by many rules -------------------------------------------------
    def broadcast(self, inputs: list, outputs: list, *, param_role: str = "param") -> None:
        """Numpy broadcasting: each output axis ties with the input axes aligned to it."""
        for out in outputs:
            if out is None:
                continue
            rank = len(self.shape(out))
            for inp in inputs:
                if inp is None:
                    continue
                r = len(self.shape(inp))
                for k in range(r):
                    self.tie(inp, k, out, rank - r + k)
                    if self.is_const(inp):
                        self.role(inp, k, param_role)


class FactorBlock:
    """A Reshape/Flatten block: axes_a (row-major) hold the same elements as axes_b.

    One *carrier* axis per side is tied elementwise; the other axes keep their size.
    The carrier is the axis known to carry channels; if none is known, the default
    is the innermost axis when one axis splits into several and the outermost otherwise.
    """

    def __init__(self, node: str, op: str, dims_a: list[int], dims_b: list[int]):
        self.node, self.op, self.dims_a, self.dims_b = node, op, dims_a, dims_b

    def _choose(self, dg, dims, classes, channel_like, pinned, fallback, split):
        """The carrier axis of one side, or None to wait for more information."""
        cands = [d for d in dims if dg.dim_size[d] > 1 and not dg.dim_opaque[d]]
        free = [d for d in cands if classes[d] not in pinned]
        if len(cands) <= 1:
            return cands[0] if cands else None
        prefer_outer = bool(dg.policy.get("factor_outer", False))
        known = [d for d in free if classes[d] in channel_like]
        if len(known) == 1:
            return known[0]
        if len(known) > 1:
            return known[-1] if dg.policy.get("head_dim", False) else known[0]
        if len(free) == 1 and not known:
            return free[0]  # forced: every other axis is pinned (e.g. head_dim by Q.K^T), decide now
        if not fallback:
            return None
        pool = free or cands
        if len(pool) == 1:
            return pool[0]
        return pool[-1] if split and not prefer_outer else pool[0]

    def resolve(self, dg, classes, channel_like, pinned, *, fallback: bool) -> bool:
        split = len(self.dims_a) == 1 and len(self.dims_b) > 1
        merge = len(self.dims_b) == 1 and len(self.dims_a) > 1
        ca = self._choose(dg, self.dims_a, classes, channel_like, pinned, fallback, merge)
        cb = self._choose(dg, self.dims_b, classes, channel_like, pinned, fallback, split)
        if ca is None or cb is None:
            if not fallback:
                return False
            for d in self.dims_a + self.dims_b:
                dg.pin(d, f"{self.op} {self.node}: no channel axis in reshape block")
            return True
        sa = [dg.dim_size[d] for d in self.dims_a]
        sb = [dg.dim_size[d] for d in self.dims_b]
        flat = np.arange(int(np.prod(sa)), dtype=np.int64)
        ia = np.unravel_index(flat, sa)[self.dims_a.index(ca)]
        ib = np.unravel_index(flat, sb)[self.dims_b.index(cb)]
        pairs = np.unique(np.stack([ia, ib], 1), axis=0)
        dg.ties.append((ca, pairs[:, 0], cb, pairs[:, 1]))
        dg.carriers.update((ca, cb))
        for d in self.dims_a + self.dims_b:
            if d not in (ca, cb) and dg.dim_size[d] > 1:
                dg.pin(d, f"{self.op} {self.node}: reshape factor kept at its size")
        return True


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
