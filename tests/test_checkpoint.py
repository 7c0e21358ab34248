"""Checkpoints carry the channel layout; repeated reconfiguration composes it; a fresh
process rebuilds the same model from the original architecture and resumes training."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torchvision

import prunefx
from zoo import randomize_norms

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.resnet18(num_classes=10))


def _step(model, opt):
    opt.zero_grad()
    loss = model(X).square().mean()
    loss.backward()
    opt.step()
    return float(loss.detach())


def test_five_reconfigurations_in_a_row_while_training() -> None:
    model = _model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _step(model, opt)
    for round_ in range(5):
        graph = prunefx.trace(model, X)
        mask = prunefx.masks.random(graph, 0.2, seed=round_)
        small = prunefx.reconfigure(model, mask, graph=graph, optimizer=opt)
        assert prunefx.count_params(small) < prunefx.count_params(model)
        model = small
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
        assert set(map(id, opt.state)) <= {id(p) for p in model.parameters()}
        assert torch.isfinite(torch.tensor(_step(model, opt)))


def test_layout_composes_across_reconfigurations() -> None:
    model = _model().eval()
    g = prunefx.trace(model, X)
    once = prunefx.reconfigure(model, prunefx.masks.random(g, 0.5, seed=0), graph=g)
    twice = prunefx.reconfigure(once, prunefx.masks.random(prunefx.trace(once, X), 0.5, seed=1), example_inputs=X)
    layout = twice._prunefx_layout
    # every kept index list refers to the original tensor and matches the current size
    for name, t in twice.state_dict().items():
        entry = layout["tensors"][name]
        orig = dict(model.state_dict())[name]
        assert list(orig.shape) == entry["shape"]
        for dim, kept in entry["kept"].items():
            assert len(kept) == t.shape[dim]
            assert int(kept.max()) < orig.shape[dim]
    # slicing the original weights with the recorded indices gives the current weights
    # (reconfigure copies kept channels unchanged)
    for name, t in twice.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        w = dict(model.state_dict())[name]
        for dim, kept in sorted(layout["tensors"][name]["kept"].items()):
            w = w.index_select(dim, kept)
        torch.testing.assert_close(w, t, rtol=0, atol=0)


def test_checkpoint_round_trip_in_a_fresh_process(tmp_path: Path) -> None:
    model = _model().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _step(model, opt)
    small = model
    for seed in (0, 1):  # two rounds: the layout must compose
        small = prunefx.reconfigure(small, prunefx.masks.random(prunefx.trace(small, X), 0.3, seed=seed), example_inputs=X, optimizer=opt)
        _step(small, opt)
    small.eval()
    with torch.no_grad():
        expected = small(X)
    torch.save(prunefx.state_dict(small), tmp_path / "model.pt")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    torch.save(X, tmp_path / "x.pt")
    torch.save(expected, tmp_path / "y.pt")
    script = textwrap.dedent(f"""
        import sys, torch, torchvision, prunefx
        d = {str(tmp_path)!r}
        model = torchvision.models.resnet18(num_classes=10)
        small = prunefx.load_state_dict(model, torch.load(d + "/model.pt", weights_only=True))
        x, y = torch.load(d + "/x.pt"), torch.load(d + "/y.pt")
        small.eval()
        with torch.no_grad():
            assert torch.equal(small(x), y), (small(x) - y).abs().max()
        opt = torch.optim.Adam(small.parameters(), lr=1e-3)
        opt.load_state_dict(torch.load(d + "/opt.pt", weights_only=True))
        small.train()
        for _ in range(2):
            opt.zero_grad(); loss = small(x).square().mean(); loss.backward(); opt.step()
            assert torch.isfinite(loss)
        print("resumed", float(loss))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed" in out.stdout


def test_ema_copy_reconfigures_with_the_same_mask() -> None:
    model = _model().eval()
    ema = torch.optim.swa_utils.AveragedModel(model)
    graph = prunefx.trace(model, X)
    mask = prunefx.masks.random(graph, 0.5, seed=0)
    small = prunefx.reconfigure(model, mask, graph=graph)
    small_ema = prunefx.reconfigure(ema.module, mask, example_inputs=X)
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in small_ema.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(small(X), small_ema(X))
