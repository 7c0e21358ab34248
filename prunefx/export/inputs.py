"""What the exporters trace and what the verification compares against: the example inputs,
the PyTorch reference outputs at one or two batch sizes, and the graph's input/output names.

The rule: a dynamic batch is verified at the example batch *and* at another batch size
(example + 2 unless ``verify_batch``), drawn like the example (same range, same dtype); a
model whose own forward cannot take another batch size is an ExportError before anything is
exported. An example batch of 1 is traced at batch 2 (exporters bake a traced size of 1 into
reshapes).
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from prunefx.errors import ExportError

__all__: list[str] = []


@dataclass(frozen=True)
class _Batch:
    """Inputs of one batch size and the PyTorch outputs on them (flattened, as ONNX orders them)."""

    size: int
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]
    paths: tuple[str, ...]  # pytree path of each output, for names


def _as_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise ExportError(
                f"example_inputs[{i}] is a {type(x).__name__}, not a Tensor: ONNX graphs take tensors only. "
                "Bind other arguments in a wrapper module (e.g. forward(self, x): return self.model(x, flag=True))."
            )
    if not inputs:
        raise ExportError("example_inputs is empty: pass the tensor(s) the model's forward takes")
    return inputs


def _reference_batches(model: nn.Module, inputs: tuple[torch.Tensor, ...], dynamic_batch: bool, verify: bool, verify_batch: int | None) -> list[_Batch]:
    """PyTorch outputs on the example inputs and, for a dynamic batch, on another batch size:
    a model whose own forward cannot take another batch size cannot be exported with one."""
    batches = [_run(model, inputs, "the example inputs")]
    if not dynamic_batch:
        return batches
    size = inputs[0].shape[0] if inputs[0].dim() else 0
    if any(x.dim() == 0 or x.shape[0] != size for x in inputs):
        raise ExportError(
            f"dynamic_batch needs every input to have the batch in dim 0; input shapes are {[tuple(x.shape) for x in inputs]}. "
            "Pass dynamic_batch=False for a fixed-shape export."
        )
    if not verify:
        return batches
    other = verify_batch if verify_batch is not None else size + 2
    if other == size:
        raise ValueError(f"verify_batch must differ from the example batch size ({size})")
    batches.append(_run(model, _rebatched(inputs, other), f"a batch of {other} (the example batch is {size})"))
    return batches


def _capture_inputs(inputs: tuple[torch.Tensor, ...], dynamic_batch: bool) -> tuple[torch.Tensor, ...]:
    """The inputs the exporters trace. A dynamic batch is traced at batch 2, never 1:
    torch.export specializes sizes 0 and 1, and a batch of 1 traced into a reshape stays 1
    (torchvision's ViT encoder block exports with a reshape to (tokens, hidden) that fails
    at any other batch size)."""
    if dynamic_batch and inputs[0].dim() and inputs[0].shape[0] == 1:
        return _rebatched(inputs, 2)
    return inputs


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...], what: str) -> _Batch:
    try:
        out = model(*inputs)
    except Exception as exc:
        hint = " Pass dynamic_batch=False for a fixed-batch export." if "batch of" in what else ""
        raise ExportError(f"{type(model).__name__} fails on {what} in PyTorch: {type(exc).__name__}: {exc}.{hint}") from exc
    leaves, spec = pytree.tree_flatten_with_path(out)
    tensors = [(pytree.keystr(p), t) for p, t in leaves if isinstance(t, torch.Tensor)]
    if not tensors:
        raise ExportError(f"{type(model).__name__} returns no tensor ({type(out).__name__}): nothing to export")
    return _Batch(inputs[0].shape[0] if inputs[0].dim() else 1, inputs, tuple(t.detach() for _, t in tensors), tuple(p for p, _ in tensors))


def _rebatched(inputs: tuple[torch.Tensor, ...], size: int) -> tuple[torch.Tensor, ...]:
    """Fresh inputs of batch ``size``, drawn like the example inputs (same range, same dtype)."""
    gen = torch.Generator().manual_seed(size)
    out = []
    for x in inputs:
        shape = (size, *x.shape[1:])
        if x.is_floating_point():
            mean, std = float(x.float().mean()), float(x.float().std()) if x.numel() > 1 else 1.0
            y = torch.randn(shape, generator=gen) * (std or 1.0) + mean
        elif x.dtype == torch.bool:
            y = torch.rand(shape, generator=gen) < 0.5
        else:  # token ids, indices: stay within the range seen
            y = torch.randint(int(x.min()), int(x.max()) + 1, shape, generator=gen)
        out.append(y.to(dtype=x.dtype, device=x.device))
    return tuple(out)


def _input_names(model: nn.Module, inputs: tuple[torch.Tensor, ...], names: Sequence[str] | None) -> list[str]:
    """"input" for one input; several take the names of forward's parameters."""
    if names is not None:
        if len(names) != len(inputs):
            raise ValueError(f"{len(names)} input_names for {len(inputs)} inputs")
        return list(names)
    if len(inputs) == 1:
        return ["input"]
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return params[: len(inputs)] if len(params) >= len(inputs) else [f"input_{i}" for i in range(len(inputs))]


def _output_names(batch: _Batch, names: Sequence[str] | None) -> list[str]:
    """"output" for one output; the keys of a dict output ("out", "aux"); else output_<i>."""
    if names is not None:
        if len(names) != len(batch.outputs):
            raise ValueError(f"{len(names)} output_names for {len(batch.outputs)} outputs")
        return list(names)
    if batch.paths == ("",):
        return ["output"]
    keyed = [re.sub(r"\W+", "_", p).strip("_") for p in batch.paths]
    if all(keyed) and len(set(keyed)) == len(keyed) and not any(k[0].isdigit() for k in keyed):
        return keyed
    return [f"output_{i}" for i in range(len(batch.outputs))]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
