"""Data-free criteria: weight magnitude, BatchNorm scale, and the baselines.

Every criterion scores a whole channel group (``channels.channel_sums``) and returns a
keep-mask keyed by group name through ``select`` (scope, normalisation, min_keep, round_to,
protect, exact_only; see ``select.py``).

- ``magnitude(graph, ratio, p=1)``: L1 filter norm, Li et al. 2017, "Pruning Filters for
  Efficient ConvNets", extended to the whole group,  ``s_c = sum_m sum_{w in m[c]} |w|``;
  ``p=2``: group L2 norm (as in DepGraph, Fang et al. 2023),
  ``s_c = sqrt(sum_m sum_{w in m[c]} w^2)``. ``m[c]`` is the slice of member m holding
  channel c (a conv's filter c, the next conv's input column c, BN's gamma_c and beta_c, ...).
- ``bn_scale(graph, ratio)``: Network Slimming, Liu et al. 2017, "Learning Efficient
  Convolutional Networks through Network Slimming": ``s_c = mean_{BN in group} |gamma_c|``.
  Groups without a BatchNorm are not scored (kept whole). Train with
  ``loss + slimming_penalty(model, strength)`` (``strength * sum |gamma|``, the paper's
  lambda = 1e-4 .. 1e-5) so that gammas become sparse. Scores are raw (``normalize=None``
  by default): the paper thresholds all gammas globally.
- ``random(graph, ratio)`` and ``uniform(graph, ratio)``: the baselines of Liu et al. 2019,
  "Rethinking the Value of Network Pruning". ``random`` keeps a random subset of every
  group; ``uniform`` keeps the first ``size - round(ratio * size)`` channels of every group
  (a predefined architecture with the same ratio everywhere, meant for training from
  scratch; for the same ratio with L1-chosen channels use ``magnitude(scope="local")``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from prunefx.analysis import ChannelGroup, GroupMember
from prunefx.graph import PruneGraph
from prunefx.masks.channels import WEIGHT_ROLES, along, channel_sums
from prunefx.masks.select import Mask, Selection, eligible_groups, select

__all__ = [
    "magnitude", "bn_scale", "random", "uniform", "slimming_penalty",
    "magnitude_scores", "bn_scale_scores", "random_scores", "uniform_scores",
]


# ---- scores ---------------------------------------------------------------------------------
def magnitude_scores(graph: PruneGraph, *, p: int = 1, roles: Iterable[str] = WEIGHT_ROLES) -> dict[str, torch.Tensor]:
    """L1 (``p=1``) or L2 (``p=2``) norm of every channel over all its weights in the group."""
    if p == 1:
        return channel_sums(graph, lambda t, d: along(t.abs(), d), roles=roles)
    if p == 2:
        return {k: v.sqrt() for k, v in channel_sums(graph, lambda t, d: along(t.double().square(), d), roles=roles).items()}
    raise ValueError(f"p must be 1 (L1 filter norm) or 2 (group L2 norm), got {p!r}")


def _is_bn_weight(graph: PruneGraph, member: GroupMember) -> bool:
    owner, _, attr = member.name.rpartition(".")
    if attr != "weight":
        return False
    try:
        return isinstance(graph.module.get_submodule(owner), nn.modules.batchnorm._BatchNorm)
    except AttributeError:
        return False


def bn_scale_scores(graph: PruneGraph) -> dict[str, torch.Tensor]:
    """Mean |gamma| of the group's BatchNorms, per channel."""
    sums = channel_sums(graph, lambda t, d: along(t.abs(), d), roles=("write",), keep_member=lambda m: _is_bn_weight(graph, m))
    counts = channel_sums(graph, lambda t, d: along(torch.ones_like(t), d), roles=("write",), keep_member=lambda m: _is_bn_weight(graph, m))
    return {k: sums[k] / counts[k].clamp(min=1) for k in sums}


def random_scores(graph: PruneGraph, *, seed: int = 0, groups: Iterable[ChannelGroup] | None = None) -> dict[str, torch.Tensor]:
    """A random permutation per group (drawn in graph order from ``torch.Generator(seed)``)."""
    gen = torch.Generator().manual_seed(seed)
    groups = [g for g in graph.groups if g.prunable and g.size > 1] if groups is None else groups
    out = {}
    for g in groups:
        order = torch.randperm(g.size, generator=gen)
        s = torch.empty(g.size, dtype=torch.float64)
        s[order] = torch.arange(g.size, 0, -1, dtype=torch.float64)  # order[0] ranks first
        out[g.name] = s
    return out


def uniform_scores(graph: PruneGraph) -> dict[str, torch.Tensor]:
    """The first channels of every group rank first."""
    return {g.name: torch.arange(g.size, 0, -1, dtype=torch.float64) for g in graph.groups if g.prunable}


# ---- criteria --------------------------------------------------------------------------------
def magnitude(
    graph: PruneGraph,
    ratio: float = 0.5,
    *,
    p: int = 1,
    roles: Iterable[str] = WEIGHT_ROLES,
    scope: str = "local",
    normalize: str | None = "mean",
    min_keep: int = 1,
    round_to: int = 1,
    protect: Iterable[str] = (),
    exact_only: bool = False,
) -> Mask:
    """Drop the ``ratio`` of channels with the smallest L1 (``p=1``) / L2 (``p=2``) norm over
    every weight of their group. ``roles=("write",)`` measures only the weights that compute
    the channel (Li et al.'s filter norm, plus bias and BN affine)."""
    return select(graph, magnitude_scores(graph, p=p, roles=roles), ratio, scope=scope, normalize=normalize,
                  min_keep=min_keep, round_to=round_to, protect=protect, exact_only=exact_only)


def bn_scale(
    graph: PruneGraph,
    ratio: float = 0.5,
    *,
    scope: str = "global",
    normalize: str | None = None,
    min_keep: int = 1,
    round_to: int = 1,
    protect: Iterable[str] = (),
    exact_only: bool = False,
) -> Mask:
    """Network Slimming: drop the channels with the smallest |gamma| (one global threshold
    over raw gammas by default, as in the paper). Groups without BatchNorm are kept."""
    return select(graph, bn_scale_scores(graph), ratio, scope=scope, normalize=normalize,
                  min_keep=min_keep, round_to=round_to, protect=protect, exact_only=exact_only)


def random(
    graph: PruneGraph,
    ratio: float = 0.5,
    *,
    seed: int = 0,
    exact_only: bool = False,
    min_keep: int = 1,
    protect: Iterable[str] = (),
    scope: str = "local",
    round_to: int = 1,
) -> Mask:
    """Drop a random ``ratio`` of the channels of every eligible group (deterministic for a
    given ``seed``)."""
    selection = Selection(scope, "mean", min_keep, round_to, protect, exact_only)  # type: ignore[arg-type]
    scores = random_scores(graph, seed=seed, groups=eligible_groups(graph, selection))
    return select(graph, scores, ratio, scope=scope, min_keep=min_keep, round_to=round_to, protect=protect, exact_only=exact_only)


def uniform(
    graph: PruneGraph,
    ratio: float = 0.5,
    *,
    min_keep: int = 1,
    round_to: int = 1,
    protect: Iterable[str] = (),
    exact_only: bool = False,
) -> Mask:
    """Every eligible group keeps its first ``size - round(ratio * size)`` channels."""
    return select(graph, uniform_scores(graph), ratio, scope="local", min_keep=min_keep, round_to=round_to,
                  protect=protect, exact_only=exact_only)


def slimming_penalty(model: nn.Module, strength: float = 1e-4, *, graph: PruneGraph | None = None) -> torch.Tensor:
    """Network Slimming's sparsity term ``strength * sum |gamma|`` over the BatchNorm scales
    (those in prunable groups of ``graph`` when given, else every BatchNorm of ``model``);
    add it to the training loss."""
    if graph is not None:
        names = {m.name for g in graph.groups if g.prunable for m in g.members if _is_bn_weight(graph, m)}
        params = dict(model.named_parameters(remove_duplicate=False))
        gammas = [params[n] for n in sorted(names) if n in params]
    else:
        gammas = [m.weight for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    if not gammas:
        return torch.zeros(())
    return strength * sum(g.abs().sum() for g in gammas)
