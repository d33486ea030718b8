"""Cost model: multiply-accumulates (MACs) and parameters, per node and in total.

Costs are products of axis sizes, so the allocator can update them as channels go:
a term is `coef * prod(size of each listed dimension)`. Each op's terms come from its rule
(`OpRule.cost_terms`); this module sums them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .dependency import installed_registry
from .graph import Model, tensor_shape

__all__ = ["CostTerm", "static_size", "volume", "node_cost_terms", "param_cost_terms", "model_cost", "CostSummary",
           "input_shapes", "concrete_shapes", "concrete_shape", "format_shape", "DEFAULT_BATCH", "DEFAULT_IMAGE_SIZE",
           "DEFAULT_SEQUENCE", "DEFAULT_NEW_TOKENS", "DEFAULT_PAST_TOKENS"]


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


_static = static_size


def _rule(node: gs.Node, opset: int, registry):
    return registry.lookup(node.domain or "", node.op, opset)


# Default input shape for dynamic axes (the shape MACs are counted at unless given): batch 1,
# dynamic image axes (rank-4 inputs, axes 2 and 3) DEFAULT_IMAGE_SIZE, every other dynamic axis
# (sequence, past length, ...) DEFAULT_SEQUENCE. One size per symbol: axes sharing a name agree.
DEFAULT_BATCH, DEFAULT_IMAGE_SIZE, DEFAULT_SEQUENCE = 1, 224, 128
SPATIAL_HINT_SIZE = DEFAULT_IMAGE_SIZE  # the name earlier releases used
# A decoder with past keys/values (inputs named like caches, see kv_cache.CACHE_NAME) is costed at
# one decode step: DEFAULT_NEW_TOKENS new token after a past of DEFAULT_PAST_TOKENS, the shape it
# runs at for every generated token (runtime.decoder_sizes names its axes: past, total = past +
# new, the caches' head axis its head_size, never an image size).
DEFAULT_NEW_TOKENS, DEFAULT_PAST_TOKENS = 1, DEFAULT_SEQUENCE


def _decoder_symbols(model: Model) -> dict[str, int]:
    """{symbol: size} of a decoder's dynamic input axes at one decode step, {} for other models."""
    from .kv_cache import CACHE_NAME

    if not any(CACHE_NAME.search(t.name or "") and len(tensor_shape(t) or ()) >= 3 for t in model.graph.inputs):
        return {}
    cached = model.__dict__.get("_decoder_symbols")
    if cached is not None and cached[0] is model.graph:
        return cached[1]
    from .runtime import decoder_sizes

    try:
        sizes = decoder_sizes(model.to_proto(infer=False, materialize_data=False), DEFAULT_BATCH,
                              DEFAULT_NEW_TOKENS, past=DEFAULT_PAST_TOKENS) or {}
    except Exception:
        sizes = {}
    model.__dict__["_decoder_symbols"] = (model.graph, sizes)
    return sizes


def _graph_input_shapes(model: Model) -> dict[str, tuple]:
    return {t.name: tensor_shape(t) for t in model.graph.inputs if tensor_shape(t) is not None}


def input_shapes(model: Model, given: dict | None = None, strict: bool = False) -> dict[str, tuple[int, ...]]:
    """The concrete shape of every graph input MACs are counted at: `given` ({name: dims}, checked
    against the declared rank) where given, else the defaults above for dynamic axes; static dims
    as declared (a pruned model's resized cache input keeps its new size). `strict`: a given size
    that differs from a static one is an error (the check on the user's model)."""
    from .errors import BadInputError

    given = dict(given or {})
    declared = _graph_input_shapes(model)
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise BadInputError(f"--shape names {', '.join(unknown)}, not an input of the model "
                            f"(inputs: {', '.join(declared) or 'none'})")
    symbols: dict[str, int] = {}
    for name, shape in given.items():
        dims = declared[name]
        if len(dims) != len(shape):
            raise BadInputError(f"--shape {name}: the input has rank {len(dims)}, --shape gives {len(shape)} dims")
        for axis, (d, v) in enumerate(zip(dims, shape)):
            if strict and isinstance(d, int) and d > 0 and d != v:
                raise BadInputError(f"--shape {name}: axis {axis} has static size {d}, --shape gives {v}")
            if isinstance(d, str) and d:
                symbols.setdefault(d, int(v))
    for d, v in _decoder_symbols(model).items():
        symbols.setdefault(d, int(v))
    out = {}
    for name, dims in declared.items():
        if name in given:
            out[name] = tuple(d if isinstance(d, int) and d > 0 else int(v) for d, v in zip(dims, given[name]))
            continue
        shape = []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                shape.append(d)
                continue
            if isinstance(d, str) and d in symbols:
                shape.append(symbols[d])
                continue
            v = DEFAULT_BATCH if axis == 0 and len(dims) > 1 else \
                DEFAULT_IMAGE_SIZE if len(dims) == 4 and axis >= 2 else DEFAULT_SEQUENCE
            if isinstance(d, str) and d:
                symbols[d] = v
            shape.append(v)
        out[name] = tuple(shape)
    return out


def _states_macs(node: gs.Node, opset: int, registry) -> bool:
    """Whether `node`'s rule states MACs at all (whatever the shapes it knows now)."""
    rule = _rule(node, opset, registry)
    while rule is not None and hasattr(rule, "_inherit"):  # a FunctionRule: its cost is the inherited rule's
        rule = rule._inherit
    return rule is not None and not type(rule).cost_terms.__qualname__.startswith("OpRule.")


def _needs_concrete(model: Model, registry) -> bool:
    """Whether a costed node (one whose rule states MACs) touches a tensor with a dynamic axis or
    an unknown shape (an op the shape inference does not know, such as a contrib op)."""
    for node in model.graph.nodes:
        for t in (*node.inputs, *node.outputs):
            if not t.name or isinstance(t, gs.Constant):
                continue
            shape = tensor_shape(t)
            if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
                if node_cost_terms(node, opset=model.opset, registry=registry) or \
                        (shape is None and _states_macs(node, model.opset, registry)):
                    return True
                break
    return False


def concrete_shape(t: gs.Tensor, shapes: dict | None):
    """`t`'s shape at the concrete input shape where `shapes` (see concrete_shapes) has it, else
    its declared one (dynamic axes as str/None): what op rules cost with."""
    s = (shapes or {}).get(t.name) if t.name else None
    return s if s is not None else tensor_shape(t)


def concrete_shapes(model: Model, given: dict | None = None, registry=None) -> dict[str, tuple[int, ...]]:
    """{tensor: static shape} at the concrete input shape (see input_shapes): onnx shape inference
    with data propagation, then graphprune's refinement (shape sub-graphs evaluated), on a copy
    whose inputs are fixed; tensors of costed nodes still unknown after that (a run-time shape
    chain inference cannot follow) are read from one onnxruntime run at that shape, for models
    under 1 GiB of weights. Folded axes (heads or windows merged into the batch axis) and dynamic
    image sizes get their real sizes this way. {} when every costed tensor is static already (or
    inference fails). Cached on the model for its current graph and shape."""
    key = tuple(sorted((k, tuple(v)) for k, v in (given or {}).items()))
    cached = model.__dict__.get("_concrete_shapes")
    if cached is not None and cached[0] is model.graph and cached[1] == key:
        return cached[2]
    out: dict[str, tuple] = {}
    registry = registry if registry is not None else installed_registry()
    if given or _needs_concrete(model, registry):
        shapes = input_shapes(model, given)
        try:
            proto = model.to_proto(infer=False, materialize_data=False)
            for vi in proto.graph.input:
                if vi.name in shapes:
                    dims = vi.type.tensor_type.shape.dim
                    for d, v in zip(dims, shapes[vi.name]):
                        d.Clear()
                        d.dim_value = int(v)
            del proto.graph.value_info[:]
            for vi in proto.graph.output:
                vi.type.tensor_type.ClearField("shape")
            # refines run-time shapes too; a deep graph of run-time shape chains needs more rounds
            fixed = Model.from_proto(proto, model.meta, rounds=64)
            out = {name: tuple(shape) for name, t in fixed.graph.tensors().items()
                   if (shape := tensor_shape(t)) is not None and all(isinstance(d, int) and d >= 0 for d in shape)}
            missing = _unresolved(model, out, registry)
            if missing:
                out.update(_run_shapes(model, shapes, missing, out))
            if _unresolved(model, out, registry):  # partial shapes would weigh layers unevenly
                out = {}
        except Exception:
            out = {}
    # none found where some were needed: every dynamic axis counts as 1 (see CostSummary.note)
    model.__dict__["_concrete_shapes"] = (model.graph, key, out)
    return out


def concrete_cost_note(model: Model, given: dict | None = None, registry=None) -> str | None:
    """Why MACs could not be counted at the concrete input shape (None when they are)."""
    registry = registry if registry is not None else installed_registry()
    if concrete_shapes(model, given, registry) or not (given or _needs_concrete(model, registry)):
        return None
    return ("MACs counted with dynamic axes as 1: the graph's shapes could not all be resolved at input "
            f"{format_shape(input_shapes(model, given))} (give the shape the model runs at with --shape)")


def _unresolved(model: Model, found: dict, registry) -> list[str]:
    """Tensors of costed nodes whose concrete shape inference could not settle."""
    names = []
    for node in model.graph.nodes:
        ts = [t for t in (*node.inputs, *node.outputs) if t.name and not isinstance(t, gs.Constant)]
        if any(t.name not in found for t in ts) and _states_macs(node, model.opset, registry):
            names += [t.name for t in ts if t.name not in found]
    return sorted(set(names))


# run-time shapes are read by running the model (zeros at the concrete input shape) only below this
_RUN_SHAPES_MAX_BYTES = 1 << 30


def _length_feeds(model: Model, known: dict) -> dict[str, np.ndarray]:
    """Values of graph inputs that hold sequence lengths rather than data, at the concrete shape:
    com.microsoft GroupQueryAttention's seqlens_k (input 5: total length - 1 per sequence) and
    total_sequence_length (input 6), total = past_key's length (axis 2) + the query's (axis 1).
    Zeros there would make a run see no past at all."""
    inputs = {t.name: t for t in model.graph.inputs}
    feeds: dict[str, np.ndarray] = {}
    for node in model.graph.nodes:
        if node.op != "GroupQueryAttention" or len(node.inputs) < 7:
            continue
        q, past = node.inputs[0], node.inputs[3]
        qs, ps = known.get(q.name), known.get(past.name) if past.name else None
        if qs is None or len(qs) != 3:
            continue
        total = qs[1] + (ps[2] if ps is not None and len(ps) == 4 else 0)
        for i, value in ((5, total - 1), (6, total)):
            t = node.inputs[i]
            if t.name in inputs and known.get(t.name) is not None:
                feeds[t.name] = np.full(known[t.name], value, np.dtype(inputs[t.name].dtype))
    return feeds


def _run_shapes(model: Model, shapes: dict, names: list[str], known: dict | None = None) -> dict[str, tuple]:
    """Shapes of `names` from one onnxruntime run at the concrete input shape (zeros as inputs, but
    sequence lengths as _length_feeds says; `known`: concrete shapes found so far), for run-time
    shape chains static inference cannot follow; {} without onnxruntime, for big models, or when
    the run fails."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        return {}
    weights = sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in model.graph.tensors().values()
                  if isinstance(t, gs.Constant) and t.dtype is not None)
    if weights > _RUN_SHAPES_MAX_BYTES:
        return {}
    try:
        proto = model.to_proto(infer=False)
        tensors = model.graph.tensors()
        have = {o.name for o in proto.graph.output}
        for name in names:
            t = tensors.get(name)
            if t is not None and name not in have:
                if t.dtype is None:  # onnxruntime types an output declared by name only
                    proto.graph.output.add().name = name
                else:
                    proto.graph.output.append(onnx.helper.make_tensor_value_info(
                        name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)), None))
        feeds = {t.name: np.zeros(shapes[t.name], np.dtype(t.dtype)) for t in model.graph.inputs if t.name in shapes}
        feeds.update(_length_feeds(model, {**(known or {}), **shapes}))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs = [o.name for o in sess.get_outputs()]
        return {n: tuple(int(d) for d in v.shape) for n, v in zip(outs, sess.run(outs, feeds)) if n in set(names)}
    except Exception:
        return {}


def spatial_hints(model: Model, registry=None, given: dict | None = None) -> dict[str, tuple]:
    """Concrete shapes for node_cost_terms (kept under its earlier name): see concrete_shapes."""
    return concrete_shapes(model, given, registry)


def node_cost_terms(node: gs.Node, spatial: dict | None = None, *, opset: int = 0, registry=None) -> list[CostTerm]:
    """MACs of one node, as its op rule states them; `spatial`: {tensor: concrete shape} (see
    concrete_shapes, read with concrete_shape) for dynamic axes, which count as 1 where it has none.
    `registry`: the op rules to ask (default: the installed ones; pass it when costing many nodes)."""
    rule = _rule(node, opset, registry if registry is not None else installed_registry())
    return rule.cost_terms(node, spatial) if rule is not None else []


def param_cost_terms(model: Model) -> list[CostTerm]:
    """One term per weight initializer (floating point, or an integer weight read by DequantizeLinear)."""
    from .quantized import dequant_weight

    terms = []
    for t in model.graph.tensors().values():
        if isinstance(t, gs.Constant) and t.dtype is not None and (
                np.issubdtype(np.dtype(t.dtype), np.floating) or dequant_weight(t)):
            shape = tensor_shape(t)
            if shape and _used_as_data(t):
                terms.append(CostTerm(t.name, 1.0, [(t.name, k) for k in range(len(shape))]))
    return terms


def _used_as_data(t: gs.Constant) -> bool:
    return True


@dataclass
class CostSummary:
    macs: float
    params: float
    per_node: dict
    input_shape: dict = field(default_factory=dict)  # the concrete input shape the MACs are counted at
    note: str | None = None  # why not, where they could not be

    def to_dict(self) -> dict:
        return {"macs": int(self.macs), "params": int(self.params)}


def format_shape(shapes: dict) -> str:
    """{input: dims} as 'name 1x3x224x224, ids 1x128'."""
    return ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shapes.items())


def _term_value(term: CostTerm, sizes) -> float:
    v = term.coef
    for t, ax in term.axes:
        v *= sizes(t, ax)
    return v


def model_cost(model: Model, registry=None, shape: dict | None = None) -> CostSummary:
    """MACs and parameters at the concrete input shape: `shape` ({input: dims}) where given, the
    documented defaults (input_shapes) for other dynamic axes."""
    tensors = model.graph.tensors()
    registry = registry if registry is not None else installed_registry()
    hints = concrete_shapes(model, shape, registry)

    def size(t, ax):
        s = hints.get(t) or (tensor_shape(tensors[t]) if t in tensors else None)
        return _static(s[ax]) if s is not None and ax < len(s) else 1

    per_node = {}
    for node in model.graph.nodes:
        for term in node_cost_terms(node, hints, opset=model.opset, registry=registry):
            per_node[term.node] = per_node.get(term.node, 0.0) + _term_value(term, size)
    params = sum(_term_value(t, size) for t in param_cost_terms(model))
    note = concrete_cost_note(model, shape, registry)
    used = {} if note else input_shapes(model, shape)
    return CostSummary(sum(per_node.values()), params, per_node, used, note)
