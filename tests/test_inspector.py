"""The inspector (``prunefx.inspect``) on ResNet-50, DenseNet-121, ViT-B/16 and the hand-written
hard cases: its rows agree with the analysis and with FlopCounterMode, its networkx view is
the fx graph, ``explain`` names the ops that couple or pin a group, ``compare`` measures the
reconfigured model, and the text, DOT, HTML and CLI views say what they should."""

from __future__ import annotations

import re
import shutil

import networkx as nx
import pytest
import torch
import torchvision
from test_hard_cases import CASES, ChannelSoftmax, SharedChain, UnknownOp, line_of, prepare, rand
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils.flop_counter import FlopCounterMode

import prunefx
from prunefx.inspector import NODE_ATTRIBUTES, InspectError

BIG = {  # name -> (builder kwargs, input side)
    "resnet50": ({}, 64),
    "densenet121": ({}, 64),
    "vit_b_16": ({"image_size": 32}, 32),
}
_cache: dict[str, tuple] = {}


def big(name: str):
    """(model, x, report) for a torchvision model, built once per worker."""
    if name not in _cache:
        kwargs, side = BIG[name]
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
        x = torch.randn(1, 3, side, side)
        _cache[name] = (model, x, prunefx.inspect(model, x))
    return _cache[name]


def hard(case: str):
    make, shape = CASES[case]
    model, x = prepare(make), rand(*shape)
    return model, x, prunefx.inspect(model, x)


def whole_model_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FlopCounterMode around one call of the whole model, parameters on the meta device."""
    meta = {n: torch.empty_like(t, device="meta") for n, t in (*model.named_parameters(), *model.named_buffers())}
    with _reparametrize_module(model, meta), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.empty_like(x, device="meta"))
    return int(counter.get_total_flops())


big_models = pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group("inspector")) for n in BIG])
hard_cases = pytest.mark.parametrize("case", list(CASES))


# ---------------------------------------------------------------------------------------
# rows agree with the analysis and with FlopCounterMode
# ---------------------------------------------------------------------------------------
def check_against_analysis(model, x, report) -> None:
    graph = prunefx.trace(model, x)  # a fresh analysis, not the inspector's own
    assert [g.name for g in report.groups] == [g.name for g in graph.groups]
    for row, g in zip(report.groups, graph.groups, strict=True):
        assert (row.size, row.prunable, row.exact, row.reason) == (g.size, g.prunable, g.exact, g.reason), g.name
        assert len(row.members) == len(g.members), g.name
        assert [(m.tensor, m.dim, m.role) for m in row.members] == [(m.name, m.dim, m.role) for m in g.members]
        assert 0.0 <= row.flops_share <= 1.0
    t = report.totals
    assert (t.groups, t.prunable, t.exact) == (len(graph.groups), sum(g.prunable for g in graph.groups),
                                               sum(g.prunable and g.exact for g in graph.groups))
    assert t.channels == sum(g.size for g in graph.groups)
    assert t.params == sum(p.numel() for p in model.parameters())
    assert [r.name for r in report.layers] == [n.name for n in graph.module.graph.nodes]
    # every group a node's output lies in is a group whose slots its channels hold
    for r in report.layers:
        assert set(r.groups) <= {g.name for g in graph.groups}
        if r.label == r.target and r.target in graph.analysis.module_outputs:  # a module's first call
            assert r.group in {g.name for g in graph.groups_of(r.target)}, r.target  # of every call (a shared ReLU)


def check_flops(model, x, report) -> None:
    assert sum(r.flops for r in report.layers) == report.totals.flops
    assert report.totals.flops == whole_model_flops(model, x) == prunefx.count_flops(model, x)
    assert sum(r.params for r in report.layers) <= report.totals.params


@big_models
def test_big_model_rows_match_analysis_and_flop_counter(name):
    model, x, report = big(name)
    check_against_analysis(model, x, report)
    check_flops(model, x, report)


@hard_cases
def test_hard_case_rows_match_analysis_and_flop_counter(case):
    model, x, report = hard(case)
    check_against_analysis(model, x, report)
    check_flops(model, x, report)


def test_cnn_flops_match_a_real_run_and_the_conv_formula():
    model, x, report = big("resnet50")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert report.totals.flops == counter.get_total_flops()
    conv1 = report.layer("conv1")  # 7x7 stride 2, 3 -> 64 channels, 64x64 -> 32x32
    assert conv1.flops == 2 * 64 * 3 * 7 * 7 * 32 * 32
    assert conv1.params == 64 * 3 * 7 * 7
    assert conv1.output_shape == (1, 64, 32, 32) and conv1.input_shapes == ((1, 3, 64, 64),)
    assert conv1.channels == 64 and conv1.memory == 64 * 32 * 32 * 4 and conv1.kind == "Conv2d"
    assert report.layer("flatten").channels == 2048 and report.layer("fc").channels == 1000
    assert report.layer("layer1_0_relu_1").label == "layer1.0.relu #2"  # a module called 3 times
    assert report.layer("layer1.0.relu").params == 0 and report.layer("add").flops == 0


def test_group_flops_are_the_flops_of_the_layers_holding_it():
    _, _, report = big("resnet50")
    g = report.group("layer1.0.conv1")  # conv1 -> bn1 -> conv2
    assert set(g.layers) == {"layer1_0_conv1", "layer1_0_bn1", "layer1_0_conv2"}
    assert g.flops == report.layer("layer1.0.conv1").flops + report.layer("layer1.0.conv2").flops
    assert g.flops_share == pytest.approx(g.flops / report.totals.flops)
    assert report.group("layer1.0.bn1") is g  # a pass-through module resolves to its group


# ---------------------------------------------------------------------------------------
# networkx
# ---------------------------------------------------------------------------------------
def check_networkx(report) -> None:
    g = report.to_networkx()
    assert nx.is_directed_acyclic_graph(g)
    fx_nodes = list(report.graph.module.graph.nodes)
    assert list(g.nodes) == [n.name for n in fx_nodes]
    assert g.number_of_edges() == sum(len(set(n.all_input_nodes)) for n in fx_nodes)
    groups = {r.name: r for r in report.groups}
    for n in fx_nodes:
        attrs = g.nodes[n.name]
        assert set(NODE_ATTRIBUTES) <= set(attrs), set(NODE_ATTRIBUTES) - set(attrs)
        assert attrs["op"] == n.op and isinstance(attrs["flops"], int) and isinstance(attrs["params"], int)
        assert attrs["group"] is None or attrs["state"] == groups[attrs["group"]].state
        for u in n.all_input_nodes:
            assert g.has_edge(u.name, n.name)
    assert sum(a["flops"] for _, a in g.nodes(data=True)) == report.totals.flops == g.graph["flops"]


@big_models
def test_big_model_networkx_is_the_fx_dag(name):
    check_networkx(big(name)[2])


@hard_cases
def test_hard_case_networkx_is_the_fx_dag(case):
    check_networkx(hard(case)[2])


def test_networkx_attributes_of_a_conv():
    g = big("resnet50")[2].to_networkx()
    a = g.nodes["layer1_0_conv3"]
    assert (a["op"], a["target"], a["kind"], a["shape"], a["channels"]) == ("call_module", "layer1.0.conv3", "Conv2d", (1, 256, 16, 16), 256)
    assert a["group"] == "layer1.0.conv3" and a["state"] == "prunable" and a["params"] == 256 * 64
    assert "resnet.py" in a["source"]
    assert g.edges["layer1_0_conv3", "layer1_0_bn3"]["shape"] == (1, 256, 16, 16)


# ---------------------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------------------
def test_explain_resnet_residual_names_the_adds():
    why = big("resnet50")[2].explain("layer1.0.conv3")
    assert why.group.name == "layer1.0.conv3" and why.group.size == 256
    unites = [s for s in why.couplings if s.role == "unites"]
    assert [s.target for s in unites] == ["add", "add", "add"]  # the three residual adds of layer1
    assert all("out += identity" in s.source for s in unites), unites
    assert set(unites[0].inputs) == {"layer1_0_bn3", "layer1_0_downsample_1"}
    assert [s.node for s in why.producers] == ["layer1_0_conv3", "layer1_0_downsample_0", "layer1_1_conv3", "layer1_2_conv3"]
    assert {"layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"} <= {s.target for s in why.readers}
    assert "layer1.0.downsample.0" in why.coupled_modules and not why.notes
    text = str(why)
    assert "unites add" in text and "out += identity" in text and "layer1.0.downsample.0" in text


def test_explain_pinned_output_names_node_and_line():
    why = big("resnet50")[2].explain("fc")
    assert not why.group.prunable
    (note,) = why.notes
    assert (note.role, note.node, note.detail) == ("pinned", "fc", "model output")
    assert "resnet.py" in note.source and "self.fc(x)" in note.source
    assert "pinned by fc: model output" in str(why)


def test_explain_densenet_names_the_concatenations():
    why = big("densenet121")[2].explain("features.denseblock1.denselayer1.conv2")
    cats = [s for s in why.couplings if s.role == "concatenates"]
    assert cats and all(s.target == "cat" for s in cats)
    assert all("torch.cat" in s.source for s in cats), cats
    # every later layer of the block reads these 32 channels through a cat
    readers = {s.target for s in why.readers}
    assert {f"features.denseblock1.denselayer{i}.conv1" for i in range(2, 7)} <= readers


def test_explain_vit_stream_is_approximate_because_of_layernorm():
    why = big("vit_b_16")[2].explain("conv_proj")
    assert why.group.prunable and not why.group.exact
    assert any(n.role == "approximate" and "LayerNorm" in n.detail and "ln_1" in n.node for n in why.notes)
    assert any(s.role == "unites" and s.target == "add" for s in why.couplings)  # residual adds
    assert any(s.role == "concatenates" for s in why.couplings)  # the class token


def test_explain_hard_cases():
    _, _, r = hard("shared_chain")
    assert any(s.role == "shared" and s.target == "shared" for s in r.explain("shared").couplings)
    _, _, r = hard("depthwise")
    assert any(s.role == "ties" for s in r.explain("dw").couplings)
    model = prepare(UnknownOp, "flip")
    why = prunefx.inspect(model, rand(2, 3, 6, 6)).explain("conv1")
    (note,) = [n for n in why.notes if n.node == "flip"]
    assert "no channel rule for flip" in note.detail
    assert note.source.startswith(f"tests/test_hard_cases.py:{line_of(UnknownOp.forward, 'torch.flip')}")
    model = prepare(ChannelSoftmax, "F.softmax")
    why = prunefx.inspect(model, rand(2, 3, 4, 4)).explain("conv1")
    assert why.group.state == "approximate"
    assert any(f"test_hard_cases.py:{line_of(ChannelSoftmax.forward, 'F.softmax')}" in (n.source or "") for n in why.notes)
    why = prunefx.inspect(prepare(SharedChain), rand(2, 3, 8, 8)).explain("head")
    assert [n.detail for n in why.notes] == ["model output"]


def test_explain_unknown_names_say_what_to_do():
    report = big("resnet50")[2]
    with pytest.raises(InspectError, match=r"no module, group or node named 'layer1\.0\.conv33'; did you mean 'layer1\.0\.conv3'"):
        report.explain("layer1.0.conv33")
    with pytest.raises(InspectError, match=r"'layer1\.0' is a container module.*e\.g\. layer1\.0\."):
        report.explain("layer1.0")
    with pytest.raises(InspectError, match="did you mean 'layer1.0.conv3'"):
        report.layer("layer1.0.conv33")
    assert report.explain("add").group.name == "layer1.0.conv3"  # an fx node name works too


# ---------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------
def test_compare_mask_and_small_model():
    model, x, report = big("resnet50")
    mask = {"layer1.0.conv1": torch.arange(64) % 2 == 0, "layer1.0.conv3": torch.arange(256) < 64}
    diff = report.compare(mask)
    small = diff.small
    assert diff.params.after == prunefx.count_params(small) < diff.params.before
    assert diff.flops.after == prunefx.count_flops(small, x) and diff.flops.ratio < 1
    c = diff.layer("layer1.0.conv1")
    assert (c.channels.before, c.channels.after) == (64, 32)
    assert c.flops.after * 2 == c.flops.before and c.params.after * 2 == c.params.before
    assert diff.layer("layer1.0.conv3").channels.after == 64
    assert diff.layer("layer1.0.conv2").flops.ratio == pytest.approx(0.5)  # reads half the channels
    assert not diff.layer("layer3.0.conv1").changed
    assert diff.memory.after < diff.memory.before
    again = report.compare(small)  # the reconfigured model itself gives the same numbers
    assert (again.flops, again.params, again.memory) == (diff.flops, diff.params, diff.memory)
    text = str(diff)
    assert "Before → after" in text and "layer1.0.conv1" in text and "64 → 32" in text
    assert "layer3.0.conv1 " not in text  # unchanged layers are left out by default
    with pytest.raises(InspectError, match="takes a model returned by prunefx.reconfigure or a mask"):
        report.compare([1, 2])


# ---------------------------------------------------------------------------------------
# text, DOT, HTML, CLI
# ---------------------------------------------------------------------------------------
def test_text_report_is_summary_first_and_bounded():
    report = big("vit_b_16")[2]
    text = str(report)
    lines = text.splitlines()
    assert lines[0].startswith("prunefx inspect: VisionTransformer")
    assert text.index("parameters") < text.index("Channel groups") < text.index("Layers (")
    assert max(len(line) for line in lines) <= 120
    assert "more rows: report.layers_table(limit=None)" in text and "LayerNorm" in text
    full = report.render(width=200, layers=None, groups=None)
    assert "more rows" not in full and full.count("\n") > text.count("\n")
    assert re.search(r"encoder_layer_11\.mlp\.3", full)
    assert report.layers_table(limit=None).row_count == sum(r.is_tensor for r in report.layers)
    assert report.groups_table(limit=3, sort="flops").row_count == 3
    assert "Inspector(VisionTransformer" in repr(report)


def test_dot_colours_groups_and_marks_pinned():
    report = big("resnet50")[2]
    dot = report.to_dot()
    assert dot.startswith("digraph prunefx {") and '"layer1_0_conv3" -> "layer1_0_bn3";' in dot
    fc = next(line for line in dot.splitlines() if line.startswith('  "fc" ['))
    assert "dashed" in fc and "#d9d9d9" in fc  # pinned: grey, dashed border
    conv = next(line for line in dot.splitlines() if line.startswith('  "layer1_0_conv3" ['))
    bn = next(line for line in dot.splitlines() if line.startswith('  "layer1_0_bn3" ['))
    fill = re.compile(r'fillcolor="(#[0-9a-f]{6})"')
    assert fill.search(conv).group(1) == fill.search(bn).group(1) != "#d9d9d9"  # one group, one colour
    assert "size" not in [line.split('"')[1] for line in dot.splitlines() if line.startswith('  "getattr')]


def test_html_without_dot_says_how_to_get_the_picture(monkeypatch):
    import prunefx.inspector.graphviz as gv

    monkeypatch.setattr(gv.shutil, "which", lambda name: None)
    page = big("resnet50")[2].to_html()
    assert "<svg" not in page and "apt-get install graphviz" in page
    assert "Channel groups (39)" in page and 'data-node="layer1_0_conv3"' in page


def test_html_with_dot_inlines_the_svg(tmp_path):
    assert shutil.which("dot"), "graphviz's `dot` is missing: `make test` installs it (make system-deps)"
    report = big("resnet50")[2]
    path = tmp_path / "r.html"
    page = report.to_html(str(path))
    assert path.read_text() == page and page.startswith("<!DOCTYPE html>")
    assert page.count('class="node"') == sum(r.is_tensor or r.op == "output" for r in report.layers)
    assert 'id="n_layer1_0_conv3"' in page and "<title>" in page
    assert "http://" not in page.replace("http://www.w3.org", "")  # self-contained
    frag = report._repr_html_()
    assert not frag.startswith("<!DOCTYPE") and "<svg" in frag


def test_cli_inspect(tmp_path, capsys):
    from prunefx.__main__ import main

    out = tmp_path / "page.html"
    rc = main(["inspect", "torchvision:resnet18", "--input", "1,3,32,32", "--html", str(out), "--explain", "layer1.0.conv2", "--layers", "5"])
    text = capsys.readouterr().out
    assert rc == 0 and out.exists() and "<svg" in out.read_text()
    assert "prunefx inspect: ResNet" in text and "Channel groups (14)" in text and "… 65 more rows" in text
    assert "layer1.0.conv2 -> group 'conv1'" in text and "unites add" in text
    rc = main(["inspect", "torchvision:resnet18", "--input", "1,3,32,32", "--explain", "layer9"])
    assert rc == 1 and "no module, group or node named 'layer9'" in capsys.readouterr().err
