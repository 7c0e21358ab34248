"""ONNX export, checked in ONNX Runtime: the last stage, where the pruned model leaves PyTorch.

    bind keyword inputs, flatten outputs -> eval mode -> PyTorch reference at two sets of
    sizes -> capture (dynamo, else TorchScript) -> simplify -> fp16 -> onnx.checker
    -> ONNX Runtime vs PyTorch -> atomic rename

The rule it enforces: a file appears at ``path`` only when it passed ``onnx.checker`` and,
with ``verify``, ONNX Runtime reproduced the PyTorch outputs on the example inputs *and* on
inputs of another size along every dynamic axis, the batch and e.g. a sequence length (that
is what catches a size baked into a reshape). Every step
writes into a staging directory beside ``path``; on any failure it is removed, so no
half-written file is ever left behind.

Capture tries ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript) first and the
TorchScript exporter when the dynamo one raises or produces a file that does not verify; the
result says which one was used and why. The dynamo exporter is the maintained one but is
slow (30 s to 3 min per model on two CPU cores); ``exporter="torchscript"`` skips it.

Only this package imports ``onnx``, ``torch.onnx`` and ``onnxruntime`` (STYLE.md, rule 6).
``export_onnx`` below is the whole pipeline, one step per line; each step lives in its own
module:

    binding.py      keyword inputs and structured outputs (ModelOutput) <-> flat graph tensors
    inputs.py       example inputs, dynamic axes, PyTorch reference batches, names, eval mode
    capture.py      the dynamo and TorchScript exporters, console capture (fd redirection)
    translations.py ONNX translations given to the dynamo exporter where onnxscript's differ
    transforms.py   simplify (ONNX Runtime offline), fp16, metadata stamp, onnx.checker
    verify.py       ONNX Runtime vs PyTorch on every reference batch
    diagnostics.py  exporter exceptions -> one paragraph naming the operator and where it is called
    staging.py      the staging directory and the atomic commit (external data as a pair)
    sessions.py     onnx_session, check_device, GPU provider probing (cached per process)
    result.py       ExportResult

Example::

    >>> import torch, torchvision, prunefx
    >>> model = torchvision.models.resnet18().eval()
    >>> res = prunefx.export_onnx(model, "resnet18.onnx", torch.randn(1, 3, 64, 64))
    >>> res.exporter, res.max_rel_diff < 1e-4
    ('dynamo', True)
    >>> sess = prunefx.onnx_session("resnet18.onnx")   # CUDA/TensorRT first where a GPU works
    >>> sess.get_providers()[-1]
    'CPUExecutionProvider'
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunefx.errors import ExportError
from prunefx.export.binding import _bind, _graph_module
from prunefx.export.capture import (  # noqa: F401  _capture_*: tests swap an exporter in _CAPTURE
    _CAPTURE,
    DEFAULT_OPSET,
    EXPORTERS,
    _capture_dynamo,
    _capture_torchscript,
    _exporter_order,
)
from prunefx.export.diagnostics import _combined, _reason
from prunefx.export.inputs import (
    _as_inputs,
    _capture_inputs,
    _dynamic_axes,
    _input_names,
    _output_axes,
    _output_names,
    _reference_batches,
)
from prunefx.export.result import ExportResult
from prunefx.export.sessions import check_device, gpu_providers, onnx_session
from prunefx.export.staging import _checked_target, _Staging
from prunefx.export.transforms import _check, _opset_of, _simplified, _stamp, _to_fp16
from prunefx.export.verify import _verify
from prunefx.tracing import in_mode
from prunefx.wrappers import unwrapped

__all__ = ["ExportResult", "export_onnx", "onnx_session", "gpu_providers", "check_device"]

log = logging.getLogger(__name__)

_FP16_RTOL = 1e-2


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_batch: bool = True,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    verify: bool = True,
    exporter: str = "auto",
    opset: int = DEFAULT_OPSET,
    simplify: bool = True,
    fp16: bool = False,
    rtol: float | None = None,
    atol: float = 1e-5,
    verify_batch: int | None = None,
    device: str = "auto",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    external_data: bool | None = None,
) -> ExportResult:
    """Write ``model`` as an ONNX file at ``path`` and, with ``verify``, check it in ONNX Runtime.

    ``example_inputs``: a Tensor or a tuple of Tensors, the positional inputs of forward.
    ``example_kwargs``: its keyword inputs, as for ``prunefx.trace`` (e.g.
    ``{"attention_mask": mask, "use_cache": False}``): tensors become graph inputs named by
    their keyword, after the positional ones; other values (flags, None) are constants of the
    graph. The graph's outputs are the tensors of forward's result, flattened (a transformers
    ``ModelOutput`` gives ``logits``, ...); an output that is not a tensor (a transformers
    cache) is an ExportError. The model is exported in evaluation mode; its modes are
    restored afterwards and nothing else about it changes.

    - ``dynamic_batch``: dim 0 of every input and output is a symbolic "batch" axis (an
      example batch of 1 is traced at batch 2: exporters bake a size of 1 into reshapes).
    - ``dynamic_axes``: more symbolic axes, by input name (positional inputs are named after
      forward's parameters, keyword inputs by keyword), e.g. ``{"input_ids": {1: "sequence"},
      "attention_mask": {1: "sequence"}}``; one name, one size. Output axes follow.
    - ``verify``: run the file in ONNX Runtime on ``example_inputs`` and, with dynamic axes,
      on random inputs of other sizes (batch ``verify_batch``, default example batch + 2;
      any other axis example + 3); raise ExportError naming the output, the sizes and the
      largest difference when ``|onnx - torch| > atol + rtol * max|torch|``. ``rtol``
      defaults to 1e-4 (1e-2 with fp16).
    - ``exporter``: "auto" (dynamo, then TorchScript when dynamo fails to export or to
      verify), "dynamo" or "torchscript".
    - ``simplify``: constant folding, redundant-node removal and Conv+BatchNorm fusion (ONNX
      Runtime's provider-independent basic level, applied offline).
    - ``fp16``: float16 weights and arithmetic for GPUs (ONNX Runtime's converter; inputs and
      outputs stay float32, precision-critical ops stay float32).
    - ``device``: ONNX Runtime device of the verification ("auto", "cpu", "cuda[:N]"); see
      ``onnx_session``. TensorRT is never used to verify: its engines take minutes to build.
    - ``external_data``: weights in ``path + ".data"``; by default only above protobuf's 2 GiB.
      The ``.onnx`` and its ``.data`` are committed so that, whatever fails, the ``.onnx`` at
      ``path`` never reads another export's data; a plain export removes a stale ``.data``.

    Raises ExportError (the files at ``path`` are left as they were) when an option or the
    path is wrong (checked before the slow part), when neither exporter can express the model
    (naming the operator and where the model calls it), when the verification fails, or when
    the file cannot be moved into place.
    """
    started = time.perf_counter()
    model = unwrapped(model, "prunefx.export_onnx")  # (torch.compile's wrapper: the model inside)
    timings: dict[str, float] = {}
    order = _exporter_order(exporter)
    target = _checked_target(Path(path))  # fail before the slow part
    if verify:
        check_device(device)
    binding, inputs, keywords = _bind(model, _as_inputs(example_inputs), example_kwargs)  # graph inputs -> forward's arguments
    in_names = _input_names(model, len(inputs) - len(keywords), None if example_kwargs is None else keywords, input_names)
    axes = _dynamic_axes(inputs, in_names, dynamic_batch, dynamic_axes)
    rtol = (_FP16_RTOL if fp16 else 1e-4) if rtol is None else rtol

    with in_mode(model, False), torch.no_grad():
        batches = _reference_batches(binding, inputs, axes, verify, verify_batch)  # PyTorch outputs at 1 or 2 sets of sizes
        out_names = _output_names(batches[0], output_names)
        axes = _output_axes(batches, axes, out_names)  # which output dims follow which input axis
        traced_inputs = _capture_inputs(inputs, axes)
        graph_fn = _graph_module(binding, batches[0].plain)  # the model, or a copy taking and returning flat tensors
        timings["reference"] = time.perf_counter() - started

        failures: list[str] = []
        for i, name in enumerate(order):
            try:
                with _Staging(target) as stage:
                    t = time.perf_counter()
                    proto, notes = _CAPTURE[name](graph_fn, traced_inputs, stage.scratch(), opset, in_names, out_names, axes)  # trace + translate
                    timings[f"export ({name})"] = time.perf_counter() - t
                    t = time.perf_counter()
                    if simplify:
                        proto = _simplified(proto, stage.scratch())  # constant folding, fusions
                        timings["simplify"] = time.perf_counter() - t
                    if fp16:
                        proto = _to_fp16(proto)  # float16 weights and arithmetic, float32 I/O
                    _stamp(proto, name)
                    t = time.perf_counter()
                    stage.save(proto, external_data)
                    _check(stage.file)  # onnx.checker, full shape inference
                    timings["save+check"] = time.perf_counter() - t
                    diffs: tuple[float, float] | None = None
                    providers: list[str] = []
                    if verify:
                        t = time.perf_counter()
                        diffs, providers = _verify(stage.file, batches, in_names, out_names, rtol, atol, device)  # ORT vs PyTorch
                        timings["verify"] = time.perf_counter() - t
                    stage.commit()  # atomic rename into place
            except ExportError as exc:
                failures.append(f"{name}: {exc}")
                if exporter != "auto" or i == len(order) - 1:
                    raise _combined(failures, model) from exc
                log.info("prunefx.export_onnx: %s exporter failed, trying %s: %s", name, order[i + 1], exc)
                continue
            break

    reason = _reason(name, exporter, failures)
    timings["total"] = time.perf_counter() - started
    log.info("prunefx.export_onnx: wrote %s with the %s exporter (%s)", target, name, reason)
    return ExportResult(
        path=target,
        exporter=name,
        exporter_reason=reason,
        opset=_opset_of(proto),
        input_names=tuple(in_names),
        output_names=tuple(out_names),
        dynamic_batch=dynamic_batch,
        fp16=fp16,
        simplified=simplify,
        file_size=stage.size,
        external_data=stage.data_target,
        max_abs_diff=None if diffs is None else diffs[0],
        max_rel_diff=None if diffs is None else diffs[1],
        verified_batches=tuple(b.size for b in batches) if verify else (),
        verified_sizes=tuple(dict(b.sizes) for b in batches) if verify else (),
        dynamic_axes=axes.by_name(in_names, out_names),
        providers=tuple(providers),
        warnings=tuple(notes),
        timings=timings,
    )
