"""When to prune, and how much: gradual (cubic) schedules, AC/DC, EarlyCroP's trigger.

- ``cubic_sparsity`` / ``Cubic``: Zhu & Gupta 2017, "To prune, or not to prune: exploring the
  efficacy of pruning for model compression". The fraction of channels removed at step t is

      s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / T)^3,   t_0 <= t <= t_0 + T

  (with ``s_i = 0, t_0 = 0``: ``s_t = s_f * (1 - (1 - t/T)^3)``): fast at first, slowly
  towards the end. Applied to an already reconfigured model, step t removes
  ``r_t = 1 - (1 - s_t) / (1 - s_{t-dt})`` of what is left (``Cubic.step_ratio``), so the
  cumulative fraction follows ``s_t``.
- ``ACDC`` / ``SoftMasking``: Peste et al. 2021, "AC/DC: Alternating Compressed/DeCompressed
  Training of Deep Neural Networks". A dense warm-up, then sparse and dense phases of equal
  length alternate (sparse first), and a longer sparse phase ends training. ``SoftMasking``
  runs it in soft-mask mode: at the start of each sparse phase a fresh mask is computed from
  the current weights and applied with ``prunefx.apply_mask`` (zeroing); after every optimizer
  step of a sparse phase it is applied again so masked channels stay zero; dense phases
  train everything. Only ``finish()`` reconfigures, once, into the smaller model.
- ``WeightDistancePlateau``: EarlyCroP's trigger (Rachwan et al. 2022, "Winning the Lottery
  Ahead of Time: Efficient Early Network Pruning"). With the relative distance of the
  weights from their initial values ``d_t = ||theta_t - theta_0|| / ||theta_0||``, prune at
  the first check where its relative growth ``(d_t - d_{t-1}) / d_{t-1}`` falls below
  ``epsilon``: the weights have left the chaotic early phase and settled in a basin.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunefx.graph import PruneGraph
from prunefx.masks.select import Mask
from prunefx.reconfigure import apply_mask, reconfigure

__all__ = ["cubic_sparsity", "Cubic", "ACDC", "SoftMasking", "WeightDistancePlateau"]


def cubic_sparsity(t: float, total: float, final: float, *, initial: float = 0.0, start: float = 0.0) -> float:
    """``s_t = s_f + (s_i - s_f) (1 - (t - t_0)/T)^3`` with t clamped to ``[t_0, t_0 + T]``."""
    if total <= 0:
        raise ValueError(f"total (T, the length of the ramp) must be > 0, got {total}")
    if not (0.0 <= initial <= final < 1.0):
        raise ValueError(f"need 0 <= initial <= final < 1, got initial={initial}, final={final}")
    progress = min(max((t - start) / total, 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class Cubic:
    """A gradual pruning schedule: prune every ``every`` steps from ``start`` to
    ``start + total``, reaching ``final`` at the end.

    Iterative reconfiguration::

        schedule = Cubic(final=0.5, total=30, every=3)
        for step in range(100):
            train_one_step(model)
            if schedule.prunes_at(step):
                graph = prunefx.trace(model, x)
                mask = prunefx.masks.magnitude(graph, schedule.step_ratio(step))
                model = prunefx.reconfigure(model, mask, graph=graph, optimizer=opt)

    With soft masks on the unpruned model (``apply_mask``), use ``schedule.sparsity(step)``.
    """

    final: float
    total: int
    initial: float = 0.0
    start: int = 0
    every: int = 1

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        cubic_sparsity(self.start, self.total, self.final, initial=self.initial, start=self.start)  # validates

    def sparsity(self, t: float) -> float:
        """Cumulative fraction of channels removed at step t."""
        return cubic_sparsity(t, self.total, self.final, initial=self.initial, start=self.start)

    def prunes_at(self, t: int) -> bool:
        return self.start <= t <= self.start + self.total and (t - self.start) % self.every == 0

    def step_ratio(self, t: int) -> float:
        """Fraction of the *remaining* channels to remove at pruning step t, so that a model
        reconfigured at every pruning step has removed ``sparsity(t)`` in total."""
        before = 0.0 if t <= self.start else self.sparsity(t - self.every)
        return 1.0 - (1.0 - self.sparsity(t)) / (1.0 - before)


@dataclass(frozen=True)
class ACDC:
    """AC/DC's phases over ``epochs``: dense ``warmup`` (default 10%), then alternating
    sparse/dense phases of ``phase`` epochs (default 5%), sparse first, then a sparse
    ``finetune`` (default 10%) to the end. The paper's ImageNet schedule is
    ``ACDC(100, warmup=10, phase=5, finetune=10)``."""

    epochs: int
    warmup: int | None = None
    phase: int | None = None
    finetune: int | None = None

    def __post_init__(self) -> None:
        defaults = {"warmup": round(0.1 * self.epochs), "phase": max(1, round(0.05 * self.epochs)),
                    "finetune": max(1, round(0.1 * self.epochs))}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.phase < 1 or self.warmup < 0 or self.finetune < 1 or self.warmup + self.finetune > self.epochs:  # type: ignore[operator]
            raise ValueError(f"{self}: need phase >= 1, finetune >= 1 and warmup + finetune <= epochs")

    def sparse(self, epoch: int) -> bool:
        """Whether ``epoch`` is in a sparse (compressed) phase."""
        warmup, phase, finetune = int(self.warmup), int(self.phase), int(self.finetune)  # type: ignore[arg-type]
        if epoch < warmup:
            return False
        if epoch >= self.epochs - finetune:
            return True
        return ((epoch - warmup) // phase) % 2 == 0

    def starts_sparse_phase(self, epoch: int) -> bool:
        return self.sparse(epoch) and (epoch == 0 or not self.sparse(epoch - 1))


class SoftMasking:
    """Drives an AC/DC run in soft-mask mode on ``model`` (traced as ``graph``).

    ``criterion`` is a criterion function or name (``prunefx.masks.to_budget``'s table);
    give ``ratio=`` (channels) or ``flops=`` / ``params=`` (a cost target). Call
    ``epoch(e)`` at the start of every epoch, ``step()`` after every ``optimizer.step()``,
    and ``finish()`` at the end for the reconfigured model::

        acdc = SoftMasking(model, graph, ACDC(epochs), ratio=0.5)
        for e in range(epochs):
            acdc.epoch(e)
            for x, y in data:
                opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
                acdc.step()
        small = acdc.finish(optimizer=opt)
    """

    def __init__(
        self,
        model: nn.Module,
        graph: PruneGraph,
        schedule: ACDC,
        *,
        criterion: Any = "magnitude",
        ratio: float | None = None,
        flops: float | None = None,
        params: float | None = None,
        **criterion_kwargs: Any,
    ) -> None:
        if sum(v is not None for v in (ratio, flops, params)) != 1:
            raise ValueError("pass exactly one of ratio=, flops= or params=")
        self.model, self.graph, self.schedule = model, graph, schedule
        self.criterion, self.ratio, self.flops, self.params = criterion, ratio, flops, params
        self.criterion_kwargs = criterion_kwargs
        self.mask: Mask | None = None  # the mask of the current (or last) sparse phase
        self.sparse = False

    def _new_mask(self) -> Mask:
        from prunefx.masks.budget import SCORERS, to_budget

        if self.ratio is None:
            return to_budget(self.graph, self.criterion, flops=self.flops, params=self.params, **self.criterion_kwargs)
        fn = SCORERS[self.criterion][0] if isinstance(self.criterion, str) else self.criterion
        return fn(self.graph, self.ratio, **self.criterion_kwargs)

    def epoch(self, epoch: int) -> None:
        self.sparse = self.schedule.sparse(epoch)
        if self.schedule.starts_sparse_phase(epoch):
            self.mask = self._new_mask()
        if self.sparse:
            self.step()

    def step(self) -> None:
        if self.sparse and self.mask is not None:
            apply_mask(self.model, self.mask, graph=self.graph)

    def finish(self, *, optimizer: torch.optim.Optimizer | None = None) -> torch.fx.GraphModule:
        """The reconfigured model of the last sparse phase's mask (a fresh mask if none)."""
        mask = self.mask if self.mask is not None else self._new_mask()
        return reconfigure(self.model, mask, graph=self.graph, optimizer=optimizer)


class WeightDistancePlateau:
    """EarlyCroP's early-pruning trigger. Snapshot the weights at construction; call
    ``update()`` at every check (e.g. every epoch); it returns True from the first check
    where ``(d_t - d_{t-1}) / d_{t-1} < epsilon`` (``d_t = ||theta_t - theta_0|| / ||theta_0||``).
    ``epsilon`` is a hyper-parameter; 0.1 is our default, not a value from the paper."""

    def __init__(self, model: nn.Module | Iterable[torch.Tensor], *, epsilon: float = 0.1) -> None:
        params = model.parameters() if isinstance(model, nn.Module) else model
        self.params = [p for p in params if p.requires_grad]
        self.initial = [p.detach().clone() for p in self.params]
        self.norm0 = max(math.sqrt(sum(float(p.double().square().sum()) for p in self.initial)), 1e-12)
        self.epsilon = epsilon
        self.distances: list[float] = []
        self.fired = False

    def distance(self) -> float:
        """``d_t = ||theta_t - theta_0|| / ||theta_0||``."""
        sq = sum(float((p.detach() - p0).double().square().sum()) for p, p0 in zip(self.params, self.initial, strict=True))
        return math.sqrt(sq) / self.norm0

    def update(self) -> bool:
        d = self.distance()
        if self.distances and self.distances[-1] > 0:
            growth = (d - self.distances[-1]) / self.distances[-1]
            self.fired = self.fired or growth < self.epsilon
        self.distances.append(d)
        return self.fired
