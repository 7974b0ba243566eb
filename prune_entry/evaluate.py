"""`eval` entry point: perplexity, zero-shot accuracy, model size and speed, tracked in MLflow.

    python -m prune_entry.evaluate --model_uri runs:/<prune run>/pruned_model
    mlflow run . -e eval -P model_uri=<prune run id> --env-manager local

Other entry points evaluate through :func:`run_child` (a nested child of their active run).
"""
from __future__ import annotations

import re
import shlex
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from gqaprune import data
from gqaprune.errors import UserError
from gqaprune.evaluation import speed as speed_mod
from gqaprune.evaluation import tasks as offline
from gqaprune.evaluation import zeroshot
from gqaprune.evaluation.perplexity import PplProtocol, perplexity
from gqaprune.loading import (DEMO_ALIAS, load_model_and_tokenizer, resolve_device, resolve_dtype,
                             resolve_model)
from gqaprune.utils import seed_everything
from prune_entry.common import Parser, boolean, optional_int, optional_str, raw_flags
from tracking import runs, schema, store

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass(frozen=True)
class EvalConfig:
    model_uri: str = DEMO_ALIAS
    ppl_datasets: str = "auto"          # auto: demo corpus for the demo model, else wikitext2,ptb
    ppl_seq_len: int = 128
    ppl_stride: int | None = None       # None: non-overlapping windows
    ppl_bos: str = "auto"               # auto: BOS-prefix windows when the tokenizer has a BOS
    ppl_nsamples: int | None = None     # cap on windows per dataset
    ppl_split: str = "test"
    tasks: str = "auto"                 # auto: the standard seven (demo model: demo offline tasks)
    task_corpus: str | None = None      # [name=]file for offline tasks <name>_continuation/_cloze
    task_choices: int = 4
    task_items: int = 500
    limit: float | int | None = None
    batch_size: int = 8
    num_fewshot: int | None = 0
    acc_convention: str = "literature"
    speed: bool = True
    speed_prompt_len: int = 128
    speed_new_tokens: int = 64
    speed_batch_size: int = 1
    speed_repeats: int = 3
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    models_file: str | None = None
    parent_run_id: str | None = None    # link this run as a child of another (pipelines)
    output_dir: str | None = None       # also write eval_results.json here


def _limit(text: str):
    if str(text).strip().lower() in ("", "none", "null"):
        return None
    value = float(text)
    if value <= 0:
        raise ValueError(text)
    return int(value) if value >= 1 and value == int(value) else value


def build_parser() -> Parser:
    p = Parser(prog="eval", description=__doc__.splitlines()[0])
    d = EvalConfig()
    p.add_argument("--model_uri", default=d.model_uri,
                   help="alias, HF id, local dir, runs:/ or models:/ URI, or a prune/finetune run id")
    p.add_argument("--ppl_datasets", default=d.ppl_datasets,
                   help=f"comma-separated: auto, none, {', '.join(sorted(data.SOURCES))}, a file path "
                        "or name=path")
    p.add_argument("--ppl_seq_len", type=int, default=d.ppl_seq_len)
    p.add_argument("--ppl_stride", type=optional_int, default=d.ppl_stride)
    p.add_argument("--ppl_bos", default=d.ppl_bos, help="auto | true | false")
    p.add_argument("--ppl_nsamples", type=optional_int, default=d.ppl_nsamples)
    p.add_argument("--ppl_split", default=d.ppl_split, help="test | validation | train")
    p.add_argument("--tasks", default=d.tasks,
                   help="comma-separated: auto, none, standard, offline, lm-eval task names, "
                        "<corpus>_continuation, <corpus>_cloze")
    p.add_argument("--task_corpus", type=optional_str, default=d.task_corpus,
                   help="comma-separated [name=]text file(s) for the offline tasks")
    p.add_argument("--task_choices", type=int, default=d.task_choices)
    p.add_argument("--task_items", type=int, default=d.task_items)
    p.add_argument("--limit", type=_limit, default=d.limit, help="docs per task (int) or fraction")
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--num_fewshot", type=optional_int, default=d.num_fewshot)
    p.add_argument("--acc_convention", default=d.acc_convention, help=" | ".join(zeroshot.CONVENTIONS))
    p.add_argument("--speed", type=boolean, default=d.speed)
    p.add_argument("--speed_prompt_len", type=int, default=d.speed_prompt_len)
    p.add_argument("--speed_new_tokens", type=int, default=d.speed_new_tokens)
    p.add_argument("--speed_batch_size", type=int, default=d.speed_batch_size)
    p.add_argument("--speed_repeats", type=int, default=d.speed_repeats)
    p.add_argument("--dtype", default=d.dtype, help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda[:N]")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--models_file", type=optional_str, default=d.models_file)
    p.add_argument("--parent_run_id", type=optional_str, default=d.parent_run_id)
    p.add_argument("--output_dir", type=optional_str, default=d.output_dir)
    return p


def parse(argv: list[str] | None) -> EvalConfig:
    cfg = EvalConfig(**vars(build_parser().parse_args(argv)))
    validate(cfg)
    return cfg


def validate(cfg: EvalConfig) -> None:
    """Checks that need no model and no data."""
    for name in ("batch_size", "task_items", "speed_prompt_len", "speed_batch_size",
                 "speed_repeats"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name} must be >= 1, got {getattr(cfg, name)}", f"pass a positive {name}")
    if cfg.ppl_seq_len < 2:
        raise UserError(f"ppl_seq_len must be >= 2, got {cfg.ppl_seq_len}", "pass e.g. 128")
    if cfg.ppl_stride is not None and not 0 < cfg.ppl_stride <= cfg.ppl_seq_len:
        raise UserError(f"ppl_stride {cfg.ppl_stride} must be in (0, ppl_seq_len={cfg.ppl_seq_len}]",
                        "use none for non-overlapping windows or a stride <= ppl_seq_len")
    if cfg.ppl_bos.lower() not in ("auto", "true", "false"):
        raise UserError(f"ppl_bos must be auto, true or false, got '{cfg.ppl_bos}'", "pass one of them")
    if cfg.task_choices < 2:
        raise UserError(f"task_choices must be >= 2, got {cfg.task_choices}", "pass e.g. 4")
    if cfg.num_fewshot is not None and cfg.num_fewshot < 0:
        raise UserError(f"num_fewshot must be >= 0, got {cfg.num_fewshot}", "pass 0 for zero-shot")
    if cfg.speed_new_tokens < 0:
        raise UserError(f"speed_new_tokens must be >= 0, got {cfg.speed_new_tokens}", "pass e.g. 64")
    zeroshot.chosen_measure("x", [], cfg.acc_convention)  # validates the convention name


# ------------------------------------------------------------------------------ what to run

def _key(text: str) -> str:
    """A metric-safe short name for a dataset / corpus."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text).strip("_") or "data"


def _named(item: str) -> tuple[str, str]:
    """``name=path`` -> (name, path); ``path`` -> (file stem, path); ``wikitext2`` -> (it, it)."""
    name, sep, src = item.partition("=")
    if sep:
        return _key(name), src
    return (item, item) if item in data.SOURCES else (_key(Path(item).stem), item)


def ppl_sources(cfg: EvalConfig, is_demo: bool) -> list[tuple[str, str]]:
    """(metric key, source) per perplexity dataset; sources exist and are reachable."""
    text = cfg.ppl_datasets.strip()
    if text.lower() == "none":
        return []
    if text.lower() == "auto":
        text = "demo" if is_demo else "wikitext2,ptb"
    out = [_named(x.strip()) for x in text.split(",") if x.strip()]
    for key, src in out:
        if src in data.SOURCES:
            if src in data.HUB_SOURCES and not data.hub_reachable():
                raise UserError(f"perplexity dataset '{src}' is on the Hugging Face hub, which is not "
                                "reachable (offline)", "pass a local text file in ppl_datasets "
                                "(e.g. ppl_datasets=mytext=/path/file.txt), or run where the hub is reachable")
        elif not Path(src).expanduser().is_file():
            raise UserError(f"unknown perplexity dataset '{src}'",
                            f"use one of {', '.join(sorted(data.SOURCES))} or an existing .txt/.jsonl/.json file")
    keys = [k for k, _ in out]
    if len(set(keys)) != len(keys):
        raise UserError(f"two perplexity datasets share a name ({', '.join(keys)})", "name them: name=path")
    return out


def task_corpora(cfg: EvalConfig, is_demo: bool) -> dict[str, str]:
    """Corpus name -> source for offline tasks (``demo`` is always available)."""
    out = {offline.DEMO_CORPUS: offline.DEMO_CORPUS}
    for item in (cfg.task_corpus or "").split(","):
        if not item.strip():
            continue
        name, src = _named(item.strip())
        if not Path(src).expanduser().is_file():
            raise UserError(f"task corpus '{src}' not found", "pass an existing text file, optionally as name=path")
        out[name] = str(Path(src).expanduser().resolve())
    return out


def task_plan(cfg: EvalConfig, is_demo: bool) -> tuple[list[str], list[offline.OfflineTask]]:
    """Expand the ``tasks`` parameter -> (all task names in order, offline tasks to build)."""
    corpora = task_corpora(cfg, is_demo)
    text = cfg.tasks.strip()
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
            built.append(offline.OfflineTask(name, corpus, cfg.task_choices, cfg.task_items, seed=cfg.seed))
    return names, built


# ------------------------------------------------------------------------------ the run

def _short(uri: str) -> str:
    if re.fullmatch(r"[0-9a-f]{32}", uri):
        return uri[:8]
    return Path(uri.rstrip("/")).name or uri


def _source_tags(resolved: store.Resolved, spec) -> dict:
    tags = {schema.TAG_SOURCE_URI: resolved.name, schema.TAG_MODEL_PATH: spec.path,
            schema.TAG_MODEL_ALIAS: spec.alias, schema.TAG_MODEL_FAMILY: spec.family,
            schema.TAG_MODEL_VARIANT: spec.variant}
    if resolved.source_run_id:
        tags[schema.TAG_SOURCE_RUN] = resolved.source_run_id
        try:  # describe the model by its origin run (alias/method of the pruned model)
            src = store.get_run(resolved.source_run_id).data.tags
            tags.update({k: src[k] for k in (schema.TAG_MODEL_ALIAS, schema.TAG_MODEL_FAMILY,
                                               schema.TAG_MODEL_VARIANT, schema.TAG_MODEL_PATH,
                                               schema.TAG_METHOD) if k in src})
        except Exception:  # noqa: BLE001 - a missing source run is not fatal for the eval
            pass
    return tags


def load_for_eval(model_path: str, spec, dtype, device):
    """Load model and tokenizer; a checkpoint without tokenizer files is a user error."""
    p = Path(model_path)
    if p.is_dir() and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"no tokenizer found in '{p}' (none of {', '.join(TOKENIZER_FILES)})",
                        "save the tokenizer with the model (tokenizer.save_pretrained(dir))")
    return load_model_and_tokenizer(spec, dtype, device)  # turns loading errors into UserError


def bos_for(cfg: EvalConfig, tokenizer) -> bool:
    if cfg.ppl_bos.lower() == "auto":
        return tokenizer.bos_token_id is not None
    return cfg.ppl_bos.lower() == "true"


def run_perplexity(cfg: EvalConfig, model, tokenizer, sources) -> dict:
    out = {}
    bos = bos_for(cfg, tokenizer)
    for key, src in sources:
        stream = data.eval_stream(tokenizer, src, cfg.ppl_split)
        proto = PplProtocol(key, cfg.ppl_split, cfg.ppl_seq_len, cfg.ppl_stride, bos, cfg.ppl_nsamples,
                            cfg.batch_size)
        res = perplexity(model, stream, proto, tokenizer.bos_token_id)
        out[key] = {**res.to_dict(), "source": src, "stream_tokens": int(stream.numel())}
        print(f"  ppl {key}: {res.ppl:.4f}  ({proto.describe()}; {res.tokens} tokens scored)")
    return out


def log_perplexity(ppl: dict) -> None:
    metrics, params = {}, {schema.P_PPL_RUN: ",".join(ppl)}
    for key, r in ppl.items():
        metrics[schema.ppl_metric(key)] = r["ppl"]
        metrics[schema.metric_name(schema.M_NLL.format(dataset=key))] = r["nll"]
        metrics[schema.metric_name(schema.M_PPL_TOKENS.format(dataset=key))] = r["tokens"]
        params[schema.P_PPL_PROTOCOL.format(dataset=key)] = r["protocol_text"]
    runs.log_metrics(metrics)
    runs.log_params(params)


def log_zeroshot(result: zeroshot.ZeroShotResult, title: str) -> None:
    """Every numeric lm-eval value as ``<task>/<measure>``, the mean, a table and a figure."""
    metrics = {}
    for task, row in zeroshot.numeric_results(result.raw).items():
        metrics.update({schema.lm_eval_metric(task, k): v for k, v in row.items()})
    for s in result.scores:
        if s.n_samples is not None:
            metrics[schema.metric_name(s.task, "n_samples")] = s.n_samples
    if result.mean is not None:
        metrics[schema.M_ZS_MEAN] = result.mean
    metrics[schema.M_ZS_TASKS] = len(result.scores)
    runs.log_metrics(metrics)
    runs.log_params({schema.P_TASKS_RUN: ",".join(s.task for s in result.scores),
                     schema.P_TASK_MEASURES: ",".join(f"{s.task}={s.measure}" for s in result.scores)})
    runs.log_table(pd.DataFrame([asdict(s) for s in result.scores]), schema.A_ZS_TABLE)
    if any(s.score is not None for s in result.scores):
        runs.log_figure(zeroshot.accuracy_figure(result, title), schema.A_ZS_FIG)


def log_speed(facts: speed_mod.ModelFacts, sp: speed_mod.SpeedResult | None) -> None:
    metrics = {schema.M_MODEL_PARAMS: facts.params, schema.M_MODEL_BYTES: facts.param_bytes}
    if facts.size_on_disk_bytes is not None:
        metrics[schema.M_MODEL_DISK_MB] = facts.size_on_disk_bytes / 2**20
    if sp is not None:
        metrics.update({schema.M_SPEED_PREFILL: sp.prefill_tokens_per_s,
                        schema.M_SPEED_DECODE: sp.decode_tokens_per_s,
                        schema.M_SPEED_LATENCY: sp.latency_ms_per_token,
                        schema.M_SPEED_PEAK_MEM: sp.peak_memory_mb})
        runs.log_params({"speed_protocol": sp.describe()})
    runs.log_metrics(metrics)


def prepare_tasks(cfg: EvalConfig, names: list[str], to_build: list[offline.OfflineTask]):
    """Build offline tasks, index lm-eval tasks, load every dataset: fail before the model loads."""
    if not names:
        return None, [], {}
    from gqaprune.demo import default_cache_dir
    task_dir, infos = (offline.build_tasks(to_build, default_cache_dir() / "tasks") if to_build
                       else (None, []))
    built = {i["name"] for i in infos}
    hub_tasks = [n for n in names if n not in built]
    if hub_tasks and not data.hub_reachable():
        zeroshot.go_offline()  # datasets then fail at once (or load from the HF cache)
    manager = zeroshot.task_manager([task_dir] if task_dir else [], with_defaults=bool(hub_tasks))
    zeroshot.check_tasks(manager, names)
    if task_dir is not None:
        runs.log_dir(task_dir, schema.A_OFFLINE_TASKS)
    return manager, infos, {i["name"]: i["preferred_measure"] for i in infos}


def run(cfg: EvalConfig) -> dict:
    """The whole evaluation; returns the results dict logged as eval_results.json."""
    t0 = time.perf_counter()
    runs.log_params(asdict(cfg))
    resolved = store.resolve_model_source(cfg.model_uri)
    spec = resolve_model(resolved.local_path or resolved.name, cfg.models_file)
    source_tags = _source_tags(resolved, spec)
    runs.set_tags(source_tags)
    # A pruned / fine-tuned demo model keeps the demo's defaults (its own corpus and tasks).
    is_demo = source_tags.get(schema.TAG_MODEL_ALIAS) == DEMO_ALIAS
    sources = ppl_sources(cfg, is_demo)
    names, to_build = task_plan(cfg, is_demo)
    manager, task_infos, preferred = prepare_tasks(cfg, names, to_build)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    seed_everything(cfg.seed)
    model, tokenizer = load_for_eval(resolved.local_path or spec.path, spec, dtype, device)
    print(f"evaluating {cfg.model_uri} ({spec.path}) on {device} {str(dtype).removeprefix('torch.')}")

    facts = speed_mod.model_facts(model, resolved.local_path or (spec.path if Path(spec.path).is_dir() else None))
    sp = None
    if cfg.speed:
        sp = speed_mod.measure_speed(model, model.config.vocab_size, cfg.speed_prompt_len,
                                     cfg.speed_new_tokens, cfg.speed_batch_size, cfg.speed_repeats, cfg.seed)
    log_speed(facts, sp)
    ppl = run_perplexity(cfg, model, tokenizer, sources)
    log_perplexity(ppl)
    zs = None
    if names:
        chance = {i["name"]: i["chance"] for i in task_infos}
        zs = zeroshot.evaluate_tasks(model, tokenizer, names, manager, batch_size=cfg.batch_size,
                                     limit=cfg.limit, num_fewshot=cfg.num_fewshot,
                                     convention=cfg.acc_convention, preferred=preferred, chance=chance,
                                     seed=cfg.seed, device=str(device))
        log_zeroshot(zs, f"{_short(cfg.model_uri)} · {cfg.num_fewshot or 0}-shot · {cfg.acc_convention}")
    elapsed = time.perf_counter() - t0
    runs.log_metrics({schema.M_EVAL_TIME: elapsed})
    results = {"config": asdict(cfg),
               "model": {"uri": cfg.model_uri, "path": spec.path, "alias": spec.alias,
                         "source_run_id": resolved.source_run_id, **facts.to_dict()},
               "speed": sp.to_dict() | {"protocol": sp.describe()} if sp else None,
               "perplexity": ppl, "zeroshot": zs.to_dict() if zs else None,
               "offline_tasks": task_infos, "eval_time_s": elapsed}
    runs.log_json(results, schema.A_EVAL_RESULTS)
    if cfg.output_dir:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / schema.A_EVAL_RESULTS).write_text(runs.dump_json(results))
    print(summary_text(results))
    return results


def summary_text(results: dict) -> str:
    lines = [f"model {results['model']['uri']}: {results['model']['params']:,} parameters"]
    sp = results.get("speed")
    if sp:
        lines.append(f"  speed: prefill {sp['prefill_tokens_per_s']:.0f} tok/s, decode "
                     f"{sp['decode_tokens_per_s']:.1f} tok/s ({sp['latency_ms_per_token']:.2f} ms/token)")
    for key, r in results["perplexity"].items():
        lines.append(f"  ppl {key}: {r['ppl']:.4f}")
    zs = results.get("zeroshot")
    if zs:
        for s in zs["scores"]:
            val = "n/a" if s["score"] is None else f"{s['score']:.4f}"
            lines.append(f"  {s['task']} ({s['measure']}): {val}")
        if zs["mean"] is not None:
            lines.append(f"  mean accuracy ({zs['convention']}): {zs['mean']:.4f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ entry points

def _run_name(cfg: EvalConfig) -> str:
    return f"eval-{_short(cfg.model_uri)}"


def _tags(cfg: EvalConfig) -> dict:
    return {schema.TAG_PARENT_RUN: cfg.parent_run_id} if cfg.parent_run_id else {}


def main(argv: list[str] | None = None) -> int:
    return runs.entry_point(schema.STAGE_EVAL, lambda: parse(argv), run, run_name=_run_name,
                            tags=_tags, raw_params=raw_flags(argv))


def evaluate_in_run(model_uri: str, args: list[str] | str = (),
                    extra_tags: Mapping[str, str] | None = None) -> str:
    """Evaluate ``model_uri`` in a nested child run of the active run and return its id.

    Bad input raises :class:`UserError` after marking the eval run FAILED. ``extra_tags`` are set
    on the child from its start (see :func:`tracking.runs.child_run`).
    """
    argv = ["--model_uri", model_uri, *(shlex.split(args) if isinstance(args, str) else args)]
    return runs.child_run(schema.STAGE_EVAL, lambda: parse(argv), run, run_name=_run_name,
                          tags=_tags, raw_params=raw_flags(argv), extra_tags=extra_tags)


def run_child(model_uri: str, args: list[str], extra_tags: Mapping[str, str] | None = None) -> str:
    """Evaluate ``model_uri`` as a nested child run of the active MLflow run; return its run id.

    ``args`` are eval flags (e.g. ``["--tasks", "none", "--ppl_datasets", "demo"]``).
    """
    return evaluate_in_run(model_uri, args, extra_tags)


if __name__ == "__main__":
    raise SystemExit(main())
