"""The channel-layout record a reconfigured model carries.

A GraphModule returned by ``reconfigure`` has the attribute ``LAYOUT_ATTR``: a dict of plain
lists/ints/tensors (so it survives ``torch.load(weights_only=True)``)::

    {"version": 1,
     "inputs": [{"shape": [1, 3, 224, 224], "dtype": "float32"}, ...],
     "tensors": {"layer1.0.conv1.weight": {"shape": [64, 64, 1, 1],      # in the original model
                                           "kept": {0: tensor([0, 2, ...])}}, ...}}

``kept[dim]`` are indices of the original tensor's ``dim`` that the model keeps.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["LAYOUT_ATTR", "layout_of"]

LAYOUT_ATTR = "_prunefx_layout"


def layout_of(model: nn.Module) -> dict[str, Any] | None:
    return getattr(model, LAYOUT_ATTR, None)
