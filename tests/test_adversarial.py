"""Adversarial cases: bad input and injected faults, one test id per case.

Every case ends in one of two ways: a ``PruneFxError`` (or, on the command line, one line on
stderr and exit status 1) that names what is wrong and where, with the input model, the
optimizer and the files on disk exactly as before; or a correct result, checked against
``prunefx.apply_mask`` on a copy with randomised norm statistics. Never a silent wrong
result, a half-done change or a raw ``RuntimeError``/``KeyError``/``TypeError`` traceback.

Sections: command line; checkpoints; ONNX export; ``torch.return_types``; error text;
failing traces leave the model alone; masks: values and keys (meta and sparse masks, a
module shared by several call sites); mask sources' options; hooks (of the model, of traced
and of leaf modules: kept, pinned or refused, per ``prunefx.guards``) and a ``forward`` set
on an instance; custom autograd Functions; re-parametrised weights; optimizer state
(Adafactor's factored moments); a ``graph=`` traced from another instance.
"""

from __future__ import annotations

import copy
import functools
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunefx
from zoo import max_rel_diff, randomize_norms, state_copy

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    """conv-bn-relu twice, a pooled classifier: three prunable groups, all exact."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return self.fc(y.mean((2, 3)))


def make() -> Net:
    torch.manual_seed(0)
    return randomize_norms(Net()).eval()


def bools(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        a.dtype == before[k].dtype and a.shape == before[k].shape and torch.equal(a, before[k]) for k, a in after.items()
    )


def check_against_apply_mask(model: nn.Module, small: nn.Module, mask: dict[str, Any], x: torch.Tensor) -> None:
    ref = copy.deepcopy(model)
    prunefx.apply_mask(ref, mask, example_inputs=x)
    with torch.no_grad():
        assert max_rel_diff(small(x), ref(x)) < 1e-5


# ============================================================================= command line

NET_PY = (
    "import torch, torch.nn as nn\n"
    "def make():\n"
    "    torch.manual_seed(0)\n"
    "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))\n"
)


@pytest.fixture
def net_py(tmp_path: Path) -> str:
    (tmp_path / "net.py").write_text(NET_PY)
    return f"{tmp_path / 'net.py'}:make"


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from prunefx.__main__ import main

    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _gpu_free() -> bool:
    return not prunefx.export.gpu_providers()


def _save(tmp: Path, name: str, obj: Any) -> str:
    torch.save(obj, tmp / name)
    return str(tmp / name)


# Each: (id, argv builder (tmp dir, model spec) -> argv, words the one line must contain,
# whether it must fail before the model is loaded).
CLI_ERRORS: list[tuple[str, Any, tuple[str, ...], bool]] = [
    ("ratio-1.5", lambda t, m: ["prune", m, "--ratio", "1.5", "-o", f"{t}/p.pt"], ("--ratio", "1.5"), True),
    ("ratio-negative", lambda t, m: ["prune", m, "--ratio", "-1", "-o", f"{t}/p.pt"], ("--ratio", "-1"), True),
    ("ratio-nan", lambda t, m: ["prune", m, "--ratio", "nan", "-o", f"{t}/p.pt"], ("--ratio", "nan"), True),
    ("ratio-1.0", lambda t, m: ["prune", m, "--ratio", "1.0", "-o", f"{t}/p.pt"], ("--ratio", "[0, 1)"), True),
    ("ratio-inf", lambda t, m: ["prune", m, "--ratio", "inf", "-o", f"{t}/p.pt"], ("--ratio", "inf"), True),
    ("device-bogus", lambda t, m: ["prune", m, "--device", "bogus", "-o", f"{t}/p.pt"], ("device", "bogus"), True),
    ("device-bad-index", lambda t, m: ["prune", m, "--device", "cuda:x", "-o", f"{t}/p.pt"], ("device", "cuda:x"), True),
    ("export-device-bogus", lambda t, m: ["export", m, "--device", "gpu", "-o", f"{t}/m.onnx"], ("device", "gpu"), True),
    ("output-missing-dir", lambda t, m: ["prune", m, "-o", f"{t}/missing/p.pt"], ("-o", "does not exist"), True),
    ("output-is-dir", lambda t, m: ["prune", m, "-o", str(t)], ("-o", "is a directory"), True),
    ("output-under-a-file", lambda t, m: ["prune", m, "-o", f"{t}/net.py/p.pt"], ("-o", "is not a directory"), True),
    ("save-mask-missing-dir", lambda t, m: ["prune", m, "-o", f"{t}/p.pt", "--save-mask", f"{t}/no/m.pt"], ("--save-mask", "does not exist"), True),
    ("onnx-missing-dir", lambda t, m: ["prune", m, "-o", f"{t}/p.pt", "--onnx", f"{t}/no/m.onnx"], ("--onnx", "does not exist"), True),
    ("export-output-missing-dir", lambda t, m: ["export", m, "-o", f"{t}/no/m.onnx"], ("-o", "does not exist"), True),
    ("inspect-html-missing-dir", lambda t, m: ["inspect", m, "--html", f"{t}/no/r.html"], ("--html", "does not exist"), True),
    ("inspect-layers-negative", lambda t, m: ["inspect", m, "--layers", "-5"], ("--layers", "-5"), True),
    ("input-not-a-shape", lambda t, m: ["prune", m, "--input", "1,a,8", "-o", f"{t}/p.pt"], ("--input", "1,a,8"), True),
    ("input-empty-dim", lambda t, m: ["prune", m, "--input", "1,x,8", "-o", f"{t}/p.pt"], ("--input", "1,x,8"), True),
    ("input-zero-dim", lambda t, m: ["prune", m, "--input", "0,3,8,8", "-o", f"{t}/p.pt"], ("--input", "positive"), True),
    ("input-bad-dtype", lambda t, m: ["prune", m, "--input", "1,3,8,8:complex", "-o", f"{t}/p.pt"], ("dtype", "complex"), True),
    ("kwarg-no-value", lambda t, m: ["prune", m, "--kwarg", "use_cache", "-o", f"{t}/p.pt"], ("--kwarg", "NAME=VALUE", "'use_cache'"), True),
    ("kwarg-not-a-literal", lambda t, m: ["inspect", m, "--kwarg", "use_cache=Flase"], ("--kwarg", "literal", "'Flase'"), True),
    ("mask-float", lambda t, m: ["export", m, "--mask", _save(t, "f.pt", {"0": torch.rand(8)}), "-o", f"{t}/m.onnx"], ("'0'", "torch.float32", "torch.bool"), True),
    ("mask-float-nan", lambda t, m: ["export", m, "--mask", _save(t, "f.pt", {"0": torch.full((8,), math.nan)}), "-o", f"{t}/m.onnx"], ("'0'", "torch.float32"), True),
    ("mask-int", lambda t, m: ["export", m, "--mask", _save(t, "i.pt", {"0": torch.ones(8, dtype=torch.int64)}), "-o", f"{t}/m.onnx"], ("'0'", "torch.int64"), True),
    ("mask-not-a-dict", lambda t, m: ["export", m, "--mask", _save(t, "l.pt", [True, False]), "-o", f"{t}/m.onnx"], ("does not hold a mask", "list"), True),
    ("mask-missing-file", lambda t, m: ["export", m, "--mask", f"{t}/none.pt", "-o", f"{t}/m.onnx"], ("none.pt", "does not exist"), True),
    ("mask-not-torch", lambda t, m: ["export", m, "--mask", f"{t}/net.py", "-o", f"{t}/m.onnx"], ("cannot read", "net.py"), True),
    ("checkpoint-not-prunefx", lambda t, m: ["export", m, "--checkpoint", _save(t, "c.pt", {"a": torch.ones(1)}), "-o", f"{t}/m.onnx"], ("not a prunefx checkpoint",), True),
    ("model-spec-no-colon", lambda t, m: ["prune", "resnet18", "-o", f"{t}/p.pt"], ("MODEL", "resnet18"), False),
    ("model-file-missing", lambda t, m: ["prune", f"{t}/none.py:make", "-o", f"{t}/p.pt"], ("none.py", "does not exist"), False),
    ("model-factory-missing", lambda t, m: ["prune", m.replace(":make", ":nope"), "-o", f"{t}/p.pt"], ("'nope'",), False),
    ("torchvision-unknown", lambda t, m: ["prune", "torchvision:resnet_nope", "-o", f"{t}/p.pt"], ("resnet_nope",), False),
    ("torchvision-bad-weights", lambda t, m: ["prune", "torchvision:resnet18", "--weights", "BOGUS", "-o", f"{t}/p.pt"], ("BOGUS", "DEFAULT"), False),
    ("mask-unknown-key", lambda t, m: ["export", m, "--input", "1,3,8,8", "--mask", _save(t, "k.pt", {"nope": bools(1, 0)}), "-o", f"{t}/m.onnx"], ("'nope'",), False),
    ("mask-wrong-length", lambda t, m: ["export", m, "--input", "1,3,8,8", "--mask", _save(t, "w.pt", {"0": bools(1, 0, 1)}), "-o", f"{t}/m.onnx"], ("'0'", "8"), False),
]
if not _gpu_free():  # on a GPU machine "cuda" is valid
    CLI_ERRORS = [c for c in CLI_ERRORS if "cuda" not in c[0]]
else:
    CLI_ERRORS.append(("device-cuda-without-gpu", lambda t, m: ["prune", m, "--device", "cuda", "-o", f"{t}/p.pt"], ("CUDAExecutionProvider",), True))


@pytest.mark.parametrize("argv, words, early", [pytest.param(a, w, e, id=i) for i, a, w, e in CLI_ERRORS])
def test_cli_error_is_one_line_exit_1(argv, words, early, tmp_path, net_py, capsys, monkeypatch) -> None:
    if early:  # checked before any work: loading the model would be a bug
        def no_model(*_: Any, **__: Any) -> None:
            raise AssertionError("the model was loaded before the arguments were checked")

        monkeypatch.setattr("prunefx.__main__.load_model", no_model)
    args = argv(tmp_path, net_py)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, out, err = cli(args, capsys)
    assert rc == 1
    assert len(err.splitlines()) == 1 and err.startswith("prunefx "), err
    for word in words:
        assert word in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("argv", [
    pytest.param(["prune", "{m}", "--ratio", "1.5", "-o", "{t}/p.pt"], id="ratio"),
    pytest.param(["export", "{m}", "--mask", "{t}/none.pt", "-o", "{t}/m.onnx"], id="mask-missing"),
])
def test_cli_error_in_a_subprocess(argv: list[str], tmp_path: Path, net_py: str) -> None:
    args = [a.format(m=net_py, t=tmp_path) for a in argv]
    run = subprocess.run([sys.executable, "-m", "prunefx", *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and len(run.stderr.splitlines()) == 1 and run.stdout == "", run.stderr


@pytest.mark.parametrize("criterion, same_as", [("magnitude", "l1"), ("l2", None), ("random", None)])
def test_cli_criteria(criterion: str, same_as: str | None, tmp_path: Path, net_py: str, capsys) -> None:
    rc, out, _ = cli(["prune", net_py, "--input", "1,3,8,8", "--criterion", criterion, "--ratio", "0.5",
                      "-o", str(tmp_path / "p.pt"), "--save-mask", str(tmp_path / "m.pt")], capsys)
    assert rc == 0 and f"pruned by {criterion} 0.5" in out
    mask = torch.load(tmp_path / "m.pt", weights_only=True)
    assert all(v.dtype == torch.bool and int(v.sum()) == v.numel() // 2 for v in mask.values())
    if same_as:
        cli(["prune", net_py, "--input", "1,3,8,8", "--criterion", same_as, "--ratio", "0.5",
             "-o", str(tmp_path / "q.pt"), "--save-mask", str(tmp_path / "n.pt")], capsys)
        other = torch.load(tmp_path / "n.pt", weights_only=True)
        assert mask.keys() == other.keys() and all(torch.equal(mask[k], other[k]) for k in mask)


def test_cli_help_names_magnitude_and_the_real_optimizer(capsys) -> None:
    from prunefx.__main__ import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "magnitude" in text and "alias" in text and "onnxscript" not in text and "ONNX Runtime" in text


# ============================================================================= checkpoints

CKPT_MASK = {"conv1": bools(1, 0, 1, 1, 0, 1, 0, 1), "conv2": bools(0, 1, 1, 0, 1, 1)}


@pytest.fixture(scope="module")
def saved() -> tuple[dict[str, Any], nn.Module]:
    """A legit checkpoint of ``make()`` reconfigured by CKPT_MASK, as torch.load gives it back."""
    import io

    model = make()
    small = prunefx.reconfigure(model, CKPT_MASK, example_inputs=X)
    check_against_apply_mask(model, small, CKPT_MASK, X)
    buf = io.BytesIO()
    torch.save(prunefx.state_dict(small), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True), small


def _tamper(state: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A deep copy of ``state`` with ``state[path...] = value`` (``DELETE`` removes the key)."""
    state = copy.deepcopy(state)
    node = state
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return state


DELETE = object()
W, L, T = "state_dict", "prunefx", "tensors"
C1 = "conv1.weight"

# (id, tamper(state) -> state, words the PruneFxError must contain)
CKPT_BAD: list[tuple[str, Any, tuple[str, ...]]] = [
    ("not-a-dict", lambda s: [s], ("prunefx.state_dict", "list")),
    ("no-state-dict-key", lambda s: _tamper(s, (W,), DELETE), ("'state_dict'",)),
    ("a-plain-state-dict", lambda s: dict(s[W]), ("'state_dict'", "keys")),
    ("weights-a-list", lambda s: _tamper(s, (W,), [1, 2]), ("state_dict", "list")),
    ("weight-an-int", lambda s: _tamper(s, (W, C1), 3), (C1, "int")),
    ("weight-on-meta", lambda s: _tamper(s, (W, C1), torch.empty(5, 3, 3, 3, device="meta")), (C1, "meta")),
    ("weight-sparse", lambda s: _tamper(s, (W, "fc.bias"), torch.zeros(4).to_sparse()), ("fc.bias", "sparse")),
    ("weight-wrong-shape", lambda s: _tamper(s, (W, C1), torch.zeros(5, 3, 3, 2)), (C1, "[5, 3, 3, 2]")),
    ("weight-too-many-channels", lambda s: _tamper(s, (W, "bn1.weight"), torch.ones(8)), ("bn1.weight", "[8]")),
    ("weight-missing", lambda s: _tamper(s, (W, "fc.bias"), DELETE), ("missing", "fc.bias")),
    ("weight-unexpected", lambda s: _tamper(s, (W, "extra.weight"), torch.ones(1)), ("unexpected", "extra.weight")),
    ("layout-a-string", lambda s: _tamper(s, (L,), "layout"), ("checkpoint['prunefx']", "str")),
    ("layout-version-2", lambda s: _tamper(s, (L, "version"), 2), ("version",)),
    ("inputs-missing", lambda s: _tamper(s, (L, "inputs"), DELETE), ("inputs",)),
    ("inputs-empty", lambda s: _tamper(s, (L, "inputs"), []), ("inputs",)),
    ("input-not-a-dict", lambda s: _tamper(s, (L, "inputs", 0), [2, 3, 8, 8]), ("inputs'][0]",)),
    ("input-shape-negative", lambda s: _tamper(s, (L, "inputs", 0, "shape"), [2, -3, 8, 8]), ("inputs'][0]['shape']", "-3")),
    ("input-shape-a-string", lambda s: _tamper(s, (L, "inputs", 0, "shape"), "2,3,8,8"), ("inputs'][0]['shape']",)),
    ("input-shape-floats", lambda s: _tamper(s, (L, "inputs", 0, "shape"), [2.0, 3.0, 8.0, 8.0]), ("inputs'][0]['shape']",)),
    ("input-dtype-bogus", lambda s: _tamper(s, (L, "inputs", 0, "dtype"), "float99"), ("dtype", "float99")),
    ("input-dtype-not-dtype", lambda s: _tamper(s, (L, "inputs", 0, "dtype"), "nn"), ("dtype", "'nn'")),
    ("input-wrong-channels", lambda s: _tamper(s, (L, "inputs", 0, "shape"), [2, 5, 8, 8]), ("conv1",)),
    ("tensors-a-list", lambda s: _tamper(s, (L, T), []), ("tensors", "list")),
    ("tensors-missing", lambda s: _tamper(s, (L, T), DELETE), ("tensors",)),
    ("entry-not-a-dict", lambda s: _tamper(s, (L, T, C1), [8, 3, 3, 3]), (C1,)),
    ("entry-no-kept", lambda s: _tamper(s, (L, T, C1, "kept"), DELETE), (C1, "kept")),
    ("entry-shape-a-string", lambda s: _tamper(s, (L, T, C1, "shape"), "8,3,3,3"), (C1, "shape")),
    ("entry-shape-other-model", lambda s: _tamper(s, (L, T, C1, "shape"), [9, 3, 3, 3]), (C1, "[9, 3, 3, 3]", "[8, 3, 3, 3]")),
    ("kept-dim-out-of-range", lambda s: _tamper(s, (L, T, C1, "kept", 5), torch.tensor([0])), (C1, "dim 5")),
    ("kept-dim-a-string", lambda s: _tamper(s, (L, T, C1, "kept", "0"), torch.tensor([0])), (C1, "dim '0'")),
    ("kept-index-too-big", lambda s: _tamper(s, (L, T, C1, "kept", 0), torch.tensor([0, 2, 3, 5, 100])), (C1, "100", "0..7")),
    ("kept-index-negative", lambda s: _tamper(s, (L, T, C1, "kept", 0), torch.tensor([-1, 2, 3, 5, 7])), (C1, "-1")),
    ("kept-unsorted", lambda s: _tamper(s, (L, T, C1, "kept", 0), torch.tensor([2, 0, 3, 5, 7])), (C1, "sorted")),
    ("kept-duplicate", lambda s: _tamper(s, (L, T, C1, "kept", 0), torch.tensor([0, 2, 2, 5, 7])), (C1, "unique")),
    ("kept-floats", lambda s: _tamper(s, (L, T, C1, "kept", 0), torch.tensor([0.0, 2.0, 3.0, 5.0, 7.0])), (C1, "integer")),
    ("kept-bools", lambda s: _tamper(s, (L, T, C1, "kept", 0), bools(1, 0, 1, 1, 0, 1, 0, 1)), (C1, "integer")),
    ("kept-2d", lambda s: _tamper(s, (L, T, C1, "kept", 0), torch.tensor([[0, 2, 3, 5, 7]])), (C1, "1-D")),
    ("kept-a-string", lambda s: _tamper(s, (L, T, C1, "kept", 0), "0,2,3"), (C1, "1-D")),
    ("kept-other-channels-than-its-group", lambda s: _tamper(s, (L, T, "bn1.weight", "kept", 0), torch.tensor([1, 2, 3, 4, 6])), ("keeps channels",)),
    ("branches-not-a-list", lambda s: _tamper(s, (L, "branches"), {"node": "x"}), ("branches", "dict")),
    ("branch-missing-keys", lambda s: _tamper(s, (L, "branches"), [{"node": "bn1"}]), ("branches'][0]", "'module'")),
    ("branch-shape-negative", lambda s: _tamper(s, (L, "branches"), [{"node": "bn1", "target": "bn1", "module": "c", "shape": [1, -8, 8, 8], "modal": False}]), ("branches'][0]['shape']",)),
    ("branch-shape-huge", lambda s: _tamper(s, (L, "branches"), [{"node": "bn1", "target": "bn1", "module": "c", "shape": [1, 10**9, 8, 8], "modal": False}]), ("'c'", "1000000000", "bn1")),
    ("branch-node-unknown", lambda s: _tamper(s, (L, "branches"), [{"node": "nope", "target": None, "module": "c", "shape": [1, 8, 1, 1], "modal": False}]), ("'nope'",)),
]


@pytest.mark.parametrize("tamper, words", [pytest.param(t, w, id=i) for i, t, w in CKPT_BAD])
def test_damaged_checkpoint_raises_and_changes_nothing(tamper, words, saved) -> None:
    state, _ = saved
    fresh = make()
    before = state_copy(fresh)
    bad = tamper(state)
    with pytest.raises(prunefx.PruneFxError) as info:
        prunefx.load_state_dict(fresh, bad)
    for word in words:
        assert word in str(info.value), str(info.value)
    assert unchanged(fresh, before)


class Wider(Net):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2 = nn.Conv2d(3, 10, 3, padding=1), nn.BatchNorm2d(10), nn.Conv2d(10, 6, 3, padding=1)


@pytest.mark.parametrize("other, words", [
    pytest.param(Wider, ("conv1.weight", "[10, 3, 3, 3]"), id="wider-architecture"),
    pytest.param(lambda: nn.Sequential(nn.Conv2d(3, 4, 1)), ("missing", "unexpected"), id="unrelated-architecture"),
])
def test_checkpoint_into_another_architecture(other, words, saved) -> None:
    state, _ = saved
    torch.manual_seed(0)
    fresh = other()
    before = state_copy(fresh)
    with pytest.raises(prunefx.PruneFxError) as info:
        prunefx.load_state_dict(fresh, state)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert unchanged(fresh, before)


def _plain(model: nn.Module) -> dict[str, Any]:
    return {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}, "prunefx": None}


# A state without a layout is loaded into the model itself: a failure must not half-load it.
PLAIN_BAD: list[tuple[str, Any, dict[str, Any], tuple[str, ...]]] = [
    ("last-weight-wrong-shape", lambda s: _tamper(s, (W, "fc.bias"), torch.zeros(5)), {}, ("fc.bias", "[5]", "[4]")),
    ("wrong-shape-not-strict", lambda s: _tamper(s, (W, "fc.bias"), torch.zeros(5)), {"strict": False}, ("fc.bias",)),
    ("missing-key", lambda s: _tamper(s, (W, "fc.bias"), DELETE), {}, ("missing", "fc.bias")),
    ("unexpected-key", lambda s: _tamper(s, (W, "head.bias"), torch.zeros(5)), {}, ("unexpected", "head.bias")),
    ("layout-empty-weights-meta", lambda s: _tamper(s, (W, "fc.bias"), torch.zeros(4, device="meta")), {}, ("fc.bias", "meta")),
]


@pytest.mark.parametrize("tamper, kwargs, words", [pytest.param(t, k, w, id=i) for i, t, k, w in PLAIN_BAD])
def test_plain_state_fails_before_loading_anything(tamper, kwargs, words) -> None:
    source = make()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)  # every loaded tensor would differ from the target's
    fresh = make()
    before = state_copy(fresh)
    with pytest.raises(prunefx.PruneFxError) as info:
        prunefx.load_state_dict(fresh, tamper(_plain(source)), **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert unchanged(fresh, before)


@pytest.mark.parametrize("variant", ["as-saved", "kept-as-lists", "no-version", "layout-empty-dict-is-plain"])
def test_checkpoint_variants_that_load(variant: str, saved) -> None:
    state, small = saved
    if variant == "kept-as-lists":
        state = copy.deepcopy(state)
        for entry in state[L][T].values():
            entry["kept"] = {d: k.tolist() for d, k in entry["kept"].items()}
    elif variant == "no-version":
        state = _tamper(state, (L, "version"), DELETE)
    elif variant == "layout-empty-dict-is-plain":
        fresh = make()
        source = make()
        loaded = prunefx.load_state_dict(fresh, {"state_dict": source.state_dict(), "prunefx": {}})
        assert loaded is fresh
        return
    rebuilt = prunefx.load_state_dict(make(), state).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(X), small.eval()(X))
    check_against_apply_mask(make(), rebuilt, CKPT_MASK, X)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


class _Res(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.block = _Block()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(F.relu(self.bn(self.conv(x)))).mean((2, 3)))


@pytest.fixture(scope="module")
def branch_saved() -> tuple[dict[str, Any], nn.Module]:
    """A checkpoint of a model whose residual branch PruneTrain's shrink replaced by a constant."""
    from prunefx.train import shrink

    torch.manual_seed(0)
    net = randomize_norms(_Res()).eval()
    with torch.no_grad():
        net.block.conv1.weight.zero_()
        net.block.bn1.weight.zero_()
        net.block.bn2.bias.abs_().add_(0.2)
    small, report = shrink(net, example_inputs=X)
    assert report.branches.constants
    return prunefx.state_dict(small), small


@pytest.mark.parametrize("tamper, words", [
    pytest.param(lambda r: {**r, "shape": [1, 10**9, 1, 1]}, ("1000000000",), id="width-huge"),
    pytest.param(lambda r: {**r, "shape": [1, 8, 10**5, 10**5]}, ("100000",), id="spatial-huge"),
    pytest.param(lambda r: {**r, "shape": [4, 8, 1, 1]}, ("[4, 8, 1, 1]",), id="batch-not-1"),
    pytest.param(lambda r: {**r, "shape": [1, 8]}, ("[1, 8]",), id="rank-differs"),
    pytest.param(lambda r: {**r, "node": "nope", "target": "nope"}, ("'nope'",), id="node-unknown"),
    pytest.param(lambda r: {**r, "modal": "yes"}, ("'modal'",), id="modal-not-bool"),
])
def test_damaged_branch_record(tamper, words, branch_saved) -> None:
    state, _ = branch_saved
    bad = copy.deepcopy(state)
    bad[L]["branches"][0] = tamper(bad[L]["branches"][0])
    fresh = _Res()
    before = state_copy(fresh)
    with pytest.raises(prunefx.PruneFxError) as info:
        prunefx.load_state_dict(fresh, bad)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert unchanged(fresh, before)


def test_branch_checkpoint_round_trip(branch_saved) -> None:
    state, small = branch_saved
    rebuilt = prunefx.load_state_dict(_Res(), copy.deepcopy(state)).eval()
    with torch.no_grad():
        assert max_rel_diff(rebuilt(X), small.eval()(X)) < 1e-6


# ============================================================================= ONNX export

def _wide(seed: int) -> nn.Module:
    """Weights large enough (> 1 KiB per tensor) to go to the external data file."""
    torch.manual_seed(seed)
    return randomize_norms(nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3))).eval()


def _export(model: nn.Module, path: Path, external: bool, **kw: Any) -> Any:
    return prunefx.export_onnx(model, path, X[:1], exporter="torchscript", simplify=False, verify=False,
                               external_data=external, **kw)


def _disk(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (staging directories included) with its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _prior(d: Path, kind: str) -> None:
    """What an earlier export (of another model) left at d/m.onnx."""
    if kind == "plain":
        _export(_wide(1), d / "m.onnx", False)
    elif kind == "pair":
        _export(_wide(1), d / "m.onnx", True)
    elif kind == "stale-data":
        (d / "m.onnx.data").write_bytes(b"weights of an export long gone")
    (d / "other.txt").write_text("not ours")


def _replace_calls(prior: str, external: bool) -> int:
    """os.replace calls of a commit: the old pair moved aside, then the new data and .onnx."""
    if not external:
        return 1
    return {"empty": 0, "plain": 1, "pair": 2, "stale-data": 1}[prior] + 2


EXPORT_FAULTS = [
    pytest.param(prior, external, k, persistent, id=f"{prior}-then-{'external' if external else 'plain'}-fail-{k}{'-and-after' if persistent else ''}")
    for prior in ("empty", "plain", "pair", "stale-data")
    for external in (False, True)
    for k in range(1, _replace_calls(prior, external) + 1)
    for persistent in ((False, True) if external and k > 1 else (False,))
]


@pytest.mark.parametrize("prior, external, k, persistent", EXPORT_FAULTS)
def test_export_commit_fault_leaves_the_files_as_before(prior, external, k, persistent, tmp_path, monkeypatch) -> None:
    """The k-th rename of the commit fails (and, ``persistent``, every one after it, so the
    old pair cannot be put back): an ExportError, and the files at the target are the old
    pair, or no .onnx at all; never an .onnx next to another export's .data."""
    import os

    _prior(tmp_path, prior)
    before = _disk(tmp_path)
    real, calls = os.replace, []

    def failing(src: Any, dst: Any) -> None:
        calls.append((src, dst))
        if len(calls) == k or (persistent and len(calls) > k):
            raise OSError(28, "No space left on device (injected)")
        real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(prunefx.ExportError, match="cannot move the ONNX file into place") as info:
        _export(_wide(2), tmp_path / "m.onnx", external)
    monkeypatch.setattr(os, "replace", real)
    after = _disk(tmp_path)
    if not persistent:
        assert after == before
        return
    # putting the old pair back failed too: every old file is at the target or kept in the
    # staging directory the message names, and the target holds no .onnx that could read
    # another export's data
    kept = {Path(n).name: b for n, b in after.items() if "previous" in n}
    for name, old in before.items():
        assert old in (after.get(name), kept.get(name)), name
    assert "m.onnx" not in after or (after["m.onnx"] == before["m.onnx"] and after.get("m.onnx.data") == before.get("m.onnx.data"))
    assert not kept or "previous export is kept in" in str(info.value)


@pytest.mark.parametrize("prior", ["empty", "plain", "pair", "stale-data"])
@pytest.mark.parametrize("external", [False, True], ids=["then-plain", "then-external"])
def test_export_over_an_earlier_one_leaves_exactly_the_new_files(prior: str, external: bool, tmp_path: Path) -> None:
    _prior(tmp_path, prior)
    model = _wide(2)
    result = _export(model, tmp_path / "m.onnx", external)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["m.onnx", "other.txt", *(["m.onnx.data"] if external else [])])  # no stale .data, no staging
    assert (result.external_data is not None) == external
    sess = prunefx.onnx_session(tmp_path / "m.onnx", "cpu")
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: X[:1].numpy()})[0])
    with torch.no_grad():
        assert max_rel_diff(got, model(X[:1])) < 1e-4  # the new weights, not the earlier export's


@pytest.mark.parametrize("make_path, words", [
    pytest.param(lambda d: d / "missing" / "m.onnx", ("does not exist",), id="missing-directory"),
    pytest.param(lambda d: d, ("is a directory",), id="a-directory"),
    pytest.param(lambda d: d / "other.txt" / "m.onnx", ("is not a directory",), id="under-a-file"),
])
def test_export_bad_path_fails_before_capture(make_path, words, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "other.txt").write_text("x")
    monkeypatch.setattr("prunefx.export._reference_batches", lambda *a: pytest.fail("work started"))
    with pytest.raises(prunefx.ExportError) as info:
        _export(_wide(0), make_path(tmp_path), False)
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize("kwargs, words", [
    pytest.param({"device": "bogus", "verify": True}, ("device", "bogus"), id="device-bogus"),
    pytest.param({"device": "cuda:x", "verify": True}, ("device", "cuda:x"), id="device-bad-index"),
    pytest.param({"exporter": "tflite"}, ("exporter", "tflite"), id="exporter-unknown"),
])
def test_export_bad_option_fails_before_capture(kwargs, words, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("prunefx.export._reference_batches", lambda *a: pytest.fail("work started"))
    args = {"exporter": "torchscript", "simplify": False, "verify": False, **kwargs}
    with pytest.raises(prunefx.ExportError) as info:
        prunefx.export_onnx(_wide(0), tmp_path / "m.onnx", X[:1], **args)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert list(tmp_path.iterdir()) == []


# ============================================================================= torch.return_types

class _Reduce(nn.Module):
    """conv-bn, then ``how`` (a reduction that may return a values/indices pair), then a head."""

    def __init__(self, how: Any, head: int = 8) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.how = how
        self.fc = nn.Linear(head, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.how(F.relu(self.bn(self.conv(x)))))


def _pair_max_min(y: torch.Tensor) -> torch.Tensor:
    a, b = y.max(2)
    return a.amax(2) + y.min(dim=3).values.mean(2)


# (id, reduction, whether group 'conv' stays prunable, whether it is exact)
RETURN_TYPES: list[tuple[str, Any, bool, bool]] = [
    ("max-values-then-getitem", lambda y: y.max(dim=3).values.max(2)[0], True, True),
    ("torch-max-values-keepdim", lambda y: torch.max(y, dim=2, keepdim=True).values.mean((2, 3)), True, True),
    ("min-values-negative-dim", lambda y: y.min(-1).values.mean(-1), True, True),
    ("max-indices-unused", lambda y: y.max(dim=2).values.sum(2), True, True),
    ("unpacked-pair", _pair_max_min, True, True),
    ("max-then-getitem-1-unused", lambda y: y.max(3)[0].mean(2), True, True),
    ("torch-max-of-two-tensors", lambda y: torch.max(y, 0.5 * y).mean((2, 3)), True, True),
    ("max-over-everything", lambda y: y.mean((2, 3)) / (1 + y.max()), True, False),
    ("max-over-channels", lambda y: y.mean((2, 3)) * y.max(dim=1).values.mean((1, 2))[:, None], True, False),
    ("indices-over-channels", lambda y: y.mean((2, 3)) + y.max(1).indices.float().mean((1, 2))[:, None], True, False),
    ("indices-used-per-channel", lambda y: y.mean((2, 3)) + y.max(2).indices.float().mean(2), True, False),
    ("topk-has-no-rule", lambda y: y.topk(2, dim=2).values.mean((2, 3)), False, False),
    ("sort-has-no-rule", lambda y: torch.sort(y, dim=3).values.mean((2, 3)), False, False),
]


@pytest.mark.parametrize("how, prunable, exact", [pytest.param(h, p, e, id=i) for i, h, p, e in RETURN_TYPES])
def test_return_types_trace_and_prune(how, prunable: bool, exact: bool) -> None:
    torch.manual_seed(0)
    model = randomize_norms(_Reduce(how)).eval()
    before = state_copy(model)
    graph = prunefx.trace(model, X)
    group = graph.group_of("conv")
    assert group.prunable == prunable, group.reason
    assert group.exact == (prunable and exact), group.reason
    if not prunable:
        assert "no channel rule" in (group.reason or ""), group.reason
        return
    mask = {"conv": bools(1, 0, 1, 1, 0, 1, 1, 0)}
    small = prunefx.reconfigure(model, mask, example_inputs=X)
    assert unchanged(model, before)
    assert small.get_submodule("conv").out_channels == 5
    if exact:
        check_against_apply_mask(model, small, mask, X)
    else:
        with torch.no_grad():
            assert small(X).shape == model(X).shape


# ============================================================================= error text

class _Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(x), 1))


# (id, model, wrong input, words of the cause, node named)
WRONG_INPUTS: list[tuple[str, Any, Any, tuple[str, ...], str]] = [
    ("conv-channels", make, torch.randn(2, 1, 8, 8), ("expected input[2, 1, 8, 8] to have 3 channels",), "conv1"),
    ("conv-rank", make, torch.randn(2, 3), ("conv",), "conv1"),
    ("linear-features", lambda: nn.Sequential(nn.Linear(5, 3)), torch.randn(2, 6), ("mat1 and mat2 shapes cannot be multiplied", "2x6", "5x3"), "_0"),
    ("flatten-then-linear", _Flat, torch.randn(2, 3, 10, 10), ("shapes cannot be multiplied", "2x256"), "fc"),
]


@pytest.mark.parametrize("factory, x, words, node", [pytest.param(f, x, w, n, id=i) for i, f, x, w, n in WRONG_INPUTS])
def test_wrong_input_shape_is_one_line_with_the_cause(factory, x, words, node, capfd) -> None:
    model = factory()
    before = state_copy(model)
    with pytest.raises(prunefx.TraceError) as info:
        prunefx.trace(model, x)
    msg = str(info.value)
    assert "\n" not in msg and "ShapeProp error" not in msg and "While executing" not in msg, msg
    assert all(w in msg for w in words), msg
    assert not node or f"'{node}'" in msg, msg
    out, err = capfd.readouterr()
    assert err == "" and out == ""  # fx's ShapeProp prints every failure's traceback: not ours
    assert unchanged(model, before)


def test_wrong_input_shape_on_the_command_line(tmp_path: Path, net_py: str, capsys) -> None:
    rc, _, err = cli(["prune", net_py, "--input", "1,1,8,8", "-o", str(tmp_path / "p.pt")], capsys)
    assert rc == 1 and len(err.splitlines()) == 1 and "expected input[1, 1, 8, 8] to have 3 channels" in err, err


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)  # [brackets] must survive rich


@pytest.mark.parametrize("render", [
    pytest.param(lambda r: str(r), id="report"),
    pytest.param(lambda r: prunefx.inspector.render.to_text(r.reasons_table()), id="reasons-table"),
    pytest.param(lambda r: prunefx.inspector.render.to_text(r.explain("a"), width=300), id="explain"),
    pytest.param(lambda r: prunefx.inspector.render.to_text(r.explain("a").chain_table(), width=300), id="explain-chain"),
])
def test_tables_keep_square_brackets(render) -> None:
    report = prunefx.inspect(_Cat(), X)
    text = render(report)
    assert "torch.cat([self.a(x), self.b(x)], dim=1)" in text or "[brackets]" in text, text


# ============================================================================= failing traces leave the model alone

class _NoMeta(nn.Module):
    """conv-bn (training mode), then ``how``: ops without a meta kernel make shape propagation
    run the graph for real."""

    def __init__(self, how: Any) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.how(self, F.relu(self.bn(self.conv(x))))


def _head(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return m.fc(y.mean((2, 3)))


# (id, what follows conv-bn, whether the trace succeeds)
NO_META: list[tuple[str, Any, bool]] = [
    ("nonzero", lambda m, y: _head(m, y) + torch.nonzero(y).size(0) * 0.0, True),
    ("item", lambda m, y: _head(m, y) * (1.0 + 0.0 * y.mean().item()), True),
    ("nonzero-then-bad-view", lambda m, y: _head(m, y.view(-1, 7, 1, 1)) + torch.nonzero(y).size(0), False),
    ("nonzero-then-bad-linear", lambda m, y: m.fc(y.flatten(1)) + torch.nonzero(y).size(0), False),
    ("masked-select", lambda m, y: _head(m, y) + torch.masked_select(y, y > 0).sum(), True),
]


@pytest.mark.parametrize("how, traces", [pytest.param(h, t, id=i) for i, h, t in NO_META])
@pytest.mark.parametrize("entry", ["trace", "reconfigure", "apply_mask", "inspect"])
def test_real_run_fallback_never_changes_the_model(how, traces: bool, entry: str) -> None:
    torch.manual_seed(0)
    model = randomize_norms(_NoMeta(how)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.bn(model.conv(X)).square().mean().backward()  # momentum buffers (the head may not run at all)
    opt.step()
    before, opt_before = state_copy(model), copy.deepcopy(opt.state_dict())
    mask = {"conv": bools(1, 0, 1, 1, 0, 1, 1, 0)}
    call = {
        "trace": lambda: prunefx.trace(model, X),
        "reconfigure": lambda: prunefx.reconfigure(model, mask, example_inputs=X, optimizer=opt),
        "apply_mask": lambda: prunefx.apply_mask(model, mask, example_inputs=X),
        "inspect": lambda: str(prunefx.inspect(model, X)),
    }[entry]
    if traces:
        try:
            call()
        except prunefx.PruneFxError:
            pass  # a pinned group is a clean refusal; what matters is below
    else:
        with pytest.raises(prunefx.TraceError, match="shape propagation failed"):
            call()
    assert model.training and model.bn.training
    if entry != "apply_mask" or not traces:  # apply_mask zeroes channels in place: that is its job
        assert unchanged(model, before), "running statistics or weights changed"
    else:
        assert torch.equal(model.bn.running_mean, before["bn.running_mean"]) and torch.equal(
            model.bn.num_batches_tracked, before["bn.num_batches_tracked"])
    if entry != "reconfigure" or not traces:
        assert str(opt.state_dict()) == str(opt_before)


class _Remembers(nn.Module):
    """A forward that keeps something of its input on a module (Funnel's
    ``attention_structure.seq_len``; timm TinyViT's cache of attention biases, a dict filled
    in the forward): a Proxy under fx, a SymInt or fake tensor under torch.export, if the
    capture left it there."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)
        self.cache: dict[str, torch.Tensor] = {}
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.width = x.shape[-1]
        self.bn.last = x.mean()
        if "scale" not in self.cache:
            self.cache["scale"] = self.fc.bias.detach() * 0 + 1
        self.seen.append(x.sum())
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3))) * self.cache["scale"]


@pytest.mark.parametrize("ran_before", [False, True], ids=["fresh", "after-a-forward"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_attributes_a_forward_sets_are_put_back_after_the_capture(frontend: str, ran_before: bool) -> None:
    torch.manual_seed(0)
    model = randomize_norms(_Remembers()).eval()
    if ran_before:
        with torch.no_grad():
            model(X)
    before = [(m, dict(vars(m))) for m in model.modules()]
    cache, seen = dict(model.cache), list(model.seen)
    graph = prunefx.trace(model, X, frontend=frontend)
    for m, attrs in before:
        assert vars(m).keys() == attrs.keys() and all(vars(m)[k] is v for k, v in attrs.items()), type(m).__name__
    assert model.cache.keys() == cache.keys() and all(model.cache[k] is v for k, v in cache.items())
    assert len(model.seen) == len(seen) and all(a is b for a, b in zip(model.seen, seen, strict=True))
    copy.deepcopy(model)  # a SymInt or fake tensor left behind would make this raise
    mask = {"conv": bools(1, 0, 1, 1, 0, 1, 1, 0)}
    small = prunefx.reconfigure(model, mask, graph=graph)
    ref = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph)
    with torch.no_grad():
        assert max_rel_diff(small(X), ref(X)) < 1e-5


# ============================================================================= masks: values and keys

MASK_BAD_VALUES: list[tuple[str, Any, tuple[str, ...]]] = [
    ("meta", lambda: torch.ones(8, dtype=torch.bool, device="meta"), ("'conv1'", "meta device")),
    ("sparse-coo", lambda: bools(1, 0, 1, 1, 0, 1, 0, 1).to_sparse(), ("'conv1'", "sparse_coo", "to_dense")),
    ("sparse-csr-2d", lambda: bools(1, 0, 1, 1, 0, 1, 0, 1)[None].to_sparse_csr(), ("'conv1'", "sparse_csr")),
    ("meta-float", lambda: torch.ones(8, device="meta"), ("'conv1'", "torch.float32")),
]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support")
@pytest.mark.parametrize("entry", ["reconfigure", "apply_mask"])
@pytest.mark.parametrize("value, words", [pytest.param(v, w, id=i) for i, v, w in MASK_BAD_VALUES])
def test_mask_value_without_data_is_one_line(value, words, entry: str) -> None:
    model = make().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(X).square().mean().backward()
    opt.step()
    before, opt_before = state_copy(model), copy.deepcopy(opt.state_dict())
    mask = {"conv1": value()}
    with pytest.raises(prunefx.MaskError) as info:
        if entry == "reconfigure":
            prunefx.reconfigure(model, mask, example_inputs=X, optimizer=opt)
        else:
            prunefx.apply_mask(model, mask, example_inputs=X)
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert unchanged(model, before) and str(opt.state_dict()) == str(opt_before)


class _SharedAct(nn.Module):
    """One ReLU module after two convs of different widths; one conv applied to two inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn_a(self.a(x)))
        y = self.act(self.bn_b(self.b(y)))
        return self.fc(y.mean((2, 3)))


class _SharedConv(nn.Module):
    """One conv called on two inputs (the same channels both times), one BN after both."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x))) + self.act(self.bn(self.conv(self.stem(x))))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("entry", ["reconfigure", "apply_mask"])
def test_shared_module_on_different_channels_is_no_mask_key(frontend: str, entry: str) -> None:
    torch.manual_seed(0)
    model = randomize_norms(_SharedAct()).eval()
    before = state_copy(model)
    call = prunefx.reconfigure if entry == "reconfigure" else prunefx.apply_mask
    with pytest.raises(prunefx.MaskError) as info:
        call(model, {"act": bools(1, 0, 1, 1, 0, 1, 0, 1)}, example_inputs=X, frontend=frontend)
    msg = str(info.value)
    assert "\n" not in msg and "module 'act' is called at 2 places" in msg, msg
    assert "group 'a'" in msg and "group 'b'" in msg and msg.count("test_adversarial.py:") == 2, msg
    assert unchanged(model, before)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_shared_module_lookups_say_it_is_shared(frontend: str) -> None:
    """group_of / output_channels name one set of channels: refused like a mask key; groups_of
    (and protect=, built on it) means every group the module touches."""
    graph = prunefx.trace(randomize_norms(_SharedAct()).eval(), X, frontend=frontend)
    for lookup in (graph.group_of, graph.output_channels):
        with pytest.raises(prunefx.MaskError, match="module 'act' is called at 2 places"):
            lookup("act")
    assert sorted(g.name for g in graph.groups_of("act")) == ["a", "b"]
    mask = prunefx.masks.magnitude(graph, 0.5, protect=("act",))
    assert not {"a", "b"} & set(mask)


class _SharedOnFlipped(nn.Module):
    """One ReLU on a conv's output and on its channel-flipped copy: other channels at index i."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(self.act(y) + self.act(y.flip(1)))


def test_shared_module_on_reordered_channels_is_no_mask_key() -> None:
    model = _SharedOnFlipped()
    with pytest.raises(prunefx.MaskError) as info:
        prunefx.reconfigure(model, {"act": bools(1, 0, 1, 1)}, example_inputs=X, frontend="fx")
    msg = str(info.value)
    assert "\n" not in msg and "module 'act' is called at 2 places" in msg and "'act_1'" in msg, msg


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("factory, key, bits", [
    pytest.param(_SharedAct, "a", (1, 0, 1, 1, 0, 1, 0, 1), id="shared-act-by-group-a"),
    pytest.param(_SharedAct, "b", (0, 1, 1, 0, 1, 1), id="shared-act-by-group-b"),
    pytest.param(_SharedConv, "conv", (1, 0, 1, 1, 0, 1, 0, 1), id="shared-conv-by-name"),
    pytest.param(_SharedConv, "act", (1, 0, 1, 1, 0, 1, 0, 1), id="shared-act-same-channels"),
    pytest.param(_SharedConv, "bn", (0, 1, 1, 0, 1, 1, 1, 0), id="shared-bn"),
])
def test_shared_module_keys_that_name_one_set(factory, key: str, bits: tuple[int, ...], frontend: str) -> None:
    torch.manual_seed(0)
    model = randomize_norms(factory()).eval()
    before = state_copy(model)
    mask = {key: bools(*bits)}
    small = prunefx.reconfigure(model, mask, example_inputs=X, frontend=frontend)
    ref = copy.deepcopy(model)
    prunefx.apply_mask(ref, mask, example_inputs=X, frontend=frontend)
    with torch.no_grad():
        assert max_rel_diff(small(X), ref(X)) < 1e-5
    assert unchanged(model, before)


# ============================================================================= mask sources: bad options

def _net_graph() -> prunefx.PruneGraph:
    return prunefx.trace(make(), X)


def _magnitude_at(ratio: Any) -> Any:
    return lambda g: prunefx.masks.magnitude(g, ratio)


# (id, call(graph), words)
SELECT_BAD: list[tuple[str, Any, tuple[str, ...]]] = [
    *[(f"ratio-{name}", _magnitude_at(r), ("ratio", "[0, 1)", repr(r)))
      for name, r in [("1.5", 1.5), ("1.0", 1.0), ("negative", -0.1), ("nan", math.nan), ("inf", math.inf),
                      ("a-string", "0.5"), ("none", None), ("bool", True)]],
    ("ratio-a-vector", lambda g: prunefx.masks.magnitude(g, torch.tensor([0.5, 0.2])), ("ratio", "tensor([0.5000, 0.2000])")),
    ("select-ratio-2", lambda g: prunefx.masks.select(g, {"conv1": torch.rand(8)}, 2.0), ("ratio", "2.0")),
    ("random-ratio-1", lambda g: prunefx.masks.random(g, 1.0), ("ratio", "1.0")),
    ("scope-bogus", lambda g: prunefx.masks.magnitude(g, 0.5, scope="layer"), ("scope", "'layer'")),
    ("normalize-bogus", lambda g: prunefx.masks.select(g, {"conv1": torch.rand(8)}, 0.5, normalize="sum"), ("normalize", "'sum'")),
    ("min-keep-0", lambda g: prunefx.masks.magnitude(g, 0.5, min_keep=0), ("min_keep", "0")),
    ("min-keep-float", lambda g: prunefx.masks.magnitude(g, 0.5, min_keep=1.5), ("min_keep", "1.5")),
    ("round-to-0", lambda g: prunefx.masks.magnitude(g, 0.5, round_to=0), ("round_to", "0")),
    ("scores-meta", lambda g: prunefx.masks.select(g, {"conv1": torch.rand(8, device="meta")}, 0.5), ("'conv1'", "meta")),
    ("scores-sparse", lambda g: prunefx.masks.select(g, {"conv1": torch.rand(8).to_sparse()}, 0.5), ("'conv1'", "sparse")),
    ("scores-strings", lambda g: prunefx.masks.select(g, {"conv1": ["a"] * 8}, 0.5), ("'conv1'", "list")),
    ("scores-complex", lambda g: prunefx.masks.select(g, {"conv1": torch.rand(8, dtype=torch.complex64)}, 0.5), ("'conv1'", "complex")),
]


@pytest.mark.parametrize("call, words", [pytest.param(c, w, id=i) for i, c, w in SELECT_BAD])
def test_mask_source_bad_option_is_one_line_mask_error(call, words) -> None:
    graph = _net_graph()
    with pytest.raises(prunefx.MaskError) as info:
        call(graph)
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("ratio", [pytest.param(torch.tensor(0.5), id="0-d-tensor"), pytest.param(np.float32(0.5), id="numpy-float")])
def test_mask_source_ratio_any_real_number(ratio: Any) -> None:
    graph = _net_graph()
    got, want = prunefx.masks.magnitude(graph, ratio), prunefx.masks.magnitude(graph, 0.5)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_mask_source_option_error_is_still_a_value_error() -> None:
    with pytest.raises(ValueError, match="ratio"):  # code written against the old ValueError keeps working
        prunefx.masks.magnitude(_net_graph(), 1.5)


# ============================================================================= hooks

class _Hooked(nn.Module):
    """A traced block (conv-bn-relu), then a leaf conv-bn and a pooled head: groups
    'block.conv' (8) and 'conv2' (6)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn2(self.conv2(self.block(x)))).mean((2, 3)))


HOOK_MASK = {"block.0": bools(1, 0, 1, 1, 0, 1, 0, 1), "conv2": bools(0, 1, 1, 0, 1, 1)}
CALLS: list[tuple[int, ...]] = []  # shapes the observer hooks saw


def _gain(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 1, generator=torch.Generator().manual_seed(seed))


def scale_by_gain(n: int) -> Any:
    gain = _gain(n)

    def scale(m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        return out * gain  # a channel-sized tensor the hook closes over

    return scale


def shift_input(m: nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor]:
    return (args[0] * 0.5 + 0.25,)


def shift_input_kwargs(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (args[0] - 0.1,), kwargs


def double_output(m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
    return out * 2 + 1


def double_output_kwargs(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> torch.Tensor:
    return out.tanh()


def record_shape(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
    CALLS.append(tuple(out.shape))


def record_pre(m: nn.Module, args: tuple[Any, ...]) -> None:
    CALLS.append(tuple(args[0].shape))


def pass_through(m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
    CALLS.append(1)
    return out


def count_calls(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
    CALLS.append(1)


def grad_hook(m: nn.Module, grad_in: Any, grad_out: Any) -> None:
    CALLS.append(tuple(grad_out[0].shape))


class _Scaler:
    """A hook that is an object: multiplies by a per-channel gain."""

    def __init__(self, n: int) -> None:
        self.gain = _gain(n, 5)

    def __call__(self, m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        return out * self.gain


def _hook(where: str, kind: str, fn: Any, **kw: Any) -> Any:
    def setup(model: nn.Module) -> None:
        m = model.get_submodule(where)
        {"pre": m.register_forward_pre_hook, "fwd": m.register_forward_hook, "bwd": m.register_full_backward_hook,
         "bwd-pre": m.register_full_backward_pre_hook}[kind](fn, **kw)

    return setup


# (id, setup, front-ends, expectation, words). Expectations: "exact" (HOOK_MASK reconfigures and
# matches apply_mask on a copy, hooks included), "pinned:<group>,..." (the channels the hook
# sees are pinned: masking any of those groups is a MaskError with the words; the rest of
# HOOK_MASK, and the empty mask, are exact), "refused" (a TraceError with the words).
HOOKS: list[tuple[str, Any, tuple[str, ...], str, tuple[str, ...]]] = [
    # the model itself: its hooks are traced around forward (fx did not run them at all)
    ("root-forward-hook", _hook("", "fwd", double_output), ("fx", "export"), "exact", ()),
    ("root-pre-hook", _hook("", "pre", shift_input), ("fx", "export"), "exact", ()),
    ("root-pre-hook-kwargs", _hook("", "pre", shift_input_kwargs, with_kwargs=True), ("fx", "export"), "exact", ()),
    ("root-forward-hook-kwargs", _hook("", "fwd", double_output_kwargs, with_kwargs=True), ("fx", "export"), "exact", ()),
    ("root-forward-hook-always-call", _hook("", "fwd", double_output, always_call=True), ("fx", "export"), "exact", ()),
    ("root-hook-an-object", _hook("", "fwd", functools.partial(double_output)), ("fx", "export"), "exact", ()),
    ("root-observer", _hook("", "fwd", count_calls), ("fx", "export", "auto"), "refused", ("the model itself (_Hooked)", "`count_calls`", "returns nothing", "register it on the result")),
    ("root-observer-reads-values", _hook("", "fwd", record_shape), ("fx",), "refused", ("the model itself (_Hooked)", "`record_shape`", "fails on the trace's symbolic values", "Proxy")),
    ("root-observer-reads-values", _hook("", "fwd", record_shape), ("export",), "refused", ("the model itself (_Hooked)", "`record_shape`", "returns nothing")),
    ("root-pre-observer", _hook("", "pre", record_pre), ("fx", "export"), "refused", ("the model itself", "forward pre-hook `record_pre`")),
    ("root-returns-output-unchanged", _hook("", "fwd", pass_through), ("fx", "export"), "refused", ("`pass_through`", "its input unchanged")),
    ("root-backward-hook", _hook("", "bwd", grad_hook), ("fx", "export"), "refused", ("the model itself", "backward hook `grad_hook`")),
    # a traced submodule: its hooks are inlined by the trace
    ("block-hook-closes-over-gain", _hook("block", "fwd", scale_by_gain(8)), ("fx",), "exact", ()),
    ("block-hook-closes-over-gain", _hook("block", "fwd", scale_by_gain(8)), ("export",), "pinned:block.0", ("fixed-size", "'block'")),
    ("block-pre-hook", _hook("block", "pre", shift_input), ("fx", "export"), "exact", ()),
    ("block-hook-object", _hook("block", "fwd", _Scaler(8)), ("fx",), "exact", ()),
    ("block-observer", _hook("block", "fwd", count_calls), ("fx", "export", "auto"), "refused", ("module 'block'", "`count_calls`", "leaf_modules=['block']")),
    ("block-observer-item", _hook("block", "fwd", lambda m, a, o: CALLS.append(o.mean().item())), ("fx", "export"), "refused", ("module 'block'", "`<lambda>`", "returns nothing")),
    ("block-backward-hook", _hook("block", "bwd", grad_hook), ("fx", "export", "auto"), "refused", ("module 'block'", "backward hook `grad_hook`")),
    ("block-backward-pre-hook", _hook("block", "bwd-pre", lambda m, g: None), ("fx", "export"), "refused", ("module 'block'", "backward pre-hook")),
    # a leaf module: the reconfigured model calls its copy, hooks included; what they see is pinned
    ("leaf-hook-closes-over-gain", _hook("conv2", "fwd", scale_by_gain(6)), ("fx",), "pinned:conv2,block.0", ("forward hook `scale`", "module 'conv2'", "remove the hook")),
    ("leaf-hook-closes-over-gain", _hook("conv2", "fwd", scale_by_gain(6)), ("export",), "pinned:conv2", ("fixed-size", "'conv2'")),
    ("leaf-hook-object", _hook("conv2", "fwd", _Scaler(6)), ("fx",), "pinned:conv2,block.0", ("forward hook `_Scaler`", "'conv2'")),
    ("leaf-observer", _hook("conv2", "fwd", record_shape), ("fx",), "pinned:conv2,block.0", ("forward hook `record_shape`", "'conv2'")),
    ("leaf-observer-on-bn", _hook("bn2", "fwd", record_shape), ("fx",), "pinned:conv2", ("forward hook `record_shape`", "'bn2'")),
    ("leaf-observer", _hook("conv2", "fwd", record_shape), ("export",), "refused", ("module 'conv2'", "`record_shape`", "frontend='fx'")),
    ("leaf-pre-hook-pins-its-input", _hook("conv2", "pre", shift_input), ("fx",), "pinned:block.0", ("forward pre-hook `shift_input`", "'conv2'")),
    ("leaf-pre-hook-closes-over-gain", _hook("conv2", "pre", lambda m, a: (a[0] * _gain(8),)), ("fx",), "pinned:block.0", ("forward pre-hook", "'conv2'")),
    ("leaf-backward-hook", _hook("conv2", "bwd", grad_hook), ("fx",), "pinned:conv2,block.0", ("backward hook `grad_hook`", "'conv2'")),
    ("leaf-backward-pre-hook", _hook("bn2", "bwd-pre", lambda m, g: None), ("fx",), "pinned:conv2", ("backward pre-hook `<lambda>`", "'bn2'")),
    ("leaf-backward-hook", _hook("conv2", "bwd", grad_hook), ("export",), "refused", ("module 'conv2'", "backward hook")),
    ("leaf-in-block-hook", _hook("block.0", "fwd", scale_by_gain(8)), ("fx",), "pinned:block.0", ("forward hook `scale`", "'block.0'")),
]


def _hook_dicts(model: nn.Module) -> list[tuple[str, str, int, list[Any]]]:
    attrs = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [(n, a, id(getattr(m, a)), list(getattr(m, a).items())) for n, m in model.named_modules() for a in attrs]


def _reconfigure_exact(model: nn.Module, mask: dict[str, Any], frontend: str) -> nn.Module:
    """Reconfigure, check against apply_mask on a copy (hooks included), return the result."""
    small = prunefx.reconfigure(model, mask, example_inputs=X, frontend=frontend)
    ref = copy.deepcopy(model)
    prunefx.apply_mask(ref, mask, example_inputs=X, frontend=frontend)
    with torch.no_grad():
        assert max_rel_diff(small(X), ref(X)) < 1e-5
    return small


@pytest.mark.parametrize("setup, frontend, expect, words", [
    pytest.param(s, fe, e, w, id=f"{i}-{fe}") for i, s, fes, e, w in HOOKS for fe in fes
])
def test_hooks_are_kept_or_refused(setup, frontend: str, expect: str, words: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    model = randomize_norms(_Hooked()).eval()
    setup(model)
    before, hooks = state_copy(model), _hook_dicts(model)
    try:
        if expect == "refused":
            with pytest.raises(prunefx.PruneFxError) as info:
                prunefx.reconfigure(model, HOOK_MASK, example_inputs=X, frontend=frontend)
            msg = str(info.value)
            assert "\n" not in msg and all(w in msg for w in words), msg
        elif expect == "exact":
            _reconfigure_exact(model, HOOK_MASK, frontend)
            _reconfigure_exact(model, {}, frontend)  # an empty mask: the result is the model, hooks included
        else:
            pinned = expect.split(":")[1].split(",")
            for group in pinned:
                with pytest.raises(prunefx.MaskError) as info:
                    prunefx.reconfigure(model, {group: HOOK_MASK[group]}, example_inputs=X, frontend=frontend)
                msg = str(info.value)
                assert "\n" not in msg and f"group '{group}'" in msg and "pinned" in msg and all(w in msg for w in words), msg
            _reconfigure_exact(model, {k: v for k, v in HOOK_MASK.items() if k not in pinned}, frontend)
            _reconfigure_exact(model, {}, frontend)
    finally:
        CALLS.clear()
    assert unchanged(model, before)
    assert _hook_dicts(model) == hooks  # the same hook dicts, holding the same hooks


def test_leaf_hooks_run_in_the_reconfigured_model() -> None:
    """A leaf module's observer and gradient hooks keep running, at the width they were
    written for, in the reconfigured model."""
    torch.manual_seed(0)
    model = randomize_norms(_Hooked()).eval()
    model.bn2.register_forward_hook(record_shape)
    model.bn2.register_full_backward_hook(grad_hook)
    small = _reconfigure_exact(model, {"block.0": HOOK_MASK["block.0"]}, "fx")
    CALLS.clear()
    try:
        small(X.clone().requires_grad_()).sum().backward()
        assert CALLS == [(2, 6, 8, 8), (2, 6, 8, 8)]  # forward hook, then the backward hook
    finally:
        CALLS.clear()


@pytest.mark.parametrize("where, hook, kind, mask, exact", [
    pytest.param("", double_output, "fwd", HOOK_MASK, True, id="model-hook"),
    pytest.param("block", shift_input, "pre", HOOK_MASK, True, id="block-pre-hook"),
    pytest.param("bn2", double_output, "fwd", {"block.0": HOOK_MASK["block.0"]}, True, id="leaf-hook"),
    pytest.param("block", scale_by_gain(8), "fwd", HOOK_MASK, False, id="block-hook-closes-over-gain"),
])
def test_hooks_with_the_module_emitter(where: str, hook: Any, kind: str, mask: dict[str, Any], exact: bool) -> None:
    """emit="module" copies the model with its hooks, which then run on the pruned tensors:
    exact where the graph says so; a copied hook that cannot follow (a channel-sized tensor
    it closes over) is the emitter's ReconfigureError, naming the line."""
    torch.manual_seed(0)
    model = randomize_norms(_Hooked()).eval()
    m = model.get_submodule(where)
    (m.register_forward_hook if kind == "fwd" else m.register_forward_pre_hook)(hook)
    before = state_copy(model)
    if exact:
        small = prunefx.reconfigure(model, mask, example_inputs=X, emit="module")
        assert type(small) is _Hooked
        check_against_apply_mask(model, small, mask, X)
    else:
        with pytest.raises(prunefx.ReconfigureError) as info:
            prunefx.reconfigure(model, mask, example_inputs=X, emit="module")
        assert "out * gain" in str(info.value), str(info.value)
    assert unchanged(model, before)


def _replace_forward(where: str) -> Any:
    def setup(model: nn.Module) -> None:
        m = model.get_submodule(where)
        original = m.forward
        m.forward = lambda *a: torch.tanh(original(*a)) * 0.5  # on the instance, not the class (0 stays 0: exact)
    return setup


@pytest.mark.filterwarnings("ignore:prunefx. .*forward replaced on the instance")
@pytest.mark.parametrize("frontend", ["fx", "export", "auto"])
@pytest.mark.parametrize("where, mask", [
    pytest.param("", HOOK_MASK, id="the-model"),
    pytest.param("conv2", {"block.0": HOOK_MASK["block.0"]}, id="a-leaf"),
    pytest.param("block.0", {"conv2": HOOK_MASK["conv2"]}, id="a-leaf-in-a-block"),
    pytest.param("block", HOOK_MASK, id="a-traced-block"),
])
def test_forward_replaced_on_the_instance(where: str, mask: dict[str, Any], frontend: str) -> None:
    """fx traces the class's forward and calls a copy of a leaf: a forward set on the
    instance is a TraceError there (unless fx traces it: a non-leaf module); torch.export,
    and "auto" through it, run the instance's forward exactly."""
    def build() -> nn.Module:
        torch.manual_seed(0)
        model = randomize_norms(_Hooked()).eval()
        _replace_forward(where)(model)
        return model

    model = build()
    before = state_copy(model)
    if frontend == "fx" and where != "block":
        with pytest.raises(prunefx.TraceError) as info:
            prunefx.reconfigure(model, mask, example_inputs=X, frontend=frontend)
        msg = str(info.value)
        assert "\n" not in msg and "forward replaced on the instance" in msg and "frontend='export'" in msg, msg
        assert (f"module '{where}'" if where else "the model itself") in msg, msg
    else:
        small = prunefx.reconfigure(model, mask, example_inputs=X, frontend=frontend)
        ref = build()  # a deepcopy would keep calling the original's forward
        prunefx.apply_mask(ref, mask, example_inputs=X, frontend="export" if frontend == "auto" else frontend)
        with torch.no_grad():
            assert max_rel_diff(small(X), ref(X)) < 1e-5
    assert unchanged(model, before)


@pytest.mark.parametrize("where", ["conv2", "block.0", "fc"])
def test_torch_prune_hooks_are_left_to_their_own_refusal(where: str) -> None:
    """torch.nn.utils.prune's forward pre-hooks neither pin channels nor are traced: the
    masks interop reads them through the trace, and reconfigure refuses them by name."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = randomize_norms(_Hooked()).eval()
    prune.l1_unstructured(model.get_submodule(where), "weight", amount=0.3)
    graph = prunefx.trace(model, X)
    assert all(g.prunable for g in graph.groups if g.name in HOOK_MASK)
    before = state_copy(model)
    with pytest.raises(prunefx.MaskError, match="torch.nn.utils.prune"):
        prunefx.reconfigure(model, HOOK_MASK, example_inputs=X)
    assert unchanged(model, before)


def test_hooks_on_the_model_are_traced_for_inspect_and_trace() -> None:
    torch.manual_seed(0)
    model = randomize_norms(_Hooked()).eval()
    model.register_forward_hook(double_output)
    graph = prunefx.trace(model, X)
    assert all(g.prunable and g.exact for g in graph.groups if g.name in HOOK_MASK)
    assert any(loc.code == "return out * 2 + 1" for loc in graph.traced.sources.values())  # the hook's own line
    assert "prunable" in str(prunefx.inspect(model, X))


# ============================================================================= custom autograd Functions

class _CubeGrad(torch.autograd.Function):
    """Forward x * x, backward 3 * x * g: a custom backward that is not the forward's
    derivative (a straight-through estimator, say)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.scale = scale
        return x * x * scale

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return g * 3 * x * ctx.scale, None


class _WithFunction(nn.Module):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv1(x))
        if self.where == "middle":
            y = _CubeGrad.apply(y, 0.5)
        y = F.relu(self.bn2(self.conv2(y)))
        if self.where == "head":
            y = _CubeGrad.apply(y)
        if self.where == "checkpoint":  # torch's own Function (reentrant checkpoint): same gradients inlined
            y = torch.utils.checkpoint.checkpoint(torch.tanh, y, use_reentrant=True)
        return self.fc(y.mean((2, 3)))


def _grads(model: nn.Module) -> tuple[torch.Tensor, ...]:
    x = X.clone().requires_grad_()
    model(x).square().sum().backward()
    return (x.grad,)


@pytest.mark.parametrize("where, pinned, free", [
    pytest.param("middle", "conv1", "conv2", id="between-two-convs"),
    pytest.param("head", "conv2", "conv1", id="before-the-head"),
])
def test_custom_function_stays_opaque_with_fx(where: str, pinned: str, free: str) -> None:
    torch.manual_seed(0)
    model = randomize_norms(_WithFunction(where)).eval()
    before = state_copy(model)
    graph = prunefx.trace(model, X, frontend="fx")
    group = graph.group_of(pinned)
    assert not group.prunable and "_CubeGrad.apply" in group.reason and "test_adversarial.py" in group.reason, group.reason
    with pytest.raises(prunefx.MaskError, match="_CubeGrad.apply"):
        prunefx.reconfigure(model, {pinned: torch.ones(graph.group(pinned).size, dtype=torch.bool).index_fill(0, torch.tensor([1]), False)}, example_inputs=X)
    mask = {free: torch.arange(graph.group(free).size) % 3 != 1}
    small = prunefx.reconfigure(model, mask, example_inputs=X, frontend="fx")
    ref = copy.deepcopy(model)
    prunefx.apply_mask(ref, mask, example_inputs=X, frontend="fx")
    with torch.no_grad():
        assert max_rel_diff(small(X), ref(X)) < 1e-5
    (g_small,), (g_ref,) = _grads(small), _grads(ref)
    assert max_rel_diff(g_small, g_ref) < 1e-5  # the custom backward ran in both
    assert unchanged(model, before)


@pytest.mark.parametrize("where", ["middle", "head"])
def test_custom_function_is_refused_by_export(where: str) -> None:
    torch.manual_seed(0)
    model = randomize_norms(_WithFunction(where)).eval()
    before, original = state_copy(model), torch.autograd.Function.__dict__["apply"]
    with pytest.raises(prunefx.TraceError) as info:
        prunefx.trace(model, X, frontend="export")
    msg = str(info.value)
    assert "\n" not in msg and "_CubeGrad" in msg and "test_adversarial.py:" in msg and "frontend='fx'" in msg, msg
    assert unchanged(model, before)
    assert torch.autograd.Function.__dict__["apply"] is original


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_torch_internal_function_is_inlined_exactly() -> None:
    torch.manual_seed(0)
    model = randomize_norms(_WithFunction("checkpoint")).eval()
    mask = {"conv2": bools(0, 1, 1, 0, 1, 1), "conv1": bools(1, 0, 1, 1, 0, 1, 0, 1)}
    small = _reconfigure_exact(model, mask, "fx")
    ref = copy.deepcopy(model)
    prunefx.apply_mask(ref, mask, example_inputs=X)
    assert max_rel_diff(_grads(small)[0], _grads(ref)[0]) < 1e-5


def test_function_apply_is_restored_after_a_failing_trace() -> None:
    original = torch.autograd.Function.__dict__["apply"]

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _CubeGrad.apply(x) if x.sum() > 0 else x  # control flow on a proxy: fx cannot trace it

    with pytest.raises(prunefx.TraceError):
        prunefx.trace(Broken(), X, frontend="fx")
    assert torch.autograd.Function.__dict__["apply"] is original
    assert torch.equal(_CubeGrad.apply(torch.ones(2)), torch.ones(2))


# ============================================================================= re-parametrised weights

def _reparam(how: str) -> Any:
    from torch.nn.utils import parametrizations

    return {
        "weight-norm": lambda m: parametrizations.weight_norm(m.conv2),
        "spectral-norm": lambda m: parametrizations.spectral_norm(m.conv2),
        "orthogonal-fc": lambda m: parametrizations.orthogonal(m.fc),
        "weight-norm-in-block": lambda m: parametrizations.weight_norm(m.block[0]),
        "old-weight-norm": lambda m: torch.nn.utils.weight_norm(m.conv2),
        "old-spectral-norm": lambda m: torch.nn.utils.spectral_norm(m.conv2),
    }[how]


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
@pytest.mark.parametrize("frontend", ["fx", "export", "auto"])
@pytest.mark.parametrize("how, words", [
    pytest.param("weight-norm", ("module 'conv2'", "_WeightNorm", "'weight'", "remove_parametrizations"), id="weight-norm"),
    pytest.param("spectral-norm", ("module 'conv2'", "_SpectralNorm", "remove_parametrizations"), id="spectral-norm"),
    pytest.param("orthogonal-fc", ("module 'fc'", "_Orthogonal"), id="orthogonal"),
    pytest.param("weight-norm-in-block", ("module 'block.0'", "_WeightNorm"), id="weight-norm-in-a-block"),
    pytest.param("old-weight-norm", ("module 'conv2'", "remove_weight_norm"), id="old-weight-norm"),
    pytest.param("old-spectral-norm", ("module 'conv2'", "remove_spectral_norm"), id="old-spectral-norm"),
])
@pytest.mark.parametrize("entry", ["trace", "reconfigure"])
def test_reparametrized_weight_is_refused(how: str, words: tuple[str, ...], frontend: str, entry: str) -> None:
    torch.manual_seed(0)
    model = randomize_norms(_Hooked()).eval()
    _reparam(how)(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before, opt_before = state_copy(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(prunefx.PruneFxError) as info:
        if entry == "trace":
            prunefx.trace(model, X, frontend=frontend)
        else:
            prunefx.reconfigure(model, HOOK_MASK, example_inputs=X, frontend=frontend, optimizer=opt)
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert unchanged(model, before) and str(opt.state_dict()) == str(opt_before)


class _WithScripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), torch.jit.script(nn.Conv2d(8, 4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("frontend", ["fx", "export", "auto"])
@pytest.mark.parametrize("how, words", [
    pytest.param("lazy", ("module '0' is a lazy LazyConv2d", "parameters are not created yet", "model(x)"), id="lazy-not-run"),
    pytest.param("scripted-submodule", ("module 'b' is a TorchScript module (RecursiveScriptModule)", "script it again"),
                 id="scripted-submodule"),
    pytest.param("scripted-model", ("got a TorchScript module (RecursiveScriptModule)", "script the pruned result"),
                 id="scripted-model"),
])
@pytest.mark.parametrize("entry", ["trace", "reconfigure"])
def test_a_module_prunefx_cannot_read_is_refused(how: str, words: tuple[str, ...], frontend: str, entry: str) -> None:
    """A lazy module that has not run has no weights to slice; a TorchScript module can be
    neither traced into nor copied: one line saying what to do, and nothing changes."""
    torch.manual_seed(0)
    model = {
        "lazy": lambda: nn.Sequential(nn.LazyConv2d(8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)),
        "scripted-submodule": _WithScripted,
        "scripted-model": lambda: torch.jit.script(_WithScripted()),
    }[how]().eval()
    before = None if how == "lazy" else state_copy(model)
    with pytest.raises(prunefx.PruneFxError) as info:
        if entry == "trace":
            prunefx.trace(model, X, frontend=frontend)
        else:
            prunefx.reconfigure(model, {}, example_inputs=X, frontend=frontend)
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    if how == "lazy":
        assert model[0].has_uninitialized_params()
    else:
        assert unchanged(model, before)


@pytest.mark.parametrize("case", ["leaf-hook", "custom-function"])
def test_kept_hooks_and_functions_survive_checkpoint_and_copy(case: str) -> None:
    """The reconfigured model holds hook markers or opaque Functions: prunefx.state_dict and
    load_state_dict rebuild it, and deepcopy copies it (pickling it whole does not work: its
    graph calls objects that are not importable by name)."""
    def build() -> nn.Module:
        torch.manual_seed(0)
        if case == "leaf-hook":
            model = randomize_norms(_Hooked()).eval()
            model.bn2.register_forward_hook(double_output)
            return model
        return randomize_norms(_WithFunction("middle")).eval()

    import io

    mask = {"block.0": HOOK_MASK["block.0"]} if case == "leaf-hook" else {"conv2": bools(0, 1, 1, 0, 1, 1)}
    small = _reconfigure_exact(build(), mask, "fx")
    buf = io.BytesIO()
    torch.save(prunefx.state_dict(small), buf)
    buf.seek(0)
    rebuilt = prunefx.load_state_dict(build(), torch.load(buf, weights_only=True)).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(X), small(X))
        assert torch.equal(copy.deepcopy(small)(X), small(X))


def test_baked_weight_norm_prunes() -> None:
    """What the refusal says to do works: bake the weight, reconfigure, apply it again."""
    from torch.nn.utils import parametrizations, parametrize

    torch.manual_seed(0)
    model = randomize_norms(_Hooked()).eval()
    parametrizations.weight_norm(model.conv2)
    parametrize.remove_parametrizations(model.conv2, "weight")
    small = _reconfigure_exact(model, HOOK_MASK, "fx")
    parametrizations.weight_norm(small.conv2)
    with torch.no_grad():
        assert small(X).shape == (2, 4)


# ============================================================================= optimizers

class _FlatState(torch.optim.Optimizer):
    """SGD keeping its momentum flattened: state no channel can index."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                st["flat"] = st.get("flat", torch.zeros(p.numel())) * 0.9 + p.grad.flatten()
                p.sub_(g["lr"] * st["flat"].view_as(p))


OPTIMIZERS: list[tuple[str, Any]] = [
    ("adafactor", lambda ps: torch.optim.Adafactor(ps, lr=0.01)),
    ("adafactor-weight-decay", lambda ps: torch.optim.Adafactor(ps, lr=0.01, weight_decay=0.1)),
    ("adam", lambda ps: torch.optim.Adam(ps, lr=0.01)),
    ("sgd-momentum", lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)),
    ("rmsprop", lambda ps: torch.optim.RMSprop(ps, lr=0.01)),
]


def _trained(make_opt: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make().train()
    opt = make_opt(model.parameters())
    for _ in range(2):
        opt.zero_grad()
        model(X).square().mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("make_opt", [pytest.param(o, id=i) for i, o in OPTIMIZERS])
def test_optimizer_state_follows_and_the_next_step_runs(make_opt) -> None:
    model, opt = _trained(make_opt)
    old = {n: {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for n, p in model.named_parameters()}
    small = prunefx.reconfigure(model, CKPT_MASK, example_inputs=X, optimizer=opt)
    check_against_apply_mask(model.eval(), small.eval(), CKPT_MASK, X)
    small.train()
    kept = torch.nonzero(CKPT_MASK["conv1"]).flatten()
    state = opt.state[small.get_parameter("conv1.weight")]
    for k, v in old["conv1.weight"].items():  # sliced along the output channels, or reduced there and kept
        if v.dim() and v.shape[0] == 8:
            assert torch.equal(state[k], v[kept]), k
    opt.zero_grad()
    small(X).square().mean().backward()
    opt.step()  # shapes fit: the step runs
    assert all(p.isfinite().all() for p in small.parameters())


@pytest.mark.parametrize("case", ["flat-state", "another-model"])
def test_optimizer_that_cannot_follow_is_refused_unchanged(case: str) -> None:
    if case == "flat-state":
        model, opt = _trained(_FlatState)
        words: tuple[str, ...] = ("_FlatState", "'flat'", "conv1.weight", "optimizer=")
    else:
        model, _ = _trained(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
        _, opt = _trained(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
        words = ("SGD", "none of the reconfigured model's parameters")
    before, opt_before = state_copy(model), copy.deepcopy(opt.state_dict())
    params_before = [list(g["params"]) for g in opt.param_groups]
    with pytest.raises(prunefx.PruneFxError) as info:
        prunefx.reconfigure(model, CKPT_MASK, example_inputs=X, optimizer=opt)
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert unchanged(model, before) and str(opt.state_dict()) == str(opt_before)
    assert [list(g["params"]) for g in opt.param_groups] == params_before


# ============================================================================= graph= of another model

def test_foreign_graph_is_refused_by_the_guard() -> None:
    from prunefx.guards import refuse_foreign_graph

    model, other = make(), make()
    graph = prunefx.trace(other, X)
    refuse_foreign_graph(other, graph)  # its own graph: fine
    with pytest.raises(prunefx.MaskError) as info:
        refuse_foreign_graph(model, graph)
    msg = str(info.value)
    assert "\n" not in msg and "graph= was not traced from this model" in msg and "'conv1.weight'" in msg, msg
    with pytest.raises(prunefx.MaskError, match="has no tensor of that name"):
        refuse_foreign_graph(nn.Sequential(nn.Conv2d(3, 8, 3)), graph)


def test_foreign_graph_with_its_optimizer_is_refused_unchanged() -> None:
    model, opt = _trained(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    graph = prunefx.trace(make(), X)
    before, opt_before = state_copy(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(prunefx.PruneFxError) as info:
        prunefx.reconfigure(model, CKPT_MASK, graph=graph, optimizer=opt)
    assert "graph= was not traced from this model" in str(info.value)  # refused before the optimizer is read
    assert unchanged(model, before) and str(opt.state_dict()) == str(opt_before)


def test_foreign_graph_is_refused_by_reconfigure() -> None:
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # other weights than the instance the graph was traced from
    graph = prunefx.trace(make(), X)
    before = state_copy(model)
    with pytest.raises(prunefx.MaskError, match="graph= was not traced from this model"):
        prunefx.reconfigure(model, CKPT_MASK, graph=graph)
    assert unchanged(model, before)


def test_apply_mask_takes_the_graph_of_an_identical_copy_but_not_of_another_shape() -> None:
    """apply_mask zeroes model's own tensors; the graph only gives the structure."""
    model = make()
    graph = prunefx.trace(copy.deepcopy(model), X)
    got = prunefx.apply_mask(copy.deepcopy(model), CKPT_MASK, graph=graph)
    want = prunefx.apply_mask(copy.deepcopy(model), CKPT_MASK, example_inputs=X)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values(), strict=True))
    other = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(prunefx.MaskError, match="graph= was not traced from this model"):
        prunefx.apply_mask(other, {"0": bools(1, 0, 1, 1, 0, 1, 0, 1)}, graph=prunefx.trace(nn.Sequential(nn.Conv2d(3, 8, 5)), X))


# ============================================================================= grad mode and autocast blocks

class _ModeBlock(nn.Module):
    """A no-grad block (a stop-gradient) or a float32 autocast block in forward: fx runs it
    while tracing and records nothing of it."""

    def __init__(self, block: str) -> None:
        super().__init__()
        self.block = block
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        if self.block == "no_grad":
            with torch.no_grad():
                gate = torch.sigmoid(y)
        elif self.block == "decorator":
            gate = self._gate(y)
        elif self.block == "inference_mode":
            with torch.inference_mode():
                gate = torch.sigmoid(y)
            gate = gate.clone()  # a normal tensor again: a constant for autograd
        else:
            with torch.autocast(device_type="cpu", enabled=False):
                gate = torch.sigmoid(y.float())
        return self.fc((y * gate).mean((2, 3)))

    @torch.no_grad()
    def _gate(self, y: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(y)


@pytest.mark.parametrize("frontend", ["fx", "export", "auto"])
def test_an_inference_mode_block_is_refused_by_both_front_ends(frontend: str) -> None:
    """Neither fx nor torch.export records ``torch.inference_mode`` (the pruned graph would let
    gradients through the block): one line naming it, and torch.no_grad() as what to do."""
    model = randomize_norms(_ModeBlock("inference_mode")).train()
    before = state_copy(model)
    with pytest.raises(prunefx.guards.CaptureRefused, match=r"^_ModeBlock enters torch.inference_mode at .*test_adversarial.py:\d+ .*neither torch.fx "
                       r"nor torch.export records.*use torch.no_grad\(\) there") as info:
        prunefx.trace(model, X, frontend=frontend)
    assert "\n" not in str(info.value) and not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    assert unchanged(model, before)


@pytest.mark.parametrize("block", ["no_grad", "decorator", "autocast"])
def test_grad_mode_and_autocast_blocks_are_refused_by_fx_and_kept_by_auto(block: str) -> None:
    torch.manual_seed(0)
    model = randomize_norms(_ModeBlock(block)).train()
    what = "torch.autocast" if block == "autocast" else "grad mode"  # (a decorated method: at its call)
    with pytest.raises(prunefx.TraceError, match=rf"{what}.* at .*test_adversarial.py:\d+ .*cannot record.*frontend='export'"):
        prunefx.trace(model, X, frontend="fx")
    assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
    with pytest.warns(UserWarning, match="captured with torch.export"):
        graph = prunefx.trace(model, X)
    assert graph.frontend == "export"
    mask = {"conv": bools(1, 0, 1, 1, 0, 1, 1, 0)}
    small = prunefx.reconfigure(model, mask, graph=graph)
    ref = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph)
    (g_small,), (g_ref,) = _grads(small), _grads(ref)
    assert max_rel_diff(g_small, g_ref) < 1e-5  # the gradient stops at the no-grad block in both
