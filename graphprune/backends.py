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
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import onnx

from .errors import BadInputError, GraphpruneError

__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "Session", "OrtCpuBackend", "OrtCudaBackend",
           "TensorRTBackend", "TorchCudaBackend", "make_backend", "select_backend", "available_backends"]

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


# --------------------------------------------------------------------------- onnxruntime


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime") from None
    return ort


def _model_source(model) -> "tuple[str | bytes, tempfile.TemporaryDirectory | None]":
    """A path or serialized bytes onnxruntime can load; protos over 2 GB go to a temp file."""
    if isinstance(model, onnx.ModelProto):
        from .model_io import save_model, uses_external_data

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


class _OrtSession(Session):
    def __init__(self, sess, feeds: dict, tmp=None):
        self.sess, self.feeds, self._tmp = sess, feeds, tmp

    def run(self) -> list[np.ndarray]:
        return self.sess.run(None, self.feeds)

    def time(self, runs: int) -> np.ndarray:
        out = np.empty(runs)
        run, feeds = self.sess.run, self.feeds
        for i in range(runs):
            t0 = time.perf_counter()
            run(None, feeds)
            out[i] = time.perf_counter() - t0
        return out * 1e3

    def close(self) -> None:
        self.sess = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _session_options(ort, threads: int):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def _load_error(label: str, model, exc: Exception) -> BadInputError:
    name = model if not isinstance(model, onnx.ModelProto) else (model.graph.name or "model")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return BadInputError(f"{label} cannot load {name}: {first[:300]}")


class OrtCpuBackend(Backend):
    name = "ort-cpu"

    def check(self) -> None:
        _import_ort()

    @property
    def label(self) -> str:
        ort = _import_ort()
        threads = f"{self.threads} threads" if self.threads else "default threads"
        return f"onnxruntime {ort.__version__} CPU ({threads})"

    def load(self, model, feeds: dict) -> Session:
        ort = _import_ort()
        src, tmp = _model_source(model)
        try:
            sess = ort.InferenceSession(src, _session_options(ort, self.threads), providers=["CPUExecutionProvider"])
        except Exception as exc:
            if tmp is not None:
                tmp.cleanup()
            raise _load_error(self.label, model, exc) from None
        return _OrtSession(sess, feeds, tmp)


class _OrtCudaSession(_OrtSession):
    """Inputs live on the GPU and outputs stay there (IO binding), so timing excludes copies;
    onnxruntime synchronises the CUDA stream at the end of each run."""

    def __init__(self, sess, feeds: dict, device: int, tmp=None):
        super().__init__(sess, feeds, tmp)
        ort = _import_ort()
        self._binding = sess.io_binding()
        self._values = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), "cuda", device)
                        for k, v in feeds.items()}
        for k, v in self._values.items():
            self._binding.bind_ortvalue_input(k, v)
        for o in sess.get_outputs():
            self._binding.bind_output(o.name, "cuda", device)

    def run(self) -> list[np.ndarray]:
        self.sess.run_with_iobinding(self._binding)
        return self._binding.copy_outputs_to_cpu()

    def time(self, runs: int) -> np.ndarray:
        out = np.empty(runs)
        run, binding = self.sess.run_with_iobinding, self._binding
        for i in range(runs):
            t0 = time.perf_counter()
            run(binding)
            binding.synchronize_outputs()  # a no-op when the run already synchronised the stream
            out[i] = time.perf_counter() - t0
        return out * 1e3


class OrtCudaBackend(Backend):
    name = "ort-cuda"

    def check(self) -> None:
        ort = _import_ort()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable("no CUDAExecutionProvider: pip install onnxruntime-gpu, needs an NVIDIA GPU")
        # the provider can be listed yet fail to start (no GPU, CUDA/cuDNN missing): try a one-op model
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
        try:
            sess = ort.InferenceSession(probe.SerializeToString(), _session_options(ort, 1),
                                        providers=[("CUDAExecutionProvider", {"device_id": self.device})])
            started = sess.get_providers()[0] == "CUDAExecutionProvider"
        except Exception as exc:
            raise BackendUnavailable(f"the CUDA provider did not start: {str(exc).splitlines()[0][:200]}") from None
        if not started:
            raise BackendUnavailable("the CUDA provider did not start (CUDA/cuDNN libraries or GPU missing)")

    @property
    def label(self) -> str:
        ort = _import_ort()
        return f"onnxruntime {ort.__version__} CUDA (device {self.device})"

    def cache_key(self) -> str:
        return f"{self.label} {_gpu_name(self.device)}".strip()

    def load(self, model, feeds: dict) -> Session:
        ort = _import_ort()
        src, tmp = _model_source(model)
        providers = [("CUDAExecutionProvider", {"device_id": self.device}), "CPUExecutionProvider"]
        try:
            sess = ort.InferenceSession(src, _session_options(ort, self.threads), providers=providers)
        except Exception as exc:
            if tmp is not None:
                tmp.cleanup()
            raise _load_error(self.label, model, exc) from None
        if sess.get_providers()[0] != "CUDAExecutionProvider":  # CUDA libraries missing: ort fell back silently
            raise BackendUnavailable("the CUDA provider did not start (CUDA/cuDNN libraries or GPU missing)")
        return _OrtCudaSession(sess, feeds, self.device, tmp)


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


# --------------------------------------------------------------------------- TensorRT


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailable("not installed: pip install tensorrt, needs an NVIDIA GPU") from None
    except Exception as exc:  # present but broken (e.g. libnvinfer missing)
        raise BackendUnavailable(f"cannot be imported: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not hasattr(trt, "IExecutionContext") or not hasattr(trt.IExecutionContext, "execute_async_v3"):
        raise BackendUnavailable(f"version {getattr(trt, '__version__', '?')} is too old (8.6 or newer needed)")
    return trt


class _CudaRuntime:
    """Device buffers, a stream and timing events: from torch.cuda, or cuda-python's runtime."""

    def __init__(self, device: int):
        self.device = device
        self.kind = None
        torch_note = "PyTorch is not installed"
        try:
            import torch

            if torch.cuda.is_available():
                self.kind, self.torch = "torch", torch
                torch.cuda.set_device(device)
                self.stream = torch.cuda.Stream(device=device)
                return
            torch_note = "PyTorch sees no CUDA device"
        except ImportError:
            pass
        try:
            try:
                from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
            except ImportError:
                from cuda import cudart  # older cuda-python
        except ImportError:
            raise BackendUnavailable(f"no CUDA runtime for buffers and events: {torch_note} and cuda-python "
                                     "is not installed") from None
        self.kind, self.cudart = "cuda-python", cudart
        count = self._check(cudart.cudaGetDeviceCount())
        if not count:
            raise BackendUnavailable("no CUDA device")
        self._check(cudart.cudaSetDevice(device))
        self.stream = self._check(cudart.cudaStreamCreate())
        self._ptrs: list = []

    def _check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise BackendUnavailable(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else (rest or None)

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream) if self.kind == "torch" else int(self.stream)

    def upload(self, array: np.ndarray):
        """A device copy of `array`; returns (handle, pointer)."""
        array = np.ascontiguousarray(array)
        if self.kind == "torch":
            t = self.torch.from_numpy(array.copy()).to(f"cuda:{self.device}")
            return t, t.data_ptr()
        ptr = self._check(self.cudart.cudaMalloc(max(array.nbytes, 1)))
        self._ptrs.append(ptr)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.cudart.cudaMemcpy(ptr, array.ctypes.data, array.nbytes, kind))
        return array, int(ptr)

    def empty(self, shape, dtype):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self.kind == "torch":
            t = self.torch.empty(nbytes, dtype=self.torch.uint8, device=f"cuda:{self.device}")
            return t, t.data_ptr()
        ptr = self._check(self.cudart.cudaMalloc(max(nbytes, 1)))
        self._ptrs.append(ptr)
        return None, int(ptr)

    def download(self, handle, ptr: int, shape, dtype) -> np.ndarray:
        """A host copy of a buffer made by :meth:`empty` (the stream must be synchronised)."""
        out = np.empty(shape, dtype=dtype)
        if self.kind == "torch":
            out.reshape(-1).view(np.uint8)[:] = handle.cpu().numpy()
            return out
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.cudart.cudaMemcpy(out.ctypes.data, ptr, out.nbytes, kind))
        return out

    def time_runs(self, launch, runs: int) -> np.ndarray:
        """Milliseconds of each of `runs` launches, measured with CUDA events on the stream."""
        out = np.empty(runs)
        if self.kind == "torch":
            torch = self.torch
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            for i in range(runs):
                start.record(self.stream)
                launch()
                end.record(self.stream)
                end.synchronize()
                out[i] = start.elapsed_time(end)
            return out
        cudart = self.cudart
        start = self._check(cudart.cudaEventCreate())
        end = self._check(cudart.cudaEventCreate())
        try:
            for i in range(runs):
                self._check(cudart.cudaEventRecord(start, self.stream))
                launch()
                self._check(cudart.cudaEventRecord(end, self.stream))
                self._check(cudart.cudaEventSynchronize(end))
                out[i] = self._check(cudart.cudaEventElapsedTime(start, end))
        finally:
            cudart.cudaEventDestroy(start)
            cudart.cudaEventDestroy(end)
        return out

    def synchronize(self, device: bool = False) -> None:
        """Wait for the timing stream (or, with `device`, for all work on the device, e.g. uploads)."""
        if self.kind == "torch":
            if device:
                self.torch.cuda.synchronize(self.device)
            self.stream.synchronize()
        else:
            self._check(self.cudart.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        if self.kind == "cuda-python":
            for p in self._ptrs:
                self.cudart.cudaFree(p)
            self._ptrs = []
            self.cudart.cudaStreamDestroy(self.stream)


class _TrtSession(Session):
    def __init__(self, engine, context, cuda: _CudaRuntime, outputs: dict, keep: list):
        self.engine, self.context, self.cuda = engine, context, cuda
        self.outputs = outputs  # name -> (handle, ptr, shape, dtype)
        self._keep = keep       # device buffers that must outlive the context

    def _launch(self) -> None:
        if not self.context.execute_async_v3(self.cuda.stream_handle):
            raise GraphpruneError("TensorRT execute_async_v3 failed")

    def run(self) -> list[np.ndarray]:
        self._launch()
        self.cuda.synchronize()
        return [self.cuda.download(*spec) for spec in self.outputs.values()]

    def time(self, runs: int) -> np.ndarray:
        return self.cuda.time_runs(self._launch, runs)

    def close(self) -> None:
        self.context = self.engine = None
        self._keep = []
        self.cuda.close()


class TensorRTBackend(Backend):
    """Builds an engine per model (fp32, or fp16 with `fp16=True`) and times it with CUDA events."""

    name = "trt"
    workspace_bytes = 4 << 30

    def check(self) -> None:
        _import_trt()
        _CudaRuntime(self.device).close()

    @property
    def label(self) -> str:
        trt = _import_trt()
        return f"TensorRT {trt.__version__} {'fp16' if self.fp16 else 'fp32'} (GPU {self.device})"

    def cache_key(self) -> str:
        return f"{self.label} {_gpu_name(self.device)}".strip()

    def _build(self, trt, model, feeds: dict):
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        flags = 0
        if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode from TensorRT 10
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if isinstance(model, onnx.ModelProto):
            src, tmp = _model_source(model)
            ok = parser.parse_from_file(src) if isinstance(src, str) else parser.parse(src)
            if tmp is not None:
                tmp.cleanup()
        else:
            ok = parser.parse_from_file(os.fspath(model))  # external data resolved beside the file
        if not ok:
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise BadInputError(f"TensorRT cannot parse the model: {(errors or ['unknown error'])[0][:300]} "
                                "(try --backend ort-cuda)")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if self.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        dynamic = False
        for i in range(network.num_inputs):
            inp = network.get_input(i)
            if inp.name not in feeds:
                raise BadInputError(f"TensorRT: no value for input {inp.name}")
            shape = tuple(int(d) for d in feeds[inp.name].shape)
            declared = tuple(inp.shape)
            if len(declared) != len(shape):
                raise BadInputError(f"input {inp.name} has rank {len(declared)}, the feed {len(shape)}")
            if any(d < 0 for d in declared):
                dynamic = True
                lo = tuple(1 if (d < 0 and k == 0) else s for k, (d, s) in enumerate(zip(declared, shape)))
                profile.set_shape(inp.name, lo, shape, shape)
        if dynamic:
            config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BadInputError("TensorRT could not build an engine for the model (try --backend ort-cuda)")
        engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        if engine is None:
            raise GraphpruneError("TensorRT could not deserialize the engine it built")
        return engine

    def load(self, model, feeds: dict) -> Session:
        trt = _import_trt()
        cuda = _CudaRuntime(self.device)
        engine = self._build(trt, model, feeds)
        context = engine.create_execution_context()
        keep, outputs = [], {}
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        for name in names:
            if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                continue
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            array = np.asarray(feeds[name]).astype(dtype, copy=False)  # e.g. int64 ids -> int32 engines
            context.set_input_shape(name, tuple(array.shape))
            handle, ptr = cuda.upload(array)
            keep.append(handle)
            context.set_tensor_address(name, ptr)
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                continue
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise GraphpruneError(f"TensorRT: output {name} has a data-dependent shape {shape}")
            handle, ptr = cuda.empty(shape, dtype)
            keep.append(handle)
            context.set_tensor_address(name, ptr)
            outputs[name] = (handle, ptr, shape, dtype)
        cuda.synchronize(device=True)  # uploads ran on the default stream
        return _TrtSession(engine, context, cuda, outputs, keep)


# --------------------------------------------------------------------------- PyTorch CUDA (onnx2torch)


def _import_torch_cuda(device: str):
    import importlib.util

    if importlib.util.find_spec("onnx2torch") is None:  # say so without importing torch (seconds)
        raise BackendUnavailable("onnx2torch is not installed: pip install onnx2torch (it needs torchvision)")
    try:
        import torch
    except ImportError:
        raise BackendUnavailable("PyTorch is not installed") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable(f"PyTorch {torch.__version__} sees no CUDA device")
    try:
        import onnx2torch
    except ImportError as exc:
        missing = getattr(exc, "name", None) or "onnx2torch"
        raise BackendUnavailable(f"{missing} is not installed: pip install onnx2torch (it needs torchvision)") from None
    except Exception as exc:  # present but broken
        raise BackendUnavailable(f"onnx2torch cannot be imported: {type(exc).__name__}: {str(exc)[:200]}") from None
    _alias_onnx2torch_versions()
    return torch, onnx2torch


_ALIASED = False


def _signature(schema) -> tuple:
    return (tuple(i.name for i in schema.inputs), tuple(o.name for o in schema.outputs),
            tuple(sorted(schema.attributes)))


def _alias_onnx2torch_versions() -> None:
    """Let onnx2torch convert newer versions of ops whose ONNX signature did not change.

    onnx2torch looks converters up by the op's exact since-version, so e.g. GreaterOrEqual-16 or
    Where-16 (which only added types) are "not implemented". For each registered op, a later
    version with the same input, output and attribute names in the ONNX schema reuses the
    nearest earlier converter; versions whose signature changed (ReduceMean-18's axes input)
    are left unconverted, and their error names the op.
    """
    global _ALIASED
    if _ALIASED:
        return
    _ALIASED = True
    try:
        from onnx import defs
        from onnx2torch.node_converters import registry
    except ImportError:
        return
    table = registry._CONVERTER_REGISTRY
    history: dict = {}
    for schema in defs.get_all_schemas_with_history():
        history.setdefault((schema.domain, schema.name), []).append(schema)
    for (domain, op), schemas in history.items():
        known = {d.version: conv for d, conv in table.items() if d.operation_type == op and d.domain == domain}
        if not known:
            continue
        schemas.sort(key=lambda sc: sc.since_version)
        previous = None  # (schema, converter) of the nearest earlier version that converts
        for sc in schemas:
            if sc.since_version in known:
                previous = (sc, known[sc.since_version])
            elif previous is not None and _signature(sc) == _signature(previous[0]):
                table[registry.OperationDescription(domain, op, sc.since_version)] = previous[1]
                previous = (sc, previous[1])
            else:
                previous = None


def _for_onnx2torch(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `proto` that onnx2torch converts faithfully (same function).

    - Identity nodes of initializers (TorchScript shares equal weights that way) become
      initializers: onnx2torch reads Conv/Gemm weights and biases from the initializer list only.
    - Flatten with axis equal to the input's rank (output [N, 1]) becomes Reshape to [-1, 1]:
      onnx2torch's Flatten fails on it.
    - Dropout whose mask output is unused becomes Identity (inference: the output is the input);
      onnx2torch has no converter for the old versions (Caffe2 exports use Dropout-7).
    """
    from onnx import helper, numpy_helper

    init = {t.name: t for t in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type == "Identity" and n.domain in ("", "ai.onnx")
             and n.input and n.input[0] in init]
    flattens = [n for n in proto.graph.node if n.op_type == "Flatten" and n.domain in ("", "ai.onnx")]
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    dropouts = [n for n in proto.graph.node if n.op_type == "Dropout" and n.domain in ("", "ai.onnx")
                and not (len(n.output) > 1 and n.output[1] and n.output[1] in used)]
    if not nodes and not flattens and not dropouts:
        return proto
    proto = onnx.ModelProto.FromString(proto.SerializeToString()) if proto.ByteSize() < _TWO_GB else proto
    for n in proto.graph.node:
        if n.op_type == "Dropout" and n.domain in ("", "ai.onnx") and \
                not (len(n.output) > 1 and n.output[1] and n.output[1] in used):
            n.CopyFrom(helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name))
    if flattens:
        try:
            from .model_io import without_weights  # ranks need no weight: none is serialized

            inferred = onnx.shape_inference.infer_shapes(without_weights(proto)[0], strict_mode=False)
            ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in
                     [*inferred.graph.value_info, *inferred.graph.input]
                     if vi.type.tensor_type.HasField("shape")}
        except Exception:
            ranks = {}
        for n in proto.graph.node:
            if n.op_type != "Flatten" or n.domain not in ("", "ai.onnx"):
                continue
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            rank = ranks.get(n.input[0])
            if rank is not None and axis == rank:
                shape_name = f"{n.output[0]}__graphprune_flatten_shape"
                proto.graph.initializer.append(numpy_helper.from_array(np.array([-1, 1], np.int64), shape_name))
                n.CopyFrom(helper.make_node("Reshape", [n.input[0], shape_name], list(n.output), name=n.name))
    if not nodes:
        return proto
    drop = {n.output[0] for n in nodes}
    kept = [n for n in proto.graph.node if not (n.op_type == "Identity" and n.output and n.output[0] in drop
                                                 and n.input and n.input[0] in init)]
    for n in nodes:
        copy = onnx.TensorProto()
        copy.CopyFrom(init[n.input[0]])
        copy.name = n.output[0]
        proto.graph.initializer.append(copy)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    return proto


def _dist_version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


class _TorchSession(Session):
    """A converted module with its inputs on the device; `graph` is the captured CUDA graph or None.

    Everything (warm-up, capture, replay, eager runs, timing events) runs on one side stream.
    In fp16 the module's weights are half and the run is under autocast, so an fp32 tensor the
    graph makes itself (a Cast to float, a mask) meets half weights without a dtype error.
    """

    def __init__(self, torch, module, inputs: list, device: str, use_graph: bool, fp16: bool = False):
        self.torch, self.module, self.inputs, self.device = torch, module, inputs, device
        self.cuda = device.startswith("cuda")
        self.fp16 = fp16
        self.graph, self.graph_error = None, ""
        self._out = None
        if self.cuda:
            self.stream = torch.cuda.Stream(device=device)
            self.stream.wait_stream(torch.cuda.current_stream(device))  # the inputs' uploads
            if use_graph:
                self._capture()

    def _forward(self):
        torch = self.torch
        with torch.inference_mode():
            if self.fp16 and self.cuda:
                with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
                    return self.module(*self.inputs)
            return self.module(*self.inputs)

    def _capture(self) -> None:
        torch = self.torch
        try:
            with torch.cuda.stream(self.stream):
                for _ in range(3):  # cuDNN/cuBLAS pick their kernels before the capture
                    self._forward()
                # a module that reads values back on the host (shapes computed at run time) cannot be
                # captured: find out without a capture, which a failed one can leave the context broken
                import warnings

                previous = torch.cuda.get_sync_debug_mode()
                with warnings.catch_warnings():  # "a prototype feature": a missed sync fails the capture instead
                    warnings.simplefilter("ignore")
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        self._forward()
                    finally:
                        torch.cuda.set_sync_debug_mode(previous)
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                out = self._forward()
            self.graph, self._out = graph, out
        except Exception as exc:  # host syncs (e.g. shapes read back on the host) cannot be captured
            self.graph = None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.graph_error = first[:200]
            torch.cuda.synchronize(self.device)

    def _launch(self):
        """Queue one run on the side stream (CUDA) or run it (CPU); returns the outputs."""
        if not self.cuda:
            return self._forward()
        with self.torch.cuda.stream(self.stream):
            if self.graph is not None:
                self.graph.replay()
                return self._out
            return self._forward()

    def run(self) -> list[np.ndarray]:
        out = self._launch()
        if self.cuda:
            self.stream.synchronize()
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [o.detach().float().cpu().numpy() if o.is_floating_point() else o.detach().cpu().numpy()
                for o in outs]

    def time(self, runs: int) -> np.ndarray:
        out = np.empty(runs)
        if not self.cuda:
            for i in range(runs):
                t0 = time.perf_counter()
                self._launch()
                out[i] = time.perf_counter() - t0
            return out * 1e3
        torch = self.torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for i in range(runs):
            start.record(self.stream)
            self._launch()
            end.record(self.stream)
            end.synchronize()
            out[i] = start.elapsed_time(end)
        return out

    def close(self) -> None:
        self.graph = self._out = self.module = None
        self.inputs = []


class TorchCudaBackend(Backend):
    """ONNX -> torch.fx (onnx2torch) on a CUDA device, one CUDA graph per model where it can be captured.

    `torch_device` overrides the device (e.g. "cpu" to check a conversion without a GPU; timing
    then uses the host clock).
    """

    name = "torch-cuda"

    def __init__(self, *, threads: int = 0, fp16: bool = False, device: int = 0, torch_device: str | None = None,
                 cuda_graph: bool = True, channels_last: bool = True):
        super().__init__(threads=threads, fp16=fp16, device=device)
        self.torch_device = torch_device or f"cuda:{self.device}"
        self.cuda_graph = bool(cuda_graph)
        # 4-D weights and image inputs in NHWC, the layout cuDNN's tensor-core kernels use (TensorRT
        # picks layouts itself); NCHW would add a transpose around every convolution
        self.channels_last = bool(channels_last)
        self.modes: set[str] = set()  # "CUDA graph" / "eager" for the models loaded so far

    def check(self) -> None:
        _import_torch_cuda(self.torch_device)

    @property
    def label(self) -> str:
        torch, _ = _import_torch_cuda(self.torch_device)
        where = (f"GPU {self.device}" if self.torch_device.startswith("cuda") else self.torch_device)
        mode = " / ".join(sorted(self.modes)) or ("CUDA graph" if self.cuda_graph else "eager")
        layout = ", channels-last" if self.channels_last else ""
        return (f"PyTorch {torch.__version__} CUDA via onnx2torch {_dist_version('onnx2torch')} "
                f"{'fp16' if self.fp16 else 'fp32'}{layout}, {mode} ({where})")

    def cache_key(self) -> str:
        torch, _ = _import_torch_cuda(self.torch_device)
        name = _gpu_name(self.device) if self.torch_device.startswith("cuda") else _cpu_name()
        return (f"PyTorch {torch.__version__} onnx2torch {_dist_version('onnx2torch')} "
                f"{'fp16' if self.fp16 else 'fp32'} {'graph' if self.cuda_graph else 'eager'}"
                f"{' nhwc' if self.channels_last else ''} {name}").strip()

    def load(self, model, feeds: dict) -> Session:
        torch, onnx2torch = _import_torch_cuda(self.torch_device)
        if isinstance(model, onnx.ModelProto):
            proto = model
        else:
            path = os.fspath(model)
            if not os.path.isfile(path):
                raise BadInputError(f"{path}: no such file")
            proto = onnx.load(path)
        proto = _for_onnx2torch(proto)
        try:
            module = onnx2torch.convert(proto)
        except Exception as exc:
            raise _load_error("onnx2torch", model, exc) from None
        module = module.to(self.torch_device).eval()
        if self.fp16:
            module = module.half()
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        names = [vi.name for vi in proto.graph.input if vi.name not in {t.name for t in proto.graph.initializer}]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise BadInputError(f"{self.label}: no value for input {missing[0]}")
        inputs = []
        for n in names:
            t = torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.torch_device)
            if self.fp16 and t.is_floating_point():
                t = t.half()
            if self.channels_last and t.dim() == 4 and t.is_floating_point():
                t = t.contiguous(memory_format=torch.channels_last)
            inputs.append(t)
        sess = _TorchSession(torch, module, inputs, self.torch_device, self.cuda_graph, self.fp16)
        try:
            sess.run()  # fails here, with the op, rather than in the middle of timing
        except Exception as exc:
            sess.close()
            name = model if not isinstance(model, onnx.ModelProto) else (model.graph.name or "model")
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BadInputError(f"PyTorch ({self.torch_device}) cannot run the onnx2torch module of {name}: "
                                f"{first[:300]}") from None
        if sess.cuda:
            self.modes.add("CUDA graph" if sess.graph is not None else "eager")
        return sess


# --------------------------------------------------------------------------- selection

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
