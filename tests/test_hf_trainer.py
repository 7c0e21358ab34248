"""prunefx.integrations.transformers_trainer: PruneTrain inside ``transformers.Trainer.train``
on a tiny random-init Llama (GQA), CPU.

The Trainer's model shrinks (attention heads and MLP channels) at least twice; after each shrink the Trainer still
holds the same model, optimizer and LR scheduler objects, AdamW's state is the state before
the shrink sliced by hand, and the scheduler's LR goes on; a checkpoint written after a shrink
resumes into a fresh Trainer and original model with the same losses (and ends identical); the
checkpoints reload through ``prunefx.transformers.from_pretrained`` with the same logits, and
through the stock ``from_pretrained`` when the layers keep the same sizes; the example's
--smoke mode runs. What the callback cannot follow is refused when the Trainer is built."""

from __future__ import annotations

import json
import pickle
import runpy
import sys
from pathlib import Path

import accelerate  # noqa: F401  the Trainer needs it (a dev dependency: a missing one fails, never skips)
import pytest
import torch
import transformers
from layouts import kept_indices, sliced_to

import prunefx.transformers
from prunefx.errors import PruneFxError
from prunefx.integrations.transformers_trainer import PruneTrainCallback
from prunefx.provenance import layout_of

ROOT = Path(__file__).resolve().parents[1]
VOCAB, STEPS, EVERY, LR = 128, 20, 5, 3e-3
KW = {"use_cache": False}
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


# the example's model: MLP channels at graded strengths (0.05 to 1), so the lasso removes the
# weak ones first and the rest later (a schedule of shrinks, not one collapse)
_llama = runpy.run_path(str(ROOT / "examples" / "hf_trainer_prunetrain.py"))["llama"]


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, VOCAB, (64, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out: Path) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=str(out), report_to=[], use_cpu=True, per_device_train_batch_size=8, max_steps=STEPS,
        learning_rate=LR, lr_scheduler_type="linear", save_strategy="steps", save_steps=EVERY, logging_steps=1,
        dataloader_num_workers=0, disable_tqdm=True, log_level="error", seed=0,
    )


def _callback(x: torch.Tensor) -> PruneTrainCallback:
    # lambda given, each group weighed by sqrt(its size): MLP channels die within 5 steps, a KV
    # head (with its query heads) within 10; shrinks at steps 5, 10, 15
    return PruneTrainCallback(example_inputs=(x,), every_steps=EVERY, stop_after=3 * EVERY, lam=1.0, weighting="size",
                              threshold=1e-8)


def _sizes(model) -> list[tuple[int, int, int]]:
    return [(s.num_attention_heads, s.num_key_value_heads, s.intermediate_size) for s in prunefx.transformers.layer_sizes(model)]


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=x, **KW).logits
    model.train(training)
    return out




class Losses(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs:
            self.by_step[state.global_step] = logs["loss"]


class Before(transformers.TrainerCallback):
    """Runs before the prune callback at each step it may shrink: what the Trainer holds."""

    def __init__(self) -> None:
        self.at: dict[int, dict] = {}
        self.first: dict = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs) -> None:
        self.first = {"model": model, "optimizer": optimizer, "scheduler": lr_scheduler}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        if state.global_step % EVERY == 0:
            self.at[state.global_step] = {
                "sizes": _sizes(model), "params": model.num_parameters(),
                "kept": {n: kept_indices(model, n, p.shape) for n, p in model.named_parameters()},
                "state": {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in model.named_parameters()},
            }


class After(transformers.TrainerCallback):
    """Runs after the prune callback: checks each shrink against what ``Before`` saw."""

    def __init__(self, before: Before, prune: PruneTrainCallback) -> None:
        self.before, self.prune = before, prune
        self.shrinks: list[dict] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs) -> None:
        step = state.global_step
        if step % EVERY or not self.prune.history or self.prune.history[-1]["step"] != step:
            return
        if not self.prune.history[-1]["changed"]:
            return
        before, first = self.before.at[step], self.before.first
        # the Trainer holds the same objects: the model became the smaller one in place
        assert model is first["model"] and optimizer is first["optimizer"] and lr_scheduler is first["scheduler"]
        assert lr_scheduler.optimizer is optimizer
        assert type(model) is transformers.LlamaForCausalLM
        sizes = _sizes(model)
        assert sizes != before["sizes"] and model.num_parameters() < before["params"]
        for layer, (heads, kv, inter) in zip(model.model.layers, sizes, strict=True):
            assert layer.mlp.gate_proj.out_features == layer.mlp.down_proj.in_features == inter
            assert layer.self_attn.q_proj.out_features == heads * model.config.head_dim
            assert layer.self_attn.k_proj.out_features == kv * model.config.head_dim
        assert model.config.intermediate_size == max(s[2] for s in sizes)
        params = dict(model.named_parameters())
        assert sorted(id(p) for g in optimizer.param_groups for p in g["params"]) == sorted(id(p) for p in params.values())
        for name, p in params.items():  # AdamW's state: the pre-shrink state at the kept indices, exactly
            old, new = before["state"][name], optimizer.state[p]
            assert torch.equal(new["step"], old["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(new[key], sliced_to(old[key], before["kept"][name], kept_indices(model, name, p.shape))), (name, key)
        # the scheduler set this step's LR on the re-pointed optimizer and goes on scheduling it
        assert optimizer.param_groups[0]["lr"] == pytest.approx(LR * (1 - step / STEPS))
        assert lr_scheduler.get_last_lr() == [g["lr"] for g in optimizer.param_groups]
        self.shrinks.append({"step": step, "before": before["sizes"], "after": sizes, "logits": _logits(model, _x())})


def _x() -> torch.Tensor:
    return Tokens().ids[:8]


@pytest.mark.filterwarnings("ignore")
def test_trainer_shrinks_slices_adamw_exactly_resumes_and_reloads(tmp_path: Path) -> None:
    model, prune, losses = _llama(), _callback(_x()), Losses()
    before = Before()
    after = After(before, prune)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "a"), train_dataset=Tokens(),
                                   callbacks=[before, prune, after, losses])
    trainer.train()
    assert len(after.shrinks) >= 2, prune.history
    assert any(s["after"][0][:2] < s["before"][0][:2] for s in after.shrinks), "no attention head was removed"
    assert trainer.model is model and _sizes(model)[0][2] < 96
    assert trainer.lr_scheduler.last_epoch == STEPS  # the same scheduler stepped all along
    assert losses.by_step[STEPS] < losses.by_step[1]

    # every checkpoint written after a shrink reloads with prunefx's loader, the stock one too
    # when every layer keeps the same sizes
    stock_loaded = 0
    for shrink in after.shrinks:
        path = tmp_path / "a" / f"checkpoint-{shrink['step']}"
        loaded = prunefx.transformers.from_pretrained(path)
        assert _sizes(loaded) == shrink["after"]
        torch.testing.assert_close(_logits(loaded, _x()), shrink["logits"], atol=1e-5, rtol=1e-5)
        record = json.loads((path / "config.json").read_text())["prunefx"]
        if len(set(shrink["after"])) == 1:
            assert record["stock_loader"] == "loads it"
            stock = transformers.LlamaForCausalLM.from_pretrained(path)
            torch.testing.assert_close(_logits(stock, _x()), shrink["logits"], atol=1e-5, rtol=1e-5)
            stock_loaded += 1
        else:
            assert "prunefx.transformers.from_pretrained" in record["stock_loader"]
    assert stock_loaded >= 1, [s["after"] for s in after.shrinks]

    # resume after the second shrink: a fresh original model, a fresh callback, a fresh Trainer
    at = after.shrinks[1]["step"]
    fresh, resumed_prune, resumed_losses = _llama(), _callback(_x()), Losses()
    resumed = transformers.Trainer(model=fresh, args=_args(tmp_path / "b"), train_dataset=Tokens(),
                                   callbacks=[resumed_prune, resumed_losses])
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / f"checkpoint-{at}"))
    assert sorted(resumed_losses.by_step) == list(range(at + 1, STEPS + 1))
    for step, loss in resumed_losses.by_step.items():
        assert loss == pytest.approx(losses.by_step[step], rel=1e-6, abs=1e-7), step
    assert resumed_prune.history == prune.history  # the history up to `at` came back, the rest repeated
    assert resumed_prune.prunetrain.lasso.lam == prune.prunetrain.lasso.lam
    assert _sizes(fresh) == _sizes(model)
    final, expected = fresh.state_dict(), model.state_dict()
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert layout_of(fresh).keys() == layout_of(model).keys()


@pytest.mark.filterwarnings("ignore")
def test_trainer_with_activation_checkpointing_shrinks_the_same(tmp_path: Path) -> None:
    """``activation_checkpointing=True`` (recomputing each layer in backward) changes no value: the
    shrinks, the losses and the final weights are those of the same run without it. The model
    still checkpoints after every shrink, and keeps the hook transformers registers on its
    input embeddings for it (which the capture must neither refuse nor pin)."""
    runs = {}
    for checkpointing in (False, True):
        model, prune, losses = _llama(), _callback(_x()), Losses()
        args = _args(tmp_path / str(checkpointing))
        args.save_strategy, args.activation_checkpointing = "no", checkpointing
        transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[prune, losses]).train()
        assert sum(h["changed"] for h in prune.history) >= 2, prune.history
        runs[checkpointing] = (model, losses.by_step, [h["changed"] for h in prune.history])
    (plain, plain_losses, plain_shrinks), (ckpt, ckpt_losses, ckpt_shrinks) = runs[False], runs[True]
    assert ckpt.is_activation_checkpointing and all(layer.gradient_checkpointing for layer in ckpt.model.layers)
    assert len(ckpt.model.embed_tokens._forward_hooks) == 1
    assert ckpt_shrinks == plain_shrinks and _sizes(ckpt) == _sizes(plain)
    for step, loss in plain_losses.items():
        assert ckpt_losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    torch.testing.assert_close(_logits(ckpt, _x()), _logits(plain, _x()), atol=1e-5, rtol=1e-5)


def test_lambda_from_first_loss_and_refusals(tmp_path: Path) -> None:
    """Without ``lam=`` the lasso takes ``ratio`` of the first training loss (the model's
    ``loss`` output); what the callback cannot follow is refused, in one line, when the Trainer
    is built."""
    prune, losses = PruneTrainCallback(example_inputs=(_x(),), every_steps=100, ratio=0.5), Losses()
    args = _args(tmp_path / "c")
    args.max_steps, args.save_strategy = 1, "no"
    model = _llama()
    r0 = float(prunefx.train.GroupLasso(_llama(), (_x(),), example_kwargs=KW).penalty().detach())  # at the initial weights
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[prune, losses])
    trainer.train()
    # ratio 0.5: lambda * R(W0) == first loss (logged rounded)
    assert prune.prunetrain.lasso.lam * r0 == pytest.approx(losses.by_step[1], rel=1e-3)
    assert prune.history == [] and not model._forward_hooks  # the first-loss hook is gone
    copy = pickle.loads(pickle.dumps(model))  # the resume hook does not drag the callback along
    assert _sizes(copy) == _sizes(model)

    for field, value in (("torch_compile", True), ("restore_callback_states_from_checkpoint", True)):
        bad = _args(tmp_path / "d")
        setattr(bad, field, value)
        with pytest.raises(PruneFxError, match=field):
            transformers.Trainer(model=_llama(), args=bad, train_dataset=Tokens(),
                                 callbacks=[PruneTrainCallback(example_inputs=(_x(),), every_steps=5)])
    with pytest.raises(ValueError, match="one of every_steps"):
        PruneTrainCallback(example_inputs=(_x(),), every_steps=5, every_epochs=1)


def test_example_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example as CI runs it (in this process: the imports are paid once): byte-level text
    from Python's own sources, a shrink at the end of an epoch, a resume from the checkpoint
    after it, and a reload."""
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["hf_trainer_prunetrain.py", "--smoke", "--out", str(out)])
    runpy.run_path(str(ROOT / "examples" / "hf_trainer_prunetrain.py"), run_name="__main__")
    report = json.loads((out / "summary.json").read_text())
    assert report["shrinks"] >= 1 and report["params"][-1] < report["params"][0]
    assert report["loss"][-1] < report["loss"][0]
    assert report["resumed_loss_matches"] and report["reloaded_logits_match"]
