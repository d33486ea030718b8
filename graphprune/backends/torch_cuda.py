"""PyTorch CUDA backend: the ONNX graph converted to a ``torch.fx`` module by onnx2torch, on the GPU (fp32 or
fp16), captured as one CUDA graph where the module allows it, timed with CUDA events."""
from __future__ import annotations

import os
import time

import numpy as np
import onnx

from ..errors import BadInputError
from .base import Backend, BackendUnavailable, _cpu_name, _dist_version, _gpu_name, _load_error, Session
from .onnx2torch_patches import _alias_onnx2torch_versions, _for_onnx2torch

__all__ = ["TorchCudaBackend"]


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
