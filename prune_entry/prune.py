"""`prune` entry point: structured GQA-aware pruning of a causal LM, tracked in MLflow.

    python -m prune_entry.prune --model demo --method taylor --pruning_ratio 0.2
    mlflow run . -e prune -P model=Llama -P method=taylor --env-manager local
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from gqaprune import checkpoint, data
from gqaprune.errors import UserError
from gqaprune.arch import count_parameters
from gqaprune.loading import (ModelSpec, load_model_and_tokenizer, resolve_device,
                             resolve_dtype, resolve_model)
from gqaprune.plots import layer_summary_figure
from gqaprune.structured import methods
from gqaprune.structured.allocation import layer_range
from gqaprune.structured.conditioning import NORMALIZATIONS, Conditioning
from gqaprune.structured.diagnosis import diagnose, diagnosis_figure, rates_figure, verdict
from gqaprune.structured.importance import TAYLOR_VARIANTS
from gqaprune.structured.layer_importance import IMPORTANCE_METHODS, LayerImportance, compute_layer_importance
from gqaprune.structured.layer_importance import check_method as check_importance_method
from gqaprune.structured.rates import STRATEGIES, check_rate_settings, check_reachable_rates
from gqaprune.structured import reconstruct
from gqaprune.structured.plan import PruningPlan
from gqaprune.structured.surgery import apply_plan
from gqaprune.structured.units import model_shapes
from gqaprune.utils import peak_memory_mb, reset_peak_memory, seed_everything
from prune_entry.common import Parser, boolean, optional_int, optional_str, raw_flags
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
    # layerwise / blockwise: layer importance and per-layer rates (gqaprune/structured/rates.py)
    importance_method: str = "removal"
    importance_samples: int = 32
    importance_config: str | None = None  # reuse a layer_importance_config.json (path or runs:/)
    skip_importance_analysis: bool = False
    pruning_strategy: str = "inverse"
    alpha: float = 1.0
    min_pruning_rate: float = 0.15
    max_pruning_rate: float = 0.5
    # global taylor: score conditioning (gqaprune/structured/conditioning.py)
    normalization: str = "none"
    clip_low: float = 0.0
    clip_high: float = 100.0
    temperature: float = 0.0
    tau: float = 0.0
    # training-free reconstruction after surgery (gqaprune/structured/reconstruct.py)
    reconstruct: str = "lstsq"          # none | lstsq | bias
    reconstruct_samples: int = 128
    reconstruct_seq_len: int = 128
    damping: float = 0.05               # ridge, relative to mean(diag(X^T X))


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
    p.add_argument("--save_model", type=boolean, default=d.save_model)
    add_nonuniform_arguments(p, d)
    add_reconstruct_arguments(p, d)
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
    validate_nonuniform(cfg)
    validate_reconstruct(cfg)
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
    settings = replace(settings, **nonuniform_settings(cfg, spec, model, tokenizer, source))
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
    recon = apply_and_reconstruct(cfg, spec, model, tokenizer, result.plan)  # = apply_plan if none
    prune_time = time.perf_counter() - t0
    params_after = count_parameters(model)
    metrics = log_results(cfg, spec, result, params_before, params_after, prune_time,
                          peak_memory_mb(device))
    metrics.update(log_nonuniform(cfg, spec, result))
    metrics.update(log_reconstruction(spec, result.plan, recon))
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


# ---- non-uniform pruning (layerwise / blockwise), score conditioning, gradient diagnosis ------

NONUNIFORM_METHODS = ("layerwise", "blockwise")
_RATE_FIELDS = ("importance_method", "importance_samples", "pruning_strategy", "alpha",
                "min_pruning_rate", "max_pruning_rate")
_CONDITIONING_FIELDS = ("normalization", "clip_low", "clip_high", "temperature", "tau")


def add_nonuniform_arguments(p: Parser, d: PruneConfig) -> None:
    g = p.add_argument_group("layerwise / blockwise (per-layer rates from layer importance)")
    g.add_argument("--importance_method", default=d.importance_method,
                   help=" | ".join(IMPORTANCE_METHODS) + ": loss increase when a layer is skipped, "
                        "or 1 - cos(input, output) of its activations")
    g.add_argument("--importance_samples", type=int, default=d.importance_samples,
                   help="calibration samples (of taylor_seq_len tokens) for the layer importance")
    g.add_argument("--importance_config", type=optional_str, default=d.importance_config,
                   help="reuse a layer_importance_config.json (path or runs:/<run>/...) and skip the analysis")
    g.add_argument("--skip_importance_analysis", type=boolean, default=d.skip_importance_analysis,
                   help="true: reuse importance_config (required) instead of measuring")
    g.add_argument("--pruning_strategy", default=d.pruning_strategy, help=" | ".join(STRATEGIES))
    g.add_argument("--alpha", type=float, default=d.alpha, help="how strongly rates differ (0 = uniform)")
    g.add_argument("--min_pruning_rate", type=float, default=d.min_pruning_rate)
    g.add_argument("--max_pruning_rate", type=float, default=d.max_pruning_rate)
    c = p.add_argument_group("score conditioning of the global taylor ranking")
    c.add_argument("--normalization", default=d.normalization, help=" | ".join(NORMALIZATIONS))
    c.add_argument("--clip_low", type=float, default=d.clip_low, help="lower percentile clip per layer")
    c.add_argument("--clip_high", type=float, default=d.clip_high, help="upper percentile clip per layer")
    c.add_argument("--temperature", type=float, default=d.temperature,
                   help="T >= 0: 0 = pure global ranking, larger moves attention/MLP toward balance")
    c.add_argument("--tau", type=float, default=d.tau, help="gate: correct a layer only if rho >= tau")


def validate_nonuniform(cfg: PruneConfig) -> None:
    check_importance_method(cfg.importance_method)
    if cfg.importance_samples < 1:
        raise UserError(f"importance_samples must be >= 1, got {cfg.importance_samples}", "pass e.g. 32")
    check_rate_settings(cfg.pruning_strategy, cfg.alpha, cfg.min_pruning_rate, cfg.max_pruning_rate)
    Conditioning(*(getattr(cfg, f) for f in _CONDITIONING_FIELDS)).validate()
    if cfg.skip_importance_analysis and cfg.importance_config is None:
        raise UserError("skip_importance_analysis=true but no importance_config to reuse",
                        "pass importance_config=<layer_importance_config.json or "
                        "runs:/<run_id>/layer_importance_config.json>, or drop skip_importance_analysis")
    if cfg.importance_config is not None and "://" not in cfg.importance_config \
            and not cfg.importance_config.startswith(("runs:/", "models:/")) \
            and not Path(cfg.importance_config).expanduser().is_file():
        raise UserError(f"importance_config '{cfg.importance_config}' not found",
                        "pass a layer_importance_config.json path or runs:/<run_id>/layer_importance_config.json")
    if cfg.method in NONUNIFORM_METHODS and cfg.plan is None and cfg.layer_start is None \
            and cfg.layer_end is None:  # all layers pruned: the average rate is the ratio itself
        check_reachable_rates(cfg.pruning_ratio, cfg.min_pruning_rate, cfg.max_pruning_rate)


def _note_ignored(cfg: PruneConfig) -> None:
    d = PruneConfig()
    unused = []
    if cfg.method not in NONUNIFORM_METHODS:
        unused += [f for f in _RATE_FIELDS + ("importance_config",) if getattr(cfg, f) != getattr(d, f)]
    if cfg.method != "taylor":
        unused += [f for f in _CONDITIONING_FIELDS if getattr(cfg, f) != getattr(d, f)]
    if unused:
        print(f"note: {', '.join(unused)} do not apply to method {cfg.method} and are ignored")


def nonuniform_settings(cfg: PruneConfig, spec: ModelSpec, model, tokenizer, source: str) -> dict:
    """PruneSettings fields of this feature; for layerwise/blockwise also the layer importance
    (measured here, or loaded from importance_config and checked against this model)."""
    _note_ignored(cfg)
    out = {f: getattr(cfg, f) for f in _RATE_FIELDS + _CONDITIONING_FIELDS}
    if cfg.method not in NONUNIFORM_METHODS:
        return out
    granularity = "layer" if cfg.method == "layerwise" else "block"
    if cfg.importance_config is not None:
        imp = LayerImportance.load(store.resolve_file(cfg.importance_config, "importance_config"))
        imp.check_compatible(spec.path, model_shapes(model), granularity)
        imp.details = {**imp.details, "reused_from": cfg.importance_config, "time_s": 0.0}
        print(f"layer importance: reusing {imp.method} importance from {cfg.importance_config} "
              f"(analysis skipped)")
    else:
        ids = data.calibration_batches(tokenizer, source, cfg.importance_samples, cfg.taylor_seq_len,
                                       cfg.seed)
        t0 = time.perf_counter()
        imp = compute_layer_importance(
            model, ids, cfg.importance_method, granularity, cfg.batch_size, spec.path,
            extra={"calibration": {"dataset": source, "num_samples": cfg.importance_samples,
                                   "seq_len": cfg.taylor_seq_len, "seed": cfg.seed}})
        imp.details["time_s"] = time.perf_counter() - t0
    out["layer_importance"] = imp
    return out


def log_nonuniform(cfg: PruneConfig, spec: ModelSpec, result: methods.MethodResult) -> dict:
    """Layer importance config, per-layer rates, gradient diagnosis (+ printed verdict)."""
    metrics: dict = {}
    info = result.diagnostics or {}
    imp, rows = info.get("layer_importance"), info.get("layer_rates")
    title = f"{Path(spec.alias).name} · {result.plan.method} · target {result.plan.target_ratio:.0%}"
    if imp is not None:
        runs.log_json(imp.to_dict(), schema.A_LAYER_IMPORTANCE)
        metrics[schema.M_IMPORTANCE_TIME] = imp.details.get("time_s", 0.0)
        if cfg.importance_config:
            runs.set_tags({schema.TAG_IMPORTANCE_SOURCE: cfg.importance_config})
    if rows:
        for r in rows:
            if r["block"] == "layer":
                metrics[schema.layer_metric(schema.M_LAYER_IMPORTANCE, r["layer"])] = r["importance"]
                metrics[schema.layer_metric(schema.M_LAYER_TARGET_RATE, r["layer"])] = r["target_rate"]
            else:
                metrics[schema.M_LAYER_BLOCK_IMPORTANCE.format(layer=r["layer"], block=r["block"])] = r["importance"]
                metrics[schema.M_LAYER_BLOCK_TARGET_RATE.format(layer=r["layer"], block=r["block"])] = r["target_rate"]
        runs.log_table(pd.DataFrame(rows), schema.A_LAYER_RATES)
        runs.log_figure(rates_figure(rows, f"{title} · {imp.method if imp else ''} importance"),
                        schema.A_LAYER_RATES_FIG)
        print("per-layer pruning rates (target -> achieved): " + ", ".join(
            f"{r['layer']}{'' if r['block'] == 'layer' else '/' + r['block']} "
            f"{r['target_rate']:.2f}->{r['achieved_rate']:.2f}" for r in rows))
    n_layers = len(result.plan.original)
    diag = diagnose(result.plan, result.scores, layer_range(n_layers, cfg.layer_start, cfg.layer_end))
    if diag is not None:
        text = verdict(diag, {f: getattr(cfg, f) for f in _RATE_FIELDS + _CONDITIONING_FIELDS})
        diag.update(verdict=text, conditioning=info.get("conditioning"),
                    block_correction=info.get("block_correction"))
        metrics.update({schema.M_GRAD_NORM_RATIO: diag["grad_norm_ratio"],
                        schema.M_GRAD_MEAN_RATIO: diag["grad_mean_ratio"],
                        schema.M_MEAN_RATIO: diag["mean_ratio"],
                        schema.M_NUM_EXTREME_LAYERS: diag["num_extreme_pruning_layers"]})
        for r in diag["layers"]:
            metrics[schema.layer_metric(schema.M_LAYER_GRAD_NORM, r["layer"])] = r["grad_norm"]
            metrics[schema.layer_metric(schema.M_LAYER_GRAD_MEAN, r["layer"])] = r["grad_mean"]
        runs.set_tags({schema.TAG_EXTREME_LAYERS:
                       ",".join(map(str, diag["extreme_pruning_layers"])) or "none"})
        runs.log_json(diag, schema.A_GRAD_DIAGNOSIS)
        runs.log_text(text, schema.A_GRAD_VERDICT)
        runs.log_figure(diagnosis_figure(diag, title, rows), schema.A_GRAD_DIAGNOSIS_FIG)
        print(text)
    runs.log_metrics(metrics)
    return metrics


# ---- training-free reconstruction (layer-wise least squares / bias compensation) -------------

def add_reconstruct_arguments(p: Parser, d: PruneConfig) -> None:
    g = p.add_argument_group("reconstruction after surgery (refit o_proj / down_proj, no training)")
    g.add_argument("--reconstruct", default=d.reconstruct,
                   help=" | ".join(reconstruct.MODES) + ": least-squares refit of the kept columns, "
                        "FLAP-style bias compensation, or nothing")
    g.add_argument("--reconstruct_samples", type=int, default=d.reconstruct_samples,
                   help="calibration sequences for the reconstruction")
    g.add_argument("--reconstruct_seq_len", type=int, default=d.reconstruct_seq_len)
    g.add_argument("--damping", type=float, default=d.damping,
                   help="ridge damping relative to mean(diag(X^T X)), >= 0")


def validate_reconstruct(cfg: PruneConfig) -> None:
    reconstruct.ReconstructSettings(cfg.reconstruct, cfg.damping, cfg.batch_size).check()
    for name in ("reconstruct_samples", "reconstruct_seq_len"):
        if getattr(cfg, name) < 1 or (name.endswith("seq_len") and getattr(cfg, name) < 2):
            raise UserError(f"{name} must be >= {2 if name.endswith('seq_len') else 1}, got "
                            f"{getattr(cfg, name)}", f"pass a larger {name} (default 128)")


def reconstruction_source(cfg: PruneConfig, spec: ModelSpec, plan: PruningPlan) -> str:
    """Explicit calibration_dataset, else (replaying a plan) the data the plan was made with."""
    if cfg.calibration_dataset == "auto" and cfg.plan is not None:
        for key in ("reconstruction", "calibration"):
            src = (plan.provenance.get(key) or {}).get("dataset")
            if src and (src in data.SOURCES or Path(src).expanduser().is_file()):
                return src
    return calibration_source(cfg, spec)


def apply_and_reconstruct(cfg: PruneConfig, spec: ModelSpec, model, tokenizer, plan: PruningPlan):
    """Surgery, then (unless reconstruct=none) the layer-by-layer refit; records its settings in
    the plan's provenance. Returns the ReconstructResult or None."""
    if cfg.reconstruct == "none":
        apply_plan(model, plan)
        return None
    source = reconstruction_source(cfg, spec, plan)
    ids = data.calibration_batches(tokenizer, source, cfg.reconstruct_samples, cfg.reconstruct_seq_len,
                                   cfg.seed)
    settings = reconstruct.ReconstructSettings(cfg.reconstruct, cfg.damping, cfg.batch_size)
    result = reconstruct.prune_and_reconstruct(model, plan, ids, settings)
    plan.provenance = {**plan.provenance, "reconstruction": {
        "mode": settings.mode, "target": settings.target, "damping": settings.damping,
        "dataset": source, "num_samples": cfg.reconstruct_samples,
        "seq_len": cfg.reconstruct_seq_len, "seed": cfg.seed}}
    return result


def log_reconstruction(spec: ModelSpec, plan: PruningPlan, result) -> dict:
    """Per-layer relative errors before/after (metrics, CSV, figure) and the total time."""
    if result is None:
        return {}
    rows = result.rows()
    metrics = {schema.M_RECON_TIME: result.time_s}
    for r in rows:
        for when in ("before", "after"):
            metrics[schema.recon_metric(r["layer"], r["proj"], when)] = r[f"err_{when}"]
    for when in ("before", "after"):
        metrics[schema.M_RECON_ERR_MEAN.format(when=when)] = sum(r[f"err_{when}"] for r in rows) / len(rows)
    runs.log_metrics(metrics)
    runs.log_table(pd.DataFrame(rows), schema.A_RECON_ERRORS)
    s = result.settings
    title = (f"{Path(spec.alias).name} · {plan.method} · {plan.target_ratio:.0%} · reconstruct={s.mode} "
             f"(target {s.target}, damping {s.damping:g}) · {rows[0]['tokens'] if rows else 0} tokens")
    runs.log_figure(reconstruct.error_figure(rows, title), schema.A_RECON_ERRORS_FIG)
    print(f"reconstruction ({s.mode}): mean relative error "
          f"{metrics[schema.M_RECON_ERR_MEAN.format(when='before')]:.3f} -> "
          f"{metrics[schema.M_RECON_ERR_MEAN.format(when='after')]:.3f} in {result.time_s:.1f}s")
    raised = [f"{r['layer']}/{r['proj']}" for r in rows if r["damping"] > s.damping]
    if raised:
        print(f"note: singular statistics, damping raised automatically for {', '.join(raised)} "
              f"(see {schema.A_RECON_ERRORS}); more calibration tokens avoid this")
    return metrics


def run_child(args: list[str], extra_tags: Mapping[str, str] | None = None) -> str:
    """Prune as a nested child of the active MLflow run (e.g. one point of a search); return its
    run id. Bad input marks the child FAILED and raises :class:`UserError`. ``extra_tags`` are set
    on the child from its start (see :func:`tracking.runs.child_run`)."""
    return runs.child_run(schema.STAGE_PRUNE, lambda: parse(args), run, run_name=_run_name,
                          tags=tags_of, raw_params=raw_flags(args), extra_tags=extra_tags)


def _run_name(cfg: PruneConfig) -> str:
    return f"prune-{Path(cfg.model).name}-{cfg.method}-{cfg.pruning_ratio:g}"


def main(argv: list[str] | None = None) -> int:
    return runs.entry_point(schema.STAGE_PRUNE, lambda: parse(argv), run,
                            run_name=_run_name,
                            tags=tags_of, raw_params=raw_flags(argv))


if __name__ == "__main__":
    raise SystemExit(main())
