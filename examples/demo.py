"""The main job (`make demo`): trace a torchvision ResNet-50, show its channel groups,
reconfigure it with a 50% mask, check the result against the masked model and show what
changed.

    python examples/demo.py [--model resnet50] [--ratio 0.5] [--size 224]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torchvision
from rich.console import Console
from rich.table import Table

import prunefx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50", help="a torchvision classification model")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of each group's channels to remove")
    ap.add_argument("--size", type=int, default=224, help="input resolution")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    console = Console()
    torch.manual_seed(args.seed)

    model = torchvision.models.get_model(args.model, weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)

    t0 = time.perf_counter()
    graph = prunefx.trace(model, x)
    t_trace = time.perf_counter() - t0
    console.print(f"[bold]{args.model}[/]: {len(graph.module.graph.nodes)} graph nodes, {len(graph.groups)} channel groups "
                  f"(traced and analysed in {t_trace:.2f} s)")

    groups = Table(title="Channel groups", title_justify="left")
    for col in ("group", "size", "prunable", "exact", "members", "why pinned / approximate"):
        groups.add_column(col, overflow="fold")
    for g in graph.groups:
        groups.add_row(g.name, str(g.size), "yes" if g.prunable else "[red]no[/]", "yes" if g.exact else "no",
                       str(len(g.members)), g.reason or "")
    console.print(groups)

    mask = prunefx.masks.random(graph, args.ratio, seed=args.seed, exact_only=True)
    t0 = time.perf_counter()
    small = prunefx.reconfigure(model, mask, graph=graph)
    t_reconf = time.perf_counter() - t0

    reference = copy.deepcopy(model)
    prunefx.apply_mask(reference, mask, graph=graph)  # names resolve against `reference`
    with torch.no_grad():
        ref, out = reference(x), small(x)
    diff = float((out - ref).abs().max())
    scale = max(1.0, float(ref.abs().max()))
    ok = diff <= 1e-4 * scale
    console.print(f"reconfigured in {t_reconf:.2f} s; max |small(x) - masked(x)| = {diff:.2e} "
                  f"(tolerance {1e-4 * scale:.1e}): " + ("[green]exact[/]" if ok else "[red]MISMATCH[/]"))

    layers = Table(title="Before / after (convolutions and linear layers)", title_justify="left")
    for col in ("layer", "channels in", "channels out", "params before", "params after"):
        layers.add_column(col, justify="right" if col != "layer" else "left")
    before_mods = dict(model.named_modules())
    for name, m in small.named_modules():
        old = before_mods.get(name)
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and old is not None:
            cin = (old.weight.shape[1] * getattr(old, "groups", 1), m.weight.shape[1] * getattr(m, "groups", 1))
            cout = (old.weight.shape[0], m.weight.shape[0])
            layers.add_row(name, f"{cin[0]} -> {cin[1]}", f"{cout[0]} -> {cout[1]}",
                           f"{sum(p.numel() for p in old.parameters()):,}", f"{sum(p.numel() for p in m.parameters()):,}")
    console.print(layers)

    f0, f1 = prunefx.count_flops(model, x), prunefx.count_flops(small, x)
    p0, p1 = prunefx.count_params(model), prunefx.count_params(small)
    totals = Table(title="Totals", title_justify="left")
    for col in ("", "before", "after", "after / before"):
        totals.add_column(col, justify="right")
    totals.add_row("parameters", f"{p0:,}", f"{p1:,}", f"{p1 / p0:.3f}")
    totals.add_row("FLOPs", f"{f0:,}", f"{f1:,}", f"{f1 / f0:.3f}")
    console.print(totals)
    if not ok:
        raise SystemExit("the reconfigured model does not match the masked model")


if __name__ == "__main__":
    main()
