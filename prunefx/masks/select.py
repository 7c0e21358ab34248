"""From per-channel scores to a keep-mask: scope, normalisation, min_keep, round_to, protect.

Given a score per channel of every group (higher = more important), a mask keeps

- ``scope="local"``: in every group, the ``n_g = size_g - round(ratio * size_g)`` channels
  with the highest scores (the same ratio in every group);
- ``scope="global"``: one ranking over all groups. Scores are first normalised per group,
  ``s'_c = s_c / mean_{c' in g} s_{c'}`` (``normalize="mean"``; or ``"max"``; or ``None``
  for raw scores), so a group with many members, or weights of a larger scale, does not win
  by construction; then the ``round(ratio * N)`` lowest-ranked channels of all N eligible
  channels are dropped. Ties drop earlier groups and earlier channels first.

Then every group's keep count is adjusted: rounded to the nearest multiple of ``round_to``
(GPU tensor cores want multiples of 8; a group that keeps everything stays whole, a group
smaller than ``round_to`` is not pruned), and raised to ``min_keep``. Within a group the
channels kept are always the highest-scored ones.

Only groups that are prunable, of size > 1, scored, not ``protect``-ed (group or module
names) and, with ``exact_only=True``, exact, are *eligible*; the mask has one entry per
eligible group and none for the others (they are kept whole).

``Ranking`` holds the sorted scores so that ``to_budget`` can evaluate many global
thresholds (or local ratios) cheaply.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from prunefx.analysis import ChannelGroup
from prunefx.errors import MaskError
from prunefx.graph import PruneGraph

__all__ = ["Mask", "Selection", "Ranking", "select", "eligible_groups", "SelectionError"]


class SelectionError(MaskError, ValueError):
    """A bad selection option (ratio, scope, ...): a MaskError, and a ValueError as it was
    before, so that ``except ValueError`` in existing code still catches it."""

Mask = dict[str, torch.Tensor]

_NORMALIZE = ("mean", "max", None)


@dataclass(frozen=True)
class Selection:
    """How scores become a mask. Every criterion takes these as keyword arguments."""

    scope: str = "local"
    normalize: str | None = "mean"
    min_keep: int = 1
    round_to: int = 1
    protect: tuple[str, ...] = ()
    exact_only: bool = False

    def __post_init__(self) -> None:
        if self.scope not in ("local", "global"):
            raise SelectionError(f"scope must be 'local' or 'global', got {self.scope!r}")
        if self.normalize not in _NORMALIZE:
            raise SelectionError(f"normalize must be one of {_NORMALIZE}, got {self.normalize!r}")
        for name in ("min_keep", "round_to"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise SelectionError(f"{name} must be an integer >= 1, got {value!r}")
        if self.min_keep < 1:
            raise SelectionError(f"min_keep must be >= 1, got {self.min_keep}")
        if self.round_to < 1:
            raise SelectionError(f"round_to must be >= 1, got {self.round_to}")
        if isinstance(self.protect, str):
            object.__setattr__(self, "protect", (self.protect,))
        else:
            object.__setattr__(self, "protect", tuple(self.protect))


def eligible_groups(graph: PruneGraph, selection: Selection, scored: Iterable[str] | None = None) -> list[ChannelGroup]:
    """Groups a mask may prune, in graph order."""
    protected = _protected(graph, selection.protect)
    scored = None if scored is None else set(scored)
    return [
        g for g in graph.groups
        if g.prunable and g.size > 1 and (g.exact or not selection.exact_only)
        and g.name not in protected and (scored is None or g.name in scored)
    ]


def _protected(graph: PruneGraph, names: tuple[str, ...]) -> set[str]:
    out: set[str] = set()
    for name in names:
        if name in graph._table.by_name:
            out.add(name)
        else:  # a module: every group holding its output channels (MaskError if unknown)
            out.update(g.name for g in graph.groups_of(name))
    return out


def _check_ratio(ratio: float) -> float:
    """The fraction of channels to drop: a real number in [0, 1) (NaN, inf, 1.0 and
    non-numbers are misuse, named in one line)."""
    try:
        value = float(ratio) if not isinstance(ratio, (str, bytes, bool)) else math.nan  # a 0-d tensor is fine
    except (TypeError, ValueError, RuntimeError):
        value = math.nan
    if not 0.0 <= value < 1.0:
        raise SelectionError(f"ratio must be a number in [0, 1) (the fraction of channels to drop), got {ratio!r}")
    return value


def _score_array(group: ChannelGroup, s: object) -> np.ndarray:
    """Scores as float64 on the CPU; a tensor without data (meta), a sparse or complex one,
    or anything that is not numbers is a MaskError naming the group."""
    what = f"scores for group '{group.name}'"
    if isinstance(s, torch.Tensor):
        if s.is_meta or s.layout != torch.strided or s.is_complex():
            kind = "on the meta device (no values)" if s.is_meta else "complex" if s.is_complex() else f"a {s.layout} tensor"
            raise MaskError(f"{what} are {kind}; pass a dense real tensor of shape ({group.size},)")
        return s.detach().cpu().double().numpy()
    try:
        return np.asarray(s, dtype=np.float64)
    except (TypeError, ValueError):
        raise MaskError(f"{what} are a {type(s).__name__}; pass a float tensor of shape ({group.size},)") from None


@dataclass(frozen=True, eq=False)
class Ranking:
    """Eligible groups with their scores, sorted once; turns keep counts into masks."""

    groups: tuple[ChannelGroup, ...]
    scores: tuple[np.ndarray, ...]  # raw scores per group (float64)
    selection: Selection

    @classmethod
    def build(cls, graph: PruneGraph, scores: Mapping[str, torch.Tensor], selection: Selection) -> Ranking:
        for name in scores:
            graph.group(name)  # MaskError naming the closest groups if it is not one
        groups = eligible_groups(graph, selection, scored=scores)
        arrays = []
        for g in groups:
            s = _score_array(g, scores[g.name])
            if s.shape != (g.size,):
                raise MaskError(f"scores for group '{g.name}' have shape {s.shape}; the group has {g.size} channels")
            if not np.isfinite(s).all():
                raise MaskError(f"scores for group '{g.name}' are not all finite (NaN or inf): check the criterion's inputs")
            arrays.append(s)
        return cls(tuple(groups), tuple(arrays), selection)

    @cached_property
    def sizes(self) -> np.ndarray:
        return np.array([g.size for g in self.groups], dtype=np.int64)

    @property
    def total(self) -> int:
        return int(self.sizes.sum())

    @cached_property
    def _order(self) -> tuple[np.ndarray, ...]:
        """Per group: channel indices from most to least important (ties: lower index first)."""
        return tuple(np.argsort(-s, kind="stable") for s in self.scores)

    @cached_property
    def _global_group_of(self) -> np.ndarray:
        """Group index of every eligible channel, in the order the global ranking drops them."""
        normed = [_normalize(s, self.selection.normalize) for s in self.scores]
        if not normed:
            return np.zeros(0, dtype=np.int64)
        allscores = np.concatenate(normed)
        owner = np.repeat(np.arange(len(normed)), [len(s) for s in normed])
        return owner[np.argsort(allscores, kind="stable")]

    # ---- keep counts ---------------------------------------------------------------
    def counts_local(self, ratio: float) -> np.ndarray:
        """Keep counts when every group drops ``ratio`` of its channels."""
        n = np.array([g.size - round(ratio * g.size) for g in self.groups], dtype=np.int64)
        return self._adjust(n)

    def counts_global(self, drop: int) -> np.ndarray:
        """Keep counts when the ``drop`` lowest-ranked channels of the global ranking go."""
        dropped = np.bincount(self._global_group_of[:drop], minlength=len(self.groups))
        return self._adjust(self.sizes - dropped)

    def counts(self, ratio: float) -> np.ndarray:
        ratio = _check_ratio(ratio)
        if self.selection.scope == "local":
            return self.counts_local(ratio)
        return self.counts_global(round(ratio * self.total))

    def _adjust(self, n: np.ndarray) -> np.ndarray:
        sizes = self.sizes
        r = self.selection.round_to
        if r > 1:
            rounded = np.maximum(r * np.floor(n / r + 0.5).astype(np.int64), r)
            n = np.where(n >= sizes, sizes, np.minimum(rounded, sizes))
        return np.clip(n, np.minimum(self.selection.min_keep, sizes), sizes)

    # ---- masks ------------------------------------------------------------------------
    def keep_arrays(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for g, order, n in zip(self.groups, self._order, counts.tolist(), strict=True):
            keep = np.zeros(g.size, dtype=bool)
            keep[order[:n]] = True
            out[g.name] = keep
        return out

    def mask(self, counts: np.ndarray) -> Mask:
        return {name: torch.from_numpy(k) for name, k in self.keep_arrays(counts).items()}


def _normalize(s: np.ndarray, how: str | None) -> np.ndarray:
    # scores are expected >= 0 (every built-in criterion's are); a group whose mean/max is
    # <= 0 gets all-zero normalised scores, i.e. it is pruned first
    if how is None:
        return s
    scale = s.mean() if how == "mean" else np.abs(s).max()
    return s / scale if scale > 0 else np.zeros_like(s)


def select(
    graph: PruneGraph,
    scores: Mapping[str, torch.Tensor],
    ratio: float = 0.5,
    *,
    scope: str = "local",
    normalize: str | None = "mean",
    min_keep: int = 1,
    round_to: int = 1,
    protect: Iterable[str] = (),
    exact_only: bool = False,
) -> Mask:
    """Keep-mask from per-channel ``scores`` (group name -> float vector, higher = keep)."""
    selection = Selection(scope, normalize, min_keep, round_to, protect, exact_only)  # type: ignore[arg-type]
    ratio = _check_ratio(ratio)
    ranking = Ranking.build(graph, scores, selection)
    return ranking.mask(ranking.counts(ratio))
