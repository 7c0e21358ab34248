"""Branch removal: when a mask removes every channel a layer reads, the layer and everything
computed only from it are constants; replace that region by its value.

A *starved* reader is a Conv/Linear module whose every input channel the mask removes. After
``fold.py`` moved the removed channels' contribution into its bias (or the BatchNorm after
it), its output no longer depends on the input: it is ``m(0)``. So is every node whose
inputs are all such constants or parameters: in a ResNet bottleneck whose inner channels all
died, that is conv2, bn2, relu, conv3 and bn3, the whole residual branch. The region ends at
*frontier* nodes, constants used by a node that is not constant (the residual ``add``); each
frontier value is computed once, in training mode and in evaluation mode (a BatchNorm of a
constant is its shift in training mode and uses running statistics in evaluation), and the
region is replaced by a ``prunefx.nn.BranchConstant`` holding it:

    out = relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))))) + x   ->   out = c + x

The constant is stored as ``[1, C, 1, ...]`` when it is the same at every position (the usual
case: the branch starts from a bias), else with its full spatial shape (then the model is
bound to the traced resolution, which the report says). A frontier must be used only by
broadcasting arithmetic (``+ - *``); any other use, or a model whose forward differs between
training and evaluation, declines with the reason, and the caller keeps a channel instead.

Example::

    >>> gm, report = remove_starved(model, graph, keep, example_inputs)
    >>> report.removed_modules        # the branch, and the layers that only fed it:
    ('layer1.0.conv1', 'layer1.0.bn1', 'layer1.0.conv2', 'layer1.0.bn2', 'layer1.0.conv3', 'layer1.0.bn3')
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from prunefx import ops
from prunefx.analysis.layout import Layout
from prunefx.errors import PruneFxError
from prunefx.graph import PruneGraph
from prunefx.mask import Keep
from prunefx.nn import BranchConstant
from prunefx.provenance import LAYOUT_ATTR, layout_of
from prunefx.train.fold import readers_of_dropped

__all__ = ["BranchReport", "remove_starved", "replace_with_constants", "replay_branches", "starved_readers"]



@dataclass(frozen=True)
class BranchReport:
    starved: tuple[str, ...] = ()  # readers that lost every input channel
    removed_modules: tuple[str, ...] = ()
    constants: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (new module, shape of its value)
    declined: str | None = None  # why the region could not be removed

    def __str__(self) -> str:
        if self.declined:
            return f"branch removal declined: {self.declined}"
        if not self.starved:
            return "no starved layer"
        consts = ", ".join(f"{n} {list(s)}" for n, s in self.constants)
        return f"removed {len(self.removed_modules)} modules ({', '.join(self.removed_modules)}); constants: {consts}"


def starved_readers(graph: PruneGraph, keep: Keep) -> tuple[str, ...]:
    """Modules whose every input channel ``keep`` removes."""
    return tuple(w.rpartition(".")[0] for w, (_, removed) in readers_of_dropped(graph, keep).items() if removed.all())


def remove_starved(
    model: nn.Module, graph: PruneGraph, keep: Keep, example_inputs: Any, *, dry_run: bool = False
) -> tuple[fx.GraphModule | None, BranchReport]:
    """A GraphModule of ``model`` without the constant regions that starved readers start
    (None and the reason when it cannot be built). ``model`` itself is not changed.
    ``dry_run`` only checks that the regions can be removed."""
    starved = starved_readers(graph, keep)
    if not starved:
        return None, BranchReport()
    traced = graph.traced
    if traced.other is not None:
        return None, BranchReport(starved, declined="the model's forward differs between training and evaluation")
    src = traced.module
    starved_nodes = {n for n in src.graph.nodes if n.op == "call_module" and n.target in starved}
    if len(starved_nodes) != len(starved):
        return None, BranchReport(starved, declined="a starved layer is called more than once, or inside another module")
    constant = _constant_region(src.graph, starved_nodes)
    frontier = [n for n in constant if any(u not in constant for u in n.users)]
    for n in frontier:
        for u in n.users:
            if u not in constant and not _broadcasts(u):
                return None, BranchReport(starved, declined=f"constant node '{n.name}' feeds '{u.name}' ({u.op} {u.target}), "
                                                            "which is not + - *; only arithmetic can take a broadcast constant")
    if dry_run:
        return None, BranchReport(starved)
    values = {mode: _values(src, starved_nodes, frontier, example_inputs, training=mode) for mode in (True, False)}
    layout = copy.deepcopy(layout_of(model)) or {"version": 1, "tensors": {}}
    replacements: list[tuple[fx.Node, str, BranchConstant]] = []
    constants: list[tuple[str, tuple[int, ...]]] = []
    for i, n in enumerate(frontier):
        train_v, eval_v = _compact(values[True][n.name]), _compact(values[False][n.name])
        name = _constant_name(n, i, src)
        const = BranchConstant(train_v, eval_v)
        replacements.append((n, name, const))
        constants.append((name, tuple(eval_v.shape)))
        _record(layout, graph, n, name, const)
    gm = replace_with_constants(src, replacements, class_name=type(model).__name__, training=model.training)
    setattr(gm, LAYOUT_ATTR, layout)
    kept = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    removed = tuple(dict.fromkeys(str(n.target) for n in src.graph.nodes if n.op == "call_module" and n.target not in kept))
    return gm, BranchReport(starved, removed, tuple(constants))


def replace_with_constants(
    src: fx.GraphModule, replacements: list[tuple[fx.Node, str, nn.Module]], *, class_name: str, training: bool
) -> fx.GraphModule:
    """A new GraphModule of ``src`` where each node's uses read the module that replaces it,
    and what then computes nothing used is gone (``src`` is not changed)."""
    new_graph = copy.deepcopy(src.graph)
    by_name = {n.name: n for n in new_graph.nodes}
    root: dict[str, Any] = {}
    for node, name, module in replacements:
        root[name] = module
        old = by_name[node.name]
        with new_graph.inserting_after(old):
            c = new_graph.call_module(name, ())
        old.replace_all_uses_with(c)
    for n in new_graph.nodes:
        if n.op in ("call_module", "get_attr") and n.target not in root:
            root[n.target] = operator.attrgetter(str(n.target))(src)
    gm = fx.GraphModule(root, new_graph, class_name=class_name)
    gm.graph.eliminate_dead_code()  # the region, and the layers that only fed it
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.train(training)
    return gm


def replay_branches(model: nn.Module, records: list[dict[str, Any]], graph: PruneGraph) -> fx.GraphModule:
    """Redo, on a fresh ``model`` of the original architecture traced as ``graph``, the branch
    removals a checkpoint's layout records (``prunefx.load_state_dict``): the constants are
    zeros of the original width; the checkpoint's weights fill them."""
    if graph.traced.other is not None:
        raise PruneFxError("the checkpoint removed residual branches, but this model's forward differs between training "
                           "and evaluation, so they cannot be removed again: is it the architecture the checkpoint came from?")
    gm: fx.GraphModule = graph.traced.module
    for rec in records:
        node = next((n for n in gm.graph.nodes if (n.op == "call_module" and n.target == rec["target"]) or n.name == rec["node"]), None)
        if node is None:
            raise PruneFxError(f"the checkpoint replaced node '{rec['node']}' ({rec['target']}) by the constant '{rec['module']}', "
                               "but this model has no such node: build the architecture the checkpoint came from")
        device = next((t.device for t in gm.parameters()), torch.device("cpu"))
        zeros = torch.zeros(_constant_shape(rec, graph), device=device)
        const = BranchConstant(zeros, zeros, modal=rec["modal"])
        gm = replace_with_constants(gm, [(node, rec["module"], const)], class_name=type(model).__name__, training=model.training)
    return gm


def _constant_shape(rec: dict[str, Any], graph: PruneGraph) -> list[int]:
    """The recorded constant's shape, once it is known to fit the output of the node it
    replaces in the fresh model ([1, C, ...] broadcasting to it): a size read from a file is
    never allocated unchecked."""
    shape = rec["shape"]
    node = next((n for n in graph.traced.module.graph.nodes if n.name == rec["node"]), None)
    out = graph.shapes.tensor(node) if node is not None else None
    fits = out is not None and isinstance(shape, list) and len(shape) == len(out) and len(shape) >= 2 and shape[0] == 1 \
        and shape[1] == out[1] and all(type(s) is int and s in (1, o) for s, o in zip(shape[2:], out[2:], strict=True))
    if not fits:
        raise PruneFxError(f"the checkpoint's constant '{rec['module']}' has shape {shape}, which does not fit the output "
                           f"{None if out is None else list(out)} of node '{rec['node']}' in this model: the file is damaged "
                           "or comes from another architecture")
    return shape


def _record(layout: dict[str, Any], graph: PruneGraph, node: fx.Node, name: str, const: BranchConstant) -> None:
    """Note the removal in the channel layout, the constant's values in original channels:
    a constant of the current width C is indices ``kept`` of a width-C0 tensor."""
    shape = list(const.eval_value.shape)
    width, kept = _original_width(layout, graph, node, shape[1])
    layout.setdefault("branches", []).append({
        "node": node.name, "target": str(node.target) if node.op == "call_module" else None,
        "module": name, "shape": [1, width, *shape[2:]], "modal": const.train_value is not None,
    })
    for buf in ("eval_value", "train_value") if const.train_value is not None else ("eval_value",):
        entry: dict[str, Any] = {"shape": [1, width, *shape[2:]], "kept": {}}
        if kept is not None:
            entry["kept"][1] = kept
        layout["tensors"][f"{name}.{buf}"] = entry


def _original_width(layout: dict[str, Any], graph: PruneGraph, node: fx.Node, width: int) -> tuple[int, torch.Tensor | None]:
    """(original channel count, original indices of the current channels) of ``node``'s
    output, through a parameter that holds exactly its channels."""
    lay = graph.analysis.layouts.get(node)
    f = lay.on(1) if isinstance(lay, Layout) else None
    if f is None or f.dims != (1,):
        return width, None
    roots = graph.analysis.uf.find(f.ids)
    for m in graph.analysis.members:
        entry = layout["tensors"].get(m.tensor)
        if entry is None or len(m.ids) != len(roots) or not np.array_equal(graph.analysis.uf.find(m.ids), roots):
            continue
        kept = entry["kept"].get(m.dim)
        return int(entry["shape"][m.dim]), (None if kept is None else kept.clone())
    return width, None


def _constant_region(graph: fx.Graph, starved: set[fx.Node]) -> list[fx.Node]:
    """Nodes that depend on no input: starved readers and everything computed only from them
    (and parameters)."""
    constant: dict[fx.Node, None] = {}
    owner = graph.owning_module
    for n in graph.nodes:
        if n in starved or (n.op == "call_module" and owner is not None and isinstance(owner.get_submodule(str(n.target)), BranchConstant)):
            constant[n] = None  # (a branch removed before is a constant too)
        elif n.op in ("call_module", "call_function", "call_method") and n.all_input_nodes:
            ins = n.all_input_nodes
            if all(i in constant or i.op == "get_attr" for i in ins) and any(i in constant for i in ins):
                constant[n] = None
    return list(constant)


def _broadcasts(node: fx.Node) -> bool:
    """+ - * (the op records' ``foldable``): a constant operand folds through them."""
    spec = ops.lookup(node, {}) if node.op in ("call_function", "call_method") else None
    return spec is not None and spec.foldable


def _values(src: fx.GraphModule, starved: set[fx.Node], frontier: list[fx.Node], example_inputs: Any, *, training: bool) -> dict[str, torch.Tensor]:
    """Frontier values with every starved reader fed zeros, in one mode, on a copy (training
    mode updates BatchNorm statistics)."""
    gm = copy.deepcopy(src) if training else src
    names = {n.name for n in starved}
    wanted = {n.name for n in frontier}
    out: dict[str, torch.Tensor] = {}

    class _Run(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if n.name in names:
                (x,) = self.fetch_args_kwargs_from_env(n)[0]
                result = self.module.get_submodule(str(n.target))(torch.zeros_like(x))
            else:
                result = super().run_node(n)
            if n.name in wanted:
                out[n.name] = result.detach()
            return result

    was = gm.training
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        gm.train(training)
        with torch.no_grad():
            _Run(gm).run(*args)
    finally:
        gm.train(was)
    return out


def _compact(v: torch.Tensor) -> torch.Tensor:
    """``[1, C, 1, ...]`` when ``v`` is the same over batch and positions, else ``[1, C, ...]``."""
    if v.dim() < 2:
        return v[:1] if v.dim() == 1 else v
    first = v[:1]
    tol = 1e-6 * float(v.abs().max()) + 1e-12
    flat = first.reshape(1, first.shape[1], -1)
    if float((flat - flat[..., :1]).abs().max()) <= tol:
        return flat[..., :1].reshape([1, first.shape[1]] + [1] * (v.dim() - 2)).clone()
    return first.clone()


def _constant_name(n: fx.Node, i: int, src: fx.GraphModule) -> str:
    base = f"{n.target}_constant" if n.op == "call_module" else f"prunefx_constant_{i}"
    name, k = base, 1
    while _exists(src, name):
        name, k = f"{base}{k}", k + 1
    return name


def _exists(gm: nn.Module, name: str) -> bool:
    try:
        gm.get_submodule(name)
        return True
    except AttributeError:
        return False
