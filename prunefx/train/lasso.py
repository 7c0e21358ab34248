"""Group lasso over channel groups: the regulariser of PruneTrain (Lym et al., SC'19).

Every channel c of every prunable group G is one lasso group: the slices of *all* the
weights that write or read it, wherever they are in the network (a conv's filter c, its
BatchNorm's gamma_c and beta_c, its bias_c, the next conv's input column c, and, for a
residual stream, those of every block writing to or reading from the stream):

    R(W) = sum_G sum_{c in G} sqrt( sum_{m in G} sum_{i in I_m[c]} ||W_m[i]||^2 + 1e-8 )

so a residual-stream channel is penalised as one group and can only go to zero as a whole,
which is exactly when ``prunefx.masks.from_zeros`` can remove it. (The published PruneTrain
code penalises each conv's input and output channels as separate groups and leaves
BatchNorm out; then a conv's filter can reach zero while the stream channel it writes stays
alive through the other blocks, and the BatchNorm shift keeps a constant alive. Penalising
the real groups, BatchNorm included, removes both problems.) The 1e-8 keeps the gradient
finite at zero.

The coefficient is set once, at the first call, so that the penalty is a fraction ``ratio``
(the paper's r, 0.2 by default) of the total loss, then frozen:

    lambda * R0 / (L0 + lambda * R0) = r   =>   lambda = r * L0 / ((1 - r) * R0)

Example::

    >>> lasso = prunefx.train.GroupLasso(model, example_inputs=x)
    >>> loss = F.cross_entropy(model(x), y)
    >>> (loss + lasso(loss)).backward()       # lasso(loss) = lambda * R(W)
    >>> lasso = lasso.rebind(small)           # after a reconfiguration: same lambda, new groups

``weighting="size"`` weighs each lasso group by the square root of its number of weights
(Yuan and Lin 2006, "Model selection and estimation in regression with grouped variables"):

    R(W) = sum_G sum_{c in G} sqrt(n_c) * sqrt( sum ... ||W_m[i]||^2 + 1e-8 )

The default (``"uniform"``, PruneTrain's) penalises every channel alike, which suits a CNN's
channels. In a transformer, a head slot holds about ``4 * hidden * head_dim`` weights
against an MLP channel's ``3 * hidden``, so its norm is that much larger and uniform weights
take that much longer to zero it: ``"size"`` makes the time to zero of a channel the task
does not need independent of its size, so heads and MLP channels go at the same pace.

``prox_(lr * lambda)`` is the proximal alternative to the penalty's gradient: after each
optimizer step, every lasso group shrinks by ``lr * lambda`` in norm and stops at exactly
zero. The subgradient pulls with the same strength but overshoots zero, so channels
oscillate at a distance of about ``lr * lambda`` and only fall under ``from_zeros``'s
threshold when that distance is small (PruneTrain's 180 epochs at a small lambda); with the
proximal step a channel the task does not need is exactly zero after about
``||w|| / (lr * lambda)`` steps.

Under FSDP2 (``fully_shard``) the parameters are ``DTensor``s sharded on dim 0: each rank
sums the squares of its own rows, one all-reduce over the mesh adds them up, and ``prox_``
scales each rank's rows in place. That path carries no gradient, so a sharded model uses
``prox_`` (``PruneTrain(mode="proximal")``), not the penalty's gradient.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from prunefx.analysis import ChannelGroup
from prunefx.errors import PruneFxError
from prunefx.graph import PruneGraph, trace
from prunefx.masks.channels import flat_index_map

__all__ = ["GroupLasso"]

EPS = 1e-8


@dataclass(frozen=True, eq=False)
class _Term:
    """One member: ``||W[i]||^2`` along ``dim`` lands in lasso groups ``slot[i]`` (a repeated
    channel owns several indices; an index holding no channel of the groups is dropped)."""

    param: nn.Parameter
    dim: int
    index: torch.Tensor | None  # indices along dim that hold a channel (None: all of them)
    slot: torch.Tensor  # lasso-group number of each kept index


class GroupLasso:
    """``lasso(loss)`` returns ``lambda * R(W)`` (see the module docstring); ``penalty()``
    returns ``R(W)`` alone. ``ratio`` is r; pass ``lam`` to fix lambda yourself.
    ``exact_only`` (default) leaves approximate groups (LayerNorm over channels) out, as
    ``from_zeros`` does. Parameters are looked up on ``model``, so the penalty's gradient
    flows to the model being trained. ``example_kwargs``: keyword inputs of ``forward`` for the
    trace (``{"use_cache": False}`` for a transformers model: the export front-end captures it).
    ``weighting``: ``"uniform"`` (every channel alike) or ``"size"`` (sqrt of the number of
    weights a channel holds; heads and MLP channels of a transformer at the same pace).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any = None,
        *,
        graph: PruneGraph | None = None,
        ratio: float = 0.2,
        lam: float | None = None,
        exact_only: bool = True,
        groups: Iterable[str] | None = None,
        example_kwargs: dict[str, Any] | None = None,
        weighting: str = "uniform",
    ) -> None:
        if weighting not in ("uniform", "size"):
            raise ValueError(f'weighting is "uniform" or "size" (sqrt of the number of weights of a channel), got {weighting!r}')
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"ratio is the penalty's share of the total loss at the first step, in (0, 1); got {ratio}")
        self.ratio = ratio
        self.lam = lam
        self.exact_only = exact_only
        self.only = None if groups is None else tuple(groups)
        self.example_inputs = example_inputs
        self.example_kwargs = example_kwargs
        self.weighting = weighting
        kw = {"example_kwargs": example_kwargs} if example_kwargs else {}
        graph = trace(model, example_inputs, **kw) if graph is None else graph
        chosen = [g for g in graph.groups if g.prunable and (g.exact or not exact_only)]
        if self.only is not None:
            chosen = [g for g in chosen if g.name in self.only]
        self.groups: tuple[ChannelGroup, ...] = tuple(chosen)
        self.num_channels = sum(g.size for g in chosen)
        self._terms = _terms(model, chosen)
        self._weights = _sizes(self._terms, self.num_channels).sqrt() if weighting == "size" else None

    def rebind(self, model: nn.Module, example_inputs: Any = None, *, graph: PruneGraph | None = None,
               example_kwargs: dict[str, Any] | None = None) -> GroupLasso:
        """The same regulariser (same lambda, ratio and options) on a reconfigured model."""
        x = self.example_inputs if example_inputs is None else example_inputs
        kwargs = self.example_kwargs if example_kwargs is None else example_kwargs
        return GroupLasso(model, x, graph=graph, ratio=self.ratio, lam=self.lam, exact_only=self.exact_only, groups=self.only,
                          example_kwargs=kwargs, weighting=self.weighting)

    def _squares(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Sum of squares of each lasso group (one entry per channel of ``self.groups``, in
        order), differentiable when grad mode is on."""
        sq = torch.zeros(self.num_channels, dtype=dtype, device=self._terms[0].param.device)
        sharded: torch.Tensor | None = None
        for t in self._terms:
            if _is_sharded(t.param):
                if torch.is_grad_enabled() and t.param.requires_grad:
                    raise PruneFxError("GroupLasso: the penalty of sharded (FSDP2) parameters carries no gradient; use prox_() "
                                       "after optimizer.step() (PruneTrain(mode='proximal')) instead of adding it to the loss")
                sharded = torch.zeros_like(sq) if sharded is None else sharded
                sharded = sharded.index_add(0, t.slot, _local_squares(t, dtype).to(sq.device))
                continue
            per_index = _sum_of_squares(t.param, t.dim, dtype)
            if t.index is not None:
                per_index = per_index.index_select(0, t.index)
            sq = sq.index_add(0, t.slot, per_index.to(sq.device))
        if sharded is not None:  # each rank summed its own rows
            _all_reduce_over_mesh(sharded, self._terms)
            sq = sq + sharded
        return sq

    def penalty(self) -> torch.Tensor:
        """R(W), differentiable. 0 when no group is penalised."""
        if not self._terms:
            return torch.zeros(())
        norms = (self._squares() + EPS).sqrt()
        return norms.sum() if self._weights is None else (norms * self._weights.to(norms.device)).sum()

    @torch.no_grad()
    def prox_(self, step: float) -> int:
        """Proximal step of the group lasso, in place: every lasso group shrinks towards zero
        by ``step`` in L2 norm and stops *at* zero,

            w_g <- w_g * max(0, 1 - s_g / ||w_g||),     s_g = step (times sqrt(n_g) with weighting="size"),
                                                         step = lr * lambda (per optimizer step)

        so channels reach exact zeros instead of oscillating around them as the subgradient
        of ``R`` makes them do (its pull has the same size, ``lr * lambda``, at any distance
        from zero). Call it right after ``optimizer.step()`` instead of adding the penalty
        to the loss (``PruneTrain(mode="proximal")`` does). Returns the number of lasso
        groups that are exactly zero afterwards.
        """
        if self.lam is None:
            raise RuntimeError("lambda is not set yet: call lasso(loss) once (it sets lambda from the first loss) or pass lam=")
        if not self._terms:
            return 0
        norm = self._squares().sqrt()
        steps = step if self._weights is None else step * self._weights.to(norm.device)
        scale = torch.where(norm > steps, 1.0 - steps / norm.clamp_min(1e-30), torch.zeros_like(norm))
        for t in self._terms:
            per_index = scale.index_select(0, t.slot).to(t.param.device, t.param.dtype)
            if t.index is not None:  # indices holding no channel of these groups are not scaled
                full = torch.ones(t.param.shape[t.dim], dtype=t.param.dtype, device=t.param.device)
                per_index = full.index_copy(0, t.index, per_index)
            target: torch.Tensor = t.param
            if _is_sharded(target):  # this rank's rows; along the sharded dim, their scales
                target, start = _local_rows(target)
                if t.dim == 0:
                    per_index = per_index[start : start + target.shape[0]]
            shape = [1] * target.dim()
            if shape:
                shape[t.dim] = -1
            target.mul_(per_index.view(shape) if shape else per_index.reshape(()))
        return int((scale == 0).sum())

    def channel_norms(self) -> dict[str, torch.Tensor]:
        """sqrt of each lasso group's sum of squares, per channel group (no gradient)."""
        if not self._terms:
            return {}
        with torch.no_grad():
            norms = self._squares(torch.float64).cpu().sqrt()
        return dict(zip((g.name for g in self.groups), norms.split([g.size for g in self.groups]), strict=True))

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        """``lambda * R(W)``; at the first call lambda is set from ``loss`` (L0) and R0."""
        r = self.penalty()
        if self.lam is None:
            l0, r0 = float(loss.detach()), float(r.detach())
            if not np.isfinite(l0) or l0 <= 0:
                raise ValueError(f"the first loss must be finite and positive to set lambda = r*L0/((1-r)*R0), got {l0}")
            self.lam = 0.0 if r0 == 0.0 else self.ratio * l0 / ((1.0 - self.ratio) * r0)
        return self.lam * r

    def __repr__(self) -> str:
        lam = "unset (first call)" if self.lam is None else f"{self.lam:.3g}"
        return f"GroupLasso({len(self.groups)} groups, {self.num_channels} channels, lambda={lam}, ratio={self.ratio})"


def _sum_of_squares(p: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``sum of p**2`` over every dim but ``dim``, in one pass (no squared copy of ``p``)."""
    if p.dim() <= 1:
        return p.to(dtype).square().reshape(-1)
    others = [d for d in range(p.dim()) if d != dim]
    return torch.linalg.vector_norm(p, dim=others, dtype=dtype).square()


def _is_sharded(p: torch.Tensor) -> bool:
    return type(p).__name__ == "DTensor" and hasattr(p, "device_mesh")  # without importing torch.distributed.tensor


def _local_rows(p: Any) -> tuple[torch.Tensor, int]:
    """(this rank's shard of the dim-0-sharded DTensor ``p``, the global index of its first row)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return p.to_local(), int(offset[0]) if offset else 0


def _local_squares(t: _Term, dtype: torch.dtype) -> torch.Tensor:
    """This rank's part of ``t``'s per-index sums of squares, as a vector over the lasso
    groups' order of ``t.slot`` (rows held by other ranks count 0)."""
    local, start = _local_rows(t.param)
    part = _sum_of_squares(local, t.dim, dtype)
    if t.dim == 0:
        full = torch.zeros(t.param.shape[0], dtype=dtype, device=part.device)
        part = full.index_copy(0, torch.arange(start, start + local.shape[0], device=part.device), part)
    return part if t.index is None else part.index_select(0, t.index.to(part.device))


def _all_reduce_over_mesh(x: torch.Tensor, terms: list[_Term]) -> None:
    mesh = next(getattr(t.param, "device_mesh") for t in terms if _is_sharded(t.param))  # noqa: B009 (a DTensor's)
    torch.distributed.all_reduce(x, group=mesh.get_group(0))


def _sizes(terms: list[_Term], n: int) -> torch.Tensor:
    """Number of weights of each lasso group (float64, on the CPU)."""
    out = torch.zeros(n, dtype=torch.float64)
    for t in terms:
        row = t.param.numel() // max(1, t.param.shape[t.dim])
        out.index_add_(0, t.slot.cpu(), torch.full((t.slot.numel(),), float(row), dtype=torch.float64))
    return out


def _terms(model: nn.Module, groups: list[ChannelGroup]) -> list[_Term]:
    params = dict(model.named_parameters(remove_duplicate=False))
    terms: list[_Term] = []
    start = 0
    for g in groups:
        for m in g.members:
            p = params.get(m.name)
            if p is None or m.role not in ("write", "read"):  # a buffer (running statistics)
                continue
            chan, idx = flat_index_map(m)
            order = np.argsort(idx, kind="stable")
            idx, chan = idx[order], chan[order]
            full = idx.size == p.shape[m.dim] and bool((idx == np.arange(idx.size)).all())
            terms.append(_Term(
                param=p,
                dim=m.dim,
                index=None if full else torch.as_tensor(idx, device=p.device),
                slot=torch.as_tensor(chan + start, device=p.device),
            ))
        start += g.size
    return terms
