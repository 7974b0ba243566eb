"""Cross-model tables and figures for a paper, and the study's answers, from the tracking store.

    python -m analysis.cross_model [--experiments a,b] [--metric ppl/wikitext2,zeroshot/mean_acc]
        [--select_by auto | <metric>:max|min] [--output_dir reports/] [--export_best DIR] [--register true]

Per metric: a pivot table (rows: method x pruning ratio x stage, plus reconstruction / setting /
protocol when those vary; columns: one per model alias; values: the metric of the latest eval of
that configuration) with the relative change vs the dense model of the same column measured under
the same protocol, printed and written as Markdown, LaTeX (booktabs) and CSV; a figure of the
metric vs pruning ratio (one panel per model, one line per method and stage); and, when a family
has both a Base and an Instruct model, a Base-vs-Instruct figure of each method's best
configuration per ratio.

Then the five analyses of :mod:`analysis.study` under the one selection rule
(:mod:`analysis.selection`): best configuration per model, Base vs Instruct per family, method
preference, winning parameter values, family comparison — each as a terminal table, Markdown,
LaTeX and CSV, plus ``analysis_summary.json`` and five figures (PNG + PDF). ``--export_best``
copies each model's best pruned model, plan and reports into ``DIR/<alias>/``; ``--register``
registers each best in the MLflow Model Registry (``gqaprune-<alias>``, a new version per call).
Everything, plus the joined ``results_table.csv``, is logged to an analysis run in the
``gqaprune-analysis`` experiment.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis import figures, query, selection, study as study_mod, tables
from analysis.protocol import describe, is_none, protocol_of  # noqa: F401 - re-exported names
from analysis.tables import latex_escape  # noqa: F401 - re-exported
from tracking import UserError
from tracking.cli import Parser, boolean, optional_str, raw_flags
from tracking import runs, schema, store
from tracking.redact import redact

RATIO, ALIAS, PATH = query.RATIO, query.ALIAS, query.PATH
INDEX = ["method", RATIO, "stage"]
OPTIONAL_INDEX = ["reconstruct", "setting", "protocol"]   # shown only when they vary


# ------------------------------------------------------------------------------ the pivot

@dataclass
class Pivot:
    metric: str
    values: pd.DataFrame          # index: INDEX (+ varying OPTIONAL_INDEX); columns: model labels
    relative: pd.DataFrame        # 100 * (value - dense) / dense, same shape; NaN without a dense value
    runs: pd.DataFrame            # eval run id per cell
    protocols: dict[str, str]     # protocol label -> description ("" when there is one protocol)
    models: pd.DataFrame          # label, model_alias, family, variant, model_path per column
    long: pd.DataFrame            # one row per cell (what the figures plot)
    notes: list[str] = field(default_factory=list)
    stderr: pd.DataFrame | None = None   # standard error per cell where the store has one (same shape)


def _labels(rows: pd.DataFrame) -> pd.DataFrame:
    """One column label per model path: the alias, made unique (``#2``) if two paths share it."""
    return study_mod.model_labels(rows)


def _cells(table: pd.DataFrame, metric: str, notes: list[str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """Rows having the metric -> one row per (model, index, protocol): the latest eval."""
    rows = table[table[metric].notna()].copy()
    rows["_protocol_text"] = [protocol_of(metric, r) for _, r in rows.iterrows()]
    texts = list(dict.fromkeys(rows["_protocol_text"]))
    names = {t: (f"P{i + 1}" if len(texts) > 1 else "") for i, t in enumerate(texts)}
    rows["protocol"] = rows["_protocol_text"].map(names)
    key = [PATH, *INDEX, *OPTIONAL_INDEX]
    rows = rows.sort_values(["eval_start_time", "eval_run_id"], ascending=False)
    dup = rows.duplicated(key, keep="first")
    if dup.any():
        notes.append(f"{int(dup.sum())} eval(s) of {metric} share a table cell with a later eval "
                     "(other eval settings, same protocol for this metric): the latest is shown")
    return rows[~dup], {names[t]: t for t in texts}


def _dense_of(cells: pd.DataFrame, metric: str) -> dict[tuple[str, str], float]:
    dense = cells[cells["stage"] == schema.LABEL_DENSE]
    return {(r[PATH], r["protocol"]): r[metric] for _, r in dense.iterrows()}


def shown_levels(cells: pd.DataFrame) -> list[str]:
    """The optional row levels that tell rows apart: reconstruction modes of pruned rows, a
    non-empty setting, more than one protocol."""
    pruned = cells[cells["stage"] != schema.LABEL_DENSE]
    out = []
    if pruned["reconstruct"].nunique() > 1:
        out.append("reconstruct")
    if cells["setting"].ne("").any():
        out.append("setting")
    if cells["protocol"].nunique() > 1:
        out.append("protocol")
    return out


def pivot(table: pd.DataFrame, metric: str) -> Pivot:
    """The cross-model table of one metric (see the module docstring)."""
    if metric not in table or table[metric].isna().all():
        raise UserError(f"no eval run in the selection has metric {metric}",
                        f"use one of: {', '.join(query.metric_names(table))}")
    notes: list[str] = []
    cells, protocols = _cells(table, metric, notes)
    models = _labels(cells)
    label_of = dict(zip(models[PATH], models["label"]))
    dense = _dense_of(cells, metric)
    cells = cells.assign(model=cells[PATH].map(label_of), value=cells[metric],
                         stderr=[stderr_of(metric, r) for _, r in cells.iterrows()])
    cells["dense_value"] = [dense.get((p, q)) for p, q in zip(cells[PATH], cells["protocol"])]
    cells["relative_pct"] = [100.0 * (v - d) / d if d not in (None, 0) and not pd.isna(d) else math.nan
                             for v, d in zip(cells["value"], cells["dense_value"])]
    index = INDEX + shown_levels(cells)
    order = _row_order(cells, index)
    cols = list(models["label"])
    shape = lambda col: (cells.pivot(index=index, columns="model", values=col)  # noqa: E731
                         .reindex(index=order, columns=cols))
    several = cells[cells["n_evals"] > 1]
    if not several.empty:
        notes.append(f"{len(several)} cell(s) come from a configuration evaluated several times "
                     "(n_evals > 1): the latest eval is shown")
    blank = cells[(cells["stage"] != schema.LABEL_DENSE) & cells["relative_pct"].isna()]
    missing = [c for c in cols if c in set(blank["model"])]
    if missing:
        notes.append(f"no dense eval for {', '.join(missing)} under the protocol of some rows: "
                     "their relative change is left blank")
    return Pivot(metric, shape("value"), shape("relative_pct"), shape("eval_run_id"), protocols, models,
                 cells.reset_index(drop=True), notes, shape("stderr") if cells["stderr"].notna().any() else None)


def stderr_of(metric: str, row) -> float:
    """The standard error of ``metric`` in a results row: lm-eval's ``<task>/<measure>_stderr`` for
    a task score, the propagated one for the mean zero-shot score (analysis.study.acc_stderr);
    NaN when the store has none (perplexity: one deterministic pass, no standard error)."""
    if metric == schema.M_ZS_MEAN:
        return study_mod.acc_stderr(row)
    v = row.get(schema.stderr_metric(metric))
    return float(v) if isinstance(v, (int, float)) and not pd.isna(v) else math.nan


def _row_order(cells: pd.DataFrame, index: list[str]) -> pd.MultiIndex:
    """Dense first, then methods alphabetically, ratio ascending, pruned before pruned+LoRA."""
    keys = cells[index].drop_duplicates()
    rank = pd.DataFrame({"d": (keys["method"] != schema.LABEL_DENSE).astype(int), "m": keys["method"],
                         "r": keys[RATIO],
                         "s": keys["stage"].map({s: i for i, s in enumerate(query.STAGE_ORDER)})},
                        index=keys.index)
    for c in index[3:]:
        rank[c] = keys[c]
    keys = keys.loc[rank.sort_values(list(rank.columns), kind="stable").index]
    return pd.MultiIndex.from_frame(keys)


# ------------------------------------------------------------------------------ rendering

def _fmt(metric: str, value) -> str:
    if value is None or pd.isna(value):
        return "–"
    if schema.in_group(metric, schema.G_PPL, schema.G_NLL):
        return f"{value:.2f}"
    if abs(value) <= 1 and ("acc" in metric or schema.in_group(metric, schema.G_ZEROSHOT) or "ratio" in metric):
        return f"{value:.4f}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"


def _cell_text(p: Pivot, row, col) -> str:
    value, rel = p.values.at[row, col], p.relative.at[row, col]
    text = _fmt(p.metric, value)
    err = p.stderr.at[row, col] if p.stderr is not None else math.nan
    if not pd.isna(value) and not pd.isna(err):
        text += f" ±{_fmt(p.metric, err)}"
    stage = row[2]
    if not pd.isna(value) and not pd.isna(rel) and stage != schema.LABEL_DENSE:
        text += f" ({rel:+.1f}%)"
    return text


def _index_text(name: str, value) -> str:
    if name == RATIO:
        return f"{value:.2f}"
    return str(value) if value not in (None, "") else "–"


def grid(p: Pivot) -> tuple[list[str], list[list[str]]]:
    """(header, body) of the rendered table: index columns then one column per model."""
    names = list(p.values.index.names)
    header = [{RATIO: "ratio"}.get(n, n) for n in names] + list(p.values.columns)
    body = [[_index_text(n, v) for n, v in zip(names, row)] + [_cell_text(p, row, c) for c in p.values.columns]
            for row in p.values.index]
    return header, body


def caption(p: Pivot) -> str:
    """What the numbers are and how they were measured."""
    pruned = p.long[p.long["stage"] != schema.LABEL_DENSE]
    kinds = [k for k in schema.RATIO_KINDS if k in set(pruned[query.RATIO_KIND])] or [schema.RATIO_STRUCTURED]
    what = "; ".join(schema.RATIO_KINDS[k] for k in kinds)
    parts = [f"{describe(p.metric)}. Rows: method × target ratio ({what}) × stage (dense; pruned; "
             "pruned+LoRA = pruned then LoRA-finetuned); columns: models. Cells: the latest eval of each configuration, in parentheses the change "
             "relative to the column's dense model under the same protocol."]
    if p.stderr is not None:
        parts.append("± = standard error (lm-eval's per-task standard errors; for the mean score "
                     "sqrt(Σ se²)/k over its k tasks).")
    if len(p.protocols) == 1:
        parts.append(f"Protocol: {next(iter(p.protocols.values()))}.")
    else:
        parts += [f"Protocol {k}: {v}." for k, v in p.protocols.items()]
    return " ".join(parts)


def terminal(p: Pivot) -> str:
    header, body = grid(p)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    n_index = len(p.values.index.names)
    line = lambda r: "  ".join(c.ljust(w) if i < n_index else c.rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([f"== {p.metric} ==", _wrap(caption(p)), line(header), sep, *map(line, body), sep,
                      *[f"note: {n}" for n in p.notes]])


def _wrap(text: str, width: int = 110) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width))


def markdown(p: Pivot) -> str:
    header, body = grid(p)
    n_index = len(p.values.index.names)
    esc = lambda s: s.replace("|", r"\|")  # noqa: E731
    align = ["---"] * n_index + ["---:"] * (len(header) - n_index)
    lines = [f"### {p.metric}", "", caption(p), "", f"| {' | '.join(map(esc, header))} |", f"|{'|'.join(align)}|"]
    lines += [f"| {' | '.join(map(esc, r))} |" for r in body]
    lines += [""] + [f"- note: {n}" for n in p.notes]
    return "\n".join(lines).rstrip() + "\n"


def latex(p: Pivot) -> str:
    """A booktabs table; a \\midrule between methods."""
    header, body = grid(p)
    n_index = len(p.values.index.names)
    spec = "l" * n_index + "r" * (len(header) - n_index)
    label = re.sub(r"[^A-Za-z0-9]+", "_", p.metric)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{latex_escape(caption(p))}}}",
             rf"\label{{tab:cross_model_{label}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    previous = None
    for r in body:
        if previous is not None and r[0] != previous:
            lines.append(r"\midrule")
        previous = r[0]
        lines.append(" & ".join(latex_escape(c) for c in r) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def flat_csv(frame: pd.DataFrame) -> pd.DataFrame:
    """The pivot with its index as ordinary columns (one CSV header row)."""
    return frame.reset_index()


# ------------------------------------------------------------------------------ figures

def _line_label(method: str, stage: str, extra: dict) -> str:
    label = method + (" +LoRA" if stage == schema.LABEL_PRUNED_LORA else "")
    bits = [f"{v}" if k == "protocol" else f"{k}={v}" for k, v in extra.items() if v not in ("", None)]
    return label + (f" [{', '.join(bits)}]" if bits else "")


def _lines(cells: pd.DataFrame, y: str):
    """(label, method, stage, x, y) per line: the dense point at ratio 0 starts every pruned line."""
    extra_cols = shown_levels(cells)
    dense = cells[cells["stage"] == schema.LABEL_DENSE]
    pruned = cells[cells["stage"] != schema.LABEL_DENSE]
    for key, grp in pruned.groupby(["method", "stage", *extra_cols], sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        extra = dict(zip(extra_cols, key[2:]))
        grp = grp.sort_values(RATIO)
        xs, ys = list(grp[RATIO]), list(grp[y])
        proto = extra.get("protocol", grp["protocol"].iloc[0])
        base = dense[dense["protocol"] == proto]
        if not base.empty and not pd.isna(base[y].iloc[0]):
            xs, ys = [0.0, *xs], [base[y].iloc[0], *ys]
        yield _line_label(key[0], key[1], extra), key[0], key[1], xs, ys


def _method_colors(p: Pivot) -> dict[str, str]:
    """One colour per method in every panel and figure."""
    methods = sorted(set(p.long.loc[p.long["stage"] != schema.LABEL_DENSE, "method"]))
    return {m: f"C{i % 10}" for i, m in enumerate(methods)}


def _best_lines(p: Pivot, per_method, path: str, col: str):
    """(label, method, stage, xs, ys) per method and stage: the metric of each method's best
    configuration (selection rule) at each ratio; the dense eval starts each line at ratio 0."""
    cells = p.long[p.long[PATH] == path]
    by_eval = cells.drop_duplicates("eval_run_id").set_index("eval_run_id")
    lines: dict[tuple, list] = {}
    for b in per_method.best:
        if b.group[PATH] == path and b.row["eval_run_id"] in by_eval.index:
            value = by_eval.at[b.row["eval_run_id"], col]
            if not pd.isna(value):
                lines.setdefault((b.row["method"], b.group["stage"]), []).append((b.group[RATIO], value))
    dense = cells[cells["stage"] == schema.LABEL_DENSE]
    start = 0.0 if col == "relative_pct" else (dense["value"].iloc[0] if not dense.empty else None)
    for (method, stage), pts in sorted(lines.items()):
        pts = sorted(pts) if start is None else [(0.0, start), *sorted(pts)]
        label = method + (" +LoRA" if stage == schema.LABEL_PRUNED_LORA else "")
        yield label, method, stage, [x for x, _ in pts], [y for _, y in pts]


def _many_settings(p: Pivot) -> bool:
    return "setting" in shown_levels(p.long)


def ratio_figure(p: Pivot, study=None):
    """Metric vs pruning ratio: one panel per model, one line per method (dashed: +LoRA); one
    legend below the panels, one colour per method. With a grid of settings (and a study), each
    line is the method's best configuration per ratio under the selection rule, so the figure
    stays readable however many settings were swept (the table lists them all)."""
    models = list(p.models["label"])
    ncols = min(3, len(models))
    fig, axes = figures.figure(math.ceil(len(models) / ncols), ncols)
    colors = _method_colors(p)
    best = study is not None and _many_settings(p)
    per_method = study_mod.method_bests(study) if best else None
    for ax, (_, m) in zip(axes.flat, p.models.iterrows()):
        cells = p.long[p.long["model"] == m["label"]]
        lines = _best_lines(p, per_method, m[PATH], "value") if best else _lines(cells, "value")
        for label, method, stage, xs, ys in lines:
            ax.plot(xs, ys, "--" if stage == schema.LABEL_PRUNED_LORA else "-", marker="o", ms=3, label=label,
                    color=colors[method])
        for _, d in cells[cells["stage"] == schema.LABEL_DENSE].iterrows():
            ax.axhline(d["value"], color="gray", ls=":", lw=1, label=f"dense {d['protocol']}".strip())
        figures.ax_title(ax, f"{m['label']} ({m['family']} {m['variant']}) · {p.metric}")
        ax.set_xlabel("target pruning ratio", fontsize=8)
        ax.set_ylabel(p.metric, fontsize=8)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    figures.legend(fig, figures.collect(axes))
    what = (f". Lines: each method's best configuration per ratio (selection rule {study.rule.select_by}); "
            "every configuration is in the table." if best else "")
    figures.title(fig, f"{describe(p.metric)}. " + "; ".join(
        f"{k + ': ' if k else ''}{v}" for k, v in p.protocols.items()) + what)
    return fig


def families_with_both(p: Pivot) -> list[str]:
    fam = p.models.groupby("family")["variant"].agg(set)
    return [f for f, v in fam.items() if {"Base", "Instruct"} <= v]


def base_instruct_figure(p: Pivot, study):
    """Per family with both variants: each method's *best configuration per ratio* (selection
    rule) — its change vs the model's own dense eval (or the metric itself without one); solid
    Base, dashed Instruct, squares +LoRA. One line per (variant, method, stage), however large the
    grid of settings."""
    fams = families_with_both(p)
    colors = _method_colors(p)
    per_method = study_mod.method_bests(study)
    fig, axes = figures.figure(1, len(fams), width=4.8, height=3.6)
    for ax, fam in zip(axes.flat, fams):
        members = p.models[(p.models["family"] == fam) & p.models["variant"].isin(["Base", "Instruct"])]
        cells = p.long[p.long["model"].isin(members["label"])]
        relative = cells[cells["stage"] != schema.LABEL_DENSE]["relative_pct"].notna().all()
        col = "relative_pct" if relative else "value"
        for _, m in members.iterrows():
            for label, method, stage, xs, ys in _best_lines(p, per_method, m[PATH], col):
                ax.plot(xs, ys, "-" if m["variant"] == "Base" else "--",
                        marker="o" if stage == schema.LABEL_PRUNED else "s", ms=3, color=colors.get(method, "C0"),
                        alpha=1.0 if stage == schema.LABEL_PRUNED else 0.6, label=label)
        ax.plot([], [], "-", color="gray", label="Base (solid)")
        ax.plot([], [], "--", color="gray", label="Instruct (dashed)")
        figures.ax_title(ax, f"{fam}: Base vs Instruct · {p.metric}")
        ax.set_xlabel("target pruning ratio", fontsize=8)
        ax.set_ylabel(f"change of {p.metric} vs dense (%)" if relative else p.metric, fontsize=8)
    figures.legend(fig, figures.collect(axes))
    figures.title(fig, f"{describe(p.metric)}: each method's best configuration per ratio (selection rule "
                       f"{study.rule.select_by}); solid Base, dashed Instruct; squares +LoRA")
    return fig


# ------------------------------------------------------------------------------ entry point

def build_parser() -> Parser:
    p = Parser(prog=schema.RUN_CROSS_MODEL, description=__doc__.splitlines()[0])
    p.add_argument("--experiments", type=optional_str, default=None,
                   help="comma-separated experiment names (default: every experiment in the store)")
    p.add_argument("--metric", default="auto",
                   help="comma-separated metric names (ppl/<dataset>, zeroshot/mean_acc, <task>/acc, ...); "
                        "auto: every ppl/<dataset> and zeroshot/mean_acc present")
    p.add_argument("--select_by", default=selection.AUTO,
                   help="the selection rule: auto (highest zeroshot/mean_acc, ties / no accuracy: lowest "
                        "perplexity on the first dataset) or <metric>:max|min, e.g. ppl/wikitext2:min")
    p.add_argument("--output_dir", type=optional_str, default=None, help="also write the reports here")
    p.add_argument("--export_best", type=optional_str, default=None,
                   help="copy each model's best pruned model, plan and reports into DIR/<alias>/")
    p.add_argument("--register", type=boolean, default=False,
                   help="register each model's best pruned model in the MLflow Model Registry "
                        "(gqaprune-<alias>, a new version per call)")
    p.add_argument("--include_failed", type=boolean, default=False,
                   help="true: also use FAILED/KILLED/RUNNING runs (for debugging, never for a paper)")
    return p


def parse(argv: list[str] | None):
    args = build_parser().parse_args(argv)
    args.rule = selection.Rule.parse(args.select_by)
    return args


def choose_metrics(table: pd.DataFrame, requested: str) -> list[str]:
    available = query.metric_names(table)
    if requested.strip().lower() == "auto":
        chosen = [m for m in available if schema.is_ppl(m)] + [m for m in available if m == schema.M_ZS_MEAN]
        return chosen or [m for m in available if m not in query.PRUNE_METRICS][:1]
    chosen = [m.strip() for m in requested.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise UserError(f"no eval run in the selection has metric {', '.join(unknown)}",
                        f"use one of: {', '.join(available)}")
    return chosen


def load_table(experiments, include_failed: bool, notes: list[str]) -> pd.DataFrame:
    table = query.results_table(experiments, include_failed, notes=notes, details=True)
    if table.empty:
        where = f"experiment(s) {', '.join(experiments)}" if experiments else f"the store {store_label()}"
        raise UserError(f"no finished eval runs in {where}",
                        "evaluate models first: python -m prune_entry.evaluate --model_uri <model or prune run id>")
    return table


store_label = query.store_label


def slug(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric).strip("_")


def write_outputs(p: Pivot, out: Path | None, study=None) -> dict[str, str]:
    """Write md / tex / csv / figures to ``out`` (if given) and log them to the active run."""
    base = schema.A_CROSS_MODEL.format(metric=slug(p.metric))
    texts = {f"{base}.md": redact(markdown(p)), f"{base}.tex": redact(latex(p))}
    for name, text in texts.items():
        runs.log_text(text, name)
    runs.log_table(flat_csv(p.values), f"{base}.csv")
    relative = schema.A_CROSS_MODEL_RELATIVE.format(metric=slug(p.metric))
    runs.log_table(flat_csv(p.relative), f"{relative}.csv")
    figs = {f"{base}.png": ratio_figure(p, study)}
    if families_with_both(p) and study is not None:
        figs[schema.A_BASE_INSTRUCT_FIG.format(metric=slug(p.metric))] = base_instruct_figure(p, study)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (out / name).write_text(text)
        flat_csv(p.values).to_csv(out / f"{base}.csv", index=False)
        flat_csv(p.relative).to_csv(out / f"{relative}.csv", index=False)
    for name, fig in figs.items():
        figures.emit(fig, name.removesuffix(".png"), out, exts=("png",))
    return {**texts, **{n: "figure" for n in figs}}


def csv_table(table: pd.DataFrame) -> pd.DataFrame:
    """The joined table as written to results_table.csv (prune params as JSON text, credentials
    redacted)."""
    if query.PRUNE_PARAMS not in table:
        return tables.clean(table)
    return tables.clean(table).assign(**{query.PRUNE_PARAMS: [redact(json.dumps(d, sort_keys=True)) if isinstance(d, dict) else None
                                                 for d in table[query.PRUNE_PARAMS]]})


# ------------------------------------------------------------------------------ the study

def write_study(study, out: Path | None) -> dict[str, tables.Table]:
    """The five analyses: printed, written (md / tex / csv), analysis_summary.json, five figures."""
    results = study_mod.analyses(study)
    for name, t in results.items():
        t.name = schema.A_STUDY.format(name=name)
        print(tables.terminal(t) + "\n")
        tables.write(t, out)
    doc = json.loads(redact(runs.dump_json(study_mod.summary(study, results))))
    runs.log_json(doc, schema.A_ANALYSIS_SUMMARY)
    if out is not None:
        (out / schema.A_ANALYSIS_SUMMARY).write_text(runs.dump_json(doc))
    for name, fig in figures.study_figures(study, results).items():
        figures.emit(fig, schema.A_STUDY_FIG.format(name=name), out)
    return results


def model_artifact(row) -> tuple[str, str]:
    """(run id, artifact) holding the model of a best row: the finetune run's for pruned+LoRA."""
    if row["stage"] == schema.LABEL_PRUNED_LORA and isinstance(row["finetune_run_id"], str):
        return row["finetune_run_id"], schema.A_FINETUNED_MODEL
    return row["prune_run_id"], schema.A_PRUNED_MODEL


def _best_dirs(study, root: Path) -> list[tuple]:
    """(best, directory): ``root/<alias>/``, or ``root/<alias>/<ratio>_<stage>/`` for a model with
    several bests (several ratios or stages)."""
    per_model: dict[str, list] = {}
    for b in study.selection.best:
        per_model.setdefault(b.row[study_mod.MODEL], []).append(b)
    out = []
    for label, bests in per_model.items():
        folder = root / slug(label)
        for b in bests:
            sub = f"{b.group[RATIO]:g}_{slug(b.group['stage'])}"
            out.append((b, folder if len(bests) == 1 else folder / sub))
    return out


def export_best(study, root: Path) -> list[str]:
    """Copy each best's model, its prune run's plan and reports and its eval run's reports, plus
    its best_config.json, into its directory. Returns the directories."""
    done = []
    for b, folder in _best_dirs(study, root):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        run_id, artifact = model_artifact(b.row)
        store.download_artifact(run_id, artifact, folder)
        for rid in (b.row["prune_run_id"], b.row["eval_run_id"]):
            if not isinstance(rid, str):
                continue
            for path in store.artifact_paths(rid):
                if path not in (*schema.MODEL_ARTIFACTS, schema.A_OFFLINE_TASKS):
                    store.download_artifact(rid, path, folder)
        cfg = study_mod.best_config(study, b)
        doc = selection.document(study.rule, [cfg], [], [])
        (folder / schema.A_BEST_CONFIG).write_text(redact(runs.dump_json(doc)))
        print(f"exported {cfg.model} ({cfg.method}, ratio {cfg.pruning_ratio:g}, {cfg.stage}) -> {folder}")
        done.append(str(folder))
    return done


def version_tags(study, b) -> dict[str, str]:
    """Tags of a registered version: its configuration, what it won with, its runs, the rule."""
    cfg = study_mod.best_config(study, b)
    tags = {schema.P_METHOD: cfg.method, schema.P_PRUNING_RATIO: cfg.pruning_ratio, "stage": cfg.stage,
            schema.TAG_MODEL_ALIAS: cfg.model, schema.TAG_MODEL_FAMILY: cfg.family,
            schema.TAG_MODEL_VARIANT: cfg.variant, "prune_run_id": cfg.prune_run_id,
            "eval_run_id": cfg.eval_run_id, schema.P_SELECTION_RULE: study.rule.describe()}
    tags.update({k: v for k, v in cfg.swept.items()})
    tags.update({k: f"{v:.6g}" for k, v in cfg.metrics.items() if k in (*cfg.won_by, selection.ACC)
                 or schema.is_ppl(k)})
    return {k: "none" if v is None else str(v) for k, v in tags.items()}


def register_best(study) -> list[str]:
    """One registered model per alias (``gqaprune-<alias>``), a new version per best and call."""
    done = []
    for b in study.selection.best:
        run_id, artifact = model_artifact(b.row)
        name = schema.registered_model_name(b.row[study_mod.MODEL])
        v = store.register_model(run_id, artifact, name, version_tags(study, b))
        print(f"registered {b.row[study_mod.MODEL]} ({b.row['method']}, ratio {b.group[RATIO]:g}, "
              f"{b.group['stage']}): models:/{v.name}/{v.version}")
        done.append(f"{v.name}/{v.version}")
    return done


def run(args) -> dict[str, Pivot]:
    experiments = query.experiment_list(args.experiments)
    runs.log_params({"experiments": ",".join(experiments) if experiments else "all",
                     "metric": args.metric, "include_failed": args.include_failed,
                     "output_dir": args.output_dir, schema.P_SELECT_BY: args.select_by,
                     schema.P_SELECTION_RULE: args.rule.describe(), "export_best": args.export_best,
                     "register": args.register})
    notes: list[str] = []
    table = load_table(experiments, args.include_failed, notes)
    metrics = choose_metrics(table, args.metric)
    out = Path(args.output_dir) if args.output_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    study = study_mod.build(table, args.rule, list(notes))
    pivots = {}
    for metric in metrics:
        p = pivot(table, metric)
        pivots[metric] = p
        print(redact(terminal(p)) + "\n")
        write_outputs(p, out, study)
    write_study(study, out)
    for n in notes:
        print(f"note: {n}")
    runs.log_table(csv_table(table), schema.A_RESULTS_TABLE)
    if out is not None:
        csv_table(table).to_csv(out / schema.A_RESULTS_TABLE, index=False)
        print(f"reports written to {out}")
    runs.log_metrics({schema.M_N_RESULTS: len(table), schema.M_N_MODELS: table[PATH].nunique(),
                      schema.M_STUDY_MODELS: len({b.row[PATH] for b in study.selection.best}),
                      schema.M_STUDY_CANDIDATES: study.selection.candidates,
                      schema.M_STUDY_EXCLUDED: study.selection.excluded})
    ids = ",".join(table["eval_run_id"])
    if len(ids) <= 5000:
        runs.set_tags({schema.TAG_COMPARED_RUNS: ids})
    if args.export_best:
        export_best(study, Path(args.export_best))
        runs.set_tags({schema.TAG_EXPORTED: str(Path(args.export_best).resolve())})
    if args.register:
        registered = register_best(study)
        runs.set_tags({schema.TAG_REGISTERED: ",".join(registered) or "none"})
    if (args.export_best or args.register) and not study.selection.best:
        print("note: no best configuration: nothing exported or registered")
    return pivots


def main(argv: list[str] | None = None) -> int:
    """An analysis run in the analysis experiment: bad input -> one line, exit 2, run FAILED."""
    return runs.entry_point(schema.STAGE_ANALYSIS, lambda: parse(argv), run, run_name=lambda _: schema.RUN_CROSS_MODEL,
                            raw_params=raw_flags(argv), experiment=schema.ANALYSIS_EXPERIMENT)


if __name__ == "__main__":
    raise SystemExit(main())
