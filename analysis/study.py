"""The study's answers from the store: the best configuration of every model and the five
cross-model analyses (``analysis.cross_model``), and the per-model consolidation
(``analysis.consolidate``) — all under the one selection rule of :mod:`analysis.selection`.

A *candidate* is one row of the joined results table (``analysis.query.results_table``) at a
stage a best is chosen in (``pruned``, ``pruned+LoRA``). ACC is ``zeroshot/mean_acc``; PPL is the
perplexity on the first perplexity dataset of the row's eval run (``ppl_datasets_run``). A prune
parameter is *swept* for a method when its value differs between that method's configurations
anywhere in the selection; a parameter a method does not read keeps its default on every run of
that method and is therefore never swept for it (it is listed under ``fixed``).

The five analyses, per (target ratio, stage) group:

1. ``best_configs``: each model's best (model, family, variant, method, ACC, PPL, swept values, run ids);
2. ``base_vs_instruct``: per family, best Instruct − best Base (ΔACC, ΔPPL, absolute and relative
   to Base), and over *matched* configurations (same method and prune settings in both variants)
   the mean and sample standard deviation of the per-pair deltas;
3. ``method_preference``: per method, for how many models it holds the best configuration, and its
   mean rank (its best configuration ranked against the other methods' bests by the rule);
4. ``winning_params``: per swept parameter, how many models' bests use each value;
5. ``family_comparison``: per family, the mean over its Base and Instruct models of the best ACC and PPL.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import mean, stdev

import pandas as pd

from analysis import query, selection
from analysis.protocol import protocol_of
from analysis.selection import ACC, Best, BestConfig, Rule, Selection
from analysis.tables import Table, number, percent, signed
from tracking import UserError, schema, store

KIND = query.RATIO_KIND
GROUP = [query.PATH, "stage", query.RATIO, KIND]    # a best per model, stage, target ratio and ratio kind
KIND_COLUMN = "ratio kind"                           # tables: shown when the study has sparsity runs
ORDER = ["eval_start_time", "eval_run_id"]           # the final tie-break: evaluated first
PPL_METRIC, PPL, MODEL = "_ppl_metric", "_ppl", "_model"  # helper columns of the candidate rows


def pcol(param: str) -> str:
    """The candidate-row column of a swept parameter's display value (None: not swept for the method)."""
    return f"_param:{param}"
BASE, INSTRUCT = "Base", "Instruct"
_AXES = {schema.P_METHOD, schema.P_PRUNING_RATIO}


@dataclass
class Study:
    table: pd.DataFrame               # the whole results table (details), dense rows included
    rows: pd.DataFrame                # the candidates, with helper columns
    rule: Rule
    selection: Selection              # the best of every (model, stage, ratio[, protocol]) group
    swept: dict[str, list[str]]       # method -> its swept prune parameters
    params: list[str]                 # every swept parameter (union, sorted)
    models: pd.DataFrame              # label, model_path, family, variant (one row per model)
    notes: list[str] = field(default_factory=list)

    def groups(self) -> list[tuple[float, str, str]]:
        """The (ratio, stage, ratio kind) groups with at least one candidate: structured first, ratio
        ascending, pruned before pruned+LoRA."""
        keys = self.rows[[query.RATIO, "stage", KIND]].drop_duplicates()
        order = {s: i for i, s in enumerate(selection.STAGES)}
        kinds = list(schema.RATIO_KINDS)
        return sorted(((float(r), s, k) for r, s, k in keys.itertuples(index=False)),
                      key=lambda g: (kinds.index(g[2]), g[0], order[g[1]]))

    def best_of(self, path: str, ratio: float, stage: str, kind: str = schema.RATIO_STRUCTURED) -> Best | None:
        return self.selection.of(**{query.PATH: path, "stage": stage, query.RATIO: ratio, KIND: kind})

    def bests(self, ratio: float, stage: str, kind: str = schema.RATIO_STRUCTURED) -> list[Best]:
        """The bests of one group, in model order."""
        out = [self.best_of(p, ratio, stage, kind) for p in self.models[query.PATH]]
        return [b for b in out if b is not None]

    @property
    def kinds(self) -> list[str]:
        """The ratio kinds of the candidates (schema.RATIO_*)."""
        return [k for k in schema.RATIO_KINDS if k in set(self.rows[KIND])]

    def kind_cells(self, kind: str) -> dict:
        """``{"ratio kind": kind}`` for a table row when the study has sparsity runs, else ``{}``."""
        return {KIND_COLUMN: kind} if self.kinds not in ([], [schema.RATIO_STRUCTURED]) else {}

    def in_group(self, frame: pd.DataFrame, ratio: float, stage: str, kind: str) -> pd.Series:
        """Rows of ``frame`` (candidates: column pruning_ratio; tables: ratio) in one group."""
        col = query.RATIO if query.RATIO in frame else "ratio"
        hit = (frame[col].sub(ratio).abs() < 1e-12) & (frame["stage"] == stage)
        kcol = KIND if KIND in frame else KIND_COLUMN
        return hit & (frame[kcol] == kind) if kcol in frame else hit

    def label(self, path: str) -> str:
        return self.models.set_index(query.PATH).at[path, "label"]


# ------------------------------------------------------------------------------ building

def load(experiments=None, include_failed: bool = False, rule: Rule | None = None,
         notes: list[str] | None = None) -> Study:
    """The study of the selected experiments (UserError when no eval run can be read)."""
    notes = [] if notes is None else notes
    table = query.results_table(experiments, include_failed, notes=notes, details=True)
    if table.empty:
        where = f"experiment(s) {', '.join(experiments)}" if experiments else f"the store {query.store_label()}"
        raise UserError(f"no finished eval runs in {where}",
                        "evaluate models first: python -m prune_entry.evaluate --model_uri <model or prune run id>")
    return build(table, rule or Rule(), notes)


def model_labels(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model path: label (the alias, ``#2`` when two paths share it), family, variant;
    by family, Base before Instruct."""
    models = (table[[query.PATH, query.ALIAS, "family", "variant"]].drop_duplicates(query.PATH)
              .fillna({"family": "", "variant": ""})
              .assign(_v=lambda d: (d["variant"] != BASE).astype(int))
              .sort_values(["family", "_v", query.ALIAS]).drop(columns="_v").reset_index(drop=True))
    seen: dict[str, int] = {}
    labels = []
    for alias in models[query.ALIAS]:
        seen[alias] = seen.get(alias, 0) + 1
        labels.append(alias if seen[alias] == 1 else f"{alias}#{seen[alias]}")
    return models.assign(label=labels)


def first_ppl(row) -> str | None:
    """``ppl/<first dataset>`` of a row's eval run, if it has a value."""
    runs_ = row.get(schema.P_PPL_RUN)
    if isinstance(runs_, str) and runs_:
        name = schema.ppl_metric(runs_.split(",")[0])
        if name in row and not _nan(row[name]):
            return name
    return None


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _swept(rows: pd.DataFrame) -> dict[str, list[str]]:
    out = {}
    for method, grp in rows.groupby("method", sort=True):
        dicts = [d for d in grp[query.PRUNE_PARAMS] if isinstance(d, dict)]
        keys = sorted(set().union(*dicts) - _AXES - query.PRUNE_IGNORED) if dicts else []
        out[method] = [k for k in keys if len({query.canon(d.get(k)) for d in dicts}) > 1]
    return out


def build(table: pd.DataFrame, rule: Rule, notes: list[str] | None = None) -> Study:
    notes = [] if notes is None else notes
    models = model_labels(table)
    rows = table[table["stage"].isin(selection.STAGES)].copy()
    rows[PPL_METRIC] = [first_ppl(r) for _, r in rows.iterrows()]
    rows[PPL] = [r[m] if m else math.nan for m, (_, r) in zip(rows[PPL_METRIC], rows.iterrows())]
    rows[MODEL] = rows[query.PATH].map(dict(zip(models[query.PATH], models["label"])))
    swept = _swept(rows)
    params = sorted(set().union(*swept.values())) if swept else []
    for p in params:
        rows[pcol(p)] = [display(r[query.PRUNE_PARAMS].get(p)) if p in swept.get(r["method"], []) else None
                         for _, r in rows.iterrows()]
    names = dict(zip(models[query.PATH], models["label"]))

    def label(g: dict) -> str:
        return f"{names.get(g[query.PATH], g[query.PATH])} · {ratio_text(g[query.RATIO], g[KIND])} · {g['stage']}"
    sel = selection.select(rows, rule, GROUP, order=ORDER, protocol=protocol_of, label=label)
    if rows.empty:
        notes.append("no pruned or pruned+LoRA eval in the selection: there is no configuration to choose from")
    no_runs = sorted(set(models["label"]) - set(rows[MODEL]))
    if no_runs and not rows.empty:
        notes.append(f"no pruned eval for {', '.join(no_runs)} (only dense evals): no best configuration")
    return Study(table, rows, rule, sel, swept, params, models, notes + sel.notes)


def ratio_text(ratio: float, kind: str) -> str:
    """``ratio 0.2`` (structured) or ``sparsity 0.5`` (sparsity)."""
    return f"{'sparsity' if kind == schema.RATIO_SPARSITY else 'ratio'} {ratio:g}"


def ratio_caption(study: "Study") -> str:
    """What the ratio column measures, for every ratio kind of the study."""
    kinds = study.kinds or [schema.RATIO_STRUCTURED]
    return "Ratio = the target; " + "; ".join(schema.RATIO_KINDS[k] for k in kinds) + "."


def display(value) -> str | None:
    """A logged param as a table shows it (``128``, ``0.2``, ``none``)."""
    return None if value is None else query.pretty(query.canon(value))


# ------------------------------------------------------------------------------ best entries

MODEL_METRICS = (schema.M_MODEL_PARAMS, schema.M_MODEL_DISK_MB, schema.M_SPEED_PREFILL, schema.M_SPEED_DECODE,
                 schema.M_SPEED_LATENCY, schema.M_SPEED_PEAK_MEM)


def metrics_of(row: pd.Series) -> dict[str, float]:
    """The measurements a best is reported with: ACC, every perplexity, each task's score (the
    measure the eval used), achieved ratio, parameters, gradient diagnosis, size and speed."""
    tasks = schema.zeroshot_task_metrics(row.get(schema.P_TASK_MEASURES)).values()
    names = [ACC, *sorted(k for k in row.index if isinstance(k, str) and schema.is_ppl(k)), *tasks,
             *query.PRUNE_METRICS, *query.DIAGNOSIS_METRICS, *MODEL_METRICS]
    out = {}
    for k in names:
        v = row.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not _nan(v):
            out[k] = float(v)
    return out


def best_config(study: Study, best: Best) -> BestConfig:
    row = best.row
    params = row[query.PRUNE_PARAMS] if isinstance(row[query.PRUNE_PARAMS], dict) else {}
    swept_names = study.swept.get(row["method"], [])
    swept = {p: selection.typed_value(params.get(p)) for p in swept_names}
    fixed = {k: selection.typed_value(v) for k, v in sorted(params.items())
             if k not in swept and k not in _AXES}
    won = best.metrics()
    metrics = {**won, **{k: v for k, v in metrics_of(row).items() if k not in won}}
    protocol = {m: protocol_of(m, row, counts=True) for m in [k.metric for k in best.keys] if m in row}
    return BestConfig(model=row[MODEL], model_path=row[query.PATH], family=row["family"], variant=row["variant"],
                      method=row["method"], pruning_ratio=float(row[query.RATIO]), stage=row["stage"], swept=swept,
                      fixed=fixed, metrics=metrics, won_by=best.won_by, candidates=best.candidates,
                      excluded=best.excluded, tied=best.tied, prune_run_id=row["prune_run_id"],
                      eval_run_id=row["eval_run_id"], finetune_run_id=row["finetune_run_id"] or None,
                      protocol=protocol, ratio_kind=row[KIND])


def measured(rows: pd.DataFrame) -> str:
    """How ACC and PPL of these rows were measured (each distinct protocol once)."""
    parts = []
    accs = list(dict.fromkeys(protocol_of(ACC, r) for _, r in rows.iterrows() if not _nan(r.get(ACC))))
    if accs:
        parts.append(f"ACC = {ACC}: " + " | ".join(accs))
    ppls = list(dict.fromkeys(f"{m}: {protocol_of(m, r)}" for m, (_, r) in zip(rows[PPL_METRIC], rows.iterrows()) if m))
    if ppls:
        parts.append("PPL = perplexity on the eval's first dataset, " + " | ".join(ppls))
    return "; ".join(parts) + "." if parts else "No ACC or PPL measured."


def _value(best: Best | None, what: str):
    if best is None:
        return math.nan
    return best.row[ACC] if what == "acc" and ACC in best.row else best.row[PPL] if what == "ppl" else math.nan


STDERR_TEXT = ("± ACC = standard error of the mean score, sqrt(Σ se_t²)/k over its k tasks from lm-eval's "
               "per-task standard errors (tasks taken as independent); – where the store has no standard error.")


def acc_stderr(row) -> float:
    """Standard error of ``zeroshot/mean_acc`` from the tasks' logged ``<task>/<measure>_stderr``:
    sqrt(sum se_t^2) / k (the mean of k independent estimates); NaN unless every task has one."""
    tasks = list(schema.zeroshot_task_metrics(row.get(schema.P_TASK_MEASURES)).values())
    errs = [row.get(schema.stderr_metric(t)) for t in tasks]
    if not tasks or any(_nan(e) or not isinstance(e, (int, float)) for e in errs):
        return math.nan
    return math.sqrt(sum(float(e) ** 2 for e in errs)) / len(errs)


# ------------------------------------------------------------------------------ 1. best configurations

def best_configs(study: Study) -> Table:
    rows = []
    override = study.rule.override.metric if study.rule.override else None
    for ratio, stage, kind in study.groups():
        for _, m in study.models.iterrows():
            b = study.best_of(m[query.PATH], ratio, stage, kind)
            if b is None:
                continue
            r = b.row
            row = {"model": m["label"], "family": m["family"], "variant": m["variant"], "ratio": ratio,
                   **study.kind_cells(kind), "stage": stage, "method": r["method"],
                   "ACC": r.get(ACC, math.nan), "± ACC": acc_stderr(r), "PPL": r[PPL],
                   "PPL on": (schema.ppl_dataset(r[PPL_METRIC]) if r[PPL_METRIC] else None)}
            if override and override not in (ACC, r[PPL_METRIC]):
                row[override] = r.get(override, math.nan)
            row.update({p: r.get(pcol(p)) for p in study.params})
            row.update({"won by": ",".join(b.won_by), "n": b.candidates, "prune run": r["prune_run_id"],
                        "eval run": r["eval_run_id"]})
            rows.append(row)
    frame = pd.DataFrame(rows)
    caption = (f"Best configuration of every model at each target pruning ratio and stage. "
               f"Selection: {study.rule.describe()}. {measured(study.rows)} {ratio_caption(study)} "
               f"{STDERR_TEXT} "
               f"Swept parameters: {', '.join(study.params) or 'none'} (– = not swept for that method); "
               f"n = configurations compared; won by = the metrics that separated it from the runner-up.")
    fmt = {"ratio": lambda v: f"{v:.2f}", "prune run": _short, "eval run": _short, "n": number,
           "± ACC": lambda v: f"±{v:.4f}"}
    return Table(schema.STUDY_BEST, "Best configuration per model", caption, frame, fmt, _notes(study),
                 group_by="ratio")


def _short(run_id) -> str:
    return str(run_id)[:8] if isinstance(run_id, str) else "–"


def _notes(study: Study) -> list[str]:
    return list(dict.fromkeys(study.notes))


# ------------------------------------------------------------------------------ 2. Base vs Instruct

def _members(study: Study, family: str, variant: str) -> list[str]:
    m = study.models
    return list(m.loc[(m["family"] == family) & (m["variant"] == variant), query.PATH])


def _why_no_best(study: Study, path: str | None, variant: str, family: str, ratio: float, stage: str,
                 kind: str = schema.RATIO_STRUCTURED) -> str:
    if path is None:
        return f"no {variant} model of family {family} in the store"
    label = study.label(path)
    for g, why in study.selection.missing:
        if (g.get(query.PATH) == path and g.get("stage") == stage and g.get(KIND) == kind
                and selection._same(g.get(query.RATIO), ratio)):
            return f"{label}: {why}"
    return f"{label} has no finished {stage} eval at {ratio_text(ratio, kind)}"


def _config_key(row: pd.Series) -> str:
    params = row[query.PRUNE_PARAMS] if isinstance(row[query.PRUNE_PARAMS], dict) else {}
    canon = {k: query.canon(v) for k, v in params.items() if k not in query.PRUNE_IGNORED}
    return repr(sorted({**canon, "_stage": row["stage"]}.items()))


def matched_deltas(study: Study, base: str, instruct: str, ratio: float, stage: str,
                   kind: str = schema.RATIO_STRUCTURED) -> dict:
    """Instruct − Base over configurations run on both (same method, ratio, stage and prune
    settings; PPL only where both use the same first perplexity dataset)."""
    rows = study.rows[study.in_group(study.rows, ratio, stage, kind)]
    b = {(_config_key(r)): r for _, r in rows[rows[query.PATH] == base].iterrows()}
    i = {(_config_key(r)): r for _, r in rows[rows[query.PATH] == instruct].iterrows()}
    acc, ppl = [], []
    for key in sorted(set(b) & set(i)):
        rb, ri = b[key], i[key]
        if not _nan(rb.get(ACC)) and not _nan(ri.get(ACC)):
            acc.append(float(ri[ACC] - rb[ACC]))
        if rb[PPL_METRIC] and rb[PPL_METRIC] == ri[PPL_METRIC]:
            ppl.append(float(ri[PPL] - rb[PPL]))
    spread = lambda xs: stdev(xs) if len(xs) > 1 else math.nan  # noqa: E731
    return {"matched": len(set(b) & set(i)), "mean ΔACC": mean(acc) if acc else math.nan, "sd ΔACC": spread(acc),
            "mean ΔPPL": mean(ppl) if ppl else math.nan, "sd ΔPPL": spread(ppl)}


def base_vs_instruct(study: Study) -> Table:
    rows, notes = [], []
    families = [f for f in dict.fromkeys(study.models["family"]) if f]
    for ratio, stage, kind in study.groups():
        for fam in families:
            bases, instrs = _members(study, fam, BASE), _members(study, fam, INSTRUCT)
            for variant, members in ((BASE, bases), (INSTRUCT, instrs)):
                if len(members) > 1:
                    notes.append(f"family {fam} has {len(members)} {variant} models; the first "
                                 f"({study.label(members[0])}) is compared")
            base, instr = (bases[0] if bases else None), (instrs[0] if instrs else None)
            if base is None and instr is None:
                continue
            bb = study.best_of(base, ratio, stage, kind) if base else None
            bi = study.best_of(instr, ratio, stage, kind) if instr else None
            if bb is None and bi is None:
                continue
            row = {"family": fam, "ratio": ratio, **study.kind_cells(kind), "stage": stage,
                   "Base": study.label(base) if base else None, "Instruct": study.label(instr) if instr else None,
                   "ACC Base": _value(bb, "acc"), "ACC Instruct": _value(bi, "acc")}
            row["ΔACC"] = row["ACC Instruct"] - row["ACC Base"]
            row["ΔACC %"] = 100 * row["ΔACC"] / row["ACC Base"] if row["ACC Base"] else math.nan
            same_ppl = bb is not None and bi is not None and bb.row[PPL_METRIC] == bi.row[PPL_METRIC]
            row.update({"PPL Base": _value(bb, "ppl"), "PPL Instruct": _value(bi, "ppl")})
            row["ΔPPL"] = row["PPL Instruct"] - row["PPL Base"] if same_ppl else math.nan
            row["ΔPPL %"] = 100 * row["ΔPPL"] / row["PPL Base"] if same_ppl and row["PPL Base"] else math.nan
            row.update(matched_deltas(study, base, instr, ratio, stage, kind) if bb is not None and bi is not None
                       else {"matched": 0, "mean ΔACC": math.nan, "sd ΔACC": math.nan, "mean ΔPPL": math.nan,
                             "sd ΔPPL": math.nan})
            missing = [_why_no_best(study, p, v, fam, ratio, stage, kind) for p, v, b in
                       ((base, BASE, bb), (instr, INSTRUCT, bi)) if b is None]
            if bb is not None and bi is not None and not same_ppl:
                missing.append("Base and Instruct were evaluated on different first perplexity datasets")
            row["missing"] = "; ".join(missing) or None
            rows.append(row)
            if missing:
                notes.append(f"{fam} {ratio_text(ratio, kind)} {stage}: delta missing: {'; '.join(missing)}")
    frame = pd.DataFrame(rows)
    caption = ("Base vs Instruct per family: Δ = best Instruct − best Base (each chosen by the selection rule); "
               "Δ% = 100·Δ/Base. Matched: configurations run on both variants (same method, ratio, stage and "
               "prune settings); mean and sample standard deviation (sd) of their per-pair deltas. "
               f"{measured(study.rows)} {ratio_caption(study)}")
    fmt = {"ratio": lambda v: f"{v:.2f}", "ΔACC": signed, "ΔACC %": percent, "ΔPPL": lambda v: signed(v, 2),
           "ΔPPL %": percent, "mean ΔACC": signed, "mean ΔPPL": lambda v: signed(v, 2), "matched": number}
    return Table(schema.STUDY_BASE_INSTRUCT, "Base vs Instruct", caption, frame, fmt,
                 list(dict.fromkeys(notes)), group_by="ratio")


# ------------------------------------------------------------------------------ 3. method preference

def method_bests(study: Study) -> Selection:
    """The best configuration of every method for every model (same rule, method in the group)."""
    return selection.select(study.rows, study.rule, [*GROUP, "method"], order=ORDER, protocol=protocol_of)


def method_ranks(study: Study, per_method: Selection, ratio: float, stage: str,
                 kind: str = schema.RATIO_STRUCTURED) -> dict[str, list[int]]:
    """method -> its rank (1 = best) for each model of the group that has results of it."""
    ranks: dict[str, list[int]] = {}
    for b in study.bests(ratio, stage, kind):
        path = b.row[query.PATH]
        own = [m for m in per_method.best if m.group[query.PATH] == path and m.group["stage"] == stage
               and m.group[KIND] == kind and selection._same(m.group[query.RATIO], ratio)]
        if not own:
            continue
        ranked = selection.rank(pd.DataFrame([m.row for m in own]), b.keys, ORDER)
        for i, method in enumerate(ranked["method"], 1):
            ranks.setdefault(method, []).append(i)
    return ranks


def method_preference(study: Study) -> Table:
    per_method = method_bests(study)
    rows = []
    for ratio, stage, kind in study.groups():
        bests = study.bests(ratio, stage, kind)
        ranks = method_ranks(study, per_method, ratio, stage, kind)
        for method in sorted(set(study.rows.loc[study.in_group(study.rows, ratio, stage, kind), "method"])):
            winners = [study.label(b.row[query.PATH]) for b in bests if b.row["method"] == method]
            r = ranks.get(method, [])
            rows.append({"ratio": ratio, **study.kind_cells(kind), "stage": stage, "method": method,
                         "wins": len(winners),
                         "models": len(r), "mean rank": mean(r) if r else math.nan,
                         "best for": ", ".join(winners) or None})
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame = frame[frame["models"] > 0].sort_values(["ratio", "stage", "wins", "mean rank"],
                                                       ascending=[True, True, False, True], kind="stable")
    caption = ("Method preference: wins = models for which the method holds the best configuration; models = "
               "models with results of the method; mean rank = the method's best configuration ranked against "
               f"the other methods' bests of the same model by the selection rule (1 = best), averaged over "
               f"those models. Selection: {study.rule.describe()}. {ratio_caption(study)}")
    fmt = {"ratio": lambda v: f"{v:.2f}", "mean rank": lambda v: f"{v:.2f}", "wins": number, "models": number}
    return Table(schema.STUDY_METHODS, "Method preference", caption, frame.reset_index(drop=True), fmt,
                 _notes(study), group_by="ratio")


# ------------------------------------------------------------------------------ 4. winning parameter values

def winning_params(study: Study) -> Table:
    rows = []
    for ratio, stage, kind in study.groups():
        bests = study.bests(ratio, stage, kind)
        rows_ = study.rows[study.in_group(study.rows, ratio, stage, kind)]
        for p in study.params:
            counts: dict[str, list[str]] = {v: [] for v in rows_[pcol(p)].dropna().unique()}  # every swept value
            for b in bests:
                value = b.row.get(pcol(p))
                if value is not None:
                    counts.setdefault(value, []).append(study.label(b.row[query.PATH]))
            for value in sorted(counts, key=_sort_key):
                rows.append({"ratio": ratio, **study.kind_cells(kind), "stage": stage, "parameter": p, "value": value,
                             "count": len(counts[value]), "of": sum(p in study.swept.get(b.row["method"], [])
                                                                    for b in bests),
                             "models": ", ".join(counts[value]) or None})
    frame = pd.DataFrame(rows)
    caption = ("Distribution of the winning parameter values: for each swept prune parameter and each value it "
               "took, how many models' best configurations use it (of = bests whose method sweeps the parameter). "
               f"{ratio_caption(study)}")
    fmt = {"ratio": lambda v: f"{v:.2f}", "count": number, "of": number}
    return Table(schema.STUDY_PARAMS, "Winning parameter values", caption, frame, fmt, _notes(study),
                 group_by="parameter")


def _sort_key(value: str):
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


# ------------------------------------------------------------------------------ 5. family comparison

def family_comparison(study: Study) -> Table:
    rows, notes = [], []
    for ratio, stage, kind in study.groups():
        for fam in [f for f in dict.fromkeys(study.models["family"]) if f]:
            paths = list(study.models.loc[study.models["family"] == fam, query.PATH])
            bests = [b for b in (study.best_of(p, ratio, stage, kind) for p in paths) if b is not None]
            if not bests:
                continue
            accs = [float(b.row[ACC]) for b in bests if ACC in b.row and not _nan(b.row[ACC])]
            ppl_names = {b.row[PPL_METRIC] for b in bests if b.row[PPL_METRIC]}
            ppls = [float(b.row[PPL]) for b in bests if b.row[PPL_METRIC]] if len(ppl_names) == 1 else []
            variants = sorted({b.row["variant"] for b in bests})
            rows.append({"family": fam, "ratio": ratio, **study.kind_cells(kind), "stage": stage, "models": len(bests),
                         "variants": "+".join(variants), "mean best ACC": mean(accs) if accs else math.nan,
                         "mean best PPL": mean(ppls) if ppls else math.nan,
                         "PPL on": schema.ppl_dataset(next(iter(ppl_names))) if len(ppl_names) == 1 else None})
            if len(ppl_names) > 1:
                notes.append(f"{fam} {ratio_text(ratio, kind)} {stage}: its models' first perplexity datasets differ "
                             f"({', '.join(sorted(ppl_names))}): no mean PPL")
            if len(bests) < len(paths) or set(variants) != {BASE, INSTRUCT}:
                notes.append(f"{fam} {ratio_text(ratio, kind)} {stage}: mean over {'+'.join(variants)} only")
    frame = pd.DataFrame(rows)
    caption = ("Family comparison: per family, the mean over its Base and Instruct models of the best "
               f"configuration's ACC and PPL (models = how many had a best). {measured(study.rows)} "
               f"{ratio_caption(study)}")
    fmt = {"ratio": lambda v: f"{v:.2f}", "models": number}
    return Table(schema.STUDY_FAMILIES, "Family comparison", caption, frame, fmt, list(dict.fromkeys(notes)),
                 group_by="ratio")


# ------------------------------------------------------------------------------ all of it

def analyses(study: Study) -> dict[str, Table]:
    """The five analyses in order (schema.STUDY_ANALYSES)."""
    return {schema.STUDY_BEST: best_configs(study), schema.STUDY_BASE_INSTRUCT: base_vs_instruct(study),
            schema.STUDY_METHODS: method_preference(study), schema.STUDY_PARAMS: winning_params(study),
            schema.STUDY_FAMILIES: family_comparison(study)}


def records(frame: pd.DataFrame) -> list[dict]:
    return selection._json_safe(frame.to_dict(orient="records"))


def summary(study: Study, tables: dict[str, Table]) -> dict:
    """``analysis_summary.json``: the rule, every best in full, each analysis' rows, notes, counts."""
    bests = [best_config(study, b) for b in study.selection.best]
    doc = selection.document(study.rule, bests, study.selection.missing, _notes(study))
    doc.update({name: records(t.frame) for name, t in tables.items() if name != schema.STUDY_BEST})
    doc[schema.STUDY_BEST] = doc.pop("best")
    doc["counts"] = {"models": int(study.models.shape[0]),
                     "models_with_best": len({b.row[query.PATH] for b in study.selection.best}),
                     "candidates": study.selection.candidates, "excluded": study.selection.excluded}
    doc["swept"] = study.swept
    return doc


def plan_of(run_id: str) -> dict | None:
    """The pruning plan JSON of a prune run (None when it has none)."""
    return store.load_json_artifact(run_id, schema.A_PLAN)


def kept_by_layer(plan: dict) -> pd.DataFrame:
    """Per layer: kept fraction of KV groups and of MLP channels, from a plan's JSON."""
    rows = []
    for i, (orig, layer) in enumerate(zip(plan.get("original", []), plan.get("layers", []))):
        rows.append({"layer": i, "kv_groups": len(layer["kept_kv_groups"]) / max(1, orig["n_kv"]),
                     "mlp_channels": len(layer["kept_channels"]) / max(1, orig["intermediate"])})
    return pd.DataFrame(rows)
