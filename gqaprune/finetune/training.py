"""The training loop: exact token-mean loss, gradient accumulation, resumable checkpoints.

Why a hand-written loop instead of ``transformers.Trainer``: resuming must be *exact* (a run
killed at step N and resumed gives the same adapter as one that never stopped), the loss must
be the mean over the response tokens of the whole optimizer step (not a mean of micro-batch
means), and the loop must report through plain callbacks because the core never imports MLflow.
Per-step and per-validation results are typed records (:class:`StepRecord`, :class:`ValRecord`);
the checkpoint stores them as plain dicts (``torch.load(weights_only=True)`` reads only those).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from gqaprune.errors import UserError
from gqaprune.finetune.checkpoints import CKPT_FORMAT, CheckpointStore
from gqaprune.finetune.encoding import IGNORE, FinetuneData, collate
from gqaprune.finetune.lora import trainable_parameters
from gqaprune.finetune.loss import accumulate_gradients, mean_loss
from gqaprune.finetune.schedule import TrainingConfig, lr_at, micro_batches, steps_per_epoch, total_steps
from gqaprune.plots import legend_outside, plt, set_suptitle


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step (``step`` counts from 1)."""
    step: int
    epoch: int            # 0-based epoch the step belongs to
    lr: float             # learning rate of the update
    train_loss: float     # mean target-token NLL of the step (nats)
    tokens: int           # target tokens of the step


@dataclass(frozen=True)
class ValRecord:
    """One validation pass (step 0: before training)."""
    step: int
    epoch: float          # step / steps per epoch
    val_loss: float       # mean target-token NLL over the validation examples (nats)


@dataclass
class History:
    train: list[StepRecord] = field(default_factory=list)
    val: list[ValRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"train": [asdict(r) for r in self.train], "val": [asdict(r) for r in self.val]}

    @classmethod
    def from_dict(cls, raw: dict) -> "History":
        return cls([StepRecord(**r) for r in raw["train"]], [ValRecord(**r) for r in raw["val"]])


@dataclass
class Callbacks:
    """Hooks the entry point uses to log; the core stays free of MLflow."""
    on_step: Callable[[StepRecord], None] | None = None
    on_validation: Callable[[ValRecord], None] | None = None
    should_stop: Callable[[int], bool] | None = None     # graceful stop after this step (checkpointed)


@dataclass
class TrainResult:
    history: History
    start_step: int               # 0, or the step a resumed run continued from
    final_step: int
    total_steps: int
    completed: bool
    train_time_s: float           # wall time of the optimizer steps, summed over resumes
    resumed: bool = False


class _Loop:
    """State of one training run: model, optimizer, step counter, history."""

    def __init__(self, model, data: FinetuneData, s: TrainingConfig, pad_id: int):
        self.model, self.data, self.s, self.pad_id = model, data, s, pad_id
        self.params = [p for _, p in trainable_parameters(model)]
        self.names = [n for n, _ in trainable_parameters(model)]
        self.opt = torch.optim.AdamW(self.params, lr=s.learning_rate, weight_decay=s.weight_decay)
        self.scaler = _grad_scaler(model)
        self.n_train = len(data.train)
        self.spe = steps_per_epoch(self.n_train, s)
        self.total = total_steps(self.n_train, s)
        self.step = 0
        self.elapsed = 0.0
        self.history = History()

    # -- one optimizer step ------------------------------------------------------------
    def run_step(self) -> StepRecord:
        """Gradient of the mean NLL over *all* target tokens of the step, then one update."""
        groups = [collate([self.data.train[i] for i in idx], self.pad_id)
                  for idx in micro_batches(self.n_train, self.step, self.s)]
        n_tokens = sum(int((g["labels"][:, 1:] != IGNORE).sum()) for g in groups)
        lr = lr_at(self.step, self.total, self.s)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.model.train()
        total = accumulate_gradients(self.model, groups, n_tokens, self.scaler)
        if self.scaler:
            self.scaler.unscale_(self.opt)
        if self.s.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.s.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return StepRecord(self.step, (self.step - 1) // self.spe, lr, total / max(n_tokens, 1), n_tokens)

    def validate(self) -> ValRecord:
        loss = mean_loss(self.model, self.data.val, self.s.batch_size, self.pad_id)
        rec = ValRecord(self.step, self.step / self.spe, loss)
        self.history.val.append(rec)
        return rec

    # -- checkpoints -------------------------------------------------------------------
    def state(self, meta: dict) -> dict:
        return {"format": CKPT_FORMAT, "step": self.step, "total_steps": self.total,
                "adapter": {n: p.detach().cpu().clone() for n, p in zip(self.names, self.params)},
                "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "history": self.history.to_dict(), "elapsed_s": self.elapsed, "meta": meta}

    def restore(self, state: dict) -> None:
        if state["total_steps"] != self.total or sorted(state["adapter"]) != sorted(self.names):
            raise UserError("the checkpoint was written by a different training setup",
                            "pass resume false to start over, or restore the original parameters")
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(state["adapter"][n].to(p.device, p.dtype))
        self.opt.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step, self.elapsed = state["step"], state["elapsed_s"]
        self.history = History.from_dict(state["history"])


def _grad_scaler(model):
    """fp16 weights on CUDA need loss scaling; bf16 and fp32 do not."""
    p = next(model.parameters())
    if p.device.type == "cuda" and any(q.dtype == torch.float16 for q in model.parameters()):
        return torch.amp.GradScaler("cuda")
    return None


def train(model, data: FinetuneData, settings: TrainingConfig, pad_id: int,
          store: CheckpointStore | None = None, resume_state: dict | None = None,
          callbacks: Callbacks | None = None, meta: dict | None = None) -> TrainResult:
    """Train the trainable (LoRA) parameters of ``model``; resumable from ``resume_state``.

    Order per step: update -> ``on_step`` -> validation at epoch ends (and after the last
    step) -> checkpoint every ``checkpoint_every`` steps, at epoch ends and on a graceful stop.
    A fresh run also measures the validation loss before the first step (step 0).
    """
    cb = callbacks or Callbacks()
    loop = _Loop(model, data, settings, pad_id)
    if resume_state is not None:
        loop.restore(resume_state)
    start = loop.step
    if start == 0 and data.val:
        _emit(cb.on_validation, loop.validate())
    elif cb.on_validation:
        for rec in loop.history.val:  # replay, so a resumed run's log is complete
            cb.on_validation(rec)
    if cb.on_step and start:
        for rec in loop.history.train:
            cb.on_step(rec)
    bar = tqdm(total=loop.total, initial=start, desc="finetune", disable=not settings.progress)
    completed = True
    while loop.step < loop.total:
        t0 = time.perf_counter()
        rec = loop.run_step()
        loop.elapsed += time.perf_counter() - t0
        loop.history.train.append(rec)
        bar.set_postfix(loss=f"{rec.train_loss:.3f}", lr=f"{rec.lr:.2e}", refresh=False)
        bar.update(1)
        _emit(cb.on_step, rec)
        epoch_end = loop.step % loop.spe == 0 or loop.step == loop.total
        if epoch_end and data.val:
            _emit(cb.on_validation, loop.validate())
        stop = cb.should_stop is not None and cb.should_stop(loop.step) and loop.step < loop.total
        if store is not None and (stop or epoch_end or loop.step % settings.checkpoint_every == 0):
            store.save(loop.state(meta or {}), {**(meta or {}), "step": loop.step, "total_steps": loop.total})
        if stop:
            completed = False
            break
    bar.close()
    return TrainResult(loop.history, start, loop.step, loop.total, completed, loop.elapsed,
                       resumed=start > 0)


def _emit(fn, rec) -> None:
    if fn is not None:
        fn(rec)


def training_curves_figure(history: History, title: str):
    """Left: training loss per step and validation loss per epoch; right: learning rate."""
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6))
    tr, va = history.train, history.val
    if tr:
        ax_loss.plot([r.step for r in tr], [r.train_loss for r in tr], lw=1, label="training loss")
        ax_lr.plot([r.step for r in tr], [r.lr for r in tr], lw=1.2, color="tab:green")
    if va:
        ax_loss.plot([r.step for r in va], [r.val_loss for r in va], "o-", color="tab:red",
                     label="validation loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("mean target-token NLL (nats)")
    legend_outside(ax_loss)
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate")
    set_suptitle(fig, title)
    fig.tight_layout()
    return fig
