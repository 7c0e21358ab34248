"""One PruneTrain reconfiguration: dead channels out, everything they still computed kept.

    mask   = from_zeros(model)                 channels whose weights group lasso zeroed
    keep   = resolve(mask)                     one flag per channel slot
    check  = fold dry run, branch dry run      keep what cannot be folded / removed exactly
    fold   = fold_constants(model, keep)       their constants move into the readers' biases
    gm     = remove_starved(model, keep)       layers left with no input become constants
    small  = reconfigure(gm, keep, optimizer)  the dense, smaller model; optimizer follows

``shrink`` edits ``model`` in place (the folds change biases and BatchNorm running means, so
``model`` itself must not be used afterwards) and returns the new model with a report.

The rest of the training loop follows (``prunefx.train.loop``): every optimizer passed
(re-pointed, state sliced), EMA copies (``ema=``: their ``.module`` is sliced alike),
LR schedulers (``schedulers=``: checked to step one of those optimizers, which stay the same
objects), a GradScaler (``scaler=``: refused between ``unscale_``/``step`` and ``update``),
gradient accumulation (``boundary=``, a ``StepBoundary``: refused while gradients wait for a
step), and a ``torch.compile``d model (the result is compiled with the same options).
Every check runs before anything is edited.

Example::

    >>> small, report = prunefx.train.shrink(model, example_inputs=x, optimizer=opt)
    >>> print(report)     # channels, parameters and FLOPs before/after, folds, removed branches
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from prunefx.analysis.propagate import Member, Role
from prunefx.flops import count_flops, count_params
from prunefx.graph import PruneGraph, trace
from prunefx.mask import Keep, resolve_mask
from prunefx.masks.cost import CostModel
from prunefx.masks.criteria import magnitude_scores
from prunefx.masks.zeros import from_zeros
from prunefx.provenance import layout_of
from prunefx.reconfigure import reconfigure
from prunefx.train.branches import BranchReport, remove_starved, starved_readers
from prunefx.train.fold import FoldReport, fold_constants, readers_of_dropped, record_new_biases
from prunefx.train.loop import (
    StepBoundary,
    check_ema,
    check_scaler,
    check_schedulers,
    fold_delta,
    fold_snapshot,
    follow_ema,
    follow_optimizer,
)
from prunefx.wrappers import rewrap_compiled, unwrap_compiled

__all__ = ["ShrinkReport", "shrink"]


@dataclass(frozen=True)
class ShrinkReport:
    """What one reconfiguration did. ``channels`` maps each prunable group of the model
    passed in to (channels before, channels after)."""

    changed: bool
    channels: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    params: tuple[int, int] = (0, 0)
    flops: tuple[int, int] = (0, 0)  # forward FLOPs on example_inputs
    fold: FoldReport = FoldReport()
    branches: BranchReport = BranchReport()
    kept_back: tuple[str, ...] = ()  # dead channels kept: why
    seconds: float = 0.0

    @property
    def removed_channels(self) -> int:
        return sum(b - a for b, a in self.channels.values())

    def __str__(self) -> str:
        if not self.changed:
            return "no dead channel: model unchanged"
        (p0, p1), (f0, f1) = self.params, self.flops
        lines = [
            f"removed {self.removed_channels} channels in {sum(b != a for b, a in self.channels.values())} groups "
            f"({self.seconds:.2f} s): params {p0:,} -> {p1:,} ({p1 / max(p0, 1):.1%}), FLOPs {f0:,} -> {f1:,} ({f1 / max(f0, 1):.1%})",
            str(self.fold),
        ]
        if self.branches.starved:
            lines.append(str(self.branches))
        lines += [f"kept: {why}" for why in self.kept_back]
        return "\n".join(lines)


def shrink(
    model: nn.Module,
    mask: Mapping[str, Any] | None = None,
    *,
    example_inputs: Any,
    example_kwargs: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    threshold: float = 1e-4,
    policy: str = "union",
    graph: PruneGraph | None = None,
    ema: nn.Module | Iterable[nn.Module] = (),
    scaler: Any = None,
    schedulers: Iterable[Any] = (),
    boundary: StepBoundary | None = None,
) -> tuple[nn.Module, ShrinkReport]:
    """Remove the channels ``mask`` drops (default: ``from_zeros(model, threshold)``),
    folding their constants and removing starved branches; returns ``(new model, report)``.
    ``example_inputs`` should be a real batch: the folds are measured on it.
    ``example_kwargs``: keyword inputs of ``forward`` for every trace and the rewrite (e.g.
    ``{"use_cache": False}`` for a transformers model, which the export front-end captures);
    the folds, starved branches and FLOPs run ``model(*example_inputs)`` alone. ``optimizer``
    may be a list (all re-pointed); ``ema``, ``scaler``, ``schedulers``, ``boundary``: see
    the module docstring. A ``torch.compile``d model comes back compiled alike."""
    start = time.perf_counter()
    x = example_inputs
    optimizers = [] if optimizer is None else [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
    emas = [ema] if isinstance(ema, nn.Module) else list(ema)
    if boundary is not None:
        boundary.check()
    check_scaler(scaler, optimizers)
    check_schedulers(schedulers, optimizers)
    compiled_model = model
    model, compiled = unwrap_compiled(model)
    for e in emas:
        check_ema(e, model)
    kw = {"example_kwargs": example_kwargs} if example_kwargs else {}  # none: the fx front-end, as before
    graph = trace(model, x, **kw) if graph is None else graph
    mask = from_zeros(graph, threshold) if mask is None else mask
    if not mask:
        return compiled_model, ShrinkReport(changed=False)
    keep = resolve_mask(graph, mask, policy, allow_empty=True)
    kept_back: list[str] = []
    keep = _keep_unfoldable(model, graph, keep, x, kept_back)
    keep = _keep_unremovable(model, graph, keep, x, kept_back)
    if keep.flags.all():
        return compiled_model, ShrinkReport(changed=False, kept_back=tuple(kept_back))
    before = {g.name: g.size for g in graph.groups if g.prunable}
    # FLOPs before from the graph's own costs (one meta pass, shared with the masks' cost
    # model), and after from its estimate when that is exact (convolutions, linear layers,
    # attention), else counted on the small model; an export capture always uses the
    # estimate: running a transformers model on meta tensors can fail (without a cache,
    # Llama calls .item() on its position ids). A detection surrogate's graph is not the
    # model's forward, so the model itself is counted.
    costs = CostModel.of(graph) if graph.model_inputs is None else None
    estimated = costs is not None and (costs.exact or graph.traced.frontend == "export")
    params0, flops0 = count_params(model), (costs.flops if costs is not None else count_flops(model, x))

    snapshot = fold_snapshot(model) if emas else {}
    fold = fold_constants(model, graph, keep, x)
    for opt in optimizers:
        _add_to_optimizer(opt, model, fold)
    primary = optimizers[0] if optimizers else None
    gm, branches = remove_starved(model, graph, keep, x)
    if gm is not None:
        _drop_from_optimizer(primary, model, gm)
        target, new_graph = gm, trace(gm, x, **kw)
        new_mask = _mask_by_tensor(graph, new_graph, keep)
    elif fold.new_parameters and (folded := _with_new_biases(model, graph, fold)) is None:
        # a new bias the graph cannot take as a member (an export graph calls the layer without one): trace again
        target, new_graph = model, trace(model, x, **kw)
        new_mask = _mask_by_tensor(graph, new_graph, keep)
    else:  # the same analysis: a new bias is sliced with its layer's outputs as a member of their channels
        target, new_graph = model, folded if fold.new_parameters else graph
        new_mask = {g.name: torch.from_numpy(keep.of(g.slots)) for g in graph.groups if not keep.of(g.slots).all()}
    small = reconfigure(target, new_mask, example_inputs=x, optimizer=primary, policy=policy, graph=new_graph, **kw)
    for opt in optimizers[1:]:  # by tensor name, through the layouts: the rewrite re-points one optimizer
        follow_optimizer(opt, model, small)
    delta = fold_delta(model, snapshot) if emas else {}
    for e in emas:
        follow_ema(e, model, small, delta)
    record_new_biases(layout_of(small), fold)  # after the followers: they index the tensors as the rewrite saw them
    after = {g.name: int(keep.of(g.slots).sum()) for g in graph.groups if g.prunable}
    return rewrap_compiled(small, compiled), ShrinkReport(
        changed=True,
        channels={n: (before[n], after[n]) for n in before},
        params=(params0, count_params(small)),
        flops=(flops0, costs.estimate_flags(keep.flags).flops if estimated and gm is None else count_flops(small, x)),
        fold=fold,
        branches=branches,
        kept_back=tuple(kept_back),
        seconds=time.perf_counter() - start,
    )


def _with_new_biases(model: nn.Module, graph: PruneGraph, fold: FoldReport) -> PruneGraph | None:
    """``graph`` with the biases the fold created as members: what tracing ``model`` again
    would find, without tracing it. Each new bias writes its layer's output channels, the ids
    of its weight's output dim (the conv and linear rules record a bias exactly so). None when
    that does not hold: an export graph (its ``linear``/``convolution`` calls take no bias
    argument), a layer the graph calls through another module object, a transposed or
    unfamiliar layer, a weight without exactly one output member."""
    if graph.traced.frontend != "fx":
        return None
    analysis = graph.analysis
    members, aliases = list(analysis.members), dict(analysis.aliases)
    traced_modules = {name: m for gm in graph.traced.graphs for name, m in gm.named_modules()}
    for name, _ in fold.new_parameters:
        owner = name.rpartition(".")[0]
        layer = traced_modules.get(owner)
        if layer is None or layer is not model.get_submodule(owner) or not isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)):
            return None
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):
            return None
        weight = aliases.get(f"{owner}.weight", f"{owner}.weight")
        at = [i for i, m in enumerate(members) if m.tensor == weight]
        out = [members[i] for i in at if members[i].dim == 0 and members[i].role is Role.WRITE]
        if len(out) != 1 or name in aliases:
            return None
        members.insert(at[-1] + 1, Member(name, 0, out[0].ids, Role.WRITE, out[0].node))
        aliases[name] = name
    folded = dataclasses.replace(analysis, members=tuple(members), aliases=aliases)
    new = PruneGraph(graph.traced, graph.shapes, folded, graph.example_inputs, origin=graph.origin, example_kwargs=graph.example_kwargs)
    new.model_inputs = graph.model_inputs
    return new


def _keep_unfoldable(model: nn.Module, graph: PruneGraph, keep: Keep, x: Any, why: list[str]) -> Keep:
    """Keep the channels read by a layer whose constant cannot be folded (a dry run on a
    copy of the flags: nothing is edited)."""
    report = fold_constants(model, graph, keep, x, dry_run=True)
    if not report.unfoldable:
        return keep
    flags = keep.flags.copy()
    bad = {name for name, _ in report.unfoldable}
    for m in graph.analysis.members:
        if m.role is Role.READ and m.tensor.rpartition(".")[0] in bad:
            flags[graph.analysis.uf.find(m.ids)] = True
    why += [f"channels read by '{name}': {reason}" for name, reason in report.unfoldable]
    return Keep(flags)


def _keep_unremovable(model: nn.Module, graph: PruneGraph, keep: Keep, x: Any, why: list[str]) -> Keep:
    """When starved layers cannot be removed, keep the strongest channel of each group
    feeding them, so that no layer is left without input."""
    if not starved_readers(graph, keep):
        return keep
    _, report = remove_starved(model, graph, keep, x, dry_run=True)
    if report.declined is None:
        return keep
    flags = keep.flags.copy()
    scores = magnitude_scores(graph, p=2)
    readers = readers_of_dropped(graph, keep)
    for m in graph.analysis.members:
        dim_removed = readers.get(m.tensor)
        if m.role is not Role.READ or dim_removed is None or not dim_removed[1].all():
            continue
        roots = graph.analysis.uf.find(m.ids)
        group = graph._table.group_of(int(roots[0]))
        if group is None:
            continue
        s = scores.get(group.name)
        best = int(np.argmax(s.numpy())) if s is not None else 0
        flags[group.slots[best]] = True
        why.append(f"one channel of group '{group.name}' ({report.declined})")
    return Keep(flags)


def _mask_by_tensor(old: PruneGraph, new: PruneGraph, keep: Keep) -> dict[str, torch.Tensor]:
    """``keep`` (slots of ``old``) as a mask over ``new``'s groups: each index of a
    parameter dim both graphs share carries its channel's flag across (module names would
    not do: a module called twice, like a ResNet block's ReLU, has one name for two outputs)."""
    before = {(m.tensor, m.dim): m.ids for m in old.analysis.members}
    flags = np.ones(new.analysis.uf.size, dtype=bool)
    for m in new.analysis.members:
        ids = before.get((m.tensor, m.dim))
        if ids is not None and len(ids) == len(m.ids):
            np.logical_and.at(flags, new.analysis.uf.find(m.ids), keep.of(old.analysis.uf.find(ids)))
    return {g.name: torch.from_numpy(flags[g.slots].copy()) for g in new.groups if g.prunable and not flags[g.slots].all()}


def _add_to_optimizer(optimizer: torch.optim.Optimizer | None, model: nn.Module, fold: FoldReport) -> None:
    """New biases train with the hyper-parameters of their layer's weight, and come right
    after it in its group: the order ``module.parameters()`` gives, so an optimizer state_dict
    saved after the shrink loads into an optimizer built afresh on the rebuilt model."""
    if optimizer is None or not fold.new_parameters:
        return
    modules = dict(model.named_modules())
    for name, p in fold.new_parameters:
        weight = modules[name.rpartition(".")[0]].weight
        group = next((g for g in optimizer.param_groups if any(q is weight for q in g["params"])), None)
        if group is not None:
            at = next(i for i, q in enumerate(group["params"]) if q is weight)
            group["params"].insert(at + 1, p)


def _drop_from_optimizer(optimizer: torch.optim.Optimizer | None, model: nn.Module, gm: nn.Module) -> None:
    """Parameters of removed layers leave the optimizer (and their state with them)."""
    if optimizer is None:
        return
    alive = {id(p) for p in gm.parameters()}
    gone = {id(p) for p in model.parameters()} - alive
    for g in optimizer.param_groups:
        g["params"] = [p for p in g["params"] if id(p) not in gone]
    for p in [p for p in optimizer.state if id(p) in gone]:
        del optimizer.state[p]
