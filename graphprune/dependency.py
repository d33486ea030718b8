"""SPA-style channel dependency analysis: channels as elements.

Every tensor axis an op rule talks about becomes a *dimension* whose channels are
*elements*. Op rules relate elements (ties), fix whole dimensions (pins) and tag
weight dimensions with a role. The union of tied elements gives connected sets; each
unpinned set that reaches a producing weight is one prunable channel, and channels
touching the same dimensions form one :class:`ChannelGroup`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx_graphsurgeon as gs

from .graph import Model, const_values, tensor_shape
from .kv_cache import cache_io
from .kv_cache import pin_reason as kv_pin_reason
from .roles import ROLE_OUT, ROLE_PARAM, ROLE_REDUCE, WEIGHT_ROLES
from .rule_context import RuleContext

__all__ = ["Dim", "GroupMember", "ChannelGroup", "PinnedSet", "DependencyGraph", "analyze_dependencies",
           "set_default_registry", "installed_registry", "ROLE_OUT", "ROLE_REDUCE", "ROLE_PARAM"]

# The op rules live one layer up (graphprune.oprules imports this module), so the registry an
# analysis uses is handed in by the caller; without one, the factory installed by the package
# (graphprune/__init__.py: oprules.default_registry) gives the built-in rules plus user-registered.
_default_registry: "Callable[[], object] | None" = None


def set_default_registry(factory: "Callable[[], object]") -> None:
    """Install the factory :class:`DependencyGraph` calls when no registry is handed in."""
    global _default_registry
    _default_registry = factory


def installed_registry():
    """A registry from the installed factory (the analysis layer's way to reach the op rules)."""
    if _default_registry is None:
        raise RuntimeError("no op-rule registry: pass one (graphprune.default_registry())")
    return _default_registry()


@dataclass(frozen=True)
class Dim:
    tensor: str
    axis: int


@dataclass
class GroupMember:
    """One dimension a group touches, with each channel's element indices in it."""

    tensor: str
    axis: int
    role: str | None          # ROLE_* for weights, None for activations
    is_weight: bool
    indices: list             # per channel: np.ndarray of element indices along `axis`

    @property
    def size_per_channel(self) -> int:
        return int(len(self.indices[0])) if self.indices else 0


@dataclass
class ChannelGroup:
    """Channels that must be removed together; channel i is one connected element set."""

    id: int
    members: list            # [GroupMember]
    channel_labels: np.ndarray
    size: int
    round_base: int = 0      # original size of the root dimension (for --round-to)
    name: str = ""
    nodes: list = field(default_factory=list)  # node names whose weights are members
    width: int = 1           # elements per channel in the root weight (head_dim for attention heads)
    factored: bool = False   # the channels pass a reshape that splits an axis into (units, elements)

    @property
    def kind(self) -> str:
        """'heads' when each unit spans several rows and is carried by a reshape (attention
        heads), else 'channels'."""
        return "heads" if self.width > 1 and self.factored else "channels"

    def weight_members(self, roles: Iterable[str] = WEIGHT_ROLES) -> list:
        roles = set(roles)
        return [m for m in self.members if m.is_weight and m.role in roles]

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "channels": self.size,
            "kind": self.kind,
            "width": self.width,
            "members": [
                {"tensor": m.tensor, "axis": m.axis, "role": m.role, "weight": m.is_weight,
                 "elements_per_channel": m.size_per_channel}
                for m in self.members
            ],
        }


@dataclass
class PinnedSet:
    """Channels that are never removed, with why."""

    tensor: str
    axis: int
    count: int
    reason: str


class _UnionFind:
    """Vectorised union-find over element ids (hook and pointer-jump, numpy only)."""

    def __init__(self, n: int):
        self.labels = np.arange(n, dtype=np.int64)

    def union_pairs(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.size == 0:
            return
        labels = self.labels
        while True:
            la, lb = labels[a], labels[b]
            if np.array_equal(la, lb):
                break
            m = np.minimum(la, lb)
            np.minimum.at(labels, la, m)
            np.minimum.at(labels, lb, m)
            while True:
                nxt = labels[labels]
                if np.array_equal(nxt, labels):
                    break
                labels = nxt
        self.labels = labels


class DependencyGraph:
    """Dimensions, element ties and pins of one model; :meth:`groups` gives the prunable units."""

    def __init__(self, model: Model, registry: "OpRuleRegistry | None" = None, *, policy: dict | None = None):
        self.model = model
        if registry is None:
            if _default_registry is None:
                raise RuntimeError("no op-rule registry: pass one (graphprune.default_registry())")
            registry = _default_registry()
        self.registry = registry
        self.policy = dict(policy or {})
        self.dims: list[Dim] = []
        self.dim_index: dict[Dim, int] = {}
        self.dim_size: list[int] = []
        self.dim_opaque: list[bool] = []
        self.dim_role: dict[int, str] = {}
        self.dim_is_weight: list[bool] = []
        self.dim_pin: dict[int, str] = {}
        self.ties: list[tuple] = []  # (dim a, indices or None = identity, dim b, indices or None)
        self.factors: list = []
        self.carriers: set[int] = set()  # dims a reshape block ties elementwise (e.g. a head axis)
        self.stat_axes: dict[str, set[int]] = {}  # node (first output) -> dims it takes statistics over
        # folded axes: a dynamic factor (symbols, major) merged with k static units (minor), e.g. the
        # [batch*heads] axis of torch.nn.MultiheadAttention; the dim's elements are the k units
        self.dim_fold: dict[int, tuple[tuple[str, ...], int]] = {}
        self.node_dims: dict[int, list[int]] = {}   # dim id -> nodes (names) using it
        self.cost_terms: list = []  # filled by cost model
        self._tensors = model.graph.tensors()
        self._offsets: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.group_list: list[ChannelGroup] = []
        self.pinned: list[PinnedSet] = []
        self._build()

    # -- dimensions ---------------------------------------------------------
    def tensor(self, name: str):
        return self._tensors.get(name)

    def dim(self, tensor: str, axis: int) -> int | None:
        """Id of (tensor, axis), created on first use; None if the rank is unknown."""
        t = self._tensors.get(tensor)
        shape = tensor_shape(t) if t is not None else None
        if shape is None:
            return None
        if axis < 0:
            axis += len(shape)
        if not 0 <= axis < len(shape):
            return None
        key = Dim(tensor, axis)
        idx = self.dim_index.get(key)
        if idx is None:
            size = shape[axis]
            opaque = not isinstance(size, int) or size < 0
            idx = len(self.dims)
            self.dims.append(key)
            self.dim_index[key] = idx
            self.dim_size.append(1 if opaque else int(size))
            self.dim_opaque.append(opaque)
            self.dim_is_weight.append(isinstance(t, gs.Constant))
            if opaque:
                self.dim_pin[idx] = f"dynamic axis {axis} of {tensor}"
        return idx

    def pin(self, dim: int, reason: str) -> None:
        self.dim_pin.setdefault(dim, reason)

    def fold(self, dim: int, syms: tuple, units: int, *, dry: bool = False) -> bool:
        """Make a dynamic axis a folded one: `units` static channel units (minor) repeated over the
        dynamic factor `syms` (major). Only an axis no rule has related yet can change; returns
        whether the axis is (now, or with `dry` would be) folded that way."""
        if dim in self.dim_fold:
            return self.dim_fold[dim] == (tuple(syms), units)
        if not self.dim_opaque[dim] or units <= 1:
            return False
        reason = self.dim_pin.get(dim)
        if reason is not None and not reason.startswith("dynamic axis "):
            return False
        if dim in self._related_dims():
            return False
        if dry:
            return True
        self.dim_pin.pop(dim, None)
        self.dim_opaque[dim] = False
        self.dim_size[dim] = int(units)
        self.dim_fold[dim] = (tuple(syms), int(units))
        return True

    def _related_dims(self) -> set:
        """Dims some tie or reshape block already relates (kept up to date incrementally)."""
        seen = self.__dict__.setdefault("_related", [0, 0, set()])
        for t in self.ties[seen[0]:]:
            seen[2].update((t[0], t[2]))
        for fb in self.factors[seen[1]:]:
            seen[2].update(fb.dims_a + fb.dims_b)
        seen[0], seen[1] = len(self.ties), len(self.factors)
        return seen[2]

    # -- building -----------------------------------------------------------
    def _build(self) -> None:
        graph = self.model.graph
        kv = cache_io(graph)
        # KV-cache inputs/outputs may change their static axes only when asked (prune_kv_cache)
        self.resizable_io = kv if self.policy.get("prune_kv_cache") else set()
        for io, kind in ((graph.inputs, "graph input"), (graph.outputs, "graph output")):
            for t in io:
                shape = tensor_shape(t)
                reason = kv_pin_reason(kind, t.name) if t.name in kv else f"reaches {kind} {t.name}"
                for ax in range(len(shape or ())):
                    d = self.dim(t.name, ax)
                    if d is not None and t.name not in self.resizable_io:
                        self.pin(d, reason)
        for node in graph.nodes:
            ctx = RuleContext(self, node)
            rule = self.registry.lookup(node.domain or "", node.op, self.model.opset)
            outer = _outer_scope_inputs(node)
            for name in outer:
                self._pin_tensor(name, f"used inside a subgraph of {node.op} {node.name}")
            unknown = [t.name for t in list(node.inputs) + list(node.outputs)
                       if t.name and tensor_shape(t) is None and not (rule and rule.is_shape_input(node, t))]
            if rule is None:
                ctx.pin_all(f"no op rule for {node.domain + '::' if node.domain else ''}{node.op}")
                continue
            if unknown:
                ctx.pin_all(f"{node.op} {node.name}: shape of {unknown[0]} unknown")
                continue
            try:
                rule.analyze(ctx)
            except Exception as exc:  # a rule that cannot decide fails closed
                ctx.pin_all(f"{node.op} {node.name}: rule failed ({exc})")
                continue
            ctx.finish()
        self._resolve()

    def _pin_tensor(self, name: str, reason: str) -> None:
        t = self._tensors.get(name)
        shape = tensor_shape(t) if t is not None else None
        for ax in range(len(shape or ())):
            d = self.dim(name, ax)
            if d is not None:
                self.pin(d, reason)

    # -- resolution ---------------------------------------------------------
    def _dim_classes(self) -> np.ndarray:
        uf = _UnionFind(len(self.dims))
        a = np.array([t[0] for t in self.ties], dtype=np.int64)
        b = np.array([t[2] for t in self.ties], dtype=np.int64)
        uf.union_pairs(a, b)
        return uf.labels

    def _resolve(self) -> None:
        # factor blocks (Reshape/Flatten) choose their carrier axes once the dims they
        # touch are known to be channel-like; unresolved ones fall back to a default
        pending = list(self.factors)
        while pending:
            classes = self._dim_classes()
            channel_like = {classes[d] for d in self.dim_role}
            pinned = {classes[d] for d in self.dim_pin}
            progressed = [fb for fb in pending if fb.resolve(self, classes, channel_like, pinned, fallback=False)]
            if not progressed:  # decide one block by default, then look again
                pending[0].resolve(self, classes, channel_like, pinned, fallback=True)
                progressed = [pending[0]]
            pending = [fb for fb in pending if fb not in progressed]
        # only axes whose class (axes tied together) holds a weight axis can carry channels: every other
        # axis (spatial, sequence, ...) is one element, so analysis never allocates per element of an
        # axis it does not prune, whatever size it declares
        classes = self._dim_classes()
        carrying = {classes[d] for d, w in enumerate(self.dim_is_weight) if w}
        sizes = np.array([s if classes[d] in carrying else 1 for d, s in enumerate(self.dim_size)], dtype=np.int64)
        self._elem_size = sizes
        offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        self._offsets = offsets
        uf = _UnionFind(int(offsets[-1]))
        if self.ties:
            a_parts, b_parts = [], []
            for d1, i1, d2, i2 in self.ties:
                if classes[d1] not in carrying:  # one element each side
                    i1 = i2 = np.zeros(1, np.int64)
                elif i1 is None:  # identity
                    i1 = i2 = np.arange(sizes[d1], dtype=np.int64)
                a_parts.append(offsets[d1] + i1)
                b_parts.append(offsets[d2] + i2)
            uf.union_pairs(np.concatenate(a_parts), np.concatenate(b_parts))
        self.labels = uf.labels
        self._make_groups()

    def elements(self, dim: int) -> np.ndarray:
        return self.labels[self._offsets[dim]:self._offsets[dim + 1]]

    def _make_groups(self) -> None:
        n_dims = len(self.dims)
        pin_reason: dict[int, str] = {}
        for d, reason in self.dim_pin.items():
            for lab in np.unique(self.elements(d)):
                pin_reason.setdefault(int(lab), reason)
        producers = set()
        for d, role in self.dim_role.items():
            if role == ROLE_OUT and self.dim_is_weight[d]:
                producers.update(int(x) for x in np.unique(self.elements(d)))
        # label -> dims it touches
        lab_all = self.labels
        dim_of_elem = np.repeat(np.arange(n_dims), self._elem_size)
        pairs = np.unique(np.stack([lab_all, dim_of_elem], axis=1), axis=0) if lab_all.size else np.zeros((0, 2), np.int64)
        touched: dict[int, list[int]] = {}
        for lab, d in pairs:
            touched.setdefault(int(lab), []).append(int(d))
        by_key: dict[tuple, list[int]] = {}
        for lab in sorted(producers):
            if lab in pin_reason:
                continue
            by_key.setdefault(tuple(touched[lab]), []).append(lab)
        groups = []
        for key, labs in by_key.items():
            labs_arr = np.array(labs, dtype=np.int64)
            members = []
            root = None
            for d in key:
                el = self.elements(d)
                order = np.argsort(el, kind="stable")  # equal labels keep increasing indices
                sorted_el = el[order]
                lo = np.searchsorted(sorted_el, labs_arr, "left")
                hi = np.searchsorted(sorted_el, labs_arr, "right")
                idx_lists = [order[a:b] for a, b in zip(lo, hi)]
                dim = self.dims[d]
                role = self.dim_role.get(d)
                m = GroupMember(dim.tensor, dim.axis, role, self.dim_is_weight[d], idx_lists)
                members.append(m)
                if root is None and role == ROLE_OUT and m.is_weight:
                    root = (m, d)
            order = np.argsort([int(root[0].indices[i].min()) for i in range(len(labs_arr))], kind="stable")
            labs_arr = labs_arr[order]
            for m in members:
                m.indices = [m.indices[i] for i in order]
            groups.append(ChannelGroup(
                id=0, members=members, channel_labels=labs_arr, size=len(labs_arr),
                round_base=self.dim_size[root[1]], name=f"{root[0].tensor}[{root[0].axis}]",
                width=int(len(root[0].indices[0])), factored=any(d in self.carriers for d in key),
            ))
        groups.sort(key=lambda g: (self._first_node_index(g), g.name))
        for i, g in enumerate(groups):
            g.id = i
        self.group_list = groups
        # pinned summary, per dimension of a weight that would otherwise be prunable
        pinned = []
        for d in range(n_dims):
            if not self.dim_is_weight[d] or self.dim_size[d] <= 1:
                continue
            direct = self.dim_pin.get(d, "")
            # producer rows, or weight axes an op rule kept whole on purpose (not kernel axes)
            if self.dim_role.get(d) != ROLE_OUT and (not direct or "is not a channel axis" in direct):
                continue
            el = self.elements(d)
            labs = [int(x) for x in el if int(x) in pin_reason]
            if labs:
                reasons = sorted({pin_reason[l] for l in labs})
                dim = self.dims[d]
                pinned.append(PinnedSet(dim.tensor, dim.axis, len(labs), "; ".join(reasons[:3])))
        self.pinned = pinned

    def _first_node_index(self, g: ChannelGroup) -> int:
        if not hasattr(self, "_tensor_order"):
            order = {}
            for i, node in enumerate(self.model.graph.nodes):
                for t in node.inputs:
                    order.setdefault(t.name, i)
            self._tensor_order = order
        return min((self._tensor_order.get(m.tensor, 1 << 30) for m in g.members), default=0)

    # -- queries ------------------------------------------------------------
    def groups(self) -> list[ChannelGroup]:
        return self.group_list

    def removed_elements(self, removed_labels: np.ndarray) -> dict[Dim, np.ndarray]:
        """Element indices removed in every dimension when the given channels go."""
        out = {}
        if removed_labels.size == 0:
            return out
        mask = np.zeros(self.labels.size, dtype=bool)
        # labels are roots (minimal element ids), so index by label value
        lab_set = np.zeros(self.labels.size, dtype=bool)
        lab_set[removed_labels] = True
        mask = lab_set[self.labels]
        for d, dim in enumerate(self.dims):
            sl = mask[self._offsets[d]:self._offsets[d + 1]]
            if sl.any():
                out[dim] = np.nonzero(sl)[0]
        return out


def _outer_scope_inputs(node: gs.Node) -> set[str]:
    names: set[str] = set()
    for value in node.attrs.values():
        subgraphs = value if isinstance(value, list) else [value]
        for sg in subgraphs:
            if isinstance(sg, gs.Graph):
                local = {t.name for t in sg.inputs}
                for n in sg.nodes:
                    local.update(t.name for t in n.outputs)
                for n in sg.nodes:
                    for t in n.inputs:
                        if t.name and t.name not in local and not isinstance(t, gs.Constant):
                            names.add(t.name)
                    names |= _outer_scope_inputs(n) - local
                for t in sg.outputs:
                    if t.name not in local:
                        names.add(t.name)
    return names


def analyze_dependencies(model: Model, registry: "OpRuleRegistry | None" = None, **policy) -> DependencyGraph:
    return DependencyGraph(model, registry, policy=policy)
