"""PruneTrain runs exactly one channel analysis per reconfiguration.

The analysis (``prunefx.trace``: capture, shapes, channel analysis) is the expensive part of a
shrink. A reconfiguration at ``PruneTrain.epoch_end`` needs one: that of the new model, which
the lasso and the next shrink share. The shrink reuses the analysis of the model it shrinks
(made at construction or at the previous reconfiguration), and a bias created by constant
folding becomes a member of its layer's output channels instead of a reason to trace again.
Counted by wrapping ``analyze`` where ``prunefx.trace`` calls it, on a small CNN whose fold
creates a bias (fx front-end) and on a tiny Llama (export front-end).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import prunefx

GRAPH = importlib.import_module("prunefx.graph")  # the module, where `trace` finds `analyze`
SHRINK = importlib.import_module("prunefx.train.shrink")  # `prunefx.train.shrink` is also the function


@pytest.fixture
def analyses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The frontend of every channel analysis run while the test runs."""
    calls: list[str] = []
    real = GRAPH.analyze

    def counted(traced, shapes):
        calls.append(traced.frontend)
        return real(traced, shapes)

    monkeypatch.setattr(GRAPH, "analyze", counted)
    return calls


class _FoldNet(nn.Module):
    """conv -> BN -> ReLU -> 1x1 conv without bias -> ReLU -> pool -> Linear: dead channels of
    the first conv emit ReLU(beta) > 0, which folds into a *new* bias of the 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 1, bias=False)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.conv2(h)).mean(dim=(2, 3)))


def _fold_net() -> _FoldNet:
    torch.manual_seed(0)
    net = _FoldNet()
    with torch.no_grad():
        net.bn1.running_mean.normal_(0, 0.1)
        net.bn1.running_var.uniform_(0.5, 1.5)
        net.bn1.bias.uniform_(0.2, 0.6)
        net.conv1.weight[[1, 4]] = 0  # dead: zero filters and gamma, positive beta
        net.bn1.weight[[1, 4]] = 0
        net.conv2.weight[2] = 0  # the 1x1 conv loses an output, so its new bias must be sliced
    return net.eval()


def test_one_analysis_per_reconfiguration_with_a_new_bias(analyses: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    net, x = _fold_net(), torch.randn(4, 3, 8, 8)
    fx_traces: list[object] = []  # FLOPs are counted on the analysed graph and the result, not on a fresh trace
    real_fx_trace = torch.fx.symbolic_trace
    monkeypatch.setattr(torch.fx, "symbolic_trace", lambda root, *a, **k: fx_traces.append(root) or real_fx_trace(root, *a, **k))
    with torch.no_grad():
        expected = net(x)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    pt = prunefx.train.PruneTrain(net, opt, example_inputs=x, every=1)
    assert analyses == ["fx"]  # the lasso's, which the first shrink reuses
    analyses.clear()

    small = pt.epoch_end(0)

    (event,) = pt.history
    assert event.report.changed and [n for n, _ in event.report.fold.new_parameters] == ["conv2.bias"]
    assert event.report.channels["conv1"] == (6, 4) and event.report.channels["conv2"] == (5, 4)
    assert small.conv2.bias.shape == (4,)
    assert analyses == ["fx"], f"{len(analyses)} analyses in one reconfiguration"
    assert fx_traces == []
    f0, f1 = event.report.flops
    assert f0 == prunefx.flops.count_flops(_fold_net(), x) and 0 < f1 < f0
    assert f1 == prunefx.flops.count_flops(small, x), "the exact estimate is the count"
    with torch.no_grad():
        assert torch.allclose(small.eval()(x), expected, atol=1e-5)

    analyses.clear()  # nothing dead any more: no analysis at all
    assert pt.epoch_end(1) is small and not pt.history[-1].report.changed
    assert analyses == []


def test_one_meta_pass_per_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph's per-node costs come from one run of the meta interpreter, shared by the
    inspector, the masks' cost model, to_budget and a shrink's FLOPs report."""
    runs: list[object] = []
    real = prunefx.flops._run
    monkeypatch.setattr(prunefx.flops, "_run", lambda prop, inputs: runs.append(prop) or real(prop, inputs))
    net, x = _fold_net(), torch.randn(4, 3, 8, 8)
    graph = prunefx.trace(net, x)
    assert runs == [], "tracing needs shapes, not costs"
    report = prunefx.inspect(net, graph=graph)
    assert report.totals.flops == sum(c.flops for c in graph.node_costs.values()) > 0
    model = prunefx.masks.CostModel.of(graph)
    mask = prunefx.masks.to_budget(graph, "magnitude", flops=0.6)
    assert prunefx.masks.estimate_cost(graph, mask) == model.estimate(mask)
    assert len(runs) == 1
    _, shrunk = SHRINK.shrink(net, example_inputs=x, graph=graph)
    assert shrunk.changed and len(runs) == 1, "an exact estimate needs no count of the small model"


def _members(graph: prunefx.PruneGraph) -> dict[str, set]:
    return {g.name: {(m.name, m.dim, m.role, m.index_map) for m in g.members} for g in graph.groups}


def test_the_new_bias_member_is_what_tracing_again_finds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The analysis the shrink derives after folding equals that of tracing the folded model."""
    net, x = _fold_net(), torch.randn(4, 3, 8, 8)
    seen: dict[str, prunefx.PruneGraph] = {}
    real = SHRINK.reconfigure

    def spy(model, mask, *, graph, **kw):
        seen["graph"] = graph
        return real(model, mask, graph=graph, **kw)

    monkeypatch.setattr(SHRINK, "reconfigure", spy)
    SHRINK.shrink(net, example_inputs=x)
    assert net.conv2.bias is not None  # folded in place
    derived, again = seen["graph"], prunefx.trace(net, x)
    assert _members(derived) == _members(again)
    assert [(g.name, g.size, g.prunable, g.exact) for g in derived.groups] == [
        (g.name, g.size, g.prunable, g.exact) for g in again.groups]


@pytest.mark.parametrize("change", ["module replaced", "mode switched"])
def test_an_analysis_of_another_model_is_not_reused(analyses: list[str], change: str) -> None:
    """When a module was replaced or the train/eval mode switched after the last analysis,
    the shrink traces the model as it is."""
    net, x = _fold_net(), torch.randn(4, 3, 8, 8)
    pt = prunefx.train.PruneTrain(net, torch.optim.SGD(net.parameters(), lr=0.01), example_inputs=x, every=1)
    if change == "module replaced":
        net.fc = nn.Linear(5, 3)
    else:
        net.train()
    analyses.clear()
    pt.epoch_end(0)
    assert analyses == ["fx", "fx"]  # the shrink's own, then the new model's


def test_one_analysis_per_reconfiguration_of_a_causal_lm(analyses: list[str]) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    kw = {"use_cache": False}
    pt = prunefx.train.PruneTrain(model, torch.optim.AdamW(model.parameters(), lr=1e-3), example_inputs=(x,),
                                  example_kwargs=kw, every=1, mode="proximal")
    assert analyses == ["export"]
    with torch.no_grad():  # MLP channels 0-7 of layer 0 dead
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[:8] = 0
        mlp.up_proj.weight[:8] = 0
        mlp.down_proj.weight[:, :8] = 0
        expected = model(input_ids=x, **kw).logits
    analyses.clear()

    small = pt.epoch_end(0)

    assert pt.history[-1].report.changed
    assert small.model.layers[0].mlp.gate_proj.out_features == 88
    assert analyses == ["export"], f"{len(analyses)} analyses in one reconfiguration"
    with torch.no_grad():
        assert torch.allclose(small(input_ids=x, **kw).logits, expected, atol=1e-5)
