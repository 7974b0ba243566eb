"""The tracking store as tables: every run (:func:`runs_frame`) and one joined row per evaluated
model (:func:`results_table`), the table a paper's numbers come from.

How an eval run is joined to the runs that made its model (tag ``source_run_id``):

* eval, no source run                          -> stage ``dense``   (the model no run produced)
* eval -> prune run                            -> stage ``pruned``
* eval -> finetune run -> prune run            -> stage ``pruned+LoRA``
* eval -> finetune run (no source run)         -> stage ``dense+LoRA``

Model identity (alias, family, variant, path) comes from the first run of the chain (the prune
run, else the finetune run, else the eval run itself); method, pruning ratio and reconstruction
from the prune run. A *configuration* is (model path, stage, every prune param, every finetune
param, the eval protocol); values are compared after normalising their spelling (``0.2`` =
``.20``, ``None`` = ``none``). When one configuration was evaluated several times, the latest eval
(by start time) is kept and ``n_evals`` says how many there were.

Runs of the claims registry (``tracking.claims``: stage ``claims``, tag ``claims_registry``) are
bookkeeping of distributed sweeps, not results: :func:`runs_frame` leaves them out.

Structured and sparsity runs are told apart by the prune run's ``ratio_kind`` tag: the
``pruning_ratio`` column holds the target of that kind (structured: the ``pruning_ratio`` param,
the fraction of prunable parameters removed; sparsity: the ``target_sparsity`` metric, the fraction
of projection weights set to zero), ``achieved_ratio`` the achieved value of the same kind.

Reads the store only through :mod:`tracking.store` (no CSV, no mlflow import here); every column,
param and metric name comes from :mod:`tracking.schema`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

from tracking import schema, store
from tracking.claims import STAGE_CLAIMS, TAG_REGISTRY
from tracking.connect import tracking_uri
from tracking.redact import redact

# Column names that are schema names (tags / params / metrics of the same meaning).
ALIAS, PATH, SOURCE = schema.TAG_MODEL_ALIAS, schema.TAG_MODEL_PATH, schema.TAG_SOURCE_RUN
SEARCH, FAILURE = schema.TAG_SEARCH_RUN, schema.TAG_FAILURE
RATIO, ACHIEVED, PARAMS_AFTER = schema.P_PRUNING_RATIO, schema.M_ACHIEVED_RATIO, schema.M_PARAMS_AFTER
PPL_SEQ_LEN, NUM_FEWSHOT = schema.P_PPL_SEQ_LEN, schema.P_NUM_FEWSHOT

# runs_frame: fixed columns (tag-derived) before params.* and metrics.*
_TAG_COLUMNS = {"run_name": schema.TAG_RUN_NAME, "stage": schema.TAG_STAGE,
                ALIAS: schema.TAG_MODEL_ALIAS, "family": schema.TAG_MODEL_FAMILY,
                "variant": schema.TAG_MODEL_VARIANT, PATH: schema.TAG_MODEL_PATH,
                "method": schema.TAG_METHOD, SOURCE: schema.TAG_SOURCE_RUN,
                "parent_run_id": schema.TAG_PARENT_RUN, SEARCH: schema.TAG_SEARCH_RUN,
                FAILURE: schema.TAG_FAILURE, schema.TAG_RATIO_KIND: schema.TAG_RATIO_KIND}
RUN_COLUMNS = ["run_id", "stage", "status", "experiment", "start_time", "end_time", "run_name",
               ALIAS, "family", "variant", PATH, "method", SOURCE, "parent_run_id", SEARCH, FAILURE,
               schema.TAG_RATIO_KIND]
RATIO_KIND = schema.TAG_RATIO_KIND

# results_table: identity, configuration, protocol and provenance columns (metrics come between)
ID_COLUMNS = [ALIAS, "family", "variant", "method", RATIO, RATIO_KIND, ACHIEVED, "reconstruct", "stage",
              "setting", PARAMS_AFTER]
PROTOCOL_COLUMNS = [PPL_SEQ_LEN, NUM_FEWSHOT, schema.P_ACC_CONVENTION, schema.P_TASK_MEASURES,
                    schema.P_TASKS_RUN, schema.P_LIMIT]
RUN_ID_COLUMNS = ["prune_run_id", "finetune_run_id", "eval_run_id", "n_evals", "eval_start_time",
                  "experiment", SEARCH, PATH]
# results_table(details=True): the prune run's params (dict), its gradient diagnosis and the order
# of the eval's perplexity datasets (the selection rule's tie-break uses the first).
PRUNE_PARAMS = "prune_params"
DIAGNOSIS_METRICS = (schema.M_GRAD_NORM_RATIO, schema.M_GRAD_MEAN_RATIO, schema.M_NUM_EXTREME_LAYERS,
                     schema.M_MEAN_RATIO)
DETAIL_COLUMNS = [PRUNE_PARAMS, *DIAGNOSIS_METRICS, schema.P_PPL_RUN]
PRUNE_METRICS = (ACHIEVED, PARAMS_AFTER)   # usable as pivot metrics too
STAGE_ORDER = (schema.LABEL_DENSE, schema.LABEL_DENSE_LORA, schema.LABEL_PRUNED, schema.LABEL_PRUNED_LORA)

# Params that do not change the model or the measurement (where it is written, how it is run).
PRUNE_IGNORED = {schema.P_MODEL, "models_file", "output_dir", "device", "save_model", "verbose", "cache_dir",
                 "data_dir"}
_PRUNE_IGNORED = PRUNE_IGNORED
_FT_IGNORED = {schema.P_MODEL_URI, "models_file", "output_dir", "device", "checkpoint_dir", "checkpoint_every",
               "resume", "eval_after", "eval_args", "progress"}
# The eval protocol: what was measured and how (ppl_protocol/<dataset> params are added per run).
_EVAL_PROTOCOL = (schema.P_PPL_RUN, schema.P_TASKS_RUN, schema.P_TASK_MEASURES, schema.P_NUM_FEWSHOT,
                  schema.P_ACC_CONVENTION, schema.P_LIMIT, "task_corpus", "task_choices", "task_items",
                  "seed", "dtype")


# ------------------------------------------------------------------------------ runs_frame

def store_label() -> str:
    """The tracking URI as analysis prints or writes it: credentials redacted (tracking.redact)."""
    return redact(tracking_uri())


def experiment_list(experiments) -> list[str] | None:
    """``"a,b"`` or ``["a", "b"]`` -> list; None / "" / "none" -> None (every experiment)."""
    if experiments is None:
        return None
    items = experiments.split(",") if isinstance(experiments, str) else list(experiments)
    items = [e.strip() for e in items if e and e.strip()]
    return None if not items or items == ["none"] else items


def _is_claims(raw: pd.DataFrame) -> pd.Series:
    """Rows of claims-registry runs (tracking.claims): stage ``claims`` or tag ``claims_registry``."""
    hit = pd.Series(False, index=raw.index)
    for tag, value in ((schema.TAG_STAGE, STAGE_CLAIMS), (TAG_REGISTRY, "true")):
        col = schema.tag_column(tag)
        if col in raw:
            hit |= raw[col].astype(str).str.lower() == value
    return hit


def _tidy(raw: pd.DataFrame) -> pd.DataFrame:
    """MLflow's search frame -> RUN_COLUMNS + params.* + metrics.* (tags.* dropped; claims-registry
    runs dropped)."""
    if not raw.empty:
        raw = raw[~_is_claims(raw)]
    if raw.empty:
        return pd.DataFrame(columns=RUN_COLUMNS)
    out = pd.DataFrame({"run_id": raw["run_id"], "status": raw["status"], "experiment": raw["experiment"],
                        "start_time": raw["start_time"], "end_time": raw["end_time"]})
    for col, tag in _TAG_COLUMNS.items():
        name = schema.tag_column(tag)
        values = raw[name] if name in raw else None
        out[col] = values.astype(object).where(values.notna(), None) if values is not None else None
    extra = sorted(c for c in raw.columns if schema.split_column(c)[0] in _KEPT_KINDS)
    out = pd.concat([out[RUN_COLUMNS], raw[extra]], axis=1)
    return out.sort_values(["start_time", "run_id"], ignore_index=True)


_KEPT_KINDS = (schema.split_column(schema.param_column(""))[0], schema.split_column(schema.metric_column(""))[0])
_PARAMS, _METRICS = _KEPT_KINDS


def runs_frame(experiments=None, include_failed: bool = False) -> pd.DataFrame:
    """One row per run: run_id, stage, status, experiment, start/end time, the tags model_alias /
    family / variant / model_path / method / source_run_id / parent_run_id / search_run_id /
    failure_reason / ratio_kind, then every param (``params.<name>``) and metric (``metrics.<name>``, the latest value).

    ``experiments``: names (list or comma string); default every experiment. Unknown names are a
    UserError. ``include_failed``: also FAILED / KILLED / RUNNING runs.
    """
    return _tidy(store.runs_of_experiments(experiment_list(experiments), include_failed))


# ------------------------------------------------------------------------------ joining

def _canon(value) -> str:
    """One spelling per value: numbers as floats, booleans lower-case, unset as ``none``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "none"
    text = str(value).strip()
    if text.lower() in ("", "none", "null"):
        return "none"
    if text.lower() in ("true", "false"):
        return text.lower()
    try:
        return repr(float(text))
    except ValueError:
        return text


canon = _canon   # public names: analysis.study compares and shows prune params the same way


def _params(row: pd.Series | None) -> dict[str, str]:
    if row is None:
        return {}
    return {name: v for kind, name, v in _columns(row) if kind == _PARAMS and isinstance(v, str)}


def _metrics(row: pd.Series | None) -> dict[str, float]:
    if row is None:
        return {}
    return {name: float(v) for kind, name, v in _columns(row)
            if kind == _METRICS and v is not None and not pd.isna(v)}


def _columns(row: pd.Series):
    """(kind, name, value) of every ``params.*`` / ``metrics.*`` cell of a runs_frame row."""
    for column, value in row.items():
        kind, name = schema.split_column(column)
        yield kind, name, value


def _config(params: dict[str, str], ignored: set[str]) -> dict[str, str]:
    return {k: _canon(v) for k, v in params.items() if k not in ignored}


def eval_protocol(params: dict[str, str]) -> dict[str, str]:
    """The params of an eval run that define what its numbers mean."""
    keys = [*_EVAL_PROTOCOL, *sorted(k for k in params if schema.is_protocol_param(k))]
    return {k: _canon(params.get(k)) for k in keys}


def display_alias(alias: str | None, path: str | None) -> str:
    """Aliases and hub ids as typed; a filesystem path -> its directory name."""
    name = alias or path or "?"
    if os.path.isabs(name) or name.startswith(("./", "../", "~")):
        return Path(name.rstrip("/")).name or name
    return name


def _chain(ev: pd.Series, lookup: dict[str, pd.Series]) -> tuple[str, pd.Series | None, pd.Series | None] | str:
    """(stage label, prune run, finetune run) of an eval run, or a reason it cannot be joined."""
    src_id = ev[SOURCE]
    if not src_id:
        return schema.LABEL_DENSE, None, None
    src = lookup.get(src_id)
    if src is None:
        return f"its source run {src_id} is not in the store"
    if src["stage"] == schema.STAGE_PRUNE:
        return schema.LABEL_PRUNED, src, None
    if src["stage"] != schema.STAGE_FINETUNE:
        return f"its source run {src_id} is a '{src['stage']}' run, not prune or finetune"
    inner_id = src[SOURCE]
    if not inner_id:
        return schema.LABEL_DENSE_LORA, None, src
    inner = lookup.get(inner_id)
    if inner is None:
        return f"the source run {inner_id} of its finetune run is not in the store"
    if inner["stage"] != schema.STAGE_PRUNE:
        return f"its finetune run starts from a '{inner['stage']}' run, not a prune run"
    return schema.LABEL_PRUNED_LORA, inner, src


def _lookup(frame: pd.DataFrame) -> dict[str, pd.Series]:
    """run id -> run row, fetching source runs that live in other experiments (two hops)."""
    rows = {r["run_id"]: r for _, r in frame.iterrows()}
    for _ in range(2):
        missing = {r[SOURCE] for r in rows.values() if r[SOURCE]} - set(rows)
        if not missing:
            break
        extra = _tidy(store.runs_by_id(missing))
        rows.update({r["run_id"]: r for _, r in extra.iterrows()})
    return rows


def _num(value, default=None):
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _joined_row(ev: pd.Series, stage: str, prune: pd.Series | None, ft: pd.Series | None) -> dict:
    """The results row of one eval run (before deduplication)."""
    root = prune if prune is not None else (ft if ft is not None else ev)
    pp, pm, ep, em = _params(prune), _metrics(prune), _params(ev), _metrics(ev)
    pruned = prune is not None
    kind = ratio_kind(prune)
    target, achieved = _target(kind, pp, pm)
    row = {ALIAS: display_alias(root[ALIAS] or ev[ALIAS], root[PATH]),
           "family": root["family"] or ev["family"], "variant": root["variant"] or ev["variant"],
           "method": (prune["method"] or pp.get(schema.P_METHOD, "?")) if pruned else schema.LABEL_DENSE,
           RATIO: target if pruned else 0.0, RATIO_KIND: kind,
           ACHIEVED: achieved if pruned else 0.0,
           # prune runs from before reconstruction existed did none
           "reconstruct": pp.get(schema.P_RECONSTRUCT, "none") if pruned else "-",
           "stage": stage,
           PARAMS_AFTER: pm.get(schema.M_PARAMS_AFTER, em.get(schema.M_MODEL_PARAMS)) if pruned
           else em.get(schema.M_MODEL_PARAMS),
           **em,
           PPL_SEQ_LEN: _num(ep.get(schema.P_PPL_SEQ_LEN)),
           **{k: ep.get(k) for k in PROTOCOL_COLUMNS[1:]},
           **{k: v for k, v in ep.items() if schema.is_protocol_param(k)},
           "prune_run_id": prune["run_id"] if pruned else None,
           "finetune_run_id": ft["run_id"] if ft is not None else None,
           "eval_run_id": ev["run_id"], "eval_start_time": ev["start_time"], "experiment": ev["experiment"],
           SEARCH: (prune[SEARCH] if pruned else None) or ev[SEARCH],
           PATH: root[PATH] or ev[PATH] or root[ALIAS]}
    row[PRUNE_PARAMS] = {k: v for k, v in pp.items() if k not in PRUNE_IGNORED}
    row.update({f"_diag:{m}": pm.get(m) for m in DIAGNOSIS_METRICS})
    row[f"_diag:{schema.P_PPL_RUN}"] = ep.get(schema.P_PPL_RUN)
    row["_prune_cfg"] = _config(pp, _PRUNE_IGNORED)
    row["_ft_cfg"] = _config(_params(ft), _FT_IGNORED)
    row["_eval_key"] = json.dumps(eval_protocol(ep), sort_keys=True)
    return row


def ratio_kind(prune: pd.Series | None) -> str:
    """What the target ratio of a prune run measures (schema.RATIO_*); prune runs from before the
    tag existed were structured. Dense rows: structured (0 removed)."""
    kind = prune[RATIO_KIND] if prune is not None and RATIO_KIND in prune else None
    return kind if kind in schema.RATIO_KINDS else schema.RATIO_STRUCTURED


def _target(kind: str, pp: dict, pm: dict) -> tuple[float | None, float | None]:
    """(target, achieved) of the run's ratio kind."""
    if kind == schema.RATIO_SPARSITY:
        return pm.get(schema.M_TARGET_SPARSITY, _num(pp.get(schema.P_SPARSITY))), pm.get(schema.M_ACHIEVED_SPARSITY)
    return _num(pp.get(schema.P_PRUNING_RATIO)), pm.get(schema.M_ACHIEVED_RATIO)


def _cfg_key(row) -> str:
    return json.dumps([row["_prune_cfg"], row["_ft_cfg"]], sort_keys=True)


def _dedup(table: pd.DataFrame) -> pd.DataFrame:
    """Keep the latest eval per (model, stage, prune+finetune config, eval protocol); count them."""
    table = table.assign(_cfg=table.apply(_cfg_key, axis=1))
    key = [PATH, "stage", "_cfg", "_eval_key"]
    table = table.sort_values(["eval_start_time", "eval_run_id"], ascending=False, ignore_index=True)
    counts = table.groupby(key, sort=False, dropna=False)["eval_run_id"].transform("size")
    table = table.assign(n_evals=counts)
    return table.drop_duplicates(key, keep="first", ignore_index=True)


_CELL = [PATH, "stage", "method", RATIO, RATIO_KIND, "reconstruct"]


def _settings(table: pd.DataFrame) -> pd.Series:
    """``k=v; ...`` of the prune/finetune params that tell apart configurations sharing a cell.

    A param is shown when two configurations of the same (model, stage, method, ratio,
    reconstruct) differ in it; it is then shown on every row of that (stage, method), so the
    rows of different models still line up. Finetune params carry the prefix ``lora:``.
    """
    def flat(row) -> dict[str, str]:
        return {**row["_prune_cfg"], **{f"lora:{k}": v for k, v in row["_ft_cfg"].items()}}

    flats = table.apply(flat, axis=1)
    shown: dict[tuple, set[str]] = {}
    for _, group in table.groupby(_CELL, sort=False, dropna=False):
        if group["_cfg"].nunique() < 2:
            continue
        dicts = [flats[i] for i in group.index]
        keys = set().union(*dicts)
        differing = {k for k in keys if len({d.get(k, "none") for d in dicts}) > 1}
        cell = (group["stage"].iloc[0], group["method"].iloc[0])
        shown.setdefault(cell, set()).update(differing - {schema.P_PRUNING_RATIO, "method"})

    def setting(i) -> str:
        keys = sorted(shown.get((table.at[i, "stage"], table.at[i, "method"]), ()))
        return "; ".join(f"{k}={_pretty(flats[i].get(k, 'none'))}" for k in keys)

    return pd.Series([setting(i) for i in table.index], index=table.index, dtype=object)


def _pretty(canon: str) -> str:
    """``'0.2'`` stays, ``'8.0'`` -> ``'8'``."""
    try:
        f = float(canon)
    except ValueError:
        return canon
    return str(int(f)) if f.is_integer() else canon


pretty = _pretty


def metric_names(table: pd.DataFrame) -> list[str]:
    """The numeric measurement columns of a results table with at least one value."""
    fixed = set(ID_COLUMNS) | set(PROTOCOL_COLUMNS) | set(RUN_ID_COLUMNS) | set(DETAIL_COLUMNS)
    names = [c for c in table.columns if c not in fixed and not (schema.is_protocol_param(c) or c.startswith("_"))
             and table[c].notna().any()]
    return sorted(set(names) | {m for m in PRUNE_METRICS if m in table and table[m].notna().any()})


_SIDE_GROUPS = (schema.G_MODEL, schema.G_SPEED, schema.G_NLL, schema.G_PPL_TOKENS, schema.G_PPL_WINDOWS)


def _order_columns(table: pd.DataFrame, details: bool = False) -> pd.DataFrame:
    fixed = set(ID_COLUMNS) | set(PROTOCOL_COLUMNS) | set(RUN_ID_COLUMNS) | {PRUNE_PARAMS}
    metrics = [c for c in table.columns if c not in fixed and not (schema.is_protocol_param(c) or c.startswith("_"))]
    rank = lambda c: (0 if schema.is_ppl(c) else 2 if schema.in_group(c, schema.G_ZEROSHOT) else  # noqa: E731
                      3 if schema.in_group(c, *_SIDE_GROUPS) or c == schema.M_EVAL_TIME else 1, c)
    protos = sorted(c for c in table.columns if schema.is_protocol_param(c))
    ordered = table[[*ID_COLUMNS, *sorted(metrics, key=rank), *PROTOCOL_COLUMNS, *protos, *RUN_ID_COLUMNS]]
    if not details:
        return ordered
    extra = {c: table[f"_diag:{c}"] for c in DETAIL_COLUMNS[1:]}
    return ordered.assign(**{PRUNE_PARAMS: table[PRUNE_PARAMS]}, **extra)


def _sort_rows(table: pd.DataFrame) -> pd.DataFrame:
    stage_rank = table["stage"].map({s: i for i, s in enumerate(STAGE_ORDER)})
    variant_rank = (table["variant"] != "Base").astype(int)
    dense_first = (table["method"] != schema.LABEL_DENSE).astype(int)
    keys = pd.DataFrame({"f": table["family"].fillna(""), "v": variant_rank, "a": table[ALIAS],
                         "d": dense_first, "k": table[RATIO_KIND], "m": table["method"], "r": table[RATIO].fillna(-1),
                         "s": stage_rank, "t": table["setting"]})
    return table.loc[keys.sort_values(list(keys.columns), kind="stable").index].reset_index(drop=True)


def results_table(experiments=None, include_failed: bool = False, *, notes: list[str] | None = None,
                  details: bool = False) -> pd.DataFrame:
    """One row per evaluated model configuration (see the module docstring for the join).

    Columns: model_alias, family, variant, method (``dense`` for unpruned), pruning_ratio (the
    target of the run's ratio kind; 0 for dense), ratio_kind (schema.RATIO_*), achieved_ratio, reconstruct, stage (dense / pruned / pruned+LoRA /
    dense+LoRA), setting (params telling apart configurations that share all of those), params_after
    (the prune run's metric; dense: the eval's ``model/params``), every metric of the eval run under
    its own name (``ppl/<dataset>``, ``<task>/acc``, ``<task>/acc_norm``, ``zeroshot/mean_acc``,
    ``model/params``, ...), the protocol (ppl_seq_len, num_fewshot, acc_convention, task_measures,
    tasks_run, limit, ``ppl_protocol/<dataset>``), and prune_run_id, finetune_run_id, eval_run_id,
    n_evals (evals of this configuration; the latest is kept), eval_start_time, experiment,
    search_run_id (the sweep that made the prune run, if any), model_path. ``notes`` (a list) receives one line per eval run left out and why.

    ``details`` adds DETAIL_COLUMNS: ``prune_params`` (the prune run's params as logged, a dict,
    without the ones that change neither model nor measurement), the prune run's gradient
    diagnosis (``grad_norm_ratio``, ``grad_mean_ratio``, ``num_extreme_pruning_layers``,
    ``mean_ratio``) and ``ppl_datasets_run`` (the eval's perplexity datasets in order).
    """
    notes = [] if notes is None else notes
    frame = runs_frame(experiments, include_failed=True)
    evals = frame[frame["stage"] == schema.STAGE_EVAL]
    if not include_failed:
        evals = evals[evals["status"] == "FINISHED"]
    lookup = _lookup(frame) if not evals.empty else {}
    rows = []
    for _, ev in evals.iterrows():
        chain = _chain(ev, lookup)
        if isinstance(chain, str):
            notes.append(f"eval run {ev['run_id']} left out: {chain}")
            continue
        stage, prune, ft = chain
        bad = [r for r in (prune, ft) if r is not None and r["status"] != "FINISHED"]
        if bad and not include_failed:
            notes.append(f"eval run {ev['run_id']} left out: its {bad[0]['stage']} run "
                         f"{bad[0]['run_id']} is {bad[0]['status']}")
            continue
        rows.append(_joined_row(ev, stage, prune, ft))
    if not rows:
        return pd.DataFrame(columns=[*ID_COLUMNS, *PROTOCOL_COLUMNS, *RUN_ID_COLUMNS,
                                     *(DETAIL_COLUMNS if details else [])])
    table = _dedup(pd.DataFrame(rows))
    table["setting"] = _settings(table)
    return _sort_rows(_order_columns(table, details))
