"""A small Llama trained here on real text, then made smaller every way prunefx offers:
held-out perplexity, parameters and tokens per second of each, side by side.

    .venv/bin/python examples/llm_real_text.py                  # the full run of docs/transformers.md
    .venv/bin/python examples/llm_real_text.py --smoke          # well under a minute, what CI runs
    .venv/bin/python examples/llm_real_text.py --json out.json  # also write the results as JSON

Text: the top-level modules of the running Python's standard library (``Lib/*.py``, the
files ``sysconfig.get_paths()["stdlib"]`` holds; about 4.7 MB for CPython 3.11), read as
bytes: nothing is downloaded. The files are sorted by name and every tenth one (the 1st,
11th, ...) is held out, so no held-out file is ever trained on. Tokens are bytes (vocabulary
256), so perplexity is per byte.

Model: ``transformers.LlamaForCausalLM`` from a small ``LlamaConfig`` (grouped-query
attention: 6 query heads over 3 KV heads of width 32, SwiGLU MLP, RoPE), random init, AdamW
with warm-up and cosine decay, the same batches for every run that trains from scratch.

The variants (every one evaluated on the same held-out windows):

- ``dense``: the model trained for ``--steps`` steps.
- ``taylor`` / ``magnitude``: the dense model with 25% of its parameters removed
  (``prunefx.masks.to_budget(graph, criterion, params=0.75, exact_only=True)``) over its exact
  groups: attention slots (a KV head with its query heads) and MLP channels. Taylor scores
  use the causal-LM loss on calibration batches from the training text; magnitude is the
  L1 norm. No training after pruning.
- ``finetuned``: the better of the two, fine-tuned for ``--finetune-steps`` steps.
- ``dense_finetuned``: the control for ``finetuned``: the dense model given the same extra
  steps (same batches, same schedule), so pruned + fine-tuned is compared at equal training.
- ``prunetrain``: PruneTrain from scratch for the same steps as ``dense``: AdamW plus the
  group lasso's proximal step over the same groups (``mode="proximal"``), the model shrunk
  every ``--shrink-every`` steps (dead heads and MLP channels removed, AdamW's state
  following); the lasso is switched off once the model is at most ``--target`` of the
  dense parameters, and training goes on at that size.
- ``scratch``: PruneTrain's final architecture, randomly initialised (a fresh
  ``LlamaForCausalLM`` reconfigured to those sizes, so it has transformers' own init) and
  trained like ``dense`` (Liu et al. 2019, "Rethinking the Value of Network Pruning").

Tokens per second: a forward pass over a batch of full windows (no cache), dense and pruned
models timed alternately, one thread, the median of ``--reps`` repetitions each.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

import prunefx
import prunefx.transformers

KW = {"use_cache": False}  # transformers' keyword inputs for every trace (the export front-end)


@dataclass(frozen=True)
class Setup:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    seq: int
    batch: int
    steps: int
    finetune_steps: int
    lr: float
    finetune_lr: float
    eval_windows: int
    calib_batches: int
    shrink_every: int
    lam: float
    reps: int


FULL = Setup(hidden=192, intermediate=512, layers=4, heads=6, kv_heads=3, seq=128, batch=16, steps=500,
             finetune_steps=100, lr=3e-3, finetune_lr=1e-3, eval_windows=256, calib_batches=4, shrink_every=10,
             lam=1.5, reps=7)
# small enough for CI, strong enough a lasso that PruneTrain removes channels within its steps
SMOKE = Setup(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, seq=32, batch=4, steps=12,
              finetune_steps=4, lr=3e-3, finetune_lr=1e-3, eval_windows=8, calib_batches=1, shrink_every=4,
              lam=200.0, reps=3)


# ----------------------------------------------------------------------------- text


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # int64 byte ids
    heldout: torch.Tensor
    source: str
    train_files: int
    heldout_files: int


def load_corpus() -> Corpus:
    """The stdlib's top-level modules, sorted; every tenth file held out. Files are joined
    with a newline, as bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if len(files) < 20:
        raise SystemExit(f"expected the standard library's sources in {root}, found {len(files)} .py files")
    held = [f for i, f in enumerate(files) if i % 10 == 0]
    kept = [f for i, f in enumerate(files) if i % 10 != 0]

    def stream(fs: list[Path]) -> torch.Tensor:
        data = b"\n".join(f.read_bytes() for f in fs)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    return Corpus(stream(kept), stream(held), f"{root}/*.py (Python {platform.python_version()})", len(kept), len(held))


def train_batch(corpus: Corpus, s: Setup, step: int, seed: int) -> torch.Tensor:
    """Step ``step``'s batch: random windows of the training text, the same for every run."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(corpus.train) - s.seq, (s.batch,), generator=g)
    return torch.stack([corpus.train[i:i + s.seq] for i in starts.tolist()])


def eval_windows(corpus: Corpus, s: Setup) -> torch.Tensor:
    """``eval_windows`` non-overlapping windows spread evenly over the held-out text."""
    n = len(corpus.heldout) // s.seq
    picks = torch.linspace(0, n - 1, min(s.eval_windows, n)).long()
    return torch.stack([corpus.heldout[i * s.seq:(i + 1) * s.seq] for i in picks.tolist()])


# ----------------------------------------------------------------------------- model and training


def llama(s: Setup, seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=s.hidden, intermediate_size=s.intermediate,
                                   num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                   num_key_value_heads=s.kv_heads, max_position_embeddings=max(256, s.seq))
    return transformers.LlamaForCausalLM(cfg)


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, chunk: int = 32) -> float:
    """exp of the mean next-byte cross-entropy over every held-out window (equal-size chunks'
    means averaged with their token counts as weights)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for w in windows.split(chunk):
        n = w.shape[0] * (w.shape[1] - 1)
        total += float(model(input_ids=w, labels=w, **KW).loss) * n
        count += n
    model.train(was)
    return math.exp(total / count)


def schedule(steps: int, warmup: int, floor: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``floor`` of the peak learning rate."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return factor


def optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


@dataclass
class Run:
    ppl: float
    params: int
    layer_sizes: list[tuple[int, int, int]]
    steps: int
    cpu_seconds: float  # CPU time of this process: other processes on the machine do not count
    note: str = ""


def sizes(model: torch.nn.Module) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, MLP channels) of every layer."""
    return [(z.num_attention_heads, z.num_key_value_heads, z.intermediate_size) for z in prunefx.transformers.layer_sizes(model)]


def train(model: torch.nn.Module, corpus: Corpus, s: Setup, steps: int, lr: float, seed: int,
          first_step: int = 0) -> float:
    """Plain AdamW on the causal-LM loss; returns the last loss."""
    opt = optimizer(model, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps, max(1, steps // 20)))
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        x = train_batch(corpus, s, first_step + step, seed)
        loss = model(input_ids=x, labels=x, **KW).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return float(loss)


def prunetrain(model: torch.nn.Module, corpus: Corpus, s: Setup, seed: int, target_params: float,
               example: torch.Tensor) -> tuple[torch.nn.Module, list[dict]]:
    """PruneTrain from scratch: AdamW, the lasso's proximal step after every step, a shrink
    every ``shrink_every`` steps until the model has at most ``target_params`` parameters."""
    opt = optimizer(model, s.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(s.steps, max(1, s.steps // 20)))
    lasso = prunefx.train.GroupLasso(model, (example,), example_kwargs=KW, lam=s.lam)
    pt = prunefx.train.PruneTrain(model, opt, example_inputs=(example,), example_kwargs=KW, every=1,
                                  mode="proximal", lasso=lasso, schedulers=[sched])
    shrinks: list[dict] = []
    pruning = True
    for step in range(s.steps):
        model = pt.model
        model.train()
        x = train_batch(corpus, s, step, seed)
        loss = model(input_ids=x, labels=x, **KW).loss
        opt.zero_grad()
        pt.regularize(loss).backward()
        opt.step()
        if pruning:
            pt.after_step()
        sched.step()
        if pruning and (step + 1) % s.shrink_every == 0:
            before = prunefx.count_params(model)
            small = pt.reconfigure(step)
            after = prunefx.count_params(small)
            if after < before:
                shrinks.append({"step": step + 1, "params": after, "layer_sizes": sizes(small), "loss": float(loss)})
            pruning = after > target_params
            if not pruning:
                shrinks[-1]["lasso_off"] = True
    return pt.model, shrinks


def architecture_mask(graph: prunefx.PruneGraph, like: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A mask over ``graph``'s attention and MLP groups keeping, in each layer, as many slots
    as ``like`` holds (the first ones: a random init has no preferred channel)."""
    mask = {}
    for i, z in enumerate(prunefx.transformers.layer_sizes(like)):
        for name, keep in ((f"model.layers.{i}.self_attn.q_proj", z.num_key_value_heads),
                           (f"model.layers.{i}.mlp.gate_proj", z.intermediate_size)):
            mask[name] = torch.arange(graph.group(name).size) < keep
    return mask


@torch.no_grad()
def tokens_per_second(models: dict[str, torch.nn.Module], x: torch.Tensor, reps: int) -> dict[str, dict[str, float]]:
    """Forward passes over ``x`` (no cache), the models timed in turn, the median of ``reps``
    by the wall clock and by this process's CPU time (which other processes do not inflate)."""
    for m in models.values():
        m.eval()
        m(input_ids=x, **KW)  # warm-up
    wall: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(reps):
        for k, m in models.items():
            t, c = time.perf_counter(), time.process_time()
            m(input_ids=x, **KW)
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {k: {"wall": x.numel() / statistics.median(wall[k]), "cpu": x.numel() / statistics.median(cpu[k])} for k in models}


@torch.no_grad()
def max_diff(a: torch.nn.Module, b: torch.nn.Module, xs: list[torch.Tensor]) -> float:
    return max(float((a(input_ids=x, **KW).logits - b(input_ids=x, **KW).logits).abs().max()) for x in xs)


# ----------------------------------------------------------------------------- the experiment


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, a handful of steps (CI)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--steps", type=int, help="training steps of dense, prunetrain and scratch")
    p.add_argument("--finetune-steps", type=int)
    p.add_argument("--lam", type=float, help="PruneTrain's group-lasso lambda (proximal step lr * lambda)")
    p.add_argument("--target", type=float, default=0.75, help="fraction of the dense parameters to keep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # transformers' and torch.export's notices on every trace
    s = SMOKE if args.smoke else FULL
    overrides = {"steps": args.steps, "finetune_steps": args.finetune_steps, "lam": args.lam}
    s = Setup(**{**asdict(s), **{k: v for k, v in overrides.items() if v is not None}})
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    corpus = load_corpus()
    windows = eval_windows(corpus, s)
    calib = [train_batch(corpus, s, step, args.seed + 1) for step in range(s.calib_batches)]  # not the training batches
    log(f"text: {corpus.source}: {len(corpus.train):,} training bytes ({corpus.train_files} files), "
        f"{len(corpus.heldout):,} held-out bytes ({corpus.heldout_files} files), eval on {windows.numel():,}")
    runs: dict[str, Run] = {}

    # 1. dense
    dense = llama(s, args.seed)
    t = time.process_time()
    train(dense, corpus, s, s.steps, s.lr, args.seed)
    runs["dense"] = Run(perplexity(dense, windows), prunefx.count_params(dense), sizes(dense), s.steps, time.process_time() - t)
    log(f"dense: ppl {runs['dense'].ppl:.3f}")

    # 2, 3. one-shot pruning to the parameter budget over the exact groups
    dense.eval()
    graph = prunefx.trace(dense, (calib[0],), example_kwargs=KW)
    criteria = {  # Taylor: the next-byte cross-entropy of the calibration batches, through the capture
        "taylor": {"loss_fn": prunefx.masks.causal_lm_loss, "batches": [(x, x) for x in calib]},
        "magnitude": {},
    }
    pruned: dict[str, torch.nn.Module] = {}
    checks: dict[str, float] = {}
    other_shape = windows[:3, : s.seq // 2 + 1]
    for name, kwargs in criteria.items():
        t = time.process_time()
        mask = prunefx.masks.to_budget(graph, name, params=args.target, exact_only=True, **kwargs)
        small = prunefx.reconfigure(dense, mask, graph=graph)
        cpu = time.process_time() - t
        masked = prunefx.apply_mask(copy.deepcopy(dense), mask, graph=graph).eval()
        checks[f"{name}_vs_masked_max_abs_diff"] = max_diff(small.eval(), masked, [windows[:4], other_shape])
        pruned[name] = small
        runs[name] = Run(perplexity(small, windows), prunefx.count_params(small), sizes(small), 0, cpu)
        log(f"{name}: ppl {runs[name].ppl:.3f}, {runs[name].params / runs['dense'].params:.3f} of the parameters")

    # 4. the better one, fine-tuned
    best = min(criteria, key=lambda k: runs[k].ppl)
    tuned = copy.deepcopy(pruned[best])
    t = time.process_time()
    train(tuned, corpus, s, s.finetune_steps, s.finetune_lr, args.seed, first_step=s.steps)
    runs["finetuned"] = Run(perplexity(tuned, windows), prunefx.count_params(tuned), sizes(tuned), s.finetune_steps,
                            time.process_time() - t, note=f"{best} + {s.finetune_steps} steps")
    log(f"finetuned ({best}): ppl {runs['finetuned'].ppl:.3f}")
    more = copy.deepcopy(dense)
    t = time.process_time()
    train(more, corpus, s, s.finetune_steps, s.finetune_lr, args.seed, first_step=s.steps)
    runs["dense_finetuned"] = Run(perplexity(more, windows), prunefx.count_params(more), sizes(more), s.finetune_steps,
                                  time.process_time() - t, note=f"dense + the same {s.finetune_steps} steps")
    log(f"dense_finetuned: ppl {runs['dense_finetuned'].ppl:.3f}")

    # 5. PruneTrain from scratch
    t = time.process_time()
    pt_model, shrinks = prunetrain(llama(s, args.seed), corpus, s, args.seed, args.target * runs["dense"].params, calib[0])
    runs["prunetrain"] = Run(perplexity(pt_model, windows), prunefx.count_params(pt_model), sizes(pt_model), s.steps,
                             time.process_time() - t, note=f"{len(shrinks)} shrinks, lambda {s.lam:g}")
    log(f"prunetrain: ppl {runs['prunetrain'].ppl:.3f}, {runs['prunetrain'].params / runs['dense'].params:.3f} of the parameters")

    # 6. PruneTrain's final architecture from a random init (Rethinking the Value of Network Pruning)
    fresh = llama(s, args.seed + 1)
    fresh_graph = prunefx.trace(fresh, (calib[0],), example_kwargs=KW)
    scratch = prunefx.reconfigure(fresh, architecture_mask(fresh_graph, pt_model), graph=fresh_graph)
    t = time.process_time()
    train(scratch, corpus, s, s.steps, s.lr, args.seed)
    runs["scratch"] = Run(perplexity(scratch, windows), prunefx.count_params(scratch), sizes(scratch), s.steps,
                          time.process_time() - t, note="prunetrain's architecture, random init")
    log(f"scratch: ppl {runs['scratch'].ppl:.3f}")

    # speed, side by side
    speed_models = {"dense": dense, best: pruned[best], "prunetrain": pt_model}
    speed = tokens_per_second(speed_models, windows[: min(8, len(windows))], s.reps)

    result = {
        "args": {"smoke": args.smoke, "target": args.target, "seed": args.seed, "threads": args.threads},
        "setup": asdict(s),
        "corpus": {"source": corpus.source, "train_bytes": len(corpus.train), "heldout_bytes": len(corpus.heldout),
                   "train_files": corpus.train_files, "heldout_files": corpus.heldout_files,
                   "eval_tokens": windows.numel(), "train_tokens_per_run": s.steps * s.batch * s.seq},
        "runs": {k: asdict(v) for k, v in runs.items()},
        "best_one_shot": best,
        "prunetrain_shrinks": shrinks,
        "tokens_per_second": speed,
        "checks": checks,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "prunefx": getattr(prunefx, "__version__", "?")},
    }
    report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


def report(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    dense = r["runs"]["dense"]
    table = Table(title=f"held-out perplexity per byte ({r['corpus']['eval_tokens']:,} bytes)")
    for col in ("variant", "parameters", "of dense", "perplexity", "bits/byte", "steps", "CPU s", "layers (heads, kv, mlp)"):
        table.add_column(col, justify="left" if col in ("variant", "layers (heads, kv, mlp)") else "right")
    for name, run in r["runs"].items():
        label = name + (f" ({run['note']})" if run["note"] else "")
        layers = " ".join(f"{h}/{k}/{m}" for h, k, m in run["layer_sizes"])
        table.add_row(label, f"{run['params']:,}", f"{run['params'] / dense['params']:.3f}", f"{run['ppl']:.3f}",
                      f"{math.log2(run['ppl']):.3f}", str(run["steps"]), f"{run['cpu_seconds']:.1f}", layers)
    speed = Table(title="inference tokens/s (forward, no cache, 1 thread, median)")
    for col in ("model", "tokens/s (wall)", "vs dense", "tokens/s (CPU time)", "vs dense"):
        speed.add_column(col, justify="left" if col == "model" else "right")
    base = r["tokens_per_second"]["dense"]
    for name, tps in r["tokens_per_second"].items():
        speed.add_row(name, f"{tps['wall']:,.0f}", f"{tps['wall'] / base['wall']:.2f}x",
                      f"{tps['cpu']:,.0f}", f"{tps['cpu'] / base['cpu']:.2f}x")
    console = Console(width=160)
    console.print(table)
    console.print(speed)
    console.print({k: f"{v:.2e}" for k, v in r["checks"].items()}, f"total {r['seconds']:.0f} s wall, {r['cpu_seconds']:.0f} s CPU")


if __name__ == "__main__":
    main(sys.argv[1:])
