"""Floor 3: LoRA recovery fine-tuning of (pruned or sparse) causal LMs.

records -> examples -> LoRA -> train -> merged model (zero pattern kept for sparse models):

  records.py      a dataset name or file -> :class:`Records` of one form (instruction / qa / text);
                  hub datasets from the data registry's record sources (``data.RECORD_SOURCES``)
  encoding.py     records -> tokenized :class:`Encoded` examples through a named template
                  (``gqaprune.templates``), prompt masked, text packed; :class:`FinetuneData`
  lora.py         :class:`LoraConfig`, peft LoRA on the chosen projections, ``merge``
  masks.py        the zero pattern of a sparse model, taken before LoRA and re-applied after merge
  loss.py         token-mean NLL of an optimizer step, gradient accumulation
  schedule.py     :class:`TrainingConfig`, warmup + linear decay, seeded epoch order
  checkpoints.py  :class:`CheckpointStore` (atomic), ``config_key``
  training.py     the resumable loop ``train`` -> :class:`TrainResult` with a typed :class:`History`
  config.py       :class:`FinetuneConfig`, the whole tree the entry point's flags come from
  pipeline.py     ``encode`` / ``prepare`` / ``finish``: the steps of one run

Import the public API from here: ``from gqaprune import finetune as ft; ft.train(...)``.
"""
from gqaprune.finetune.checkpoints import CKPT_FORMAT, META_CONFIG_KEY, META_RUN_ID, CheckpointStore, config_key
from gqaprune.finetune.config import (DEFAULT_DATASET, RESUME_CHOICES, CheckpointConfig, DataConfig,
                                      EvalAfterConfig, FinetuneConfig, OutputConfig, SourceConfig)
from gqaprune.finetune.encoding import (IGNORE, DataStats, Encoded, FinetuneData, build_data, check_seq_len,
                                        collate, describe_example, encode, pack_text, split_sizes)
from gqaprune.finetune.lora import (DEFAULT_TARGETS, GROUPS, SHORT_NAMES, LoraConfig, attach_lora, merge,
                                    parse_targets, resolve_targets, trainable_parameters)
from gqaprune.finetune.loss import accumulate_gradients, mean_loss, nll_sum
from gqaprune.finetune.masks import (KEEP_MASK_CHOICES, MIN_ZERO_SHARE, MaskConfig, MaskInfo, ZeroPattern,
                                     merge_keeping_zeros, zero_pattern)
from gqaprune.finetune.pipeline import Merged, Prepared, encode_records, finish, prepare
from gqaprune.finetune.records import (EXPECTED_FORMS, FORM_FIELDS, FORM_TEXT, Records, detect_form,
                                       is_known, known_datasets, load_records, normalise, read_local_records,
                                       records_of)
from gqaprune.finetune.schedule import TrainingConfig, epoch_order, lr_at, micro_batches, steps_per_epoch, total_steps
from gqaprune.finetune.training import (Callbacks, History, StepRecord, TrainResult, ValRecord, train,
                                        training_curves_figure)

__all__ = [
    "CKPT_FORMAT", "META_CONFIG_KEY", "META_RUN_ID", "CheckpointStore", "config_key",
    "DEFAULT_DATASET", "RESUME_CHOICES", "CheckpointConfig", "DataConfig", "EvalAfterConfig", "FinetuneConfig",
    "OutputConfig", "SourceConfig",
    "IGNORE", "DataStats", "Encoded", "FinetuneData", "build_data", "check_seq_len", "collate",
    "describe_example", "encode", "pack_text", "split_sizes",
    "DEFAULT_TARGETS", "GROUPS", "SHORT_NAMES", "LoraConfig", "attach_lora", "merge", "parse_targets",
    "resolve_targets", "trainable_parameters",
    "accumulate_gradients", "mean_loss", "nll_sum",
    "KEEP_MASK_CHOICES", "MIN_ZERO_SHARE", "MaskConfig", "MaskInfo", "ZeroPattern", "merge_keeping_zeros",
    "zero_pattern",
    "Merged", "Prepared", "encode_records", "finish", "prepare",
    "EXPECTED_FORMS", "FORM_FIELDS", "FORM_TEXT", "Records", "detect_form", "is_known", "known_datasets",
    "load_records", "normalise", "read_local_records", "records_of",
    "TrainingConfig", "epoch_order", "lr_at", "micro_batches", "steps_per_epoch", "total_steps",
    "Callbacks", "History", "StepRecord", "TrainResult", "ValRecord", "train", "training_curves_figure",
]
