"""Loading and saving ONNX models: lazy external data, atomic writes, IR version kept."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import external_data_helper

from .errors import BadInputError
from .external_data import (ALIGN, set_location, TWO_GB, all_tensors, expected_bytes, external_info, inline, is_big,
                            read_array, resolve_external_data, uses_external_data, weight_bytes)

__all__ = ["ModelMeta", "list_initializers_as_inputs", "load_model", "restore_io_symbols", "save_model",
           "materialize", "uses_external_data", "without_weights", "check_model", "session_payload", "release_run_copies", "weight_bytes",
           "SUPPORTED_OPSETS", "TWO_GB"]

_LIGHT_BYTES = 4096
SUPPORTED_OPSETS = range(7, 26)


@dataclass
class ModelMeta:
    """What must survive a rewrite unchanged: IR version, opsets, producer, metadata."""

    ir_version: int
    opset_imports: list = field(default_factory=list)
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata_props: list = field(default_factory=list)
    functions: list = field(default_factory=list)
    had_external_data: bool = False
    base_dir: str = ""  # the model's folder (external data locations are absolute in memory)
    big: bool = False  # weights of big_model_bytes() or more: streamed code paths
    initializer_inputs: list = field(default_factory=list)  # graph inputs backed by an initializer
    input_order: list = field(default_factory=list)  # every graph input's name, as the input lists them
    dim_params: dict = field(default_factory=dict)  # io symbols renamed on load (new -> original name)
    warnings: list = field(default_factory=list)  # what onnx.checker says about the input (wellformed.py)

    @classmethod
    def of(cls, model: onnx.ModelProto, had_external_data: bool = False, base_dir: str = "") -> "ModelMeta":
        return cls(
            ir_version=model.ir_version,
            opset_imports=[onnx.helper.make_opsetid(o.domain, o.version) for o in model.opset_import],
            producer_name=model.producer_name,
            producer_version=model.producer_version,
            domain=model.domain,
            model_version=model.model_version,
            doc_string=model.doc_string,
            metadata_props=list(model.metadata_props),
            functions=list(model.functions),
            had_external_data=had_external_data,
            base_dir=base_dir,
            initializer_inputs=[i.name for i in model.graph.input if i.name in _initializer_names(model)],
            input_order=[i.name for i in model.graph.input],
        )

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        model.ir_version = self.ir_version
        del model.opset_import[:]
        model.opset_import.extend(self.opset_imports)
        model.producer_name = self.producer_name
        model.producer_version = self.producer_version
        model.domain = self.domain
        model.model_version = self.model_version
        model.doc_string = self.doc_string
        del model.metadata_props[:]
        model.metadata_props.extend(self.metadata_props)
        del model.functions[:]
        model.functions.extend(self.functions)
        list_initializers_as_inputs(model, self.initializer_inputs, self.input_order)
        return model

    @property
    def default_opset(self) -> int:
        for o in self.opset_imports:
            if o.domain in ("", "ai.onnx"):
                return o.version
        return 0


def _initializer_names(model: onnx.ModelProto) -> set:
    return {t.name for t in model.graph.initializer}


def list_initializers_as_inputs(model: onnx.ModelProto, names: "list | tuple" = (),
                                order: "list | tuple" = ()) -> onnx.ModelProto:
    """List initializers as graph inputs where the model's IR version needs it (in place).

    Analysis treats an input backed by an initializer as a constant weight, so the in-memory
    graph drops it from the inputs. On export, IR < 4 needs every initializer listed as an
    input (the spec's rule before IR 4); for IR >= 4 the inputs the original listed (`names`,
    overridable defaults) are listed again. Each gets the initializer's current (pruned) shape;
    inputs named in `order` (the original's input list) keep their places.
    """
    inits = {t.name: t for t in model.graph.initializer}
    listed = {i.name for i in model.graph.input}
    wanted = [n for n in names if n in inits]
    if model.ir_version < 4:
        wanted += [t.name for t in model.graph.initializer]
    new = []
    for name in dict.fromkeys(wanted):
        if name not in listed:
            t = inits[name]
            new.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    for vi in model.graph.input:  # an input still listed keeps its name but gets the new shape
        t = inits.get(vi.name)
        if t is not None and vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")
            for d in t.dims:
                vi.type.tensor_type.shape.dim.add().dim_value = int(d)
    if new or order:
        pos = {n: k for k, n in enumerate(order)}
        inputs = list(model.graph.input) + new
        ranked = sorted(range(len(inputs)), key=lambda k: (pos.get(inputs[k].name, len(pos)), k))
        reordered = [onnx.ValueInfoProto() for _ in ranked]
        for dst, k in zip(reordered, ranked):
            dst.CopyFrom(inputs[k])
        del model.graph.input[:]
        model.graph.input.extend(reordered)
    return model


def _check_opset(model: onnx.ModelProto, where: str) -> None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version not in SUPPORTED_OPSETS:
            raise BadInputError(
                f"{where}: unsupported opset {o.version} (graphprune supports ai.onnx opsets "
                f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1})"
            )


def load_model(source: "str | os.PathLike | onnx.ModelProto") -> tuple[onnx.ModelProto, ModelMeta]:
    """Load a model without reading external weights.

    Every external tensor is checked (a regular file inside the model's folder, long enough)
    and gets its file's absolute path, so it is read (memory-mapped) only when its values are
    needed. A ModelProto is copied, never modified.
    """
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        where = "model"
        base = Path.cwd()
    else:
        path = Path(source)
        where = str(path)
        if not path.exists():
            raise BadInputError(f"{path}: no such file")
        if path.is_dir():
            raise BadInputError(f"{path}: is a directory, expected an .onnx file")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except MemoryError:
            raise BadInputError(f"{path}: out of memory reading the graph") from None
        except Exception as exc:  # protobuf raises DecodeError and friends
            raise BadInputError(f"{path}: not a readable ONNX model ({type(exc).__name__}); is the file truncated?") from None
        if not model.graph.node and not model.graph.input and not model.graph.output:
            raise BadInputError(f"{path}: not an ONNX model (empty graph)")
        base = path.resolve().parent
    if not model.graph.node:
        raise BadInputError(f"{where}: the graph has no nodes")
    _check_opset(model, where)
    from .wellformed import check_wellformed  # cycles, duplicate/undefined names, opset imports: one line

    warnings = check_wellformed(model, where, without_weights(model)[0])
    has_ext = uses_external_data(model)
    resolve_external_data(model, base, where, trusted=isinstance(source, onnx.ModelProto))
    meta = ModelMeta.of(model, had_external_data=has_ext, base_dir=str(base))
    meta.big = is_big(model)
    meta.warnings = warnings
    meta.dim_params = _name_io_symbols(model)
    return model, meta


def _io_dims(model: onnx.ModelProto):
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            yield from vi.type.tensor_type.shape.dim


def _name_io_symbols(model: onnx.ModelProto) -> dict:
    """Give declared graph input/output symbols spelled like inferred unknowns (tf2onnx names
    every None dimension unk__N) a name that is not, so the analysis treats them as the named
    symbols they are (e.g. a batch axis it can fold with heads). Returns new -> original name,
    which :func:`restore_io_symbols` undoes on the result."""
    declared = {d.dim_param for vi in list(model.graph.input) + list(model.graph.output)
                if vi.type.HasField("tensor_type") for d in vi.type.tensor_type.shape.dim}
    taken = {d.dim_param for d in _io_dims(model)}
    renames = {}
    for old in sorted(q for q in declared if q.startswith("unk__")):
        new = "sym_" + old
        while new in taken:
            new += "_"
        taken.add(new)
        renames[old] = new
    for d in _io_dims(model):
        if d.dim_param in renames:
            d.dim_param = renames[d.dim_param]
    return {new: old for old, new in renames.items()}


def restore_io_symbols(model: onnx.ModelProto, meta: ModelMeta) -> onnx.ModelProto:
    """Put back the graph input/output symbol names :func:`load_model` renamed (in place)."""
    if meta.dim_params:
        for d in _io_dims(model):
            if d.dim_param:  # also inside products such as 4*sym_unk__3 (batch x heads)
                d.dim_param = "*".join(meta.dim_params.get(q, q) for q in d.dim_param.split("*"))
    return model


def materialize(model: onnx.ModelProto, base_dir: str = "") -> onnx.ModelProto:
    """Read external tensors into the proto (in place) unless the model is big (see
    :func:`~graphprune.external_data.big_model_bytes`); a big model keeps its references."""
    if uses_external_data(model) and not is_big(model):
        for t in all_tensors(model):
            inline(t)
    return model


def without_weights(proto: onnx.ModelProto, min_bytes: int = _LIGHT_BYTES) -> tuple[onnx.ModelProto, set]:
    """A copy without large initializers (declared as inputs instead) and the names moved.

    Shape inference and the checker need only the weights' types and shapes; serializing
    every weight for them would cost memory and time, and fails over protobuf's 2 GB. Below
    IR version 4 onnx reads the types of initializers from the graph inputs only, so every
    initializer the input list lacks is declared there too (the copy only).
    """
    big = [t for t in proto.graph.initializer
           if len(t.raw_data) > min_bytes or external_data_helper.uses_external_data(t)]
    declared = {i.name for i in proto.graph.input}
    names = {t.name for t in big}
    undeclared_small = [t for t in proto.graph.initializer if proto.ir_version < 4
                        and t.name not in declared and t.name not in names]
    if not big and not undeclared_small:
        return proto, set()
    light = onnx.ModelProto()
    for fld in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(light, fld, getattr(proto, fld))
    light.opset_import.extend(proto.opset_import)
    light.functions.extend(proto.functions)
    g = light.graph
    g.name = proto.graph.name
    g.node.extend(proto.graph.node)
    g.input.extend(proto.graph.input)
    g.output.extend(proto.graph.output)
    g.value_info.extend(proto.graph.value_info)
    g.initializer.extend(t for t in proto.graph.initializer if t.name not in names)
    g.sparse_initializer.extend(proto.graph.sparse_initializer)
    for t in big + undeclared_small:
        if t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light, (names | {t.name for t in undeclared_small}) - declared


def check_model(model: "onnx.ModelProto | str | os.PathLike", full_check: bool = True) -> None:
    """onnx.checker for a model of any size: a path is checked as a file (onnx reads the graph
    and checks its external data references itself); a ModelProto is checked with its large
    weights declared as inputs (the same structure, types and shapes) so no weight is
    serialized. Raises onnx's ValidationError / InferenceError."""
    if isinstance(model, onnx.ModelProto):
        onnx.checker.check_model(without_weights(model)[0], full_check=full_check)
    else:
        onnx.checker.check_model(os.fspath(model), full_check=full_check)


class _RunCopies:
    """Where onnxruntime reads big models from: one scratch folder holding one data file that
    every tensor is copied into once (keyed by its source file, offset and length), and a small
    graph file per model. Repeated sessions over the same weights (calibration statistics,
    Hessian chunks, the oracle's masked original and pruned model) then cost a graph write,
    not a copy of the model. :func:`release_run_copies` empties it (the end of a prune)."""

    def __init__(self) -> None:
        self.dir: tempfile.TemporaryDirectory | None = None
        self.index: dict = {}
        self.count = 0

    def graph_path(self, model: onnx.ModelProto) -> str:
        if self.dir is None:
            self.dir = tempfile.TemporaryDirectory(prefix="graphprune-run-")
        folder = Path(self.dir.name)
        data = folder / "weights.data"
        work = onnx.ModelProto()
        work.CopyFrom(model)
        try:
            with open(data, "ab") as out:
                for t in all_tensors(work):
                    if not external_data_helper.uses_external_data(t):
                        continue
                    loc, offset, length = external_info(t)
                    key = (loc, offset, length)
                    if key not in self.index:
                        pad = (-out.tell()) % ALIGN
                        out.write(b"\0" * pad)
                        self.index[key] = out.tell()
                        _copy_range(loc, offset, length, out, None)
                    del t.external_data[:]
                    for k, v in (("location", data.name), ("offset", self.index[key]), ("length", length)):
                        e = t.external_data.add()
                        e.key, e.value = k, str(v)
        except OSError as exc:
            raise BadInputError(f"cannot write a scratch copy to run the model in {folder.parent}: "
                                f"{exc.strerror or exc} (set TMPDIR to a folder with space)") from None
        self.count += 1
        path = folder / f"model{self.count}.onnx"
        path.write_bytes(work.SerializeToString())
        return str(path)

    def release(self) -> None:
        if self.dir is not None:
            self.dir.cleanup()
        self.dir, self.index = None, {}


_RUN_COPIES = _RunCopies()


def release_run_copies() -> None:
    """Remove the scratch copies big models were run from (see :func:`session_payload`)."""
    _RUN_COPIES.release()


def session_payload(model: onnx.ModelProto):
    """What onnxruntime should load for `model`: its bytes, or for a big model with external
    weights the path of a graph beside a scratch copy of its weights (onnxruntime then reads
    the file itself; handing it memory-mapped arrays makes it copy them, and it refuses data
    outside the graph's folder or behind a symlink). The second item must outlive the session
    (None here: the copies live until :func:`release_run_copies`)."""
    if not uses_external_data(model):
        return model.SerializeToString(), None
    if not is_big(model):
        work = onnx.ModelProto()
        work.CopyFrom(model)
        return materialize(work).SerializeToString(), None
    return _RUN_COPIES.graph_path(model), None


def _bar(progress: bool, total: int, desc: str):
    if progress and total > 0:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False, delay=2.0, file=sys.stderr)
        except ImportError:
            pass
    return None


_OUT_OF_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def _copy_range(src: str, offset: int, length: int, out, bar) -> None:
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                raise BadInputError(f"{src} became shorter while it was copied")
            out.write(chunk)
            left -= len(chunk)
            if bar is not None:
                bar.update(len(chunk))


def _stale_data_files(path: Path, keep: set) -> list[Path]:
    """Data files our earlier saves to `path` wrote (named `<name>.<token>.data` or `<name>.data`)
    that the graph now at `path` references; removed once a new pair replaces it."""
    pattern = re.compile(re.escape(path.name) + r"(\.[0-9a-f]{8})?\.data")
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > 1 << 28:
            return []
        old = onnx.load(str(path), load_external_data=False)
    except Exception:
        return []
    out = []
    for t in all_tensors(old):
        if external_data_helper.uses_external_data(t):
            loc = external_info(t)[0]
            if pattern.fullmatch(loc):
                f = path.parent / loc
                if os.path.realpath(f) not in keep:
                    out.append(f)
    return list(dict.fromkeys(out))


def save_model(model: onnx.ModelProto, path: "str | os.PathLike", *, external_data: bool | None = None,
               base_dir: str = "", progress: bool = False, check: bool = False) -> Path:
    """Write `model` atomically; `model` is not modified.

    Models of 2 GB or more, or big ones, or when `external_data` is True, are written with
    their weights in `<name>.<token>.data` beside the graph, tensor by tensor (external
    weights are copied from their files in chunks, never all in memory). The data file gets a
    fresh name each time and is complete before the graph that names it replaces the old one,
    so graph and data are published as one unit: a reader never sees a mismatched pair, and
    two runs writing the same output cannot mix. The previous data file is removed after.
    Not enough disk space (checked first) or memory: BadInputError, nothing left behind.
    `check` runs onnx.checker (full check) on the written files by path before they are
    published (how a model over 2 GB is checked); a failure publishes nothing.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot write {path}: {exc.strerror or exc}") from None
    total = weight_bytes(model)
    if external_data is None:
        external_data = total >= TWO_GB - (64 << 20) or is_big(model)
    free = shutil.disk_usage(path.parent).free
    if free < total + (1 << 20):
        raise BadInputError(f"cannot write {path}: not enough disk space ({total / 2**20:.0f} MiB needed, "
                            f"{free / 2**20:.0f} MiB free)")
    umask = os.umask(0)
    os.umask(umask)
    temps: list[str] = []
    published: list[Path] = []
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        temps.append(tmp)
        os.chmod(tmp, 0o666 & ~umask)
        stale = _stale_data_files(path, {os.path.realpath(external_info(t)[0]) for t in all_tensors(model)
                                         if external_data_helper.uses_external_data(t)})
        if external_data:
            data_name = f"{path.name}.{secrets.token_hex(4)}.data"
            while (path.parent / data_name).exists():
                data_name = f"{path.name}.{secrets.token_hex(4)}.data"
            fd, tmp_data = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            temps.append(tmp_data)
            os.chmod(tmp_data, 0o666 & ~umask)
            work = onnx.ModelProto()
            work.CopyFrom(model)
            bar = _bar(progress, total, f"saving {path.name}")
            with open(tmp_data, "wb") as out:
                _write_tensors(work, data_name, out, bar)
            if bar is not None:
                bar.close()
            final_data = path.parent / data_name
            os.replace(tmp_data, final_data)  # a fresh name: nothing refers to it yet
            temps.remove(tmp_data)
            published.append(final_data)
            with open(tmp, "wb") as f:
                f.write(work.SerializeToString())
            if check:  # beside its data under the final name, as a reader will find it
                onnx.checker.check_model(tmp, full_check=True)
            os.replace(tmp, path)  # graph and data now visible together
            published.clear()
        else:
            if uses_external_data(model):
                work = onnx.ModelProto()
                work.CopyFrom(model)
                for t in all_tensors(work):
                    inline(t)
                model = work
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString(deterministic=True))
            os.replace(tmp, path)
        temps.remove(tmp)
        for f in stale:  # the data file of the graph just replaced
            with contextlib.suppress(OSError):
                f.unlink()
    except MemoryError:
        raise BadInputError(f"cannot write {path}: out of memory") from None
    except OSError as exc:
        if exc.errno in _OUT_OF_SPACE:
            raise BadInputError(f"cannot write {path}: not enough disk space ({exc.strerror})") from None
        raise BadInputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        for t in temps + [str(p) for p in published]:
            with contextlib.suppress(OSError):
                os.unlink(t)
    return path


def _write_tensors(work: onnx.ModelProto, data_name: str, out, bar) -> None:
    """Move every tensor of at least 1 KiB into `out` (page-aligned offsets), in place in `work`."""
    for t in all_tensors(work):
        ext = external_data_helper.uses_external_data(t)
        size = external_info(t)[2] if ext else len(t.raw_data)
        if size is None:
            size = expected_bytes(t) or 0
        if size < 1024 or t.data_type == onnx.TensorProto.STRING:
            if ext:
                inline(t)
            continue
        pad = (-out.tell()) % ALIGN
        if pad:
            out.write(b"\0" * pad)
        offset = out.tell()
        if ext:
            loc, src_offset, length = external_info(t)
            _copy_range(loc, src_offset, size, out, bar)
        else:
            if not t.HasField("raw_data"):  # typed fields (float_data, ...): as raw bytes
                raw = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name)
                t.raw_data = raw.raw_data
                for fld in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    t.ClearField(fld)
                size = len(t.raw_data)
            out.write(t.raw_data)
            if bar is not None:
                bar.update(size)
        set_location(t, data_name, offset, size)
