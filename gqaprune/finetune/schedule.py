"""The optimizer loop's settings (the ``training`` section) and its deterministic schedule:
learning rate per step, seeded epoch order, the examples of every micro-batch.

Everything here is a function of the settings and the step index only, which is what makes a
resumed run bit-identical to one that never stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gqaprune.config import Section, knob


@dataclass(frozen=True)
class TrainingConfig(Section):
    """training (AdamW on the adapters, linear warmup then linear decay)"""
    learning_rate: float = knob(1e-4, "peak learning rate", low=0.0, low_open=True, must="> 0",
                                fix="pass e.g. 1e-4")
    epochs: int = knob(1, "passes over the training examples", low=1)
    batch_size: int = knob(4, "examples per micro-batch", low=1)
    gradient_accumulation: int = knob(1, "micro-batches per optimizer step", low=1)
    seed: int = knob(0, "data order, split, LoRA init, dropout")
    max_steps: int | None = knob(None, "total optimizer steps (overrides epochs, sets the schedule)",
                                 low=1, must=">= 1 or none")
    warmup_ratio: float = knob(0.05, "share of the steps with a linear warmup", low=0.0, high=1.0,
                               high_open=True, fix="pass e.g. 0.05")
    weight_decay: float = knob(0.0, "AdamW weight decay", low=0.0)
    max_grad_norm: float = knob(1.0, "gradient clipping norm (<= 0: no clipping)")
    checkpoint_every: int = knob(50, "optimizer steps between checkpoints (also at epoch ends)", low=1)
    gradient_checkpointing: bool = knob(False, "activation checkpointing: less memory, more compute "
                                        "(same results)")
    progress: bool = knob(True, "show a progress bar")

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation


def steps_per_epoch(n_train: int, s: TrainingConfig) -> int:
    return math.ceil(n_train / s.examples_per_step)


def total_steps(n_train: int, s: TrainingConfig) -> int:
    return s.max_steps if s.max_steps is not None else s.epochs * steps_per_epoch(n_train, s)


def lr_at(step: int, total: int, s: TrainingConfig) -> float:
    """LR of update ``step`` (0-based): linear warmup over ceil(warmup_ratio*total), linear decay."""
    warm = math.ceil(s.warmup_ratio * total)
    if step < warm:
        return s.learning_rate * (step + 1) / warm
    return s.learning_rate * max(0.0, (total - step) / max(1, total - warm))


def epoch_order(n_train: int, epoch: int, seed: int) -> list[int]:
    """Seeded shuffle of the training examples for one epoch (a function of seed and epoch only)."""
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def micro_batches(n_train: int, step: int, s: TrainingConfig) -> list[list[int]]:
    """Example indices of optimizer step ``step``: ``gradient_accumulation`` lists of <= batch_size."""
    spe = steps_per_epoch(n_train, s)
    order = epoch_order(n_train, step // spe, s.seed)
    start = (step % spe) * s.examples_per_step
    chunk = order[start:start + s.examples_per_step]
    return [chunk[i:i + s.batch_size] for i in range(0, len(chunk), s.batch_size)]
