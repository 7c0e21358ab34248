"""``torch.nn.utils.prune`` interop.

A model pruned with ``torch.nn.utils.prune`` carries, per pruned tensor ``<name>``, a
parameter ``<name>_orig``, a buffer ``<name>_mask`` and a forward pre-hook computing
``<name> = <name>_orig * <name>_mask``. The weights are zero but the model is no smaller.

``from_torch_prune(model)`` reads those masks as a prunefx mask: in every prunable group, a
channel is dropped when every masked tensor that *writes* it zeroes its whole slice (it is
not computed: ``ln_structured(conv, "weight", amount, n, dim=0)`` zeroes whole filters), or
when every masked tensor that *reads* it does (it is not used: ``dim=1`` zeroes input
columns). Tensors without a mask do not vote, and several masked tensors combine like
prunefx's "union" policy (a channel any of them keeps is kept); a group whose channels are
all dropped keeps its first.
``strip_torch_prune(model)`` returns a copy with the pruning made permanent (plain
parameters, no hooks), which is what ``prunefx.reconfigure`` takes::

    mask = prunefx.masks.from_torch_prune(model, example_inputs=x)
    small = prunefx.reconfigure(prunefx.masks.strip_torch_prune(model), mask, example_inputs=x)

Note that ``ln_structured`` zeroes a filter but not its bias (or the BatchNorm after it):
the pruned model still emits a constant for such a channel, which reconfiguring removes.
``reconfigure`` equals ``apply_mask`` on the stripped model, as always; it equals the
torch-pruned model exactly when the pruned channels had no bias or norm shift.

``to_torch_prune(model, mask)`` goes the other way: it installs ``custom_from_mask`` on
every parameter that writes a dropped channel, so tools built on ``torch.nn.utils.prune``
see a prunefx mask.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.utils.prune as tprune
from torch import nn

from prunefx.analysis.propagate import Role
from prunefx.graph import PruneGraph, trace
from prunefx.mask import resolve_mask
from prunefx.masks.channels import along, scatter_to_channels
from prunefx.masks.select import Mask

__all__ = ["from_torch_prune", "strip_torch_prune", "to_torch_prune"]


def _pruned_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``"<module>.<name>"`` -> its torch.nn.utils.prune mask, for every pruned tensor."""
    out = {}
    for mod_name, mod in model.named_modules():
        for hook in mod._forward_pre_hooks.values():
            methods = hook._pruning_methods if isinstance(hook, tprune.PruningContainer) else (hook,)
            for method in methods:
                if isinstance(method, tprune.BasePruningMethod):
                    name = method._tensor_name
                    out[f"{mod_name}.{name}" if mod_name else name] = getattr(mod, f"{name}_mask")
    return out


def from_torch_prune(model: nn.Module, graph: PruneGraph | None = None, *, example_inputs: Any = None) -> Mask:
    """The prunefx mask of a model pruned with ``torch.nn.utils.prune``. ``graph`` may be
    traced from ``model`` or from ``strip_torch_prune(model)``; without it, ``model`` is
    traced on ``example_inputs``."""
    pruned = _pruned_tensors(model)
    if graph is None:
        graph = trace(model, example_inputs)
    mask: Mask = {}
    for g in graph.groups:
        if not g.prunable:
            continue
        written = read = None  # channels some masked writer / reader keeps
        for m in g.members:
            t = pruned.get(m.name)
            if t is None or m.role == "stat":
                continue
            alive = scatter_to_channels(m, along((t != 0).double(), m.dim), g.size) > 0
            if m.role == "write":
                written = alive if written is None else written | alive
            else:
                read = alive if read is None else read | alive
        if written is None and read is None:
            continue
        keep = (written if written is not None else True) & (read if read is not None else True)
        if bool(keep.all()):
            continue
        if not keep.any():
            keep[0] = True
        mask[g.name] = keep.cpu()
    return mask


def strip_torch_prune(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``torch.nn.utils.prune`` reparametrisation made
    permanent (``prune.remove``); ``model`` itself is not modified."""
    # a pruned tensor is recomputed (orig * mask) by a forward pre-hook; computed with
    # autograd on, it is not a leaf, which deepcopy refuses. The copy's value is replaced by
    # prune.remove below, so it is copied detached
    memo: dict[int, Any] = {}
    for mod_name, name in map(_owner_and_name, _pruned_tensors(model)):
        t = getattr(model.get_submodule(mod_name), name, None)
        if isinstance(t, torch.Tensor) and not t.is_leaf:
            memo[id(t)] = t.detach().clone()
    out = copy.deepcopy(model, memo)
    for mod_name, name in map(_owner_and_name, _pruned_tensors(out)):
        tprune.remove(out.get_submodule(mod_name), name)
    return out


def _owner_and_name(key: str) -> tuple[str, str]:
    """``"layer1.0.conv1.weight"`` -> ``("layer1.0.conv1", "weight")``; a root tensor's module is ``""``."""
    owner, _, name = key.rpartition(".")
    return owner, name


def to_torch_prune(model: nn.Module, mask: Mapping[str, Any], graph: PruneGraph | None = None, *,
                   example_inputs: Any = None, policy: str = "union") -> nn.Module:
    """Install ``torch.nn.utils.prune.custom_from_mask`` on every parameter of ``model`` that
    writes a channel ``mask`` drops (in place; returns ``model``)."""
    if graph is None:
        graph = trace(model, example_inputs)
    keep = resolve_mask(graph, mask, policy)
    params = dict(model.named_parameters(remove_duplicate=False))
    pmasks: dict[str, torch.Tensor] = {}
    for m in graph.analysis.members:
        if m.role is not Role.WRITE or m.tensor not in params:
            continue
        dropped = np.nonzero(~keep.of(graph.analysis.uf.find(m.ids)))[0]
        if dropped.size:
            p = params[m.tensor]
            pm = pmasks.setdefault(m.tensor, torch.ones_like(p))
            pm.index_fill_(m.dim, torch.as_tensor(dropped, device=p.device), 0)
    for name, pm in pmasks.items():
        mod_name, _, attr = name.rpartition(".")
        tprune.custom_from_mask(model.get_submodule(mod_name), attr, pm)
    return model
