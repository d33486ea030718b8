"""Small models and a deterministic fake backend for the latency tests (bench, latency, report_html)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
from onnx import numpy_helper

from graphprune.backends import Backend, Session

__all__ = ["conv_chain", "save", "FakeBackend", "CONV_CHAIN_INPUT"]

CONV_CHAIN_INPUT = "x"

_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
conv_chain (float[N, 3, 16, 16] x) => (float[N, 8, 16, 16] y) {
    a = Conv <pads = [1, 1, 1, 1]> (x, w1)
    b = Relu (a)
    c = Conv <pads = [1, 1, 1, 1]> (b, w2)
    d = Relu (c)
    y = Conv <pads = [1, 1, 1, 1]> (d, w3)
}
"""


def conv_chain(width: int = 32, seed: int = 0) -> onnx.ModelProto:
    """x -> Conv(3->W) -> Relu -> Conv(W->W) -> Relu -> Conv(W->8): two prunable groups of W channels."""
    model = onnx.parser.parse_model(_TEXT)
    rng = np.random.default_rng(seed)
    for name, shape in (("w1", (width, 3, 3, 3)), ("w2", (width, width, 3, 3)), ("w3", (8, width, 3, 3))):
        w = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(w, name))
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: "str | os.PathLike") -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, os.fspath(path))
    return os.fspath(path)


class _FakeSession(Session):
    def __init__(self, ms: float):
        self.ms = ms

    def run(self):
        return []

    def time(self, runs: int) -> np.ndarray:
        return np.full(runs, self.ms)


class FakeBackend(Backend):
    """Deterministic latency: `base_ms` + `ms_per_mmac` x MACs (millions); `flat` makes pruning useless."""

    name = "ort-cpu"  # reported as the CPU backend; nothing here runs a model

    def __init__(self, base_ms: float = 0.05, ms_per_mmac: float = 0.1, flat: bool = False):
        super().__init__()
        self.base_ms, self.ms_per_mmac, self.flat = base_ms, ms_per_mmac, flat
        self.loads = 0

    def check(self) -> None:
        pass

    @property
    def label(self) -> str:
        return "fake (MACs-proportional)"

    def load(self, model, feeds) -> Session:
        from graphprune.cost import model_cost
        from graphprune.graph import Model

        self.loads += 1
        if self.flat:
            return _FakeSession(1.0)
        macs = model_cost(Model.load(model)).macs
        return _FakeSession(self.base_ms + self.ms_per_mmac * macs / 1e6)
