"""The in-memory model: an onnx-graphsurgeon graph plus what must survive a rewrite."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues

from .errors import BadInputError
from .external_data import read_array, spill
from .model_io import ModelMeta, load_model, materialize, without_weights
from .op_families import BROADCAST_OPS
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
    def from_proto(cls, proto: onnx.ModelProto, meta: ModelMeta | None = None, rounds: int = 8) -> "Model":
        meta = meta or ModelMeta.of(proto)
        proto = infer_shapes(proto)
        try:
            graph = gs.import_onnx(proto)
        except Exception as exc:
            raise BadInputError(f"cannot read the graph: {exc}{_not_onnx_ops(proto)}") from None
        refined: dict = {}
        _attach_base_dir(graph, meta.base_dir)
        for _ in range(rounds):  # onnx cannot infer reshape(b, s, -1) or run-time shapes: deduce them
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
        """An independent graph (weights are shared until a rewrite replaces them)."""
        return Model(self.graph.copy(), self.meta)

    def tensors(self) -> dict:
        return self.graph.tensors()

    @property
    def opset(self) -> int:
        return self.meta.default_opset


    def store(self, t: gs.Constant, values: np.ndarray) -> None:
        """Give constant `t` new values; in a big model they go to a scratch file at once (read
        back memory-mapped when used), so rewritten weights do not pile up in memory."""
        values = np.ascontiguousarray(values)
        if self.meta.big and values.nbytes >= 1024:
            t._values = _ExternalValues(spill(t.name, values))
            t.data_location = None
        else:
            t.values = values
            t.data_location = None


class _ExternalValues(LazyValues):
    """LazyValues of external data (absolute location, checked on load), memory-mapped."""

    def __init__(self, tensor, base_dir: str = ""):
        super().__init__(tensor)

    def load(self):
        return read_array(self.tensor)


_CONSTANT_VALUES = gs.Constant.values


def _constant_values(self):
    """gs.Constant.values, except that external weights are not cached: each use maps the file
    afresh and the pages are released when the caller drops the array, so reading every
    weight once (scoring, rewriting) never holds the whole model in memory."""
    if isinstance(self._values, _ExternalValues):
        return self._values.load()
    return _CONSTANT_VALUES.fget(self)


gs.Constant.values = property(_constant_values, _CONSTANT_VALUES.fset, doc=_CONSTANT_VALUES.__doc__)


def _attach_base_dir(graph: gs.Graph, base_dir: str) -> None:
    for t in graph.tensors().values():
        lv = getattr(t, "_values", None)
        if isinstance(t, gs.Constant) and isinstance(lv, LazyValues) and not isinstance(lv, _ExternalValues) \
                and onnx.external_data_helper.uses_external_data(lv.tensor):
            t._values = _ExternalValues(lv.tensor, base_dir)
            t.data_location = None  # once loaded, the values are exported inline


def _not_onnx_ops(proto: onnx.ModelProto) -> str:
    """'; ...' naming default-domain op types onnx does not define (an exporter left framework ops,
    e.g. tf2onnx's StatefulPartitionedCall), or '' if there are none."""
    from collections import Counter

    bad = Counter(n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx")
                  and not onnx.defs.has(n.op_type))
    if not bad:
        return ""
    ops = ", ".join(f"{op} x{k}" for op, k in bad.most_common(3))
    return f"; the graph has ops that are not ONNX ops ({ops}): the exporter did not convert them"


def _export(graph: gs.Graph, meta: ModelMeta) -> onnx.ModelProto:
    proto = gs.export_onnx(graph, do_type_check=False)
    return meta.apply(proto)


def _factors(dims) -> tuple[list, int]:
    """The symbols and the static product of a shape; a product symbol ('b*s*4') is split."""
    syms, k = [], 1
    for d in dims:
        if isinstance(d, (int, np.integer)):
            k *= int(d)
        elif isinstance(d, str) and "*" in d and all(p.strip().isdigit() or p.strip().isidentifier()
                                                     for p in d.split("*")):
            for part in d.split("*"):
                part = part.strip()
                if part.isdigit():
                    k *= int(part)
                else:
                    syms.append(part)
        else:
            syms.append(d)
    return syms, k


def _unknown(d) -> bool:
    return d is None or (isinstance(d, str) and d.startswith("unk__"))


def _refine_slice(node: gs.Node, ev: ShapeEvaluator, refined: dict | None, symbols: list) -> bool:
    """Slice output dims from static (or symbolic, e.g. [:seq]) bounds."""
    x, y = node.inputs[0], node.outputs[0]
    xs, ys = tensor_shape(x), tensor_shape(y)
    if xs is None or (ys is not None and not any(_unknown(d) for d in ys)):
        return False
    ins = list(node.inputs[1:5]) + [None] * (5 - len(node.inputs))
    starts, ends, axes, steps = [ev.symbolic(t, symbols) if t is not None and t.name else None for t in ins]
    if starts is None or ends is None or (ins[2] is not None and ins[2].name and axes is None) \
            or (ins[3] is not None and ins[3].name and steps is None):
        return False
    r = len(xs)
    if axes is None:
        axes = list(range(len(starts)))
    if any(a is None or isinstance(a, str) for a in axes):
        return False
    axes = [int(a) % r for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    new = list(xs)
    for s_, e, a, st in zip(starts, ends, axes, steps):
        n = xs[a]
        if isinstance(n, int) and all(isinstance(v, int) for v in (s_, e, st)):
            new[a] = len(range(n)[slice(s_, e, st)])
        elif s_ == 0 and st == 1 and isinstance(e, str):
            new[a] = e  # x[:seq]
        elif s_ == 0 and st == 1 and e is not None and not isinstance(e, str) and e >= 2**31 and isinstance(n, str):
            new[a] = n
        else:
            new[a] = None
    if ys is not None and len(ys) == r:
        new = [b if _unknown(a) and not _unknown(b) else a for a, b in zip(new, ys)]
    if ys is not None and list(ys) == new:
        return False
    if all(_unknown(d) for d in new):
        return False
    y.shape = new
    if refined is not None:
        refined[y.name] = new
    return True


_SAME_SHAPE = {"GroupNormalization", "MeanVarianceNormalization", "LRN"}
_BROADCAST = frozenset(BROADCAST_OPS)


def _refine_broadcast(node: gs.Node, refined: dict | None) -> bool:
    """An unknown output dim of a broadcasting op is n when an input has n > 1 there."""
    y = node.outputs[0]
    ys = tensor_shape(y)
    shapes = [tensor_shape(t) for t in node.inputs if t.name]
    if ys is None and shapes and all(s is not None for s in shapes):
        # no inferred shape at all (an input was unknown when onnx ran): the rank is the largest
        # input rank, and an axis that is 1 (or absent) in every input is 1
        rank = max(len(s) for s in shapes)
        ys = [1 if all(s[k - rank + len(s)] == 1 for s in shapes if k - rank + len(s) >= 0) else None
              for k in range(rank)]
        y.shape = list(ys)
        if refined is not None:
            refined[y.name] = list(ys)
        if not any(_unknown(d) for d in ys):
            return True
    if ys is None or not any(_unknown(d) for d in ys):
        return False
    new = list(ys)
    for t in node.inputs:
        ts = tensor_shape(t) if t.name else None
        if ts is None:
            continue
        for k, d in enumerate(ts):
            j = len(ys) - len(ts) + k
            if 0 <= j < len(ys) and _unknown(new[j]) and isinstance(d, int) and d > 1:
                new[j] = d
            elif 0 <= j < len(ys) and _unknown(new[j]) and isinstance(d, str) and not _unknown(d):
                new[j] = d if all(_unknown(x) or x == d or x == 1 for x in _aligned(node, len(ys), j)) else new[j]
    if new == list(ys):
        return False
    y.shape = new
    if refined is not None:
        refined[y.name] = new
    return True


def _aligned(node: gs.Node, rank: int, j: int) -> list:
    out = []
    for t in node.inputs:
        ts = tensor_shape(t) if t.name else None
        if ts is not None and 0 <= j - (rank - len(ts)) < len(ts):
            out.append(ts[j - (rank - len(ts))])
    return out


def _type_proto(t: gs.Tensor) -> "onnx.TypeProto | None":
    shape = tensor_shape(t)
    try:
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
    except Exception:
        return None
    tp = onnx.TypeProto()
    tp.tensor_type.elem_type = elem
    if shape is None:
        return tp
    tp.tensor_type.shape.SetInParent()
    for d in shape:
        dim = tp.tensor_type.shape.dim.add()
        if isinstance(d, int) and d >= 0:
            dim.dim_value = d
        elif isinstance(d, str) and not _unknown(d):
            dim.dim_param = d
    return tp


def _small_int(t: gs.Tensor) -> bool:
    shape = tensor_shape(t)
    try:
        kind = np.dtype(t.dtype).kind
    except Exception:
        return False
    return kind in "iu" and shape is not None and len(shape) <= 1 and all(isinstance(d, int) and d <= 64 for d in shape)


def _refine_node(node: gs.Node, opsets: list, refined: dict | None, ev: "ShapeEvaluator | None" = None) -> bool:
    """Unknown output dims from onnx's inference of this one node, on the refined input shapes.

    Whole-graph inference runs between refinement rounds; a chain of refined reshapes
    (channel shuffles: Reshape -> Transpose -> Reshape per block) would need one round per
    link, so the ops between them are inferred here, in the same topological sweep.
    """
    outs = [o for o in node.outputs if o.name]
    if not outs or all((s := tensor_shape(o)) is not None and not any(_unknown(d) for d in s) for o in outs):
        return False
    if (node.domain or "") not in ("", "ai.onnx") or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
        return False
    try:
        schema = onnx.defs.get_schema(node.op, max(o.version for o in opsets if o.domain in ("", "ai.onnx")), "")
    except Exception:
        return False
    types, data = {}, {}
    for t in node.inputs:
        if not t.name:
            continue
        tp = _type_proto(t)
        if tp is None:
            return False
        types[t.name] = tp
        if isinstance(t, gs.Constant) and int(np.prod(t.shape)) <= 64:
            data[t.name] = onnx.numpy_helper.from_array(np.asarray(t.values), t.name)
        elif ev is not None and _small_int(t):  # pads, sizes, ranges computed from static shapes
            v = ev.value(t)
            if v is not None:
                data[t.name] = onnx.numpy_helper.from_array(np.asarray(v), t.name)
    try:
        proto = OnnxExporter.export_node(node)
        inferred = onnx.shape_inference.infer_node_outputs(schema, proto, types, data, opset_imports=opsets)
    except Exception:
        return False
    changed = False
    for o in outs:
        tp = inferred.get(o.name)
        if tp is None or not tp.tensor_type.HasField("shape"):
            continue
        new = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tp.tensor_type.shape.dim]
        old = tensor_shape(o)
        if old is not None and len(old) != len(new):
            continue
        merged = list(new) if old is None else [b if _unknown(a) and not _unknown(b) else a for a, b in zip(old, new)]
        if old is not None and list(old) == merged or all(_unknown(d) for d in merged) and merged:
            continue
        o.shape = merged
        if o.dtype is None:
            o.dtype = onnx.helper.tensor_dtype_to_np_dtype(tp.tensor_type.elem_type)
        if refined is not None:
            refined[o.name] = merged
        changed = True
    return changed


def _dim_factor(d):
    """A size as (symbols, static factor): 7, 'batch', '4*batch'; None if unknown."""
    if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
        return ([], int(d)) if d >= 0 else None
    if not isinstance(d, str) or _unknown(d):
        return None
    syms, k = [], 1
    for q in (q.strip() for q in d.split("*")):
        if q.isdigit():
            k *= int(q)
        elif q.isidentifier():
            syms.append(q)
        else:
            return None
    return syms, k


def _remaining_factor(xs, others):
    """The size left for a reshape's one inferred entry when every other size is a product of
    the input's symbols and constants: the input's factors divided by theirs, or None."""
    fx, fo = [_dim_factor(d) for d in xs], [_dim_factor(d) for d in others]
    if any(f is None for f in fx + fo):
        return None
    syms = [q for f in fx for q in f[0]]
    for f in fo:
        for q in f[0]:
            if q not in syms:
                return None
            syms.remove(q)
    p_in, p_out = int(np.prod([f[1] for f in fx])), int(np.prod([f[1] for f in fo]))
    if p_out <= 0 or p_in % p_out:
        return None
    k = p_in // p_out
    if not syms:
        return k
    return "*".join(([str(k)] if k != 1 else []) + sorted(syms))


def _refine_dropout_mask(node: gs.Node, opsets: list, refined: dict | None) -> bool:
    """Dropout's mask has the data input's shape (onnx infers only output 0 before opset 12);
    its type is the data's before opset 10 (Dropout-7), bool after."""
    if len(node.outputs) < 2 or not node.outputs[1].name or tensor_shape(node.outputs[1]) is not None:
        return False
    xs = tensor_shape(node.inputs[0])
    if xs is None:
        return False
    mask = node.outputs[1]
    mask.shape = list(xs)
    if mask.dtype is None:
        version = max(o.version for o in opsets if o.domain in ("", "ai.onnx"))
        mask.dtype = node.inputs[0].dtype if version < 10 else np.dtype(bool)
    if refined is not None:
        refined[mask.name] = list(xs)
    return True


def refine_shapes(graph: gs.Graph, opsets: list, refined: dict | None = None) -> bool:
    """Fill unknown output dims of Reshape/Expand from static shape values or by cancelling
    symbolic dims (reshape(b, s, -1)), of Slice from static bounds, of broadcasting ops from
    their inputs, and of other ops by onnx's inference of the node on refined inputs;
    returns whether anything changed."""
    changed = False
    ev = None
    symbols = None
    for node in graph.nodes:
        if node.op == "Dropout" and (node.domain or "") in ("", "ai.onnx"):
            changed = _refine_dropout_mask(node, opsets, refined) or changed
        if node.op in _SAME_SHAPE and (node.domain or "") in ("", "ai.onnx") and node.outputs and node.inputs:
            # function ops onnx does not always infer (GroupNormalization-21): the output is the input's shape
            xs, y = tensor_shape(node.inputs[0]), node.outputs[0]
            if xs is not None and tensor_shape(y) is None:
                y.shape = list(xs)
                if y.dtype is None:
                    y.dtype = node.inputs[0].dtype
                if refined is not None:
                    refined[y.name] = list(xs)
                changed = True
            continue
        if node.op not in _BROADCAST and node.op not in ("Slice", "Reshape", "Flatten", "Expand"):
            ev = ev or ShapeEvaluator(graph, opsets)
            changed = _refine_node(node, opsets, refined, ev) or changed
            continue
        if node.op in _BROADCAST and node.outputs:
            changed = _refine_broadcast(node, refined) or changed
            continue
        if node.op == "Slice" and len(node.inputs) >= 3:
            ev = ev or ShapeEvaluator(graph, opsets)
            if symbols is None:
                symbols = sorted({d for t in graph.tensors().values() for d in (tensor_shape(t) or ())
                                  if isinstance(d, str) and not _unknown(d)})
            changed = _refine_slice(node, ev, refined, symbols) or changed
            continue
        if node.op not in ("Reshape", "Flatten", "Expand") or not node.outputs:
            continue
        x, y = node.inputs[0], node.outputs[0]
        xs, ys = tensor_shape(x), tensor_shape(y)
        # a Reshape whose target is fully static/symbolic needs no input dims (a dynamic axis the
        # previous reshape merged, [b*s, C] -> [b, s, C], is unknown until the next round otherwise)
        partial = xs is not None and any(d is None for d in xs)
        if xs is None or (node.op not in ("Expand", "Reshape") and partial):
            continue
        if ys is not None and not any(_unknown(d) and d not in xs for d in ys):
            continue
        new = list(ys) if ys is not None else None
        if node.op in ("Reshape", "Expand") and len(node.inputs) > 1:
            ev = ev or ShapeEvaluator(graph, opsets)
            if symbols is None:
                symbols = sorted({d for t in graph.tensors().values() for d in (tensor_shape(t) or ())
                                  if isinstance(d, str) and not _unknown(d)})
            # the target may be built from the shape of another tensor (Shape -> Gather -> Unsqueeze
            # -> Concat); onnx's data propagation misses that before opset 13 (Unsqueeze-1 attrs)
            in_symbols = sorted({d for d in xs if isinstance(d, str)} | set(symbols))
            vals = ev.symbolic(node.inputs[1], in_symbols)
            if vals is not None:
                if node.op == "Expand":
                    r = max(len(vals), len(xs))
                    new = new if new is not None and len(new) == r else [None] * r
                    for k in range(r):
                        kv, kx = k - (r - len(vals)), k - (r - len(xs))
                        xd = xs[kx] if kx >= 0 else 1
                        sv = vals[kv] if kv >= 0 else 1
                        if xd != 1 and not _unknown(xd):
                            new[k] = xd
                        elif xd == 1 and sv is not None:
                            new[k] = sv
                        elif isinstance(sv, int) and sv > 1:
                            new[k] = sv  # an unknown input dim broadcasts to a static size
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
        unknown = [k for k, d in enumerate(new) if d is None or (_unknown(d) and d not in xs)]
        if len(unknown) == 1 and node.op != "Expand" and not partial:
            left, p_in = _factors(xs)  # input symbols not matched in the output
            out_syms, p_out = _factors([d for k, d in enumerate(new) if k not in unknown])
            matched = all(d in left and not left.remove(d) for d in out_syms)
            ratio = p_in // p_out if p_out > 0 and p_in % p_out == 0 else None
            if matched and not left and ratio is not None:
                new[unknown[0]] = ratio
            elif matched and len(left) == 1 and ratio == 1:
                new[unknown[0]] = left[0]
            elif (rest := _remaining_factor(xs, [d for k, d in enumerate(new) if k != unknown[0]])) is not None:
                new[unknown[0]] = rest  # e.g. [b, 4, 16, 32] -> [4*b, -1, 32]: the -1 is 16
            elif matched and left and ratio is not None and not any(_unknown(d) for d in left):
                # dynamic axes merged into one ([b, s, C] -> [-1, C]): a product symbol, 'b*s', that
                # a later reshape back ([b*s, C'] -> [b, s, -1]) can divide out again
                new[unknown[0]] = "*".join(left + ([str(ratio)] if ratio != 1 else []))
        def known(d):
            return d is not None and (not _unknown(d) or d in xs)

        if ys is None or any(not known(a) and known(b) for a, b in zip(ys, new)):
            y.shape = [d if known(d) else (ys[k] if ys is not None else None) for k, d in enumerate(new)]
            if ys is None or list(ys) != list(y.shape):
                # an inferred (unk__) symbol copied from the input is kept, but is no progress:
                # onnx renames those symbols every round, which would never settle
                changed = changed or ys is None or any(_unknown(a) and not _unknown(b) for a, b in zip(ys, y.shape))
                if refined is not None:
                    refined[y.name] = list(y.shape)
    return changed


def _in_scratch_dir(fn):
    """fn() run in a temporary working directory: onnxruntime's symbolic shape inference saves
    `sym_shape_infer_temp.onnx` into the current directory when it cannot infer every shape."""
    import os
    import tempfile

    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            return fn()
        finally:
            os.chdir(cwd)


def infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference with data propagation; falls back to no inference on failure.

    onnx does not know onnxruntime's contrib ops (com.microsoft); for graphs with them,
    onnxruntime's symbolic shape inference fills the gaps when it is installed.
    """
    light, moved = _without_big_weights(proto)
    try:
        out = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        try:
            out = onnx.shape_inference.infer_shapes(light)
        except Exception:
            out, light = proto, proto
    if light is not proto:  # keep the input's own initializers and input list
        result = onnx.ModelProto()
        result.CopyFrom(proto)
        del result.graph.value_info[:]
        result.graph.value_info.extend(v for v in out.graph.value_info if v.name not in moved)
        for dst, src in zip(result.graph.output, out.graph.output):
            dst.CopyFrom(src)
        out = result
    if any(n.domain == "com.microsoft" for n in out.graph.node):
        try:
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            out = _in_scratch_dir(lambda: SymbolicShapeInference.infer_shapes(out, auto_merge=True)) or out
        except Exception:
            pass
        _keep_output_symbols(proto, out)
    return out


def _keep_output_symbols(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """Symbolic inference merges symbols (auto_merge: a cache's total length becomes the past
    length); graph outputs keep the symbol names the model declared."""
    declared = {o.name: o.type.tensor_type.shape.dim for o in before.graph.output}
    for o in [*after.graph.output, *after.graph.value_info]:
        dims = declared.get(o.name)
        if dims is None or len(dims) != len(o.type.tensor_type.shape.dim):
            continue
        for d_old, d_new in zip(dims, o.type.tensor_type.shape.dim):
            if d_old.dim_param and d_new.dim_param and d_old.dim_param != d_new.dim_param:
                d_new.dim_param = d_old.dim_param


_without_big_weights = without_weights  # the I/O layer's helper (older name)


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
