"""Hand-written small models that exercise the corners of the channel analysis and the rewrite.

Every case is checked three ways:

1. numerically: a seeded random mask keeping ~50% of every prunable *exact* group, and
   ``reconfigure(model)(x) == apply_mask(copy)(x)`` to 1e-4 * max(1, max|ref|)
   (``zoo.check_exact``, which also asserts the input model is unchanged);
2. physically: the reconfigured model has fewer parameters;
3. structurally: which modules share a group, the group sizes and index maps, which groups
   are pinned and that the reason names the node — all written down by hand from the model
   source, not read back from prunefx. Several cases also rebuild the expected small
   weights by hand (rows kept in the producer => columns kept in the consumer).

A last test prunes every prunable group (exact or not) of every case at random and checks
that the result runs forward and backward.
"""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import prunefx
from zoo import check_exact, max_rel_diff, randomize_norms, state_copy

TOL = 1e-4


# ---------------------------------------------------------------------------------------
# helpers (independent of prunefx's internals: only the public API and plain torch)
# ---------------------------------------------------------------------------------------
def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rand(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def prepare(make, *args, seed: int = 0) -> nn.Module:
    """Build ``make(*args)`` with seeded weights and random norm statistics, in eval mode."""
    torch.manual_seed(seed)
    return randomize_norms(make(*args), seed).eval()


def assert_smaller(model: nn.Module, small: nn.Module) -> None:
    """Fewer parameters, counted over the tensors both models have (so dropping an unused
    parameter does not count as pruning)."""
    orig = dict(model.named_parameters())
    names = [n for n, _ in small.named_parameters()]
    assert set(names) <= set(orig), f"new parameters appeared: {set(names) - set(orig)}"
    assert n_params(small) < sum(orig[n].numel() for n in names), "the reconfigured model is not smaller"
    assert n_params(small) < n_params(model)


def prune_exact(model: nn.Module, x: torch.Tensor, seed: int = 0) -> tuple[prunefx.PruneGraph, dict, nn.Module]:
    """Trace, random 50% mask over the exact groups, reconfigure; check equivalence + size."""
    graph = prunefx.trace(model, x)
    mask = prunefx.masks.random(graph, 0.5, seed=seed, exact_only=True)
    assert mask, f"no prunable exact group in {type(model).__name__}: {graph.groups}"
    small, diff = check_exact(model, x, mask, graph=graph)
    assert diff <= TOL, f"reconfigured model differs from apply_mask reference: {diff:.3g}"
    assert_smaller(model, small)
    return graph, mask, small


def members(group: prunefx.ChannelGroup) -> dict[tuple[str, int], tuple[tuple[int, ...], ...]]:
    return {(name, dim): imap for name, dim, imap in group.members}


def group_with(graph: prunefx.PruneGraph, tensor: str, dim: int) -> prunefx.ChannelGroup:
    found = [g for g in graph.groups if (tensor, dim) in members(g)]
    assert len(found) == 1, f"({tensor}, {dim}) is in {len(found)} groups: {found}"
    return found[0]


def kept_rows(original: torch.Tensor, small: torch.Tensor, dim: int = 0) -> list[int]:
    """Indices along ``dim`` of ``original`` that survive in ``small`` (matched by value;
    random weights make every slice unique). ``original`` must already be cut like ``small``
    on every other dim (pass a bias, or ``w[:, kept_in]``)."""
    o = original.detach().movedim(dim, 0).reshape(original.shape[dim], -1)
    s = small.detach().movedim(dim, 0).reshape(small.shape[dim], -1)
    out = []
    for row in s:
        hits = [i for i in range(o.shape[0]) if torch.equal(o[i], row)]
        assert len(hits) == 1, "a slice of the small tensor is not a slice of the original"
        out.append(hits[0])
    assert out == sorted(out), "kept channels are not in original order"
    return out


def line_of(obj, text: str) -> int:
    """Line number (in this file) of the first source line of ``obj`` containing ``text``."""
    lines, start = inspect.getsourcelines(obj)
    for k, line in enumerate(lines):
        if text in line:
            return start + k
    raise AssertionError(f"{text!r} not in source of {obj}")


# ---------------------------------------------------------------------------------------
# a module called twice
# ---------------------------------------------------------------------------------------
class SharedChain(nn.Module):
    """The shared conv reads its own output: its in- and out-channels become one group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = self.shared(F.relu(x))
        x = self.shared(F.relu(self.bn(x)))
        return self.head(x)


class SharedBranches(nn.Module):
    """The shared conv reads two different producers: their outputs must be pruned alike."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.shared = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.shared(F.relu(self.a(x))) + self.shared(torch.tanh(self.b(x)))
        return self.head(F.relu(y))


def test_shared_conv_chain():
    model = prepare(SharedChain)
    x = rand(2, 3, 8, 8)
    graph, mask, small = prune_exact(model, x)
    g = graph.group_of("stem")
    assert g is graph.group_of("shared") is graph.group_of("bn")
    assert g.size == 8 and g.prunable and g.exact
    m = members(g)
    assert {("stem.weight", 0), ("shared.weight", 0), ("shared.weight", 1), ("bn.weight", 0), ("head.weight", 1)} <= set(m)
    head = graph.group_of("head")
    assert not head.prunable and "model output" in head.reason
    # by hand: the stem's surviving rows are the shared conv's surviving rows and columns
    keep = kept_rows(model.stem.weight, small.stem.weight)
    assert len(keep) == 4
    assert torch.equal(small.shared.weight, model.shared.weight[keep][:, keep])
    assert torch.equal(small.head.weight, model.head.weight[:, keep])


def test_shared_conv_branches():
    model = prepare(SharedBranches)
    x = rand(2, 3, 8, 8)
    graph, mask, small = prune_exact(model, x)
    ab = graph.group_of("a")
    assert ab is graph.group_of("b") and ab.size == 8 and ab.prunable and ab.exact
    assert ("shared.weight", 1) in members(ab)
    out = graph.group_of("shared")
    assert out is not ab and out.size == 6 and out.prunable
    assert ("head.weight", 1) in members(out)
    keep_a = kept_rows(model.a.weight, small.a.weight)
    keep_b = kept_rows(model.b.weight, small.b.weight)
    assert keep_a == keep_b
    keep_s = kept_rows(model.shared.bias, small.shared.bias)
    assert torch.equal(small.shared.weight, model.shared.weight[keep_s][:, keep_a])


# ---------------------------------------------------------------------------------------
# split, then concatenated in swapped order
# ---------------------------------------------------------------------------------------
class SplitSwap(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        if self.how == "split_list":
            a, b = torch.split(y, [6, 10], dim=1)
        elif self.how == "split_int":
            a, b = torch.split(y, 8, 1)
        elif self.how == "chunk":
            a, b = torch.chunk(y, 2, dim=1)
        else:  # tensor method
            a, b = y.split([6, 10], 1)
        return self.conv2(torch.cat([b, a], dim=1))


@pytest.mark.parametrize("how", ["split_list", "split_int", "chunk", "method"])
def test_split_then_swapped_concat(how):
    model = prepare(SplitSwap, how)
    x = rand(2, 3, 6, 6)
    first = 6 if how in ("split_list", "method") else 8
    graph, mask, small = prune_exact(model, x)
    # both pieces feed the same consumer, so they stay one group; only the index map into
    # conv2 is rotated: conv1 channel i < first sits at 16 - first + i, the others at i - first
    g = graph.group_of("conv1")
    assert g is graph.group_of("bn1") and g.size == 16 and g.prunable and g.exact
    assert members(g)[("conv1.weight", 0)] == tuple((i,) for i in range(16))
    rotated = [16 - first + i if i < first else i - first for i in range(16)]
    assert members(g)[("conv2.weight", 1)] == tuple((j,) for j in rotated)
    # by hand: conv2 columns = kept b channels then kept a channels
    keep = kept_rows(model.conv1.weight, small.conv1.weight)
    a_kept = [i for i in keep if i < first]
    b_kept = [i for i in keep if i >= first]
    assert len(keep) == 8 and 0 < len(a_kept) and 0 < len(b_kept)
    cols = [i - first for i in b_kept] + [16 - first + i for i in a_kept]
    assert torch.equal(small.conv2.weight, model.conv2.weight[:, cols])


class SplitTwoConsumers(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1 = nn.Conv2d(3, 16, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv_a = nn.Conv2d(8, 4, 1)
        self.conv_b = nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        a, b = torch.chunk(y, 2, dim=1) if self.how == "chunk" else torch.split(y, 8, 1)
        return self.head(F.relu(self.conv_b(b) + self.conv_a(a)))


@pytest.mark.parametrize("how", ["chunk", "split_int"])
def test_split_to_two_consumers_uneven(how):
    """Each piece is its own group; pruning them unevenly must turn chunk(2) / split(8)
    into a split with the new piece sizes."""
    model = prepare(SplitTwoConsumers, how)
    x = rand(2, 3, 5, 5)
    graph, _, _ = prune_exact(model, x)
    ga, gb = graph.groups_of("conv1")
    assert (ga.size, gb.size) == (8, 8) and ga is not gb
    assert members(ga)[("conv_a.weight", 1)] == tuple((i,) for i in range(8))
    assert members(gb)[("conv1.weight", 0)] == tuple((8 + i,) for i in range(8))
    assert members(gb)[("conv_b.weight", 1)] == tuple((i,) for i in range(8))
    keep_a = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    keep_b = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    small, diff = check_exact(model, x, {ga.name: keep_a, gb.name: keep_b}, graph=graph)
    assert diff <= TOL
    assert small.conv1.out_channels == 9
    assert torch.equal(small.conv_a.weight, model.conv_a.weight[:, [0, 3]])
    assert torch.equal(small.conv_b.weight, model.conv_b.weight[:, [0, 1, 2, 4, 5, 6, 7]])


# ---------------------------------------------------------------------------------------
# self concat
# ---------------------------------------------------------------------------------------
class SelfCat(nn.Module):
    def __init__(self, bn_after: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn_cat = nn.BatchNorm2d(16) if bn_after else nn.Identity()
        self.conv2 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return self.conv2(F.relu(self.bn_cat(torch.cat([y, y], 1))))


@pytest.mark.parametrize("bn_after", [False, True], ids=["plain", "bn_after_cat"])
def test_self_concat(bn_after):
    model = prepare(SelfCat, bn_after)
    x = rand(2, 3, 6, 6)
    graph, mask, small = prune_exact(model, x)
    g = graph.group_of("conv1")
    assert g.size == 8 and g.prunable and g.exact and g is graph.group_of("bn1")
    twice = tuple((i, i + 8) for i in range(8))
    assert members(g)[("conv2.weight", 1)] == twice
    keep = kept_rows(model.conv1.weight, small.conv1.weight)
    assert len(keep) == 4
    both = keep + [i + 8 for i in keep]
    assert torch.equal(small.conv2.weight, model.conv2.weight[:, both])
    if bn_after:  # the BN after the concat has two entries per channel, each its own statistics
        assert members(g)[("bn_cat.weight", 0)] == twice and members(g)[("bn_cat.running_var", 0)] == twice
        assert torch.equal(small.bn_cat.running_mean, model.bn_cat.running_mean[both])
        assert small.bn_cat.num_features == 8


# ---------------------------------------------------------------------------------------
# flatten -> Linear with spatial size > 1
# ---------------------------------------------------------------------------------------
class FlattenLinear(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d((3, 2))
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(8 * 6, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        y = self.pool(F.relu(self.bn(self.conv(x))))
        if self.how == "torch.flatten":
            y = torch.flatten(y, 1)
        elif self.how == "nn.Flatten":
            y = self.flat(y)
        elif self.how == "view":
            y = y.view(y.size(0), -1)
        else:
            y = y.reshape(y.shape[0], 48)
        return self.fc2(F.relu(self.fc1(y)))


@pytest.mark.parametrize("how", ["torch.flatten", "nn.Flatten", "view", "reshape_literal"])
def test_flatten_linear(how):
    model = prepare(FlattenLinear, how)
    x = rand(2, 3, 6, 6)
    graph, mask, small = prune_exact(model, x)
    g = graph.group_of("conv")
    assert g.size == 8 and g.prunable and g.exact
    assert members(g)[("fc1.weight", 1)] == tuple(tuple(range(6 * i, 6 * i + 6)) for i in range(8))
    fc1 = graph.group_of("fc1")
    assert fc1.size == 12 and fc1.prunable and ("fc2.weight", 1) in members(fc1)
    keep = kept_rows(model.conv.weight, small.conv.weight)
    keep_fc1 = kept_rows(model.fc1.bias, small.fc1.bias)
    cols = [6 * i + k for i in keep for k in range(6)]
    assert torch.equal(small.fc1.weight, model.fc1.weight[keep_fc1][:, cols])
    assert small.fc1.in_features == 6 * len(keep)


class ChannelsLastFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8 * 6, 5)

    def forward(self, x):
        y = F.relu(self.conv(x))  # (B, 8, 3, 2)
        return self.fc(y.permute(0, 2, 3, 1).flatten(1))


def test_channels_last_flatten_linear():
    """Flatten after a permute: channel i is every 8th feature of the Linear."""
    model = prepare(ChannelsLastFlatten)
    x = rand(2, 3, 3, 2)
    graph, mask, small = prune_exact(model, x)
    g = graph.group_of("conv")
    assert g.size == 8 and g.prunable and g.exact
    assert members(g)[("fc.weight", 1)] == tuple(tuple(range(i, 48, 8)) for i in range(8))
    keep = kept_rows(model.conv.weight, small.conv.weight)
    cols = [8 * s + i for s in range(6) for i in keep]
    assert torch.equal(small.fc.weight, model.fc.weight[:, cols])


# ---------------------------------------------------------------------------------------
# grouped conv and depthwise conv with channel multiplier 2
# ---------------------------------------------------------------------------------------
class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.gconv = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.gconv(y)))
        return self.conv3(y)


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.dw(y)))
        return self.pw(y)


def test_grouped_conv():
    model = prepare(Grouped)
    x = rand(2, 3, 6, 6)
    graph, mask, small = prune_exact(model, x)
    # a grouped conv with 4 groups of 4 in / 4 out: whole conv groups go, so the producer,
    # the grouped conv's output and the consumer form one group with one slot per conv group
    g = graph.group_of("conv1")
    assert g is graph.group_of("gconv") is graph.group_of("bn2")
    assert g.size == 4 and g.prunable and g.exact
    assert members(g)[("conv1.weight", 0)] == tuple(tuple(range(4 * i, 4 * i + 4)) for i in range(4))
    assert members(g)[("gconv.weight", 0)] == tuple(tuple(range(4 * i, 4 * i + 4)) for i in range(4))
    sg = small.gconv
    assert sg.groups == 2 and sg.in_channels == 8 and sg.out_channels == 8
    assert sg.weight.shape == (8, 4, 3, 3)
    keep = kept_rows(model.gconv.bias, small.gconv.bias)
    assert keep == kept_rows(model.conv1.weight, small.conv1.weight)
    whole = sorted({i // 4 for i in keep})
    assert keep == [4 * grp + k for grp in whole for k in range(4)], "a conv group was cut in half"
    assert torch.equal(small.gconv.weight, model.gconv.weight[keep])
    assert torch.equal(small.conv3.weight, model.conv3.weight[:, keep])


def test_depthwise_multiplier_2():
    model = prepare(Depthwise)
    x = rand(2, 3, 6, 6)
    graph, mask, small = prune_exact(model, x)
    g = graph.group_of("conv1")
    assert g is graph.group_of("dw") is graph.group_of("bn2")
    assert g.size == 8 and g.prunable and g.exact
    assert members(g)[("dw.weight", 0)] == tuple((2 * i, 2 * i + 1) for i in range(8))
    assert members(g)[("pw.weight", 1)] == tuple((2 * i, 2 * i + 1) for i in range(8))
    keep = kept_rows(model.conv1.weight, small.conv1.weight)
    assert len(keep) == 4
    rows = [2 * i + k for i in keep for k in range(2)]
    assert small.dw.groups == 4 and small.dw.in_channels == 4 and small.dw.out_channels == 8
    assert torch.equal(small.dw.weight, model.dw.weight[rows])
    assert torch.equal(small.pw.weight, model.pw.weight[:, rows])
    # keyed by the depthwise conv, one bool per output channel: the union keeps whole pairs
    per_channel = torch.zeros(16, dtype=torch.bool)
    per_channel[[0, 5]] = True
    small, diff = check_exact(model, x, {"dw": per_channel}, graph=graph)
    assert diff <= TOL
    assert kept_rows(model.conv1.weight, small.conv1.weight) == [0, 2]
    assert torch.equal(small.dw.weight, model.dw.weight[[0, 1, 4, 5]]) and small.dw.groups == 2


class GroupedTranspose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.up = nn.ConvTranspose2d(8, 12, 2, stride=2, groups=4)  # 4 groups: 2 in -> 3 out
        self.bn = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 3, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.bn(self.up(F.relu(self.conv1(x))))))


def test_grouped_conv_transpose():
    model = prepare(GroupedTranspose)
    x = rand(2, 3, 4, 4)
    graph, mask, small = prune_exact(model, x)
    g = graph.group_of("conv1")
    assert g is graph.group_of("up") is graph.group_of("bn")
    assert g.size == 4 and g.prunable and g.exact
    assert members(g)[("conv1.weight", 0)] == tuple((2 * i, 2 * i + 1) for i in range(4))
    assert members(g)[("up.weight", 0)] == tuple((2 * i, 2 * i + 1) for i in range(4))
    assert members(g)[("bn.weight", 0)] == tuple((3 * i, 3 * i + 1, 3 * i + 2) for i in range(4))
    keep_in = kept_rows(model.conv1.bias, small.conv1.bias)
    whole = sorted({i // 2 for i in keep_in})
    assert len(whole) == 2 and keep_in == [2 * grp + k for grp in whole for k in range(2)]
    out = [3 * grp + k for grp in whole for k in range(3)]
    assert small.up.groups == 2 and small.up.in_channels == 4 and small.up.out_channels == 6
    assert torch.equal(small.up.weight, model.up.weight[keep_in])
    assert torch.equal(small.up.bias, model.up.bias[out])
    assert torch.equal(small.conv2.weight, model.conv2.weight[:, out])


# ---------------------------------------------------------------------------------------
# ConvTranspose2d with a skip concat (U-Net)
# ---------------------------------------------------------------------------------------
class TinyUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.enc_bn = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.down_bn = nn.BatchNorm2d(16)
        self.up = nn.ConvTranspose2d(16, 6, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(6)
        self.dec = nn.Conv2d(6 + 8, 2, 3, padding=1)

    def forward(self, x):
        e = F.relu(self.enc_bn(self.enc(x)))
        d = F.relu(self.down_bn(self.down(e)))
        u = F.relu(self.up_bn(self.up(d)))
        return self.dec(torch.cat([u, e], dim=1))


def test_conv_transpose_skip_concat():
    model = prepare(TinyUNet)
    x = rand(2, 3, 8, 8)
    graph, mask, small = prune_exact(model, x)
    enc, down, up = graph.group_of("enc"), graph.group_of("down"), graph.group_of("up")
    assert len({id(enc), id(down), id(up)}) == 3
    assert (enc.size, down.size, up.size) == (8, 16, 6)
    assert all(g.prunable and g.exact for g in (enc, down, up))
    assert ("up.weight", 0) in members(down)  # ConvTranspose weight: (in, out, kh, kw)
    assert ("up.weight", 1) in members(up) and ("up_bn.weight", 0) in members(up)
    assert members(up)[("dec.weight", 1)] == tuple((i,) for i in range(6))
    assert members(enc)[("dec.weight", 1)] == tuple((6 + i,) for i in range(8))
    keep_e = kept_rows(model.enc.weight, small.enc.weight)
    keep_d = kept_rows(model.down.bias, small.down.bias)
    keep_u = kept_rows(model.up.bias, small.up.bias)
    assert torch.equal(small.up.weight, model.up.weight[keep_d][:, keep_u])
    assert small.up.in_channels == len(keep_d) and small.up.out_channels == len(keep_u)
    assert torch.equal(small.dec.weight, model.dec.weight[:, keep_u + [6 + i for i in keep_e]])


# ---------------------------------------------------------------------------------------
# functional conv / linear on bare nn.Parameters
# ---------------------------------------------------------------------------------------
class FunctionalParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3, generator=g) * 0.3)
        self.bias = nn.Parameter(torch.randn(8, generator=g) * 0.1)
        self.w2 = nn.Parameter(torch.randn(6, 8, 1, 1, generator=g) * 0.3)
        self.fc_w = nn.Parameter(torch.randn(10, 6, generator=g) * 0.3)
        self.fc_b = nn.Parameter(torch.randn(10, generator=g) * 0.1)
        self.out_w = nn.Parameter(torch.randn(3, 10, generator=g) * 0.3)

    def forward(self, x):
        y = F.relu(F.conv2d(x, self.weight, self.bias, padding=1))
        y = F.relu(F.conv2d(y, self.w2))
        y = y.mean((2, 3))
        y = F.relu(F.linear(y, self.fc_w, self.fc_b))
        return F.linear(y, self.out_w)


def test_functional_conv_and_linear_on_parameters():
    model = prepare(FunctionalParams)
    x = rand(2, 3, 6, 6)
    graph, mask, small = prune_exact(model, x)
    g1 = group_with(graph, "weight", 0)
    assert g1.size == 8 and g1.prunable and g1.exact
    assert {("bias", 0), ("w2", 1)} <= set(members(g1))
    g2 = group_with(graph, "w2", 0)
    assert g2.size == 6 and g2.prunable and g2.exact and ("fc_w", 1) in members(g2)
    g3 = group_with(graph, "fc_w", 0)
    assert g3.size == 10 and g3.prunable and g3.exact
    assert {("fc_b", 0), ("out_w", 1)} <= set(members(g3))
    out = group_with(graph, "out_w", 0)
    assert not out.prunable and "model output" in out.reason
    keep1 = kept_rows(model.weight, small.weight)
    keep2 = kept_rows(model.w2[:, keep1], small.w2)
    keep3 = kept_rows(model.fc_b, small.fc_b)
    assert len(keep1) == 4 and len(keep2) == 3 and len(keep3) == 5
    assert torch.equal(small.bias, model.bias[keep1])
    assert torch.equal(small.w2, model.w2[keep2][:, keep1])
    assert torch.equal(small.fc_w, model.fc_w[keep3][:, keep2])
    assert torch.equal(small.out_w, model.out_w[:, keep3])


class FunctionalDepthwise(nn.Module):
    """F.conv2d with a literal groups=8 on a bare parameter: the literal must shrink."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.dw_w = nn.Parameter(torch.randn(16, 1, 3, 3, generator=g) * 0.3)
        self.dw_b = nn.Parameter(torch.randn(16, generator=g) * 0.1)
        self.conv2 = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        y = F.relu(F.conv2d(y, self.dw_w, self.dw_b, 1, 1, 1, 8))
        return self.conv2(y)


def test_functional_depthwise_conv():
    model = prepare(FunctionalDepthwise)
    x = rand(2, 3, 5, 5)
    graph, mask, small = prune_exact(model, x)
    g = graph.group_of("conv1")
    assert g.size == 8 and g.prunable and g.exact
    assert members(g)[("dw_w", 0)] == tuple((2 * i, 2 * i + 1) for i in range(8))
    assert members(g)[("conv2.weight", 1)] == tuple((2 * i, 2 * i + 1) for i in range(8))
    keep = kept_rows(model.conv1.weight, small.conv1.weight)
    rows = [2 * i + k for i in keep for k in range(2)]
    assert torch.equal(small.dw_w, model.dw_w[rows]) and torch.equal(small.dw_b, model.dw_b[rows])
    assert f"1, 1, 1, {len(keep)})" in small.code, f"groups literal not rewritten:\n{small.code}"


# ---------------------------------------------------------------------------------------
# squeeze-excitation gate
# ---------------------------------------------------------------------------------------
class SqueezeExcite(nn.Module):
    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        if style == "conv":
            self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        else:
            self.fc1, self.fc2 = nn.Linear(16, 4), nn.Linear(4, 16)
        self.conv3 = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        if self.style == "conv":
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(y)))))
        else:
            b, c, _, _ = y.shape
            s = self.pool(y).view(b, c)
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(s)))).view(b, c, 1, 1)
        return self.conv3(y * s)


@pytest.mark.parametrize("style", ["conv", "linear"])
def test_squeeze_excitation(style):
    model = prepare(SqueezeExcite, style)
    x = rand(2, 3, 6, 6)
    graph, mask, small = prune_exact(model, x)
    g = graph.group_of("conv1")
    assert g is graph.group_of("bn1") is graph.group_of("fc2")
    assert g.size == 16 and g.prunable and g.exact
    assert {("fc1.weight", 1), ("fc2.bias", 0), ("conv3.weight", 1)} <= set(members(g))
    se = graph.group_of("fc1")
    assert se is not g and se.size == 4 and se.prunable and se.exact
    keep = kept_rows(model.conv1.weight, small.conv1.weight)
    keep_se = kept_rows(model.fc1.bias, small.fc1.bias)
    assert torch.equal(small.fc1.weight, model.fc1.weight[keep_se][:, keep])
    assert torch.equal(small.fc2.weight, model.fc2.weight[keep][:, keep_se])


# ---------------------------------------------------------------------------------------
# in-place residuals
# ---------------------------------------------------------------------------------------
class InplaceResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = self.relu(self.bn0(self.conv0(x)))
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        y = self.bn3(self.conv3(out))
        y.add_(out)
        y = F.relu(y, inplace=True)
        return self.head(y)


def test_inplace_residuals():
    model = prepare(InplaceResidual)
    x = rand(2, 3, 6, 6)
    graph, mask, small = prune_exact(model, x)
    stream = graph.group_of("conv0")
    assert stream is graph.group_of("bn2") is graph.group_of("conv3") is graph.group_of("bn3")
    assert stream.size == 8 and stream.prunable and stream.exact
    inner = graph.group_of("conv1")
    assert inner is not stream and inner.size == 6 and inner.prunable and inner.exact
    keep = kept_rows(model.conv0.weight, small.conv0.weight)
    assert keep == kept_rows(model.conv2.bias, small.conv2.bias) == kept_rows(model.conv3.bias, small.conv3.bias)
    assert torch.equal(small.head.weight, model.head.weight[:, keep])


# ---------------------------------------------------------------------------------------
# GroupNorm
# ---------------------------------------------------------------------------------------
class GroupNormNet(nn.Module):
    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 12, 3, padding=1)
        if functional:
            self.gn2_w = nn.Parameter(torch.rand(12) + 0.5)
            self.gn2_b = nn.Parameter(torch.randn(12) * 0.1)
        else:
            self.gn2 = nn.GroupNorm(6, 12)
        self.conv3 = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = F.relu(self.gn1(self.conv1(x)))
        y = self.conv2(y)
        y = F.group_norm(y, 6, self.gn2_w, self.gn2_b) if self.functional else self.gn2(y)
        return self.conv3(F.relu(y))


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_group_norm(functional):
    model = prepare(GroupNormNet, functional)
    x = rand(2, 3, 6, 6)
    graph, mask, small = prune_exact(model, x)
    g1 = graph.group_of("conv1")
    assert g1 is graph.group_of("gn1")
    assert g1.size == 4 and g1.prunable and g1.exact  # one slot per norm group of 4 channels
    assert members(g1)[("conv1.weight", 0)] == tuple(tuple(range(4 * i, 4 * i + 4)) for i in range(4))
    g2 = graph.group_of("conv2")
    assert g2.size == 6 and g2.prunable and g2.exact
    assert (("gn2_w", 0) if functional else ("gn2.weight", 0)) in members(g2)
    gn1 = small.gn1
    assert gn1.num_groups == 2 and gn1.num_channels == 8 and gn1.num_channels % gn1.num_groups == 0
    keep1 = kept_rows(model.conv1.weight, small.conv1.weight)
    assert len(keep1) == 8
    assert all(sum(1 for i in keep1 if i // 4 == k) in (0, 4) for k in range(4)), "norm groups cut in half"
    keep2 = kept_rows(model.conv2.bias, small.conv2.bias)
    assert len(keep2) == 6 and all(sum(1 for i in keep2 if i // 2 == k) in (0, 2) for k in range(6))
    if not functional:
        assert small.gn2.num_groups == 3 and small.gn2.num_channels == 6
    # a per-channel mask keyed by the module: the union keeps every norm group it touches whole
    per_channel = torch.zeros(16, dtype=torch.bool)
    per_channel[[0, 5]] = True
    small, diff = check_exact(model, x, {"conv1": per_channel}, graph=graph)
    assert diff <= TOL
    assert kept_rows(model.conv1.weight, small.conv1.weight) == list(range(8))
    assert small.gn1.num_groups == 2 and small.gn1.num_channels == 8


# ---------------------------------------------------------------------------------------
# multiple inputs, tuple / dict outputs
# ---------------------------------------------------------------------------------------
class MultiIO(nn.Module):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.conv_a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv_b = nn.Conv2d(1, 8, 1)
        self.conv_c = nn.Conv2d(8, 10, 3, padding=1)
        self.head1 = nn.Conv2d(10, 4, 1)
        self.head2 = nn.Conv2d(8, 2, 1)

    def forward(self, a, b):
        z = F.relu(self.bn_a(self.conv_a(a)) + self.conv_b(b))
        h = F.relu(self.conv_c(z))
        out1 = self.head1(h).mean((2, 3))
        out2 = self.head2(z).flatten(1)
        if self.out == "tuple":
            return out1, out2
        return {"cls": out1, "seg": out2, "feat": h}


def _check_exact_multi(model, inputs, mask, graph):
    """zoo.check_exact for a model with several positional inputs."""
    before = state_copy(model)
    small = prunefx.reconfigure(model, mask, example_inputs=inputs, graph=graph)
    ref = copy.deepcopy(model)
    prunefx.apply_mask(ref, mask, example_inputs=inputs)
    after = state_copy(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "input model changed"
    with torch.no_grad():
        out, expected = small(*inputs), ref(*inputs)
    assert type(out) is type(expected)
    if isinstance(out, dict):
        assert out.keys() == expected.keys()
        pairs = [(out[k], expected[k]) for k in out]
    else:
        assert len(out) == len(expected)
        pairs = list(zip(out, expected, strict=True))
    for o, e in pairs:
        assert o.shape == e.shape
    return small, max(max_rel_diff(o, e) for o, e in pairs)


@pytest.mark.parametrize("out", ["tuple", "dict"])
def test_multi_input_multi_output(out):
    model = prepare(MultiIO, out)
    inputs = (rand(2, 3, 6, 6, seed=1), rand(2, 1, 6, 6, seed=2))
    graph = prunefx.trace(model, inputs)
    z = graph.group_of("conv_a")
    assert z is graph.group_of("conv_b") is graph.group_of("bn_a")
    assert z.size == 8 and z.prunable and z.exact and ("head2.weight", 1) in members(z)
    h = graph.group_of("conv_c")
    assert h.size == 10
    if out == "dict":  # h is returned as "feat": its channels are part of the interface
        assert not h.prunable and "model output" in h.reason
    else:
        assert h.prunable and h.exact and ("head1.weight", 1) in members(h)
    for head in ("head1", "head2"):
        assert not graph.group_of(head).prunable
    mask = prunefx.masks.random(graph, 0.5, exact_only=True)
    assert set(mask) == ({"conv_a"} if out == "dict" else {"conv_a", "conv_c"})
    small, diff = _check_exact_multi(model, inputs, mask, graph)
    assert diff <= TOL
    assert_smaller(model, small)


# ---------------------------------------------------------------------------------------
# view with a literal channel count; slicing the channel dim
# ---------------------------------------------------------------------------------------
class LiteralView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.bn = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = y.view(x.size(0), 64, -1).mean(-1)
        return self.fc(y)


class ChannelSlice(nn.Module):
    def __init__(self, how: str = "slice") -> None:
        super().__init__()
        self.how = how
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv_lo = nn.Conv2d(16, 8, 1)
        self.conv_hi = nn.Conv2d(16, 8, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        if self.how == "slice":
            lo, hi = y[:, :16], y[:, 16:]
        elif self.how == "negative":
            lo, hi = y[:, :-16], y[:, -16:]
        elif self.how == "ellipsis":
            lo, hi = y[:, :16, ...], y[:, 16:32, :, :]
        elif self.how == "narrow":
            lo, hi = y.narrow(1, 0, 16), torch.narrow(y, 1, 16, 16)
        else:  # strided: even / odd channels
            lo, hi = y[:, 0::2], y[:, 1::2]
        z = self.conv_lo(lo) + self.conv_hi(hi)
        return self.head(F.relu(z))


def test_view_with_literal_channel_count():
    model = prepare(LiteralView)
    x = rand(2, 3, 4, 4)
    graph, mask, small = prune_exact(model, x)
    g = graph.group_of("conv")
    assert g.size == 64 and g.prunable and g.exact and ("fc.weight", 1) in members(g)
    keep = kept_rows(model.conv.weight, small.conv.weight)
    assert len(keep) == 32
    assert torch.equal(small.fc.weight, model.fc.weight[:, keep])
    assert "64" not in small.code, f"the literal 64 survived the rewrite:\n{small.code}"


@pytest.mark.parametrize("how", ["slice", "negative", "ellipsis", "narrow"])
def test_slice_on_channel_dim(how):
    model = prepare(ChannelSlice, how)
    x = rand(2, 3, 4, 4)
    graph, mask, small = prune_exact(model, x)
    lo, hi = graph.groups_of("conv1")
    assert lo.size == 16 and hi.size == 16 and lo.prunable and hi.prunable and lo.exact and hi.exact
    assert members(lo)[("conv1.weight", 0)] == tuple((i,) for i in range(16))
    assert members(lo)[("conv_lo.weight", 1)] == tuple((i,) for i in range(16))
    assert members(hi)[("conv1.weight", 0)] == tuple((16 + i,) for i in range(16))
    assert members(hi)[("conv_hi.weight", 1)] == tuple((i,) for i in range(16))
    z = graph.group_of("conv_lo")
    assert z is graph.group_of("conv_hi") and z.size == 8
    keep = kept_rows(model.conv1.weight, small.conv1.weight)
    lo_k, hi_k = [i for i in keep if i < 16], [i - 16 for i in keep if i >= 16]
    assert len(lo_k) == 8 and len(hi_k) == 8
    keep_z = kept_rows(model.conv_lo.bias, small.conv_lo.bias)
    assert torch.equal(small.conv_lo.weight, model.conv_lo.weight[keep_z][:, lo_k])
    assert torch.equal(small.conv_hi.weight, model.conv_hi.weight[keep_z][:, hi_k])


def test_strided_channel_slice_is_pinned_not_wrong():
    model = prepare(ChannelSlice, "strided")
    x = rand(2, 3, 4, 4)
    graph = prunefx.trace(model, x)
    for g in graph.groups_of("conv1"):
        assert not g.prunable and "strided slice" in g.reason and "0::2" in g.reason.replace(" ", ""), g.reason
    with pytest.raises(prunefx.MaskError, match="pinned"):
        prunefx.reconfigure(model, {"conv1": torch.arange(32) < 30}, example_inputs=x)


# ---------------------------------------------------------------------------------------
# hand-written channel shuffle: exact or pinned, never wrong
# ---------------------------------------------------------------------------------------
class Shuffle(nn.Module):
    def __init__(self, literal: bool) -> None:
        super().__init__()
        self.literal = literal
        self.conv1 = nn.Conv2d(3, 16, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        if self.literal:
            y = y.view(x.size(0), 4, 4, 5, 5).transpose(1, 2).contiguous().view(x.size(0), 16, 5, 5)
        else:
            b, c, h, w = y.size()
            y = y.view(b, 4, c // 4, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        return self.conv2(y)


@pytest.mark.parametrize("literal", [True, False], ids=["literal", "dynamic"])
def test_hand_written_channel_shuffle(literal):
    model = prepare(Shuffle, literal)
    x = rand(2, 3, 5, 5)
    graph = prunefx.trace(model, x)
    g = graph.group_of("conv1")
    assert g is graph.group_of("bn1")
    if not g.prunable:  # allowed: pinned with a reason that names the shuffle
        assert re.search(r"view|transpose|reshape", g.reason), g.reason
        return
    # channel c = 4 * group + k lands at conv2 input 4 * k + group; a pruned tensor must still
    # reshape to (B, 4, k', H, W), so the same k goes in every group
    assert g.exact and g.size in (4, 16)
    graph, mask, small = prune_exact(model, x)
    keep = kept_rows(model.conv1.weight, small.conv1.weight)
    ks = sorted({i % 4 for i in keep})
    assert keep == [4 * grp + k for grp in range(4) for k in ks], "kept set is not a product"
    # by hand, conv2 reads the shuffled order k-major
    cols = [4 * k + grp for k in range(4) for grp in range(4) if k in ks]
    assert torch.equal(small.conv2.weight, model.conv2.weight[:, cols])
    # and an independent reference: the original with those channels zeroed by hand
    ref = copy.deepcopy(model)
    drop = [i for i in range(16) if i not in keep]
    with torch.no_grad():
        for t in (ref.conv1.weight, ref.conv1.bias, ref.bn1.weight, ref.bn1.bias):
            t[drop] = 0
        assert max_rel_diff(small(x), ref(x)) <= TOL


# ---------------------------------------------------------------------------------------
# unknown ops pin what they touch
# ---------------------------------------------------------------------------------------
class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return g * 0.5


@torch.fx.wrap
def scale_grad(x):
    return _ScaleGrad.apply(x)


class UnknownOp(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        if self.op == "flip":
            y = torch.flip(y, dims=(1,))
        elif self.op == "lrn":
            y = F.local_response_norm(y, 3)
        else:
            y = scale_grad(y)
        y = F.relu(self.bn2(self.conv2(y)))
        return self.conv3(y)




@pytest.mark.parametrize("op", [
    "flip",
    "custom_autograd",
    "lrn",
])
def test_unknown_op_pins_its_channels(op):
    model = prepare(UnknownOp, op)
    x = rand(2, 3, 6, 6)
    graph, mask, small = prune_exact(model, x)
    g = graph.group_of("conv1")
    assert g is graph.group_of("bn1")
    assert not g.prunable and not g.exact
    target = {"flip": "flip", "lrn": "local_response_norm", "custom_autograd": "scale_grad"}[op]
    assert target in g.reason, g.reason
    line = line_of(UnknownOp.forward, {"flip": "torch.flip", "lrn": "F.local_response_norm", "custom_autograd": "scale_grad(y)"}[op])
    assert f"test_hard_cases.py:{line}" in g.reason, g.reason
    # conv2 reads the unknown op's output: its input channels are fixed too
    assert ("conv2.weight", 1) not in members(graph.group_of("conv2"))
    assert group_with(graph, "conv2.weight", 1).prunable is False
    assert "conv1" not in mask and "conv2" in mask
    assert small.conv1.weight.shape == model.conv1.weight.shape
    assert small.conv2.weight.shape[1] == 8


class ChannelSoftmax(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv1(x)
        if self.how == "torch.softmax":
            y = torch.softmax(y, dim=1)
        else:
            y = F.softmax(y, dim=1)
        return self.conv2(y)


@pytest.mark.parametrize("how", [
    "torch.softmax",
    "F.softmax",
])
def test_approximate_reason_names_the_model_line(how):
    model = prepare(ChannelSoftmax, how)
    graph = prunefx.trace(model, rand(2, 3, 4, 4))
    g = graph.group_of("conv1")
    assert g.prunable and not g.exact and "softmax" in g.reason
    line = line_of(ChannelSoftmax.forward, f"y = {how}(y, dim=1)")
    assert f"test_hard_cases.py:{line}" in g.reason, g.reason


def test_model_output_reason_names_the_node():
    model = prepare(SharedChain)
    graph = prunefx.trace(model, rand(2, 3, 8, 8))
    reason = graph.group_of("head").reason
    assert "model output" in reason
    assert "head" in reason and f"test_hard_cases.py:{line_of(SharedChain.forward, 'return self.head(x)')}" in reason, reason


# ---------------------------------------------------------------------------------------
# frozen parameters; analysis under no_grad
# ---------------------------------------------------------------------------------------
class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return self.fc(y.mean((2, 3)))


def test_frozen_parameters_are_pruned():
    model = prepare(Plain)
    for p in (*model.conv1.parameters(), *model.bn1.parameters()):
        p.requires_grad_(False)
    x = rand(2, 3, 6, 6)
    graph, mask, small = prune_exact(model, x)
    assert graph.group_of("conv1").prunable and "conv1" in mask
    assert small.conv1.weight.shape[0] == 4 and small.bn1.weight.shape[0] == 4
    assert small.conv2.weight.shape[1] == 4
    frozen = {n for n, p in small.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"}


def test_analysis_under_no_grad():
    model = prepare(Plain)
    x = rand(2, 3, 6, 6)
    with torch.no_grad():
        graph, mask, small = prune_exact(model, x)
    assert set(mask) == {"conv1", "conv2"}
    assert all(p.requires_grad for p in small.parameters())
    small.train()
    small(x).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in small.parameters())


def test_reconfigure_under_inference_mode_then_train():
    model = prepare(Plain)
    x = rand(2, 3, 6, 6)
    with torch.inference_mode():
        graph = prunefx.trace(model, x)
        mask = prunefx.masks.random(graph, 0.5, exact_only=True)
        small = prunefx.reconfigure(model, mask, example_inputs=x, graph=graph)
    small.train()
    small(x).square().sum().backward()
    assert all(p.grad is not None for p in small.parameters())


# ---------------------------------------------------------------------------------------
# every prunable group (exact or not): forward and backward still run
# ---------------------------------------------------------------------------------------
class Mixed(nn.Module):
    """Approximate groups too: LayerNorm over channels, softmax over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.proj = nn.Linear(16, 12)
        self.ln = nn.LayerNorm(12)
        self.attn = nn.Linear(12, 12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = y * torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        y = y + self.conv2(y)
        t = self.ln(self.proj(y.flatten(2).transpose(1, 2)))
        t = t * torch.softmax(self.attn(t), dim=-1)
        return self.fc(t.mean(1))


CASES = {
    "shared_chain": (SharedChain, (2, 3, 8, 8)),
    "shared_branches": (SharedBranches, (2, 3, 8, 8)),
    "split_swap": (lambda: SplitSwap("split_list"), (2, 3, 6, 6)),
    "chunk_swap": (lambda: SplitSwap("chunk"), (2, 3, 6, 6)),
    "self_cat": (SelfCat, (2, 3, 6, 6)),
    "flatten_linear": (lambda: FlattenLinear("view"), (2, 3, 6, 6)),
    "channels_last_flatten": (ChannelsLastFlatten, (2, 3, 3, 2)),
    "grouped": (Grouped, (2, 3, 6, 6)),
    "depthwise": (Depthwise, (2, 3, 6, 6)),
    "unet": (TinyUNet, (2, 3, 8, 8)),
    "functional": (FunctionalParams, (2, 3, 6, 6)),
    "functional_dw": (FunctionalDepthwise, (2, 3, 5, 5)),
    "split_two": (lambda: SplitTwoConsumers("chunk"), (2, 3, 5, 5)),
    "grouped_transpose": (GroupedTranspose, (2, 3, 4, 4)),
    "se_conv": (lambda: SqueezeExcite("conv"), (2, 3, 6, 6)),
    "se_linear": (lambda: SqueezeExcite("linear"), (2, 3, 6, 6)),
    "inplace": (InplaceResidual, (2, 3, 6, 6)),
    "groupnorm": (lambda: GroupNormNet(False), (2, 3, 6, 6)),
    "literal_view": (LiteralView, (2, 3, 4, 4)),
    "slice": (ChannelSlice, (2, 3, 4, 4)),
    "shuffle": (lambda: Shuffle(True), (2, 3, 5, 5)),
    "flip": (lambda: UnknownOp("flip"), (2, 3, 6, 6)),
    "lrn": (lambda: UnknownOp("lrn"), (2, 3, 6, 6)),
    "softmax": (lambda: ChannelSoftmax("F.softmax"), (2, 3, 4, 4)),
    "mixed": (Mixed, (2, 3, 6, 6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_random_mask_all_groups_forward_backward(case):
    make, shape = CASES[case]
    model = prepare(make)
    x = rand(*shape)
    graph = prunefx.trace(model, x)
    mask = prunefx.masks.random(graph, 0.5, seed=3, exact_only=False)
    assert mask
    before = state_copy(model)
    small = prunefx.reconfigure(model, mask, example_inputs=x, graph=graph)
    assert all(torch.equal(before[k], v) for k, v in state_copy(model).items())
    assert_smaller(model, small)
    small.train()
    out = small(x)
    with torch.no_grad():
        expected = model(x)
    assert out.shape == expected.shape
    out.square().mean().backward()
    for name, p in small.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_mixed_has_approximate_groups():
    model = prepare(Mixed)
    graph = prunefx.trace(model, rand(2, 3, 6, 6))
    proj = graph.group_of("proj")
    assert proj.prunable and not proj.exact and "LayerNorm" in proj.reason
    assert graph.group_of("ln") is proj


def _shift_add(y):
    """Mutates its argument and returns nothing anybody uses (like MViT-v2's rel-pos add)."""
    y[:, :, 1:] += y[:, :, :-1]
    return y


torch.fx.wrap("_shift_add")


class InPlaceLeafUpdate(nn.Module):
    """A wrapped leaf function that mutates in place and whose result is unused: its node
    has no users but must survive the rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(4, 8, 1)
        self.hidden = nn.Conv1d(8, 16, 1)
        self.out = nn.Conv1d(16, 3, 1)

    def forward(self, x):
        y = self.a(x)
        _shift_add(y)
        return self.out(torch.relu(self.hidden(y)))


def test_in_place_leaf_update_survives_the_rewrite():
    torch.manual_seed(0)
    model = InPlaceLeafUpdate().eval()
    x = torch.randn(2, 4, 6)
    graph = prunefx.trace(model, x)
    hidden = graph.group_of("hidden")
    assert hidden.prunable and hidden.exact
    mask = {"hidden": torch.arange(16) % 2 == 0}
    small, diff = check_exact(model, x, mask, graph)
    assert diff <= 1e-5
    assert any(getattr(n.target, "__name__", "") == "_shift_add" for n in small.graph.nodes)


def _index_maps_channel_by_channel(group: prunefx.ChannelGroup) -> list[tuple]:
    """``ChannelGroup.members`` spelled out one channel at a time: the reference for its
    vectorised form."""
    pos = {int(r): i for i, r in enumerate(group.slots)}
    out = []
    for m, roots in group._members:
        rows: list[list[int]] = [[] for _ in range(group.size)]
        for index, r in enumerate(roots.tolist()):
            if (i := pos.get(r)) is not None:
                rows[i].append(index)
        out.append((m.tensor, m.dim, tuple(tuple(r) for r in rows), m.role.value))
    return out


class _FlattenRepeat(nn.Module):
    """Channels that own several indices (flatten), and channels read twice (repeat_interleave)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 2 * 2, 5)
        self.up = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.up(y.repeat_interleave(2, dim=1))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 2), 1)) + z.mean((2, 3)).sum(1, keepdim=True)


@pytest.mark.parametrize("make", [_FlattenRepeat, lambda: torchvision.models.densenet121(),
                                  lambda: torchvision.models.VisionTransformer(224, 32, 2, 4, 64, 96)], ids=["flatten-repeat", "densenet121", "vit"])
def test_index_maps_match_channel_by_channel(make) -> None:
    model = make().eval()
    x = torch.randn(1, 3, 8, 8) if isinstance(model, _FlattenRepeat) else torch.randn(1, 3, 224, 224)
    graph = prunefx.trace(model, x)
    several = False
    for g in graph.groups:
        assert [tuple(m) + (m.role,) for m in g.members] == _index_maps_channel_by_channel(g), g.name
        several |= any(len(row) > 1 for m in g.members for row in m.index_map)
    assert several or not isinstance(model, _FlattenRepeat), "a channel holding several indices is covered"


class _DivideByChannelNorm(nn.Module):
    """A weight-normalised output scaled per channel (PEFT's DoRA does this with
    ``torch.linalg.norm(weight, dim=1)``): a masked channel's norm is 0 in the masked model."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.eps = eps

    def forward(self, x):
        w = self.conv1.weight.flatten(1)
        norm = torch.linalg.norm(w, dim=1) + self.eps  # per output channel
        return self.conv2(self.conv1(x) / norm[None, :, None, None])


def test_division_by_masked_channels_is_not_exact():
    """Without an eps the masked model divides 0 by 0 in every masked channel (NaN), which the
    pruned model cannot reproduce: the group is approximate, with the reason. With an eps the
    masked channels are 0 / eps = 0 and the group is exact (``linalg.norm`` over one dim
    reduces like ``vector_norm``)."""
    x = rand(2, 3, 6, 6)
    graph = prunefx.trace(prepare(_DivideByChannelNorm, 0.0), x)
    g = graph.group_of("conv1")
    assert g.prunable and not g.exact and "divides by channels that are zero in the masked model" in g.reason
    line = line_of(_DivideByChannelNorm.forward, "return self.conv2(self.conv1(x) / norm")
    assert f"test_hard_cases.py:{line}" in g.reason, g.reason
    graph, _, _ = prune_exact(prepare(_DivideByChannelNorm, 1e-3), x)
    assert graph.group_of("conv1").exact


class _StandardizeChannels(nn.Module):
    """Each channel over its root mean square, written with one of the ops that are not finite
    at 0 (a hand-written per-channel norm; RMSNorm does the same over the channel dim)."""

    def __init__(self, op: str, eps: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.op, self.eps = op, eps

    def forward(self, x):
        y = self.conv1(x)
        ms = y.pow(2).mean((2, 3), keepdim=True) + self.eps
        if self.op == "rsqrt":
            scale = torch.rsqrt(ms)
        elif self.op == "reciprocal":
            scale = ms.sqrt().reciprocal()
        elif self.op == "pow":
            scale = ms ** -0.5
        else:  # log: exp(-log(rms)) = 1/rms
            scale = torch.exp(-0.5 * ms.log())
        return self.conv2(y * scale)


@pytest.mark.parametrize("op", ["rsqrt", "reciprocal", "pow", "log"])
def test_infinity_from_masked_channels_is_not_exact(op):
    """Without an eps the masked model computes 0 * inf = NaN in every masked channel: the
    analysis tracks zeros, not infinities, so the group is approximate from the op that maps 0
    to inf, naming its line. With an eps the same model is exact and equal."""
    x = rand(2, 3, 6, 6)
    model = prepare(_StandardizeChannels, op, 0.0)
    mask = {"conv1": torch.arange(8) % 2 == 0}
    assert not torch.isfinite(prunefx.apply_mask(copy.deepcopy(model), mask)(x)).all()  # what the reference computes
    g = prunefx.trace(model, x).group_of("conv1")
    assert g.prunable and not g.exact and "maps channels that are zero in the masked model to inf" in g.reason, g.reason
    graph, _, _ = prune_exact(prepare(_StandardizeChannels, op, 1e-3), x)
    assert graph.group_of("conv1").exact


class _Between(nn.Module):
    """conv1 -> an activation-like module -> conv2."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv1, self.act, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), act, nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


@pytest.mark.parametrize("act, exact", [
    (nn.Threshold(0.1, 20.0), False),  # 0 <= 0.1, so a masked channel becomes 20: conv2 reads it
    (nn.Threshold(0.1, 0.0), True),
    (nn.Threshold(-0.5, 20.0), True),  # 0 > -0.5 passes through
    (nn.Hardtanh(0.5, 2.0), False),  # clamps 0 up to 0.5
    (nn.Hardtanh(-1.0, 1.0), True),
    (nn.ReLU6(), True),
], ids=["threshold-to-20", "threshold-to-0", "negative-threshold", "hardtanh-above-0", "hardtanh", "relu6"])
def test_threshold_and_hardtanh_keep_zeros_only_when_they_map_0_to_0(act, exact):
    x = rand(2, 3, 6, 6)
    model = prepare(_Between, act)
    g = prunefx.trace(model, x).group_of("conv1")
    assert g.prunable and g.exact is exact, g.reason
    if exact:
        prune_exact(model, x)
    else:
        assert "reads channels whose masked values are not zero" in g.reason
        mask = {"conv1": torch.arange(8) % 2 == 0}
        ref = prunefx.apply_mask(copy.deepcopy(model), mask)
        assert (prunefx.reconfigure(model, mask)(x) - ref(x)).abs().max() > 1e-3  # why it is not exact


def test_alpha_dropout_keeps_zeros_in_evaluation_only():
    """Alpha dropout (SELU networks) maps a dropped unit to a negative constant and shifts every
    unit, so in training a masked channel is not zero after it; in evaluation it is the identity."""
    x = rand(2, 3, 6, 6)
    model = prepare(_Between, nn.AlphaDropout(0.5))
    assert prunefx.trace(model, x).group_of("conv1").exact
    model.train()
    g = prunefx.trace(model, x).group_of("conv1")
    assert g.prunable and not g.exact and "reads channels whose masked values are not zero" in g.reason
    torch.manual_seed(0)
    masked = prunefx.apply_mask(copy.deepcopy(model), {"conv1": torch.arange(8) < 4}).conv1(x)
    assert (model.act(masked)[:, 4:] != 0).any()  # what the rule says
