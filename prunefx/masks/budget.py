"""Masks by cost: ``to_budget(graph, criterion, flops=0.5)`` (or ``params=0.5``).

Finds the mask whose reconfigured model keeps the requested fraction of the original FLOPs
(or parameters). With ``scope="global"`` (default) it is one global threshold on the
criterion's normalised scores: the ``k`` lowest-ranked channels go, and ``k`` is found by
bisection, cost being monotone in ``k``; with ``scope="local"`` it is the per-group ratio r
(the same in every group), found the same way.

Each bisection step costs one analytic estimate (``cost.CostModel``: FLOPs per parameter
times the fraction of the parameter kept), a few milliseconds, instead of a reconfigure and
a FLOP count (about a second on ResNet-50). The estimate is exact for networks whose FLOPs
all come from convolutions and linear layers; when some FLOPs do not scale with a parameter
(attention matmuls), the result is measured by a real reconfigure and the target of the
estimate corrected, ``target_est <- target_est * target / measured``, at most
``max_measure`` times, until the measured fraction is within ``tolerance``.

The criterion is a name (``"magnitude"``, ``"bn_scale"``, ``"taylor"``, ``"snip"``,
``"gradient_flow"``, ``"random"``, ``"uniform"``), one of the criterion functions
(``prunefx.masks.magnitude``, ...), or any ``scorer(graph, **kwargs) -> {group: scores}``;
extra keyword arguments go to the criterion (``p=2``, ``loss_fn=..., batch=...``, ``seed=``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from prunefx.errors import MaskError
from prunefx.graph import PruneGraph
from prunefx.masks import criteria, saliency
from prunefx.masks.cost import Cost, CostModel, measure_cost
from prunefx.masks.select import Mask, Ranking, Selection

__all__ = ["to_budget", "SCORERS"]

Scorer = Callable[..., dict[str, torch.Tensor]]

# name -> (criterion function, scorer); the explicit table of what to_budget can rank by
SCORERS: dict[str, tuple[Callable[..., Mask], Scorer]] = {
    "magnitude": (criteria.magnitude, criteria.magnitude_scores),
    "bn_scale": (criteria.bn_scale, criteria.bn_scale_scores),
    "random": (criteria.random, criteria.random_scores),
    "uniform": (criteria.uniform, criteria.uniform_scores),
    "taylor": (saliency.taylor, saliency.taylor_scores),
    "snip": (saliency.snip, saliency.snip_scores),
    "gradient_flow": (saliency.gradient_flow, saliency.gradient_flow_scores),
}
_RAW_SCORES = ("bn_scale",)  # criteria compared across groups without normalisation
_LOCAL_ONLY = ("uniform",)


def _scorer(criterion: str | Callable[..., Any]) -> tuple[str, Scorer]:
    if isinstance(criterion, str):
        if criterion not in SCORERS:
            raise ValueError(f"unknown criterion {criterion!r}; use one of {sorted(SCORERS)} or a function")
        return criterion, SCORERS[criterion][1]
    for name, (fn, scorer) in SCORERS.items():
        if criterion is fn or criterion is scorer:
            return name, scorer
    if callable(criterion):
        return getattr(criterion, "__name__", "custom"), criterion
    raise ValueError(f"criterion must be a name, a criterion function or a scorer, got {type(criterion).__name__}")


def to_budget(
    graph: PruneGraph,
    criterion: str | Callable[..., Any] = "magnitude",
    *,
    flops: float | None = None,
    params: float | None = None,
    scope: str | None = None,
    normalize: str | None = "auto",
    min_keep: int = 1,
    round_to: int = 1,
    protect: Iterable[str] = (),
    exact_only: bool = False,
    tolerance: float = 0.005,
    verify: bool | None = None,
    max_measure: int = 3,
    **criterion_kwargs: Any,
) -> Mask:
    """The mask whose reconfigured model keeps a ``flops`` (or ``params``) fraction of the
    original's FLOPs (parameters), ranking channels by ``criterion``.

    ``verify=None`` measures a real reconfigure only when the estimate is approximate;
    ``True`` always, ``False`` never. Raises MaskError when the fraction is out of reach
    (pinned groups, ``min_keep`` and ``protect`` bound how small the model can get).
    """
    if (flops is None) == (params is None):
        raise ValueError("pass exactly one of flops= or params= (a fraction of the original, e.g. flops=0.5)")
    metric, target = ("flops", flops) if flops is not None else ("params", params)
    assert target is not None
    if not 0.0 < target <= 1.0:
        raise ValueError(f"{metric} must be a fraction in (0, 1], got {target}")
    name, scorer = _scorer(criterion)
    if scope is None:
        scope = "local" if name in _LOCAL_ONLY else "global"
    if normalize == "auto":
        normalize = None if name in _RAW_SCORES else "mean"
    selection = Selection(scope, normalize, min_keep, round_to, protect, exact_only)  # type: ignore[arg-type]
    ranking = Ranking.build(graph, scorer(graph, **criterion_kwargs), selection)
    costs = CostModel.of(graph)

    def fraction(cost: Cost) -> float:
        return cost.flops_ratio if metric == "flops" else cost.params_ratio

    def estimate(counts: np.ndarray) -> float:
        return fraction(costs.estimate_flags(costs.flags_of(ranking.keep_arrays(counts))))

    counts = _solve(ranking, estimate, target)
    if verify is False or (verify is None and (metric == "params" or costs.exact)):
        return ranking.mask(counts)
    reference = Cost(costs.flops, costs.params, 1.0, 1.0)
    best, best_err, goal = counts, float("inf"), target
    for _ in range(max(1, max_measure)):
        measured = fraction(measure_cost(graph, ranking.mask(counts), reference=reference))
        err = abs(measured - target)
        if err < best_err:
            best, best_err = counts, err
        if err <= tolerance or measured <= 0:
            break
        goal = min(1.0, goal * target / measured)
        counts = _solve(ranking, estimate, goal, strict=False)
    return ranking.mask(best)


def _solve(ranking: Ranking, estimate: Callable[[np.ndarray], float], target: float, *, strict: bool = True) -> np.ndarray:
    """Keep counts whose estimated fraction is closest to ``target``."""
    if ranking.selection.scope == "global":
        lo, hi = 0, ranking.total  # estimate(counts_global(k)) is non-increasing in k
        at = ranking.counts_global
        floor = estimate(at(hi))
        if floor > target:
            return _out_of_reach(ranking, floor, target, at(hi), strict)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if estimate(at(mid)) > target:
                lo = mid
            else:
                hi = mid
        a, b = at(lo), at(hi)
    else:
        rlo, rhi = 0.0, 1.0 - 1e-12
        at = ranking.counts_local
        floor = estimate(at(rhi))
        if floor > target:
            return _out_of_reach(ranking, floor, target, at(rhi), strict)
        for _ in range(50):
            mid = (rlo + rhi) / 2
            if estimate(at(mid)) > target:
                rlo = mid
            else:
                rhi = mid
        a, b = at(rlo), at(rhi)
    return a if abs(estimate(a) - target) < abs(estimate(b) - target) else b


def _out_of_reach(ranking: Ranking, floor: float, target: float, counts: np.ndarray, strict: bool) -> np.ndarray:
    if not strict:
        return counts
    raise MaskError(
        f"cannot reach {target:.3g} of the original cost: pruning every eligible channel down to min_keep="
        f"{ranking.selection.min_keep} (round_to={ranking.selection.round_to}) still leaves {floor:.3g}; "
        f"{len(ranking.groups)} groups are eligible, the rest are pinned, protected"
        f"{', approximate (exact_only=True)' if ranking.selection.exact_only else ''} or unscored. "
        "Ask for a larger fraction, or lower min_keep / round_to."
    )
