"""Small inline ONNX models for the calibration / criteria / compensation / fidelity tests."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["mlp", "conv_pair", "bn_model", "wide_conv"]

OPSET = 17


def _model(nodes, inits, x_shape, y_shape, value_info=()):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    graph.value_info.extend(value_info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def mlp(w1: np.ndarray, w2: np.ndarray, relu: bool = False, b2: np.ndarray | None = None) -> onnx.ModelProto:
    """y = act(x @ w1) @ w2 (+ b2): the hidden axis is one prunable group."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1")]
    h = "h"
    if relu:
        nodes.append(helper.make_node("Relu", ["h"], ["a"], name="act"))
        h = "a"
    inits = {"w1": w1, "w2": w2}
    if b2 is None:
        nodes.append(helper.make_node("MatMul", [h, "w2"], ["y"], name="fc2"))
    else:
        nodes += [helper.make_node("MatMul", [h, "w2"], ["z"], name="fc2"),
                  helper.make_node("Add", ["z", "b2"], ["y"], name="bias2")]
        inits["b2"] = b2
    return _model(nodes, inits, ["N", w1.shape[0]], ["N", w2.shape[1]])


def conv_pair(w1: np.ndarray, w2: np.ndarray, size: int = 8, relu: bool = False) -> onnx.ModelProto:
    """y = conv2(act(conv1(x))), 3x3 kernels with padding 1, no biases."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1])]
    h = "h"
    if relu:
        nodes.append(helper.make_node("Relu", ["h"], ["a"], name="act"))
        h = "a"
    nodes.append(helper.make_node("Conv", [h, "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]))
    return _model(nodes, {"w1": w1, "w2": w2}, ["N", w1.shape[1], size, size], ["N", w2.shape[0], size, size])


def bn_model(w1: np.ndarray, gamma: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """conv1 (1x1) -> BatchNormalization(gamma) -> Relu -> conv2 (1x1)."""
    c = w1.shape[0]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1"),
             helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["b"], name="bn"),
             helper.make_node("Relu", ["b"], ["a"], name="act"),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2")]
    inits = {"w1": w1, "gamma": gamma, "beta": np.linspace(0.1, 0.2, c), "mean": np.zeros(c), "var": np.ones(c),
             "w2": w2}
    return _model(nodes, inits, ["N", w1.shape[1], 4, 4], ["N", w2.shape[0], 4, 4])


def wide_conv(channels: int = 16, size: int = 64, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((channels, 4, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((4, channels, 3, 3)).astype(np.float32)
    return conv_pair(w1, w2, size=size, relu=True)
