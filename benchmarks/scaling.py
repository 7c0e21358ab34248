"""How prunefx's time grows with the size of the graph.

prunefx trace + analysis and reconfigure (50% random mask over every prunable group, one
1x3x224x224 input) on two families of growing depth: ResNet-18/34/50/101/152 and
ViT-B/16, ViT-L/16, ViT-H/14. Models already timed by ``reconfigure_latency`` in the same
run reuse those samples. ``fit`` fits ``seconds = a * nodes + b`` by least squares and, as a
second opinion, the exponent ``k`` of ``seconds ~ nodes^k`` (log-log slope): ``k`` near 1
and R^2 near 1 is linear growth.

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
    r2: float
    exponent: float  # log-log slope

    @property
    def linear(self) -> bool:
        return self.r2 >= 0.9 and 0.75 <= self.exponent <= 1.25


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
    r2 = 1 - float(((s - (a * n + b)) ** 2).sum()) / max(float(((s - s.mean()) ** 2).sum()), 1e-30)
    k = float(np.polyfit(np.log(n), np.log(s), 1)[0])
    return Fit(what, float(a), float(b), r2, k)


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
