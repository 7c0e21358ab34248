"""A stand-in GPU for tests on a machine without one.

Tensors of a ``FakeTensorMode`` on ``"cuda"`` carry a device, a dtype and a shape but no data,
and every op on them checks its inputs' devices as CUDA does: an op that mixes a CUDA tensor
with a CPU one (an index built on the CPU, a factory op that names the CPU, a constant left
on the CPU by ``model.to("cuda")``) raises ``FakeTensorDeviceMismatchError``. No CUDA runtime
is needed. What such a run cannot show is anything that reads values (a comparison of two
outputs, ``.item()``): masks are made from the real model first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

__all__ = ["FakeTensorMode", "fake_gpu_copy", "fake_gpu_input", "devices_of", "as_numpy"]


def fake_gpu_copy(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """``model`` moved to the fake GPU, as ``model.to("cuda")`` would on a real one: its
    parameters and buffers (tied tensors stay tied), nothing else. The model is changed in
    place and returned: build a fresh one for this."""
    moved: dict[int, torch.Tensor] = {}
    for m in model.modules():
        for kind in ("_parameters", "_buffers"):
            table = getattr(m, kind)
            for name, t in table.items():
                if t is None:
                    continue
                if id(t) not in moved:
                    moved[id(t)] = _moved(t, mode)
                table[name] = moved[id(t)]
    return model


def _moved(t: torch.Tensor, mode: FakeTensorMode) -> torch.Tensor:
    fake = mode.from_tensor(t.detach())
    with mode:
        fake = fake.to("cuda")
    return nn.Parameter(fake, t.requires_grad) if isinstance(t, nn.Parameter) else fake


def fake_gpu_input(x: Any, mode: FakeTensorMode) -> Any:
    """Every tensor of ``x`` (nested) on the fake GPU."""
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: _moved(t, mode), x)


def devices_of(model: nn.Module) -> set[str]:
    """The device of every parameter, buffer and tensor attribute of ``model`` (tensors a
    module holds outside its parameters and buffers, which ``.to()`` would not move)."""
    found = {str(t.device) for t in [*model.parameters(), *model.buffers()]}
    for m in model.modules():
        found |= {str(v.device) for v in vars(m).values() if isinstance(v, torch.Tensor)}
    return found


def as_numpy(mask: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A mask made on the CPU model, as NumPy arrays (read without a tensor op, so it can be
    passed to the fake-GPU model)."""
    return {k: v.detach().cpu().numpy() for k, v in mask.items()}
