"""PruneTrain end to end on real data: dense baseline vs PruneTrain vs the final
architecture trained from scratch, same epochs, one JSON report and one PNG plot.

    .venv/bin/python examples/prunetrain.py --out docs/prunetrain   # the full run of docs/prunetrain.md
    .venv/bin/python examples/prunetrain.py --smoke          # < 1 minute, what CI runs
    .venv/bin/python examples/prunetrain.py --data-dir ~/cifar-10-batches-py

The report goes to ``--out`` (default: ``prunefx-prunetrain`` in the system's temporary
directory, so a run never writes into the working directory unasked).

Data: scikit-learn's digits (1,797 8x8 images that ship with the package) upsampled to
16x16 (``--size``), split 80/20 with a fixed seed; or CIFAR-10 from a local ``cifar-10-batches-py``
folder (nothing is downloaded). Model: a CIFAR-style ResNet (He et al. 2016, 6n+2 layers,
16/32/64 channels, 1x1 projection shortcuts), written below.

The three runs:
- ``dense``: plain SGD training.
- ``prunetrain``: the same, plus the group lasso over prunefx's channel groups (its lambda
  set at the first step so that the penalty is ``--lasso-ratio`` of the loss), and every
  ``--every`` epochs a reconfiguration (``prunefx.train.PruneTrain``): channels whose weights
  fell under ``--threshold`` are removed, their constants folded, starved branches removed,
  the optimizer re-pointed. Training FLOPs per step are measured with
  ``torch.utils.flop_counter`` (forward + backward) on the current model.
- ``scratch``: the final PruneTrain architecture re-initialised (``prunefx.reinit``) and
  trained for the same epochs (Liu et al. 2019, "Rethinking the Value of Network Pruning").
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import prunefx

DEFAULT_OUT = Path(tempfile.gettempdir()) / "prunefx-prunetrain"  # never the working directory unasked

# ----------------------------------------------------------------------------- data


def load_digits(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def load_cifar10(folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        return d[b"data"].reshape(-1, 3, 32, 32), np.array(d[b"labels"])

    missing = [n for n in ["data_batch_1", "test_batch"] if not (folder / n).exists()]
    if missing:
        raise SystemExit(f"--data-dir {folder}: expected the python CIFAR-10 batches (cifar-10-batches-py), missing {missing}")
    parts = [batch(f"data_batch_{i}") for i in range(1, 6) if (folder / f"data_batch_{i}").exists()]
    xtr = torch.tensor(np.concatenate([p[0] for p in parts]), dtype=torch.float32) / 255
    ytr = torch.tensor(np.concatenate([p[1] for p in parts]))
    xte, yte = batch("test_batch")
    xte_t = torch.tensor(xte, dtype=torch.float32) / 255
    mean, std = xtr.mean((0, 2, 3), keepdim=True), xtr.std((0, 2, 3), keepdim=True)
    return (xtr - mean) / std, ytr, (xte_t - mean) / std, torch.tensor(yte)


# ----------------------------------------------------------------------------- model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, section 4.2)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            layers.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------- measuring


def train_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Forward + backward FLOPs of one training step on (x, y), as FlopCounterMode counts
    them (on a copy, so BatchNorm statistics and gradients are untouched)."""
    m = copy.deepcopy(model).train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(m(x), y).backward()
    return int(counter.get_total_flops())


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        out = model(x[i:i + batch])
        loss += float(F.cross_entropy(out, y[i:i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + batch]).sum())
    model.train()
    return loss / len(y), correct / len(y)


def channels_per_layer(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@dataclass
class Epoch:
    epoch: int
    train_loss: float
    test_loss: float
    test_acc: float
    step_time_ms: float  # median over the epoch's steps
    train_flops_per_step: int  # forward + backward, at the batch size of this epoch
    batch_size: int
    steps: int
    params: int
    lr: float
    reconfig: dict | None = None  # what the reconfiguration at the end of this epoch did


@dataclass
class Run:
    name: str
    epochs: list[Epoch] = field(default_factory=list)
    final_channels: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    # every architecture the run trained, timed side by side at the end (see time_side_by_side)
    architectures: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- training


def train(
    name: str, model: nn.Module, data: tuple, args: argparse.Namespace, progress, *, prunetrain: bool = False
) -> tuple[Run, nn.Module]:
    xtr, ytr, xte, yte = data
    torch.manual_seed(args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    # PruneTrain's schedule: lr / 10 at 50% and 75% of the epochs
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [args.epochs // 2, (3 * args.epochs) // 4], gamma=0.1)
    probe = (xtr[: args.batch_size], ytr[: args.batch_size])
    pt = None
    dyn = None
    if prunetrain:
        pt = prunefx.train.PruneTrain(
            model, opt, example_inputs=probe[0], every=args.every, ratio=args.lasso_ratio, threshold=args.threshold,
            stop_after=int(args.epochs * args.stop_fraction), mode=args.mode,
        )
        if args.dynamic_batch:
            dyn = prunefx.train.DynamicBatch(args.batch_size, args.lr, max_batch_size=4 * args.batch_size, multiple_of=8)
            dyn.update(model, probe[0], opt)
    run = Run(name)
    batch_size = args.batch_size
    steps_per_epoch = (len(ytr) + batch_size - 1) // batch_size
    task = progress.add_task(f"{name:<10}", total=args.epochs * steps_per_epoch)
    start = time.perf_counter()
    flops = train_flops(model, *probe)
    snapshots = [(0, copy.deepcopy(model), flops)]
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(ytr), generator=g)
        times, losses = [], []
        for i in range(0, len(ytr), batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = xtr[idx], ytr[idx]
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            (pt.regularize(loss) if pt else loss).backward()
            opt.step()
            if pt:
                pt.after_step()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            progress.advance(task)
        test_loss, test_acc = evaluate(model, xte, yte)
        row = Epoch(epoch, statistics.fmean(losses), test_loss, test_acc, 1e3 * statistics.median(times),
                    flops * batch_size // args.batch_size, batch_size, len(times), prunefx.count_params(model), opt.param_groups[0]["lr"])
        sched.step()
        if pt is not None and pt.due(epoch):
            model = pt.epoch_end(epoch)
            report = pt.history[-1].report
            after_loss, after_acc = evaluate(model, xte, yte)
            row.reconfig = {
                "changed": report.changed, "removed_channels": report.removed_channels,
                "params": list(report.params), "forward_flops": list(report.flops),
                "test_loss_before": test_loss, "test_loss_after": after_loss,
                "test_acc_before": test_acc, "test_acc_after": after_acc,
                "max_fold_residual": report.fold.max_relative_residual,
                "removed_modules": list(report.branches.removed_modules), "seconds": report.seconds,
            }
            if report.changed:
                flops = train_flops(model, *probe)
                snapshots.append((epoch + 1, copy.deepcopy(model), flops))
                if dyn is not None:
                    decision = dyn.update(model, probe[0], opt)
                    batch_size = decision.batch_size
        run.epochs.append(row)
        progress.update(task, description=f"{name:<10} acc {test_acc:.3f}")
    run.final_channels = channels_per_layer(model)
    run.wall_s = time.perf_counter() - start
    if len(snapshots) > 1 and args.timing_rounds > 0:
        times = time_side_by_side([m for _, m, _ in snapshots], probe, rounds=args.timing_rounds)
        run.architectures = [{"from_epoch": e, "train_flops_per_step": f, "params": prunefx.count_params(m), "step_time_ms": t}
                             for (e, m, f), t in zip(snapshots, times, strict=True)]
    return run, model


def time_side_by_side(models: list[nn.Module], batch: tuple[torch.Tensor, torch.Tensor], rounds: int) -> list[float]:
    """Median training-step time (forward, backward, SGD step) of each model, measured in
    interleaved rounds so that the machine's load hits every model alike (copies: the
    models themselves are not trained)."""
    copies = [copy.deepcopy(m).train() for m in models]
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in copies]
    times: list[list[float]] = [[] for _ in copies]
    for r in range(rounds + 1):
        for i, (m, opt) in enumerate(zip(copies, opts, strict=True)):
            t0 = time.perf_counter()
            loss = F.cross_entropy(m(batch[0]), batch[1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if r:  # round 0 warms up
                times[i].append(time.perf_counter() - t0)
    return [1e3 * statistics.median(t) for t in times]


# ----------------------------------------------------------------------------- report


def plot(runs: list[Run], dense_channels: dict[str, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 8))
    colors = {"dense": "tab:gray", "prunetrain": "tab:blue", "scratch": "tab:orange"}
    for r in runs:
        ep = [e.epoch + 1 for e in r.epochs]
        c = colors.get(r.name)
        axes[0, 0].plot(ep, [e.train_flops_per_step / 1e9 for e in r.epochs], label=r.name, color=c, drawstyle="steps-post")
        axes[0, 1].plot(ep, [100 * e.test_acc for e in r.epochs], label=r.name, color=c)
        axes[1, 0].plot(ep, [e.step_time_ms for e in r.epochs], label=r.name, color=c)
    axes[0, 0].set(title="training FLOPs per step (fwd+bwd)", xlabel="epoch", ylabel="GFLOP")
    axes[0, 1].set(title="test accuracy", xlabel="epoch", ylabel="%")
    axes[1, 0].set(title="step time (median per epoch, as trained)", xlabel="epoch", ylabel="ms")
    pt = next((r for r in runs if r.name == "prunetrain"), None)
    if pt is not None and pt.architectures:
        a = pt.architectures
        axes[0, 2].plot([x["from_epoch"] for x in a], [x["step_time_ms"] / a[0]["step_time_ms"] for x in a], "o-",
                        color="tab:blue", label="step time / dense (side by side)")
        axes[0, 2].plot([x["from_epoch"] for x in a], [x["train_flops_per_step"] / a[0]["train_flops_per_step"] for x in a],
                        "s--", color="tab:green", label="training FLOPs / dense")
        axes[0, 2].set(title="each PruneTrain architecture, timed side by side", xlabel="from epoch", ylabel="ratio to dense")
        ratios = [(x["train_flops_per_step"] / a[0]["train_flops_per_step"], x["step_time_ms"] / a[0]["step_time_ms"]) for x in a]
        axes[1, 2].plot(*zip(*ratios, strict=True), "o", color="tab:blue", label="PruneTrain architectures")
        axes[1, 2].plot([0, 1], [0, 1], ":", color="gray", label="time ratio = FLOPs ratio")
        axes[1, 2].set(title="step time vs training FLOPs", xlabel="FLOPs / dense", ylabel="step time / dense")
    names = list(dense_channels)
    pos = np.arange(len(names))
    axes[1, 1].bar(pos, [dense_channels[n] for n in names], color="tab:gray", label="dense")
    if pt is not None:
        axes[1, 1].bar(pos, [pt.final_channels.get(n, 0) for n in names], color="tab:blue", label="PruneTrain (end)")
    axes[1, 1].set(title="output channels per conv", ylabel="channels")
    axes[1, 1].set_xticks(pos, [n.replace("layer", "L").replace(".conv", ".c").replace("shortcut.0", "sc") for n in names],
                          rotation=90, fontsize=6)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(runs: list[Run]) -> dict:
    by = {r.name: r for r in runs}
    d, p = by["dense"], by["prunetrain"]

    def total_flops(r: Run) -> int:
        return sum(e.train_flops_per_step * e.steps for e in r.epochs)

    out = {
        "dense_acc": d.epochs[-1].test_acc,
        "prunetrain_acc": p.epochs[-1].test_acc,
        "final_train_flops_ratio": p.epochs[-1].train_flops_per_step / d.epochs[-1].train_flops_per_step,
        "total_train_flops_ratio": total_flops(p) / total_flops(d),
        "final_step_time_ratio": p.epochs[-1].step_time_ms / d.epochs[-1].step_time_ms,
        "final_step_time_ratio_side_by_side": (p.architectures[-1]["step_time_ms"] / p.architectures[0]["step_time_ms"]
                                               if p.architectures else 1.0),
        "final_params_ratio": p.epochs[-1].params / d.epochs[-1].params,
        "max_val_loss_jump": max((abs(e.reconfig["test_loss_after"] - e.reconfig["test_loss_before"])
                                  for e in p.epochs if e.reconfig and e.reconfig["changed"]), default=0.0),
    }
    if "scratch" in by:
        out["scratch_acc"] = by["scratch"].epochs[-1].test_acc
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny run for CI (< 1 minute)")
    ap.add_argument("--data-dir", type=Path, help="a local cifar-10-batches-py folder instead of digits")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--every", type=int, default=2, help="reconfigure every N epochs")
    ap.add_argument("--stop-fraction", type=float, default=0.75, help="no reconfiguration after this fraction of the epochs")
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--size", type=int, default=16, help="digits are upsampled to size x size")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--lasso-ratio", type=float, default=0.6, help="penalty / total loss at the first step (PruneTrain's r)")
    ap.add_argument("--mode", choices=("proximal", "penalty"), default="proximal",
                    help="proximal: lasso prox step after each SGD step (exact zeros); penalty: lasso gradient in the loss (the paper)")
    ap.add_argument("--threshold", type=float, default=1e-4)
    ap.add_argument("--dynamic-batch", action="store_true", help="grow the batch (and LR) as the model shrinks")
    ap.add_argument("--no-scratch", action="store_true", help="skip the train-from-scratch baseline")
    ap.add_argument("--timing-rounds", type=int, default=20, help="rounds of the side-by-side step timing at the end (0: skip it)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady step times on a shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"directory for prunetrain.json and prunetrain.png (default: {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.smoke:  # a tiny net and a strong lasso, so that channels die within 4 epochs
        args.epochs, args.every, args.depth, args.width, args.size, args.stop_fraction = 4, 1, 8, 8, 16, 1.0
        args.lasso_ratio, args.timing_rounds = 0.88, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table

    console = Console()
    if args.data_dir:
        data = load_cifar10(args.data_dir.expanduser())
        in_ch, dataset = 3, f"CIFAR-10 ({args.data_dir})"
    else:
        data = load_digits(args.size, args.seed)
        in_ch, dataset = 1, f"scikit-learn digits, upsampled to {args.size}x{args.size}"
    if args.smoke:
        data = (data[0][:256], data[1][:256], data[2][:128], data[3][:128])
    console.print(f"[bold]PruneTrain example[/]: {dataset}, {len(data[1])} train / {len(data[3])} test, "
                  f"ResNet-{args.depth} (width {args.width}), {args.epochs} epochs, torch threads {torch.get_num_threads()}")
    torch.manual_seed(args.seed)
    base = CifarResNet(args.depth, 10, in_ch, args.width)
    dense_channels = channels_per_layer(base)
    runs = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        dense, _ = train("dense", copy.deepcopy(base), data, args, progress)
        runs.append(dense)
        pruned, final = train("prunetrain", copy.deepcopy(base), data, args, progress, prunetrain=True)
        runs.append(pruned)
        if not args.no_scratch:
            scratch_model = copy.deepcopy(final)
            prunefx.reinit(scratch_model, seed=args.seed)
            scratch, _ = train("scratch", scratch_model, data, args, progress)
            runs.append(scratch)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "dataset": dataset,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": summary(runs),
        "dense_channels": dense_channels,
        "runs": [asdict(r) for r in runs],
    }
    (args.out / "prunetrain.json").write_text(json.dumps(result, indent=1))
    plot(runs, dense_channels, args.out / "prunetrain.png")
    s = result["summary"]
    t = Table(title="PruneTrain vs dense (last epoch)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in s.items():
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(t)
    for e in pruned.epochs:
        if e.reconfig and e.reconfig["changed"]:
            rc = e.reconfig
            console.print(f"epoch {e.epoch + 1}: -{rc['removed_channels']} channels, params {rc['params'][0]:,} -> {rc['params'][1]:,}, "
                          f"test loss {rc['test_loss_before']:.4f} -> {rc['test_loss_after']:.4f}"
                          + (f", removed {rc['removed_modules']}" if rc["removed_modules"] else ""))
    console.print(f"wrote {args.out / 'prunetrain.json'} and {args.out / 'prunetrain.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
