"""Write a small residual CNN (onnx + numpy only) for the wheel check: python wheel_smoke_model.py OUT.onnx."""
from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)

    inits = [w("c1.w", 16, 3, 3, 3), w("c1.b", 16), w("c2.w", 32, 16, 3, 3), w("c2.b", 32), w("c3.w", 16, 32, 1, 1),
             w("c3.b", 16), w("fc.w", 10, 16), w("fc.b", 10)]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a1"]),
        helper.make_node("Conv", ["a1", "c2.w", "c2.b"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["b1"]),
        helper.make_node("Conv", ["b1", "c3.w", "c3.b"], ["c"]),
        helper.make_node("Add", ["c", "a1"], ["d"]),
        helper.make_node("GlobalAveragePool", ["d"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "smoke", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


if __name__ == "__main__":
    onnx.save(build(), sys.argv[1])
