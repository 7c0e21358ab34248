"""PruneTrain (prunefx.train): the group-lasso penalty against a hand computation,
from_zeros against the channels zeroed by hand, constant folding and branch removal against
the original model's outputs, and the PruneTrain callback in a short training loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import prunefx
from prunefx.nn import BranchConstant
from prunefx.train import GroupLasso, PruneTrain, shrink
from zoo import max_rel_diff, randomize_norms

EPS = 1e-8


# ---------------------------------------------------------------- small networks


def _plain() -> nn.Sequential:
    """conv(3,4) -> BN -> ReLU -> conv(4,5) -> BN -> ReLU -> pool -> flatten -> Linear(5,3);
    groups "0" (4 channels) and "3" (5 channels); input and logits pinned."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    )
    return randomize_norms(net).eval()


class _Residual(nn.Module):
    """A stream written by `stem` (+bn0) and by the branch's `conv2` (+bn2), read by the
    branch's `conv1` and by `fc`; the branch's inner group is conv1/bn1 -> conv2."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn0(self.stem(x)))
        b = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(a)))))
        return self.fc(F.relu(a + b).mean(dim=(2, 3)))


def _residual() -> _Residual:
    torch.manual_seed(0)
    return randomize_norms(_Residual()).eval()


def _flat() -> nn.Sequential:
    """conv(3,4) (bias, no BN) -> ReLU -> flatten -> Linear(4*4*4, 3): channel c of group "0"
    is read by the 16 columns c*16 .. c*16+15 of the Linear."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()


def _flat_groups(net: nn.Sequential) -> list[list[tuple[torch.Tensor, int]]]:
    columns = net[3].weight.view(3, 4, 16)  # a view: gradients land in the weight
    return [[(net[0].weight, 0), (net[0].bias, 0), (columns, 1)]]


def _hand_penalty(groups: list[list[tuple[torch.Tensor, int]]]) -> torch.Tensor:
    """sum over channels c of sqrt(sum of squares of every listed slice at c along its dim + 1e-8)."""
    total = torch.zeros((), dtype=torch.float64)
    for members in groups:
        size = members[0][0].shape[members[0][1]]
        for c in range(size):
            sq = sum(p.detach().double().select(dim, c).square().sum() for p, dim in members)
            total = total + (sq + EPS).sqrt()
    return total


def _hand_grads(groups: list[list[tuple[torch.Tensor, int]]]) -> dict[int, torch.Tensor]:
    """d/dw of the hand penalty: w / norm(its lasso group), per parameter (by id of the parameter)."""
    grads: dict[int, torch.Tensor] = {}
    for members in groups:
        size = members[0][0].shape[members[0][1]]
        for c in range(size):
            norm = float(sum(p.detach().double().select(dim, c).square().sum() for p, dim in members) + EPS) ** 0.5
            for p, dim in members:
                base = p if p._base is None else p._base  # a view of a weight: its gradient lands in the weight
                g = grads.setdefault(id(base), torch.zeros_like(base, dtype=torch.float64)).view(p.shape)
                g.select(dim, c).add_(p.detach().double().select(dim, c) / norm)
    return grads


def _plain_groups(net: nn.Sequential) -> list[list[tuple[torch.Tensor, int]]]:
    return [
        [(net[0].weight, 0), (net[0].bias, 0), (net[1].weight, 0), (net[1].bias, 0), (net[3].weight, 1)],
        [(net[3].weight, 0), (net[3].bias, 0), (net[4].weight, 0), (net[4].bias, 0), (net[8].weight, 1)],
    ]


def _residual_groups(net: _Residual) -> list[list[tuple[torch.Tensor, int]]]:
    stream = [
        (net.stem.weight, 0), (net.stem.bias, 0), (net.bn0.weight, 0), (net.bn0.bias, 0),
        (net.conv2.weight, 0), (net.conv2.bias, 0), (net.bn2.weight, 0), (net.bn2.bias, 0),
        (net.conv1.weight, 1), (net.fc.weight, 1),
    ]
    inner = [(net.conv1.weight, 0), (net.conv1.bias, 0), (net.bn1.weight, 0), (net.bn1.bias, 0), (net.conv2.weight, 1)]
    return [stream, inner]


# ---------------------------------------------------------------- 1. group lasso


@pytest.mark.parametrize("make, groups_of", [(_plain, _plain_groups), (_residual, _residual_groups), (_flat, _flat_groups)],
                         ids=["plain", "residual", "flatten"])
def test_penalty_and_gradient_match_hand_computation(make, groups_of) -> None:
    net = make()
    x = torch.randn(2, 3, 8, 8)
    lasso = GroupLasso(net, x)
    groups = groups_of(net)
    assert lasso.num_channels == sum(m[0][0].shape[m[0][1]] for m in groups)
    r = lasso.penalty()
    torch.testing.assert_close(r.double(), _hand_penalty(groups), rtol=1e-5, atol=0)

    net.zero_grad()
    r.backward()
    expected = _hand_grads(groups)
    for name, p in net.named_parameters():
        if id(p) in expected:
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad.double(), expected[id(p)], rtol=1e-4, atol=1e-6, msg=name)
        else:  # only pinned logits write parameters nobody else covers
            assert p.grad is None or not p.grad.any(), f"{name} is in no prunable group but got a lasso gradient"


def test_prox_is_group_soft_thresholding() -> None:
    net = _plain()
    lasso = GroupLasso(net, torch.randn(2, 3, 8, 8), lam=1.0)
    groups = _plain_groups(net)
    with torch.no_grad():  # two channels small enough to be thresholded to exactly zero
        for p, dim in groups[0]:
            p.select(dim, 1).mul_(1e-3)
    norms = [torch.stack([sum(p.detach().double().select(dim, c).square().sum() for p, dim in members).sqrt()
                          for c in range(members[0][0].shape[members[0][1]])]) for members in groups]
    step = 0.05
    expected = {id(p): p.detach().double().clone() for members in groups for p, _ in members}
    for members, n in zip(groups, norms, strict=True):
        scale = (1 - step / n).clamp_min(0)
        for p, dim in members:
            shape = [1] * p.dim()
            shape[dim] = -1
            expected[id(p)].mul_(scale.view(shape))
    zero = lasso.prox_(step)
    assert zero == int(sum((n <= step).sum() for n in norms)) >= 1
    for members in groups:
        for p, _ in members:
            torch.testing.assert_close(p.detach().double(), expected[id(p)], rtol=1e-5, atol=1e-7)
    mask = prunefx.masks.from_zeros(net, 0.0 + 1e-12, example_inputs=torch.randn(2, 3, 8, 8))
    assert not mask["0"][1]  # exactly zero: from_zeros finds it at any threshold


def test_proximal_mode_steps_with_the_momentum_scaled_lr() -> None:
    net = _plain()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    pt = PruneTrain(net, opt, example_inputs=x, mode="proximal")
    loss = F.cross_entropy(net(x), y)
    assert pt.regularize(loss) is loss and pt.lasso.lam is not None  # the first call sets lambda only
    calls = []
    pt.lasso.prox_ = lambda step: calls.append(step) or 0
    pt.after_step()
    assert calls == [pytest.approx(0.1 / (1 - 0.9) * pt.lasso.lam)]
    with pytest.raises(ValueError, match="mode"):
        PruneTrain(net, opt, example_inputs=x, mode="prox")


def test_pinned_groups_are_not_penalised() -> None:
    net = _plain()
    x = torch.randn(2, 3, 8, 8)
    lasso = GroupLasso(net, x)
    r0 = float(lasso.penalty().detach())
    with torch.no_grad():  # the logits' bias only writes the pinned output group
        net[8].bias.mul_(100)
    assert float(lasso.penalty().detach()) == pytest.approx(r0, rel=1e-6)
    net.zero_grad()
    lasso.penalty().backward()
    assert net[8].bias.grad is None or not net[8].bias.grad.any()
    # the first conv's input columns (pinned input group) are only penalised through its
    # output channels: scaling one input column changes R exactly as the hand formula says
    with torch.no_grad():
        net[0].weight[:, 1].mul_(3)
    torch.testing.assert_close(lasso.penalty().double(), _hand_penalty(_plain_groups(net)), rtol=1e-5, atol=0)
    assert {g.name for g in lasso.groups} == {"0", "3"}


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_lambda_is_set_at_the_first_call_then_frozen(ratio) -> None:
    net = _plain()
    x = torch.randn(2, 3, 8, 8)
    lasso = GroupLasso(net, x, ratio=ratio)
    assert lasso.lam is None
    l0 = torch.tensor(2.3)
    out = lasso(l0)
    r0 = float(lasso.penalty().detach())
    lam = lasso.lam
    assert lam is not None and lam > 0
    assert lam * r0 / (float(l0) + lam * r0) == pytest.approx(ratio, rel=1e-6)
    assert float(out.detach()) == pytest.approx(lam * r0, rel=1e-6)
    # frozen: another loss and other weights do not move it
    with torch.no_grad():
        net[0].weight.mul_(2)
    out2 = lasso(torch.tensor(100.0))
    assert lasso.lam == lam
    assert float(out2.detach()) == pytest.approx(lam * float(lasso.penalty().detach()), rel=1e-6)


def test_lambda_given_is_kept_and_bad_arguments_raise() -> None:
    net = _plain()
    x = torch.randn(2, 3, 8, 8)
    lasso = GroupLasso(net, x, lam=0.5)
    assert float(lasso(torch.tensor(3.0)).detach()) == pytest.approx(0.5 * float(lasso.penalty().detach()), rel=1e-6)
    assert lasso.lam == 0.5
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            GroupLasso(net, x, ratio=bad)
    with pytest.raises(ValueError):
        GroupLasso(net, x)(torch.tensor(0.0))


def test_lasso_leaves_approximate_groups_out_unless_asked() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 4))
    x = torch.randn(2, 8)
    assert GroupLasso(net, x).num_channels == 0
    assert float(GroupLasso(net, x).penalty().detach()) == 0.0
    full = GroupLasso(net, x, exact_only=False)
    assert full.num_channels == 6
    hand = [[(net[0].weight, 0), (net[0].bias, 0), (net[1].weight, 0), (net[1].bias, 0), (net[3].weight, 1)]]
    torch.testing.assert_close(full.penalty().double(), _hand_penalty(hand), rtol=1e-5, atol=0)


def test_rebind_keeps_lambda_and_follows_the_new_model() -> None:
    net = _plain()
    x = torch.randn(2, 3, 8, 8)
    lasso = GroupLasso(net, x, ratio=0.3)
    lasso(torch.tensor(1.7))
    lam = lasso.lam
    with torch.no_grad():
        net[0].weight[[1, 3]] = 0
        net[1].weight[[1, 3]] = 0
    small, report = shrink(net, example_inputs=x)
    assert report.changed
    again = lasso.rebind(small)
    assert again is not lasso
    assert again.lam == lam and again.ratio == 0.3
    assert again.num_channels == 2 + 5
    s = dict(small.named_modules())
    hand = [
        [(s["0"].weight, 0), (s["0"].bias, 0), (s["1"].weight, 0), (s["1"].bias, 0), (s["3"].weight, 1)],
        [(s["3"].weight, 0), (s["3"].bias, 0), (s["4"].weight, 0), (s["4"].bias, 0), (s["8"].weight, 1)],
    ]
    torch.testing.assert_close(again.penalty().double(), _hand_penalty(hand), rtol=1e-5, atol=0)
    loss = torch.tensor(5.0)
    assert float(again(loss).detach()) == pytest.approx(lam * float(again.penalty().detach()), rel=1e-6)
    assert again.lam == lam
    # the gradient reaches the new model's parameters
    again.penalty().backward()
    assert s["0"].weight.grad is not None and s["0"].weight.grad.any()


def test_channel_norms_match_penalty() -> None:
    net = _residual()
    lasso = GroupLasso(net, torch.randn(2, 3, 8, 8))
    norms = lasso.channel_norms()
    assert set(norms) == {g.name for g in lasso.groups}
    total = sum(float((n.square() + EPS).sqrt().sum()) for n in norms.values())
    assert total == pytest.approx(float(lasso.penalty().detach()), rel=1e-5)


# ---------------------------------------------------------------- 2. from_zeros


X8 = torch.randn(2, 3, 8, 8)


def _mask_as_lists(mask) -> dict[str, list[int]]:
    """group -> dead channel indices."""
    return {k: (~v).nonzero().flatten().tolist() for k, v in mask.items()}


def test_from_zeros_output_side_needs_every_multiplicative_writer() -> None:
    net = _plain()
    with torch.no_grad():
        net[0].weight[[1, 3]] = 0
        net[1].weight[[1, 3]] = 0
        net[4].weight[[0, 2]] = 0  # gamma alone: the conv filter still writes
        net[3].weight[4] = 0  # filter alone: gamma still writes
    # biases and BN shifts (random, non-zero) do not keep a channel alive
    assert net[0].bias[[1, 3]].abs().min() > 0 and net[1].bias[[1, 3]].abs().min() > 0
    mask = prunefx.masks.from_zeros(net, example_inputs=X8)
    assert _mask_as_lists(mask) == {"0": [1, 3]}
    assert mask["0"].dtype == torch.bool and mask["0"].shape == (4,)


def test_from_zeros_input_side() -> None:
    net = _plain()
    with torch.no_grad():
        net[3].weight[:, 2] = 0  # nobody reads channel 2 of group "0"
        net[8].weight[:, [0, 4]] = 0  # the classifier ignores channels 0 and 4 of group "3"
        net[8].weight[1:, 1] = 0  # channel 1 is still read by logit 0
    mask = prunefx.masks.from_zeros(net, example_inputs=X8)
    assert _mask_as_lists(mask) == {"0": [2], "3": [0, 4]}


def test_from_zeros_compares_magnitudes_not_signs() -> None:
    net = _plain()
    with torch.no_grad():
        net[0].weight[1] = 0
        net[1].weight[1] = 0
        net[0].weight[1, 0, 0, 0] = -1.0  # one large negative weight keeps it alive
        net[0].weight[2] = 0
        net[1].weight[2] = -1.0  # a negative gamma too
        net[3].weight[:, 3] = 0
        net[3].weight[0, 3, 1, 1] = -1.0  # input side
        net[0].weight[0] = -1e-6  # tiny negative weights are dead
        net[1].weight[0] = -1e-6
    mask = prunefx.masks.from_zeros(net, example_inputs=X8)
    assert _mask_as_lists(mask) == {"0": [0]}


def test_from_zeros_respects_the_threshold() -> None:
    net = _plain()
    signs = torch.randint(0, 2, net[0].weight[1].shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        net[0].weight[1] = 1e-5 * signs
        net[1].weight[1] = -1e-5
        net[0].weight[2] = 0
        net[1].weight[2] = 0.5
        net[3].weight[0, 2, 0, 0] = -0.5  # its input side is exactly at 0.5 too
    assert _mask_as_lists(prunefx.masks.from_zeros(net, example_inputs=X8)) == {"0": [1]}
    assert _mask_as_lists(prunefx.masks.from_zeros(net, 1e-4, example_inputs=X8)) == {"0": [1]}
    assert prunefx.masks.from_zeros(net, 1e-6, example_inputs=X8) == {}
    # "below" the threshold: a weight equal to it keeps the channel
    dead_at_half = _mask_as_lists(prunefx.masks.from_zeros(net, 0.5, example_inputs=X8))["0"]
    assert 2 not in dead_at_half and 1 in dead_at_half
    with pytest.raises(ValueError):
        prunefx.masks.from_zeros(net, -1.0, example_inputs=X8)


def test_from_zeros_accepts_a_graph() -> None:
    net = _plain()
    with torch.no_grad():
        net[3].weight[:, 0] = 0
    graph = prunefx.trace(net, X8)
    assert _mask_as_lists(prunefx.masks.from_zeros(graph)) == {"0": [0]}


def test_from_zeros_nothing_dead_gives_an_empty_mask() -> None:
    assert prunefx.masks.from_zeros(_residual(), example_inputs=X8) == {}


def test_from_zeros_leaves_approximate_groups_out_when_exact_only() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 4))
    x = torch.randn(2, 8)
    with torch.no_grad():
        net[3].weight[:, 2] = 0
    assert prunefx.masks.from_zeros(net, example_inputs=x) == {}
    assert _mask_as_lists(prunefx.masks.from_zeros(net, example_inputs=x, exact_only=False)) == {"0": [2]}


def test_from_zeros_all_dead_gives_an_all_false_vector() -> None:
    net = _residual()
    with torch.no_grad():
        net.conv2.weight[:, :] = 0  # nobody reads the inner group
    mask = prunefx.masks.from_zeros(net, example_inputs=X8)
    assert list(mask) == ["conv1"] and not mask["conv1"].any() and mask["conv1"].shape == (6,)


# the layer1 stream of resnet18 is written by the stem and by both blocks' conv2/bn2
_STREAM_WRITERS = ("conv1", "bn1", "layer1.0.conv2", "layer1.0.bn2", "layer1.1.conv2", "layer1.1.bn2")
_STREAM_READERS = ("layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0")


@pytest.fixture(scope="module")
def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.resnet18(num_classes=10)).eval()


@pytest.fixture(scope="module")
def _resnet18_graph(_resnet18):
    return prunefx.trace(_resnet18, torch.randn(1, 3, 32, 32))


def test_from_zeros_union_across_a_residual_stream(_resnet18, _resnet18_graph) -> None:
    net = copy.deepcopy(_resnet18)
    graph = prunefx.trace(net, torch.randn(1, 3, 32, 32))
    modules = dict(net.named_modules())
    k = 7
    with torch.no_grad():
        for name in _STREAM_WRITERS[:-2]:  # all but the last block
            modules[name].weight[k] = 0
    assert prunefx.masks.from_zeros(graph) == {}, "the stream channel is still written by layer1.1"
    with torch.no_grad():
        modules["layer1.1.conv2"].weight[k] = 0
    assert prunefx.masks.from_zeros(graph) == {}, "the stream channel is still scaled by layer1.1.bn2"
    with torch.no_grad():
        modules["layer1.1.bn2"].weight[k] = 0
    assert _mask_as_lists(prunefx.masks.from_zeros(graph)) == {"conv1": [k]}


def test_from_zeros_stream_read_side(_resnet18) -> None:
    net = copy.deepcopy(_resnet18)
    graph = prunefx.trace(net, torch.randn(1, 3, 32, 32))
    modules = dict(net.named_modules())
    with torch.no_grad():
        for name in _STREAM_READERS[:-1]:
            modules[name].weight[:, 11] = 0
    assert prunefx.masks.from_zeros(graph) == {}
    with torch.no_grad():
        modules[_STREAM_READERS[-1]].weight[:, 11] = 0
    assert _mask_as_lists(prunefx.masks.from_zeros(graph)) == {"conv1": [11]}


# ---------------------------------------------------------------- 3. constant folding


class _FoldNet(nn.Module):
    """conv3x3 -> BN -> ReLU -> `reader` (1x1 or 3x3) [-> BN] -> ReLU -> pool -> Linear."""

    def __init__(self, reader: nn.Conv2d, bn_after: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2 = reader
        self.bn2 = nn.BatchNorm2d(reader.out_channels) if bn_after else nn.Identity()
        self.fc = nn.Linear(reader.out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean(dim=(2, 3)))


def _fold_net(reader: nn.Conv2d, bn_after: bool) -> _FoldNet:
    torch.manual_seed(0)
    net = randomize_norms(_FoldNet(reader, bn_after))
    with torch.no_grad():
        net.bn1.bias.abs_().add_(0.2)  # dead channels emit a clearly positive constant through the ReLU
        if bn_after:
            net.bn2.bias.abs_().add_(0.2)
        else:
            net.conv2.bias is not None and net.conv2.bias.abs_().add_(0.2)
        # dead channels of bn1's group: weights and gamma zero, beta and running stats random
        net.conv1.weight[[1, 4]] = 0
        net.bn1.weight[[1, 4]] = 0
    return net.eval()


def _shrink_and_compare(net: nn.Module, x: torch.Tensor, optimizer=None):
    with torch.no_grad():
        expected = net(x)
    small, report = shrink(net, example_inputs=x, optimizer=optimizer)
    small.eval()
    with torch.no_grad():
        out = small(x)
    return small, report, max_rel_diff(out, expected)


def test_fold_into_a_1x1_conv_bias_and_a_linear() -> None:
    net = _fold_net(nn.Conv2d(6, 5, 1), bn_after=True)
    with torch.no_grad():  # also dead channels of bn2's group, read by the Linear
        net.conv2.weight[[0, 3]] = 0
        net.bn2.weight[[0, 3]] = 0
    x = torch.randn(4, 3, 8, 8)
    small, report, diff = _shrink_and_compare(net, x)
    assert report.changed
    assert report.channels["conv1"] == (6, 4) and report.channels["conv2"] == (5, 3)
    folds = {f.module: f for f in report.fold.folds}
    assert set(folds) == {"conv2", "fc"}
    assert folds["conv2"].target == "bias" and folds["fc"].target == "bias"
    assert folds["conv2"].removed_inputs == 2 and folds["fc"].removed_inputs == 2
    assert all(f.exact and f.max_abs > 0 for f in folds.values())
    assert report.fold.max_relative_residual < 1e-5
    assert not report.fold.unfoldable and not report.kept_back
    assert small.conv1.out_channels == 4 and small.conv2.in_channels == 4 and small.fc.in_features == 3
    assert diff < 1e-4, f"output changed by {diff:.2e} after folding"


def test_fold_into_a_linear_after_flatten() -> None:
    """A conv channel with zero filter but a bias reads as 16 columns of the Linear."""
    net = _flat()
    with torch.no_grad():
        net[0].weight[[0, 2]] = 0
        net[0].bias[[0, 2]] = torch.tensor([0.7, 0.3])
    x = torch.randn(4, 3, 8, 8)
    assert _mask_as_lists(prunefx.masks.from_zeros(net, example_inputs=x)) == {"0": [0, 2]}
    small, report, diff = _shrink_and_compare(net, x)
    (fold,) = report.fold.folds
    assert fold.module == "3" and fold.target == "bias" and fold.exact and fold.removed_inputs == 32
    assert small.get_submodule("3").in_features == 32
    assert diff < 1e-4


def test_naive_removal_would_change_the_output() -> None:
    """The folding test above is meaningful: reconfigure without folding differs."""
    net = _fold_net(nn.Conv2d(6, 5, 1), bn_after=True)
    x = torch.randn(4, 3, 8, 8)
    mask = prunefx.masks.from_zeros(net, example_inputs=x)
    naive = prunefx.reconfigure(net, mask, example_inputs=x).eval()
    with torch.no_grad():
        assert max_rel_diff(naive(x), net(x)) > 1e-3


def test_fold_creates_a_bias_that_the_optimizer_trains() -> None:
    net = _fold_net(nn.Conv2d(6, 5, 1, bias=False), bn_after=False)
    x = torch.randn(4, 3, 8, 8)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    small, report, diff = _shrink_and_compare(net, x, opt)
    (fold,) = [f for f in report.fold.folds if f.module == "conv2"]
    assert fold.target == "new bias" and fold.exact
    assert [n for n, _ in report.fold.new_parameters] == ["conv2.bias"]
    assert isinstance(small.conv2.bias, nn.Parameter) and small.conv2.bias.shape == (5,)
    assert diff < 1e-4
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(small.conv2.bias) in in_opt
    assert in_opt == {id(p) for p in small.parameters()}
    small.train()
    opt.zero_grad()
    small(x).square().mean().backward()
    before = small.conv2.bias.detach().clone()
    opt.step()
    assert not torch.equal(small.conv2.bias.detach(), before), "the new bias did not train"


def test_a_new_bias_is_sliced_with_its_layers_pruned_outputs() -> None:
    """conv2 gets a new bias from conv1's dead channels and loses outputs of its own: the bias
    must be sliced with them (the analysis gains the bias as a member of the layer's output channels)."""
    net = _fold_net(nn.Conv2d(6, 5, 1, bias=False), bn_after=False)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():  # conv2's output channel 2 is dead too (read by nothing alive)
        net.conv2.weight[2] = 0
    small, report, diff = _shrink_and_compare(net, x)
    assert report.channels["conv2"] == (5, 4) and small.get_submodule("conv2").bias.shape == (4,)
    assert diff < 1e-4


def test_fold_into_the_running_mean_of_the_next_batchnorm() -> None:
    net = _fold_net(nn.Conv2d(6, 5, 1, bias=False), bn_after=True)
    mean_before = net.bn2.running_mean.clone()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected_train = copy.deepcopy(net).train()(x)
    small, report, diff = _shrink_and_compare(net, x)
    with torch.no_grad():  # in training mode the batch mean absorbs the constant
        assert max_rel_diff(small.train()(x), expected_train) < 1e-4
    (fold,) = report.fold.folds
    assert fold.module == "conv2" and fold.target == "bn2.running_mean" and fold.exact
    assert not report.fold.new_parameters and small.conv2.bias is None
    assert not torch.allclose(small.bn2.running_mean, mean_before)
    assert diff < 1e-4


def test_fold_through_a_padded_conv_reports_its_residual() -> None:
    net = _fold_net(nn.Conv2d(6, 5, 3, padding=1), bn_after=True)
    x = torch.randn(4, 3, 8, 8)
    captured: dict[str, torch.Tensor] = {}

    def grab(key):
        return lambda _m, _args, out: captured.__setitem__(key, out.detach())

    h = net.conv2.register_forward_hook(grab("before"))
    with torch.no_grad():
        expected = net(x)
    h.remove()
    small, report = shrink(net, example_inputs=x)
    small.eval()
    small.conv2.register_forward_hook(grab("after"))
    with torch.no_grad():
        out = small(x)
    (fold,) = report.fold.folds
    assert fold.module == "conv2" and not fold.exact
    assert fold.residual > 0 and report.fold.max_relative_residual > 0
    assert "padded borders" in str(report.fold)
    layer_diff = float((captured["after"] - captured["before"]).abs().max())
    assert layer_diff > 0
    assert layer_diff <= fold.residual * (1 + 1e-4) + 1e-6, "the reported residual must bound the layer's error"
    assert max_rel_diff(out, expected) > 1e-6, "the model output changes at the borders"
    # interior positions are exact: the fold is right away from the padding
    inner = (captured["after"] - captured["before"])[:, :, 1:-1, 1:-1]
    assert float(inner.abs().max()) < 1e-4


def test_shrink_without_dead_channels_is_a_no_op() -> None:
    net = _plain()
    small, report = shrink(net, example_inputs=X8)
    assert small is net and not report.changed and "unchanged" in str(report)


# ---------------------------------------------------------------- 4. branch removal


class _Bottleneck(nn.Module):
    def __init__(self, c: int, mid: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return F.relu(self.bn3(self.conv3(h)) + x)


class _TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.block0, self.block1 = _Bottleneck(8, 4), _Bottleneck(8, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        h = self.block1(self.block0(h))
        return self.fc(torch.flatten(self.pool(h), 1))


def _starved_tiny_resnet() -> _TinyResNet:
    torch.manual_seed(0)
    net = randomize_norms(_TinyResNet())
    with torch.no_grad():
        net.block0.conv1.weight.zero_()
        net.block0.bn1.weight.zero_()
        for bn in (net.block0.bn1, net.block0.bn2, net.block0.bn3):
            bn.bias.abs_().add_(0.2)  # the branch emits a non-zero constant
    return net


def _train_step(model, opt, x) -> None:
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def test_branch_removal_keeps_the_output() -> None:
    net = _starved_tiny_resnet()
    x = torch.randn(4, 3, 8, 8)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net.train()
    reference_train = copy.deepcopy(net)
    _train_step(net, opt, x)  # momentum state exists
    with torch.no_grad():  # the step moved the zeroed weights (momentum + lasso-free loss): zero again
        net.block0.conv1.weight.zero_()
        net.block0.bn1.weight.zero_()
        reference_train.load_state_dict(net.state_dict())
    net.eval()
    captured = {}
    net.block0.bn3.register_forward_hook(lambda _m, _a, out: captured.__setitem__("eval", out.detach()))
    reference_train.block0.bn3.register_forward_hook(lambda _m, _a, out: captured.__setitem__("train", out.detach()))
    with torch.no_grad():
        expected = net(x)
        expected_train = reference_train.train()(x)
    branch_eval, branch_train = captured["eval"], captured["train"]
    removed_params = {id(p) for n in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
                      for p in getattr(net.block0, n).parameters()}

    small, report = shrink(net, example_inputs=x, optimizer=opt)
    assert report.changed
    assert report.branches.starved == ("block0.conv2",)
    assert set(report.branches.removed_modules) == {f"block0.{n}" for n in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")}
    assert report.branches.declined is None
    (const_name, shape), = report.branches.constants
    assert shape == (1, 8, 1, 1)
    # the constant is the branch's output: bn3 of a constant, in each mode
    constant = small.get_submodule(const_name)
    torch.testing.assert_close(constant.eval_value, branch_eval[:1, :, :1, :1])
    torch.testing.assert_close(constant.train_value, branch_train[:1, :, :1, :1], rtol=1e-4, atol=1e-4)
    assert constant.eval_value.abs().max() > 0
    modules = dict(small.named_modules())
    assert not any(n.startswith(("block0.conv", "block0.bn")) for n in modules if n != const_name)
    assert "block1.conv1" in modules and small.block1.conv1.in_channels == 8

    small.eval()
    with torch.no_grad():
        assert max_rel_diff(small(x), expected) < 1e-4
    # in training mode a BatchNorm of a constant is its shift: the train-mode forward matches too
    small.train()
    out = small(x)
    assert max_rel_diff(out.detach(), expected_train) < 1e-3
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert not removed_params & {id(p) for p in in_opt}
    assert not removed_params & {id(p) for p in opt.state}
    assert {id(p) for p in in_opt} == {id(p) for p in small.parameters()}
    before = {n: p.detach().clone() for n, p in small.named_parameters()}
    _train_step(small, opt, x)
    assert any(not torch.equal(before[n], p) for n, p in small.named_parameters())
    assert torch.isfinite(small(x)).all()


def test_branch_removal_on_resnet18(_resnet18) -> None:
    m = copy.deepcopy(_resnet18).train()
    with torch.no_grad():
        m.layer1[0].conv1.weight[:10] = 0
        m.layer1[0].bn1.weight[:10] = 0
        m.layer2[1].conv1.weight.zero_()
        m.layer2[1].bn1.weight.zero_()
    x = torch.randn(4, 3, 32, 32)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    _train_step(m, opt, x)
    with torch.no_grad():
        m.layer1[0].conv1.weight[:10] = 0
        m.layer1[0].bn1.weight[:10] = 0
        m.layer2[1].conv1.weight.zero_()
        m.layer2[1].bn1.weight.zero_()
    m.eval()
    with torch.no_grad():
        expected = m(x)
    small, rep = shrink(m, example_inputs=x, optimizer=opt)
    assert rep.changed
    assert set(rep.branches.removed_modules) == {"layer2.1.conv1", "layer2.1.bn1", "layer2.1.conv2", "layer2.1.bn2"}
    assert [n for n, _ in rep.branches.constants] == ["layer2.1.bn2_constant"]
    assert dict(small.get_submodule("layer2.1.bn2_constant").named_buffers()).keys() >= {"eval_value"}
    assert rep.channels["layer1.0.conv1"] == (64, 54)
    assert rep.channels["layer2.1.conv1"] == (128, 0)
    assert small.get_submodule("layer1.0.conv1").out_channels == 54
    assert small.get_submodule("layer1.0.conv2").in_channels == 54
    modules = dict(small.named_modules())
    assert not any(n.startswith("layer2.1.conv") or n in ("layer2.1.bn1", "layer2.1.bn2") for n in modules)
    assert rep.params[1] < rep.params[0] and rep.flops[1] < rep.flops[0]
    # layer2.1.conv2 is a padded 3x3: its fold is reported as inexact
    folds = {f.module: f for f in rep.fold.folds}
    assert not folds["layer2.1.conv2"].exact and not folds["layer1.0.conv2"].exact
    small.eval()
    with torch.no_grad():
        out = small(x)
    assert out.shape == expected.shape and torch.isfinite(out).all()
    small.train()
    _train_step(small, opt, x)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in small.parameters()}


# ---------------------------------------------------------------- 5. the PruneTrain callback


def test_prunetrain_callback_reconfigures_during_training() -> None:
    net = _plain().train()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(3)]
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    pt = PruneTrain(net, opt, example_inputs=data[0][0], every=1)
    changes = []
    pt.on_change.append(lambda model, event: changes.append((model, event)))

    def epoch() -> None:
        for x, y in data:
            loss = F.cross_entropy(pt.model(x), y)
            opt.zero_grad()
            total = pt.regularize(loss)
            assert float(total.detach()) > float(loss.detach())
            total.backward()
            opt.step()

    epoch()
    lam, lasso0 = pt.lasso.lam, pt.lasso
    assert lam is not None and lam > 0
    assert pt.epoch_end(0) is net  # nothing is zero yet
    assert len(pt.history) == 1 and not pt.history[0].report.changed and pt.lasso is lasso0 and not changes

    with torch.no_grad():  # what group lasso would have done: channels 0 and 2 of group "0"
        net[0].weight[[0, 2]] = 0
        net[1].weight[[0, 2]] = 0
    momentum = opt.state[net[3].weight]["momentum_buffer"].clone()
    new = pt.epoch_end(1)
    assert new is pt.model and new is not net and new.training
    assert len(pt.history) == 2
    event = pt.history[-1]
    assert event.epoch == 1 and event.report.changed and event.report.channels["0"] == (4, 2)
    assert changes == [(new, event)]
    assert pt.lasso is not lasso0 and pt.lasso.lam == lam and pt.lasso.num_channels == 2 + 5
    assert new.get_submodule("0").out_channels == 2
    # the optimizer follows: same object, new parameters, momentum sliced like the weights
    params = list(new.parameters())
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params}
    for p in params:
        assert opt.state[p]["momentum_buffer"].shape == p.shape
    torch.testing.assert_close(opt.state[new.get_submodule("3").weight]["momentum_buffer"], momentum[:, [1, 3]])

    epoch()  # training goes on with the new model
    for x, _ in data:
        assert torch.isfinite(pt.model(x)).all()
    assert pt.lasso.lam == lam


def test_prunetrain_schedule() -> None:
    net = _plain()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    pt = PruneTrain(net, opt, example_inputs=X8, every=2, start_after=2, stop_after=6)
    assert [e for e in range(10) if pt.due(e)] == [3, 5]
    pt = PruneTrain(net, opt, example_inputs=X8, every=3)
    assert [e for e in range(10) if pt.due(e)] == [2, 5, 8]
    with torch.no_grad():
        net[0].weight[1] = 0
        net[1].weight[1] = 0
    assert pt.epoch_end(0) is net and pt.epoch_end(1) is net and not pt.history  # not due: nothing ran
    small = pt.epoch_end(2)
    assert small is not net and [e.epoch for e in pt.history] == [2]
    with pytest.raises(ValueError):
        PruneTrain(net, opt, example_inputs=X8, every=0)


def test_a_shrunk_model_with_a_branch_constant_shrinks_again() -> None:
    net = _starved_tiny_resnet().eval()
    x = torch.randn(4, 3, 8, 8)
    small, _ = shrink(net, example_inputs=x)
    with torch.no_grad():
        small.block1.conv2.weight[[0, 1]] = 0
        small.block1.bn2.weight[[0, 1]] = 0
        small.block1.bn2.bias.abs_().add_(0.2)
    small.eval()
    reference_train = copy.deepcopy(small).train()
    with torch.no_grad():
        expected, expected_train = small(x), reference_train(x)
    smaller, report = shrink(small, example_inputs=x)
    assert report.changed and report.channels["block1.conv2"] == (4, 2)
    (fold,) = report.fold.folds
    assert fold.module == "block1.conv3" and fold.max_abs > 0
    with torch.no_grad():
        assert max_rel_diff(smaller.eval()(x), expected) < 1e-4
        assert max_rel_diff(smaller.train()(x), expected_train) < 1e-3  # the branch constant's train value survives


def test_shrink_result_holds_a_branch_constant_module() -> None:
    net = _starved_tiny_resnet().eval()
    small, report = shrink(net, example_inputs=torch.randn(4, 3, 8, 8))
    (name, _), = report.branches.constants
    assert isinstance(small.get_submodule(name), BranchConstant)


def test_checkpoint_of_a_model_with_a_removed_branch() -> None:
    net = _starved_tiny_resnet().eval()
    x = torch.randn(4, 3, 8, 8)
    small, _ = shrink(net, example_inputs=x)
    rebuilt = prunefx.load_state_dict(_TinyResNet(), prunefx.state_dict(small)).eval()
    with torch.no_grad():
        assert max_rel_diff(rebuilt(x), small.eval()(x)) < 1e-6


def test_checkpoint_after_the_stream_shrank_then_a_branch_went() -> None:
    """The branch constant is recorded in the original width: its channels are the stream's
    survivors of the first shrink, so rebuilding from a fresh model must slice it alike."""
    torch.manual_seed(0)
    net = randomize_norms(_TinyResNet()).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():  # stream channels 2 and 5 die in every writer (stem, both blocks' conv3/bn3)
        for conv, bn in ((net.conv, net.bn), (net.block0.conv3, net.block0.bn3), (net.block1.conv3, net.block1.bn3)):
            conv.weight[[2, 5]] = 0
            bn.weight[[2, 5]] = 0
    first, rep1 = shrink(net, example_inputs=x)
    assert rep1.channels["conv"] == (8, 6)
    with torch.no_grad():  # then block1's inner channels all die: its branch goes
        first.get_submodule("block1.conv1").weight.zero_()
        first.get_submodule("block1.bn1").weight.zero_()
        first.get_submodule("block1.bn3").bias.add_(0.3)
    second, rep2 = shrink(first, example_inputs=x)
    assert rep2.branches.removed_modules and rep2.branches.constants[0][1] == (1, 6, 1, 1)

    state = prunefx.state_dict(second)
    rebuilt = prunefx.load_state_dict(_TinyResNet(), state).eval()
    with torch.no_grad():
        assert max_rel_diff(rebuilt(x), second.eval()(x)) < 1e-6


def test_a_branch_constant_does_not_keep_a_dead_stream_channel_alive() -> None:
    """A BranchConstant adds to the stream like a bias: when every weight writing a stream
    channel is zero, the channel is dead and the constant is folded into its readers."""
    net = _starved_tiny_resnet().eval()
    x = torch.randn(4, 3, 8, 8)
    small, _ = shrink(net, example_inputs=x)
    with torch.no_grad():  # stream channel 3: zero in every remaining multiplicative writer
        for conv, bn in (("conv", "bn"), ("block1.conv3", "block1.bn3")):
            small.get_submodule(conv).weight[3] = 0
            small.get_submodule(bn).weight[3] = 0
        expected = small(x)
    assert not prunefx.masks.from_zeros(small, example_inputs=x)["conv"][3]
    smaller, report = shrink(small, example_inputs=x)
    assert report.channels["conv"] == (8, 7)
    with torch.no_grad():
        assert max_rel_diff(smaller.eval()(x), expected) < 1e-4  # block1's readers are 1x1 convs and the fc
