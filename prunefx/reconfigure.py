"""``reconfigure`` and ``apply_mask``: the whole pipeline, one step per line.

    trace -> shapes -> channel analysis -> mask resolution -> plan -> passes -> GraphModule

``apply_mask`` is the reference semantics: it zeroes, in place, every parameter that *writes*
a masked channel. ``reconfigure`` removes those channels instead; whenever every masked group
is exact, ``reconfigure(model, mask)(x) == apply_mask(copy, mask)(x)`` to float rounding.

Example::

    >>> import copy, torch, torchvision, prunefx
    >>> model = torchvision.models.resnet18().eval()
    >>> x = torch.randn(1, 3, 64, 64)
    >>> mask = {"layer1.0.conv1": torch.arange(64) % 2 == 0}
    >>> small = prunefx.reconfigure(model, mask, example_inputs=x)
    >>> ref = prunefx.apply_mask(copy.deepcopy(model), mask, example_inputs=x)
    >>> torch.allclose(small(x), ref(x), atol=1e-5)
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from prunefx import peft
from prunefx.analysis.propagate import Role
from prunefx.checkpoint import record_capture
from prunefx.errors import MaskError, ReconfigureError
from prunefx.frontends.detection import emit_detection, is_detection
from prunefx.graph import PruneGraph, trace
from prunefx.guards import refuse_foreign_graph
from prunefx.mask import Keep, resolve_mask
from prunefx.passes import DEFAULT_PIPELINE, Pipeline, RewriteState
from prunefx.plan import make_plan
from prunefx.tracing import transformers_models
from prunefx.wrappers import rewrap_compiled, unwrap_compiled, unwrapped

__all__ = ["reconfigure", "apply_mask"]


def _graph_for(
    model: nn.Module, graph: PruneGraph | None, example_inputs: Any, leaf_modules: Iterable[Any], concrete_args: Any,
    example_kwargs: dict[str, Any] | None = None, frontend: str = "auto", same_tensors: bool = True,
) -> PruneGraph:
    _refuse_prune_hooks(model)
    if graph is not None:
        refuse_foreign_graph(model, graph, same_tensors=same_tensors)  # traced from another instance
        return graph
    return trace(model, example_inputs, example_kwargs=example_kwargs, frontend=frontend, leaf_modules=leaf_modules, concrete_args=concrete_args)


def _refuse_prune_hooks(model: nn.Module) -> None:
    """torch.nn.utils.prune replaces `weight` by a hook-computed attribute: it can be traced
    (the masks interop reads it) but not sliced or zeroed."""
    from torch.nn.utils.prune import BasePruningMethod

    if not isinstance(model, nn.Module):
        return  # symbolic_trace says what is wrong
    for name, m in model.named_modules():
        if any(isinstance(h, BasePruningMethod) for h in m._forward_pre_hooks.values()):
            raise MaskError(
                f"module '{name}' carries torch.nn.utils.prune re-parametrisation (weight_orig/weight_mask): "
                "convert it with prunefx.masks.from_torch_prune(graph_or_model, ...) and strip it with "
                "prunefx.masks.strip_torch_prune(model) (or torch.nn.utils.prune.remove) before reconfiguring"
            )


def reconfigure(
    model: nn.Module,
    mask: Mapping[str, Any],
    *,
    example_inputs: Any = None,
    example_kwargs: dict[str, Any] | None = None,
    frontend: str = "auto",
    optimizer: torch.optim.Optimizer | None = None,
    policy: str = "union",
    graph: PruneGraph | None = None,
    leaf_modules: Iterable[Any] = (),
    concrete_args: dict[str, Any] | None = None,
    pipeline: Pipeline = DEFAULT_PIPELINE,
    emit: str = "auto",
) -> nn.Module:
    """A new, dense, smaller model without the channels ``mask`` drops.

    ``emit="graph"`` returns a GraphModule whose submodule names match ``model``'s;
    ``emit="module"`` a copy of ``model`` of the same class with every size attribute
    updated (checked against the graph result; ``ReconfigureError`` names what cannot be
    expressed); ``emit="auto"`` the module for a transformers ``PreTrainedModel`` (or a model
    holding one) and a PEFT model, a torchvision detection model (checked against the masked
    model through its detection API) and a model whose forward checkpoints activations
    (``torch.utils.checkpoint``: a graph would keep every activation; when the class cannot
    hold the pruned sizes, the graph with a warning), the graph otherwise. ``example_kwargs``
    and ``frontend`` are passed to ``prunefx.trace``. ``model``
    is never modified. Pass ``graph=prunefx.trace(model, x)`` to reuse an analysis. With
    ``optimizer``, its param_groups and per-parameter state are re-pointed to the new
    parameters and sliced alike, in place. On any error nothing is changed.
    """
    model, compiled = unwrap_compiled(model)  # compiled again below, as it came
    model = unwrapped(model, "prunefx.reconfigure")
    emitter = _emitter(model, emit)
    g = _graph_for(model, graph, example_inputs, leaf_modules, concrete_args, example_kwargs, frontend)  # trace, shapes, analysis
    for_checkpoints = emitter == "graph" and bool(g.traced.checkpoints)  # its own forward keeps them
    if for_checkpoints and emit == "graph":
        warnings.warn(f"prunefx: {_checkpoints_lost(model, g)}; emit='module' (or 'auto') keeps them", stacklevel=2)
    elif for_checkpoints:
        emitter = "module"
    if emitter == "graph" and g.frontend == "export" and model.training != g.traced.training:
        warnings.warn(f"prunefx: {_mode_held(model, g)}", stacklevel=2)
    keep = resolve_mask(g, mask, policy)  # mask resolution (validates everything first)
    plan = make_plan(g.analysis, keep)  # kept indices and new shapes
    state = pipeline.run(RewriteState.start(plan, g.origin, g.example_inputs))  # slice, rebuild, fix args, DCE, assemble, record
    assert state.result is not None
    if emitter == "module" and is_detection(model):  # the emitted backbone and heads, put back into the detection model
        state.result = emit_detection(model, g, state)
    elif emitter == "module":  # the same class as `model`, holding the sliced tensors; checked before it is returned
        from prunefx.emit import emit_module

        try:
            state.result = emit_module(model, g, state)
        except ReconfigureError as exc:
            if not for_checkpoints:
                raise
            warnings.warn(f"prunefx: {_checkpoints_lost(model, g)}; a GraphModule is returned all the same, since "
                          f"{type(model).__name__}'s own forward cannot run the pruned sizes ({str(exc).splitlines()[0]})",
                          stacklevel=2)
    record_capture(state.result, g)  # how load_state_dict traces a fresh model alike (export: keyword inputs)
    if optimizer is not None:
        from prunefx.optim import repoint_optimizer

        repoint_optimizer(optimizer, state)
    return rewrap_compiled(state.result, compiled)


def _checkpoints_lost(model: nn.Module, g: PruneGraph) -> str:
    where = ", ".join(g.traced.checkpoints[:2]) + (", ..." if len(g.traced.checkpoints) > 2 else "")
    return (f"{type(model).__name__} checkpoints activations (torch.utils.checkpoint at {where}), which a GraphModule "
            "cannot keep: it computes the same values but keeps every activation for backward")


def _mode_held(model: nn.Module, g: PruneGraph) -> str:
    held, now = ("training", "evaluation") if g.traced.training else ("evaluation", "training")
    why = " (a transformers model is captured in evaluation mode)" if transformers_models(model) and not g.traced.training else ""
    return (f"{type(model).__name__} is in {now} mode, but torch.export captured its graph in {held} mode{why}: the "
            f"GraphModule runs {held}-mode dropout and BatchNorm whatever .train()/.eval() says; emit='module' (or "
            f"'auto') gives a model that follows its mode")


def _emitter(model: nn.Module, emit: str) -> str:
    """``emit="auto"``: the module emitter for a Hugging Face ``PreTrainedModel`` or a model
    holding one, and a PEFT model (a pruned transformers or PEFT model must stay one), and a
    torchvision detection model (only ever a module), the graph emitter otherwise."""
    if emit not in ("auto", "graph", "module"):
        raise MaskError(f"emit must be 'auto', 'graph' or 'module', got {emit!r}")
    if is_detection(model):
        if emit == "graph":
            raise ReconfigureError(
                f"{type(model).__name__} is a torchvision detection model: it is reconfigured into a copy of its own class "
                "(emit='module' or 'auto'), since its image list, anchors and NMS are not a graph"
            )
        return "module"
    if emit != "auto":
        return emit
    return "module" if transformers_models(model) or peft.holds_peft_layers(model) else "graph"


def apply_mask(
    model: nn.Module,
    mask: Mapping[str, Any],
    *,
    example_inputs: Any = None,
    example_kwargs: dict[str, Any] | None = None,
    frontend: str = "auto",
    policy: str = "union",
    graph: PruneGraph | None = None,
    leaf_modules: Iterable[Any] = (),
    concrete_args: dict[str, Any] | None = None,
) -> nn.Module:
    """Zero, in place, every parameter that writes a channel ``mask`` drops ("soft
    pruning"); returns ``model``."""
    inner = unwrapped(model, "prunefx.apply_mask")  # (torch.compile's wrapper: the model inside)
    # the graph's structure on model's own tensors: a graph of an identical copy is fine
    g = _graph_for(inner, graph, example_inputs, leaf_modules, concrete_args, example_kwargs, frontend, same_tensors=False)
    zero_dropped(inner, g, resolve_mask(g, mask, policy))
    return model


def zero_dropped(model: nn.Module, g: PruneGraph, keep: Keep) -> None:
    """Zero, in place, every parameter/buffer slice of ``model`` that writes a channel
    ``keep`` drops (``g`` is ``model``'s graph)."""
    state = dict((*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for m in g.analysis.members:
            if m.role is not Role.WRITE:
                continue
            dropped = np.nonzero(~keep.of(g.analysis.uf.find(m.ids)))[0]
            if dropped.size:
                t = state[m.tensor]
                t.index_fill_(m.dim, torch.as_tensor(dropped, device=t.device), 0)
