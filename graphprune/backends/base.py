"""The backend interface: a :class:`Backend` loads a model with its feeds into a :class:`Session` that runs
and times it; names, labels and the fallback order; helpers every backend family shares."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx

from ..errors import BadInputError, GraphpruneError

__all__ = ["BACKENDS", "FP16_BACKENDS", "Backend", "BackendUnavailable", "Session"]


BACKENDS = ("trt", "ort-cuda", "torch-cuda", "ort-cpu")


_FALLBACK = {"auto": BACKENDS, "trt": BACKENDS, "ort-cuda": ("ort-cuda", "torch-cuda", "ort-cpu"),
             "torch-cuda": ("torch-cuda", "ort-cpu"), "ort-cpu": ("ort-cpu",)}


_LABELS = {"trt": "TensorRT", "ort-cuda": "onnxruntime CUDA", "torch-cuda": "PyTorch CUDA",
           "ort-cpu": "onnxruntime CPU"}


FP16_BACKENDS = ("trt", "torch-cuda")


_TWO_GB = 2**31 - 1


class BackendUnavailable(GraphpruneError):
    """The backend cannot run on this machine (package missing, no GPU); the message is one line."""


class Session:
    """One model loaded on a backend with fixed input feeds."""

    def run(self) -> list[np.ndarray]:
        """Run once; the outputs on the host."""
        raise NotImplementedError

    def time(self, runs: int) -> np.ndarray:
        """Latency of `runs` consecutive runs, in milliseconds (one value per run)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class Backend:
    """Where a model runs: `name` is one of :data:`BACKENDS`; `label` says what ran, for humans."""

    name: str = ""

    def __init__(self, *, threads: int = 0, fp16: bool = False, device: int = 0):
        self.threads = int(threads or 0)
        self.fp16 = bool(fp16)
        self.device = int(device)
        self.note = ""  # why earlier backends were skipped, set by select_backend

    def check(self) -> None:
        """Raise :class:`BackendUnavailable` (one-line reason) when this backend cannot run here."""
        raise NotImplementedError

    def load(self, model: "str | os.PathLike | onnx.ModelProto", feeds: dict) -> Session:
        raise NotImplementedError

    @property
    def label(self) -> str:
        return _LABELS[self.name]

    def cache_key(self) -> str:
        """What makes latencies comparable: backend, versions, device, threads, precision."""
        return f"{self.label} {_cpu_name()}".strip()

    def __repr__(self) -> str:
        return f"<backend {self.name}: {self.label}>"


def _model_source(model) -> "tuple[str | bytes, tempfile.TemporaryDirectory | None]":
    """A path or serialized bytes onnxruntime can load; protos over 2 GB go to a temp file."""
    if isinstance(model, onnx.ModelProto):
        from ..model_io import save_model, uses_external_data

        if not uses_external_data(model) and model.ByteSize() < _TWO_GB:
            return model.SerializeToString(), None
        tmp = tempfile.TemporaryDirectory(prefix="graphprune-bench-")
        path = os.path.join(tmp.name, "model.onnx")
        save_model(model, path, external_data=True)
        return path, tmp
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise BadInputError(f"{path}: no such file")
    return path, None


def _load_error(label: str, model, exc: Exception) -> BadInputError:
    name = model if not isinstance(model, onnx.ModelProto) else (model.graph.name or "model")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return BadInputError(f"{label} cannot load {name}: {first[:300]}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


def _gpu_name(device: int) -> str:
    """The GPU's name where PyTorch can tell (latency tables are per device model)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(device)
    except Exception:
        pass
    return ""


def _dist_version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"
