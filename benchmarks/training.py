"""Training speed of a reconfigured model against the FLOPs limit, and its memory.

For each model it reconfigures a 50% random mask over the *exact* groups
(``prunefx.masks.random(graph, 0.5, exact_only=True)``; for ViT that is heads and MLP
channels, the residual stream is kept) and, separately, the same mask with ``round_to=8``
(keep counts rounded to multiples of 8). Then, per variant:

- **step time**: one SGD training step (``zero_grad``, forward, cross-entropy, backward,
  ``SGD(momentum=0.9).step()``) on a fixed batch, after two untimed warm-up steps. The repeats
  are interleaved (dense, small, small/round_to=8, dense, ...) so load from other processes
  hits every variant alike; the table shows medians.
- **training FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` around forward + backward
  of one step (the optimizer adds no matmul/conv FLOPs).
- **efficiency** = (dense time / small time) / (dense FLOPs / small FLOPs): 1.0 means the
  wall-clock gain is all the FLOPs reduction promises.
- **memory**: on CUDA ``torch.cuda.max_memory_allocated``. On the CPU there is no allocator
  statistic, so it reports the bytes of the activations autograd saves for backward in one
  step (``torch.autograd.graph.saved_tensors_hooks``, summed over distinct storages,
  parameters excluded), which is what grows with batch size and what pruning removes,
  plus the persistent training state (parameters + gradients + momentum).

    .venv/bin/python -m benchmarks.training --models resnet50 --repeats 12
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import prunefx
from benchmarks.common import (
    Table,
    build,
    check_equivalent,
    console,
    median,
    spread,
    tracked,
)

__all__ = ["MODELS", "QUICK_MODELS", "Variant", "Result", "measure", "run", "table", "op_profile", "main"]

# name -> (torchvision kwargs, batch, resolution)
MODELS: dict[str, tuple[dict[str, Any], int, int]] = {
    "resnet50": ({}, 8, 112),
    "mobilenet_v2": ({}, 8, 112),
    "vit_b_16": ({"image_size": 112}, 8, 112),
}
QUICK_MODELS: dict[str, tuple[dict[str, Any], int, int]] = {
    "resnet18": ({}, 2, 64),
    "mobilenet_v2": ({}, 2, 64),
}
RATIO = 0.5


@dataclasses.dataclass
class Variant:
    label: str
    model: nn.Module
    opt: torch.optim.Optimizer
    flops: int = 0
    params: int = 0
    saved_bytes: int = 0
    state_bytes: int = 0
    peak_cuda_bytes: int | None = None
    times: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Result:
    model: str
    batch: int
    size: int
    variants: list[Variant]
    round_to_same: bool  # round_to=8 gave the same mask as round_to=1

    def speedup(self, v: Variant) -> float:
        return median(self.variants[0].times) / median(v.times)

    def flops_ratio(self, v: Variant) -> float:
        return self.variants[0].flops / v.flops

    def efficiency(self, v: Variant) -> float:
        return self.speedup(v) / self.flops_ratio(v)


def _step(v: Variant, x: torch.Tensor, y: torch.Tensor) -> None:
    v.opt.zero_grad(set_to_none=True)
    F.cross_entropy(v.model(x), y).backward()
    v.opt.step()


def _count(v: Variant, x: torch.Tensor, y: torch.Tensor) -> None:
    """One untimed step that counts training FLOPs and the bytes saved for backward."""
    params = {p.untyped_storage().data_ptr() for p in v.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    v.opt.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(v.model(x), y)
        loss.backward()
    v.opt.step()
    v.flops = int(counter.get_total_flops())
    v.saved_bytes = sum(seen.values())
    v.params = sum(p.numel() for p in v.model.parameters())
    v.state_bytes = 3 * sum(p.numel() * p.element_size() for p in v.model.parameters())  # weights, grads, momentum


def _variant(label: str, model: nn.Module) -> Variant:
    model.train()
    return Variant(label, model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9))


def _masks(graph: prunefx.PruneGraph) -> tuple[dict, dict]:
    plain = prunefx.masks.random(graph, RATIO, seed=0, exact_only=True)
    rounded = prunefx.masks.random(graph, RATIO, seed=0, exact_only=True, round_to=8)
    return plain, rounded


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def measure(name: str, repeats: int, *, kwargs: dict[str, Any], batch: int, size: int) -> Result:
    model = build(name, **kwargs)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)
    graph = prunefx.trace(model, x[:1])
    plain, rounded = _masks(graph)
    check_equivalent("training", name, "random 50% of exact groups", model, plain, x[:2])
    variants = [_variant("dense", model),
                _variant("50% exact", prunefx.reconfigure(model, plain, example_inputs=x[:1], graph=graph))]
    same = _same(plain, rounded)
    if not same:
        check_equivalent("training", name, "random 50% of exact groups, round_to=8", model, rounded, x[:2])
        variants.append(_variant("50% exact, round_to=8",
                                 prunefx.reconfigure(model, rounded, example_inputs=x[:1], graph=graph)))
    for v in variants:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        _count(v, x, y)
        _step(v, x, y)  # second warm-up: the allocator and oneDNN caches settle
        if torch.cuda.is_available():
            v.peak_cuda_bytes = torch.cuda.max_memory_allocated()
    for _ in range(repeats):
        for v in variants:
            t = time.perf_counter()
            _step(v, x, y)
            v.times.append(time.perf_counter() - t)
    return Result(name, batch, size, variants, same)


def run(models: dict[str, tuple[dict[str, Any], int, int]], repeats: int) -> list[Result]:
    results = []
    for name in tracked(models, "training steps", "training"):
        kwargs, batch, size = models[name]
        results.append(measure(name, repeats, kwargs=kwargs, batch=batch, size=size))
    return results


def table(results: Sequence[Result], repeats: int) -> Table:
    t = Table(f"training step, medians of {repeats} interleaved repeats",
              ["model", "batch", "variant", "params (M)", "train GFLOPs", "FLOPs ratio dense/small", "step (ms)",
               "speedup dense/small", "efficiency", "saved activations (MiB)", "params+grads+momentum (MiB)", "spread"])
    for r in results:
        for v in r.variants:
            dense = v is r.variants[0]
            t.add(r.model, f"{r.batch}x3x{r.size}x{r.size}", v.label, f"{v.params / 1e6:.2f}", f"{v.flops / 1e9:.2f}",
                  "1" if dense else f"{r.flops_ratio(v):.2f}", f"{1e3 * median(v.times):.1f}",
                  "1" if dense else f"{r.speedup(v):.2f}x", "-" if dense else f"{r.efficiency(v):.2f}",
                  f"{v.saved_bytes / 2**20:.1f}", f"{v.state_bytes / 2**20:.1f}", f"{spread(v.times):.0%}")
        if r.round_to_same:
            t.add(r.model, "", "50% exact, round_to=8", "same mask as round_to=1: every kept count already a multiple of 8",
                  "", "", "", "", "", "", "", "")
    return t


def op_profile(result: Result, repeats: int = 3, top: int = 12) -> Table:
    """Where a training step of the dense and the small model spends its time, per aten op
    (torch.profiler self CPU time, summed over ``repeats`` steps)."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(result.batch, 3, result.size, result.size, generator=gen)
    y = torch.randint(0, 1000, (result.batch,), generator=gen)
    per_op: dict[str, list[float]] = {}
    dense, small = result.variants[0], result.variants[1]
    for i, v in enumerate((dense, small)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                _step(v, x, y)
        for evt in prof.key_averages():
            if evt.key.startswith("aten::") or evt.key.startswith("Optimizer"):
                per_op.setdefault(evt.key, [0.0, 0.0])[i] += evt.self_cpu_time_total / 1e3 / repeats
    total = [sum(v[i] for v in per_op.values()) for i in (0, 1)]
    t = Table(f"{result.model}: self CPU time per training step by op (torch.profiler, {repeats} steps)",
              ["op", "dense (ms)", "share dense", "small (ms)", "share small", "dense/small"])
    for op, (d, s) in sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top]:
        t.add(op, f"{d:.1f}", f"{d / total[0]:.0%}", f"{s:.1f}", f"{s / total[1]:.0%}", f"{d / s:.2f}x" if s else "-")
    t.add("all ops", f"{total[0]:.1f}", "100%", f"{total[1]:.1f}", "100%", f"{total[0] / total[1]:.2f}x")
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="+", choices=list(MODELS) + list(QUICK_MODELS))
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--profile", action="store_true", help="also print a per-op profile of each model")
    args = ap.parse_args(argv)
    every = {**QUICK_MODELS, **MODELS}
    models = {m: every[m] for m in args.models} if args.models else (QUICK_MODELS if args.quick else MODELS)
    results = run(models, args.repeats)
    table(results, args.repeats).print()
    if args.profile:
        for r in results:
            op_profile(r).print()
    console.print("efficiency = (dense time / small time) / (dense FLOPs / small FLOPs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
