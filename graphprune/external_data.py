"""External data: validated on load, read memory-mapped, new weights spilled to scratch files.

In memory, every external tensor names its data file by absolute path (resolved and checked
once, on load, against the model's folder), so a tensor can be read wherever the graph
travels: weights stay in their files and are mapped (numpy memmap) only while a pass reads
them. Weights a rewrite produces for a big model go to a scratch file the same way
(:func:`spill`), so a pruned model of any size is a small graph plus references.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

from .errors import BadInputError

__all__ = ["BIG_MODEL_ENV", "set_location", "BIG_MODEL_BYTES", "big_model_bytes", "weight_bytes", "is_big", "expected_bytes",
           "resolve_external_data", "external_info", "read_array", "read_bytes", "inline", "spill",
           "uses_external_data", "all_tensors", "ALIGN"]

TWO_GB = 2**31
BIG_MODEL_ENV = "GRAPHPRUNE_BIG_MODEL_BYTES"
BIG_MODEL_BYTES = TWO_GB  # models with this many bytes of weights or more take the streamed paths
ALIGN = 4096  # offsets of tensors written to data files (page-aligned: onnxruntime can map them)

_PACKED_4BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def big_model_bytes() -> int:
    """The "big model" threshold: $GRAPHPRUNE_BIG_MODEL_BYTES if set, else :data:`BIG_MODEL_BYTES`
    (tests lower either to run the streamed code paths on small models)."""
    env = os.environ.get(BIG_MODEL_ENV, "").strip()
    if env:
        try:
            return int(float(env))
        except ValueError:
            raise BadInputError(f"{BIG_MODEL_ENV}={env!r} is not a number of bytes") from None
    return int(BIG_MODEL_BYTES)


def all_tensors(model: onnx.ModelProto):
    return external_data_helper._get_all_tensors(model)


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(external_data_helper.uses_external_data(t) for t in all_tensors(model))


def external_info(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    """(location, offset, length or None) of an external tensor, as written in the proto."""
    info = {e.key: e.value for e in tensor.external_data}
    try:
        offset = int(info.get("offset") or 0)
        length = int(info["length"]) if info.get("length") not in (None, "") else None
    except ValueError:
        raise BadInputError(f"tensor {tensor.name!r}: external data offset/length is not a number") from None
    return info.get("location", ""), offset, length


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data (inline and external) the model holds."""
    total = 0
    for t in all_tensors(model):
        if external_data_helper.uses_external_data(t):
            loc, offset, length = external_info(t)
            total += length if length is not None else (expected_bytes(t) or 0)
        else:
            total += len(t.raw_data) or (expected_bytes(t) or 0)
    return total


def is_big(model: onnx.ModelProto) -> bool:
    return weight_bytes(model) >= big_model_bytes()


def expected_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of raw data the tensor's type and shape need (None for strings / unknown types)."""
    n = int(np.prod([int(d) for d in tensor.dims], dtype=np.int64)) if tensor.dims else 1
    if tensor.data_type in _PACKED_4BIT:
        return (n + 1) // 2
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:
        return None


def set_location(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = tensor.external_data.add()
        e.key, e.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")


def _check_one(tensor: onnx.TensorProto, base: Path, where: str, trusted: bool) -> tuple[Path, int, int]:
    name = tensor.name or "(unnamed)"
    loc, offset, length = external_info(tensor)
    what = f"{where}: external data of tensor {name!r}"
    if not loc:
        raise BadInputError(f"{what} has no location")
    p = Path(loc)
    if p.is_absolute() and not trusted:
        raise BadInputError(f"{what}: location {loc} is absolute (it must be relative to the model's folder)")
    target = p if p.is_absolute() else base / p
    if not trusted:
        if os.path.islink(target):
            raise BadInputError(f"{what}: {loc} is a symbolic link (refused: it could point anywhere)")
        real = Path(os.path.realpath(target))
        root = Path(os.path.realpath(base))
        if real != root and root not in real.parents:
            raise BadInputError(f"{what}: {loc} is outside the model's folder")
    else:
        real = Path(os.path.realpath(target))
    if not real.exists():
        raise BadInputError(f"{what}: file {loc} is missing")
    if real.is_dir():
        raise BadInputError(f"{what}: {loc} is a directory, not a data file")
    if not real.is_file():
        raise BadInputError(f"{what}: {loc} is not a regular file")
    size = real.stat().st_size
    if offset < 0 or (length is not None and length < 0):
        raise BadInputError(f"{what}: negative offset or length")
    if offset > size:
        raise BadInputError(f"{what}: offset {offset} is past the end of {loc} ({size} bytes)")
    need = expected_bytes(tensor)
    if length is None:
        length = need if need is not None else size - offset
    if need is not None and length != need:
        raise BadInputError(f"{what}: {length} bytes given, its type and shape {list(tensor.dims)} need {need}")
    if offset + length > size:
        raise BadInputError(f"{what}: {loc} is too short ({size} bytes, the tensor needs bytes "
                            f"{offset}..{offset + length}); is the file truncated?")
    return real, offset, length


def resolve_external_data(model: onnx.ModelProto, base_dir: "str | os.PathLike", where: str, *,
                          trusted: bool = False) -> None:
    """Check every tensor's data (in place), before anything is written: external data must be a
    regular file inside the model's folder (no symlink, no escape), long enough for the tensor's
    type and shape; inline raw data must have that length. Each external graph initializer gets
    the absolute path of its file; external tensors elsewhere (Constant node values, subgraphs)
    are read in, relative to the model's folder. `trusted` (an in-memory ModelProto) allows
    absolute locations. Raises BadInputError (one line) on the first problem."""
    base = Path(base_dir)
    for t, top in _tensors_with_place(model.graph, True):
        if external_data_helper.uses_external_data(t):
            real, offset, length = _check_one(t, base, where, trusted)
            set_location(t, str(real), offset, length)
            if not top:
                inline(t)
        elif t.HasField("raw_data"):
            need = expected_bytes(t)
            if need is not None and len(t.raw_data) != need:
                raise BadInputError(f"{where}: tensor {t.name or '(unnamed)'!r} has {len(t.raw_data)} bytes of raw "
                                    f"data, its type and shape {list(t.dims)} need {need}")


def _tensors_with_place(graph: onnx.GraphProto, top: bool):
    """(tensor, is a main-graph initializer) for every tensor of `graph` and its subgraphs."""
    for t in graph.initializer:
        yield t, top
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t, False
            yield from ((t, False) for t in attr.tensors)
            if attr.HasField("g"):
                yield from _tensors_with_place(attr.g, False)
            for g in attr.graphs:
                yield from _tensors_with_place(g, False)


def read_bytes(tensor: onnx.TensorProto) -> bytes:
    loc, offset, length = external_info(tensor)
    with open(loc, "rb") as f:
        f.seek(offset)
        data = f.read(length if length is not None else -1)
    if length is not None and len(data) != length:
        raise BadInputError(f"external data of tensor {tensor.name!r}: {loc} is shorter than when it was opened")
    return data


def inline(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """Read an external tensor's bytes into the proto (in place)."""
    if external_data_helper.uses_external_data(tensor):
        data = read_bytes(tensor)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = data
    return tensor


def read_array(tensor: onnx.TensorProto) -> np.ndarray:
    """An external tensor's values, memory-mapped read-only where numpy has the type (the pages
    are read when used and released when the array is dropped), else read in."""
    loc, offset, length = external_info(tensor)
    shape = tuple(int(d) for d in tensor.dims)
    np_type = None
    if tensor.data_type not in _PACKED_4BIT:
        try:
            np_type = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        except Exception:
            np_type = None
    if np_type is not None and np_type.kind in "biufc" and np_type.byteorder in "=<|" and length:
        return np.memmap(loc, dtype=np_type, mode="r", offset=offset, shape=shape)
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    inline(copy)
    return np.array(onnx.numpy_helper.to_array(copy))


class _Scratch:
    """A process-wide scratch folder for spilled weights, removed at exit."""

    def __init__(self) -> None:
        self.dir: Path | None = None
        self.count = 0

    def file(self) -> Path:
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="graphprune-weights-"))
            atexit.register(shutil.rmtree, self.dir, True)
        self.count += 1
        return self.dir / f"w{self.count}.bin"


_SCRATCH = _Scratch()


def spill(name: str, array: np.ndarray) -> onnx.TensorProto:
    """Write `array` to a scratch file; return an external TensorProto (absolute location) for it."""
    array = np.ascontiguousarray(array)
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(int(d) for d in array.shape)
    path = _SCRATCH.file()
    try:
        with open(path, "wb") as f:
            f.write(array.reshape(-1).view(np.uint8).data if array.size else b"")
    except OSError as exc:
        raise BadInputError(f"cannot write scratch weights to {path.parent}: {exc.strerror or exc} "
                            f"(set TMPDIR to a folder with space)") from None
    set_location(tensor, str(path), 0, array.nbytes)
    return tensor
