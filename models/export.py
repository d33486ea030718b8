"""Export the example CNNs to ONNX with either PyTorch exporter.

``export_onnx`` writes one self-contained ``.onnx`` file (weights inside, no
external ``.data`` file) whose input ``input`` and output ``output`` have a dynamic
batch axis named ``batch``. ``build_onnx`` adds an on-disk cache for tests.

CLI::

    python -m models.export --out DIR [--models a,b] [--exporter torchscript|dynamo|both]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import onnx
import torch
from torch import nn

from models.cnn import CNN_MODELS, INPUT_SHAPES

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "BATCH_DIM",
    "TORCHSCRIPT_OPSET",
    "DYNAMO_OPSET",
    "exporter_name",
    "export_onnx",
    "build_onnx",
    "cache_dir",
    "cached_copy",
    "main",
]

INPUT_NAME = "input"
OUTPUT_NAME = "output"
BATCH_DIM = "batch"
TORCHSCRIPT_OPSET = 17
DYNAMO_OPSET = 18
# Example batch used when tracing with the dynamo exporter: a batch of 1 would be
# specialised (0/1 specialisation) and lose the dynamic axis.
_DYNAMO_EXAMPLE_BATCH = 2
_MAX_BATCH = 1024
_CACHE_ENV = "GRAPHPRUNE_MODEL_CACHE"


def exporter_name(dynamo: bool) -> str:
    """``"dynamo"`` or ``"torchscript"``, as used in file names."""
    return "dynamo" if dynamo else "torchscript"


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Silence exporter prints, warnings and logging; yields the captured text."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _resolve(model: str | nn.Module, input_shape: Sequence[int] | None) -> tuple[nn.Module, tuple[int, ...]]:
    if isinstance(model, str):
        if model not in CNN_MODELS:
            raise KeyError(f"unknown model {model!r}; choose from {', '.join(CNN_MODELS)}")
        shape = tuple(input_shape) if input_shape is not None else INPUT_SHAPES[model]
        return CNN_MODELS[model](), shape
    if input_shape is None:
        raise ValueError("input_shape is required when exporting an nn.Module")
    return model.eval(), tuple(input_shape)


def _name_batch_axis(proto: onnx.ModelProto) -> None:
    """Make axis 0 of the graph input and output a symbolic dim called ``batch``."""
    for vi in (*proto.graph.input, *proto.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = BATCH_DIM


def export_onnx(
    model_name_or_module: str | nn.Module,
    path: str | os.PathLike[str],
    *,
    dynamo: bool,
    input_shape: Sequence[int] | None = None,
    opset: int | None = None,
) -> str:
    """Export a named example model (or any single-input module) to ``path``.

    The file holds all weights (no external data), has input ``input`` and output
    ``output``, and axis 0 of both is dynamic and named ``batch``. A module is put
    in eval mode; ``input_shape`` is required for it. Returns ``path``.
    """
    model, shape = _resolve(model_name_or_module, input_shape)
    path = os.fspath(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    with _quiet() as log, torch.no_grad():
        try:
            if dynamo:
                example = torch.randn((_DYNAMO_EXAMPLE_BATCH, *shape[1:]), generator=gen)
                batch = torch.export.Dim(BATCH_DIM, min=1, max=_MAX_BATCH)
                program = torch.onnx.export(
                    model,
                    (example,),
                    dynamo=True,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    opset_version=opset or DYNAMO_OPSET,
                    dynamic_shapes=({0: batch},),
                    external_data=False,
                    verbose=False,
                )
                assert program is not None
                proto = program.model_proto
            else:
                example = torch.randn(shape, generator=gen)
                buf = io.BytesIO()
                torch.onnx.export(
                    model,
                    (example,),
                    buf,
                    dynamo=False,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    opset_version=opset or TORCHSCRIPT_OPSET,
                    dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
                    do_constant_folding=True,
                    verbose=False,
                )
                proto = onnx.load_from_string(buf.getvalue())
        except Exception as exc:
            raise RuntimeError(
                f"{exporter_name(dynamo)} export failed: {exc}\n--- exporter output ---\n{log.getvalue()}"
            ) from exc
    _name_batch_axis(proto)
    onnx.save_model(proto, path, save_as_external_data=False)
    return path


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Cache directory: ``$GRAPHPRUNE_MODEL_CACHE`` or ``~/.cache/graphprune/models``."""
    env = os.environ.get(_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "graphprune" / "models"


def _source_digest() -> str:
    """Hash of the model/export sources and library versions; stale cache entries miss."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in ("cnn.py", "export.py"):
        h.update((here / name).read_bytes())
    h.update(f"{torch.__version__}|{onnx.__version__}".encode())
    return h.hexdigest()[:16]


def cached_copy(name: str, kind: str, digest: str, export: Callable[[str], object],
                tmpdir: str | os.PathLike[str]) -> str:
    """A private copy, in ``tmpdir``, of ``name`` exported by ``export(path)`` once per
    (name, exporter kind, source digest) into the cache; concurrent writers each export to a
    temp file and ``os.replace`` it into place."""
    cdir = cache_dir()
    cdir.mkdir(parents=True, exist_ok=True)
    cached = cdir / f"{name}.{kind}.{digest}.onnx"
    if not cached.exists():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.{kind}.", suffix=".onnx.tmp", dir=cdir)
        os.close(fd)
        try:
            export(tmp)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
            os.replace(tmp, cached)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    dest = Path(tmpdir) / f"{name}.{kind}.onnx"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, dest)
    return os.fspath(dest)


def build_onnx(name: str, dynamo: bool, tmpdir: str | os.PathLike[str]) -> str:
    """Return a private copy of ``name`` exported with the chosen exporter, in ``tmpdir``
    (exported once per (name, exporter, source version); see :func:`cached_copy`)."""
    return cached_copy(name, exporter_name(dynamo), _source_digest(),
                       lambda path: export_onnx(name, path, dynamo=dynamo), tmpdir)


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m models.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--models", default=",".join(CNN_MODELS), help="comma-separated model names (default: all)"
    )
    parser.add_argument("--exporter", choices=("torchscript", "dynamo", "both"), default="both")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in CNN_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(CNN_MODELS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: writes ``OUT/<name>.<exporter>.onnx``."""
    args = _parse_args(argv)
    kinds = [False, True] if args.exporter == "both" else [args.exporter == "dynamo"]
    for name in args.models:
        for dynamo in kinds:
            path = args.out / f"{name}.{exporter_name(dynamo)}.onnx"
            start = time.perf_counter()
            try:
                export_onnx(name, path, dynamo=dynamo)
            except RuntimeError as exc:
                print(f"error: {name}: {str(exc).splitlines()[0]}", file=sys.stderr)
                return 2
            print(f"{path}  ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
