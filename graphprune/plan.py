"""The pruning plan as JSON, in the ORIGINAL file's names, and its application to a torch module.

`graphprune plan` (and :func:`plan`, ``graphprune model.onnx --plan FILE``) writes what a prune run
removes so that the same structure can be cut out of the training code's model: per channel group
(channels, attention heads, KV groups) the removed indices and every initializer it slices, with the
axis and the element indices on that axis (a head expanded to its rows on each weight); per removed
residual branch the nodes and initializers that go; and the other graph changes (Reshape shape
constants, head-count attributes). Names are those of the input file: the analysis' renamed copies
of shared constants (``name__gpN``) and constants computed from an initializer by Identity/Cast/
Transpose are traced back to it.

For a torch export the initializer names are the module's parameter names (``layer1.0.conv1.weight``)
when BatchNorm is not folded into the convolutions: export with ``torch.onnx.export(..., dynamo=True,
optimize=False)`` or, with the TorchScript exporter, ``do_constant_folding=False``. The default exports
fold BatchNorm (dynamo keeps the convolution's name on the folded weight; TorchScript renames it to
``onnx::Conv_NNN``); :func:`apply_plan_to_torch` detects both and refuses, naming the fix.

Schema ``graphprune.plan/1`` (documented in docs/plan.md).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import BadInputError

__all__ = ["SCHEMA", "plan", "plan_from_result", "plan_json", "write_plan", "load_plan", "apply_plan_to_torch",
           "PlanError"]

SCHEMA = "graphprune.plan/1"
_COPY_SUFFIX = re.compile(r"__gpq?\d+$")  # normalize's private copies of a shared constant (passes/normalize.py)
_SMALL = 64  # constant values up to this many elements are written out in graph_changes


class PlanError(BadInputError):
    """A plan that cannot be applied (to a torch module, or that is not a graphprune plan)."""


def _fingerprint(values: np.ndarray) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"sum": float(v.sum()), "l2": float(np.sqrt((v * v).sum()))}


class _Original:
    """Names and values of the input file: initializers, Constant-node outputs, producers."""

    def __init__(self, proto: onnx.ModelProto, base_dir: str = ""):
        g = proto.graph
        self.base_dir = base_dir  # external data is read per tensor, only for the tensors asked about
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.nodes = {n.name: n for n in g.node if n.name}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)

    def value(self, name: str) -> "np.ndarray | None":
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name], self.base_dir)
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def trace(self, name: str, axis: int) -> dict:
        """Where a constant the analysis saw comes from in the input file: {source, name, axis, ...}."""
        base = _COPY_SUFFIX.sub("", name)
        shared = base != name and base in self.inits
        name = base if shared else name
        via = []
        for _ in range(8):  # Identity / Cast / Transpose chains (exporters and constant folding make them)
            if name in self.inits:
                out = {"source": "initializer", "initializer": name, "axis": axis}
                if shared:
                    out["shared_copy"] = True  # a shared 1-D/constant initializer: this consumer's copy
                if via:
                    out["via"] = via
                return out
            n = self.producer.get(name)
            if n is None:
                break
            if n.op_type == "Constant":
                return {"source": "constant_node", "node": n.name, "tensor": name, "axis": axis}
            if n.op_type in ("Identity", "Cast") and n.input:
                via.append({"node": n.name, "op": n.op_type})
                name = n.input[0]
                continue
            if n.op_type == "Transpose" and n.input:
                perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
                if perm is None:
                    v = self.value(n.input[0])
                    perm = list(range(v.ndim))[::-1] if v is not None else None
                if perm is None:
                    break
                via.append({"node": n.name, "op": "Transpose", "perm": perm})
                axis, name = perm[axis], n.input[0]
                continue
            return {"source": "derived", "tensor": name, "node": n.name, "op": n.op_type, "axis": axis}
        return {"source": "derived", "tensor": name, "axis": axis}


def _group_kind(g, consumers: dict) -> str:
    if g.kind == "heads":
        gqa = any(n.op_type == "GroupQueryAttention" for m in g.members for n in consumers.get(m.tensor, []))
        return "kv_groups" if gqa else "heads"
    return "channels"


def _groups(ctx, orig: _Original) -> list[dict]:
    """Per pruned group: removed channels and every member, traced to the input file's names."""
    if ctx is None or getattr(ctx, "plan", None) is None or getattr(ctx, "dependency", None) is None:
        return []
    import onnx_graphsurgeon as gs

    from .dependency import Dim

    dg, tensors = ctx.dependency, ctx.model.graph.tensors()
    by_id = {g.id: g for g in ctx.groups}
    out = []
    for gid, idx in sorted(ctx.plan.removed.items()):
        idx = np.asarray(sorted(int(i) for i in idx), dtype=np.int64)
        if idx.size == 0:
            continue
        g = by_id[gid]
        removed = dg.removed_elements(g.channel_labels[idx])
        weights, acts = [], []
        for m in g.members:
            rm = removed.get(Dim(m.tensor, m.axis))
            if rm is None:
                continue
            entry = orig.trace(m.tensor, m.axis)
            if isinstance(tensors.get(m.tensor), gs.Constant) or entry["source"] != "derived":
                entry |= {"role": m.role, "removed": [int(i) for i in rm]}
                if entry.get("initializer", m.tensor) != m.tensor:  # the constant the rewrite sliced (a copy
                    entry["pruned_tensor"], entry["pruned_axis"] = m.tensor, m.axis  # or folded Transpose of it)
                src = entry.get("initializer")
                if src is not None:
                    v = orig.value(src)
                    entry["shape"] = list(v.shape)
                    entry["fingerprint"] = _fingerprint(v)
                weights.append(entry)
            else:
                acts.append({"tensor": m.tensor, "axis": m.axis, "removed": len(rm)})
        out.append({"id": gid, "name": g.name, "kind": _group_kind(g, orig.consumers), "unit_width": g.width,
                    "size_before": int(g.size), "size_after": int(g.size - idx.size),
                    "removed": [int(i) for i in idx], "nodes": list(g.nodes), "tensors": weights,
                    "activations": acts})
    return out


def _branches(report: dict, orig: _Original) -> list[dict]:
    out = []
    for b in report.get("depth", {}).get("removed", []):
        nodes = set(b["nodes"])
        inits = sorted({i for n in b["nodes"] if n in orig.nodes for i in orig.nodes[n].input
                        if i in orig.inits and all(c.name in nodes for c in orig.consumers.get(i, []))})
        out.append({"kind": "branch", "add": b["add"], "block": b["kind"], "shortcut": b["shortcut"],
                    "branch_output": b["branch_output"], "output": b["output"], "nodes": list(b["nodes"]),
                    "initializers": inits, "replaced_by": "the Add's output becomes its shortcut input"})
    return out


def _small(v: "np.ndarray | None"):
    return None if v is None or v.size > _SMALL else np.asarray(v).tolist()


def _patched(new: "_Original", name: str) -> "dict | None":
    """A run-time shape the rewrite patches with Where(mask, new, old): the positions and values set."""
    n = new.producer.get(name)
    if n is None or n.op_type != "Where" or len(n.input) != 3:
        return None
    mask, vals = new.value(n.input[0]), new.value(n.input[1])
    if mask is None or vals is None or mask.ndim != 1 or vals.shape != mask.shape:
        return None
    pos = [int(k) for k in np.nonzero(mask)[0]]
    return {"after": {"positions": pos, "values": [int(vals[k]) for k in pos]}, "patched_by": n.name}


def _graph_changes(orig_proto: onnx.ModelProto, pruned: onnx.ModelProto, orig: _Original, sliced: set) -> list[dict]:
    """Node attributes and small constant inputs (Reshape shapes, head counts) that changed, by node name."""
    new = _Original(pruned)
    changes = []
    for n in pruned.graph.node:
        o = orig.nodes.get(n.name) if n.name else None
        if o is None or o.op_type != n.op_type:
            continue
        oa = {a.name: onnx.helper.get_attribute_value(a) for a in o.attribute}
        na = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        for k in sorted(set(oa) | set(na)):
            if isinstance(oa.get(k), (int, float, str, bytes, list)) and oa.get(k) != na.get(k):
                changes.append({"node": n.name, "op": n.op_type, "attribute": k,
                                "before": oa.get(k), "after": na.get(k)})
        for i, (oi, ni) in enumerate(zip(o.input, n.input)):
            src = _COPY_SUFFIX.sub("", oi)
            if not oi or src in sliced or ni == oi and oi not in orig.inits and oi not in new.inits:
                continue
            before, after = orig.value(oi), new.value(ni)
            if after is None and ni != oi:  # a shape computed at run time, patched by an inserted node
                change = _patched(new, ni)
                if change is not None:
                    changes.append({"node": n.name, "op": n.op_type, "input": i, "tensor": oi,
                                    "before": _small(before)} | change)
                continue
            if before is None or after is None or before.size > _SMALL:
                continue
            if before.shape != after.shape or not np.array_equal(before, after):
                changes.append({"node": n.name, "op": n.op_type, "input": i, "tensor": oi,
                                "before": _small(before), "after": _small(after)})
    return changes


def plan_from_result(result, original: "str | os.PathLike | onnx.ModelProto") -> dict:
    """The plan of a :class:`graphprune.PruneResult` against the model it was pruned from."""
    if isinstance(original, onnx.ModelProto):
        proto, base = original, ""
    else:  # the graph only; an initializer's external data is read when the plan needs its values
        proto, base = onnx.load(os.fspath(original), load_external_data=False), os.path.dirname(os.fspath(original))
    orig = _Original(proto, base)
    r = result.report
    groups = _groups(result.context, orig)
    sliced = {t["initializer"] for g in groups for t in g["tensors"] if "initializer" in t}
    notes = []
    derived = sorted({t.get("tensor") for g in groups for t in g["tensors"] if t["source"] != "initializer"})
    if derived:
        notes.append(f"{len(derived)} sliced constants are not initializers of the input file (computed by its "
                     f"nodes or Constant nodes): {', '.join(derived[:5])}{' ...' if len(derived) > 5 else ''}")
    if any(re.match(r"onnx::", n) for n in sliced):
        notes.append("initializers named onnx::* come from the TorchScript exporter, which folded BatchNorm into "
                     "the convolutions and renamed them; export with do_constant_folding=False (or dynamo=True, "
                     "optimize=False) to keep the PyTorch parameter names")
    if any(n.endswith(".weight_bias") for n in sliced):
        notes.append("initializers named *.weight_bias come from the dynamo exporter's optimizer, which folded "
                     "BatchNorm into the convolutions (their *.weight holds the folded values); export with "
                     "dynamo=True, optimize=False to keep BatchNorm and the PyTorch parameter names")
    return {
        "schema": SCHEMA,
        "macs_before": r.get("macs_before"), "macs_after": r.get("macs_after"),
        "params_before": r.get("params_before"), "params_after": r.get("params_after"),
        "groups": groups,
        "branches": _branches(r, orig),
        "graph_changes": _graph_changes(proto, result.model, orig, sliced),
        "notes": notes,
    }


def plan(model: "str | os.PathLike | onnx.ModelProto", target_flops: float | None = None, **options) -> dict:
    """Prune as :func:`graphprune.prune` does (same options) and return the plan (schema
    ``graphprune.plan/1``) in the names of `model`; nothing is written."""
    from .api import prune

    result = prune(model, target_flops, **options)
    return plan_from_result(result, model)


_NUMBERS = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")


def plan_json(p: dict) -> str:
    """Indented JSON with each list of numbers on one line (index lists stay readable)."""
    text = json.dumps(p, indent=1)
    return _NUMBERS.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


def write_plan(p: dict, path: "str | os.PathLike", flag: str = "--plan") -> None:
    """Write atomically (a temporary file beside `path`, then a rename)."""
    from .paths import write_text_atomic

    write_text_atomic(path, plan_json(p), flag)


def load_plan(p: "dict | str | os.PathLike") -> dict:
    if not isinstance(p, dict):
        try:
            with open(p, encoding="utf-8") as f:
                p = json.load(f)
        except (OSError, ValueError) as exc:
            raise PlanError(f"cannot read plan {p}: {exc}") from None
    if not isinstance(p, dict) or p.get("schema") != SCHEMA:
        raise PlanError(f"not a {SCHEMA} plan (schema: {p.get('schema') if isinstance(p, dict) else None!r})")
    return p


def _slices(p: dict) -> dict[str, dict[int, set]]:
    """{initializer: {axis: removed indices}} over all groups; conflicting entries refused."""
    out: dict[str, dict[int, set]] = {}
    for g in p["groups"]:
        for t in g["tensors"]:
            if t["source"] != "initializer":
                raise PlanError(f"group {g['name']}: {t.get('tensor')} is not a parameter of the exported model "
                                f"({t['source']}, made by node {t.get('node')}); apply_plan_to_torch maps "
                                f"initializers only")
            axes = out.setdefault(t["initializer"], {})
            rm = set(t["removed"])
            if t["axis"] in axes and axes[t["axis"]] != rm and not t.get("shared_copy"):
                raise PlanError(f"{t['initializer']} axis {t['axis']} is sliced two ways by the plan")
            if t.get("shared_copy") and t["axis"] in axes and axes[t["axis"]] != rm:
                raise PlanError(f"{t['initializer']} is shared by layers pruned differently; untie it in torch "
                                f"first")
            axes[t["axis"]] = rm
    return out


def apply_plan_to_torch(module: Any, p: "dict | str | os.PathLike", *, check_values: bool = True,
                        example_inputs: "tuple | None" = None) -> Any:
    """Slice `module`'s parameters and buffers (by name) as the plan says, in place, and fix
    in_channels/out_channels/groups (Conv), num_features (BatchNorm), in_features/out_features
    (Linear), normalized_shape (LayerNorm), embedding_dim, num_heads/embed_dim where present.

    Refuses (:class:`PlanError`, nothing changed) a plan with removed residual branches, a sliced
    constant that is not a parameter, a name the module lacks, a shape that differs from the ONNX
    initializer's, or (`check_values`) values that differ (BatchNorm folded by the exporter). With
    `example_inputs` (a tuple) the sliced module is run once; if it fails (a layer the plan does not
    name kept its width) everything is put back and :class:`PlanError` is raised."""
    import torch

    p = load_plan(p)
    if p.get("branches"):
        names = ", ".join(b["add"] for b in p["branches"][:3])
        raise PlanError(f"the plan removes residual branches ({names}); apply_plan_to_torch maps channels only: "
                        f"replace those blocks' residual functions by zero in your code, or plan without --depth")
    slices = _slices(p)
    params = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    info = {t["initializer"]: t for g in p["groups"] for t in g["tensors"]}
    for name in slices:
        if name not in params:
            hint = (" (the exporter folded BatchNorm into the convolutions and renamed it: export with "
                    "do_constant_folding=False or dynamo=True, optimize=False)") \
                if name.startswith("onnx::") or name.endswith(".weight_bias") else ""
            raise PlanError(f"the module has no parameter or buffer {name}{hint}")
        t, ref = params[name], info[name]
        if list(t.shape) != list(ref["shape"]):
            raise PlanError(f"{name}: shape {list(t.shape)} in torch, {ref['shape']} in the ONNX file")
        if check_values:
            fp = _fingerprint(t.detach().cpu().double().numpy())
            want = ref["fingerprint"]
            if not np.isclose(fp["l2"], want["l2"], rtol=1e-4, atol=1e-6) or \
                    not np.isclose(fp["sum"], want["sum"], rtol=1e-3, atol=1e-4 * max(want["l2"], 1.0)):
                raise PlanError(f"{name} holds other values than the ONNX initializer of that name (BatchNorm folded "
                                f"into it by the exporter?): export with dynamo=True, optimize=False, or "
                                f"do_constant_folding=False; check_values=False skips this check")
    mods = dict(module.named_modules())
    owners = sorted({n.rpartition(".")[0] for n in slices})
    saved = [(mods[n.rpartition(".")[0]], n.rpartition(".")[2]) for n in slices]
    saved = [(m, attr, getattr(m, attr)) for m, attr in saved]
    attrs = {o: {k: v for k, v in vars(mods[o]).items() if k in _SIZE_FIELDS} for o in owners}
    try:
        with torch.no_grad():
            for name, axes in slices.items():
                owner, _, attr = name.rpartition(".")
                m = mods[owner]
                t = getattr(m, attr)
                v = t.data
                for axis, rm in sorted(axes.items()):
                    keep = torch.tensor([i for i in range(v.shape[axis]) if i not in rm], dtype=torch.long,
                                        device=v.device)
                    v = v.index_select(axis, keep).contiguous()
                if isinstance(t, torch.nn.Parameter):
                    setattr(m, attr, torch.nn.Parameter(v, requires_grad=t.requires_grad))
                else:
                    m._buffers[attr] = v
            for owner in owners:
                _fix_attributes(mods[owner])
            if example_inputs is not None:
                try:
                    module(*example_inputs)
                except Exception as exc:  # noqa: BLE001 - any failure means the structure does not fit
                    raise PlanError(f"the sliced module fails on example_inputs ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}): a layer the plan does not "
                                    f"name (a BatchNorm folded by the exporter, a hard-coded size?) kept its old "
                                    f"width; export with dynamo=True, optimize=False") from None
    except BaseException:
        for m, attr, t in saved:  # nothing changed: the original tensors and sizes back
            if isinstance(t, torch.nn.Parameter):
                setattr(m, attr, t)
            else:
                m._buffers[attr] = t
        for o, fields in attrs.items():
            vars(mods[o]).update(fields)
        raise
    return module


_SIZE_FIELDS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
                "normalized_shape", "num_embeddings", "embedding_dim", "num_channels")


def _fix_attributes(m) -> None:
    """Module size attributes from its (sliced) weight: the fields torch's layers read in forward."""
    import torch.nn as nn

    w = getattr(m, "weight", None)
    if isinstance(m, nn.modules.conv._ConvNd) and w is not None:
        groups = m.groups
        if groups > 1 and groups == m.in_channels == m.out_channels and w.shape[1] == 1:  # depthwise follows
            m.groups = w.shape[0]
        m.out_channels = w.shape[1] * m.groups if m.transposed else w.shape[0]
        m.in_channels = w.shape[0] if m.transposed else w.shape[1] * m.groups
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        ref = w if w is not None else getattr(m, "running_mean", None)
        if ref is not None:
            m.num_features = ref.shape[0]
    elif isinstance(m, nn.Linear) and w is not None:
        m.out_features, m.in_features = w.shape
    elif isinstance(m, nn.LayerNorm) and w is not None:
        m.normalized_shape = tuple(w.shape)
    elif isinstance(m, nn.Embedding) and w is not None:
        m.num_embeddings, m.embedding_dim = w.shape
    elif isinstance(m, nn.GroupNorm) and w is not None:
        m.num_channels = w.shape[0]
    elif isinstance(m, nn.MultiheadAttention):
        raise PlanError("nn.MultiheadAttention: its fused in_proj cannot be pruned by name here; use separate "
                        "q/k/v Linear layers")
