"""Keep counts equal across layers: ``uniform_layers(graph, mask, scores=..., round_to=...)``.

Groups that play the same part in every layer have names that differ only in the layer index
(``model.layers.0.mlp.gate_proj``, ``model.layers.1.mlp.gate_proj``: the part
``model.layers.*.mlp.gate_proj``). Given any mask, every part's groups keep the same count

    n = the mean of their kept counts in ``mask``, rounded to the nearest multiple of
        ``round_to`` (at least ``round_to`` and at least 1, at most the group's size)

so the total kept is about what ``mask`` kept, and the pruned model has one size per field
(what a stock ``from_pretrained`` config expresses, and what fast kernels want: multiples of
8 or 64 channels, whole KV heads). Within a group the ``n`` channels kept are the
highest-scored (``scores``: a criterion name such as ``"magnitude"`` or a ``{group: scores}``
mapping), or, without scores, the ones ``mask`` kept first (lowest index first), then the
lowest-index dropped ones.

``round_to`` is one integer for every group or a ``{pattern: multiple}`` mapping of
``fnmatch`` patterns over group names, first match wins, others 1
(``{"*.mlp.*": 64}`` rounds MLP channels and leaves head counts alone). Groups absent from
``mask`` are not touched (pinned and protected groups keep their size); parts whose groups
have different sizes are a ``MaskError``.

Example (a transformers Llama; docs/transformers.md runs it)::

    graph = prunefx.trace(llama, (ids,), example_kwargs={"use_cache": False})
    mask = prunefx.masks.magnitude(graph, 0.5, scope="global", exact_only=True)
    mask = prunefx.masks.uniform_layers(graph, mask, scores="magnitude", round_to={"*.mlp.*": 8})
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from prunefx.errors import MaskError
from prunefx.graph import PruneGraph
from prunefx.masks.select import Mask

__all__ = ["uniform_layers", "layer_part"]

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$|#)")


def layer_part(name: str) -> str:
    """A group's name with its layer indices replaced by ``*``."""
    return _INDEX.sub("*", name)


def _keep_vector(name: str, value: Any, size: int) -> np.ndarray:
    keep = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
    if keep.dtype != np.bool_ or keep.shape != (size,):
        raise MaskError(f"uniform_layers: the mask of group '{name}' is not a bool vector of its {size} slots")
    return keep


def _multiple(name: str, round_to: int | Mapping[str, int]) -> int:
    if isinstance(round_to, Mapping):
        r = next((v for pattern, v in round_to.items() if fnmatch.fnmatchcase(name, pattern)), 1)
    else:
        r = round_to
    if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1:
        raise MaskError(f"uniform_layers: round_to must be an integer >= 1 (or a pattern -> integer mapping), got {r!r}")
    return int(r)


def _order(name: str, keep: np.ndarray, scores: Mapping[str, Any] | None) -> np.ndarray:
    """Slot indices, most wanted first."""
    if scores is not None and name in scores:
        s = scores[name]
        s = np.asarray(s.detach().cpu().double() if isinstance(s, torch.Tensor) else s, dtype=np.float64)
        if s.shape != keep.shape:
            raise MaskError(f"uniform_layers: scores for group '{name}' have shape {s.shape}; the group has {keep.size} slots")
        return np.argsort(-s, kind="stable")
    idx = np.arange(keep.size)
    return np.concatenate([idx[keep], idx[~keep]])


def _scores(graph: PruneGraph, scores: str | Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if scores is None or isinstance(scores, Mapping):
        return scores
    from prunefx.masks.budget import SCORERS

    if scores not in SCORERS:
        raise MaskError(f"uniform_layers: unknown criterion {scores!r}; use one of {sorted(SCORERS)} or a {{group: scores}} mapping")
    return SCORERS[scores][1](graph)


def uniform_layers(
    graph: PruneGraph,
    mask: Mapping[str, Any],
    *,
    scores: str | Mapping[str, Any] | None = None,
    round_to: int | Mapping[str, int] = 1,
) -> Mask:
    """``mask`` with the same keep count in every layer's group of one part (see the module
    docstring); keys must be group names."""
    score_map = _scores(graph, scores)
    parts: dict[str, list[tuple[str, np.ndarray]]] = {}
    for name, value in mask.items():
        group = graph.group(name)  # MaskError naming the closest groups if it is not one
        parts.setdefault(layer_part(group.name), []).append((group.name, _keep_vector(name, value, group.size)))
    out: Mask = {}
    for part, members in parts.items():
        sizes = {keep.size for _, keep in members}
        if len(sizes) > 1:
            raise MaskError(
                f"uniform_layers: the groups of '{part}' have different sizes {sorted(sizes)} "
                f"({', '.join(n for n, _ in members)}); no one count fits them"
            )
        size = sizes.pop()
        r = _multiple(members[0][0], round_to)
        n = float(np.mean([keep.sum() for _, keep in members]))
        n = int(np.floor(n + 0.5)) if r == 1 else max(r * int(np.floor(n / r + 0.5)), r)
        n = min(max(n, 1), size)
        for name, keep in members:
            new = np.zeros(size, dtype=bool)
            new[_order(name, keep, score_map)[:n]] = True
            out[name] = torch.from_numpy(new)
    return out
