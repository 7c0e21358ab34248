"""Assemble: the final GraphModule.

Submodules and tensors are installed under their original qualified names (so ``state_dict``
keys of kept tensors are unchanged), buffers stay buffers (persistent or not), the graph is
linted and the code recompiled. The root keeps the input model's class name and train/eval
flag.

When the model's forward differs between training and evaluation, the main graph's code
starts with a dispatch (``ModalCodeGen``)::

    def forward(self, x):
        if self.training != False:
            return _prunefx_other_mode(self, x)   # the other mode's graph, compiled
        ...

and the main graph holds a ``get_attr`` of every module only the other mode uses, so that
``GraphModule`` (which copies only the targets its graph references, also on deepcopy) keeps
them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph import CodeGen
from torch.fx.graph_module import _forward_from_src

from prunefx.passes.base import Pass, RewriteState

__all__ = ["Assemble"]


def _install(root: nn.Module, path: str, obj: object, source: nn.Module) -> None:
    *prefix, leaf = path.split(".")
    mod, src = root, source
    for item in prefix:
        src = getattr(src, item)
        nxt = mod._modules.get(item)
        if nxt is None:
            nxt = nn.Module()
            nxt.training = src.training
            mod.add_module(item, nxt)
        mod = nxt
    if leaf in mod._modules or leaf in mod._parameters or leaf in mod._buffers:
        return
    if isinstance(obj, nn.Module):
        mod.add_module(leaf, obj)
    elif isinstance(obj, nn.Parameter):
        mod.register_parameter(leaf, obj)
    elif isinstance(obj, torch.Tensor):
        mod.register_buffer(leaf, obj, persistent=leaf not in src._non_persistent_buffers_set)
    else:
        setattr(mod, leaf, obj)


class ModalCodeGen(CodeGen):
    """Python code for the main graph that hands over to ``other`` in the other mode."""

    def __init__(self, other: fx.Graph, main_training: bool) -> None:
        super().__init__()
        self.other = other
        self.main_training = main_training

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str) -> str:
        head = super().gen_fn_def(free_vars, maybe_return_annotation)
        names = [v.split(":")[0].split("=")[0].strip() for v in free_vars if v.split(":")[0].strip() != "self"]
        call = ", ".join(["self", *names])
        return f"{head}\n    if self.training != {self.main_training}:\n        return _prunefx_other_mode({call})"

    def additional_globals(self) -> list[tuple[str, Any]]:
        code = self.other.python_code(root_module="self")
        return [*super().additional_globals(), ("_prunefx_other_mode", _forward_from_src(code.src, code.globals))]


def _targets(graph: fx.Graph) -> list[str]:
    return [n.target for n in graph.nodes if n.op in ("call_module", "get_attr")]  # type: ignore[misc]


@dataclass(frozen=True)
class Assemble(Pass):
    def run(self, state: RewriteState) -> None:
        aliases = state.plan.analysis.aliases
        owner = {n.target: gm for gm in reversed(state.sources) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
        # modules and tensors go straight into the result (GraphModule(root, graph) would copy them again)
        root = fx.GraphModule(nn.Module(), fx.Graph(), class_name=type(state.source).__name__)
        for graph in state.graphs:
            for node in graph.nodes:
                if node.op == "call_module":
                    _install(root, node.target, state.modules[node.target], owner[node.target])
        for graph in state.graphs:
            for node in graph.nodes:
                if node.op == "get_attr":
                    obj = state.tensors.get(aliases.get(node.target, node.target))
                    if obj is None:  # a non-tensor attribute (a submodule, a constant)
                        obj = operator.attrgetter(node.target)(owner[node.target])
                    _install(root, node.target, obj, owner[node.target])
        main = state.graph
        if len(state.graphs) > 1:
            other = state.graphs[1]
            other.lint()
            seen = set(_targets(main))
            first = next(iter(main.nodes))
            with main.inserting_before(first):
                for target in dict.fromkeys(t for t in _targets(other) if t not in seen):
                    main.get_attr(target)  # keep-alive: see the module docstring
            main.set_codegen(ModalCodeGen(other, state.plan.analysis.traced.training))
        main.lint()
        root.graph = main  # recompiles
        root.training = state.plan.analysis.traced.training
        state.result = root

    def verify(self, state: RewriteState) -> None:
        assert state.result is not None
        names = state.plan.analysis.traced.modules
        for n, _ in state.result.named_modules():
            assert n in names, f"unexpected submodule {n}"
