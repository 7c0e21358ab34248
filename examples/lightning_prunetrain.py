"""PruneTrain inside PyTorch Lightning: a CNN that shrinks while ``Trainer.fit`` trains it.

``prunefx.integrations.lightning.PruneTrainCallback`` regularises the LightningModule's ``net``
with PruneTrain's group lasso (proximal step after every optimizer step) and, every ``--every``
epochs, removes the channels that reached zero: ``net`` is replaced by a smaller model, the
SGD momentum is sliced alike, the LR scheduler keeps stepping, and ``ModelCheckpoint`` saves
the smaller model with its channel layout. The run is then resumed, in a fresh Trainer and a
fresh LightningModule, from the checkpoint written after the second shrink, and the resumed
losses are compared with the original run's.

    python examples/lightning_prunetrain.py --smoke                  # CPU, well under a minute
    python examples/lightning_prunetrain.py --smoke --devices 2      # DDP strategy, 2 CPU processes (gloo)
    python examples/lightning_prunetrain.py --epochs 30 --every 5

Data: synthetic 16x16 images, a fixed random prototype per class plus noise (no download).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunefx.integrations.lightning import PruneTrainCallback


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="8 epochs on 128 images (CI)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--every", type=int, default=5, help="shrink every this many epochs (--smoke: 2)")
    ap.add_argument("--samples", type=int, default=2048, help="--smoke: 128")
    ap.add_argument("--batch-size", type=int, default=32, help="per process (--smoke: 16)")
    ap.add_argument("--ratio", type=float, default=0.45, help="the lasso's share of the first loss")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--devices", type=int, default=1, help="CPU processes; > 1 uses Lightning's DDP strategy (gloo)")
    ap.add_argument("--out", type=Path, default=None, help="where summary.json and the checkpoints go (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.smoke:
        args.epochs, args.every, args.samples, args.batch_size = 8, 2, 128, 16
    return args


def synthetic(samples: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(4, 3, 16, 16, generator=gen)
    labels = torch.randint(0, 4, (samples,), generator=gen)
    return TensorDataset(prototypes[labels] + 0.5 * torch.randn(samples, 3, 16, 16, generator=gen), labels)


def small_cnn() -> nn.Sequential:
    """Three conv-BN-ReLU blocks. Channels start at graded strengths (filter and BN scale from
    0.05 to 1), as trained networks' channels differ in importance, so that the lasso removes
    them a few at a time."""
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )
    with torch.no_grad():
        for conv, bn in ((net[0], net[1]), (net[3], net[4]), (net[6], net[7])):
            ramp = torch.linspace(0.05, 1.0, conv.out_channels)
            conv.weight.mul_(ramp.view(-1, 1, 1, 1))
            bn.weight.copy_(ramp)
    return net


class LitCNN(L.LightningModule):
    def __init__(self, lr: float, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = small_cnn()
        self.lr = lr
        self.losses: dict[int, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses[self.global_step] = float(loss.detach())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):  # noqa: ANN201
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.8)}


class ReplicaCheck(L.Callback):
    """After each epoch end (so after a shrink): the parameter count, and under DDP whether
    every rank holds bit-identical parameters (position-weighted float64 checksums compared
    by all-reducing their min and max)."""

    def __init__(self) -> None:
        self.params: list[int] = []
        self.identical = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = list(pl_module.net.parameters())
        self.params.append(sum(p.numel() for p in params))
        if trainer.world_size > 1:
            sums = []
            for p in params:
                flat = p.detach().double().flatten()
                sums += [flat.sum(), (flat * torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)).sum()]
            lo = torch.stack(sums)
            hi = lo.clone()
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            self.identical &= bool(torch.equal(lo, hi))


def trainer_for(args: argparse.Namespace, callbacks: list[L.Callback], root: Path) -> L.Trainer:
    return L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto", callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, deterministic=True,
    )


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="lightning_prunetrain_"))
    data = synthetic(args.samples, args.seed)
    example = data.tensors[0][:32]  # the same real batch on every rank: the folds are measured on it

    def loader() -> DataLoader:
        return DataLoader(data, batch_size=args.batch_size, shuffle=False)

    def callback() -> PruneTrainCallback:
        return PruneTrainCallback("net", example_inputs=example, every=args.every, ratio=args.ratio)

    prune, check = callback(), ReplicaCheck()
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    model = LitCNN(args.lr, args.seed)
    trainer = trainer_for(args, [prune, check, ckpt], out)
    trainer.fit(model, loader())
    rank0 = trainer.is_global_zero

    def log(*a: object) -> None:
        if rank0:
            print(*a, flush=True)

    shrinks = [h for h in prune.history if h["changed"]]
    for h in shrinks:
        log(f"epoch {h['epoch']}: params {h['params'][0]:,} -> {h['params'][1]:,}; channels "
            + ", ".join(f"{g} {a}->{b}" for g, (a, b) in h["channels"].items() if a != b))

    matches = True
    if len(shrinks) >= 2 and shrinks[1]["epoch"] + 1 < args.epochs:
        second = shrinks[1]["epoch"]
        resumed_model = LitCNN(args.lr, args.seed + 1)  # other initial weights: everything comes from the checkpoint
        resumed = trainer_for(args, [callback()], out / "resumed")
        resumed.fit(resumed_model, loader(), ckpt_path=out / "checkpoints" / f"epoch={second}.ckpt")
        diffs = [abs(loss - model.losses[step]) / max(1.0, abs(model.losses[step])) for step, loss in resumed_model.losses.items()]
        matches = bool(diffs) and max(diffs) <= 1e-5
        if dist.is_initialized():
            flag = torch.tensor(float(matches))
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            matches = bool(flag.item())
        log(f"resumed from the checkpoint of epoch {second} (after the second shrink) in a fresh Trainer: "
            f"{len(diffs)} steps, largest relative loss difference {max(diffs, default=float('nan')):.2e}")
    summary = {
        "world_size": trainer.world_size,
        "shrinks": len(shrinks),
        "params": check.params,
        "history": prune.history,
        "first_loss": model.losses[min(model.losses)],
        "last_loss": model.losses[max(model.losses)],
        "resumed_loss_matches": matches,
        "replicas_identical": check.identical,
    }
    log(f"{len(shrinks)} shrinks: parameters {check.params[0]:,} -> {check.params[-1]:,}; "
        f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; "
        f"replicas identical: {check.identical}; resumed losses match: {matches}")
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
