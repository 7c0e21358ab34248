"""Optimizer-state checks shared by the PruneTrain tests on transformers models: which indices
of the original model each tensor holds (its channel layout record), and a pre-shrink tensor
sliced to the indices the shrunk model kept."""

from __future__ import annotations

import torch

from prunefx.provenance import layout_of


def kept_indices(model, name: str, shape: torch.Size) -> list[torch.Tensor]:
    """Per dim of tensor ``name``, the indices of the original model it holds (layout records)."""
    entry = ((layout_of(model) or {}).get("tensors") or {}).get(name)
    kept = {} if entry is None else entry["kept"]
    return [torch.as_tensor(kept[d]) if kept.get(d) is not None else torch.arange(n) for d, n in enumerate(shape)]


def sliced_to(t: torch.Tensor, old: list[torch.Tensor], new: list[torch.Tensor]) -> torch.Tensor:
    """``t`` (a tensor of the pre-shrink model) at the indices the shrunk model kept."""
    for d, (o, n) in enumerate(zip(old, new, strict=True)):
        at = torch.searchsorted(o, n)
        assert torch.equal(o[at], n), "the shrunk model holds an index the model before it did not"
        t = t.index_select(d, at)
    return t
