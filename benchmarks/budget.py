"""Masks by cost: how long ``prunefx.masks.to_budget`` takes and how close it lands.

For each model (torchvision, ``weights=None``, eval, one 1x3x224x224 input, the latency
table's setting) and each target (``flops=0.5``, ``params=0.5``):

- times ``prunefx.masks.to_budget(graph, "magnitude", flops=0.5)``, median over ``repeats``
  calls, each on a freshly traced ``PruneGraph`` (the trace is not timed): the first call on a
  graph also fills lazy per-group state, so this is what a user's ``trace`` then ``to_budget``
  pays for the latter. One untimed call on a small model first takes imports and first-use
  caches out of every row. The time includes Python's garbage collections during the call,
  whose cost grows with everything the process holds, so the same call can be faster inside
  the whole suite than run alone (or the reverse);
- counts the real reconfigurations made inside those calls (calls of ``plan.make_plan``,
  which every ``reconfigure`` makes once): ``to_budget`` reconfigures and measures only when
  its analytic estimate is approximate (``CostModel.exact`` is False);
- reconfigures with the mask (not timed) and measures what it keeps for real: FLOPs with
  ``prunefx.count_flops`` on the same input, parameters with ``prunefx.count_params``, against
  the dense model. ``error = |achieved - target| / target``; the issue's goal is <= 2% in
  < 1 s on ViT-B/16 for ``flops=0.5``. A miss is reported, not a failure;
- when every group of the ``flops`` mask is exact (the CNNs), checks the reconfigured model
  against ``apply_mask`` (``common.check_equivalent``).

    .venv/bin/python -m benchmarks.budget --models vit_b_16 resnet50 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prunefx  # noqa: E402
from benchmarks.common import Table, build, check_equivalent, fmt_s, median, spread, timed, tracked  # noqa: E402

__all__ = ["MODELS", "QUICK_MODELS", "TARGETS", "Row", "measure", "run", "table", "goal", "main"]

MODELS = ("vit_b_16", "resnet50")
QUICK_MODELS = ("resnet18",)
TARGETS = (("flops", 0.5), ("params", 0.5))
CRITERION = "magnitude"
INPUT_SHAPE = (1, 3, 224, 224)
GOAL_MODEL, GOAL_TARGET = "vit_b_16", ("flops", 0.5)
GOAL_ERROR, GOAL_SECONDS = 0.02, 1.0


@dataclasses.dataclass
class Row:
    model: str
    metric: str  # "flops" or "params"
    target: float
    seconds: list[float] = dataclasses.field(default_factory=list)
    reconfigures: list[int] = dataclasses.field(default_factory=list)  # real ones inside each timed call
    achieved: float = float("nan")  # measured fraction of the dense model
    estimate_exact: bool = False  # CostModel.exact: to_budget needs no real reconfigure for FLOPs

    @property
    def error(self) -> float:
        """|achieved - target| / target."""
        return abs(self.achieved - self.target) / self.target

    @property
    def landed(self) -> bool:
        return self.error <= GOAL_ERROR

    @property
    def call(self) -> str:
        return f"{self.metric}={self.target:g}"


@contextmanager
def counting(owner: Any, attr: str, calls: list[int]) -> Iterator[None]:
    """Calls of ``owner.attr`` (looked up where its caller finds it) counted in ``calls[0]``."""
    real = getattr(owner, attr)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    setattr(owner, attr, counted)
    try:
        yield
    finally:
        setattr(owner, attr, real)


def _achieved(metric: str, model: torch.nn.Module, small: torch.nn.Module, x: torch.Tensor) -> float:
    if metric == "flops":
        return prunefx.count_flops(small, x) / prunefx.count_flops(model, x)
    return prunefx.count_params(small) / prunefx.count_params(model)


def measure(name: str, repeats: int, targets: Sequence[tuple[str, float]] = TARGETS) -> list[Row]:
    model = build(name)
    x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    reconf_mod = importlib.import_module("prunefx.reconfigure")  # `prunefx.reconfigure` is also the function
    rows = []
    for metric, target in targets:
        row = Row(name, metric, target)
        for _ in range(repeats):
            # a fresh graph per call: the first call on a graph also fills its lazy per-group
            # state (e.g. ChannelGroup.members), which a user's one call pays
            graph = prunefx.trace(model, x)
            calls = [0]
            with counting(reconf_mod, "make_plan", calls):
                s, _, mask = timed(prunefx.masks.to_budget, graph, CRITERION, **{metric: target})
            row.seconds.append(s)
            row.reconfigures.append(calls[0])
        row.estimate_exact = prunefx.masks.CostModel.of(graph).exact
        small = prunefx.reconfigure(model, mask, graph=graph)
        row.achieved = _achieved(metric, model, small, x)
        del small
        if metric == "flops" and all(graph.group(g).exact for g in mask):
            check_equivalent("budget", name, f"to_budget {row.call}", model, mask, x)
        rows.append(row)
    return rows


def warm_up() -> None:
    """Imports and first-use caches of the criteria and the cost model belong to no row."""
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prunefx.masks.to_budget(prunefx.trace(build("resnet18"), x), CRITERION, flops=0.5)


def run(models: Sequence[str], repeats: int) -> list[Row]:
    warm_up()
    return [r for name in tracked(models, "to_budget", "to_budget") for r in measure(name, repeats)]


def table(rows: Sequence[Row], repeats: int) -> Table:
    t = Table(f'to_budget(graph, "{CRITERION}", ...) at 224x224, medians of {repeats}',
              ["model", "target", "achieved", "error", "to_budget (s)", "spread", "real reconfigures per call",
               "estimate exact"])
    for r in rows:
        lo, hi = min(r.reconfigures, default=0), max(r.reconfigures, default=0)
        t.add(r.model, r.call, f"{r.achieved:.4f}", f"{r.error:.2%}", fmt_s(median(r.seconds)), f"{spread(r.seconds):.0%}",
              str(lo) if lo == hi else f"{lo} to {hi}", "yes" if r.estimate_exact else "no")
    return t


def goal(rows: Sequence[Row], quick: bool) -> tuple[str, str, str] | None:
    """(goal, measured, reached?) for the goals table; ViT-B/16 is measured only in the full run."""
    if not rows:
        return None
    what = (f"to_budget({GOAL_TARGET[0]}={GOAL_TARGET[1]:g}) on ViT-B/16 within {GOAL_ERROR:.0%} "
            f"in < {GOAL_SECONDS:g} s")
    hit = [r for r in rows if r.model == GOAL_MODEL and (r.metric, r.target) == GOAL_TARGET]
    if not hit:
        others = "; ".join(f"{r.model} {r.call}: {median(r.seconds):.2f} s, error {r.error:.2%}" for r in rows
                           if (r.metric, r.target) == GOAL_TARGET)
        return what, f"ViT-B/16 not measured{' in --quick mode' if quick else ''} ({others})", "not measured"
    r = hit[0]
    fast = median(r.seconds) < GOAL_SECONDS
    return (what, f"{median(r.seconds):.2f} s (median of {len(r.seconds)}, slowest {max(r.seconds):.2f} s), "
                  f"error {r.error:.2%} (achieved {r.achieved:.4f}), {max(r.reconfigures)} real reconfigures",
            "yes" if r.landed and fast else "no: " + ", ".join(
                w for w, bad in (("error", not r.landed), ("time", not fast)) if bad))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.models, args.repeats)
    table(rows, args.repeats).print()
    g = goal(rows, quick=False)
    if g:
        Table("goal", ["goal", "measured", "reached?"], [list(g)]).print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
