"""Where latency tables are cached, and the keys that make a cached table valid (format version, model hash)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx

__all__ = ["latency_cache_dir", "model_digest", "LUT_VERSION"]


LUT_VERSION = 2


_CACHE_ENV = "GRAPHPRUNE_LATENCY_CACHE"


def latency_cache_dir() -> Path:
    """``$GRAPHPRUNE_LATENCY_CACHE`` or ``~/.cache/graphprune/latency``."""
    env = os.environ.get(_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "graphprune" / "latency"


def model_digest(model) -> str:
    """sha256 of the model file (or of the serialized proto)."""
    h = hashlib.sha256()
    if isinstance(model, onnx.ModelProto):
        h.update(model.SerializeToString())
    else:
        with open(os.fspath(model), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
