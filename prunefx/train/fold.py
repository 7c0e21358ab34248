"""Constant folding: keep what dead-but-biased channels contribute when they are removed.

A channel whose weights group-lasso training drove to zero still carries a constant: its
conv bias, or its BatchNorm shift ``beta - gamma * mean / sqrt(var + eps)``, survives the
ReLU as ``v_c``. Every layer reading the channel adds ``W[:, c] * v_c`` to its output.
Removing the channel naively drops that term; folding moves it into the reader:

    Linear:            b'  = b + W[:, D] v_D                         (exact)
    conv, no padding:  b'_o = b_o + sum_{c in D} sum_{kh,kw} W[o, c, kh, kw] v_c   (exact)
    conv, padding:     the same b' is exact away from the borders; at the borders the
                       padded zeros do not carry v_c, so the folded model differs there.
                       The difference is measured and reported, never hidden.

D is the set of removed input channels of the reader. The contribution is measured, not
derived: the reader is run on its real input (captured on ``example_inputs``, eval mode)
restricted to D, without bias, and the per-output-channel median over batch and positions is
the folded constant (the median is the interior value whenever the interior is most of the
map). The residual is the largest deviation from it. A reader without a bias gets the
constant subtracted from the running mean of the BatchNorm right after it (exact in eval
mode; in training mode the batch mean absorbs a constant anyway), or a new bias parameter.

A new bias is recorded in the channel layout like its layer's weight's output dim (the
original size, the same kept indices), so ``add_folded_biases(fresh_model, layout)`` can give
a fresh model of the original architecture the bias before a checkpoint rebuilds it.

``fold_constants`` edits ``model`` in place and returns a ``FoldReport``; run it right before
``reconfigure`` with the same mask (``prunefx.train.shrink`` does both). Readers that are not
Conv1d/2d/3d or Linear modules, or that run more than once per forward, cannot be folded:
they are listed in ``report.unfoldable`` with the reason.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prunefx.analysis.propagate import Role
from prunefx.graph import PruneGraph
from prunefx.mask import Keep

__all__ = ["Fold", "FoldReport", "fold_constants", "readers_of_dropped", "record_new_biases", "add_folded_biases"]

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Fold:
    """What folding did to one reader."""

    module: str  # the reader, e.g. "layer1.0.conv2"
    target: str  # where the constant went: "bias", "new bias", or "<bn>.running_mean"
    removed_inputs: int  # how many of its input channels the mask removes
    max_abs: float  # largest |constant| folded
    residual: float  # largest |contribution - constant| over batch and positions
    scale: float  # largest |output| of the reader, to judge the residual against
    exact: bool  # no padding (or a Linear): the fold is exact by construction

    @property
    def relative_residual(self) -> float:
        return self.residual / self.scale if self.scale > 0 else 0.0


@dataclass(frozen=True)
class FoldReport:
    folds: tuple[Fold, ...] = ()
    unfoldable: tuple[tuple[str, str], ...] = ()  # (reader, why)
    new_parameters: tuple[tuple[str, nn.Parameter], ...] = field(default=(), repr=False)

    @property
    def max_relative_residual(self) -> float:
        return max((f.relative_residual for f in self.folds), default=0.0)

    def __str__(self) -> str:
        lines = [f"{len(self.folds)} readers folded, max relative residual {self.max_relative_residual:.2e}"]
        for f in self.folds:
            if f.max_abs > 0:
                lines.append(f"  {f.module}: {f.removed_inputs} inputs -> {f.target}, |const| <= {f.max_abs:.3g}, "
                             f"residual {f.residual:.3g} ({'exact' if f.exact else 'padded borders'})")
        lines += [f"  not folded: {name}: {why}" for name, why in self.unfoldable]
        return "\n".join(lines)


def readers_of_dropped(graph: PruneGraph, keep: Keep) -> dict[str, tuple[int, np.ndarray]]:
    """Every parameter read member losing inputs: ``{weight name: (dim, bool removed per index)}``."""
    a = graph.analysis
    out: dict[str, tuple[int, np.ndarray]] = {}
    for m in a.members:
        if m.role is not Role.READ:
            continue
        removed = ~keep.of(a.uf.find(m.ids))
        if removed.any():
            dim, prev = out.get(m.tensor, (m.dim, np.zeros_like(removed)))
            out[m.tensor] = (dim, prev | removed) if dim == m.dim else (dim, prev)
    return out


def fold_constants(model: nn.Module, graph: PruneGraph, keep: Keep, example_inputs: Any, *, dry_run: bool = False) -> FoldReport:
    """Fold into their readers the constants that the channels ``keep`` drops contribute
    (see the module docstring). ``graph`` is ``prunefx.trace(model, ...)``; ``model`` is
    edited in place. ``dry_run`` only finds the readers that cannot be folded."""
    modules = dict(model.named_modules())
    readers: dict[str, np.ndarray] = {}
    unfoldable: list[tuple[str, str]] = []
    for weight, (dim, removed) in readers_of_dropped(graph, keep).items():
        owner, _, attr = weight.rpartition(".")
        m = modules.get(owner)
        if not isinstance(m, _FOLDABLE) or attr != "weight" or dim != 1 or getattr(m, "groups", 1) != 1:
            unfoldable.append((owner or weight, f"reads removed channels through '{weight}' (dim {dim}), which is not the "
                                                "input dim of an ungrouped Conv1d/2d/3d or Linear weight"))
            continue
        readers[owner] = removed
    inputs = _capture_inputs(model, list(readers), example_inputs)
    folds: list[Fold] = []
    new_params: list[tuple[str, nn.Parameter]] = []
    users = _single_users(graph)
    with torch.no_grad():
        for name, removed in readers.items():
            seen = inputs.get(name, [])
            if len(seen) != 1:
                why = "it never ran on the example input" if not seen else f"it runs {len(seen)} times per forward"
                unfoldable.append((name, why))
                continue
            if dry_run:
                continue
            m = modules[name]
            x = seen[0]
            contribution, out = _contribution(m, x, torch.as_tensor(removed, device=x.device))
            const, residual = _constant_of(contribution)
            if m.bias is None and float(const.abs().max()) <= 1e-7 * max(1.0, float(out.abs().max())):
                target = "nothing (the constant is zero)"  # no new bias the model's class may not hold (Llama's mlp_bias=False)
            else:
                target = _fold_into(model, modules, users, name, m, const, new_params)
            folds.append(Fold(
                module=name, target=target, removed_inputs=int(removed.sum()), max_abs=float(const.abs().max()),
                residual=residual, scale=float(out.abs().max()), exact=_unpadded(m),
            ))
    return FoldReport(tuple(folds), tuple(unfoldable), tuple(new_params))


def _capture_inputs(model: nn.Module, names: list[str], example_inputs: Any) -> dict[str, list[torch.Tensor]]:
    """The input of each module in ``names`` on one eval-mode forward (no state changes)."""
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    if not names:
        return seen
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda _m, args, n=n: seen[n].append(args[0].detach())) for n in names]
    was_training = model.training
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return seen


def _contribution(m: nn.Module, x: torch.Tensor, removed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the removed inputs add to ``m``'s output, ``m``'s whole output)."""
    if isinstance(m, nn.Linear):  # features last: moved to dim 1, where a conv has its channels
        xd = x * removed.to(x.dtype)
        return F.linear(xd, m.weight).movedim(-1, 1), F.linear(x, m.weight, m.bias).movedim(-1, 1)
    shape = [1, -1] + [1] * (x.dim() - 2)
    xd = x * removed.to(x.dtype).view(shape)
    return m._conv_forward(xd, m.weight, None), m(x)


def _constant_of(contribution: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per output channel: the median over batch and positions, and the largest deviation."""
    flat = contribution.movedim(1, 0).reshape(contribution.shape[1], -1)
    const = flat.median(dim=1).values
    residual = float((flat - const[:, None]).abs().max()) if flat.numel() else 0.0
    return const, residual


def _unpadded(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    pad = m.padding
    return pad != "same" and (pad == "valid" or all(p == 0 for p in pad))


def _single_users(graph: PruneGraph) -> dict[str, str]:
    """module name -> the module name of its output's only user, when that user is a module."""
    out: dict[str, str] = {}
    for node in graph.module.graph.nodes:
        if node.op == "call_module" and len(node.users) == 1:
            (user,) = node.users
            if user.op == "call_module":
                out[str(node.target)] = str(user.target)
    return out


def _fold_into(model: nn.Module, modules: Mapping[str, nn.Module], users: Mapping[str, str], name: str, m: nn.Module,
               const: torch.Tensor, new_params: list[tuple[str, nn.Parameter]]) -> str:
    const = const.to(m.weight.dtype)
    if m.bias is not None:
        m.bias.add_(const)
        return "bias"
    bn = modules.get(users.get(name, ""))
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None:
        bn.running_mean.sub_(const.to(bn.running_mean.dtype))
        return f"{users[name]}.running_mean"
    m.bias = nn.Parameter(const.clone())
    new_params.append((f"{name}.bias", m.bias))
    return "new bias"


def record_new_biases(layout: dict[str, Any] | None, report: FoldReport) -> None:
    """Record each bias the fold created like its layer's weight's output dim: the original
    size and the weight's kept indices (the rewrite records a new tensor relative to the model
    it was created on, which after an earlier shrink is not the original)."""
    if not layout or not report.new_parameters:
        return
    tensors = layout.get("tensors", {})
    for name, _ in report.new_parameters:
        weight = tensors.get(name.rpartition(".")[0] + ".weight")
        if weight is None or name not in tensors:
            continue
        kept = weight["kept"].get(0)
        tensors[name] = {"shape": [weight["shape"][0]], "kept": {} if kept is None else {0: kept.clone() if isinstance(kept, torch.Tensor) else kept}}


def add_folded_biases(model: nn.Module, layout: Mapping[str, Any] | None) -> list[str]:
    """Give ``model`` (the original architecture, never reconfigured) a zero bias wherever the
    layout records one its layer does not have (a bias a constant fold created), so the
    checkpoint's weights fit the rebuilt model. Returns the names added."""
    added = []
    modules = dict(model.named_modules())
    for name, entry in ((layout or {}).get("tensors") or {}).items():
        owner, _, leaf = name.rpartition(".")
        m = modules.get(owner)
        if leaf != "bias" or m is None or getattr(m, "bias", 0) is not None or not isinstance(getattr(m, "weight", None), torch.Tensor):
            continue
        m.bias = nn.Parameter(torch.zeros(entry["shape"], dtype=m.weight.dtype, device=m.weight.device))
        added.append(name)
    return added
