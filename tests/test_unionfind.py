"""The vectorised union-find against networkx's connected components.

``UnionFind.union`` unites many pairs per call; pairs sharing a root race to write it, and
the call must still unite every pair. Roots must stay the smallest id of their class (group
names and slot orders depend on it).
"""

from __future__ import annotations

import networkx as nx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from prunefx.analysis.unionfind import UnionFind

# batches of pairs over a small id range, so that roots collide often
_BATCH = st.lists(st.tuples(st.integers(0, 39), st.integers(0, 39)), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(st.lists(_BATCH, min_size=1, max_size=6))
def test_union_matches_connected_components(batches: list[list[tuple[int, int]]]) -> None:
    uf = UnionFind(capacity=8)  # grows while ids are created
    ids = uf.fresh(40)
    graph = nx.Graph()
    graph.add_nodes_from(range(40))
    for batch in batches:
        a, b = (np.array(side) for side in zip(*batch, strict=True))
        uf.union(ids[a], ids[b])
        graph.add_edges_from(batch)
    roots = uf.find(ids)
    for component in nx.connected_components(graph):
        members = sorted(component)
        assert set(roots[members].tolist()) == {members[0]}, f"class {members} has roots {set(roots[members].tolist())}"


def test_union_broadcasts_and_unite_all_returns_the_smallest_id() -> None:
    uf = UnionFind()
    a, b = uf.fresh(3), uf.fresh(3)
    uf.union(b[:, None], a[:1])  # every id of b with a[0]
    assert uf.find(b).tolist() == [0, 0, 0] and uf.find(a).tolist() == [0, 1, 2]
    assert uf.unite_all(np.array([5, 2, 4])) == 0
    assert uf.find(np.arange(6)).tolist() == [0, 1, 0, 0, 0, 0]
