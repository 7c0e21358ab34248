"""Graph transforms between capture and commit, each on an ``onnx.ModelProto``:

- ``_simplified``: ONNX Runtime's basic-level optimizations applied offline (constant
  folding, redundant nodes, Conv+BatchNorm fusion); provider independent, standard ops only;
- ``_to_fp16``: float16 weights and arithmetic, float32 inputs and outputs;
- ``_stamp``: prunefx's version and the exporter in the file's metadata;
- ``_check``: ``onnx.checker`` with full shape inference, an ExportError when it rejects.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import torch

from prunefx.errors import ExportError
from prunefx.export.capture import _quiet_loggers
from prunefx.export.staging import _TWO_GIB

__all__: list[str] = []

log = logging.getLogger(__name__)


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
