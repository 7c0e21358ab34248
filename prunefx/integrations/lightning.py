"""PruneTrain inside ``lightning.pytorch.Trainer.fit``: a callback.

    model = LitCNN()                               # a LightningModule with a submodule `net`
    prune = PruneTrainCallback("net", example_inputs=x, every=2)
    trainer = L.Trainer(max_epochs=10, callbacks=[prune, ModelCheckpoint(...)])
    trainer.fit(model, loader)                     # model.net shrinks every 2 epochs

What it does, per Lightning hook:

    setup                     a load_state_dict pre-hook: a checkpoint written after a shrink
                              rebuilds ``net`` to its layout before the weights load (resume)
    on_fit_start              PruneTrain on ``net``: its group lasso, the optimizers holding
                              ``net``'s parameters, their LR schedulers, the precision
                              plugin's GradScaler, the EMA copies named in ``ema``
    on_before_backward        lambda, once, from the first loss (times accumulate_grad_batches)
    on_before_optimizer_step  mode "penalty": lambda * grad R(W) joins the (unscaled, fully
                              accumulated) gradients, as if it were in the loss
    optimizer.step (hook)     mode "proximal": the lasso's proximal step after every step
    on_train_epoch_end        every ``every`` epochs: shrink (``prunefx.train.shrink``),
                              ``pl_module.net`` replaced, optimizers re-pointed in place,
                              EMA copies sliced alike, under DDP the model wrapped again
    state_dict                the channel layout, lambda and the history, saved by
                              ``ModelCheckpoint`` with the weights

Lightning sorts ``ModelCheckpoint`` after the other callbacks, so a checkpoint of the epoch
that shrank holds the shrunk model. Resuming (``trainer.fit(fresh_model,
ckpt_path=...)`` with the same callback) rebuilds ``net`` from the original architecture and
the recorded layout (``prunefx.load_state_dict``), then Lightning loads the weights, builds
the optimizers with ``configure_optimizers`` on the rebuilt parameters and loads their state.
Outside a Trainer, ``callback.restore(fresh_model, path)`` does the same for inference.

Under the DDP strategy every rank shrinks with rank 0's mask (broadcast) and the model is
wrapped again with the strategy's settings; pass the same ``example_inputs`` on every rank.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from prunefx.checkpoint import load_state_dict as load_layout_state_dict
from prunefx.errors import PruneFxError
from prunefx.flops import count_params
from prunefx.graph import trace
from prunefx.masks.zeros import from_zeros
from prunefx.provenance import layout_of
from prunefx.train.callback import PruneTrain, Reconfiguration
from prunefx.train.fold import add_folded_biases

__all__ = ["PruneTrainCallback"]


class PruneTrainCallback(pl.Callback):
    """PruneTrain for the submodule ``submodule`` (a dotted attribute path of the
    LightningModule) while ``Trainer.fit`` trains it; see the module docstring.

    ``example_inputs``: a real batch of ``submodule``'s inputs (constant folds are measured on
    it). ``every``, ``ratio``, ``threshold``, ``start_after``, ``stop_after``: as
    ``prunefx.train.PruneTrain``. ``mode``: "proximal" (default, exact zeros in short runs)
    or "penalty". ``ema``: attribute paths of EMA copies of ``submodule`` on the
    LightningModule (``AveragedModel`` / timm ``ModelEmaV3``), sliced alike at each shrink.
    """

    def __init__(
        self,
        submodule: str,
        example_inputs: Any,
        *,
        every: int = 10,
        mode: str = "proximal",
        ratio: float = 0.2,
        threshold: float = 1e-4,
        start_after: int = 0,
        stop_after: int | None = None,
        ema: Sequence[str] = (),
        verbose: bool = False,
    ) -> None:
        if mode not in ("penalty", "proximal"):
            raise ValueError(f"mode is 'proximal' or 'penalty', got {mode!r}")
        self.submodule = submodule
        self.example_inputs = example_inputs
        self.every, self.mode, self.ratio, self.threshold = every, mode, ratio, threshold
        self.start_after, self.stop_after = start_after, stop_after
        self.ema = tuple(ema)
        self.verbose = verbose
        self.prunetrain: PruneTrain | None = None
        self.history: list[dict[str, Any]] = []
        self._restored_lam: float | None = None
        self._hooks: list[Any] = []
        self._trainer: Any = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(submodule=self.submodule)

    # ---------------------------------------------------------------- resume

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = weakref.ref(trainer)
        self._hooks.append(pl_module.register_load_state_dict_pre_hook(self._rebuild_before_load))

    def _rebuild_before_load(self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        """Runs as Lightning loads a checkpoint's weights into the LightningModule: a
        checkpoint from after a shrink rebuilds the submodule to its layout first. Lightning
        restores callback states only *after* the weights, so the layout is read from the
        checkpoint Lightning has loaded (its connector's ``_loaded_checkpoint``, internal to
        Lightning 2.x: the only place the checkpoint is reachable at this point)."""
        trainer = self._trainer() if self._trainer is not None else None
        checkpoint = getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None)
        if prefix or not isinstance(checkpoint, Mapping):
            return
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if isinstance(state, Mapping) and state.get("layout"):
            self._rebuild(module, state_dict, state["layout"])

    def _rebuild(self, pl_module: nn.Module, state_dict: Mapping[str, Any], layout: Mapping[str, Any]) -> None:
        current = pl_module.get_submodule(self.submodule)
        if layout_of(current) is not None:
            if _same_layout(layout_of(current), layout):
                return
            raise PruneFxError(f"'{self.submodule}' is already reconfigured to another layout than the checkpoint's: "
                               "load the checkpoint into a freshly built LightningModule")
        prefix = self.submodule + "."
        weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        add_folded_biases(current, layout)  # biases the constant folds created, which the original lacks
        small = load_layout_state_dict(current, {"state_dict": weights, "prunefx": dict(layout)})
        _set_submodule(pl_module, self.submodule, small)
        for path in self.ema:
            ema = pl_module.get_submodule(path)
            training = bool(getattr(ema.module, "training", False))
            ema.module = copy.deepcopy(small).requires_grad_(False).train(training)

    def restore(self, pl_module: pl.LightningModule, checkpoint: str | Mapping[str, Any]) -> pl.LightningModule:
        """Load a checkpoint this callback wrote into a freshly built ``pl_module`` outside
        a Trainer (e.g. for inference): the submodule is rebuilt to the recorded layout, then
        every weight is loaded. Returns ``pl_module``."""
        loaded: Mapping[str, Any] = (checkpoint if isinstance(checkpoint, Mapping)
                                     else torch.load(checkpoint, map_location="cpu", weights_only=True))
        state = loaded.get("callbacks", {}).get(self.state_key) or {}
        if state.get("layout"):
            self._rebuild(pl_module, loaded["state_dict"], state["layout"])
        pl_module.load_state_dict(loaded["state_dict"])
        return pl_module

    def state_dict(self) -> dict[str, Any]:
        pt = self.prunetrain
        lam = pt.lasso.lam if pt is not None and pt.lasso is not None else self._restored_lam
        module = pt.module if pt is not None else None
        return {"layout": layout_of(module) if module is not None else None, "lam": lam, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_lam = state_dict.get("lam")
        self.history = list(state_dict.get("history", []))

    # ---------------------------------------------------------------- training

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        if not isinstance(trainer.strategy, (DDPStrategy, SingleDeviceStrategy)):
            raise PruneFxError(f"PruneTrainCallback runs under a single device or the DDP strategy, not "
                               f"{type(trainer.strategy).__name__} (its model wrapping is not rebuilt after a shrink)")
        net = pl_module.get_submodule(self.submodule)
        own = {id(p) for p in net.parameters()}
        holding = [o for o in trainer.optimizers if any(id(p) in own for g in o.param_groups for p in g["params"])]
        if not holding:
            raise PruneFxError(f"no optimizer of configure_optimizers() holds a parameter of '{self.submodule}': "
                               "PruneTrain needs the optimizer that trains it")
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if getattr(c.scheduler, "optimizer", None) in holding]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.prunetrain = PruneTrain(
            net, holding[0], example_inputs=_to(self.example_inputs, pl_module.device), every=self.every,
            ratio=self.ratio, threshold=self.threshold, mode=self.mode, start_after=self.start_after,
            stop_after=self.stop_after, extra_optimizers=holding[1:], schedulers=schedulers, scaler=scaler,
            ema=[pl_module.get_submodule(p) for p in self.ema],
        )
        assert self.prunetrain.lasso is not None
        self.prunetrain.lasso.lam = self._restored_lam
        if self.mode == "proximal":
            self._hooks.append(holding[0].register_step_post_hook(lambda *_: self._after_step()))

    def _after_step(self) -> None:
        if self.prunetrain is not None:
            self.prunetrain.after_step()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        pt = self.prunetrain
        if pt is None or pt.lasso is None or pt.lasso.lam is not None:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        first = loss.detach().float() * trainer.accumulate_grad_batches  # Lightning divided it
        if scaler is not None:
            first = first / scaler.get_scale()
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            # one lambda on every rank (the mean first loss), or the proximal steps would differ and the replicas drift
            torch.distributed.all_reduce(first)
            first = first / trainer.world_size
        with torch.no_grad():
            pt.lasso(first)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        pt = self.prunetrain
        if pt is None or self.mode != "penalty" or pt.lasso is None or pt.lasso.lam is None or optimizer is not pt.optimizer:
            return
        params = [p for p in pt.module.parameters() if p.requires_grad]
        grads = torch.autograd.grad(pt.lasso.lam * pt.lasso.penalty(), params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pt = self.prunetrain
        epoch = trainer.current_epoch
        if pt is None or not pt.due(epoch):
            return
        mask = self._decide(trainer, pt)
        pt.reconfigure(epoch, mask=mask)
        event = pt.history[-1]
        self.history.append(_record(event))
        if self.verbose and trainer.is_global_zero:
            print(f"epoch {epoch}: {event.report}")
        if not event.report.changed:
            return
        _set_submodule(pl_module, self.submodule, pt.module)
        if trainer.world_size > 1:
            _rewrap(trainer, pl_module)
        pl_module.log("prunefx/params", float(count_params(pt.module)), on_epoch=True, logger=trainer.logger is not None)

    def _decide(self, trainer: pl.Trainer, pt: PruneTrain) -> Mapping[str, Any] | None:
        """None (``shrink`` decides) on one process; rank 0's mask on every rank otherwise."""
        if trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return None
        from prunefx.distributed import _broadcast_decision

        mine = from_zeros(trace(pt.module, pt.example_inputs), pt.threshold) if trainer.is_global_zero else {}
        mask, _ = _broadcast_decision(mine, "union", 0, None)
        return {k: torch.as_tensor(v) for k, v in mask.items()}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.prunetrain is not None and self.prunetrain.boundary is not None:
            self.prunetrain.boundary.remove()


def _record(event: Reconfiguration) -> dict[str, Any]:
    r = event.report
    return {"epoch": event.epoch, "changed": r.changed, "params": list(r.params),
            "channels": {k: list(v) for k, v in r.channels.items()}}


def _same_layout(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> bool:
    ta, tb = (a or {}).get("tensors", {}), b.get("tensors", {})
    if set(ta) != set(tb):
        return False
    for name, entry in tb.items():
        ka, kb = ta[name]["kept"], entry["kept"]
        if set(ka) != set(kb) or any(not torch.equal(torch.as_tensor(ka[d]), torch.as_tensor(kb[d])) for d in kb):
            return False
    return True


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _rewrap(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """A new DistributedDataParallel around the LightningModule, with the strategy's settings
    (the old one's buckets and hooks hold the old parameters)."""
    strategy = trainer.strategy
    setup_model = getattr(strategy, "_setup_model", None)
    if setup_model is None:
        raise PruneFxError(f"PruneTrainCallback cannot re-wrap the model under {type(strategy).__name__}; "
                           "use the 'ddp' strategy or a single device")
    strategy.model = setup_model(pl_module)
    register = getattr(strategy, "_register_ddp_hooks", None)
    if register is not None:
        register()


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x
