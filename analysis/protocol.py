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


def protocol_of(metric: str, row) -> str:
    """How ``metric`` of this results row was measured, from the eval run's params."""
    kind, _, rest = metric.partition("/")
    if kind in ("ppl", "nll", "ppl_tokens"):
        return (row.get(schema.P_PPL_PROTOCOL.format(dataset=rest))
                or f"{rest}, {row.get(schema.P_PPL_SEQ_LEN)}-token windows")
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


def lower_is_better(metric: str) -> bool:
    """Perplexity, NLL, latency, sizes and times: lower is better; scores and speeds: higher."""
    kind = schema.parse(metric).group or ""
    return kind in ("ppl", "nll") or metric.endswith(("latency_ms_per_token", "_time_s", schema.M_PEAK_MEMORY,
                                                      "size_on_disk_mb", "param_bytes"))
