"""prunefx.fsdp: reconfiguring an FSDP2 (``fully_shard``) model during training, two ranks
(``torch.multiprocessing.spawn``, gloo, CPU), and the FSDP example run with torchrun.

The two-rank test checks, on both ranks:
- ``reconfigure_fsdp`` with a mask that does not fit: a MaskError on both ranks, the optimizer
  untouched;
- ``reconfigure_fsdp`` with rank 0's mask: the gathered parameters and buffers of the new
  model equal (bitwise) ``prunefx.reconfigure`` of a single-process copy with the same mask;
  every AdamW state (exp_avg, exp_avg_sq: DTensors) equals the gathered old state sliced by
  hand with the kept indices, ``step`` is kept; each unit keeps its mesh, its
  ``MixedPrecisionPolicy`` and its ``reshard_after_forward``; training goes on;
- the same on a torchvision ResNet-18 with one unit per residual block: residual-stream
  groups span the units, and every block unit is rebuilt (as the list of its called layers);
- ``PruneTrain(mode="proximal")`` on the sharded model shrinks twice during training; after
  each shrink the gathered parameters and AdamW state equal ``prunefx.train.shrink`` of a
  single-process copy (with a plain AdamW holding the gathered state); the loss falls;
- after every shrink, the gathered parameters, buffers and optimizer state are identical on
  both ranks (a digest compared across ranks);
- the refusals are one-line errors: masks differing across ranks (``src=None``), an HSDP
  (2-D) mesh, a ``shard_placement_fn`` other than ``Shard(0)``, a model caught unsharded
  between forward and backward, PruneTrain's penalty mode, a PruneTrain shrink in the middle
  of gradient accumulation.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import prunefx
from prunefx.fsdp import fsdp_units, gather, reconfigure_fsdp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2


def test_reconfigure_fsdp_needs_an_initialised_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(prunefx.DistributedError, match="init_process_group"):
        reconfigure_fsdp(nn.Linear(2, 2), {})


def test_reconfigure_fsdp_refuses_a_module_that_is_not_sharded(tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with pytest.raises(prunefx.DistributedError, match="fully_shard") as info:
            reconfigure_fsdp(nn.Linear(2, 2), {})
        assert "\n" not in str(info.value)
    finally:
        dist.destroy_process_group()


def test_fsdp_two_ranks(tmp_path) -> None:
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert results[0] == results[1]  # every number the ranks report (all-reduced) agrees
    r = results[0]
    assert r["shrinks"] >= 2, r
    assert r["params"][0] > r["params"][1] > r["params"][2], r
    assert r["loss_last"] < 0.9 * r["loss_first"], r
    assert r["resnet_params"][1] < 0.5 * r["resnet_params"][0], r


def test_fsdp_example_two_processes() -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "examples/fsdp_prunetrain.py", "--smoke"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, f"exit code {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{proc.stderr[-5000:]}"
    shrinks = re.findall(r"shrink at epoch \d+: params ([\d,]+) -> ([\d,]+).*identical on all 2 ranks", out)
    assert len(shrinks) >= 2, out
    for before, after in shrinks:
        assert int(after.replace(",", "")) < int(before.replace(",", ""))
    losses = re.search(r"loss ([\d.]+) -> ([\d.]+)", out)
    assert losses and float(losses.group(2)) < float(losses.group(1)), out


# --- the two-rank worker ------------------------------------------------------------------------


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU()),
        nn.Sequential(nn.Conv2d(12, 10, 3, padding=1), nn.ReLU()),  # no BatchNorm: it runs in bf16 in the first check
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 4),
    )
    with torch.no_grad():  # channels of graded strength, as in a trained network: the weak ones die first
        for block in net[:2]:
            ramp = torch.linspace(0.02, 1.0, block[0].out_channels)
            block[0].weight.mul_(ramp.view(-1, 1, 1, 1))
            block[0].bias.mul_(ramp)
        net[0][1].weight.copy_(torch.linspace(0.02, 1.0, 12))
        net[1][0].weight.mul_(torch.linspace(0.02, 1.0, 12).view(1, -1, 1, 1))  # and their readers alike
        net[4].weight.mul_(torch.linspace(0.02, 1.0, 10).view(1, -1))
    return net


def _data(rank: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.randn(4, 3, 8, 8, generator=gen)
    gen.manual_seed(1 + rank)  # each rank its own shard
    out = []
    for _ in range(steps):
        y = torch.randint(0, 4, (16,), generator=gen)
        out.append((prototypes[y] + 0.5 * torch.randn(16, 3, 8, 8, generator=gen), y))
    return out


def _shard(net: nn.Module, mp_policy=None, reshard_after_forward=None) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    fully_shard(net[0], reshard_after_forward=reshard_after_forward)
    fully_shard(net[1], mp_policy=mp_policy or MixedPrecisionPolicy())
    fully_shard(net)
    return net


def _full_state(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer's state by parameter name, DTensors gathered."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in st.items()}
            for p, st in opt.state.items() if id(p) in names}


def _plain_adamw(plain: nn.Module, state: dict[str, dict[str, torch.Tensor]], lr: float) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(plain.parameters(), lr=lr)
    for n, p in plain.named_parameters():
        opt.state[p] = {k: v.clone() for k, v in state[n].items()}
    return opt


def _digest(model: nn.Module, opt: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    plain = gather(model)
    for name, t in (*plain.named_parameters(), *plain.named_buffers()):
        h.update(name.encode() + t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    for name, st in sorted(_full_state(opt, model).items()):
        for k, v in sorted(st.items()):
            h.update(f"{name}.{k}".encode() + v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _identical_on_all_ranks(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    digests: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, _digest(model, opt))
    assert len(set(digests)) == 1, f"ranks differ after a shrink: {digests}"


def _equal_to(model: nn.Module, opt: torch.optim.Optimizer, ref: nn.Module, ref_opt: torch.optim.Optimizer) -> None:
    """The sharded model and optimizer, gathered, equal the single-process ones bitwise."""
    got = gather(model)
    want = dict((*ref.named_parameters(), *ref.named_buffers()))
    have = dict((*got.named_parameters(), *got.named_buffers()))
    assert have.keys() == want.keys(), (sorted(have), sorted(want))
    for n, t in have.items():
        assert torch.equal(t, want[n]), f"'{n}' differs from the single-process result"
    state, ref_state = _full_state(opt, model), _full_state(ref_opt, ref)
    assert state.keys() == ref_state.keys()
    for n, st in state.items():
        for k, v in st.items():
            assert torch.equal(v, ref_state[n][k]), f"AdamW '{k}' of '{n}' differs from the single-process result"


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches, pt=None) -> list[float]:
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        (pt.regularize(loss) if pt is not None else loss).backward()
        opt.step()
        if pt is not None:
            pt.after_step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())
    return losses


def _one_line(e: BaseException, pattern: str) -> None:
    assert isinstance(e, prunefx.PruneFxError) and "\n" not in str(e) and re.search(pattern, str(e)), repr(e)


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        result = {**_check_reconfigure_fsdp(rank), **_check_resnet(rank), **_check_prunetrain(rank)}
        _check_refusals(rank)
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        gc.collect()  # the checks' sharded models hold the group: freed now, not at interpreter exit
        dist.barrier()  # neither rank tears gloo down while the other is still in a collective
    finally:
        dist.destroy_process_group()


def _check_reconfigure_fsdp(rank: int) -> dict[str, object]:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32)
    model = _shard(_net(), mixed, reshard_after_forward=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = _data(rank, 6)
    _train(model, opt, batches[:3])
    x = batches[0][0]
    held_before = [list(g["params"]) for g in opt.param_groups]
    with pytest.raises(prunefx.MaskError):  # a mask that does not fit fails on every rank, and changes nothing
        reconfigure_fsdp(model, {"0.0": torch.ones(5, dtype=torch.bool)} if rank == 0 else None, example_inputs=x, optimizer=opt)
    assert [list(g["params"]) for g in opt.param_groups] == held_before
    before_state, before = _full_state(opt, model), gather(model)
    a = torch.tensor([i % 3 != 1 for i in range(12)])  # block 0 keeps 8 of 12 channels
    b = torch.tensor([i not in (2, 7) for i in range(10)])  # block 1 keeps 8 of 10
    mask = {"0.0": a, "1.0": b} if rank == 0 else None  # decided on rank 0, broadcast

    small = reconfigure_fsdp(model, mask, example_inputs=x, optimizer=opt)

    ref_opt = _plain_adamw(before, before_state, 1e-2)
    ref = prunefx.reconfigure(before, {"0.0": a, "1.0": b}, example_inputs=x, optimizer=ref_opt)
    _equal_to(small, opt, ref, ref_opt)
    by_hand = {"0.0.weight": {0: a}, "0.0.bias": {0: a}, "0.1.weight": {0: a}, "0.1.bias": {0: a},
               "1.0.weight": {0: b, 1: a}, "1.0.bias": {0: b},
               "4.weight": {1: b}, "4.bias": {}}
    state = _full_state(opt, small)
    assert state.keys() == by_hand.keys()
    for name, dims in by_hand.items():
        for k in ("exp_avg", "exp_avg_sq"):
            want = before_state[name][k]
            for d, keep in dims.items():
                want = want.index_select(d, keep.nonzero().flatten())
            assert torch.equal(state[name][k], want), f"{k} of {name} is not the old state sliced by hand"
        assert torch.equal(state[name]["step"], before_state[name]["step"])
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in small.parameters()} and all(type(p).__name__ == "DTensor" for p in small.parameters())
    units = {u.names: u for u in fsdp_units(small)}
    assert set(units) == {("",), ("0.0", "0.1"), ("1.0",)}, units  # a block becomes the list of its layers
    assert units[("1.0",)].mp_policy == mixed and units[("0.0", "0.1")].mp_policy.param_dtype is None
    assert units[("0.0", "0.1")].reshard_after_forward is False and units[("1.0",)].reshard_after_forward is None
    _identical_on_all_ranks(small, opt)
    after = _train(small, opt, batches[3:])
    assert all(torch.isfinite(torch.tensor(after)))
    return {}


def _check_resnet(rank: int) -> dict[str, object]:
    import torchvision
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank)), torch.tensor([0, 3])
    _train(model, opt, [(x, y)])
    before_state, before = _full_state(opt, model), gather(model)
    mask = prunefx.masks.random(prunefx.trace(before, x), 0.4, seed=1)  # the same on every rank: src=None checks it

    small = reconfigure_fsdp(model, mask, example_inputs=x, optimizer=opt, src=None)

    x0 = [x]
    dist.broadcast_object_list(x0, src=0)  # constants are folded on rank 0's inputs
    ref_opt = _plain_adamw(before, before_state, 1e-3)
    ref = prunefx.reconfigure(before, mask, example_inputs=x0[0], optimizer=ref_opt)
    _equal_to(small, opt, ref, ref_opt)
    _identical_on_all_ranks(small, opt)
    assert len(fsdp_units(small)) == 9  # the root and eight blocks
    _train(small, opt, [(x, y)])
    return {"resnet_params": [sum(p.numel() for p in model.parameters()), sum(p.numel() for p in small.parameters())]}


def _check_prunetrain(rank: int) -> dict[str, object]:
    from prunefx.train import GroupLasso, PruneTrain, shrink

    model = _shard(_net())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    batches = _data(rank, 8)  # an epoch
    x = _data(0, 1)[0][0]  # the same example batch on every rank
    pt = PruneTrain(model, opt, example_inputs=x, every=1, ratio=0.95, mode="proximal")
    params = [sum(p.numel() for p in model.parameters())]
    losses: list[float] = []
    for epoch in range(6):
        losses += _train(pt.model, opt, batches, pt)
        before_state, before = _full_state(opt, pt.model), gather(pt.model)
        norms, plain = pt.lasso.channel_norms(), GroupLasso(before, x).channel_norms()  # the lasso summed over shards
        assert norms.keys() == plain.keys() and all(torch.allclose(norms[k], plain[k], rtol=1e-9, atol=1e-12) for k in norms)
        pt.epoch_end(epoch)
        if not pt.history[-1].report.changed:
            continue
        ref_opt = _plain_adamw(before, before_state, 3e-2)
        ref, report = shrink(before, example_inputs=x, optimizer=ref_opt, threshold=pt.threshold)
        assert report.changed and report.channels == pt.history[-1].report.channels
        _equal_to(pt.model, opt, ref, ref_opt)
        _identical_on_all_ranks(pt.model, opt)
        params.append(sum(p.numel() for p in pt.model.parameters()))
    shrinks = sum(h.report.changed for h in pt.history)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    return {"shrinks": shrinks, "params": params, "loss_first": round(first, 6), "loss_last": round(last, 6)}


def _check_refusals(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from prunefx.train import PruneTrain

    x = torch.randn(2, 3, 8, 8)
    model = _shard(_net())
    opt = torch.optim.AdamW(model.parameters())
    keep = torch.tensor([i != rank for i in range(12)])  # each rank a different mask
    with pytest.raises(prunefx.DistributedError) as info:
        reconfigure_fsdp(model, {"0.0": keep}, example_inputs=x, optimizer=opt, src=None)
    _one_line(info.value, "differ across ranks")

    with pytest.raises(prunefx.PruneFxError) as info:
        PruneTrain(model, opt, example_inputs=x, mode="penalty")
    _one_line(info.value, "mode='proximal'")

    pt = PruneTrain(model, opt, example_inputs=x, mode="proximal")
    pt.model(x).sum().backward()  # gradients no optimizer.step() has used: the shrink waits for the step
    with pytest.raises(prunefx.PruneFxError) as info:
        pt.reconfigure()
    _one_line(info.value, "gradient accumulation")
    opt.zero_grad()

    hsdp = _net()
    fully_shard(hsdp, mesh=init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard")))
    with pytest.raises(prunefx.DistributedError) as info:
        reconfigure_fsdp(hsdp, {"0.0": torch.ones(12, dtype=torch.bool)}, example_inputs=x)
    _one_line(info.value, "HSDP")

    lin = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    fully_shard(lin, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else None)
    with pytest.raises(prunefx.DistributedError) as info:
        reconfigure_fsdp(lin, {"0": torch.ones(6, dtype=torch.bool)}, example_inputs=torch.randn(2, 4))
    _one_line(info.value, r"Shard\(dim=1\)")

    eager = copy.deepcopy(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)))
    fully_shard(eager, reshard_after_forward=False)
    eager(torch.randn(2, 4)).sum()  # forward without backward: the parameters stay unsharded
    with pytest.raises(prunefx.DistributedError) as info:
        reconfigure_fsdp(eager, {"0": torch.ones(6, dtype=torch.bool)}, example_inputs=torch.randn(2, 4))
    _one_line(info.value, "unsharded")
    eager.reshard()
