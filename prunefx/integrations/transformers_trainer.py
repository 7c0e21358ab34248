"""PruneTrain inside ``transformers.Trainer.train``: a ``TrainerCallback``.

    model = LlamaForCausalLM(config)
    prune = PruneTrainCallback(example_inputs=(input_ids,), every_steps=200)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[prune])
    trainer.train()                               # trainer.model shrinks every 200 steps

The Trainer keeps its model in several places (``trainer.model``, ``model_wrapped``, a local
variable of its epoch loop, Accelerate's list of prepared models), and a callback is only
handed the model object. So a shrink does not hand the Trainer a new model: the Trainer's
model object *becomes* the smaller model (its submodules, config and channel layout are
replaced by the shrunk copy's, its hooks kept), and every reference the Trainer holds stays
right. What it does, per Trainer event:

    on_init_end       a load_state_dict pre-hook on the model: a checkpoint written after a
                      shrink resizes the model's tensors to the checkpoint's shapes (sizes
                      and config follow, as ``prunefx.transformers.from_pretrained`` does)
                      before the Trainer loads the weights and builds the optimizer (resume)
    on_train_begin    ``PruneTrain`` on the model, proximal mode, with the Trainer's
                      optimizer (AdamW's state is re-pointed and sliced at each shrink) and a
                      check that its LR scheduler steps that same optimizer; on resume the
                      lambda, channel layout and history come back from the checkpoint
    first forward     lambda from the first training loss (the model's ``loss`` output), or
                      ``lam=`` when given
    on_optimizer_step the lasso's proximal step, right after ``optimizer.step()`` (only at
                      gradient-accumulation boundaries, where the Trainer steps) and before
                      the LR scheduler's step, with the LR that step used
    on_step_end       every ``every_steps`` optimizer steps: shrink (``prunefx.train.shrink``)
    on_epoch_end      or every ``every_epochs`` epochs
    state()           lambda, the channel layout and the shrinks, in ``trainer_state.json``

A shrink runs after the optimizer and scheduler steps and ``zero_grad`` and before the
Trainer saves, so the checkpoint of a step that shrank holds the smaller model, whose config
carries the per-layer record ``prunefx.transformers.from_pretrained`` reloads it with. Resume
with a freshly built *original* model, the same callback, and
``trainer.train(resume_from_checkpoint=path)``.

One process only (no DDP, FSDP, DeepSpeed or ``torch_compile``): those are refused when the
Trainer is built. Only the proximal mode is offered: the Trainer computes the loss inside
``training_step``, where a callback cannot add the lasso to it.
"""

from __future__ import annotations

import base64
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from prunefx.errors import PruneFxError
from prunefx.provenance import LAYOUT_ATTR, layout_of
from prunefx.train.callback import PruneTrain, Reconfiguration
from prunefx.train.lasso import GroupLasso

__all__ = ["PruneTrainCallback"]

_HOOK_DICTS = frozenset(k for k in vars(nn.Module()) if "hook" in k)  # a module's hook registries


class PruneTrainCallback(TrainerCallback, ExportableState):
    """PruneTrain for the Trainer's model (a transformers ``PreTrainedModel``: heads and MLP
    channels) while ``Trainer.train`` trains it; see the module docstring.

    ``example_inputs``: a real batch of the model's positional inputs, e.g. ``(input_ids,)``
    (constant folds are measured on it, and it is what the model is traced with);
    ``example_kwargs``: its keyword inputs for every trace (default ``{"use_cache": False}``).
    Shrink every ``every_steps`` optimizer steps or every ``every_epochs`` epochs (give one);
    ``start_after`` and ``stop_after`` count in the same unit. ``ratio``, ``threshold``: as
    ``prunefx.train.PruneTrain``. ``lam``: the lasso's lambda (default: set from the first
    training loss, ``ratio`` of it). ``weighting``: ``"size"`` weighs each channel group by
    the square root of its number of weights (``prunefx.train.GroupLasso``), so heads and MLP
    channels go at the same pace and one lambda of order 1 suits AdamW; ``"uniform"`` (default)
    weighs every channel alike.
    """

    def __init__(
        self,
        example_inputs: Any,
        *,
        example_kwargs: Mapping[str, Any] | None = None,
        every_steps: int | None = None,
        every_epochs: int | None = None,
        ratio: float = 0.2,
        lam: float | None = None,
        weighting: str = "uniform",
        threshold: float = 1e-4,
        start_after: int = 0,
        stop_after: int | None = None,
        verbose: bool = False,
    ) -> None:
        if (every_steps is None) == (every_epochs is None):
            raise ValueError("give one of every_steps (shrink every N optimizer steps) or every_epochs")
        every = every_steps if every_steps is not None else every_epochs
        if every is None or every < 1:
            raise ValueError(f"every_steps / every_epochs is a count >= 1, got {every}")
        self.example_inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        self.example_kwargs = dict({"use_cache": False} if example_kwargs is None else example_kwargs)
        self.unit = "steps" if every_steps is not None else "epochs"
        if weighting not in ("uniform", "size"):
            raise ValueError(f'weighting is "uniform" or "size" (prunefx.train.GroupLasso), got {weighting!r}')
        self.every, self.ratio, self.lam, self.weighting, self.threshold = every, ratio, lam, weighting, threshold
        self.start_after, self.stop_after = start_after, stop_after
        self.verbose = verbose
        self.prunetrain: PruneTrain | None = None
        self.history: list[dict[str, Any]] = []
        self._model: Any = None
        self._hooks: list[Any] = []
        self._loss_hook: Any = None

    # ---------------------------------------------------------------- checkpoints

    def state(self) -> dict[str, Any]:
        """What ``trainer_state.json`` keeps of the callback. ``args``/``attributes`` stay
        empty: the callback restores itself (``restore_callback_states_from_checkpoint``,
        which rebuilds callbacks from JSON arguments, is refused)."""
        pt = self.prunetrain
        lam = pt.lasso.lam if pt is not None and pt.lasso is not None else None
        model = self._model() if self._model is not None else None
        layout = layout_of(model) if model is not None else None
        return {"args": {}, "attributes": {},
                "prunefx": {"lam": lam, "history": list(self.history), "layout": _encode(layout)}}

    def _fit_checkpoint(self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        """A load_state_dict pre-hook on the model: tensors whose checkpoint shape differs are
        resized to it (a bias a constant fold created is added), then the size attributes and
        the config follow the tensors. The channel layout comes back at ``on_train_begin``,
        from the Trainer state."""
        if prefix:
            return
        from prunefx.emit import update_size_attributes
        from prunefx.transformers import finish
        from prunefx.transformers.loading import resize

        own = module.state_dict(keep_vars=True)
        shapes = {k: list(v.shape) for k, v in state_dict.items()
                  if k in own and tuple(own[k].shape) != tuple(v.shape) and own[k].dim() == v.dim()}
        added = _add_folded_biases(module, state_dict, own)
        if not shapes and not added:
            return
        resize(module, shapes)
        update_size_attributes(module)
        finish(module)
        if hasattr(module, LAYOUT_ATTR):
            delattr(module, LAYOUT_ATTR)  # it was another layout's; on_train_begin sets the checkpoint's

    # ---------------------------------------------------------------- Trainer events

    def on_init_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        _check_args(args)
        if model is not None:
            self._watch(model)

    def _watch(self, model: nn.Module) -> None:
        if self._model is not None and self._model() is model:
            return
        self._model = weakref.ref(model)
        self._hooks.append(model.register_load_state_dict_pre_hook(_Hook(self._fit_checkpoint)))

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        _check_args(args)
        if model is None or optimizer is None:
            raise PruneFxError("PruneTrainCallback needs the Trainer's model and optimizer (transformers passes both "
                               "to callbacks from Trainer.train)")
        self._watch(model)  # a model_init model is built in train(), after on_init_end
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps the torch one
        held = getattr(lr_scheduler, "optimizer", None)
        if lr_scheduler is not None and held is not optimizer and held is not inner:
            raise PruneFxError(f"the Trainer's LR scheduler ({type(lr_scheduler).__name__}) steps another optimizer "
                               "than the Trainer's: it would keep scheduling the parameters a shrink replaces")
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        saved = saved.get("prunefx") if isinstance(saved, Mapping) else None
        if saved and saved.get("layout"):
            _restore_layout(model, _decode(saved["layout"]))
        self.history = list(saved.get("history", [])) if saved else []
        lasso = GroupLasso(model, self.example_inputs, ratio=self.ratio, example_kwargs=self.example_kwargs,
                           weighting=self.weighting)
        self.prunetrain = PruneTrain(
            model, inner, example_inputs=self.example_inputs, example_kwargs=self.example_kwargs, every=self.every,
            ratio=self.ratio, threshold=self.threshold, mode="proximal", start_after=self.start_after,
            stop_after=self.stop_after, lasso=lasso,
        )
        assert self.prunetrain.lasso is not None
        lam = saved.get("lam") if saved and saved.get("lam") is not None else self.lam
        self.prunetrain.lasso.lam = lam
        if lam is None:
            self._loss_hook = model.register_forward_hook(_Hook(self._first_loss))

    def _first_loss(self, module: nn.Module, args: Any, output: Any) -> None:
        """Lambda from the first training forward's loss (``ratio`` of it)."""
        pt = self.prunetrain
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if pt is None or pt.lasso is None or not module.training or not isinstance(loss, torch.Tensor):
            return
        with torch.no_grad():
            pt.lasso(loss.detach().float())
        self._loss_hook.remove()
        self._loss_hook = None

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        pt = self.prunetrain
        if pt is None:
            return
        if pt.lasso is not None and pt.lasso.lam is None:
            raise PruneFxError("PruneTrainCallback found no loss in the model's outputs to set lambda from (the Trainer "
                               "computed the loss outside the model: labels absent, compute_loss_func, label smoothing); "
                               "pass lam= to PruneTrainCallback")
        pt.after_step()

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if self.unit == "steps" and self.prunetrain is not None and self.prunetrain.due(state.global_step - 1):
            self._shrink(model, state)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        done = int(round(state.epoch or 0))
        if self.unit == "epochs" and self.prunetrain is not None and done >= 1 and self.prunetrain.due(done - 1):
            self._shrink(model, state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        if self.prunetrain is not None and self.prunetrain.boundary is not None:
            self.prunetrain.boundary.remove()

    # ---------------------------------------------------------------- the shrink

    def _shrink(self, model: nn.Module | None, state: Any) -> None:
        pt = self.prunetrain
        assert pt is not None
        if model is None or model is not pt.model:
            raise PruneFxError("the Trainer's model is not the one PruneTrainCallback was set up with (was trainer.model "
                               "replaced during training?)")
        training = model.training
        count = state.global_step if self.unit == "steps" else int(round(state.epoch or 0))
        small = pt.reconfigure(count - 1)
        event = pt.history[-1]
        if event.report.changed:
            _become(model, small)
        model.train(training)
        pt.model = model  # the same submodules and parameters as `small`, which the lasso holds
        self.history.append(_record(event, state))
        if self.verbose:
            print(f"step {state.global_step}: {event.report}")


class _Hook:
    """A hook on the model that calls a method of the callback. The module emitter deep-copies
    the model with its hooks: this one is shared by the copy, not copied with the callback
    (and all it holds); it holds the callback weakly, and a pickled model gets a hook that
    does nothing (the callback is not part of the model)."""

    def __init__(self, method: Any = None) -> None:
        self._method = None if method is None else weakref.WeakMethod(method)

    def __call__(self, *args: Any) -> Any:
        method = None if self._method is None else self._method()
        return None if method is None else method(*args)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Hook:
        return self

    def __reduce__(self) -> tuple[type[_Hook], tuple[()]]:
        return (_Hook, ())


def _check_args(args: Any) -> None:
    """What the callback cannot follow, refused when the Trainer is built."""
    why = None
    if getattr(args, "world_size", 1) > 1 or getattr(args, "n_gpu", 0) > 1:
        why = "more than one process or device (the wrapped model and its gradient buckets are not rebuilt)"
    elif getattr(args, "torch_compile", False):
        why = "torch_compile=True (the compiled module is not rebuilt)"
    elif getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        why = "DeepSpeed or FSDP"
    elif getattr(args, "restore_callback_states_from_checkpoint", False):
        why = ("restore_callback_states_from_checkpoint=True (it rebuilds callbacks from JSON arguments; this callback "
               "restores its own state on resume)")
    if why is not None:
        raise PruneFxError(f"PruneTrainCallback runs on one process without wrappers, not with {why}")


def _become(model: nn.Module, small: nn.Module) -> None:
    """``model`` takes ``small``'s submodules, parameters, buffers, config and layout (every
    attribute but its own hooks): the object the Trainer holds is now the smaller model."""
    vars(model).update({k: v for k, v in vars(small).items() if k not in _HOOK_DICTS})


def _add_folded_biases(model: nn.Module, state_dict: Mapping[str, Any], own: Mapping[str, Any]) -> bool:
    """A checkpoint key naming an empty parameter slot (``bias=False``) is a bias a constant
    fold created: the slot gets a zero parameter of its shape, as it had in training."""
    added = False
    for key, value in state_dict.items():
        owner, _, name = key.rpartition(".")
        if key in own or not isinstance(value, torch.Tensor):
            continue
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        if name in module._parameters and module._parameters[name] is None:
            like = next(module.parameters(), value)
            module._parameters[name] = nn.Parameter(torch.zeros(value.shape, dtype=like.dtype, device=like.device))
            added = True
    return added


def _restore_layout(model: nn.Module, layout: Mapping[str, Any]) -> None:
    """Put the checkpoint's channel layout on the resized model, checked against its shapes."""
    params = dict(model.state_dict(keep_vars=True))
    for name, entry in layout.get("tensors", {}).items():
        t = params.get(name)
        for dim, kept in (entry.get("kept") or {}).items():
            if kept is not None and (t is None or t.shape[dim] != len(kept)):
                have = None if t is None else tuple(t.shape)
                raise PruneFxError(f"the checkpoint's channel layout keeps {len(kept)} indices of '{name}' dim {dim}, the "
                                   f"model loaded from it holds {have}: the weights and trainer_state.json of the "
                                   "checkpoint come from different runs")
    setattr(model, LAYOUT_ATTR, dict(layout))


def _record(event: Reconfiguration, state: Any) -> dict[str, Any]:
    r = event.report
    return {"step": int(state.global_step), "epoch": float(state.epoch or 0.0), "changed": r.changed,
            "params": list(r.params), "channels": {k: list(v) for k, v in r.channels.items()}}


# The layout holds index tensors and int-keyed dicts; trainer_state.json is JSON: tensors go as
# base64 of their bytes (a large model's kept indices stay compact) and dicts with other than
# string keys as lists of pairs.
_TENSOR, _PAIRS = "__prunefx_tensor__", "__prunefx_pairs__"


def _encode(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        a = x.detach().cpu().contiguous().numpy()
        return {_TENSOR: base64.b64encode(a.tobytes()).decode("ascii"), "dtype": str(a.dtype), "shape": list(a.shape)}
    if isinstance(x, Mapping):
        if all(isinstance(k, str) for k in x):
            return {k: _encode(v) for k, v in x.items()}
        return {_PAIRS: [[k, _encode(v)] for k, v in x.items()]}
    if isinstance(x, (list, tuple)):
        return [_encode(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise PruneFxError(f"PruneTrainCallback cannot write a {type(x).__name__} of the channel layout to trainer_state.json")


def _decode(x: Any) -> Any:
    if isinstance(x, Mapping):
        if _TENSOR in x:
            a = np.frombuffer(base64.b64decode(x[_TENSOR]), dtype=np.dtype(x["dtype"])).reshape(x["shape"])
            return torch.from_numpy(a.copy())
        if _PAIRS in x:
            return {k: _decode(v) for k, v in x[_PAIRS]}
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v) for v in x]
    return x
