"""SliceTensors: new parameters and buffers holding only the kept channels.

    W_new = W.index_select(d, kept_d) for every pruned dim d of W

Every tensor is copied (sliced or cloned), so the result shares no storage with the input
model. Parameters stay Parameters with the same ``requires_grad``; device, dtype and a
channels-last memory format are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunefx.passes.base import Pass, RewriteState

__all__ = ["SliceTensors", "slice_tensor"]


def slice_tensor(t: torch.Tensor, index: dict[int, torch.Tensor] | None) -> torch.Tensor:
    # normal tensors even under torch.inference_mode(), so the result can be trained
    with torch.inference_mode(False), torch.no_grad():
        return _sliced(t, index)


def _sliced(t: torch.Tensor, index: dict[int, torch.Tensor] | None) -> torch.Tensor:
    """``slice_tensor`` without its grad-mode context (the caller holds it)."""
    new = t.detach()
    if not index:
        new = new.clone()
    else:
        for dim, idx in sorted(index.items()):
            new = new.index_select(dim, idx if idx.device == new.device else idx.to(new.device))
    if new.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        new = new.contiguous(memory_format=torch.channels_last)
    if isinstance(t, nn.Parameter):
        return nn.Parameter(new, requires_grad=t.requires_grad)
    return new


@dataclass(frozen=True)
class SliceTensors(Pass):
    def run(self, state: RewriteState) -> None:
        index = state.plan.index
        with torch.inference_mode(False), torch.no_grad():  # once for every tensor
            for name, t in state.source_tensors().items():
                state.tensors[name] = _sliced(t, index.get(name))

    def verify(self, state: RewriteState) -> None:
        for name, idx in state.plan.index.items():
            t = state.tensors[name]
            for dim, kept in idx.items():
                assert t.shape[dim] == len(kept), f"{name} dim {dim}: {t.shape[dim]} != {len(kept)}"
