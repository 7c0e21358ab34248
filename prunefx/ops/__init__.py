"""What prunefx knows about each op, in one record per op (``OpSpec``).

A record holds the op's channel rule (stage 3, ``prunefx.analysis.rules``), its output shape
by formula where it has one (stage 2, ``prunefx.shape_rules``), how the rewrite
fixes its size arguments (``passes/fix_shape_args.py``), whether it accepts a tensor whose
channel dim a mask empties, whether it is pure size arithmetic that dead-code elimination
may drop, and every spelling that maps to it: Python functions, ``Tensor`` method names,
module types and aten overloads (the ``torch.export`` front-end). Every other table is derived
from these records, so teaching prunefx an op is one local change in ``prunefx/ops/records.py``::

    OpSpec("roll", rules.roll, functions=(torch.roll, aten.roll.default), methods=("roll",))

``lookup(node, modules)`` finds the record of an fx node; a node no record knows gets
``None`` (the analysis then pins every channel it touches, with the node and source line).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch.fx as fx
from torch import nn

__all__ = ["OpSpec", "OpTable", "table", "lookup", "spec_of_module", "is_leaf_type"]

Rule = Callable[[Any, fx.Node], Any]  # (Analyzer, node) -> output layout
Fix = Callable[[Any, fx.Node, fx.Node], None]  # (RewriteState, traced node, its copy)


@dataclass(frozen=True)
class OpSpec:
    """Everything prunefx knows about one op."""

    name: str
    rule: Rule
    functions: tuple[Any, ...] = ()  # call_function targets: torch/F/operator callables, aten overloads
    methods: tuple[str, ...] = ()  # call_method targets
    modules: tuple[type, ...] = ()  # call_module types (subclasses match through the MRO)
    operators: tuple[str, ...] = ()  # custom operators by schema name ("transformers::grouped_mm_fallback"):
    # a library registers them when it is imported, which may be after the table is built
    fix: Fix | None = None  # rewrites size arguments after pruning (split sizes, view shapes, ...)
    size_args: bool = False  # integer arguments are sizes: `fix` owns them, FreezeStaleSizes leaves them
    empty_ok: bool = False  # works when an input has 0 channels (see prunefx/plan.py)
    pure: bool = False  # size arithmetic: dead-code elimination may remove it when unused
    weight_flops: bool = False  # FLOPs proportional to the size of the weight it reads (masks/cost.py)
    foldable: bool = False  # + - * with broadcasting: a constant operand folds through it (train/branches.py)
    shape: Callable[[Any, tuple, dict], Any] | None = None  # output on meta tensors by formula (prunefx/shape_rules.py)
    keeps_shape: bool = False  # its modules return a tensor of their first input's shape and dtype (norms, activations,
    # dropout): the meta interpreters take a copy of the input (strides too) rather than run their meta kernels (Python
    # decompositions: up to milliseconds each); tests/test_shapes.py checks each against its kernel
    leaf: bool = False  # fx keeps these modules one node (their forward branches on self.training; at run time the
    # module does that itself, so both modes trace alike), when their class keeps the record's forward

    def spellings(self) -> Iterator[tuple[str, Any]]:
        yield from (("function", f) for f in self.functions)
        yield from (("method", m) for m in self.methods)
        yield from (("module", t) for t in self.modules)
        yield from (("operator", o) for o in self.operators)


class OpTable:
    """The records, indexed by spelling. A spelling claimed by two records is an error."""

    def __init__(self, specs: tuple[OpSpec, ...]) -> None:
        self.specs = specs
        self.by_function: dict[Any, OpSpec] = {}
        self.by_method: dict[str, OpSpec] = {}
        self.by_module: dict[type, OpSpec] = {}
        self.by_operator: dict[str, OpSpec] = {}
        index: Mapping[str, dict] = {"function": self.by_function, "method": self.by_method, "module": self.by_module,
                                     "operator": self.by_operator}
        for spec in specs:
            for kind, key in spec.spellings():
                other = index[kind].get(key)
                if other is not None and other is not spec:  # (F.relu_ is torch.relu_: one op, two names)
                    raise ValueError(f"{kind} {key!r} is claimed by op records '{other.name}' and '{spec.name}'")
                index[kind][key] = spec
        self._module_cache: dict[type, OpSpec | None] = {}

    def module(self, cls: type) -> OpSpec | None:
        """The record of a module type (its first ancestor with one)."""
        if cls not in self._module_cache:
            self._module_cache[cls] = next((self.by_module[c] for c in cls.__mro__ if c in self.by_module), None)
        return self._module_cache[cls]

    def lookup(self, node: fx.Node, modules: Mapping[str, nn.Module]) -> OpSpec | None:
        if node.op == "call_function":
            spec = self.by_function.get(node.target)
            schema = getattr(node.target, "_schema", None) if spec is None and self.by_operator else None
            return self.by_operator.get(schema.name) if schema is not None else spec
        if node.op == "call_method":
            return self.by_method.get(node.target)  # type: ignore[arg-type]
        if node.op == "call_module":
            m = modules.get(node.target)  # type: ignore[arg-type]
            return self.module(type(m)) if m is not None else None
        return None


@cache
def table() -> OpTable:
    """The op table (built on first use: it imports the analysis rules and the passes)."""
    from prunefx.ops.records import SPECS

    return OpTable(SPECS)


def lookup(node: fx.Node, modules: Mapping[str, nn.Module]) -> OpSpec | None:
    return table().lookup(node, modules)


def spec_of_module(m: nn.Module) -> OpSpec | None:
    return table().module(type(m))


@cache
def is_leaf_type(cls: type) -> bool:
    """Whether fx keeps a module of this class as one node by its record (``OpSpec.leaf``):
    the record's class itself, or a subclass that keeps its ``forward``."""
    spec = table().module(cls)
    return spec is not None and spec.leaf and any(getattr(cls, "forward", None) is base.forward for base in spec.modules)
