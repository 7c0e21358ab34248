"""Vectorised union-find over integer channel ids.

Every channel slot the analysis creates is an integer id. Ids that must be kept or removed
together are united. Roots are always the smallest id of their class (``union`` links the
larger root under the smaller), so classes have a stable, graph-ordered representative.

    >>> uf = UnionFind(); a = uf.fresh(3); b = uf.fresh(3)
    >>> uf.union(a, b); uf.find(b).tolist()
    [0, 1, 2]
"""

from __future__ import annotations

import numpy as np

__all__ = ["UnionFind"]


class UnionFind:
    def __init__(self, capacity: int = 4096) -> None:
        self._parent = np.arange(capacity, dtype=np.int64)
        self.size = 0

    def fresh(self, count: int) -> np.ndarray:
        """``count`` new singleton ids."""
        start, stop = self.size, self.size + count
        if stop > len(self._parent):
            grown = np.arange(max(stop, 2 * len(self._parent)), dtype=np.int64)
            grown[: self.size] = self._parent[: self.size]
            self._parent = grown
        self.size = stop
        return np.arange(start, stop, dtype=np.int64)

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Roots of ``ids`` (any shape), compressing paths on the way."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.ravel()
        root = self._parent[flat]
        while True:
            up = self._parent[root]
            if (up == root).all():
                break
            root = up
        self._parent[flat] = root
        return root.reshape(ids.shape)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Unite ``a[i]`` with ``b[i]`` for every i (arrays broadcast against each other)."""
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        if a.shape != b.shape:
            a, b = np.broadcast_arrays(a, b)
        a, b = a.ravel(), b.ravel()
        while True:
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not differ.any():
                return
            ra, rb = ra[differ], rb[differ]
            lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
            self._parent[hi] = lo
            # Several pairs may share a `hi`: the last write wins, and the loop unites the rest.
            # When every write stuck, every pair is linked (links only point to smaller ids).
            if (self._parent[hi] == lo).all():
                return

    def unite_all(self, ids: np.ndarray) -> int:
        """Unite every id in ``ids`` into one class; returns its root."""
        flat = np.asarray(ids, dtype=np.int64).ravel()
        self.union(flat[:1], flat)
        return int(self.find(flat[:1])[0])
