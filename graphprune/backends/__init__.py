"""Latency backends: TensorRT, onnxruntime CUDA, PyTorch CUDA and onnxruntime CPU behind one interface.

A :class:`Backend` turns a model and its input feeds into a :class:`Session` that runs the
model and times single runs (milliseconds). TensorRT, onnxruntime's CUDA provider and the
PyTorch CUDA path are optional and imported lazily: :func:`select_backend` tries the requested
backend and falls back to the next one (TensorRT -> onnxruntime CUDA -> PyTorch CUDA ->
onnxruntime CPU), recording in one line why each skipped backend could not run.

The PyTorch CUDA backend (``torch-cuda``) is for GPU machines without TensorRT or
onnxruntime-gpu: the ONNX graph is converted to a ``torch.fx`` module by ``onnx2torch``,
moved to the GPU (fp32, or fp16 with `fp16=True`), captured as one CUDA graph where the
module allows it (so the timing is the kernels', not Python's launch overhead; eager
otherwise, and the label says which) and timed with CUDA events.

TensorRT engines are built with the TensorRT Python API (explicit batch, one optimisation
profile covering the dynamic axes: min 1 on the batch axis, opt = max = the benchmark shape,
optional fp16) and timed with CUDA events on a dedicated stream; device buffers and events
come from ``torch.cuda`` when PyTorch has CUDA, else from ``cuda-python``.

The package splits by family: base.py (the interface), ort.py, tensorrt.py (+ cuda_runtime.py),
torch_cuda.py (+ onnx2torch_patches.py); this module chooses among them.
"""
from __future__ import annotations

from ..errors import BadInputError
from .base import _FALLBACK, _LABELS, BACKENDS, FP16_BACKENDS, Backend, BackendUnavailable, Session
from .onnx2torch_patches import _for_onnx2torch  # noqa: F401  (graphprune.backends._for_onnx2torch)
from .ort import OrtCpuBackend, OrtCudaBackend
from .tensorrt import TensorRTBackend
from .torch_cuda import TorchCudaBackend, _import_torch_cuda  # noqa: F401

__all__ = ["BACKENDS", "FP16_BACKENDS", "Backend", "BackendUnavailable", "Session", "OrtCpuBackend", "OrtCudaBackend",
           "TensorRTBackend", "TorchCudaBackend", "make_backend", "select_backend", "available_backends"]


_CLASSES = {"trt": TensorRTBackend, "ort-cuda": OrtCudaBackend, "torch-cuda": TorchCudaBackend,
            "ort-cpu": OrtCpuBackend}


def make_backend(name: str, *, threads: int = 0, fp16: bool = False, device: int = 0) -> Backend:
    """The backend called `name` (not checked: see :func:`select_backend`)."""
    if name not in _CLASSES:
        raise BadInputError(f"unknown backend {name!r} (choose from auto, {', '.join(BACKENDS)})")
    return _CLASSES[name](threads=threads, fp16=fp16, device=device)


def select_backend(name: str = "auto", *, threads: int = 0, fp16: bool = False, device: int = 0) -> Backend:
    """The first backend that runs here, starting at `name` (auto = the best: TensorRT first).

    The returned backend's `note` says, in one line, which backends were skipped and why
    (empty when the requested one runs). Raises :class:`BadInputError` when none runs.
    """
    if name is None:
        name = "auto"
    if name not in _FALLBACK:
        raise BadInputError(f"unknown backend {name!r} (choose from auto, {', '.join(BACKENDS)})")
    skipped = []
    for candidate in _FALLBACK[name]:
        backend = make_backend(candidate, threads=threads, fp16=fp16, device=device)
        try:
            backend.check()
        except BackendUnavailable as exc:
            skipped.append(f"{_LABELS[candidate]} unavailable ({exc})")
            continue
        notes = list(skipped)
        if fp16 and candidate not in FP16_BACKENDS:
            notes.append("--fp16 applies to TensorRT and PyTorch CUDA only; onnxruntime runs the model's own "
                         "precision")
        if notes:
            backend.note = "; ".join(notes) + f"; using {_LABELS[candidate]}"
        return backend
    raise BadInputError("no latency backend can run here: " + "; ".join(skipped))


def available_backends() -> dict[str, str]:
    """Each backend name -> "ok" or the one-line reason it cannot run here."""
    out = {}
    for name in BACKENDS:
        try:
            make_backend(name).check()
            out[name] = "ok"
        except BackendUnavailable as exc:
            out[name] = str(exc)
    return out
