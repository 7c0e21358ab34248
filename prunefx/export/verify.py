"""Verification: ONNX Runtime on every reference batch, each output compared with PyTorch.

The rule: the file fails when ``max|onnx - torch| > atol + rtol * max|torch|`` for any output
at any batch size, or when an output's shape differs (a size frozen at export); the error
names the output, the batch size, the largest difference and where it is. NaN where PyTorch
has NaN is agreement. The verification runs on CUDA when a GPU is usable, never on TensorRT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from prunefx.errors import ExportError
from prunefx.export.inputs import _Batch
from prunefx.export.sessions import _usable_gpu_providers, onnx_session

__all__: list[str] = []


def _verify(file: Path, batches: list[_Batch], in_names: list[str], out_names: list[str], rtol: float, atol: float, device: str) -> tuple[tuple[float, float], list[str]]:
    """Run ``file`` in ONNX Runtime on every batch and compare each output with PyTorch's.
    Returns (max |diff|, max relative diff) over all outputs and batches, and the providers.
    An input the graph does not read (an exporter may drop it) is not fed."""
    if device.split(":")[0] in ("auto", "tensorrt"):
        device = "cuda" + device[len(device.split(":")[0]):] if _usable_gpu_providers() else "cpu"
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # a failing run is reported in the ExportError, not logged by ORT
    so.intra_op_num_threads = torch.get_num_threads()  # the thread budget PyTorch was given
    sess = onnx_session(file, device=device, provider_options={"CUDAExecutionProvider": {"use_tf32": "0"}}, session_options=so)
    feeds = {i.name for i in sess.get_inputs()}
    worst_abs = worst_rel = 0.0
    for batch in batches:
        try:
            got = sess.run(None, {n: x.detach().cpu().numpy() for n, x in zip(in_names, batch.inputs, strict=True) if n in feeds})
        except Exception as exc:
            raise ExportError(f"ONNX Runtime cannot run the exported file at {batch.describe()}: {exc}") from exc
        if len(got) != len(batch.outputs):
            raise ExportError(f"the exported file has {len(got)} outputs, PyTorch returns {len(batch.outputs)}")
        for name, ours, ref in zip(out_names, got, batch.outputs, strict=True):
            expected = ref.detach().float().cpu().numpy() if ref.is_floating_point() else ref.detach().cpu().numpy()
            if tuple(ours.shape) != tuple(expected.shape):
                raise ExportError(
                    f"output '{name}' has shape {tuple(ours.shape)} in ONNX Runtime but {tuple(expected.shape)} in PyTorch "
                    f"at {batch.describe()}: a shape was frozen at export"
                )
            diff = np.abs(ours.astype(np.float64) - expected.astype(np.float64))
            peak = float(np.abs(expected).max()) if expected.size else 0.0
            biggest = float(diff.max()) if diff.size else 0.0
            if not np.isfinite(biggest) and not np.array_equal(np.isnan(ours), np.isnan(expected)):
                biggest = float("inf")
            rel = biggest / peak if peak > 0 else biggest
            worst_abs, worst_rel = max(worst_abs, biggest), max(worst_rel, rel)
            if biggest > atol + rtol * peak:
                at = tuple(int(i) for i in np.unravel_index(int(np.nanargmax(diff)), diff.shape)) if diff.size else ()
                raise ExportError(
                    f"ONNX Runtime ({', '.join(sess.get_providers())}) does not reproduce PyTorch: output '{name}' at "
                    f"{batch.describe()} differs by up to {biggest:.3g} (relative {rel:.3g}, at index {at}; allowed "
                    f"{atol:g} + {rtol:g} * {peak:.3g})"
                )
    return (worst_abs, worst_rel), sess.get_providers()
