"""Every CNN in models/, both PyTorch exporters, several targets: the oracle and friends."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphprune
from graphprune.runtime import run_model, synthetic_inputs
from models.cnn import CNN_MODELS
from models.export import build_onnx

EXPORTERS = {"torchscript": False, "dynamo": True}


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    cache = {}
    tmp = tmp_path_factory.mktemp("cnn")

    def get(name: str, exporter: str) -> str:
        key = (name, exporter)
        if key not in cache:
            cache[key] = build_onnx(name, EXPORTERS[exporter], str(tmp))
        return cache[key]

    return get


@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize("name", list(CNN_MODELS))
@pytest.mark.parametrize("target", [0.7, 0.5])
def test_prune_cnn(onnx_path, name, exporter, target):
    path = onnx_path(name, exporter)
    result = graphprune.prune(path, target_flops=target, round_to=1, verify=True)
    report = result.report
    # the oracle: pruned == original with the removed channels zeroed in their consumers
    assert report["oracle"]["equivalent"], report["oracle"]
    onnx.checker.check_model(result.model, full_check=True)
    assert target - 0.02 <= report["macs_ratio"] <= target + 1e-9
    assert report["macs_after"] < report["macs_before"]
    # dynamic batch stays dynamic
    dim0 = result.model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")
    for batch in (1, 7):
        out = run_model(result.model, synthetic_inputs(result.model, batch=batch))
        assert out[0].shape[0] == batch
        assert np.isfinite(out[0]).all()


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2", "densenet"])
def test_default_round_to_keeps_multiples_of_8(onnx_path, name):
    path = onnx_path(name, "dynamo")
    result = graphprune.prune(path, target_flops=0.5, verify=True)
    assert result.report["oracle"]["equivalent"]
    assert result.report["macs_ratio"] <= 0.5 + 1e-9
    for g in result.report["groups"]:
        if g["channels"] % 8 == 0 and g["channels"] > 8:
            assert g["kept"] % 8 == 0, g
        assert g["kept"] >= max(1, int(np.ceil(0.1 * g["channels"])))


def test_exporters_agree_on_groups(onnx_path):
    """The same network gives the same prunable channels whichever exporter wrote it."""
    for name in ("resnet_basic", "mobilenet_v3", "group_conv"):
        sizes = [sorted(g.size for g in graphprune.analyze(onnx_path(name, e)).groups) for e in EXPORTERS]
        assert sizes[0] == sizes[1], name
