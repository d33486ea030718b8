"""Shared helpers for test_cli.py, test_api.py and test_model_io.py.

Small ONNX graphs are built inline with onnx.helper; the resnet_basic CNN comes from
models.export.build_onnx (exported once, cached on disk) and is copied per test where a
test writes beside it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.ort_macs import ort_macs  # the independent MAC count lives in the package; tests use it from here

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # models/ is a top-level package of the repository
    sys.path.insert(0, str(ROOT))

__all__ = [
    "resnet_onnx", "copy_model", "sha256", "listing", "independent_macs", "ort_macs", "float_params", "initializer_shapes",
    "relu_model", "conv_to_output_model", "custom_act_model", "constant_weight_model", "custom_relu_rule",
    "node_weight", "FLOAT_TYPES", "export_getter",
]

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)
OPSET = 17


@pytest.fixture(scope="module")
def resnet_onnx(tmp_path_factory) -> Path:
    """A pristine resnet_basic (torchscript exporter) file; copy it before writing beside it."""
    from models.export import build_onnx

    return Path(build_onnx("resnet_basic", False, tmp_path_factory.mktemp("resnet")))


def copy_model(src: Path, dst_dir: Path, name: str = "model.onnx") -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / name
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o644)
    return dst


def sha256(path: "str | os.PathLike") -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder: Path) -> set[str]:
    """Every file and folder below `folder`, hidden ones included, as relative paths."""
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*")}


# --------------------------------------------------------------------------- independent costs


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
    for t in inferred.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def independent_macs(model: onnx.ModelProto) -> int:
    """Conv and Gemm multiply-accumulates at batch 1, computed from the graph alone."""
    shapes = _shapes(model)
    total = 0
    for n in model.graph.node:
        if n.op_type == "Conv":
            y, w = shapes[n.output[0]], shapes[n.input[1]]
            total += int(np.prod(y[2:])) * y[1] * int(np.prod(w[1:]))
        elif n.op_type == "Gemm":
            a, b = shapes[n.input[0]], shapes[n.input[1]]
            attrs = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
            cols = b[0] if attrs.get("transB", 0) else b[1]
            total += m * k * cols
    return total


def float_params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in FLOAT_TYPES)


def initializer_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def node_weight(model: onnx.ModelProto, node_name: str) -> str:
    """Name of the weight (input 1) of the node called `node_name`."""
    for n in model.graph.node:
        if n.name == node_name:
            return n.input[1]
    raise KeyError(node_name)


# --------------------------------------------------------------------------- small graphs


def _model(nodes, inputs, outputs, initializers=(), value_info=(), extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers),
                              value_info=list(value_info))
    opsets = [helper.make_opsetid("", OPSET), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets)


def _weight(name: str, shape: tuple, seed: int) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def relu_model() -> onnx.ModelProto:
    """x -> Relu -> y: no weight at all."""
    return _model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])])


def conv_to_output_model() -> onnx.ModelProto:
    """One Conv whose output is the graph output: its channels are pinned."""
    return _model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
                  [_weight("w", (8, 4, 3, 3), 0)])


def custom_act_model(*, value_info: bool = True) -> onnx.ModelProto:
    """conv1 (16 ch) -> custom::MyRelu -> conv2 (8 ch, graph output).

    onnxruntime cannot run it; shape inference cannot see through MyRelu, so the
    activation's shape is given as value_info (as exporters do for custom ops).
    """
    vi = [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 16, 8, 8])] if value_info else []
    return _model(
        [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("MyRelu", ["h"], ["a"], name="act", domain="custom"),
         helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [_weight("w1", (16, 4, 3, 3), 1), _weight("w2", (8, 16, 3, 3), 2)],
        value_info=vi, extra_opsets=[("custom", 1)])


def custom_relu_rule(ctx) -> None:
    """An op rule for an elementwise activation: every axis is the identity."""
    x, y = ctx.input(0), ctx.output(0)
    for k in range(len(ctx.shape(x))):
        ctx.tie(x, k, y, k)


def constant_weight_model() -> onnx.ModelProto:
    """conv1's weight comes from a Constant node, its bias from ConstantOfShape(Constant)."""
    w1 = _weight("w1_value", (16, 4, 3, 3), 3)
    return _model(
        [helper.make_node("Constant", [], ["w1"], name="w1_const", value=w1),
         helper.make_node("Constant", [], ["b1_shape"], name="b1_shape_const",
                          value=numpy_helper.from_array(np.array([16], np.int64))),
         helper.make_node("ConstantOfShape", ["b1_shape"], ["b1"], name="b1_fill",
                          value=numpy_helper.from_array(np.array([0.25], np.float32))),
         helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["h"], ["a"], name="act"),
         helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [_weight("w2", (8, 16, 3, 3), 4)])


def export_getter(tmp, build, exporters: dict):
    """`get(name, exporter)`: `build(name, dynamo, tmp)` once per (name, exporter) in a module."""
    cache = {}

    def get(name, exporter):
        if (name, exporter) not in cache:
            cache[(name, exporter)] = build(name, exporters[exporter], str(tmp))
        return cache[(name, exporter)]

    return get
