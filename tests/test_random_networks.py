"""Property test: random small CNNs, written as a DAG program, prune exactly.

Hypothesis draws a ``Program``: a list of steps, each reading one or more earlier tensors
(conv, BN, activation, residual add, channel cat, channel split/chunk, pooling), then a head
(global average pool, flatten, Linear). ``ProgramNet.forward`` interprets the program with
control flow that depends only on the static program, so torch.fx traces every step into a
real graph node. For every program:

- ``prunefx.trace`` succeeds;
- a random ~50% mask over every prunable *exact* group reconfigures to a model equal to
  ``apply_mask`` on a copy (within 1e-4 * max(1, max|ref|)), and the input model is unchanged;
- a random mask over *all* prunable groups reconfigures to a model that runs forward and
  backward in training mode.

On a failure Hypothesis prints the program as Python source (``Program.source()``), ready to
paste into a hand-written repro. ``PRUNEFX_HYPOTHESIS_EXAMPLES`` sets the number of examples
(default 300); the run is derandomized and database-free, so CI sees the same cases each time.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from torch import nn
from zoo import check_exact, randomize_norms

import prunefx

EXAMPLES = int(os.environ.get("PRUNEFX_HYPOTHESIS_EXAMPLES", "300"))
INPUT_SHAPE = (2, 3, 8, 8)
NUM_OUTPUTS = 5
TOL = 1e-4
MAX_STEPS = 10


# ---------------------------------------------------------------------------------------
# the program
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One instruction. ``inputs`` index earlier values (0 is the network input); the step
    appends ``n_out`` values. ``variant`` picks the spelling (module, function or method) so
    the tracer sees every form; ``name`` is the submodule a module variant calls."""

    op: str  # conv | bn | act | add | cat | split | pool
    inputs: tuple[int, ...]
    variant: str = ""
    name: str = ""
    conv: tuple[int, int, int, int, int, bool] | None = None  # cin, cout, k, stride, groups, bias
    channels: int = 0  # bn: num_features
    sizes: tuple[int, ...] = ()  # split: arguments (split_size, sizes or chunks); see _split_sizes
    n_out: int = 1


@dataclass(frozen=True)
class Program:
    steps: tuple[Step, ...]
    head_inputs: tuple[int, ...]  # values pooled, flattened and concatenated into the Linear
    head_variant: str  # mean | adaptive_f | adaptive_m
    head_features: int

    def source(self) -> str:
        """The forward pass as Python source, for hand-written repros."""
        lines = ["def forward(self, v0):"]
        k = 1
        for s in self.steps:
            args = [f"v{i}" for i in s.inputs]
            outs = [f"v{k + j}" for j in range(s.n_out)]
            k += s.n_out
            lhs = ", ".join(outs) + ("," if s.n_out == 1 and s.op == "split" else "")
            lines.append(f"    {lhs} = {_expr(s, args)}" + (f"  # {_module_repr(s)}" if s.name else ""))
        pooled = [f"{_head_expr(self.head_variant, f'v{i}')}" for i in self.head_inputs]
        feat = pooled[0] if len(pooled) == 1 else f"torch.cat([{', '.join(pooled)}], 1)"
        lines.append(f"    return self.fc({feat})  # Linear({self.head_features}, {NUM_OUTPUTS})")
        return "\n".join(lines)


def _module_repr(s: Step) -> str:
    if s.op == "conv":
        cin, cout, k, stride, groups, bias = s.conv
        return f"Conv2d({cin}, {cout}, {k}, stride={stride}, padding={k // 2}, groups={groups}, bias={bias})"
    if s.op == "bn":
        return "BatchNorm2d"
    return s.variant


def _expr(s: Step, a: list[str]) -> str:
    if s.name:
        return f"self.{s.name}({a[0]})"
    if s.op == "act":
        return {"relu_f": "F.relu({})", "relu_t": "torch.relu({})", "relu_m": "{}.relu()", "silu_f": "F.silu({})",
                "sigmoid_t": "torch.sigmoid({})", "sigmoid_m": "{}.sigmoid()"}[s.variant].format(a[0])
    if s.op == "add":
        return f"{a[0]} + {a[1]}" if s.variant == "op" else f"torch.add({a[0]}, {a[1]})"
    if s.op == "cat":
        return f"torch.cat([{', '.join(a)}], 1)" if s.variant == "cat" else f"torch.concat([{', '.join(a)}], dim=1)"
    if s.op == "split":
        arg = s.sizes[0] if s.variant in ("split_int", "chunk") else list(s.sizes)
        return {"split_int": "torch.split({}, {}, 1)", "split_list": "torch.split({}, {}, dim=1)",
                "split_m": "{}.split({}, dim=1)", "chunk": "{}.chunk({}, 1)"}[s.variant].format(a[0], arg)
    if s.op == "pool":
        return {"max2_f": "F.max_pool2d({}, 2)", "avg2_f": "F.avg_pool2d({}, 2)",
                "max3_f": "F.max_pool2d({}, 3, 1, 1)", "avg3_f": "F.avg_pool2d({}, 3, 1, 1)"}[s.variant].format(a[0])
    raise AssertionError(s)


def _head_expr(variant: str, v: str) -> str:
    return {"mean": f"{v}.mean((2, 3))", "adaptive_f": f"torch.flatten(F.adaptive_avg_pool2d({v}, 1), 1)",
            "adaptive_m": f"self.gap({v}).flatten(1)"}[variant]


def _split_sizes(channels: int, variant: str, arg: tuple[int, ...]) -> list[int]:
    """Channel count of each piece, as torch computes it."""
    if variant == "split_int":
        n = arg[0]
        return [n] * (channels // n) + ([channels % n] if channels % n else [])
    if variant == "chunk":
        each = math.ceil(channels / arg[0])
        return [each] * (channels // each) + ([channels % each] if channels % each else [])
    return list(arg)


# ---------------------------------------------------------------------------------------
# the interpreter: a real nn.Module that torch.fx traces step by step
# ---------------------------------------------------------------------------------------
_ACT_MODULES = {"ReLU": nn.ReLU, "SiLU": nn.SiLU, "Sigmoid": nn.Sigmoid}
_POOL_MODULES = {"MaxPool2d(2)": lambda: nn.MaxPool2d(2), "AvgPool2d(2)": lambda: nn.AvgPool2d(2),
                 "MaxPool2d(3, 1, 1)": lambda: nn.MaxPool2d(3, 1, 1), "AvgPool2d(3, 1, 1)": lambda: nn.AvgPool2d(3, 1, 1)}


class ProgramNet(nn.Module):
    def __init__(self, program: Program) -> None:
        super().__init__()
        self.program = program
        for s in program.steps:
            if s.op == "conv":
                cin, cout, k, stride, groups, bias = s.conv
                self.add_module(s.name, nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias))
            elif s.op == "bn":
                self.add_module(s.name, nn.BatchNorm2d(s.channels))
            elif s.name and s.op == "act":
                self.add_module(s.name, _ACT_MODULES[s.variant]())
            elif s.name and s.op == "pool":
                self.add_module(s.name, _POOL_MODULES[s.variant]())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(program.head_features, NUM_OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = [x]
        for s in self.program.steps:
            v.extend(self._step(s, [v[i] for i in s.inputs]))
        pooled = [self._pool(v[i]) for i in self.program.head_inputs]
        return self.fc(pooled[0] if len(pooled) == 1 else torch.cat(pooled, 1))

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        if self.program.head_variant == "mean":
            return t.mean((2, 3))
        if self.program.head_variant == "adaptive_f":
            return torch.flatten(F.adaptive_avg_pool2d(t, 1), 1)
        return self.gap(t).flatten(1)

    def _step(self, s: Step, a: list[torch.Tensor]) -> list[torch.Tensor]:
        if s.name:
            return [getattr(self, s.name)(a[0])]
        if s.op == "act":
            f = {"relu_f": F.relu, "relu_t": torch.relu, "relu_m": lambda t: t.relu(), "silu_f": F.silu,
                 "sigmoid_t": torch.sigmoid, "sigmoid_m": lambda t: t.sigmoid()}[s.variant]
            return [f(a[0])]
        if s.op == "add":
            return [a[0] + a[1] if s.variant == "op" else torch.add(a[0], a[1])]
        if s.op == "cat":
            return [torch.cat(a, 1) if s.variant == "cat" else torch.concat(a, dim=1)]
        if s.op == "split":
            if s.variant == "split_int":
                pieces = torch.split(a[0], s.sizes[0], 1)
            elif s.variant == "split_list":
                pieces = torch.split(a[0], list(s.sizes), dim=1)
            elif s.variant == "split_m":
                pieces = a[0].split(list(s.sizes), dim=1)
            else:
                pieces = a[0].chunk(s.sizes[0], 1)
            return [pieces[j] for j in range(s.n_out)]  # indexing, never iterating a Proxy
        if s.op == "pool":
            f = {"max2_f": lambda t: F.max_pool2d(t, 2), "avg2_f": lambda t: F.avg_pool2d(t, 2),
                 "max3_f": lambda t: F.max_pool2d(t, 3, 1, 1), "avg3_f": lambda t: F.avg_pool2d(t, 3, 1, 1)}[s.variant]
            return [f(a[0])]
        raise AssertionError(s)


# ---------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------
OPS = ("conv", "conv", "conv", "bn", "act", "add", "cat", "split", "pool")


@st.composite
def programs(draw: st.DrawFn) -> Program:
    shapes: list[tuple[int, int]] = [(INPUT_SHAPE[1], INPUT_SHAPE[2])]  # (channels, spatial) of each value
    steps: list[Step] = []

    def emit(step: Step, out: list[tuple[int, int]]) -> int:
        steps.append(step)
        shapes.extend(out)
        return len(shapes) - 1

    def pick(candidates: list[int]) -> int:
        # shrinks towards the most recent value: long chains are simpler than wide fans
        return candidates[-1 - draw(st.integers(0, len(candidates) - 1))]

    def conv(i: int, cout: int | None = None, k: int | None = None, stride: int = 1) -> int:
        cin, h = shapes[i]
        kinds = ["dense"] * 6 + ["grouped"] + (["depthwise"] if cout is None else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "depthwise":
            cout, groups = cin * draw(st.integers(1, 2)), cin
        else:
            cout = cout if cout is not None else draw(st.integers(2, 12))
            divisors = [g for g in range(2, math.gcd(cin, cout) + 1) if cin % g == 0 and cout % g == 0]
            groups = draw(st.sampled_from(divisors)) if kind == "grouped" and divisors else 1
        k = k if k is not None else draw(st.sampled_from([3, 1]))
        bias = draw(st.booleans())
        name = f"conv{len(steps)}"
        out_h = (h + 2 * (k // 2) - k) // stride + 1
        return emit(Step("conv", (i,), name=name, conv=(cin, cout, k, stride, groups, bias)), [(cout, out_h)])

    for _ in range(draw(st.integers(1, MAX_STEPS))):
        op = draw(st.sampled_from(OPS))
        i = pick(list(range(len(shapes))))
        c, h = shapes[i]
        if op == "conv":
            stride = 2 if h >= 4 and draw(st.integers(0, 4)) == 4 else 1  # shrinks to stride 1
            conv(i, stride=stride)
        elif op == "bn":
            emit(Step("bn", (i,), name=f"bn{len(steps)}", channels=c), [(c, h)])
        elif op == "act":
            variant = draw(st.sampled_from(["ReLU", "SiLU", "Sigmoid", "relu_f", "relu_t", "relu_m", "silu_f", "sigmoid_t", "sigmoid_m"]))
            name = f"act{len(steps)}" if variant in _ACT_MODULES else ""
            emit(Step("act", (i,), variant, name), [(c, h)])
        elif op == "add":
            j = pick([n for n, (_, hh) in enumerate(shapes) if hh == h])
            if shapes[j][0] != c:  # a 1x1 projection makes the residual shapes agree
                j = conv(j, cout=c, k=1)
            emit(Step("add", (i, j), draw(st.sampled_from(["op", "torch"]))), [(c, h)])
        elif op == "cat":
            same = [n for n, (_, hh) in enumerate(shapes) if hh == h]
            others = [pick(same) for _ in range(draw(st.integers(1, 2)))]
            ins = (i, *others)
            emit(Step("cat", ins, draw(st.sampled_from(["cat", "concat"]))), [(sum(shapes[n][0] for n in ins), h)])
        elif op == "split":
            i = pick([n for n, (cc, _) in enumerate(shapes) if cc >= 2])  # the input has 3
            c, h = shapes[i]
            variant = draw(st.sampled_from(["split_int", "split_list", "split_m", "chunk"]))
            if variant == "split_int":
                arg: tuple[int, ...] = (draw(st.integers(1, c - 1)),)
            elif variant == "chunk":
                arg = (draw(st.integers(2, min(4, c))),)
            else:
                cuts = draw(st.lists(st.integers(1, c - 1), min_size=1, max_size=min(3, c - 1), unique=True))
                bounds = [0, *sorted(cuts), c]
                arg = tuple(b - a for a, b in itertools.pairwise(bounds))
            sizes = _split_sizes(c, variant, arg)
            emit(Step("split", (i,), variant, sizes=arg, n_out=len(sizes)), [(n, h) for n in sizes])
        elif op == "pool":
            choices = ["max3_f", "avg3_f", "MaxPool2d(3, 1, 1)", "AvgPool2d(3, 1, 1)"]
            if h >= 4:
                choices += ["max2_f", "avg2_f", "MaxPool2d(2)", "AvgPool2d(2)"]
            variant = draw(st.sampled_from(choices))
            name = f"pool{len(steps)}" if variant in _POOL_MODULES else ""
            emit(Step("pool", (i,), variant, name), [(c, h if "3" in variant else h // 2)])

    consumed = {n for s in steps for n in s.inputs}
    leaves = tuple(n for n in range(1, len(shapes)) if n not in consumed)
    head_inputs = leaves if draw(st.booleans()) else (len(shapes) - 1,)  # else dead branches stay in the graph
    head_variant = draw(st.sampled_from(["mean", "adaptive_f", "adaptive_m"]))
    return Program(tuple(steps), head_inputs, head_variant, sum(shapes[n][0] for n in head_inputs))


def build(program: Program, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_norms(ProgramNet(program), seed).eval()


def example_input(seed: int) -> torch.Tensor:
    return torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------
# the property
# ---------------------------------------------------------------------------------------
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(program=programs(), seed=st.integers(0, 2**16), ratio=st.sampled_from([0.25, 0.5, 0.75]))
def test_random_network_prunes_exactly(program: Program, seed: int, ratio: float) -> None:
    note(program.source())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-off costs ~10x the arithmetic
    try:
        _check_program(program, seed, ratio)
    finally:
        torch.set_num_threads(threads)


def _check_program(program: Program, seed: int, ratio: float) -> None:
    model = build(program, seed)
    x = example_input(seed)
    with torch.no_grad():
        assert model(x).shape == (INPUT_SHAPE[0], NUM_OUTPUTS)  # the generator's own sanity

    graph = prunefx.trace(model, x)

    exact = prunefx.masks.random(graph, 0.5, exact_only=True, seed=seed)
    note(f"exact mask: { {k: v.int().tolist() for k, v in exact.items()} }")
    small, err = check_exact(model, x, exact, graph=graph)
    assert err <= TOL, f"reconfigured model differs from apply_mask by {err:.3g} (relative)"
    small.graph.lint()
    assert prunefx.count_params(small) <= prunefx.count_params(model)

    loose = prunefx.masks.random(graph, ratio, seed=seed + 1)
    note(f"loose mask: { {k: v.int().tolist() for k, v in loose.items()} }")
    trained = prunefx.reconfigure(model, loose, example_inputs=x, graph=graph).train()
    out = trained(x)
    assert out.shape == (INPUT_SHAPE[0], NUM_OUTPUTS)
    out.square().mean().backward()
    for name, p in trained.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"


def test_program_source_matches_interpreter() -> None:
    """The printed source (used in failure reports) spells each step as the interpreter runs it."""
    program = Program(
        steps=(
            Step("conv", (0,), name="conv0", conv=(3, 4, 3, 1, 1, True)),
            Step("split", (1,), "chunk", sizes=(2,), n_out=2),
            Step("add", (2, 3), "op"),
        ),
        head_inputs=(4,), head_variant="mean", head_features=2,
    )
    src = program.source()
    assert "v2, v3 = v1.chunk(2, 1)" in src and "v4 = v2 + v3" in src
    model = build(program, 0)
    assert model(example_input(0)).shape == (INPUT_SHAPE[0], NUM_OUTPUTS)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
