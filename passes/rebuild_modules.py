"""RebuildModules: a copy of every called module, holding the sliced tensors, with its
size attributes updated to match them.

    Conv:        in_channels, out_channels, groups' = out' / (out / groups)
    Linear:      in_features, out_features
    BatchNorm*:  num_features          GroupNorm: num_channels, num_groups' = C' / (C / G)
    LayerNorm:   normalized_shape      Embedding: embedding_dim      PReLU: num_parameters
    Unflatten:   unflattened_size

A module is copied shallowly (its hooks and flags too) and given fresh parameter/buffer
dicts; a module with children (a user leaf module) is deep-copied, then its tensors replaced.
Tied tensors stay tied: every alias receives the same new tensor.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from prunefx import nn as pnn
from prunefx.passes.base import Pass, RewriteState

__all__ = ["RebuildModules", "REPLACEMENTS"]


def _shell_copy(m: nn.Module) -> nn.Module:
    if m._modules:
        return copy.deepcopy(m)
    new = m.__class__.__new__(m.__class__)
    state = m.__dict__.copy()
    for k, v in state.items():
        if isinstance(v, dict):  # parameters, buffers, hooks: the copy's own
            state[k] = v.copy()
    state["_non_persistent_buffers_set"] = set(m._non_persistent_buffers_set)
    new.__dict__ = state
    return new


def _conv(m: nn.modules.conv._ConvNd, x: torch.Size, y: torch.Size) -> None:
    cdim = len(x) - len(m.kernel_size) - 1
    old_out, old_groups = m.out_channels, m.groups
    m.in_channels, m.out_channels = int(x[cdim]), int(y[cdim])
    if old_groups > 1:
        m.groups = m.out_channels // (old_out // old_groups)


def _linear(m: nn.Linear, x: torch.Size, y: torch.Size) -> None:
    m.out_features, m.in_features = m.weight.shape


def _norm(m: nn.modules.batchnorm._NormBase, x: torch.Size, y: torch.Size) -> None:
    m.num_features = int(x[1] if len(x) > 1 else x[0])


def _group_norm(m: nn.GroupNorm, x: torch.Size, y: torch.Size) -> None:
    per_group = m.num_channels // m.num_groups
    m.num_channels = int(x[1])
    m.num_groups = m.num_channels // per_group


def _layer_norm(m: nn.LayerNorm, x: torch.Size, y: torch.Size) -> None:
    m.normalized_shape = tuple(int(s) for s in x[len(x) - len(m.normalized_shape):])


def _embedding(m: nn.Embedding, x: torch.Size, y: torch.Size) -> None:
    m.embedding_dim = m.weight.shape[1]


def _prelu(m: nn.PReLU, x: torch.Size, y: torch.Size) -> None:
    m.num_parameters = m.weight.numel()


def _unflatten(m: nn.Unflatten, x: torch.Size, y: torch.Size) -> None:
    dim = m.dim if m.dim >= 0 else m.dim + len(x)
    m.unflattened_size = tuple(int(s) for s in y[dim : dim + len(m.unflattened_size)])


_ATTRIBUTES: tuple[tuple[type, Callable[[Any, torch.Size, torch.Size], None]], ...] = (
    (nn.modules.conv._ConvNd, _conv),
    (nn.Linear, _linear),
    (nn.modules.batchnorm._NormBase, _norm),
    (nn.GroupNorm, _group_norm),
    (nn.LayerNorm, _layer_norm),
    (nn.Embedding, _embedding),
    (nn.PReLU, _prelu),
    (nn.Unflatten, _unflatten),
)


def _attention(old: nn.Module, state: RewriteState, target: str) -> nn.Module:
    """nn.MultiheadAttention with pruned heads or width -> prunefx.nn.MultiheadAttention."""
    w = state.tensors[f"{target}.in_proj_weight"]
    d = getattr(old, "head_dim", None) or old.embed_dim // old.num_heads
    heads = w.shape[0] // (3 * d)
    kept = state.plan.index.get(f"{target}.in_proj_weight", {}).get(0)
    kept_heads = kept[: heads * d : d] // d if kept is not None else torch.arange(heads)
    new = pnn.MultiheadAttention(
        w.shape[1], heads, d, batch_first=old.batch_first, dropout=old.dropout,
        bias=old.in_proj_bias is not None, kept_heads=kept_heads.to(w.device), device="meta",
    )
    new.in_proj_weight = w
    new.in_proj_bias = state.tensors.get(f"{target}.in_proj_bias") if old.in_proj_bias is not None else None
    new.out_proj.weight = state.tensors[f"{target}.out_proj.weight"]
    if old.out_proj.bias is not None:
        new.out_proj.bias = state.tensors[f"{target}.out_proj.bias"]
    new.out_proj.in_features, new.out_proj.out_features = new.out_proj.weight.shape[1], new.out_proj.weight.shape[0]
    new.train(old.training)
    return new


# modules whose class cannot hold the pruned shapes: built anew, same parameter names
REPLACEMENTS: tuple[tuple[type, Callable[[Any, RewriteState, str], nn.Module]], ...] = (
    (nn.MultiheadAttention, _attention),
    (pnn.MultiheadAttention, _attention),
)


@dataclass(frozen=True)
class RebuildModules(Pass):
    def run(self, state: RewriteState) -> None:
        aliases = state.plan.analysis.aliases
        shapes = state.plan.new_shapes
        modules = state.plan.analysis.traced.modules
        for node in state.source_nodes():
            if node.op != "call_module" or node.target in state.modules:
                continue
            old = modules[node.target]
            replace = next((fn for kind, fn in REPLACEMENTS if isinstance(old, kind)), None)
            if replace is not None:
                state.modules[node.target] = replace(old, state, node.target)
                continue
            new = _shell_copy(old)
            for prefix, sub in new.named_modules(prefix=node.target) if new._modules else ((node.target, new),):
                for slots in (sub._parameters, sub._buffers):
                    for pname, t in slots.items():
                        if t is not None:
                            key = f"{prefix}.{pname}"
                            slots[pname] = state.tensors[aliases.get(key, key)]
            x = shapes.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
            y = shapes.get(node)
            for kind, update in _ATTRIBUTES:
                if isinstance(new, kind) and isinstance(x, torch.Size) and isinstance(y, torch.Size):
                    update(new, x, y)
                    break
            state.modules[node.target] = new
