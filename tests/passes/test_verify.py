"""The oracle's float32 noise floor explains ill-conditioned graphs but never hides a wrong rewrite."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

import graphprune
from graphprune.verify import check_mask_equivalence

from test_allocate import _one_group_model


def _check(result, pruned: onnx.ModelProto) -> dict:
    ctx = result.context
    return check_mask_equivalence(ctx.original, pruned, ctx.dependency, ctx.plan, ctx.groups)


def test_exact_rewrite_needs_no_noise_floor():
    result = graphprune.prune(_one_group_model(), 0.5, round_to=8)
    oracle = _check(result, result.model)
    assert oracle["equivalent"]
    assert all("noise_floor" not in v for k, v in oracle.items() if k.startswith("batch"))


def test_wrong_rewrite_fails_despite_the_noise_floor():
    result = graphprune.prune(_one_group_model(), 0.5, round_to=8)
    broken = onnx.ModelProto()
    broken.CopyFrom(result.model)
    w = next(t for t in broken.graph.initializer if t.name == "w2")
    arr = numpy_helper.to_array(w).copy()
    arr[0, 0] += 1e-2  # a small error: far above float32 noise, which is ~0 on this graph
    w.CopyFrom(numpy_helper.from_array(arr, "w2"))
    oracle = _check(result, broken)
    assert not oracle["equivalent"]
    for k, v in oracle.items():
        if k.startswith("batch"):
            assert v["max_rel"] > 1e-4 and v["within_noise"] is False
            assert np.isfinite(v["noise_floor"]) and v["noise_floor"] < 1e-5


def _fixed_seq_model():
    """[N, S, 4] -> MatMul 4x16 -> Relu -> MatMul 16x4 -> Reshape [-1, 28]: the declared S is
    dynamic, but the graph only runs at S = 7 (like a TorchScript export with the traced length
    baked into a reshape)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([-1, 28], np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["m"]), helper.make_node("Reshape", ["m", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 28])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_verify_names_an_original_that_does_not_run(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "fixed_seq.onnx"
    onnx.save(_fixed_seq_model(), path)
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "graphprune", str(path), "--target-flops", "0.5", "--round-to", "1",
                           "--verify", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and "original model itself does not run" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    # without --verify the same prune succeeds
    proc = subprocess.run([sys.executable, "-m", "graphprune", str(path), "--target-flops", "0.5", "--round-to", "1",
                           "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
