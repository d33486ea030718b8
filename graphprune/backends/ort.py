"""onnxruntime backends: CPU, and CUDA (IO binding, timed with CUDA events where the provider allows)."""
from __future__ import annotations

import time

import numpy as np

from .base import Backend, BackendUnavailable, _gpu_name, _load_error, _model_source, Session

__all__ = ["OrtCpuBackend", "OrtCudaBackend"]


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime") from None
    return ort


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
