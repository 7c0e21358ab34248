"""What an ONNX graph takes and returns: a flat tuple of tensors each way.

A model's forward may take keyword inputs (a transformers model's ``attention_mask``,
``use_cache=False``) and return a structure (a tuple, a dict, a transformers ``ModelOutput``).
``_Binding`` says how the graph's inputs reach forward, and ``_graph_module`` gives the
module the exporters trace:

    graph(*tensors) = flatten(model(*tensors[:n], **{k_i: tensors[n + i]}, **constants))

- tensor keyword inputs become graph inputs named by their keyword, after the positional ones;
- other keyword values (``use_cache=False``, ``return_dict=True``, ``None``) are constants of
  the graph;
- the outputs are the tensor leaves of ``torch.utils._pytree``'s flattening (so a
  ``ModelOutput`` gives ``logits``, ...), in that order; ``None`` and Python scalars are
  dropped; any other object (a transformers ``DynamicCache``) is refused by ``_flat_outputs``:
  an ONNX graph returns tensors only.

A model called with positional tensors only that returns tensors in tuples, lists and dicts
is exported as it is. Any other is exported as a shallow copy whose ``forward`` is the
flat function above: the copy *is* the model to the exporters (same class, same submodule
and parameter dicts), so module paths resolve from it and the initializers keep the model's
own names (``model.layers.0.mlp.up_proj.weight``), which a wrapper module would prefix. The
copy has no hooks of its own: the model's root hooks see its structured inputs and outputs,
not the flat ones.
"""

from __future__ import annotations

import copy
import re
import types
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from prunefx.errors import ExportError

__all__: list[str] = []

_SCALARS = (bool, int, float, str, type(None), torch.dtype, torch.device)
_PLAIN_CONTAINERS = (tuple, list, dict, OrderedDict)
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


@dataclass(frozen=True)
class _Binding:
    """How the graph's flat inputs reach ``model``'s forward."""

    model: nn.Module
    n_positional: int
    tensor_keys: tuple[str, ...]
    constants: Mapping[str, Any]

    def call(self, inputs: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
        """The positional and keyword arguments of forward for the graph's inputs."""
        kwargs = dict(zip(self.tensor_keys, inputs[self.n_positional :], strict=True))
        return inputs[: self.n_positional], {**kwargs, **self.constants}

    def structured(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        """The model's own result on the graph's inputs (hooks and all)."""
        args, kwargs = self.call(inputs)
        return self.model(*args, **kwargs)


def _bind(model: nn.Module, inputs: tuple[torch.Tensor, ...], example_kwargs: Mapping[str, Any] | None) -> tuple[_Binding, tuple[torch.Tensor, ...], tuple[str, ...]]:
    """The binding, all graph inputs (positional, then tensor keyword inputs) and the keywords
    of the tensor keyword inputs. A keyword value that holds tensors inside another object (a
    list of tensors, a transformers Cache) cannot be a graph input: ExportError."""
    tensors: dict[str, torch.Tensor] = {}
    constants: dict[str, Any] = {}
    for key, value in dict(example_kwargs or {}).items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, _SCALARS):
            constants[key] = value
        else:
            held = sum(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))
            what = f"holds {held} tensor(s)" if held else "is not a tensor or a Python scalar"
            raise ExportError(
                f"example_kwargs[{key!r}] of {type(model).__name__} is a {type(value).__name__} that {what}: an ONNX graph's "
                "inputs are tensors. Pass each tensor as its own keyword input, or leave it out "
                "(for a transformers model: no past_key_values, and use_cache=False)."
            )
    return _Binding(model, len(inputs), tuple(tensors), constants), (*inputs, *tensors.values()), tuple(tensors)


def _graph_module(binding: _Binding, plain_output: bool) -> nn.Module:
    """The module the exporters trace: the model itself when it already takes and returns
    what the graph does (positional inputs, ``_plain`` outputs), else a shallow copy whose
    forward is the flat graph function."""
    model = binding.model
    if not binding.tensor_keys and not binding.constants and plain_output:
        return model
    bound = copy.copy(model)  # shares the submodule, parameter and buffer dicts with model
    for name in _HOOK_DICTS:
        if hasattr(model, name):
            object.__setattr__(bound, name, OrderedDict())
    forward = model.__dict__.get("forward") or types.MethodType(type(model).forward, bound)

    def flat_forward(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = binding.call(inputs)
        return tuple(t for t in pytree.tree_leaves(forward(*args, **kwargs)) if isinstance(t, torch.Tensor))

    object.__setattr__(bound, "forward", flat_forward)
    object.__setattr__(bound, "_prunefx_binding", binding)  # for error messages: where an op is called
    return bound


def _plain(out: Any) -> bool:
    """Tensors in tuples, lists and dicts only: what both exporters take as outputs as it is."""
    if isinstance(out, torch.Tensor):
        return True
    if type(out) in _PLAIN_CONTAINERS:
        return all(_plain(v) for v in (out.values() if isinstance(out, dict) else out))
    return False


def _flat_outputs(out: Any, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(pytree path, tensor) of every tensor leaf of ``out``. None and Python scalars are not
    outputs; another object is refused, naming the output and what to do."""
    leaves, _ = pytree.tree_flatten_with_path(out)
    tensors = []
    for path, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            tensors.append((pytree.keystr(path), leaf))
        elif not isinstance(leaf, _SCALARS):
            where = "output '" + re.sub(r"\W+", "_", pytree.keystr(path)).strip("_") + "'" if path else "its output"
            hint = (
                " For a transformers model pass example_kwargs={'use_cache': False}: the cache is not part of the graph."
                if "Cache" in type(leaf).__name__
                else " Return tensors only (wrap the model in a module whose forward picks them)."
            )
            raise ExportError(f"{type(model).__name__} returns a {type(leaf).__name__} at {where}: an ONNX graph returns tensors only.{hint}")
    return tensors
