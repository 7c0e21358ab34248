"""Checkpoints that carry the channel layout with the weights.

    state = prunefx.state_dict(small)              # {"state_dict": ..., "prunefx": layout}
    torch.save(state, "ckpt.pt")
    ...                                            # a fresh process
    model = build_original_architecture()
    small = prunefx.load_state_dict(model, torch.load("ckpt.pt", weights_only=True))

``load_state_dict`` traces the fresh model (on meta tensors shaped like the recorded example
inputs), turns the recorded kept indices into a mask over its channel groups, reconfigures
and loads the weights. The parameter order of the rebuilt model is that of the saved one, so
an optimizer state_dict saved beside it loads into an optimizer built on its parameters.

A checkpoint is data from a file: everything in it is checked before the model is touched
(types, shapes, kept indices in range, sorted and unique, sizes against the fresh model, the
rebuilt layout against the recorded one, every weight's shape), and anything wrong raises
``PruneFxError`` naming the entry, never a raw ``RuntimeError``/``KeyError``/``TypeError``.
A checkpoint without a layout is loaded into ``model`` only once every key and shape fits, so a
failure leaves ``model`` as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from prunefx.errors import PruneFxError
from prunefx.graph import PruneGraph, trace
from prunefx.provenance import LAYOUT_ATTR, layout_of

__all__ = ["state_dict", "load_state_dict", "mask_from_layout"]


def state_dict(model: nn.Module) -> dict[str, Any]:
    """The model's state_dict plus its channel layout (None for a model never reconfigured)."""
    return {"state_dict": model.state_dict(), "prunefx": layout_of(model)}


def mask_from_layout(graph: PruneGraph, layout: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A mask over ``graph``'s groups that keeps exactly the recorded indices."""
    tensors = layout.get("tensors", {})
    mask: dict[str, torch.Tensor] = {}
    for group in graph.groups:
        for name, dim, index_map in group.members:
            entry = tensors.get(name)
            if entry is None:
                continue
            kept = entry["kept"].get(dim)
            if kept is None:
                break  # this member keeps every index: so does the group
            kept_set = set(torch.as_tensor(kept).tolist())
            mask[group.name] = torch.tensor([all(i in kept_set for i in row) for row in index_map], dtype=torch.bool)
            break
    return mask


def load_state_dict(model: nn.Module, state: dict[str, Any], *, strict: bool = True) -> nn.Module:
    """Rebuild the reconfigured model saved by ``state_dict`` from a fresh ``model`` of the
    original architecture, and load its weights; ``model`` itself is not modified. A state
    without a channel layout (a model never reconfigured) is loaded into ``model``, which is
    returned. A damaged or mismatched checkpoint raises PruneFxError and changes nothing."""
    layout, weights = _checked_state(state)  # the file's own consistency, before anything else
    if not layout:
        _check_weights_fit(model, weights, strict, "this model")  # every key and shape first: no partial load
        _load(model, weights, strict)
        return model
    from prunefx.frontends.detection import is_detection
    from prunefx.reconfigure import reconfigure

    _check_sizes(model, layout)
    model = _with_folded_biases(model, layout)
    frontend = layout.get("frontend", "auto")
    inputs = tuple(_meta(x) for x in layout["inputs"])
    kwargs = {k: _meta(v) if "shape" in v else v["value"] for k, v in layout.get("kwargs", {}).items()}
    if frontend == "export":  # it captures what the code computes from input values (GPT-2's causal mask): real ones
        from prunefx.emit import placeholder

        device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
        gen = torch.Generator().manual_seed(0)
        inputs = tuple(placeholder(x, device, gen) for x in inputs)
        kwargs = {k: placeholder(v, device, gen) for k, v in kwargs.items()}
    if is_detection(model):  # recorded: its surrogate's inputs; the rebuilt model is checked on real images of its own
        inputs, frontend = None, "auto"
    graph = trace(model, inputs, example_kwargs=kwargs, frontend=frontend)
    if layout.get("branches"):  # PruneTrain removed residual branches: remove them again first
        from prunefx.train.branches import replay_branches

        model = replay_branches(model, layout["branches"], graph)
        graph = trace(model, inputs, example_kwargs=kwargs, frontend=frontend)
    # rebuilt by the emitter that made it (emit="module": the model's class and state_dict keys)
    small = reconfigure(model, mask_from_layout(graph, layout), graph=graph, emit=layout.get("emit", "auto"))
    _check_same_layout(layout_of(small) or {}, layout)
    _check_weights_fit(small, weights, strict, "the rebuilt model")
    _load(small, weights, strict)
    setattr(small, LAYOUT_ATTR, layout)
    return small


def _meta(spec: Mapping[str, Any]) -> torch.Tensor:
    return torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"]), device="meta")


_PLAIN = (bool, int, float, str, type(None))


def record_capture(result: nn.Module, graph: PruneGraph) -> None:
    """Add to ``result``'s layout what ``load_state_dict`` needs to trace a fresh model the same
    way: the front-end and the keyword inputs (tensors by shape and dtype, plain values as they
    are; others, which a file cannot hold, are left out)."""
    layout = layout_of(result)
    if layout is None:
        return
    if graph.frontend == "fx" and not graph.example_kwargs:  # the default; not what an earlier capture recorded
        layout.pop("frontend", None)
        layout.pop("kwargs", None)
        return
    kwargs: dict[str, Any] = {}
    for k, v in graph.example_kwargs.items():
        if isinstance(v, torch.Tensor):
            kwargs[k] = {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        elif isinstance(v, _PLAIN):
            kwargs[k] = {"value": v}
    layout["frontend"], layout["kwargs"] = graph.frontend, kwargs


def _with_folded_biases(model: nn.Module, layout: dict[str, Any]) -> nn.Module:
    """A PruneTrain constant fold can give a bias-less layer a bias: the rebuild starts from a
    copy of ``model`` that has it (zero), never from ``model`` itself."""
    from prunefx.train.fold import add_folded_biases

    probe = copy.deepcopy(model, {id(t): t for t in (*model.parameters(), *model.buffers())})  # modules only: tensors shared
    if not add_folded_biases(probe, layout):
        return model
    model = copy.deepcopy(model)
    add_folded_biases(model, layout)
    return model


_HINT = "the file is damaged or was not written by prunefx.state_dict"


def _checked_state(state: Any) -> tuple[dict[str, Any] | None, Mapping[str, torch.Tensor]]:
    """(layout or None, weights) of a checkpoint, after checking their types and that the
    layout is consistent in itself."""
    if not isinstance(state, Mapping) or "state_dict" not in state:
        got = f"a {type(state).__name__}" + (f" with keys {sorted(map(str, state))[:6]}" if isinstance(state, Mapping) else "")
        raise PruneFxError(f"expected the dict returned by prunefx.state_dict(model) (keys 'state_dict', 'prunefx'), got {got}")
    weights = state["state_dict"]
    if not isinstance(weights, Mapping):
        raise PruneFxError(f"checkpoint['state_dict'] is a {type(weights).__name__}, not a dict of tensors: {_HINT}")
    for name, t in weights.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise PruneFxError(f"checkpoint['state_dict'][{name!r}] is a {type(t).__name__}, not a tensor: {_HINT}")
        if t.is_meta or t.layout != torch.strided:
            raise PruneFxError(f"checkpoint['state_dict']['{name}'] is a {'meta' if t.is_meta else str(t.layout)} tensor; "
                               "save real (dense) weights with prunefx.state_dict(model)")
    layout = state.get("prunefx")
    if layout is None or (isinstance(layout, Mapping) and not layout):
        return None, weights
    if not isinstance(layout, Mapping):
        raise PruneFxError(f"checkpoint['prunefx'] (the channel layout) is a {type(layout).__name__}, not a dict: {_HINT}")
    if layout.get("version", 1) != 1:
        raise PruneFxError(f"checkpoint['prunefx'] has layout version {layout.get('version')!r}; this prunefx reads version 1")
    inputs = layout.get("inputs")
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise PruneFxError(f"checkpoint['prunefx']['inputs'] must be a non-empty list of {{'shape', 'dtype'}}: {_HINT}")
    for i, x in enumerate(inputs):
        where = f"checkpoint['prunefx']['inputs'][{i}]"
        if not isinstance(x, Mapping):
            raise PruneFxError(f"{where} is a {type(x).__name__}, not a dict with 'shape' and 'dtype': {_HINT}")
        _check_dims(where + "['shape']", x.get("shape"), minimum=0)
        if not isinstance(x.get("dtype"), str) or not isinstance(getattr(torch, x["dtype"], None), torch.dtype):
            raise PruneFxError(f"{where}['dtype'] is {x.get('dtype')!r}, not a torch dtype name such as 'float32': {_HINT}")
    if layout.get("frontend", "auto") not in ("auto", "fx", "export"):
        raise PruneFxError(f"checkpoint['prunefx']['frontend'] is {layout.get('frontend')!r}, not 'fx' or 'export': {_HINT}")
    kwargs = layout.get("kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise PruneFxError(f"checkpoint['prunefx']['kwargs'] is a {type(kwargs).__name__}, not a dict: {_HINT}")
    for k, v in kwargs.items():
        where = f"checkpoint['prunefx']['kwargs'][{k!r}]"
        if not isinstance(k, str) or not isinstance(v, Mapping) or not ("shape" in v or isinstance(v.get("value", ()), _PLAIN)):
            raise PruneFxError(f"{where} must be a dict with 'shape' and 'dtype', or with a plain 'value': {_HINT}")
        if "shape" in v:
            _check_dims(where + "['shape']", v["shape"], minimum=0)
            if not isinstance(v.get("dtype"), str) or not isinstance(getattr(torch, v["dtype"], None), torch.dtype):
                raise PruneFxError(f"{where}['dtype'] is {v.get('dtype')!r}, not a torch dtype name such as 'int64': {_HINT}")
    tensors = layout.get("tensors")
    if not isinstance(tensors, Mapping):
        raise PruneFxError(f"checkpoint['prunefx']['tensors'] is a {type(tensors).__name__}, not a dict: {_HINT}")
    for name, entry in tensors.items():
        _check_entry(name, entry)
    branches = layout.get("branches", [])
    if not isinstance(branches, (list, tuple)):
        raise PruneFxError(f"checkpoint['prunefx']['branches'] is a {type(branches).__name__}, not a list: {_HINT}")
    for i, rec in enumerate(branches):
        where = f"checkpoint['prunefx']['branches'][{i}]"
        if not isinstance(rec, Mapping) or not all(isinstance(rec.get(k), str) for k in ("node", "module")) \
                or not isinstance(rec.get("target"), (str, type(None))) or not isinstance(rec.get("modal"), bool):
            raise PruneFxError(f"{where} must have 'node', 'module' (str), 'target' (str or None) and 'modal' (bool): {_HINT}")
        _check_dims(where + "['shape']", rec.get("shape"), minimum=1)
    return dict(layout), weights


def _check_dims(where: str, dims: Any, *, minimum: int) -> None:
    if not isinstance(dims, (list, tuple)) or not all(type(d) is int and d >= minimum for d in dims):
        raise PruneFxError(f"{where} is {dims!r}, not a list of integers >= {minimum}: {_HINT}")


def _check_entry(name: Any, entry: Any) -> None:
    """One ``tensors`` entry: a shape, and per dim the sorted unique kept indices within it."""
    where = f"checkpoint['prunefx']['tensors'][{name!r}]"
    if not isinstance(name, str) or not isinstance(entry, Mapping) or not isinstance(entry.get("kept"), Mapping):
        raise PruneFxError(f"{where} must be a dict with 'shape' and 'kept': {_HINT}")
    _check_dims(where + "['shape']", entry.get("shape"), minimum=0)
    shape = entry["shape"]
    for dim, kept in entry["kept"].items():
        if type(dim) is not int or not 0 <= dim < len(shape):
            raise PruneFxError(f"{where}['kept'] has dim {dim!r}; the tensor has {len(shape)} dims: {_HINT}")
        if isinstance(kept, torch.Tensor):
            ok = kept.dim() == 1 and not kept.is_meta and (kept.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8))
            idx = kept.tolist() if ok else None
        else:
            idx = list(kept) if isinstance(kept, (list, tuple)) and all(type(i) is int for i in kept) else None
        if idx is None:
            raise PruneFxError(f"{where}['kept'][{dim}] is not a 1-D integer tensor of indices: {_HINT}")
        bad = next((i for i in idx if not 0 <= i < shape[dim]), None)
        if bad is not None:
            raise PruneFxError(f"{where}['kept'][{dim}] holds index {bad}, outside 0..{shape[dim] - 1} (the original size): {_HINT}")
        if any(a >= b for a, b in zip(idx, idx[1:], strict=False)):
            raise PruneFxError(f"{where}['kept'][{dim}] is not sorted and unique: {_HINT}")


def _check_sizes(model: nn.Module, layout: dict[str, Any]) -> None:
    """Every recorded original shape is that of the fresh model's tensor of the same name."""
    for name, entry in layout["tensors"].items():
        have = _shape(model, name)
        if have is not None and list(have) != list(entry["shape"]):
            raise PruneFxError(
                f"checkpoint was made from a model whose '{name}' has shape {entry['shape']}, but this model's is {list(have)}: "
                "build the original (never reconfigured) architecture before loading"
            )


def _check_same_layout(rebuilt: Mapping[str, Any], layout: Mapping[str, Any]) -> None:
    """The channels the rebuilt model keeps are the recorded ones, tensor by tensor: a layout
    this architecture's channel groups cannot produce (a tampered file) is refused."""
    ours = rebuilt.get("tensors", {})
    for name, entry in layout["tensors"].items():
        if name not in ours:
            continue  # a tensor the rebuilt model does not hold: its weight, if any, is refused by the key check
        for dim in range(len(entry["shape"])):
            want, got = entry["kept"].get(dim), ours[name]["kept"].get(dim)
            if (want is None) != (got is None) or (want is not None and torch.as_tensor(want).tolist() != torch.as_tensor(got).tolist()):
                raise PruneFxError(
                    f"checkpoint['prunefx']['tensors']['{name}'] keeps channels along dim {dim} that this model's channel groups "
                    f"cannot keep together with the rest of the layout: {_HINT}"
                )


def _check_weights_fit(model: nn.Module, weights: Mapping[str, torch.Tensor], strict: bool, what: str) -> None:
    own = model.state_dict()
    if strict:
        missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        if missing or unexpected:
            parts = [f"missing {', '.join(missing[:5])}" if missing else "", f"unexpected {', '.join(unexpected[:5])}" if unexpected else ""]
            raise PruneFxError(f"checkpoint weights do not fit {what}: {'; '.join(p for p in parts if p)} "
                               "(is it the architecture the checkpoint came from? strict=False skips missing/unexpected keys)")
    for name, t in weights.items():
        if name in own and own[name].shape != t.shape:
            raise PruneFxError(f"checkpoint weight '{name}' has shape {list(t.shape)}, {what} needs {list(own[name].shape)}: "
                               "build the architecture the checkpoint came from")


def _load(model: nn.Module, weights: Mapping[str, torch.Tensor], strict: bool) -> None:
    try:
        model.load_state_dict(weights, strict=strict)
    except (RuntimeError, TypeError, ValueError) as exc:  # what the checks above cannot foresee (a dtype torch will not copy)
        raise PruneFxError(f"cannot load the checkpoint weights: {str(exc).splitlines()[0]}") from exc


def _shape(model: nn.Module, name: str) -> torch.Size | None:
    try:
        return model.get_parameter(name).shape
    except AttributeError:
        try:
            return model.get_buffer(name).shape
        except AttributeError:
            return None
