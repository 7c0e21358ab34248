"""Stage 1 of the pipeline: symbolic tracing with torch.fx.

The tracer records, for every node it creates, the user source line that created it
(a cheap frame walk; fx's own ``record_stack_traces`` captures a whole stack per node and
made tracing ResNet-50 several times slower here), so that
every reason and error can name the line of model code responsible.

The graph is what ``model(x)`` runs, not only ``forward``: the model's own forward
(pre-)hooks are traced around it, hooks of leaf modules pin the channels they see, custom
autograd Functions stay one opaque call, and what cannot be kept (re-parametrised weights,
hooks acting only by side effects) is refused; see ``prunefx.guards`` for the rule per kind.

Example::

    >>> import torch, prunefx
    >>> traced = prunefx.tracing.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)))
    >>> [n.op for n in traced.module.graph.nodes]
    ['placeholder', 'call_module', 'output']
"""

from __future__ import annotations

import functools
import linecache
import os
import re
import sys
import threading
import traceback
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.proxy import ParameterProxy

from prunefx import guards, ops
from prunefx.errors import TraceError

__all__ = ["SourceLoc", "Traced", "symbolic_trace", "describe_node", "guess_example_inputs", "in_mode", "is_transformers_model", "transformers_models", "attributes_restored"]


@functools.cache
def derives_from(cls: type, name: str, module_prefix: str) -> bool:
    """``cls`` derives from the class ``name`` of a library whose modules start with
    ``module_prefix`` (found by name in its bases: the library need not be imported)."""
    return any(c.__name__ == name and c.__module__.startswith(module_prefix) for c in cls.__mro__)


def is_transformers_model(model: nn.Module) -> bool:
    """A Hugging Face ``PreTrainedModel`` (found by its bases: transformers is not imported)."""
    return derives_from(type(model), "PreTrainedModel", "transformers")


def transformers_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Hugging Face ``PreTrainedModel`` instances in ``model``, outermost only, each with
    the prefix of its parameter names (``""`` for ``model`` itself): a PEFT model or a user's
    wrapper holds one (``base_model.model.``), whose heads and config are kept as if it were
    the model."""
    if is_transformers_model(model):
        return [("", model)]
    if "transformers" not in sys.modules:  # (no such model can exist: the walk is skipped)
        return []
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if is_transformers_model(m) and not any(name.startswith(p) for p, _ in found):
            found.append((f"{name}.", m))
    return found


@contextmanager
def in_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """``model.train(training)`` for the duration; afterwards ``model.train`` with the old mode
    (an overridden ``train`` undoes what it did) and every module's own flag restored exactly
    (a model left in a mixed state comes back mixed)."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        model.train(flags[0][1])
        for m, flag in flags:
            m.training = flag

_TORCH_DIR = os.path.dirname(torch.__file__)
# Frames in these files are plumbing between the user's code and the node being created.
_PLUMBING = (
    os.path.join(_TORCH_DIR, "fx") + os.sep,
    os.path.join(_TORCH_DIR, "nn", "modules", "module.py"),
    os.path.join(_TORCH_DIR, "nn", "modules", "container.py"),
    os.path.join(_TORCH_DIR, "_ops.py"),
    os.path.join(_TORCH_DIR, "overrides.py"),
    os.path.join(_TORCH_DIR, "_tensor.py"),
    os.path.join(_TORCH_DIR, "nn", "functional.py"),  # F.* reach the tracer via handle_torch_function
    os.path.join(_TORCH_DIR, "functional.py"),
    os.path.join(_TORCH_DIR, "_jit_internal.py"),
    os.path.join(_TORCH_DIR, "__init__.py"),  # torch._assert
    os.path.dirname(os.path.abspath(__file__)) + os.sep,  # prunefx itself (the tracer's own frames)
)


@dataclass(frozen=True)
class SourceLoc:
    """A line of model source code."""

    filename: str
    lineno: int

    @property
    def code(self) -> str:
        return linecache.getline(self.filename, self.lineno).strip()

    def __str__(self) -> str:
        code = self.code
        where = f"{_short(self.filename)}:{self.lineno}"
        return f"{where} `{code}`" if code else where


def _short(filename: str) -> str:
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if marker in filename:
            return filename.split(marker, 1)[1]
    cwd = os.getcwd() + os.sep
    return filename[len(cwd):] if filename.startswith(cwd) else filename


def _user_frame(frame: Any) -> SourceLoc | None:
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_PLUMBING) and not name.startswith("<"):
            return SourceLoc(name, frame.f_lineno)
        frame = frame.f_back
    return None


@dataclass(frozen=True)
class Traced:
    """Result of tracing: the GraphModule, where each node came from and, when the model's
    forward differs between training and evaluation (Python branches on ``self.training``),
    the graph of the other mode."""

    module: fx.GraphModule
    sources: Mapping[fx.Node, SourceLoc]  # node -> user source line
    other: fx.GraphModule | None = None  # traced in the other train/eval mode, if different
    training: bool = False  # the mode `module` was traced in
    frontend: str = "fx"  # "fx" (torch.fx.symbolic_trace) or "export" (torch.export, aten ops)
    owners: Mapping[fx.Node, str] = field(default_factory=dict)  # export: node -> module that computed it
    # where the forward checkpoints activations (torch.utils.checkpoint), which the graph
    # traced through: same values, every activation kept (guards.activation_checkpoints_seen)
    checkpoints: tuple[str, ...] = ()

    @property
    def graphs(self) -> tuple[fx.GraphModule, ...]:
        return (self.module,) if self.other is None else (self.module, self.other)

    @functools.cached_property
    def modules(self) -> dict[str, nn.Module]:
        """Every submodule of the traced graphs by qualified name, walked once at first use
        (the graphs' module trees do not change after tracing)."""
        return {n: m for gm in self.graphs for n, m in gm.named_modules()}

    @functools.cached_property
    def _module_paths(self) -> tuple[tuple[tuple[str, nn.Module], ...], ...]:
        """Per graph, ``named_modules(remove_duplicate=False)``: the walk ``named_parameters``
        and ``named_buffers`` make, done once."""
        return tuple(tuple(gm.named_modules(remove_duplicate=False)) for gm in self.graphs)

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Every (name, parameter or buffer) of the traced graphs, the main graph first,
        tied tensors under each of their names: per graph, what ``named_parameters`` then
        ``named_buffers`` (``remove_duplicate=False``) list. Read anew at each call: the graphs
        share their layers with the model, whose tensors can change after tracing (a constant
        fold gives a layer a new bias)."""
        return [
            (f"{prefix}.{name}" if prefix else name, t)
            for paths in self._module_paths for kind in ("_parameters", "_buffers")
            for prefix, m in paths for name, t in getattr(m, kind).items() if t is not None
        ]

    def nodes(self) -> Iterator[fx.Node]:
        """Nodes of every graph, the main one first."""
        for gm in self.graphs:
            yield from gm.graph.nodes

    def where(self, node: fx.Node) -> str:
        """``node.format_node()`` plus the module that computed it (export graphs) and the
        user source line, for reasons and errors."""
        text = describe_node(node, self.sources.get(node))
        owner = self.owners.get(node)
        return text.replace(")", f") in module '{owner}'", 1) if owner else text


def describe_node(node: fx.Node, loc: SourceLoc | None) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "prunefx_label", None) or getattr(node.target, "__name__", str(node.target))
    text = f"node '{node.name}' ({node.op} {target})"
    return f"{text} at {loc}" if loc is not None else text


def _keeps_base_forward(m: nn.Module) -> bool:
    """A subclass of a torch.nn layer that does not override forward (torchvision's
    Conv3DSimple): trace it as the layer it is, not through its forward."""
    cls = type(m)
    if cls.__module__.startswith("torch.nn"):
        return False
    for base in cls.__mro__[1:]:
        if base.__module__.startswith("torch.nn.modules") and base is not nn.Module:
            return cls.forward is base.forward and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
    return False


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: Iterable[type | str] = ()) -> None:
        super().__init__()
        leaves = tuple(leaf_modules)
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_names = frozenset(x for x in leaves if isinstance(x, str))
        self.sources: dict[fx.Node, SourceLoc] = {}
        self._leaf_memo: dict[tuple[int, str], bool] = {}  # fx and the guards ask ~5 times per module
        self._tensor_names: tuple[dict[int, tuple[str, Any]], dict[int, tuple[str, Any]]] | None = None
        self._hooked = True  # whether any module of the model has a hook (a leaf's call then needs a look)
        self.checkpoints: list[str] = []  # lines that checkpoint activations (guards.activation_checkpoints_seen)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        key = (id(m), module_qualified_name)  # the modules outlive the trace, so ids are not reused
        leaf = self._leaf_memo.get(key)
        if leaf is None:
            leaf = self._leaf_memo[key] = module_qualified_name in self._leaf_names or isinstance(m, self._leaf_types) \
                or _keeps_base_forward(m) or ops.is_leaf_type(type(m)) or super().is_leaf_module(m, module_qualified_name)
        return leaf

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """fx's ``getattr`` (a parameter or buffer read as a module attribute becomes a
        ``get_attr`` node, one per name), with the tensor's name looked up in a table: fx
        searches ``root.named_parameters()`` from the start at every read, which made tracing
        quadratic in the model's size (Swin-T reads its attention weights as attributes:
        ~10 ms of each trace). Names the table does not hold go to fx's search."""
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        if self._tensor_names is None:
            # each tensor once, under its first name: the one fx's search finds
            params = {id(p): (n, p) for n, p in self.root.named_parameters()}
            buffers = {id(b): (n, b) for n, b in self.root.named_buffers()}
            self._tensor_names = (params, buffers)
        params, buffers = self._tensor_names
        found = params.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if found is None and self.proxy_buffer_attributes:
            found = buffers.get(id(attr_val))
        if found is None or found[1] is not attr_val:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        name = found[0]
        if name not in parameter_proxy_cache:
            factory = (lambda node: ParameterProxy(self, node, name, attr_val)) if self.param_shapes_constant else None
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {}, proxy_factory_fn=factory)
        return parameter_proxy_cache[name]

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        """fx's trace, with custom autograd Functions kept opaque and the hooks of traced
        modules watched; what cannot be kept is refused (``prunefx.guards``)."""
        self._tensor_names = None  # built at the first attribute read of this trace
        if not isinstance(root, nn.Module):
            return super().trace(root, concrete_args)
        guards.refuse_unreadable_modules(root)
        traced = guards.traced_modules(root, self.is_leaf_module)
        self._hooked = guards.any_hooks(root)
        guards.refuse_instance_forward(root, traced)
        guards.refuse_traced_backward_hooks(root, traced)
        with guards.watch_hooks(root, traced) as watch, guards.custom_functions_opaque(), guards.mode_changes_refused(root), \
                guards.activation_checkpoints_seen() as self.checkpoints:
            graph = super().trace(root, concrete_args)
        watch.check()
        return graph

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> tuple[Any, list[Any]]:
        """The model's own forward (pre-)hooks, which fx does not run, around its forward."""
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        root = self.root
        if not is_module or not guards.forward_hooks_of(root):
            return fn, args
        if fn is not root_fn:
            raise TraceError(
                f"{type(root).__name__} has forward hooks and a forward taking *args/**kwargs (or nested concrete_args), "
                "which prunefx cannot trace the hooks around; remove the hooks (handle.remove()) before pruning and "
                "register them on the result"
            )

        def hooked(self_: nn.Module, *inputs: Any) -> Any:
            return guards.run_with_hooks(root, lambda *a, **k: fn(self_, *a, **k), inputs, {})

        return hooked, args

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A leaf module whose call runs hooks: the channels they see are pinned."""
        if not self._hooked:
            return super().call_module(m, forward, args, kwargs)
        name = self.path_of_module(m)
        hooks = guards.hooks_within(m) if self.is_leaf_module(m, name) else []
        if not hooks:
            return super().call_module(m, forward, args, kwargs)
        marker = guards.HookedChannels(name, hooks)
        out = super().call_module(m, forward, marker.mark(self, args), marker.mark(self, kwargs))
        return marker.mark(self, out) if marker.sees_output else out

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):  # type: ignore[override]
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        loc = _user_frame(sys._getframe(1))
        if loc is not None:
            self.sources[node] = loc
        return node


def symbolic_trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    both_modes: bool = True,
) -> Traced:
    """Trace ``model`` into a GraphModule whose submodule names match the model's; with
    ``both_modes``, also in the other train/eval mode (kept only when the code differs).

    Raises TraceError naming the module and source line that symbolic tracing cannot
    handle, and what to do about it.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    with attributes_restored(model):
        leaves = tuple(leaf_modules)
        tracer = _Tracer(leaves)
        try:
            with _mode_reads(model) as reads:
                graph = tracer.trace(model, concrete_args=concrete_args)
        except (TraceError, guards.CaptureRefused):
            raise  # a guard's refusal names its module and hook already
        except Exception as exc:  # fx raises many types; all mean "cannot trace"
            raise _trace_error(model, tracer, exc) from exc
        _default_concrete(graph, concrete_args)
        name = model.__class__.__name__
        # its Python code is generated on first call or `.code` read: prunefx itself runs the
        # graph with interpreters, so most traces never need it
        main = _LazyGraphModule(tracer.root, graph, class_name=name)
        sources, checkpoints = dict(tracer.sources), list(tracer.checkpoints)
        # code that never read a `training` flag runs the same in the other mode: no second trace
        mode_dependent = reads is None or bool(reads)
        other = _trace_other_mode(model, leaves, concrete_args, main, sources, checkpoints) if both_modes and mode_dependent else None
    return Traced(main, sources, other, model.training, checkpoints=tuple(checkpoints))


@contextmanager
def attributes_restored(model: nn.Module) -> Iterator[None]:
    """Every module's attributes as they were before, once the capture is done (also when it
    fails): fx stores each constant a trace creates (``torch.tensor([2.0])`` in a forward) on
    the traced model itself, as ``model._tensor_constant0``, ... (the GraphModule takes its own
    reference), and a forward may set attributes while it is captured (Funnel's
    ``attention_structure.seq_len = seq_len`` leaves a SymInt under torch.export, a Proxy
    under fx, and the model no longer deep-copies). Attributes added are removed, replaced
    ones put back; the contents of ``_parameters``/``_buffers``/``_modules`` are not
    touched. The contents of a plain dict or list a module holds are put back too (one
    level): timm's TinyViT caches its attention biases in a dict during the forward, which
    export left holding FakeTensors that the model's next forward would read. Repeated
    traces (a PruneTrain shrink) do not pile up attributes."""
    saved = [(m.__dict__, dict(m.__dict__)) for m in model.modules()]
    held = [(v, v.copy()) for attrs, _ in saved for k, v in attrs.items() if type(v) in (dict, list) and k not in _MODULE_OWN]
    try:
        yield
    finally:
        for now, before in saved:  # (putting back what did not change is cheaper than comparing)
            now.clear()
            now.update(before)
        for container, contents in held:
            if isinstance(container, dict):
                container.clear()
                container.update(contents)
            else:
                container[:] = contents


_MODULE_OWN = frozenset(vars(nn.Module()))  # _parameters, _buffers, _modules, the hook dicts: nn.Module's own


@contextmanager
def _mode_reads(model: nn.Module) -> Iterator[list[str] | None]:
    """The modules whose ``training`` flag the code run inside reads (type names, in order),
    or None when the reads cannot be watched.

    The other mode differs from this one only in the modules' ``training`` flags
    (``model.train``), so code that never reads one traces the same in both modes. The
    reads are seen by a property standing in for the flag on ``nn.Module`` for the
    duration, counting this thread only. It cannot see a flag that a subclass redefines
    (a class attribute or property named ``training`` shadows it), and an overridden
    ``train`` may change more than the flags: those models get None, and their caller
    traces the other mode.
    """
    if not all(_mode_is_a_flag(type(m)) for m in model.modules()) or not _MODE_WATCH.acquire(blocking=False):
        yield None  # (the lock: another thread's trace is watching)
        return
    if "training" in vars(nn.Module):  # someone else's stand-in
        _MODE_WATCH.release()
        yield None
        return
    owner = threading.get_ident()
    seen: list[str] = []

    def read(self: nn.Module) -> bool:
        if threading.get_ident() == owner:
            seen.append(type(self).__name__)
        try:
            return self.__dict__["training"]
        except KeyError:
            raise AttributeError("training") from None

    def write(self: nn.Module, value: bool) -> None:
        self.__dict__["training"] = value

    nn.Module.training = property(read, write)  # type: ignore[assignment]
    try:
        yield seen
    finally:
        del nn.Module.training
        _MODE_WATCH.release()


_MODE_WATCH = threading.Lock()


@functools.cache
def _mode_is_a_flag(cls: type) -> bool:
    """Whether a module of this class keeps its mode in the plain ``training`` flag that
    ``nn.Module.train`` sets (see ``_mode_reads``)."""
    if getattr(cls, "train", None) is not nn.Module.train:
        return False
    return not any("training" in vars(c) for c in cls.__mro__ if c is not nn.Module)


def _default_concrete(graph: fx.Graph, concrete_args: dict[str, Any] | None) -> None:
    """fx keeps a placeholder for each concrete arg, guarded by an assert that it equals the
    concrete value, but with the signature's old default. Make the concrete value the
    default, so shape propagation and the reconfigured model run without passing it."""
    if not concrete_args:
        return
    for node in graph.find_nodes(op="placeholder"):
        target = str(node.target)
        name = target if target in concrete_args else re.sub(r"_\d+$", "", target)  # fx renames it `double_1`
        if name in concrete_args and not target.startswith("*"):
            node.args = (concrete_args[name],)


def _trace_other_mode(model: nn.Module, leaves: tuple, concrete_args: Any, main: fx.GraphModule, sources: dict,
                      checkpoints: list[str]) -> fx.GraphModule | None:
    """The graph of the other train/eval mode, or None when it is the same code (its source
    lines join ``sources``, its checkpointed lines ``checkpoints``). The model's mode flags
    are restored exactly."""
    tracer = _Tracer(leaves)
    try:
        with in_mode(model, not model.training):
            graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:
        mode = "training" if not main.training else "evaluation"
        warnings.warn(f"prunefx: {type(model).__name__} cannot be traced in {mode} mode ({exc}); the reconfigured "
                      f"model reproduces only the mode it was traced in", stacklevel=3)
        return None
    _default_concrete(graph, concrete_args)
    # the code GraphModule would generate, compared before building one (its module copies
    # and compile are wasted when the modes run the same code, as in most models); when it
    # differs (or a profiler option changes the generated code), the built module decides
    if graph.python_code(root_module="self").src == main.code:
        return None
    other = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    if other.code == main.code:
        return None
    sources.update(tracer.sources)
    checkpoints.extend(c for c in tracer.checkpoints if c not in checkpoints)
    return other


def _trace_error(model: nn.Module, tracer: _Tracer, exc: BaseException) -> TraceError:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_PLUMBING)]
    where = ""
    if frames:
        f = frames[-1]
        where = f"\n  at {_short(f.filename)}:{f.lineno} `{(f.line or '').strip()}`"
    stack = list(getattr(tracer, "module_stack", {}).keys())
    inside = next((s for s in reversed(stack) if s), "")
    module_txt = f" inside module '{inside}'" if inside else ""
    return TraceError(
        f"torch.fx cannot trace {type(model).__name__}{module_txt}: {type(exc).__name__}: {exc}{where}\n"
        "  What to do: mark the offending submodule as opaque with "
        "prunefx.trace(model, leaf_modules=[ModuleType or 'qualified.name']) (its channels are then pinned), "
        "or fix Python-level values with concrete_args={...}."
    )


def guess_example_inputs(gm: fx.GraphModule) -> tuple[torch.Tensor, ...] | None:
    """Inputs inferred from the first layer reading each placeholder, or None.

    A Conv{1,2,3}d reader gives (1, C, 224[, 224[, ...]]) (3-D: (1, C, 16, 112, 112)); a Linear
    gives (1, in_features); an Embedding gives (1, 16) indices.
    """
    modules = dict(gm.named_modules())
    inputs: list[torch.Tensor] = []
    for ph in gm.graph.find_nodes(op="placeholder"):
        guess = None
        for user in ph.users:
            m = modules.get(user.target) if user.op == "call_module" else None
            guess = _guess_for(m)
            if guess is not None:
                break
        if guess is None:
            return None
        inputs.append(guess)
    return tuple(inputs)


def _guess_for(m: nn.Module | None) -> torch.Tensor | None:
    p = next(m.parameters(), None) if m is not None else None
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    spatial: dict[type, tuple[int, ...]] = {nn.Conv1d: (224,), nn.Conv2d: (224, 224), nn.Conv3d: (16, 112, 112)}
    for kind, sizes in spatial.items():
        if isinstance(m, kind):
            return torch.empty(1, m.in_channels, *sizes, dtype=dtype, device="meta")
    if isinstance(m, nn.Linear):
        return torch.empty(1, m.in_features, dtype=dtype, device="meta")
    if isinstance(m, nn.Embedding):
        return torch.zeros(1, 16, dtype=torch.long, device="meta")
    return None

