"""`prune` entry point: structured GQA-aware pruning of a causal LM, tracked in MLflow.

    python -m prune_entry.prune --model demo --method taylor --pruning_ratio 0.2
    mlflow run . -e prune -P model=Llama -P method=taylor --env-manager local

parse (flags generated from ``gqaprune.pipeline.PruneConfig``) -> load -> ``pipeline.prune`` -> log.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from gqaprune.config import flat
from gqaprune.loading import load_model_and_tokenizer, resolve_model
from gqaprune.pipeline import PruneConfig, PruneInputs, applicable, not_applied_note, prune
from gqaprune.structured.layer_importance import LayerImportance
from gqaprune.structured.plan import PruningPlan
from gqaprune.utils import peak_memory_mb, reset_peak_memory, seed_everything
from prune_entry import report
from tracking import cli, runs, schema, store


def parse(argv: list[str] | None) -> PruneConfig:
    cfg = cli.parse_config(PruneConfig, argv, prog="prune")
    preflight(cfg)
    cfg, dropped = applicable(cfg)
    if dropped:   # told before anything runs, and kept on the run as a tag
        print(not_applied_note(cfg, dropped))
        runs.set_tags({schema.TAG_NOT_APPLIED: ",".join(f"{k}={v}" for k, v in dropped.items())})
    return cfg


def preflight(cfg: PruneConfig) -> None:
    """Checks that need no model: fail before loading gigabytes."""
    resolve_model(cfg.model.model, cfg.model.models_file)
    cfg.runtime.resolved()


def tags_of(cfg: PruneConfig) -> dict:
    spec = resolve_model(cfg.model.model, cfg.model.models_file)
    return {schema.TAG_MODEL_ALIAS: spec.alias, schema.TAG_MODEL_FAMILY: spec.family,
            schema.TAG_MODEL_VARIANT: spec.variant, schema.TAG_MODEL_PATH: spec.path,
            schema.TAG_METHOD: cfg.method_label}


def inputs_of(cfg: PruneConfig) -> PruneInputs:
    """Fetch what the run reuses from the store or disk: a plan to replay, a layer importance."""
    s = cfg.structured
    plan = PruningPlan.load(store.resolve_file(s.plan, "plan")) if s.plan else None
    source = s.rates.importance_config
    imp = LayerImportance.load(store.resolve_file(source, "importance_config")) if source else None
    if imp is not None:
        print(f"layer importance: reusing {imp.method} importance from {source} (analysis skipped)")
    return PruneInputs(plan, s.plan, imp, source)


def run(cfg: PruneConfig) -> dict:
    runs.log_params(flat(cfg))
    spec = resolve_model(cfg.model.model, cfg.model.models_file)
    device, dtype = cfg.runtime.resolved()
    seed_everything(cfg.calibration.seed)
    model, tokenizer = load_model_and_tokenizer(spec, dtype, device)
    inputs = inputs_of(cfg)
    reset_peak_memory(device)
    outcome = prune(model, tokenizer, cfg, model_alias=spec.alias, model_path=spec.path, inputs=inputs)
    runs.log_params({schema.P_CALIBRATION_RESOLVED: outcome.calibration_source})
    report.log_data_sources(outcome.data_sources)
    if outcome.sparsity is not None:
        metrics = report.log_sparsity(spec.alias, outcome, peak_memory_mb(device))
    elif outcome.joint is not None:
        metrics = report.log_joint(cfg, spec.alias, outcome, peak_memory_mb(device))
    else:
        metrics = report.log_structured(cfg, spec.alias, outcome, peak_memory_mb(device))
    report.log_datasets(tokenizer, cfg, outcome)
    if cfg.output.save_model:
        report.save_model(model, tokenizer, cfg)
    return metrics


def run_name(cfg: PruneConfig) -> str:
    return schema.run_name(schema.STAGE_PRUNE, Path(cfg.model.model).name, cfg.method_label, cfg.ratio)


def run_child(cfg: PruneConfig, extra_tags: Mapping[str, str] | None = None,
              parent_run_id: str | None = None) -> str:
    """Prune as a nested child of the active MLflow run, or of ``parent_run_id`` (a Ray worker has
    no active run), e.g. one point of a search; return its run id. Bad input marks the child
    FAILED and raises :class:`UserError`. ``extra_tags`` are set on the child from its start (see
    :func:`tracking.runs.child_run`)."""
    return runs.child_run(schema.STAGE_PRUNE, lambda: _checked(cfg), run, run_name=run_name, tags=tags_of,
                          raw_params=flat(cfg), extra_tags=extra_tags, parent_run_id=parent_run_id)


def _checked(cfg: PruneConfig) -> PruneConfig:
    preflight(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    return runs.entry_point(schema.STAGE_PRUNE, lambda: parse(argv), run, run_name=run_name,
                            tags=tags_of, raw_params=cli.raw_flags(argv))


if __name__ == "__main__":
    raise SystemExit(main())
