"""Is the graph well formed? Checked once, on load, so a broken model is named as such.

What would otherwise surface deep inside the analysis as an internal error (or as "nothing to
prune") is refused here in one line (BadInputError, exit 2):

- a tensor produced twice (two nodes, a node and an initializer or graph input, two initializers);
- a node input or graph output that nothing produces (an undefined tensor);
- a cycle among the nodes;
- ai.onnx nodes in a model that imports no ai.onnx opset;
- weights of an element type graphprune cannot compute with (bfloat16, float8).

Anything else onnx.checker objects to (an unknown op, a bad attribute, nodes out of
topological order) is a warning returned to the caller, not a refusal: graphprune re-sorts
nodes, and an op it has no rule for is pinned, not pruned.
"""
from __future__ import annotations

from collections import Counter

import onnx

from .errors import BadInputError

__all__ = ["check_wellformed", "UNSUPPORTED_WEIGHT_TYPES"]

UNSUPPORTED_WEIGHT_TYPES = {getattr(onnx.TensorProto, n): n.lower() for n in
                            ("BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ",
                             "FLOAT8E8M0", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}
_DEFAULT_DOMAINS = ("", "ai.onnx")


def _more(items: list) -> str:
    return f" and {len(items) - 1} more" if len(items) > 1 else ""


def _check_text(model: onnx.ModelProto, where: str) -> None:
    """Names must be text: protobuf hands invalid UTF-8 in a string field back as bytes (a corrupt file)."""
    g = model.graph
    names = [(n.name, n.op_type, n.domain, *n.input, *n.output) for n in _all_nodes(g)]
    names.append(tuple(t.name for t in [*g.initializer, *g.input, *g.output, *g.value_info]))
    names.append(tuple(o.domain for o in model.opset_import))
    for group in names:
        for name in group:
            if isinstance(name, bytes):
                raise BadInputError(f"{where}: the name {name[:40]!r} is not valid UTF-8 text; is the file corrupt?")


def _check_opsets(model: onnx.ModelProto, where: str) -> None:
    """A node of the default domain needs an ai.onnx opset import: without it no op has a meaning
    (which version of Reshape?). A custom domain without an import (onnxruntime's fusions write
    com.microsoft nodes so) is left to onnx.checker's warning: its ops are looked up by name."""
    if any(o.domain in _DEFAULT_DOMAINS for o in model.opset_import):
        return
    for node in _all_nodes(model.graph):
        if node.domain in _DEFAULT_DOMAINS:
            raise BadInputError(f"{where}: node {node.name or node.op_type!r} ({node.op_type}) is an ai.onnx op, but "
                                f"the model imports no ai.onnx opset (opset_import is missing it)")


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def _check_names(graph: onnx.GraphProto, where: str, outer: frozenset = frozenset()) -> None:
    """Each tensor produced once; every input used is produced here or in an enclosing graph."""
    inits = [t.name for t in graph.initializer] + [t.values.name for t in graph.sparse_initializer]
    counts = Counter(inits)
    counts.update(i.name for i in graph.input if i.name not in set(inits))  # an input may name its default
    counts.update(o for n in graph.node for o in n.output if o)
    dup = sorted(name for name, k in counts.items() if k > 1)
    if dup:
        raise BadInputError(f"{where}: tensor {dup[0]!r}{_more(dup)} is produced more than once (duplicate tensor "
                            f"names: each node output, initializer and graph input needs its own name)")
    known = outer | set(counts)
    missing = []
    for node in graph.node:
        missing += [(i, node) for i in node.input if i and i not in known]
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _check_names(sub, where, frozenset(known))
    if missing:
        name, node = missing[0]
        raise BadInputError(f"{where}: node {node.name or node.op_type!r} reads tensor {name!r}, which no node, "
                            f"initializer or graph input produces (an undefined tensor)")
    undefined_out = [o.name for o in graph.output if o.name not in known]
    if undefined_out:
        raise BadInputError(f"{where}: graph output {undefined_out[0]!r} is produced by nothing")


def _check_acyclic(graph: onnx.GraphProto, where: str) -> None:
    """Kahn's algorithm over the top-level nodes (order in the file does not matter)."""
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output if o}
    deps = [{producer[i] for i in _reads(n) if i in producer} for n in graph.node]
    users: dict[int, list[int]] = {}
    for k, ds in enumerate(deps):
        for d in ds:
            users.setdefault(d, []).append(k)
    pending = [len(ds) for ds in deps]
    ready = [k for k, p in enumerate(pending) if p == 0]
    done = 0
    while ready:
        k = ready.pop()
        done += 1
        for u in users.get(k, ()):
            pending[u] -= 1
            if pending[u] == 0:
                ready.append(u)
    if done < len(graph.node):
        stuck = [graph.node[k] for k, p in enumerate(pending) if p > 0]
        names = ", ".join(repr(n.name or n.op_type) for n in stuck[:3])
        raise BadInputError(f"{where}: the graph has a cycle (nodes {names}{' ...' if len(stuck) > 3 else ''} "
                            f"depend on their own outputs)")


def _reads(node: onnx.NodeProto) -> set:
    """Tensors a node reads: its inputs and what its subgraphs take from the enclosing graph."""
    out = {i for i in node.input if i}
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            local = {t.name for t in sub.initializer} | {i.name for i in sub.input} | \
                    {o for n in sub.node for o in n.output}
            out |= {i for n in sub.node for i in _reads(n) if i not in local}
    return out


_T = onnx.TensorProto
_TYPED_FIELD = {_T.FLOAT: "float_data", _T.COMPLEX64: "float_data", _T.DOUBLE: "double_data",
                _T.COMPLEX128: "double_data", _T.INT64: "int64_data", _T.UINT32: "uint64_data",
                _T.UINT64: "uint64_data", _T.STRING: "string_data"}
_PACKED = {getattr(_T, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(_T, n)}


def _typed_count(t: onnx.TensorProto) -> tuple[int, int] | None:
    """(values stored in the tensor's typed field, values its dims need), or None when its data is raw,
    external or of an unknown type (raw and external lengths are checked by external_data.py)."""
    if t.HasField("raw_data") or t.data_location == _T.EXTERNAL or t.data_type == _T.UNDEFINED:
        return None
    n = 1
    for d in t.dims:
        n *= int(d)
    stored = len(getattr(t, _TYPED_FIELD.get(t.data_type, "int32_data")))
    if t.data_type in (_T.COMPLEX64, _T.COMPLEX128):
        n *= 2
    elif t.data_type in _PACKED:
        n = (n + 1) // 2
    return stored, n


def _check_weight_types(model: onnx.ModelProto, where: str) -> None:
    odd = [t for t in model.graph.initializer if t.data_type in UNSUPPORTED_WEIGHT_TYPES]
    if odd:
        kind = UNSUPPORTED_WEIGHT_TYPES[odd[0].data_type]
        raise BadInputError(f"{where}: {kind} weights are not supported ({odd[0].name!r}{_more(odd)}); convert the "
                            f"model to float32 or float16 first")
    for t in model.graph.initializer:
        if any(int(d) < 0 for d in t.dims):
            raise BadInputError(f"{where}: tensor {t.name!r} has a negative dimension {list(t.dims)}")
        counts = _typed_count(t)
        if counts is not None and counts[0] != counts[1]:
            raise BadInputError(f"{where}: tensor {t.name!r} holds {counts[0]} values, its type and shape "
                                f"{list(t.dims)} need {counts[1]}")


def _checker_warning(model: onnx.ModelProto) -> str | None:
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        return f"the input model fails onnx.checker: {first[:300]}"
    except Exception:  # noqa: BLE001 - the checker itself could not run (e.g. over 2 GB): no verdict
        return None
    return None


def check_wellformed(model: onnx.ModelProto, where: str = "model", light: onnx.ModelProto | None = None
                     ) -> list[str]:
    """Refuse (BadInputError, one line) what makes the graph unusable; return warnings (onnx.checker run
    on `light`: the model with its large weights declared as inputs, see model_io.without_weights)."""
    _check_text(model, where)
    _check_opsets(model, where)
    _check_names(model.graph, where)
    _check_acyclic(model.graph, where)
    _check_weight_types(model, where)
    warning = _checker_warning(model if light is None else light)
    return [warning] if warning else []
