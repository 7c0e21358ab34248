"""``from_zeros``: the mask of the channels that group-lasso training drove to zero (PruneTrain).

A channel c of a group is *dead* when

    max |w| over every weight that writes c  <  threshold      (output side), or
    max |w| over every weight that reads c   <  threshold      (input side),

where "writes" means the multiplicative weights of the group's write members (a conv's
filter c, a Linear's row c, a BatchNorm's gamma_c, a layer scale: all of them, so a channel
whose conv filter is zero but whose BatchNorm gamma is not stays alive; group-lasso training
drives them to zero together) and "reads" the read members (the next conv's input column c,
the next Linear's column c). Biases and BatchNorm
shifts are left out of the output side on purpose: a channel whose weights are zero but
whose shift is not emits a constant, and ``prunefx.train`` folds that constant into the
consumers' biases before removing the channel (``prunefx/train/fold.py``).

Both sides compare magnitudes. (The published PruneTrain code compared signed values, so a
negative weight counted as "below the threshold" and a large negative one kept nothing
alive, and it never zeroed anything.) Every member of a group spans the same channels, so a
channel of a residual stream is dead only when every conv writing the stream has zeroed it
(or every conv reading it has): coupled channels are combined by the union rule, as
``reconfigure(policy="union")`` does.

Example::

    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> with torch.no_grad(): net[0].weight[2:5] = 0
    >>> mask = prunefx.masks.from_zeros(net, example_inputs=torch.randn(1, 3, 8, 8))
    >>> mask["0"].nonzero().flatten().tolist()     # channels 2, 3, 4 are dead
    [0, 1, 5, 6, 7]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunefx.analysis import GroupMember
from prunefx.graph import PruneGraph, trace
from prunefx.masks.channels import along, channel_sums

__all__ = ["from_zeros", "is_additive"]


def is_additive(member: GroupMember) -> bool:
    """A bias or shift (``*.bias``, ``*.in_proj_bias``, BatchNorm's beta, a removed branch's
    ``BranchConstant`` values): it adds to a channel instead of scaling it, so zeroing the
    weights leaves a constant behind."""
    attr = member.name.rpartition(".")[2]
    return attr.endswith("bias") or attr in ("eval_value", "train_value")


def from_zeros(
    model_or_graph: nn.Module | PruneGraph,
    threshold: float = 1e-4,
    *,
    example_inputs: Any = None,
    exact_only: bool = True,
) -> dict[str, torch.Tensor]:
    """Keep-mask (True = keep) of every prunable group that has a dead channel.

    ``exact_only`` (default) leaves approximate groups alone: a zero channel still moves the
    mean and variance of a LayerNorm over channels, so removing it would change the model.
    A group whose channels are all dead gets an all-False vector; ``reconfigure`` refuses
    such a mask, ``prunefx.train.shrink`` removes the starved branch instead.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    graph = model_or_graph if isinstance(model_or_graph, PruneGraph) else trace(model_or_graph, example_inputs)
    groups = [g for g in graph.groups if g.prunable and (g.exact or not exact_only)]

    def alive(t: torch.Tensor, dim: int) -> torch.Tensor:  # entries at or above the threshold, per index
        return along((t.abs() >= threshold).to(torch.float32), dim)

    def weight(m: GroupMember) -> bool:
        return not is_additive(m)

    def count(t: torch.Tensor, dim: int) -> torch.Tensor:  # indices per channel: who can vouch for it
        return torch.ones(t.shape[dim] if t.dim() else 1)

    sides = [dict(roles=("write",), keep_member=weight), dict(roles=("read",))]
    mask: dict[str, torch.Tensor] = {}
    measured = [(channel_sums(graph, alive, groups=groups, **kw), channel_sums(graph, count, groups=groups, **kw)) for kw in sides]
    for g in groups:
        dead = torch.zeros(g.size, dtype=torch.bool)
        for live, covered in measured:
            if g.name in live:  # a channel no member of this side holds is not dead by it
                dead |= (live[g.name] == 0) & (covered[g.name] > 0)
        if dead.any():
            mask[g.name] = ~dead
    return mask
