"""One finetune run as core steps with typed results (the entry point logs between them).

    fdata = encode_records(tokenizer, records, config)         # records -> train / val examples
    prep = prepare(model, config)                         # zero pattern (sparse models), LoRA attached
    result = train(prep.peft_model, fdata, config.training, pad_id, store, state, callbacks, meta)
    ... save prep.peft_model's adapter ...
    merged = finish(prep, fdata, config, pad_id)          # merge, zero pattern re-applied

The entry point (``prune_entry/finetune.py``) loads the model and the records before, and logs
each result; nothing here logs or parses flags.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from gqaprune.finetune.config import FinetuneConfig
from gqaprune.finetune.encoding import FinetuneData, build_data
from gqaprune.finetune.lora import attach_lora, trainable_parameters
from gqaprune.finetune.loss import mean_loss
from gqaprune.finetune.masks import MaskInfo, ZeroPattern, merge_keeping_zeros, zero_pattern
from gqaprune.finetune.records import Records


def encode_records(tokenizer, records: Records, config: FinetuneConfig) -> FinetuneData:
    """The data section applied to ``records`` (seeded by the training seed)."""
    d = config.data
    return build_data(tokenizer, records, d.template, d.seq_len, d.finetune_samples, d.val_fraction,
                      config.training.seed, d.train_on_prompt)


@dataclass
class Prepared:
    peft_model: nn.Module
    zeros: ZeroPattern        # the base model's zeros, taken before LoRA (masks only if kept)
    trainable: int            # adapter parameters


def prepare(model: nn.Module, config: FinetuneConfig) -> Prepared:
    """Take the zero pattern, then attach LoRA (in this order: the pattern must come from the
    base weights alone)."""
    zeros = zero_pattern(model, config.mask.keep_mask)
    peft_model = attach_lora(model, config.lora, config.training.gradient_checkpointing)
    trainable = sum(p.numel() for _, p in trainable_parameters(peft_model))
    return Prepared(peft_model, zeros, trainable)


@dataclass
class Merged:
    model: nn.Module
    mask: MaskInfo
    val_loss: float | None    # validation loss of the merged model when the mask changed weights
                              # (it then differs from the adapted model's last val_loss); else None


def finish(prep: Prepared, fdata: FinetuneData, config: FinetuneConfig, pad_id: int) -> Merged:
    """Merge the adapters into the base weights, keeping the zero pattern when it was taken."""
    model, info = merge_keeping_zeros(prep.peft_model, prep.zeros)
    val = None
    if info.rezeroed and fdata.val:
        val = mean_loss(model, fdata.val, config.training.batch_size, pad_id)
    return Merged(model, info, val)
