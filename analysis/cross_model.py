"""Cross-model tables and figures for a paper, from the eval runs in the tracking store.

    python -m analysis.cross_model [--experiments a,b] [--metric ppl/wikitext2,zeroshot/mean_acc]
        [--output_dir reports/]

Per metric: a pivot table (rows: method x pruning ratio x stage, plus reconstruction / setting /
protocol when those vary; columns: one per model alias; values: the metric of the latest eval of
that configuration) with the relative change vs the dense model of the same column measured under
the same protocol, printed and written as Markdown, LaTeX (booktabs) and CSV; a figure of the
metric vs pruning ratio (one panel per model, one line per method and stage); and, when a family
has both a Base and an Instruct model, a Base-vs-Instruct figure. Everything, plus the joined
``results_table.csv``, is logged to an analysis run in the ``gqaprune-analysis`` experiment.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis import query
from tracking import UserError
from tracking.cli import Parser, boolean, optional_str, raw_flags
from tracking import runs, schema

INDEX = ["method", "pruning_ratio", "stage"]
OPTIONAL_INDEX = ["reconstruct", "setting", "protocol"]   # shown only when they vary
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


# ------------------------------------------------------------------------------ what a number means

def _none(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).lower() in ("none", "")


def _shots(row) -> str:
    n = row.get(schema.P_NUM_FEWSHOT)
    return "task-default-shot" if _none(n) else f"{int(float(n))}-shot"


def _limit(row) -> str:
    lim = row.get(schema.P_LIMIT)
    return "" if _none(lim) else f", limit {lim} docs per task (smoke test)"


def protocol_of(metric: str, row) -> str:
    """How ``metric`` of this results row was measured, from the eval run's params."""
    kind, _, rest = metric.partition("/")
    if kind in ("ppl", "nll", "ppl_tokens"):
        return row.get(f"ppl_protocol/{rest}") or f"{rest}, {row.get('ppl_seq_len')}-token windows"
    if kind == "zeroshot":
        return (f"{_shots(row)}, mean over tasks of the score per task ({row.get(schema.P_TASK_MEASURES)}; "
                f"convention {row.get(schema.P_ACC_CONVENTION)}){_limit(row)}")
    tasks = str(row.get(schema.P_TASKS_RUN) or "").split(",")
    if kind in tasks:
        return f"{kind} {rest} (lm-eval), {_shots(row)}{_limit(row)}"
    if kind == "speed":
        return str(row.get(schema.P_SPEED_PROTOCOL) or "speed protocol not recorded")
    return ""


def describe(metric: str) -> str:
    """A caption phrase for the metric, with the direction that is better."""
    kind, _, rest = metric.partition("/")
    if kind == "ppl":
        return f"Perplexity on {rest} (lower is better)"
    if metric == schema.M_ZS_MEAN:
        return "Mean zero-shot score (higher is better)"
    if rest in ("acc", "acc_norm"):
        norm = ", log-likelihood normalised by byte length" if rest == "acc_norm" else ""
        return f"{kind} accuracy ({rest}{norm}; higher is better)"
    if metric == schema.M_ACHIEVED_RATIO:
        return "Achieved fraction of prunable parameters removed"
    return metric


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


def _labels(rows: pd.DataFrame) -> pd.DataFrame:
    """One column label per model path: the alias, made unique (``#2``) if two paths share it."""
    models = (rows[["model_path", "model_alias", "family", "variant"]].drop_duplicates("model_path")
              .fillna({"family": "", "variant": ""})
              .assign(_v=lambda d: (d["variant"] != "Base").astype(int))
              .sort_values(["family", "_v", "model_alias"]).drop(columns="_v").reset_index(drop=True))
    seen: dict[str, int] = {}
    labels = []
    for alias in models["model_alias"]:
        seen[alias] = seen.get(alias, 0) + 1
        labels.append(alias if seen[alias] == 1 else f"{alias}#{seen[alias]}")
    return models.assign(label=labels)


def _cells(table: pd.DataFrame, metric: str, notes: list[str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """Rows having the metric -> one row per (model, index, protocol): the latest eval."""
    rows = table[table[metric].notna()].copy()
    rows["_protocol_text"] = [protocol_of(metric, r) for _, r in rows.iterrows()]
    texts = list(dict.fromkeys(rows["_protocol_text"]))
    names = {t: (f"P{i + 1}" if len(texts) > 1 else "") for i, t in enumerate(texts)}
    rows["protocol"] = rows["_protocol_text"].map(names)
    key = ["model_path", *INDEX, *OPTIONAL_INDEX]
    rows = rows.sort_values(["eval_start_time", "eval_run_id"], ascending=False)
    dup = rows.duplicated(key, keep="first")
    if dup.any():
        notes.append(f"{int(dup.sum())} eval(s) of {metric} share a table cell with a later eval "
                     "(other eval settings, same protocol for this metric): the latest is shown")
    return rows[~dup], {names[t]: t for t in texts}


def _dense_of(cells: pd.DataFrame, metric: str) -> dict[tuple[str, str], float]:
    dense = cells[cells["stage"] == schema.LABEL_DENSE]
    return {(r["model_path"], r["protocol"]): r[metric] for _, r in dense.iterrows()}


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
    label_of = dict(zip(models["model_path"], models["label"]))
    dense = _dense_of(cells, metric)
    cells = cells.assign(model=cells["model_path"].map(label_of), value=cells[metric])
    cells["dense_value"] = [dense.get((p, q)) for p, q in zip(cells["model_path"], cells["protocol"])]
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
                 cells.reset_index(drop=True), notes)


def _row_order(cells: pd.DataFrame, index: list[str]) -> pd.MultiIndex:
    """Dense first, then methods alphabetically, ratio ascending, pruned before pruned+LoRA."""
    keys = cells[index].drop_duplicates()
    rank = pd.DataFrame({"d": (keys["method"] != schema.LABEL_DENSE).astype(int), "m": keys["method"],
                         "r": keys["pruning_ratio"],
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
    if metric.startswith(("ppl/", "nll/")):
        return f"{value:.2f}"
    if abs(value) <= 1 and ("acc" in metric or metric.startswith("zeroshot/") or "ratio" in metric):
        return f"{value:.4f}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"


def _cell_text(p: Pivot, row, col) -> str:
    value, rel = p.values.at[row, col], p.relative.at[row, col]
    text = _fmt(p.metric, value)
    stage = row[2]
    if not pd.isna(value) and not pd.isna(rel) and stage != schema.LABEL_DENSE:
        text += f" ({rel:+.1f}%)"
    return text


def _index_text(name: str, value) -> str:
    if name == "pruning_ratio":
        return f"{value:.2f}"
    return str(value) if value not in (None, "") else "–"


def grid(p: Pivot) -> tuple[list[str], list[list[str]]]:
    """(header, body) of the rendered table: index columns then one column per model."""
    names = list(p.values.index.names)
    header = [{"pruning_ratio": "ratio"}.get(n, n) for n in names] + list(p.values.columns)
    body = [[_index_text(n, v) for n, v in zip(names, row)] + [_cell_text(p, row, c) for c in p.values.columns]
            for row in p.values.index]
    return header, body


def caption(p: Pivot) -> str:
    """What the numbers are and how they were measured."""
    parts = [f"{describe(p.metric)}. Rows: method × target pruning ratio (fraction of prunable "
             "attention+MLP parameters) × stage (dense; pruned; pruned+LoRA = pruned then LoRA-finetuned); "
             "columns: models. Cells: the latest eval of each configuration, in parentheses the change "
             "relative to the column's dense model under the same protocol."]
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


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text).replace("–", "--").replace("×", r"$\times$")


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
        grp = grp.sort_values("pruning_ratio")
        xs, ys = list(grp["pruning_ratio"]), list(grp[y])
        proto = extra.get("protocol", grp["protocol"].iloc[0])
        base = dense[dense["protocol"] == proto]
        if not base.empty and not pd.isna(base[y].iloc[0]):
            xs, ys = [0.0, *xs], [base[y].iloc[0], *ys]
        yield _line_label(key[0], key[1], extra), key[0], key[1], xs, ys


def _method_colors(p: Pivot) -> dict[str, str]:
    """One colour per method in every panel and figure."""
    methods = sorted(set(p.long.loc[p.long["stage"] != schema.LABEL_DENSE, "method"]))
    return {m: f"C{i % 10}" for i, m in enumerate(methods)}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def ratio_figure(p: Pivot):
    """Metric vs pruning ratio: one panel per model, one line per method (dashed: +LoRA)."""
    plt = _plt()
    models = list(p.models["label"])
    ncols = min(3, len(models))
    nrows = math.ceil(len(models) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False, sharey=False)
    colors = _method_colors(p)
    for ax, (_, m) in zip(axes.flat, p.models.iterrows()):
        cells = p.long[p.long["model"] == m["label"]]
        for label, method, stage, xs, ys in _lines(cells, "value"):
            ax.plot(xs, ys, "--" if stage == schema.LABEL_PRUNED_LORA else "-", marker="o", ms=3, label=label,
                    color=colors[method])
        for _, d in cells[cells["stage"] == schema.LABEL_DENSE].iterrows():
            ax.axhline(d["value"], color="gray", ls=":", lw=1, label=f"dense {d['protocol']}".strip())
        ax.set_title(f"{m['label']} ({m['family']} {m['variant']})", fontsize=9)
        ax.set_xlabel("target pruning ratio", fontsize=8)
        ax.set_ylabel(p.metric, fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.suptitle(_wrap(f"{describe(p.metric)}. " + "; ".join(
        f"{k + ': ' if k else ''}{v}" for k, v in p.protocols.items()), 140), fontsize=8)
    fig.tight_layout()
    return fig


def families_with_both(p: Pivot) -> list[str]:
    fam = p.models.groupby("family")["variant"].agg(set)
    return [f for f, v in fam.items() if {"Base", "Instruct"} <= v]


def base_instruct_figure(p: Pivot):
    """Per family with both variants: relative change vs each model's own dense model (or the
    metric itself when a dense eval is missing) vs ratio; solid Base, dashed Instruct."""
    plt = _plt()
    fams = families_with_both(p)
    colors = _method_colors(p)
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 3.6), squeeze=False)
    for ax, fam in zip(axes.flat, fams):
        members = p.models[(p.models["family"] == fam) & p.models["variant"].isin(["Base", "Instruct"])]
        cells = p.long[p.long["model"].isin(members["label"])]
        relative = cells[cells["stage"] != schema.LABEL_DENSE]["relative_pct"].notna().all()
        y = "relative_pct" if relative else "value"
        for _, m in members.iterrows():
            mc = cells[cells["model"] == m["label"]]
            if relative:
                mc = mc.assign(relative_pct=mc["relative_pct"].where(mc["stage"] != schema.LABEL_DENSE, 0.0))
            for label, method, stage, xs, ys in _lines(mc, y):
                ax.plot(xs, ys, "-" if m["variant"] == "Base" else "--", marker="o" if stage == schema.LABEL_PRUNED
                        else "s", ms=3, label=f"{m['label']}: {label}", color=colors[method],
                        alpha=1.0 if stage == schema.LABEL_PRUNED else 0.6)
        ax.set_title(f"{fam}: Base vs Instruct", fontsize=9)
        ax.set_xlabel("target pruning ratio", fontsize=8)
        ax.set_ylabel(f"change of {p.metric} vs dense (%)" if relative else p.metric, fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle(_wrap(f"{describe(p.metric)}; solid: Base, dashed: Instruct; squares: +LoRA", 140), fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ entry point

def build_parser() -> Parser:
    p = Parser(prog="cross_model", description=__doc__.splitlines()[0])
    p.add_argument("--experiments", type=optional_str, default=None,
                   help="comma-separated experiment names (default: every experiment in the store)")
    p.add_argument("--metric", default="auto",
                   help="comma-separated metric names (ppl/<dataset>, zeroshot/mean_acc, <task>/acc, ...); "
                        "auto: every ppl/<dataset> and zeroshot/mean_acc present")
    p.add_argument("--output_dir", type=optional_str, default=None, help="also write the reports here")
    p.add_argument("--include_failed", type=boolean, default=False,
                   help="true: also use FAILED/KILLED/RUNNING runs (for debugging, never for a paper)")
    return p


def parse(argv: list[str] | None):
    return build_parser().parse_args(argv)


def choose_metrics(table: pd.DataFrame, requested: str) -> list[str]:
    available = query.metric_names(table)
    if requested.strip().lower() == "auto":
        chosen = [m for m in available if m.startswith("ppl/")] + [m for m in available if m == schema.M_ZS_MEAN]
        return chosen or [m for m in available if m not in query.PRUNE_METRICS][:1]
    chosen = [m.strip() for m in requested.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise UserError(f"no eval run in the selection has metric {', '.join(unknown)}",
                        f"use one of: {', '.join(available)}")
    return chosen


def load_table(experiments, include_failed: bool, notes: list[str]) -> pd.DataFrame:
    table = query.results_table(experiments, include_failed, notes=notes)
    if table.empty:
        where = f"experiment(s) {', '.join(experiments)}" if experiments else f"the store {runs.tracking_uri()}"
        raise UserError(f"no finished eval runs in {where}",
                        "evaluate models first: python -m prune_entry.evaluate --model_uri <model or prune run id>")
    return table


def slug(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric).strip("_")


def write_outputs(p: Pivot, out: Path | None) -> dict[str, str]:
    """Write md / tex / csv / figures to ``out`` (if given) and log them to the active run."""
    base = schema.A_CROSS_MODEL.format(metric=slug(p.metric))
    texts = {f"{base}.md": markdown(p), f"{base}.tex": latex(p)}
    for name, text in texts.items():
        runs.log_text(text, name)
    runs.log_table(flat_csv(p.values), f"{base}.csv")
    runs.log_table(flat_csv(p.relative), f"{base}_relative.csv")
    figs = {f"{base}.png": ratio_figure(p)}
    if families_with_both(p):
        figs[schema.A_BASE_INSTRUCT_FIG.format(metric=slug(p.metric))] = base_instruct_figure(p)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (out / name).write_text(text)
        flat_csv(p.values).to_csv(out / f"{base}.csv", index=False)
        flat_csv(p.relative).to_csv(out / f"{base}_relative.csv", index=False)
        for name, fig in figs.items():
            fig.savefig(out / name, dpi=150)
    for name, fig in figs.items():
        runs.log_figure(fig, name)
    return {**texts, **{n: "figure" for n in figs}}


def run(args) -> dict[str, Pivot]:
    experiments = query.experiment_list(args.experiments)
    runs.log_params({"experiments": ",".join(experiments) if experiments else "all",
                     "metric": args.metric, "include_failed": args.include_failed,
                     "output_dir": args.output_dir})
    notes: list[str] = []
    table = load_table(experiments, args.include_failed, notes)
    metrics = choose_metrics(table, args.metric)
    out = Path(args.output_dir) if args.output_dir else None
    pivots = {}
    for metric in metrics:
        p = pivot(table, metric)
        pivots[metric] = p
        print(terminal(p) + "\n")
        write_outputs(p, out)
    for n in notes:
        print(f"note: {n}")
    runs.log_table(table, schema.A_RESULTS_TABLE)
    if out is not None:
        table.to_csv(out / schema.A_RESULTS_TABLE, index=False)
        print(f"reports written to {out}")
    runs.log_metrics({"n_results": len(table), "n_models": table["model_path"].nunique()})
    ids = ",".join(table["eval_run_id"])
    if len(ids) <= 5000:
        runs.set_tags({schema.TAG_COMPARED_RUNS: ids})
    return pivots


def main(argv: list[str] | None = None) -> int:
    """An analysis run in the analysis experiment: bad input -> one line, exit 2, run FAILED."""
    return runs.entry_point(schema.STAGE_ANALYSIS, lambda: parse(argv), run, run_name=lambda _: "cross_model",
                            raw_params=raw_flags(argv), experiment=schema.ANALYSIS_EXPERIMENT)


if __name__ == "__main__":
    raise SystemExit(main())
