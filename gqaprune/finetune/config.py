"""The finetune config tree: every flag of ``prune_entry/finetune.py`` is a leaf here.

    FinetuneConfig
      source        model_uri, models_file
      runtime       dtype, device                        (gqaprune.loading.RuntimeConfig)
      data          dataset, template, seq_len, finetune_samples, val_fraction, train_on_prompt
      local_data    data_dir, cache_dir                   (gqaprune.datadir.DataDirConfig)
      lora          lora_r, lora_alpha, lora_dropout, target_modules     (lora.LoraConfig)
      training      learning_rate, epochs, batch_size, gradient_accumulation, seed, max_steps,
                    warmup_ratio, weight_decay, max_grad_norm, checkpoint_every,
                    gradient_checkpointing, progress             (schedule.TrainingConfig)
      checkpointing resume, checkpoint_dir
      mask          keep_mask                                    (masks.MaskConfig)
      evaluation    eval_after, eval_args
      output        output_dir

Every value is checked when the tree is built (bad flags fail before anything loads);
:meth:`FinetuneConfig.trajectory` is what the resume key hashes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gqaprune.config import Section, flat, knob, leaves
from gqaprune.datadir import DataDirConfig
from gqaprune.errors import UserError
from gqaprune.finetune.lora import LoraConfig
from gqaprune.finetune.masks import MaskConfig
from gqaprune.finetune.records import is_known, known_datasets
from gqaprune.finetune.schedule import TrainingConfig
from gqaprune.loading import DEMO_ALIAS, RuntimeConfig
from gqaprune.templates import AUTO, TEMPLATES

RESUME_CHOICES = ("auto", "true", "false")
DEFAULT_DATASET = "alpaca"   # what dataset=auto means for every model but the demo one


@dataclass(frozen=True)
class SourceConfig(Section):
    """the model to fine-tune"""
    model_uri: str = knob(DEMO_ALIAS, "prune run id, runs:/ or models:/ URI, model dir, alias or HF id")
    models_file: str | None = knob(None, "aliases file (JSON/YAML) that overrides the built-in aliases")


@dataclass(frozen=True)
class DataConfig(Section):
    """fine-tuning data (records of one form, rendered by a template)"""
    dataset: str = knob(AUTO, "auto (demo corpus for the demo model, else alpaca), alpaca (hub), squad (hub), "
                        "a text source (wikitext2, demo, ...) or a .json/.jsonl/.txt file")
    template: str = knob(AUTO, "prompt template (auto: by the data's form)", choices=(AUTO, *TEMPLATES),
                         kind="template", fix=f"use {AUTO} or one of {', '.join(sorted(TEMPLATES))}")
    seq_len: int = knob(256, "max tokens per example / block", low=2, fix="pass e.g. 256")
    finetune_samples: int | None = knob(None, "training examples (none: all)", low=1, must=">= 1 or none")
    val_fraction: float = knob(0.05, "share of the examples held out for the validation loss", low=0.0,
                               high=1.0, high_open=True, fix="pass e.g. 0.05")
    train_on_prompt: bool = knob(False, "also learn the prompt tokens")

    def check(self) -> None:
        if self.dataset != AUTO and not is_known(self.dataset):
            raise UserError(f"unknown dataset '{self.dataset}'",
                            f"use auto, one of {', '.join(known_datasets())}, or an existing .json/.jsonl/.txt file")

    def source(self, model_alias: str) -> str:
        """The dataset to load: ``auto`` is the demo corpus for the demo model, else alpaca."""
        if self.dataset != AUTO:
            return self.dataset
        return DEMO_ALIAS if model_alias == DEMO_ALIAS else DEFAULT_DATASET


@dataclass(frozen=True)
class CheckpointConfig(Section):
    """resumable training state (one directory per configuration key)"""
    resume: str = knob("auto", "auto: continue a matching checkpoint; true: must; false: start over")
    checkpoint_dir: str | None = knob(None, "where checkpoints live (none: $GQAPRUNE_CACHE/finetune)")

    def check(self) -> None:
        if self.resume not in RESUME_CHOICES:
            raise UserError(f"resume must be one of {', '.join(RESUME_CHOICES)}, got '{self.resume}'",
                            "pass auto, true or false")

    def root(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir).expanduser()
        from gqaprune.demo import default_cache_dir
        return default_cache_dir() / "finetune"


@dataclass(frozen=True)
class EvalAfterConfig(Section):
    """evaluate the merged model (an eval child run)"""
    eval_after: bool = knob(False, "run eval on the merged model as a child run")
    eval_args: str | None = knob(None, "eval flags for that run, e.g. \"--tasks none --ppl_datasets demo\"")


@dataclass(frozen=True)
class OutputConfig(Section):
    """where the fine-tuned model goes"""
    output_dir: str | None = knob(None, "also keep the merged model in this directory")


@dataclass(frozen=True)
class FinetuneConfig(Section):
    """finetune: LoRA recovery of a (pruned or sparse) model, tracked in MLflow"""
    source: SourceConfig = field(default_factory=SourceConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    local_data: DataDirConfig = field(default_factory=DataDirConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpointing: CheckpointConfig = field(default_factory=CheckpointConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    evaluation: EvalAfterConfig = field(default_factory=EvalAfterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def trajectory(self) -> dict:
        """Leaf values that change what training computes (not where it runs, how it is logged or
        saved, nor the model / dataset, which the caller adds in their resolved form)."""
        skip = {leaf.name for section in (SourceConfig, DataDirConfig, CheckpointConfig, MaskConfig,
                                          EvalAfterConfig, OutputConfig) for leaf in leaves(section)}
        skip |= {"dataset", "device", "verbose", "checkpoint_every", "gradient_checkpointing", "progress"}
        return {k: v for k, v in flat(self).items() if k not in skip}
