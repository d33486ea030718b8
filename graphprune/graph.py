"""The in-memory model: an onnx-graphsurgeon graph plus what must survive a rewrite."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from .errors import BadInputError
from .model_io import ModelMeta, load_model, materialize
from .shape_eval import ShapeEvaluator

__all__ = ["Model", "Shape"]

logging.getLogger("ONNX_GRAPHSURGEON").setLevel(logging.ERROR)
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

Shape = tuple  # of int (static) or str / None (symbolic or unknown)


@dataclass
class Model:
    """An ONNX model being compiled: the graphsurgeon graph and the input's metadata."""

    graph: gs.Graph
    meta: ModelMeta

    @classmethod
    def load(cls, source) -> "Model":
        proto, meta = load_model(source)
        return cls.from_proto(proto, meta)

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, meta: ModelMeta | None = None) -> "Model":
        meta = meta or ModelMeta.of(proto)
        proto = infer_shapes(proto)
        try:
            graph = gs.import_onnx(proto)
        except Exception as exc:
            raise BadInputError(f"cannot read the graph: {exc}") from None
        refined: dict = {}
        _attach_base_dir(graph, meta.base_dir)
        for _ in range(8):  # onnx cannot infer reshape(b, s, -1) or run-time shapes: deduce them
            if not refine_shapes(graph, meta.opset_imports, refined):
                break
            io = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
            for name, t in graph.tensors().items():  # stale unknowns would win over new inference
                if isinstance(t, gs.Variable) and name not in io:
                    t.shape = refined.get(name)
            proto = infer_shapes(_export(graph, meta))
            graph = gs.import_onnx(proto)
            _attach_base_dir(graph, meta.base_dir)
        return cls(graph, meta)

    @property
    def shapes(self) -> "ShapeEvaluator":
        """Static evaluator of shape sub-graphs (built on first use)."""
        ev = self.__dict__.get("_shape_eval")
        if ev is None or ev[0] is not self.graph:
            ev = (self.graph, ShapeEvaluator(self.graph, self.meta.opset_imports))
            self.__dict__["_shape_eval"] = ev
        return ev[1]

    def value(self, t) -> "np.ndarray | None":
        """A constant's values, or a run-time shape expression's value when it is static."""
        if t is None:
            return None
        return self.shapes.value(t)

    def to_proto(self, *, infer: bool = True, materialize_data: bool = True) -> onnx.ModelProto:
        """Export to ONNX with the input's IR version and opsets; external weights are read in
        (under 2 GB) unless `materialize_data` is False."""
        proto = gs.export_onnx(self.graph, do_type_check=False)
        self.meta.apply(proto)
        if infer:
            proto = infer_shapes(proto)
        if materialize_data and self.meta.had_external_data:
            materialize(proto, self.meta.base_dir)
        return proto

    def copy(self) -> "Model":
        return Model.from_proto(self.to_proto(infer=False, materialize_data=False), self.meta)

    def tensors(self) -> dict:
        return self.graph.tensors()

    @property
    def opset(self) -> int:
        return self.meta.default_opset


class _ExternalValues(LazyValues):
    """LazyValues that read external data relative to the model's folder."""

    def __init__(self, tensor, base_dir: str):
        super().__init__(tensor)
        self.base_dir = base_dir

    def load(self):
        return np.array(onnx.numpy_helper.to_array(self.tensor, self.base_dir))


def _attach_base_dir(graph: gs.Graph, base_dir: str) -> None:
    for t in graph.tensors().values():
        lv = getattr(t, "_values", None)
        if isinstance(t, gs.Constant) and isinstance(lv, LazyValues) and not isinstance(lv, _ExternalValues) \
                and onnx.external_data_helper.uses_external_data(lv.tensor):
            t._values = _ExternalValues(lv.tensor, base_dir)
            t.data_location = None  # once loaded, the values are exported inline


def _export(graph: gs.Graph, meta: ModelMeta) -> onnx.ModelProto:
    proto = gs.export_onnx(graph, do_type_check=False)
    return meta.apply(proto)


def _unknown(d) -> bool:
    return d is None or (isinstance(d, str) and d.startswith("unk__"))


def _refine_slice(node: gs.Node, ev: ShapeEvaluator, refined: dict | None) -> bool:
    x, y = node.inputs[0], node.outputs[0]
    xs, ys = tensor_shape(x), tensor_shape(y)
    if xs is None or (ys is not None and not any(_unknown(d) for d in ys)):
        return False
    vals = [ev.value(t) if t.name else None for t in list(node.inputs[1:5]) + [gs.Variable("")] * (5 - len(node.inputs))]
    starts, ends, axes, steps = vals
    if starts is None or ends is None or (len(node.inputs) > 3 and node.inputs[3].name and axes is None) \
            or (len(node.inputs) > 4 and node.inputs[4].name and steps is None):
        return False
    r = len(xs)
    axes = list(range(len(starts))) if axes is None else [int(a) % r for a in axes]
    steps = [1] * len(starts) if steps is None else list(steps)
    new = list(xs)
    for s_, e, a, st in zip(starts, ends, axes, steps):
        if not isinstance(xs[a], int):
            new[a] = ys[a] if ys is not None else None
            continue
        new[a] = len(range(xs[a])[slice(int(s_), int(e), int(st))])
    if ys is not None and len(ys) == r:
        new = [b if not _unknown(b) else a for a, b in zip(new, ys)]
    if ys is not None and list(ys) == new:
        return False
    y.shape = new
    return True if refined is None else (refined.__setitem__(y.name, new) or True)


def refine_shapes(graph: gs.Graph, opsets: list, refined: dict | None = None) -> bool:
    """Fill unknown output dims of Reshape/Expand from static shape values or by cancelling
    symbolic dims (reshape(b, s, -1)); returns whether anything changed."""
    changed = False
    ev = None
    for node in graph.nodes:
        if node.op == "Slice" and len(node.inputs) >= 3:
            ev = ev or ShapeEvaluator(graph, opsets)
            changed = _refine_slice(node, ev, refined) or changed
            continue
        if node.op not in ("Reshape", "Flatten", "Expand") or not node.outputs:
            continue
        x, y = node.inputs[0], node.outputs[0]
        xs, ys = tensor_shape(x), tensor_shape(y)
        if xs is None or any(_unknown(d) for d in xs):
            continue
        if ys is not None and not any(_unknown(d) for d in ys):
            continue
        new = list(ys) if ys is not None else None
        if node.op in ("Reshape", "Expand") and len(node.inputs) > 1:
            ev = ev or ShapeEvaluator(graph, opsets)
            symbols = sorted({d for d in xs if isinstance(d, str)})
            vals = ev.symbolic(node.inputs[1], symbols)
            if vals is not None:
                if node.op == "Expand":
                    r = max(len(vals), len(xs))
                    new = new if new is not None and len(new) == r else [None] * r
                    for k in range(r):
                        kv, kx = k - (r - len(vals)), k - (r - len(xs))
                        xd = xs[kx] if kx >= 0 else 1
                        if xd != 1:
                            new[k] = xd
                        elif kv >= 0 and vals[kv] is not None:
                            new[k] = vals[kv]
                else:
                    new = new if new is not None and len(new) == len(vals) else [None] * len(vals)
                    allowzero = int(node.attrs.get("allowzero", 0))
                    for k, v in enumerate(vals):
                        if isinstance(v, str) or (v is not None and v > 0):
                            new[k] = v
                        elif v == 0 and not allowzero and k < len(xs):
                            new[k] = xs[k]
        if new is None:
            continue
        unknown = [k for k, d in enumerate(new) if _unknown(d)]
        if len(unknown) == 1 and node.op != "Expand":
            left = [d for d in xs if isinstance(d, str)]  # input symbols not matched in the output
            matched = True
            for d in new:
                if isinstance(d, str) and not _unknown(d):
                    if d in left:
                        left.remove(d)
                    else:
                        matched = False
            p_in = int(np.prod([d for d in xs if isinstance(d, int)]))
            p_out = int(np.prod([d for d in new if isinstance(d, int)]))
            if matched and not left and p_out > 0 and p_in % p_out == 0:
                new[unknown[0]] = p_in // p_out
            elif matched and len(left) == 1 and p_in == p_out:
                new[unknown[0]] = left[0]
        if ys is None or any(_unknown(a) and not _unknown(b) for a, b in zip(ys, new)):
            y.shape = [d if not _unknown(d) else (ys[k] if ys is not None else None) for k, d in enumerate(new)]
            if ys is None or list(ys) != list(y.shape):
                changed = True
                if refined is not None:
                    refined[y.name] = list(y.shape)
    return changed


def infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference with data propagation; falls back to no inference on failure."""
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        try:
            return onnx.shape_inference.infer_shapes(proto)
        except Exception:
            return proto


def tensor_shape(t: gs.Tensor) -> Shape | None:
    """Static dims as ints, symbolic dims as str, unknown dims as None; None if rank unknown."""
    if isinstance(t, gs.Constant):
        return tuple(int(d) for d in t.shape)
    if t.shape is None:
        return None
    return tuple(d if isinstance(d, (str, type(None))) else int(d) for d in t.shape)


def const_values(t: gs.Tensor) -> np.ndarray | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    return None
