"""``PruneTrain``: the training-loop side of PruneTrain, one object.

    pt = prunefx.train.PruneTrain(model, optimizer, example_inputs=x, every=10)
    for epoch in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(pt.model(x), y)
            optimizer.zero_grad()
            pt.regularize(loss).backward()    # loss + lambda * group lasso (lambda set at step 1)
            optimizer.step()
            pt.after_step()                   # mode="proximal": shrink the groups, exact zeros
        pt.epoch_end(epoch)                   # every `every` epochs: shrink model + optimizer

``pt.model`` is the model to train: after a reconfiguration it is a new, smaller module
(the optimizer is the same object, re-pointed), so read it again each epoch. The lasso is
rebound to the new model with the same lambda. ``pt.history`` holds one ``Reconfiguration``
per step that ran (epoch, the ``ShrinkReport``), and ``pt.on_change`` callbacks run after
each change (e.g. to grow the batch with ``DynamicBatch``). A DistributedDataParallel model
works too: every rank applies rank 0's mask and ``pt.model`` is a new wrapper with the old
one's settings (``prunefx.distributed.reconfigure_ddp``); pass the same ``example_inputs``
batch on every rank, since the folded constants are measured on it. An FSDP2 model
(``fully_shard``) works in ``mode="proximal"``: the lasso sums each rank's shard, every rank
shrinks the gathered weights alike and ``pt.model`` is the smaller model sharded again with the
old units' settings (``prunefx.fsdp.reconfigure_fsdp``; the optimizer's sharded state follows).

The rest of the loop's state follows each reconfiguration (``prunefx.train.loop``): pass
``extra_optimizers``, ``ema`` (``AveragedModel`` / ``ModelEmaV3``), ``schedulers`` and ``scaler``
(``GradScaler``); a ``torch.compile``d model comes back compiled alike. A reconfiguration while
gradients are being accumulated (a backward since the last ``optimizer.step()``) is refused.

Reconfiguration stops after ``stop_after`` epochs (PruneTrain keeps the last part of
training at a fixed architecture) and can start after ``start_after`` epochs.

``mode="penalty"`` is the paper's method: the lasso's (sub)gradient joins the loss's.
``mode="proximal"`` takes the loss's gradient step and then the lasso's proximal step
(``GroupLasso.prox_``), which puts channels at exact zeros; use it when training is short
compared to PruneTrain's 180 epochs (see docs/prunetrain.md for both on the same task).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils import _pytree as pytree

from prunefx.errors import PruneFxError
from prunefx.fsdp import fsdp_process_group, gather, is_fsdp
from prunefx.graph import PruneGraph, trace
from prunefx.guards import refuse_foreign_graph
from prunefx.masks.zeros import from_zeros
from prunefx.train.lasso import GroupLasso
from prunefx.train.loop import StepBoundary, check_scaler, check_schedulers
from prunefx.train.shrink import ShrinkReport, shrink
from prunefx.wrappers import unwrap_compiled

__all__ = ["PruneTrain", "Reconfiguration"]


@dataclass(frozen=True)
class Reconfiguration:
    epoch: int
    report: ShrinkReport


@dataclass
class PruneTrain:
    """Group-lasso training with periodic reconfiguration (see the module docstring).

    ``example_inputs`` should be a real batch (the constant folds are measured on it; it is
    also what shapes are traced with). ``ratio`` is the lasso's share of the first loss,
    ``threshold`` the magnitude under which a channel counts as zero. ``example_kwargs``: the
    keyword inputs of ``forward`` every trace and shrink is given (``{"use_cache": False}`` for
    a transformers causal LM, captured by the export front-end).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    example_inputs: Any
    every: int = 10
    ratio: float = 0.2
    threshold: float = 1e-4
    mode: str = "penalty"
    start_after: int = 0
    stop_after: int | None = None
    lasso: GroupLasso | None = None
    verbose: bool = False
    history: list[Reconfiguration] = field(default_factory=list)
    on_change: list[Callable[[nn.Module, Reconfiguration], None]] = field(default_factory=list)
    extra_optimizers: Sequence[torch.optim.Optimizer] = ()
    ema: Sequence[nn.Module] = ()
    schedulers: Sequence[Any] = ()
    scaler: Any = None
    boundary: StepBoundary | None = field(default=None, repr=False)
    example_kwargs: dict[str, Any] | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.mode not in ("penalty", "proximal"):
            raise ValueError(f"mode is 'penalty' (lasso gradient in the loss, the paper) or 'proximal' (prox step after optimizer.step()), got {self.mode!r}")
        if self.every < 1:
            raise ValueError(f"every is a number of epochs >= 1, got {self.every}")
        if is_fsdp(self.model):
            self._check_fsdp()
        self._graph: tuple[PruneGraph, tuple] | None = None  # the model's analysis and what it was traced on
        if self.lasso is None:
            if is_fsdp(self.model):  # no rank holds the model
                graph = trace(gather(self.model), self.example_inputs, **self._kw)
            else:  # the lasso's analysis serves the first shrink too
                graph = self._remember(trace(self.module, self.example_inputs, **self._kw), self.example_inputs)
            self.lasso = GroupLasso(self.module, self.example_inputs, graph=graph, ratio=self.ratio, example_kwargs=self.example_kwargs)
        if self.boundary is None:
            self.boundary = StepBoundary(self.module, self.optimizers)

    @property
    def module(self) -> nn.Module:
        """The model without its DistributedDataParallel or torch.compile wrapper."""
        model = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        return unwrap_compiled(model)[0]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer, *self.extra_optimizers]

    def regularize(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss + lambda * R(W)`` (mode "penalty"); ``loss`` itself in mode "proximal",
        where the first call only sets lambda."""
        assert self.lasso is not None
        if self.mode == "penalty":
            return loss + self.lasso(loss)
        if self.lasso.lam is None:
            with torch.no_grad():
                self.lasso(self._mean_over_ranks(loss.detach()))
        return loss

    def _mean_over_ranks(self, loss: torch.Tensor) -> torch.Tensor:
        """Under DDP, the mean first loss of all ranks: lambda must be the same on every rank,
        or the proximal steps differ and the replicas drift apart."""
        if isinstance(self.model, DistributedDataParallel):
            group = self.model.process_group
        elif is_fsdp(self.model):
            group = fsdp_process_group(self.model)
        else:
            return loss
        loss = loss.clone()
        torch.distributed.all_reduce(loss, group=group)
        return loss / torch.distributed.get_world_size(group)

    def after_step(self) -> None:
        """Mode "proximal": the lasso's proximal step, ``lr / (1 - momentum) * lambda`` (SGD
        with momentum moves by ``lr / (1 - momentum)`` times a steady gradient, so this is
        the pull the penalty's gradient would have in mode "penalty"). Call it after every
        ``optimizer.step()``; it does nothing in mode "penalty"."""
        if self.mode == "proximal" and self.lasso is not None and self.lasso.lam is not None:
            group = self.optimizer.param_groups[0]
            momentum = float(group.get("momentum", 0.0) or 0.0) if isinstance(self.optimizer, torch.optim.SGD) else 0.0
            self.lasso.prox_(group["lr"] / (1.0 - momentum) * self.lasso.lam)

    def due(self, epoch: int) -> bool:
        """Whether ``epoch_end(epoch)`` reconfigures (epochs count from 0)."""
        done = epoch + 1
        if done <= self.start_after or (self.stop_after is not None and done > self.stop_after):
            return False
        return done % self.every == 0

    def epoch_end(self, epoch: int, example_inputs: Any = None) -> nn.Module:
        """Reconfigure when due; returns the model to train from now on."""
        if not self.due(epoch):
            return self.model
        return self.reconfigure(epoch, example_inputs)

    def reconfigure(self, epoch: int = -1, example_inputs: Any = None, *, mask: Mapping[str, Any] | None = None) -> nn.Module:
        """Reconfigure now (dead channels out), whatever the schedule says. ``mask``: the
        channels to keep, when the caller decided them (default: ``from_zeros``)."""
        x = self.example_inputs if example_inputs is None else example_inputs
        graph = None
        if isinstance(self.model, DistributedDataParallel):
            small, report = self._reconfigure_ddp(x)
        elif is_fsdp(self.model):
            small, report, graph = self._reconfigure_fsdp(x, mask)
        else:
            small, report = shrink(self.model, mask, example_inputs=x, optimizer=self.optimizers, threshold=self.threshold,
                                   graph=self._remembered(x), **self._kw, **self._loop_state())
        event = Reconfiguration(epoch, report)
        self.history.append(event)
        if self.verbose:
            print(f"epoch {epoch}: {report}")
        if report.changed:
            self.model = small
            assert self.lasso is not None
            if graph is None:
                # one analysis per reconfiguration: the new model's, for the lasso and the next shrink
                graph = self._remember(trace(self.module, x, **self._kw), x)
            self.lasso = self.lasso.rebind(self.module, x, graph=graph, **self._kw)
            assert self.boundary is not None
            self.boundary.watch(self.module)
            for callback in self.on_change:
                callback(small, event)
        return self.model

    def _reconfigure_ddp(self, x: Any) -> tuple[nn.Module, ShrinkReport]:
        """Every rank shrinks with rank 0's mask (the same weights give the same mask, but
        the ranks must not have to agree by luck), then the module is wrapped again."""
        from prunefx.distributed import _broadcast_decision, reconfigure_ddp

        assert isinstance(self.model, DistributedDataParallel)
        graph = self._remembered(x) or trace(self.module, x, **self._kw)  # one analysis serves the mask and the shrink
        mask, _ = _broadcast_decision(from_zeros(graph, self.threshold), "union", 0, self.model.process_group)
        if not mask:
            return self.model, ShrinkReport(changed=False)
        reports: list[ShrinkReport] = []

        def rewrite(module: nn.Module, mask: Any, *, optimizer: Any = None, **kw: Any) -> nn.Module:
            optimizers = None if optimizer is None else self.optimizers
            small, report = shrink(module, mask, threshold=self.threshold, graph=graph, optimizer=optimizers,
                                   **self._kw, **self._loop_state(), **kw)
            reports.append(report)
            return small

        return reconfigure_ddp(self.model, mask, example_inputs=x, optimizer=self.optimizer, rewrite=rewrite), reports[0]

    def _check_fsdp(self) -> None:
        """What PruneTrain cannot do on a sharded model, refused when it is built."""
        if self.mode != "proximal":
            raise PruneFxError("PruneTrain on an FSDP2 model needs mode='proximal': the lasso over sharded parameters is "
                               "computed shard by shard without a gradient, so it cannot join the loss")
        if self.extra_optimizers or self.ema:
            raise PruneFxError("PruneTrain on an FSDP2 model follows one optimizer: extra_optimizers and ema= (copies of "
                               "sharded parameters) are not supported")

    def _reconfigure_fsdp(self, x: Any, mask: Mapping[str, Any] | None) -> tuple[nn.Module, ShrinkReport, Any]:
        """Every rank shrinks the gathered weights (the same on every rank, so the same mask
        from zeros) and the result is sharded again; the graph of the new, unsharded model is
        kept for the lasso (the sharded model cannot be traced)."""
        from prunefx.fsdp import reconfigure_fsdp

        check_scaler(self.scaler, self.optimizers)
        check_schedulers(self.schedulers, self.optimizers)
        assert self.boundary is not None
        self.boundary.check()
        reports: list[ShrinkReport] = []
        graphs: list[Any] = []

        def rewrite(module: nn.Module, mask: Any, *, optimizer: Any = None, example_inputs: Any = None, **kw: Any) -> nn.Module:
            small, report = shrink(module, mask, example_inputs=example_inputs, threshold=self.threshold, optimizer=optimizer,
                                   **self._kw, **kw)
            reports.append(report)
            if report.changed:
                graphs.append(trace(small, example_inputs, **self._kw))
            return small

        # a mask given by the caller is rank 0's, as under DDP; without one every rank finds the
        # same zeros in the same gathered weights (reconfigure_fsdp checks the shapes agree)
        small = reconfigure_fsdp(self.model, mask, example_inputs=x, optimizer=self.optimizer,
                                 src=None if mask is None else 0, rewrite=rewrite)
        return small, reports[0], graphs[0] if graphs else None

    @property
    def _kw(self) -> dict[str, Any]:
        """``example_kwargs=`` for trace and shrink when given (none: the fx front-end, as before)."""
        return {"example_kwargs": self.example_kwargs} if self.example_kwargs else {}

    def _signature(self, x: Any) -> tuple:
        """What an analysis of the model depends on besides its tensors: its module objects,
        its train/eval mode and the example inputs' shapes and dtypes."""
        leaves = pytree.tree_leaves((x, self.example_kwargs))
        inputs = tuple((tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else repr(v) for v in leaves)
        modules = tuple((name, id(m)) for name, m in self.module.named_modules())
        return modules, self.module.training, inputs

    def _remember(self, graph: PruneGraph, x: Any) -> PruneGraph:
        self._graph = (graph, self._signature(x))
        return graph

    def _remembered(self, x: Any) -> PruneGraph | None:
        """The analysis of the model as it is now, when one was made (else the shrink traces)."""
        if self._graph is None:
            return None
        graph, signature = self._graph
        if signature != self._signature(x):
            return None
        try:
            refuse_foreign_graph(self.module, graph)  # its tensors were replaced since
        except PruneFxError:
            return None
        return graph

    def _loop_state(self) -> dict[str, Any]:
        return {"ema": self.ema, "scaler": self.scaler, "schedulers": self.schedulers, "boundary": self.boundary}
