"""Calibration data: feeds for a model from .npz/.npy files, image folders, Python iterables,
or synthetic (data-free) inputs, split into calibration and held-out batches.

A *sample* is one index along axis 0 (the batch axis) of every graph input. Samples are
re-batched to `batch_size` for onnxruntime; an iterable of feed dicts keeps its own
batches (so token sequences of different lengths need no padding).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx

from .errors import BadInputError

__all__ = ["CalibrationData", "Preprocess", "load_calibration", "synthetic_calibration", "parse_preprocess", "context_calibration",
           "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")

_PRESETS = {
    # torchvision / timm ImageNet models (and EfficientNet-Lite in efficientnet_lite_pytorch)
    "imagenet": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "scale": 1 / 255},
    # TF/Keras "inception" style: pixels to [-1, 1]
    "inception": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "scale": 1 / 255},
    # raw 0..255 floats
    "raw": {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "scale": 1.0},
}


@dataclass
class Preprocess:
    """How an image file becomes an input tensor.

    The shorter side is resized to `resize` (default size / 0.875, as ImageNet evaluation
    does), the centre `size` x `size` crop taken, pixels multiplied by `scale` (1/255 by
    default), then ``(x - mean) / std`` per channel, laid out as `layout` (NCHW or NHWC).
    Unset `size`/`layout` come from the model's input shape.
    """

    size: int | None = None
    resize: int | None = None
    mean: tuple = _PRESETS["imagenet"]["mean"]
    std: tuple = _PRESETS["imagenet"]["std"]
    scale: float = 1 / 255
    layout: str | None = None   # "NCHW" or "NHWC"
    channels: int = 3

    def to_dict(self) -> dict:
        return {"size": self.size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std),
                "scale": self.scale, "layout": self.layout}


def parse_preprocess(spec: "str | list[str] | dict | Preprocess | None") -> Preprocess:
    """``"imagenet size=224 layout=nchw"``-style specs: a preset name and/or key=value pairs.

    Keys: size, resize, mean (comma list), std (comma list), scale, layout. Presets:
    imagenet (default), inception ([-1, 1]), raw (0..255).
    """
    if isinstance(spec, Preprocess):
        return spec
    if spec is None:
        return Preprocess()
    if isinstance(spec, dict):
        items = [f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in spec.items()]
    elif isinstance(spec, str):
        items = spec.replace(";", " ").split()
    else:
        items = [s for part in spec for s in str(part).replace(";", " ").split()]
    pre = Preprocess()
    for item in items:
        if "=" not in item:
            preset = _PRESETS.get(item.lower())
            if preset is None:
                raise BadInputError(f"--calib-preprocess: unknown preset {item!r} (choose from "
                                    f"{', '.join(_PRESETS)}, or give key=value pairs)")
            pre.mean, pre.std, pre.scale = preset["mean"], preset["std"], preset["scale"]
            continue
        key, value = item.split("=", 1)
        key = key.strip().lower()
        try:
            if key in ("size", "resize"):
                setattr(pre, key, int(value))
            elif key in ("mean", "std"):
                vals = tuple(float(v) for v in value.split(",") if v)
                setattr(pre, key, vals if len(vals) > 1 else vals * 3)
            elif key == "scale":
                pre.scale = float(value)
            elif key == "layout":
                if value.upper() not in ("NCHW", "NHWC"):
                    raise ValueError
                pre.layout = value.upper()
            else:
                raise BadInputError(f"--calib-preprocess: unknown key {key!r} (size, resize, mean, std, scale, "
                                    "layout)")
        except ValueError:
            raise BadInputError(f"--calib-preprocess: bad value in {item!r}") from None
    if any(s == 0 for s in pre.std):
        raise BadInputError("--calib-preprocess: std must be non-zero")
    return pre


@dataclass
class CalibrationData:
    """Calibration batches and held-out batches (lists of feed dicts) for one model."""

    calib: list                      # [ {input name: array} ]
    heldout: list
    synthetic: bool = False
    source: str = ""
    notes: list = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(_batch_len(b) for b in self.calib)

    @property
    def heldout_samples(self) -> int:
        return sum(_batch_len(b) for b in self.heldout)

    def batches(self) -> Iterator[dict]:
        return iter(self.calib)

    def describe(self) -> dict:
        return {"source": self.source, "synthetic": self.synthetic, "samples": self.samples,
                "heldout_samples": self.heldout_samples, "notes": list(self.notes)}


def _batch_len(feeds: dict) -> int:
    for v in feeds.values():
        return int(np.shape(v)[0]) if np.ndim(v) else 1
    return 0


# --------------------------------------------------------------------------- model inputs


@dataclass
class _Input:
    name: str
    dtype: np.dtype
    shape: list          # ints, or None for dynamic


_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
       onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_,
       onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8}


def model_inputs(model: onnx.ModelProto) -> list[_Input]:
    init = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        out.append(_Input(vi.name, np.dtype(_NP.get(tt.elem_type, np.float32)), shape))
    return out


def _index_ranges(model: onnx.ModelProto) -> dict[str, int]:
    """For integer inputs used as Gather indices into a constant table: the table's rows."""
    init = {t.name: t for t in model.graph.initializer}
    consts = dict(init)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = a.t
    # follow cheap elementwise/cast hops from the input to a Gather
    producers_of = {}
    for node in model.graph.node:
        for i in node.input:
            producers_of.setdefault(i, []).append(node)
    out = {}
    for inp in model_inputs(model):
        if not np.issubdtype(inp.dtype, np.integer):
            continue
        frontier, seen = [inp.name], set()
        while frontier:
            name = frontier.pop()
            if name in seen:
                continue
            seen.add(name)
            for node in producers_of.get(name, []):
                if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name \
                        and node.input[0] in consts:
                    rows = int(consts[node.input[0]].dims[0])
                    out[inp.name] = min(out.get(inp.name, rows), rows)
                elif node.op_type in ("Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape"):
                    frontier.extend(node.output)
    return out


def synthetic_calibration(model: onnx.ModelProto, samples: int = 32, heldout: int = 16, *, batch_size: int = 8,
                          seq: int = 16, seed: int = 0) -> CalibrationData:
    """Data-free batches: float inputs standard normal, integer indices into an embedding table
    uniform over its rows, other integer inputs (masks) ones."""
    inputs = model_inputs(model)
    ranges = _index_ranges(model)

    def make(n: int, rng) -> list[dict]:
        out = []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            feeds = {}
            for inp in inputs:
                dims = [d if d is not None else (b if k == 0 else seq) for k, d in enumerate(inp.shape)]
                if inp.shape and inp.shape[0] is not None and inp.shape[0] != b:
                    dims[0] = inp.shape[0]
                if np.issubdtype(inp.dtype, np.floating):
                    feeds[inp.name] = rng.standard_normal(dims).astype(inp.dtype)
                elif inp.dtype == np.bool_:
                    feeds[inp.name] = np.ones(dims, dtype=bool)
                elif inp.name in ranges:
                    feeds[inp.name] = rng.integers(0, ranges[inp.name], size=dims).astype(inp.dtype)
                else:
                    feeds[inp.name] = np.ones(dims, dtype=inp.dtype)
            out.append(feeds)
        return out

    return CalibrationData(make(samples, np.random.default_rng(seed + 7919)),
                           make(heldout, np.random.default_rng(seed + 104729)), synthetic=True,
                           source="synthetic (data-free)")


# --------------------------------------------------------------------------- loading


def _check_feeds(feeds: dict, inputs: list[_Input], where: str) -> dict:
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise BadInputError(f"{where}: no data for model input {missing[0]!r} (inputs: {', '.join(names)})")
    out = {}
    for inp in inputs:
        a = np.asarray(feeds[inp.name])
        if a.ndim != len(inp.shape):
            raise BadInputError(f"{where}: input {inp.name!r} has rank {a.ndim}, the model expects {len(inp.shape)}")
        for k, (d, want) in enumerate(zip(a.shape, inp.shape)):
            if want is not None and d != want and k > 0:
                raise BadInputError(f"{where}: input {inp.name!r} has shape {list(a.shape)}, the model expects "
                                    f"{['?' if x is None else x for x in inp.shape]}")
        out[inp.name] = a.astype(inp.dtype, copy=False)
    return out


def _arrays_from_file(path: Path, inputs: list[_Input]) -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise BadInputError(f"--calib {path}: cannot read ({type(exc).__name__}: {exc})") from None
    if isinstance(data, np.ndarray):
        if len(inputs) != 1:
            raise BadInputError(f"--calib {path}: a .npy holds one array but the model has {len(inputs)} inputs; "
                                f"use a .npz with arrays named {', '.join(i.name for i in inputs)}")
        return {inputs[0].name: data}
    with data:
        arrays = {k: data[k] for k in data.files}
    if len(inputs) == 1 and len(arrays) == 1:
        return {inputs[0].name: next(iter(arrays.values()))}
    return arrays


def _load_image(path: Path, pre: Preprocess, size: int, channels: int) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise BadInputError("--calib with an image folder needs Pillow: pip install pillow") from None
    with Image.open(path) as im:
        im = im.convert("RGB" if channels == 3 else "L")
        resize = pre.resize or int(round(size / 0.875))
        w, h = im.size
        s = resize / min(w, h)
        im = im.resize((max(size, int(round(w * s))), max(size, int(round(h * s)))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        a = np.asarray(im, dtype=np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    mean = np.asarray(pre.mean[:channels], np.float32)
    std = np.asarray(pre.std[:channels], np.float32)
    return (a * np.float32(pre.scale) - mean) / std   # HWC


def _arrays_from_images(folder: Path, inputs: list[_Input], pre: Preprocess, limit: int) -> dict[str, np.ndarray]:
    if len(inputs) != 1:
        raise BadInputError(f"--calib {folder}: an image folder feeds one input, the model has {len(inputs)}")
    inp = inputs[0]
    if len(inp.shape) != 4:
        raise BadInputError(f"--calib {folder}: images need a 4-D input, {inp.name!r} has rank {len(inp.shape)}")
    layout = pre.layout
    if layout is None:
        layout = "NHWC" if inp.shape[3] in (1, 3) and inp.shape[1] not in (1, 3) else "NCHW"
    c_axis, h_axis = (1, 2) if layout == "NCHW" else (3, 1)
    channels = inp.shape[c_axis] or pre.channels
    size = pre.size or inp.shape[h_axis] or 224
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise BadInputError(f"--calib {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    imgs = []
    for p in files[:limit]:
        try:
            imgs.append(_load_image(p, pre, size, channels))
        except BadInputError:
            raise
        except Exception as exc:
            raise BadInputError(f"--calib: cannot read image {p}: {exc}") from None
    batch = np.stack(imgs)
    if layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    return {inp.name: np.ascontiguousarray(batch, dtype=inp.dtype)}


def _rebatch(arrays: dict[str, np.ndarray], start: int, stop: int, batch_size: int) -> list[dict]:
    out = []
    for s in range(start, stop, batch_size):
        e = min(stop, s + batch_size)
        out.append({k: np.ascontiguousarray(v[s:e]) for k, v in arrays.items()})
    return out


def _split(total: int, samples: int, heldout: int | None) -> tuple[int, int, str | None]:
    """(calibration count, held-out count, note)."""
    if total > samples:
        return samples, min(total - samples, heldout if heldout is not None else 64), None
    if heldout == 0:
        return total, 0, None
    if total >= 5:
        h = max(1, total // 5) if heldout is None else min(heldout, total - 1)
        return total - h, h, f"only {total} samples: {h} held out for the fidelity report"
    return total, 0, f"only {total} samples: fidelity measured on the calibration samples themselves"


def load_calibration(source, model: onnx.ModelProto, *, samples: int = 128, heldout: int | None = None,
                     preprocess=None, batch_size: int = 8, seed: int = 0) -> CalibrationData:
    """Calibration data for `model` from `source`.

    `source`: a path to a .npz (one array per graph input, keyed by input name; a single array
    for a single-input model), a .npy (single-input models), or a folder of images (see
    :class:`Preprocess`); an array (single-input models) or a dict of arrays, samples on axis
    0; or a Python iterable of feed dicts ``{input name: array}``, of
    arrays (single-input models) or of tuples of arrays (in input order); or a
    :class:`CalibrationData`. The first `samples` samples calibrate; up to `heldout` of the
    following ones (64 by default) are held out for the fidelity report.
    """
    if isinstance(source, CalibrationData):
        return source
    if samples is None or int(samples) < 1:
        raise BadInputError(f"calib_samples must be >= 1, got {samples}")
    samples = int(samples)
    inputs = model_inputs(model)
    if source is None:
        return synthetic_calibration(model, samples=min(samples, 32), heldout=16 if heldout is None else heldout,
                                     batch_size=batch_size, seed=seed)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise BadInputError(f"--calib {path}: no such file or folder")
        pre = parse_preprocess(preprocess)
        if path.is_dir():
            cap = samples + (64 if heldout is None else heldout)
            arrays = _arrays_from_images(path, inputs, pre, cap)
            desc = f"{path} (images, {pre.to_dict()})"
        elif path.suffix.lower() in (".npz", ".npy"):
            arrays = _arrays_from_file(path, inputs)
            desc = str(path)
        else:
            raise BadInputError(f"--calib {path}: expected a .npz, a .npy or a folder of images")
        return _from_arrays(arrays, inputs, samples, heldout, batch_size, desc, f"--calib {path}")
    if isinstance(source, np.ndarray):
        if len(inputs) != 1:
            raise BadInputError(f"calib: an array feeds a single-input model; give a dict keyed by "
                                f"{', '.join(i.name for i in inputs)}")
        return _from_arrays({inputs[0].name: source}, inputs, samples, heldout, batch_size, "array", "calib")
    if isinstance(source, dict):
        return _from_arrays(dict(source), inputs, samples, heldout, batch_size, "arrays", "calib")
    return _from_iterable(source, inputs, samples, heldout)


def _from_arrays(arrays: dict, inputs: list[_Input], samples: int, heldout: int | None, batch_size: int,
                 desc: str, where: str) -> CalibrationData:
    """Arrays with the samples on axis 0, one per input: calibration first, held-out after."""
    arrays = _check_feeds(arrays, inputs, where)
    lens = {int(v.shape[0]) if v.ndim else 1 for v in arrays.values()}
    if len(lens) != 1:
        raise BadInputError(f"{where}: the arrays disagree on the number of samples (axis 0): {sorted(lens)}")
    total = lens.pop()
    n_cal, n_held, note = _split(total, samples, heldout)
    calib = _rebatch(arrays, 0, n_cal, batch_size)
    held = _rebatch(arrays, n_cal, n_cal + n_held, batch_size) if n_held else []
    data = CalibrationData(calib, held or list(calib), source=desc)
    if note:
        data.notes.append(note)
    return data


def _from_iterable(source: Iterable, inputs: list[_Input], samples: int, heldout: int | None) -> CalibrationData:
    try:
        it = iter(source)
    except TypeError:
        raise BadInputError(f"calib must be a path, an iterable of feed dicts/arrays, or CalibrationData; "
                            f"got {type(source).__name__}") from None
    names = [i.name for i in inputs]
    want_held = 64 if heldout is None else heldout
    batches, count = [], 0
    for k, item in enumerate(it):
        if isinstance(item, dict):
            feeds = item
        elif isinstance(item, (tuple, list)):
            feeds = dict(zip(names, item))
        else:
            if len(inputs) != 1:
                raise BadInputError(f"calib item {k}: an array feeds a single-input model; give dicts keyed by "
                                    f"{', '.join(names)}")
            feeds = {names[0]: item}
        feeds = _check_feeds(feeds, inputs, f"calib item {k}")
        batches.append(feeds)
        count += _batch_len(feeds)
        if count >= samples + want_held:
            break
    if not batches:
        raise BadInputError("calib: the iterable gave no data")
    # split whole batches: calibration first, then held-out
    calib, held, n = [], [], 0
    for b in batches:
        (calib if n < samples else held).append(b)
        n += _batch_len(b)
    data = CalibrationData(calib, held, source=f"iterable ({len(batches)} batches)")
    if not held and heldout != 0:
        if len(calib) >= 2:
            cut = max(1, len(calib) // 5)
            data.calib, data.heldout = calib[:-cut], calib[-cut:]
            data.notes.append(f"only {count} samples: the last {cut} batches held out for the fidelity report")
        else:
            data.heldout = list(calib)
            data.notes.append("one batch only: fidelity measured on the calibration samples themselves")
    return data


def context_calibration(ctx, *, data_free: bool = False, purpose: str = "") -> CalibrationData:
    """The run's calibration data (``ctx.options["calibration"]``), or synthetic data when none was
    given or `data_free` is asked; a warning says when synthetic data stands in for real data."""
    data = ctx.options.get("calibration")
    if data is not None and not data_free:
        return data
    cached = ctx.options.get("_synthetic_calibration")
    if cached is None:
        proto = ctx.original.to_proto(infer=False) if ctx.original is not None else ctx.model.to_proto()
        cached = synthetic_calibration(proto, samples=32,
                                       seed=int(ctx.options.get("seed", 0) or 0))
        ctx.options["_synthetic_calibration"] = cached
    if not data_free and purpose:
        warnings = ctx.report.setdefault("warnings", [])
        msg = f"{purpose} without --calib: statistics from synthetic inputs (data-free); give --calib for real data"
        if msg not in warnings:
            warnings.append(msg)
    return cached
