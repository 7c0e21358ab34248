"""PruneTrain on a sharded model: a CNN trains under FSDP2 (``fully_shard`` per block, then the
root) with AdamW, and shrinks while it trains.

``prunefx.train.PruneTrain`` runs in mode "proximal": after every optimizer step each rank
shrinks its own shards of the channel groups (one all-reduce sums the group norms over the
ranks). Every ``--every`` epochs ``prunefx.fsdp.reconfigure_fsdp`` gathers the weights and
AdamW's sharded moments, removes the channels at zero on every rank alike (folding their
constants), shards the smaller model again block by block and cuts the sliced moments into
each rank's chunk. After each shrink the example checks that all ranks hold the same
gathered parameters, buffers and optimizer state (a digest compared across ranks).

    torchrun --standalone --nproc_per_node=2 examples/fsdp_prunetrain.py --smoke   # CPU, gloo
    torchrun --standalone --nproc_per_node=2 examples/fsdp_prunetrain.py --epochs 30
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard

from prunefx.fsdp import gather
from prunefx.train import PruneTrain


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a few short epochs on a small data set (about half a minute on CPU)")
    ap.add_argument("--epochs", type=int, default=30, help="(--smoke: 6)")
    ap.add_argument("--samples", type=int, default=4096, help="synthetic training images (--smoke: 256)")
    ap.add_argument("--batch-size", type=int, default=32, help="per rank (--smoke: 16)")
    ap.add_argument("--every", type=int, default=5, help="shrink every this many epochs (--smoke: 1)")
    ap.add_argument("--ratio", type=float, default=0.9, help="the lasso's share of the first loss (PruneTrain's r)")
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.smoke:
        args.epochs, args.samples, args.batch_size, args.every = 6, 256, 16, 1
    return args


def cnn(width: int = 16) -> nn.Sequential:
    """Three conv blocks and a linear head; each block is one FSDP unit. (No BatchNorm: it makes
    a layer's output blind to its weights' scale, and AdamW then regrows what the lasso shrinks.)"""

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

    net = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 2 * width),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))
    with torch.no_grad():  # channels of graded strength, as in a pretrained network: the weak ones go first
        readers = [net[1][0].weight, net[2][0].weight, net[5].weight]
        for blk, reader in zip(net[:3], readers, strict=True):
            ramp = torch.linspace(0.02, 1.0, blk[0].out_channels)
            blk[0].weight.mul_(ramp.view(-1, 1, 1, 1))
            blk[0].bias.mul_(ramp)
            reader.mul_(ramp.view(1, -1, *([1] * (reader.dim() - 2))))
    return net


def synthetic(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable 16x16 10-class data: a fixed random prototype per class plus noise, the same
    on every rank (each takes its shard)."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 3, 16, 16, generator=gen)
    labels = torch.randint(0, 10, (samples,), generator=gen)
    return prototypes[labels] + 1.0 * torch.randn(samples, 3, 16, 16, generator=gen), labels


def digest(model: nn.Module, opt: torch.optim.Optimizer) -> str:
    """A hash of the gathered parameters, buffers and optimizer state (collective)."""
    h = hashlib.sha256()
    plain = gather(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for name, t in (*plain.named_parameters(), *plain.named_buffers()):
        h.update(name.encode() + t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    for p, st in opt.state.items():
        for k, v in sorted(st.items()):
            full = v.full_tensor() if hasattr(v, "full_tensor") else v
            h.update(f"{names[id(p)]}.{k}".encode() + full.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def identical_on_all_ranks(model: nn.Module, opt: torch.optim.Optimizer) -> bool:
    everyone: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, digest(model, opt))
    return len(set(everyone)) == 1


def shard(model: nn.Sequential) -> nn.Sequential:
    for block in model[:3]:
        fully_shard(block)
    fully_shard(model)
    return model


def train(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    def log(*a: object) -> None:
        if rank == 0:
            print(*a, flush=True)

    torch.manual_seed(args.seed)
    model = shard(cnn())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    images, labels = synthetic(args.samples, args.seed)
    shard_idx = torch.arange(rank, len(labels), world)
    example = images[: args.batch_size]  # the same batch on every rank: constants are folded on it
    pt = PruneTrain(model, opt, example_inputs=example, every=args.every, ratio=args.ratio, mode="proximal")
    params = sum(p.numel() for p in model.parameters())
    log(f"CNN under FSDP2 on {world} ranks (gloo), {params:,} parameters, AdamW, {args.epochs} epochs, shrink every {args.every}")

    epoch_losses = []
    for epoch in range(args.epochs):
        order = shard_idx[torch.randperm(len(shard_idx), generator=torch.Generator().manual_seed(args.seed + epoch))]
        total, steps = torch.zeros(()), 0
        t0 = time.perf_counter()
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
            idx = order[i : i + args.batch_size]
            loss = F.cross_entropy(pt.model(images[idx]), labels[idx])
            opt.zero_grad()
            pt.regularize(loss).backward()
            opt.step()
            pt.after_step()
            total += loss.detach()
            steps += 1
        dist.all_reduce(total)
        epoch_losses.append(total.item() / (steps * world))
        log(f"epoch {epoch}: loss {epoch_losses[-1]:.4f} ({time.perf_counter() - t0:.1f} s)")

        before = sum(p.numel() for p in pt.model.parameters())
        t0 = time.perf_counter()
        pt.epoch_end(epoch)
        report = pt.history[-1].report if pt.history and pt.history[-1].epoch == epoch else None
        if report is not None and report.changed:
            after = sum(p.numel() for p in pt.model.parameters())
            same = identical_on_all_ranks(pt.model, opt)
            channels = {k: v for k, v in report.channels.items() if v[0] != v[1]}
            log(f"shrink at epoch {epoch}: params {before:,} -> {after:,} in {time.perf_counter() - t0:.2f} s, channels {channels}; "
                f"AdamW state re-sharded; parameters, buffers and optimizer state "
                f"{'identical on all ' + str(world) + ' ranks' if same else 'DIFFER across ranks'}")
            if not same:
                raise SystemExit(1)

    final = sum(p.numel() for p in pt.model.parameters())
    shrinks = sum(h.report.changed for h in pt.history)
    log(f"done: {shrinks} shrinks, params {params:,} -> {final:,} ({final / params:.1%}), loss {epoch_losses[0]:.4f} -> {epoch_losses[-1]:.4f}")


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    train(args)
    # train's locals, the wrapped model and its optimizer among them, hold the process group:
    # freed first, the group is torn down here and not at interpreter exit, where gloo's
    # threads can abort the process ("terminate called without an active exception")
    gc.collect()
    dist.barrier()  # and no rank tears it down while another is still in a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
