"""Loading and saving ONNX models: lazy external data, atomic writes, IR version kept."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import external_data_helper

from .errors import BadInputError

__all__ = ["ModelMeta", "list_initializers_as_inputs", "load_model", "restore_io_symbols", "save_model", "materialize", "uses_external_data", "SUPPORTED_OPSETS", "TWO_GB"]

TWO_GB = 2**31
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
    base_dir: str = ""  # folder external data locations are relative to
    initializer_inputs: list = field(default_factory=list)  # graph inputs backed by an initializer
    input_order: list = field(default_factory=list)  # every graph input's name, as the input lists them
    dim_params: dict = field(default_factory=dict)  # io symbols renamed on load (new -> original name)

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
    """Load a model without reading external weights up front.

    External tensors get absolute locations, so each is read only when its values are
    needed (onnx-graphsurgeon's LazyValues). A ModelProto is copied, never modified.
    """
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        where = "model"
    else:
        path = Path(source)
        where = str(path)
        if not path.exists():
            raise BadInputError(f"{path}: no such file")
        if path.is_dir():
            raise BadInputError(f"{path}: is a directory, expected an .onnx file")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises DecodeError and friends
            raise BadInputError(f"{path}: not a readable ONNX model ({type(exc).__name__}); is the file truncated?") from None
        if not model.graph.node and not model.graph.input and not model.graph.output:
            raise BadInputError(f"{path}: not an ONNX model (empty graph)")
        base = path.resolve().parent
        for tensor in external_data_helper._get_all_tensors(model):
            if external_data_helper.uses_external_data(tensor):
                info = external_data_helper.ExternalDataInfo(tensor)
                if not (base / info.location).exists():
                    raise BadInputError(f"{path}: external data file {info.location} is missing")
    if not model.graph.node:
        raise BadInputError(f"{where}: the graph has no nodes")
    _check_opset(model, where)
    has_ext = any(
        external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(model)
    )
    base_dir = "" if isinstance(source, onnx.ModelProto) else str(Path(source).resolve().parent)
    meta = ModelMeta.of(model, had_external_data=has_ext, base_dir=base_dir)
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


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(model))


def materialize(model: onnx.ModelProto, base_dir: str) -> onnx.ModelProto:
    """Read external tensors into the proto (in place) when the result stays under 2 GB."""
    if uses_external_data(model) and _byte_size(model) < TWO_GB:
        onnx.load_external_data_for_model(model, base_dir)
    return model


def _byte_size(model: onnx.ModelProto) -> int:
    total = 0
    for t in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(t):
            info = external_data_helper.ExternalDataInfo(t)
            total += info.length or 0
        else:
            total += len(t.raw_data)
    return total + model.ByteSize() if total < TWO_GB else total


def save_model(model: onnx.ModelProto, path: "str | os.PathLike", *, external_data: bool | None = None,
               base_dir: str = "") -> Path:
    """Write `model` atomically: a temporary file in the target folder, then a rename.

    Models over 2 GB (or when `external_data` is True) are written with their weights
    in `<name>.data` beside the model, also atomically. `model` is not modified.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = _byte_size(model) >= TWO_GB
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp_data = None
    try:
        if external_data:
            work = onnx.ModelProto()
            work.CopyFrom(model)
            if uses_external_data(work):
                onnx.load_external_data_for_model(work, base_dir)
            data_name = path.name + ".data"
            tmp_data_name = f".{data_name}.tmp"
            tmp_data = path.parent / tmp_data_name
            if tmp_data.exists():
                tmp_data.unlink()
            onnx.save_model(work, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data_name, size_threshold=1024)
            saved = onnx.load(tmp, load_external_data=False)
            for t in external_data_helper._get_all_tensors(saved):
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            with open(tmp, "wb") as f:
                f.write(saved.SerializeToString())
            os.chmod(tmp_data, 0o666 & ~umask)
            os.replace(tmp_data, path.parent / data_name)
            tmp_data = None
        else:
            if uses_external_data(model):
                work = onnx.ModelProto()
                work.CopyFrom(model)
                onnx.load_external_data_for_model(work, base_dir)
                model = work
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString(deterministic=True))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if tmp_data is not None and Path(tmp_data).exists():
            Path(tmp_data).unlink()
    return path
