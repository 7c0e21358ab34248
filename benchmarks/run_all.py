"""Run every benchmark and write ``performance.md`` and its plots.

    .venv/bin/python -m benchmarks                   # full run, writes docs/performance.md, docs/img/perf_*.png
    .venv/bin/python -m benchmarks --quick --out /tmp/perf   # CI mode: small models, few repeats
    make bench / make bench-quick

Stages (``--only`` picks some): ``latency`` (prunefx vs Torch-Pruning), ``scaling`` (time vs
graph size), ``stages`` (prunefx's time per pipeline stage), ``export`` (the export front-end vs torch.export's
capture), ``budget`` (``to_budget``'s time and how close it lands), ``training`` (step time vs FLOPs),
``onnx`` (ONNX Runtime), ``ddp`` (gradient bytes). Exit status 1 when any reconfigured model
differs from ``prunefx.apply_mask``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import (  # noqa: E402
    budget,
    communication,
    export_frontend,
    onnx_latency,
    profile_stages,
    reconfigure_latency,
    report,
    scaling,
    training,
)
from benchmarks.common import CHECKS, LoadMonitor, console, machine, quiet  # noqa: E402

__all__ = ["STAGES", "main"]

STAGES = ("latency", "scaling", "stages", "export", "budget", "training", "onnx", "ddp")
ROOT = Path(__file__).resolve().parent.parent
THREAD_MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small models and few repeats (< 3 min): the CI mode")
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="directory of performance.md; plots go to OUT/img")
    ap.add_argument("--only", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and ONNX Runtime intra-op threads (default 1: on a shared, loaded machine more "
                         "threads than free cores makes every parallel region wait for a descheduled thread)")
    ap.add_argument("--no-tp", action="store_true", help="leave Torch-Pruning out even if installed")
    ap.add_argument("--tp-timeout", type=float, help="seconds before a Torch-Pruning run counts as failed (60, quick 30)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    CHECKS.clear()
    load = LoadMonitor()
    quick = args.quick
    cmd = ".venv/bin/python -m benchmarks " + shlex.join(argv if argv is not None else sys.argv[1:])
    run = report.Run(quick=quick, command=cmd.strip(), machine=machine(), threads=torch.get_num_threads(),
                     started=time.strftime("%Y-%m-%d %H:%M", time.gmtime()), load="",
                     with_tp=reconfigure_latency.tp is not None and not args.no_tp)
    console.print(f"{run.machine}\nthreads {run.threads}, load {load.samples[0]:.2f}, output {args.out}")
    train_models = training.QUICK_MODELS if quick else training.MODELS

    stage_start = [time.perf_counter()]

    def done(stage: str) -> None:
        now = time.perf_counter()
        run.stage_seconds[stage] = now - stage_start[0]
        stage_start[0] = now
        load.sample()

    if "latency" in args.only:
        run.latency_repeats = 2 if quick else 5
        run.latency = reconfigure_latency.run(
            reconfigure_latency.QUICK_MODELS if quick else reconfigure_latency.MODELS, run.latency_repeats,
            with_tp=run.with_tp, tp_timeout=args.tp_timeout or (30 if quick else 60),
            on_row=lambda _: load.sample())
        done("latency")
        if not quick and run.with_tp and (os.cpu_count() or 1) > args.threads:
            # Torch-Pruning's time depends on the thread count far more than prunefx's: show it
            torch.set_num_threads(os.cpu_count() or 1)
            run.latency_threads = (torch.get_num_threads(), reconfigure_latency.run(
                THREAD_MODELS, run.latency_repeats, with_tp=True, tp_timeout=60, check=False))
            torch.set_num_threads(args.threads)
            done("latency, all threads")
    if "scaling" in args.only:
        known = {r.model: r for r in run.latency}
        run.scaling = scaling.run(scaling.QUICK_MODELS if quick else scaling.MODELS, 2 if quick else 5, known)
        done("scaling")
    if "stages" in args.only:
        run.stages_repeats = 2 if quick else 5
        run.stages = profile_stages.run(profile_stages.QUICK_MODELS if quick else profile_stages.MODELS,
                                        run.stages_repeats)
        done("stages")
    if "export" in args.only:
        run.export_repeats = 1 if quick else 3
        run.export = export_frontend.run(export_frontend.QUICK_LAYERS if quick else export_frontend.LAYERS,
                                         run.export_repeats)
        done("export")
    if "budget" in args.only:
        run.budget_repeats = 3 if quick else 5
        run.budget = budget.run(budget.QUICK_MODELS if quick else budget.MODELS, run.budget_repeats)
        done("budget")
    if "training" in args.only:
        run.training_repeats = 3 if quick else 10
        run.training = training.run(train_models, run.training_repeats)
        done("training")
        big = [r for r in run.training if r.model == "resnet50"]
        if big:
            with quiet():
                run.profile = training.op_profile(big[0])
            done("training profile")
    if "onnx" in args.only:
        run.onnx_options = (onnx_latency.Options(size=112, repeats=10, warmup=2, threads=args.threads) if quick
                            else onnx_latency.Options(repeats=20, warmup=3, threads=args.threads))
        run.onnx = onnx_latency.run(onnx_latency.QUICK_MODELS if quick else onnx_latency.MODELS, run.onnx_options)
        done("onnx")
    if "ddp" in args.only:
        run.ddp = communication.run(train_models)
        done("ddp")

    run.elapsed = time.perf_counter() - t0
    run.load = load.describe()
    page = report.write(run, args.out)
    for t in report.tables(run):
        t.print()
    bad = [c for c in CHECKS if not c.ok]
    console.print(f"wrote {page} in {run.elapsed / 60:.1f} min; load average {run.load}; "
                  f"{len(CHECKS) - len(bad)}/{len(CHECKS)} equivalence checks passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
