"""Log a finetune run's typed results: data, zero pattern, per-step curves, merge, artifacts.

Everything the core (``gqaprune.finetune``) returns goes to the active MLflow run through
``tracking.runs`` under the names of ``tracking.schema``.
"""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from gqaprune import checkpoint
from gqaprune import finetune as ft
from gqaprune.arch import count_parameters
from gqaprune.finetune import FinetuneConfig
from prune_entry import inputs
from prune_entry.report import log_data_sources
from tracking import runs, schema

PEFT_CONFIG_FILE, PEFT_BASE_KEY = "adapter_config.json", "base_model_name_or_path"


def val_protocol(fdata: ft.FinetuneData, data: ft.DataConfig) -> str:
    """One line: what val_ppl measures, and why it is not the eval run's ppl/<dataset>."""
    targets = "every token" if fdata.form == "text" or data.train_on_prompt else "the response tokens"
    return (f"exp(token-mean NLL over {targets} of the {len(fdata.val)} held-out examples "
            f"(val_fraction {data.val_fraction}) of {fdata.source}, template {fdata.template.name}, "
            f"each example one sequence of at most {data.seq_len} tokens; not comparable to eval's "
            f"ppl/<dataset> (non-overlapping windows of held-out text under its ppl_protocol)")


def log_data(fdata: ft.FinetuneData, dataset: str, copies: list, data: ft.DataConfig) -> None:
    """What the data became (params, tags, sizes, template, one example, the val protocol) and
    where it was read."""
    log_data_sources(copies)
    runs.log_params({schema.P_FT_DATASET_RESOLVED: dataset, schema.P_FT_DATASET_SOURCE: fdata.source,
                     schema.P_FT_TEMPLATE_RESOLVED: fdata.template.name,
                     schema.P_FT_VAL_PROTOCOL: val_protocol(fdata, data)})
    runs.set_tags({schema.TAG_FT_FORM: fdata.form, schema.TAG_FT_TEMPLATE: fdata.template.name})
    stats = fdata.stats()
    runs.log_metrics({schema.M_FT_TRAIN_EXAMPLES: stats.train_examples,
                      schema.M_FT_VAL_EXAMPLES: stats.val_examples,
                      schema.M_FT_DROPPED: stats.dropped_examples,
                      schema.M_FT_TARGET_TOKENS: stats.train_target_tokens})
    runs.log_json(fdata.template.to_dict(), schema.A_FT_TEMPLATE)
    runs.log_text(fdata.example, schema.A_FT_EXAMPLE)
    log_data_inputs(fdata, dataset)


def log_data_inputs(fdata: ft.FinetuneData, dataset: str) -> None:
    """The training and validation examples as dataset inputs (MLflow's Datasets column): digests
    of exactly the token ids and label masks used."""
    name = Path(dataset).name if Path(dataset).expanduser().is_file() else dataset
    for context, examples, split in ((schema.CTX_TRAINING, fdata.train, "train"),
                                     (schema.CTX_EVALUATION, fdata.val, "validation")):
        if examples:
            runs.log_dataset(inputs.examples_input(name, dataset, examples, context, split=split,
                                                   form=fdata.form, template=fdata.template.name))


def log_zero_pattern(zeros: ft.ZeroPattern) -> None:
    """Before training, so a killed run still tells whether its merge would keep the mask."""
    runs.set_tags({schema.TAG_FT_MASK_KEPT: str(zeros.kept).lower()})
    runs.log_metrics({schema.M_FT_BASE_SPARSITY: zeros.sparsity})
    print(f"zero pattern {'kept' if zeros.kept else 'not kept'} across the merge: {zeros.reason}")


def callbacks() -> ft.Callbacks:
    def on_step(rec: ft.StepRecord) -> None:
        runs.log_metrics({schema.M_FT_TRAIN_LOSS: rec.train_loss, schema.M_FT_LR: rec.lr}, step=rec.step)

    def on_validation(rec: ft.ValRecord) -> None:
        runs.log_metrics({schema.M_FT_VAL_LOSS: rec.val_loss,
                          schema.M_FT_VAL_PPL: math.exp(min(rec.val_loss, 50))}, step=rec.step)
    return ft.Callbacks(on_step, on_validation)


def log_training(result: ft.TrainResult, title: str, trainable: int, peak_mb: float) -> dict:
    val = result.history.val
    metrics = {schema.M_FT_STEPS: result.final_step, schema.M_FT_TIME: result.train_time_s,
               schema.M_FT_TRAINABLE: trainable, schema.M_PEAK_MEMORY: peak_mb}
    if val:
        metrics[schema.M_FT_VAL_LOSS_BEFORE] = val[0].val_loss
        metrics[schema.M_FT_VAL_LOSS_AFTER] = val[-1].val_loss
    runs.log_metrics(metrics)
    runs.log_table(pd.DataFrame([asdict(r) for r in result.history.train]), schema.A_FT_HISTORY)
    runs.log_figure(ft.training_curves_figure(result.history, title), schema.A_FT_CURVES)
    return metrics


def log_merge(merged: ft.Merged) -> dict:
    info = merged.mask
    metrics = {schema.M_FT_MERGED_SPARSITY: info.sparsity_after, schema.M_FT_MASK_REZEROED: info.rezeroed}
    if merged.val_loss is not None:
        metrics[schema.M_FT_VAL_LOSS_MERGED] = merged.val_loss
    runs.log_metrics(metrics)
    where = "zeros / weights of the 7 projections of every decoder layer"
    if info.kept:
        print(f"merge kept the zero pattern: {info.rezeroed:,} weights zeroed again; sparsity "
              f"{info.sparsity_before:.2%} -> {info.sparsity_after:.2%} ({where})"
              + (f"; validation loss of the merged model {merged.val_loss:.4f}" if merged.val_loss is not None else ""))
    elif info.sparsity_after < info.sparsity_before:
        print(f"note: the merged model is dense again: sparsity {info.sparsity_before:.2%} -> "
              f"{info.sparsity_after:.2%} ({where}); pass keep_mask auto or true to keep the zeros")
    return metrics


def save_adapter(peft_model, cfg: FinetuneConfig) -> None:
    """The LoRA adapter in peft format, its base named by what the user passed (a run id / URI),
    not a temporary download dir."""
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / schema.A_ADAPTER
        peft_model.save_pretrained(adapter)
        cfg_file = adapter / PEFT_CONFIG_FILE
        adapter_cfg = json.loads(cfg_file.read_text())
        adapter_cfg[PEFT_BASE_KEY] = cfg.source.model_uri
        cfg_file.write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True))
        runs.log_dir(adapter, schema.A_ADAPTER)


def save_merged(model, tokenizer, cfg: FinetuneConfig) -> None:
    """The merged model (toolkit + trust_remote_code loadable), also in output_dir if given."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(cfg.output.output_dir) if cfg.output.output_dir else Path(tmp) / schema.A_FINETUNED_MODEL
        info = checkpoint.save_model(model, tokenizer, out)
        runs.set_tags({schema.TAG_CHECKPOINT_FORMAT: info["format"]})
        runs.log_model_dir(out, schema.A_FINETUNED_MODEL, checkpoint_format=info["format"])
    print(f"LoRA adapter: {runs.artifact_uri(schema.A_ADAPTER)}; merged model: "
          f"{runs.artifact_uri(schema.A_FINETUNED_MODEL)} ({info['format']} checkpoint)")


def print_summary(alias: str, model, trainable: int, result: ft.TrainResult, seconds: float, metrics: dict) -> None:
    before, after = metrics.get(schema.M_FT_VAL_LOSS_BEFORE), metrics.get(schema.M_FT_VAL_LOSS_AFTER)
    print(f"finetuned {alias} ({count_parameters(model):,} params, {trainable:,} trainable) "
          f"for {result.final_step} steps in {seconds:.1f}s"
          + (f"; validation loss {before:.4f} -> {after:.4f}" if before is not None else ""))
