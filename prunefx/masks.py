"""Mask sources. A mask maps group names to bool vectors (True = keep).

Baselines from "Rethinking the Value of Network Pruning" (Liu et al. 2019):

- ``random(graph, ratio)``: each prunable group keeps a random subset of
  ``size - round(ratio * size)`` channels (at least ``min_keep``).

Only prunable groups are masked; ``exact_only=True`` restricts to groups whose removal is
exact, so the pruned model equals the masked model.
"""

from __future__ import annotations

import torch

from prunefx.graph import PruneGraph

__all__ = ["random"]


def _eligible(graph: PruneGraph, exact_only: bool, protect: tuple[str, ...]):
    for g in graph.groups:
        if g.prunable and (g.exact or not exact_only) and g.name not in protect and g.size > 1:
            yield g


def random(
    graph: PruneGraph,
    ratio: float = 0.5,
    *,
    seed: int = 0,
    exact_only: bool = False,
    min_keep: int = 1,
    protect: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Drop a random ``ratio`` of the channels of every prunable group."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    gen = torch.Generator().manual_seed(seed)
    mask = {}
    for g in _eligible(graph, exact_only, protect):
        keep = max(min_keep, g.size - round(ratio * g.size))
        order = torch.randperm(g.size, generator=gen)
        m = torch.zeros(g.size, dtype=torch.bool)
        m[order[:keep]] = True
        mask[g.name] = m
    return mask
