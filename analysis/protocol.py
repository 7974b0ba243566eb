"""What a number of a results row means: the measurement protocol of a metric, read from the eval
run's params (shared by the pivots, the selection rule and the study tables)."""
from __future__ import annotations

import math

from tracking import schema


def is_none(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).lower() in ("none", "")


def _shots(row) -> str:
    n = row.get(schema.P_NUM_FEWSHOT)
    return "task-default-shot" if is_none(n) else f"{int(float(n))}-shot"


def _limit(row) -> str:
    lim = row.get(schema.P_LIMIT)
    return "" if is_none(lim) else f", limit {lim} docs per task (smoke test)"


def _scored(row, dataset: str) -> str:
    """``, 12 windows, 1,536 tokens scored`` from the eval's counts (when the store has them)."""
    parts = []
    for template, what in ((schema.M_PPL_WINDOWS, "windows"), (schema.M_PPL_TOKENS, "tokens scored")):
        n = row.get(schema.dataset_metric(template, dataset))
        if isinstance(n, (int, float)) and not is_none(n):
            parts.append(f"{int(n):,} {what}")
    return (", " + ", ".join(parts)) if parts else ""


def protocol_of(metric: str, row, counts: bool = False) -> str:
    """How ``metric`` of this results row was measured, from the eval run's params: perplexity:
    dataset [split], window length, stride, BOS (``counts``: also the windows and tokens scored,
    which differ between tokenizers, so they are left out where protocols are compared);
    zero-shot: shots, acc or acc_norm per task, convention, limit."""
    name = schema.parse(metric)
    kind, rest = name.group, name.key
    if kind in (schema.G_PPL, schema.G_NLL, schema.G_PPL_TOKENS, schema.G_PPL_WINDOWS):
        return ((row.get(schema.P_PPL_PROTOCOL.format(dataset=rest))
                 or f"{rest}, {row.get(schema.P_PPL_SEQ_LEN)}-token windows") + (_scored(row, rest) if counts else ""))
    if kind == schema.G_ZEROSHOT:
        return (f"{_shots(row)}, mean over tasks of the score per task ({row.get(schema.P_TASK_MEASURES)}; "
                f"convention {row.get(schema.P_ACC_CONVENTION)}){_limit(row)}")
    tasks = str(row.get(schema.P_TASKS_RUN) or "").split(",")
    if kind in tasks:
        return f"{kind} {rest} (lm-eval), {_shots(row)}{_limit(row)}"
    if kind == schema.G_SPEED:
        return str(row.get(schema.P_SPEED_PROTOCOL) or "speed protocol not recorded")
    return ""


def describe(metric: str) -> str:
    """A caption phrase for the metric, with the direction that is better."""
    name = schema.parse(metric)
    kind, rest = name.group, name.key
    if kind == schema.G_PPL:
        return f"Perplexity on {rest} (lower is better)"
    if metric == schema.M_ZS_MEAN:
        return "Mean zero-shot score (higher is better)"
    if rest in ("acc", "acc_norm"):
        norm = ", log-likelihood normalised by byte length" if rest == "acc_norm" else ""
        return f"{kind} accuracy ({rest}{norm}; higher is better)"
    if metric == schema.M_ACHIEVED_RATIO:
        return "Achieved fraction of prunable parameters removed"
    return metric


def lower_is_better(metric: str) -> bool:
    """Perplexity, NLL, latency, sizes and times: lower is better; scores and speeds: higher."""
    return schema.in_group(metric, schema.G_PPL, schema.G_NLL) or metric.endswith(("latency_ms_per_token", "_time_s", schema.M_PEAK_MEMORY,
                                                      "size_on_disk_mb", "param_bytes"))
