"""Latency backends: TensorRT, onnxruntime CUDA and onnxruntime CPU behind one interface.

A :class:`Backend` turns a model and its input feeds into a :class:`Session` that runs the
model and times single runs (milliseconds). TensorRT and onnxruntime's CUDA provider are
optional and imported lazily: :func:`select_backend` tries the requested backend and falls
back to the next one (TensorRT -> onnxruntime CUDA -> onnxruntime CPU), recording in one line
why each skipped backend could not run.

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
           "TensorRTBackend", "make_backend", "select_backend", "available_backends"]

BACKENDS = ("trt", "ort-cuda", "ort-cpu")
_FALLBACK = {"auto": BACKENDS, "trt": BACKENDS, "ort-cuda": ("ort-cuda", "ort-cpu"), "ort-cpu": ("ort-cpu",)}
_LABELS = {"trt": "TensorRT", "ort-cuda": "onnxruntime CUDA", "ort-cpu": "onnxruntime CPU"}
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
        if model.ByteSize() < _TWO_GB:
            return model.SerializeToString(), None
        tmp = tempfile.TemporaryDirectory(prefix="graphprune-bench-")
        path = os.path.join(tmp.name, "model.onnx")
        onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
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


# --------------------------------------------------------------------------- selection

_CLASSES = {"trt": TensorRTBackend, "ort-cuda": OrtCudaBackend, "ort-cpu": OrtCpuBackend}


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
        if fp16 and candidate != "trt":
            notes.append("--fp16 applies to TensorRT only; onnxruntime runs the model's own precision")
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
