"""The module emitter (``reconfigure(..., emit="module")``): the pruned model as a copy of the
input model, of the same class, instead of a GraphModule.

    small = deepcopy(model) with every parameter/buffer replaced by its sliced tensor
    every size attribute := what the sliced tensors say        (Conv2d.out_channels = W.shape[0])
    check: small(x) == graph_result(x) on the example inputs   (eval mode, tolerance 1e-4)

The size attributes are derived from the new tensors' shapes, never from graph nodes, so the
emitter works for any front-end (an fx graph with call_module nodes or an aten graph where
every parameter is a get_attr). A module whose class cannot hold the pruned shapes
(``nn.MultiheadAttention`` with fewer heads than its width implies) is replaced by the
prunefx module the graph emitter uses, with the same parameter names. Attributes of
tensorless modules (``nn.Unflatten``, a non-affine ``GroupNorm``) come from the graph
emitter's rebuilt module when there is one.

A Hugging Face ``PreTrainedModel`` (the model, or one it holds: a PEFT model's base) is then
finished by ``prunefx.transformers``: the head counts its attention modules read at run time,
GPT-2's ``Conv1D.nf``, and its config with a record of the per-layer sizes, so that
``generate`` and ``save_pretrained`` work and a loader can rebuild it (docs/transformers.md).
LoRA layers are finished by ``prunefx.peft`` (their sizes, ranks and adapter configs).

The copy holds exactly the tensors of ``state.tensors`` (the optimizer follow-up re-points
to them); tied tensors stay tied. The input model is never modified.

What the copy's Python code computes from literals (``x.view(n, 512)``, ``torch.zeros(1, 16,
1, 1)``) cannot follow the pruned sizes: the check then fails and a ``ReconfigureError`` names
the module whose forward diverges from the pruned graph, with its source line.

Example::

    >>> import torch, torchvision, prunefx
    >>> model = torchvision.models.resnet18().eval()
    >>> x = torch.randn(1, 3, 64, 64)
    >>> small = prunefx.reconfigure(model, {"layer1.0.conv1": torch.arange(64) % 2 == 0},
    ...                             example_inputs=x, emit="module")
    >>> type(small).__name__, small.layer1[0].conv1.out_channels
    ('ResNet', 32)
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from prunefx import peft
from prunefx.errors import ReconfigureError
from prunefx.graph import PruneGraph
from prunefx.passes.base import RewriteState

# The builders of the graph emitter's replacement modules (one source of truth for how a
# pruned nn.MultiheadAttention is rebuilt); they read only state.tensors and state.plan.
from prunefx.passes.rebuild_modules import REPLACEMENTS
from prunefx.provenance import LAYOUT_ATTR
from prunefx.tracing import SourceLoc, in_mode, is_transformers_model, transformers_models

__all__ = ["emit_module", "update_size_attributes", "is_transformers_model"]

_REL_TOL = 1e-4
_HINT = (
    'use emit="graph" (a GraphModule whose size arguments are rewritten), or compute the size '
    "from the tensor (x.shape[1]) or from an attribute the emitter updates (Conv2d.out_channels, "
    "Linear.in_features, ...)"
)


def emit_module(model: nn.Module, graph: PruneGraph, state: RewriteState) -> nn.Module:
    """A copy of ``model`` (same class) holding ``state.tensors``, its size attributes updated,
    checked against the graph emitter's result ``state.result`` before it is returned."""
    assert state.result is not None
    small = _copy_holding(model, state)
    _replace_modules(model, small, state)
    _update_sizes(small, state)
    _hold_tensors(small, state)
    if peft.holds_peft_layers(small):  # LoRA layers' sizes and ranks, the adapters' configs
        peft.finish(small)
    for _, hf in transformers_models(small):  # head counts, Conv1D.nf, the config: a working model of its class
        from prunefx.transformers import finish

        finish(hf)
    # prunefx.load_state_dict rebuilds with the emitter recorded here: a GraphModule's keys
    # can differ (modules of an untraced mode, fx constants)
    setattr(small, LAYOUT_ATTR, {**getattr(state.result, LAYOUT_ATTR), "emit": "module"})
    _check(small, state.result, graph, len(state.sources) > 1)
    return small


# -- the copy -----------------------------------------------------------------------------------


def _named_tensors(m: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from m.named_parameters(remove_duplicate=False)
    yield from m.named_buffers(remove_duplicate=False)


def _copy_holding(model: nn.Module, state: RewriteState) -> nn.Module:
    """deepcopy, with every traced tensor mapped to its new tensor in the memo: weights that
    are replaced anyway are never copied. Tensors the graph never read are deep-copied."""
    aliases = state.plan.analysis.aliases
    memo: dict[int, Any] = {}
    for name, t in _named_tensors(model):
        new = state.tensors.get(aliases.get(name, name))
        if new is not None:
            memo[id(t)] = new
    return copy.deepcopy(model, memo)


def _hold_tensors(small: nn.Module, state: RewriteState) -> None:
    """Every parameter/buffer slot holds ``state.tensors``' object (a class whose deepcopy
    bypasses the memo, or a replaced module, would otherwise hold another one)."""
    aliases = state.plan.analysis.aliases
    for prefix, m in small.named_modules(remove_duplicate=False):
        for slots in (m._parameters, m._buffers):
            for pname, t in list(slots.items()):
                full = f"{prefix}.{pname}" if prefix else pname
                new = state.tensors.get(aliases.get(full, full))
                if t is not None and new is not None and t is not new:
                    slots[pname] = new


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    root.get_submodule(parent)._modules[leaf] = new


def _replace_modules(model: nn.Module, small: nn.Module, state: RewriteState) -> None:
    """Modules whose class cannot hold the pruned shapes, rebuilt as the graph emitter does."""
    replaced: dict[int, nn.Module] = {}  # a module shared under several names stays shared
    for name, m in list(small.named_modules(remove_duplicate=False)):
        if id(m) in replaced:
            _set_module(small, name, replaced[id(m)])
            continue
        build = next((fn for kind, fn in REPLACEMENTS if isinstance(m, kind)), None)
        if build is None or not _tensors_shrank(model.get_submodule(name), name, state):
            continue
        try:
            new = build(m, state, name)
        except (KeyError, AttributeError, RuntimeError) as exc:
            raise ReconfigureError(
                f"emit=\"module\": module '{name}' ({type(m).__name__}) cannot be rebuilt with "
                f"pruned shapes ({type(exc).__name__}: {exc}); {_HINT}"
            ) from exc
        replaced[id(m)] = new
        _set_module(small, name, new)


def _tensors_shrank(old: nn.Module, prefix: str, state: RewriteState) -> bool:
    aliases = state.plan.analysis.aliases
    for pname, t in _named_tensors(old):
        full = f"{prefix}.{pname}" if prefix else pname
        new = state.tensors.get(aliases.get(full, full))
        if new is not None and new.shape != t.shape:
            return True
    return False


# -- size attributes ----------------------------------------------------------------------------


class _Inexpressible(Exception):
    """A size attribute that no value can make describe the pruned tensors."""

    def __init__(self, attr: str, why: str) -> None:
        super().__init__(why)
        self.attr = attr


def _conv(m: nn.modules.conv._ConvNd) -> dict[str, Any]:
    """W: (out, in/groups, *k), transposed (in, out/groups, *k). Groups are pruned whole (a
    depthwise conv's group is one channel), so groups' = pruned side / its width per group."""
    w = m.weight
    if m.transposed:
        groups = _whole_groups(int(w.shape[0]), m.in_channels, m.groups, "in_channels")
        return {
            "in_channels": int(w.shape[0]),
            "out_channels": int(w.shape[1]) * groups,
            "groups": groups,
        }
    groups = _whole_groups(int(w.shape[0]), m.out_channels, m.groups, "out_channels")
    return {
        "in_channels": int(w.shape[1]) * groups,
        "out_channels": int(w.shape[0]),
        "groups": groups,
    }


def _whole_groups(kept: int, size: int, groups: int, attr: str) -> int:
    if groups == 1:
        return 1  # one group spans every channel, however many are kept
    per_group = size // groups
    if kept % per_group:
        raise _Inexpressible(
            "groups", f"{kept} {attr} kept, not a multiple of the {per_group} channels per group"
        )
    return kept // per_group


def _linear(m: nn.Linear) -> dict[str, Any]:
    return {"out_features": int(m.weight.shape[0]), "in_features": int(m.weight.shape[1])}


def _bilinear(m: nn.Bilinear) -> dict[str, Any]:
    out, in1, in2 = m.weight.shape
    return {"out_features": int(out), "in1_features": int(in1), "in2_features": int(in2)}


def _norm(m: nn.modules.batchnorm._NormBase) -> dict[str, Any] | None:
    t = m.weight if m.weight is not None else m.running_mean
    return {"num_features": int(t.shape[0])} if t is not None else None


def _group_norm(m: nn.GroupNorm) -> dict[str, Any] | None:
    if m.weight is None:
        return None
    channels = int(m.weight.shape[0])
    groups = _whole_groups(channels, m.num_channels, m.num_groups, "num_channels")
    return {"num_channels": channels, "num_groups": groups}


def _layer_norm(m: nn.LayerNorm | nn.RMSNorm) -> dict[str, Any] | None:
    return (
        {"normalized_shape": tuple(int(s) for s in m.weight.shape)}
        if m.weight is not None
        else None
    )


def _embedding(m: nn.Embedding | nn.EmbeddingBag) -> dict[str, Any]:
    return {"num_embeddings": int(m.weight.shape[0]), "embedding_dim": int(m.weight.shape[1])}


def _prelu(m: nn.PReLU) -> dict[str, Any]:
    return {"num_parameters": int(m.weight.numel())}


# type -> (size attributes, their values from the module's own tensors or None when it has none)
_SIZES: tuple[tuple[type, tuple[str, ...], Callable[[Any], dict[str, Any] | None]], ...] = (
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups"), _conv),
    (nn.Linear, ("in_features", "out_features"), _linear),
    (nn.Bilinear, ("in1_features", "in2_features", "out_features"), _bilinear),
    (nn.modules.batchnorm._NormBase, ("num_features",), _norm),
    (nn.GroupNorm, ("num_channels", "num_groups"), _group_norm),
    (nn.LayerNorm, ("normalized_shape",), _layer_norm),
    (nn.RMSNorm, ("normalized_shape",), _layer_norm),
    (nn.Embedding, ("num_embeddings", "embedding_dim"), _embedding),
    (nn.EmbeddingBag, ("num_embeddings", "embedding_dim"), _embedding),
    (nn.PReLU, ("num_parameters",), _prelu),
    (nn.Unflatten, ("unflattened_size",), lambda m: None),
)


def _sizes_from_tensors(name: str, m: nn.Module) -> tuple[tuple[str, ...], dict[str, Any] | None] | None:
    """A known layer's size attributes and their values from its tensors (None: it has none)."""
    entry = next(((attrs, fn) for kind, attrs, fn in _SIZES if isinstance(m, kind)), None)
    if entry is None:
        return None
    attrs, derive = entry
    try:
        return attrs, derive(m)
    except _Inexpressible as exc:
        raise ReconfigureError(
            f"emit=\"module\": module '{name}' ({type(m).__name__}), attribute `{exc.attr}`: "
            f'{exc}, so no value expresses the pruned layer; use emit="graph"'
        ) from None


def _update_sizes(small: nn.Module, state: RewriteState) -> None:
    """Every known layer's size attributes from its tensors; a tensorless layer takes them
    from the graph emitter's rebuilt module (fx front-end) or keeps them."""
    for name, m in small.named_modules():
        found = _sizes_from_tensors(name, m)
        if found is None:
            continue
        attrs, values = found
        if values is None:
            rebuilt = state.modules.get(name)
            values = {a: getattr(rebuilt, a) for a in attrs} if type(rebuilt) is type(m) else {}
        for attr, value in values.items():
            setattr(m, attr, value)


def update_size_attributes(model: nn.Module) -> None:
    """Every known layer's size attributes from its own tensors, in place (a model whose
    tensors were replaced by differently-shaped ones, e.g. by a loader)."""
    for name, m in model.named_modules():
        found = _sizes_from_tensors(name, m)
        for attr, value in ((found and found[1]) or {}).items():
            setattr(m, attr, value)



# -- the check ----------------------------------------------------------------------------------


def _check(small: nn.Module, reference: nn.Module, graph: PruneGraph, other_mode: bool) -> None:
    """small == reference on the example inputs in eval mode (on meta tensors, shapes only);
    when the forward differs between modes, output shapes in training mode on meta copies.
    An export graph holds the mode it was captured in (a training-mode BatchNorm normalises
    with the batch's statistics whatever ``.eval()`` says): compared in that mode, the running
    statistics of both put back afterwards."""
    args, kwargs = _inputs(graph, small)
    training = graph.frontend == "export" and graph.traced.training
    mode = "training" if training else "evaluation"
    kept = _buffers_kept(small, reference) if training else contextlib.nullcontext()
    with in_mode(small, training), in_mode(reference, training), kept, torch.no_grad():
        try:
            with same_random(small):
                got = small(*args, **kwargs)
        except Exception as exc:  # any failure of user code means "cannot be expressed"
            raise _error(small, reference, args, kwargs, exc, mode) from exc
        with same_random(small):
            want = reference(*args, **kwargs)
        problem = _compare(got, want)
        if problem:
            raise _error(small, reference, args, kwargs, None, mode, problem)
    if other_mode:
        _check_training_shapes(small, reference, args, kwargs)


@contextmanager
def _buffers_kept(*models: nn.Module) -> Iterator[None]:
    """The models' buffers as they were, after a check in training mode (BatchNorm's running
    statistics, ``num_batches_tracked``)."""
    saved = [(b, b.clone()) for m in models for b in m.buffers() if has_values(b)]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, before in saved:
                b.copy_(before)


@contextmanager
def same_random(model: nn.Module) -> Iterator[None]:
    """torch's random state seeded for the duration, and put back after: a forward that draws
    random numbers (ViT-MAE shuffles its patches by ``torch.rand`` noise, also in eval mode)
    draws the same ones in each model compared, and the caller's random stream goes on as if
    nothing had run."""
    device = _device(model)
    # a model without data (FakeTensors on "cuda") runs no kernel: no device's generator to fork
    real = device.type == "cuda" and all(has_values(t) for t in (*model.parameters(), *model.buffers()))
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if real else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(0)
        yield


def _device(m: nn.Module) -> torch.device:
    for t in (*m.parameters(), *m.buffers()):
        return t.device
    return torch.device("cpu")


def _inputs(graph: PruneGraph, small: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The example inputs on the model's device; meta ones (guessed by prunefx) made real
    unless the model itself lives on meta."""
    device = _device(small)
    gen = torch.Generator().manual_seed(0)

    def real(x: Any) -> Any:
        return placeholder(x, device, gen)

    kwargs = getattr(graph, "example_kwargs", None) or {}
    return tuple(pytree.tree_map(real, tuple(graph.example_inputs))), pytree.tree_map(
        real, dict(kwargs)
    )


def placeholder(x: Any, device: torch.device, gen: torch.Generator) -> Any:
    """``x`` on ``device``; a meta tensor made real there (unless ``device`` is meta): seeded
    normal values, zeros for indices (0 is always a valid token id or index)."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.device.type == "meta" and device.type != "meta":
        if x.is_floating_point() or x.is_complex():
            return torch.randn(x.shape, generator=gen, dtype=x.dtype).to(device)
        return torch.zeros(x.shape, dtype=x.dtype, device=device)
    return x.to(device)


def has_values(t: torch.Tensor) -> bool:
    """Whether ``t`` holds data that can be compared: not a meta tensor, nor a FakeTensor
    (``FakeTensorMode``: a device, a dtype and a shape, as torch.export and ``torch.compile``
    plan with, and as a model too large for memory can be built and pruned)."""
    return t.device.type != "meta" and not isinstance(t, FakeTensor)


def tensor_leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _compare(got: Any, ref: Any) -> str | None:
    """What differs between two outputs, or None."""
    a, b = tensor_leaves(got), tensor_leaves(ref)
    if len(a) != len(b):
        return f"the model returns {len(a)} tensors where the pruned graph returns {len(b)}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        problem = differs(x, y)
        if problem:
            return f"output tensor {i}: {problem}"
    return None


def differs(x: torch.Tensor, y: torch.Tensor, reference: str = "the pruned graph") -> str | None:
    """How ``x`` differs from ``y`` (shape; values beyond 1e-4 x max(1, max|y|); integers
    exactly), or None."""
    if x.shape != y.shape:
        return f"shape {tuple(x.shape)} where {reference} has {tuple(y.shape)}"
    if not (has_values(x) and has_values(y)) or x.numel() == 0:
        return None
    if not (x.is_floating_point() or x.is_complex()):
        return None if torch.equal(x, y.to(x.device)) else "values differ"
    diff = (x - y.to(x.device)).abs()
    diff = torch.where(torch.isnan(x) & torch.isnan(y), torch.zeros_like(diff), diff)
    scale = max(1.0, float(y.abs().nan_to_num().max()))
    worst = float(diff.nan_to_num(nan=float("inf")).max())
    return (
        f"values differ by {worst:.3g} (max |ref| {scale:.3g})"
        if worst > _REL_TOL * scale
        else None
    )


def _check_training_shapes(
    small: nn.Module, reference: nn.Module, args: tuple, kwargs: dict
) -> None:
    """Paths that only run in training (GoogLeNet's auxiliary heads): output shapes on meta
    copies, so no running statistic of the result is touched. Skipped when the pruned graph
    itself does not run there (e.g. an input too small for an auxiliary head)."""
    meta_small, meta_ref = _meta_copy(small), _meta_copy(reference)
    meta_args, meta_kwargs = pytree.tree_map(_to_meta, (args, kwargs))
    meta_small.train()
    meta_ref.train()
    try:
        ref = meta_ref(*meta_args, **meta_kwargs)
    except Exception:  # the graph result does not run in training on meta: nothing to compare
        return
    try:
        got = meta_small(*meta_args, **meta_kwargs)
    except Exception as exc:
        raise _error(meta_small, meta_ref, meta_args, meta_kwargs, exc, "training") from exc
    problem = _compare(got, ref)
    if problem:
        raise _error(meta_small, meta_ref, meta_args, meta_kwargs, None, "training", problem)


def _to_meta(x: Any) -> Any:
    return torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x


def _meta_copy(m: nn.Module) -> nn.Module:
    memo: dict[int, Any] = {}
    for _, t in _named_tensors(m):
        meta = _to_meta(t)
        memo[id(t)] = (
            nn.Parameter(meta, requires_grad=t.requires_grad)
            if isinstance(t, nn.Parameter)
            else meta
        )
    return copy.deepcopy(m, memo)


# -- diagnosis: which module's forward hard-codes a size ----------------------------------------


def _error(
    small: nn.Module,
    reference: nn.Module,
    args: tuple,
    kwargs: dict,
    exc: BaseException | None,
    mode: str,
    problem: str | None = None,
) -> ReconfigureError:
    if exc is not None:
        first = (str(exc).strip().splitlines() or [""])[0]
        what = f"raises {type(exc).__name__}: {first}"
    else:
        what = f"differs from the pruned graph ({problem})"
    where = _first_divergence(small, reference, args, kwargs)
    if where is None and exc is not None:
        where = _raising_module(small, exc.__traceback__)
    if where is None:
        where = "after its last submodule call (in a forward that combines submodule outputs)"
    cls = type(small).__name__
    return ReconfigureError(
        f'emit="module": the pruned {cls}, as a {cls}, {what} in {mode} mode.\n'
        f"  where: {where}\n"
        "  Its forward hard-codes a size that the emitter cannot update (a literal, an attribute "
        f"it does not know, or a split into equal parts of channels pruned unequally); {_HINT}"
    )


def _describe(root: nn.Module, name: str) -> str:
    kind = type(root.get_submodule(name)).__name__
    return f"module '{name}' ({kind})" if name else f"the model's own forward ({kind})"


@dataclass(frozen=True)
class _Call:
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor] | None


class _Diverged(Exception):
    def __init__(self, where: str) -> None:
        super().__init__(where)
        self.where = where


def _snapshot(x: Any) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensor_leaves(x)]  # in-place ops later would change them


def _record_calls(reference: nn.Module, args: tuple, kwargs: dict) -> dict[tuple[str, int], _Call]:
    """Inputs and outputs of every submodule call of the pruned graph, by (name, k-th call)."""
    calls: dict[tuple[str, int], _Call] = {}
    seen: dict[str, int] = {}
    handles = []

    def pre(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, a: tuple, kw: dict) -> None:
            k = seen[name] = seen.get(name, -1) + 1
            calls[(name, k)] = _Call(_snapshot((a, kw)), None)

        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _a: tuple, _kw: dict, out: Any) -> None:
            key = (name, seen[name])
            calls[key] = _Call(calls[key].inputs, _snapshot(out))

        return hook

    for name, m in reference.named_modules():
        if name:
            handles.append(m.register_forward_pre_hook(pre(name), with_kwargs=True))
            handles.append(m.register_forward_hook(post(name), with_kwargs=True))
    try:
        with torch.no_grad(), same_random(reference):  # in the mode the check runs in
            reference(*args, **kwargs)
    except Exception:  # whatever ran before a failure is still evidence
        pass
    finally:
        for h in handles:
            h.remove()
    return calls


def _first_divergence(
    small: nn.Module, reference: nn.Module, args: tuple, kwargs: dict
) -> str | None:
    """The first submodule call (in execution order) whose input or output differs from the
    pruned graph's: a differing input is made by the innermost caller that did not just pass
    its own input on (a Sequential does), a differing output (from equal inputs) by the
    module's own forward."""
    expected = _record_calls(reference, args, kwargs)
    stack: list[tuple[str, set[int]]] = [("", {id(t) for t in tensor_leaves((args, kwargs))})]
    seen: dict[str, int] = {}
    handles = []

    def pre(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, a: tuple, kw: dict) -> None:
            inputs = tensor_leaves((a, kw))
            callers = list(stack)
            stack.append((name, {id(t) for t in inputs}))
            k = seen[name] = seen.get(name, -1) + 1
            call = expected.get((name, k))
            problem = _compare_lists(inputs, call.inputs) if call is not None else None
            if problem:
                caller = _maker(callers, inputs)
                line = _calling_line(small.get_submodule(caller))
                raise _Diverged(
                    f"{_describe(small, caller)} computes the input of '{name}' ({problem}){line}"
                )

        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _a: tuple, _kw: dict, out: Any) -> None:
            stack.pop()
            call = expected.get((name, seen[name]))
            if call is None or call.outputs is None:
                return
            problem = _compare_lists(tensor_leaves(out), call.outputs)
            if problem:
                raise _Diverged(
                    f"{_describe(small, name)} computes its output from the right input ({problem})"
                )

        return hook

    for name, m in small.named_modules():
        if name:
            handles.append(m.register_forward_pre_hook(pre(name), with_kwargs=True))
            handles.append(m.register_forward_hook(post(name), with_kwargs=True))
    try:
        with torch.no_grad(), same_random(small):
            small(*args, **kwargs)
    except _Diverged as d:
        return d.where
    except Exception:  # the crash itself is reported from its traceback
        return None
    finally:
        for h in handles:
            h.remove()
    return None


def _maker(callers: list[tuple[str, set[int]]], inputs: list[torch.Tensor]) -> str:
    """The innermost caller whose forward made ``inputs`` rather than received them."""
    for name, received in reversed(callers):
        if not all(id(t) in received for t in inputs):
            return name
    return ""


def _compare_lists(got: list[torch.Tensor], ref: list[torch.Tensor]) -> str | None:
    if len(got) != len(ref):
        return f"{len(got)} tensors where the pruned graph has {len(ref)}"
    for x, y in zip(got, ref, strict=True):
        problem = differs(x, y)
        if problem:
            return problem
    return None


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _calling_line(caller: nn.Module) -> str:
    """The line of ``caller``'s forward running now (the call of the submodule)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_locals.get("self") is caller:
            filename, lineno = frame.f_code.co_filename, frame.f_lineno
            return f"; it calls it at {_where(filename, lineno)}{_reads(caller, filename, lineno)}"
        frame = frame.f_back
    return ""


def _where(filename: str, lineno: int) -> str:
    return str(SourceLoc(filename, lineno))


def _reads(owner: nn.Module, filename: str, lineno: int) -> str:
    """The integer attributes of ``owner`` that its source line reads (``self.hidden_dim``):
    sizes a model family keeps that the emitter does not know how to update."""
    code = SourceLoc(filename, lineno).code
    found = {
        a: getattr(owner, a, None)
        for a in re.findall(r"\bself\.(\w+)\b(?!\s*\()", code)
        if _is_size(getattr(owner, a, None))
    }
    if not found:
        return ""
    listed = ", ".join(f"self.{a} = {v}" for a, v in found.items())
    return (
        f"; it reads {listed}, which the emitter does not update ({type(owner).__name__} attribute)"
    )


def _is_size(v: Any) -> bool:
    if isinstance(v, (tuple, list)):
        return bool(v) and all(_is_size(x) for x in v)
    return isinstance(v, int) and not isinstance(v, bool)


def _raising_module(small: nn.Module, tb: TracebackType | None) -> str | None:
    """The innermost module of ``small`` on the traceback whose code is the model's (a torch.nn
    layer beneath it, its size attributes set from its weights, only received a wrong input),
    with the innermost line of model (not torch) code."""
    names = {id(m): n for n, m in small.named_modules()}
    ours: str | None = None
    layer: str | None = None
    line = reads = ""
    for frame, lineno in traceback.walk_tb(tb):
        owner = frame.f_locals.get("self")
        if id(owner) in names:
            if type(owner).__module__.startswith("torch.nn."):
                layer = names[id(owner)]
            else:
                ours, layer = names[id(owner)], None
                reads = _reads(owner, frame.f_code.co_filename, lineno)
        if not frame.f_code.co_filename.startswith(_TORCH_DIR):
            line = f" at {_where(frame.f_code.co_filename, lineno)}"
    if ours is None and layer is None:
        return None
    inside = (
        f" (raised in '{layer}' ({type(small.get_submodule(layer)).__name__}))" if layer else ""
    )
    return f"{_describe(small, ours or '')}{line}{inside}{reads}"
