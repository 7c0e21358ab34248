"""What the exporters trace and what the verification compares against: the example inputs,
their dynamic axes, the PyTorch reference outputs at two sets of sizes, and the graph's
input/output names.

The rule: every dynamic axis (the batch, dim 0 of every input, with ``dynamic_batch``; and the
axes named in ``dynamic_axes``, such as a sequence length) is verified at the example's size
*and* at another size (batch: example + 2 unless ``verify_batch``; any other axis: example
+ 3), with inputs drawn like the example (same range, same dtype); a model whose own forward
cannot take those sizes is an ExportError before anything is exported. A dynamic axis of
size 1 is traced at 2 (exporters bake a traced size of 1 into reshapes). Output axes are
dynamic where the two reference runs differ in size; each takes the name of the input axis
whose sizes it follows.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunefx.errors import ExportError
from prunefx.export.binding import _Binding, _flat_outputs, _plain

__all__: list[str] = []

_BATCH = "batch"


@dataclass(frozen=True)
class _Axes:
    """The dynamic dims of every graph input and output: ``{dim: axis name}`` each."""

    inputs: tuple[dict[int, str], ...]
    outputs: tuple[dict[int, str], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Axis names in order of first appearance (the batch first)."""
        return tuple(dict.fromkeys(n for dims in self.inputs for _, n in sorted(dims.items())))

    def by_name(self, in_names: Sequence[str], out_names: Sequence[str]) -> dict[str, dict[int, str]]:
        """Graph tensor name -> its dynamic dims (TorchScript's ``dynamic_axes``)."""
        pairs = [*zip(in_names, self.inputs, strict=True), *zip(out_names, self.outputs, strict=True)]
        return {name: dict(dims) for name, dims in pairs if dims}


@dataclass(frozen=True)
class _Batch:
    """Inputs at one set of axis sizes and the PyTorch outputs on them (flattened, as ONNX orders them)."""

    sizes: Mapping[str, int]  # axis name -> size in these inputs
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]
    paths: tuple[str, ...]  # pytree path of each output, for names
    size: int = 1  # the batch (dim 0 of the first input)
    plain: bool = True  # the model returned tensors in tuples, lists and dicts only

    def describe(self) -> str:
        """"batch 3" or "batch 3, sequence 11": where a verification ran."""
        rest = [f"{n} {s}" for n, s in self.sizes.items() if n != _BATCH]
        return ", ".join([f"batch {self.size}", *rest])


def _as_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise ExportError(
                f"example_inputs[{i}] is a {type(x).__name__}, not a Tensor: ONNX graphs take tensors only. "
                "Pass keyword inputs and flags as example_kwargs (e.g. example_kwargs={'attention_mask': mask, 'use_cache': False})."
            )
    if not inputs:
        raise ExportError("example_inputs is empty: pass the tensor(s) the model's forward takes")
    return inputs


def _dynamic_axes(inputs: tuple[torch.Tensor, ...], in_names: Sequence[str], dynamic_batch: bool, dynamic_axes: Mapping[str, Mapping[int, str]] | None) -> _Axes:
    """Per input, its dynamic dims: dim 0 "batch" with ``dynamic_batch``, plus what
    ``dynamic_axes`` names (input name -> {dim: axis name}). Inputs sharing an axis name must
    agree on its size."""
    per_input: list[dict[int, str]] = [{} for _ in inputs]
    if dynamic_batch:
        if any(x.dim() == 0 or x.shape[0] != inputs[0].shape[0] for x in inputs):
            raise ExportError(
                f"dynamic_batch needs every input to have the batch in dim 0; input shapes are "
                f"{dict(zip(in_names, [tuple(x.shape) for x in inputs], strict=True))}. Pass dynamic_batch=False for a fixed-shape export."
            )
        per_input = [{0: _BATCH} for _ in inputs]
    for name, dims in (dynamic_axes or {}).items():
        if name not in in_names:
            raise ExportError(f"dynamic_axes names the input {name!r}, but the graph's inputs are {list(in_names)}")
        i = list(in_names).index(name)
        if not isinstance(dims, Mapping):
            raise ExportError(f"dynamic_axes[{name!r}] must map a dim to an axis name, e.g. {{1: 'sequence'}}; got {dims!r}")
        for dim, axis in dims.items():
            rank = inputs[i].dim()
            if not isinstance(dim, int) or not -rank <= dim < rank or not isinstance(axis, str) or not axis:
                raise ExportError(f"dynamic_axes[{name!r}] = {dict(dims)!r}: input {name!r} has shape {tuple(inputs[i].shape)}; give {{dim: 'axis name'}} with 0 <= dim < {rank}")
            per_input[i][dim % rank] = axis
    seen: dict[str, tuple[str, int]] = {}
    for name, x, dims in zip(in_names, inputs, per_input, strict=True):
        for dim, axis in dims.items():
            other = seen.setdefault(axis, (f"{name}.shape[{dim}]", int(x.shape[dim])))
            if other[1] != x.shape[dim]:
                raise ExportError(f"dynamic axis {axis!r} has size {other[1]} at {other[0]} but {int(x.shape[dim])} at {name}.shape[{dim}]: one axis name, one size")
    return _Axes(tuple(per_input))


def _sizes(inputs: tuple[torch.Tensor, ...], axes: _Axes) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for x, dims in zip(inputs, axes.inputs, strict=True):
        for dim, axis in sorted(dims.items()):
            sizes.setdefault(axis, int(x.shape[dim]))
    return sizes


def _reference_batches(binding: _Binding, inputs: tuple[torch.Tensor, ...], axes: _Axes, verify: bool, verify_batch: int | None) -> list[_Batch]:
    """PyTorch outputs on the example inputs and, with dynamic axes, at other sizes (for the
    verification, and to tell which output dims follow which axis): a model whose own forward
    cannot take other sizes cannot be exported with them."""
    sizes = _sizes(inputs, axes)
    batches = [_run(binding, inputs, sizes, "the example inputs")]
    if not sizes or not (verify or set(sizes) - {_BATCH}):
        return batches
    other = {n: s + 3 for n, s in sizes.items()}
    if _BATCH in sizes:
        other[_BATCH] = verify_batch if verify_batch is not None else sizes[_BATCH] + 2
        if other[_BATCH] == sizes[_BATCH]:
            raise ValueError(f"verify_batch must differ from the example batch size ({sizes[_BATCH]})")
    if set(sizes) == {_BATCH}:
        what = f"a batch of {other[_BATCH]} (the example batch is {sizes[_BATCH]})"
    else:
        what = f"inputs of {_shown(other)} (the example has {_shown(sizes)})"
    batches.append(_run(binding, _redrawn(inputs, axes, other), other, what, resized=True))
    return batches


def _shown(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {s}" for n, s in sizes.items())


def _output_axes(batches: list[_Batch], axes: _Axes, out_names: Sequence[str]) -> _Axes:
    """Output dims that differ between the two reference runs are dynamic, named after the
    input axis whose sizes they follow (``{out}_dim{d}`` when none does). With one run: dim 0
    is the batch when the batch is dynamic."""
    if len(batches) < 2:
        guess = {0: _BATCH} if _BATCH in batches[0].sizes else {}
        return _Axes(axes.inputs, tuple(dict(guess) for _ in out_names))
    first, second = batches
    outputs = []
    for name, a, b in zip(out_names, first.outputs, second.outputs, strict=True):
        dims = {}
        if a.dim() == b.dim():
            for d, (sa, sb) in enumerate(zip(a.shape, b.shape, strict=True)):
                if sa != sb:
                    dims[d] = next((n for n in first.sizes if first.sizes[n] == sa and second.sizes[n] == sb), f"{name}_dim{d}")
        outputs.append(dims)
    return _Axes(axes.inputs, tuple(outputs))


def _capture_inputs(inputs: tuple[torch.Tensor, ...], axes: _Axes) -> tuple[torch.Tensor, ...]:
    """The inputs the exporters trace. A dynamic axis is traced at a size of 2 or more, never
    1: torch.export specializes sizes 0 and 1, and a batch of 1 traced into a reshape stays 1
    (torchvision's ViT encoder block exports with a reshape to (tokens, hidden) that fails
    at any other batch size)."""
    sizes = _sizes(inputs, axes)
    if all(s >= 2 for s in sizes.values()):
        return inputs
    return _redrawn(inputs, axes, {n: max(s, 2) for n, s in sizes.items()})


def _run(binding: _Binding, inputs: tuple[torch.Tensor, ...], sizes: Mapping[str, int], what: str, resized: bool = False) -> _Batch:
    model = binding.model
    try:
        out = binding.structured(inputs)
    except Exception as exc:
        fixed = "dynamic_batch=False" if set(sizes) == {_BATCH} else "fewer dynamic axes (dynamic_batch=False, no dynamic_axes)"
        hint = f" Pass {fixed} for a fixed-shape export." if resized else ""
        raise ExportError(f"{type(model).__name__} fails on {what} in PyTorch: {type(exc).__name__}: {exc}.{hint}") from exc
    tensors = _flat_outputs(out, model)
    if not tensors:
        raise ExportError(f"{type(model).__name__} returns no tensor ({type(out).__name__}): nothing to export")
    size = inputs[0].shape[0] if inputs[0].dim() else 1
    return _Batch(dict(sizes), inputs, tuple(t.detach() for _, t in tensors), tuple(p for p, _ in tensors), size, _plain(out))


def _redrawn(inputs: tuple[torch.Tensor, ...], axes: _Axes, sizes: Mapping[str, int]) -> tuple[torch.Tensor, ...]:
    """Fresh inputs whose dynamic axes have ``sizes``, drawn like the example inputs (same
    range, same dtype)."""
    gen = torch.Generator().manual_seed(sizes.get(_BATCH, sum(sizes.values())))
    out = []
    for x, dims in zip(inputs, axes.inputs, strict=True):
        shape = [sizes[dims[d]] if d in dims else s for d, s in enumerate(x.shape)]
        if x.is_floating_point():
            mean, std = float(x.float().mean()), float(x.float().std()) if x.numel() > 1 else 1.0
            y = torch.randn(shape, generator=gen) * (std or 1.0) + mean
        elif x.dtype == torch.bool:
            y = torch.rand(shape, generator=gen) < 0.5
        else:  # token ids, indices: stay within the range seen
            y = torch.randint(int(x.min()), int(x.max()) + 1, shape, generator=gen)
        out.append(y.to(dtype=x.dtype, device=x.device))
    return tuple(out)


def _input_names(model: nn.Module, n_positional: int, keywords: Sequence[str] | None, names: Sequence[str] | None) -> list[str]:
    """"input" for one input and no keyword inputs (``keywords`` None); otherwise the
    positional inputs take the names of forward's parameters (``input_ids``), then the tensor
    keyword inputs their keywords."""
    total = n_positional + len(keywords or ())
    if names is not None:
        if len(names) != total:
            raise ValueError(f"{len(names)} input_names for {total} inputs")
        return list(names)
    if total == 1 and keywords is None:
        return ["input"]
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    positional = params[:n_positional] if len(params) >= n_positional else [f"input_{i}" for i in range(n_positional)]
    return [*positional, *(keywords or ())]


def _output_names(batch: _Batch, names: Sequence[str] | None) -> list[str]:
    """"output" for one output; the keys of a dict output ("out", "aux") or a transformers
    ModelOutput ("logits"); else output_<i>."""
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
