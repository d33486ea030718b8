"""Deployment folders: onnxruntime-genai builder output and Hugging Face/optimum exports.

A model whose folder holds `genai_config.json` (onnxruntime-genai) or a Hugging Face
`config.json` (optimum) is run by a runtime that reads its head counts and sizes from that
config and describes every layer with one num_attention_heads / num_key_value_heads /
head_size. Pruning such a model therefore (a) may change the KV cache (the runtime allocates
it from the config, which is rewritten), (b) keeps the same number of heads in every layer
(whole KV groups), and (c) writes the pruned model as a complete folder: the config rewritten
for the pruned graph, tokenizer and processing files copied beside it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import onnx

from .errors import BadInputError

__all__ = ["DeployFolder", "detect_folder", "DEPLOY_POLICY", "graph_dimensions", "write_folder", "check_output",
           "check_uniform", "default_output"]

GENAI_CONFIG = "genai_config.json"
HF_CONFIG = "config.json"
DEPLOY_POLICY = {"prune_kv_cache": True, "uniform_heads": True}


@dataclass
class DeployFolder:
    path: str
    kind: str  # "genai" or "hf"
    config: str  # the config file's name
    note: str = ""  # why heads stay, when they do

    @property
    def policy(self) -> dict:
        """genai_config.json and GQA Hugging Face configs describe a pruned cache (num_key_value_heads);
        other Hugging Face configs size it from num_attention_heads (optimum, for MHA model types),
        which also fixes the head size: there the caches, and so the heads, stay (--prune-kv-cache
        overrides)."""
        if self.note:
            return {"uniform_heads": True}
        return dict(DEPLOY_POLICY)


def detect_folder(model_path: str) -> DeployFolder | None:
    """The deployment folder `model_path` sits in, or None."""
    folder = os.path.dirname(os.path.abspath(model_path))
    for kind, name in (("genai", GENAI_CONFIG), ("hf", HF_CONFIG)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        note = ""
        if kind == "hf":
            try:
                with open(path) as f:
                    cfg = json.load(f)
            except (OSError, ValueError):
                raise BadInputError(f"{path}: not a readable JSON config") from None
            heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
            if not (isinstance(heads, int) and isinstance(kv, int) and 0 < kv < heads):
                note = (f"{name} has no grouped-query num_key_value_heads, so runtimes size the KV cache from "
                        "num_attention_heads: attention heads are kept (--prune-kv-cache prunes them anyway)")
        return DeployFolder(folder, kind, name, note)
    return None


def default_output(src: DeployFolder, model_path: str) -> str:
    """Without -o: the same file name in a sibling folder `<folder>_pruned`."""
    return os.path.join(src.path.rstrip(os.sep) + "_pruned", os.path.basename(model_path))


def check_output(src: DeployFolder, out_model: str) -> None:
    """The pruned folder must not be the input's (its config would be rewritten in place)."""
    out_dir = os.path.dirname(os.path.abspath(out_model))
    if os.path.isdir(out_dir) and os.path.samefile(out_dir, src.path):
        raise BadInputError(f"-o {out_model} is in the input folder: a deployment folder's config would be "
                            f"rewritten in place; write to another folder (-o OUT/{os.path.basename(out_model)})")


def _attr(node: onnx.NodeProto, name: str, default=0):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _dim(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def graph_dimensions(model: onnx.ModelProto) -> dict:
    """Head counts and sizes of a decoder graph, one value each or a list when layers differ:
    query heads from the attention ops' num_heads, KV heads from GroupQueryAttention's
    kv_num_heads or the KV-cache outputs ([batch, kv_heads, seq, head_size]), head size from the
    caches (a symbolic one from the attention op, see :func:`cache_head_size`)."""
    from .runtime import cache_head_size

    heads, kv, size = set(), set(), set()
    for node in model.graph.node:
        if node.op_type in ("GroupQueryAttention", "MultiHeadAttention"):
            heads.add(int(_attr(node, "num_heads")))
            if node.op_type == "GroupQueryAttention":
                kv.add(int(_attr(node, "kv_num_heads")))
    inputs = {vi.name for vi in model.graph.input}
    for vi in model.graph.output:
        dims = _dim(vi)
        if ("present" in vi.name or "key_values" in vi.name) and len(dims) == 4:
            if isinstance(dims[1], int) and dims[1] > 0 and not any(n.op_type == "GroupQueryAttention"
                                                                    for n in model.graph.node):
                kv.add(dims[1])
            if isinstance(dims[3], int) and dims[3] > 0:
                size.add(dims[3])
    for vi in model.graph.input:
        dims = _dim(vi)
        if "past" in vi.name and len(dims) == 4 and isinstance(dims[3], str) and vi.name in inputs:
            d = cache_head_size(model, vi.name)
            if d:
                size.add(d)
    out = {}
    for key, vals in (("num_attention_heads", heads), ("num_key_value_heads", kv), ("head_size", size)):
        if len(vals) == 1:
            out[key] = next(iter(vals))
        elif vals:
            out[key] = sorted(vals)
    return out


def check_uniform(pruned: onnx.ModelProto) -> dict:
    """The pruned graph's dimensions (see :func:`graph_dimensions`); a BadInputError when layers differ
    (the runtime's config describes every layer with one value)."""
    dims = graph_dimensions(pruned)
    uneven = [k for k, v in dims.items() if isinstance(v, list)]
    if uneven:
        raise BadInputError(f"the pruned layers differ in {', '.join(uneven)} ({dims}); the runtime's config "
                            "describes every layer with one value")
    return dims


def _write_json(path: str, data: dict) -> None:
    from .paths import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=4))


def _copy(src: str, dst: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dst), prefix=".gp_")
    os.close(fd)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _model_files(folder: str) -> set[str]:
    """Files of ONNX models (and their external data) in a folder: not copied."""
    names = set()
    for name in os.listdir(folder):
        if name.endswith(".onnx"):
            names.add(name)
            try:
                proto = onnx.load(os.path.join(folder, name), load_external_data=False)
            except Exception:
                continue
            for t in proto.graph.initializer:
                for e in t.external_data:
                    if e.key == "location":
                        names.add(e.value)
        elif name.endswith((".onnx.data", ".onnx_data", ".data")):
            names.add(name)
    return names


def write_folder(src: DeployFolder, out_model: str, pruned: onnx.ModelProto, report: dict) -> dict:
    """Copy the folder's other files beside `out_model` and rewrite its config for `pruned`.

    Returns what changed ({"config": name, "set": {...}, "copied": [...]}); refuses when the
    layers' head counts differ (the runtime could not describe the graph)."""
    check_output(src, out_model)
    out_dir = os.path.dirname(os.path.abspath(out_model))
    dims = check_uniform(pruned)
    skip = _model_files(src.path) | {src.config}
    copied = []
    for name in sorted(os.listdir(src.path)):
        path = os.path.join(src.path, name)
        if name in skip or not os.path.isfile(path) or name.startswith("."):
            continue
        _copy(path, os.path.join(out_dir, name))
        copied.append(name)
    with open(os.path.join(src.path, src.config)) as f:
        config = json.load(f)
    hidden = _hidden_size(pruned)
    if src.kind == "genai":
        dec = config.setdefault("model", {}).setdefault("decoder", {})
        new = dict(dims)
        if hidden:
            new["hidden_size"] = hidden
        dec.update(new)
        dec["filename"] = os.path.basename(out_model)
    else:
        # optimum allocates the cache as [batch, num_key_value_heads, seq, hidden_size / num_attention_heads]:
        # num_attention_heads stays what gives the head size (the graph holds the query heads it computes)
        new = {k: v for k, v in (("num_key_value_heads", dims.get("num_key_value_heads")),
                                 ("head_dim", dims.get("head_size")), ("hidden_size", hidden)) if v}
        size = new.get("head_dim") or config.get("head_dim")
        if hidden and size and hidden % size == 0:
            new["num_attention_heads"] = hidden // size
        config.update(new)
    _write_json(os.path.join(out_dir, src.config), config)
    out = {"config": src.config, "set": new, "copied": copied}
    if src.note:
        out["note"] = src.note
    return out


def _hidden_size(model: onnx.ModelProto) -> int | None:
    """The residual width: the embedding table's last axis (the first Gather of an initializer)."""
    init = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in init and len(init[node.input[0]].dims) == 2:
            return int(init[node.input[0]].dims[1])
    return None
