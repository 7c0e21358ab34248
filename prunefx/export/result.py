"""``ExportResult``: what ``export_onnx`` wrote and how well ONNX Runtime reproduced PyTorch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ExportResult"]


@dataclass(frozen=True)
class ExportResult:
    """What ``export_onnx`` wrote and how well ONNX Runtime reproduced PyTorch."""

    path: Path
    exporter: str  # "dynamo" or "torchscript"
    exporter_reason: str  # why this exporter: success of the first choice, or why it was skipped
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_batch: bool
    fp16: bool
    simplified: bool
    file_size: int  # bytes, external data included
    external_data: Path | None = None
    max_abs_diff: float | None = None  # None without verify
    max_rel_diff: float | None = None  # max |onnx - torch| / max |torch|, worst output and batch
    verified_batches: tuple[int, ...] = ()  # the batch size of each verification run
    verified_sizes: tuple[Mapping[str, int], ...] = ()  # every dynamic axis's size in each run
    dynamic_axes: Mapping[str, Mapping[int, str]] = field(default_factory=dict)  # input/output name -> {dim: axis}
    providers: tuple[str, ...] = ()  # the ONNX Runtime providers the verification ran on
    warnings: tuple[str, ...] = ()  # exporter warnings worth reading (TorchScript tracer warnings)
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds per step

    @property
    def max_diff(self) -> float | None:
        return self.max_abs_diff

    def __str__(self) -> str:
        size = f"{self.file_size / 2**20:.1f} MiB"
        head = f"{self.path} ({size}, opset {self.opset}, {self.exporter} exporter"
        head += ", fp16" if self.fp16 else ""
        axes = list(dict.fromkeys(a for dims in self.dynamic_axes.values() for a in dims.values()))
        if self.dynamic_batch and "batch" not in axes:
            axes.insert(0, "batch")
        head += f", dynamic {', '.join(axes)})" if axes else ")"
        if self.max_rel_diff is None:
            return f"{head}; not verified"
        where = [f"batch {'/'.join(str(b) for b in self.verified_batches)}"]
        if self.verified_sizes:
            where += [f"{a} {'/'.join(str(s[a]) for s in self.verified_sizes)}" for a in self.verified_sizes[0] if a != "batch"]
        return (
            f"{head}; verified in ONNX Runtime ({', '.join(self.providers)}) at {', '.join(where)}: "
            f"max |diff| {self.max_abs_diff:.3g}, relative {self.max_rel_diff:.3g}"
        )
