"""Data-parallel training that gets cheaper as it goes: a ResNet-18 trains under
DistributedDataParallel and is reconfigured twice mid-training (PruneTrain-style), so every
later step all-reduces fewer gradient bytes.

Rank 0 decides each mask; ``prunefx.distributed.reconfigure_ddp`` broadcasts it, rewrites the
model on every rank, slices the SGD momentum alike and re-wraps the model in DDP. After each
reconfiguration the replicas (parameters and momentum) are checked to be bit-identical.

    torchrun --standalone --nproc_per_node=2 examples/ddp_training.py --smoke   # CPU, gloo
    torchrun --standalone --nproc_per_node=2 examples/ddp_training.py --steps 300
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel

import prunefx
from prunefx.distributed import grad_bytes_per_step, reconfigure_ddp

PRUNETRAIN_REDUCTION = 55.0  # % less inter-accelerator communication reported by PruneTrain (Lym et al., SC'19)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a few steps on a small data set (well under a minute on CPU)")
    ap.add_argument("--steps", type=int, default=300, help="training steps (--smoke: 9)")
    ap.add_argument("--samples", type=int, default=4096, help="synthetic training images (--smoke: 256)")
    ap.add_argument("--batch-size", type=int, default=32, help="per rank (--smoke: 16)")
    ap.add_argument("--ratio", type=float, default=0.4, help="fraction of each group's channels removed per reconfiguration")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default=None, help="torch.distributed backend (default: nccl on GPU, gloo on CPU)")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.samples, args.batch_size = 9, 256, 16
    return args


def synthetic_cifar(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable 32x32 10-class data: a fixed random prototype per class plus noise.
    Generated from ``seed`` alone, so every rank builds the same set and takes its shard."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (samples,), generator=gen)
    images = prototypes[labels] + 1.5 * torch.randn(samples, 3, 32, 32, generator=gen)
    return images, labels


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, rank: int, world: int, seed: int):
    """This rank's shard (every ``world``-th sample), reshuffled each epoch, forever."""
    shard = torch.arange(rank, len(labels), world)
    epoch = 0
    while True:
        order = shard[torch.randperm(len(shard), generator=torch.Generator().manual_seed(seed + epoch))]
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            yield images[idx], labels[idx]
        epoch += 1


def assert_replicas_agree(ddp: DistributedDataParallel, opt: torch.optim.Optimizer) -> None:
    """Same shapes on every rank, and bit-identical parameters and momentum buffers
    (a position-weighted float64 checksum per tensor, compared by all-reducing min and max)."""
    params = list(ddp.module.parameters())
    shapes = [tuple(p.shape) for p in params]
    everyone: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, shapes)
    assert all(s == shapes for s in everyone), "parameter shapes differ across ranks"

    tensors = params + [opt.state[p]["momentum_buffer"] for p in params if "momentum_buffer" in opt.state[p]]
    sums = []
    for t in tensors:
        flat = t.detach().double().flatten()
        sums += [flat.sum(), (flat * torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)).sum()]
    lo = torch.stack(sums)
    hi = lo.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    assert torch.equal(lo, hi), "parameters or momentum differ across ranks after reconfiguration"


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def train(args: argparse.Namespace, backend: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    def log(*a: object) -> None:
        if rank == 0:
            print(*a, flush=True)

    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(num_classes=10).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    images, labels = synthetic_cifar(args.samples, args.seed)
    data = batches(images, labels, args.batch_size, rank, world, args.seed)
    example = images[:1].to(device)
    reconfigure_at = (args.steps // 3, 2 * args.steps // 3)

    log(f"ResNet-18 on {world} ranks ({backend}), {args.steps} steps, batch {args.batch_size} per rank; "
        f"reconfiguring at steps {reconfigure_at[0]} and {reconfigure_at[1]} (random masks, ratio {args.ratio})")
    initial = grad_bytes_per_step(ddp)
    log(f"gradient bytes all-reduced per step: {initial:,} ({mb(initial)})")
    sent = 0
    history: list[tuple[int, int, int, float]] = []
    for step in range(1, args.steps + 1):
        if step in reconfigure_at:
            before = grad_bytes_per_step(ddp)
            t0 = time.perf_counter()
            mask = None
            if rank == 0:  # decided here, broadcast inside reconfigure_ddp
                mask = prunefx.masks.random(prunefx.trace(ddp.module, example), args.ratio, seed=step)
            ddp = reconfigure_ddp(ddp, mask, example_inputs=example, optimizer=opt)
            seconds = time.perf_counter() - t0
            assert_replicas_agree(ddp, opt)
            after = grad_bytes_per_step(ddp)
            history.append((step, before, after, seconds))
            log(f"reconfiguration {len(history)} at step {step}: gradient bytes all-reduced per step "
                f"{before:,} -> {after:,} ({mb(before)} -> {mb(after)}, -{100 * (1 - after / before):.1f}%) "
                f"in {seconds:.2f} s; parameters and momentum identical on all {world} ranks")

        t0 = time.perf_counter()
        x, y = next(data)
        loss = F.cross_entropy(ddp(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sent += grad_bytes_per_step(ddp)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        log(f"step {step:4d}/{args.steps}  loss {mean_loss.item() / world:.4f}  "
            f"all-reduce {mb(grad_bytes_per_step(ddp))}/step  {time.perf_counter() - t0:.2f} s")

    final = grad_bytes_per_step(ddp)
    per_step = 100 * (1 - final / initial)
    whole_run = 100 * (1 - sent / (initial * args.steps))
    log("")
    log("communication summary")
    for i, (step, before, after, seconds) in enumerate(history, 1):
        log(f"  reconfiguration {i} (step {step}): {before:,} -> {after:,} bytes per step, rewritten in {seconds:.2f} s")
    log(f"  per step: {initial:,} -> {final:,} gradient bytes all-reduced: {per_step:.1f}% less after both reconfigurations")
    log(f"  whole run: {sent:,} bytes instead of {initial * args.steps:,} without pruning: {whole_run:.1f}% less")
    log(f"  PruneTrain reported {PRUNETRAIN_REDUCTION:.0f}% less inter-accelerator communication; "
        f"prunefx here: {whole_run:.1f}% over this run, {per_step:.1f}% per step at the end")


def main() -> None:
    args = parse_args()
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend)
    train(args, backend)
    # train's locals, the wrapped model and its optimizer among them, hold the process group:
    # freed first, the group is torn down here and not at interpreter exit, where gloo's
    # threads can abort the process ("terminate called without an active exception")
    gc.collect()
    dist.barrier()  # and no rank tears it down while another is still in a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
