"""Example PyTorch CNNs and their ONNX export (used by tests and benchmarks)."""

from __future__ import annotations

from typing import Any

from models.cnn import CNN_MODELS, INPUT_SHAPES, randomize_batchnorm

__all__ = [
    "CNN_MODELS",
    "INPUT_SHAPES",
    "randomize_batchnorm",
    "build_onnx",
    "cache_dir",
    "export_onnx",
]

_EXPORT_NAMES = {"build_onnx", "cache_dir", "export_onnx"}


def __getattr__(name: str) -> Any:
    # Imported lazily so that ``python -m models.export`` does not import the
    # module twice (runpy warns when a package pre-imports the module it runs).
    if name in _EXPORT_NAMES:
        from models import export

        return getattr(export, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
