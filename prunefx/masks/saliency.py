"""Gradient-based criteria: first-order Taylor, SNIP, and EarlyCroP's gradient flow.

All three need a loss: pass ``batch=(inputs, target)`` or ``batches=[...]`` and
``loss_fn(output, target)`` (e.g. ``torch.nn.CrossEntropyLoss()``); ``inputs`` is a tensor,
a tuple of positional inputs or a dict of keyword inputs. The graph's ``example_kwargs``
(``use_cache=False``) join every call; a batch's own keyword inputs win. For a language
model, ``loss_fn=causal_lm_loss`` and ``batch=(input_ids, input_ids)``: the next-token
cross-entropy of the calibration text. The model run is ``graph.module`` (its parameters are
the traced model's own; an export capture returns the model's own output type, e.g.
``CausalLMOutputWithPast``) unless ``model=`` is given; gradients come from ``torch.autograd.grad``,
so the model's ``.grad`` fields are left alone. The model is run in whatever mode
(train/eval) it is in. Sums run over every weight of every member of the group
(``m[c]`` = the slice of member m holding channel c).

- ``taylor``: Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning":
  the first-order change of the loss when channel c is removed,
  ``s_c = mean_batches ( sum_m sum_{w in m[c]} w * dL/dw )^2``.
- ``snip``: Lee et al. 2019, "SNIP: Single-shot Network Pruning based on Connection
  Sensitivity", summed per channel: ``s_c = sum_m sum_{w in m[c]} |w * dL/dw|`` with the
  gradient summed over the batches.
- ``gradient_flow``: Rachwan et al. 2022, "Winning the Lottery Ahead of Time: Efficient Early
  Network Pruning" (EarlyCroP, structured). A gate ``a_c`` on each channel's output,
  realised as scaling every parameter that writes channel c (its filter, bias and norm
  affine), scores ``s_c = | d/da_c ( g_const^T g(theta, a) ) |`` at ``a = 1``, where
  ``g = sum_batches dL/dtheta`` and ``g_const`` is g held constant. By Euler's identity for a
  scaling gate this is ``| sum_{w writes c} ( w * (H g)_w + g_w^2 ) |`` with ``H g`` a
  Hessian-vector product (double backward). Its trigger (when to prune early in training) is
  ``prunefx.masks.WeightDistancePlateau``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from prunefx.graph import PruneGraph
from prunefx.masks.channels import WEIGHT_ROLES, along, channel_sums
from prunefx.masks.select import Mask, select

__all__ = ["taylor", "snip", "gradient_flow", "taylor_scores", "snip_scores", "gradient_flow_scores", "causal_lm_loss"]

LossFn = Callable[[Any, Any], torch.Tensor]


def _batch_list(batch: Any, batches: Iterable[Any] | None) -> list[Any]:
    if (batch is None) == (batches is None):
        raise ValueError("pass exactly one of batch=(inputs, target) or batches=[(inputs, target), ...]")
    out = [batch] if batch is not None else list(batches)  # type: ignore[arg-type]
    if not out:
        raise ValueError("batches is empty: the criterion needs at least one (inputs, target) batch")
    for b in out:
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise ValueError(f"a batch is (inputs, target); got {type(b).__name__} of length {len(b) if hasattr(b, '__len__') else '?'}")
    return out


def causal_lm_loss(output: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """The next-token cross-entropy of a causal language model: ``output``'s logits at
    position t scored against ``input_ids[:, t + 1]`` (labels of -100 are ignored, as in
    transformers). ``output`` is a transformers ``ModelOutput`` with ``logits``, a tuple
    whose first element is the logits, or the logits tensor (batch, sequence, vocabulary)."""
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 3 and isinstance(input_ids, torch.Tensor)
            and input_ids.shape == logits.shape[:2]):
        raise ValueError(
            "causal_lm_loss takes the model's output (logits of shape (batch, sequence, vocabulary)) and the input ids "
            f"(batch, sequence); got logits {tuple(getattr(logits, 'shape', ()))} and ids "
            f"{tuple(getattr(input_ids, 'shape', ()))}"
        )
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), ignore_index=-100)


def _loss(model: nn.Module, batch: Sequence[Any], loss_fn: LossFn, kwargs: Mapping[str, Any]) -> torch.Tensor:
    inputs, target = batch
    if isinstance(inputs, Mapping):
        out = model(**{**kwargs, **inputs})
    else:
        out = model(*inputs, **kwargs) if isinstance(inputs, (tuple, list)) else model(inputs, **kwargs)
    loss = loss_fn(out, target)
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}")
    return loss


@contextmanager
def _differentiable(graph: PruneGraph, model: nn.Module | None) -> Iterator[tuple[nn.Module, dict[str, torch.Tensor], list[torch.Tensor]]]:
    """The model to run, its parameters by every name, and the distinct floating-point ones,
    every one requiring grad for the duration: a frozen weight's channels (a LoRA model's
    base model, a frozen backbone) are scored like a trainable one's, not as zeros. The flags
    are put back afterwards."""
    model = graph.module if model is None else model
    named = dict(model.named_parameters(remove_duplicate=False))
    unique: dict[int, torch.Tensor] = {}
    for p in named.values():
        if p.is_floating_point():
            unique.setdefault(id(p), p)
    if not unique:
        raise ValueError("the model has no floating-point parameter: gradient criteria need gradients")
    frozen = [p for p in unique.values() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield model, named, list(unique.values())
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _by_name(named: dict[str, torch.Tensor], params: list[torch.Tensor], values: Sequence[torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """``values`` (one per distinct parameter) under every name of that parameter; unused
    parameters (no gradient) get zeros."""
    of = {id(p): (v if v is not None else torch.zeros_like(p)) for p, v in zip(params, values, strict=True)}
    return {n: of[id(p)] for n, p in named.items() if id(p) in of}


# ---- scores ---------------------------------------------------------------------------------
def taylor_scores(graph: PruneGraph, *, loss_fn: LossFn, batch: Any = None, batches: Iterable[Any] | None = None,
                  model: nn.Module | None = None, roles: Iterable[str] = WEIGHT_ROLES) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    items = _batch_list(batch, batches)
    with _differentiable(graph, model) as (model, named, params):
        for b in items:
            grads = torch.autograd.grad(_loss(model, b, loss_fn, graph.example_kwargs), params, allow_unused=True)
            g = _by_name(named, params, grads)
            wg = {n: named[n].detach() * g[n] for n in g}
            for k, v in channel_sums(graph, along, roles=roles, tensors=wg).items():
                total[k] = total.get(k, 0) + v.square()
    return {k: v / len(items) for k, v in total.items()}


def snip_scores(graph: PruneGraph, *, loss_fn: LossFn, batch: Any = None, batches: Iterable[Any] | None = None,
                model: nn.Module | None = None, roles: Iterable[str] = WEIGHT_ROLES) -> dict[str, torch.Tensor]:
    with _differentiable(graph, model) as (model, named, params):
        acc: list[torch.Tensor | None] = [None] * len(params)
        for b in _batch_list(batch, batches):
            grads = torch.autograd.grad(_loss(model, b, loss_fn, graph.example_kwargs), params, allow_unused=True)
            acc = [a if g is None else (g if a is None else a + g) for a, g in zip(acc, grads, strict=True)]
    g = _by_name(named, params, acc)
    wg = {n: (named[n].detach() * g[n]).abs() for n in g}
    return channel_sums(graph, along, roles=roles, tensors=wg)


def gradient_flow_scores(graph: PruneGraph, *, loss_fn: LossFn, batch: Any = None, batches: Iterable[Any] | None = None,
                         model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    items = _batch_list(batch, batches)
    with _differentiable(graph, model) as (model, named, params):
        g_const: list[torch.Tensor] = [torch.zeros_like(p) for p in params]
        for b in items:
            grads = torch.autograd.grad(_loss(model, b, loss_fn, graph.example_kwargs), params, allow_unused=True)
            g_const = [a if g is None else a + g.detach() for a, g in zip(g_const, grads, strict=True)]
        hg: list[torch.Tensor] = [torch.zeros_like(p) for p in params]
        for b in items:
            # the fused attention kernels (flash, memory-efficient) have no second derivative;
            # the math kernel computes the same attention and does
            with sdpa_kernel(SDPBackend.MATH):
                grads = torch.autograd.grad(_loss(model, b, loss_fn, graph.example_kwargs), params, create_graph=True, allow_unused=True)
                z = sum((gc * g).sum() for gc, g in zip(g_const, grads, strict=True) if g is not None)
                if not isinstance(z, torch.Tensor) or not z.requires_grad:
                    continue  # the loss is linear in every parameter: no gradient flow to measure
                hvp = torch.autograd.grad(z, params, allow_unused=True)
            hg = [a if h is None else a + h.detach() for a, h in zip(hg, hvp, strict=True)]
    h = _by_name(named, params, hg)
    g = _by_name(named, params, g_const)
    gate = {n: named[n].detach() * h[n] + g[n].square() for n in h}
    return {k: v.abs() for k, v in channel_sums(graph, along, roles=("write",), tensors=gate).items()}


# ---- criteria --------------------------------------------------------------------------------
def taylor(
    graph: PruneGraph,
    ratio: float = 0.5,
    *,
    loss_fn: LossFn,
    batch: Any = None,
    batches: Iterable[Any] | None = None,
    model: nn.Module | None = None,
    roles: Iterable[str] = WEIGHT_ROLES,
    scope: str = "local",
    normalize: str | None = "mean",
    min_keep: int = 1,
    round_to: int = 1,
    protect: Iterable[str] = (),
    exact_only: bool = False,
) -> Mask:
    """Drop the channels whose removal changes the loss least, to first order."""
    scores = taylor_scores(graph, loss_fn=loss_fn, batch=batch, batches=batches, model=model, roles=roles)
    return select(graph, scores, ratio, scope=scope, normalize=normalize, min_keep=min_keep, round_to=round_to,
                  protect=protect, exact_only=exact_only)


def snip(
    graph: PruneGraph,
    ratio: float = 0.5,
    *,
    loss_fn: LossFn,
    batch: Any = None,
    batches: Iterable[Any] | None = None,
    model: nn.Module | None = None,
    roles: Iterable[str] = WEIGHT_ROLES,
    scope: str = "local",
    normalize: str | None = "mean",
    min_keep: int = 1,
    round_to: int = 1,
    protect: Iterable[str] = (),
    exact_only: bool = False,
) -> Mask:
    """Drop the channels with the smallest connection sensitivity ``sum |w * dL/dw|``."""
    scores = snip_scores(graph, loss_fn=loss_fn, batch=batch, batches=batches, model=model, roles=roles)
    return select(graph, scores, ratio, scope=scope, normalize=normalize, min_keep=min_keep, round_to=round_to,
                  protect=protect, exact_only=exact_only)


def gradient_flow(
    graph: PruneGraph,
    ratio: float = 0.5,
    *,
    loss_fn: LossFn,
    batch: Any = None,
    batches: Iterable[Any] | None = None,
    model: nn.Module | None = None,
    scope: str = "local",
    normalize: str | None = "mean",
    min_keep: int = 1,
    round_to: int = 1,
    protect: Iterable[str] = (),
    exact_only: bool = False,
) -> Mask:
    """EarlyCroP: drop the channels whose output gate least affects the gradient flow."""
    scores = gradient_flow_scores(graph, loss_fn=loss_fn, batch=batch, batches=batches, model=model)
    return select(graph, scores, ratio, scope=scope, normalize=normalize, min_keep=min_keep, round_to=round_to,
                  protect=protect, exact_only=exact_only)
