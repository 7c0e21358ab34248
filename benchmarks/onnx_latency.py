"""ONNX Runtime latency of dense vs reconfigured models, next to the FLOPs ratio.

For each model (torchvision, weights=None, eval) it

1. traces it on one ``--batch`` x3x``--size``x``--size`` input, draws
   ``prunefx.masks.random(graph, --ratio)`` and reconfigures it;
2. exports the dense and the reconfigured model with ``prunefx.export_onnx`` (verified in
   ONNX Runtime; ``--exporter torchscript`` by default, because the dynamo exporter takes
   minutes per model on a small CPU and gives the same graph for these models);
3. times ``session.run`` on every provider that works here (``CPUExecutionProvider``, plus
   CUDA and, with ``--tensorrt``, TensorRT where a GPU is usable): ``--warmup`` untimed runs,
   then ``--repeats`` timed runs, dense and pruned alternating so that load from other
   processes hits both alike. The table shows medians; "spread" is the larger of the two
   interquartile ranges over its median, i.e. how noisy the row was.

Inputs are fed as numpy arrays, so GPU times include the host-to-device copy.

    .venv/bin/python benchmarks/onnx_latency.py                       # the four models, CPU
    .venv/bin/python benchmarks/onnx_latency.py --models resnet50 --repeats 20
    .venv/bin/python benchmarks/onnx_latency.py --markdown docs/onnx_latency.md
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision

import prunefx
from prunefx.export import export_onnx, gpu_providers, onnx_session

__all__ = ["MODELS", "Row", "measure", "main"]

MODELS = ("resnet50", "mobilenet_v3_large", "efficientnet_b0", "vit_b_16")


@dataclass
class Row:
    model: str
    provider: str
    flops: int
    flops_ratio: float
    params_ratio: float
    groups: str  # "masked/total"
    exporter: str
    dense_ms: list[float] = field(default_factory=list)
    pruned_ms: list[float] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return statistics.median(self.dense_ms) / statistics.median(self.pruned_ms)

    @property
    def spread(self) -> float:
        def iqr(xs: list[float]) -> float:
            q = np.percentile(xs, [25, 75])
            return float(q[1] - q[0]) / statistics.median(xs)

        return max(iqr(self.dense_ms), iqr(self.pruned_ms))


def measure(name: str, args: argparse.Namespace, workdir: Path) -> list[Row]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    graph = prunefx.trace(model, x)
    mask = prunefx.masks.random(graph, args.ratio)
    small = prunefx.reconfigure(model, mask, graph=graph)
    flops, small_flops = prunefx.count_flops(model, x), prunefx.count_flops(small, x)
    params_ratio = prunefx.count_params(small) / prunefx.count_params(model)

    files = {}
    for kind, m in (("dense", model), ("pruned", small)):
        res = export_onnx(m, workdir / f"{name}.{kind}.onnx", x, exporter=args.exporter)
        print(f"  {kind}: {res}", file=sys.stderr)
        files[kind] = res
    feed = x.numpy()
    rows = []
    for provider in providers(args):
        sessions = {kind: session(res.path, provider, args) for kind, res in files.items()}
        row = Row(name, provider.replace("ExecutionProvider", ""), flops, small_flops / flops, params_ratio,
                  f"{len(mask)}/{len(graph.groups)}", files["pruned"].exporter)
        inputs = {kind: {s.get_inputs()[0].name: feed} for kind, s in sessions.items()}
        for _ in range(args.warmup):
            for kind, s in sessions.items():
                s.run(None, inputs[kind])
        for _ in range(args.repeats):
            for kind, times in (("dense", row.dense_ms), ("pruned", row.pruned_ms)):
                t = time.perf_counter()
                sessions[kind].run(None, inputs[kind])
                times.append((time.perf_counter() - t) * 1e3)
        rows.append(row)
        del sessions
        gc.collect()
    return rows


def providers(args: argparse.Namespace) -> list[str]:
    found = ["CPUExecutionProvider"]
    for p in gpu_providers():
        if p == "CUDAExecutionProvider" or (p == "TensorrtExecutionProvider" and args.tensorrt):
            found.append(p)
    return found


def session(path: Path, provider: str, args: argparse.Namespace) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if args.threads:
        so.intra_op_num_threads = args.threads
    device = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}[provider]
    trt = {"TensorrtExecutionProvider": {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(path.parent)}}
    return onnx_session(path, device, session_options=so, provider_options=trt)


def markdown(rows: list[Row], args: argparse.Namespace, command: str) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} / {os.cpu_count()} cores, "
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, batch {args.batch}x3x{args.size}x{args.size}, "
        f"{args.repeats} timed runs after {args.warmup} warm-up runs, intra-op threads: {args.threads or 'ORT default'}.",
        "",
        f"    {command}",
        "",
        "| model | provider | dense GFLOPs | FLOPs ratio | params ratio | groups masked | dense ms | pruned ms | speedup | spread |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.provider} | {r.flops / 1e9:.2f} | {r.flops_ratio:.2f} | {r.params_ratio:.2f} | {r.groups} | "
            f"{statistics.median(r.dense_ms):.2f} | {statistics.median(r.pruned_ms):.2f} | {r.speedup:.2f}x | {r.spread:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision names")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of each prunable group's channels to drop")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default, one per core)")
    parser.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="torchscript")
    parser.add_argument("--tensorrt", action="store_true", help="also time TensorRT where it works (engine builds take minutes)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table to this file")
    args = parser.parse_args(argv)
    command = "python benchmarks/onnx_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    warnings.filterwarnings("ignore")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            print(f"{name} ...", file=sys.stderr)
            rows += measure(name.strip(), args, Path(tmp))
    table = markdown(rows, args, command.strip())
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
