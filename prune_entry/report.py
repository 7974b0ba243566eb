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

def log_datasets(tokenizer, outcome: PruneOutcome) -> None:
    """The calibration windows of the scores and of the layer importance and the refit's windows,
    each redrawn (seeded, so identical) to digest exactly the token ids the run used."""
    prov = outcome.plan.provenance
    uses = []
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
    for context, source, n, seq_len, seed in uses:
        if not data.is_available(source):
            continue
        ids = data.calibration_batches(tokenizer, source, n, seq_len, seed)
        runs.log_dataset(inputs.text_input(source, ids, context, split="train", windows=n, seq_len=seq_len,
                                       seed=seed))

