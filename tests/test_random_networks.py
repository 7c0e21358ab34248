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
paste into a hand-written repro; ``check_program(program, seed, ratio)`` replays one outside
Hypothesis. ``PRUNEFX_HYPOTHESIS_EXAMPLES`` sets the number of examples (default 300); the run
is derandomized and database-free, so CI sees the same cases each time.

A mask may empty a split piece (a group can span several pieces). That is fine where the
piece is unused or only activated/added/concatenated; where it would reach pooling,
reconfigure refuses the mask (``test_split_piece_pruned_to_zero_channels_is_refused``), so the
generator keeps pooling away from values that could vanish.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, currently_in_test_context, given, note, settings
from hypothesis import strategies as st
from torch import nn

import prunefx
from zoo import check_exact, randomize_norms

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
    appends ``n_out`` values. Module steps call submodule ``name``; the others are spelled
    as ``variant``, a key of ``SPELLINGS``, so the tracer sees functions and methods too."""

    op: str  # conv | bn | act | add | cat | split | pool
    inputs: tuple[int, ...]
    variant: str = ""
    name: str = ""
    conv: tuple[int, int, int, int, int, bool] | None = None  # cin, cout, k, stride, groups, bias
    channels: int = 0  # bn: num_features
    split_arg: int | tuple[int, ...] = 0  # split: split_size, sizes or number of chunks
    n_out: int = 1


# variant -> (Python source, the same call). "{0}", "{1}" are the inputs, "{all}" all of
# them, "{arg}" a split's size argument. The source is only for failure reports.
SPELLINGS: dict[str, tuple[str, Callable[[list[Any], Any], Any]]] = {
    "relu_f": ("F.relu({0})", lambda a, _: F.relu(a[0])),
    "relu_t": ("torch.relu({0})", lambda a, _: torch.relu(a[0])),
    "relu_m": ("{0}.relu()", lambda a, _: a[0].relu()),
    "silu_f": ("F.silu({0})", lambda a, _: F.silu(a[0])),
    "sigmoid_t": ("torch.sigmoid({0})", lambda a, _: torch.sigmoid(a[0])),
    "sigmoid_m": ("{0}.sigmoid()", lambda a, _: a[0].sigmoid()),
    "add_op": ("{0} + {1}", lambda a, _: a[0] + a[1]),
    "add_t": ("torch.add({0}, {1})", lambda a, _: torch.add(a[0], a[1])),
    "cat": ("torch.cat([{all}], 1)", lambda a, _: torch.cat(a, 1)),
    "concat": ("torch.concat([{all}], dim=1)", lambda a, _: torch.concat(a, dim=1)),
    "split_int": ("torch.split({0}, {arg}, 1)", lambda a, arg: torch.split(a[0], arg, 1)),
    "split_list": ("torch.split({0}, {arg}, dim=1)", lambda a, arg: torch.split(a[0], arg, dim=1)),
    "split_m": ("{0}.split({arg}, dim=1)", lambda a, arg: a[0].split(arg, dim=1)),
    "chunk": ("{0}.chunk({arg}, 1)", lambda a, arg: a[0].chunk(arg, 1)),
    "max2_f": ("F.max_pool2d({0}, 2)", lambda a, _: F.max_pool2d(a[0], 2)),
    "avg2_f": ("F.avg_pool2d({0}, 2)", lambda a, _: F.avg_pool2d(a[0], 2)),
    "max3_f": ("F.max_pool2d({0}, 3, 1, 1)", lambda a, _: F.max_pool2d(a[0], 3, 1, 1)),
    "avg3_f": ("F.avg_pool2d({0}, 3, 1, 1)", lambda a, _: F.avg_pool2d(a[0], 3, 1, 1)),
}
# parameter-free module variants: variant -> factory (the variant is also its source)
MODULES: dict[str, Callable[[], nn.Module]] = {
    "ReLU()": nn.ReLU, "SiLU()": nn.SiLU, "Sigmoid()": nn.Sigmoid,
    "MaxPool2d(2)": lambda: nn.MaxPool2d(2), "AvgPool2d(2)": lambda: nn.AvgPool2d(2),
    "MaxPool2d(3, 1, 1)": lambda: nn.MaxPool2d(3, 1, 1), "AvgPool2d(3, 1, 1)": lambda: nn.AvgPool2d(3, 1, 1),
}
# global average pooling spellings of the head
HEADS: dict[str, tuple[str, Callable[[nn.Module, Any], Any]]] = {
    "mean": ("{0}.mean((2, 3))", lambda m, t: t.mean((2, 3))),
    "adaptive_f": ("torch.flatten(F.adaptive_avg_pool2d({0}, 1), 1)", lambda m, t: torch.flatten(F.adaptive_avg_pool2d(t, 1), 1)),
    "adaptive_m": ("self.gap({0}).flatten(1)", lambda m, t: m.gap(t).flatten(1)),
}


def _split_arg(s: Step) -> int | list[int]:
    return list(s.split_arg) if isinstance(s.split_arg, tuple) else s.split_arg


def _split_sizes(channels: int, variant: str, arg: int | tuple[int, ...]) -> list[int]:
    """Channel count of each piece, as torch computes it."""
    if isinstance(arg, tuple):
        return list(arg)
    each = math.ceil(channels / arg) if variant == "chunk" else arg
    return [each] * (channels // each) + ([channels % each] if channels % each else [])


def _module_source(s: Step) -> str:
    if s.op == "conv":
        assert s.conv is not None
        cin, cout, k, stride, groups, bias = s.conv
        return f"Conv2d({cin}, {cout}, {k}, stride={stride}, padding={k // 2}, groups={groups}, bias={bias})"
    if s.op == "bn":
        return f"BatchNorm2d({s.channels})"
    return s.variant


@dataclass(frozen=True)
class Program:
    steps: tuple[Step, ...]
    head_inputs: tuple[int, ...]  # values pooled, flattened and concatenated into the Linear
    head_variant: str  # a key of HEADS
    head_features: int

    def source(self) -> str:
        """The forward pass as Python source, for hand-written repros."""
        lines, k = ["def forward(self, v0):"], 1
        for s in self.steps:
            args = [f"v{i}" for i in s.inputs]
            lhs = ", ".join(f"v{k + j}" for j in range(s.n_out)) + ("," if s.op == "split" and s.n_out == 1 else "")
            k += s.n_out
            if s.name:
                lines.append(f"    {lhs} = self.{s.name}({args[0]})  # {_module_source(s)}")
            else:
                rhs = SPELLINGS[s.variant][0].format(*args, all=", ".join(args), arg=_split_arg(s))
                lines.append(f"    {lhs} = {rhs}")
        pooled = [HEADS[self.head_variant][0].format(f"v{i}") for i in self.head_inputs]
        feat = pooled[0] if len(pooled) == 1 else f"torch.cat([{', '.join(pooled)}], 1)"
        lines.append(f"    return self.fc({feat})  # Linear({self.head_features}, {NUM_OUTPUTS})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# the interpreter: a real nn.Module that torch.fx traces step by step
# ---------------------------------------------------------------------------------------
class ProgramNet(nn.Module):
    def __init__(self, program: Program) -> None:
        super().__init__()
        self.program = program
        for s in program.steps:
            if s.op == "conv":
                assert s.conv is not None
                cin, cout, k, stride, groups, bias = s.conv
                self.add_module(s.name, nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias))
            elif s.op == "bn":
                self.add_module(s.name, nn.BatchNorm2d(s.channels))
            elif s.name:
                self.add_module(s.name, MODULES[s.variant]())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(program.head_features, NUM_OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # loops and branches read only the static program, so fx unrolls them into a DAG
        v = [x]
        for s in self.program.steps:
            a = [v[i] for i in s.inputs]
            if s.name:
                v.append(getattr(self, s.name)(a[0]))
            elif s.op == "split":
                pieces = SPELLINGS[s.variant][1](a, _split_arg(s))
                v.extend(pieces[j] for j in range(s.n_out))  # index: a Proxy cannot be iterated
            else:
                v.append(SPELLINGS[s.variant][1](a, None))
        pooled = [HEADS[self.program.head_variant][1](self, v[i]) for i in self.program.head_inputs]
        return self.fc(pooled[0] if len(pooled) == 1 else torch.cat(pooled, 1))


# ---------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------
OPS = ("conv", "conv", "conv", "bn", "act", "add", "cat", "split", "pool")
ACTS = ("ReLU()", "SiLU()", "Sigmoid()", "relu_f", "relu_t", "relu_m", "silu_f", "sigmoid_t", "sigmoid_m")
SAME_SIZE_POOLS = ("max3_f", "avg3_f", "MaxPool2d(3, 1, 1)", "AvgPool2d(3, 1, 1)")
HALVING_POOLS = ("max2_f", "avg2_f", "MaxPool2d(2)", "AvgPool2d(2)")


@st.composite
def programs(draw: st.DrawFn) -> Program:
    shapes: list[tuple[int, int]] = [(INPUT_SHAPE[1], INPUT_SHAPE[2])]  # (channels, height=width) per value
    # Values whose channels may all be pruned away: split pieces and what parameter-free ops
    # make of them. Pooling never reads one (see test_split_piece_pruned_to_zero_channels_is_refused).
    may_vanish: list[bool] = [False]
    steps: list[Step] = []

    def emit(step: Step, out: list[tuple[int, int]]) -> int:
        steps.append(step)
        shapes.extend(out)
        derived = step.op == "split" or (step.op in ("act", "add", "cat", "pool") and any(may_vanish[n] for n in step.inputs))
        may_vanish.extend([derived] * len(out))
        return len(shapes) - 1

    def pick(candidates: list[int]) -> int:
        # shrinks towards the most recent value: a chain is a simpler repro than a fan
        return candidates[-1 - draw(st.integers(0, len(candidates) - 1))]

    def same_size(h: int) -> list[int]:
        return [n for n, (_, hh) in enumerate(shapes) if hh == h]

    def conv(i: int, cout: int | None = None, k: int | None = None, stride: int = 1) -> int:
        cin, h = shapes[i]
        kind = draw(st.sampled_from(["dense"] * 6 + ["grouped"] + (["depthwise"] if cout is None else [])))
        if kind == "depthwise":
            cout, groups = cin * draw(st.integers(1, 2)), cin
        else:
            cout = cout if cout is not None else draw(st.integers(2, 12))
            divisors = [g for g in range(2, math.gcd(cin, cout) + 1) if cin % g == 0 and cout % g == 0]
            groups = draw(st.sampled_from(divisors)) if kind == "grouped" and divisors else 1
        k = k if k is not None else draw(st.sampled_from([3, 1]))
        spec = (cin, cout, k, stride, groups, draw(st.booleans()))
        return emit(Step("conv", (i,), name=f"conv{len(steps)}", conv=spec), [(cout, (h - 1) // stride + 1)])

    for _ in range(draw(st.integers(1, MAX_STEPS))):
        op = draw(st.sampled_from(OPS))
        i = pick(list(range(len(shapes))))
        c, h = shapes[i]
        if op == "conv":
            conv(i, stride=2 if h >= 4 and draw(st.integers(0, 4)) == 4 else 1)  # shrinks to stride 1
        elif op == "bn":
            emit(Step("bn", (i,), name=f"bn{len(steps)}", channels=c), [(c, h)])
        elif op == "act":
            variant = draw(st.sampled_from(ACTS))
            emit(Step("act", (i,), variant, f"act{len(steps)}" if variant in MODULES else ""), [(c, h)])
        elif op == "add":
            j = pick(same_size(h))
            if shapes[j][0] != c:  # a 1x1 projection makes the residual shapes agree
                j = conv(j, cout=c, k=1)
            emit(Step("add", (i, j), draw(st.sampled_from(["add_op", "add_t"]))), [(c, h)])
        elif op == "cat":
            ins = (i, *(pick(same_size(h)) for _ in range(draw(st.integers(1, 2)))))
            emit(Step("cat", ins, draw(st.sampled_from(["cat", "concat"]))), [(sum(shapes[n][0] for n in ins), h)])
        elif op == "split":
            i = pick([n for n, (cc, _) in enumerate(shapes) if cc >= 2])  # never empty: the input has 3
            c, h = shapes[i]
            variant = draw(st.sampled_from(["split_int", "split_list", "split_m", "chunk"]))
            arg: int | tuple[int, ...]
            if variant == "split_int":
                arg = draw(st.integers(1, c - 1))
            elif variant == "chunk":
                arg = draw(st.integers(2, min(4, c)))
            else:
                cuts = draw(st.lists(st.integers(1, c - 1), min_size=1, max_size=min(3, c - 1), unique=True))
                arg = tuple(b - a for a, b in itertools.pairwise([0, *sorted(cuts), c]))
            sizes = _split_sizes(c, variant, arg)
            emit(Step("split", (i,), variant, split_arg=arg, n_out=len(sizes)), [(n, h) for n in sizes])
        elif op == "pool":
            i = pick([n for n in range(len(shapes)) if not may_vanish[n]])  # never empty: the input stays
            c, h = shapes[i]
            halve = h >= 4 and draw(st.booleans())  # spatial size stays >= 2
            variant = draw(st.sampled_from(HALVING_POOLS if halve else SAME_SIZE_POOLS))
            emit(Step("pool", (i,), variant, f"pool{len(steps)}" if variant in MODULES else ""), [(c, h // 2 if halve else h)])

    consumed = {n for s in steps for n in s.inputs}
    leaves = tuple(n for n in range(1, len(shapes)) if n not in consumed)
    # either every leaf feeds the head, or only the last value does and dead branches stay in the graph
    head_inputs = leaves if draw(st.booleans()) else (len(shapes) - 1,)
    head_variant = draw(st.sampled_from(list(HEADS)))
    return Program(tuple(steps), head_inputs, head_variant, sum(shapes[n][0] for n in head_inputs))


def build(program: Program, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_norms(ProgramNet(program), seed).eval()


def example_input(seed: int) -> torch.Tensor:
    return torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))


def run_source(program: Program, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``program.source()`` executed as ``model``'s forward: the printed repro is faithful."""
    namespace: dict[str, Any] = {"torch": torch, "F": F}
    exec(program.source(), namespace)
    return namespace["forward"](model, x)


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
    torch.set_num_threads(1)  # tiny tensors: a thread hand-off costs more than the arithmetic
    try:
        check_program(program, seed, ratio)
    finally:
        torch.set_num_threads(threads)


def check_program(program: Program, seed: int, ratio: float) -> None:
    """The property for one program; callable outside Hypothesis to replay a repro."""
    report = note if currently_in_test_context() else print
    model = build(program, seed)
    x = example_input(seed)
    with torch.no_grad():  # the generator's own sanity
        assert torch.equal(model(x), run_source(program, model, x))

    graph = prunefx.trace(model, x)

    exact = prunefx.masks.random(graph, 0.5, exact_only=True, seed=seed)
    report(f"exact mask: { {k: v.int().tolist() for k, v in exact.items()} }")
    small, err = check_exact(model, x, exact, graph=graph)
    assert err <= TOL, f"reconfigured model differs from apply_mask by {err:.3g} (relative)"
    small.graph.lint()
    assert prunefx.count_params(small) <= prunefx.count_params(model)

    loose = prunefx.masks.random(graph, ratio, seed=seed + 1)
    report(f"loose mask: { {k: v.int().tolist() for k, v in loose.items()} }")
    trained = prunefx.reconfigure(model, loose, example_inputs=x, graph=graph).train()
    out = trained(x)
    assert out.shape == (INPUT_SHAPE[0], NUM_OUTPUTS)
    out.square().mean().backward()
    for name, p in trained.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"


def test_program_source() -> None:
    program = Program(
        steps=(
            Step("conv", (0,), name="conv0", conv=(3, 4, 3, 1, 1, True)),
            Step("split", (1,), "chunk", split_arg=2, n_out=2),
            Step("add", (2, 3), "add_op"),
        ),
        head_inputs=(4,), head_variant="mean", head_features=2,
    )
    assert program.source() == (
        "def forward(self, v0):\n"
        "    v1 = self.conv0(v0)  # Conv2d(3, 4, 3, stride=1, padding=1, groups=1, bias=True)\n"
        "    v2, v3 = v1.chunk(2, 1)\n"
        "    v4 = v2 + v3\n"
        "    return self.fc(v4.mean((2, 3)))  # Linear(2, 5)"
    )
    model, x = build(program, 0), example_input(0)
    assert torch.equal(model(x), run_source(program, model, x))


class SplitPoolCat(nn.Module):
    """Both split pieces reach ``fc`` only through parameter-free ops, so all three channels
    of ``conv`` form one group, and a mask may drop every channel of piece ``a``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.conv(x), [1, 2], 1)
        return self.fc(torch.cat([self.pool(a), b], 1).mean((2, 3)))


def test_split_piece_pruned_to_zero_channels_is_refused() -> None:
    """A mask may keep some channels of a group and still empty one split piece of it: a
    0-channel tensor breaks pooling, so reconfigure refuses it with the node's name (the
    generator above avoids such masks)."""
    torch.manual_seed(0)
    model, x = SplitPoolCat().eval(), example_input(0)
    graph = prunefx.trace(model, x)
    assert graph.group_of("conv").size == 3 and graph.group_of("conv").exact
    mask = {"conv": torch.tensor([False, True, True])}  # piece `a` loses its only channel
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(prunefx.MaskError, match="removes every channel of node .* cannot take"):
        prunefx.reconfigure(model, mask, graph=graph)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ok = {"conv": torch.tensor([True, False, True])}
    _, err = check_exact(model, x, ok, graph=graph)
    assert err <= TOL
