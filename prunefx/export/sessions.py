"""ONNX Runtime sessions on the best provider that really works, and GPU probing.

A GPU provider is asked for only when the CUDA driver reports a device *and* the provider
library loads on a one-node model (probed once per process, logs muted, the answer cached in
``_GPU_CACHE``), so onnxruntime-gpu on a CPU-only machine gives the CPU provider without
provider-load errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from prunefx.errors import ExportError

__all__ = ["onnx_session", "check_device", "gpu_providers"]


def onnx_session(path: str | os.PathLike[str], device: str = "auto", *, provider_options: Mapping[str, Mapping[str, Any]] | None = None, session_options: Any = None):
    """An ``onnxruntime.InferenceSession`` for ``path`` on the best provider that really works.

    ``device``: "auto" (TensorRT, then CUDA, when a GPU is usable; else CPU), "cpu", "cuda",
    "cuda:N", "tensorrt" or "tensorrt:N". A GPU is usable when the CUDA driver reports a device
    and ONNX Runtime's provider library loads; only then is a GPU provider asked for, so a
    CPU-only machine with onnxruntime-gpu gets the CPU provider without provider-load errors.
    Asking for "cuda"/"tensorrt" where it is not usable raises ExportError.
    ``provider_options`` maps a provider name to its options (e.g.
    ``{"TensorrtExecutionProvider": {"trt_fp16_enable": True, "trt_engine_cache_enable": True}}``).
    """
    import onnxruntime as ort

    check_device(device)
    kind, _, index = device.partition(":")
    usable = _usable_gpu_providers()
    chain = {"auto": usable, "tensorrt": usable, "cuda": ("CUDAExecutionProvider",), "cpu": ()}[kind]
    names = [*chain, "CPUExecutionProvider"]
    extra = provider_options or {}
    options = [{**({"device_id": index} if index and n != "CPUExecutionProvider" else {}), **extra.get(n, {})} for n in names]
    so = session_options or ort.SessionOptions()
    if session_options is None:
        so.log_severity_level = 3  # provider fallbacks are ours to report, not ORT's to print
    try:
        with _ort_quiet(bool(chain)):
            sess = ort.InferenceSession(str(path), so, providers=names, provider_options=options)
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load '{path}' with {names}: {exc}") from exc
    if chain and sess.get_providers()[0] == "CPUExecutionProvider" and kind != "auto":
        raise ExportError(f"ONNX Runtime fell back to the CPU for '{path}' although {device!r} was asked for ({_gpu_diagnosis()})")
    return sess


def check_device(device: str) -> None:
    """Raise ExportError unless ``device`` ("auto", "cpu", "cuda[:N]", "tensorrt[:N]") names an
    ONNX Runtime device that can run on this machine; cheap, so callers check it first."""
    kind, _, index = device.partition(":") if isinstance(device, str) else ("", "", "")
    if kind not in ("auto", "cpu", "cuda", "tensorrt") or (index and not index.isdigit()):
        raise ExportError(f"device must be 'auto', 'cpu', 'cuda[:N]' or 'tensorrt[:N]', got {device!r}")
    if kind in ("cuda", "tensorrt"):
        wanted = "CUDAExecutionProvider" if kind == "cuda" else "TensorrtExecutionProvider"
        if wanted not in _usable_gpu_providers():
            raise ExportError(f"device={device!r} asked for {wanted}, which cannot run here ({_gpu_diagnosis()}); use device='auto' or 'cpu'")


def gpu_providers() -> tuple[str, ...]:
    """The ONNX Runtime GPU providers that really work on this machine, best first (empty on a
    CPU-only machine, even with onnxruntime-gpu installed)."""
    return _usable_gpu_providers()


_GPU_CACHE: dict[str, tuple[str, ...]] = {}


def _usable_gpu_providers() -> tuple[str, ...]:
    if "providers" not in _GPU_CACHE:
        _GPU_CACHE["providers"] = _probe_gpu_providers()
    return _GPU_CACHE["providers"]


def _probe_gpu_providers() -> tuple[str, ...]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    if not available & {"CUDAExecutionProvider", "TensorrtExecutionProvider"} or _cuda_device_count() == 0:
        return ()  # no GPU: never ask ORT for a GPU provider, it would log load errors
    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels, when that is where they are
        with contextlib.suppress(Exception), _ort_quiet(True):
            ort.preload_dlls()
    usable = []
    if "TensorrtExecutionProvider" in available and _tensorrt_loadable() and _provider_loads("TensorrtExecutionProvider"):
        usable.append("TensorrtExecutionProvider")
    if "CUDAExecutionProvider" in available and _provider_loads("CUDAExecutionProvider"):
        usable.append("CUDAExecutionProvider")
    return tuple(usable) if "CUDAExecutionProvider" in usable else ()


def _cuda_device_count() -> int:
    """CUDA devices the driver reports; asks the driver itself, so it works with a CPU-only torch."""
    with contextlib.suppress(Exception):
        if torch.cuda.is_available():
            return torch.cuda.device_count()
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0:
            return count.value
        return 0
    return 0


def _tensorrt_loadable() -> bool:
    dirs = [""]
    with contextlib.suppress(ImportError):
        import tensorrt_libs  # the TensorRT wheel keeps its libraries here

        dirs.append(os.path.dirname(tensorrt_libs.__file__))
    for d in dirs:
        for name in ("libnvinfer.so.10", "libnvinfer.so.8", "nvinfer_10.dll"):
            with contextlib.suppress(OSError):
                ctypes.CDLL(os.path.join(d, name) if d else name, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
                return True
    return False


def _provider_loads(provider: str) -> bool:
    """Whether ONNX Runtime can create ``provider`` on a one-node model, with its logs muted."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 8)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        with _ort_quiet(True):
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=[provider, "CPUExecutionProvider"])
    except Exception:
        return False
    return sess.get_providers()[0] == provider


@contextlib.contextmanager
def _ort_quiet(active: bool) -> Iterator[None]:
    """ORT logs provider-library load failures through its default logger, not the session's."""
    if not active:
        yield
        return
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)  # ORT's default; it offers no getter to restore from


def _gpu_diagnosis() -> str:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(available):
        return f"this onnxruntime build has no GPU providers ({', '.join(available)}); install onnxruntime-gpu"
    if _cuda_device_count() == 0:
        return "the CUDA driver reports no GPU"
    return "the provider library does not load: check the CUDA/cuDNN/TensorRT versions onnxruntime-gpu needs"
