"""Assemble: the final GraphModule.

Submodules and tensors are installed under their original qualified names (so ``state_dict``
keys of kept tensors are unchanged), buffers stay buffers (persistent or not), the graph is
linted and the code recompiled. The root keeps the input model's class name and train/eval
flag.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

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


@dataclass(frozen=True)
class Assemble(Pass):
    def run(self, state: RewriteState) -> None:
        aliases = state.plan.analysis.aliases
        root = nn.Module()
        for node in state.graph.nodes:
            if node.op == "call_module":
                _install(root, node.target, state.modules[node.target], state.source)
        for node in state.graph.nodes:
            if node.op == "get_attr":
                obj = state.tensors.get(aliases.get(node.target, node.target))
                if obj is None:  # a non-tensor attribute (a submodule, a constant)
                    obj = _fetch(state.source, node.target)
                _install(root, node.target, obj, state.source)
        state.graph.lint()
        gm = fx.GraphModule(root, state.graph, class_name=type(state.source).__name__)
        gm.training = state.source.training
        state.result = gm

    def verify(self, state: RewriteState) -> None:
        assert state.result is not None
        names = {n for n, _ in state.source.named_modules()}
        for n, _ in state.result.named_modules():
            assert n in names, f"unexpected submodule {n}"


def _fetch(root: nn.Module, path: str) -> object:
    obj: object = root
    for item in path.split("."):
        obj = getattr(obj, item)
    return obj
