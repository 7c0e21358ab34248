"""Capture: the model as an ONNX ``ModelProto``, by the dynamo exporter (torch.export +
onnxscript) or the TorchScript one (torch.jit.trace + symbolic functions).

Both exporters print whole graphs on failure, from C++ straight to file descriptors 1 and 2;
``_console_captured`` redirects the descriptors while an exporter runs, so a failure reaches
the caller as one ExportError (with the exception chained) and a success replays the text.
nn.MultiheadAttention's inference fast path is switched off while exporting: the TorchScript
exporter cannot translate it, the regular path computes the same function.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from prunefx.errors import ExportError
from prunefx.export.diagnostics import _exporter_failure
from prunefx.export.inputs import _Axes

__all__ = ["EXPORTERS", "DEFAULT_OPSET"]

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = 18  # the dynamo exporter's native opset; TensorRT 8.6+ and every ORT >= 1.14 run it


def _exporter_order(exporter: str) -> tuple[str, ...]:
    if exporter == "auto":
        return EXPORTERS
    if exporter in EXPORTERS:
        return (exporter,)
    raise ExportError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")


def _capture_dynamo(model, inputs, scratch: Path, opset, in_names, out_names, axes: _Axes):
    """torch.export, then onnxscript's translation of every aten op (and its graph optimizer)."""
    try:
        import onnxscript  # noqa: F401  the dynamo exporter's op library
    except ImportError as exc:
        raise ExportError(f"the dynamo exporter needs the onnxscript package, which is not installed ({exc}); pip install onnxscript") from exc
    from prunefx.export.translations import _custom_translations

    shapes = _dynamic_shapes(model, axes)
    with _quiet_loggers(), _exportable_kernels(), warnings.catch_warnings(record=True), _console_captured() as console:
        warnings.simplefilter("always")
        try:
            program = torch.onnx.export(
                model, inputs, None, dynamo=True, opset_version=opset, input_names=in_names, output_names=out_names,
                dynamic_shapes=shapes, optimize=True, verbose=False, report=False,
                custom_translation_table=_custom_translations(opset) or None,
            )
            proto = program.model_proto
        except Exception as exc:
            raise ExportError(_exporter_failure("dynamo", exc, model, inputs)) from exc
    _replay(console)
    return proto, []


def _dynamic_shapes(model, axes: _Axes) -> tuple[Any, ...] | None:
    """torch.export's ``dynamic_shapes``: an entry per input, ``{dim: name}`` (dims sharing a
    name share one symbol). export_onnx's flat copy of a model takes every input through one
    ``*inputs`` parameter, whose entry is the tuple of them."""
    if not any(axes.inputs):
        return None
    per_input = tuple(dict(dims) or None for dims in axes.inputs)
    return (per_input,) if "_prunefx_binding" in model.__dict__ else per_input


def _capture_torchscript(model, inputs, scratch: Path, opset, in_names, out_names, axes: _Axes):
    """torch.jit.trace, then the TorchScript exporter's symbolic functions."""
    import onnx
    import torch.onnx

    dynamic = axes.by_name(in_names, out_names) or None
    with _quiet_loggers(), _exportable_kernels(), warnings.catch_warnings(record=True) as caught, _console_captured() as console:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(
                model, inputs, str(scratch), dynamo=False, opset_version=min(opset, _torchscript_max_opset()),
                input_names=in_names, output_names=out_names, dynamic_axes=dynamic, do_constant_folding=True,
            )
        except Exception as exc:
            raise ExportError(_exporter_failure("torchscript", exc, model, inputs)) from exc
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
