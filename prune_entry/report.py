"""Log a prune run's typed outcome: metrics, tables, figures and the console summary.

Everything a :class:`gqaprune.pipeline.PruneOutcome` holds goes to the active MLflow run through
``tracking.runs`` under the names of ``tracking.schema``.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from gqaprune import checkpoint, data
from gqaprune.pipeline import PruneConfig, PruneOutcome
from gqaprune.plots import layer_summary_figure
from gqaprune.structured.diagnosis import diagnosis_figure, rates_figure
from gqaprune.structured.reconstruct import error_figure
from prune_entry import inputs
from tracking import runs, schema


def _title(alias: str, outcome: PruneOutcome) -> str:
    plan = outcome.plan
    return f"{Path(alias).name} · {plan.method} · target {plan.target_ratio:.0%}"


def log_plan(alias: str, outcome: PruneOutcome, peak_mb: float) -> dict:
    """Sizes, ratios, times and the per-layer summary (table + figure) of the plan."""
    plan, t = outcome.plan, outcome.timings
    summary = plan.layer_summary()
    metrics = {schema.M_PARAMS_BEFORE: outcome.params_before, schema.M_PARAMS_AFTER: outcome.params_after,
               schema.M_PRUNABLE_BEFORE: plan.prunable_before(), schema.M_PRUNABLE_AFTER: plan.prunable_after(),
               schema.M_ACHIEVED_RATIO: plan.achieved_ratio(),
               schema.M_ACHIEVED_TOTAL_RATIO: 1 - outcome.params_after / outcome.params_before,
               schema.M_PRUNE_TIME: t.total_s, schema.M_SCORING_TIME: t.scoring_s, schema.M_PEAK_MEMORY: peak_mb}
    for row in summary:
        metrics[schema.layer_metric(schema.M_LAYER_KEPT_ATTN, row["layer"])] = row["kept_attn_frac"]
        metrics[schema.layer_metric(schema.M_LAYER_KEPT_MLP, row["layer"])] = row["kept_mlp_frac"]
        metrics[schema.layer_metric(schema.M_LAYER_KEPT, row["layer"])] = row["kept_frac"]
    runs.log_metrics(metrics)
    runs.log_json(plan.to_dict(), schema.A_PLAN)
    runs.log_table(pd.DataFrame(summary), schema.A_LAYER_SUMMARY)
    title = (f"{alias} · {plan.method} · target {plan.target_ratio:.0%} · "
             f"achieved {plan.achieved_ratio():.1%} of prunable params")
    runs.log_figure(layer_summary_figure(summary, title), schema.A_LAYER_SUMMARY_FIG)
    return metrics


def log_rates(config: PruneConfig, alias: str, outcome: PruneOutcome) -> dict:
    """Layer importance config and per-layer (per-block) rates of layerwise / blockwise."""
    metrics: dict = {}
    imp, rows = outcome.layer_importance, outcome.rates
    if imp is not None:
        runs.log_json(imp.to_dict(), schema.A_LAYER_IMPORTANCE)
        metrics[schema.M_IMPORTANCE_TIME] = imp.details.get("time_s", 0.0)
        if config.structured.rates.importance_config:
            runs.set_tags({schema.TAG_IMPORTANCE_SOURCE: config.structured.rates.importance_config})
    if rows:
        for r in rows:
            metrics[schema.rate_metric(schema.M_LAYER_IMPORTANCE, r.layer, r.block)] = r.importance
            metrics[schema.rate_metric(schema.M_LAYER_TARGET_RATE, r.layer, r.block)] = r.target_rate
        runs.log_table(pd.DataFrame([asdict(r) for r in rows]), schema.A_LAYER_RATES)
        runs.log_figure(rates_figure(rows, f"{_title(alias, outcome)} · {imp.method if imp else ''} importance"),
                        schema.A_LAYER_RATES_FIG)
        print("per-layer pruning rates (target -> achieved): " + ", ".join(
            f"{r.layer}{'' if r.block == 'layer' else '/' + r.block} {r.target_rate:.2f}->{r.achieved_rate:.2f}"
            for r in rows))
    runs.log_metrics(metrics)
    return metrics


def log_diagnosis(alias: str, outcome: PruneOutcome) -> dict:
    """Gradient diagnosis of Taylor-based plans: ratios, extreme layers, verdict, figure."""
    diag = outcome.diagnosis
    if diag is None:
        return {}
    metrics = {schema.M_GRAD_NORM_RATIO: diag.grad_norm_ratio, schema.M_GRAD_MEAN_RATIO: diag.grad_mean_ratio,
               schema.M_MEAN_RATIO: diag.mean_ratio, schema.M_NUM_EXTREME_LAYERS: diag.num_extreme_pruning_layers}
    if diag.mean_ratio_conditioned is not None:
        metrics[schema.M_MEAN_RATIO_CONDITIONED] = diag.mean_ratio_conditioned
    for r in diag.layers:
        metrics[schema.layer_metric(schema.M_LAYER_GRAD_NORM, r.layer)] = r.grad_norm
        metrics[schema.layer_metric(schema.M_LAYER_GRAD_MEAN, r.layer)] = r.grad_mean
    runs.set_tags({schema.TAG_EXTREME_LAYERS: ",".join(map(str, diag.extreme_pruning_layers)) or "none"})
    runs.log_json(diag.to_dict(), schema.A_GRAD_DIAGNOSIS)
    runs.log_text(diag.verdict, schema.A_GRAD_VERDICT)
    runs.log_figure(diagnosis_figure(diag, _title(alias, outcome), outcome.rates), schema.A_GRAD_DIAGNOSIS_FIG)
    runs.log_metrics(metrics)
    print(diag.verdict)
    return metrics


def log_reconstruction(alias: str, outcome: PruneOutcome) -> dict:
    """Per-layer relative errors before/after the refit (metrics, CSV, figure) and its time."""
    result = outcome.reconstruction
    if result is None:
        return {}
    rows = result.rows()
    metrics = {schema.M_RECON_TIME: result.time_s}
    for r in rows:
        for when in ("before", "after"):
            metrics[schema.recon_metric(r["layer"], r["proj"], when)] = r[f"err_{when}"]
    for when in ("before", "after"):
        metrics[schema.recon_mean_metric(when)] = sum(r[f"err_{when}"] for r in rows) / len(rows)
    runs.log_metrics(metrics)
    runs.log_table(pd.DataFrame(rows), schema.A_RECON_ERRORS)
    s, plan = result.settings, outcome.plan
    title = (f"{Path(alias).name} · {plan.method} · {plan.target_ratio:.0%} · reconstruct={s.mode} "
             f"(target {s.target}, damping {s.damping:g}) · {rows[0]['tokens'] if rows else 0} tokens")
    runs.log_figure(error_figure(rows, title), schema.A_RECON_ERRORS_FIG)
    print(f"reconstruction ({s.mode}): mean relative error {metrics[schema.recon_mean_metric('before')]:.3f} -> "
          f"{metrics[schema.recon_mean_metric('after')]:.3f} in {result.time_s:.1f}s")
    raised = [f"{r['layer']}/{r['proj']}" for r in rows if r["damping"] > s.damping]
    if raised:
        print(f"note: singular statistics, damping raised automatically for {', '.join(raised)} "
              f"(see {schema.A_RECON_ERRORS}); more calibration tokens avoid this")
    return metrics


def log_structured(cfg: PruneConfig, alias: str, outcome: PruneOutcome, peak_mb: float) -> dict:
    """Structured methods: plan, rates, diagnosis and reconstruction, then the console summary."""
    metrics = log_plan(alias, outcome, peak_mb)
    runs.set_tags({schema.TAG_RATIO_KIND: schema.RATIO_STRUCTURED})
    metrics.update(log_rates(cfg, alias, outcome))
    metrics.update(log_diagnosis(alias, outcome))
    metrics.update(log_reconstruction(alias, outcome))
    print(f"pruned {alias} with {outcome.plan.method}: {outcome.params_before:,} -> "
          f"{outcome.params_after:,} parameters; {metrics[schema.M_ACHIEVED_RATIO]:.1%} of prunable "
          f"parameters removed (target {cfg.structured.pruning_ratio:.0%}) in {outcome.timings.total_s:.1f}s")
    return metrics


def log_joint(cfg: PruneConfig, alias: str, outcome: PruneOutcome, peak_mb: float) -> dict:
    """obs: the plan as every structured run, then removed units and OBS errors per layer."""
    metrics = log_plan(alias, outcome, peak_mb)
    runs.set_tags({schema.TAG_RATIO_KIND: schema.RATIO_STRUCTURED})
    res = outcome.joint
    for r in res.layer_rows():
        metrics[schema.layer_metric(schema.M_OBS_REMOVED_GROUPS, r["layer"])] = r["removed_kv_groups"]
        metrics[schema.layer_metric(schema.M_OBS_REMOVED_CHANNELS, r["layer"])] = r["removed_channels"]
        metrics[schema.layer_metric(schema.M_OBS_LAYER_RATE, r["layer"])] = r["rate"]
    rows = res.projection_rows()
    for when in ("pruned", "after"):
        for r in rows:
            metrics[schema.M_OBS_ERR.format(when=when, layer=r["layer"], proj=r["proj"])] = r[f"err_{when}"]
        if rows:
            metrics[schema.M_OBS_ERR_MEAN.format(when=when)] = sum(r[f"err_{when}"] for r in rows) / len(rows)
    metrics.update({schema.M_OBS_TIME: res.timings.total_s, schema.M_OBS_STATS_MB: res.stats_bytes / 2**20})
    runs.log_metrics(metrics)
    runs.log_table(pd.DataFrame(res.layer_rows()), schema.A_OBS_LAYERS)
    runs.log_table(pd.DataFrame(rows), schema.A_OBS_PROJECTIONS)
    runs.log_figure(res.figure(f"{_title(alias, outcome)} · OBS"), schema.A_OBS_FIG)
    if rows:
        print(f"obs: mean relative error of the cut projections {metrics[schema.M_OBS_ERR_MEAN.format(when='pruned')]:.3f} "
              f"(surgery alone) -> {metrics[schema.M_OBS_ERR_MEAN.format(when='after')]:.3f} (compensated)")
    print(f"pruned {alias} with {outcome.plan.method}: {outcome.params_before:,} -> {outcome.params_after:,} "
          f"parameters; {metrics[schema.M_ACHIEVED_RATIO]:.1%} of prunable parameters removed "
          f"(target {outcome.plan.target_ratio:.0%}) in {outcome.timings.total_s:.1f}s")
    return metrics


def log_sparsity(alias: str, outcome: PruneOutcome, peak_mb: float) -> dict:
    """Sparsity methods: overall and per-layer sparsity, the N:M check, calibration cost and memory,
    tables, figure and provenance."""
    sp = outcome.sparsity
    metrics = {schema.M_PARAMS_BEFORE: outcome.params_before, schema.M_PARAMS_AFTER: outcome.params_after,
               schema.M_TARGET_SPARSITY: sp.target, schema.M_ACHIEVED_SPARSITY: sp.overall_sparsity,
               schema.M_PRUNE_TIME: outcome.timings.total_s, schema.M_PEAK_MEMORY: peak_mb}
    for row in sp.layer_rows():
        metrics[schema.layer_metric(schema.M_LAYER_SPARSITY, row["layer"])] = row["sparsity"]
        metrics[schema.layer_metric(schema.M_LAYER_TARGET_SPARSITY, row["layer"])] = row["target"]
    if sp.nm_check is not None:
        metrics.update({schema.M_NM_GROUPS: sp.nm_check.groups, schema.M_NM_VIOLATIONS: sp.nm_check.violations})
    if sp.max_damping is not None:
        metrics[schema.M_MAX_DAMPING] = sp.max_damping
    if sp.calibration is not None:
        c = sp.calibration
        metrics.update({schema.M_CALIB_FORWARDS: c.forward_equivalents,
                        schema.M_CALIB_STATS_MB: c.peak_stats_bytes / 2**20,
                        schema.M_CALIB_LAYER_ACT_MB: c.layer_activation_bytes / 2**20,
                        schema.M_CALIB_ALL_ACT_MB: c.all_layers_activation_bytes / 2**20})
    runs.log_metrics(metrics)
    runs.set_tags({schema.TAG_RATIO_KIND: schema.RATIO_SPARSITY})
    runs.log_table(pd.DataFrame(sp.layer_rows()), schema.A_SPARSITY_LAYERS)
    runs.log_table(pd.DataFrame(sp.projection_rows()), schema.A_SPARSITY_PROJECTIONS)
    runs.log_figure(sp.figure(), schema.A_SPARSITY_FIG)
    runs.log_json({"config": asdict(sp.config), "weights_counted": sp.weights_counted,
                   "calibration_dataset": outcome.calibration_source,
                   "owl": asdict(sp.owl) if sp.owl else None,
                   "nm_check": asdict(sp.nm_check) if sp.nm_check else None,
                   "calibration": asdict(sp.calibration) if sp.calibration else None,
                   "timings": asdict(sp.timings)}, schema.A_SPARSITY_PROVENANCE)
    nm = "" if sp.nm_check is None else f"; {sp.config.sparsity_pattern} check: {sp.nm_check.violations} of " \
                                          f"{sp.nm_check.groups} groups violate it"
    print(f"sparsified {alias} with {sp.config.method}: {sp.overall_sparsity:.2%} of the projection weights "
          f"are zero (target {sp.target:.2%}){nm} in {outcome.timings.total_s:.1f}s")
    return metrics


def log_data_sources(copies: list) -> None:
    """Where each dataset was read from: params data_copy/<name>, data_sha256/<name>, and the list."""
    if not copies:
        return
    params = {}
    for c in copies:
        where, sha = schema.data_params(c.name or c.ref.label())
        params[where] = c.path if c.origin in ("local", "file") else c.origin
        if c.sha256:
            params[sha] = c.sha256
    runs.log_params(params)
    runs.log_json([c.to_dict() for c in copies], schema.A_DATA_SOURCES)
    for c in copies:
        print(f"data: {c.describe()}")


def save_model(model, tokenizer, config: PruneConfig) -> str:
    """The pruned checkpoint as the run's MLflow Model ``pruned_model`` (and in output_dir); return
    its model id. ``runs:/<run>/pruned_model`` downloads the checkpoint directory."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(config.output.output_dir) if config.output.output_dir else Path(tmp) / schema.A_PRUNED_MODEL
        info = checkpoint.save_model(model, tokenizer, out)
        runs.set_tags({schema.TAG_CHECKPOINT_FORMAT: info["format"]})
        model_id = runs.log_model_dir(out, schema.A_PRUNED_MODEL, checkpoint_format=info["format"])
    print(f"pruned model: {runs.artifact_uri(schema.A_PRUNED_MODEL)} = models:/{model_id} "
          f"({info['format']} checkpoint)")
    return model_id


# ---- dataset inputs: which data the run read, as MLflow's Datasets column shows it --------------

def log_datasets(tokenizer, cfg: PruneConfig, outcome: PruneOutcome) -> None:
    """The calibration windows of the scores / sparsity statistics, of the layer importance and of
    the refit, each redrawn (seeded, so identical) to digest exactly the token ids the run used."""
    dd = cfg.data.resolve()
    for context, source, n, seq_len, seed in _data_uses(cfg, outcome):
        if not data.is_available(source):
            continue
        ids = data.calibration_batches(tokenizer, source, n, seq_len, seed, data_dir=dd)
        runs.log_dataset(inputs.text_input(source, ids, context, split="train", windows=n, seq_len=seq_len,
                                           seed=seed))


def _data_uses(cfg: PruneConfig, outcome: PruneOutcome) -> list[tuple]:
    """(context, source, windows, seq_len, seed) of every calibration draw of the run."""
    if outcome.plan is None:        # sparsity methods: one draw, when the method calibrates
        c = cfg.calibration
        if outcome.calibration_source == "none":
            return []
        return [(schema.CTX_CALIBRATION, outcome.calibration_source, c.taylor_num_samples, c.taylor_seq_len, c.seed)]
    prov, uses = outcome.plan.provenance, []
    if prov.calibration is not None and not prov.replayed_from:
        c = prov.calibration
        uses.append((schema.CTX_CALIBRATION, c.dataset, c.num_samples, c.seq_len, c.seed))
    imp = outcome.layer_importance
    calib = (imp.details.get("calibration") if imp is not None and not imp.details.get("reused_from") else None)
    if calib:
        uses.append((schema.CTX_IMPORTANCE, calib["dataset"], calib["num_samples"], calib["seq_len"], calib["seed"]))
    if prov.reconstruction is not None:
        r = prov.reconstruction
        uses.append((schema.CTX_RECONSTRUCTION, r.dataset, r.num_samples, r.seq_len, r.seed))
    return uses
