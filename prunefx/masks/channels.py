"""Per-channel statistics of a channel group: the machinery every criterion shares.

A criterion scores a *whole* channel group, never one layer. For a group G with members
(tensor T_m, dim d_m, index map I_m), the score of channel c is

    score(c) = sum over members m of  sum over i in I_m[c] of  s_m[i]

where ``s_m[i]`` is a per-index statistic of T_m along d_m (e.g. sum |T_m| over every other
dim, for the L1 norm). A channel owns several indices when the analysis repeats it (after a
flatten, or the q/k/v rows of an attention head), so the statistic is summed over all of them.

``channel_sums`` is the one place that walks members and index maps; PruneTrain's
``from_zeros`` and the criteria in ``criteria.py`` / ``saliency.py`` all go through it.

Example::

    >>> import torch, prunefx
    >>> from prunefx.masks.channels import channel_sums, along
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> g = prunefx.trace(net, torch.randn(1, 3, 8, 8))
    >>> l1 = channel_sums(g, lambda t, dim: along(t.abs(), dim))   # {"0": tensor of 8 scores}
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from prunefx.analysis import ChannelGroup, GroupMember
from prunefx.graph import PruneGraph

__all__ = ["ALL_ROLES", "WEIGHT_ROLES", "along", "channel_sums", "flat_index_map", "scatter_to_channels", "tensors_of"]

WEIGHT_ROLES = ("write", "read")  # running statistics ("stat") are not weights
ALL_ROLES = ("write", "read", "stat")

Statistic = Callable[[torch.Tensor, int], torch.Tensor]  # (tensor, dim) -> vector along dim


def along(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of ``t`` over every dim except ``dim``: a vector of length ``t.shape[dim]``."""
    if t.dim() == 0:
        return t.reshape(1)
    others = [d for d in range(t.dim()) if d != dim % t.dim()]
    return t.sum(dim=others) if others else t


def tensors_of(graph: PruneGraph, *, buffers: bool = False) -> dict[str, torch.Tensor]:
    """Parameters (and with ``buffers``, buffers) of the traced model by every qualified name,
    so member names (canonical names) resolve."""
    gm = graph.module
    out = dict(gm.named_parameters(remove_duplicate=False))
    if buffers:
        out.update(gm.named_buffers(remove_duplicate=False))
    return out


def scatter_to_channels(member: GroupMember, per_index: torch.Tensor, size: int) -> torch.Tensor:
    """Sum ``per_index`` (a vector along the member's dim) into the group's ``size`` channels
    through the member's index map."""
    chan, idx = flat_index_map(member)
    out = torch.zeros(size, dtype=per_index.dtype, device=per_index.device)
    if idx.size:
        out.index_add_(0, torch.as_tensor(chan, device=per_index.device), per_index[torch.as_tensor(idx, device=per_index.device)])
    return out


def channel_sums(
    graph: PruneGraph,
    statistic: Statistic,
    *,
    roles: Iterable[str] = WEIGHT_ROLES,
    tensors: Mapping[str, torch.Tensor] | None = None,
    keep_member: Callable[[GroupMember], bool] | None = None,
    groups: Iterable[ChannelGroup] | None = None,
) -> dict[str, torch.Tensor]:
    """``score(c) = sum_m sum_{i in I_m[c]} statistic(T_m, d_m)[i]`` for every prunable group.

    ``tensors`` maps member names to the tensors to measure (default: the model's parameters,
    so buffers such as running statistics are skipped); a member whose name is missing from
    it contributes nothing. ``roles`` and ``keep_member`` select the members. Scores are
    float64 on the CPU. A group none of whose members is measured gets no entry.
    """
    tensors = tensors_of(graph) if tensors is None else tensors
    roles = tuple(roles)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for g in graph.groups if groups is None else groups:
            if not g.prunable:
                continue
            total = None
            for m in g.members:
                t = tensors.get(m.name)
                if t is None or m.role not in roles or (keep_member is not None and not keep_member(m)):
                    continue
                part = scatter_to_channels(m, statistic(t.detach(), m.dim).double(), g.size).cpu()
                total = part if total is None else total + part
            if total is not None:
                out[g.name] = total
    return out


def flat_index_map(member: GroupMember) -> tuple[np.ndarray, np.ndarray]:
    """(channel, index) pairs of a member's index map, flattened: index ``idx[k]`` along
    the member's dim holds the group's channel ``chan[k]``."""
    lens = np.fromiter(map(len, member.index_map), dtype=np.int64, count=len(member.index_map))
    chan = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
    idx = np.fromiter(itertools.chain.from_iterable(member.index_map), dtype=np.int64, count=int(lens.sum()))
    return chan, idx
