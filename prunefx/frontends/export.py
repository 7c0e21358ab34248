"""The ``torch.export`` front-end: an aten-level graph for models ``torch.fx`` cannot trace.

``torch.export.export(model, args, kwargs, strict=False)`` captures Hugging Face transformers
and other models whose Python fx's symbolic tracing cannot follow (decorated ``*args,
**kwargs`` forwards, iteration over proxies, shape-dependent control flow). Its graph takes
every parameter, buffer and lifted constant as a placeholder; this front-end turns those into
``get_attr`` nodes with the model's own qualified names (``graph_signature.inputs_to_parameters``
and ``inputs_to_buffers``), so the analysis, the group names and the rewrite passes see the
same kind of graph as with the fx front-end, only with aten ops (``aten.linear.default``,
``aten.scaled_dot_product_attention.default``, ...) where fx had modules and functions.

The graph is analysed directly, never re-traced: ``ep.module()`` re-traced with fx bakes the
example's sequence length into constants. The batch dim (and the sequence dim of integer
inputs such as token ids) is captured as dynamic (``Dim.AUTO``: kept dynamic unless the model
specialises it), so the pruned graph runs at other batch sizes and sequence lengths. The
graph is called like the model was at capture: the same positional and keyword arguments
(``_PyTreeCodeGen`` with the capture's input and output specs).

Source lines come from each node's ``stack_trace``, the module that computed a node from its
``nn_module_stack``.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from prunefx import guards
from prunefx import nn as pnn
from prunefx.errors import TraceError
from prunefx.tracing import (
    _TORCH_DIR,
    SourceLoc,
    Traced,
    attributes_restored,
    in_mode,
    transformers_models,
)

__all__ = ["export_trace", "dynamic_shapes_for"]

_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_CONSTANTS = "_prunefx_constants"
_PRUNEFX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where lifted tensor constants live on the captured GraphModule


def dynamic_shapes_for(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Dynamic dims for ``torch.export``: dim 0 of every tensor input (the batch), and dim 1
    of integer inputs of rank 2 (token ids, attention masks: the sequence), each only when
    its example size is at least 2 (export specialises sizes 0 and 1)."""
    auto = torch.export.Dim.AUTO

    def spec(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        dims = {0: auto} if x.shape[0] >= 2 else {}
        if x.dim() == 2 and not x.is_floating_point() and x.shape[1] >= 2:
            dims[1] = auto
        return dims or None

    signature = inspect.signature(model.forward)
    bound = signature.bind(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: pytree.tree_map(spec, v) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(pytree.tree_map(spec, v) for v in value)
        else:
            out[name] = pytree.tree_map(spec, value)
    return out


def export_trace(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None) -> tuple[Traced, tuple[Any, ...]]:
    """Capture ``model(*args, **kwargs)`` with ``torch.export``. Returns the Traced graph
    (parameters as ``get_attr`` of their qualified names) and the flat inputs its
    placeholders take, in order."""
    kwargs = dict(kwargs or {})
    with _evaluation_mode(model) as training:
        with guards.activation_checkpoints_seen() as checkpoints:
            ep = _guarded_capture(model, args, kwargs)
        gm, owners = _graph_module(model, ep)
    sources = {n: loc for n in gm.graph.nodes if (loc := _source_of(n)) is not None}
    flat = tuple(pytree.tree_leaves((tuple(args), kwargs)))
    traced = Traced(gm, sources, None, training, frontend="export", owners=owners, checkpoints=tuple(checkpoints))
    return traced, flat


@contextlib.contextmanager
def _evaluation_mode(model: nn.Module) -> Iterator[bool]:
    """A transformers model (or a model holding one, a PEFT model) is captured in evaluation
    mode, whatever mode it is in (PruneTrain traces it while it trains): torch.export bakes
    the mode into the graph (dropout becomes a random op with ``train=True``), while the
    pruned model is a model of its own class whose own forward follows ``.train()``/``.eval()``
    (dropout changes no channel). Yields the mode the graph holds; every module's flag is
    restored. Other models are captured as they are."""
    if not (model.training and transformers_models(model)):
        yield model.training
        return
    with in_mode(model, False):
        yield False


def _guarded_capture(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.export.ExportedProgram:
    """``_capture`` with what torch.export would silently lose refused (``prunefx.guards``):
    re-parametrised weights, backward hooks, forward hooks acting only by side effects
    (export runs every module's hooks and keeps what they return), custom autograd
    Functions (export inlines their forward and drops their backward)."""
    traced = guards.traced_modules(model, lambda m, name: False)  # export traces every module's forward
    guards.refuse_unreadable_modules(model)
    guards.refuse_traced_backward_hooks(model, traced, frontend="export")
    with attributes_restored(model), guards.watch_hooks(model, traced, frontend="export") as watch, \
            guards.custom_functions_refused(model), guards.mode_changes_refused(model, frontend="export"):
        ep = _capture(model, args, kwargs)
    watch.check()
    return ep


def _capture(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.export.ExportedProgram:
    try:
        dynamic = dynamic_shapes_for(model, args, kwargs)
    except TypeError as exc:
        raise TraceError(f"the example inputs do not fit {type(model).__name__}.forward: {exc}") from None
    try:
        return torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic, strict=False)
    except (guards.CaptureRefused, TraceError):
        raise  # a guard's refusal (a hook, a Function): the static retry would refuse it too
    except Exception as first:  # noqa: BLE001 - export raises many types; retry with static shapes
        try:
            ep = torch.export.export(model, tuple(args), kwargs, strict=False)
        except Exception as exc:  # noqa: BLE001
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            advice = "check that example_inputs / example_kwargs are what forward takes " \
                "(e.g. example_kwargs={'use_cache': False} for a transformers model), or capture a submodule that export can follow."
            if "use_cache" not in kwargs and "Cache" in cause and transformers_models(model):
                advice = "pass example_kwargs={'use_cache': False}: torch.export cannot return the key-value cache, and pruning needs none."
            raise TraceError(f"torch.export cannot capture {type(model).__name__}: {type(exc).__name__}: {cause}\n  What to do: {advice}") from first
        warnings.warn(
            f"prunefx: torch.export could not capture {type(model).__name__} with a dynamic batch/sequence "
            f"({str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__}); captured with "
            "static shapes, so the pruned graph runs only at the example inputs' sizes",
            stacklevel=4,
        )
        return ep


def _graph_module(model: nn.Module, ep: torch.export.ExportedProgram) -> tuple[fx.GraphModule, dict[fx.Node, str]]:
    """``ep.graph`` with parameters, buffers and constants read by ``get_attr``."""
    sig = ep.graph_signature
    kinds = {spec.arg.name: spec for spec in sig.input_specs}
    if any(spec.kind is not OutputKind.USER_OUTPUT for spec in sig.output_specs):
        mutated = [spec.target for spec in sig.output_specs if spec.kind is not OutputKind.USER_OUTPUT]
        raise TraceError(
            f"{type(model).__name__}'s forward mutates {', '.join(map(str, mutated[:3]))}, which the export "
            "front-end does not carry over. What to do: capture the model in eval mode (model.eval())."
        )
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    constants: dict[str, torch.Tensor] = {}
    for node in ep.graph.nodes:
        spec = kinds.get(node.name) if node.op == "placeholder" else None
        if spec is not None and spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            new = graph.get_attr(spec.target)
        elif spec is not None and spec.kind is InputKind.CONSTANT_TENSOR:
            name = f"{_CONSTANTS}.{re.sub(r'[^0-9a-zA-Z_]', '_', spec.target)}"
            constants[name] = ep.constants[spec.target]
            new = graph.get_attr(name)
        elif spec is not None and spec.kind is not InputKind.USER_INPUT:
            raise TraceError(f"torch.export gave {type(model).__name__} an input of kind {spec.kind.name}, which prunefx does not handle")
        elif _copy_call(graph, ep.graph_module, node, env):
            continue
        else:
            new = graph.node_copy(node, lambda n: env[n])
        new.meta = dict(node.meta)
        env[node] = new
    _follow_input_device(graph)
    _check_static_sizes(graph, type(model).__name__)
    info = _PyTreeInfo(_argument_names(ep), ep.call_spec.in_spec, ep.call_spec.out_spec)
    graph._codegen = _PyTreeCodeGen(info)
    root = _root(model, graph, constants)
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)
    gm.training = model.training
    owners = {n: path for n in gm.graph.nodes if (path := _owner_path(n)) is not None}
    return gm, owners


def _copy_call(graph: fx.Graph, owner: fx.GraphModule, node: fx.Node, env: dict[fx.Node, Any]) -> bool:
    """Copy what a higher-order op brings into ``graph`` (True when ``node`` was one of
    those). ``with torch.autocast(...)`` and ``with torch.no_grad()`` in a forward are
    captured as a call of a subgraph (``wrap_with_autocast``: EfficientViT's attention runs in
    float32; ``wrap_with_set_grad_enabled``); the subgraph is inlined between the calls that
    enter and leave the same mode, which is how the block runs, so the analysis sees its
    ops. The subgraph's ``get_attr`` is dropped, and each ``getitem`` of the op's results
    becomes the inlined result. Any other higher-order op is refused.

    Export's ``_assert_tensor_metadata`` checks (before each ``.to()``/``.float()``: dtype
    and device as captured) are dropped: the pruned graph, like the model, runs on another
    device, in another dtype and under autocast."""
    if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
        return True
    if node.op == "get_attr" and isinstance(getattr(owner, str(node.target), None), fx.GraphModule):
        return True  # a higher-order op's body, inlined where the op is called
    if node.op == "call_function" and node.target is operator.getitem and isinstance(env.get(node.args[0]), tuple):
        env[node] = env[node.args[0]][node.args[1]]
        return True
    if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
        return False
    sub = _body(owner, node)
    mode = _enter_mode(graph, node)
    if mode is None:
        body = sub.graph.nodes if sub is not None else ()
        loc = _source_of(node) or next((found for n in body if (found := _source_of(n)) is not None), None)
        raise TraceError(
            f"torch.export captured the higher-order op {node.target.name()} at {loc or node.name}, which prunefx "
            "does not analyse. What to do: trace with frontend='fx' if the model allows it, or keep that block "
            "out of the forward while pruning."
        )
    operands, leave = mode
    inner: dict[fx.Node, Any] = {}
    placeholders = iter(operands)
    for n in sub.graph.nodes:
        if n.op == "placeholder":
            arg = next(placeholders)
            inner[n] = env[arg] if isinstance(arg, fx.Node) else arg
        elif n.op == "output":
            env[node] = tuple(inner[o] if isinstance(o, fx.Node) else o for o in n.args[0])
        elif not _copy_call(graph, sub, n, inner):
            inner[n] = graph.node_copy(n, lambda a: inner[a])
            inner[n].meta = dict(n.meta)
    leave()
    return True


def _enter_mode(graph: fx.Graph, node: fx.Node) -> tuple[tuple[Any, ...], Callable[[], Any]] | None:
    """For a higher-order op that runs its body in a mode: add the call that enters the mode
    to ``graph`` and return the body's operands and a function adding the call that leaves
    it (None for any other op)."""
    if node.target is torch.ops.higher_order.wrap_with_autocast:  # (device, dtype, enabled, cache, body, *operands)
        ctx = graph.call_function(torch.amp.autocast_mode._enter_autocast, tuple(node.args[:4]))
        return node.args[5:], lambda: graph.call_function(torch.amp.autocast_mode._exit_autocast, (ctx,))
    if node.target is torch.ops.higher_order.wrap_with_set_grad_enabled:  # (enabled, body, *operands)
        was = graph.call_function(torch.is_grad_enabled)
        graph.call_function(torch._C._set_grad_enabled, (node.args[0],))
        return node.args[2:], lambda: graph.call_function(torch._C._set_grad_enabled, (was,))
    return None


def _body(owner: fx.GraphModule, node: fx.Node) -> fx.GraphModule | None:
    """The subgraph a higher-order op calls (its first ``get_attr`` argument)."""
    for arg in node.args:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            sub = getattr(owner, str(arg.target), None)
            if isinstance(sub, fx.GraphModule):
                return sub
    return None


def _follow_input_device(graph: fx.Graph) -> None:
    """torch.export writes the capture's device into the graph as a constant: a factory op
    or a move (``torch.arange(n, device=x.device)`` becomes ``aten.arange(n, device=cpu)``,
    a transformers mask is moved ``.to(device=cpu)``) and an inlined ``torch.autocast`` block
    (its device type). Moved to a GPU, the pruned graph would then mix devices, or run that
    block under the wrong device's autocast. Each such argument naming the capture's device
    reads the device of the first tensor input at run time instead, as the model's code did
    (``prunefx.nn.autocast_device_type`` for a block: the capture's type where autocast does not
    exist, on the meta device)."""
    inputs = list(graph.find_nodes(op="placeholder"))
    anchor = next((n for n in inputs if isinstance(n.meta.get("val"), torch.Tensor)), None)
    if anchor is None:
        return
    captured = anchor.meta["val"].device
    moves = [(n, at) for n in graph.nodes if (at := _device_argument(n)) is not None and _argument(n, at) == captured]
    blocks = [n for n in graph.find_nodes(op="call_function", target=torch.amp.autocast_mode._enter_autocast)
              if n.args[0] == captured.type]
    with graph.inserting_after(inputs[-1]):
        device = graph.call_function(getattr, (anchor, "device")) if moves else None
        kind = graph.call_function(pnn.autocast_device_type, (anchor, captured.type)) if blocks else None
    for node, at in moves:
        if isinstance(at, int):
            node.update_arg(at, device)
        else:
            node.update_kwarg(at, device)
    for node in blocks:
        node.update_arg(0, kind)


def _device_argument(node: fx.Node) -> int | str | None:
    """Where an aten call takes its ``device`` (a position, a keyword; None: it takes none)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    for i, arg in enumerate(node.target._schema.arguments):
        if arg.name == "device":
            return i if i < len(node.args) and not arg.kwarg_only else "device"
    return None


def _argument(node: fx.Node, at: int | str) -> Any:
    return node.args[at] if isinstance(at, int) else node.kwargs.get(at)


def _check_static_sizes(graph: fx.Graph, model: str) -> None:
    """A call of ``prunefx.nn.static_sizes`` after the inputs: the graph holds the example's size
    wherever torch.export kept one static (an image's sizes, a batch of 1, every size of a
    static capture), and called at another one it would fail deep inside with a raw
    RuntimeError, or compute on a wrong reshape."""
    inputs = list(graph.find_nodes(op="placeholder"))
    static = []
    for node in inputs:
        val = node.meta.get("val")
        sizes = tuple(d if isinstance(d, int) else None for d in val.shape) if isinstance(val, torch.Tensor) else ()
        static.append(sizes if any(d is not None for d in sizes) else None)
    if not any(static):
        return
    with graph.inserting_after(inputs[-1]):
        graph.call_function(pnn.static_sizes, (model, tuple(n.name for n in inputs), tuple(static), *inputs))


def _argument_names(ep: torch.export.ExportedProgram) -> list[str]:
    signature = ep.module_call_graph[0].signature
    if signature is not None and signature.forward_arg_names:
        return list(signature.forward_arg_names)
    return [f"arg_{i}" for i in range(ep.call_spec.in_spec.num_leaves)]


def _root(model: nn.Module, graph: fx.Graph, constants: dict[str, torch.Tensor]) -> nn.Module:
    """A module holding the model's own parameter and buffer objects at their qualified
    names (buffers keep their persistence), and the lifted constants."""
    root = nn.Module()
    for node in graph.find_nodes(op="get_attr"):
        target = str(node.target)
        *path, leaf = target.split(".")
        mod, src = root, model
        for item in path:
            src = getattr(src, item) if not target.startswith(_CONSTANTS) else None
            nxt = mod._modules.get(item)
            if nxt is None:
                nxt = nn.Module()
                nxt.training = src.training if isinstance(src, nn.Module) else model.training
                mod.add_module(item, nxt)
            mod = nxt
        if target in constants:
            mod.register_buffer(leaf, constants[target], persistent=False)
        elif isinstance(obj := getattr(src, leaf), nn.Parameter):
            mod.register_parameter(leaf, obj)
        else:
            mod.register_buffer(leaf, obj, persistent=leaf not in src._non_persistent_buffers_set)
    return root


def _owner_path(node: fx.Node) -> str | None:
    """Qualified name of the innermost module that computed ``node``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = next(reversed(stack.values()))[0]
    return path or None


def _source_of(node: fx.Node) -> SourceLoc | None:
    """The innermost frame of the node's stack trace that is model code (not torch's)."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    frames = _FRAME.findall(trace)
    for filename, line in reversed(frames):
        if not filename.startswith((_TORCH_DIR, _PRUNEFX_DIR)) and not filename.startswith("<"):
            return SourceLoc(filename, int(line))
    return SourceLoc(frames[-1][0], int(frames[-1][1])) if frames else None
