"""The one selection rule of the toolkit: which configuration is *best*.

Used by every tool that names a best (``search``'s ``best_config.json``, ``analysis.consolidate``,
``analysis.cross_model``), so the same store always gives the same answer:

1. Configurations are compared only within a **group**: the same model, the same stage
   (``pruned`` or ``pruned+LoRA``), the same target ratio of the same kind (structured: fraction of
   prunable parameters removed; sparsity: fraction of projection weights zeroed — never compared
   with each other; a study with several ratios has a best per ratio), evaluated under the same
   protocol.
2. **Default** (``--select_by auto``): the highest ``zeroshot/mean_acc`` (mean zero-shot score
   under the logged acc convention) wins; ties are broken by the lowest perplexity on the first
   perplexity dataset of the eval runs (``ppl_datasets_run``). When no configuration of a group
   has a zero-shot score (e.g. ``--tasks none``) the group is ranked by that perplexity alone.
3. **Override** (``--select_by <metric>:max|min``, e.g. ``ppl/wikitext2:min``): that metric
   decides; ties are broken by the default's keys (``zeroshot/mean_acc`` max, then the first
   perplexity, min).
4. Configurations without the deciding metric are **excluded** (counted in a note), never ranked
   as if they were worst or best. A group where no configuration has it has *no best*, with the
   reason. Remaining exact ties go to the configuration evaluated first (then the lower run id),
   and the note says the values were tied.

The rule is logged (``selection_rule`` param) wherever a best is chosen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pandas as pd

from tracking import UserError, schema

AUTO = "auto"
ACC = schema.M_ZS_MEAN
MAX, MIN = "max", "min"
STAGES = (schema.LABEL_PRUNED, schema.LABEL_PRUNED_LORA)   # the stages a best is chosen in


@dataclass(frozen=True)
class Key:
    """One sort key: a metric and the direction that is better."""
    metric: str
    direction: str   # max | min

    def text(self) -> str:
        return f"{'highest' if self.direction == MAX else 'lowest'} {self.metric}"


@dataclass(frozen=True)
class Rule:
    """The selection rule: the default, or ``metric:direction`` given by the user."""
    select_by: str = AUTO
    override: Key | None = None

    @classmethod
    def parse(cls, text: str | None) -> "Rule":
        """``auto`` / None -> the default; ``<metric>:max|min`` -> an override."""
        text = (text or AUTO).strip()
        if text.lower() in (AUTO, "", "none", "default"):
            return cls()
        metric, sep, direction = text.rpartition(":")
        if not sep or not metric or direction.lower() not in (MAX, MIN):
            raise UserError(f"select_by '{text}' is not <metric>:max or <metric>:min",
                            "write e.g. zeroshot/mean_acc:max or ppl/wikitext2:min (or auto)")
        return cls(text, Key(metric.strip(), direction.lower()))

    @property
    def is_default(self) -> bool:
        return self.override is None

    def keys(self, ppl: str | None) -> list[Key]:
        """The sort keys in order for a group whose first perplexity metric is ``ppl``."""
        default = [Key(ACC, MAX)] + ([Key(ppl, MIN)] if ppl else [])
        if self.override is None:
            return default
        return [self.override] + [k for k in default if k.metric != self.override.metric]

    def describe(self) -> str:
        """The rule in words (logged as the ``selection_rule`` param)."""
        scope = ("compared within the same model, stage (pruned / pruned+LoRA), target ratio (of one kind: "
                 "structured or sparsity) and eval protocol")
        ties = "remaining exact ties: the configuration evaluated first"
        if self.override is None:
            return (f"best = highest {ACC} (mean zero-shot score under the logged acc convention); ties and "
                    f"groups without zero-shot scores: lowest perplexity on the first perplexity dataset of "
                    f"the eval (ppl_datasets_run); configurations without the deciding metric are excluded; "
                    f"{ties}; {scope}")
        return (f"best = {self.override.text()} (--select_by {self.select_by}); ties: highest {ACC}, then lowest "
                f"perplexity on the first perplexity dataset; configurations without {self.override.metric} are "
                f"excluded; {ties}; {scope}")


@dataclass
class Best:
    """The winner of one group."""
    group: dict                 # group column -> value
    row: pd.Series              # the winning row of the input frame
    keys: list[Key]             # the keys the group was ranked by
    won_by: list[str]           # the metrics that separated it from the runner-up (all tied: every key)
    candidates: int             # configurations ranked
    excluded: int               # configurations of the group without the deciding metric
    tied: int                   # configurations equal to it on every key (1 = no tie)
    fallback: bool = False      # default rule, no zero-shot score in the group: ranked by perplexity

    def metrics(self) -> dict[str, float]:
        """The values it won with (every key it was ranked by that it has)."""
        return {k.metric: float(self.row[k.metric]) for k in self.keys
                if k.metric in self.row and not _missing(self.row[k.metric])}


@dataclass
class Selection:
    rule: Rule
    best: list[Best] = field(default_factory=list)
    missing: list[tuple[dict, str]] = field(default_factory=list)   # (group, why it has no best)
    candidates: int = 0
    excluded: int = 0
    notes: list[str] = field(default_factory=list)

    def frame(self) -> pd.DataFrame:
        """One row per best: the input row plus ``won_by``, ``candidates``, ``excluded``, ``tied``."""
        if not self.best:
            return pd.DataFrame()
        rows = [{**b.row.to_dict(), "won_by": ",".join(b.won_by), "candidates": b.candidates,
                 "excluded": b.excluded, "tied": b.tied} for b in self.best]
        return pd.DataFrame(rows)

    def of(self, **group) -> Best | None:
        """The best of the group with these column values (None when it has none)."""
        for b in self.best:
            if all(_same(b.group.get(k), v) for k, v in group.items()):
                return b
        return None


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, float(b), rel_tol=0, abs_tol=1e-12)
    return a == b


def first_ppl_metric(rows: pd.DataFrame) -> str | None:
    """``ppl/<first dataset>`` of the eval runs of ``rows`` (``ppl_datasets_run``, the most common
    first entry), else the first ``ppl/*`` column with values (alphabetically)."""
    if schema.P_PPL_RUN in rows:
        firsts = [str(v).split(",")[0] for v in rows[schema.P_PPL_RUN] if isinstance(v, str) and v]
        if firsts:
            first = pd.Series(firsts).value_counts(sort=True).index[0]
            name = schema.ppl_metric(first)
            if name in rows and rows[name].notna().any():
                return name
    cols = sorted(c for c in rows.columns if schema.is_ppl(str(c)) and rows[c].notna().any())
    return cols[0] if cols else None


def rank(rows: pd.DataFrame, keys: list[Key], order: Sequence[str] = ()) -> pd.DataFrame:
    """Rows sorted best first by ``keys`` (missing values last), then by ``order`` (ascending)."""
    sort = pd.DataFrame(index=rows.index)
    for i, k in enumerate(keys):
        values = pd.to_numeric(rows[k.metric], errors="coerce") if k.metric in rows else pd.Series(
            math.nan, index=rows.index)
        values = values.round(12) * (-1 if k.direction == MAX else 1)
        sort[f"k{i}"] = values.fillna(math.inf)
    for j, c in enumerate(order):
        if c in rows:
            col = rows[c]
            numeric = pd.api.types.is_numeric_dtype(col) or pd.api.types.is_datetime64_any_dtype(col)
            sort[f"o{j}"] = col if numeric else col.astype(str)
    sort["_pos"] = range(len(rows))
    return rows.loc[sort.sort_values(list(sort.columns), kind="stable").index]


def _won_by(ranked: pd.DataFrame, keys: list[Key]) -> tuple[list[str], int]:
    """(metrics that separated the winner from the runner-up, configurations tied with it)."""
    first = ranked.iloc[0]
    value = lambda row, k: None if k.metric not in row or _missing(row[k.metric]) else round(float(row[k.metric]), 12)  # noqa: E731
    tied = sum(all(value(r, k) == value(first, k) for k in keys) for _, r in ranked.iterrows())
    if len(ranked) == 1:
        return [keys[0].metric], 1
    second = ranked.iloc[1]
    used = []
    for k in keys:
        used.append(k.metric)
        if value(first, k) != value(second, k):
            return used, tied
    return used, tied


def select(frame: pd.DataFrame, rule: Rule, group: Sequence[str], *, order: Sequence[str] = (),
           protocol: Callable[[str, pd.Series], str] | None = None, label: Callable[[dict], str] | None = None
           ) -> Selection:
    """Apply ``rule`` to every group of ``frame`` (one row per configuration).

    ``group``: the columns a group shares (e.g. model path, stage, pruning ratio); ``order``: the
    final tie-break columns (ascending, e.g. eval start time, run id); ``protocol(metric, row)``:
    the measurement protocol of a metric for a row: rows whose protocols of the deciding metric
    differ form separate groups; ``label(group)``: the group's name in notes.
    """
    out = Selection(rule)
    label = label or (lambda g: ", ".join(f"{k}={v}" for k, v in g.items()))
    if frame.empty:
        return out
    if rule.override is not None and (rule.override.metric not in frame or frame[rule.override.metric].isna().all()):
        metrics = sorted(c for c in frame.columns if schema.is_ppl(str(c)) or c == ACC)
        out.notes.append(f"no configuration has {rule.override.metric} (--select_by {rule.select_by}): no best "
                         f"is chosen; metrics present include {', '.join(metrics) or 'none'}")
    for values, rows in frame.groupby(list(group), sort=False, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        g = dict(zip(group, values))
        parts = list(_by_protocol(rows, rule, protocol))
        if len(parts) > 1:
            out.notes.append(f"{label(g)}: evaluated under {len(parts)} protocols of the deciding metric; "
                             "configurations are compared within each (one best per protocol; tables show "
                             "the first)")
        for sub_label, sub in parts:
            _select_group(out, {**g, **({"protocol": sub_label} if sub_label else {})}, sub, rule, order, label)
    if out.excluded:
        out.notes.append(f"{out.excluded} configuration(s) without the deciding metric were excluded from the "
                         "selection")
    return out


def _by_protocol(rows: pd.DataFrame, rule: Rule, protocol):
    """Split a group by the protocol of its deciding metric (one part when it is unique)."""
    metric = rule.override.metric if rule.override else ACC
    if protocol is None:
        yield "", rows
        return
    texts = [protocol(metric, r) if not _missing(r.get(metric)) else "" for _, r in rows.iterrows()]
    distinct = [t for t in dict.fromkeys(texts) if t]
    if len(distinct) <= 1:
        yield "", rows
        return
    for i, t in enumerate(distinct):
        yield f"P{i + 1}: {t}", rows[[x == t for x in texts]]


def _select_group(out: Selection, g: dict, rows: pd.DataFrame, rule: Rule, order, label) -> None:
    ppl = first_ppl_metric(rows)
    keys = rule.keys(ppl)
    deciding = keys[0]
    has = rows[deciding.metric].notna() if deciding.metric in rows else pd.Series(False, index=rows.index)
    fallback = False
    if not has.any() and rule.is_default and ppl is not None:
        keys, fallback = keys[1:], True          # no zero-shot score in the group: perplexity decides
        deciding = keys[0]
        has = rows[deciding.metric].notna()
    out.candidates += int(has.sum())
    dropped = int((~has).sum())
    out.excluded += dropped
    if not has.any():
        why = f"no configuration has {deciding.metric}" + ("" if rule.is_default else f" (--select_by {rule.select_by})")
        if rule.is_default and ppl is None:
            why = f"no configuration has {ACC} or a perplexity"
        out.missing.append((g, why))
        out.notes.append(f"{label(g)}: no best ({why})")
        return
    ranked = rank(rows[has], keys, order)
    won_by, tied = _won_by(ranked, keys)
    best = Best(g, ranked.iloc[0], keys, won_by, int(has.sum()), dropped, tied, fallback)
    out.best.append(best)
    if fallback:
        out.notes.append(f"{label(g)}: no {ACC} in this group, best by {keys[0].text()}")
    if tied > 1:
        out.notes.append(f"{label(g)}: {tied} configurations tied on every key "
                         f"({', '.join(k.metric for k in keys)}); the one evaluated first is taken")


# ------------------------------------------------------------------------------ the best as JSON

def typed_value(text):
    """A logged param (a string) back to JSON: ``"128"`` -> 128, ``"0.2"`` -> 0.2, ``"true"`` ->
    True, ``"none"`` -> None; other text stays."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return None
    if not isinstance(text, str):
        return text
    low = text.strip().lower()
    if low in ("none", "null", ""):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


@dataclass
class BestConfig:
    """The best configuration of one group, as written to ``best_config.json`` /
    ``global_best_config.json`` / ``analysis_summary.json``."""
    model: str
    model_path: str
    family: str | None
    variant: str | None
    method: str
    pruning_ratio: float
    stage: str
    swept: dict            # the swept prune parameters and the values that won
    fixed: dict            # every other prune parameter of the run
    metrics: dict          # what it won with (the deciding metrics first) and its other measurements
    won_by: list
    candidates: int
    excluded: int
    tied: int
    prune_run_id: str | None
    eval_run_id: str | None
    finetune_run_id: str | None = None
    protocol: dict = field(default_factory=dict)   # metric -> how it was measured
    ratio_kind: str = schema.RATIO_STRUCTURED      # what pruning_ratio measures (schema.RATIO_KINDS)

    def to_dict(self) -> dict:
        from dataclasses import asdict
        return _json_safe(asdict(self))


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return _json_safe(obj.item())
        except (AttributeError, ValueError):
            return str(obj)
    return obj


def document(rule: Rule, bests: list[BestConfig], missing: list[tuple[dict, str]], notes: list[str]) -> dict:
    """The JSON document of a selection: the rule, one entry per best, the groups without one."""
    return _json_safe({schema.P_SELECTION_RULE: rule.describe(), schema.P_SELECT_BY: rule.select_by,
                       "best": [b.to_dict() for b in bests],
                       "no_best": [{"group": {k: str(v) for k, v in g.items()}, "reason": why} for g, why in missing],
                       "notes": list(notes)})
