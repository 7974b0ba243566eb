"""Zero-shot multiple-choice accuracy through lm-eval, on the model already in memory.

Protocol: ``lm_eval.simple_evaluate`` on ``HFLM(pretrained=<model object>)`` (no reload, so a
pruned model is scored exactly as it sits in memory), ``num_fewshot`` examples (default 0),
optional ``limit`` (first N docs, or a fraction, per task: for smoke tests, not for reporting).
Per task we keep lm-eval's ``acc`` and ``acc_norm`` (log-likelihood per byte) where the task
has it. The *score* of a task, and the mean over tasks, follow a convention:

* ``literature`` (default): ``acc_norm`` for HellaSwag, ARC-Challenge and OpenBookQA (and our
  HellaSwag-style offline ``*_continuation`` tasks), ``acc`` for the others — as reported by
  LLM-Pruner and most structured-pruning papers.
* ``acc``: ``acc`` everywhere.  ``acc_norm``: ``acc_norm`` wherever a task has it.

The mean is over the requested tasks (a group counts once, with lm-eval's group score).
"""
from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from gqaprune.errors import UserError

STANDARD_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
NORM_TASKS = frozenset({"hellaswag", "arc_challenge", "openbookqa"})
CONVENTIONS = ("literature", "acc", "acc_norm")
# Chance level of a uniform guess (BoolQ's majority class is 62%; a guess is still 50%).
CHANCE = {"boolq": 0.5, "piqa": 0.5, "hellaswag": 0.25, "winogrande": 0.5, "arc_easy": 0.25,
          "arc_challenge": 0.25, "openbookqa": 0.25, "rte": 0.5}
MEASURES = ("acc", "acc_norm")


@dataclass(frozen=True)
class TaskScore:
    task: str
    measure: str | None          # the measure used for ``score`` (None: task has no accuracy)
    score: float | None
    acc: float | None = None
    acc_norm: float | None = None
    acc_stderr: float | None = None
    acc_norm_stderr: float | None = None
    n_samples: int | None = None
    chance: float | None = None


@dataclass
class ZeroShotResult:
    scores: list[TaskScore]
    mean: float | None           # mean of ``score`` over tasks that have one
    convention: str
    num_fewshot: int | None
    limit: float | int | None
    raw: dict = field(default_factory=dict)   # lm-eval ``results`` as returned (comma keys)

    def to_dict(self) -> dict:
        return {"scores": [asdict(s) for s in self.scores], "mean": self.mean,
                "convention": self.convention, "num_fewshot": self.num_fewshot,
                "limit": self.limit, "raw": self.raw}


def chosen_measure(task: str, available, convention: str = "literature",
                   preferred: dict[str, str] | None = None) -> str | None:
    """Which of acc / acc_norm scores ``task`` under ``convention`` (None if neither exists)."""
    if convention not in CONVENTIONS:
        raise UserError(f"unknown acc_convention '{convention}'", f"use one of {', '.join(CONVENTIONS)}")
    avail = set(available)
    if convention == "acc":
        want = "acc"
    elif convention == "acc_norm":
        want = "acc_norm"
    else:
        norm = task in NORM_TASKS or (preferred or {}).get(task) == "acc_norm"
        want = "acc_norm" if norm else "acc"
    if want in avail:
        return want
    return next((m for m in MEASURES if m in avail), None)


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def top_level(results: dict, group_subtasks: dict) -> list[str]:
    """Tasks the user asked for: result keys that are not a subtask of a group."""
    inner = {t for subs in group_subtasks.values() for t in subs}
    return [t for t in results if t not in inner]


def summarize(results: dict, n_samples: dict | None = None, group_subtasks: dict | None = None,
              convention: str = "literature", preferred: dict[str, str] | None = None,
              chance: dict[str, float] | None = None, num_fewshot=None, limit=None) -> ZeroShotResult:
    """lm-eval ``results`` ({task: {'acc,none': ..}}) -> per-task scores and their mean."""
    chance = {**CHANCE, **(chance or {})}
    scores = []
    for task in top_level(results, group_subtasks or {}):
        row = results[task]
        vals = {m: _num(row.get(f"{m},none")) for m in MEASURES}
        errs = {m: _num(row.get(f"{m}_stderr,none")) for m in MEASURES}
        measure = chosen_measure(task, [m for m, v in vals.items() if v is not None], convention, preferred)
        n = (n_samples or {}).get(task, {})
        scores.append(TaskScore(task, measure, vals.get(measure) if measure else None,
                                vals["acc"], vals["acc_norm"], errs["acc"], errs["acc_norm"],
                                n.get("effective") if isinstance(n, dict) else None, chance.get(task)))
    valid = [s.score for s in scores if s.score is not None]
    mean = sum(valid) / len(valid) if valid else None
    return ZeroShotResult(scores, mean, convention, num_fewshot, limit, results)


def numeric_results(results: dict) -> dict[str, dict[str, float]]:
    """Every numeric lm-eval value per task, keys as lm-eval writes them (``'acc,none'``)."""
    return {task: {k: float(v) for k, v in row.items() if _num(v) is not None and k != "sample_len"}
            for task, row in results.items()}


# ------------------------------------------------------------------------------ lm-eval

def go_offline() -> None:
    """Make ``datasets`` / ``huggingface_hub`` fail at once instead of retrying for minutes.

    Both libraries read the flag at import, so the already-imported modules are patched too.
    """
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets.config as dcfg
        dcfg.HF_HUB_OFFLINE = True
        dcfg.HF_DATASETS_OFFLINE = True
    except ImportError:
        pass
    try:
        import huggingface_hub.constants as hcfg
        hcfg.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def quiet_lm_eval() -> None:
    """lm-eval logs every config override at INFO; keep warnings and errors only."""
    import logging
    logging.getLogger("lm_eval").setLevel(logging.WARNING)


def task_manager(include_paths: list[str | Path], with_defaults: bool = True):
    """lm-eval's TaskManager. Indexing the ~10k built-in tasks takes seconds, so it is skipped
    when only our offline tasks are requested, and managers are reused within a process
    (``analysis.compare`` evaluates several models)."""
    quiet_lm_eval()
    return _manager(tuple(str(Path(p).resolve()) for p in include_paths), with_defaults)


@lru_cache(maxsize=8)
def _manager(paths: tuple[str, ...], with_defaults: bool):
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=list(paths) or None, include_defaults=with_defaults)


_OFFLINE_HINT = ("run where the Hugging Face hub is reachable (or with the dataset in the HF cache), "
                 "or use offline tasks: --tasks offline --task_corpus <text file> "
                 "(the demo model: --tasks demo_continuation,demo_cloze)")


def _is_offline_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return any(s in text for s in ("OfflineModeIsEnabled", "Couldn't reach", "ConnectionError",
                                   "offline", "Offline", "HF_HUB_OFFLINE", "Max retries"))


def check_tasks(manager, names: list[str]) -> None:
    """Fail before the model is loaded: unknown names, and datasets that cannot be loaded."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            raise UserError(f"unknown task '{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""),
                            "use lm-eval task names (lm-eval ls tasks), 'standard', or offline tasks "
                            "<corpus>_continuation / <corpus>_cloze with --task_corpus")
        try:
            manager.load([name])
        except Exception as exc:  # noqa: BLE001 - lm-eval/datasets raise many types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            if _is_offline_error(exc):
                raise UserError(f"task '{name}' needs its dataset from the Hugging Face hub, which is "
                                f"not reachable (offline: {first})", _OFFLINE_HINT) from exc
            raise UserError(f"task '{name}' could not be loaded: {first}",
                            "check the task name and its dataset") from exc


def evaluate_tasks(model, tokenizer, names: list[str], manager, *, batch_size: int = 8,
                   limit: float | int | None = None, num_fewshot: int | None = 0,
                   convention: str = "literature", preferred: dict[str, str] | None = None,
                   chance: dict[str, float] | None = None, seed: int = 0,
                   device: str = "cpu") -> ZeroShotResult:
    """Run lm-eval on the in-memory ``model`` and summarize (see the module docstring)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    quiet_lm_eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(names), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed)
    except (ConnectionError, OSError) as exc:
        if _is_offline_error(exc):
            raise UserError(f"a task dataset could not be fetched (offline: {str(exc).splitlines()[0][:200]})",
                            _OFFLINE_HINT) from exc
        raise
    return summarize(out["results"], out.get("n-samples"), out.get("group_subtasks"), convention,
                     preferred, chance, num_fewshot, limit)


def accuracy_figure(result: ZeroShotResult, title: str):
    """Bar per task (its score, measure in the label), chance level as a tick, mean as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in result.scores if s.score is not None]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 1.5), 3.6))
    xs = range(len(rows))
    ax.bar(xs, [s.score for s in rows], color="#4C72B0")
    for x, s in zip(xs, rows):
        if s.chance is not None:
            ax.hlines(s.chance, x - 0.4, x + 0.4, colors="#C44E52", linestyles="--",
                      label="chance" if x == 0 else None)
        ax.text(x, s.score + 0.01, f"{s.score:.3f}", ha="center", va="bottom", fontsize=8)
    if result.mean is not None:
        ax.axhline(result.mean, color="#55A868", lw=1, label=f"mean {result.mean:.3f}")
    ax.set_xticks(list(xs), [f"{s.task}\n({s.measure})" for s in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.18)                      # headroom: the legend sits above 1.0
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper center", ncol=2, frameon=False)
    fig.tight_layout()
    return fig
