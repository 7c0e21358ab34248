"""Checkpoints that carry the channel layout with the weights.

    state = prunefx.state_dict(small)              # {"state_dict": ..., "prunefx": layout}
    torch.save(state, "ckpt.pt")
    ...                                            # a fresh process
    model = build_original_architecture()
    small = prunefx.load_state_dict(model, torch.load("ckpt.pt", weights_only=True))

``load_state_dict`` traces the fresh model (on meta tensors shaped like the recorded example
inputs), turns the recorded kept indices into a mask over its channel groups, reconfigures
and loads the weights. The parameter order of the rebuilt model is that of the saved one, so
an optimizer state_dict saved beside it loads into an optimizer built on its parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunefx.errors import PruneFxError
from prunefx.graph import PruneGraph, trace
from prunefx.provenance import LAYOUT_ATTR, layout_of

__all__ = ["state_dict", "load_state_dict", "mask_from_layout"]


def state_dict(model: nn.Module) -> dict[str, Any]:
    """The model's state_dict plus its channel layout (None for a model never reconfigured)."""
    return {"state_dict": model.state_dict(), "prunefx": layout_of(model)}


def mask_from_layout(graph: PruneGraph, layout: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A mask over ``graph``'s groups that keeps exactly the recorded indices."""
    tensors = layout.get("tensors", {})
    mask: dict[str, torch.Tensor] = {}
    for group in graph.groups:
        for name, dim, index_map in group.members:
            entry = tensors.get(name)
            if entry is None:
                continue
            kept = entry["kept"].get(dim)
            if kept is None:
                break  # this member keeps every index: so does the group
            kept_set = set(torch.as_tensor(kept).tolist())
            mask[group.name] = torch.tensor([all(i in kept_set for i in row) for row in index_map], dtype=torch.bool)
            break
    return mask


def load_state_dict(model: nn.Module, state: dict[str, Any], *, strict: bool = True) -> nn.Module:
    """Rebuild the reconfigured model saved by ``state_dict`` from a fresh ``model`` of the
    original architecture, and load its weights; ``model`` itself is not modified. A state
    without a channel layout (a model never reconfigured) is loaded into ``model``, which is
    returned."""
    if not isinstance(state, dict) or "state_dict" not in state:
        raise PruneFxError("expected the dict returned by prunefx.state_dict(model)")
    layout, weights = state.get("prunefx"), state["state_dict"]
    if not layout:
        model.load_state_dict(weights, strict=strict)
        return model
    from prunefx.reconfigure import reconfigure

    inputs = tuple(torch.empty(x["shape"], dtype=getattr(torch, x["dtype"]), device="meta") for x in layout["inputs"])
    graph = trace(model, inputs)
    if layout.get("branches"):  # PruneTrain removed residual branches: remove them again first
        from prunefx.train.branches import replay_branches

        model = replay_branches(model, layout["branches"], graph)
        graph = trace(model, inputs)
    for name, entry in layout["tensors"].items():
        have = _shape(model, name)
        if have is not None and list(have) != list(entry["shape"]):
            raise PruneFxError(
                f"checkpoint was made from a model whose '{name}' has shape {entry['shape']}, but this model's is {list(have)}: "
                "build the original (never reconfigured) architecture before loading"
            )
    small = reconfigure(model, mask_from_layout(graph, layout), graph=graph)
    small.load_state_dict(weights, strict=strict)
    setattr(small, LAYOUT_ATTR, layout)
    return small


def _shape(model: nn.Module, name: str) -> torch.Size | None:
    try:
        return model.get_parameter(name).shape
    except AttributeError:
        try:
            return model.get_buffer(name).shape
        except AttributeError:
            return None
