"""The rest of a training loop's state, following a shrink.

A shrink replaces every parameter of the model by a smaller one. ``reconfigure(...,
optimizer=opt)`` re-points one optimizer; everything else a loop holds must follow too, or it
silently trains (or averages) the old tensors:

    other optimizers     re-pointed and their per-parameter state sliced, by tensor name
    EMA copies           ``AveragedModel`` / timm ``ModelEmaV3``: ``.module`` becomes a copy of
                         the new model holding the sliced averages (plus the fold's corrections)
    LR schedulers        hold the optimizer object, which stays the same: checked, not changed
    GradScaler           holds no parameter: its scale and growth tracker are left alone, but a
                         shrink between ``scaler.unscale_/step`` and ``scaler.update`` is refused
    accumulation         a shrink while gradients wait for an optimizer step is refused
    torch.compile        the new model is wrapped with the compiled module's own dynamo context

The slicing index of a tensor comes from the channel layouts the models carry
(``prunefx.provenance``): both record, per tensor and dim, the kept indices of the *original*
model, so the index into the old tensor is the position of each new kept index among the old
ones,

    index[name][dim] = searchsorted(kept_old[name][dim], kept_new[name][dim])

(``kept_old`` is ``arange`` for a model never reconfigured). This is the index the rewrite
used: ``kept_new = kept_old[index]`` is how the layout record composes.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from prunefx.errors import PruneFxError
from prunefx.passes.slice_tensors import slice_tensor
from prunefx.provenance import layout_of

__all__ = ["StepBoundary", "tensor_index", "follow_optimizer", "follow_ema", "check_ema", "check_scaler",
           "check_schedulers"]


class StepBoundary:
    """Knows whether gradients are waiting for an optimizer step (gradient accumulation).

    Every parameter of the model marks itself pending when a gradient accumulates into it
    (``register_post_accumulate_grad_hook``); an ``optimizer.step()`` of an optimizer that
    holds it clears it (``register_step_post_hook``). ``check()`` refuses while any pending
    parameter still has a finite gradient: a step GradScaler skipped for an inf/NaN is a
    boundary too, since those gradients are discarded. Call ``watch(new_model)`` after a
    shrink; ``remove()`` drops every hook.
    """

    def __init__(self, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        self._pending: dict[int, str] = {}
        self._param_hooks: list[Any] = []
        self._step_hooks = [opt.register_step_post_hook(self._stepped) for opt in optimizers]
        self.watch(model)

    def watch(self, model: nn.Module) -> None:
        for h in self._param_hooks:
            h.remove()
        self._pending.clear()
        self._params = {id(p): p for p in model.parameters()}
        self._param_hooks = [p.register_post_accumulate_grad_hook(self._accumulator(name))
                             for name, p in model.named_parameters() if p.requires_grad]

    def _accumulator(self, name: str) -> Any:
        def accumulated(p: torch.Tensor) -> None:
            self._pending[id(p)] = name
        return accumulated

    def _stepped(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for g in optimizer.param_groups:
            for p in g["params"]:
                self._pending.pop(id(p), None)

    def pending(self) -> str | None:
        """The name of a parameter whose gradient waits for an optimizer step, or None."""
        for pid, name in self._pending.items():
            p = self._params.get(pid)
            if p is not None and p.grad is not None and bool(torch.isfinite(p.grad).all()):
                return name
        return None

    def check(self) -> None:
        name = self.pending()
        if name is not None:
            raise PruneFxError(f"cannot shrink in the middle of gradient accumulation: '{name}' holds a gradient no "
                               "optimizer.step() has used yet; shrink right after the step (or after zero_grad())")

    def remove(self) -> None:
        for h in (*self._param_hooks, *self._step_hooks):
            h.remove()
        self._param_hooks, self._step_hooks = [], []


def tensor_index(old: nn.Module, new: nn.Module, name: str, old_shape: Sequence[int]) -> dict[int, torch.Tensor] | None:
    """Per dim, the indices of ``old``'s tensor ``name`` that ``new``'s keeps (empty dict: the
    whole tensor; None: ``new`` has no such tensor in its layout)."""
    new_layout = layout_of(new) or {}
    entry = new_layout.get("tensors", {}).get(name)
    if entry is None:
        return None
    old_entry = (layout_of(old) or {}).get("tensors", {}).get(name, {"kept": {}})
    index: dict[int, torch.Tensor] = {}
    for dim, kept in entry["kept"].items():
        kept = torch.as_tensor(kept, dtype=torch.long)
        base = old_entry["kept"].get(dim)
        idx = kept if base is None else torch.searchsorted(torch.as_tensor(base, dtype=torch.long), kept)
        if len(idx) != old_shape[dim] or not torch.equal(idx, torch.arange(old_shape[dim])):
            index[dim] = idx
    return index


def _sliced(old: nn.Module, new: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    index = tensor_index(old, new, name, t.shape)
    return slice_tensor(t, index or None)


def follow_optimizer(optimizer: torch.optim.Optimizer, old: nn.Module, new: nn.Module) -> None:
    """Re-point ``optimizer`` from ``old``'s parameters to ``new``'s of the same name and slice
    their per-parameter state alike (the rule of ``prunefx.optim``, by name instead of through
    the rewrite). Parameters of ``old`` that ``new`` lacks leave the optimizer; parameters the
    optimizer holds that ``old`` does not are left alone. Checked before anything is assigned."""
    old_names = {id(p): n for n, p in old.named_parameters()}
    new_params = dict(new.named_parameters())
    groups: list[list[torch.Tensor]] = []
    state: dict[Any, Any] = {}
    for g in optimizer.param_groups:
        params = []
        for p in g["params"]:
            name = old_names.get(id(p))
            if name is None:
                params.append(p)
                if p in optimizer.state:
                    state[p] = optimizer.state[p]
                continue
            q = new_params.get(name)
            if q is None:
                continue
            if p in optimizer.state:
                index = tensor_index(old, new, name, p.shape) or None
                state[q] = {k: (slice_tensor(v, index) if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0 else v)
                            for k, v in optimizer.state[p].items()}
                if any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != q.shape and v.shape == p.shape
                       for v in state[q].values()):
                    raise PruneFxError(f"optimizer state of '{name}' could not be sliced to {list(q.shape)}")
            params.append(q)
        groups.append(params)
    for g, params in zip(optimizer.param_groups, groups, strict=True):
        g["params"] = params
    optimizer.state = defaultdict(dict, state)  # what torch.optim.Optimizer keeps


def follow_ema(ema: nn.Module, old: nn.Module, new: nn.Module, fold_delta: Mapping[str, torch.Tensor] | None = None) -> None:
    """``ema.module`` (a copy of ``old``, as ``AveragedModel`` and ``ModelEmaV3`` keep it)
    becomes a copy of ``new`` holding ``ema``'s own averages, sliced alike. ``fold_delta``:
    what the shrink's constant folding added to ``old``'s tensors (biases, running means),
    added to the averages before slicing, so an EMA equal to the model stays equal to it.
    Tensors ``new`` has and ``old`` had not (folded biases, branch constants) start from
    ``new``'s values."""
    check_ema(ema, old)
    copy_of = ema.module
    assert isinstance(copy_of, nn.Module)  # check_ema raised otherwise
    averaged = dict(copy_of.named_parameters()) | dict(copy_of.named_buffers())
    fold_delta = fold_delta or {}
    replacement = copy.deepcopy(new)
    replacement.requires_grad_(False)  # as the averaged copy was
    for name, t in list(replacement.named_parameters()) + list(replacement.named_buffers()):
        src = averaged.get(name)
        if src is None:
            continue  # new in this shrink: starts from the model's value
        with torch.no_grad():
            value = src.detach()
            delta = fold_delta.get(name)
            if delta is not None:
                value = value + delta.to(value.device, value.dtype)
            t.data = _sliced(old, new, name, value).to(src.device).data
    replacement.train(copy_of.training)
    ema.module = replacement


def check_ema(ema: nn.Module, model: nn.Module) -> None:
    """``ema.module`` is a copy of ``model``: the same tensor names and shapes (checked before
    a shrink edits anything)."""
    copy_of = getattr(ema, "module", None)
    if not isinstance(copy_of, nn.Module):
        raise PruneFxError(f"{type(ema).__name__} has no '.module' copy of the model to slice "
                           "(expected torch.optim.swa_utils.AveragedModel or timm's ModelEmaV3)")
    live = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, t in (*copy_of.named_parameters(), *copy_of.named_buffers()):
        if name not in live:
            raise PruneFxError(f"the EMA copy's tensor '{name}' is not a tensor of the model being shrunk: "
                               "build the EMA from the model passed to shrink (unwrapped, not from a DDP/compiled wrapper)")
        if t.shape != live[name].shape:
            raise PruneFxError(f"the EMA copy's '{name}' has shape {list(t.shape)}, the model's {list(live[name].shape)}: "
                               "was the EMA left behind by an earlier shrink? pass it to every shrink")


def fold_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the tensors a constant fold may change (biases, BatchNorm statistics: every
    tensor of at most one dim), to measure the fold's correction afterwards."""
    return {n: t.detach().clone() for n, t in (*model.named_parameters(), *model.named_buffers()) if t.dim() <= 1}


def fold_delta(model: nn.Module, before: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    now = dict(model.named_parameters()) | dict(model.named_buffers())
    out = {}
    for n, t in before.items():
        if n in now and now[n].shape == t.shape and t.is_floating_point():
            d = now[n].detach() - t
            if bool(d.any()):
                out[n] = d
    return out


def check_scaler(scaler: Any, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """A GradScaler references no parameter, so a shrink leaves its scale and growth tracker
    as they are. Between ``scaler.unscale_(opt)`` / ``scaler.step(opt)`` and
    ``scaler.update()`` it holds per-optimizer state about the old gradients: refused then."""
    if scaler is None:
        return
    states = getattr(scaler, "_per_optimizer_states", {})
    for i, opt in enumerate(optimizers):
        stage = states.get(id(opt), {}).get("stage") if isinstance(states, Mapping) else None
        if stage is not None and getattr(stage, "name", str(stage)) != "READY":
            raise PruneFxError(f"optimizer {i} is between scaler.unscale_/step and scaler.update() "
                               f"(GradScaler stage {getattr(stage, 'name', stage)}): shrink after scaler.update()")


def check_schedulers(schedulers: Iterable[Any], optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """LR schedulers keep stepping the optimizer object they hold, which a shrink re-points
    in place; one that holds an optimizer the shrink does not re-point would go on
    scheduling stale parameters, so it is refused."""
    ids = {id(o) for o in optimizers}
    for i, s in enumerate(schedulers):
        opt = getattr(s, "optimizer", None)
        if opt is None or id(opt) not in ids:
            raise PruneFxError(f"LR scheduler {i} ({type(s).__name__}) steps an optimizer that is not being re-pointed: "
                               "pass that optimizer to shrink too")
        # param_groups stay the same dicts (new parameters join existing groups), so base_lrs etc. still line up
        if hasattr(s, "base_lrs") and len(s.base_lrs) != len(opt.param_groups):
            raise PruneFxError(f"LR scheduler {i} ({type(s).__name__}) has {len(s.base_lrs)} base LRs for "
                               f"{len(opt.param_groups)} param groups")
