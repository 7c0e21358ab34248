"""How long prunefx takes to analyse and shrink torchvision CNNs, next to Torch-Pruning.

For each model (weights=None, eval, one 1x3x224x224 input) it times, as medians over
``--repeats`` runs:

- prunefx trace + analysis: ``prunefx.trace(model, x)``
- prunefx reconfigure: ``prunefx.reconfigure(model, mask, example_inputs=x, graph=graph)``
  with ``mask = prunefx.masks.random(graph, 0.5)`` (mask drawing is not timed)
- Torch-Pruning, when ``torch_pruning`` imports: ``MagnitudePruner(...)`` (whose constructor
  is ``DependencyGraph().build_dependency(model, example_inputs=x)``) and then
  ``pruner.step()`` at ``pruning_ratio=0.5`` with the final Linear ignored, on a fresh
  deepcopy per run (the copy is not timed). Both tools run inside the same repeat loop,
  one after the other, so load from other processes hits them alike.

"speedup" is Torch-Pruning total / prunefx total. "spread" is the worst (max - min) / median
over the timed quantities of a row: how noisy that row was.

With ``--check`` (the default) each model is first reconfigured with the same kind of mask
on a copy whose norm statistics are randomised (the torchvision defaults make the logits
of some models ~1e-16 and would hide misaligned slices), and its output is compared with
``prunefx.apply_mask`` on a deepcopy; a relative error above ``--tol`` exits with status 1
before anything is timed.

    .venv/bin/python benchmarks/reconfigure_latency.py                  # all models, 5 repeats
    .venv/bin/python benchmarks/reconfigure_latency.py --quick          # resnet18/50, 3 repeats
    .venv/bin/python benchmarks/reconfigure_latency.py --markdown out.md
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch import nn

import prunefx

try:
    import torch_pruning as tp
except ImportError:  # optional: the Torch-Pruning columns are left out
    tp = None

__all__ = ["MODELS", "QUICK_MODELS", "Row", "measure", "main"]

MODELS = (
    "resnet18", "resnet50", "resnet152", "densenet121", "densenet201",
    "mobilenet_v2", "efficientnet_b0", "regnet_y_8gf",
)
QUICK_MODELS = ("resnet18", "resnet50")
RATIO = 0.5
INPUT_SHAPE = (1, 3, 224, 224)


@dataclasses.dataclass
class Row:
    model: str
    nodes: int
    trace: list[float] = dataclasses.field(default_factory=list)
    reconfigure: list[float] = dataclasses.field(default_factory=list)
    tp_build: list[float] = dataclasses.field(default_factory=list)
    tp_prune: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)  # process CPU seconds, prunefx total
    tp_cpu: list[float] = dataclasses.field(default_factory=list)
    kept_params: float = float("nan")  # prunefx result / original
    tp_kept_params: float = float("nan")
    check_error: float | None = None

    @property
    def total(self) -> list[float]:
        return [a + b for a, b in zip(self.trace, self.reconfigure, strict=True)]

    @property
    def tp_total(self) -> list[float]:
        return [a + b for a, b in zip(self.tp_build, self.tp_prune, strict=True)]

    @property
    def speedup(self) -> float | None:
        if not self.tp_total:
            return None
        return statistics.median(self.tp_total) / statistics.median(self.total)

    @property
    def cpu_speedup(self) -> float | None:
        if not self.tp_cpu:
            return None
        return statistics.median(self.tp_cpu) / statistics.median(self.cpu)

    @property
    def spread(self) -> float:
        series = [s for s in (self.trace, self.reconfigure, self.tp_build, self.tp_prune) if s]
        return max((max(s) - min(s)) / statistics.median(s) for s in series)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def example_input() -> torch.Tensor:
    return torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(0))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _final_linear(model: nn.Module) -> nn.Module:
    # The classifier's 1000 outputs are the model's output; prunefx pins them, so TP must too.
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SystemExit(f"{type(model).__name__} has no nn.Linear to keep out of Torch-Pruning")
    return linears[-1]


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, float, Any]:
    """Wall seconds, process CPU seconds (all threads) and the result of one call."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def _randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def check(model: nn.Module, x: torch.Tensor) -> float:
    """max|reconfigured - apply_mask| / max|apply_mask| for a random 50% mask."""
    model = _randomize_norms(copy.deepcopy(model))
    graph = prunefx.trace(model, x)
    mask = prunefx.masks.random(graph, RATIO, seed=0)
    small = prunefx.reconfigure(model, mask, example_inputs=x, graph=graph)
    ref = prunefx.apply_mask(copy.deepcopy(model), mask, example_inputs=x)
    with torch.no_grad():
        got, want = small(x), ref(x)
    if got.shape != want.shape:
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp_min(torch.finfo(want.dtype).tiny))


def _tp_prune(model: nn.Module, x: torch.Tensor) -> tuple[float, float, float]:
    """Wall seconds to build Torch-Pruning's dependency graph and to prune ``model`` in place,
    and the CPU seconds of both."""
    ignored = [_final_linear(model)]
    build_s, build_cpu, pruner = _timed(
        tp.pruner.MagnitudePruner, model, x, importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=RATIO, ignored_layers=ignored,
    )
    prune_s, prune_cpu, _ = _timed(pruner.step)
    return build_s, prune_s, build_cpu + prune_cpu


def measure(name: str, repeats: int, *, with_tp: bool, do_check: bool, tol: float) -> Row:
    model = build(name)
    x = example_input()
    graph = prunefx.trace(model, x)
    row = Row(name, nodes=len(graph.module.graph.nodes))
    if do_check:
        row.check_error = check(model, x)
        if not row.check_error <= tol:
            raise SystemExit(
                f"{name}: prunefx.reconfigure differs from apply_mask by {row.check_error:.3g} "
                f"(relative, tolerance {tol:g}); the timings would describe a wrong result. "
                "Reproduce with tests/zoo.py check_exact."
            )
    for _ in range(repeats):
        t, trace_cpu, graph = _timed(prunefx.trace, model, x)
        row.trace.append(t)
        mask = prunefx.masks.random(graph, RATIO, seed=0)
        t, reconf_cpu, small = _timed(prunefx.reconfigure, model, mask, example_inputs=x, graph=graph)
        row.reconfigure.append(t)
        row.cpu.append(trace_cpu + reconf_cpu)
        row.kept_params = _n_params(small) / _n_params(model)
        del small, graph
        if with_tp:
            victim = copy.deepcopy(model)
            build_s, prune_s, cpu = _tp_prune(victim, x)
            row.tp_build.append(build_s)
            row.tp_prune.append(prune_s)
            row.tp_cpu.append(cpu)
            with torch.no_grad():
                if victim(x).shape != (1, 1000):
                    raise SystemExit(f"{name}: the Torch-Pruning result no longer gives 1000 logits")
            row.tp_kept_params = _n_params(victim) / _n_params(model)
            del victim
    return row


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f}" if xs else "-"


# (short header for the terminal, long header for markdown)
COLUMNS = (
    ("model", "model"),
    ("nodes", "fx nodes"),
    ("pfx trace", "prunefx trace+analysis (s)"),
    ("pfx reconf", "prunefx reconfigure (s)"),
    ("pfx total", "prunefx total (s)"),
    ("TP build", "TP build_dependency (s)"),
    ("TP prune", "TP prune step (s)"),
    ("TP total", "TP total (s)"),
    ("speedup", "speedup (TP / prunefx, wall)"),
    ("CPU speedup", "speedup (TP / prunefx, CPU time)"),
    ("kept pfx/TP", "params kept prunefx / TP"),
    ("spread", "spread (max-min)/median"),
)
TP_ONLY = {"TP build", "TP prune", "TP total", "speedup", "CPU speedup"}


def _cells(row: Row, with_tp: bool) -> list[str]:
    kept = f"{row.kept_params:.3f}" + (f" / {row.tp_kept_params:.3f}" if with_tp else "")
    cells = {  # keyed by the short column names
        "model": row.model,
        "nodes": str(row.nodes),
        "pfx trace": _med(row.trace),
        "pfx reconf": _med(row.reconfigure),
        "pfx total": _med(row.total),
        "TP build": _med(row.tp_build),
        "TP prune": _med(row.tp_prune),
        "TP total": _med(row.tp_total),
        "speedup": f"{row.speedup:.1f}x" if row.speedup else "-",
        "CPU speedup": f"{row.cpu_speedup:.1f}x" if row.cpu_speedup else "-",
        "kept pfx/TP": kept,
        "kept": kept,
        "spread": f"{row.spread:.0%}",
    }
    return [cells[short] for short, _ in _columns(with_tp)]


def _columns(with_tp: bool) -> list[tuple[str, str]]:
    if with_tp:
        return list(COLUMNS)
    renamed = {"kept pfx/TP": ("kept", "params kept")}
    return [renamed.get(s, (s, long)) for s, long in COLUMNS if s not in TP_ONLY]


def source_state() -> str:
    """Which prunefx is measured: its directory, commit, and whether it has uncommitted edits.
    Read once at start-up: the code imported then is the code timed."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(prunefx.__file__)))
    try:
        git = ["git", "-C", root]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "prunefx", "passes"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"prunefx from {root} (not a git checkout)"
    return f"prunefx at commit {head}" + (" plus uncommitted edits" if dirty else "")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    tp_version = f", torch-pruning {_tp_version()}" if tp is not None else ", torch-pruning not installed"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"torchvision {torchvision.__version__}, prunefx {prunefx.__version__}{tp_version}, "
        f"Python {platform.python_version()}"
    )


def _tp_version() -> str:
    try:
        from importlib.metadata import version

        return version("torch-pruning")
    except Exception:  # a source checkout has no metadata
        return getattr(tp, "__version__", "?")


def to_markdown(rows: list[Row], with_tp: bool, repeats: int, loads: list[float], source: str) -> str:
    headers = [long for _, long in _columns(with_tp)]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|",
    ]
    lines += ["| " + " | ".join(_cells(r, with_tp)) + " |" for r in rows]
    lines += [
        "",
        f"Medians of {repeats} runs, input {INPUT_SHAPE}, {RATIO:.0%} random mask, {source}.",
        f"{machine()}.",
        f"1-minute load average during the run: {min(loads):.2f} to {max(loads):.2f}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, help="timed runs per model (default 5, 3 with --quick)")
    ap.add_argument("--quick", action="store_true", help="resnet18 and resnet50 only, 3 repeats")
    ap.add_argument("--models", nargs="+", choices=MODELS, help="a subset of the models")
    ap.add_argument("--markdown", metavar="PATH", help="also write the table as markdown")
    ap.add_argument("--json", metavar="PATH", help="also write every sample as JSON")
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                    help="compare reconfigure with apply_mask first; exit 1 on a mismatch (default on)")
    ap.add_argument("--tol", type=float, default=1e-4, help="relative tolerance of --check")
    ap.add_argument("--no-tp", action="store_true", help="leave Torch-Pruning out even if installed")
    args = ap.parse_args(argv)

    models = args.models or (QUICK_MODELS if args.quick else MODELS)
    repeats = args.repeats or (3 if args.quick else 5)
    with_tp = tp is not None and not args.no_tp
    console = Console(stderr=True)
    source = source_state()
    console.print(f"{machine()}; {source}")
    if tp is None and not args.no_tp:
        console.print("torch_pruning is not installed: Torch-Pruning columns left out")

    # Torch-Pruning warns about every unwrapped parameter and torchvision about weights=None;
    # neither is about what is measured.
    warnings.filterwarnings("ignore")
    # One-time costs (lazy imports, first fx trace) belong to neither tool's per-model time.
    measure("resnet18", 1, with_tp=with_tp, do_check=False, tol=args.tol)

    rows, loads = [], [os.getloadavg()[0]]
    for name in models:
        console.print(f"{name} ...", end=" ")
        row = measure(name, repeats, with_tp=with_tp, do_check=args.check, tol=args.tol)
        loads.append(os.getloadavg()[0])
        check_note = f", check rel err {row.check_error:.1e}" if row.check_error is not None else ""
        console.print(f"total {_med(row.total)} s{check_note}, load {loads[-1]:.2f}")
        rows.append(row)

    table = Table(title=f"prunefx reconfigure latency, medians of {repeats} runs")
    for i, (short, _) in enumerate(_columns(with_tp)):
        table.add_column(short, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*_cells(r, with_tp))
    Console(width=max(Console().width, 150)).print(table)
    print(f"1-minute load average during the run: {min(loads):.2f} to {max(loads):.2f}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(rows, with_tp, repeats, loads, source))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "source": source, "repeats": repeats, "load_average": loads,
                       "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
