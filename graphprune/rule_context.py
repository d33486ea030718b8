"""What an op rule sees of one node during analysis (analysis layer).

:class:`RuleContext` is the interface between the op rules (graphprune/oprules, one layer up)
and the dependency graph (graphprune/dependency.py): a rule reads the node's tensors and
relates their axes (tie, factor, pin, role, statistics). :class:`FactorBlock` is one
Reshape/Flatten block the dependency graph resolves once every rule has run. This module
imports nothing from graphprune.oprules, so the op rules can import it.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .graph import tensor_shape
from .roles import ROLE_PARAM

__all__ = ["RuleContext", "FactorBlock"]

# a Reshape/Flatten block over more elements than this is pinned instead of enumerated (hostile declared sizes)
MAX_BLOCK_ELEMENTS = 1 << 24


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
        from .quantized import dequant_source

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
                dg.ties.append((da, None, db, None))  # identity: elements made only if the axis can carry channels
                return
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
            from .quantized import dequant_source

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
    def broadcast(self, inputs: list, outputs: list, *, param_role: str = ROLE_PARAM) -> None:
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
        total = int(np.prod(sa))
        if total > MAX_BLOCK_ELEMENTS:  # a declared size no real model has: analysing it would take its memory
            for d in self.dims_a + self.dims_b:
                dg.pin(d, f"{self.op} {self.node}: reshape block of {total} elements is too large to analyse")
            return True
        flat = np.arange(total, dtype=np.int64)
        ia = np.unravel_index(flat, sa)[self.dims_a.index(ca)]
        ib = np.unravel_index(flat, sb)[self.dims_b.index(cb)]
        pairs = np.unique(np.stack([ia, ib], 1), axis=0)
        dg.ties.append((ca, pairs[:, 0], cb, pairs[:, 1]))
        dg.carriers.update((ca, cb))
        for d in self.dims_a + self.dims_b:
            if d not in (ca, cb) and dg.dim_size[d] > 1:
                dg.pin(d, f"{self.op} {self.node}: reshape factor kept at its size")
        return True
