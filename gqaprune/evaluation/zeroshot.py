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
Tasks without acc / acc_norm (generative: SQuAD v2, GSM8K) are reported separately as
:class:`GenerativeScore` (exact match, F1, every lm-eval value) and never enter the mean.

Data: lm-eval's own task definitions, pointed at local copies. With a data dir
(``gqaprune.datadir``) holding a copy of a task's dataset (its ``dataset_path`` /
``dataset_name`` from the task YAML, or the ``DATASET_PATH`` of a Python task), the task is
built from its own config with ``dataset_path`` / ``dataset_name`` / ``dataset_kwargs``
overridden to read the copy's files; every :class:`TaskSource` says which copy (path, hash).
Without a copy the task loads from the hub (or the HF cache, offline). Groups and tags are
passed through unchanged (hub / HF cache): name their tasks to use local copies.
"""
from __future__ import annotations

import difflib
import inspect
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from gqaprune.datadir import DataCopy, DataDir, DatasetRef
from gqaprune.errors import UserError

STANDARD_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
NORM_TASKS = frozenset({"hellaswag", "arc_challenge", "openbookqa"})
CONVENTIONS = ("literature", "acc", "acc_norm")
# Chance level of a uniform guess (BoolQ's majority class is 62%; a guess is still 50%).
CHANCE = {"boolq": 0.5, "piqa": 0.5, "hellaswag": 0.25, "winogrande": 0.5, "arc_easy": 0.25,
          "arc_challenge": 0.25, "openbookqa": 0.25, "rte": 0.5}
MEASURES = ("acc", "acc_norm")
# Generative tasks of the standard study (lm-eval names): exact match / F1, never in the mean.
GENERATIVE_TASKS = ("squadv2", "gsm8k")
# lm-eval keys of the headline exact match / F1, first present wins (gsm8k: the "#### <n>"
# answer format, strict-match; its flexible-extract value stays in ``metrics``).
EM_KEYS = ("exact_match,strict-match", "exact_match,none", "exact,none", "exact_match,flexible-extract")
F1_KEYS = ("f1,none",)
# `evaluate` metric modules a task loads when it aggregates (from HF_MODULES_CACHE offline).
EVALUATE_METRICS = {"squadv2": "squad_v2"}
# dataset_path values that name a `datasets` builder for local files, not a hub dataset.
LOCAL_BUILDERS = frozenset({"json", "parquet", "csv", "text", "arrow", "pandas"})


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


@dataclass(frozen=True)
class GenerativeScore:
    """A task without acc / acc_norm (SQuAD v2, GSM8K, ...): reported beside, never averaged."""
    task: str
    exact_match: float | None        # first of EM_KEYS present
    f1: float | None                 # first of F1_KEYS present
    metrics: dict[str, float] = field(default_factory=dict)   # every numeric lm-eval value
    n_samples: int | None = None

    def row(self) -> dict:
        """One flat table row: task, exact_match, f1, n_samples, then every lm-eval value."""
        return {"task": self.task, "exact_match": self.exact_match, "f1": self.f1,
                "n_samples": self.n_samples, **self.metrics}


@dataclass(frozen=True)
class TaskSource:
    """Where a task's documents came from."""
    task: str
    dataset: str | None          # hub id [config] in lm-eval's definition (None: not a hub dataset)
    copy: DataCopy | None        # the local copy read; None: hub / HF cache, or local task files

    def describe(self) -> str:
        if self.copy is not None:
            return f"{self.task}: {self.copy.describe()}"
        return f"{self.task}: " + (f"{self.dataset} from the hub (or its cache)" if self.dataset
                                   else "task files / group (as defined)")

    def to_dict(self) -> dict:
        return {"task": self.task, "dataset": self.dataset,
                "copy": self.copy.to_dict() if self.copy else None, "describe": self.describe()}


@dataclass
class ZeroShotResult:
    scores: list[TaskScore]      # every task; generative ones have measure None (not in the mean)
    mean: float | None           # mean of ``score`` over tasks that have one
    convention: str
    num_fewshot: int | None
    limit: float | int | None
    raw: dict = field(default_factory=dict)   # lm-eval ``results`` as returned (comma keys)
    generative: list[GenerativeScore] = field(default_factory=list)   # never in ``mean``
    sources: list[TaskSource] = field(default_factory=list)

    @property
    def accuracy(self) -> list[TaskScore]:
        """The tasks scored by acc / acc_norm (the ones the mean is over)."""
        return [s for s in self.scores if s.measure is not None]

    def to_dict(self) -> dict:
        return {"scores": [asdict(s) for s in self.scores], "mean": self.mean,
                "generative": [g.row() for g in self.generative],
                "convention": self.convention, "num_fewshot": self.num_fewshot,
                "limit": self.limit, "sources": [s.to_dict() for s in self.sources], "raw": self.raw}


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
    """lm-eval ``results`` ({task: {'acc,none': ..}}) -> per-task scores and their mean.

    Every task gets a :class:`TaskScore` (tasks without acc / acc_norm: ``measure`` None, never
    in the mean); those also get a :class:`GenerativeScore` with their own metrics (exact
    match, F1, ...) in ``result.generative``.
    """
    chance = {**CHANCE, **(chance or {})}
    scores, generative = [], []
    for task in top_level(results, group_subtasks or {}):
        row = results[task]
        vals = {m: _num(row.get(f"{m},none")) for m in MEASURES}
        errs = {m: _num(row.get(f"{m}_stderr,none")) for m in MEASURES}
        n = (n_samples or {}).get(task, {})
        n_eff = n.get("effective") if isinstance(n, dict) else None
        if all(v is None for v in vals.values()):
            nums = numeric_results({task: row})[task]
            generative.append(GenerativeScore(task, _first(nums, EM_KEYS), _first(nums, F1_KEYS), nums, n_eff))
        measure = chosen_measure(task, [m for m, v in vals.items() if v is not None], convention, preferred)
        scores.append(TaskScore(task, measure, vals.get(measure) if measure else None,
                                vals["acc"], vals["acc_norm"], errs["acc"], errs["acc_norm"],
                                n_eff, chance.get(task)))
    valid = [s.score for s in scores if s.score is not None]
    mean = sum(valid) / len(valid) if valid else None
    return ZeroShotResult(scores, mean, convention, num_fewshot, limit, results, generative)


def _first(values: dict[str, float], keys) -> float | None:
    return next((values[k] for k in keys if k in values), None)


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
    """lm-eval logs every config override at INFO; keep warnings and errors only. Its results record
    the git commit of the working directory by running ``git describe`` with git's stderr open, so
    outside a repository every evaluation prints "fatal: not a git repository": ask quietly."""
    import logging
    import subprocess

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    from lm_eval import evaluator

    def git_hash():
        try:
            out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
            return out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None
    evaluator.get_git_commit_hash = git_hash


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


# ------------------------------------------------------------------------------ task data
# lm-eval internals are touched here only: the task index (Entry: kind, yaml_path) and the
# factory that merges a task's YAML with overrides, exactly as lm-eval builds a task itself.

def _entry(manager, name: str):
    entry = manager.task_index.get(name)
    if entry is not None and not hasattr(entry, "kind"):
        raise UserError("local task copies need lm-eval >= 0.4.13 (its task index changed)",
                        "pip install -U 'lm-eval>=0.4.13,<0.5'")
    return entry


def _leaf_config(manager, name: str) -> dict | None:
    """The full config of a leaf task (YAML with includes and functions resolved), else None."""
    from lm_eval.tasks._index import Kind
    entry = _entry(manager, name)
    if entry is None or entry.kind not in (Kind.TASK, Kind.PY_TASK):
        return None
    return manager._factory._load_full_config(entry, None)


def _dataset_ref(cfg: dict | None) -> DatasetRef | None:
    """The hub dataset a task config reads (None: local builder files or no dataset)."""
    if cfg is None:
        return None
    path, name = cfg.get("dataset_path"), cfg.get("dataset_name")
    cls = cfg.get("class")
    if cls is not None and path is None:       # Python task: class attributes
        path, name = getattr(cls, "DATASET_PATH", None), getattr(cls, "DATASET_NAME", None)
    if not path or path in LOCAL_BUILDERS or Path(str(path)).expanduser().exists():
        return None
    return DatasetRef(str(path), name)


def task_refs(manager, names: list[str]) -> dict[str, DatasetRef | None]:
    """Hub dataset of each task, read from lm-eval's own definitions (None: group, tag, local)."""
    return {n: _dataset_ref(_leaf_config(manager, n)) for n in names}


def _py_task(cfg: dict, name: str, load_kwargs: dict):
    """A Python-defined task (e.g. squadv2) reading ``load_kwargs``: its class ignores config
    overrides, so a subclass replaces only ``download``; prompts and metrics stay lm-eval's."""
    import datasets

    cls = cfg["class"]

    def download(self, dataset_kwargs=None, **kwargs):
        self.dataset = datasets.load_dataset(**load_kwargs)

    local = type(cls.__name__, (cls,), {"download": download, "__module__": cls.__module__})
    obj = local(config=cfg) if "config" in inspect.signature(cls.__init__).parameters else local()
    if hasattr(obj, "config") and hasattr(obj.config, "task"):
        obj.config.task = name
    return obj


def _local_task(manager, name: str, cfg: dict, copy: DataCopy | None, cache_dir):
    """Task object for ``name`` reading ``copy`` (or the hub with ``cache_dir``)."""
    if copy is not None:
        kw = copy.load_kwargs(cache_dir=cache_dir)
        overrides = {"dataset_path": kw.pop("path"), "dataset_name": None, "dataset_kwargs": kw}
    else:
        overrides = {"dataset_kwargs": {**(cfg.get("dataset_kwargs") or {}), "cache_dir": str(cache_dir)}}
    if "class" in cfg:
        ref = _dataset_ref(cfg)
        load = ({"path": overrides["dataset_path"], **overrides["dataset_kwargs"]} if copy is not None
                else {"path": ref.repo, "name": ref.config, **overrides["dataset_kwargs"]})
        return _py_task(cfg, name, load)
    return manager._factory._build_task(_entry(manager, name), overrides)


def task_specs(manager, names: list[str], data_dir: DataDir | None = None):
    """What to hand ``lm_eval.simple_evaluate``: a task name, or a Task built from lm-eval's
    own config with its dataset pointed at the local copy -> (specs, sources).

    Builds (and so loads the data of) tasks that read a local copy or a cache dir.
    """
    dd = data_dir or DataDir.from_env()
    specs, sources = [], []
    for name in names:
        cfg = _leaf_config(manager, name)
        ref = _dataset_ref(cfg)
        copy = dd.find(ref) if ref is not None else None
        sources.append(TaskSource(name, ref.label() if ref else None, copy))
        if ref is None or (copy is None and dd.cache_dir is None):
            specs.append(name)
        else:
            specs.append(_local_task(manager, name, cfg, copy, dd.cache_dir))
    return specs, sources


def check_tasks(manager, names: list[str], data_dir: DataDir | None = None) -> list[TaskSource]:
    """Fail before the model is loaded: unknown names, and datasets that cannot be loaded.

    Returns where each task's data comes from (local copy with path and hash, or the hub).
    """
    dd = data_dir or DataDir.from_env()
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            raise UserError(f"unknown task '{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""),
                            "use lm-eval task names (lm-eval ls tasks), 'standard', or offline tasks "
                            "<corpus>_continuation / <corpus>_cloze with --task_corpus")
    sources = []
    for name in names:
        try:
            specs, found = task_specs(manager, [name], dd)
            manager.load(specs)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - lm-eval/datasets raise many types
            raise _load_error(name, exc, manager, dd) from exc
        sources += found
    for name in names:
        if name in EVALUATE_METRICS:
            check_metric(name, EVALUATE_METRICS[name])
    return sources


def check_metric(task: str, metric: str) -> None:
    """A task scored by an ``evaluate`` module (squadv2: squad_v2) needs it cached or the hub:
    fail before any generation instead of after it."""
    try:
        import evaluate
        evaluate.load(metric)
    except Exception as exc:  # noqa: BLE001 - evaluate raises FileNotFoundError / ConnectionError
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"task '{task}' is scored with the `evaluate` metric '{metric}', which is not "
                        f"cached here and cannot be fetched ({first})",
                        "run python -m prune_entry.fetch_data where there is internet (it caches the "
                        "metric in HF_MODULES_CACHE, ~/.cache/huggingface/modules) and make that folder "
                        "visible to this node") from exc


def _load_error(name: str, exc: BaseException, manager, dd: DataDir) -> UserError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    if not _is_offline_error(exc):
        return UserError(f"task '{name}' could not be loaded: {first}", "check the task name and its dataset")
    ref = _dataset_ref(_leaf_config(manager, name))
    if dd.root is not None and ref is not None:
        return UserError(f"task '{name}' needs {ref.label()}: no local copy at {dd.expected(ref)} and the "
                         f"Hugging Face hub is not reachable (offline: {first})",
                         "fetch it where there is internet (python -m prune_entry.fetch_data --to DIR) "
                         "and copy the folder there")
    return UserError(f"task '{name}' needs its dataset from the Hugging Face hub, which is "
                     f"not reachable (offline: {first})",
                     _OFFLINE_HINT + "; or local copies: --data_dir DIR from python -m prune_entry.fetch_data")


def evaluate_tasks(model, tokenizer, names: list[str], manager, *, batch_size: int = 8,
                   limit: float | int | None = None, num_fewshot: int | None = 0,
                   convention: str = "literature", preferred: dict[str, str] | None = None,
                   chance: dict[str, float] | None = None, seed: int = 0,
                   device: str = "cpu", data_dir: DataDir | None = None) -> ZeroShotResult:
    """Run lm-eval on the in-memory ``model`` and summarize (see the module docstring).

    ``data_dir`` (None: ``DataDir.from_env()``): tasks whose dataset has a local copy there
    read it; ``result.sources`` says which copy each task used.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    quiet_lm_eval()
    specs, sources = task_specs(manager, list(names), data_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=specs, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed)
    except (ConnectionError, OSError) as exc:
        if _is_offline_error(exc):
            raise UserError(f"a task dataset could not be fetched (offline: {str(exc).splitlines()[0][:200]})",
                            _OFFLINE_HINT) from exc
        raise
    result = summarize(out["results"], out.get("n-samples"), out.get("group_subtasks"), convention,
                       preferred, chance, num_fewshot, limit)
    result.sources = sources
    return result


def score_stderr(s: TaskScore) -> float | None:
    """lm-eval's standard error of the measure the task is scored by (None where it gives none)."""
    return {"acc": s.acc_stderr, "acc_norm": s.acc_norm_stderr}.get(s.measure)


def accuracy_figure(result: ZeroShotResult, title: str):
    """Bar per task (its score ± lm-eval's standard error, measure in the label), chance level as
    a tick, mean as a line; the legend right of the data."""
    from gqaprune.plots import legend_outside, plt, set_title

    rows = [s for s in result.scores if s.score is not None]
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(rows) + 3.0), 3.6))
    xs = range(len(rows))
    errs = [score_stderr(s) for s in rows]
    ax.bar(xs, [s.score for s in rows], color="#4C72B0",
           yerr=[e if e is not None else 0.0 for e in errs], capsize=3, ecolor="#333333")
    for x, s, e in zip(xs, rows, errs):
        if s.chance is not None:
            ax.hlines(s.chance, x - 0.4, x + 0.4, colors="#C44E52", linestyles="--",
                      label="chance" if x == 0 else None)
        label = f"{s.score:.3f}" + (f"\n± {e:.3f}" if e is not None else "")
        ax.text(x, s.score + (e or 0.0) + 0.01, label, ha="center", va="bottom", fontsize=7)
    if result.mean is not None:
        ax.axhline(result.mean, color="#55A868", lw=1, label=f"mean {result.mean:.3f}")
    ax.set_xticks(list(xs), [f"{s.task}\n({s.measure})" for s in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.3)                       # headroom: the two-line value labels sit above the bars
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("accuracy")
    set_title(ax, title, fontsize=9)
    legend_outside(ax, fontsize=7)
    fig.tight_layout()
    return fig
