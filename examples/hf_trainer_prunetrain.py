"""PruneTrain inside the transformers ``Trainer``: a small Llama shrinks while it learns Python.

The training text is Python's own standard library, read from disk (no download), as bytes:
a byte-level causal LM with a vocabulary of 128 (ASCII). ``PruneTrainCallback`` takes the
group lasso's proximal step after every AdamW step,
and shrinks the model (MLP channels, attention heads) at the end of every epoch; the Trainer
saves a checkpoint per epoch. Then the run is resumed from the checkpoint written after the
first shrink, into a fresh Trainer and a fresh original model, and must continue with the same
losses; the last checkpoint is reloaded with ``prunefx.transformers.from_pretrained``.

    python examples/hf_trainer_prunetrain.py --smoke     # CPU, well under a minute
    python examples/hf_trainer_prunetrain.py             # more text, more epochs
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import warnings
from pathlib import Path

import torch
import transformers

import prunefx.transformers
from prunefx.integrations.transformers_trainer import PruneTrainCallback

VOCAB = 128


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="2 epochs on 96 sequences, one shrink (CI)")
    ap.add_argument("--epochs", type=int, default=None, help="default 8 (--smoke: 2)")
    ap.add_argument("--sequences", type=int, default=2048, help="of --length bytes (--smoke: 96)")
    ap.add_argument("--length", type=int, default=64, help="bytes per sequence (--smoke: 32)")
    ap.add_argument("--lam", type=float, default=0.7,
                    help="the lasso's lambda; 0: set from the first loss (PruneTrain's ratio, made for SGD: too weak "
                    "under AdamW, see docs/integrations.md)")
    ap.add_argument("--weighting", choices=("uniform", "size"), default="size",
                    help="size: each channel group weighed by sqrt(its number of weights), heads and MLP channels alike")
    ap.add_argument("--ratio", type=float, default=0.2, help="with --lam 0: the lasso's share of the first loss")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", type=Path, default=None, help="checkpoints and summary.json (default: a temporary folder)")
    args = ap.parse_args()
    if args.smoke:
        args.sequences, args.length = 96, 32
    if args.epochs is None:
        args.epochs = 2 if args.smoke else 8
    return args


def python_text(n_bytes: int) -> bytes:
    """Source files of the standard library (json, argparse, ...), ASCII only."""
    root = Path(json.__file__).resolve().parents[1]
    text = b""
    for name in ("json/decoder.py", "json/encoder.py", "argparse.py", "textwrap.py", "dataclasses.py", "inspect.py"):
        path = root / name
        if path.exists():
            text += bytes(b for b in path.read_bytes() if b < VOCAB)
        if len(text) >= n_bytes:
            break
    if len(text) < n_bytes:
        raise SystemExit(f"found {len(text)} bytes of standard-library source under {root}, need {n_bytes}")
    return text[:n_bytes]


class ByteLines(torch.utils.data.Dataset):
    def __init__(self, sequences: int, length: int) -> None:
        self.ids = torch.tensor(list(python_text(sequences * length)), dtype=torch.long).view(sequences, length)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def llama() -> transformers.LlamaForCausalLM:
    """A random-init Llama whose MLP channels start at graded strengths (0.05 to 1), a stand-in
    for a trained model's uneven channels: a short run then removes the weak ones first."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        ramp = torch.linspace(0.05, 1.0, cfg.intermediate_size)
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight.mul_(ramp[:, None])
            layer.mlp.up_proj.weight.mul_(ramp[:, None])
            layer.mlp.down_proj.weight.mul_(ramp[None, :])
    return model


class Losses(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:  # noqa: ANN001
        if logs and "loss" in logs:
            self.by_step[state.global_step] = logs["loss"]


def training_args(out: Path, args: argparse.Namespace) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=str(out), report_to=[], use_cpu=True, per_device_train_batch_size=8, num_train_epochs=args.epochs,
        learning_rate=args.lr, lr_scheduler_type="cosine", save_strategy="epoch", logging_steps=1,
        dataloader_num_workers=0, disable_tqdm=True, log_level="error", seed=0,
    )


def sizes(model: torch.nn.Module) -> list[list[int]]:
    return [[s.num_attention_heads, s.num_key_value_heads, s.intermediate_size] for s in prunefx.transformers.layer_sizes(model)]


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    out = args.out or Path(tempfile.mkdtemp(prefix="hf_prunetrain_"))
    data = ByteLines(args.sequences, args.length)
    example = data.ids[:16]

    def callback() -> PruneTrainCallback:
        return PruneTrainCallback(example_inputs=(example,), every_epochs=1, stop_after=args.epochs - 1,
                                  lam=args.lam or None, ratio=args.ratio,
                                  weighting=args.weighting, threshold=1e-6)

    model, prune, losses = llama(), callback(), Losses()
    params = [model.num_parameters()]
    print(f"{args.sequences} sequences of {args.length} bytes, {params[0]:,} parameters, sizes {sizes(model)}")
    trainer = transformers.Trainer(model=model, args=training_args(out / "run", args), train_dataset=data,
                                   callbacks=[prune, losses])
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # the losses are printed below
    trainer.train()
    for h in prune.history:
        if h["changed"]:
            params.append(h["params"][1])
        print(f"epoch {h['epoch']:.0f} (step {h['step']}): params {h['params'][0]:,} -> {h['params'][1]:,}, "
              f"channels {h['channels']}" if h["changed"] else f"epoch {h['epoch']:.0f}: no dead channel")
    steps = sorted(losses.by_step)
    print(f"loss {losses.by_step[steps[0]]:.3f} -> {losses.by_step[steps[-1]]:.3f}, lambda {prune.prunetrain.lasso.lam:.3g}, "
          f"sizes {sizes(model)} (heads, KV heads, MLP channels per layer)")

    # resume from the checkpoint of the first epoch that shrank: fresh original model and Trainer
    first = next(h for h in prune.history if h["changed"])
    checkpoint = out / "run" / f"checkpoint-{first['step']}"
    fresh, resumed_losses = llama(), Losses()
    resumed = transformers.Trainer(model=fresh, args=training_args(out / "resumed", args), train_dataset=data,
                                   callbacks=[callback(), resumed_losses])
    resumed.remove_callback(transformers.trainer_callback.PrinterCallback)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    matches = bool(resumed_losses.by_step) and all(
        math.isclose(loss, losses.by_step[step], rel_tol=1e-6, abs_tol=1e-7) for step, loss in resumed_losses.by_step.items())
    print(f"resumed from {checkpoint.name}: steps {min(resumed_losses.by_step)}-{max(resumed_losses.by_step)}, "
          f"same losses: {matches}, sizes {sizes(fresh)}")

    last = out / "run" / f"checkpoint-{trainer.state.global_step}"
    reloaded = prunefx.transformers.from_pretrained(last)
    same = torch.allclose(logits(reloaded, example), logits(model, example), atol=1e-5, rtol=1e-5)
    print(f"{last.name} reloaded with prunefx.transformers.from_pretrained: sizes {sizes(reloaded)}, same logits: {same}; "
          f"stock loader: {reloaded.config.prunefx['stock_loader']}")

    summary = {"shrinks": sum(h["changed"] for h in prune.history), "params": params, "sizes": sizes(model),
               "loss": [losses.by_step[s] for s in steps], "lam": prune.prunetrain.lasso.lam,
               "resumed_loss_matches": matches, "reloaded_logits_match": bool(same)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
