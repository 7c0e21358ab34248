"""prunefx.train.reinit (train the pruned architecture from scratch) and prunefx.train.batch
(grow the batch as the model shrinks, scaling the learning rate linearly)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

import prunefx
from prunefx.nn import MultiheadAttention as PrunedMultiheadAttention
from prunefx.train.batch import (
    BatchDecision,
    DynamicBatch,
    activation_bytes_per_sample,
    bytes_per_sample,
    model_state_bytes,
)
from prunefx.train.reinit import ReinitReport, reinit

X = torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def _small_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    return prunefx.reconfigure(model, {"layer1.0.conv1": torch.arange(64) % 2 == 0}, example_inputs=torch.randn(1, 3, 32, 32))


@pytest.fixture
def small(_small_resnet: nn.Module) -> nn.Module:
    return copy.deepcopy(_small_resnet)


def _trained_looking(model: nn.Module) -> None:
    """Give every BN state that a fresh model never has, so a reset is visible."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(3.0)
                m.running_var.fill_(5.0)
                m.num_batches_tracked.fill_(7)
                m.weight.fill_(2.0)
                m.bias.fill_(-1.0)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128)


# ---------------------------------------------------------------- reinit


def test_reinit_refreshes_reconfigured_resnet_in_place(small: nn.Module) -> None:
    small = small.double()
    _trained_looking(small)
    before = _snapshot(small)
    identity = {n: (t, t.data_ptr()) for n, t in small.state_dict(keep_vars=True).items()}

    report = reinit(small)

    assert isinstance(report, ReinitReport)
    assert report.untouched == () and report.custom == ()
    assert {"conv1", "layer1.0.conv1", "layer1.0.bn1", "fc"} <= set(report.modules)
    after = small.state_dict(keep_vars=True)
    for name, t in after.items():
        old_t, ptr = identity[name]
        assert t is old_t and t.data_ptr() == ptr, f"{name} was replaced, not re-initialised in place"
        assert t.shape == before[name].shape and t.dtype == before[name].dtype and t.device == before[name].device
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight", "fc.weight", "fc.bias"):
        assert not torch.equal(after[name], before[name]), f"{name} kept its old values"
    assert after["layer1.0.conv1.weight"].shape == (32, 64, 3, 3)  # the pruned shape is kept
    for m in small.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))
            assert int(m.num_batches_tracked) == 0
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))


def test_seeded_reinit_is_reproducible_and_leaves_global_rng(small: nn.Module) -> None:
    a, b, c = small, copy.deepcopy(small), copy.deepcopy(small)
    state = torch.get_rng_state()
    reinit(a, seed=123)
    reinit(b, seed=123)
    assert torch.equal(torch.get_rng_state(), state), "a seeded reinit moved the global RNG"
    reinit(c, seed=124)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layer1.0.conv1.weight"], sc["layer1.0.conv1.weight"])
    reinit(a)  # unseeded: draws from the global RNG, like a constructor
    assert not torch.equal(torch.get_rng_state(), state)


def test_vit_class_token_and_pos_embedding_are_reported_and_warned() -> None:
    torch.manual_seed(0)
    vit = _vit()
    with torch.no_grad():
        vit.class_token.fill_(0.5)
    before = _snapshot(vit)
    with pytest.warns(UserWarning, match="class_token, encoder.pos_embedding"):
        report = reinit(vit)
    assert report.untouched == ("class_token", "encoder.pos_embedding")
    assert "encoder.layers.encoder_layer_0.self_attention" in report.modules
    after = vit.state_dict()
    assert torch.equal(after["class_token"], before["class_token"])
    assert torch.equal(after["encoder.pos_embedding"], before["encoder.pos_embedding"])
    assert not torch.equal(after["conv_proj.weight"], before["conv_proj.weight"])
    attn = "encoder.layers.encoder_layer_0.self_attention"
    assert torch.equal(after[f"{attn}.in_proj_bias"], torch.zeros_like(after[f"{attn}.in_proj_bias"]))


def test_init_hook_takes_the_tensors_no_reset_covers() -> None:
    vit = _vit()
    seen: list[str] = []

    def init(name: str, t: torch.Tensor) -> bool | None:
        seen.append(name)
        if name == "class_token":
            return False  # declined: stays untouched
        nn.init.constant_(t, 0.25)
        return None

    with pytest.warns(UserWarning, match="class_token"):
        report = reinit(vit, init=init)
    assert sorted(seen) == ["class_token", "encoder.pos_embedding"]
    assert report.custom == ("encoder.pos_embedding",) and report.untouched == ("class_token",)
    assert torch.all(vit.encoder.pos_embedding == 0.25)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = reinit(_vit(), init=lambda name, t: nn.init.normal_(t, std=0.02))
    assert report.untouched == () and len(report.custom) == 2


def test_pruned_multihead_attention_is_reset_like_torch_and_keeps_kept_heads() -> None:
    model = nn.Sequential(PrunedMultiheadAttention(16, num_heads=3, head_dim=4, kept_heads=torch.tensor([0, 2, 3])))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    report = reinit(model, seed=0)
    attn = model[0]
    assert "0" in report.modules and "0.out_proj" in report.modules
    assert report.kept_buffers == ("0.kept_heads",) and report.untouched == ()
    assert torch.equal(attn.kept_heads, torch.tensor([0, 2, 3]))
    assert torch.equal(attn.in_proj_bias, torch.zeros(36)) and torch.equal(attn.out_proj.bias, torch.zeros(16))
    bound = (6 / (16 + 36)) ** 0.5  # xavier_uniform_ on (3 * 12, 16)
    assert attn.in_proj_weight.abs().max() <= bound and attn.in_proj_weight.std() > bound / 4
    assert attn.out_proj.weight.abs().max() < 7.0


def test_reconfigured_model_trains_after_reinit(small: nn.Module) -> None:
    reinit(small, seed=0)
    small.train()
    opt = torch.optim.SGD(small.parameters(), lr=0.05, momentum=0.9)  # a fresh optimizer
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(small(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_reinit_rejects_uninitialised_lazy_modules() -> None:
    with pytest.raises(ValueError, match="lazy"):
        reinit(nn.Sequential(nn.LazyLinear(4)))


# ---------------------------------------------------------------- dynamic batch


def _halved(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    keep = {n: torch.arange(m.out_channels) % 2 == 0 for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    return prunefx.reconfigure(model, keep, example_inputs=X, optimizer=optimizer)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.Dropout(0.5),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def test_bytes_per_sample_falls_when_half_the_channels_go() -> None:
    torch.manual_seed(0)
    dense = _Net()
    small = _halved(dense)
    d, s = activation_bytes_per_sample(dense, X), activation_bytes_per_sample(small, X)
    assert 0.4 * d < s < 0.6 * d, (d, s)
    assert bytes_per_sample(dense, X) == d  # CPU dispatches to the estimate
    assert model_state_bytes(small) < model_state_bytes(dense)


def test_bytes_per_sample_is_per_sample_and_counts_saved_activations() -> None:
    torch.manual_seed(0)
    net = _Net()
    two, eight = activation_bytes_per_sample(net, X), activation_bytes_per_sample(net, torch.randn(8, 3, 32, 32))
    assert abs(two - eight) < 0.05 * eight
    # at least the conv/BN/ReLU outputs of the 32- and 64-channel 32x32 maps, in float32
    assert eight >= 4 * 32 * 32 * (32 + 64)


def test_parameters_are_not_activations() -> None:
    # saved: x, the ReLU output (also the second addmm's input) and the second weight;
    # only the two activations grow with the batch
    net = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 1000))
    assert activation_bytes_per_sample(net, torch.randn(2, 1000)) == 2 * 1000 * 4


def test_measuring_leaves_the_model_as_it_was() -> None:
    torch.manual_seed(0)
    net = _Net().eval()
    state = _snapshot(net)
    rng = torch.get_rng_state()
    activation_bytes_per_sample(net, X)
    assert not net.training and not any(m.training for m in net.modules())
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items()), "BN running stats changed"
    assert torch.equal(torch.get_rng_state(), rng), "dropout moved the global RNG"
    assert all(p.grad is None for p in net.parameters())
    net.train()
    net.features[1].momentum = 1.0  # one forward would overwrite the running stats entirely
    activation_bytes_per_sample(net, X)
    assert net.training and torch.equal(net.features[1].running_mean, state["features.1.running_mean"])


def test_dynamic_batch_grows_scales_lr_and_writes_the_optimizer() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.SGD(
        [{"params": [p for n, p in model.named_parameters() if "fc" not in n]}, {"params": model.fc.parameters(), "lr": 0.01}],
        lr=0.1, momentum=0.9,
    )
    dyn = DynamicBatch(base_batch_size=32, base_lr=0.1, max_batch_size=1000, multiple_of=8)
    first = dyn.update(model, X, opt)
    assert first == BatchDecision(32, 0.1, 1.0, first.bytes_per_sample, first.bytes_per_sample * 32)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]

    small = _halved(model, opt)
    d = dyn.update(small, X, opt)
    assert d.budget == first.budget and d.bytes_per_sample < 0.6 * first.bytes_per_sample
    assert d.batch_size % 8 == 0 and 56 <= d.batch_size <= 1000
    assert d.batch_size == d.budget // d.bytes_per_sample // 8 * 8
    assert d.scale == d.batch_size / 32 and d.lr == pytest.approx(0.1 * d.scale)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * d.scale, 0.01 * d.scale])

    again = dyn.update(small, X, opt)  # idempotent: the lr is not scaled twice
    assert again == d and opt.param_groups[0]["lr"] == pytest.approx(0.1 * d.scale)
    back = dyn.update(model, X, opt)  # the dense model again: back to the base
    assert back.batch_size == 32 and opt.param_groups[1]["lr"] == pytest.approx(0.01)


def _fixed(*values: int):
    it = iter(values)
    return lambda model, x: next(it)


def test_dynamic_batch_rounding_and_clamping() -> None:
    model = nn.Linear(2, 2)
    dyn = DynamicBatch(64, 0.2, max_batch_size=300, multiple_of=8, measure=_fixed(1000, 300, 100, 5000))
    assert dyn.update(model, None).batch_size == 64  # budget = 64000
    d = dyn.update(model, None)
    assert (d.batch_size, d.budget) == (208, 64000)  # floor(64000 / 300) = 213 -> 208
    assert d.lr == pytest.approx(0.2 * 208 / 64)
    assert dyn.update(model, None).batch_size == 296  # 640 clamped to max 300 -> multiple of 8
    assert dyn.update(model, None).batch_size == 64  # a bigger model never goes below the base

    budgeted = DynamicBatch(16, 0.1, memory_budget=10_000, measure=_fixed(100))
    assert budgeted.update(model, None).batch_size == 100


def test_dynamic_batch_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="multiple_of"):
        DynamicBatch(30, 0.1, multiple_of=8)
    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatch(32, 0.1, max_batch_size=16)
    frozen = _Net().requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        DynamicBatch(32, 0.1).update(frozen, X)
