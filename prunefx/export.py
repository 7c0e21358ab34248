"""ONNX export, checked in ONNX Runtime: the last stage, where the pruned model leaves PyTorch.

    eval mode -> PyTorch reference at two batch sizes -> capture (dynamo, else TorchScript)
    -> simplify -> fp16 -> onnx.checker -> ONNX Runtime vs PyTorch -> atomic rename

The rule it enforces: a file appears at ``path`` only when it passed ``onnx.checker`` and,
with ``verify``, ONNX Runtime reproduced the PyTorch outputs on the example batch *and* on a
batch of another size (that is what catches a batch size baked into a reshape). Every step
writes into a staging directory beside ``path``; on any failure it is removed, so no
half-written file is ever left behind.

Capture tries ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript) first and the
TorchScript exporter when the dynamo one raises or produces a file that does not verify; the
result says which one was used and why. The dynamo exporter is the maintained one but is
slow (30 s to 3 min per model on two CPU cores); ``exporter="torchscript"`` skips it.

Only this module imports ``onnx``, ``torch.onnx`` and ``onnxruntime`` (STYLE.md, rule 6).

Example::

    >>> import torch, torchvision, prunefx
    >>> model = torchvision.models.resnet18().eval()
    >>> res = prunefx.export_onnx(model, "resnet18.onnx", torch.randn(1, 3, 64, 64))
    >>> res.exporter, res.max_rel_diff < 1e-4
    ('dynamo', True)
    >>> sess = prunefx.onnx_session("resnet18.onnx")   # CUDA/TensorRT only where a GPU works
    >>> sess.get_providers()
    ['CPUExecutionProvider']
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from prunefx.errors import ExportError

__all__ = ["ExportResult", "export_onnx", "onnx_session", "gpu_providers", "check_device"]

log = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = 18  # the dynamo exporter's native opset; TensorRT 8.6+ and every ORT >= 1.14 run it
_TWO_GIB = 2**31 - 2**20  # protobuf's hard limit, less a margin for the graph itself
_FP16_RTOL = 1e-2
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


@dataclass(frozen=True)
class ExportResult:
    """What ``export_onnx`` wrote and how well ONNX Runtime reproduced PyTorch."""

    path: Path
    exporter: str  # "dynamo" or "torchscript"
    exporter_reason: str  # why this exporter: success of the first choice, or why it was skipped
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_batch: bool
    fp16: bool
    simplified: bool
    file_size: int  # bytes, external data included
    external_data: Path | None = None
    max_abs_diff: float | None = None  # None without verify
    max_rel_diff: float | None = None  # max |onnx - torch| / max |torch|, worst output and batch
    verified_batches: tuple[int, ...] = ()
    providers: tuple[str, ...] = ()  # the ONNX Runtime providers the verification ran on
    warnings: tuple[str, ...] = ()  # exporter warnings worth reading (TorchScript tracer warnings)
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds per step

    @property
    def max_diff(self) -> float | None:
        return self.max_abs_diff

    def __str__(self) -> str:
        size = f"{self.file_size / 2**20:.1f} MiB"
        head = f"{self.path} ({size}, opset {self.opset}, {self.exporter} exporter"
        head += ", fp16" if self.fp16 else ""
        head += ", dynamic batch)" if self.dynamic_batch else ")"
        if self.max_rel_diff is None:
            return f"{head}; not verified"
        batches = "/".join(str(b) for b in self.verified_batches)
        return (
            f"{head}; verified in ONNX Runtime ({', '.join(self.providers)}) at batch {batches}: "
            f"max |diff| {self.max_abs_diff:.3g}, relative {self.max_rel_diff:.3g}"
        )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any,
    *,
    dynamic_batch: bool = True,
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

    ``example_inputs``: a Tensor or a tuple of Tensors (other arguments: bind them in a wrapper
    module). The model is exported in evaluation mode; its modes are restored afterwards and
    nothing else about it changes.

    - ``dynamic_batch``: dim 0 of every input and output is a symbolic "batch" axis (an
      example batch of 1 is traced at batch 2: exporters bake a size of 1 into reshapes).
    - ``verify``: run the file in ONNX Runtime on ``example_inputs`` and, with
      ``dynamic_batch``, on a batch of ``verify_batch`` (default: example batch + 2) random
      inputs; raise ExportError naming the output, batch size and largest difference when
      ``|onnx - torch| > atol + rtol * max|torch|``. ``rtol`` defaults to 1e-4 (1e-2 with fp16).
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
    timings: dict[str, float] = {}
    order = _exporter_order(exporter)
    target = _checked_target(Path(path))  # fail before the slow part
    if verify:
        check_device(device)
    inputs = _as_inputs(example_inputs)
    rtol = (_FP16_RTOL if fp16 else 1e-4) if rtol is None else rtol

    with _eval_mode(model), torch.no_grad():
        batches = _reference_batches(model, inputs, dynamic_batch, verify, verify_batch)  # PyTorch outputs, 1 or 2 batch sizes
        in_names = _input_names(model, inputs, input_names)
        out_names = _output_names(batches[0], output_names)
        traced_inputs = _capture_inputs(inputs, dynamic_batch)
        timings["reference"] = time.perf_counter() - started

        failures: list[str] = []
        for i, name in enumerate(order):
            try:
                with _Staging(target) as stage:
                    t = time.perf_counter()
                    proto, notes = _CAPTURE[name](model, traced_inputs, stage.scratch(), opset, in_names, out_names, dynamic_batch)  # trace + translate
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
                    diffs, providers = (None, ())
                    if verify:
                        t = time.perf_counter()
                        diffs, providers = _verify(stage.file, batches, out_names, rtol, atol, device)  # ORT vs PyTorch
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
        providers=tuple(providers),
        warnings=tuple(notes),
        timings=timings,
    )


# ----------------------------------------------------------------------------- inputs and names


@dataclass(frozen=True)
class _Batch:
    """Inputs of one batch size and the PyTorch outputs on them (flattened, as ONNX orders them)."""

    size: int
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]
    paths: tuple[str, ...]  # pytree path of each output, for names


def _exporter_order(exporter: str) -> tuple[str, ...]:
    if exporter == "auto":
        return EXPORTERS
    if exporter in EXPORTERS:
        return (exporter,)
    raise ExportError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")


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


# ----------------------------------------------------------------------------- capture


def _capture_dynamo(model, inputs, scratch: Path, opset, in_names, out_names, dynamic_batch):
    """torch.export, then onnxscript's translation of every aten op (and its graph optimizer)."""
    try:
        import onnxscript  # noqa: F401  the dynamo exporter's op library
    except ImportError as exc:
        raise ExportError(f"the dynamo exporter needs the onnxscript package, which is not installed ({exc}); pip install onnxscript") from exc
    shapes = tuple({0: "batch"} for _ in inputs) if dynamic_batch else None
    with _quiet_loggers(), _exportable_kernels(), warnings.catch_warnings(record=True), _console_captured() as console:
        warnings.simplefilter("always")
        try:
            program = torch.onnx.export(
                model, inputs, None, dynamo=True, opset_version=opset, input_names=in_names, output_names=out_names,
                dynamic_shapes=shapes, optimize=True, verbose=False, report=False,
            )
            proto = program.model_proto
        except Exception as exc:
            raise ExportError(_exporter_failure("dynamo", exc, model)) from exc
    _replay(console)
    return proto, []


def _capture_torchscript(model, inputs, scratch: Path, opset, in_names, out_names, dynamic_batch):
    """torch.jit.trace, then the TorchScript exporter's symbolic functions."""
    import onnx
    import torch.onnx

    axes = {n: {0: "batch"} for n in (*in_names, *out_names)} if dynamic_batch else None
    with _quiet_loggers(), _exportable_kernels(), warnings.catch_warnings(record=True) as caught, _console_captured() as console:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(
                model, inputs, str(scratch), dynamo=False, opset_version=min(opset, _torchscript_max_opset()),
                input_names=in_names, output_names=out_names, dynamic_axes=axes, do_constant_folding=True,
            )
        except Exception as exc:
            raise ExportError(_exporter_failure("torchscript", exc, model)) from exc
    _replay(console)
    notes = sorted({f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, torch.jit.TracerWarning)})
    return onnx.load(str(scratch)), notes


def _torchscript_max_opset() -> int:
    from torch.onnx import _constants

    return getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 17)


_CAPTURE = {"dynamo": _capture_dynamo, "torchscript": _capture_torchscript}


@contextlib.contextmanager
def _exportable_kernels() -> Iterator[None]:
    """nn.MultiheadAttention's inference fast path (``aten::_native_multi_head_attention``,
    taken in eval mode without grad) has no ONNX translation in the TorchScript exporter;
    its regular path computes the same function with exportable ops."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    enabled = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(enabled)


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    """The exporters log progress and benign optimizer notes ("Skipping constant folding ...")
    as warnings; failures reach the caller as ExportError instead."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _console_captured() -> Iterator[dict[int, str]]:
    """What the exporters print on file descriptors 1 and 2 (C++ writes there directly, so
    sys.stdout/sys.stderr cannot catch it): on failure both print whole graphs (torch's
    TorchScript exporter dumps its IR, torch.export its FX graphs), which the ExportError and
    its chained cause replace. The caller replays the text on success."""
    captured: dict[int, str] = {}
    fds = []
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            os.fstat(fd)
            fds.append(fd)
    with contextlib.ExitStack() as stack:
        saved, sinks = {}, {}
        _flush()
        for fd in fds:
            sinks[fd] = stack.enter_context(tempfile.TemporaryFile(mode="w+b"))
            saved[fd] = os.dup(fd)
            os.dup2(sinks[fd].fileno(), fd)
        try:
            yield captured
        finally:
            _flush()
            for fd in fds:
                os.dup2(saved[fd], fd)
                os.close(saved[fd])
                sinks[fd].seek(0)
                captured[fd] = sinks[fd].read().decode(errors="replace")


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()


def _replay(captured: dict[int, str]) -> None:
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        if captured.get(fd):
            stream.write(captured[fd])


# ----------------------------------------------------------------------------- graph transforms


def _simplified(proto, scratch: Path):
    """ONNX Runtime's basic-level graph optimizations, saved offline: constant folding (the
    shape arithmetic of a dynamic batch), redundant node elimination, Conv+BatchNorm/Add/Mul
    fusion. Basic-level rewrites are provider independent and emit standard ONNX ops only
    (a result with any other op domain is discarded). ORT does in seconds what onnxscript's
    optimizer takes minutes for on a TorchScript-exported Swin-T."""
    import onnx
    import onnxruntime as ort

    if proto.ByteSize() > _TWO_GIB:
        log.info("prunefx.export_onnx: graph simplification skipped above 2 GiB")
        return proto
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(scratch)
    so.log_severity_level = 3
    so.intra_op_num_threads = torch.get_num_threads()
    try:
        ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        simple = onnx.load(str(scratch))
    except Exception as exc:  # an optimizer failure must not cost the export; the checks that follow still run
        log.warning("prunefx.export_onnx: graph simplification skipped (%s: %s)", type(exc).__name__, exc)
        return proto
    finally:
        scratch.unlink(missing_ok=True)
    used = {n.domain or "" for n in simple.graph.node} | {"", "ai.onnx"}
    if not used <= {o.domain for o in proto.opset_import} | {"", "ai.onnx"}:
        log.warning("prunefx.export_onnx: graph simplification skipped: it introduced ops of %s", sorted(used))
        return proto
    kept = [o for o in simple.opset_import if o.domain in used]  # ORT lists every domain it knows
    del simple.opset_import[:]
    simple.opset_import.extend(kept)
    simple.producer_name, simple.producer_version = proto.producer_name, proto.producer_version
    return simple


def _to_fp16(proto):
    """Float16 weights and arithmetic with float32 inputs and outputs (ONNX Runtime's converter,
    which keeps its block list of precision-critical ops in float32)."""
    saved = list(sys.path)  # onnxruntime.transformers appends its own folder to sys.path
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise ExportError(f"fp16 needs onnxruntime's float16 converter (onnxruntime.transformers.float16): {exc}") from exc
    finally:
        sys.path[:] = saved
    with _quiet_loggers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.ERROR)
        half = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=proto.ByteSize() > _TWO_GIB)
    _toposort(half.graph)  # the converter appends its input casts after their consumers
    return half


def _toposort(graph) -> None:
    """Reorder ``graph.node`` so that every node comes after the producers of its inputs
    (stable: an already sorted graph is unchanged)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # a cycle or a dangling input: leave it to onnx.checker
            ordered.extend(rest)
            break
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered, strict=True):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def _stamp(proto, exporter: str) -> None:
    from prunefx import __version__

    meta = {p.key: p for p in proto.metadata_props}
    for key, value in (("prunefx.version", __version__), ("prunefx.exporter", exporter)):
        entry = meta.get(key) or proto.metadata_props.add()
        entry.key, entry.value = key, value


def _check(file: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(file), full_check=True)
    except Exception as exc:  # onnx.checker.ValidationError, shape inference errors
        raise ExportError(f"onnx.checker rejects the exported graph: {type(exc).__name__}: {exc}") from exc


def _opset_of(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


# ----------------------------------------------------------------------------- verification


def _verify(file: Path, batches: list[_Batch], out_names: list[str], rtol: float, atol: float, device: str) -> tuple[tuple[float, float], list[str]]:
    """Run ``file`` in ONNX Runtime on every batch and compare each output with PyTorch's.
    Returns (max |diff|, max relative diff) over all outputs and batches, and the providers."""
    if device.split(":")[0] in ("auto", "tensorrt"):
        device = "cuda" + device[len(device.split(":")[0]):] if _usable_gpu_providers() else "cpu"
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # a failing run is reported in the ExportError, not logged by ORT
    so.intra_op_num_threads = torch.get_num_threads()  # the thread budget PyTorch was given
    sess = onnx_session(file, device=device, provider_options={"CUDAExecutionProvider": {"use_tf32": "0"}}, session_options=so)
    feeds = [i.name for i in sess.get_inputs()]
    worst_abs = worst_rel = 0.0
    for batch in batches:
        try:
            got = sess.run(None, {n: x.detach().cpu().numpy() for n, x in zip(feeds, batch.inputs, strict=True)})
        except Exception as exc:
            raise ExportError(f"ONNX Runtime cannot run the exported file on a batch of {batch.size}: {exc}") from exc
        if len(got) != len(batch.outputs):
            raise ExportError(f"the exported file has {len(got)} outputs, PyTorch returns {len(batch.outputs)}")
        for name, ours, ref in zip(out_names, got, batch.outputs, strict=True):
            expected = ref.detach().float().cpu().numpy() if ref.is_floating_point() else ref.detach().cpu().numpy()
            if tuple(ours.shape) != tuple(expected.shape):
                raise ExportError(
                    f"output '{name}' has shape {tuple(ours.shape)} in ONNX Runtime but {tuple(expected.shape)} in PyTorch "
                    f"at batch {batch.size}: a shape was frozen at export"
                )
            diff = np.abs(ours.astype(np.float64) - expected.astype(np.float64))
            peak = float(np.abs(expected).max()) if expected.size else 0.0
            biggest = float(diff.max()) if diff.size else 0.0
            if not np.isfinite(biggest) and not np.array_equal(np.isnan(ours), np.isnan(expected)):
                biggest = float("inf")
            rel = biggest / peak if peak > 0 else biggest
            worst_abs, worst_rel = max(worst_abs, biggest), max(worst_rel, rel)
            if biggest > atol + rtol * peak:
                at = tuple(int(i) for i in np.unravel_index(int(np.nanargmax(diff)), diff.shape)) if diff.size else ()
                raise ExportError(
                    f"ONNX Runtime ({', '.join(sess.get_providers())}) does not reproduce PyTorch: output '{name}' at batch "
                    f"{batch.size} differs by up to {biggest:.3g} (relative {rel:.3g}, at index {at}; allowed "
                    f"{atol:g} + {rtol:g} * {peak:.3g})"
                )
    return (worst_abs, worst_rel), sess.get_providers()


# ----------------------------------------------------------------------------- errors


def _exporter_failure(exporter: str, exc: BaseException, model: nn.Module) -> str:
    """One paragraph: the operator the exporter cannot express and where the model calls it,
    or the exception's own summary."""
    text = _summary(exc)
    op = _unsupported_op(text)
    if op is None:
        return f"{type(exc).__name__}: {text}"
    where = _locate(model, op)
    return f"ONNX opset cannot express the operator '{op}' ({'called at ' + where if where else 'location unknown'}); {type(exc).__name__}: {text}"


def _summary(exc: BaseException) -> str:
    """The innermost useful message: the dynamo exporter wraps the real error twice."""
    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in reversed(chain):
        msg = str(e).strip()
        if msg and "Refer to the full stack trace" not in msg:
            first = " ".join(msg.split("\n\n")[0].split())
            return first if len(first) < 600 else first[:600] + " ..."
    return type(exc).__name__


_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='([\w.]+)'"),  # dynamo: No ONNX function found for <OpOverload(op='ns.op', ...
    re.compile(r"unrecognized namespace ([\w]+::[\w.]+)"),  # TorchScript, custom namespace
    re.compile(r"Exporting the operator '?([\w]+::[\w.]+)'? to ONNX"),  # TorchScript, aten op
    re.compile(r"[Uu]nsupported.*?operator '?([\w]+::[\w.]+)"),
)


def _unsupported_op(text: str) -> str | None:
    for pattern in _OP_PATTERNS:
        m = pattern.search(text)
        if m:
            name = m.group(1)
            name = name.rstrip(".")
            return name if "::" in name else name.replace(".", "::", 1)
    return None


def _locate(model: nn.Module, op: str) -> str | None:
    """Where ``model`` calls ``op``: the fx node, its module and source line (best effort)."""
    from prunefx.tracing import describe_node, symbolic_trace

    try:
        traced = symbolic_trace(model)
    except Exception:
        return None
    short = op.split("::")[-1].split(".")[0]
    found = []
    for node in traced.module.graph.nodes:
        if node.op not in ("call_function", "call_method") or _op_name(node.target).split("::")[-1] != short:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        module = next(reversed(stack.values()), None) if stack else None
        owner = f" in module '{module[0]}' ({module[1].__name__ if isinstance(module[1], type) else module[1]})" if module and module[0] else ""
        loc = traced.sources.get(node)
        if loc is not None and loc.filename.startswith(_TORCH_DIR):
            loc = None  # a frame inside torch (e.g. the custom-op wrapper) says nothing about the model
        found.append(f"{describe_node(node, loc)}{owner}")
    return "; ".join(found[:3]) or None


def _op_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    for attr in ("_qualname", "_qualified_op_name"):
        if isinstance(getattr(target, attr, None), str):
            return getattr(target, attr)
    name = getattr(target, "name", None)
    if callable(name):
        with contextlib.suppress(Exception):
            return str(name())
    return getattr(target, "__name__", str(target))


def _combined(failures: list[str], model: nn.Module) -> ExportError:
    what = type(model).__name__
    if len(failures) == 1:
        name, _, why = failures[0].partition(": ")
        return ExportError(f"cannot export {what} to ONNX with the {name} exporter: {why}")
    return ExportError(f"cannot export {what} to ONNX with any exporter:\n" + "\n".join(f"  - {f}" for f in failures))


def _reason(name: str, exporter: str, failures: list[str]) -> str:
    if failures:
        return "fell back to TorchScript; " + "; ".join(failures)
    return "first choice of exporter='auto'" if exporter == "auto" else f"requested with exporter={exporter!r}"


# ----------------------------------------------------------------------------- staging


def _checked_target(path: Path) -> Path:
    path = path.expanduser()
    if path.is_dir():
        raise ExportError(f"cannot write the ONNX file to '{path}': it is a directory; pass a file path such as '{path / 'model.onnx'}'")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise ExportError(f"cannot write the ONNX file '{path}': its directory '{parent}' {what}")
    try:
        probe = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".prunefx-tmp", dir=parent)
    except OSError as exc:
        raise ExportError(f"cannot write the ONNX file '{path}': {exc.strerror or exc} in '{parent}'; choose a writable directory") from exc
    os.rmdir(probe)
    return path.absolute()


class _Staging:
    """A directory beside the target, holding the file while it is made and checked; ``commit``
    renames it (and its external data) into place, leaving it removes everything else.

    The ``.onnx`` at the target and the ``.data`` beside it always come from the same export,
    whatever step fails: an ``.onnx`` with external data is committed by moving the old pair
    aside into the staging directory (the ``.onnx`` first: while it is away, no ``.onnx`` can
    meet the wrong data), then the new ``.data``, then the new ``.onnx``; a failure moves the
    old pair back (data first). A plain ``.onnx`` replaces the old one in one atomic rename, and
    a ``.data`` left by an earlier external-data export is then removed, not left stale."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.data_target: Path | None = None
        self.size = 0
        self.keep: Path | None = None  # the old pair, when putting it back failed: never deleted

    def __enter__(self) -> _Staging:
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".prunefx-tmp", dir=self.target.parent))
        except OSError as exc:
            raise ExportError(f"cannot write the ONNX file '{self.target}': {exc}") from exc
        self.file = self.dir / self.target.name
        return self

    def scratch(self) -> Path:
        return self.dir / "capture.onnx"

    def save(self, proto, external_data: bool | None) -> None:
        import onnx

        external = proto.ByteSize() > _TWO_GIB if external_data is None else external_data
        location = self.target.name + ".data"
        for stale in (self.scratch(), self.scratch().with_name("capture.onnx.data")):
            stale.unlink(missing_ok=True)
        try:
            onnx.save_model(proto, str(self.file), save_as_external_data=external, all_tensors_to_one_file=True, location=location, size_threshold=1024)
        except (OSError, ValueError) as exc:
            raise ExportError(f"cannot write the ONNX file '{self.target}': {exc}") from exc
        if external and (self.dir / location).exists():  # no tensor above the threshold: no data file
            self.data_target = self.target.with_name(location)

    def commit(self) -> None:
        data_at = self.target.with_name(self.target.name + ".data")
        if self.data_target is None:
            self._commit_plain(data_at)
        else:
            self._commit_pair(data_at)
        self.size = self.target.stat().st_size + (self.data_target.stat().st_size if self.data_target else 0)

    def _commit_plain(self, data_at: Path) -> None:
        try:
            os.replace(self.file, self.target)
        except OSError as exc:
            raise ExportError(f"cannot move the ONNX file into place at '{self.target}': {exc}") from exc
        try:
            if data_at.is_file():
                data_at.unlink()  # an earlier export's weights; the new file does not read them
        except OSError as exc:
            log.warning("prunefx.export_onnx: wrote %s but cannot remove the stale %s: %s", self.target, data_at, exc)

    def _commit_pair(self, data_at: Path) -> None:
        previous = self.dir / "previous"
        previous.mkdir()
        done: list[tuple[Path, Path]] = []  # renames made, undone in reverse order on failure
        steps = [(p, previous / p.name) for p in (self.target, data_at) if p.exists() or p.is_symlink()]
        steps += [(self.dir / data_at.name, data_at), (self.file, self.target)]
        try:
            for src, dst in steps:
                os.replace(src, dst)
                done.append((src, dst))
        except OSError as exc:
            kept = self._undo(done)
            where = f"; the previous export is kept in '{previous}'" if kept else ""
            raise ExportError(f"cannot move the ONNX file into place at '{self.target}': {exc}{where}") from exc

    def _undo(self, done: list[tuple[Path, Path]]) -> bool:
        """Put the old pair back (its data before its .onnx); True when that failed and the
        old pair must be kept where it is."""
        for src, dst in reversed(done):
            try:
                os.replace(dst, src)
            except OSError:
                self.keep = self.dir / "previous"
                return True
        return False

    def __exit__(self, *exc: Any) -> None:
        if self.keep is None:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        for p in self.dir.iterdir():  # everything but the old pair
            if p == self.keep:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- runtime


def onnx_session(path: str | os.PathLike[str], device: str = "auto", *, provider_options: Mapping[str, Mapping[str, Any]] | None = None, session_options: Any = None):
    """An ``onnxruntime.InferenceSession`` for ``path`` on the best provider that really works.

    ``device``: "auto" (TensorRT, then CUDA, when a GPU is usable; else CPU), "cpu", "cuda",
    "cuda:N", "tensorrt" or "tensorrt:N". A GPU is usable when the CUDA driver reports a device
    and ONNX Runtime's provider library loads; only then is a GPU provider asked for, so a
    CPU-only machine with onnxruntime-gpu gets the CPU provider without provider-load errors.
    Asking for "cuda"/"tensorrt" where it is not usable raises ExportError.
    ``provider_options`` maps a provider name to its options (e.g.
    ``{"TensorrtExecutionProvider": {"trt_fp16_enable": True, "trt_engine_cache_enable": True}}``).
    """
    import onnxruntime as ort

    check_device(device)
    kind, _, index = device.partition(":")
    usable = _usable_gpu_providers()
    chain = {"auto": usable, "tensorrt": usable, "cuda": ("CUDAExecutionProvider",), "cpu": ()}[kind]
    names = [*chain, "CPUExecutionProvider"]
    extra = provider_options or {}
    options = [{**({"device_id": index} if index and n != "CPUExecutionProvider" else {}), **extra.get(n, {})} for n in names]
    so = session_options or ort.SessionOptions()
    if session_options is None:
        so.log_severity_level = 3  # provider fallbacks are ours to report, not ORT's to print
    try:
        with _ort_quiet(bool(chain)):
            sess = ort.InferenceSession(str(path), so, providers=names, provider_options=options)
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load '{path}' with {names}: {exc}") from exc
    if chain and sess.get_providers()[0] == "CPUExecutionProvider" and kind != "auto":
        raise ExportError(f"ONNX Runtime fell back to the CPU for '{path}' although {device!r} was asked for ({_gpu_diagnosis()})")
    return sess


def check_device(device: str) -> None:
    """Raise ExportError unless ``device`` ("auto", "cpu", "cuda[:N]", "tensorrt[:N]") names an
    ONNX Runtime device that can run on this machine; cheap, so callers check it first."""
    kind, _, index = device.partition(":") if isinstance(device, str) else ("", "", "")
    if kind not in ("auto", "cpu", "cuda", "tensorrt") or (index and not index.isdigit()):
        raise ExportError(f"device must be 'auto', 'cpu', 'cuda[:N]' or 'tensorrt[:N]', got {device!r}")
    if kind in ("cuda", "tensorrt"):
        wanted = "CUDAExecutionProvider" if kind == "cuda" else "TensorrtExecutionProvider"
        if wanted not in _usable_gpu_providers():
            raise ExportError(f"device={device!r} asked for {wanted}, which cannot run here ({_gpu_diagnosis()}); use device='auto' or 'cpu'")


def gpu_providers() -> tuple[str, ...]:
    """The ONNX Runtime GPU providers that really work on this machine, best first (empty on a
    CPU-only machine, even with onnxruntime-gpu installed)."""
    return _usable_gpu_providers()


_GPU_CACHE: dict[str, tuple[str, ...]] = {}


def _usable_gpu_providers() -> tuple[str, ...]:
    if "providers" not in _GPU_CACHE:
        _GPU_CACHE["providers"] = _probe_gpu_providers()
    return _GPU_CACHE["providers"]


def _probe_gpu_providers() -> tuple[str, ...]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    if not available & {"CUDAExecutionProvider", "TensorrtExecutionProvider"} or _cuda_device_count() == 0:
        return ()  # no GPU: never ask ORT for a GPU provider, it would log load errors
    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels, when that is where they are
        with contextlib.suppress(Exception), _ort_quiet(True):
            ort.preload_dlls()
    usable = []
    if "TensorrtExecutionProvider" in available and _tensorrt_loadable() and _provider_loads("TensorrtExecutionProvider"):
        usable.append("TensorrtExecutionProvider")
    if "CUDAExecutionProvider" in available and _provider_loads("CUDAExecutionProvider"):
        usable.append("CUDAExecutionProvider")
    return tuple(usable) if "CUDAExecutionProvider" in usable else ()


def _cuda_device_count() -> int:
    """CUDA devices the driver reports; asks the driver itself, so it works with a CPU-only torch."""
    with contextlib.suppress(Exception):
        if torch.cuda.is_available():
            return torch.cuda.device_count()
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0:
            return count.value
        return 0
    return 0


def _tensorrt_loadable() -> bool:
    dirs = [""]
    with contextlib.suppress(ImportError):
        import tensorrt_libs  # the TensorRT wheel keeps its libraries here

        dirs.append(os.path.dirname(tensorrt_libs.__file__))
    for d in dirs:
        for name in ("libnvinfer.so.10", "libnvinfer.so.8", "nvinfer_10.dll"):
            with contextlib.suppress(OSError):
                ctypes.CDLL(os.path.join(d, name) if d else name, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
                return True
    return False


def _provider_loads(provider: str) -> bool:
    """Whether ONNX Runtime can create ``provider`` on a one-node model, with its logs muted."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 8)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        with _ort_quiet(True):
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=[provider, "CPUExecutionProvider"])
    except Exception:
        return False
    return sess.get_providers()[0] == provider


@contextlib.contextmanager
def _ort_quiet(active: bool) -> Iterator[None]:
    """ORT logs provider-library load failures through its default logger, not the session's."""
    if not active:
        yield
        return
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)  # ORT's default; it offers no getter to restore from


def _gpu_diagnosis() -> str:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(available):
        return f"this onnxruntime build has no GPU providers ({', '.join(available)}); install onnxruntime-gpu"
    if _cuda_device_count() == 0:
        return "the CUDA driver reports no GPU"
    return "the provider library does not load: check the CUDA/cuDNN/TensorRT versions onnxruntime-gpu needs"
