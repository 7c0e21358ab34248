"""Mask sources: criteria, global ranking, cost targets, schedules, torch.nn.utils.prune interop.

A mask maps group names to bool vectors (True = keep). Every criterion scores a whole channel
group (every weight of every member, ``channels.py``), then ``select`` turns scores into a
mask (``scope``, ``normalize``, ``min_keep``, ``round_to``, ``protect``, ``exact_only``).
Only prunable groups are ever masked.

    criteria.py   magnitude (L1/L2), bn_scale (+ slimming_penalty), random, uniform
    saliency.py   taylor, snip, gradient_flow (EarlyCroP); causal_lm_loss for language models
    select.py     scores -> mask: local / global ranking and the keep-count rules
    cost.py       FLOPs / parameters of a mask, estimated and measured
    budget.py     to_budget(graph, criterion, flops=0.5 | params=0.5)
    schedules.py  cubic gradual pruning, AC/DC soft-mask training, EarlyCroP's trigger
    interop.py    torch.nn.utils.prune <-> prunefx masks
    zeros.py      from_zeros: the channels group-lasso training zeroed (PruneTrain)
    layerwise.py  uniform_layers: the same keep count in every layer (stock loaders, fast kernels)

The formulas and papers are in each file's docstring and in docs/masks.md.

Example::

    >>> graph = prunefx.trace(model, x)
    >>> mask = prunefx.masks.magnitude(graph, 0.5, scope="global", round_to=8)
    >>> mask = prunefx.masks.to_budget(graph, "magnitude", flops=0.5)
    >>> small = prunefx.reconfigure(model, mask, graph=graph)
"""

from prunefx.masks.budget import to_budget
from prunefx.masks.channels import channel_sums
from prunefx.masks.cost import Cost, CostModel, estimate_cost, measure_cost
from prunefx.masks.criteria import bn_scale, magnitude, random, slimming_penalty, uniform
from prunefx.masks.interop import from_torch_prune, strip_torch_prune, to_torch_prune
from prunefx.masks.layerwise import uniform_layers
from prunefx.masks.saliency import causal_lm_loss, gradient_flow, snip, taylor
from prunefx.masks.schedules import ACDC, Cubic, SoftMasking, WeightDistancePlateau, cubic_sparsity
from prunefx.masks.select import Mask, Selection, select
from prunefx.masks.zeros import from_zeros

__all__ = [
    "Mask", "magnitude", "bn_scale", "taylor", "snip", "gradient_flow", "random", "uniform",
    "causal_lm_loss", "slimming_penalty", "select", "Selection", "channel_sums", "to_budget", "Cost", "CostModel",
    "estimate_cost", "measure_cost", "cubic_sparsity", "Cubic", "ACDC", "SoftMasking",
    "WeightDistancePlateau", "from_torch_prune", "strip_torch_prune", "to_torch_prune", "from_zeros",
    "uniform_layers",
]
