"""TensorRT backend: an engine built with the TensorRT Python API (explicit batch, one optimisation profile
covering the dynamic axes, optional fp16), timed with CUDA events on a dedicated stream."""
from __future__ import annotations

import os

import numpy as np
import onnx

from ..errors import BadInputError, GraphpruneError
from .base import Backend, BackendUnavailable, _gpu_name, _model_source, Session
from .cuda_runtime import _CudaRuntime

__all__ = ["TensorRTBackend"]


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
