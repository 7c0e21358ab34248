"""Reconfiguring a model that trains under ``DistributedDataParallel``.

Every rank holds a replica, and the replicas must stay identical: same shapes for DDP's
buckets, same kept channels, same sliced optimizer state. ``reconfigure_ddp`` follows a
protocol in which the ranks cannot disagree:

1. **decide once**: only rank ``src`` needs a mask (other ranks may pass ``None``). It and the
   ``policy`` are broadcast from ``src`` with ``torch.distributed.broadcast_object_list``
   (tensors moved to the CPU first), so every rank prunes the same channels;
2. **rewrite locally**: each rank unwraps ``ddp_model.module`` and calls
   ``prunefx.reconfigure(module, mask, optimizer=...)``. The rewrite is deterministic, so the
   replicas come out identical;
3. **agree on the outcome**: the ranks exchange success or failure (``all_gather_object``).
   If any rank failed, every rank puts its optimizer back and raises (the failing rank its own
   error, the others a ``DistributedError`` naming the rank), so none trains on alone;
4. **re-wrap**: the smaller module is wrapped in a new ``DistributedDataParallel`` with the old
   wrapper's settings (device_ids, output_device, dim, process group, buffer syncing, bucket
   size, find_unused_parameters, gradient_as_bucket_view, static_graph, ignored parameters);
   keyword arguments passed to ``reconfigure_ddp`` override them. Its constructor checks the
   shapes across ranks and broadcasts rank 0's parameters, as DDP always does.

Communication hooks registered on the old wrapper are not carried over (their state is tied
to the old buckets); register them again on the returned wrapper.

Sharded models (FSDP2, ``torch.distributed.fsdp.fully_shard``): ``reconfigure_fsdp``, from
``prunefx.fsdp`` (re-exported here), gathers, rewrites, re-shards and slices the sharded
optimizer state.

Example (under ``torchrun``)::

    >>> ddp = torch.nn.parallel.DistributedDataParallel(model)
    >>> opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    >>> ...  # train
    >>> mask = None
    >>> if dist.get_rank() == 0:
    ...     mask = prunefx.masks.random(prunefx.trace(ddp.module, x), 0.5)
    >>> ddp = reconfigure_ddp(ddp, mask, example_inputs=x, optimizer=opt)
    >>> grad_bytes_per_step(ddp)  # fewer bytes all-reduced per step from now on
"""

from __future__ import annotations

import inspect
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from prunefx.errors import DistributedError
from prunefx.fsdp import reconfigure_fsdp
from prunefx.reconfigure import reconfigure

__all__ = ["reconfigure_ddp", "reconfigure_fsdp", "grad_bytes_per_step", "DistributedError"]

_MB = 1024 * 1024


def reconfigure_ddp(
    ddp_model: DistributedDataParallel,
    mask: Mapping[str, Any] | None,
    *,
    example_inputs: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    policy: str = "union",
    src: int = 0,
    rewrite: Callable[..., nn.Module] | None = None,
    **ddp_kwargs: Any,
) -> DistributedDataParallel:
    """Reconfigure the module inside ``ddp_model`` with the mask of rank ``src`` on every
    rank and return it wrapped in a new ``DistributedDataParallel``.

    Collective: every rank of ``ddp_model``'s process group must call it. ``mask`` is only
    read on rank ``src`` (a global rank). ``optimizer`` is re-pointed and sliced in place on
    every rank; on any error it is left as it was on every rank. ``ddp_model`` itself is not
    modified; drop it after the call. ``ddp_kwargs`` override settings taken from
    ``ddp_model`` (e.g. ``bucket_cap_mb=50``). ``rewrite`` replaces ``prunefx.reconfigure``,
    same signature (PruneTrain passes its ``shrink``, which also folds constants).
    """
    _require_initialised()
    if not isinstance(ddp_model, DistributedDataParallel):
        raise DistributedError(
            f"reconfigure_ddp expects a torch.nn.parallel.DistributedDataParallel, got "
            f"{type(ddp_model).__name__}; for a plain module call prunefx.reconfigure instead"
        )
    group = ddp_model.process_group
    mask, policy = _broadcast_decision(mask, policy, src, group)

    saved = _snapshot(optimizer)
    error: BaseException | None = None
    try:
        small = (rewrite or reconfigure)(ddp_model.module, mask, example_inputs=example_inputs, optimizer=optimizer, policy=policy)
    except Exception as e:  # every rank has to hear about it before anyone raises
        error = e
    _agree_on_outcome(error, optimizer, saved, group)

    _carry_ignored_parameters(ddp_model.module, small)
    if getattr(ddp_model, "_comm_hooks", None):
        warnings.warn(
            "reconfigure_ddp: communication hooks of the old DistributedDataParallel are not carried over "
            "(their state belongs to the old buckets); register them again on the returned wrapper",
            stacklevel=2,
        )
    try:
        return DistributedDataParallel(small, **_ddp_arguments(ddp_model, ddp_kwargs))
    except Exception:
        _restore(optimizer, saved)
        raise


def grad_bytes_per_step(model: nn.Module) -> int:
    """Bytes of gradient that data-parallel training all-reduces per step: the sum of
    ``numel * element_size`` over the parameters that require grad (each shared parameter
    once). For a ``DistributedDataParallel``, parameters it was told to ignore are left out."""
    ignored: set[str] = set()
    if isinstance(model, DistributedDataParallel):
        ignored = set(getattr(model, "parameters_to_ignore", ()))
        model = model.module
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if p.requires_grad and name not in ignored)


def _require_initialised() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            "reconfigure_ddp needs torch.distributed: it is "
            + ("not available in this PyTorch build" if not dist.is_available() else "not initialised")
            + "; call torch.distributed.init_process_group(...) on every rank first (torchrun sets up the "
            "environment), or use prunefx.reconfigure for a single-process model"
        )


def _broadcast_decision(mask: Any, policy: str, src: int, group: Any) -> tuple[Mapping[str, Any], str]:
    """Rank ``src``'s (mask, policy) on every rank. A mask ``src`` cannot even send is
    reported on every rank, so no rank is left waiting in a later collective."""
    payload: list[Any] = [None]
    if dist.get_rank() == src:
        try:
            payload[0] = ("ok", _portable(mask), policy)
        except Exception as e:
            payload[0] = ("error", f"{type(e).__name__}: {e}", policy)
    dist.broadcast_object_list(payload, src=src, group=group)
    status, content, policy = payload[0]
    if status == "error":
        raise DistributedError(f"reconfigure_ddp: the mask given on rank {src} cannot be used: {content}")
    return content, policy


def _portable(mask: Any) -> dict[str, Any]:
    """The mask with tensors on the CPU and arrays as tensors, ready to pickle. Values keep
    their dtype so that mask resolution still rejects what it would reject locally."""
    if mask is None:
        raise TypeError("rank src passed mask=None; the rank that decides must pass a mapping of group or module names to bool tensors")
    if not isinstance(mask, Mapping):
        raise TypeError(f"a mask is a mapping from group or module names to bool tensors, got {type(mask).__name__}")
    out: dict[str, Any] = {}
    for key, value in mask.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
        elif isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        out[key] = value
    return out


def _snapshot(optimizer: torch.optim.Optimizer | None) -> Any:
    if optimizer is None:
        return None
    params = [list(g["params"]) for g in optimizer.param_groups]
    state = defaultdict(dict, {p: dict(st) for p, st in optimizer.state.items()})
    return params, state


def _restore(optimizer: torch.optim.Optimizer | None, saved: Any) -> None:
    if optimizer is None:
        return
    params, state = saved
    for g, ps in zip(optimizer.param_groups, params, strict=True):
        g["params"] = ps
    optimizer.state = state


def _agree_on_outcome(error: BaseException | None, optimizer: Any, saved: Any, group: Any) -> None:
    outcomes: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(outcomes, None if error is None else f"{type(error).__name__}: {error}", group=group)
    failed = [(i, msg) for i, msg in enumerate(outcomes) if msg is not None]
    if not failed:
        return
    if error is not None:
        raise error  # prunefx.reconfigure already left this rank's optimizer as it was
    _restore(optimizer, saved)
    i, msg = failed[0]
    rank = dist.get_process_group_ranks(group)[i]
    raise DistributedError(f"reconfigure_ddp: prunefx.reconfigure failed on rank {rank} ({msg}); nothing was changed on any rank")


def _wrapper_settings(old: DistributedDataParallel) -> dict[str, Any]:
    """The constructor arguments that rebuild ``old``'s behaviour, limited to what this
    PyTorch's DistributedDataParallel accepts."""
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    settings: dict[str, Any] = {
        "device_ids": old.device_ids,
        "output_device": old.output_device,
        "dim": old.dim,
        "find_unused_parameters": old.find_unused_parameters,
        "gradient_as_bucket_view": old.gradient_as_bucket_view,
        "static_graph": getattr(old, "static_graph", False),
    }
    if getattr(old, "device_mesh", None) is not None:
        settings["device_mesh"] = old.device_mesh
    else:
        settings["process_group"] = old.process_group
    if "forward_sync_buffers" in accepted and hasattr(old, "forward_sync_buffers"):
        settings["forward_sync_buffers"] = old.forward_sync_buffers  # broadcast_buffers is deprecated here
    elif hasattr(old, "broadcast_buffers"):
        settings["broadcast_buffers"] = old.broadcast_buffers
    if not getattr(old, "bucket_bytes_cap_default", True):  # keep DDP's small first bucket when it was on
        settings["bucket_cap_mb"] = old.bucket_bytes_cap / _MB
    if getattr(old, "bucket_bytes_cap_list", None):
        settings["bucket_cap_mb_list"] = [b / _MB for b in old.bucket_bytes_cap_list]
    for name in ("mixed_precision", "skip_all_reduce_unused_params", "batched_grad_copy"):
        if getattr(old, name, None) is not None:
            settings[name] = getattr(old, name)
    return {k: v for k, v in settings.items() if k in accepted}


# Pairs of constructor arguments that spell one option two ways.
_ALTERNATIVES = (
    {"broadcast_buffers", "forward_sync_buffers"},
    {"process_group", "device_mesh"},
    {"bucket_cap_mb", "bucket_cap_mb_list"},
)


def _ddp_arguments(old: DistributedDataParallel, explicit: Mapping[str, Any]) -> dict[str, Any]:
    """``old``'s settings overridden by ``explicit``. An inherited setting is dropped when
    an explicit argument spells the same option another way, so that an explicit
    ``broadcast_buffers=False`` is not overruled by an inherited ``forward_sync_buffers``."""
    settings = _wrapper_settings(old)
    for names in _ALTERNATIVES:
        if names & explicit.keys():
            for name in names:
                settings.pop(name, None)
    return {**settings, **explicit}


def _carry_ignored_parameters(old: nn.Module, new: nn.Module) -> None:
    ignored = getattr(old, "_ddp_params_and_buffers_to_ignore", None)
    if ignored:
        kept = {name for name, _ in (*new.named_parameters(), *new.named_buffers())}
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(new, [n for n in ignored if n in kept])
