"""Misuse gets a clear error and changes nothing.

Bad masks raise ``prunefx.MaskError`` (from ``reconfigure`` and ``apply_mask`` alike), untraceable
models raise ``prunefx.TraceError``; every message names what is wrong and where, and after
every error the model's state_dict is bit-for-bit what it was (and an optimizer passed to
``reconfigure`` is untouched).
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunefx
from zoo import randomize_norms, state_copy


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return self.fc(y.mean((2, 3)))


X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def make() -> Net:
    torch.manual_seed(0)
    return randomize_norms(Net()).eval()


def bools(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Bit-for-bit: same keys, dtypes, shapes and bytes (so -0.0 != 0.0)."""
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        a.dtype == before[k].dtype and a.shape == before[k].shape and torch.equal(_bits(a), _bits(before[k]))
        for k, a in after.items()
    )


def _reconfigure(model, mask, **kw):
    return prunefx.reconfigure(model, mask, example_inputs=X, **kw)


def _apply_mask(model, mask, **kw):
    return prunefx.apply_mask(model, mask, example_inputs=X, **kw)



ENTRY_POINTS = pytest.mark.parametrize("fn", [_reconfigure, _apply_mask], ids=["reconfigure", "apply_mask"])


def raises_and_unchanged(fn, model, mask, match=None, **kw) -> str:
    """Call ``fn(model, mask)``; expect a MaskError; check the model is unchanged; return
    the message."""
    before = state_copy(model)
    with pytest.raises(prunefx.MaskError) as info:
        fn(model, mask, **kw)
    assert same_state(model, before), "the model changed although the call raised"
    msg = str(info.value)
    if match is not None:
        assert re.search(match, msg), msg
    return msg


# ---------------------------------------------------------------------------------------
# bad masks
# ---------------------------------------------------------------------------------------
@ENTRY_POINTS
@pytest.mark.parametrize("key", ["conv_1", "conv1.weight", "Conv1", "conv11"])
def test_unknown_key_suggests_close_names(fn, key):
    model = make()
    msg = raises_and_unchanged(fn, model, {key: torch.ones(12, dtype=torch.bool)})
    assert f"'{key}'" in msg
    assert "'conv1'" in msg and "did you mean" in msg.lower(), msg


@ENTRY_POINTS
def test_unknown_key_far_from_everything(fn):
    model = make()
    msg = raises_and_unchanged(fn, model, {"zzzz_nothing": torch.ones(12, dtype=torch.bool)})
    assert "zzzz_nothing" in msg


@ENTRY_POINTS
def test_wrong_length_names_group_and_size(fn):
    model = make()
    msg = raises_and_unchanged(fn, model, {"conv1": torch.ones(7, dtype=torch.bool)})
    assert "'conv1'" in msg and re.search(r"\b12\b", msg) and re.search(r"\b7\b", msg), msg


@ENTRY_POINTS
@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(torch.ones(12), id="float"),
        pytest.param(torch.ones(12, dtype=torch.long), id="long"),
        pytest.param(torch.ones(2, 6, dtype=torch.bool), id="2d"),
        pytest.param([1.0] * 12, id="list_of_float"),
    ],
)
def test_wrong_dtype_or_shape_names_group_and_size(fn, bad):
    model = make()
    msg = raises_and_unchanged(fn, model, {"conv1": bad})
    assert "'conv1'" in msg, msg
    assert re.search(r"\b12\b", msg), f"message does not state the group size 12: {msg}"


@ENTRY_POINTS
def test_wrong_dtype_is_a_mask_error_naming_the_group(fn):
    """The part of the dtype check that works today: a MaskError naming the key and bool."""
    model = make()
    msg = raises_and_unchanged(fn, model, {"conv1": torch.ones(12)})
    assert "'conv1'" in msg and "bool" in msg, msg


@ENTRY_POINTS
def test_all_false_mask(fn):
    model = make()
    msg = raises_and_unchanged(fn, model, {"conv2": torch.zeros(16, dtype=torch.bool)})
    assert "conv2" in msg and "every channel" in msg, msg


@ENTRY_POINTS
def test_all_false_through_two_keys(fn):
    """Two keys of one group that together keep nothing (union of two all-False)."""
    model = make()
    raises_and_unchanged(fn, model, {"conv2": torch.zeros(16, dtype=torch.bool), "bn2": torch.zeros(16, dtype=torch.bool)})


@ENTRY_POINTS
def test_pinned_group_cannot_lose_channels(fn):
    model = make()
    graph = prunefx.trace(model, X)
    fc = graph.group_of("fc")
    assert not fc.prunable and "model output" in fc.reason
    keep = torch.ones(10, dtype=torch.bool)
    keep[3] = False
    msg = raises_and_unchanged(fn, model, {"fc": keep})
    assert "fc" in msg and "pinned" in msg and "model output" in msg, msg


@ENTRY_POINTS
def test_pinned_group_all_true_is_fine(fn):
    model = make()
    before = state_copy(model)
    out = fn(model, {"fc": torch.ones(10, dtype=torch.bool)})
    assert same_state(model, before)  # keeping every channel zeroes nothing
    if fn is _reconfigure:
        with torch.no_grad():
            assert torch.allclose(out(X), model(X), atol=1e-6)


@ENTRY_POINTS
def test_pinned_input_channels_of_first_conv(fn):
    """conv1's input channels are the model input: pinned, addressed through its group name."""
    model = make()
    graph = prunefx.trace(model, X)
    pinned = [g for g in graph.groups if not g.prunable and any(n == "conv1.weight" and d == 1 for n, d, _ in g.members)]
    assert len(pinned) == 1 and pinned[0].size == 3
    raises_and_unchanged(fn, model, {pinned[0].name: bools(1, 0, 1)}, match="pinned")


@ENTRY_POINTS
def test_strict_policy_disagreement(fn):
    model = make()
    m1 = torch.arange(16) % 2 == 0
    m2 = torch.arange(16) < 8
    msg = raises_and_unchanged(fn, model, {"conv2": m1, "bn2": m2}, policy="strict")
    assert "conv2" in msg and "bn2" in msg and "strict" in msg, msg


@ENTRY_POINTS
def test_strict_policy_agreement_is_fine(fn):
    model = make()
    m = torch.arange(16) % 2 == 0
    fn(model, {"conv2": m, "bn2": m.clone()}, policy="strict")


def test_union_policy_keeps_the_union():
    model = make()
    m1 = torch.arange(16) % 2 == 0
    m2 = torch.arange(16) < 8
    union = (m1 | m2).nonzero().flatten()
    before = state_copy(model)
    small = prunefx.reconfigure(model, {"conv2": m1, "bn2": m2}, example_inputs=X, policy="union")
    assert same_state(model, before)
    assert small.conv2.out_channels == len(union) == 12
    assert torch.equal(small.conv2.weight, model.conv2.weight[union])
    assert torch.equal(small.bn2.running_mean, model.bn2.running_mean[union])
    assert torch.equal(small.fc.weight, model.fc.weight[:, union])
    # the default policy is union
    small2 = prunefx.reconfigure(model, {"conv2": m1, "bn2": m2}, example_inputs=X)
    assert torch.equal(small2.conv2.weight, small.conv2.weight)
    # apply_mask zeroes exactly the complement of the union
    prunefx.apply_mask(model, {"conv2": m1, "bn2": m2}, example_inputs=X)
    zero_rows = (model.conv2.weight.flatten(1) == 0).all(1)
    assert torch.equal(zero_rows, ~(m1 | m2))


@ENTRY_POINTS
def test_bad_policy(fn):
    model = make()
    raises_and_unchanged(fn, model, {"conv2": torch.ones(16, dtype=torch.bool)}, policy="intersection")


@ENTRY_POINTS
def test_error_in_second_key_changes_nothing(fn):
    """A valid first key does not leak: validation precedes every change."""
    model = make()
    mask = {"conv1": torch.arange(12) % 3 != 0, "conv2": torch.ones(5, dtype=torch.bool)}
    raises_and_unchanged(fn, model, mask)


def test_optimizer_untouched_on_error():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    model(X).square().mean().backward()
    opt.step()
    model.eval()
    params = [p for g in opt.param_groups for p in g["params"]]
    momenta = {id(p): opt.state[p]["momentum_buffer"].clone() for p in params}
    before = state_copy(model)
    with pytest.raises(prunefx.MaskError):
        prunefx.reconfigure(model, {"conv2": torch.zeros(16, dtype=torch.bool)}, example_inputs=X, optimizer=opt)
    assert same_state(model, before)
    assert [p for g in opt.param_groups for p in g["params"]] == params
    assert all(torch.equal(opt.state[p]["momentum_buffer"], momenta[id(p)]) for p in params)


# ---------------------------------------------------------------------------------------
# untraceable models
# ---------------------------------------------------------------------------------------
class DataDependentGate(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, c))

    def forward(self, x):
        if x.sum() > 0:
            return x * self.scale.view(1, -1, 1, 1)
        return x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.gate = DataDependentGate(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = self.gate(F.relu(self.bn1(self.conv1(x))))
        return self.conv3(F.relu(self.bn2(self.conv2(y))))


def make_gated() -> Gated:
    torch.manual_seed(0)
    return randomize_norms(Gated()).eval()


def _if_line() -> int:
    lines, start = inspect.getsourcelines(DataDependentGate.forward)
    return start + next(k for k, line in enumerate(lines) if "if x.sum() > 0" in line)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: prunefx.trace(m, X),
        lambda m: prunefx.reconfigure(m, {"conv2": torch.arange(12) < 6}, example_inputs=X),
        lambda m: prunefx.apply_mask(m, {"conv2": torch.arange(12) < 6}, example_inputs=X),
    ],
    ids=["trace", "reconfigure", "apply_mask"],
)
def test_data_dependent_control_flow_trace_error(call):
    model = make_gated()
    before = state_copy(model)
    with pytest.raises(prunefx.TraceError) as info:
        call(model)
    assert same_state(model, before)
    msg = str(info.value)
    assert "'gate'" in msg, f"the message does not name the module: {msg}"
    assert f"test_errors.py:{_if_line()}" in msg and "if x.sum() > 0" in msg, msg
    assert "leaf_modules" in msg and "concrete_args" in msg, msg
    assert isinstance(info.value, prunefx.PruneFxError)


class TopLevelIf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:
            y = y * 2
        return y


def test_data_dependent_control_flow_in_top_level_forward():
    model = TopLevelIf().eval()
    before = state_copy(model)
    with pytest.raises(prunefx.TraceError) as info:
        prunefx.trace(model, X)
    assert same_state(model, before)
    msg = str(info.value)
    lines, start = inspect.getsourcelines(TopLevelIf.forward)
    line = start + next(k for k, text in enumerate(lines) if "if y.mean() > 0" in text)
    assert "TopLevelIf" in msg and f"test_errors.py:{line}" in msg, msg
    assert "leaf_modules" in msg and "concrete_args" in msg, msg


@pytest.mark.parametrize("leaf", [DataDependentGate, "gate"], ids=["type", "name"])
def test_leaf_modules_make_it_traceable_with_pinned_channels(leaf):
    model = make_gated()
    graph = prunefx.trace(model, X, leaf_modules=[leaf])
    # the leaf's input: conv1/bn1's channels; its output: conv2's input channels
    into = graph.group_of("conv1")
    assert into is graph.group_of("bn1")
    assert not into.prunable and "gate" in into.reason, into.reason
    conv2_in = [g for g in graph.groups if any(n == "conv2.weight" and d == 1 for n, d, _ in g.members)]
    assert len(conv2_in) == 1 and not conv2_in[0].prunable
    assert "gate.scale" not in {n for g in graph.groups if g.prunable for n, _, _ in g.members}
    # everything else still prunes, exactly, and the leaf is carried over unchanged
    mid = graph.group_of("conv2")
    assert mid.prunable and mid.exact and mid.size == 12
    mask = {"conv2": torch.arange(12) % 3 != 1}
    before = state_copy(model)
    small = prunefx.reconfigure(model, mask, example_inputs=X, leaf_modules=[leaf])
    assert same_state(model, before)
    ref = randomize_norms(make_gated())
    ref.load_state_dict(model.state_dict())
    prunefx.apply_mask(ref, mask, example_inputs=X, leaf_modules=[leaf])
    with torch.no_grad():
        assert (small(X) - ref(X)).abs().max() <= 1e-4 * max(1.0, ref(X).abs().max())
    assert small.conv2.out_channels == 8
    assert torch.equal(small.gate.scale, model.gate.scale)
    # pruning the leaf's channels is refused, naming the leaf
    with pytest.raises(prunefx.MaskError, match="pinned"):
        prunefx.reconfigure(model, {"conv1": torch.arange(8) < 4}, example_inputs=X, leaf_modules=[leaf])
    assert same_state(model, before)


class Flagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x, double: bool = False):
        y = F.relu(self.conv1(x))
        if double:
            y = y * 2
        return self.conv2(y)


def test_python_flag_needs_concrete_args():
    model = Flagged().eval()
    before = state_copy(model)
    with pytest.raises(prunefx.TraceError) as info:
        prunefx.trace(model, X, frontend="fx")
    assert same_state(model, before)
    assert "concrete_args" in str(info.value) and "if double" in str(info.value), str(info.value)


def test_auto_falls_back_to_export_and_says_so():
    """fx cannot follow the Python flag; torch.export specialises it. "auto" says which ran."""
    model = Flagged().eval()
    with pytest.warns(UserWarning, match="captured with torch.export instead"):
        graph = prunefx.trace(model, X)
    assert graph.frontend == "export" and graph.group_of("conv1").prunable


def test_concrete_args_default_value():
    graph = prunefx.trace(Flagged().eval(), X, concrete_args={"double": False})
    assert graph.group_of("conv1").prunable


def test_concrete_args_non_default_value():
    """The remedy the TraceError names: fix a Python flag with concrete_args."""
    model = Flagged().eval()
    graph = prunefx.trace(model, X, concrete_args={"double": True})
    assert graph.group_of("conv1").prunable


def test_not_a_module():
    with pytest.raises(prunefx.TraceError, match="nn.Module"):
        prunefx.trace(lambda x: x, X)
