"""The eval config tree (perplexity, zero-shot, speed) and what it expands to.

Flags of ``prune_entry/evaluate.py`` are generated from :class:`EvalConfig`; the helpers below
turn its dataset / task lists into concrete sources and task names (no model needed), so bad
input fails before anything loads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from gqaprune import data
from gqaprune.config import Section, knob
from gqaprune.errors import UserError
from gqaprune.evaluation import tasks as offline
from gqaprune.evaluation import zeroshot
from gqaprune.datadir import DataDirConfig
from gqaprune.loading import DEMO_ALIAS, RuntimeConfig

BOS_CHOICES = ("auto", "true", "false")


@dataclass(frozen=True)
class PplConfig(Section):
    """perplexity (one held-out token stream in windows; protocol logged per dataset)"""
    ppl_datasets: str = knob("auto", f"comma-separated: auto, none, {', '.join(sorted(data.SOURCES))}, a file "
                             "path or name=path; auto: demo for the demo model, else wikitext2,ptb")
    ppl_seq_len: int = knob(128, "window length (2048 is common for unstructured pruning)", low=2,
                            fix="pass e.g. 128")
    ppl_stride: int | None = knob(None, "none: non-overlapping windows; else a sliding window (<= ppl_seq_len)")
    ppl_bos: str = knob("false", "false: the literature's protocol (one token stream, non-overlapping windows, "
                        "no BOS inserted; Wanda / SparseGPT / LLM-Pruner); true: a BOS before every window; "
                        "auto: a BOS if the tokenizer has one",
                        choices=BOS_CHOICES, fix="pass one of auto, true, false")
    ppl_nsamples: int | None = knob(None, "cap on windows per dataset")
    ppl_split: str = knob("test", "hub split; local files: any split but train = the held-out 10%")

    def __post_init__(self):
        object.__setattr__(self, "ppl_bos", str(self.ppl_bos).lower())
        super().__post_init__()

    def check(self) -> None:
        if self.ppl_stride is not None and not 0 < self.ppl_stride <= self.ppl_seq_len:
            raise UserError(f"ppl_stride {self.ppl_stride} must be in (0, ppl_seq_len={self.ppl_seq_len}]",
                            "use none for non-overlapping windows or a stride <= ppl_seq_len")

    def bos_for(self, tokenizer) -> bool:
        if self.ppl_bos == "auto":
            return tokenizer.bos_token_id is not None
        return self.ppl_bos == "true"


@dataclass(frozen=True)
class ZeroShotConfig(Section):
    """zero-shot tasks (lm-eval on the model in memory; offline corpus tasks)"""
    tasks: str = knob("auto", "comma-separated: auto, none, standard, offline, lm-eval task names, "
                      "<corpus>_continuation, <corpus>_cloze; auto: standard (demo model: offline)")
    task_corpus: str | None = knob(None, "comma-separated [name=]text file(s) for the offline tasks")
    task_choices: int = knob(4, "choices per offline item", low=2, fix="pass e.g. 4")
    task_items: int = knob(500, "max items per offline task", low=1)
    limit: int | float | None = knob(None, "docs per task (int) or a fraction (smoke tests only)",
                                     low=0.0, low_open=True, fix="pass a positive number of docs or a fraction")
    num_fewshot: int | None = knob(0, "few-shot examples; none = each task's default", low=0,
                                   fix="pass 0 for zero-shot")
    acc_convention: str = knob("literature", "which measure a task's score uses",
                               choices=zeroshot.CONVENTIONS)

    def __post_init__(self):
        if isinstance(self.limit, float) and self.limit >= 1 and self.limit == int(self.limit):
            object.__setattr__(self, "limit", int(self.limit))    # "5.0" docs -> 5
        super().__post_init__()


@dataclass(frozen=True)
class SpeedConfig(Section):
    """generation speed (random prompts, warm-up, median of repeats)"""
    speed: bool = knob(True, "measure prefill / decode speed")
    speed_prompt_len: int = knob(128, "prompt tokens", low=1)
    speed_new_tokens: int = knob(64, "greedy decode steps", low=0, fix="pass e.g. 64")
    speed_batch_size: int = knob(1, "prompts per pass", low=1)
    speed_repeats: int = knob(3, "timed passes (the median is reported)", low=1)


@dataclass(frozen=True)
class EvalConfig(Section):
    """eval: perplexity, zero-shot accuracy, model size and speed"""
    model_uri: str = knob(DEMO_ALIAS, "alias, HF id, local dir, runs:/ or models:/ URI, or a prune/finetune run id")
    models_file: str | None = knob(None, "aliases file (JSON/YAML)")
    batch_size: int = knob(8, "lm-eval and perplexity batch", low=1)
    seed: int = knob(0, "seed of offline tasks, speed prompts and lm-eval")
    parent_run_id: str | None = knob(None, "link this run as a child of another (pipelines)")
    output_dir: str | None = knob(None, "also write eval_results.json here")
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataDirConfig = field(default_factory=DataDirConfig)
    ppl: PplConfig = field(default_factory=PplConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    throughput: SpeedConfig = field(default_factory=SpeedConfig)


# ---- what the lists expand to ------------------------------------------------------------------

def _key(text: str) -> str:
    """A metric-safe short name for a dataset / corpus."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text).strip("_") or "data"


def _named(item: str) -> tuple[str, str]:
    """``name=path`` -> (name, path); ``path`` -> (file stem, path); ``wikitext2`` -> (it, it)."""
    name, sep, src = item.partition("=")
    if sep:
        return _key(name), src
    return (item, item) if item in data.SOURCES else (_key(Path(item).stem), item)


def ppl_sources(cfg: "EvalConfig", is_demo: bool) -> list[tuple[str, str]]:
    """(metric key, source) per perplexity dataset; sources exist and are reachable (a hub source:
    its copy in the data dir, or the hub)."""
    text = cfg.ppl.ppl_datasets.strip()
    if text.lower() == "none":
        return []
    if text.lower() == "auto":
        text = "demo" if is_demo else "wikitext2,ptb"
    out = [_named(x.strip()) for x in text.split(",") if x.strip()]
    for key, src in out:
        if src in data.SOURCES:
            try:
                data.check_source(src, cfg.ppl.ppl_split, cfg.data.resolve())
            except UserError as exc:
                if src not in data.HUB_SOURCES:
                    raise
                raise UserError(f"perplexity dataset '{src}' is on the Hugging Face hub, which is not "
                                f"reachable (offline): {exc}; or pass a local text file in ppl_datasets "
                                "(e.g. ppl_datasets=mytext=/path/file.txt)") from exc
        elif not Path(src).expanduser().is_file():
            raise UserError(f"unknown perplexity dataset '{src}'",
                            f"use one of {', '.join(sorted(data.SOURCES))} or an existing .txt/.jsonl/.json file")
    keys = [k for k, _ in out]
    if len(set(keys)) != len(keys):
        raise UserError(f"two perplexity datasets share a name ({', '.join(keys)})", "name them: name=path")
    return out


def task_corpora(cfg: "EvalConfig", is_demo: bool) -> dict[str, str]:
    """Corpus name -> source for offline tasks (``demo`` is always available)."""
    out = {offline.DEMO_CORPUS: offline.DEMO_CORPUS}
    for item in (cfg.zeroshot.task_corpus or "").split(","):
        if not item.strip():
            continue
        name, src = _named(item.strip())
        if not Path(src).expanduser().is_file():
            raise UserError(f"task corpus '{src}' not found", "pass an existing text file, optionally as name=path")
        out[name] = str(Path(src).expanduser().resolve())
    return out


def task_plan(cfg: "EvalConfig", is_demo: bool) -> tuple[list[str], list[offline.OfflineTask]]:
    """Expand the ``tasks`` parameter -> (all task names in order, offline tasks to build)."""
    corpora = task_corpora(cfg, is_demo)
    text = cfg.zeroshot.tasks.strip()
    if text.lower() == "none":
        return [], []
    if text.lower() == "auto":
        text = "offline" if is_demo else "standard"
    user_corpora = [c for c in corpora if c != offline.DEMO_CORPUS]
    names: list[str] = []
    for item in (x.strip() for x in text.split(",")):
        if item == "standard":
            names += zeroshot.STANDARD_TASKS
        elif item == "offline":
            use = user_corpora or ([offline.DEMO_CORPUS] if is_demo else [])
            if not use:
                raise UserError("tasks=offline needs a text corpus", "pass --task_corpus [name=]file.txt")
            names += [f"{c}_{k}" for c in use for k in offline.KINDS]
        elif item:
            names.append(item)
    names = list(dict.fromkeys(names))
    built = []
    for name in names:
        if offline.is_offline_name(name) and offline.split_name(name)[0] in corpora:
            corpus = corpora[offline.split_name(name)[0]]
            built.append(offline.OfflineTask(name, corpus, cfg.zeroshot.task_choices, cfg.zeroshot.task_items, seed=cfg.seed))
    return names, built


