"""examples/prunetrain.py --smoke: the PruneTrain example end to end, as CI runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.xdist_group("example")
def test_prunetrain_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prunetrain.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "prunetrain.json").read_text())
    png = (out / "prunetrain.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) == {"dense", "prunetrain", "scratch"}
    assert all(len(r["epochs"]) == report["args"]["epochs"] for r in runs.values())
    changes = [e["reconfig"] for e in runs["prunetrain"]["epochs"] if e["reconfig"] and e["reconfig"]["changed"]]
    assert changes, "the smoke run's lasso is strong enough to kill channels within its epochs"
    for c in changes:  # folding keeps the function: validation loss is unchanged by a reconfiguration
        assert abs(c["test_loss_after"] - c["test_loss_before"]) <= 1e-3 * max(1.0, c["test_loss_before"]) + c["max_fold_residual"]
        assert c["params"][1] < c["params"][0]
    flops = [e["train_flops_per_step"] for e in runs["prunetrain"]["epochs"]]
    assert flops[-1] < flops[0] and all(b <= a for a, b in zip(flops, flops[1:], strict=False))
    assert report["summary"]["final_train_flops_ratio"] < 1.0
    archs = runs["prunetrain"]["architectures"]  # every architecture, timed side by side
    assert len(archs) == 1 + len(changes) and archs[0]["from_epoch"] == 0
    assert archs[-1]["train_flops_per_step"] < archs[0]["train_flops_per_step"] and all(a["step_time_ms"] > 0 for a in archs)
    # the from-scratch baseline trains the final PruneTrain architecture
    assert runs["scratch"]["final_channels"] == runs["prunetrain"]["final_channels"]
