"""KV-cache graph inputs/outputs: which they are, and how pruning changes their shapes.

A decoder exported for generation takes the past keys/values of every layer as graph
inputs and returns the present ones as graph outputs. Their head axis (and head_dim)
are the attention heads' channels, so pruning heads changes the cache shapes the
runtime allocates. That is done only when asked (policy ``prune_kv_cache``,
``--prune-kv-cache``); otherwise those axes are pinned with a reason naming the flag.

A graph input/output is a cache tensor when its name says so (past/present/cache/
key_values, as every exporter and onnxruntime-genai name them) or when it is one
end of a Concat that joins a graph input to new values and is returned as a graph
output (the cache update itself).
"""
from __future__ import annotations

import re

import onnx_graphsurgeon as gs

__all__ = ["CACHE_NAME", "FLAG", "cache_io", "pin_reason", "cache_shapes", "format_cache_shapes"]

CACHE_NAME = re.compile(r"(past|present|cache|key_values)", re.IGNORECASE)
FLAG = "--prune-kv-cache"


def cache_io(graph: gs.Graph) -> set[str]:
    """Names of the float graph inputs/outputs that hold a KV cache."""
    inputs = {t.name for t in graph.inputs}
    outputs = {t.name for t in graph.outputs}
    names = set()
    for t in list(graph.inputs) + list(graph.outputs):
        shape = t.shape
        if shape is not None and len(shape) >= 3 and CACHE_NAME.search(t.name or ""):
            names.add(t.name)
    for node in graph.nodes:  # past -> Concat -> present
        if node.op != "Concat" or not node.outputs or node.outputs[0].name not in outputs:
            continue
        past = [t.name for t in node.inputs if t.name in inputs]
        if past:
            names.update(past)
            names.add(node.outputs[0].name)
    return names


def pin_reason(kind: str, name: str) -> str:
    return (f"reaches KV-cache {kind} {name} (pruning heads changes the cache shapes; "
            f"pass {FLAG} / prune_kv_cache=True to allow it)")


def _dims(t: gs.Tensor) -> list:
    return [d if isinstance(d, str) else (None if d is None else int(d)) for d in (t.shape or ())]


def cache_shapes(original: gs.Graph, pruned: gs.Graph, names) -> dict:
    """{name: {"kind": "input"|"output", "before": [...], "after": [...]}} for every cache tensor."""
    out = {}
    for kind, a_list, b_list in (("input", original.inputs, pruned.inputs),
                                 ("output", original.outputs, pruned.outputs)):
        after = {t.name: t for t in b_list}
        for t in a_list:
            if t.name in names and t.name in after:
                out[t.name] = {"kind": kind, "before": _dims(t), "after": _dims(after[t.name])}
    return out


def format_cache_shapes(shapes: dict) -> list[str]:
    """`past_key.0: [batch, 4->2, past_seq, 16]` per cache tensor."""
    lines = []
    for name, s in shapes.items():
        parts = [str(a) if a == b else f"{a}->{b}" for a, b in zip(s["before"], s["after"])]
        lines.append(f"{name}: [{', '.join(parts)}]")
    return lines
