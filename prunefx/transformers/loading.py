"""``from_pretrained(path)``: a pruned transformers model saved with ``save_pretrained``,
whatever its per-layer sizes.

    config := AutoConfig.from_pretrained(path)       (its prunefx record: the original sizes,
                                                     per-layer sizes, and the shapes of the
                                                     tensors pruning changed)
    model  := the config's class, built at the original sizes, each recorded tensor given its
              pruned shape before transformers' own loader fills it (its key renaming,
              sharding and dtype handling apply as for any checkpoint)
    every size attribute := what its tensors say       (as the module emitter does)
    config := the saved values; check: layer sizes == the record

A model saved without a record (not pruned by prunefx) loads as with the stock loader.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from prunefx.errors import PruneFxError
from prunefx.transformers.config import RECORD, at_original_sizes, set_back

__all__ = ["from_pretrained"]

def _model_class(config: Any) -> type[Any]:
    import transformers

    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise PruneFxError(
            f"prunefx.transformers.from_pretrained: the config names no transformers class ({names!r} in "
            "'architectures'); pass model_class=..."
        )
    return cls


def resize(model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Give every named tensor an empty tensor of its recorded shape (same dtype and device);
    tensors tied to it (the same object under another name) stay tied."""
    new: dict[int, torch.Tensor] = {}
    for prefix, m in model.named_modules(remove_duplicate=False):
        for kind in ("_parameters", "_buffers"):
            slots = getattr(m, kind)
            for name, t in list(slots.items()):
                key = f"{prefix}.{name}" if prefix else name
                if t is None or (key not in shapes and id(t) not in new):
                    continue
                if id(t) not in new:
                    empty = torch.empty(shapes[key], dtype=t.dtype, device=t.device)
                    new[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
                slots[name] = new[id(t)]


def _resizing(cls: type[Any], shapes: dict[str, list[int]]) -> type[Any]:
    """``cls`` whose construction ends with ``resize``: transformers' loader then fills the
    pruned shapes. The loaded model's class is set back to ``cls``."""

    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, *args, **kwargs)
        resize(self, shapes)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})


def from_pretrained(path: str | os.PathLike[str], *, model_class: type[Any] | None = None, **kwargs: Any) -> nn.Module:
    """The model ``save_pretrained`` wrote to ``path``, with the per-layer sizes it was saved
    with (in eval mode, as transformers' ``from_pretrained`` returns it). ``kwargs`` go to
    transformers' ``from_pretrained`` (``torch_dtype``, ``device_map``, ...)."""
    from transformers import AutoConfig

    from prunefx.emit import update_size_attributes
    from prunefx.transformers.layers import write_sizes

    config = AutoConfig.from_pretrained(path)
    record = getattr(config, RECORD, None) or {}
    cls = model_class or _model_class(config)
    saved = at_original_sizes(config, dict(record.get("original", {})))
    try:
        model = _resizing(cls, record.get("shapes", {})).from_pretrained(path, config=config, **kwargs)
    except RuntimeError as exc:
        raise PruneFxError(
            f"prunefx.transformers.from_pretrained: transformers could not load {str(path)!r} into {cls.__name__} "
            f"with the recorded shapes ({str(exc).splitlines()[0]})"
        ) from exc
    finally:
        set_back(config, saved)
    set_back(model.config, saved)  # (transformers may hold a copy)
    model.__class__ = cls
    update_size_attributes(model)
    sizes = write_sizes(model)
    if record.get("layers") is not None:
        got = [dataclasses.asdict(s) for s in sizes]
        if got != record["layers"]:
            raise PruneFxError(
                f"prunefx.transformers.from_pretrained: the checkpoint's layers have sizes {got}, the config "
                f"records {record['layers']}; the files in {str(path)!r} come from different models"
            )
    return model.eval()
