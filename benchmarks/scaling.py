"""How prunefx's time grows with the size of the graph.

prunefx trace + analysis and reconfigure (50% random mask over every prunable group, one
1x3x224x224 input) on two families of growing depth: ResNet-18/34/50/101/152 and
ViT-B/16, ViT-L/16, ViT-H/14. Models already timed by ``reconfigure_latency`` in the same
run reuse those samples. ``fit`` fits ``seconds = a * nodes + b`` by least squares and the
power law ``seconds ~ nodes^k`` (log-log slope, with its own R^2). The goal (issue 16) is
``k <= 1.1`` with ``R^2 >= 0.95`` for trace+analysis: time that grows at most linearly with
the graph (a fixed cost makes ``k`` smaller than 1).

    .venv/bin/python -m benchmarks.scaling --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping, Sequence

import numpy as np

import prunefx
from benchmarks import reconfigure_latency
from benchmarks.common import Table, build, check_equivalent, fmt_s, median, timed, tracked

__all__ = ["MODELS", "QUICK_MODELS", "Point", "Fit", "measure", "run", "fit", "table", "main"]

MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vit_b_16", "vit_l_16", "vit_h_14")
QUICK_MODELS = ("resnet18", "resnet34")
UNCHECKED = ("vit_h_14",)  # three ViT-H forwards at 224 would cost more than all its timings


@dataclasses.dataclass
class Point:
    model: str
    nodes: int
    params: int
    trace: list[float]
    reconfigure: list[float]

    @property
    def total(self) -> list[float]:
        return [a + b for a, b in zip(self.trace, self.reconfigure, strict=True)]

    @property
    def family(self) -> str:
        return "ViT" if self.model.startswith("vit") else "ResNet"


@dataclasses.dataclass(frozen=True)
class Fit:
    what: str
    slope: float  # seconds per node
    intercept: float
    r2: float  # of the straight line
    exponent: float  # log-log slope
    r2_power: float  # of the power law (in log-log space)

    RULE = "k <= 1.1 and R² of the power law >= 0.95"

    @property
    def linear(self) -> bool:
        """Time grows at most linearly with the graph, and the power law describes it (the
        issue-16 goal for trace+analysis; a fixed cost makes k < 1)."""
        return self.exponent <= 1.1 and self.r2_power >= 0.95


def measure(name: str, repeats: int, *, check: bool = True) -> Point:
    model = build(name)
    x = reconfigure_latency.example_input()
    graph = prunefx.trace(model, x)
    if check and name not in UNCHECKED:
        exact = prunefx.masks.random(graph, 0.5, seed=0, exact_only=True)
        check_equivalent("scaling", name, "random 50% of exact groups", model, exact, x)
    point = Point(name, len(graph.module.graph.nodes), sum(p.numel() for p in model.parameters()), [], [])
    for _ in range(repeats):
        t, _, graph = timed(prunefx.trace, model, x)
        point.trace.append(t)
        mask = prunefx.masks.random(graph, 0.5, seed=0)
        t, _, small = timed(prunefx.reconfigure, model, mask, example_inputs=x, graph=graph)
        point.reconfigure.append(t)
        del small, graph
    return point


def run(models: Sequence[str], repeats: int,
        known: Mapping[str, reconfigure_latency.Row] | None = None) -> list[Point]:
    known = known or {}
    points = []
    for name in tracked(models, "scaling", "scaling"):
        if name in known:
            r = known[name]
            points.append(Point(name, r.nodes, r.params, list(r.trace), list(r.reconfigure)))
        else:
            points.append(measure(name, repeats))
    return points


def fit(points: Sequence[Point], what: str = "total") -> Fit:
    n = np.array([p.nodes for p in points], dtype=float)
    s = np.array([median(getattr(p, what)) for p in points])
    a, b = np.polyfit(n, s, 1)
    k, c = np.polyfit(np.log(n), np.log(s), 1)
    return Fit(what, float(a), float(b), _r2(s, a * n + b), float(k), _r2(np.log(s), k * np.log(n) + c))


def _r2(y: np.ndarray, predicted: np.ndarray) -> float:
    return 1 - float(((y - predicted) ** 2).sum()) / max(float(((y - y.mean()) ** 2).sum()), 1e-30)


def goal(points: Sequence[Point], quick: bool) -> tuple[str, str, str]:
    """The goals-table row: trace+analysis over the whole model set fits a power law with k <= 1.1."""
    what = "trace+analysis ~ nodes^k, k <= 1.1 and R² >= 0.95 (ResNet-18/34/50/101/152, ViT-B/16, L/16, H/14)"
    if quick or {p.model for p in points} != set(MODELS):
        return what, "not measured in --quick mode (it needs every model)", "not measured"
    f = fit(points, "trace")
    return what, f"k = {f.exponent:.2f}, R² = {f.r2_power:.3f}", "yes" if f.linear else "no"


def table(points: Sequence[Point]) -> Table:
    t = Table("prunefx time vs graph size (medians)",
              ["model", "fx nodes", "params (M)", "trace+analysis (s)", "reconfigure (s)", "total (s)", "ms per node (total)"])
    for p in sorted(points, key=lambda p: (p.family, p.nodes)):
        t.add(p.model, p.nodes, f"{p.params / 1e6:.1f}", fmt_s(median(p.trace)), fmt_s(median(p.reconfigure)),
              fmt_s(median(p.total)), f"{1e3 * median(p.total) / p.nodes:.2f}")
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    points = run(QUICK_MODELS if args.quick else MODELS, args.repeats)
    table(points).print()
    for what in ("trace", "total"):
        f = fit(points, what)
        print(f"{what}: {f.slope * 1e3:.2f} ms/node + {f.intercept:.3f} s, R^2 {f.r2:.3f}, exponent {f.exponent:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
