"""Models whose forward branches on self.training (GoogLeNet and Inception-v3 return
auxiliary logits only in training, from modules the eval graph never runs): the
reconfigured model behaves like the masked original in both modes, and the auxiliary
modules are sliced too."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import prunefx
from zoo import max_rel_diff, randomize_norms, tensor_out


def _no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return model


@pytest.mark.parametrize("name, size", [("googlenet", 64), ("inception_v3", 299)])  # its aux head needs 17x17 maps
def test_both_modes_match_the_masked_model(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = _no_dropout(randomize_norms(torchvision.models.get_model(name, weights=None, init_weights=False))).eval()
    x = torch.randn(2, 3, size, size)
    graph = prunefx.trace(model, x)
    assert graph.traced.other is not None, "the training graph differs and must be traced"
    aux = [g for g in graph.groups if "aux" in g.name.lower() and g.prunable and g.exact]
    assert aux, "auxiliary heads have prunable groups"
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    small = prunefx.reconfigure(model, mask, graph=graph)
    ref = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph)

    # the auxiliary modules are physically smaller too
    aux_name = next(n for n, _ in model.named_modules() if "aux" in n.lower())
    before = sum(p.numel() for p in model.get_submodule(aux_name).parameters())
    after = sum(p.numel() for p in small.get_submodule(aux_name).parameters())
    assert after < before

    with torch.no_grad():
        assert max_rel_diff(tensor_out(small(x)), tensor_out(ref(x))) <= 1e-4
        small.train()
        ref.train()
        out, expected = small(x), ref(x)
    assert type(out).__name__ == type(expected).__name__
    assert len(out) == len(expected) >= 2  # logits plus auxiliary logits
    assert max_rel_diff(tensor_out(out), tensor_out(expected)) <= 1e-4
    # and back to eval; a deepcopy (EMA, checkpoint code) keeps both modes
    twin = copy.deepcopy(small)
    small.eval()
    with torch.no_grad():
        assert small(x).shape == expected[0].shape
        assert len(twin.train()(x)) == len(expected)


def test_compile_of_a_reconfigured_model() -> None:
    model = randomize_norms(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = prunefx.trace(model, x)
    small = prunefx.reconfigure(model, prunefx.masks.random(graph, 0.5), graph=graph)
    compiled = torch.compile(small, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), small(x))


def test_a_compiled_model_is_seen_through(tmp_path) -> None:
    """``torch.compile(model)`` holds the model as ``_orig_mod``: prunefx traces, masks, counts,
    inspects and exports the model inside, under its own names, and ``reconfigure`` compiles its
    result again with the same backend and options, its optimizer re-pointed."""
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    graph = prunefx.trace(compiled, x)
    assert [g.name for g in graph.groups] == [g.name for g in prunefx.trace(model, x).groups]
    assert prunefx.inspect(compiled, x).group("layer1.0.conv1").name == "layer1.0.conv1"
    assert prunefx.count_flops(compiled, x) == prunefx.count_flops(model, x)

    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.1, momentum=0.9)
    small = prunefx.reconfigure(compiled, mask, example_inputs=x, optimizer=optimizer)
    assert type(small) is type(compiled) and small.dynamo_ctx is compiled.dynamo_ctx
    assert isinstance(small._orig_mod, torch.fx.GraphModule) and small._orig_mod.get_submodule("layer1.0.conv1").out_channels < 64
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in small.parameters()}
    reference = prunefx.apply_mask(torch.compile(copy.deepcopy(model), backend="eager"), mask, example_inputs=x)
    assert isinstance(reference._orig_mod, torchvision.models.ResNet)  # masked inside, still compiled
    with torch.no_grad():
        assert max_rel_diff(small(x), reference(x)) <= 1e-4
        other = torch.randn(3, 3, 48, 48)  # a second input shape
        assert max_rel_diff(small(other), reference(other)) <= 1e-4
    result = prunefx.export_onnx(compiled, tmp_path / "model.onnx", x)
    assert result.max_abs_diff is not None


@pytest.mark.parametrize("call", ["trace", "reconfigure", "apply_mask", "inspect"])
def test_a_data_parallel_model_is_refused_in_one_line(call: str) -> None:
    model = nn.DataParallel(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)))
    x = torch.randn(1, 3, 8, 8)
    args = {"trace": (x,), "inspect": (x,)}.get(call, ({"module.0": torch.arange(8) < 4},))
    kwargs = {} if call in ("trace", "inspect") else {"example_inputs": x}
    with pytest.raises(prunefx.PruneFxError, match=r"^prunefx\.\w+ got a DataParallel model: pass the model inside \(model\.module\)") as err:
        getattr(prunefx, call)(model, *args, **kwargs)
    assert "\n" not in str(err.value)


class _Gated(nn.Module):
    """Dropout written out by hand: the training graph has an extra multiply."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * 0.5 if self.training else y


class _Shadowed(_Gated):
    training = False  # a class attribute: reads of the instance flag cannot be watched


class _OwnTrain(nn.Module):
    """``train`` does more than set the flags: what the other mode runs is only known by tracing it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.scale = 1.0

    def train(self, mode: bool = True) -> _OwnTrain:
        self.scale = 0.5 if mode else 1.0
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.scale


def _traced_twice(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> tuple[prunefx.tracing.Traced, int]:
    calls = []
    original = prunefx.tracing._trace_other_mode
    monkeypatch.setattr(prunefx.tracing, "_trace_other_mode", lambda *a: calls.append(1) or original(*a))
    traced = prunefx.tracing.symbolic_trace(model)
    assert "training" not in vars(nn.Module), "the flag's stand-in is removed after the trace"
    return traced, len(calls)


def test_code_that_never_reads_the_mode_is_traced_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    traced, other_traces = _traced_twice(model, monkeypatch)
    assert other_traces == 0 and traced.other is None
    assert not model.training and not any(m.training for m in model.modules())


@pytest.mark.parametrize("make", [_Gated, _Shadowed, _OwnTrain], ids=["reads-the-flag", "flag-shadowed", "own-train"])
def test_code_that_may_depend_on_the_mode_is_traced_in_both(make: type[nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    model = make().eval()
    traced, other_traces = _traced_twice(model, monkeypatch)
    assert other_traces == 1
    assert traced.other is not None, "the training graph differs and must be kept"
    assert not model.training and getattr(model, "scale", 1.0) == 1.0, "tracing the other mode leaves the model as it was"
    graph = prunefx.trace(model, torch.randn(1, 3, 8, 8))
    small = prunefx.reconfigure(model, prunefx.masks.random(graph, 0.5, seed=0), graph=graph)
    ref = prunefx.apply_mask(copy.deepcopy(model), prunefx.masks.random(graph, 0.5, seed=0), graph=graph)
    with torch.no_grad():
        for x in (torch.randn(2, 3, 8, 8), torch.randn(5, 3, 11, 9)):  # the example shape and another
            for mode in (False, True):
                torch.testing.assert_close(small.train(mode)(x), ref.train(mode)(x))


def test_a_failed_trace_removes_the_flags_stand_in() -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if self.training and x.sum() > 0 else -x  # data-dependent control flow

    with pytest.raises(prunefx.TraceError):
        prunefx.tracing.symbolic_trace(Broken())
    assert "training" not in vars(nn.Module)
    assert Broken().training


class _Residual(nn.Module):
    """A block with torchvision's StochasticDepth on its branch, as in EfficientNet and ConvNeXt."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1))
        self.drop = torchvision.ops.StochasticDepth(0.5, "row")
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.drop(self.branch(y))
        return self.head(y.mean((2, 3)))


def test_stochastic_depth_is_one_node_for_both_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its forward passes self.training on; kept as a module, it decides at run time, so the
    model traces once and the reconfigured model matches the masked one in both modes (with
    the same random draws in training)."""
    torch.manual_seed(0)
    model = randomize_norms(_Residual()).eval()
    traced, other_traces = _traced_twice(model, monkeypatch)
    assert other_traces == 0 and traced.other is None
    assert [n.op for n in traced.module.graph.nodes if n.target == "drop"] == ["call_module"]
    x = torch.randn(6, 3, 8, 8)
    graph = prunefx.trace(model, x)
    mask = prunefx.masks.random(graph, 0.5, seed=0)
    assert "branch.0" in mask, "the branch's channels are prunable through StochasticDepth"
    small, ref = prunefx.reconfigure(model, mask, graph=graph), prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph)
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref(x))
        other = torch.randn(3, 3, 12, 10)  # another shape
        torch.testing.assert_close(small(other), ref(other))
        small.train(), ref.train()
        torch.manual_seed(1)
        out = small(x)
        torch.manual_seed(1)
        expected = ref(x)
    torch.testing.assert_close(out, expected)
    torch.manual_seed(2)
    assert not torch.allclose(small(x), out), "training mode draws: some samples' branches are dropped"


class _ConstantPerMode(nn.Module):
    """A tensor created in forward, different per mode: fx stores each as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor([2.0]) if self.training else torch.tensor([3.0])
        return self.head(self.conv(x) * scale)


def test_constants_of_both_modes_stay_apart_and_off_the_model() -> None:
    model, x = _ConstantPerMode().eval(), torch.randn(2, 3, 8, 8)
    attributes = set(vars(model))
    graph = prunefx.trace(model, x)
    assert graph.traced.other is not None
    assert set(vars(model)) == attributes, "fx's constants were left on the model"
    constants = [n.target for gm in graph.traced.graphs for n in gm.graph.nodes if n.op == "get_attr"]
    assert len(set(constants)) == 2, f"each mode's constant has its own name: {constants}"
    mask = {"conv": torch.arange(8) % 2 == 0}
    small = prunefx.reconfigure(model, mask, graph=graph)
    ref = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph)
    smaller = prunefx.reconfigure(small, {"conv": torch.arange(4) < 3}, example_inputs=x)  # traced again
    ref2 = prunefx.apply_mask(copy.deepcopy(ref), {"conv": torch.tensor([True, False, True, False, True, False, False, False])},
                              example_inputs=x)
    for mode in (False, True):
        with torch.no_grad():
            assert torch.allclose(small.train(mode)(x), ref.train(mode)(x), atol=1e-6), f"training={mode}"
            assert torch.allclose(smaller.train(mode)(x), ref2.train(mode)(x), atol=1e-6), f"again, training={mode}"
    x2 = torch.randn(3, 3, 11, 9)  # and at another shape
    for mode in (False, True):
        with torch.no_grad():
            assert torch.allclose(smaller.train(mode)(x2), ref2.train(mode)(x2), atol=1e-6), f"{tuple(x2.shape)}, training={mode}"
    for _ in range(3):  # PruneTrain traces at every shrink
        prunefx.trace(model, x)
    prunefx.count_flops(model, x)  # traces with fx itself
    assert set(vars(model)) == attributes
