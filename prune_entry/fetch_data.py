"""`fetch_data`: download the datasets of the standard study into a data dir, for offline nodes.

Run it where there is internet (a login node), then copy the folder to the cluster and pass
``--data_dir DIR`` (or set ``GQAPRUNE_DATA_DIR``) to prune / eval / finetune:

    python -m prune_entry.fetch_data --to DIR                        # everything the study needs
    python -m prune_entry.fetch_data --tasks standard --ppl wikitext2,ptb --calibration none \\
        --finetune none --to DIR                                     # only some of it
    python -m prune_entry.fetch_data --to DIR --dry_run              # print the plan only

What is fetched follows the definitions that read it: lm-eval's own task configs
(``dataset_path`` / ``dataset_name``, or a Python task's ``DATASET_PATH``), the data registry's
hub sources (``gqaprune.data.source_refs``) and the fine-tuning datasets
(``gqaprune.data.RECORD_SOURCES``). Each dataset is written the way ``gqaprune.datadir``
reads it, laid out by hub id:

* ``save_to_disk``: ``datasets.load_dataset(repo, config)`` — the very call lm-eval / the
  registry would make online — saved to ``DIR/<repo>[/<config>]`` (all splits);
* ``files``: single hub files at their hub paths (C4's two shards), ``DIR/<repo>/<path>``;
* ``parquet_export``: the hub's parquet export of a script-based repo (PTB),
  ``DIR/<repo>/<config>/<split>/*.parquet``.

Existing copies are kept (``--force true`` fetches again). A manifest
(``DIR/fetch_manifest.json``) records every copy with its content hash.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gqaprune import data
from gqaprune.datadir import DataDir, DatasetRef
from gqaprune.errors import UserError
from gqaprune.evaluation import zeroshot
from gqaprune.hub import hub_reachable
from gqaprune.config import Section, knob
from tracking import cli

# The pruning-vs-fine-tuning study: the 7 zero-shot tasks, RTE, and the generative SQuAD v2 / GSM8K.
STUDY_TASKS = (*zeroshot.STANDARD_TASKS, "rte", *zeroshot.GENERATIVE_TASKS)
# `evaluate` metric modules a task loads at scoring time (cached in HF_MODULES_CACHE, not DIR).
EVALUATE_METRICS = zeroshot.EVALUATE_METRICS
MANIFEST = "fetch_manifest.json"
METHODS = ("save_to_disk", "files", "parquet_export")


@dataclass(frozen=True)
class FetchConfig(Section):
    """fetch_data: download the datasets of the standard study into a data dir (needs the hub)"""
    to: str | None = knob(None, "the data dir to write (later: --data_dir / GQAPRUNE_DATA_DIR)")
    tasks: str = knob("study", "study (the 7 zero-shot tasks + rte, squadv2, gsm8k), standard (the 7), none, "
                      "or lm-eval task names (comma-separated)")
    ppl: str = knob("wikitext2,ptb,c4", "perplexity sources of the data registry, or none")
    calibration: str = knob("mixed", "calibration sources (mixed = wikitext2 + c4 + squad, mixed:a,b), or none")
    finetune: str = knob("alpaca", "fine-tuning datasets (alpaca, squad), or none")
    cache_dir: str | None = knob(None, "Hugging Face datasets cache for the downloads")
    force: bool = knob(False, "fetch again even if a copy exists")
    dry_run: bool = knob(False, "print the plan, download nothing")


@dataclass(frozen=True)
class FetchItem:
    """One dataset to download: what, how, and for which part of the study."""
    ref: DatasetRef
    method: str                              # one of METHODS
    purposes: tuple[str, ...]                # e.g. ("task arc_easy",), ("ppl c4", "calibration c4")

    def target(self, root: Path) -> Path:
        """Folder (or, for single files, repo folder) the copy is written to."""
        base = root / self.ref.repo
        return base / self.ref.config if self.ref.config and self.method == "save_to_disk" else base

    def describe(self) -> str:
        what = {"save_to_disk": "load_dataset + save_to_disk",
                "files": "hub files " + ", ".join(p for _, p in self.ref.files),
                "parquet_export": f"parquet export {self.ref.config}/<split>/*.parquet"}[self.method]
        return f"{self.ref.label()}: {what}  ({', '.join(self.purposes)})"


@dataclass(frozen=True)
class FetchPlan:
    root: Path
    items: tuple[FetchItem, ...]
    metrics: tuple[str, ...]                 # evaluate modules to cache

    def describe(self) -> str:
        lines = [f"fetch plan into {self.root}: {len(self.items)} datasets"]
        lines += [f"  {i.describe()}" for i in self.items]
        lines += [f"  evaluate metric '{m}' (HF_MODULES_CACHE)" for m in self.metrics]
        return "\n".join(lines)


# ------------------------------------------------------------------------------ planning

def _names(text: str) -> list[str]:
    return [] if text.strip().lower() == "none" else [x.strip() for x in text.split(",") if x.strip()]


def task_names(text: str) -> list[str]:
    out: list[str] = []
    for item in _names(text):
        out += {"study": list(STUDY_TASKS), "standard": list(zeroshot.STANDARD_TASKS)}.get(item, [item])
    return list(dict.fromkeys(out))


def method_of(ref: DatasetRef) -> str:
    return "files" if ref.files else "parquet_export" if ref.export else "save_to_disk"


def _task_items(manager, names: list[str]) -> list[tuple[DatasetRef, str]]:
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}",
                        "use lm-eval task names, 'standard' or 'study'")
    out = []
    for name, ref in zeroshot.task_refs(manager, names).items():
        if ref is None:
            raise UserError(f"task '{name}' names no hub dataset in its lm-eval definition (a group, "
                            "a tag, or local files)", "list the tasks it contains instead")
        out.append((ref, f"task {name}"))
    return out


def _source_items(kind: str, names: list[str]) -> list[tuple[DatasetRef, str]]:
    out = []
    for name in names:
        if name not in data.HUB_SOURCES and not name.startswith(data.MIXED_PREFIX):
            raise UserError(f"'{name}' is not a hub source of the data registry",
                            f"use {', '.join(sorted(data.HUB_SOURCES))} (local files need no fetching)")
        out += [(ref, f"{kind} {name}") for ref in data.source_refs(name)]
    return out


def _finetune_items(names: list[str]) -> list[tuple[DatasetRef, str]]:
    out = []
    for name in names:
        if name not in data.RECORD_SOURCES:
            raise UserError(f"'{name}' is not a hub fine-tuning dataset",
                            f"use {', '.join(sorted(data.RECORD_SOURCES))}")
        out.append((data.RECORD_SOURCES.get(name).ref, f"finetune {name}"))
    return out


def plan(cfg: FetchConfig, manager=None) -> FetchPlan:
    """Which datasets (repo, config, files) the requested parts of the study read, deduplicated."""
    if not cfg.to:
        raise UserError("no target folder", "pass --to DIR")
    tasks = task_names(cfg.tasks)
    pairs = []
    if tasks:
        pairs += _task_items(manager or zeroshot.task_manager([], with_defaults=True), tasks)
    pairs += _source_items("ppl", _names(cfg.ppl)) + _source_items("calibration", _names(cfg.calibration))
    pairs += _finetune_items(_names(cfg.finetune))
    merged: dict[DatasetRef, list[str]] = {}
    for ref, purpose in pairs:
        merged.setdefault(ref, []).append(purpose)
    items = tuple(FetchItem(ref, method_of(ref), tuple(p)) for ref, p in merged.items())
    metrics = tuple(dict.fromkeys(EVALUATE_METRICS[t] for t in tasks if t in EVALUATE_METRICS))
    return FetchPlan(Path(cfg.to).expanduser().resolve(), items, metrics)


# ------------------------------------------------------------------------------ fetching

def fetch_item(item: FetchItem, root: Path, cache_dir: str | None) -> None:
    """Download one dataset into its place under ``root`` (needs the hub)."""
    target = item.target(root)
    if item.method == "save_to_disk":
        from datasets import load_dataset
        ds = load_dataset(item.ref.repo, item.ref.config, cache_dir=cache_dir)
        ds.save_to_disk(str(target))
        return
    from huggingface_hub import snapshot_download
    if item.method == "files":
        snapshot_download(item.ref.repo, repo_type="dataset", local_dir=str(target),
                          allow_patterns=[p for _, p in item.ref.files], cache_dir=cache_dir)
    else:
        config = item.ref.config or "default"
        snapshot_download(item.ref.repo, repo_type="dataset", revision="refs/convert/parquet",
                          local_dir=str(target), allow_patterns=[f"{config}/*", f"{config}/**"],
                          cache_dir=cache_dir)


def _fetch_metric(name: str) -> str:
    import evaluate
    evaluate.load(name)
    from evaluate import config as ecfg
    return str(Path(ecfg.HF_MODULES_CACHE) / "evaluate_modules")


def run(cfg: FetchConfig, manager=None) -> dict:
    """Plan, then (unless dry_run) download what is missing; returns the manifest dict."""
    the_plan = plan(cfg, manager)
    print(the_plan.describe())
    if cfg.dry_run:
        return {"plan": [asdict(i) | {"target": str(i.target(the_plan.root))} for i in the_plan.items]}
    if not hub_reachable():
        raise UserError("fetch_data needs the Hugging Face hub, which is not reachable from here "
                        "(offline or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set)",
                        "run it on a machine with internet (a login node), then copy the folder to "
                        "the offline nodes and pass --data_dir")
    the_plan.root.mkdir(parents=True, exist_ok=True)
    dd = DataDir(the_plan.root)
    entries = []
    for i, item in enumerate(the_plan.items, 1):
        copy = None if cfg.force else dd.find(item.ref)
        state = "kept"
        if copy is None:
            print(f"[{i}/{len(the_plan.items)}] fetching {item.ref.label()} ...", flush=True)
            try:
                fetch_item(item, the_plan.root, cfg.cache_dir)
            except Exception as exc:  # noqa: BLE001 - hub / datasets raise many kinds
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise UserError(f"could not fetch {item.ref.label()}: {first}",
                                "check the network / hub access (gated datasets need `hf auth login`)") from exc
            copy, state = dd.find(item.ref), "fetched"
            if copy is None:
                raise UserError(f"{item.ref.label()} was downloaded but no copy is readable at "
                                f"{item.target(the_plan.root)}", "report this (the repo layout changed?)")
        print(f"  {state}: {copy.describe()}")
        entries.append({"dataset": item.ref.label(), "method": item.method, "purposes": list(item.purposes),
                        **copy.to_dict()})
    modules = {m: _fetch_metric(m) for m in the_plan.metrics}
    for m, where in modules.items():
        print(f"  evaluate metric {m}: cached in {where} (copy it to the nodes' HF_MODULES_CACHE)")
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": asdict(cfg),
                "datasets": entries, "evaluate_metrics": modules}
    (the_plan.root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def build_parser():
    return cli.parser_for("fetch_data", FetchConfig)


def parse(argv: list[str] | None) -> FetchConfig:
    cfg = cli.parse_config(FetchConfig, argv, prog="fetch_data")
    if not cfg.to:
        raise UserError("fetch_data needs a target directory", "pass --to DIR (the later --data_dir)")
    return cfg


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse(argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
