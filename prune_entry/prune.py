"""`prune` entry point: structured GQA-aware pruning of a causal LM, tracked in MLflow.

    python -m prune_entry.prune --model demo --method taylor --pruning_ratio 0.2
    mlflow run . -e prune -P model=Llama -P method=taylor --env-manager local
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from gqaprune import checkpoint, data
from gqaprune.errors import UserError
from gqaprune.models import (ModelSpec, count_parameters, load_model_and_tokenizer, resolve_device,
                             resolve_dtype, resolve_model)
from gqaprune.plots import layer_summary_figure
from gqaprune.structured import methods
from gqaprune.structured.importance import TAYLOR_VARIANTS
from gqaprune.structured.plan import PruningPlan
from gqaprune.structured.surgery import apply_plan
from gqaprune.structured.units import model_shapes
from gqaprune.utils import peak_memory_mb, reset_peak_memory, seed_everything
from prune_entry.common import Parser, optional_int, optional_str, raw_flags
from tracking import runs, schema, store


@dataclass(frozen=True)
class PruneConfig:
    model: str = "demo"
    method: str = "taylor"
    pruning_ratio: float = 0.2
    taylor_seq_len: int = 128
    taylor_num_samples: int = 128
    taylor_variant: str = "vector"
    taylor_order: int = 1
    calibration_dataset: str = "auto"   # auto: demo corpus for the demo model, else wikitext2
    batch_size: int = 4
    seed: int = 0
    layer_start: int | None = None
    layer_end: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    plan: str | None = None             # replay a plan file / runs:/ URI instead of scoring
    models_file: str | None = None      # user aliases file (JSON/YAML)
    output_dir: str | None = None       # also keep the pruned model here
    save_model: bool = True


def build_parser() -> Parser:
    p = Parser(prog="prune", description=__doc__.splitlines()[0])
    d = PruneConfig()
    p.add_argument("--model", default=d.model, help="alias (Llama, Qwen-Instruct, ...), demo, HF id or dir")
    p.add_argument("--method", default=d.method, help=f"one of {', '.join(sorted(methods.METHODS))}")
    p.add_argument("--pruning_ratio", type=float, default=d.pruning_ratio,
                   help="fraction of prunable (attention + MLP) parameters to remove")
    p.add_argument("--taylor_seq_len", type=int, default=d.taylor_seq_len)
    p.add_argument("--taylor_num_samples", type=int, default=d.taylor_num_samples)
    p.add_argument("--taylor_variant", default=d.taylor_variant, help=" | ".join(TAYLOR_VARIANTS))
    p.add_argument("--taylor_order", type=int, default=d.taylor_order)
    p.add_argument("--calibration_dataset", default=d.calibration_dataset,
                   help=f"auto, one of {', '.join(sorted(data.SOURCES))}, or a .txt/.jsonl path")
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--layer_start", type=optional_int, default=d.layer_start)
    p.add_argument("--layer_end", type=optional_int, default=d.layer_end)
    p.add_argument("--dtype", default=d.dtype, help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda[:N]")
    p.add_argument("--plan", type=optional_str, default=d.plan,
                   help="replay this pruning_plan.json (path or runs:/ URI) instead of scoring")
    p.add_argument("--models_file", type=optional_str, default=d.models_file)
    p.add_argument("--output_dir", type=optional_str, default=d.output_dir)
    p.add_argument("--save_model", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    return p


def parse(argv: list[str] | None) -> PruneConfig:
    cfg = PruneConfig(**vars(build_parser().parse_args(argv)))
    validate(cfg)
    return cfg


def validate(cfg: PruneConfig) -> None:
    """Checks that need no model: fail before loading gigabytes."""
    if cfg.plan is None:
        methods.get_method(cfg.method)
    if not 0.0 < cfg.pruning_ratio < 1.0:
        raise UserError(f"pruning_ratio must be in (0, 1), got {cfg.pruning_ratio}", "pass e.g. 0.2 for 20%")
    if cfg.taylor_variant not in TAYLOR_VARIANTS:
        raise UserError(f"unknown taylor_variant '{cfg.taylor_variant}'", f"use one of {', '.join(TAYLOR_VARIANTS)}")
    if cfg.taylor_order not in (1, 2):
        raise UserError(f"taylor_order must be 1 or 2, got {cfg.taylor_order}", "use 1 or 2")
    for name in ("taylor_seq_len", "taylor_num_samples", "batch_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name} must be >= 1, got {getattr(cfg, name)}", f"pass a positive {name}")
    if cfg.calibration_dataset != "auto" and cfg.calibration_dataset not in data.SOURCES \
            and not Path(cfg.calibration_dataset).expanduser().is_file():
        raise UserError(f"unknown calibration_dataset '{cfg.calibration_dataset}'",
                        f"use auto, one of {', '.join(sorted(data.SOURCES))}, or an existing file path")
    resolve_model(cfg.model, cfg.models_file)


def calibration_source(cfg: PruneConfig, spec: ModelSpec) -> str:
    if cfg.calibration_dataset != "auto":
        return cfg.calibration_dataset
    return "demo" if spec.alias == "demo" else "wikitext2"


def tags_of(cfg: PruneConfig) -> dict:
    spec = resolve_model(cfg.model, cfg.models_file)
    return {schema.TAG_MODEL_ALIAS: spec.alias, schema.TAG_MODEL_FAMILY: spec.family,
            schema.TAG_MODEL_VARIANT: spec.variant, schema.TAG_MODEL_PATH: spec.path,
            schema.TAG_METHOD: "plan" if cfg.plan else cfg.method}


def compute_plan(cfg: PruneConfig, spec: ModelSpec, model, tokenizer) -> methods.MethodResult:
    """Score units and decide (or load a plan to replay)."""
    if cfg.plan is not None:
        plan = PruningPlan.load(store.resolve_file(cfg.plan, "plan"))
        plan.check_compatible(model_shapes(model))
        plan.provenance = {**plan.provenance, "replayed_from": cfg.plan}
        return methods.MethodResult(plan, None, 0.0)
    batches = None
    source = calibration_source(cfg, spec)
    if cfg.method in methods.NEEDS_CALIBRATION:
        batches = data.calibration_batches(tokenizer, source, cfg.taylor_num_samples,
                                           cfg.taylor_seq_len, cfg.seed)
    settings = methods.PruneSettings(
        method=cfg.method, pruning_ratio=cfg.pruning_ratio, layer_start=cfg.layer_start,
        layer_end=cfg.layer_end, taylor_variant=cfg.taylor_variant, taylor_order=cfg.taylor_order,
        batch_size=cfg.batch_size, seed=cfg.seed, model_name=spec.path,
        provenance={"calibration": {"dataset": source, "num_samples": cfg.taylor_num_samples,
                                    "seq_len": cfg.taylor_seq_len, "seed": cfg.seed}
                    if batches is not None else None})
    return methods.run_method(model, batches, settings)


def log_results(cfg: PruneConfig, spec: ModelSpec, result: methods.MethodResult,
                params_before: int, params_after: int, prune_time: float, peak_mb: float) -> dict:
    plan = result.plan
    summary = plan.layer_summary()
    metrics = {schema.M_PARAMS_BEFORE: params_before, schema.M_PARAMS_AFTER: params_after,
               schema.M_PRUNABLE_BEFORE: plan.prunable_before(),
               schema.M_PRUNABLE_AFTER: plan.prunable_after(),
               schema.M_ACHIEVED_RATIO: plan.achieved_ratio(),
               schema.M_ACHIEVED_TOTAL_RATIO: 1 - params_after / params_before,
               schema.M_PRUNE_TIME: prune_time, schema.M_SCORING_TIME: result.scoring_time_s,
               schema.M_PEAK_MEMORY: peak_mb}
    for row in summary:
        metrics[schema.layer_metric(schema.M_LAYER_KEPT_ATTN, row["layer"])] = row["kept_attn_frac"]
        metrics[schema.layer_metric(schema.M_LAYER_KEPT_MLP, row["layer"])] = row["kept_mlp_frac"]
        metrics[schema.layer_metric(schema.M_LAYER_KEPT, row["layer"])] = row["kept_frac"]
    runs.log_metrics(metrics)
    runs.log_json(plan.to_dict(), schema.A_PLAN)
    runs.log_table(pd.DataFrame(summary), schema.A_LAYER_SUMMARY)
    title = (f"{spec.alias} · {plan.method} · target {plan.target_ratio:.0%} · "
             f"achieved {plan.achieved_ratio():.1%} of prunable params")
    runs.log_figure(layer_summary_figure(summary, title), schema.A_LAYER_SUMMARY_FIG)
    return metrics


def run(cfg: PruneConfig) -> dict:
    runs.log_params({k: v for k, v in asdict(cfg).items()})
    spec = resolve_model(cfg.model, cfg.models_file)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    seed_everything(cfg.seed)
    model, tokenizer = load_model_and_tokenizer(spec, dtype, device)
    params_before = count_parameters(model)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    result = compute_plan(cfg, spec, model, tokenizer)
    apply_plan(model, result.plan)
    prune_time = time.perf_counter() - t0
    params_after = count_parameters(model)
    metrics = log_results(cfg, spec, result, params_before, params_after, prune_time,
                          peak_memory_mb(device))
    if cfg.save_model:
        save_and_log(model, tokenizer, cfg)
    print(f"pruned {spec.alias} with {result.plan.method}: {params_before:,} -> {params_after:,} "
          f"parameters; {metrics[schema.M_ACHIEVED_RATIO]:.1%} of prunable parameters removed "
          f"(target {cfg.pruning_ratio:.0%}) in {prune_time:.1f}s")
    return metrics


def save_and_log(model, tokenizer, cfg: PruneConfig) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(cfg.output_dir) if cfg.output_dir else Path(tmp) / schema.A_PRUNED_MODEL
        info = checkpoint.save_model(model, tokenizer, out)
        runs.set_tags({"checkpoint_format": info["format"]})
        runs.log_dir(out, schema.A_PRUNED_MODEL)
    print(f"pruned model: {runs.artifact_uri(schema.A_PRUNED_MODEL)} ({info['format']} checkpoint)")


def main(argv: list[str] | None = None) -> int:
    return runs.entry_point(schema.STAGE_PRUNE, lambda: parse(argv), run,
                            run_name=lambda c: f"prune-{Path(c.model).name}-{c.method}-{c.pruning_ratio:g}",
                            tags=tags_of, raw_params=raw_flags(argv))


if __name__ == "__main__":
    raise SystemExit(main())
