"""Device buffers, streams and events for TensorRT: from ``torch.cuda`` when PyTorch has CUDA, else from
``cuda-python``."""
from __future__ import annotations

import numpy as np

from .base import BackendUnavailable

__all__: list[str] = []


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
