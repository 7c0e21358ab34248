"""Dynamic mini-batch: as PruneTrain shrinks the model, grow the batch into the memory it freed.

PruneTrain (Lym et al., SC'19) removes channels during training; the activations of the
removed channels no longer need memory, so the same device holds a larger batch. With the
learning rate scaled linearly (Goyal et al., 2017), the larger batch keeps the same training
trajectory per epoch while using the accelerator better. The rule, at every ``update``:

    budget     = memory_budget  or  bytes_per_sample(dense model) * base_batch_size  (first call)
    batch_size = floor(budget / bytes_per_sample(model))          rounded down to multiple_of,
                 clamped to [base_batch_size, max_batch_size]
    scale      = batch_size / base_batch_size
    lr         = base_lr * scale          (each optimizer param group: its own lr * scale)

``bytes_per_sample`` is the memory one more sample of the batch costs in a training step:

- on CPU (and any non-CUDA device), ``activation_bytes_per_sample``: the bytes of the tensors
  autograd saves for backward during one forward in train mode (unique storages, the model's
  own parameters and buffers excluded), divided by the batch size of ``example_inputs``;
- on CUDA, ``measured_bytes_per_sample``: the peak memory of one forward + backward step over
  what was allocated before it (``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``), less the gradients' bytes, divided by the batch size.

Both measurements leave the model as it was: train/eval modes, buffers (BatchNorm running
stats), ``.grad`` and the global RNG state are restored. ``model_state_bytes`` gives the
per-step memory that does not depend on the batch (parameters, gradients, optimizer state),
to turn a device's memory into a ``memory_budget`` for activations.

Nothing happens unless you call ``update``; it sets ``lr`` in the optimizer you pass and
returns a ``BatchDecision``; building the next data loader with ``decision.batch_size`` is yours.

Example::

    >>> import torch, torchvision, prunefx
    >>> from prunefx.train.batch import DynamicBatch
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> x = torch.randn(2, 3, 32, 32)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> dyn = DynamicBatch(base_batch_size=64, base_lr=0.1, max_batch_size=512, multiple_of=8)
    >>> dyn.update(model, x, opt).batch_size      # the first call sets the budget
    64
    >>> keep = {n: torch.arange(m.out_channels) % 2 == 0 for n, m in model.named_modules()
    ...         if isinstance(m, torch.nn.Conv2d)}
    >>> small = prunefx.reconfigure(model, keep, example_inputs=x, optimizer=opt)
    >>> d = dyn.update(small, x, opt)
    >>> d.batch_size > 64 and d.batch_size % 8 == 0 and opt.param_groups[0]["lr"] == d.lr
    True
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from prunefx.tracing import in_mode

__all__ = [
    "DynamicBatch",
    "BatchDecision",
    "bytes_per_sample",
    "activation_bytes_per_sample",
    "measured_bytes_per_sample",
    "model_state_bytes",
]

Measure = Callable[[nn.Module, Any], int]


@dataclass(frozen=True)
class BatchDecision:
    """The batch size and learning rate ``DynamicBatch.update`` chose, and why.

    ``scale = batch_size / base_batch_size``; ``lr = base_lr * scale``; ``bytes_per_sample``
    is the measurement of the model passed in; ``budget`` the activation bytes the batch fills.
    """

    batch_size: int
    lr: float
    scale: float
    bytes_per_sample: int
    budget: int


class DynamicBatch:
    """Grow the batch (and the learning rate, linearly) as the model shrinks; see the module docstring.

    ``memory_budget``: activation bytes a batch may use; by default the dense model's
    ``bytes_per_sample * base_batch_size``, measured at the first ``update``.
    ``measure(model, example_inputs) -> bytes``: how to measure; default ``bytes_per_sample``.
    """

    def __init__(
        self,
        base_batch_size: int,
        base_lr: float,
        *,
        max_batch_size: int | None = None,
        multiple_of: int = 1,
        memory_budget: int | None = None,
        measure: Measure | None = None,
    ) -> None:
        if base_batch_size < 1 or multiple_of < 1:
            raise ValueError(f"base_batch_size ({base_batch_size}) and multiple_of ({multiple_of}) must be >= 1")
        if base_batch_size % multiple_of:
            raise ValueError(
                f"base_batch_size={base_batch_size} is not a multiple of multiple_of={multiple_of}: "
                "choose a base batch size the rounding can return to"
            )
        if max_batch_size is not None and max_batch_size < base_batch_size:
            raise ValueError(f"max_batch_size={max_batch_size} is smaller than base_batch_size={base_batch_size}")
        if memory_budget is not None and memory_budget <= 0:
            raise ValueError(f"memory_budget={memory_budget} must be a positive number of bytes")
        self.base_batch_size = base_batch_size
        self.base_lr = float(base_lr)
        # the largest multiple of `multiple_of` not above max_batch_size (>= base, a multiple)
        self.max_batch_size = None if max_batch_size is None else max_batch_size // multiple_of * multiple_of
        self.multiple_of = multiple_of
        self.budget = memory_budget
        self.measure: Measure = measure or bytes_per_sample
        self.last: BatchDecision | None = None
        self._optimizer: weakref.ref[torch.optim.Optimizer] | None = None
        self._applied_scale = 1.0  # the factor the optimizer's lrs currently carry

    def update(self, model: nn.Module, example_inputs: Any, optimizer: torch.optim.Optimizer | None = None) -> BatchDecision:
        """Measure ``model``, choose the batch size and lr, write the lr into ``optimizer``.

        The optimizer's param groups are rescaled by ``scale / previous scale``, so each group
        keeps its own ratio to ``base_lr`` (and a chainable scheduler's decay so far). An
        optimizer seen for the first time is taken to carry its base lrs (scale 1).
        """
        per_sample = int(self.measure(model, example_inputs))
        if per_sample <= 0:
            raise ValueError(
                f"measured {per_sample} bytes per sample for {type(model).__name__}: no activation is kept for "
                "backward (are all parameters frozen, or is the model in torch.no_grad?). Dynamic batching needs a "
                "model that trains."
            )
        if self.budget is None:
            self.budget = per_sample * self.base_batch_size
        batch = self._batch_for(per_sample)
        scale = batch / self.base_batch_size
        if optimizer is not None:
            self._rescale(optimizer, scale)
        self.last = BatchDecision(batch, self.base_lr * scale, scale, per_sample, self.budget)
        return self.last

    def _batch_for(self, per_sample: int) -> int:
        assert self.budget is not None
        batch = self.budget // per_sample // self.multiple_of * self.multiple_of
        batch = max(batch, self.base_batch_size)
        return batch if self.max_batch_size is None else min(batch, self.max_batch_size)

    def _rescale(self, optimizer: torch.optim.Optimizer, scale: float) -> None:
        if self._optimizer is None or self._optimizer() is not optimizer:
            self._optimizer, self._applied_scale = weakref.ref(optimizer), 1.0
        factor = scale / self._applied_scale
        for group in optimizer.param_groups:
            if "lr" not in group:
                raise ValueError(f"{type(optimizer).__name__} has a param group without 'lr': cannot scale its learning rate")
            lr = group["lr"]
            # a tensor lr (capturable Adam) is updated in place, as schedulers do
            if isinstance(lr, torch.Tensor):
                lr.mul_(factor)
            else:
                group["lr"] = lr * factor
        self._applied_scale = scale


def bytes_per_sample(model: nn.Module, example_inputs: Any) -> int:
    """``measured_bytes_per_sample`` on CUDA, ``activation_bytes_per_sample`` elsewhere."""
    if _device_of(model).type == "cuda":
        return measured_bytes_per_sample(model, example_inputs)
    return activation_bytes_per_sample(model, example_inputs)


def activation_bytes_per_sample(model: nn.Module, example_inputs: Any) -> int:
    """Bytes autograd saves for backward per sample, in one train-mode forward on ``example_inputs``.

    Unique storages, without the model's own parameters and buffers, divided by the batch size
    (dim 0 of the first input tensor). The model is left as it was (modes, buffers, RNG).
    Use a batch of at least 2 for models with BatchNorm (train mode needs it).
    """
    inputs, batch = _inputs_and_batch(example_inputs)
    own = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
    saved: dict[tuple[Any, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None and key not in own:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with _preserved(model), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _forward(model, inputs)
        del out  # frees the autograd graph (and the saved tensors) now
    return -(-sum(saved.values()) // batch)  # ceil: a batch never fits more than measured


def measured_bytes_per_sample(model: nn.Module, example_inputs: Any) -> int:
    """Peak CUDA memory of one forward + backward step, per sample (the model must be on CUDA).

    ``max_memory_allocated`` after ``reset_peak_memory_stats``, less what was allocated before
    the step and less the gradients' bytes (they do not grow with the batch), divided by the
    batch size. Gradients are computed with ``torch.autograd.grad``, so ``.grad`` is untouched.
    """
    device = _device_of(model)
    if device.type != "cuda":
        raise ValueError(f"measured_bytes_per_sample needs a model on CUDA; this one is on {device}: use activation_bytes_per_sample")
    inputs, batch = _inputs_and_batch(example_inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    with _preserved(model), torch.enable_grad():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        loss = _scalar(_forward(model, inputs), model)
        if loss.requires_grad and params:
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            del grads
        del loss
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    return -(-max(peak - before - grad_bytes, 0) // batch)


def model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes a training step holds whatever the batch: parameters, buffers, a gradient per
    trainable parameter, and the optimizer's state tensors (momentum, Adam moments)."""
    tensors: dict[tuple[Any, int], int] = {}
    for t in (*model.parameters(), *model.buffers()):
        _count(tensors, t)
    if optimizer is not None:
        for t in tree_leaves(list(optimizer.state.values())):
            if isinstance(t, torch.Tensor):
                _count(tensors, t)
    # a step allocates every trainable parameter's gradient, whether .grad exists now or not
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return sum(tensors.values()) + grads


def _count(into: dict[tuple[Any, int], int], t: torch.Tensor) -> None:
    key = _storage_key(t)
    if key is not None:
        into[key] = t.untyped_storage().nbytes()


def _storage_key(t: torch.Tensor) -> tuple[Any, int] | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return None
    ptr = storage.data_ptr()
    return (t.device, ptr) if ptr else None


def _inputs_and_batch(example_inputs: Any) -> tuple[tuple[Any, ...], int]:
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    first = next((t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)), None)
    if first is None or first.dim() == 0 or first.shape[0] < 1:
        raise ValueError(
            "example_inputs must hold a tensor with a batch dimension (dim 0 >= 1), e.g. torch.randn(2, 3, 32, 32)"
        )
    return inputs, int(first.shape[0])


def _forward(model: nn.Module, inputs: tuple[Any, ...]) -> Any:
    try:
        return model(*inputs)
    except Exception as exc:
        raise ValueError(
            f"measuring {type(model).__name__} failed in its train-mode forward: {type(exc).__name__}: {exc}. "
            "Pass example_inputs the model accepts (with BatchNorm, a batch of at least 2)."
        ) from exc


def _scalar(out: Any, model: nn.Module) -> torch.Tensor:
    floats = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floats:
        raise ValueError(f"{type(model).__name__} returned no floating-point tensor to back-propagate from")
    return sum((t.float().sum() for t in floats), torch.zeros((), device=floats[0].device))


def _device_of(model: nn.Module) -> torch.device:
    t = next(iter((*model.parameters(), *model.buffers())), None)
    return t.device if t is not None else torch.device("cpu")


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Train mode inside; afterwards every module's mode, every buffer's value (BatchNorm
    running stats, num_batches_tracked) and the RNG state (dropout) are as before."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.device.type == "cuda"})
    try:
        with in_mode(model, True), torch.random.fork_rng(devices=cuda):
            yield
    finally:
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
