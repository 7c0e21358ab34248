"""ONNX Runtime latency of dense vs reconfigured models, next to the FLOPs ratio.

For each model (torchvision, weights=None, eval) it

1. traces it on one ``batch`` x3x``size``x``size`` input, draws a 50% random mask and
   reconfigures it. The suite (``run_all``) masks the exact groups only
   (``prunefx.masks.random(graph, ratio, exact_only=True)``), so the result is first checked
   against ``apply_mask``; this command, as documented in docs/deploy.md, masks every
   prunable group (a ViT's residual stream too) unless given ``--exact-only``;
2. exports the dense and the reconfigured model with ``prunefx.export_onnx`` (verified in
   ONNX Runtime against PyTorch; the TorchScript exporter by default, because the dynamo
   exporter takes minutes per model on a small CPU and gives the same graph for these models);
3. times ``session.run`` on every provider that works here (``CPUExecutionProvider``, plus
   CUDA and, with ``--tensorrt``, TensorRT where a GPU is usable): ``warmup`` untimed runs,
   then ``repeats`` timed runs, dense and pruned alternating so that load from other
   processes hits both alike. The table shows medians; "spread" is the larger of the two
   interquartile ranges over its median, i.e. how noisy the row was.

Inputs are fed as numpy arrays, so GPU times include the host-to-device copy.

    .venv/bin/python benchmarks/onnx_latency.py                       # the default models, CPU
    .venv/bin/python benchmarks/onnx_latency.py --models resnet50 --repeats 20
    .venv/bin/python benchmarks/onnx_latency.py --markdown /tmp/onnx_latency.md
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prunefx  # noqa: E402
from benchmarks.common import Table, build, check_equivalent, console, median, tracked  # noqa: E402
from prunefx.export import export_onnx, gpu_providers, onnx_session  # noqa: E402

__all__ = ["MODELS", "QUICK_MODELS", "Options", "Row", "measure", "run", "table", "main"]

MODELS = ("resnet50", "mobilenet_v2", "vit_b_16")  # the suite's (run_all); the CLI keeps CLI_MODELS
CLI_MODELS = ("resnet50", "mobilenet_v3_large", "efficientnet_b0", "vit_b_16")
QUICK_MODELS = ("resnet18",)


@dataclass(frozen=True)
class Options:
    ratio: float = 0.5
    size: int = 224
    batch: int = 1
    repeats: int = 30
    warmup: int = 5
    threads: int = 0  # ORT intra-op threads; 0: ORT's default (one per core)
    exporter: str = "torchscript"
    tensorrt: bool = False
    all_groups: bool = False


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
        return median(self.dense_ms) / median(self.pruned_ms)

    @property
    def spread(self) -> float:
        def iqr(xs: list[float]) -> float:
            q = np.percentile(xs, [25, 75])
            return float(q[1] - q[0]) / median(xs)

        return max(iqr(self.dense_ms), iqr(self.pruned_ms))


def measure(name: str, opts: Options, workdir: Path) -> list[Row]:
    model = build(name)
    x = torch.randn(opts.batch, 3, opts.size, opts.size, generator=torch.Generator().manual_seed(0))
    graph = prunefx.trace(model, x)
    mask = prunefx.masks.random(graph, opts.ratio, seed=0, exact_only=not opts.all_groups)
    if not opts.all_groups:
        check_equivalent("onnx", name, f"random {opts.ratio:.0%} of exact groups", model, mask, x)
    small = prunefx.reconfigure(model, mask, graph=graph)
    flops, small_flops = prunefx.count_flops(model, x), prunefx.count_flops(small, x)
    params_ratio = prunefx.count_params(small) / prunefx.count_params(model)

    files = {}
    for kind, m in (("dense", model), ("pruned", small)):
        files[kind] = export_onnx(m, workdir / f"{name}.{kind}.onnx", x, exporter=opts.exporter)
    feed = x.numpy()
    rows = []
    for provider in providers(opts):
        sessions = {kind: session(res.path, provider, opts) for kind, res in files.items()}
        row = Row(name, provider.replace("ExecutionProvider", ""), flops, small_flops / flops, params_ratio,
                  f"{len(mask)}/{len(graph.groups)}", files["pruned"].exporter)
        inputs = {kind: {s.get_inputs()[0].name: feed} for kind, s in sessions.items()}
        for _ in range(opts.warmup):
            for kind, s in sessions.items():
                s.run(None, inputs[kind])
        for _ in range(opts.repeats):
            for kind, times in (("dense", row.dense_ms), ("pruned", row.pruned_ms)):
                t = time.perf_counter()
                sessions[kind].run(None, inputs[kind])
                times.append((time.perf_counter() - t) * 1e3)
        rows.append(row)
        del sessions
        gc.collect()
    return rows


def providers(opts: Options) -> list[str]:
    found = ["CPUExecutionProvider"]
    for p in gpu_providers():
        if p == "CUDAExecutionProvider" or (p == "TensorrtExecutionProvider" and opts.tensorrt):
            found.append(p)
    return found


def session(path: Path, provider: str, opts: Options) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if opts.threads:
        so.intra_op_num_threads = opts.threads
    device = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}[provider]
    trt = {"TensorrtExecutionProvider": {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(path.parent)}}
    return onnx_session(path, device, session_options=so, provider_options=trt)


def run(models: Sequence[str], opts: Options) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in tracked(models, "onnxruntime", "onnx"):
            rows += measure(name, opts, Path(tmp))
            for f in Path(tmp).iterdir():  # a ViT file is 300 MiB; keep one model's files at a time
                f.unlink()
    return rows


def table(rows: Sequence[Row], opts: Options) -> Table:
    t = Table(f"ONNX Runtime latency, batch {opts.batch}x3x{opts.size}x{opts.size}, medians of {opts.repeats} "
              f"(after {opts.warmup} warm-up runs), ORT intra-op threads: {opts.threads or 'default'}",
              ["model", "provider", "exporter", "dense GFLOPs", "FLOPs ratio small/dense", "params ratio",
               "groups masked", "dense (ms)", "pruned (ms)", "speedup", "efficiency", "spread (IQR)"])
    for r in rows:
        t.add(r.model, r.provider, r.exporter, f"{r.flops / 1e9:.2f}", f"{r.flops_ratio:.2f}", f"{r.params_ratio:.2f}",
              r.groups, f"{median(r.dense_ms):.2f}", f"{median(r.pruned_ms):.2f}", f"{r.speedup:.2f}x",
              f"{r.speedup * r.flops_ratio:.2f}", f"{r.spread:.0%}")
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Options()
    parser.add_argument("--models", default=",".join(CLI_MODELS), help="comma-separated torchvision names")
    parser.add_argument("--ratio", type=float, default=d.ratio, help="fraction of each group's channels to drop")
    parser.add_argument("--exact-only", action="store_true", help="mask exact groups only, and check against apply_mask")
    parser.add_argument("--size", type=int, default=d.size)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=d.threads, help="ORT intra-op threads (0: ORT's default, one per core)")
    parser.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default=d.exporter)
    parser.add_argument("--tensorrt", action="store_true", help="also time TensorRT where it works (engine builds take minutes)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table to this file")
    args = parser.parse_args(argv)
    opts = Options(args.ratio, args.size, args.batch, args.repeats, args.warmup, args.threads, args.exporter,
                   args.tensorrt, all_groups=not args.exact_only)
    rows = run([m.strip() for m in args.models.split(",")], opts)
    t = table(rows, opts)
    t.print()
    if args.markdown:
        Path(args.markdown).write_text(t.markdown())
    console.print("efficiency = speedup x FLOPs ratio (1.0: the time falls as much as the FLOPs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
