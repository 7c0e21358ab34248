"""Heads are kept or removed whole in a transformers model.

A transformers attention module views its projections as ``(-1, head_dim)`` with
``head_dim`` read from the module or its config (and builds its rotary tables from it), so
the only sizes a pruned model of the same class can express are whole heads. The channel
analysis, which knows only the graph, can find finer groups inside a head, for instance
the value channels of a layer left with a single KV head: with one head,
``view(batch, seq, -1, head_dim)`` is an unsqueeze, and each value channel is exactly
removable in the graph. Such a group would pass the analysis and fail at the module
emitter's check, or, during PruneTrain, be driven to zero and then refuse to shrink.

``whole_heads(model, analysis)`` pins them: for every attention module prunefx knows
(``prunefx.transformers.layers.ATTENTION``), along every parameter dim laid out in heads
(a dim of the attention's own tensors whose channels belong to groups inside the layer:
q/k/v rows, the output projection's columns), a head holding channels of more than one
group has those groups pinned, with the reason.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
from torch import nn

from prunefx.analysis.propagate import ChannelAnalysis, Note
from prunefx.transformers.layers import attention_modules, decoder_layers

__all__ = ["whole_heads"]


def _layer_of(path: str, layers: list[str]) -> str:
    """The block an attention module at ``path`` belongs to: its layer in ``decoder_layers``,
    else (another stack of an encoder-decoder model) the path up to its last index."""
    found = next((p for p in layers if path.startswith(p + ".")), None)
    if found is not None:
        return found
    parts = path.split(".")
    last = max((i for i, part in enumerate(parts[:-1]) if part.isdigit()), default=len(parts) - 2)
    return ".".join(parts[: last + 1])


def whole_heads(model: nn.Module, analysis: ChannelAnalysis, prefix: str = "") -> ChannelAnalysis:
    """``analysis`` with the groups inside a head pinned (see the module docstring);
    ``prefix``: where ``model`` sits in the traced model (``base_model.model.`` in a PEFT model)."""
    attentions = [(prefix + name, attn, kind) for name, attn, kind in attention_modules(model)]
    if not attentions:
        return analysis
    layers = [prefix + path for path, _ in decoder_layers(model)]
    roots = [analysis.uf.find(m.ids) for m in analysis.members]
    tensors_of: dict[int, set[str]] = defaultdict(set)
    for m, r in zip(analysis.members, roots, strict=True):
        for root in np.unique(r):
            tensors_of[int(root)].add(m.tensor)
    notes = []
    for name, attn, kind in attentions:
        try:
            d = kind.head_dim(attn)
        except (AttributeError, TypeError, ValueError):
            continue
        path, layer = f"{name}.", _layer_of(name, layers)
        for m, r in zip(analysis.members, roots, strict=True):
            if not m.tensor.startswith(path) or d <= 1 or r.size % d:
                continue
            for head in r.reshape(-1, d):
                inside = np.unique(head)
                if inside.size > 1 and all(all(t.startswith(layer + ".") for t in tensors_of[int(x)]) for x in inside):
                    notes.append(Note(inside, m.node, (
                        f"a group inside a head of '{name}' ({type(attn).__name__}): transformers reads "
                        f"head_dim={d} from the config, so heads are kept or removed whole"
                    )))
    if not notes:
        return analysis
    return dataclasses.replace(analysis, pins=(*analysis.pins, *notes))
