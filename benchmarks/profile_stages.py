"""Where prunefx's time goes, stage by stage, in ``trace`` and ``reconfigure``.

For each model (torchvision, ``weights=None``, eval, one 1x3x224x224 input, the latency
table's setting) it runs ``graph = prunefx.trace(model, x)`` and
``prunefx.reconfigure(model, prunefx.masks.random(graph, 0.5, seed=0), graph=graph)`` and times
every stage separately by wrapping the function that implements it:

- trace: fx symbolic trace of the main mode (``prunefx.tracing.symbolic_trace``), the trace of
  the other train/eval mode (``tracing._trace_other_mode``, compared with the main graph and
  dropped when the code is the same), shape propagation on meta tensors (``shapes.py``),
  channel analysis (``analysis.propagate.analyze``), group building (``analysis.groups``),
  model constraints (transformers heads);
- reconfigure: mask resolution (``mask.resolve_mask``), the plan (``plan.make_plan``), the copy
  of the traced graphs (``RewriteState.start``), each rewrite pass of ``DEFAULT_PIPELINE``
  (its ``run`` and ``verify``), ``record_capture``;
- in both: ``GraphModule.recompile`` (Python code generation plus ``compile``/``exec``),
  reported apart from the stage that calls it.

Times are *exclusive*: a stage's time excludes the wrapped stages it calls, so the rows of a
phase add up to that phase's total; ``rest`` is what no wrapped stage covers. Medians over
``repeats`` runs. ``nn.Module.named_modules`` calls are counted too (one walk of the module
tree each).

    .venv/bin/python -m benchmarks.profile_stages --models efficientnet_b0 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch import nn

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prunefx  # noqa: E402
from benchmarks.common import Table, build, console, median, tracked  # noqa: E402

__all__ = ["MODELS", "QUICK_MODELS", "Clock", "Profile", "instrumented", "profile", "run", "table", "main"]

MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0", "vit_b_16")
QUICK_MODELS = ("mobilenet_v2",)
RATIO = 0.5
INPUT_SHAPE = (1, 3, 224, 224)
CODEGEN = "GraphModule codegen+compile"
REST = "rest"


@dataclasses.dataclass
class Profile:
    """Per-stage samples of one model: ``seconds[(phase, stage)]`` holds one value per repeat."""

    model: str
    nodes: int
    seconds: dict[tuple[str, str], list[float]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    named_modules_calls: int = 0  # per trace + reconfigure

    def stages(self, phase: str) -> list[str]:
        return [s for p, s in self.seconds if p == phase]

    def median(self, phase: str, stage: str) -> float:
        return median(self.seconds.get((phase, stage), []))

    def total(self, phase: str) -> float:
        return median([sum(v) for v in zip(*(self.seconds[(phase, s)] for s in self.stages(phase)), strict=True)])


class Clock:
    """Exclusive wall time per stage: a wrapped call's time is charged to its stage and taken
    off the stage that called it."""

    def __init__(self) -> None:
        self.phase = ""
        self.spent: dict[tuple[str, str], float] = defaultdict(float)
        self._stack: list[str] = []

    def wrap(self, fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            parent = self._stack[-1] if self._stack else "_outside"
            self._stack.append(stage)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self._stack.pop()
                self.spent[(self.phase, stage)] += dt
                self.spent[(self.phase, parent)] -= dt

        return timed

    def run(self, phase: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.phase = phase
        return self.wrap(fn, REST)(*args, **kwargs)


def _stages() -> list[tuple[Any, str, str]]:
    """(owner, attribute, stage) of every wrapped function, looked up where its caller finds it."""
    from prunefx import tracing
    from prunefx.passes import DEFAULT_PIPELINE, RewriteState

    graph_mod = importlib.import_module("prunefx.graph")
    reconf_mod = importlib.import_module("prunefx.reconfigure")  # `prunefx.reconfigure` is also the function

    out: list[tuple[Any, str, str]] = [
        (graph_mod, "symbolic_trace", "fx trace, main mode"),
        (tracing, "_trace_other_mode", "fx trace, other train/eval mode"),
        (graph_mod, "propagate_shapes", "shape propagation"),
        (graph_mod, "analyze", "channel analysis"),
        (graph_mod, "_model_constraints", "model constraints"),
        (graph_mod, "build_groups", "groups"),
        (reconf_mod, "resolve_mask", "mask resolution"),
        (reconf_mod, "make_plan", "plan"),
        (RewriteState, "start", "copy traced graphs"),
        (reconf_mod, "record_capture", "record capture"),
        (fx.GraphModule, "recompile", CODEGEN),
    ]
    for p in DEFAULT_PIPELINE.passes:
        out += [(type(p), "run", f"pass {p.name}"), (type(p), "verify", f"pass {p.name}")]
    return out


def _restore(owner: Any, attr: str, own: Any) -> None:
    if own is None:
        delattr(owner, attr)
    else:
        setattr(owner, attr, own)


@contextmanager
def instrumented(clock: Clock, stages: Sequence[tuple[Any, str, str]],
                 walks: list[int] | None = None) -> Iterator[None]:
    """Every (owner, attribute, stage) of ``stages`` timed by ``clock`` while inside; with
    ``walks``, calls of ``nn.Module.named_modules`` from the top of a tree counted in walks[0]."""
    with ExitStack() as undo:
        for owner, attr, stage in stages:
            own = owner.__dict__.get(attr)  # None: inherited (a pass without its own verify)
            if isinstance(own, (classmethod, staticmethod)):
                setattr(owner, attr, staticmethod(clock.wrap(own.__get__(None, owner), stage)))
            else:
                setattr(owner, attr, clock.wrap(getattr(owner, attr), stage))
            undo.callback(_restore, owner, attr, own)
        if walks is not None:
            walk = nn.Module.named_modules

            def counted(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
                if not args and not kwargs.get("prefix"):  # a walk from the top, not its recursion
                    walks[0] += 1
                return walk(self, *args, **kwargs)

            nn.Module.named_modules = counted  # type: ignore[method-assign]
            undo.callback(setattr, nn.Module, "named_modules", walk)
        yield


def profile(name: str, repeats: int) -> Profile:
    model = build(name)
    x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    graph = prunefx.trace(model, x)  # warm: lazy imports, the first meta kernels
    prunefx.reconfigure(model, prunefx.masks.random(graph, RATIO, seed=0), example_inputs=x, graph=graph)
    prof = Profile(name, nodes=len(graph.module.graph.nodes))
    del graph
    for _ in range(repeats):
        clock, counter = Clock(), [0]
        gc.collect()
        with instrumented(clock, _stages(), counter):
            graph = clock.run("trace", prunefx.trace, model, x)
            mask = prunefx.masks.random(graph, RATIO, seed=0)  # not timed
            gc.collect()
            clock.run("reconfigure", prunefx.reconfigure, model, mask, example_inputs=x, graph=graph)
        for key, s in clock.spent.items():
            if key[1] != "_outside":
                prof.seconds[key].append(max(s, 0.0))
        prof.named_modules_calls = counter[0]
        del graph
    for key in list(prof.seconds):  # a stage absent from some repeat counts 0 there
        prof.seconds[key] += [0.0] * (repeats - len(prof.seconds[key]))
    return prof


def run(models: Sequence[str], repeats: int) -> list[Profile]:
    return [profile(name, repeats) for name in tracked(models, "stages", "stages")]


def table(profiles: Sequence[Profile], repeats: int) -> Table:
    """One row per (phase, stage), one column per model: median ms and share of the phase."""
    t = Table(f"prunefx time per stage, ms (share of its phase), medians of {repeats}",
              ["phase / stage", *(f"{p.model} ({p.nodes} nodes)" for p in profiles)])
    for phase in ("trace", "reconfigure"):
        stages = list(dict.fromkeys(s for p in profiles for s in p.stages(phase)))
        stages.sort(key=lambda s: (s == REST, -max(p.median(phase, s) for p in profiles)))
        for s in stages:
            cells = []
            for p in profiles:
                v, tot = p.median(phase, s), p.total(phase)
                cells.append("-" if v != v else f"{v * 1e3:.1f} ({v / tot:.0%})")
            t.add(f"{phase}: {s}", *cells)
        t.add(f"**{phase} total**", *(f"**{p.total(phase) * 1e3:.1f}**" for p in profiles))
    t.add("named_modules walks", *(str(p.named_modules_calls) for p in profiles))
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", metavar="PATH", help="also write the table as markdown")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t = table(run(args.models, args.repeats), args.repeats)
    t.print()
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(t.markdown())
    console.print("stages are exclusive: each excludes the wrapped stages it calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
