"""The in-memory model: an onnx-graphsurgeon graph plus what must survive a rewrite."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import BadInputError
from .model_io import ModelMeta, load_model

__all__ = ["Model", "Shape"]

logging.getLogger("ONNX_GRAPHSURGEON").setLevel(logging.ERROR)
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

Shape = tuple  # of int (static) or str / None (symbolic or unknown)


@dataclass
class Model:
    """An ONNX model being compiled: the graphsurgeon graph and the input's metadata."""

    graph: gs.Graph
    meta: ModelMeta

    @classmethod
    def load(cls, source) -> "Model":
        proto, meta = load_model(source)
        return cls.from_proto(proto, meta)

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, meta: ModelMeta | None = None) -> "Model":
        meta = meta or ModelMeta.of(proto)
        proto = infer_shapes(proto)
        try:
            graph = gs.import_onnx(proto)
        except Exception as exc:
            raise BadInputError(f"cannot read the graph: {exc}") from None
        return cls(graph, meta)

    def to_proto(self, *, infer: bool = True) -> onnx.ModelProto:
        graph = self.graph.copy() if False else self.graph
        proto = gs.export_onnx(graph, do_type_check=False)
        self.meta.apply(proto)
        if infer:
            proto = infer_shapes(proto)
        return proto

    def copy(self) -> "Model":
        return Model.from_proto(self.to_proto(infer=False), self.meta)

    def tensors(self) -> dict:
        return self.graph.tensors()

    @property
    def opset(self) -> int:
        return self.meta.default_opset


def infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference with data propagation; falls back to no inference on failure."""
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        try:
            return onnx.shape_inference.infer_shapes(proto)
        except Exception:
            return proto


def tensor_shape(t: gs.Tensor) -> Shape | None:
    """Static dims as ints, symbolic dims as str, unknown dims as None; None if rank unknown."""
    if isinstance(t, gs.Constant):
        return tuple(int(d) for d in t.shape)
    if t.shape is None:
        return None
    return tuple(d if isinstance(d, (str, type(None))) else int(d) for d in t.shape)


def const_values(t: gs.Tensor) -> np.ndarray | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    return None
