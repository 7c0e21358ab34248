"""Wrappers around a model, seen through or refused in one place.

- ``torch.compile(model)`` (an ``OptimizedModule`` holding the model as ``_orig_mod``): seen
  through. The model inside is traced, masked, inspected and exported under its own names
  (``layer1.0.conv1``, not ``_orig_mod.layer1.0.conv1``); ``reconfigure`` compiles its result
  again with the same backend and options (compilation happens at the first call, as after
  ``torch.compile``).
- A TorchScript module (``torch.jit.script`` or ``torch.jit.trace`` of the whole model):
  refused. prunefx works on the ``nn.Module`` it was made from; script the pruned result.
  (A scripted submodule is refused by the capture: ``prunefx.guards``.)
- ``DistributedDataParallel``, ``DataParallel``: refused, since their forward scatters and
  synchronises. ``prunefx.distributed.reconfigure_ddp`` reconfigures a DDP model on every
  rank; ``model.module`` is the model inside.

Example::

    >>> import torch, prunefx
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
    >>> compiled = torch.compile(model, backend="eager")
    >>> [g.name for g in prunefx.trace(compiled, torch.randn(1, 3, 8, 8)).groups]
    ['0', '0#1', '1']
    >>> small = prunefx.reconfigure(compiled, {"0": torch.arange(8) < 4}, example_inputs=torch.randn(1, 3, 8, 8))
    >>> type(small).__name__, small._orig_mod.get_submodule("0").out_channels
    ('OptimizedModule', 4)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from prunefx.errors import PruneFxError

__all__ = ["unwrap_compiled", "rewrap_compiled", "unwrapped"]


def unwrap_compiled(model: nn.Module) -> tuple[nn.Module, Any]:
    """(the module inside a ``torch.compile`` wrapper, the wrapper) or (model, None)."""
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, nn.Module) and hasattr(model, "dynamo_ctx"):
        return orig, model
    return model, None


def rewrap_compiled(small: nn.Module, compiled: Any) -> nn.Module:
    """``small`` compiled with the same backend and options as ``compiled`` (its dynamo
    context). Compilation happens at the first call, as after ``torch.compile``."""
    if compiled is None:
        return small
    return type(compiled)(small, compiled.dynamo_ctx)


def unwrapped(model: Any, what: str) -> Any:
    """The model prunefx works on: inside a ``torch.compile`` wrapper; a data-parallel
    wrapper is refused, naming ``what`` (the call) and what to call instead."""
    model = unwrap_compiled(model)[0] if isinstance(model, nn.Module) else model
    if isinstance(model, torch.jit.ScriptModule):
        raise PruneFxError(
            f"{what} got a TorchScript module ({type(model).__name__}): pass the nn.Module it was scripted or traced from, "
            "and script the pruned result"
        )
    if isinstance(model, DistributedDataParallel):
        raise PruneFxError(
            f"{what} got a DistributedDataParallel model: pass the model inside (ddp.module), or reconfigure it on every "
            "rank with prunefx.distributed.reconfigure_ddp(ddp, mask, ...)"
        )
    if isinstance(model, DataParallel):
        raise PruneFxError(f"{what} got a DataParallel model: pass the model inside (model.module) and wrap the result again")
    return model
