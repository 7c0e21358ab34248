"""``prunefx.trace``: the analysis half of the pipeline, and its result ``PruneGraph``.

    trace -> shapes -> channel analysis -> groups

Example::

    >>> import torch, torchvision, prunefx
    >>> g = prunefx.trace(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    >>> g.group_of("layer1.0.conv1")
    ChannelGroup('layer1.0.conv1', size=64, prunable, members=6)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from prunefx.analysis import ChannelAnalysis, ChannelGroup, analyze, build_groups
from prunefx.errors import MaskError, TraceError
from prunefx.flops import NodeCost, node_costs
from prunefx.frontends.detection import detection_leaves, is_detection, surrogate, surrogate_inputs
from prunefx.nn import LEAF_MODULES
from prunefx.peft import holds_peft_layers
from prunefx.provenance import layout_of
from prunefx.shapes import Shapes, propagate_shapes
from prunefx.tracing import Traced, guess_example_inputs, symbolic_trace, transformers_models
from prunefx.wrappers import unwrapped

__all__ = ["PruneGraph", "trace", "FRONTENDS"]

Held = list[tuple[str, nn.Module]] | None  # the transformers models a model holds (tracing.transformers_models)


class PruneGraph:
    """The traced model with its channel groups. Build it with ``prunefx.trace``."""

    def __init__(
        self, traced: Traced, shapes: Shapes, analysis: ChannelAnalysis, example_inputs: tuple[Any, ...], origin: dict | None = None,
        example_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.traced = traced
        # the example inputs in the model's own calling convention, when the graph is of a
        # surrogate (a torchvision detection model: its list of images); set by the front-end
        self.model_inputs: Any = None
        self.example_kwargs = dict(example_kwargs or {})  # keyword inputs of forward (export front-end)
        self.origin = origin  # channel layout of a model that was reconfigured before
        self.shapes = shapes
        self.analysis = analysis
        self.example_inputs = example_inputs
        self._table = build_groups(analysis)

    @functools.cached_property
    def node_costs(self) -> dict[fx.Node, NodeCost]:
        """FLOPs and output bytes of every node of ``self.module`` on the example inputs
        (``prunefx.flops.node_costs``), computed once, on first use, for everything that
        needs them: the inspector, ``prunefx.masks``' cost model, ``shrink``."""
        return node_costs(self.module, self.flat_inputs)

    @property
    def flat_inputs(self) -> tuple[Any, ...]:
        """The values ``self.module``'s placeholders take, in order: the positional example
        inputs (fx), or the leaves of (inputs, keyword inputs) (export)."""
        if self.traced.frontend != "export":
            return tuple(self.example_inputs)
        return tuple(pytree.tree_leaves((tuple(self.example_inputs), self.example_kwargs)))

    @property
    def frontend(self) -> str:
        """The front-end that captured the model: "fx" or "export"."""
        return self.traced.frontend

    @property
    def module(self) -> fx.GraphModule:
        """The torch.fx GraphModule (submodules are the traced model's own)."""
        return self.traced.module

    @property
    def groups(self) -> tuple[ChannelGroup, ...]:
        """Every channel group, in graph order."""
        return self._table.groups

    def group(self, name: str) -> ChannelGroup:
        """The group called ``name``."""
        try:
            return self._table.by_name[name]
        except KeyError:
            raise MaskError(f"no channel group named '{name}'{_closest(name, self.names())}") from None

    def groups_of(self, name: str) -> tuple[ChannelGroup, ...]:
        """Every group holding some output channel of module ``name`` (several after a split,
        or for a module called at several places)."""
        from prunefx.mask import _call_sites

        ids = self.analysis.module_outputs.get(name)
        if ids is None:
            raise MaskError(f"module '{name}' has no tracked output channels{_closest(name, self.names())}")
        # a module called at several places (one shared nn.ReLU): the groups of every call
        roots = [r for _, channels in _call_sites(self, name) for r in channels] or self.analysis.uf.find(ids).tolist()
        seen: dict[int, ChannelGroup] = {}
        for r in roots:
            g = self._table.group_of(r)
            if g is not None:
                seen.setdefault(id(g), g)
        return tuple(seen.values())

    def group_of(self, name: str) -> ChannelGroup:
        """The group holding the output channels of module ``name`` (a producer such as
        "layer1.0.conv1" or a pass-through such as "layer1.0.bn1"); a group name works too.
        When a split spreads the module's outputs over several groups, the one holding its
        first channel. A module called at several places on different channels (one shared
        ``nn.ReLU``) is a MaskError listing the call sites."""
        if name in self._table.by_name and name not in self.analysis.module_outputs:
            return self._table.by_name[name]
        _refuse_ambiguous(self, name)
        found = self.groups_of(name)
        if not found:
            raise MaskError(f"the output channels of '{name}' belong to no channel group (they touch no parameter)")
        return found[0]

    def output_channels(self, name: str) -> np.ndarray:
        """Union-find roots of module ``name``'s output channels, in channel order."""
        ids = self.analysis.module_outputs.get(name)
        if ids is None:
            raise MaskError(f"'{name}' is neither a channel group nor a module with output channels{_closest(name, self.names())}")
        _refuse_ambiguous(self, name)
        return self.analysis.uf.find(ids)

    def names(self) -> list[str]:
        """Every valid mask key: group names, then module names."""
        return list(dict.fromkeys([*self._table.by_name, *self.analysis.module_outputs]))

    def is_pinned(self, roots: np.ndarray) -> np.ndarray:
        return self._table.pin_reason[roots] >= 0

    def pin_reason(self, root: int) -> str:
        note = self.analysis.pins[self._table.pin_reason[root]]
        return f"{note.why} ({self.traced.where(note.node)})" if note.node is not None else note.why

    def __repr__(self) -> str:
        n = len(self.groups)
        p = sum(g.prunable for g in self.groups)
        e = sum(g.prunable and g.exact for g in self.groups)
        return f"PruneGraph({self.module.__class__.__name__}: {len(self.module.graph.nodes)} nodes, {n} groups, {p} prunable, {e} exact)"


def _refuse_ambiguous(graph: PruneGraph, name: str) -> None:
    """MaskError listing the call sites when module ``name`` is called on different channels."""
    from prunefx.mask import _refuse_ambiguous as refuse

    refuse(graph, name)


def _closest(name: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _as_tuple(example_inputs: Any) -> tuple[Any, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    return (example_inputs,)


FRONTENDS = ("auto", "fx", "export")


def trace(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    frontend: str = "auto",
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> PruneGraph:
    """Trace ``model`` and find its channel groups.

    ``example_inputs`` is a Tensor or a tuple of positional inputs, ``example_kwargs`` the
    keyword inputs of ``forward`` (e.g. ``{"use_cache": False}``). With the fx front-end only
    their shapes and dtypes are used (shapes propagate on meta tensors); when omitted, they are
    inferred from the first layer (a Conv2d(C, ...) gives (1, C, 224, 224)); a TraceError says
    when that is not possible. ``frontend``: "fx" (``torch.fx.symbolic_trace``), "export"
    (``torch.export``, an aten-level graph, for models fx cannot trace, such as Hugging Face
    transformers) or "auto" (fx, and export when fx cannot trace the model, for a transformers
    model or one holding PEFT layers, or when keyword inputs are given; ``graph.frontend`` says which ran). ``leaf_modules`` (types or qualified names,
    fx only) are kept opaque: their channels are pinned.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    model = unwrapped(model, "prunefx.trace")  # (torch.compile's wrapper: the model inside)
    if frontend not in FRONTENDS:
        raise TraceError(f"frontend must be one of {', '.join(map(repr, FRONTENDS))}, got {frontend!r}")
    kwargs = dict(example_kwargs or {})
    if is_detection(model):
        return _trace_detection(model, example_inputs, kwargs, frontend, leaf_modules)
    if frontend == "fx" and kwargs:
        raise TraceError("the fx front-end takes positional example inputs only; pass frontend='export' (or 'auto') for example_kwargs")
    inner = transformers_models(model)  # (one walk for the front-end's choice and the heads)
    # plain fx traces neither transformers nor PEFT's tuner layers (they branch on x.dtype)
    if frontend == "export" or (frontend == "auto" and (kwargs or inner or holds_peft_layers(model))):
        return _trace_export(model, _as_tuple(example_inputs), kwargs, inner)
    try:
        traced = symbolic_trace(model, leaf_modules=(*leaf_modules, *LEAF_MODULES), concrete_args=concrete_args)
    except TraceError as fx_error:
        if frontend == "fx" or example_inputs is None:
            raise
        try:
            graph = _trace_export(model, _as_tuple(example_inputs), kwargs, inner)
        except TraceError as export_error:
            raise TraceError(f"{fx_error}\n  torch.export could not capture it either: {str(export_error).splitlines()[0]}") from fx_error
        warnings.warn(f"prunefx: {str(fx_error).splitlines()[0]}; captured with torch.export instead (frontend='export')", stacklevel=2)
        return graph
    return _trace_fx(model, traced, example_inputs, inner)


def _trace_detection(model: nn.Module, example_inputs: Any, kwargs: dict[str, Any], frontend: str, leaf_modules: Iterable[Any]) -> PruneGraph:
    """A torchvision detection model: its channel-carrying parts, as one surrogate module
    (``prunefx.frontends.detection``), on the model's transformed example images."""
    if kwargs:
        raise TraceError(f"{type(model).__name__} takes no keyword example inputs (example_kwargs): pass example_inputs=[image, ...]")
    sur = surrogate(model)
    inputs = surrogate_inputs(model, example_inputs)
    if frontend == "export":
        graph = _trace_export(sur, inputs, {})
    else:
        leaves = (*leaf_modules, *LEAF_MODULES, *detection_leaves())
        graph = _trace_fx(sur, symbolic_trace(sur, leaf_modules=leaves), inputs)
    graph.model_inputs = example_inputs
    return graph


def _trace_export(model: nn.Module, args: tuple[Any, ...] | None, kwargs: dict[str, Any], inner: Held = None) -> PruneGraph:
    from prunefx.frontends.export import export_trace

    if args is None and not kwargs:
        raise TraceError(f"the export front-end needs example inputs: pass example_inputs=(tensor, ...) (and example_kwargs) for {type(model).__name__}")
    args = args or ()
    traced, flat = export_trace(model, args, kwargs)
    shapes = propagate_shapes(traced, flat)
    analysis = _model_constraints(model, analyze(traced, shapes), inner)
    return PruneGraph(traced, shapes, analysis, args, origin=layout_of(model), example_kwargs=kwargs)


def _trace_fx(model: nn.Module, traced: Traced, example_inputs: Any, inner: Held = None) -> PruneGraph:
    inputs = _as_tuple(example_inputs)
    if inputs is None:
        inputs = guess_example_inputs(traced.module)
        if inputs is None:
            raise TraceError(
                f"cannot infer example inputs for {type(model).__name__}: its inputs do not feed a "
                "Conv/Linear/Embedding layer directly. Pass example_inputs=(tensor, ...)."
            )
    try:
        shapes = propagate_shapes(traced, inputs)
    except TraceError as exc:
        if traced.other is None:
            raise
        # the input fits the current mode but not the other one (e.g. an auxiliary head
        # that needs a larger input in training): keep the current mode only
        warnings.warn(
            f"prunefx: {type(model).__name__} in {'evaluation' if traced.training else 'training'} mode does not run on "
            f"these example inputs ({str(exc).splitlines()[0]}); the reconfigured model reproduces only the "
            f"{'training' if traced.training else 'evaluation'} mode",
            stacklevel=2,
        )
        traced = dataclasses.replace(traced, other=None)
        shapes = propagate_shapes(traced, inputs)
    analysis = _model_constraints(model, analyze(traced, shapes), inner)
    return PruneGraph(traced, shapes, analysis, inputs, origin=layout_of(model))


def _model_constraints(model: nn.Module, analysis: ChannelAnalysis, inner: Held = None) -> ChannelAnalysis:
    """What the graph cannot say about the model: a transformers model keeps its heads
    whole (``prunefx.transformers.heads``), also inside a PEFT model or a wrapper (``inner``:
    ``transformers_models(model)`` when the caller has it)."""
    inner = transformers_models(model) if inner is None else inner
    if not inner:
        return analysis
    from prunefx.transformers.heads import whole_heads

    for prefix, hf in inner:
        analysis = whole_heads(hf, analysis, prefix)
    return analysis
