"""The benchmark suite's quick mode as a CI check.

Runs ``python -m benchmarks --quick`` in-process into a temporary directory (never over
docs/) and fails when any reconfigured model it measured differs from the
``prunefx.apply_mask`` reference. Speeds are printed, never asserted: machines are noisy.
Torch-Pruning is left out (``--no-tp``): it is an optional benchmark dependency and would
only add time here.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `benchmarks` lives at the top of the repository, not in the package


@pytest.mark.xdist_group("bench")
def test_quick_benchmark_results_equal_apply_mask(tmp_path):
    from benchmarks import run_all
    from benchmarks.common import CHECKS, TOL

    docs_page = ROOT / "docs" / "performance.md"
    before = docs_page.stat().st_mtime_ns if docs_page.exists() else None

    status = run_all.main(["--quick", "--no-tp", "--threads", "1", "--out", str(tmp_path)])

    bad = [c for c in CHECKS if not c.ok]
    assert not bad, "reconfigured models differ from apply_mask: " + ", ".join(
        f"{c.benchmark}/{c.model} ({c.what}): {c.rel_err:.3g} > {TOL:g}" for c in bad)
    assert status == 0
    stages = {c.benchmark for c in CHECKS}
    assert {"latency", "scaling", "budget", "training", "onnx"} <= stages, stages

    page = (tmp_path / "performance.md").read_text()
    for section in ("## Goals", "## 1. Analysis + rewrite latency", "### Where prunefx's time goes",
                    "### The export front-end", "### Masks by cost", "## 2. Training speed", "## 3. Deployment", "## 4. Communication"):
        assert section in page
    goal = next(line for line in page.splitlines() if line.startswith("| to_budget(flops=0.5) on ViT-B/16"))
    assert "not measured" in goal, goal  # --quick measures no ViT-B/16: its row must not claim the goal
    for plot in ("perf_latency", "perf_scaling", "perf_training", "perf_onnx"):
        assert (tmp_path / "img" / f"{plot}.png").stat().st_size > 1000
    after = docs_page.stat().st_mtime_ns if docs_page.exists() else None
    assert after == before, "the quick mode must not overwrite docs/performance.md"


@pytest.mark.xdist_group("bench")
def test_the_check_catches_a_wrong_reconfiguration(monkeypatch):
    """The oracle the quick mode relies on must notice a rewrite that is off."""
    import torch

    import prunefx
    from benchmarks import common

    model = common.build("resnet18")
    x = torch.randn(1, 3, 64, 64)
    mask = prunefx.masks.random(prunefx.trace(model, x), 0.5, seed=0)
    real = prunefx.reconfigure

    def off_by_a_bias(*args, **kwargs):
        small = real(*args, **kwargs)
        with torch.no_grad():
            small.get_submodule("fc").bias.add_(1.0)
        return small

    monkeypatch.setattr(prunefx, "reconfigure", off_by_a_bias)
    n = len(common.CHECKS)
    try:
        assert not common.check_equivalent("test", "resnet18", "broken on purpose", model, mask, x).ok
        monkeypatch.setattr(prunefx, "reconfigure", real)
        assert common.check_equivalent("test", "resnet18", "as is", model, mask, x).ok
    finally:
        del common.CHECKS[n:]


@pytest.mark.xdist_group("bench")
def test_the_budget_stage_counts_real_reconfigures():
    """The column that says whether to_budget fell back to real reconfigurations must see them."""
    import importlib

    import torch

    import prunefx
    from benchmarks import budget, common

    graph = prunefx.trace(common.build("resnet18"), torch.randn(1, 3, 32, 32))
    reconf_mod = importlib.import_module("prunefx.reconfigure")
    for verify in (False, True):  # verify=True measures its result by a real reconfigure
        calls = [0]
        with budget.counting(reconf_mod, "make_plan", calls):
            prunefx.masks.to_budget(graph, "magnitude", flops=0.5, verify=verify)
        assert (calls[0] > 0) == verify, (verify, calls[0])
    assert reconf_mod.make_plan is importlib.import_module("prunefx.plan").make_plan  # unwrapped again
