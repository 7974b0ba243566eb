"""One model's study in one place: every method's results, its global best configuration and a
method comparison, from the eval runs in the tracking store.

    python -m analysis.consolidate --model Llama [--experiments a,b] [--select_by auto] [--output_dir reports/]
    python -m analysis.consolidate --all [--output_dir reports/]
    mlflow run . -e consolidate -P model=Llama --env-manager local

For the model (an alias as the tables show it, or the model path): ``model_results`` (every
pruned / pruned+LoRA configuration of every method: method, ratio, stage, its rank in its group,
the swept parameters, ACC, PPL, every zero-shot task score, achieved ratio, parameters, the
gradient diagnosis, run ids), ``global_best_config.json`` (the best over every method per ratio
and stage, under the selection rule of :mod:`analysis.selection`) and ``method_comparison``
(.json and .md / .tex / .csv: per ratio, stage and method the number of configurations, the best,
mean and sample standard deviation of ACC and of PPL, and that method's best configuration).
``--all`` does the same for every model, under ``<alias>/``. Everything is logged to an analysis
run in the ``gqaprune-analysis`` experiment.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean, stdev

import pandas as pd

from analysis import query, selection, study as study_mod, tables
from analysis.selection import ACC
from analysis.study import KIND, MODEL, PPL, PPL_METRIC, Study, pcol
from analysis.tables import Table, number
from tracking import UserError
from tracking.cli import Parser, boolean, optional_str, raw_flags
from tracking import runs, schema
from tracking.redact import redact

RUN_NAME = schema.RUN_CONSOLIDATE


def build_parser() -> Parser:
    p = Parser(prog=RUN_NAME, description=__doc__.splitlines()[0])
    p.add_argument("--model", type=optional_str, default=None,
                   help="the model: its alias as the tables show it (Llama, Qwen-Instruct, ...) or its path")
    p.add_argument("--all", type=boolean, default=False, help="every model of the selection, each under <alias>/")
    p.add_argument("--experiments", type=optional_str, default=None,
                   help="comma-separated experiment names (default: every experiment in the store)")
    p.add_argument("--select_by", default=selection.AUTO,
                   help="auto (highest zeroshot/mean_acc, ties / no accuracy: lowest first perplexity) or "
                        "<metric>:max|min")
    p.add_argument("--output_dir", type=optional_str, default=None, help="also write the reports here")
    p.add_argument("--include_failed", type=boolean, default=False,
                   help="true: also use FAILED/KILLED/RUNNING runs (debugging only)")
    return p


def parse(argv: list[str] | None):
    args = build_parser().parse_args(argv)
    if bool(args.model) == bool(args.all):
        raise UserError("consolidate needs exactly one of --model M and --all true",
                        "pass --model <alias or path> or --all true")
    args.rule = selection.Rule.parse(args.select_by)
    return args


# ------------------------------------------------------------------------------ one model

def find_model(study: Study, model: str) -> str:
    """The model path of ``model`` (a label, an alias or a path); UserError listing the models."""
    m = study.models
    hits = m[(m["label"] == model) | (m[query.ALIAS] == model) | (m[query.PATH] == model)]
    if hits.empty:
        raise UserError(f"no finished eval run of model '{model}' in the selection",
                        f"use one of: {', '.join(m['label']) or '(none)'}")
    path = hits[query.PATH].iloc[0]
    if study.rows[study.rows[query.PATH] == path].empty:
        with_runs = sorted(set(study.rows[MODEL]))
        raise UserError(f"model '{model}' has no finished pruned (or pruned+LoRA) eval run in the selection, "
                        "only dense evals", f"prune and evaluate it first, or use one of: "
                        f"{', '.join(with_runs) or '(none)'}")
    return path


def task_columns(rows: pd.DataFrame) -> list[str]:
    """The per-task score columns (``<task>/<measure>`` of ``task_measures``) with values."""
    cols = []
    for text in rows[schema.P_TASK_MEASURES].dropna().unique() if schema.P_TASK_MEASURES in rows else []:
        cols += [c for c in schema.zeroshot_task_metrics(text).values() if c in rows and c not in cols]
    return [c for c in cols if rows[c].notna().any()]


def ranked(study: Study, path: str) -> pd.DataFrame:
    """The model's candidates with ``rank`` (1 = the group's best, by the rule) per (ratio, stage)."""
    rows = study.rows[study.rows[query.PATH] == path]
    parts = []
    for (ratio, stage, kind), grp in rows.groupby([query.RATIO, "stage", KIND], sort=True):
        best = study.best_of(path, float(ratio), stage, kind)
        keys = best.keys if best else study.rule.keys(None)
        have = grp[keys[0].metric].notna() if keys[0].metric in grp else pd.Series(False, index=grp.index)
        order = selection.rank(grp[have], keys, study_mod.ORDER)
        parts.append(order.assign(rank=range(1, len(order) + 1)))
        if (~have).any():
            parts.append(grp[~have].assign(rank=math.nan))
    return pd.concat(parts) if parts else rows.assign(rank=[])


def model_results(study: Study, path: str) -> Table:
    rows = ranked(study, path)
    tasks = task_columns(rows)
    kinds = {study_mod.KIND_COLUMN: rows[KIND]} if study.kind_cells(schema.RATIO_STRUCTURED) else {}
    frame = pd.DataFrame({"method": rows["method"], "ratio": rows[query.RATIO], **kinds, "stage": rows["stage"],
                          "rank": rows["rank"],
                          "ACC": rows[ACC] if ACC in rows else math.nan,
                          "± ACC": [study_mod.acc_stderr(r) for _, r in rows.iterrows()], "PPL": rows[PPL],
                          **{p: rows[pcol(p)] for p in study.params},
                          "PPL on": [schema.ppl_dataset(m) if m else None for m in rows[PPL_METRIC]],
                          **{t: rows[t] for t in tasks},
                          query.ACHIEVED: rows[query.ACHIEVED], query.PARAMS_AFTER: rows[query.PARAMS_AFTER],
                          **{m: rows[m] for m in query.DIAGNOSIS_METRICS[:3]},
                          "prune run": rows["prune_run_id"], "eval run": rows["eval_run_id"]})
    frame = frame.sort_values(["ratio", "stage", "method", "rank"], kind="stable").reset_index(drop=True)
    label = study.label(path)
    caption = (f"{label}: every configuration of every method. rank = its place in its (ratio, stage) group "
               f"under the selection rule ({study.rule.describe()}); – = excluded (no deciding metric). "
               f"{study_mod.measured(rows)} {study_mod.STDERR_TEXT} Per-task columns: the measure of each task "
               f"(task_measures). {study_mod.ratio_caption(study)} {query.ACHIEVED} = the achieved value of the "
               f"same kind; "
               f"{schema.M_GRAD_NORM_RATIO} / {schema.M_GRAD_MEAN_RATIO} = max/min per-layer gradient norm / mean "
               f"|gradient| (Taylor scores); {schema.M_NUM_EXTREME_LAYERS} = layers pruned beyond 90%.")
    fmt = {"ratio": lambda v: f"{v:.2f}", "rank": number, "prune run": lambda v: str(v)[:8],
           "eval run": lambda v: str(v)[:8], query.ACHIEVED: lambda v: f"{v:.4f}", "± ACC": lambda v: f"±{v:.4f}"}
    return Table(schema.A_MODEL_RESULTS, f"{label}: every method's results", caption, frame, fmt,
                 _notes(study, path), group_by="method")


def _notes(study: Study, path: str) -> list[str]:
    label = study.label(path)
    return [n for n in dict.fromkeys(study.notes) if n.startswith(label) or "configuration(s) without" in n]


def _stats(values: list[float]) -> tuple[float, float, int]:
    return (mean(values) if values else math.nan, stdev(values) if len(values) > 1 else math.nan, len(values))


def method_comparison(study: Study, path: str) -> tuple[Table, list[dict]]:
    """Per (ratio, stage, method): n, best / mean / sd of ACC and PPL, the method's best config."""
    per_method = study_mod.method_bests(study)
    rows, configs = [], []
    own = study.rows[study.rows[query.PATH] == path]
    for (ratio, stage, kind, method), grp in own.groupby([query.RATIO, "stage", KIND, "method"], sort=True):
        b = per_method.of(**{query.PATH: path, "stage": stage, query.RATIO: float(ratio), KIND: kind,
                             "method": method})
        accs = [float(v) for v in grp[ACC].dropna()] if ACC in grp else []
        ppl_name = b.row[PPL_METRIC] if b is not None else None
        ppls = [float(v) for m, v in zip(grp[PPL_METRIC], grp[PPL]) if m and m == ppl_name]
        acc_mean, acc_sd, acc_n = _stats(accs)
        ppl_mean, ppl_sd, ppl_n = _stats(ppls)
        setting = ", ".join(f"{p}={b.row[pcol(p)]}" for p in study.swept.get(method, [])) if b is not None else None
        rows.append({"ratio": float(ratio), **study.kind_cells(kind), "stage": stage, "method": method, "n": len(grp),
                     "best ACC": b.row.get(ACC, math.nan) if b is not None else math.nan,
                     "mean ACC": acc_mean, "sd ACC": acc_sd, "n ACC": acc_n,
                     "best PPL": b.row[PPL] if b is not None else math.nan, "mean PPL": ppl_mean, "sd PPL": ppl_sd,
                     "n PPL": ppl_n, "PPL on": schema.ppl_dataset(ppl_name) if ppl_name else None,
                     "best configuration": setting or ("–" if b is None else "(nothing swept)"),
                     "best run": b.row["prune_run_id"] if b is not None else None})
        if b is not None:
            configs.append(study_mod.best_config(study, b).to_dict())
    frame = pd.DataFrame(rows)
    label = study.label(path)
    caption = (f"{label}: method comparison per target ratio and stage. best = the method's best configuration "
               f"under the selection rule (its ACC and PPL); mean and sd (sample standard deviation) over the "
               f"method's configurations that have the metric (n ACC / n PPL of n). {study_mod.measured(own)} "
               f"{study_mod.ratio_caption(study)}")
    fmt = {"ratio": lambda v: f"{v:.2f}", "n": number, "n ACC": number, "n PPL": number,
           "best run": lambda v: str(v)[:8]}
    return (Table(schema.A_METHOD_TABLE, f"{label}: method comparison", caption, frame, fmt, _notes(study, path),
                  group_by="ratio"), configs)


def consolidate(study: Study, path: str, out: Path | None, prefix: str = "") -> dict:
    """Print, write and log one model's three reports; return the global best document."""
    results = model_results(study, path)
    comparison, configs = method_comparison(study, path)
    for t in (results, comparison):
        print(tables.terminal(t) + "\n")
        tables.write(t, out, prefix)
    bests = [study_mod.best_config(study, b) for b in study.selection.best if b.group[query.PATH] == path]
    missing = [(g, why) for g, why in study.selection.missing if g.get(query.PATH) == path]
    doc = selection.document(study.rule, bests, missing, _notes(study, path))
    methods = {schema.P_SELECTION_RULE: study.rule.describe(), schema.P_SELECT_BY: study.rule.select_by,
               "model": study.label(path), "methods": study_mod.records(comparison.frame), "best": configs}
    for name, obj in ((schema.A_GLOBAL_BEST_CONFIG, doc), (schema.A_METHOD_COMPARISON, methods)):
        obj = json.loads(redact(runs.dump_json(obj)))
        runs.log_json(obj, f"{prefix}{name}")
        if out is not None:
            (out / prefix).mkdir(parents=True, exist_ok=True)
            (out / f"{prefix}{name}").write_text(runs.dump_json(obj))
    for b in bests:
        won = ", ".join(f"{k}={v:.4g}" for k, v in b.metrics.items() if k in b.won_by)
        print(f"global best of {b.model} at {study_mod.ratio_text(b.pruning_ratio, b.ratio_kind)} ({b.stage}): {b.method} "
              f"{', '.join(f'{k}={v}' for k, v in b.swept.items()) or '(nothing swept)'} — won by {won} "
              f"[prune run {b.prune_run_id}]")
    for g, why in missing:
        print(f"no global best at ratio {g.get(query.RATIO)} ({g.get('stage')}): {why}")
    return doc


def run(args) -> dict:
    experiments = query.experiment_list(args.experiments)
    runs.log_params({"model": args.model, "all": args.all, "experiments": ",".join(experiments) if experiments else "all",
                     schema.P_SELECT_BY: args.select_by, schema.P_SELECTION_RULE: args.rule.describe(),
                     "output_dir": args.output_dir, "include_failed": args.include_failed})
    study = study_mod.load(experiments, args.include_failed, args.rule)
    out = Path(args.output_dir) if args.output_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if args.all:
        paths = [p for p in study.models[query.PATH] if not study.rows[study.rows[query.PATH] == p].empty]
        if not paths:
            raise UserError("no model has a finished pruned eval run in the selection",
                            "prune and evaluate models first (python -m prune_entry.search --config ...)")
        skipped = [study.label(p) for p in study.models[query.PATH] if p not in paths]
        if skipped:
            print(f"note: no pruned eval run for {', '.join(skipped)}: skipped")
        docs = {study.label(p): consolidate(study, p, out, f"{tables_slug(study.label(p))}/") for p in paths}
    else:
        path = find_model(study, args.model)
        docs = {study.label(path): consolidate(study, path, out)}
    runs.log_metrics({schema.M_STUDY_MODELS: len(docs), schema.M_STUDY_CANDIDATES: study.selection.candidates,
                      schema.M_STUDY_EXCLUDED: study.selection.excluded})
    if out is not None:
        print(f"reports written to {out}")
    return docs


def tables_slug(label: str) -> str:
    import re
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "model"


def main(argv: list[str] | None = None) -> int:
    return runs.entry_point(schema.STAGE_ANALYSIS, lambda: parse(argv), run, run_name=lambda _: RUN_NAME,
                            raw_params=raw_flags(argv), experiment=schema.ANALYSIS_EXPERIMENT)


if __name__ == "__main__":
    raise SystemExit(main())
