"""`finetune` entry point: LoRA recovery of a (pruned or sparse) model, tracked in MLflow.

    python -m prune_entry.finetune --model_uri <prune run id | runs:/... | dir | alias> --dataset alpaca
    mlflow run . -e finetune -P model_uri=<prune run id> -P dataset=alpaca --env-manager local

parse (flags generated from ``gqaprune.finetune.FinetuneConfig``) -> load (model source, records,
model) -> core (``gqaprune.finetune``: encode, prepare, train, finish) -> log.

Resuming: training state is checkpointed under ``checkpoint_dir/<config key>`` (the key hashes
the model source and every setting that changes the trajectory). Re-running the same command
after a kill continues from the last checkpoint in a *new* MLflow run that carries the earlier
run's per-step history and the tags ``resumed_from_run_id`` / ``resumed_from_step``.

Sparse models (``keep_mask``): the zero pattern of the projection weights is taken before LoRA
and re-applied after the merge (``gqaprune.finetune.masks``); tag ``sparse_mask_kept`` says
whether it was.
"""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from gqaprune import finetune as ft
from gqaprune.config import flat
from gqaprune.errors import UserError
from gqaprune.evaluation.config import EvalConfig
from gqaprune.finetune import FinetuneConfig
from gqaprune.loading import load_model_and_tokenizer, resolve_model
from gqaprune.utils import peak_memory_mb, reset_peak_memory, seed_everything
from prune_entry import evaluate
from prune_entry import finetune_report as report
from tracking import cli, runs, schema, store

URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")  # model URIs whose download path varies


def build_parser() -> cli.Parser:
    return cli.parser_for("finetune", FinetuneConfig)


def parse(argv: list[str] | None) -> FinetuneConfig:
    cfg = cli.parse_config(FinetuneConfig, argv, prog="finetune")
    preflight(cfg)
    return cfg


def preflight(cfg: FinetuneConfig) -> None:
    """Checks that need no model, so bad flags fail before anything loads."""
    cfg.runtime.resolved()
    cfg.local_data.resolve()   # a data_dir that is not a folder fails now
    if cfg.evaluation.eval_after:
        eval_config(cfg)   # the eval flags fail now, not after an hour of training


def eval_config(cfg: FinetuneConfig) -> EvalConfig:
    """The eval child's settings from ``eval_args`` (its model is the merged one)."""
    return evaluate.parse(shlex.split(cfg.evaluation.eval_args or ""))


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
        return {schema.TAG_SOURCE_RUN: self.resolved.source_run_id, schema.P_MODEL_URI: self.resolved.name,
                "path": None if from_store else self.load_from}


def resolve_source(cfg: FinetuneConfig) -> Source:
    """model_uri -> loadable path + tags linking the prune run (and its model's alias/family)."""
    uri = cfg.source.model_uri
    res = store.resolve_model_source(uri)
    load_from = res.local_path or res.name
    spec = resolve_model(load_from, cfg.source.models_file)
    tags = {schema.TAG_SOURCE_URI: uri, schema.TAG_MODEL_ALIAS: spec.alias,
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


# ------------------------------------------------------------------------------ resume

def trajectory_settings(cfg: FinetuneConfig, source: Source, dataset: str) -> dict:
    """Everything that changes what training computes (not where it runs or how it is logged)."""
    path = Path(dataset).expanduser()
    return {**cfg.trajectory(), "model": source.identity(),
            "dataset": str(path.resolve()) if path.is_file() else dataset}


def resume_state(cfg: FinetuneConfig, ckpt: ft.CheckpointStore) -> dict | None:
    """Load the matching checkpoint (and close the run that wrote it) or start fresh."""
    resume = cfg.checkpointing.resume
    if resume == "false":
        ckpt.clear()
        return None
    if not ckpt.exists():
        if resume == "true":
            raise UserError(f"resume true but there is no checkpoint for this configuration in {ckpt.dir}",
                            "pass resume auto (or false) to start from step 0")
        return None
    state = ckpt.load()
    old = state.get("meta", {}).get(ft.META_RUN_ID)
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


def eval_child(cfg: FinetuneConfig) -> str:
    """Run the eval entry point on the merged model as a child of this run."""
    child = evaluate.run_child(runs.artifact_uri(schema.A_FINETUNED_MODEL), eval_config(cfg))
    runs.set_tags({schema.TAG_FT_EVAL_RUN: child})
    return child


# ------------------------------------------------------------------------------ run

@dataclass
class Loaded:
    source: Source
    dataset: str              # the dataset ``auto`` resolved to
    records: ft.Records
    model: object
    tokenizer: object


def load(cfg: FinetuneConfig) -> Loaded:
    """Model source (tags), dataset and records (before the model: bad data fails fast), model."""
    source = resolve_source(cfg)
    runs.set_tags(source.tags)
    dataset = cfg.data.source(source.alias)
    records = ft.load_records(dataset, cfg.local_data.resolve())
    device, dtype = cfg.runtime.resolved()
    seed_everything(cfg.training.seed)
    model, tokenizer = load_model_and_tokenizer(resolve_model(source.load_from, cfg.source.models_file),
                                                dtype, device)
    ft.check_seq_len(model, cfg.data.seq_len)
    return Loaded(source, dataset, records, model, tokenizer)


def run(cfg: FinetuneConfig) -> dict:
    runs.log_params(flat(cfg))
    got = load(cfg)
    pad_id = got.tokenizer.pad_token_id
    fdata = ft.encode_records(got.tokenizer, got.records, cfg)
    report.log_data(fdata, got.dataset, got.records.copies)
    prep = ft.prepare(got.model, cfg)
    report.log_zero_pattern(prep.zeros)
    key = ft.config_key(trajectory_settings(cfg, got.source, got.dataset))
    runs.set_tags({schema.TAG_FT_CONFIG_KEY: key})
    ckpt = ft.CheckpointStore(cfg.checkpointing.root() / key)
    state = resume_state(cfg, ckpt)
    device, _ = cfg.runtime.resolved()
    reset_peak_memory(device)
    t0 = time.perf_counter()
    result = ft.train(prep.peft_model, fdata, cfg.training, pad_id, ckpt, state, report.callbacks(),
                      meta={ft.META_RUN_ID: runs.active_run_id(), ft.META_CONFIG_KEY: key,
                            schema.P_MODEL_URI: cfg.source.model_uri})
    title = (f"LoRA r={cfg.lora.lora_r} on {Path(got.dataset).name} · {got.source.alias} · "
             f"{len(fdata.train)} examples × {cfg.training.epochs} epoch(s)")
    metrics = report.log_training(result, title, prep.trainable, peak_memory_mb(device))
    report.save_adapter(prep.peft_model, cfg)
    merged = ft.finish(prep, fdata, cfg, pad_id)
    metrics.update(report.log_merge(merged))
    report.save_merged(merged.model, got.tokenizer, cfg)
    ckpt.clear()  # finished: nothing left to resume
    report.print_summary(got.source.alias, merged.model, prep.trainable, result, time.perf_counter() - t0, metrics)
    if cfg.evaluation.eval_after:
        eval_child(cfg)
    return metrics


def run_name(cfg: FinetuneConfig) -> str:
    return schema.run_name(schema.STAGE_FINETUNE, Path(cfg.source.model_uri).name[:12],
                           f"{Path(cfg.data.dataset).name}-r{cfg.lora.lora_r}")


def main(argv: list[str] | None = None) -> int:
    return runs.entry_point(schema.STAGE_FINETUNE, lambda: parse(argv), run, run_name=run_name,
                            raw_params=cli.raw_flags(argv))


if __name__ == "__main__":
    raise SystemExit(main())
