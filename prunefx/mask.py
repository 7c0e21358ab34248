"""Stage 4 of the pipeline: mask resolution.

A user mask maps group names or module names to bool vectors (True = keep). Resolution turns
it into one keep flag per channel slot (union-find root), validating everything first:

- an unknown key raises MaskError listing the closest names;
- a value that is not a 1-D bool vector of the right length (or has no values: a meta
  tensor; or is stored sparse) raises MaskError naming the group or module and its size;
- a module called at several places on different channels (one ``nn.ReLU`` shared by two
  layers) names no single set of channels: as a key it raises MaskError listing the call
  sites (a module called twice on the same channels, a shared conv, is fine);
- keys that land on the same slot are combined by ``policy``: "union" keeps a slot if any key
  keeps it (PruneTrain's channel union), "strict" raises when keys disagree;
- removing a channel of a pinned group, or every channel of a group, raises MaskError.

Slots no key mentions are kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from prunefx.analysis.propagate import _layouts_in
from prunefx.errors import MaskError
from prunefx.graph import PruneGraph, _closest

__all__ = ["Keep", "resolve_mask"]


@dataclass(frozen=True, eq=False)
class Keep:
    """Keep flag per union-find root id (entries of non-root ids are meaningless)."""

    flags: np.ndarray

    def of(self, roots: np.ndarray) -> np.ndarray:
        return self.flags[roots]


def _as_bool_vector(key: str, value: Any, size: int, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.bool:
            raise MaskError(f"mask for {what} '{key}' has dtype {value.dtype}; expected a torch.bool tensor of shape ({size},) (True = keep), e.g. scores > threshold")
        if value.is_meta:
            raise MaskError(f"mask for {what} '{key}' is on the meta device, so it has no values; build it on the CPU (or the model's device)")
        if value.layout != torch.strided:
            raise MaskError(f"mask for {what} '{key}' is a {value.layout} tensor; pass a dense one (mask.to_dense())")
        arr = value.detach().cpu().numpy()
    elif isinstance(value, np.ndarray):
        if value.dtype != np.bool_:
            raise MaskError(f"mask for {what} '{key}' has dtype {value.dtype}; expected a bool array of shape ({size},) (True = keep)")
        arr = value
    elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, np.bool_)) for v in value):
        arr = np.asarray(value, dtype=bool)
    else:
        raise MaskError(f"mask for {what} '{key}' is a {type(value).__name__}; expected a bool tensor of length {size}")
    if arr.ndim != 1 or arr.shape[0] != size:
        raise MaskError(f"mask for {what} '{key}' has shape {tuple(arr.shape)}; {what} '{key}' has {size} channels, so the mask must have shape ({size},)")
    return arr


def resolve_mask(graph: PruneGraph, mask: Mapping[str, Any], policy: str = "union", *, allow_empty: bool = False) -> Keep:
    """One keep flag per slot. ``allow_empty`` lets a mask remove every channel of a group:
    only PruneTrain's branch removal asks for it, and it removes the starved layers itself."""
    if policy not in ("union", "strict"):
        raise MaskError(f"policy must be 'union' or 'strict', got {policy!r}")
    if not isinstance(mask, Mapping):
        raise MaskError(f"a mask is a mapping from group or module names to bool tensors, got {type(mask).__name__}")
    n = graph.analysis.uf.size
    keyed = np.zeros(n, dtype=bool)
    vote_any = np.zeros(n, dtype=bool)  # some key keeps the slot
    vote_all = np.ones(n, dtype=bool)  # every key keeps the slot
    keys_of: dict[str, np.ndarray] = {}
    for key, value in mask.items():
        if not isinstance(key, str):
            raise MaskError(f"mask keys are group or module names (str), got {key!r}")
        roots, what = _key_channels(graph, key, value)
        keep = _as_bool_vector(key, value, len(roots), what)
        np.logical_or.at(vote_any, roots, keep)
        np.logical_and.at(vote_all, roots, keep)
        keyed[roots] = True
        keys_of[key] = roots
    if policy == "strict":
        clash = np.nonzero(keyed & (vote_any != vote_all))[0]
        if clash.size:
            r = clash[0]
            names = [k for k, roots in keys_of.items() if (roots == r).any()]
            raise MaskError(
                f"policy='strict': {', '.join(repr(k) for k in names)} disagree on coupled channels "
                "(some keep and some drop the same channel); use policy='union' to keep such channels"
            )
    flags = np.ones(n, dtype=bool)
    flags[keyed] = vote_any[keyed]
    _validate(graph, flags, keyed, allow_empty)
    return Keep(flags)


def _key_channels(graph: PruneGraph, key: str, value: Any) -> tuple[np.ndarray, str]:
    """Slots addressed by ``key``. A group name wins over a module of the same name; the
    module reading applies when the mask has the module's channel count instead (a grouped
    conv's group has one slot per conv group, the conv one per output channel)."""
    group = graph._table.by_name.get(key)
    module = graph.analysis.module_outputs.get(key)
    n = len(value) if hasattr(value, "__len__") and getattr(value, "ndim", 1) > 0 else -1
    if group is not None and (module is None or n == group.size or n != len(module)):
        return group.slots, "group"
    if module is not None:
        return graph.output_channels(key), "module"  # a MaskError listing the call sites if the module is shared
    raise MaskError(f"unknown mask key '{key}': no channel group or module of that name{_closest(key, graph.names())}")


def _call_sites(graph: PruneGraph, name: str) -> list[tuple[fx.Node, tuple[int, ...]]]:
    """Every call of module ``name`` with the channel classes of its output, in channel order
    (the same classes permuted are other channels for a key's index i): fx graphs have
    one call_module node per call; in export graphs a call is the nodes the module itself
    computed under one ``nn_module_stack`` entry (``act``, ``act@1``), its output the last."""
    traced = graph.traced
    last: dict[Any, fx.Node] = {}
    for node in traced.nodes():
        if traced.frontend == "export":
            stack = node.meta.get("nn_module_stack") or {}
            if traced.owners.get(node) == name and stack:
                last[(id(node.graph), next(reversed(stack)))] = node
        elif node.op == "call_module" and node.target == name:
            last[node] = node
    uf, layouts = graph.analysis.uf, graph.analysis.layouts
    sites = []
    for node in last.values():
        ids = [f.ids.ravel() for lay in _layouts_in(layouts.get(node)) for f in lay.factors]
        sites.append((node, tuple(uf.find(np.concatenate(ids)).tolist()) if ids else ()))
    return sites


def _refuse_ambiguous(graph: PruneGraph, name: str) -> None:
    sites = _call_sites(graph, name)
    if len({channels for _, channels in sites}) <= 1:
        return
    groups = [_groups_text(graph, channels) for _, channels in sites]
    listed = "; ".join(f"{graph.traced.where(node)} ({text})" for (node, _), text in zip(sites, groups, strict=True))
    raise MaskError(
        f"module '{name}' is called at {len(sites)} places on different channels, so as a mask key it names no single "
        f"set of channels: {listed}. Use group names as keys instead"
    )


def _groups_text(graph: PruneGraph, channels: tuple[int, ...]) -> str:
    names = dict.fromkeys(g.name for r in channels if (g := graph._table.group_of(r)) is not None)
    return f"group {', '.join(repr(n) for n in names)}" if names else "channels of no group"


def _validate(graph: PruneGraph, flags: np.ndarray, keyed: np.ndarray, allow_empty: bool) -> None:
    dropped = np.nonzero(keyed & ~flags)[0]
    pinned = dropped[graph.is_pinned(dropped)] if dropped.size else dropped
    if pinned.size:
        r = int(pinned[0])
        group = graph._table.group_of(r)
        name = f"group '{group.name}'" if group is not None else "a channel"
        raise MaskError(f"cannot remove channels of {name}: it is pinned ({graph.pin_reason(r)})")
    for g in () if allow_empty else graph.groups:
        if keyed[g.slots].any() and not flags[g.slots].any():
            raise MaskError(f"the mask removes every channel of group '{g.name}' (size {g.size}); keep at least one")
