"""Error text: what an exporter's exception means for the user, in one paragraph.

The exporters' messages are long and wrapped (the dynamo exporter wraps the real error
twice). ``_exporter_failure`` keeps the innermost useful message and, when it names an
operator ONNX cannot express, says where the model calls it (the fx node, its module and the
user's source line); ``_combined`` joins the failures of every exporter tried.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

import torch
from torch import nn

from prunefx.errors import ExportError

__all__: list[str] = []

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _exporter_failure(exporter: str, exc: BaseException, model: nn.Module, inputs: tuple[Any, ...] = ()) -> str:
    """One paragraph: the operator the exporter cannot express and where the model calls it,
    or the exception's own summary."""
    text = _summary(exc)
    op = _unsupported_op(text)
    if op is None:
        return f"{type(exc).__name__}: {text}"
    where = _locate(model, op, inputs)
    advice = _advice(op, where or "")
    return (
        f"ONNX opset cannot express the operator '{op}' ({'called at ' + where if where else 'location unknown'}); "
        f"{'what to do: ' + advice + '; ' if advice else ''}{type(exc).__name__}: {text}"
    )


def _advice(op: str, where: str) -> str | None:
    """What to do about an operator transformers calls that has an exportable alternative."""
    if op in ("transformers::grouped_mm_fallback", "aten::histc") and "Experts)" in where:
        return (
            "transformers' grouped_mm experts kernel has no ONNX translation; set "
            "model.config._experts_implementation = 'eager' (a loop over the experts, exported by the "
            "TorchScript exporter) or 'batched_mm' (both exporters; gathers one weight matrix per token "
            "and expert, which takes much memory at long sequences)"
        )
    if op == "aten::diff" and "create_causal_mask" in where:
        return (
            "transformers looks for packed sequences in the position ids when no attention mask is "
            "given; pass example_kwargs={'attention_mask': ...}, or use the dynamo exporter"
        )
    return None


def _summary(exc: BaseException) -> str:
    """The innermost useful message: the dynamo exporter wraps the real error twice."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for link in reversed(chain):
        msg = str(link).strip()
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


def _locate(model: nn.Module, op: str, inputs: tuple[Any, ...] = ()) -> str | None:
    """Where ``model`` calls ``op``: the node, its module and source line (best effort), from
    torch.fx's trace or, for models fx cannot trace (transformers), torch.export's on the
    example inputs. ``model`` may be export_onnx's flat copy of the model (``binding.py``)."""
    from prunefx.tracing import describe_node, symbolic_trace

    target, args, kwargs = model, tuple(inputs), {}
    binding = model.__dict__.get("_prunefx_binding")  # export_onnx's flat copy of a model
    if binding is not None:
        target = binding.model
        args, kwargs = binding.call(tuple(inputs))
    try:
        traced = symbolic_trace(target)
    except Exception:
        traced = _export_traced(target, args, kwargs)
        if traced is None:
            return None
    short = op.split("::")[-1].split(".")[0]
    found = []
    for node in traced.module.graph.nodes:
        if node.op not in ("call_function", "call_method") or _op_name(node.target).split("::")[-1].split(".")[0] != short:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        module = next(reversed(stack.values()), None) if stack else None
        owner = f" in module '{module[0]}' ({_type_name(module[1])})" if module and module[0] else ""
        loc = traced.sources.get(node)
        if loc is not None and loc.filename.startswith(_TORCH_DIR):
            loc = None  # a frame inside torch (e.g. the custom-op wrapper) says nothing about the model
        found.append(f"{describe_node(node, loc)}{owner}")
    return "; ".join(found[:3]) or None


def _export_traced(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
    """torch.export's graph of the model on its example inputs, or None."""
    if not args and not kwargs:
        return None
    from prunefx.frontends.export import export_trace

    try:
        return export_trace(model, args, kwargs)[0]
    except Exception:
        return None


def _type_name(t: Any) -> str:
    """nn_module_stack holds the module's class (fx) or its qualified name as text (export)."""
    if isinstance(t, type):
        return t.__name__
    return str(t).rsplit(".", 1)[-1].strip("'>")


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
