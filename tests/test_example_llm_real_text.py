"""examples/llm_real_text.py --smoke: a small Llama trained on the standard library's sources,
pruned one-shot (Taylor, magnitude), fine-tuned, trained with PruneTrain and from scratch, as
CI runs it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"dense", "taylor", "magnitude", "finetuned", "dense_finetuned", "prunetrain", "scratch"}


@pytest.mark.xdist_group("example")
def test_llm_real_text_smoke(tmp_path: Path) -> None:
    out = tmp_path / "llm.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "llm_real_text.py"), "--smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    runs = r["runs"]
    assert set(runs) == VARIANTS
    assert "held-out perplexity" in proc.stdout and "tokens/s" in proc.stdout

    # the text is real and split by file: bytes of the stdlib's modules, held-out files apart
    corpus = r["corpus"]
    assert corpus["train_files"] > 100 and corpus["heldout_files"] > 10
    assert corpus["train_bytes"] > 1_000_000 and corpus["heldout_bytes"] > 100_000
    assert corpus["eval_tokens"] == r["setup"]["eval_windows"] * r["setup"]["seq"]

    for name, run in runs.items():  # byte perplexities: finite, above 1, and training beat chance (256)
        assert math.isfinite(run["ppl"]) and 1.0 < run["ppl"], (name, run)
    assert runs["dense"]["ppl"] < 256

    dense = runs["dense"]["params"]
    for name in ("taylor", "magnitude", "finetuned"):  # the 25% parameter budget, over heads and MLP channels
        assert runs[name]["params"] <= 0.8 * dense, (name, runs[name]["params"], dense)
        assert runs[name]["layer_sizes"] != runs["dense"]["layer_sizes"]
    best = r["best_one_shot"]
    assert best in ("taylor", "magnitude") and runs[best]["ppl"] == min(runs["taylor"]["ppl"], runs["magnitude"]["ppl"])
    assert runs["finetuned"]["layer_sizes"] == runs[best]["layer_sizes"]
    assert runs["finetuned"]["steps"] == runs["dense_finetuned"]["steps"] == r["setup"]["finetune_steps"]
    assert runs["dense_finetuned"]["params"] == dense
    for name, diff in r["checks"].items():  # the reconfigured model computes what the masked dense one does
        assert diff <= 1e-4, (name, diff)
    assert set(r["checks"]) == {"taylor_vs_masked_max_abs_diff", "magnitude_vs_masked_max_abs_diff"}

    # PruneTrain removed heads or MLP channels during training; scratch is its final architecture
    assert r["prunetrain_shrinks"], "the smoke run's lasso is strong enough to remove channels within its steps"
    assert runs["prunetrain"]["params"] < dense
    assert runs["prunetrain"]["layer_sizes"] == r["prunetrain_shrinks"][-1]["layer_sizes"]
    assert runs["scratch"]["layer_sizes"] == runs["prunetrain"]["layer_sizes"]
    assert runs["scratch"]["params"] == runs["prunetrain"]["params"]
    for heads, kv, mlp in runs["prunetrain"]["layer_sizes"]:
        assert heads % kv == 0 and kv >= 1 and mlp >= 1  # a removed slot is a KV head with its query heads

    assert set(r["tokens_per_second"]) == {"dense", best, "prunetrain"}
    assert all(v["wall"] > 0 and v["cpu"] > 0 for v in r["tokens_per_second"].values())
