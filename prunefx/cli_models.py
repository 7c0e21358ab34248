"""What the ``prunefx`` command works on: models named on the command line, example inputs,
masks and checkpoints read from files.

A MODEL is one of

    torchvision:NAME         torchvision.models.get_model(NAME), random weights unless --weights
    timm:NAME                timm.create_model(NAME), when timm is installed
    path/to/file.py:factory  factory() from a Python file (or package.module:factory)

Example::

    >>> model = load_model("torchvision:resnet18")
    >>> x = example_input("1,3,64,64")
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunefx.tracing import is_transformers_model

__all__ = ["CliError", "load_model", "parse_shape", "parse_kwargs", "example_kwargs", "example_input", "load_mask", "load_checkpoint", "check_output"]

_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "int64": torch.int64, "long": torch.int64, "int32": torch.int32}


class CliError(Exception):
    """A command-line argument that does not work (bad model spec, unreadable file)."""


def load_model(spec: str, *, weights: str | None = None) -> nn.Module:
    """The model ``spec`` names, in evaluation mode."""
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise CliError(f"MODEL must be torchvision:NAME, timm:NAME or path/to/file.py:factory, got {spec!r}")
    if kind == "torchvision":
        model = _torchvision(name, weights)
    elif kind == "timm":
        model = _timm(name, weights)
    else:
        module_part, _, factory = spec.rpartition(":")
        model = _factory(module_part, factory)
    if not isinstance(model, nn.Module):
        raise CliError(f"{spec} gave a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _torchvision(name: str, weights: str | None) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        close = [n for n in torchvision.models.list_models() if name.lower() in n][:5]
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise CliError(f"torchvision has no model {name!r}{hint}")
    builder = torchvision.models.get_model_builder(name)
    if weights is not None:
        known = list(torchvision.models.get_model_weights(name).__members__)
        if weights.rpartition(".")[2] not in known:
            raise CliError(f"torchvision:{name} has no weights {weights!r}; choose one of {', '.join(known)}")
    kwargs: dict[str, Any] = {"weights": weights}
    if weights is None and "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # segmentation/detection: no backbone download either
    try:
        return builder(**kwargs)
    except OSError as exc:  # the download (URLError is an OSError) or the cache directory
        raise CliError(f"cannot get the {weights} weights of torchvision:{name}: {exc}") from exc


def _timm(name: str, weights: str | None) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise CliError("timm:NAME needs the timm package (pip install timm)") from None
    try:
        return timm.create_model(name, pretrained=weights is not None)
    except Exception as exc:  # timm raises RuntimeError for unknown names
        raise CliError(f"timm cannot build {name!r}: {exc}") from exc


def _factory(module_part: str, factory: str) -> Any:
    path = Path(module_part)
    if path.suffix == ".py" or path.exists():
        if not path.is_file():
            raise CliError(f"model file {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"prunefx_cli_model_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and pickling look the module up
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as exc:
            raise CliError(f"cannot import {module_part!r}: {exc}") from exc
    fn = getattr(module, factory, None)
    if fn is None:
        raise CliError(f"{module_part} has no {factory!r}")
    return fn() if callable(fn) and not isinstance(fn, nn.Module) else fn


def parse_shape(text: str) -> tuple[tuple[int, ...], torch.dtype]:
    """"1,3,224,224" -> ((1, 3, 224, 224), float32); "1,128:int64" gives token ids."""
    dims, _, dtype = text.partition(":")
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(","))  # an empty dim ("1,,3") is a typo, not a skip
    except ValueError:
        raise CliError(f"--input must look like 1,3,224,224 (optionally :int64), got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise CliError(f"--input needs positive dimensions, got {text!r}")
    if dtype and dtype not in _DTYPES:
        raise CliError(f"--input dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return shape, _DTYPES[dtype or "float32"]


def parse_kwargs(items: list[str]) -> dict[str, Any]:
    """``["use_cache=False", "output_attentions=False"]`` -> ``{"use_cache": False, ...}``:
    each ``--kwarg NAME=VALUE`` a keyword input of forward whose value is a Python literal."""
    kwargs: dict[str, Any] = {}
    for item in items:
        name, eq, text = item.partition("=")
        if not eq or not name.strip().isidentifier():
            raise CliError(f"--kwarg must look like NAME=VALUE (e.g. use_cache=False), got {item!r}")
        try:
            kwargs[name.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise CliError(f"--kwarg {item}: the value must be a Python literal (False, 3, 0.5, 'text', None), got {text!r}") from None
    return kwargs


def example_kwargs(model: nn.Module, items: list[str]) -> dict[str, Any]:
    """The keyword inputs of ``--kwarg``; a transformers model whose forward takes
    ``use_cache`` gets ``use_cache=False`` unless given: pruning and ONNX export need no
    key-value cache, and torch.export cannot return one."""
    kwargs = parse_kwargs(items)
    if "use_cache" not in kwargs and is_transformers_model(model) and "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return kwargs


def example_input(text: str) -> torch.Tensor:
    """A deterministic random tensor of the shape ``text`` describes."""
    shape, dtype = parse_shape(text)
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(0, 100, shape, generator=gen, dtype=dtype)


def load_mask(path: str) -> dict[str, torch.Tensor]:
    """A mask saved with ``torch.save({group_or_module_name: bool_tensor, ...}, path)``."""
    data = _load(path)
    if isinstance(data, Mapping) and "mask" in data and isinstance(data["mask"], Mapping):
        data = data["mask"]
    if not isinstance(data, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise CliError(f"{path} does not hold a mask: expected a dict of name -> bool tensor, got {type(data).__name__}")
    for key, value in data.items():  # as prunefx.reconfigure: casting scores with .bool() would keep (almost) every channel
        if value.dtype != torch.bool:
            raise CliError(f"{path}: mask '{key}' has dtype {value.dtype}; expected a torch.bool vector (True = keep): "
                           "save e.g. scores > threshold, or write it with `prunefx prune --save-mask`")
    return dict(data)


def load_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint saved from ``prunefx.state_dict`` (weights plus channel layout)."""
    data = _load(path)
    if not isinstance(data, Mapping) or "state_dict" not in data or "prunefx" not in data:
        raise CliError(f"{path} is not a prunefx checkpoint (torch.save(prunefx.state_dict(model), path))")
    return dict(data)


def check_output(flag: str, path: str) -> None:
    """Raise CliError unless ``path`` can be written: a file (not a directory) in an existing,
    writable directory. Checked before any work, so a typo does not cost a whole run."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise CliError(f"{flag} {path} is a directory; pass a file path such as {target / 'model.onnx'}")
    parent = target.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise CliError(f"{flag} {path}: directory {parent} {what}; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"{flag} {path}: directory {parent} is not writable")


def _load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CliError(f"{path} does not exist") from None
    except Exception as exc:
        raise CliError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
