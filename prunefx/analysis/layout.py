"""Channel layouts: which channel ids live on which dims of a tensor.

A ``Layout`` describes one tensor value of the graph. It is a tuple of ``Factor``s; a factor
covers one or more tensor dims (sorted ascending) and holds an integer array ``ids`` whose
shape is the tensor's size on those dims: ``ids[i, j]`` is the channel id of the slice at index
i of the first dim and j of the second. A factor over several dims (a *grid*) arises when a
reshape splits a channel dim, e.g. (B, C) -> (B, heads, C/heads) or a channel shuffle.

Dims that no factor covers carry no ids: their size never changes under pruning. A tensor
whose channels are not tracked at all (a model input, a value from an op prunefx does not
know) therefore has a fixed shape, and every rule must pin ids it cannot map.

``zero`` says whether masked channels are exactly zero in this tensor under ``apply_mask``
(which zeroes every parameter that writes a masked channel). A layer that *reads* a masked
channel that is not zero (sigmoid(0) = 0.5) sees a constant that removal would drop: the
rules mark such channels inexact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

__all__ = ["Factor", "Layout", "EMPTY", "reshape_blocks"]


@dataclass(frozen=True, eq=False)
class Factor:
    dims: tuple[int, ...]
    ids: np.ndarray  # shape == tuple(tensor.shape[d] for d in dims)

    def axis(self, dim: int) -> int:
        return self.dims.index(dim)


@dataclass(frozen=True, eq=False)
class Layout:
    factors: tuple[Factor, ...] = ()
    zero: bool = True

    def on(self, dim: int) -> Factor | None:
        """The factor covering ``dim``, if any."""
        for f in self.factors:
            if dim in f.dims:
                return f
        return None

    @property
    def dims(self) -> frozenset[int]:
        return frozenset(d for f in self.factors for d in f.dims)

    def with_zero(self, zero: bool) -> Layout:
        return self if zero == self.zero else replace(self, zero=zero)

    def all_ids(self) -> list[np.ndarray]:
        return [f.ids for f in self.factors]

    def permute(self, perm: Sequence[int]) -> Layout:
        """Layout of ``x.permute(perm)``: output dim i is input dim perm[i]."""
        where = {src: dst for dst, src in enumerate(perm)}
        out = []
        for f in self.factors:
            new_dims = [where[d] for d in f.dims]
            order = np.argsort(new_dims)
            out.append(Factor(tuple(new_dims[k] for k in order), np.transpose(f.ids, order)))
        return Layout(tuple(out), self.zero)

    def shift(self, mapping: dict[int, int]) -> Layout:
        """Renumber dims (for squeeze/unsqueeze); dims missing from ``mapping`` must carry no ids."""
        return Layout(tuple(Factor(tuple(mapping[d] for d in f.dims), f.ids) for f in self.factors), self.zero)


EMPTY = Layout((), True)


def reshape_blocks(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Minimal runs of dims with equal element counts on both sides of a reshape.

    >>> reshape_blocks((2, 6, 4), (2, 3, 8))
    [([0], [0]), ([1, 2], [1, 2])]
    """
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        ins: list[int] = []
        outs: list[int] = []
        pa = pb = 1
        if i < len(src):
            ins.append(i)
            pa *= src[i]
            i += 1
        if j < len(dst):
            outs.append(j)
            pb *= dst[j]
            j += 1
        while pa != pb:
            if (pa < pb and i < len(src)) or j >= len(dst):
                ins.append(i)
                pa *= src[i]
                i += 1
            else:
                outs.append(j)
                pb *= dst[j]
                j += 1
        blocks.append((ins, outs))
    return blocks
