"""What every benchmark shares: timing, medians, the equivalence check, tables, the machine.

- ``timed(fn, ...)``: wall and process-CPU seconds of one call (after a ``gc.collect``).
- ``median`` / ``spread``: the statistic every table reports and how noisy its samples were.
- ``check_equivalent``: the oracle of every measurement. The reconfigured model must compute
  what ``prunefx.apply_mask`` computes on a deepcopy, on a copy whose norm statistics are
  randomised (torchvision's defaults make some models' logits ~1e-16 and would hide a
  misaligned slice). Results go to ``CHECKS``; ``run_all`` exits 1 when one failed.
- ``Table``: one result table, printed with rich and written as markdown.
- ``machine`` / ``LoadMonitor``: what the numbers were measured on and how loaded it was.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torchvision
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table as RichTable
from torch import nn

import prunefx

T = TypeVar("T")

__all__ = [
    "TOL", "CHECKS", "Check", "Table", "LoadMonitor", "build", "check_equivalent", "console",
    "machine", "median", "progress", "quiet", "randomize_norms", "rel_diff", "spread", "timed",
    "tp_version",
]

TOL = 1e-4  # relative: max|small - reference| / max|reference|

console = Console(stderr=True)


# ---- timing ---------------------------------------------------------------------------------
def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, float, Any]:
    """Wall seconds, process CPU seconds (all threads) and the result of one call."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: Sequence[float]) -> float:
    """(max - min) / median: 0 for perfectly repeatable samples."""
    if len(xs) < 2:
        return 0.0
    return (max(xs) - min(xs)) / statistics.median(xs)


# ---- models ---------------------------------------------------------------------------------
def build(name: str, **kwargs: Any) -> nn.Module:
    """A torchvision model with random weights (seeded), in eval mode."""
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, and random weights for all-zero
    Linear layers (torchvision's ViT classifier starts at zero, which would make every output
    equal its zero bias and hide any difference)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.05)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp_min(torch.finfo(want.dtype).tiny))


# ---- the equivalence oracle -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Check:
    benchmark: str
    model: str
    what: str  # which mask / variant
    rel_err: float

    @property
    def ok(self) -> bool:
        return self.rel_err <= TOL


CHECKS: list[Check] = []


def check_equivalent(benchmark: str, model_name: str, what: str, model: nn.Module,
                     mask: Any, x: torch.Tensor) -> Check:
    """Reconfigure an eval-mode copy of ``model`` with randomised norm statistics under ``mask``
    and compare it with ``apply_mask`` on a deepcopy of the same copy. Every group in ``mask``
    must be exact (use an ``exact_only=True`` mask for transformers)."""
    ref = randomize_norms(copy.deepcopy(model)).eval()
    small = prunefx.reconfigure(ref, mask, example_inputs=x)
    prunefx.apply_mask(ref, mask, example_inputs=x)
    with torch.no_grad():
        err = rel_diff(small.eval()(x), ref(x))
    result = Check(benchmark, model_name, what, err)
    CHECKS.append(result)
    if not result.ok:
        console.print(f"[red]NOT EQUIVALENT[/red] {benchmark} {model_name} ({what}): relative error {err:.3g} > {TOL:g}")
    return result


# ---- tables ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = dataclasses.field(default_factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.headers) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.headers))) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def print(self) -> None:
        table = RichTable(title=self.title)
        for i, h in enumerate(self.headers):
            table.add_column(h, justify="left" if i == 0 else "right")
        for r in self.rows:
            table.add_row(*r)
        Console(width=max(Console().width, 160)).print(table)


def fmt_s(x: float) -> str:
    return "-" if x != x else f"{x:.3f}"


# ---- the machine ----------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def tp_version() -> str | None:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return "?"


def machine() -> str:
    import onnxruntime

    tp = tp_version()
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return (
        f"{cpu_model()}, {os.cpu_count()} cores{mem}; torch {torch.__version__} on "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU'} with {torch.get_num_threads()} intra-op threads, "
        f"torchvision {torchvision.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"torch-pruning {tp or 'not installed'}, prunefx {prunefx.__version__}, Python {platform.python_version()}"
    )


class LoadMonitor:
    """The 1-minute load average, sampled whenever ``sample()`` is called."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.sample()

    def sample(self) -> float:
        self.samples.append(os.getloadavg()[0])
        return self.samples[-1]

    def describe(self) -> str:
        return f"{min(self.samples):.2f} to {max(self.samples):.2f} (median {median(self.samples):.2f})"


# ---- output ---------------------------------------------------------------------------------
def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def tracked(items: Iterable[T], title: str, prefix: str, name: Callable[[T], str] = str) -> Iterator[T]:
    """Each of ``items`` under a progress bar ``title``, the current one shown as ``prefix:
    name(item)``, with warnings quiet while the caller measures it (the loop's body)."""
    items = list(items)
    with progress() as bar:
        task = bar.add_task(title, total=len(items))
        for item in items:
            bar.update(task, description=f"{prefix}: {name(item)}")
            with quiet():
                yield item
            bar.advance(task)


@contextmanager
def quiet() -> Iterator[None]:
    """Torch-Pruning warns about unwrapped parameters, torchvision about weights=None, the
    TorchScript exporter about its deprecation: none is about what is measured."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
