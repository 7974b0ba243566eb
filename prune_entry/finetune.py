"""`finetune` entry point: LoRA recovery of a (pruned) model, tracked in MLflow.

    python -m prune_entry.finetune --model_uri <prune run id | runs:/... | dir | alias> --dataset alpaca
    mlflow run . -e finetune -P model_uri=<prune run id> -P dataset=alpaca --env-manager local

Resuming: training state is checkpointed under ``checkpoint_dir/<config key>`` (the key hashes
the model source and every setting that changes the trajectory). Re-running the same command
after a kill continues from the last checkpoint in a *new* MLflow run that carries the earlier
run's per-step history and the tags ``resumed_from_run_id`` / ``resumed_from_step``.
"""
from __future__ import annotations

import importlib.util
import json
import math
import shlex
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from gqaprune import checkpoint, data
from gqaprune import finetune as ft
from gqaprune.errors import UserError
from gqaprune.arch import count_parameters
from gqaprune.loading import (load_model_and_tokenizer, resolve_device, resolve_dtype,
                             resolve_model)
from gqaprune.templates import AUTO, TEMPLATES
from gqaprune.utils import peak_memory_mb, reset_peak_memory, seed_everything
from tracking.cli import Parser, boolean, optional_int, optional_str, raw_flags
from tracking import runs, schema, store

RESUME_CHOICES = ("auto", "true", "false")
URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")  # model URIs whose download path varies


@dataclass(frozen=True)
class FinetuneConfig:
    model_uri: str = "demo"
    dataset: str = "auto"               # auto: the demo corpus for the demo model, else alpaca
    template: str = AUTO
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: str = ft.DEFAULT_TARGETS
    learning_rate: float = 1e-4
    epochs: int = 1
    finetune_samples: int | None = None
    seq_len: int = 256
    batch_size: int = 4
    gradient_accumulation: int = 1
    seed: int = 0
    val_fraction: float = 0.05
    train_on_prompt: bool = False
    gradient_checkpointing: bool = False
    dtype: str = "auto"
    device: str = "auto"
    eval_after: bool = False
    eval_args: str | None = None        # extra flags for the eval child run, e.g. "--tasks none"
    max_steps: int | None = None
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    resume: str = "auto"                # auto | true (must resume) | false (start over)
    checkpoint_every: int = 50
    checkpoint_dir: str | None = None   # default: $GQAPRUNE_CACHE/finetune
    models_file: str | None = None
    output_dir: str | None = None       # also keep the merged model here
    progress: bool = True


def build_parser() -> Parser:
    p = Parser(prog="finetune", description=__doc__.splitlines()[0])
    d = FinetuneConfig()
    p.add_argument("--model_uri", default=d.model_uri,
                   help="prune run id, runs:/ or models:/ URI, model dir, alias or HF id")
    p.add_argument("--dataset", default=d.dataset,
                   help="auto, alpaca (hub), squad (hub), a text source (wikitext2, demo, ...) or a "
                        ".json/.jsonl/.txt file")
    p.add_argument("--template", default=d.template, help=f"{AUTO} | {' | '.join(TEMPLATES)}")
    p.add_argument("--lora_r", type=int, default=d.lora_r)
    p.add_argument("--lora_alpha", type=float, default=d.lora_alpha)
    p.add_argument("--lora_dropout", type=float, default=d.lora_dropout)
    p.add_argument("--target_modules", default=d.target_modules,
                   help="comma list: q,k,v,o,gate,up,down (or full names, all, attn, mlp)")
    p.add_argument("--learning_rate", type=float, default=d.learning_rate)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--finetune_samples", type=optional_int, default=d.finetune_samples,
                   help="training examples (none: all)")
    p.add_argument("--seq_len", type=int, default=d.seq_len)
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--gradient_accumulation", type=int, default=d.gradient_accumulation)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--val_fraction", type=float, default=d.val_fraction)
    p.add_argument("--train_on_prompt", type=boolean, default=d.train_on_prompt)
    p.add_argument("--gradient_checkpointing", type=boolean, default=d.gradient_checkpointing)
    p.add_argument("--dtype", default=d.dtype, help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda[:N]")
    p.add_argument("--eval_after", type=boolean, default=d.eval_after)
    p.add_argument("--eval_args", type=optional_str, default=d.eval_args)
    p.add_argument("--max_steps", type=optional_int, default=d.max_steps)
    p.add_argument("--warmup_ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--weight_decay", type=float, default=d.weight_decay)
    p.add_argument("--max_grad_norm", type=float, default=d.max_grad_norm)
    p.add_argument("--resume", default=d.resume, help=" | ".join(RESUME_CHOICES))
    p.add_argument("--checkpoint_every", type=int, default=d.checkpoint_every)
    p.add_argument("--checkpoint_dir", type=optional_str, default=d.checkpoint_dir)
    p.add_argument("--models_file", type=optional_str, default=d.models_file)
    p.add_argument("--output_dir", type=optional_str, default=d.output_dir)
    p.add_argument("--progress", type=boolean, default=d.progress)
    return p


def parse(argv: list[str] | None) -> FinetuneConfig:
    cfg = FinetuneConfig(**vars(build_parser().parse_args(argv)))
    validate(cfg)
    return cfg


def _check(ok: bool, problem: str, fix: str) -> None:
    if not ok:
        raise UserError(problem, fix)


def validate(cfg: FinetuneConfig) -> None:
    """Checks that need no model, so bad flags fail before anything loads."""
    _check(cfg.lora_r >= 1, f"lora_r must be >= 1, got {cfg.lora_r}", "pass e.g. 8")
    _check(cfg.lora_alpha > 0, f"lora_alpha must be > 0, got {cfg.lora_alpha}", "pass e.g. 16")
    _check(0 <= cfg.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}", "pass e.g. 0.05")
    _check(cfg.learning_rate > 0, f"learning_rate must be > 0, got {cfg.learning_rate}", "pass e.g. 1e-4")
    for name in ("epochs", "batch_size", "gradient_accumulation", "checkpoint_every"):
        _check(getattr(cfg, name) >= 1, f"{name} must be >= 1, got {getattr(cfg, name)}", f"pass a positive {name}")
    for name in ("finetune_samples", "max_steps"):
        value = getattr(cfg, name)
        _check(value is None or value >= 1, f"{name} must be >= 1 or none, got {value}", f"pass a positive {name}")
    _check(cfg.seq_len >= 2, f"seq_len must be >= 2, got {cfg.seq_len}", "pass e.g. 256")
    _check(0 <= cfg.val_fraction < 1, f"val_fraction must be in [0, 1), got {cfg.val_fraction}", "pass e.g. 0.05")
    _check(0 <= cfg.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}", "pass e.g. 0.05")
    _check(cfg.resume in RESUME_CHOICES, f"resume must be one of {', '.join(RESUME_CHOICES)}, got '{cfg.resume}'",
           "pass auto, true or false")
    _check(cfg.template == AUTO or cfg.template in TEMPLATES, f"unknown template '{cfg.template}'",
           f"use {AUTO} or one of {', '.join(sorted(TEMPLATES))}")
    ft.parse_targets(cfg.target_modules)
    resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    if cfg.dataset != "auto":
        _check(cfg.dataset in ft.HUB_DATASETS or cfg.dataset in data.SOURCES
               or Path(cfg.dataset).expanduser().is_file(), f"unknown dataset '{cfg.dataset}'",
               f"use auto, one of {', '.join(sorted(set(ft.HUB_DATASETS) | set(data.SOURCES)))}, "
               "or an existing .json/.jsonl/.txt file")
    if cfg.eval_after:
        _check(importlib.util.find_spec("prune_entry.evaluate") is not None,
               "eval_after needs the eval entry point (prune_entry/evaluate.py), which is missing",
               "pass eval_after false, or install a gqaprune version with the eval entry point")
        from prune_entry import evaluate
        # The eval flags fail now, not after an hour of training.
        evaluate.parse(["--model_uri", cfg.model_uri, *shlex.split(cfg.eval_args or "")])


# ------------------------------------------------------------------------------ model source

@dataclass(frozen=True)
class Source:
    resolved: store.Resolved
    load_from: str        # what resolve_model gets: a local dir or an alias / hub id
    alias: str            # the base model's alias when known (from the prune run), else load_from
    tags: dict

    def identity(self) -> dict:
        """What the checkpoint key hashes: a run id if the model came from one, else its path."""
        from_store = self.resolved.source_run_id or self.resolved.name.startswith(URI_SCHEMES)
        return {"source_run_id": self.resolved.source_run_id, "model_uri": self.resolved.name,
                "path": None if from_store else self.load_from}


def resolve_source(cfg: FinetuneConfig) -> Source:
    """model_uri -> loadable path + tags linking the prune run (and its model's alias/family)."""
    res = store.resolve_model_source(cfg.model_uri)
    load_from = res.local_path or res.name
    spec = resolve_model(load_from, cfg.models_file)
    tags = {schema.TAG_SOURCE_URI: cfg.model_uri, schema.TAG_MODEL_ALIAS: spec.alias,
            schema.TAG_MODEL_FAMILY: spec.family, schema.TAG_MODEL_VARIANT: spec.variant,
            schema.TAG_MODEL_PATH: spec.path}
    if res.source_run_id:
        tags[schema.TAG_SOURCE_RUN] = res.source_run_id
        parent = store.get_run(res.source_run_id).data.tags
        for key in (schema.TAG_MODEL_ALIAS, schema.TAG_MODEL_FAMILY, schema.TAG_MODEL_VARIANT,
                    schema.TAG_MODEL_PATH, schema.TAG_METHOD):
            if key in parent:
                tags[key] = parent[key]
    return Source(res, load_from, tags[schema.TAG_MODEL_ALIAS], tags)


def dataset_of(cfg: FinetuneConfig, source: Source) -> str:
    if cfg.dataset != "auto":
        return cfg.dataset
    return "demo" if source.alias == "demo" else "alpaca"


# ------------------------------------------------------------------------------ resume

def checkpoint_root(cfg: FinetuneConfig) -> Path:
    if cfg.checkpoint_dir:
        return Path(cfg.checkpoint_dir).expanduser()
    from gqaprune.demo import default_cache_dir
    return default_cache_dir() / "finetune"


def trajectory_settings(cfg: FinetuneConfig, source: Source, dataset: str) -> dict:
    """Everything that changes what training computes (not where it runs or how it is logged)."""
    skip = {"model_uri", "dataset", "eval_after", "eval_args", "resume", "checkpoint_every",
            "checkpoint_dir", "output_dir", "progress", "gradient_checkpointing", "device",
            "models_file"}
    return {**{k: v for k, v in asdict(cfg).items() if k not in skip},
            "model": source.identity(), "dataset": str(Path(dataset).expanduser().resolve())
            if Path(dataset).expanduser().is_file() else dataset}


def resume_state(cfg: FinetuneConfig, ckpt: ft.CheckpointStore) -> dict | None:
    """Load the matching checkpoint (and close the run that wrote it) or start fresh."""
    if cfg.resume == "false":
        ckpt.clear()
        return None
    if not ckpt.exists():
        if cfg.resume == "true":
            raise UserError(f"resume true but there is no checkpoint for this configuration in {ckpt.dir}",
                            "pass resume auto (or false) to start from step 0")
        return None
    state = ckpt.load()
    old = state.get("meta", {}).get("run_id")
    runs.set_tags({schema.TAG_FT_RESUMED_FROM: old, schema.TAG_FT_RESUMED_STEP: state["step"]})
    _close_stale_run(old)
    print(f"resuming from step {state['step']}/{state['total_steps']} (checkpoint {ckpt.dir}, run {old})")
    return state


def _close_stale_run(run_id: str | None) -> None:
    """A run killed with SIGKILL stays RUNNING forever; mark it KILLED now it is resumed."""
    if not run_id or run_id == runs.active_run_id():
        return
    from mlflow.tracking import MlflowClient
    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, schema.TAG_FAILURE, f"interrupted; resumed by run {runs.active_run_id()}")
            client.set_terminated(run_id, "KILLED")
    except Exception:  # noqa: BLE001 - the old run may live in another store; nothing to close
        pass


# ------------------------------------------------------------------------------ run

def settings_of(cfg: FinetuneConfig) -> tuple[ft.LoraSettings, ft.TrainSettings]:
    lora = ft.LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules)
    train = ft.TrainSettings(cfg.learning_rate, cfg.epochs, cfg.batch_size, cfg.gradient_accumulation,
                             cfg.seed, cfg.max_steps, cfg.warmup_ratio, cfg.weight_decay,
                             cfg.max_grad_norm, cfg.checkpoint_every, cfg.progress)
    return lora, train


def log_data(fdata: ft.FinetuneData, dataset: str) -> None:
    runs.log_params({"dataset_resolved": dataset, "dataset_source": fdata.source,
                     "template_resolved": fdata.template.name})
    runs.set_tags({schema.TAG_FT_FORM: fdata.form, schema.TAG_FT_TEMPLATE: fdata.template.name})
    stats = fdata.stats()
    runs.log_metrics({schema.M_FT_TRAIN_EXAMPLES: stats["train_examples"],
                      schema.M_FT_VAL_EXAMPLES: stats["val_examples"],
                      schema.M_FT_DROPPED: stats["dropped_examples"],
                      schema.M_FT_TARGET_TOKENS: stats["train_target_tokens"]})
    runs.log_json(fdata.template.to_dict(), schema.A_FT_TEMPLATE)
    runs.log_text(fdata.example, schema.A_FT_EXAMPLE)


def callbacks() -> ft.Callbacks:
    def on_step(rec: dict) -> None:
        runs.log_metrics({schema.M_FT_TRAIN_LOSS: rec["train_loss"], schema.M_FT_LR: rec["lr"]},
                         step=rec["step"])

    def on_validation(rec: dict) -> None:
        runs.log_metrics({schema.M_FT_VAL_LOSS: rec["val_loss"],
                          schema.M_FT_VAL_PPL: math.exp(min(rec["val_loss"], 50))}, step=rec["step"])
    return ft.Callbacks(on_step, on_validation)


def log_training(result: ft.TrainResult, title: str, trainable: int, peak_mb: float) -> dict:
    val = result.history["val"]
    metrics = {schema.M_FT_STEPS: result.final_step, schema.M_FT_TIME: result.train_time_s,
               schema.M_FT_TRAINABLE: trainable, schema.M_PEAK_MEMORY: peak_mb}
    if val:
        metrics[schema.M_FT_VAL_LOSS_BEFORE] = val[0]["val_loss"]
        metrics[schema.M_FT_VAL_LOSS_AFTER] = val[-1]["val_loss"]
    runs.log_metrics(metrics)
    runs.log_table(pd.DataFrame(result.history["train"]), schema.A_FT_HISTORY)
    runs.log_figure(ft.training_curves_figure(result.history, title), schema.A_FT_CURVES)
    return metrics


def save_models(peft_model, tokenizer, cfg: FinetuneConfig) -> None:
    """Adapter (peft format) and merged model (toolkit + trust_remote_code loadable)."""
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / schema.A_ADAPTER
        peft_model.save_pretrained(adapter)
        # Name the base by what the user passed (a run id / URI), not a temporary download dir.
        cfg_file = adapter / "adapter_config.json"
        adapter_cfg = json.loads(cfg_file.read_text())
        adapter_cfg["base_model_name_or_path"] = cfg.model_uri
        cfg_file.write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True))
        runs.log_dir(adapter, schema.A_ADAPTER)
        merged = ft.merge(peft_model)
        out = Path(cfg.output_dir) if cfg.output_dir else Path(tmp) / schema.A_FINETUNED_MODEL
        info = checkpoint.save_model(merged, tokenizer, out)
        runs.set_tags({schema.TAG_CHECKPOINT_FORMAT: info["format"]})
        runs.log_dir(out, schema.A_FINETUNED_MODEL)
    print(f"LoRA adapter: {runs.artifact_uri(schema.A_ADAPTER)}; merged model: "
          f"{runs.artifact_uri(schema.A_FINETUNED_MODEL)} ({info['format']} checkpoint)")


def eval_child(cfg: FinetuneConfig) -> str:
    """Run the eval entry point on the merged model as a child of this run."""
    from prune_entry import evaluate  # lazy: optional stage, heavy imports
    eval_cfg = evaluate.parse(["--model_uri", cfg.model_uri, *shlex.split(cfg.eval_args or "")])
    child = evaluate.run_child(runs.artifact_uri(schema.A_FINETUNED_MODEL), eval_cfg)
    runs.set_tags({schema.TAG_FT_EVAL_RUN: child})
    return child


def run(cfg: FinetuneConfig) -> dict:
    runs.log_params(asdict(cfg))
    source = resolve_source(cfg)
    runs.set_tags(source.tags)
    dataset = dataset_of(cfg, source)
    records = ft.load_records(dataset)          # before the model: bad data fails fast
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    seed_everything(cfg.seed)
    model, tokenizer = load_model_and_tokenizer(resolve_model(source.load_from, cfg.models_file), dtype, device)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    _check(max_pos is None or cfg.seq_len <= max_pos, f"seq_len {cfg.seq_len} exceeds the model's "
           f"{max_pos} positions", f"pass seq_len <= {max_pos}")
    fdata = ft.build_data(tokenizer, records, cfg.template, cfg.seq_len, cfg.finetune_samples,
                          cfg.val_fraction, cfg.seed, cfg.train_on_prompt)
    log_data(fdata, dataset)
    lora, train_settings = settings_of(cfg)
    peft_model = ft.attach_lora(model, lora, cfg.gradient_checkpointing)
    trainable = sum(p.numel() for _, p in ft.trainable_parameters(peft_model))
    key = ft.config_key(trajectory_settings(cfg, source, dataset))
    runs.set_tags({schema.TAG_FT_CONFIG_KEY: key})
    ckpt = ft.CheckpointStore(checkpoint_root(cfg) / key)
    state = resume_state(cfg, ckpt)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    result = ft.train(peft_model, fdata, train_settings, tokenizer.pad_token_id, ckpt, state, callbacks(),
                      meta={"run_id": runs.active_run_id(), "config_key": key, "model_uri": cfg.model_uri})
    title = (f"LoRA r={cfg.lora_r} on {Path(dataset).name} · {source.alias} · "
             f"{len(fdata.train)} examples × {cfg.epochs} epoch(s)")
    metrics = log_training(result, title, trainable, peak_memory_mb(device))
    save_models(peft_model, tokenizer, cfg)
    ckpt.clear()  # finished: nothing left to resume
    before, after = metrics.get(schema.M_FT_VAL_LOSS_BEFORE), metrics.get(schema.M_FT_VAL_LOSS_AFTER)
    print(f"finetuned {source.alias} ({count_parameters(model):,} params, {trainable:,} trainable) for "
          f"{result.final_step} steps in {time.perf_counter() - t0:.1f}s"
          + (f"; validation loss {before:.4f} -> {after:.4f}" if before is not None else ""))
    if cfg.eval_after:
        eval_child(cfg)
    return metrics


def run_name(cfg: FinetuneConfig) -> str:
    return f"finetune-{Path(cfg.model_uri).name[:12]}-{Path(cfg.dataset).name}-r{cfg.lora_r}"


def main(argv: list[str] | None = None) -> int:
    return runs.entry_point(schema.STAGE_FINETUNE, lambda: parse(argv), run, run_name=run_name,
                            raw_params=raw_flags(argv))


if __name__ == "__main__":
    raise SystemExit(main())
