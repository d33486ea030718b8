"""Streaming activation statistics, collected with onnxruntime batch by batch.

The tensors a statistic needs are exposed as extra graph outputs; each batch's values
are folded into running sums and dropped, so memory holds the statistics (per-channel
sums and second moments, one XᵀX per consumer), never the activations of the data set.

A *consumer* is a node that contracts a weight's "reduce" axis with an activation (Conv,
Gemm, MatMul). :class:`ContractionView` is built from the op rule's weight layout
(``OpRule.weight_layout``) and turns it into features: for a Conv the features are the im2col columns (input channel
x kernel position, in the weight's ``W.reshape(O, -1)`` order), so XᵀX is the exact
Hessian of the layer's least-squares output error; for Gemm/MatMul they are the
contracted axis. Criteria and compensation see only feature matrices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import Model, const_values, tensor_shape

__all__ = ["ContractionView", "ChannelStats", "find_views", "expose", "truncate", "collect_channel_stats",
           "collect_hessians", "HessianStats", "run_batches", "SegmentRunner"]

MAX_FEATURES = 8192   # a consumer with more features (C x kernel) keeps stats only, no Hessian


@dataclass
class ContractionView:
    """How one consumer node contracts its weight with its input activation."""

    node: str                 # node name
    op: str
    weight: str               # weight tensor name
    weight_axis: int          # the weight's reduce axis
    x: str                    # input activation tensor name
    x_axis: int               # channel axis of x that the weight reduces
    kind: str                 # "conv", "matmul" (x[..., K] @ W[K, N]), "gemm", or "channel" (stats only)
    kernel: tuple = ()        # conv kernel shape
    strides: tuple = ()
    dilations: tuple = ()
    pads: tuple = ()          # begin..., end...
    group: int = 1
    trans_b: int = 0
    alpha: float = 1.0
    channels: int = 0         # size of x's channel axis
    elements: int = 0         # size of the weight's reduce axis
    output: str = ""
    w_out_axis: int = 0       # the weight's output-channel axis (conv)
    y_axis: int = -1          # the output's channel axis

    @property
    def kernel_size(self) -> int:
        return int(np.prod(self.kernel)) if self.kernel else 1

    @property
    def has_hessian(self) -> bool:
        """Whether the consumer is a plain feature contraction that XᵀX describes exactly."""
        return self.kind in ("matmul", "gemm") or (self.kind == "conv" and self.group == 1)

    @property
    def features(self) -> int:
        return self.elements * self.kernel_size

    def element_features(self, elements: np.ndarray) -> np.ndarray:
        """Feature indices (columns of :meth:`weight_matrix`) of the given reduce-axis elements."""
        k = self.kernel_size
        elements = np.asarray(elements, dtype=np.int64)
        return (elements[:, None] * k + np.arange(k)[None, :]).reshape(-1)

    # -- weights ------------------------------------------------------------------
    def weight_matrix(self, w: np.ndarray) -> np.ndarray:
        """W as [outputs, features] so that y = W @ feature_vector (alpha included)."""
        if self.kind == "conv":
            return np.moveaxis(w, self.w_out_axis, 0).reshape(w.shape[self.w_out_axis], -1)
        if self.kind == "gemm":
            return self.alpha * (w if self.trans_b else w.T)
        return w.T   # matmul: W[K, N]

    def from_weight_matrix(self, m: np.ndarray, like: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            moved = np.moveaxis(like, self.w_out_axis, 0).shape
            return np.moveaxis(m.reshape(moved), 0, self.w_out_axis).astype(like.dtype)
        if self.kind == "gemm":
            m = m / self.alpha
            return (m if self.trans_b else m.T).astype(like.dtype)
        return np.ascontiguousarray(m.T).astype(like.dtype)

    # -- activations --------------------------------------------------------------
    def feature_rows(self, x: np.ndarray) -> np.ndarray:
        """The activation as [rows, features] (im2col for convs)."""
        if self.kind == "conv":
            return _im2col(x, self.kernel, self.strides, self.dilations, self.pads)
        x = np.moveaxis(x, self.x_axis, -1)
        return x.reshape(-1, x.shape[-1])

    def channel_sums(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(sum, sum of squares, count) per channel of x along x_axis."""
        x = np.moveaxis(np.asarray(x), self.x_axis, 0).reshape(x.shape[self.x_axis], -1)
        return (x.sum(1, dtype=np.float64), np.einsum("ij,ij->i", x, x, dtype=np.float64), x.shape[1])

    def to_elements(self, per_channel: np.ndarray) -> np.ndarray:
        """Channel statistics of x mapped to the weight's reduce elements (sum over a grouped
        conv's groups)."""
        if self.elements == self.channels:
            return per_channel
        if self.kind == "conv" and self.group > 1 and self.elements * self.group == self.channels:
            return per_channel.reshape(self.group, self.elements).sum(0)
        return np.full(self.elements, per_channel.mean())


def _conv_pads(node: gs.Node, x_shape, kernel, strides, dilations) -> tuple:
    n = len(kernel)
    pads = list(node.attrs.get("pads", [0] * (2 * n)))
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * n)
        for i in range(n):
            size = x_shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[i], pads[i + n] = lo, total - lo
    elif auto == "VALID":
        pads = [0] * (2 * n)
    return tuple(int(p) for p in pads)


def _im2col(x: np.ndarray, kernel, strides, dilations, pads) -> np.ndarray:
    """[N, C, *spatial] -> [N * out positions, C * prod(kernel)], columns in (c, k...) order."""
    n_sp = len(kernel)
    if all(k == 1 for k in kernel) and all(p == 0 for p in pads):
        sl = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
        x = x[sl]
        return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    pad = [(0, 0), (0, 0)] + [(pads[i], pads[i + n_sp]) for i in range(n_sp)]
    xp = np.pad(x, pad)
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + n_sp)))
    # win: [N, C, *out_full, *span] -> subsample positions by stride and taps by dilation
    sl = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) \
        + tuple(slice(None, None, d) for d in dilations)
    win = win[sl]
    n, c = win.shape[:2]
    out_sp = win.shape[2:2 + n_sp]
    # -> [N, *out, C, *kernel]
    order = (0,) + tuple(range(2, 2 + n_sp)) + (1,) + tuple(range(2 + n_sp, 2 + 2 * n_sp))
    return np.ascontiguousarray(win.transpose(order)).reshape(n * int(np.prod(out_sp)), c * int(np.prod(kernel)))


def view_for(node: gs.Node, weight: gs.Constant, axis: int, opset: int = 0) -> ContractionView | None:
    """The contraction view of `node` for its constant input `weight` reduced on `axis`, built from
    the weight layout its op rule states."""
    from .oprules import rule_for

    rule = rule_for(node, opset)
    lay = rule.weight_layout(node) if rule is not None else None
    ins = list(node.inputs)
    if lay is None or len(ins) <= max(lay.weight, lay.x) or ins[lay.weight] is not weight:
        return None
    shape = tensor_shape(weight)
    axis = axis % len(shape)
    out = node.outputs[0].name if node.outputs else ""
    x = ins[lay.x]
    if lay.kind in ("conv", "conv_transpose"):
        xs = tensor_shape(x)
        if xs is None or not isinstance(xs[lay.x_axis], int):
            return None
        n = len(lay.kernel_axes)
        kernel = tuple(int(shape[k]) for k in lay.kernel_axes)
        strides = tuple(int(s) for s in node.attrs.get("strides", [1] * n))
        dilations = tuple(int(d) for d in node.attrs.get("dilations", [1] * n))
        if lay.kind == "conv_transpose" or any(not isinstance(d, int) for d in xs[2:]):
            kind, pads = "channel", ()
        else:
            kind, pads = "conv", _conv_pads(node, xs, kernel, strides, dilations)
        return ContractionView(node.name, node.op, weight.name, axis, x.name, lay.x_axis, kind, kernel, strides,
                               dilations, pads, lay.groups, channels=int(xs[lay.x_axis]), elements=int(shape[axis]),
                               output=out, w_out_axis=lay.out_axis, y_axis=lay.y_axis)
    if isinstance(x, gs.Constant):
        return None
    if lay.kind == "gemm":
        return ContractionView(node.name, node.op, weight.name, axis, x.name, lay.x_axis, "gemm",
                               trans_b=lay.trans_b, alpha=lay.alpha,
                               channels=int(shape[axis]), elements=int(shape[axis]), output=out)
    if lay.kind == "matmul" and len(ins) == 2 and len(shape) == 2:
        xs = tensor_shape(x)
        if xs is None:
            return None
        k = int(shape[lay.in_axis])
        return ContractionView(node.name, node.op, weight.name, axis, x.name, lay.x_axis % len(xs), "matmul",
                               channels=k, elements=k, output=out)
    return None


def find_views(model: Model, weights: Iterable[tuple[str, int]]) -> dict[tuple[str, int], ContractionView]:
    """Views for (weight, reduce axis) pairs; a weight used by several nodes gets none."""
    wanted = {}
    for name, axis in weights:
        wanted.setdefault(name, set()).add(axis)
    users: dict[str, list] = {}
    for node in model.graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant) and t.name in wanted:
                users.setdefault(t.name, []).append(node)
    tensors = model.graph.tensors()
    out = {}
    for name, axes in wanted.items():
        nodes = users.get(name, [])
        if len(nodes) != 1:
            continue
        for axis in axes:
            v = view_for(nodes[0], tensors[name], axis, model.opset)
            if v is not None:
                out[(name, axis)] = v
    return out


# --------------------------------------------------------------------------- running


def expose(model: onnx.ModelProto, names: Iterable[str], *, only: bool = False) -> onnx.ModelProto:
    """A copy of `model` with the named intermediate tensors as (extra) graph outputs.

    With `only`, the original outputs are dropped and the nodes they alone need removed, so
    onnxruntime computes just the prefix of the graph that the tensors need.
    """
    names = list(dict.fromkeys(names))
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    outs = [tensors[n] for n in names]
    for t in outs:
        if t.dtype is None:
            t.dtype = np.float32
    if only:
        graph.outputs = outs
        graph.cleanup(remove_unused_graph_inputs=False)
    else:
        have = {t.name for t in graph.outputs}
        graph.outputs = list(graph.outputs) + [t for t in outs if t.name not in have]
    proto = gs.export_onnx(graph, do_type_check=False)
    proto.ir_version = model.ir_version
    del proto.opset_import[:]
    proto.opset_import.extend(model.opset_import)
    return proto


def truncate(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    return expose(model, names, only=True)


def _session(proto: onnx.ModelProto):
    from .runtime import require_onnxruntime

    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    from .runtime import new_session  # a big model's weights stay memory-mapped

    return new_session(ort, proto, opts, ["CPUExecutionProvider"])


def run_batches(proto: onnx.ModelProto, names: list[str], batches: Iterable[dict]):
    """Yield {name: value} for every batch (the session is built once)."""
    sess = _session(proto)
    feed_names = {i.name for i in sess.get_inputs()}
    for feeds in batches:
        values = sess.run(names, {k: v for k, v in feeds.items() if k in feed_names})
        yield dict(zip(names, values))


# --------------------------------------------------------------------------- statistics


@dataclass
class ChannelStats:
    """Per reduce-element statistics of a consumer's input: count, mean and E[x²]."""

    count: int
    sum: np.ndarray
    sumsq: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def second_moment(self) -> np.ndarray:
        return self.sumsq / max(self.count, 1)

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.second_moment - self.mean ** 2, 0.0)

    @property
    def norm(self) -> np.ndarray:
        """‖X_col‖₂ over the calibration set (the Wanda activation norm)."""
        return np.sqrt(self.sumsq)

    @property
    def nbytes(self) -> int:
        return int(self.sum.nbytes + self.sumsq.nbytes)


def collect_channel_stats(proto: onnx.ModelProto, views: dict, batches: Iterable[dict]) -> dict:
    """Per-element stats for every view, in one streaming pass over `batches`."""
    by_x: dict[str, list] = {}
    for key, v in views.items():
        by_x.setdefault(v.x, []).append(key)
    if not by_x:
        return {}
    names = sorted(by_x)
    acc = {}
    model = expose(proto, names, only=True)
    for values in run_batches(model, names, batches):
        for name in names:
            x = values[name]
            for key in by_x[name]:
                v = views[key]
                s, ss, n = v.channel_sums(x)
                if key in acc:
                    a = acc[key]
                    a[0] += s
                    a[1] += ss
                    a[2] += n
                else:
                    acc[key] = [s, ss, n]
    out = {}
    for key, (s, ss, n) in acc.items():
        v = views[key]
        per_elem_n = n * (v.channels // v.elements if v.elements and v.channels % v.elements == 0 else 1)
        out[key] = ChannelStats(int(per_elem_n), v.to_elements(s), v.to_elements(ss))
    return out


@dataclass
class HessianStats:
    """XᵀX (features x features) of one consumer over the calibration set, and the row count."""

    view: ContractionView
    xtx: np.ndarray
    xsum: np.ndarray
    rows: int = 0

    @property
    def nbytes(self) -> int:
        return int(self.xtx.nbytes + self.xsum.nbytes)

    def hessian(self) -> np.ndarray:
        """XᵀX / rows: the layer's output-error Hessian per row (up to the factor 2)."""
        return self.xtx / max(self.rows, 1)


def hessian_bytes(view: ContractionView) -> int:
    return 8 * view.features * (view.features + 1)


def _accumulate(h: HessianStats, rows: np.ndarray, chunk: int = 32768) -> None:
    """Products in float32 over chunks of rows, summed in float64."""
    for s in range(0, rows.shape[0], chunk):
        r = np.ascontiguousarray(rows[s:s + chunk], dtype=np.float32)
        h.xtx += r.T @ r
        h.xsum += r.sum(0)
        h.rows += r.shape[0]


def collect_hessians(proto: onnx.ModelProto, views: list[ContractionView], batches: Iterable[dict]) -> dict:
    """XᵀX for each view (all in one pass; the caller bounds how many at once)."""
    views = [v for v in views if v.has_hessian and v.features <= MAX_FEATURES]
    if not views:
        return {}
    out = {(v.weight, v.weight_axis): HessianStats(v, np.zeros((v.features, v.features)), np.zeros(v.features))
           for v in views}
    names = sorted({v.x for v in views})
    model = expose(proto, names, only=True)
    for values in run_batches(model, names, batches):
        for v in views:
            _accumulate(out[(v.weight, v.weight_axis)], v.feature_rows(values[v.x]))
    return out


class SegmentRunner:
    """Runs one model wave after wave over the same batches, each run resuming from the
    tensors cut at the previous wave instead of recomputing the whole prefix.

    Run w computes its outputs from the graph inputs plus the stored values of `cut` (every
    tensor produced before node index `start` and consumed at or after it), and stores the
    cut for the next run at `next_start`. The caller guarantees that nothing before
    `next_start` changes between runs (compensation edits only layers at or after it).
    The stored cut holds one cross-section of the network for every calibration batch;
    when it would exceed `budget` bytes the runner stores nothing and the next run starts
    from the graph inputs.
    """

    def __init__(self, batches, budget: int = 1 << 30):
        self.batches = list(batches)
        self.budget = budget
        self.cut: list[str] = []
        self.values: list | None = None
        self.runs = 0

    @staticmethod
    def _crossing(graph: gs.Graph, index: int) -> list[str]:
        produced = {}
        for i, node in enumerate(graph.nodes):
            for t in node.outputs:
                produced[t.name] = i
        out = []
        for node in graph.nodes[index:]:
            for t in node.inputs:
                if t.name and produced.get(t.name, index) < index and t.name not in out:
                    out.append(t.name)
        return out

    def run(self, proto: onnx.ModelProto, outputs: list[str], next_start: int | None):
        """Yield {output: value} per batch; `next_start` is the node index the next run resumes at."""
        graph = gs.import_onnx(proto)
        next_cut = self._crossing(graph, next_start) if next_start else []
        tensors = graph.tensors()
        have = set(self.cut) if self.values is not None else set()
        want = [n for n in dict.fromkeys(outputs + next_cut) if n not in have]
        orig_inputs = list(graph.inputs)
        for name in have:
            t = tensors[name]
            t.inputs.clear()
            sample = self.values[0][name] if self.values else None
            if sample is not None:
                t.dtype, t.shape = sample.dtype, None
        graph.inputs = orig_inputs + [tensors[n] for n in self.cut if n in have]
        graph.outputs = [tensors[n] for n in want]
        for t in graph.outputs:
            if t.dtype is None:
                t.dtype = np.float32
        graph.cleanup(remove_unused_graph_inputs=True)
        seg = gs.export_onnx(graph, do_type_check=False)
        seg.ir_version = proto.ir_version
        del seg.opset_import[:]
        seg.opset_import.extend(proto.opset_import)
        sess = _session(seg) if want else None
        feed_names = {i.name for i in sess.get_inputs()} if sess else set()
        new_values, held = [], 0
        for b, feeds in enumerate(self.batches):
            known = dict(self.values[b]) if self.values is not None else {}
            f = {k: v for k, v in {**feeds, **known}.items() if k in feed_names}
            vals = dict(zip(want, sess.run(want, f))) if sess else {}
            vals.update({k: v for k, v in known.items() if k not in vals})
            yield {n: vals[n] for n in outputs}
            if next_cut and held <= self.budget:
                keep = {n: vals[n] for n in next_cut}
                held += sum(v.nbytes for v in keep.values())
                new_values.append(keep)
        self.runs += 1
        if next_cut and held <= self.budget:
            self.cut, self.values = next_cut, new_values
        else:
            self.cut, self.values = [], None
