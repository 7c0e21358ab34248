"""prunefx.integrations.lightning: PruneTrain inside Lightning's Trainer.fit (CPU).

A small CNN shrinks at least twice; the optimizer state after each shrink is the state before
it sliced by hand; a ModelCheckpoint written after a shrink resumes into a fresh Trainer and
LightningModule and continues with the same losses (and ends bit-identical, EMA included);
mode "penalty" with gradient accumulation equals a hand loop; a MixedPrecision plugin's
GradScaler is followed; the example's --smoke mode runs under the DDP strategy with two CPU
processes (gloo). docs/integrations.md runs in tests/test_docs.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from prunefx.integrations.lightning import PruneTrainCallback

ROOT = Path(__file__).resolve().parents[1]
GEN = torch.Generator().manual_seed(0)
PROTOTYPES = torch.randn(4, 3, 12, 12, generator=GEN)
LABELS = torch.randint(0, 4, (64,), generator=GEN)
IMAGES = PROTOTYPES[LABELS] + 0.5 * torch.randn(64, 3, 12, 12, generator=GEN)


def _net() -> nn.Sequential:
    """Channels start at graded strengths (BN scale and filter from 0.05 to 1), so the lasso
    removes the weak ones first and the rest later: a schedule of shrinks, not one collapse."""
    net = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )
    with torch.no_grad():
        for conv, bn in ((net[0], net[1]), (net[3], net[4])):
            ramp = torch.linspace(0.05, 1.0, conv.out_channels)
            conv.weight.mul_(ramp.view(-1, 1, 1, 1))
            bn.weight.copy_(ramp)
    return net


class LitCNN(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = _net()
        self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
        self.losses: list[tuple[int, float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append((self.global_step, float(loss.detach())))
        return loss

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        self.ema.update_parameters(self.net)

    def configure_optimizers(self):  # noqa: ANN201
        opt = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)}


class _Momentum(L.Callback):
    """The momentum buffers by parameter name, and which channels are alive (the norm of
    everything a channel's lasso group holds, by hand), at the end of each epoch; one is
    registered before PruneTrainCallback, one after."""

    def __init__(self) -> None:
        self.states: list[tuple[int, dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        opt, net = trainer.optimizers[0], pl_module.net
        names = {id(p): n for n, p in net.named_parameters()}
        momentum = {names[id(p)]: s["momentum_buffer"].clone() for p, s in opt.state.items()}
        w = {n: p.detach() for n, p in net.named_parameters()}
        alive0 = (w["0.weight"].square().sum((1, 2, 3)) + w["1.weight"].square() + w["1.bias"].square()
                  + w["3.weight"].square().sum((0, 2, 3))).sqrt() > 1e-4
        alive3 = (w["3.weight"].square().sum((1, 2, 3)) + w["4.weight"].square() + w["4.bias"].square()
                  + w["8.weight"].square().sum(0)).sqrt() > 1e-4
        self.states.append((trainer.current_epoch, momentum, (alive0.nonzero().flatten(), alive3.nonzero().flatten())))


def _by_hand(name: str, t: torch.Tensor, k0: torch.Tensor, k3: torch.Tensor) -> torch.Tensor:
    """``t``, the tensor ``name`` of the net before a shrink, keeping channels k0 of group "0"
    and k3 of group "3"."""
    if name in ("0.weight", "1.weight", "1.bias"):
        return t[k0]
    if name == "3.weight":
        return t[k3][:, k0]
    if name in ("4.weight", "4.bias"):
        return t[k3]
    if name == "8.weight":
        return t[:, k3]
    return t


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(IMAGES, LABELS), batch_size=16, shuffle=False)


def _trainer(tmp_path: Path, callbacks: list, max_epochs: int) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     deterministic=True)


def _callback() -> PruneTrainCallback:
    return PruneTrainCallback("net", example_inputs=IMAGES[:16], every=2, ratio=0.3, ema=["ema"])


def test_fit_shrinks_twice_slices_exactly_and_resumes(tmp_path: Path) -> None:
    before, after = _Momentum(), _Momentum()
    prune = _callback()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    model = LitCNN()
    trainer = _trainer(tmp_path, [before, prune, after, ckpt], max_epochs=6)
    trainer.fit(model, _loader())

    shrinks = [h for h in prune.history if h["changed"]]
    assert len(shrinks) >= 2, prune.history
    assert isinstance(model.net, torch.fx.GraphModule) and model.net is prune.prunetrain.module
    params = [h["params"] for h in shrinks]
    assert all(b < a for a, b in params) and params[1][0] == params[0][1]

    # the optimizer state after each shrink is the state before it, sliced by hand
    shrunk = {h["epoch"] for h in shrinks}
    for (epoch, old, (k0, k3)), (_, new, _) in zip(before.states, after.states, strict=True):
        if epoch not in shrunk:
            assert all(torch.equal(old[n], new[n]) for n in new)
            continue
        assert len(k0) < len(old["1.weight"]) or len(k3) < len(old["4.weight"])
        assert set(new) == set(old)
        for name, m in new.items():
            assert torch.equal(m, _by_hand(name, old[name], k0, k3)), (epoch, name)

    # a checkpoint from after the second shrink resumes into a fresh Trainer and module
    second = shrinks[1]["epoch"]
    path = tmp_path / "ckpt" / f"epoch={second}.ckpt"
    resumed_model, resumed_prune = LitCNN(), _callback()
    resumed = _trainer(tmp_path, [resumed_prune], max_epochs=6)
    resumed.fit(resumed_model, _loader(), ckpt_path=path)
    assert resumed_prune.history[: len(prune.history)][:2] == prune.history[:2]
    original = dict(model.losses)
    continued = dict(resumed_model.losses)
    assert continued and min(continued) == (second + 1) * 4
    for step, loss in continued.items():
        assert loss == pytest.approx(original[step], rel=1e-5, abs=1e-6), step
    # the resumed run ends where the original did: the model and its EMA copy (sliced at each shrink), bit for bit
    for key, t in model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], t), key
    assert [p.shape for p in model.ema.module.parameters()] == [p.shape for p in model.net.parameters()]

    # outside a Trainer: the same checkpoint into a fresh module, for inference
    fresh = _callback().restore(LitCNN(), path)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(t, state[k]) for k, t in fresh.state_dict().items())


@pytest.mark.xdist_group("example")
def test_example_smoke_ddp(tmp_path: Path) -> None:
    """The example as CI runs it, under the DDP strategy with 2 CPU processes (its one-process
    path is the callback of the test above; run it with --devices 1)."""
    devices = 2
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "lightning_prunetrain.py"), "--smoke", "--devices", str(devices), "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "summary.json").read_text())
    assert report["world_size"] == devices
    assert report["shrinks"] >= 2 and report["params"][-1] < report["params"][0]
    assert report["resumed_loss_matches"] and report["replicas_identical"]


def test_penalty_mode_with_accumulation_matches_hand_loop(tmp_path: Path) -> None:
    """mode="penalty" under accumulate_grad_batches=2: lambda from the first micro-batch's
    loss (Lightning divided it by 2), lambda * grad R(W) added once per optimizer step; the
    same as a hand-written loop."""
    from prunefx.train import GroupLasso

    lit = LitCNN()
    prune = PruneTrainCallback("net", example_inputs=IMAGES[:16], every=100, ratio=0.3, mode="penalty")
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, callbacks=[prune], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        accumulate_grad_batches=2)
    trainer.fit(lit, _loader())

    net = LitCNN().net
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    lasso = GroupLasso(net, IMAGES[:16], ratio=0.3)
    batches = list(_loader())
    for k in range(2):
        opt.zero_grad()
        for x, y in batches[2 * k: 2 * k + 2]:
            loss = F.cross_entropy(net(x), y)
            if lasso.lam is None:
                with torch.no_grad():
                    lasso(loss.detach())
            (loss / 2).backward()
        (lasso.lam * lasso.penalty()).backward()
        opt.step()
    assert prune.prunetrain.lasso.lam == pytest.approx(lasso.lam, rel=1e-6)
    for (name, p), q in zip(lit.net.named_parameters(), net.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


def test_gradscaler_of_the_precision_plugin(tmp_path: Path) -> None:
    """Under a MixedPrecision plugin with a GradScaler (injected: Lightning's CPU path has
    none), lambda is set from the unscaled loss, the scaler is passed to every shrink (which
    checks it is between steps) and the run shrinks."""
    from lightning.pytorch.plugins import MixedPrecision

    runs = {}
    for name, plugins in (("fp32", []), ("scaled", [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))])):
        prune = _callback()
        trainer = L.Trainer(max_epochs=4, accelerator="cpu", devices=1, callbacks=[prune], logger=False, plugins=plugins,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            default_root_dir=tmp_path)
        trainer.fit(LitCNN(), _loader())
        runs[name] = prune
    scaled, fp32 = runs["scaled"].prunetrain, runs["fp32"].prunetrain
    assert scaled.scaler is not None and scaled.scaler.get_scale() >= 1.0
    assert scaled.lasso.lam == pytest.approx(fp32.lasso.lam, rel=1e-3)  # not 1024 times it
    assert sum(h["changed"] for h in runs["scaled"].history) >= 1  # (fp16 rounding may move a channel's death by a step)
