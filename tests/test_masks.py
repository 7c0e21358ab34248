"""prunefx.masks: every criterion on a small net whose right answer is planted by construction,
the selection options, cost estimates and to_budget, schedules, and torch.nn.utils.prune
interop; plus runs on ResNet-50 (small input) and to_budget on ResNet-50, MobileNetV2 and
ViT-B/16."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune as tprune
import torchvision
from torch import nn

import prunefx
from prunefx.masks import ACDC, Cubic, SoftMasking, WeightDistancePlateau, cubic_sparsity
from zoo import randomize_norms

X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])
LOSS = nn.CrossEntropyLoss()


class Net(nn.Module):
    """Three channel groups with known members:

    - "conv1" (8): a residual stream: conv1 -> bn1 -> (+ conv2 -> bn2), read by conv2, conv3;
    - "conv3" (6): conv3 (+bias) -> relu -> flatten -> fc; each channel owns 16 fc columns;
    - "fc" (5): the output (pinned).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(x)))
        a = torch.relu(a + self.bn2(self.conv2(a)))
        h = torch.relu(self.conv3(a))
        return self.fc(torch.flatten(h, 1))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return randomize_norms(Net(), seed).eval()


def dropped(mask, name: str) -> set[int]:
    return set(torch.nonzero(~mask[name]).flatten().tolist())


def fc_columns(c: int) -> slice:
    return slice(16 * c, 16 * (c + 1))


def plant_small(model: Net, stream: tuple[int, ...] = (), hidden: tuple[int, ...] = (), scale: float = 1e-3) -> Net:
    """Scale every weight of the given channels by ``scale``, by hand (not via the analysis)."""
    with torch.no_grad():
        for c in stream:
            for t in (model.conv1.weight[c], model.conv2.weight[c], model.conv2.weight[:, c], model.conv3.weight[:, c],
                      model.bn1.weight[c:c + 1], model.bn1.bias[c:c + 1], model.bn2.weight[c:c + 1], model.bn2.bias[c:c + 1]):
                t.mul_(scale)
        for c in hidden:
            for t in (model.conv3.weight[c], model.conv3.bias[c:c + 1], model.fc.weight[:, fc_columns(c)]):
                t.mul_(scale)
    return model


def plant_dead(model: Net, hidden: tuple[int, ...]) -> Net:
    """Channels of the hidden group that compute exactly zero (zero filter and bias) but whose
    readers (fc columns) are the largest weights of the group: magnitude keeps them, every
    gradient criterion sees that they do not matter."""
    with torch.no_grad():
        for c in hidden:
            model.conv3.weight[c].zero_()
            model.conv3.bias[c] = 0.0
            model.fc.weight[:, fc_columns(c)].mul_(50.0)
    return model


# ---- the groups the tests rely on ------------------------------------------------------------
def test_net_has_the_groups_the_tests_plant_into() -> None:
    g = prunefx.trace(net(), X)
    assert {gr.name: (gr.size, gr.prunable) for gr in g.groups} == {
        "conv1": (8, True), "conv1#1": (3, False), "conv3": (6, True), "fc": (5, False),
    }
    fc_member = next(m for m in g.group("conv3").members if m.name == "fc.weight")
    assert fc_member.dim == 1 and fc_member.index_map[2] == tuple(range(32, 48))


# ---- magnitude -------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [1, 2])
def test_magnitude_drops_the_planted_small_channels(p: int) -> None:
    model = plant_small(net(), stream=(1, 6), hidden=(0, 4))
    g = prunefx.trace(model, X)
    mask = prunefx.masks.magnitude(g, 0.25, p=p)
    assert dropped(mask, "conv1") == {1, 6}
    mask = prunefx.masks.magnitude(g, 2 / 6, p=p)
    assert dropped(mask, "conv3") == {0, 4}
    assert set(mask) == {"conv1", "conv3"}  # pinned groups are never masked


def test_magnitude_scores_every_weight_of_every_member() -> None:
    model = net()
    g = prunefx.trace(model, X)
    scores = prunefx.masks.channel_sums(g, lambda t, d: prunefx.masks.channels.along(t.abs(), d))
    c = 3
    by_hand = (model.conv3.weight[c].abs().sum() + model.conv3.bias[c].abs() + model.fc.weight[:, fc_columns(c)].abs().sum())
    torch.testing.assert_close(scores["conv3"][c], by_hand.double())
    l2 = prunefx.masks.criteria.magnitude_scores(g, p=2)["conv3"][c]
    by_hand2 = (model.conv3.weight[c].square().sum() + model.conv3.bias[c].square() + model.fc.weight[:, fc_columns(c)].square().sum()).sqrt()
    torch.testing.assert_close(l2, by_hand2.double())


def test_magnitude_write_roles_is_the_filter_norm() -> None:
    model = net()
    with torch.no_grad():  # small filters, large readers: only the writers' norm finds them
        model.conv3.weight[[2, 5]] *= 1e-3
        model.conv3.bias[[2, 5]] *= 1e-3
        model.fc.weight[:, fc_columns(2)] *= 100
        model.fc.weight[:, fc_columns(5)] *= 100
    g = prunefx.trace(model, X)
    assert dropped(prunefx.masks.magnitude(g, 2 / 6, roles=("write",)), "conv3") == {2, 5}
    assert dropped(prunefx.masks.magnitude(g, 2 / 6), "conv3") != {2, 5}


def test_global_ranking_is_normalised_per_group() -> None:
    model = plant_small(net(), stream=(2,), hidden=(5,), scale=0.1)
    with torch.no_grad():  # the hidden group's weights are 1000x larger than the stream's
        for t in (model.conv3.bias, model.fc.weight):  # conv3.weight is read by the stream too
            t.mul_(1000)
    g = prunefx.trace(model, X)
    mask = prunefx.masks.magnitude(g, 2 / 14, scope="global")
    assert dropped(mask, "conv1") == {2} and dropped(mask, "conv3") == {5}
    raw = prunefx.masks.magnitude(g, 2 / 14, scope="global", normalize=None)
    assert len(dropped(raw, "conv1")) == 2 and not dropped(raw, "conv3")


# ---- BatchNorm scale (Network Slimming) ------------------------------------------------------
def test_bn_scale_drops_the_smallest_gammas_and_skips_groups_without_bn() -> None:
    model = net()
    with torch.no_grad():
        model.bn1.weight.fill_(1.0)
        model.bn2.weight.fill_(1.0)
        model.bn1.weight[[0, 5]] = 0.01
        model.bn2.weight[[0, 5]] = -0.02  # |gamma| counts
        model.bn2.weight[3] = 0.5
    g = prunefx.trace(model, X)
    mask = prunefx.masks.bn_scale(g, 2 / 8)
    assert set(mask) == {"conv1"}  # "conv3" has no BatchNorm: kept whole
    assert dropped(mask, "conv1") == {0, 5}
    assert dropped(prunefx.masks.bn_scale(g, 3 / 8), "conv1") == {0, 3, 5}


def test_slimming_penalty_is_l1_on_gamma() -> None:
    model = net()
    expected = 1e-3 * (model.bn1.weight.abs().sum() + model.bn2.weight.abs().sum())
    pen = prunefx.masks.slimming_penalty(model, 1e-3)
    torch.testing.assert_close(pen, expected)
    pen.backward()
    torch.testing.assert_close(model.bn1.weight.grad, 1e-3 * model.bn1.weight.sign())
    g = prunefx.trace(model, X)
    torch.testing.assert_close(prunefx.masks.slimming_penalty(model, 1e-3, graph=g), expected)


# ---- gradient criteria: taylor, snip, gradient_flow ------------------------------------------
@pytest.mark.parametrize("criterion", ["taylor", "snip", "gradient_flow"])
def test_gradient_criteria_drop_dead_channels_that_magnitude_keeps(criterion: str) -> None:
    model = plant_dead(net().train(), hidden=(1, 4))
    g = prunefx.trace(model, X)
    fn = getattr(prunefx.masks, criterion)
    mask = fn(g, 2 / 6, loss_fn=LOSS, batch=(X, Y))
    assert dropped(mask, "conv3") == {1, 4}
    assert not dropped(prunefx.masks.magnitude(g, 2 / 6), "conv3") & {1, 4}
    scorer = getattr(prunefx.masks.saliency, f"{criterion}_scores")
    s = scorer(g, loss_fn=LOSS, batches=[(X, Y), (X.flip(0), Y)])["conv3"]
    assert s[[1, 4]].abs().max() == 0 and (s[[0, 2, 3, 5]] > 0).all()
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: .grad untouched


@pytest.mark.parametrize("criterion", ["taylor", "snip", "gradient_flow"])
def test_gradient_criteria_score_frozen_weights(criterion: str) -> None:
    """A frozen weight's channels (a frozen backbone, a LoRA model's base model) are scored
    as if it trained, not as zeros; the flags are put back, also when the loss fails."""
    model = net().train()
    g = prunefx.trace(model, X)
    scorer = getattr(prunefx.masks.saliency, f"{criterion}_scores")
    want = scorer(g, loss_fn=LOSS, batch=(X, Y))
    for p in (model.conv1.weight, model.conv3.weight, model.conv3.bias, model.bn2.weight):
        p.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    got = scorer(g, loss_fn=LOSS, batch=(X, Y))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert (got["conv3"] > 0).all()
    assert [p.requires_grad for p in model.parameters()] == flags
    with pytest.raises(ValueError, match="scalar"):
        scorer(g, loss_fn=lambda out, y: out, batch=(X, Y))
    assert [p.requires_grad for p in model.parameters()] == flags


def test_taylor_is_the_first_order_loss_change() -> None:
    model = net()
    g = prunefx.trace(model, X)
    s = prunefx.masks.saliency.taylor_scores(g, loss_fn=LOSS, batch=(X, Y))["conv3"]
    loss = LOSS(model(X), Y)
    w = [model.conv3.weight, model.conv3.bias, model.fc.weight]
    gw, gb, gf = torch.autograd.grad(loss, w)
    c = 2
    by_hand = (w[0][c] * gw[c]).sum() + w[1][c] * gb[c] + (w[2][:, fc_columns(c)] * gf[:, fc_columns(c)]).sum()
    torch.testing.assert_close(s[c], by_hand.double().square())


def test_gradient_flow_is_the_gate_derivative() -> None:
    """s_c = |d/da_c (g_const . g(theta, a))| at a = 1, computed here with an explicit gate on
    conv3's output channels (EarlyCroP's construction); prunefx gets it from a Hessian-vector
    product on the writers of each channel instead."""
    model = net().train()
    g = prunefx.trace(model, X)
    batches = [(X, Y), (X.flip(0), Y.flip(0))]
    s = prunefx.masks.saliency.gradient_flow_scores(g, loss_fn=LOSS, batches=batches)["conv3"]
    params = list(model.parameters())
    gate = torch.ones(6, requires_grad=True)

    def gated_loss(x, y):
        a = torch.relu(model.bn1(model.conv1(x)))
        a = torch.relu(a + model.bn2(model.conv2(a)))
        h = torch.relu(model.conv3(a) * gate[None, :, None, None])
        return LOSS(model.fc(torch.flatten(h, 1)), y)

    g_const = [sum(t) for t in zip(*(torch.autograd.grad(gated_loss(x, y), params) for x, y in batches), strict=True)]
    z = 0
    for x, y in batches:
        grads = torch.autograd.grad(gated_loss(x, y), params, create_graph=True)
        z = z + sum((a.detach() * b).sum() for a, b in zip(g_const, grads, strict=True))
    (dz_da,) = torch.autograd.grad(z, gate)
    torch.testing.assert_close(s, dz_da.abs().double(), rtol=1e-4, atol=1e-10)


def test_gradient_criteria_validate_their_inputs() -> None:
    g = prunefx.trace(net(), X)
    with pytest.raises(ValueError, match="exactly one of batch"):
        prunefx.masks.taylor(g, 0.5, loss_fn=LOSS)
    with pytest.raises(ValueError, match="scalar"):
        prunefx.masks.snip(g, 0.5, loss_fn=lambda out, y: out, batch=(X, Y))


# ---- baselines: random, uniform --------------------------------------------------------------
def _old_random(graph, ratio, seed=0, exact_only=False, min_keep=1, protect=()):
    """prunefx.masks.random as it was before the masks package (its outputs must not move)."""
    gen = torch.Generator().manual_seed(seed)
    mask = {}
    for g in graph.groups:
        if g.prunable and (g.exact or not exact_only) and g.name not in protect and g.size > 1:
            keep = max(min_keep, g.size - round(ratio * g.size))
            order = torch.randperm(g.size, generator=gen)
            m = torch.zeros(g.size, dtype=torch.bool)
            m[order[:keep]] = True
            mask[g.name] = m
    return mask


def test_random_is_unchanged() -> None:
    g = prunefx.trace(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    for kw in [dict(seed=0), dict(seed=3, exact_only=True), dict(seed=1, min_keep=40, protect=("conv1",))]:
        new, old = prunefx.masks.random(g, 0.5, **kw), _old_random(g, 0.5, **kw)
        assert new.keys() == old.keys()
        assert all(torch.equal(new[k], old[k]) for k in new)
    with pytest.raises(ValueError, match="ratio"):
        prunefx.masks.random(g, 1.0)


def test_uniform_keeps_the_first_channels_of_every_group() -> None:
    g = prunefx.trace(net(), X)
    mask = prunefx.masks.uniform(g, 0.5)
    assert mask["conv1"].tolist() == [True] * 4 + [False] * 4
    assert mask["conv3"].tolist() == [True] * 3 + [False] * 3


# ---- selection options -----------------------------------------------------------------------
class Wide(nn.Module):
    """Groups of 32 and 48 channels, and an approximate group (LayerNorm over channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.conv2 = nn.Conv2d(32, 48, 3)
        self.head = nn.Linear(48, 40)
        self.norm = nn.LayerNorm(40)
        self.out = nn.Linear(40, 5)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3))
        return self.out(self.norm(self.head(h)))


def test_round_to_min_keep_protect_exact_only() -> None:
    torch.manual_seed(0)
    g = prunefx.trace(Wide(), torch.randn(1, 3, 12, 12))
    assert {gr.name: (gr.prunable, gr.exact) for gr in g.groups if gr.size > 3} == {
        "conv1": (True, True), "conv2": (True, True), "head": (True, False), "out": (False, False),
    }
    counts = lambda m: {k: int(v.sum()) for k, v in m.items()}  # noqa: E731
    assert counts(prunefx.masks.magnitude(g, 0.3)) == {"conv1": 22, "conv2": 34, "head": 28}
    assert counts(prunefx.masks.magnitude(g, 0.3, round_to=8)) == {"conv1": 24, "conv2": 32, "head": 32}
    for m in (prunefx.masks.magnitude(g, 0.6, scope="global", round_to=8), prunefx.masks.taylor(
            g, 0.6, scope="global", round_to=8, loss_fn=lambda o, y: o.square().mean(), batch=(torch.randn(2, 3, 12, 12), None))):
        assert all(n % 8 == 0 for n in counts(m).values())
    assert counts(prunefx.masks.magnitude(g, 0.9, min_keep=10)) == {"conv1": 10, "conv2": 10, "head": 10}
    assert set(prunefx.masks.magnitude(g, 0.5, protect=["conv2"])) == {"conv1", "head"}
    assert set(prunefx.masks.magnitude(g, 0.5, protect=["norm"])) == {"conv1", "conv2"}  # a module name
    assert set(prunefx.masks.magnitude(g, 0.5, exact_only=True)) == {"conv1", "conv2"}
    assert set(prunefx.masks.random(g, 0.5, exact_only=True)) == {"conv1", "conv2"}
    with pytest.raises(prunefx.MaskError, match="did you mean"):
        prunefx.masks.magnitude(g, 0.5, protect=["conv"])
    with pytest.raises(ValueError, match="scope"):
        prunefx.masks.magnitude(g, 0.5, scope="layer")


def test_select_takes_custom_scores() -> None:
    g = prunefx.trace(net(), X)
    scores = {"conv3": torch.tensor([5.0, 0.0, 4.0, 3.0, -1.0, 2.0])}
    mask = prunefx.masks.select(g, scores, 0.5)
    assert set(mask) == {"conv3"} and dropped(mask, "conv3") == {1, 4, 5}
    with pytest.raises(prunefx.MaskError, match="shape"):
        prunefx.masks.select(g, {"conv3": torch.zeros(5)}, 0.5)
    with pytest.raises(prunefx.MaskError, match="did you mean 'conv3'"):
        prunefx.masks.select(g, {"conv_3": torch.zeros(6)}, 0.5)


# ---- cost: estimate vs measurement -----------------------------------------------------------
def test_cost_estimate_is_exact_for_convs_and_linears() -> None:
    model = net()
    g = prunefx.trace(model, X)
    cm = prunefx.masks.CostModel.of(g)
    assert cm.exact and cm.flops == prunefx.count_flops(model, X) and cm.params == prunefx.count_params(model)
    for mask in (prunefx.masks.random(g, 0.5, seed=1), {"conv3": torch.tensor([True, False] * 3)}, {"conv1": torch.arange(8) < 3}):
        small = prunefx.reconfigure(model, mask, graph=g)
        est = cm.estimate(mask)
        assert (est.flops, est.params) == (prunefx.count_flops(small, X), prunefx.count_params(small))
        assert prunefx.masks.measure_cost(g, mask) == est


def _uneven_masks(graph, seed: int):
    """Masks keeping a different random fraction of every prunable group (approximate ones too)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for g in graph.groups:
        if g.prunable and g.size > 1:
            keep = torch.rand(g.size, generator=gen) < float(torch.rand((), generator=gen)) * 0.8 + 0.1
            keep[int(torch.randint(g.size, (), generator=gen))] = True
            out[g.name] = keep
    return out


def test_cost_estimate_is_exact_for_attention() -> None:
    """Attention costs are products of activations: torchvision's nn.MultiheadAttention
    (projections ~ in_proj_weight, scores and values ~ the heads kept) and a transformers
    Llama's SDPA (heads, through the export front-end) are estimated exactly, the residual
    stream (approximate group) pruned too."""
    import transformers
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=96).eval()
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    for graph in (prunefx.trace(vit, torch.randn(2, 3, 32, 32)),
                  prunefx.trace(llama, (torch.randint(0, 128, (2, 8)),), example_kwargs={"use_cache": False})):
        cm = prunefx.masks.CostModel.of(graph)
        assert cm.exact and cm.scaled, graph.module.__class__.__name__
        for seed in range(3):
            mask = _uneven_masks(graph, seed)
            assert cm.estimate(mask) == prunefx.masks.measure_cost(graph, mask), seed


# ---- to_budget -------------------------------------------------------------------------------
def test_to_budget_on_a_small_net() -> None:
    model = net()
    g = prunefx.trace(model, X)
    base_f, base_p = prunefx.count_flops(model, X), prunefx.count_params(model)
    for criterion, kw in [("magnitude", {"flops": 0.6}), (prunefx.masks.magnitude, {"params": 0.5}),
                          ("uniform", {"flops": 0.5}), ("taylor", {"flops": 0.5, "loss_fn": LOSS, "batch": (X, Y)})]:
        mask = prunefx.masks.to_budget(g, criterion, **kw)
        small = prunefx.reconfigure(model, mask, graph=g)
        got = prunefx.count_flops(small, X) / base_f if "flops" in kw else prunefx.count_params(small) / base_p
        want = kw.get("flops", kw.get("params"))
        assert abs(got - want) < 0.1, (criterion, got, want)  # 14 channels: one is ~5-10% of the cost
    with pytest.raises(prunefx.MaskError, match="cannot reach"):
        prunefx.masks.to_budget(g, "magnitude", flops=0.01)
    with pytest.raises(ValueError, match="exactly one"):
        prunefx.masks.to_budget(g, "magnitude", flops=0.5, params=0.5)
    with pytest.raises(ValueError, match="unknown criterion"):
        prunefx.masks.to_budget(g, "l1", flops=0.5)


BUDGET_MODELS = [
    pytest.param("resnet50", 64, (0.5, 0.3), id="resnet50"),
    pytest.param("mobilenet_v2", 64, (0.5, 0.3), id="mobilenet_v2"),
    # at its native 224; attention is estimated exactly, so no real reconfigure is measured
    pytest.param("vit_b_16", 224, (0.5, 0.3), id="vit_b_16"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,size,targets", BUDGET_MODELS)
def test_to_budget_lands_within_2_percent(name: str, size: int, targets: tuple[float, ...]) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, size, size)
    graph = prunefx.trace(model, x)
    base = prunefx.count_flops(model, x)
    assert prunefx.masks.CostModel.of(graph).exact  # so to_budget measures no real reconfigure
    for target in targets:
        mask = prunefx.masks.to_budget(graph, "magnitude", flops=target)
        got = prunefx.count_flops(prunefx.reconfigure(model, mask, graph=graph), x) / base
        assert abs(got - target) <= 0.02 * target, f"{name}: asked {target} of the FLOPs, got {got:.4f}"


# ---- ResNet-50: every criterion runs and reconfigures ----------------------------------------
@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.resnet50(num_classes=10)).train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return model, x, prunefx.trace(model, x)


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["magnitude", "bn_scale", "taylor", "snip", "gradient_flow", "random", "uniform"])
def test_every_criterion_on_resnet50(resnet50, criterion: str) -> None:
    model, x, graph = resnet50
    kw = {"loss_fn": LOSS, "batch": (x, torch.tensor([1, 7]))} if criterion in ("taylor", "snip", "gradient_flow") else {}
    mask = getattr(prunefx.masks, criterion)(graph, 0.5, round_to=8, **kw)
    prunable = {g.name for g in graph.groups if g.prunable}
    assert mask and set(mask) <= prunable
    assert all(int(v.sum()) % 8 == 0 or int(v.sum()) == graph.group(k).size for k, v in mask.items())
    small = prunefx.reconfigure(model, mask, graph=graph)
    assert prunefx.count_params(small) < 0.6 * prunefx.count_params(model)
    if criterion == "magnitude":  # exact groups: reconfigured == masked, in eval mode
        ref = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph).eval()
        small.eval()
        torch.testing.assert_close(small(x), ref(x), atol=1e-4, rtol=1e-4)


# ---- schedules -------------------------------------------------------------------------------
def test_cubic_schedule() -> None:
    assert cubic_sparsity(0, 10, 0.8) == 0.0 and cubic_sparsity(10, 10, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(5, 10, 0.8) == pytest.approx(0.8 * (1 - 0.5**3))
    assert cubic_sparsity(50, 10, 0.8) == pytest.approx(0.8)  # clamped after the ramp
    s = Cubic(0.75, total=12, every=3, start=2)
    steps = [t for t in range(30) if s.prunes_at(t)]
    assert steps == [2, 5, 8, 11, 14]
    left = 1.0
    for t in steps:  # reconfiguring at every step with step_ratio compounds to sparsity(t)
        left *= 1 - s.step_ratio(t)
        assert 1 - left == pytest.approx(s.sparsity(t))
    assert 1 - left == pytest.approx(0.75)


def test_acdc_phases() -> None:
    acdc = ACDC(100, warmup=10, phase=5, finetune=10)
    pattern = "".join("S" if acdc.sparse(e) else "D" for e in range(100))
    assert pattern == "D" * 10 + ("S" * 5 + "D" * 5) * 8 + "S" * 10
    assert [e for e in range(100) if acdc.starts_sparse_phase(e)] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    with pytest.raises(ValueError):
        ACDC(10, warmup=6, finetune=6)


def test_soft_masking_runs_acdc_and_reconfigures_once() -> None:
    model = net().train()
    graph = prunefx.trace(model, X)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    acdc = SoftMasking(model, graph, ACDC(8, warmup=2, phase=2, finetune=2), ratio=0.5)
    zero_in_sparse, regrown_in_dense = [], []
    for epoch in range(8):
        acdc.epoch(epoch)
        for _ in range(2):
            opt.zero_grad()
            LOSS(model(X), Y).backward()
            opt.step()
            with torch.no_grad():  # zeroed ReLU channels get no gradient: move them by hand
                model.conv3.weight.add_(0.01)
            acdc.step()
        filters = model.conv3.weight.detach().flatten(1).abs().sum(1)
        if acdc.sparse:
            zero_in_sparse.append(bool((filters[~acdc.mask["conv3"]] == 0).all()))
        elif acdc.mask is not None:
            regrown_in_dense.append(bool((filters[~acdc.mask["conv3"]] > 0).all()))
    assert zero_in_sparse == [True] * 4 and regrown_in_dense == [True] * 2
    small = acdc.finish(optimizer=opt)
    model.eval()
    small.eval()
    torch.testing.assert_close(small(X), model(X), atol=1e-5, rtol=1e-5)  # masked == pruned
    assert prunefx.count_params(small) < prunefx.count_params(model)


def test_weight_distance_plateau_fires_when_growth_slows() -> None:
    model = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(4))
    trigger = WeightDistancePlateau(model, epsilon=0.1)
    assert trigger.distance() == 0.0 and not trigger.update()
    direction = torch.ones(4, 4) / 4  # ||direction|| = 1 = ||theta_0|| / 2
    fired = []
    for step in (1.0, 1.0, 0.5, 0.05, 0.01):  # distance 0.5, 1.0, 1.25, 1.275, 1.28
        with torch.no_grad():
            model.weight.add_(step * direction)
        fired.append(trigger.update())
    assert trigger.distances[1:] == pytest.approx([0.5, 1.0, 1.25, 1.275, 1.28])
    assert fired == [False, False, False, True, True]  # growth 1.0, 0.25, 0.02 < 0.1


# ---- torch.nn.utils.prune interop ------------------------------------------------------------
def _plain_chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.Conv2d(8, 16, 3, bias=False), nn.ReLU(),
                         nn.Conv2d(16, 4, 3)).eval()


def test_torch_prune_round_trip_gives_a_smaller_identical_model() -> None:
    model = _plain_chain()
    x = torch.randn(2, 3, 12, 12)
    tprune.ln_structured(model[0], "weight", amount=3, n=1, dim=0)  # 3 of 8 filters
    tprune.ln_structured(model[4], "weight", amount=6, n=2, dim=1)  # 6 of 16 input columns
    zero_filters = set(torch.nonzero(model[0].weight_mask.flatten(1).sum(1) == 0).flatten().tolist())
    zero_columns = set(torch.nonzero(model[4].weight_mask.transpose(0, 1).flatten(1).sum(1) == 0).flatten().tolist())
    assert len(zero_filters) == 3 and len(zero_columns) == 6

    mask = prunefx.masks.from_torch_prune(model, example_inputs=x)
    assert dropped(mask, "0") == zero_filters and dropped(mask, "2") == zero_columns
    plain = prunefx.masks.strip_torch_prune(model)
    assert hasattr(model[0], "weight_orig") and not hasattr(plain[0], "weight_orig")  # input untouched
    small = prunefx.reconfigure(plain, mask, example_inputs=x)
    assert small.get_submodule("0").weight.shape == (5, 3, 3, 3)
    assert small.get_submodule("2").weight.shape == (10, 5, 3, 3)
    assert small.get_submodule("4").weight.shape == (4, 10, 3, 3)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)


def test_strip_torch_prune_right_after_pruning() -> None:
    """The pruned weight is then a tensor computed with autograd on (not a leaf), which a
    plain deepcopy refuses."""
    model = _plain_chain()
    tprune.ln_structured(model[0], "weight", amount=3, n=1, dim=0)
    assert not model[0].weight.is_leaf
    plain = prunefx.masks.strip_torch_prune(model)
    assert isinstance(plain[0].weight, nn.Parameter) and not hasattr(plain[0], "weight_orig")
    assert hasattr(model[0], "weight_orig") and not model[0].weight.is_leaf  # the input untouched
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(plain(x), model(x))


def test_prunefx_mask_to_torch_prune_and_back() -> None:
    model = net()
    graph = prunefx.trace(model, X)
    mask = prunefx.masks.magnitude(graph, 0.5)
    ref = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph)
    hooked = prunefx.masks.to_torch_prune(copy.deepcopy(model), mask, example_inputs=X)
    assert hasattr(hooked.conv3, "weight_mask") and hasattr(hooked.bn1, "weight_mask")
    torch.testing.assert_close(hooked(X), ref(X))  # the hooks zero exactly what apply_mask zeroes
    back = prunefx.masks.from_torch_prune(hooked, example_inputs=X)
    assert back.keys() == mask.keys() and all(torch.equal(back[k], mask[k]) for k in mask)
