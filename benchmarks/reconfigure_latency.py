"""How long prunefx takes to analyse and shrink a model, next to Torch-Pruning.

For each torchvision model (weights=None, eval, one 1x3x224x224 input) it times, as medians
over ``repeats`` runs:

- prunefx trace + analysis: ``graph = prunefx.trace(model, x)``
- prunefx reconfigure: ``prunefx.reconfigure(model, mask, example_inputs=x, graph=graph)``
  with ``mask = prunefx.masks.random(graph, 0.5, seed=0)`` over every prunable group
  (drawing the mask is not timed)
- Torch-Pruning, when ``torch_pruning`` imports: ``MagnitudePruner(model, x, ...)`` (whose
  constructor is ``DependencyGraph().build_dependency``) and ``pruner.step()`` at
  ``pruning_ratio=0.5`` with the final Linear ignored, on a fresh deepcopy per run (the copy
  is not timed). Attention is declared to it the way its ViT/Swin examples do:
  ``num_heads={attention: heads}`` (``nn.MultiheadAttention``, Swin's ``qkv``), head dims
  pruned. When it raises or does not finish within ``tp_timeout`` seconds the row says so.
- the copy limit: copying the same kept bytes with one ``index_select`` per pruned dim of each
  tensor (``clone`` for an unpruned one), the indices read from the reconfigured model's
  layout record; ``reconfigure / copy`` says how far the rewrite is from that limit.
- the fx floor: what any rewrite through torch.fx pays before doing its own work, i.e. fx's
  plain ``torch.fx.Tracer().trace(model)``, the reconfigured GraphModule's code generation and
  ``compile`` (``small.recompile()``) and the copy limit above. Set against a third of
  Torch-Pruning's time, it shows how much of a 3x budget is left to prunefx's own stages.

Both tools run inside the same repeat loop, one after the other, so load from other
processes hits them alike. Before timing, the model is checked (``common.check_equivalent``)
with a 50% random mask over its exact groups (all groups of a CNN).

    .venv/bin/python -m benchmarks.reconfigure_latency --models resnet18 vit_b_16
    .venv/bin/python benchmarks/reconfigure_latency.py --quick
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.fx as fx
from torch import nn

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prunefx  # noqa: E402
from benchmarks.common import (
    Table,
    build,
    check_equivalent,
    console,
    fmt_s,
    median,
    quiet,
    spread,
    timed,
    tracked,  # noqa: E402
)
from prunefx.provenance import layout_of  # noqa: E402

try:
    import torch_pruning as tp
except ImportError:  # optional: the Torch-Pruning columns are left out
    tp = None

__all__ = ["MODELS", "QUICK_MODELS", "Row", "measure", "run", "table", "main"]

MODELS = (
    "resnet18", "resnet50", "resnet152", "densenet121", "mobilenet_v2", "efficientnet_b0",
    "regnet_y_8gf", "vit_b_16", "vit_l_16", "swin_t",
)
QUICK_MODELS = ("resnet18", "mobilenet_v2")
RATIO = 0.5
INPUT_SHAPE = (1, 3, 224, 224)


@dataclasses.dataclass
class Row:
    model: str
    nodes: int
    params: int
    trace: list[float] = dataclasses.field(default_factory=list)
    reconfigure: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)  # process CPU seconds, prunefx total
    tp_build: list[float] = dataclasses.field(default_factory=list)
    tp_prune: list[float] = dataclasses.field(default_factory=list)
    tp_cpu: list[float] = dataclasses.field(default_factory=list)
    kept_params: float = float("nan")
    tp_kept_params: float = float("nan")
    tp_error: str | None = None
    check_error: float = float("nan")
    copy: list[float] = dataclasses.field(default_factory=list)  # the same kept bytes, index_select per tensor
    kept_bytes: int = 0
    fx_trace: list[float] = dataclasses.field(default_factory=list)  # torch.fx.Tracer().trace alone
    codegen: list[float] = dataclasses.field(default_factory=list)  # the result's recompile()

    @property
    def floor(self) -> float:
        """The fx floor, of medians: fx's own trace + the result's codegen and compile + the copy."""
        return median(self.fx_trace) + median(self.codegen) + median(self.copy) if self.codegen else float("nan")

    @property
    def copy_ratio(self) -> float:
        """reconfigure / plain copy of the kept bytes, of medians."""
        return median(self.reconfigure) / median(self.copy) if self.copy else float("nan")

    @property
    def total(self) -> list[float]:
        return [a + b for a, b in zip(self.trace, self.reconfigure, strict=True)]

    @property
    def tp_total(self) -> list[float]:
        return [a + b for a, b in zip(self.tp_build, self.tp_prune, strict=True)]

    @property
    def speedup(self) -> float | None:
        return median(self.tp_total) / median(self.total) if self.tp_total else None

    @property
    def cpu_speedup(self) -> float | None:
        return median(self.tp_cpu) / median(self.cpu) if self.tp_cpu else None

    @property
    def spread(self) -> float:
        return max(spread(s) for s in (self.trace, self.reconfigure, self.copy, self.tp_build, self.tp_prune) if s)


def example_input() -> torch.Tensor:
    return torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(0))


def kept_slices(model: nn.Module, small: nn.Module) -> list[tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]]:
    """For every tensor of ``small``: its source tensor in ``model`` and the kept indices per
    pruned dim (from ``small``'s layout record)."""
    own = dict((*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)))
    records = (layout_of(small) or {}).get("tensors") or {}
    out = []
    for name, _ in (*small.named_parameters(), *small.named_buffers()):
        src = own.get(name)
        if src is None:
            continue
        kept = (records.get(name) or {}).get("kept") or {}
        out.append((src, sorted((int(d), torch.as_tensor(v)) for d, v in kept.items() if v is not None)))
    return out


def copy_kept(slices: list[tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]]) -> list[torch.Tensor]:
    """The copy limit: the kept bytes, one index_select per pruned dim, a clone otherwise."""
    out = []
    with torch.no_grad():
        for src, index in slices:
            t = src.detach()
            if not index:
                t = t.clone()
            for dim, idx in index:
                t = t.index_select(dim, idx)
            out.append(t)
    return out


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- Torch-Pruning --------------------------------------------------------------------------
def _tp_num_heads(model: nn.Module) -> dict[nn.Module, int]:
    heads: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            heads[m] = m.num_heads
        elif type(m).__name__.startswith("ShiftedWindowAttention"):  # torchvision Swin: one qkv Linear
            heads[m.qkv] = m.num_heads
    return heads


class _Timeout(Exception):
    pass


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise _Timeout in the main thread after ``seconds`` (Torch-Pruning is pure Python)."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        raise _Timeout

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _tp_prune(model: nn.Module, x: torch.Tensor) -> tuple[float, float, float]:
    """Wall seconds of Torch-Pruning's dependency graph and of its in-place prune step, and
    the CPU seconds of both."""
    ignored = [[m for m in model.modules() if isinstance(m, nn.Linear)][-1]]  # the classifier
    build_s, build_cpu, pruner = timed(
        tp.pruner.MagnitudePruner, model, x, importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=RATIO, ignored_layers=ignored, num_heads=_tp_num_heads(model),
        prune_head_dims=True, prune_num_heads=False,
    )
    prune_s, prune_cpu, _ = timed(pruner.step)
    with torch.no_grad():
        model(x)  # a pruned model that no longer runs is a failure, not a result
    return build_s, prune_s, build_cpu + prune_cpu


def _tp_error(e: BaseException, timeout: float) -> str:
    if isinstance(e, _Timeout):
        return f"did not finish within {timeout:.0f} s"
    frame = traceback.extract_tb(e.__traceback__)[-1]
    where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
    return f"{type(e).__name__} at {where}: {str(e).splitlines()[0][:140] if str(e) else ''}"


# ---- measurement ----------------------------------------------------------------------------
def measure(name: str, repeats: int, *, with_tp: bool, tp_timeout: float = 90.0,
            check: bool = True) -> Row:
    model = build(name)
    x = example_input()
    graph = prunefx.trace(model, x)
    row = Row(name, nodes=len(graph.module.graph.nodes), params=_n_params(model))
    if check:
        exact = prunefx.masks.random(graph, RATIO, seed=0, exact_only=True)
        row.check_error = check_equivalent("latency", name, "random 50% of exact groups", model, exact, x).rel_err
    for _ in range(repeats):
        t, trace_cpu, graph = timed(prunefx.trace, model, x)
        row.trace.append(t)
        mask = prunefx.masks.random(graph, RATIO, seed=0)
        t, reconf_cpu, small = timed(prunefx.reconfigure, model, mask, example_inputs=x, graph=graph)
        row.reconfigure.append(t)
        row.cpu.append(trace_cpu + reconf_cpu)
        row.kept_params = _n_params(small) / row.params
        if isinstance(small, fx.GraphModule):
            row.codegen.append(timed(small.recompile)[0])
            with prunefx.tracing.attributes_restored(model):
                row.fx_trace.append(timed(fx.Tracer().trace, model)[0])
        slices = kept_slices(model, small)
        del small, graph
        t, _, copies = timed(copy_kept, slices)
        row.copy.append(t)
        row.kept_bytes = sum(c.numel() * c.element_size() for c in copies)
        del copies, slices
        if with_tp and row.tp_error is None:
            victim = copy.deepcopy(model)
            try:
                with quiet(), _deadline(tp_timeout):
                    build_s, prune_s, cpu = _tp_prune(victim, x)
            except Exception as e:  # reported in the table, never a crash of the benchmark
                row.tp_error = _tp_error(e, tp_timeout)
                row.tp_build.clear(), row.tp_prune.clear(), row.tp_cpu.clear()
                console.print(f"  Torch-Pruning on {name}: {row.tp_error}")
            else:
                row.tp_build.append(build_s)
                row.tp_prune.append(prune_s)
                row.tp_cpu.append(cpu)
                row.tp_kept_params = _n_params(victim) / row.params
            del victim
    return row


def warm_up(with_tp: bool) -> None:
    """One-time costs (lazy imports, the first fx trace) belong to neither tool's model time."""
    with quiet():
        measure("resnet18", 1, with_tp=with_tp, check=False)


def run(models: Sequence[str], repeats: int, *, with_tp: bool, tp_timeout: float = 90.0,
        on_row=None, check: bool = True) -> list[Row]:
    warm_up(with_tp)
    rows = []
    for name in tracked(models, "analysis + rewrite latency", "latency"):
        rows.append(measure(name, repeats, with_tp=with_tp, tp_timeout=tp_timeout, check=check))
        if on_row:
            on_row(rows[-1])
    return rows


def table(rows: Sequence[Row], with_tp: bool, repeats: int) -> Table:
    headers = ["model", "fx nodes", "prunefx trace+analysis (s)", "prunefx reconfigure (s)", "prunefx total (s)",
               "copy of kept bytes (s)", "reconfigure / copy", "fx floor (s)"]
    if with_tp:
        headers += ["TP build_dependency (s)", "TP prune step (s)", "TP total (s)",
                    "speedup TP/prunefx (wall)", "speedup (CPU time)"]
    headers += ["params kept prunefx" + (" / TP" if with_tp else ""), "spread", "check rel err"]
    t = Table(f"analysis + rewrite latency, medians of {repeats}", headers)
    for r in rows:
        cells = [r.model, r.nodes, fmt_s(median(r.trace)), fmt_s(median(r.reconfigure)), fmt_s(median(r.total)),
                 fmt_s(median(r.copy)), f"{r.copy_ratio:.1f}x", fmt_s(r.floor) if r.codegen else "-"]
        if with_tp:
            if r.tp_error:
                cells += [f"failed: {r.tp_error}", "-", "-", "-", "-"]
            else:
                cells += [fmt_s(median(r.tp_build)), fmt_s(median(r.tp_prune)), fmt_s(median(r.tp_total)),
                          f"{r.speedup:.1f}x", f"{r.cpu_speedup:.1f}x"]
        kept = f"{r.kept_params:.3f}" + (f" / {r.tp_kept_params:.3f}" if with_tp and not r.tp_error else "")
        cells += [kept, f"{r.spread:.0%}", "-" if r.check_error != r.check_error else f"{r.check_error:.1e}"]
        t.add(*cells)
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_MODELS)}, 2 repeats")
    ap.add_argument("--models", nargs="+", choices=MODELS + ("resnet34", "resnet101", "densenet201", "vit_h_14"))
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--no-tp", action="store_true", help="leave Torch-Pruning out even if installed")
    ap.add_argument("--tp-timeout", type=float, default=90.0, help="seconds before a Torch-Pruning run counts as failed")
    ap.add_argument("--markdown", metavar="PATH", help="also write the table as markdown")
    args = ap.parse_args(argv)
    with_tp = tp is not None and not args.no_tp
    if tp is None and not args.no_tp:
        console.print("torch_pruning is not installed: Torch-Pruning columns left out")
    repeats = args.repeats or (2 if args.quick else 3)
    rows = run(args.models or (QUICK_MODELS if args.quick else MODELS), repeats, with_tp=with_tp, tp_timeout=args.tp_timeout)
    t = table(rows, with_tp, repeats)
    t.print()
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(t.markdown())
    return 0 if all(r.check_error <= 1e-4 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
