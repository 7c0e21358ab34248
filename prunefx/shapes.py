"""Stage 2 of the pipeline: shape propagation on meta tensors.

Runs ``torch.fx.passes.shape_prop.ShapeProp`` on meta tensors: a ``get_attr`` reads a meta
tensor like the attribute, a layer that runs has its parameters and buffers swapped for meta
ones during its call, so no real arithmetic is done and the model is left as it was.
Shape-preserving modules (norms, activations, dropout: ``OpSpec.keeps_shape``) are not
executed at all: their meta kernels are Python decompositions that cost 0.5-1 ms per
BatchNorm. For the same reason the ops whose record has a shape formula (``OpSpec.shape``:
``prunefx.shape_rules``, each checked against the meta kernel in tests/test_shapes.py) get
their output from it: convolutions, linear layers, attention, elementwise ops and
activations.

When a meta kernel is missing (data-dependent ops), it falls back to running a deep copy of
the traced module on the real example inputs under ``torch.no_grad()``: never the model
itself, whose BatchNorm layers would update their running statistics in training mode.

The result is a typed ``Shapes`` object: for each node, a ``torch.Size``, a (nested)
tuple/list/dict of them for aggregate outputs, or ``None`` for non-tensor values.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata, _extract_tensor_metadata
from torch.nn.utils.stateless import _reparametrize_module

from prunefx import ops
from prunefx.errors import TraceError
from prunefx.tracing import Traced

__all__ = ["Shapes", "propagate_shapes"]

@dataclass(frozen=True)
class Shapes:
    """Output shape (or nested shapes) of every node, plus the dtypes of tensor outputs."""

    of: Mapping[fx.Node, Any]
    dtypes: Mapping[fx.Node, Any]

    def __getitem__(self, node: fx.Node) -> Any:
        return self.of[node]

    def tensor(self, node: fx.Node) -> torch.Size | None:
        s = self.of.get(node)
        return s if isinstance(s, torch.Size) else None


_META = torch.device("meta")


class _TrackingShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running, to name it when something fails, and
    lets the failure through as it is: fx's ``ShapeProp.run_node`` prints the traceback of
    every failure to stderr (~120 lines for a wrong input shape) and rewraps it as
    "ShapeProp error for: node=...", and the interpreter appends "While executing ..." to its
    message; the TraceError that follows says the cause and the node itself."""

    current: fx.Node | None = None

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        # fx.Interpreter.run_node without its debug log and current-node metadata context (for
        # tracing interpreters; nothing traces here), which cost as much as a shape formula
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        result = getattr(self, n.op)(n.target, args, kwargs)
        found = False

        def tensor_meta(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, tensor_meta)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result

    def fetch_attr(self, target: str) -> Any:
        # a submodule from the interpreter's own name table (fx walks the dotted path with
        # hasattr + getattr per part, a third of this pass); anything else as fx finds it
        mod = self.submodules.get(target)
        return mod if mod is not None else super().fetch_attr(target)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        # generated code passes fresh lists; the interpreter passes fx's immutable ones,
        # which functions that edit their arguments (Swin3D's window sizes) reject
        return super().call_function(target, _mutable(args), _mutable(kwargs))


class _MetaShapeProp(_TrackingShapeProp):
    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        # export graphs name the capture's device (`arange(..., device=cpu)`, `x.to(cpu)`):
        # on meta tensors every such device is meta
        args = tuple(_META if isinstance(v, torch.device) else v for v in args)
        if isinstance(kwargs.get("device"), torch.device):
            kwargs = {**kwargs, "device": _META}
        return super().call_function(target, args, kwargs)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        mod = self.fetch_attr(target)
        x = args[0] if args else None
        spec = ops.spec_of_module(mod)
        if spec is not None and spec.keeps_shape and isinstance(x, torch.Tensor) and x.is_meta:
            return _like(x)
        state = _meta_state(mod)
        if not state:
            return super().call_module(target, args, kwargs)
        with _reparametrize_module(mod, state):  # only the layers that run see meta tensors
            return super().call_module(target, args, kwargs)

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return torch.empty_like(value, device=_META) if isinstance(value, torch.Tensor) and not value.is_meta else value


def _like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)``: on meta tensors a Python decomposition (~0.1 ms), so a dense
    input takes its strides directly (~1 us)."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=_META)
    return torch.empty_like(x)


class _ShapesOnly(_MetaShapeProp):
    """Shapes without running the ops whose record has a shape formula
    (``prunefx.shape_rules``); the cost interpreters (``prunefx.flops``) run every op, since
    FLOPs are counted as they run."""

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = _by_formula(ops.table().by_function.get(target), target, args, kwargs)
        return out if out is not None else super().call_function(target, args, kwargs)

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = _by_formula(ops.table().by_method.get(target), target, args, kwargs)
        return out if out is not None else super().call_method(target, args, kwargs)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        mod = self.fetch_attr(target)
        out = _by_formula(ops.spec_of_module(mod), mod, args, kwargs)
        return out if out is not None else super().call_module(target, args, kwargs)


def _by_formula(spec: ops.OpSpec | None, op: Any, args: Any, kwargs: Any) -> Any:
    """The op's output by its record's shape formula, or None (no formula, or not this call)."""
    return spec.shape(op, args, kwargs) if spec is not None and spec.shape is not None else None


_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """``_extract_tensor_metadata(t)``, with the memory format found by the tensor's own
    contiguity flags rather than fx's Python re-derivation of them from sizes and strides,
    which took a quarter of shape propagation (same answer on concrete shapes)."""
    if t.is_quantized or t.layout != torch.strided or isinstance(t, torch._subclasses.FakeTensor):
        return _extract_tensor_metadata(t)
    fmt = next((f for f in _FORMATS if t.is_contiguous(memory_format=f)), None)
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), fmt, False, {})


def _mutable(x: Any) -> Any:
    """fx's immutable containers as plain ones; a namedtuple or a ``torch.return_types``
    structseq (``x.max(dim)``, read as ``.values``/``.indices``) stays what it is."""
    if isinstance(x, list):
        return [_mutable(v) for v in x]
    if type(x) is tuple:
        return tuple(_mutable(v) for v in x)
    if isinstance(x, dict):
        return {k: _mutable(v) for k, v in x.items()}
    return x


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.empty_like(x, device="meta")
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple takes its fields positionally
        return type(x)(*(_to_meta(v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_to_meta(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_meta(v) for k, v in x.items()}
    return x


def _shape_tree(meta: Any) -> Any:
    if isinstance(meta, TensorMetadata):
        return meta.shape
    if isinstance(meta, (list, tuple)) and not isinstance(meta, torch.Size):
        return type(meta)(_shape_tree(v) for v in meta) if not hasattr(meta, "_fields") else tuple(_shape_tree(v) for v in meta)
    if isinstance(meta, dict):
        return {k: _shape_tree(v) for k, v in meta.items()}
    return None


def _dtype_of(meta: Any) -> Any:
    return meta.dtype if isinstance(meta, TensorMetadata) else None


def propagate_shapes(traced: Traced, example_inputs: tuple[Any, ...]) -> Shapes:
    """Shapes of every node of ``traced.module`` for ``example_inputs``."""
    of: dict[fx.Node, Any] = {}
    dtypes: dict[fx.Node, Any] = {}
    for gm in traced.graphs:
        _propagate(traced, gm, example_inputs)
        for node in gm.graph.nodes:
            meta = node.meta.get("tensor_meta")
            of[node] = _shape_tree(meta)
            dtypes[node] = _dtype_of(meta)
    return Shapes(of, dtypes)


def _meta_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A meta tensor like each parameter and buffer of ``module`` (shared ones by every name),
    to swap in with ``_reparametrize_module``."""
    return {
        name: torch.empty_like(t, device="meta")
        for name, t in (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False))
    }


def _propagate(traced: Traced, gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> None:
    prop: _TrackingShapeProp = _ShapesOnly(gm)  # meta tensors wherever the graph reads the model's
    try:
        with torch.no_grad():
            prop.propagate(*_to_meta(example_inputs))
    except Exception as meta_exc:  # a missing meta kernel: run for real, on a copy
        if any(isinstance(x, torch.Tensor) and x.is_meta for x in example_inputs):
            raise _shape_error(traced, prop.current, meta_exc) from meta_exc
        _propagate_on_a_copy(traced, gm, example_inputs, meta_exc)


def _propagate_on_a_copy(traced: Traced, gm: fx.GraphModule, example_inputs: tuple[Any, ...], meta_exc: Exception) -> None:
    """The fallback: a deep copy of ``gm`` runs on copies of the real inputs and its nodes'
    shapes are copied back, node by node. Never the model itself: in training mode its
    BatchNorm layers would update their running statistics, also when a TraceError follows."""
    try:
        twin, inputs = copy.deepcopy(gm), copy.deepcopy(example_inputs)
    except Exception as exc:
        raise TraceError(
            f"shapes cannot be computed on meta tensors ({type(meta_exc).__name__}: {str(meta_exc).splitlines()[0] if str(meta_exc) else ''}) "
            f"and the model cannot be copied to run it without changing it ({type(exc).__name__}: {exc}); "
            "make the model deep-copyable, or pass example_inputs with the shape the model expects"
        ) from exc
    original = dict(zip(twin.graph.nodes, gm.graph.nodes, strict=True))
    prop = _TrackingShapeProp(twin)
    try:
        with torch.no_grad():
            prop.propagate(*inputs)
    except Exception as exc:
        raise _shape_error(traced, original.get(prop.current), exc) from exc  # type: ignore[arg-type]
    for theirs, mine in original.items():
        for key in ("tensor_meta", "type"):
            if key in theirs.meta:
                mine.meta[key] = theirs.meta[key]


def _shape_error(traced: Traced, failed: fx.Node | None, exc: BaseException) -> TraceError:
    """One line, the cause before the place: "shape propagation failed: Given groups=1, ...
    expected input[2, 1, 8, 8] to have 3 channels, but got 1 channels instead, at node
    'conv1' (...) at net.py:12 `...`; check that example_inputs ...". """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = lines[0] if lines else type(exc).__name__
    if not isinstance(exc, RuntimeError):
        cause = f"{type(exc).__name__}: {cause}"
    where = f", at {traced.where(failed)}" if failed is not None else ""
    return TraceError(
        f"shape propagation failed: {cause}{where}; check that example_inputs have the shape the model expects "
        "(a tuple of positional inputs)"
    )
