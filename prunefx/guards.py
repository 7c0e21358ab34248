"""What the trace cannot see, and what capture does about it, per kind.

A traced graph is what a module's ``forward`` computes. Python around it, which
``model(x)`` also runs, is handled at capture (``prunefx.tracing`` for torch.fx,
``prunefx.frontends.export`` for torch.export), so that a reconfigured model never silently
lacks it:

=============================================  ===============================================
forward (pre-)hook of a module whose forward   run by the trace on symbolic values: what the
is traced (the model itself; with fx every     hook returns is part of the graph, analysed and
non-leaf module; with torch.export every       rewritten like forward's own code. A hook that
module)                                        returns nothing, or its input unchanged, acts
                                               only by side effects, which the reconfigured
                                               model would never run: refused.
forward (pre-)hook or backward hook of a leaf  kept: the reconfigured model calls a copy of
module (fx ``call_module``)                    the module, hooks included. The channels the
                                               hooks see (the call's inputs and output) are
                                               pinned by an identity node the analysis has no
                                               rule for (``HookedChannels``): a hook may close
                                               over a channel-sized tensor, and prunefx cannot
                                               know what it does with the channels.
backward hook of a traced module               no module call is left to run it on: refused.
a lazy module that has not run yet             its parameters have no shape: ``CaptureRefused``,
(``nn.LazyConv2d``, ...)                       saying to run the model once first.
a TorchScript submodule                        neither traced into nor copied:
(``torch.jit.script``, ``torch.jit.trace``)    ``CaptureRefused``.
re-parametrised weight                         the weight is computed from ``original0/1``
(``parametrize.register_parametrization``:     (``weight_g/v``, ``weight_orig``, ``u``, ``v``)
``weight_norm``, ``spectral_norm``, ...; the   by norms over every channel, so slicing them is
old ``torch.nn.utils.weight_norm`` and         not the masked function: ``CaptureRefused``,
``spectral_norm`` hooks)                       saying how to bake the weight first.
custom ``torch.autograd.Function`` (a class    fx: one opaque call of ``Fn.apply``
outside torch)                                 (``OpaqueFunction``), so its backward is kept;
                                               the channels through it are pinned. torch.export
                                               inlines its forward and drops its backward:
                                               ``TraceError`` naming it and its line.
``torch.nn.utils.prune`` hooks                 left to ``reconfigure``'s own refusal (the
                                               masks interop reads them through the trace).
a library's hook that only marks an output as  not a channel op: neither refused nor pinned
requiring grad (transformers'                  (``AUTOGRAD_ONLY_HOOKS``). The module result,
``enable_input_require_grads``, which          a copy of the model, keeps it; a GraphModule
``activation_checkpointing_enable``            result does not run it (nor checkpoints).
registers; PEFT's on a model without it)
grad mode or autocast changed inside forward  fx runs ``torch.no_grad()``,
(``torch.no_grad()``, ``set_grad_enabled``,    ``torch.autocast(...)`` while it traces and
``torch.autocast(...)`` blocks or decorators)  records nothing: the pruned graph would run the
                                               block in the caller's mode (gradients through a
                                               no-grad block, half precision in a float32
                                               block). fx: a TraceError naming the line
                                               (``"auto"`` falls back to torch.export, which
                                               keeps the block: ``frontends/export.py``).
activation checkpointing                       traced through by both front-ends: a graph
(``torch.utils.checkpoint``, timm's            computes the same values but keeps every
``set_grad_checkpointing``)                    activation for backward. Recorded
                                               (``activation_checkpoints_seen``, the lines in
                                               ``Traced.checkpoints``): ``reconfigure``
                                               returns the model's own class, whose forward
                                               keeps checkpointing (``prunefx.reconfigure``).
``torch.inference_mode()`` inside forward      recorded by neither front-end (the pruned graph
                                               would let gradients through it): refused by
                                               both, naming the line.
``forward`` set on an instance (fx)            the model's: fx traces the class's forward; a
                                               leaf's: the copy would call the original: a
                                               TraceError (torch.export runs it: ``"auto"``
                                               falls back to export).
=============================================  ===============================================

A refusal is a one-line ``CaptureRefused`` (a PruneFxError, not a TraceError: the model may
trace, and the other front-end would refuse it too) naming the module, the hook or
parametrization and where it is defined, and saying what to do; the hook dicts are swapped
only for the duration of a capture and put back as they were. A hook that fails on the
trace's symbolic values is a TraceError (torch.export's fake tensors may suit it).

A reconfigured GraphModule that calls ``HookedChannels`` or ``OpaqueFunction`` objects
copies (``copy.deepcopy``) and checkpoints (``prunefx.state_dict``) like any other, but
cannot be pickled whole: fx pickles a graph by the import names of what it calls.

Example::

    >>> import torch, prunefx
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
    >>> seen = []
    >>> _ = model[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    >>> g = prunefx.trace(model, torch.randn(1, 3, 8, 8))
    >>> g.group_of("0").prunable      # the hook sees all 8 channels of '0' at run time
    False
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod

from prunefx.errors import MaskError, PruneFxError, TraceError

__all__ = [
    "CaptureRefused", "refuse_foreign_graph", "refuse_unreadable_modules", "refuse_instance_forward", "refuse_traced_backward_hooks", "traced_modules", "watch_hooks", "HookWatch", "run_with_hooks",
    "any_hooks", "hooks_within", "HookedChannels", "OpaqueFunction", "custom_functions_opaque", "custom_functions_refused",
    "mode_changes_refused", "AUTOGRAD_ONLY_HOOKS", "activation_checkpoints_seen",
]

IsLeaf = Callable[[nn.Module, str], bool]
Named = list[tuple[str, nn.Module]]  # (qualified name, module), the model first as ""


class CaptureRefused(PruneFxError):
    """The model holds something no front-end can keep (a hook acting by side effects, a
    re-parametrised weight, a backward hook on a traced module). Not a TraceError on
    purpose: the model may trace well, and ``trace(frontend="auto")`` must not try the other
    front-end, which would refuse it too (and turn one line into two)."""


_FORWARD = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"))
_BACKWARD = (("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))


# ---- naming ------------------------------------------------------------------------------

def hook_text(hook: Any) -> str:
    """The hook's name in backquotes and where it is defined, for messages."""
    inner = hook.hook if isinstance(hook, _Watched) else hook
    while isinstance(inner, functools.partial):
        inner = inner.func
    func = getattr(inner, "__func__", inner)  # a bound method
    call = type(inner).__dict__.get("__call__")  # a callable object
    code = getattr(func, "__code__", None) or getattr(call, "__code__", None)
    name = (getattr(func, "__qualname__", None) or type(inner).__qualname__).rsplit(".<locals>.", 1)[-1]
    if code is None:
        return f"`{name}`"
    from prunefx.tracing import _short  # tracing imports this module

    return f"`{name}` ({_short(code.co_filename)}:{code.co_firstlineno})"


def _module_text(name: str, model: nn.Module) -> str:
    return f"module '{name}'" if name else f"the model itself ({type(model).__name__})"


# Hooks a library registers only to mark a module's output as requiring grad, so that the
# gradients of an activation-checkpointed model (or of adapters behind frozen embeddings)
# reach the layers after it: they change no value and see no channel. (module, function name)
AUTOGRAD_ONLY_HOOKS = frozenset({
    # PreTrainedModel.enable_input_require_grads: `output.requires_grad_(True)` on the input
    # embeddings; activation_checkpointing_enable() (gradient_checkpointing_enable before
    # transformers 5) registers it on every text model
    ("transformers.modeling_utils", "make_inputs_require_grads"),
    # the same, registered by PEFT on a model without enable_input_require_grads (get_peft_model
    # on a custom model with get_input_embeddings; prepare_model_for_kbit_training)
    ("peft.peft_model", "make_inputs_require_grad"),
    ("peft.mixed_model", "make_inputs_require_grad"),
    ("peft.utils.other", "make_inputs_require_grad"),
})


def _autograd_only(hook: Any) -> bool:
    func = getattr(hook, "__func__", hook)
    return (getattr(func, "__module__", None), getattr(func, "__name__", None)) in AUTOGRAD_ONLY_HOOKS


def _own_hooks(m: nn.Module, kinds: tuple[tuple[str, str], ...]) -> list[tuple[str, Any]]:
    """(kind, hook) of ``m``'s own hooks of these kinds; torch.nn.utils.prune's are not ours
    to judge (``reconfigure`` refuses them, the masks interop reads them), and a library's
    autograd-only hook (``AUTOGRAD_ONLY_HOOKS``) acts on no channel."""
    return [
        (kind, h) for attr, kind in kinds for h in getattr(m, attr, {}).values()
        if not isinstance(h, BasePruningMethod) and not isinstance(getattr(h, "hook", None), BasePruningMethod)
        and not _autograd_only(h)
    ]


def traced_modules(model: nn.Module, is_leaf: IsLeaf) -> Named:
    """Modules whose forward the trace runs: the model, and every module not inside a leaf.
    A capture lists them once and hands the list to each guard."""
    found: Named = []

    def walk(prefix: str, m: nn.Module) -> None:
        found.append((prefix, m))
        for child_name, child in m.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if not is_leaf(child, name):
                walk(name, child)

    walk("", model)
    return found


# ---- a graph passed in ------------------------------------------------------------------

def refuse_foreign_graph(model: nn.Module, graph: Any, *, same_tensors: bool = True) -> None:
    """MaskError unless every parameter and buffer ``graph`` (a PruneGraph) computes with is
    the very tensor of ``model`` at that name (``same_tensors``: ``reconfigure`` builds the
    result from the graph's tensors, so a graph traced from another instance, or before the
    model's tensors were replaced, would build it from other weights), or at least a tensor
    of the same shape (``apply_mask`` only uses the graph's structure on ``model``'s own
    tensors: a graph of an identical copy is fine)."""
    own = dict((*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)))
    for name, t in graph.traced.named_tensors():
        mine = own.get(name)
        if name.startswith(("_tensor_constant", "_prunefx_constants")) or mine is t:
            continue
        if not same_tensors and mine is not None and mine.shape == t.shape:
            continue
        why = "has no tensor of that name" if mine is None else "holds another tensor there" if same_tensors else (
            f"holds a {tuple(mine.shape)} tensor there, not {tuple(t.shape)}")
        raise MaskError(
            f"graph= was not traced from this model: it computes with '{name}', and {type(model).__name__} {why} "
            "(another instance, or its tensors were replaced since); trace this model (prunefx.trace(model, x)) "
            "or omit graph="
        )


# ---- re-parametrised weights --------------------------------------------------------------

def refuse_unreadable_modules(model: nn.Module) -> None:
    """CaptureRefused for the first module whose weights prunefx cannot read or copy: computed
    from other tensors (a parametrization), not created yet (a lazy module that has not run),
    or compiled by TorchScript."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for name, m in model.named_modules():
        if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
            raise CaptureRefused(
                f"{_module_text(name, model)} is a lazy {type(m).__name__} whose parameters are not created yet: run the "
                "model once on an example input (model(x)) before pruning"
            )
        if isinstance(m, torch.jit.ScriptModule):
            raise CaptureRefused(
                f"{_module_text(name, model)} is a TorchScript module ({type(m).__name__}), which prunefx can neither trace "
                "into nor copy: put back the nn.Module it was scripted or traced from, and script it again after pruning"
            )
        if "parametrizations" in m._modules and parametrize.is_parametrized(m):  # a registered ModuleDict
            tensor, plist = next(iter(m.parametrizations.items()))
            kinds = ", ".join(type(p).__name__ for p in plist)
            raise CaptureRefused(
                f"{_module_text(name, model)} has a parametrization ({kinds}) on '{tensor}', computed from "
                f"{', '.join(n for n, _ in plist.named_parameters())}: prunefx cannot slice those alike; bake it first with "
                f"torch.nn.utils.parametrize.remove_parametrizations(module, '{tensor}') and apply it again to the result"
            )
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, (WeightNorm, SpectralNorm)):
                undo = "remove_weight_norm" if isinstance(hook, WeightNorm) else "remove_spectral_norm"
                raise CaptureRefused(
                    f"{_module_text(name, model)} has torch.nn.utils.{undo[7:]} on '{hook.name}' (computed from "
                    f"{hook.name}_g/_v or {hook.name}_orig): prunefx cannot slice those alike; bake it first with "
                    f"torch.nn.utils.{undo}(module) and apply it again to the result"
                )


# ---- forward replaced on an instance -------------------------------------------------------

def refuse_instance_forward(model: nn.Module, traced: Named) -> None:
    """fx: TraceError for a ``forward`` set on the model instance (fx traces the class's
    forward) or on a leaf module or one inside it (the reconfigured model calls a copy of the
    module, whose ``forward`` attribute would still call into the original). torch.export runs
    the instance's forward, so ``frontend="auto"`` falls back to it. A module whose forward
    is traced (non-leaf) is fine: fx calls it through ``nn.Module.__call__``
    (``traced``: ``traced_modules``)."""
    runs = {name for name, _ in traced if name}
    for name, m in model.named_modules():
        fwd = m.__dict__.get("forward")
        if fwd is None or name in runs:
            continue
        where = "the class's forward" if not name else "a copy of the module, whose forward attribute still calls the original"
        raise TraceError(
            f"{_module_text(name, model)} has its forward replaced on the instance ({hook_text(fwd)}), but torch.fx "
            f"runs {where}; restore it (del module.forward) before pruning, or use frontend='export', which runs "
            "the instance's forward"
        )


# ---- hooks of traced modules ---------------------------------------------------------------

def refuse_traced_backward_hooks(model: nn.Module, traced: Named, frontend: str = "fx") -> None:
    for name, m in traced:
        for kind, hook in _own_hooks(m, _BACKWARD):
            raise CaptureRefused(
                f"{_module_text(name, model)} has a {kind} {hook_text(hook)}, but its forward is traced, so the reconfigured "
                f"model has no call of it to run the hook on; {_what_to_do(name, frontend)}"
            )


def _what_to_do(name: str, frontend: str) -> str:
    if not name:
        return "remove it (handle.remove()) before pruning and register it on the result"
    if frontend == "fx":
        return (f"remove it (handle.remove()) before pruning, or keep '{name}' whole with "
                f"prunefx.trace(..., leaf_modules=['{name}']) (its hooks are kept, its channels pinned)")
    return (f"remove it (handle.remove()) before pruning, or use frontend='fx' with leaf_modules=['{name}'] "
            "(its hooks are kept, its channels pinned)")


@dataclass
class HookWatch:
    """Hooks of traced modules that acted only by side effects during a capture."""

    model: nn.Module
    frontend: str
    observers: list[tuple[str, str, Any]] = field(default_factory=list)  # (module name, kind, hook)

    def check(self) -> None:
        if not self.observers:
            return
        name, kind, hook = self.observers[0]
        raise CaptureRefused(
            f"{_module_text(name, self.model)} has a {kind} {hook_text(hook)} that returns nothing (or its input unchanged): "
            "the trace keeps what a hook returns, not what it does, so it would never run in the reconfigured model; "
            f"{_what_to_do(name, self.frontend)}"
        )


class _Watched:
    """A hook that records, in its HookWatch, a call whose result leaves the values alone."""

    def __init__(self, hook: Any, name: str, kind: str, watch: HookWatch) -> None:
        self.hook, self.name, self.kind, self.watch = hook, name, kind, watch

    def __call__(self, *args: Any) -> Any:
        try:
            result = self.hook(*args)
        except PruneFxError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever a hook raises on symbolic values
            # a TraceError: the other front-end's values (fake tensors, not proxies) may suit it
            cause = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]
            raise TraceError(
                f"{_module_text(self.name, self.watch.model)} has a {self.kind} {hook_text(self.hook)} that fails on the "
                f"trace's symbolic values ({type(exc).__name__}: {cause}): the hooks of a traced module become part of "
                f"its graph; {_what_to_do(self.name, self.watch.frontend)}"
            ) from exc
        if _leaves_alone(result, args, self.kind) and not any(w[2] is self.hook for w in self.watch.observers):
            self.watch.observers.append((self.name, self.kind, self.hook))
        return result


def _leaves_alone(result: Any, args: tuple[Any, ...], kind: str) -> bool:
    if result is None:
        return True
    if kind == "forward hook":
        return result is args[-1]
    given = args[1:]  # (inputs,) or (inputs, kwargs)
    if len(given) == 2 and isinstance(result, tuple) and len(result) == 2:
        return result[0] is given[0] and result[1] is given[1]
    inputs = given[0]
    result = result if isinstance(result, tuple) else (result,)
    return len(result) == len(inputs) and all(r is x for r, x in zip(result, inputs, strict=True))


@contextlib.contextmanager
def watch_hooks(model: nn.Module, traced: Named, frontend: str = "fx") -> Iterator[HookWatch]:
    """For the duration of a capture, the forward (pre-)hooks of every traced module report
    calls that leave the values alone. The hook dicts are swapped, never edited, and put
    back as they were, also when the capture fails."""
    watch = HookWatch(model, frontend)
    swapped: list[tuple[nn.Module, str, Any]] = []
    try:
        for name, m in traced:
            for attr, kind in _FORWARD:
                hooks = getattr(m, attr)
                ours = {id(h) for _, h in _own_hooks(m, ((attr, kind),))}
                if ours:
                    swapped.append((m, attr, hooks))
                    setattr(m, attr, type(hooks)((k, _Watched(h, name, kind, watch) if id(h) in ours else h) for k, h in hooks.items()))
        yield watch
    finally:
        for m, attr, hooks in reversed(swapped):
            setattr(m, attr, hooks)


def forward_hooks_of(module: nn.Module) -> list[tuple[str, Any]]:
    """(kind, hook) of the module's own forward pre-hooks and hooks (not torch.nn.utils.prune's)."""
    return _own_hooks(module, _FORWARD)


def run_with_hooks(module: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``forward(*args, **kwargs)`` with ``module``'s forward pre-hooks and hooks around it, in
    the order ``nn.Module.__call__`` runs them (for the model itself, whose forward fx calls
    directly; torch.nn.utils.prune's hooks are left out, as fx always left them)."""
    for hook_id, hook in module._forward_pre_hooks.items():
        if isinstance(hook, BasePruningMethod):
            continue
        if hook_id in module._forward_pre_hooks_with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                args, kwargs = result
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    out = forward(*args, **kwargs)
    for hook_id, hook in module._forward_hooks.items():
        if hook_id in module._forward_hooks_with_kwargs:
            result = hook(module, args, kwargs, out)
        else:
            result = hook(module, args, out)
        if result is not None:
            out = result
    return out


# ---- hooks of leaf modules ----------------------------------------------------------------

def any_hooks(model: nn.Module) -> bool:
    """Whether any module of ``model`` has a hook of its own (most models have none, and a
    capture then skips looking inside each leaf call)."""
    return any(_own_hooks(m, (*_FORWARD, *_BACKWARD)) for m in model.modules())


def hooks_within(m: nn.Module) -> list[tuple[str, str, Any]]:
    """(submodule name, kind, hook) of every hook a call of leaf ``m`` runs, its own first."""
    return [(name, kind, h) for name, sub in m.named_modules() for kind, h in _own_hooks(sub, (*_FORWARD, *_BACKWARD))]


class HookedChannels:
    """Identity at run time. To the channel analysis it is an op without a rule, so the
    channels it carries are pinned, with its ``__name__`` as the reason. It marks the call's
    inputs, and its output unless only forward pre-hooks (which see the inputs) are run."""

    def __init__(self, module_name: str, hooks: list[tuple[str, str, Any]]) -> None:
        sub, kind, hook = hooks[0]
        self.sees_output = any(k != "forward pre-hook" for _, k, _ in hooks)
        self.prunefx_label = f"hooks of '{module_name}'"
        where = f"'{module_name}.{sub}'" if sub else f"'{module_name}'"
        more = f" and {len(hooks) - 1} more" if len(hooks) > 1 else ""
        self.__name__ = (
            f"the {kind} {hook_text(hook)}{more} of module {where}, which sees these channels at run time "
            "(remove the hook to prune them)"
        )
        self.__module__ = __name__
        self.module_name = module_name

    def __call__(self, x: Any) -> Any:
        return x

    def mark(self, tracer: fx.Tracer, value: Any) -> Any:
        """``value`` with every proxy in it passed through this identity."""
        def one(v: Any) -> Any:
            if isinstance(v, fx.Proxy):
                return tracer.create_proxy("call_function", self, (v,), {}, name=f"{self.module_name.replace('.', '_')}_hooked")
            return v

        return map_aggregate(value, one)


# ---- custom autograd Functions ------------------------------------------------------------

def _user_function(cls: type) -> bool:
    return not cls.__module__.startswith("torch.")


class OpaqueFunction:
    """``Fn.apply`` as one call_function target: run as it is, backward included."""

    def __init__(self, fn: type[torch.autograd.Function]) -> None:
        self.fn = fn
        self.__name__ = f"{fn.__qualname__}.apply"
        self.__module__ = fn.__module__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn.apply(*args, **kwargs)


_ORIGINAL_APPLY = torch.autograd.Function.__dict__["apply"]


def _original_apply(cls: type, *args: Any, **kwargs: Any) -> Any:
    return _ORIGINAL_APPLY.__get__(None, cls)(*args, **kwargs)


@contextlib.contextmanager
def _apply_patched(apply: Callable[..., Any]) -> Iterator[None]:
    """``torch.autograd.Function.apply`` is ``apply(cls, *args, **kwargs)`` for the duration
    (as fx patches ``nn.Module.__call__`` while it traces); put back also on failure."""
    Function = torch.autograd.Function
    original = Function.__dict__["apply"]
    type.__setattr__(Function, "apply", classmethod(apply))
    try:
        yield
    finally:
        type.__setattr__(Function, "apply", original)


@contextlib.contextmanager
def custom_functions_opaque() -> Iterator[None]:
    """fx: ``Fn.apply`` on proxies becomes one opaque node instead of its inlined forward."""
    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        proxies: list[fx.Proxy] = []
        map_aggregate((args, kwargs), lambda v: proxies.append(v) if isinstance(v, fx.Proxy) else None)
        if proxies and _user_function(cls):
            return proxies[0].tracer.create_proxy("call_function", OpaqueFunction(cls), args, kwargs)
        return _original_apply(cls, *args, **kwargs)

    with _apply_patched(apply):
        yield


@contextlib.contextmanager
def custom_functions_refused(model: nn.Module) -> Iterator[None]:
    """torch.export: TraceError after the capture if it went through a custom Function."""
    seen: list[tuple[type, str]] = []

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        if _user_function(cls) and not seen:
            from prunefx.tracing import _user_frame

            seen.append((cls, str(_user_frame(sys._getframe(1)) or "")))
        return _original_apply(cls, *args, **kwargs)

    with _apply_patched(apply):
        yield
    if seen:
        from prunefx.tracing import is_transformers_model

        cls, where = seen[0]
        at = f" at {where}" if where else ""
        # fx keeps the Function as one opaque call, but cannot trace a transformers model
        advice = ("fx cannot trace a transformers model: while it is pruned, let the module calling the Function run "
                  "the torch ops of the Function's forward instead") if is_transformers_model(model) else (
                  "use frontend='fx', which keeps it as one opaque call (its channels pinned)")
        raise TraceError(
            f"{type(model).__name__} calls the custom autograd Function {cls.__module__}.{cls.__qualname__}{at}: torch.export "
            f"inlines its forward and drops its backward, so the reconfigured model would train differently; {advice}"
        )


@contextlib.contextmanager
def mode_changes_refused(model: nn.Module, frontend: str = "fx") -> Iterator[None]:
    """A TraceError after the capture if the model's code switched a mode the graph does not
    record (a CaptureRefused when no front-end records it). fx records none: the grad mode and the autocast state
    (``torch._C._set_grad_enabled`` / ``torch.set_autocast_enabled``, which every spelling of
    those blocks calls); torch.export keeps those blocks, and neither records
    ``torch.inference_mode`` (``torch._C._InferenceMode``): the pruned graph would run such a
    block in the caller's mode (gradients through a stop-gradient). Counted for this thread
    only, when the block (or decorator) is in model code: a frame outside torch and prunefx,
    below the capture, which enters this context."""
    # the capture's frame by id (this generator, contextlib's __enter__, the capture): holding
    # the frame itself would make a cycle through its locals, which keeps the model alive
    owner, capture = threading.get_ident(), id(sys._getframe(2))
    seen: list[tuple[str, str, bool]] = []  # (what, where, whether torch.export loses it too)

    def watched(real: Callable[..., Any], what: str, lost_by_export: bool) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if not seen and threading.get_ident() == owner:
                frame = sys._getframe(1)
                while frame is not None and id(frame) != capture and frame.f_code.co_filename.endswith(_MODE_FILES):
                    frame = frame.f_back
                # the block's own code: model code (torch's own blocks, as in
                # torch.utils.checkpoint, leave gradients as they are and are left alone)
                if frame is not None and id(frame) != capture and _model_code(frame):
                    seen.append((what, _short_loc(frame), lost_by_export))
            return real(*args)

        return call

    switches = [(torch._C, "_InferenceMode", "enters torch.inference_mode", True)]
    if frontend == "fx":
        switches += [(torch._C, "_set_grad_enabled", "changes the grad mode (torch.no_grad, set_grad_enabled)", False),
                     (torch, "set_autocast_enabled", "enters or leaves torch.autocast", False)]
    real = [getattr(where, name) for where, name, _, _ in switches]
    for (where, name, what, lost_by_export), fn in zip(switches, real, strict=True):
        setattr(where, name, watched(fn, what, lost_by_export))
    try:
        yield
    finally:
        for (where, name, _, _), fn in zip(switches, real, strict=True):
            setattr(where, name, fn)
    if not seen:
        return
    (what, loc, lost_by_export), name = seen[0], type(model).__name__
    if lost_by_export:  # no front-end keeps it: "auto" must not try the other one
        raise CaptureRefused(
            f"{name} {what} at {loc} inside its forward, which neither torch.fx nor torch.export records: the pruned "
            "graph would let gradients through that block. What to do: use torch.no_grad() there, which torch.export "
            "keeps (frontend='export', or the default 'auto')."
        )
    raise TraceError(
        f"{name} {what} at {loc} inside its forward, which torch.fx cannot record: the pruned graph would "
        "run that block in the caller's mode. What to do: use frontend='export' (the default 'auto' falls back to "
        "it), which keeps the block."
    )


_MODE_FILES = tuple(os.path.join(*p) for p in (  # where the mode blocks and their decorators live
    ("autograd", "grad_mode.py"), ("amp", "autocast_mode.py"), ("utils", "_contextlib.py"), ("contextlib.py",)))
_LIBRARIES = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)


def _model_code(frame: Any) -> bool:
    """A frame of the model's code: not torch's (``torch.no_grad``'s own ``__enter__``), not
    prunefx's, not generated."""
    name = frame.f_code.co_filename
    return not name.startswith(_LIBRARIES) and not name.startswith("<")


def _short_loc(frame: Any) -> str:
    from prunefx.tracing import SourceLoc

    return str(SourceLoc(frame.f_code.co_filename, frame.f_lineno))


@contextlib.contextmanager
def activation_checkpoints_seen() -> Iterator[list[str]]:
    """The lines of model code that call ``torch.utils.checkpoint.checkpoint`` while this
    context is open (each once, in order; this thread only). Seen where ``checkpoint``
    enters torch's two variants (``CheckpointFunction.apply``, the non-reentrant generator),
    so every spelling counts: ``checkpoint_sequential``, timm's ``checkpoint_seq``, a name
    imported before the capture. The line is the nearest frame outside torch and prunefx."""
    import torch.utils.checkpoint as cp

    owner = threading.get_ident()
    seen: list[str] = []

    def note() -> None:
        if threading.get_ident() != owner:
            return
        frame = sys._getframe(2)
        while frame is not None and not _model_code(frame):
            frame = frame.f_back
        loc = _short_loc(frame) if frame is not None else "torch.utils.checkpoint"
        if loc not in seen:
            seen.append(loc)

    def watched(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            note()
            return real(*args, **kwargs)

        return call

    real_function = cp.CheckpointFunction
    generator = next(n for n in ("_checkpoint_without_reentrant_generator_impl", "_checkpoint_without_reentrant_generator") if hasattr(cp, n))
    real_generator = getattr(cp, generator)
    # `checkpoint` reads both as module globals at each call: CheckpointFunction only for its `apply`
    cp.CheckpointFunction = type("CheckpointFunction", (), {"apply": staticmethod(watched(real_function.apply))})
    setattr(cp, generator, watched(real_generator))
    try:
        yield seen
    finally:
        cp.CheckpointFunction = real_function
        setattr(cp, generator, real_generator)
