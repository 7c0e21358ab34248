"""The rest of the training loop's state through a shrink (prunefx.train.loop): a second
optimizer (state sliced exactly, compared with slicing by hand, over two shrinks), EMA copies
(AveragedModel and timm's ModelEmaV3), GradScaler, LR schedulers, the refusal in the middle of
gradient accumulation, and torch.compile. Each test fails if its object is left holding the
old parameters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import prunefx
from prunefx.train import PruneTrain, shrink
from prunefx.train.loop import StepBoundary

X = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(2))


def _cnn() -> nn.Sequential:
    """conv(3,6)-BN-ReLU-conv(6,8)-BN-ReLU-pool-Linear(8,4): groups "0" (6) and "3" (8)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def _kill(net: nn.Sequential, first: list[int], second: list[int], *, keep_shift: bool = False) -> None:
    """Channels of group "0" and "3" whose filters and BN scales are zero; with ``keep_shift``
    group "0"'s BN shift stays, so the channel is a constant relu(beta) that the shrink folds
    into the next BN's running mean."""
    with torch.no_grad():
        for conv, bn, idx in ((net[0], net[1], first), (net[3], net[4], second)):
            conv.weight[idx] = 0
            bn.weight[idx] = 0
            if not keep_shift or conv is not net[0]:
                bn.bias[idx] = 0
            else:
                bn.bias[idx] = 0.7


def _step(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    for o in optimizers:
        o.zero_grad()
    F.cross_entropy(model(X), Y).backward()
    for o in optimizers:
        o.step()


def _kept(size: int, dead: list[int]) -> torch.Tensor:
    return torch.tensor([i for i in range(size) if i not in dead])


def _by_hand(name: str, t: torch.Tensor, k0: torch.Tensor, k3: torch.Tensor) -> torch.Tensor:
    """The tensor of the original model named ``name`` sliced to the kept channels."""
    if name.startswith(("0.", "1.")):
        return t.index_select(0, k0)
    if name == "3.weight":
        return t.index_select(0, k3).index_select(1, k0)
    if name.startswith("4."):
        return t.index_select(0, k3) if t.dim() else t
    if name == "8.weight":
        return t.index_select(1, k3)
    return t


def test_two_optimizers_sliced_exactly_over_two_shrinks() -> None:
    """SGD (momentum) on the convolutions, Adam on the rest: the second optimizer follows by
    tensor name through the layouts, and both states equal slicing by hand, twice."""
    net = _cnn()
    convs = [net[0].weight, net[3].weight]
    rest = [p for p in net.parameters() if all(p is not q for q in convs)]
    sgd = torch.optim.SGD(convs, lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(rest, lr=0.01)
    for _ in range(2):
        _step(net, [sgd, adam])
    dead0, dead3 = [1, 4], [0, 5, 6]
    _kill(net, dead0, dead3)
    k0, k3 = _kept(6, dead0), _kept(8, dead3)
    names = {id(p): n for n, p in net.named_parameters()}
    want = {names[id(p)]: {k: _by_hand(names[id(p)], v, k0, k3) for k, v in o.state[p].items() if v.dim()}
            for o in (sgd, adam) for p in o.state}

    small, report = shrink(net, example_inputs=X, optimizer=[sgd, adam])
    assert report.changed and report.channels == {"0": (6, 4), "3": (8, 5)}
    params = dict(small.named_parameters())
    assert [id(p) for p in sgd.param_groups[0]["params"]] == [id(params["0.weight"]), id(params["3.weight"])]
    assert {id(p) for p in adam.param_groups[0]["params"]} == {id(p) for n, p in params.items() if n not in ("0.weight", "3.weight")}
    for opt in (sgd, adam):
        for p in opt.param_groups[0]["params"]:
            name = next(n for n, q in params.items() if q is p)
            for k, v in opt.state[p].items():
                if v.dim():
                    assert torch.equal(v, want[name][k]), (name, k)
    assert int(adam.state[params["8.weight"]]["step"]) == 2  # scalars carried over
    _step(small, [sgd, adam])  # trains on

    # a second shrink: the indices now come from two layouts (kept of the original model)
    with torch.no_grad():
        small.get_parameter("0.weight")[0] = 0
        small.get_parameter("1.weight")[0] = 0
        small.get_parameter("1.bias")[0] = 0
    m_sgd = sgd.state[small.get_parameter("3.weight")]["momentum_buffer"].clone()
    m_adam = adam.state[small.get_parameter("1.bias")]["exp_avg"].clone()
    smaller, report = shrink(small, example_inputs=X, optimizer=[sgd, adam])
    assert report.channels["0"] == (4, 3)
    assert torch.equal(sgd.state[smaller.get_parameter("3.weight")]["momentum_buffer"], m_sgd[:, 1:])
    assert torch.equal(adam.state[smaller.get_parameter("1.bias")]["exp_avg"], m_adam[1:])
    _step(smaller, [sgd, adam])


@pytest.mark.parametrize("kind", ["averaged", "timm"])
def test_ema_sliced_alike(kind: str) -> None:
    """An EMA equal to the model stays equal to it through a shrink that folds a constant
    (the fold's correction is applied to the averages too); an EMA that differs is sliced by
    hand's indices; averaging goes on against the new model."""
    net = _cnn()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    _step(net, [opt])
    net.train()
    _kill(net, [2], [3], keep_shift=True)
    if kind == "averaged":
        ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    else:
        import timm.utils.model_ema as timm_ema
        ema = timm_ema.ModelEmaV3(net, decay=0.5)
    ema.module.eval()
    small, report = shrink(net, example_inputs=X, optimizer=opt, ema=ema)
    assert report.changed and any(f.max_abs > 0 for f in report.fold.folds), "the test needs a folded constant"
    small.eval()
    assert torch.allclose(ema.module(X), small(X), atol=1e-6), "the folded constant must reach the EMA too"
    assert [p.shape for p in ema.module.parameters()] == [p.shape for p in small.parameters()]

    # an EMA that lags the model: its own values, sliced with the same indices
    small.train()
    lagging = {n: t.clone() for n, t in ema.module.state_dict().items()}
    _step(small, [opt])
    if kind == "averaged":
        ema.update_parameters(small)
    else:
        ema.update(small)
    with torch.no_grad():
        small.get_parameter("3.weight")[1] = 0
        small.get_parameter("4.weight")[1] = 0
        small.get_parameter("4.bias")[1] = 0
    averaged = {n: t.clone() for n, t in ema.module.state_dict().items()}
    assert not torch.equal(averaged["3.weight"], lagging["3.weight"])
    smaller, _ = shrink(small, example_inputs=X, optimizer=opt, ema=ema)
    got = ema.module.state_dict()
    assert torch.equal(got["3.weight"], averaged["3.weight"][[0, 2, 3, 4, 5, 6]])
    assert torch.equal(got["8.weight"], averaged["8.weight"][:, [0, 2, 3, 4, 5, 6]])
    assert all(p is not q for p in ema.module.parameters() for q in smaller.parameters())
    if kind == "averaged":
        ema.update_parameters(smaller)
        assert int(ema.n_averaged) == 2
    else:
        ema.update(smaller)


def test_gradscaler_semantics_unchanged() -> None:
    """A scaled step after the shrink is the unscaled step (power-of-two scale: exact), with
    the scale and growth tracker as they were; a shrink between unscale_ and update is refused."""
    net = _cnn()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    for _ in range(2):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(net(X), Y)).backward()
        scaler.step(opt)
        scaler.update()
    _kill(net, [0], [7])

    opt.zero_grad()
    scaler.scale(F.cross_entropy(net(X), Y)).backward()
    scaler.unscale_(opt)
    state = {k: v.clone() for k, v in opt.state[net[0].weight].items()}
    with pytest.raises(prunefx.PruneFxError, match="scaler.update") as err:
        shrink(net, example_inputs=X, optimizer=opt, scaler=scaler)
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, opt.state[net[0].weight][k]) for k, v in state.items()), "a refusal changes nothing"
    scaler.step(opt)
    scaler.update()
    _kill(net, [0], [7])

    scale, tracker = scaler.get_scale(), int(scaler._growth_tracker)
    small, _ = shrink(net, example_inputs=X, optimizer=opt, scaler=scaler)
    assert (scaler.get_scale(), int(scaler._growth_tracker)) == (scale, tracker)
    ref = copy.deepcopy(small)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict would share the buffers

    opt.zero_grad()
    scaler.scale(F.cross_entropy(small(X), Y)).backward()
    scaler.step(opt)
    scaler.update()
    _step(ref, [ref_opt])
    for (name, p), q in zip(small.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), name


def test_scheduler_same_object_keeps_stepping() -> None:
    """The scheduler goes on with its schedule, and the new parameters move by exactly the
    scheduled learning rate; a scheduler of an optimizer the shrink does not re-point is refused."""
    net = _cnn()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lrs = []
    for _ in range(2):
        _step(net, [opt])
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    _kill(net, [3], [1])

    stray = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), step_size=1)
    with pytest.raises(prunefx.PruneFxError, match="pass that optimizer"):
        shrink(net, example_inputs=X, optimizer=opt, schedulers=[stray])
    small, _ = shrink(net, example_inputs=X, optimizer=opt, schedulers=[sched])
    before = {n: p.detach().clone() for n, p in small.named_parameters()}
    _step(small, [opt])
    for n, p in small.named_parameters():
        assert torch.allclose(p, before[n] - lrs[-1] * p.grad, atol=1e-7), n
    sched.step()
    assert sched.get_last_lr()[0] == lrs[-1] * 0.5 == opt.param_groups[0]["lr"]
    assert sched.last_epoch == 3


def test_accumulation_refused_between_steps() -> None:
    """Gradients of one micro-batch wait for the step: a reconfiguration then is refused in one
    line and changes nothing; right after the step it goes through."""
    net = _cnn()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    pt = PruneTrain(net, opt, example_inputs=X, every=1, mode="proximal")
    _step(net, [opt])
    _kill(net, [5], [2])
    opt.zero_grad()
    F.cross_entropy(pt.model(X[:4]), Y[:4]).backward()  # micro-batch 1 of 2
    momentum = opt.state[net[0].weight]["momentum_buffer"].clone()
    with pytest.raises(prunefx.PruneFxError, match="gradient accumulation") as err:
        pt.reconfigure(0)
    assert "\n" not in str(err.value) and "holds a gradient no optimizer.step() has used" in str(err.value)
    assert pt.model is net and opt.param_groups[0]["params"][0] is net[0].weight
    assert torch.equal(opt.state[net[0].weight]["momentum_buffer"], momentum)
    F.cross_entropy(pt.model(X[4:]), Y[4:]).backward()  # micro-batch 2
    opt.step()
    _kill(net, [5], [2])
    small = pt.reconfigure(0)
    assert small is not net and pt.history[-1].report.changed

    # a plain shrink with its own boundary, and a zeroed gradient is no pending gradient
    boundary = StepBoundary(small, [opt])
    F.cross_entropy(small(X), Y).backward()
    with pytest.raises(prunefx.PruneFxError, match="gradient accumulation"):
        shrink(small, example_inputs=X, optimizer=opt, boundary=boundary)
    opt.zero_grad(set_to_none=True)
    boundary.check()
    boundary.remove()


def test_compiled_model_follows() -> None:
    """A torch.compile'd model comes back compiled alike, gives the eager result of the new
    model (and of the masked original), and trains the parameters the optimizer holds."""
    net = _cnn().eval()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    _kill(net, [0, 1], [4])
    reference = copy.deepcopy(net)(X)
    compiled = torch.compile(net, backend="aot_eager")
    compiled(X)
    small, report = shrink(compiled, example_inputs=X, optimizer=opt)
    assert report.changed and isinstance(small, type(compiled)) and small is not compiled
    assert small.dynamo_ctx is compiled.dynamo_ctx
    inner = small._orig_mod
    assert torch.allclose(small(X), inner(X), atol=1e-6) and torch.allclose(small(X), reference, atol=1e-5)
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in inner.parameters()}
    small.train()
    before = inner.get_parameter("0.weight").detach().clone()
    _step(small, [opt])
    assert not torch.equal(inner.get_parameter("0.weight"), before), "the optimizer must step the compiled module's parameters"

    pt = PruneTrain(torch.compile(_cnn(), backend="aot_eager"), torch.optim.SGD(_cnn().parameters(), lr=0.1), example_inputs=X)
    assert isinstance(pt.module, nn.Sequential)  # the lasso and the shrink see through the wrapper


def test_stale_ema_refused_before_anything_changes() -> None:
    """An EMA left behind by an earlier shrink (not passed to it) no longer matches the model:
    the next shrink refuses it before touching the model or the optimizer."""
    net = _cnn()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    _step(net, [opt])
    stale = AveragedModel(net)
    _kill(net, [0], [0])
    small, _ = shrink(net, example_inputs=X, optimizer=opt)
    _step(small, [opt])
    with torch.no_grad():
        for name in ("0.weight", "1.weight", "1.bias"):
            small.get_parameter(name)[1] = 0
    params = [p for g in opt.param_groups for p in g["params"]]
    with pytest.raises(prunefx.PruneFxError, match="left behind by an earlier shrink"):
        shrink(small, example_inputs=X, optimizer=opt, ema=stale)
    assert [p for g in opt.param_groups for p in g["params"]] == params
    assert small.get_parameter("1.weight").shape == (5,)


def test_folded_bias_joins_the_optimizer_in_module_order() -> None:
    """A constant fold that gives a bias-less layer a bias puts it right after that layer's
    weight in its param group: the optimizer's order is the model's, so its state_dict loads
    into an optimizer built afresh on the shrunk model (what a resumed Lightning run does)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 4, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    _step(net, [opt])
    with torch.no_grad():  # channel 2: a constant relu(0.7), folded into conv 3, which has no bias
        net[0].weight[2] = 0
        net[1].weight[2] = 0
        net[1].bias[2] = 0.7
    small, report = shrink(net, example_inputs=X, optimizer=opt)
    assert [n for n, _ in report.fold.new_parameters] == ["3.bias"]
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in small.parameters()]
    fresh = torch.optim.SGD(small.parameters(), lr=0.1, momentum=0.9)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in small.parameters():
        if p in opt.state:
            assert fresh.state[p]["momentum_buffer"].shape == p.shape
    _step(small, [fresh])


def test_inductor_compiles_the_shrunk_model() -> None:
    """The default backend (inductor) compiles the shrunk model; same outputs as eager."""
    net = _cnn().eval()
    _kill(net, [0, 3], [2])
    compiled = torch.compile(net)
    with torch.no_grad():
        compiled(X)
        small, _ = shrink(compiled, example_inputs=X)
        assert torch.allclose(small(X), small._orig_mod(X), atol=1e-5)


def test_folded_bias_is_recorded_against_the_original_model() -> None:
    """A bias a fold creates after an earlier shrink pruned its layer is recorded like the
    layer's weight (original size, original indices), so a checkpoint rebuilds from a fresh
    original model (``load_state_dict`` gives a copy of it the bias); a third shrink composes."""
    from prunefx.train.fold import add_folded_biases

    def make() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                             nn.Conv2d(6, 4, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))

    net = make()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    _step(net, [opt])
    with torch.no_grad():
        net[3].weight[0] = 0  # shrink 1: output 0 of conv 3 is dead (no bias, no BN: exactly zero)
    small, report = shrink(net, example_inputs=X, optimizer=opt)
    assert report.channels["3"] == (4, 3)
    _step(small, [opt])
    with torch.no_grad():  # shrink 2: channel 2 of group "0" becomes relu(0.7), folded into a new bias of conv 3
        small.get_parameter("0.weight")[2] = 0
        small.get_parameter("1.weight")[2] = 0
        small.get_parameter("1.bias")[2] = 0.7
    smaller, report = shrink(small, example_inputs=X, optimizer=opt)
    assert [n for n, _ in report.fold.new_parameters] == ["3.bias"]
    entry = prunefx.provenance.layout_of(smaller)["tensors"]["3.bias"]
    assert entry["shape"] == [4] and entry["kept"][0].tolist() == [1, 2, 3]

    for model in (smaller, shrink(smaller, {"3": torch.tensor([True, False, True])}, example_inputs=X, optimizer=opt)[0]):
        state = prunefx.state_dict(model)
        fresh = make()
        rebuilt = prunefx.load_state_dict(fresh, state)  # gives a copy of fresh the folded bias
        assert fresh[3].bias is None
        assert add_folded_biases(fresh, state["prunefx"]) == ["3.bias"]  # what it adds
        model.eval(), rebuilt.eval()
        assert torch.equal(rebuilt(X), model(X))
