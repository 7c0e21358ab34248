"""Turn one run's results into ``performance.md`` and the ``img/perf_*.png`` plots beside it.

Everything on the page is computed from the run: the tables, the goal verdicts, the fits.
The prose only explains what was measured and how to read it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks import (  # noqa: E402
    budget,
    communication,
    export_frontend,
    onnx_latency,
    profile_stages,
    reconfigure_latency,
    scaling,
    training,
)
from benchmarks.common import CHECKS, TOL, Table, median  # noqa: E402

__all__ = ["Run", "write"]


@dataclasses.dataclass
class Run:
    quick: bool
    command: str
    machine: str
    threads: int
    started: str  # UTC date and time
    load: str
    elapsed: float = 0.0
    with_tp: bool = False
    latency_repeats: int = 0
    training_repeats: int = 0
    latency: list[reconfigure_latency.Row] = dataclasses.field(default_factory=list)
    scaling: list[scaling.Point] = dataclasses.field(default_factory=list)
    training: list[training.Result] = dataclasses.field(default_factory=list)
    profile: Table | None = None
    stages: list[profile_stages.Profile] = dataclasses.field(default_factory=list)
    stages_repeats: int = 0
    export: list[export_frontend.Row] = dataclasses.field(default_factory=list)
    export_repeats: int = 0
    budget: list[budget.Row] = dataclasses.field(default_factory=list)
    budget_repeats: int = 0
    onnx: list[onnx_latency.Row] = dataclasses.field(default_factory=list)
    onnx_options: onnx_latency.Options | None = None
    ddp: list[communication.Row] = dataclasses.field(default_factory=list)
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    latency_threads: tuple[int, list[reconfigure_latency.Row]] | None = None


# ---- goals ----------------------------------------------------------------------------------
def _floor_note(r: reconfigure_latency.Row) -> str:
    """How much of the 3x budget (a third of Torch-Pruning's time) the fx floor takes."""
    if not r.codegen:
        return ""
    budget = median(r.tp_total) / 3
    return f" (3x needs <= {budget * 1e3:.0f} ms; the fx floor alone takes {r.floor * 1e3:.0f} ms, {r.floor / budget:.0%} of it)"


def goals(run: Run) -> Table:
    t = Table("goals", ["goal", "measured", "reached?"])
    if run.latency and run.with_tp:
        done = [r for r in run.latency if r.speedup]
        failed = [r.model for r in run.latency if r.tp_error]
        worst = min(done, key=lambda r: r.speedup) if done else None
        measured = (f"lowest {worst.speedup:.1f}x ({worst.model}, wall) / "
                    f"{min(r.cpu_speedup for r in done):.1f}x (CPU time)" if worst else "no Torch-Pruning result")
        slower = [f"{r.model} {r.speedup:.1f}x" + _floor_note(r) for r in done if r.speedup < 3]
        if slower:
            measured += "; below 3x: " + ", ".join(slower)
        if failed:
            measured += f"; Torch-Pruning failed on {', '.join(failed)}"
        ok = bool(done) and min(r.speedup for r in done) >= 3
        t.add("prunefx trace+analysis+reconfigure >= 3x faster than Torch-Pruning on every model", measured,
              ("yes" if ok else "no") + (" (on every model Torch-Pruning could prune)" if failed and ok else ""))
    elif run.latency:
        t.add("prunefx >= 3x faster than Torch-Pruning", "torch_pruning not installed", "not measured")
    copied = [r for r in run.latency if r.copy]
    if copied:
        worst = max(copied, key=lambda r: r.copy_ratio)
        floor = ""
        if worst.codegen and worst.copy_ratio > 2:
            floor = (f" (its GraphModule's codegen and compile alone take {median(worst.codegen) / median(worst.copy):.1f}x "
                     "the copy)")
        t.add("reconfigure within 2x of a plain copy of the same kept bytes on every model",
              f"highest {worst.copy_ratio:.1f}x ({worst.model}){floor}; lowest {min(r.copy_ratio for r in copied):.1f}x",
              "yes" if worst.copy_ratio <= 2 else "no")
    if run.scaling:
        t.add(*scaling.goal(run.scaling, run.quick))
    if run.export:
        t.add(*export_frontend.goal(run.export))
    if run.budget:
        t.add(*budget.goal(run.budget, run.quick))
    for r in run.training:
        if r.model == "resnet50":
            e = r.efficiency(r.variants[1])
            t.add("training-step efficiency >= 0.8 for ResNet-50 at 50%", f"{e:.2f}", "yes" if e >= 0.8 else "no")
    limit = 3 if run.quick else 15
    t.add(f"{'--quick' if run.quick else 'full'} benchmark < {limit} min", f"{run.elapsed / 60:.1f} min",
          "yes" if run.elapsed < 60 * limit else "no")
    bad = [c for c in CHECKS if not c.ok]
    t.add(f"every prunefx result equals apply_mask (rel. tol {TOL:g})",
          f"{len(CHECKS) - len(bad)}/{len(CHECKS)} checks, worst {max((c.rel_err for c in CHECKS), default=0):.1e}",
          "yes" if not bad else "no: " + ", ".join(f"{c.benchmark}/{c.model}" for c in bad))
    return t


# ---- plots ----------------------------------------------------------------------------------
def _plot_latency(run: Run, path: Path) -> None:
    rows = run.latency
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [median(r.total) for r in rows], 0.4, label="prunefx trace+analysis+reconfigure")
    if run.with_tp:
        tp_t = [median(r.tp_total) if r.tp_total else 0 for r in rows]
        ax.barh([i - 0.2 for i in y], tp_t, 0.4, label="Torch-Pruning build_dependency+prune")
        for i, r in enumerate(rows):
            note = f"{r.speedup:.1f}x" if r.speedup else "TP failed"
            ax.text(max(median(r.total), tp_t[i]) * 1.1, i, note, va="center", fontsize=8)
    ax.set_yticks(list(y), [r.model for r in rows])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("seconds (median, log scale)")
    ax.set_title("analysis + rewrite latency, 50% random mask, 1x3x224x224")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_scaling(run: Run, path: Path) -> None:
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for what, marker in (("total", "o"), ("trace", "s")):
        f = scaling.fit(run.scaling, what)
        for fam, color in (("ResNet", "C0"), ("ViT", "C1")):
            pts = [p for p in run.scaling if p.family == fam]
            if pts:
                ax.scatter([p.nodes for p in pts], [median(getattr(p, what)) for p in pts], marker=marker, color=color,
                           label=f"{fam}, {'trace+analysis+reconfigure' if what == 'total' else 'trace+analysis'}")
        n = np.linspace(0, max(p.nodes for p in run.scaling) * 1.05, 50)
        ax.plot(n, f.slope * n + f.intercept, ls="-" if what == "total" else "--", color="gray",
                label=f"fit {what}: {f.slope * 1e3:.2f} ms/node + {f.intercept:.2f} s (R²={f.r2:.2f})")
    for p in run.scaling:
        ax.annotate(p.model, (p.nodes, median(p.total)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("fx graph nodes")
    ax.set_ylabel("seconds (median)")
    ax.set_title("prunefx time vs graph size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_training(run: Run, path: Path) -> None:
    labels, speed, flops = [], [], []
    for r in run.training:
        for v in r.variants[1:]:
            labels.append(f"{r.model}\n{v.label.replace('50% exact', '50%')}")
            speed.append(r.speedup(v))
            flops.append(r.flops_ratio(v))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4.2))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], flops, 0.4, label="training FLOPs ratio dense/small (the limit)")
    ax.bar([i + 0.2 for i in x], speed, 0.4, label="measured step speedup dense/small")
    for i in x:
        ax.text(i, max(flops[i], speed[i]) + 0.05, f"eff {speed[i] / flops[i]:.2f}", ha="center", fontsize=8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("x")
    ax.set_title("training step (fwd+bwd+SGD): speedup vs FLOPs limit")
    ax.set_ylim(0, max(flops + speed) * 1.3)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_onnx(run: Run, path: Path) -> None:
    rows = run.onnx
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows)), 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [median(r.dense_ms) for r in rows], 0.4, label="dense")
    ax.bar([i + 0.2 for i in x], [median(r.pruned_ms) for r in rows], 0.4, label="reconfigured")
    for i, r in enumerate(rows):
        ax.text(i, median(r.dense_ms) * 1.02, f"{r.speedup:.2f}x", ha="center", fontsize=8)
    ax.set_xticks(list(x), [f"{r.model}\n{r.provider}" for r in rows], fontsize=8)
    ax.set_ylabel("ms per run (median)")
    ax.set_title("ONNX Runtime latency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the page -------------------------------------------------------------------------------
def _scaling_text(run: Run) -> str:
    lines = []
    for what, label in (("trace", "trace+analysis"), ("total", "trace+analysis+reconfigure")):
        f = scaling.fit(run.scaling, what)
        verdict = "at most linear" if f.linear else "not shown to be at most linear"
        lines.append(f"- **{label}**: {f.slope * 1e3:.2f} ms per node + {f.intercept:.3f} s, R² = {f.r2:.3f}; "
                     f"fitted exponent of seconds ~ nodes^k: k = {f.exponent:.2f}, R² = {f.r2_power:.3f}. "
                     f"Verdict: {verdict} (rule: {scaling.Fit.RULE}).")
    for fam in ("ResNet", "ViT"):
        pts = sorted((p for p in run.scaling if p.family == fam), key=lambda p: p.nodes)
        if len(pts) >= 3:
            for what in ("trace", "total"):
                f = scaling.fit(pts, what)
                lines.append(f"- {fam} only, {what}: {f.slope * 1e3:.2f} ms per node + {f.intercept:.3f} s, "
                             f"R² = {f.r2:.3f}, k = {f.exponent:.2f} (R² {f.r2_power:.3f}) "
                             f"({'at most linear' if f.linear else 'not shown to be at most linear'}).")
        if len(pts) >= 2:
            a, b = pts[0], pts[-1]
            lines.append(f"- {fam}: {a.model} -> {b.model}: nodes x{b.nodes / a.nodes:.1f}, "
                         f"trace+analysis x{median(b.trace) / median(a.trace):.1f}, "
                         f"reconfigure x{median(b.reconfigure) / median(a.reconfigure):.1f} "
                         f"(parameters x{b.params / a.params:.1f}: reconfigure copies every kept weight, "
                         "so it follows the parameter count more than the node count).")
    return "\n".join(lines)


def _training_text(run: Run) -> str:
    out = []
    for r in run.training:
        if len(r.variants) > 2:
            a, b = r.variants[1], r.variants[2]
            gain = median(a.times) / median(b.times)
            out.append(f"- {r.model}: round_to=8 changes the step time by x{gain:.2f} "
                       f"(efficiency {r.efficiency(a):.2f} -> {r.efficiency(b):.2f}); "
                       + ("it helps." if r.efficiency(b) > r.efficiency(a) * 1.05 else
                          "within noise or worse: it does not help here."))
        else:
            out.append(f"- {r.model}: round_to=8 gives the same mask (every kept channel count at 50% is "
                       "already a multiple of 8), so there is nothing to gain.")
    return "\n".join(out)


def stages_section(run: Run) -> list[str]:
    """The per-stage profile of ``trace`` and ``reconfigure`` (``benchmarks/profile_stages.py``)."""
    return [
        "### Where prunefx's time goes, stage by stage",
        "",
        "`benchmarks/profile_stages.py`: the setting of section 1 (`trace`, then `reconfigure` with a "
        "50% random mask), every stage timed by wrapping the function that implements it "
        "(`tracing.symbolic_trace`, `tracing._trace_other_mode`, `shapes.propagate_shapes`, "
        "`analysis.analyze`, `analysis.build_groups`, `mask.resolve_mask`, `plan.make_plan`, "
        "`RewriteState.start`, each pass's `run` and `verify`, `GraphModule.recompile`). Times are "
        "exclusive (a stage excludes the wrapped stages it calls; `GraphModule codegen+compile` is "
        "Python code generation and `compile`/`exec` wherever it happens), so each phase's rows add "
        f"up to its total; `rest` is what no wrapped stage covers. Milliseconds, medians of {run.stages_repeats} "
        "repeats, and the share of the phase. `named_modules walks` counts calls of "
        "`nn.Module.named_modules` from the top of a module tree during one trace + reconfigure.",
        "",
        profile_stages.table(run.stages, run.stages_repeats).markdown(),
    ]


def export_section(run: Run) -> list[str]:
    """prunefx's analysis on the export front-end next to torch.export's capture."""
    return [
        "### The export front-end: prunefx's analysis vs torch.export's capture",
        "",
        "`benchmarks/export_frontend.py`: `prunefx.trace(model, (ids,), example_kwargs={\"use_cache\": False})` "
        "on tiny random-init `LlamaForCausalLM` configs (hidden 64, intermediate 96, 4 heads, 2 KV heads, "
        "vocab 128, `input_ids` 2x16), split by stage inside the same call: `torch.export.export` as the "
        "front-end calls it (dynamic batch and sequence, `strict=False`), the front-end's own work around it "
        "(guards, the GraphModule built from the exported program) and prunefx's analysis (shape "
        f"propagation, channel analysis, groups, heads kept whole). Medians of {run.export_repeats} "
        "repeat(s); the ratios are of medians.",
        "",
        export_frontend.table(run.export, run.export_repeats).markdown(),
    ]


def budget_section(run: Run) -> list[str]:
    """to_budget's time and how close the reconfigured model lands on the requested fraction."""
    return [
        "### Masks by cost: `to_budget`'s time and how close it lands",
        "",
        "`benchmarks/budget.py`: `prunefx.masks.to_budget(graph, \"magnitude\", flops=0.5)` (and `params=0.5`) "
        "in the setting of section 1, each call on a freshly traced graph (the trace is not timed; the first "
        "call on a graph also fills its lazy per-group state), the criterion's scores included. `achieved` is "
        "measured for real: the model reconfigured with the mask, its FLOPs counted by `prunefx.count_flops` "
        "on the same input (parameters by `prunefx.count_params`), over the dense model's; `error` = "
        "|achieved - target| / target. `real reconfigures per call` counts the reconfigurations `to_budget` "
        "made inside the timed call to measure its result (only when its analytic cost estimate is not exact, "
        f"`estimate exact` = no). Medians of {run.budget_repeats} calls; `spread` is (max-min)/median. "
        "A model whose mask has only exact groups is also checked against `apply_mask`.",
        "",
        budget.table(run.budget, run.budget_repeats).markdown(),
    ]


def write(run: Run, out: Path) -> Path:
    img = out / "img"
    img.mkdir(parents=True, exist_ok=True)
    parts = [
        "# Performance: prunefx against Torch-Pruning and against the FLOPs limit",
        "",
        "Generated by the benchmark suite in `benchmarks/` "
        "(one file per measurement, shared helpers in `benchmarks/common.py`). "
        "Everything on this page, numbers and verdicts, comes from one run on one machine:",
        "",
        f"    {run.command}",
        "",
        f"- date: {run.started} UTC; wall time of the whole run: {run.elapsed / 60:.1f} min"
        + (" (`--quick`)" if run.quick else ""),
        f"- machine: {run.machine}",
        f"- torch intra-op threads: {run.threads} (`torch.set_num_threads`; ONNX Runtime the same). "
        "One thread by default: on this shared 2-core machine, with two other training processes "
        "running, a ResNet-50 training step took 1.5 s with 1 thread and 2.7 to 4.4 s with 2 "
        "(each parallel region waits for whichever thread is descheduled); `--threads` changes it.",
        "- time per stage: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in run.stage_seconds.items()),
        f"- 1-minute load average during the run: {run.load} on {run.machine.split(' cores')[0].rsplit(', ', 1)[-1]} cores. "
        "The machine is shared: other sessions run tests on the same cores, so absolute times "
        "are noisy. Every comparison is made inside one repeat loop (the two sides alternate) and "
        "reported as a ratio of medians; trust the ratios and their order of magnitude, not the "
        "last digit of a time.",
        "",
        "`make bench` runs the same command; `make bench-quick` (`--quick`, a few small models and "
        "repeats, under 3 minutes) is what `tests/test_benchmarks.py` runs in CI, into a temporary "
        "directory. Every model measured below is first checked: its reconfigured model must "
        "compute what `prunefx.apply_mask` computes on a deepcopy (randomised BatchNorm statistics, "
        f"relative tolerance {TOL:g}); the command exits with status 1 and the test fails otherwise. "
        "Speeds are reported, never asserted.",
        "",
        "## Goals",
        "",
        goals(run).markdown(),
    ]
    if run.latency:
        _plot_latency(run, img / "perf_latency.png")
        parts += [
            "## 1. Analysis + rewrite latency vs Torch-Pruning",
            "",
            "Per model (torchvision, `weights=None`, `eval()`, one 1x3x224x224 input): prunefx "
            "`trace` (fx trace, shapes, channel analysis) and `reconfigure` with "
            "`prunefx.masks.random(graph, 0.5, seed=0)` over every prunable group; Torch-Pruning "
            "`MagnitudePruner(...)` (its constructor builds the `DependencyGraph`) and `pruner.step()` "
            "at `pruning_ratio=0.5`, the classifier ignored, attention declared with "
            "`num_heads={attention: heads}` (`nn.MultiheadAttention`; Swin's `qkv`) as in its ViT/Swin "
            "examples, on a fresh untimed deepcopy. When Torch-Pruning raises, returns a model that no "
            f"longer runs, or takes longer than the timeout, the row says so. Medians of {run.latency_repeats} "
            "repeats, the tools alternating inside each repeat; `spread` is the worst (max-min)/median "
            "of the row. `params kept` shows whether both tools removed the same amount: on the "
            "transformers Torch-Pruning, configured as above, removes far fewer parameters than "
            "prunefx (which also prunes the approximate residual stream), and on regnet_y_8gf the "
            "grouped convolutions are handled differently, so those rows are not like for like. "
            "`check rel err` is the "
            "equivalence check with a 50% mask over the exact groups. `copy of kept bytes` is the copy "
            "limit of `reconfigure`: the same kept bytes copied with one `index_select` per pruned dim of "
            "each tensor (a `clone` for the others), timed in the same repeat loop; `reconfigure / copy` "
            "is how far the rewrite is from it. `fx floor` is what any rewrite through torch.fx pays "
            "before doing work of its own: fx's plain `torch.fx.Tracer().trace(model)`, the reconfigured "
            "GraphModule's code generation and `compile` (`recompile()`) and that copy, each timed in "
            "the same loop; the goals table sets it against the 3x budget (a third of Torch-Pruning's "
            "time) where that is not met.",
            "",
            reconfigure_latency.table(run.latency, run.with_tp, run.latency_repeats).markdown(),
            "![latency](img/perf_latency.png)",
            "",
        ]
        if run.latency_threads:
            n, rows = run.latency_threads
            parts += [
                f"#### The same with {n} intra-op threads",
                "",
                f"The table above uses {run.threads} thread(s); here the same models with {n} threads, "
                "same run. Whether the thread count matters depends on the load: when other "
                "processes keep the cores busy, every parallel region waits for whichever of its "
                "threads the scheduler has taken off a core, and Torch-Pruning, which runs many small "
                "tensor ops (a real forward pass, importance scores, slicing), suffers far more than "
                "prunefx, which works mostly in Python and on meta tensors. An earlier run of this "
                "suite with 2 threads under a load average of 3 to 4 measured Torch-Pruning at 3.7 s "
                "on mobilenet_v2 and 4.8 s on efficientnet_b0 (14x and 8x prunefx's time), against "
                "0.2 s and 0.4 s with one thread on a quiet machine. The ratios of the main table, "
                "taken with one thread, are the fair comparison of the two tools' work.",
                "",
                reconfigure_latency.table(rows, True, run.latency_repeats).markdown(),
            ]
    if run.scaling:
        _plot_scaling(run, img / "perf_scaling.png")
        parts += [
            "### How prunefx's time grows with the graph",
            "",
            "prunefx alone (same input and mask) on ResNet-18/34/50/101/152 and ViT-B/16, ViT-L/16, "
            "ViT-H/14 (torchvision has no ViT-H/16); models of section 1 reuse its samples. "
            "Least-squares line `seconds = a * nodes + b` over all models and the exponent `k` of a "
            "power-law fit:",
            "",
            scaling.table(run.scaling).markdown(),
            _scaling_text(run),
            "",
            "![scaling](img/perf_scaling.png)",
            "",
        ]
    if run.stages:
        parts += stages_section(run)
    if run.export:
        parts += export_section(run)
    if run.budget:
        parts += budget_section(run)
    if run.training:
        _plot_training(run, img / "perf_training.png")
        parts += [
            "## 2. Training speed vs the FLOPs limit",
            "",
            "One SGD step (zero_grad, forward, cross-entropy, backward, `SGD(momentum=0.9).step()`) in "
            "train mode on a fixed random batch. `50% exact` reconfigures "
            "`prunefx.masks.random(graph, 0.5, exact_only=True)` (for ViT: heads and MLP channels; "
            "the residual stream is approximate and kept); `round_to=8` is the same with keep counts "
            "rounded to multiples of 8. Train FLOPs: `torch.utils.flop_counter.FlopCounterMode` around "
            "forward + backward. **efficiency = (dense time / small time) / (dense FLOPs / small FLOPs)**; "
            "1.0 is the FLOPs limit. Two untimed warm-up steps per variant, then "
            f"{run.training_repeats} repeats interleaved across the variants; medians.",
            "",
            "Memory: this machine has no GPU, and CPU allocators keep no peak statistic that torch "
            "exposes (`tracemalloc` does not see torch's allocations; the process RSS moves with the "
            "allocator's caching more than with the model). So the table reports what pruning "
            "changes and what can be counted exactly: `saved activations` = bytes of the distinct "
            "tensor storages autograd saves for backward in one step "
            "(`torch.autograd.graph.saved_tensors_hooks`, parameters excluded), the part of peak "
            "training memory that grows with the batch; and `params+grads+momentum` = 3x the "
            "parameter bytes. On CUDA `torch.cuda.max_memory_allocated` is recorded instead.",
            "",
            training.table(run.training, run.training_repeats).markdown(),
            "Does `round_to=8` help?",
            "",
            _training_text(run),
            "",
            "![training](img/perf_training.png)",
            "",
        ]
        if run.profile is not None:
            parts += [
                "### Where the ResNet-50 training step spends its time",
                "",
                "torch.profiler, self CPU time per aten op, dense vs `50% exact`. Convolutions (and "
                "their backward) shrink with the product of in and out channels, about 4x at 50%; "
                "elementwise ops (BatchNorm, ReLU, add, the SGD update, `zero_grad`) shrink only "
                "with the number of channels, about 2x, and input-side ops (the stem convolution, "
                "whose 3 input channels cannot be pruned, and the first max-pool) do not shrink at "
                "all. The more of the small model's time goes to the latter, the further its "
                "efficiency falls below 1.",
                "",
                run.profile.markdown(),
            ]
    if run.onnx:
        _plot_onnx(run, img / "perf_onnx.png")
        o = run.onnx_options
        parts += [
            "## 3. Deployment: ONNX Runtime",
            "",
            "`benchmarks/onnx_latency.py`: the dense and the reconfigured model (50% random mask over "
            "the exact groups) exported with `prunefx.export_onnx` (TorchScript exporter, verified in "
            "ONNX Runtime against PyTorch) and timed with `InferenceSession.run`, dense and pruned "
            f"alternating, batch {o.batch}x3x{o.size}x{o.size}; efficiency = speedup x FLOPs ratio.",
            "",
            onnx_latency.table(run.onnx, o).markdown(),
            "![onnx](img/perf_onnx.png)",
            "",
        ]
    if run.ddp:
        parts += [
            "## 4. Communication: gradient bytes per DDP step",
            "",
            "`prunefx.distributed.grad_bytes_per_step` (the parameter gradient bytes; it needs no "
            "process group) and, to confirm it, the bytes DDP itself hands to all-reduce, counted by a "
            "communication hook over one backward on a one-rank gloo group. Same masks as section 2. "
            "Every all-reduce algorithm moves bytes in proportion to this, so the ratio is the "
            "communication saving per step.",
            "",
            communication.table(run.ddp).markdown(),
        ]
    parts += [
        "## Equivalence checks of this run",
        "",
        _checks_table().markdown(),
        f"Generated {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC.",
        "",
    ]
    page = out / "performance.md"
    page.write_text("\n".join(parts))
    return page


def _checks_table() -> Table:
    t = Table("checks", ["benchmark", "model", "mask", "max rel diff vs apply_mask", "ok"])
    for c in CHECKS:
        t.add(c.benchmark, c.model, c.what, f"{c.rel_err:.1e}", "yes" if c.ok else "NO")
    return t


def tables(run: Run) -> Sequence[Table]:
    """The tables printed on stdout at the end of a run."""
    out = [goals(run)]
    if run.latency:
        out.append(reconfigure_latency.table(run.latency, run.with_tp, run.latency_repeats))
    if run.latency_threads:
        out.append(reconfigure_latency.table(run.latency_threads[1], True, run.latency_repeats))
    if run.scaling:
        out.append(scaling.table(run.scaling))
    if run.stages:
        out.append(profile_stages.table(run.stages, run.stages_repeats))
    if run.export:
        out.append(export_frontend.table(run.export, run.export_repeats))
    if run.budget:
        out.append(budget.table(run.budget, run.budget_repeats))
    if run.training:
        out.append(training.table(run.training, run.training_repeats))
    if run.profile is not None:
        out.append(run.profile)
    if run.onnx:
        out.append(onnx_latency.table(run.onnx, run.onnx_options))
    if run.ddp:
        out.append(communication.table(run.ddp))
    return out
