"""Gradient bytes all-reduced per data-parallel step, dense vs reconfigured.

Two numbers per model, which must agree:

- ``prunefx.distributed.grad_bytes_per_step(model)``: the sum of ``numel * element_size``
  over the parameters that require grad (no process group needed);
- **measured**: the model wrapped in ``DistributedDataParallel`` on a one-rank ``gloo``
  process group (a file store in a temporary directory), one forward/backward, with a
  communication hook that adds up the bytes of every bucket DDP hands to all-reduce.

The mask is the training benchmark's: 50% random over the exact groups.

    .venv/bin/python -m benchmarks.communication --models resnet50 vit_b_16
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import prunefx
from benchmarks.common import CHECKS, Table, build, check_equivalent, console, tracked
from prunefx.distributed import grad_bytes_per_step

__all__ = ["Row", "measure", "run", "table", "main"]


@dataclasses.dataclass
class Row:
    model: str
    dense_bytes: int
    small_bytes: int
    dense_measured: int | None
    small_measured: int | None

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.small_bytes


def _allreduced_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes DDP hands to all-reduce in one backward, on a one-rank gloo group."""
    counted = [0]

    def count(state, bucket):  # unannotated: DDP rejects the string annotations of __future__
        buf = bucket.buffer()
        counted[0] += buf.numel() * buf.element_size()
        fut = torch.futures.Future()
        fut.set_result(buf)  # one rank: the all-reduced gradient is the local one
        return fut

    ddp = DistributedDataParallel(model.train())
    ddp.register_comm_hook(None, count)
    F.cross_entropy(ddp(x), torch.zeros(x.shape[0], dtype=torch.long)).backward()
    return counted[0]


def measure(name: str, kwargs: dict[str, Any], size: int, *, ddp: bool) -> Row:
    model = build(name, **kwargs)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    graph = prunefx.trace(model, x[:1])
    mask = prunefx.masks.random(graph, 0.5, seed=0, exact_only=True)
    if not any(c.model == name and c.what == "random 50% of exact groups" for c in CHECKS):  # same mask as training
        check_equivalent("communication", name, "random 50% of exact groups", model, mask, x)
    small = prunefx.reconfigure(model, mask, example_inputs=x[:1], graph=graph)
    row = Row(name, grad_bytes_per_step(model), grad_bytes_per_step(small), None, None)
    if ddp:
        row.dense_measured = _allreduced_bytes(model, x)
        row.small_measured = _allreduced_bytes(small, x)
    return row


def run(models: dict[str, tuple[dict[str, Any], int, int]]) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ddp = _init_group(Path(tmp) / "store")
        try:
            for name in tracked(models, "DDP gradient bytes", "ddp"):
                kwargs, _, size = models[name]
                rows.append(measure(name, kwargs, size, ddp=ddp))
        finally:
            if ddp:
                dist.destroy_process_group()
    return rows


def _init_group(store: Path) -> bool:
    if dist.is_initialized():
        return False  # someone else's group: do not measure inside it
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    except Exception as e:  # noqa: BLE001 - the formula column still stands
        console.print(f"no gloo process group ({type(e).__name__}: {e}); measured bytes left out")
        return False
    return True


def table(rows: Sequence[Row]) -> Table:
    t = Table("gradient bytes all-reduced per DDP step",
              ["model", "dense (MiB)", "reconfigured (MiB)", "dense / reconfigured",
               "measured by a DDP comm hook: dense / reconfigured (MiB)"])
    for r in rows:
        measured = ("-" if r.dense_measured is None
                    else f"{r.dense_measured / 2**20:.1f} / {r.small_measured / 2**20:.1f}")
        t.add(r.model, f"{r.dense_bytes / 2**20:.1f}", f"{r.small_bytes / 2**20:.1f}", f"{r.ratio:.2f}x", measured)
    return t


def main(argv: list[str] | None = None) -> int:
    from benchmarks.training import MODELS, QUICK_MODELS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    table(run(QUICK_MODELS if args.quick else MODELS)).print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
