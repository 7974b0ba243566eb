"""Figures of the study analyses (returned, never shown; PNG + PDF, logged and written).

Every figure uses a constrained layout with its legend outside the axes (``outside right upper``),
one entry per label, one colour per series (a method, a model or a variant keeps its colour
across panels), and titles that name the model / method / metric and the group (ratio, stage).
"""
from __future__ import annotations

import math
import tempfile
import textwrap
from pathlib import Path

import pandas as pd

from analysis import query
from analysis.selection import ACC
from analysis.study import KIND, MODEL, PPL, Study, kept_by_layer, method_bests, plan_of, ratio_text
from tracking import runs, schema

VARIANT_COLORS = {"Base": "C0", "Instruct": "C1"}


def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def figure(nrows: int, ncols: int, width: float = 4.2, height: float = 3.2):
    fig, axes = plt().subplots(max(1, nrows), max(1, ncols), figsize=(width * max(1, ncols) + 2.2,
                                                                      height * max(1, nrows) + 0.6),
                               squeeze=False, layout="constrained")
    return fig, axes


def legend(fig, handles_labels: list[tuple]) -> None:
    """One figure legend below the axes (outside the data, clear of the title), each label once
    (first handle wins), in as many columns as the canvas width holds."""
    seen: dict[str, object] = {}
    for handle, label in handles_labels:
        if label and not label.startswith("_") and label not in seen:
            seen[label] = handle
    if not seen:
        return
    labels = ["\n".join(textwrap.wrap(lb, 60)) for lb in seen]
    widest = max(max(len(line) for line in lb.split("\n")) for lb in labels) * 0.6 * 7 + 40   # points
    ncols = max(1, min(len(labels), int(fig.get_figwidth() * 72 * 0.9 // widest)))
    fig.legend(list(seen.values()), labels, loc="outside lower center", ncols=ncols, fontsize=7, frameon=False)


def collect(axes) -> list[tuple]:
    out = []
    for ax in axes.flat:
        handles, labels = ax.get_legend_handles_labels()
        out += list(zip(handles, labels))
    return out


def _chars(width_in: float, fontsize: float) -> int:
    """Characters of a line that fit ``width_in`` inches at ``fontsize`` (average glyph ~0.6 em)."""
    return max(20, int(width_in * 72 / (0.6 * fontsize)))


def title(fig, text: str) -> None:
    """The figure title, wrapped to the canvas width."""
    fig.suptitle("\n".join(textwrap.wrap(text, _chars(fig.get_figwidth() * 0.95, 9))), fontsize=9)


def ax_title(ax, text: str, fontsize: float = 8) -> None:
    """An axes title wrapped to the axes' width."""
    width = ax.get_position().width * ax.figure.get_figwidth()
    ax.set_title("\n".join(textwrap.wrap(text, _chars(width, fontsize))), fontsize=fontsize)


def group_text(ratio: float, stage: str, kind: str | None = None) -> str:
    return f"{ratio_text(ratio, kind)} · {stage}"


def empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(text, 40)), ha="center", va="center", transform=ax.transAxes,
            fontsize=8, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def model_colors(study: Study) -> dict[str, str]:
    return {label: f"C{i % 10}" for i, label in enumerate(study.models["label"])}


def method_colors(study: Study) -> dict[str, str]:
    return {m: f"C{i % 10}" for i, m in enumerate(sorted(set(study.rows["method"])))}


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


# ------------------------------------------------------------------------------ the five figures

def base_instruct_bars(study: Study, table: pd.DataFrame):
    """Best ACC and best PPL of Base and Instruct per family (one row of panels per group)."""
    groups = study.groups()
    fig, axes = figure(len(groups), 2)
    for r, (ratio, stage, kind) in enumerate(groups):
        part = table[study.in_group(table, ratio, stage, kind)] if not table.empty else table
        for c, (what, better) in enumerate((("ACC", "higher is better"), ("PPL", "lower is better"))):
            ax = axes[r][c]
            if part.empty:
                empty(ax, "no family with a best configuration")
                continue
            fams = list(part["family"])
            for k, variant in enumerate(("Base", "Instruct")):
                values = list(part[f"{what} {variant}"])
                xs = [i + (k - 0.5) * 0.38 for i in range(len(fams))]
                ok = [(x, v) for x, v in zip(xs, values) if _finite(v)]
                if ok:
                    ax.bar([x for x, _ in ok], [v for _, v in ok], width=0.36, color=VARIANT_COLORS[variant])
                for x, v in zip(xs, values):
                    if not _finite(v):
                        ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, color="gray")
            ax.set_xticks(range(len(fams)), fams, fontsize=8)
            ax.set_xlim(-0.6, len(fams) - 0.4)
            metric = ACC if what == "ACC" else "PPL (first perplexity dataset)"
            ax.set_ylabel(metric, fontsize=8)
            ax_title(ax, f"{what} of each variant's best · {group_text(ratio, stage, kind)} ({better})")
    from matplotlib.patches import Patch
    legend(fig, [(Patch(color=c), v) for v, c in VARIANT_COLORS.items()])
    title(fig, "Base vs Instruct per family: the best configuration of each model (selection rule: "
               f"{study.rule.select_by}); n/a = no best (see the base_vs_instruct table)")
    return fig


def winning_params(study: Study, table: pd.DataFrame):
    """Per swept parameter: how many models' bests use each value."""
    groups, params = study.groups(), study.params or [None]
    fig, axes = figure(len(groups), len(params), width=3.6)
    for r, (ratio, stage, kind) in enumerate(groups):
        for c, p in enumerate(params):
            ax = axes[r][c]
            part = table[study.in_group(table, ratio, stage, kind) & (table["parameter"] == p)] \
                if not table.empty and p else pd.DataFrame()
            if part.empty:
                empty(ax, "no swept parameter" if p is None else f"no best sweeps {p}")
                continue
            ax.bar(range(len(part)), part["count"], width=0.6, color="C0", label="models whose best uses the value")
            ax.set_xlim(-0.6, max(len(part), 2) - 0.4)
            ax.set_xticks(range(len(part)), [str(v) for v in part["value"]], fontsize=8)
            ax.set_ylim(0, max(part["of"].max(), 1) + 0.5)
            ax.yaxis.get_major_locator().set_params(integer=True)
            ax.set_xlabel(p, fontsize=8)
            ax.set_ylabel("models", fontsize=8)
            ax_title(ax, f"winning {p} · {group_text(ratio, stage, kind)}")
    legend(fig, collect(axes))
    title(fig, "Distribution of the winning parameter values (count of models whose best configuration uses "
               "each value)")
    return fig


def methods_by_model(study: Study):
    """Each method's best ACC and PPL, grouped by model."""
    per_method = method_bests(study)
    colors = method_colors(study)
    methods = sorted(colors)
    groups = study.groups()
    fig, axes = figure(len(groups), 2, width=max(4.2, 0.9 * len(study.models)))
    for r, (ratio, stage, kind) in enumerate(groups):
        models = [b.row[query.PATH] for b in study.bests(ratio, stage, kind)]
        for c, (col, what) in enumerate(((ACC, "ACC"), (PPL, "PPL"))):
            ax = axes[r][c]
            if not models:
                empty(ax, "no model has a best here")
                continue
            width = 0.8 / max(1, len(methods))
            for k, method in enumerate(methods):
                xs, ys = [], []
                for i, path in enumerate(models):
                    b = per_method.of(**{query.PATH: path, "stage": stage, query.RATIO: ratio, KIND: kind,
                                         "method": method})
                    if b is not None and col in b.row and _finite(b.row[col]):
                        xs.append(i - 0.4 + width * (k + 0.5))
                        ys.append(float(b.row[col]))
                if xs:
                    ax.bar(xs, ys, width=width * 0.95, color=colors[method], label=method)
            ax.set_xticks(range(len(models)), [study.label(p) for p in models], fontsize=7, rotation=20, ha="right")
            ax.set_ylabel(ACC if what == "ACC" else "PPL (first perplexity dataset)", fontsize=8)
            ax_title(ax, f"each method's best {what} per model · {group_text(ratio, stage, kind)}")
    legend(fig, collect(axes))
    title(fig, "Method comparison grouped by model: the best configuration of each method (selection rule: "
               f"{study.rule.select_by})")
    return fig


def acc_vs_ppl(study: Study):
    """Every configuration's ACC against its PPL, each model's best marked."""
    groups = study.groups()
    colors = model_colors(study)
    fig, axes = figure(1, len(groups), width=4.6, height=3.6)
    for c, (ratio, stage, kind) in enumerate(groups):
        ax = axes[0][c]
        rows = study.rows[study.in_group(study.rows, ratio, stage, kind)]
        rows = rows[rows[PPL].notna() & rows[ACC].notna()] if ACC in rows else rows.iloc[0:0]
        if rows.empty:
            empty(ax, "no configuration has both ACC and PPL")
            continue
        for label, part in rows.groupby(MODEL, sort=False):
            ax.scatter(part[PPL], part[ACC], s=14, color=colors[label], alpha=0.7, label=label)
        for b in study.bests(ratio, stage, kind):
            if _finite(b.row.get(ACC)) and _finite(b.row[PPL]):
                ax.scatter([b.row[PPL]], [b.row[ACC]], marker="*", s=150, color=colors[b.row[MODEL]],
                           edgecolors="black", linewidths=0.8, label="best of each model (★)", zorder=3)
        ax.set_xlabel("PPL (first perplexity dataset, lower is better)", fontsize=8)
        ax.set_ylabel(f"{ACC} (higher is better)", fontsize=8)
        ax_title(ax, f"ACC vs PPL of every configuration · {group_text(ratio, stage, kind)}")
    legend(fig, collect(axes))
    title(fig, "Accuracy vs perplexity: one point per evaluated configuration, colour = model; stars = each "
               "model's best")
    return fig


def kept_layers(study: Study):
    """Per layer, the kept fraction of KV groups (solid) and MLP channels (dashed) of each model's
    best run, from its pruning_plan.json."""
    groups = study.groups()
    colors = model_colors(study)
    fig, axes = figure(1, len(groups), width=4.6, height=3.4)
    missing = []
    for c, (ratio, stage, kind) in enumerate(groups):
        ax = axes[0][c]
        drawn = 0
        for b in study.bests(ratio, stage, kind):
            plan = plan_of(b.row["prune_run_id"]) if isinstance(b.row["prune_run_id"], str) else None
            frame = kept_by_layer(plan) if plan else pd.DataFrame()
            label = b.row[MODEL]
            if frame.empty:
                missing.append(label)
                continue
            ax.plot(frame["layer"], frame["kv_groups"], "-o", ms=3, color=colors[label], label=label)
            ax.plot(frame["layer"], frame["mlp_channels"], "--s", ms=3, color=colors[label], label="_")
            drawn += 1
        if not drawn:
            empty(ax, "no plan of a best run could be read")
            continue
        ax.plot([], [], "-o", color="gray", label="KV groups kept (solid)")
        ax.plot([], [], "--s", color="gray", label="MLP channels kept (dashed)")
        ax.set_ylim(0, 1.05)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("kept fraction", fontsize=8)
        ax_title(ax, f"kept fraction per layer of each best · {group_text(ratio, stage, kind)}")
    legend(fig, collect(axes))
    note = f"; no plan for {', '.join(sorted(set(missing)))}" if missing else ""
    title(fig, f"Per-layer kept fraction of each model's best run (from {schema.A_PLAN}){note}")
    return fig


def study_figures(study: Study, tables: dict) -> dict:
    """name -> figure for schema.STUDY_FIGURES (nothing when there is no candidate at all)."""
    if study.rows.empty:
        return {}
    return {schema.FIG_BASE_INSTRUCT: base_instruct_bars(study, tables[schema.STUDY_BASE_INSTRUCT].frame),
            schema.FIG_PARAMS: winning_params(study, tables[schema.STUDY_PARAMS].frame),
            schema.FIG_METHODS: methods_by_model(study), schema.FIG_SCATTER: acc_vs_ppl(study),
            schema.FIG_KEPT: kept_layers(study)}


def emit(fig, name: str, out: Path | None, prefix: str = "", exts=("png", "pdf")) -> list[str]:
    """Render ``<prefix><name>.<ext>`` once per format into ``out`` (or a temporary directory),
    log the files to the active run, close the figure."""
    files = [f"{prefix}{name}.{ext}" for ext in exts]
    with tempfile.TemporaryDirectory() as tmp:
        root = out if out is not None else Path(tmp)
        for f in files:
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(root / f, dpi=150)
            parent = str(Path(f).parent)
            runs.log_file(root / f, None if parent == "." else parent)
    plt().close(fig)
    return files
