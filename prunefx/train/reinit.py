"""``reinit``: re-initialise a (reconfigured) model in place, to train its architecture from scratch.

Liu et al., "Rethinking the Value of Network Pruning" (ICLR 2019): the architecture a pruning
method finds, trained from a fresh initialisation for the same compute, is the baseline a
pruned-and-fine-tuned model has to beat. ``reinit`` gives that fresh initialisation.

The rule, one module at a time, children before their parents (the order a constructor runs):

- a module with ``reset_parameters()`` (Conv*, Linear, BatchNorm* incl. running stats, LayerNorm,
  GroupNorm, Embedding, PReLU, ...) or ``_reset_parameters()`` (``torch.nn.MultiheadAttention``,
  ``torch.nn.Transformer``) calls it: its own parameters and buffers are re-initialised;
- ``prunefx.nn.MultiheadAttention`` (the head-pruned attention reconfigure emits) gets what
  ``torch.nn.MultiheadAttention._reset_parameters`` does: ``xavier_uniform_`` on
  ``in_proj_weight``, zeros on ``in_proj_bias`` and ``out_proj.bias``;
- a parameter owned by a module with no reset method (torchvision ViT's ``class_token`` and
  ``pos_embedding``, Swin's ``relative_position_bias_table``, ConvNeXt's ``layer_scale``) cannot
  be re-initialised generically: it goes to the ``init(name, tensor)`` hook if one is given
  (the hook edits ``tensor`` in place; returning ``False`` declines it), otherwise it is left
  unchanged, listed in ``ReinitReport.untouched`` and named in one ``warnings.warn``;
- a buffer owned by a module with no reset method (Swin's ``relative_position_index``, the
  ``kept_heads`` of ``prunefx.nn.MultiheadAttention``) is structure, not learnt state: it is
  kept as is and listed in ``ReinitReport.kept_buffers``, without a warning.

What is *not* reproduced: the custom scheme a model's constructor applies after building its
layers (torchvision ResNet's ``kaiming_normal_(mode="fan_out")`` on convs, ViT's truncated
normal on ``conv_proj``, zero-initialised heads): ``reinit`` gives the initialisation torch.nn's
modules define. Apply a constructor's scheme afterwards with a loop over ``model.modules()``.

The model is modified in place (same tensor objects, shapes, devices and dtypes), under
``torch.no_grad()``. An optimizer's state (momentum, Adam moments, step counts) belongs to the
old training run: build a fresh optimizer (and scheduler) for the re-initialised model.

Example::

    >>> import torch, torchvision, prunefx
    >>> from prunefx.train.reinit import reinit
    >>> model = torchvision.models.resnet18()
    >>> small = prunefx.reconfigure(model, {"layer1.0.conv1": torch.arange(64) % 2 == 0},
    ...                             example_inputs=torch.randn(1, 3, 32, 32))
    >>> report = reinit(small, seed=0)
    >>> report.untouched
    ()
    >>> "layer1.0.bn1" in report.modules
    True
    >>> optimizer = torch.optim.SGD(small.parameters(), lr=0.1, momentum=0.9)  # a fresh one
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from prunefx.nn import MultiheadAttention as PrunedMultiheadAttention

__all__ = ["reinit", "ReinitReport"]

InitHook = Callable[[str, torch.Tensor], "bool | None"]


@dataclass(frozen=True)
class ReinitReport:
    """What ``reinit`` did, by qualified name.

    ``modules``: modules whose reset ran (their own parameters and buffers are fresh).
    ``custom``: parameters the ``init`` hook re-initialised.
    ``untouched``: parameters nobody could re-initialise; they keep their trained values.
    ``kept_buffers``: buffers of modules with no reset method (structural constants), kept.
    """

    modules: tuple[str, ...]
    custom: tuple[str, ...]
    untouched: tuple[str, ...]
    kept_buffers: tuple[str, ...]


def reinit(model: nn.Module, *, seed: int | None = None, init: InitHook | None = None) -> ReinitReport:
    """Re-initialise every parameter and buffer of ``model`` in place; see the module docstring.

    ``seed``: draw from a generator seeded with it, leaving the global RNG state (CPU and the
    CUDA devices the model lives on) as it was; ``None`` draws from the global RNG.
    ``init(name, tensor)``: called, under ``torch.no_grad()``, for each parameter owned by a
    module with no reset method; it must fill ``tensor`` in place and may return ``False`` to
    leave it untouched. Build a fresh optimizer afterwards: the old one's state is stale.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"reinit expects an nn.Module, got {type(model).__name__}")
    _refuse_lazy(model)
    with _seeded(model, seed), torch.no_grad():
        report = _reinit(model, init)
    if report.untouched:
        warnings.warn(
            f"reinit left {len(report.untouched)} parameter(s) with their current values because "
            f"their modules have no reset method: {', '.join(report.untouched)}. Pass "
            "init=lambda name, t: ... to re-initialise them (e.g. torch.nn.init.trunc_normal_(t, std=0.02)).",
            stacklevel=2,
        )
    return report


def _reinit(model: nn.Module, init: InitHook | None) -> ReinitReport:
    modules: list[str] = []
    custom: list[str] = []
    untouched: list[str] = []
    kept_buffers: list[str] = []
    # reversed pre-order: every module after all of its descendants, as in a constructor,
    # so a parent's reset (MultiheadAttention zeroing out_proj.bias) has the last word
    for prefix, module in reversed(list(model.named_modules(remove_duplicate=True))):
        reset = _reset_of(module)
        if reset is not None:
            reset()
            modules.append(prefix)
            kept_buffers.extend(_join(prefix, n) for n in _STRUCTURAL_BUFFERS.get(type(module), ()))
            continue
        kept_buffers.extend(_join(prefix, n) for n, b in module._buffers.items() if b is not None)
        for n, p in module._parameters.items():
            if p is None:
                continue
            name = _join(prefix, n)
            if init is not None and init(name, p) is not False:
                custom.append(name)
            else:
                untouched.append(name)
    # back to model order, as named_parameters lists them
    return ReinitReport(tuple(reversed(modules)), _ordered(custom, model), _ordered(untouched, model), _ordered(kept_buffers, model))


# buffers a reset leaves alone because they describe the structure, not learnt state
_STRUCTURAL_BUFFERS: dict[type, tuple[str, ...]] = {PrunedMultiheadAttention: ("kept_heads",)}


def _reset_of(module: nn.Module) -> Callable[[], None] | None:
    """The zero-argument method that re-initialises ``module``'s own tensors, if any."""
    if isinstance(module, PrunedMultiheadAttention):
        return lambda: _reset_pruned_attention(module)
    for attr in ("reset_parameters", "_reset_parameters"):
        fn = getattr(module, attr, None)
        if callable(fn):
            return fn
    return None


def _reset_pruned_attention(m: PrunedMultiheadAttention) -> None:
    # what torch.nn.MultiheadAttention._reset_parameters does with the same parameter names
    nn.init.xavier_uniform_(m.in_proj_weight)
    if m.in_proj_bias is not None:
        nn.init.zeros_(m.in_proj_bias)
    if m.out_proj.bias is not None:
        nn.init.zeros_(m.out_proj.bias)


def _refuse_lazy(model: nn.Module) -> None:
    from torch.nn.modules.lazy import LazyModuleMixin

    for name, m in model.named_modules():
        if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(
                f"module '{name or type(m).__name__}' has uninitialized (lazy) parameters: "
                "run one forward pass before reinit so their shapes are known"
            )


@contextlib.contextmanager
def _seeded(model: nn.Module, seed: int | None) -> Iterator[None]:
    """Seed the generators of the model's devices inside a fork of the global RNG state."""
    if seed is None:
        yield
        return
    cuda = sorted({t.device.index or 0 for t in _tensors(model) if t.device.type == "cuda"})
    others = sorted({t.device.type for t in _tensors(model)} - {"cpu", "cuda", "meta"})
    if others:
        raise ValueError(f"reinit(seed=...) supports CPU and CUDA tensors; the model has tensors on {others}: pass seed=None")
    # fork_rng only restores the devices it is given; seed only those (torch.manual_seed
    # would also seed, lazily, CUDA devices the model does not use)
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _order_in(model: nn.Module) -> Callable[[str], int]:
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    position = {n: i for i, n in enumerate(names)}
    return lambda name: position.get(name, len(position))


def _ordered(names: list[str], model: nn.Module) -> tuple[str, ...]:
    return tuple(sorted(names, key=_order_in(model)))
