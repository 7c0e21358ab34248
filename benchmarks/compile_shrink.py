"""What a shrink costs a ``torch.compile``d training loop: the recompilation.

``prunefx.train.shrink(compiled, ...)`` returns the smaller model wrapped with the compiled
module's own dynamo context (same backend and options); its first call compiles again (new
shapes, new parameters: the guards of the old graph fail). This measures, per model and
backend, on the CPU:

- the first training step (forward + backward + SGD step) of the compiled model: the compile
- the steady step (median of ``--steps`` steps after it), compiled and eager
- after each of ``--shrinks`` shrinks (``--ratio`` of every prunable group's channels removed,
  random mask): the shrink itself, the first step (the recompilation) and the steady step;
  the compiled outputs are checked against the eager shrunk model

A probe shrinks a compiled small CNN ``--probe`` times and reports whether dynamo compiled
each shrunk model or fell back to eager once ``torch._dynamo.config.recompile_limit`` was
reached (measured with torch 2.14: every one was compiled; each shrunk GraphModule's
``forward`` is a new code object with its own cache). Results are in docs/integrations.md.

    .venv/bin/python benchmarks/compile_shrink.py                 # ResNet-18 and a small CNN, inductor
    .venv/bin/python benchmarks/compile_shrink.py --quick         # small CNN, aot_eager (seconds)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import prunefx
from prunefx.train import shrink


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "small_cnn": (small_cnn, (16, 3, 32, 32)),
    "resnet18": (resnet18, (16, 3, 64, 64)),
}


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - t0


def steady(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, n: int) -> float:
    return statistics.median(step(model, opt, x, y) for _ in range(n))


def measure(name: str, backend: str, shrinks: int, ratio: float, steps: int) -> dict[str, Any]:
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().train()
    x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    eager = copy.deepcopy(model)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.01, momentum=0.9)
    step(eager, eager_opt, x, y)
    row: dict[str, Any] = {"model": name, "backend": backend, "input": list(shape),
                           "eager_step_s": steady(eager, eager_opt, x, y, steps)}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    compiled = torch.compile(model, backend=backend)
    row["first_step_s"] = step(compiled, opt, x, y)
    row["compiled_step_s"] = steady(compiled, opt, x, y, steps)
    row["shrinks"] = []
    for k in range(shrinks):
        graph = prunefx.trace(compiled._orig_mod, x)
        mask = prunefx.masks.random(graph, ratio, seed=k)
        t0 = time.perf_counter()
        compiled, report = shrink(compiled, mask, example_inputs=x, optimizer=opt)
        shrink_s = time.perf_counter() - t0
        first = step(compiled, opt, x, y)
        compiled.eval()
        with torch.no_grad():
            diff = float((compiled(x) - compiled._orig_mod(x)).abs().max())
        compiled.train()
        eager_small = copy.deepcopy(compiled._orig_mod)
        eager_small_opt = torch.optim.SGD(eager_small.parameters(), lr=0.01, momentum=0.9)
        step(eager_small, eager_small_opt, x, y)
        row["shrinks"].append({
            "params": report.params[1], "shrink_s": shrink_s, "recompile_step_s": first,
            "compiled_step_s": steady(compiled, opt, x, y, steps),
            "eager_step_s": steady(eager_small, eager_small_opt, x, y, steps),
            "max_abs_diff_vs_eager": diff,
        })
    return row


def limit_probe(n: int) -> dict[str, Any]:
    """Shrink a compiled small CNN ``n`` times (backend "eager": only dynamo's tracing and
    guards) and count how many of the shrunk models dynamo still compiled."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = small_cnn().train()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    compiled = torch.compile(model, backend="eager")
    step(compiled, opt, x, y)
    compiled_count = []
    for k in range(n):
        mask = prunefx.masks.random(prunefx.trace(compiled._orig_mod, x), 0.05, seed=k)
        compiled, _ = shrink(compiled, mask, example_inputs=x, optimizer=opt)
        before = counters["stats"]["unique_graphs"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step(compiled, opt, x, y)
        compiled_count.append(counters["stats"]["unique_graphs"] > before)
    return {"recompile_limit": torch._dynamo.config.recompile_limit, "shrinks": n,
            "compiled_after_shrink": compiled_count}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small CNN with aot_eager, one shrink")
    ap.add_argument("--models", nargs="+", default=["small_cnn", "resnet18"], choices=sorted(MODELS))
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--shrinks", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--probe", type=int, default=10, help="shrinks of the recompile-limit probe (0: skip)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = ap.parse_args()
    if args.quick:
        args.models, args.backend, args.shrinks, args.steps, args.probe = ["small_cnn"], "aot_eager", 1, 3, 0
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": []}
    for name in args.models:
        row = measure(name, args.backend, args.shrinks, args.ratio, args.steps)
        results["rows"].append(row)
        print(f"{name} ({args.backend}, input {row['input']}): first compiled step {row['first_step_s']:.2f} s, "
              f"steady {1e3 * row['compiled_step_s']:.1f} ms (eager {1e3 * row['eager_step_s']:.1f} ms)")
        for k, s in enumerate(row["shrinks"], 1):
            print(f"  shrink {k}: {s['params']:,} params, shrink {s['shrink_s']:.2f} s, first step after it "
                  f"(recompile) {s['recompile_step_s']:.2f} s, steady {1e3 * s['compiled_step_s']:.1f} ms "
                  f"(eager {1e3 * s['eager_step_s']:.1f} ms), max |compiled - eager| {s['max_abs_diff_vs_eager']:.1e}")
    if args.probe:
        probe = limit_probe(args.probe)
        results["probe"] = probe
        print(f"recompile limit {probe['recompile_limit']}: of {probe['shrinks']} shrinks, dynamo compiled "
              f"{sum(probe['compiled_after_shrink'])} (the rest ran eagerly): {probe['compiled_after_shrink']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
