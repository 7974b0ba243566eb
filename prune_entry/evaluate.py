"""`eval` entry point: perplexity, zero-shot accuracy, model size and speed, tracked in MLflow.

    python -m prune_entry.evaluate --model_uri runs:/<prune run>/pruned_model
    mlflow run . -e eval -P model_uri=<prune run id> --env-manager local

Other entry points evaluate through :func:`run_child` (a nested child of their active run).
"""
from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from gqaprune import data
from gqaprune.config import flat, parse_flat
from gqaprune.errors import UserError
from gqaprune.evaluation import speed as speed_mod
from gqaprune.evaluation import tasks as offline
from gqaprune.evaluation import zeroshot
from gqaprune.evaluation.config import EvalConfig, ppl_sources, task_plan
from gqaprune.evaluation.perplexity import PplProtocol, perplexity
from gqaprune.loading import DEMO_ALIAS, load_model_and_tokenizer, resolve_model
from gqaprune.sparsity import measure, overall_sparsity
from gqaprune.utils import seed_everything
from prune_entry import inputs, report
from tracking import cli, runs, schema, store

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def parse(argv: list[str] | None) -> EvalConfig:
    return cli.parse_config(EvalConfig, argv, prog="eval")


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
        tags.update(origin_tags(resolved.source_run_id))
    return tags


def origin_tags(run_id: str) -> dict:
    """What the eval run's row should show of the model's origin: alias, family, method, and of the
    prune run behind it (following a finetune run to its source) the target ratio, its kind and
    the achieved ratio, so one row of the runs table holds the ratio and the perplexity."""
    out: dict = {}
    try:
        run = store.get_run(run_id)
        out.update({k: run.data.tags[k] for k in (schema.TAG_MODEL_ALIAS, schema.TAG_MODEL_FAMILY,
                                                   schema.TAG_MODEL_VARIANT, schema.TAG_MODEL_PATH,
                                                   schema.TAG_METHOD) if k in run.data.tags})
        if run.data.tags.get(schema.TAG_STAGE) == schema.STAGE_FINETUNE and schema.TAG_SOURCE_RUN in run.data.tags:
            run = store.get_run(run.data.tags[schema.TAG_SOURCE_RUN])
        if run.data.tags.get(schema.TAG_STAGE) == schema.STAGE_PRUNE:
            kind = run.data.tags.get(schema.TAG_RATIO_KIND, schema.RATIO_STRUCTURED)
            p, m = run.data.params, run.data.metrics
            target = p.get(schema.P_SPARSITY if kind == schema.RATIO_SPARSITY else schema.P_PRUNING_RATIO)
            achieved = m.get(schema.M_ACHIEVED_SPARSITY if kind == schema.RATIO_SPARSITY else schema.M_ACHIEVED_RATIO)
            out.update({schema.TAG_RATIO_KIND: kind, schema.TAG_SOURCE_RATIO: target,
                        schema.TAG_SOURCE_ACHIEVED: None if achieved is None else f"{achieved:.4f}"})
    except Exception:  # noqa: BLE001 - a missing source run is not fatal for the eval
        pass
    return {k: v for k, v in out.items() if v is not None}


def load_for_eval(model_path: str, spec, dtype, device):
    """Load model and tokenizer; a checkpoint without tokenizer files is a user error."""
    p = Path(model_path)
    if p.is_dir() and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"no tokenizer found in '{p}' (none of {', '.join(TOKENIZER_FILES)})",
                        "save the tokenizer with the model (tokenizer.save_pretrained(dir))")
    return load_model_and_tokenizer(spec, dtype, device)  # turns loading errors into UserError


def run_perplexity(cfg: EvalConfig, model, tokenizer, sources) -> dict:
    out = {}
    bos, p = cfg.ppl.bos_for(tokenizer), cfg.ppl
    dd = cfg.data.resolve()
    for key, src in sources:
        stream = data.eval_stream(tokenizer, src, p.ppl_split, data_dir=dd)
        proto = PplProtocol(key, p.ppl_split, p.ppl_seq_len, p.ppl_stride, bos, p.ppl_nsamples, cfg.batch_size)
        res = perplexity(model, stream, proto, tokenizer.bos_token_id)
        copies = data.check_source(src, p.ppl_split, dd)
        report.log_data_sources(copies)
        out[key] = {**res.to_dict(), "source": src, "stream_tokens": int(stream.numel()),
                    "copies": [c.to_dict() for c in copies]}
        runs.log_dataset(inputs.text_input(src, stream, schema.CTX_EVALUATION, key=key, split=p.ppl_split,
                                           protocol=proto.describe()))
        print(f"  ppl {key}: {res.ppl:.4f}  ({proto.describe()}; {res.tokens} tokens scored)")
    return out


def log_perplexity(ppl: dict) -> None:
    metrics, params = {}, {schema.P_PPL_RUN: ",".join(ppl)}
    for key, r in ppl.items():
        metrics[schema.ppl_metric(key)] = r["ppl"]
        metrics[schema.metric_name(schema.M_NLL.format(dataset=key))] = r["nll"]
        metrics[schema.metric_name(schema.M_PPL_TOKENS.format(dataset=key))] = r["tokens"]
        if r.get("windows") is not None:      # PplResult.to_dict() has it; older result files may not
            metrics[schema.dataset_metric(schema.M_PPL_WINDOWS, key)] = r["windows"]
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
    if result.generative:   # exact match / F1 tasks: their own table, never in the mean
        runs.log_table(pd.DataFrame([g.row() for g in result.generative]), schema.A_ZS_GENERATIVE)
    report.log_data_sources([s.copy for s in result.sources if s.copy is not None])
    if any(s.score is not None for s in result.scores):
        runs.log_figure(zeroshot.accuracy_figure(result, title), schema.A_ZS_FIG)


def log_task_inputs(result: zeroshot.ZeroShotResult, task_infos: list[dict], cfg: EvalConfig) -> None:
    """Each evaluated task as a dataset input (offline tasks: their generated item file)."""
    files = {i["name"]: str(Path(i["yaml"]).with_suffix(".jsonl")) for i in task_infos}
    z = cfg.zeroshot
    for s in result.scores:
        runs.log_dataset(inputs.task_input(s.task, files.get(s.task), measure=s.measure, num_fewshot=z.num_fewshot,
                                           limit=z.limit, samples=s.n_samples))


def log_speed(facts: speed_mod.ModelFacts, sp: speed_mod.SpeedResult | None) -> None:
    metrics = {schema.M_MODEL_PARAMS: facts.params, schema.M_MODEL_BYTES: facts.param_bytes}
    if facts.size_on_disk_bytes is not None:
        metrics[schema.M_MODEL_DISK_MB] = facts.size_on_disk_bytes / 2**20
    if sp is not None:
        metrics.update({schema.M_SPEED_PREFILL: sp.prefill_tokens_per_s,
                        schema.M_SPEED_DECODE: sp.decode_tokens_per_s,
                        schema.M_SPEED_LATENCY: sp.latency_ms_per_token,
                        schema.M_SPEED_PEAK_MEM: sp.peak_memory_mb})
        runs.log_params({schema.P_SPEED_PROTOCOL: sp.describe()})
    runs.log_metrics(metrics)


def prepare_tasks(cfg: EvalConfig, names: list[str], to_build: list[offline.OfflineTask], log: bool = True):
    """Build offline tasks, index lm-eval tasks, check every dataset is readable (local copy or
    hub): fail before the model loads. ``log``: attach the built offline tasks to the run."""
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
    zeroshot.check_tasks(manager, names, cfg.data.resolve())   # every dataset readable: fail before loading
    if task_dir is not None and log:
        runs.log_dir(task_dir, schema.A_OFFLINE_TASKS)
    return manager, infos, {i["name"]: i["preferred_measure"] for i in infos}


def run(cfg: EvalConfig) -> dict:
    """The whole evaluation; returns the results dict logged as eval_results.json."""
    t0 = time.perf_counter()
    runs.log_params(flat(cfg))
    resolved = store.resolve_model_source(cfg.model_uri)
    spec = resolve_model(resolved.local_path or resolved.name, cfg.models_file)
    source_tags = _source_tags(resolved, spec)
    runs.set_tags(source_tags)
    # A pruned / fine-tuned demo model keeps the demo's defaults (its own corpus and tasks).
    is_demo = source_tags.get(schema.TAG_MODEL_ALIAS) == DEMO_ALIAS
    sources = ppl_sources(cfg, is_demo)
    names, to_build = task_plan(cfg, is_demo)
    manager, task_infos, preferred = prepare_tasks(cfg, names, to_build)
    device, dtype = cfg.runtime.resolved()
    seed_everything(cfg.seed)
    model, tokenizer = load_for_eval(resolved.local_path or spec.path, spec, dtype, device)
    if sources:
        data.check_context(schema.P_PPL_SEQ_LEN, cfg.ppl.ppl_seq_len, model)
    if cfg.throughput.speed:
        data.check_context("speed_prompt_len + speed_new_tokens",
                           cfg.throughput.speed_prompt_len + cfg.throughput.speed_new_tokens, model)
    print(f"evaluating {cfg.model_uri} ({spec.path}) on {device} {str(dtype).removeprefix('torch.')}")

    facts = speed_mod.model_facts(model, resolved.local_path or (spec.path if Path(spec.path).is_dir() else None))
    sp = None
    t = cfg.throughput
    if t.speed:
        sp = speed_mod.measure_speed(model, model.config.vocab_size, t.speed_prompt_len,
                                     t.speed_new_tokens, t.speed_batch_size, t.speed_repeats, cfg.seed)
    log_speed(facts, sp)
    sparsity = overall_sparsity(measure(model))     # zeros share of the projection weights
    runs.log_metrics({schema.M_MODEL_SPARSITY: sparsity})
    ppl = run_perplexity(cfg, model, tokenizer, sources)
    log_perplexity(ppl)
    zs = None
    if names:
        chance = {i["name"]: i["chance"] for i in task_infos}
        z = cfg.zeroshot
        zs = zeroshot.evaluate_tasks(model, tokenizer, names, manager, batch_size=cfg.batch_size,
                                     limit=z.limit, num_fewshot=z.num_fewshot,
                                     convention=z.acc_convention, preferred=preferred, chance=chance,
                                     seed=cfg.seed, device=str(device), data_dir=cfg.data.resolve())
        log_zeroshot(zs, f"{_short(cfg.model_uri)} · {z.num_fewshot or 0}-shot · {z.acc_convention}")
        log_task_inputs(zs, task_infos, cfg)
    elapsed = time.perf_counter() - t0
    runs.log_metrics({schema.M_EVAL_TIME: elapsed})
    results = {"config": flat(cfg),
               "model": {"uri": cfg.model_uri, "path": spec.path, "alias": spec.alias,
                         schema.TAG_SOURCE_RUN: resolved.source_run_id, **facts.to_dict(),
                         schema.M_MODEL_SPARSITY: sparsity},
               "speed": sp.to_dict() | {"protocol": sp.describe()} if sp else None,
               "perplexity": ppl, "zeroshot": zs.to_dict() if zs else None,
               schema.A_OFFLINE_TASKS: task_infos, schema.M_EVAL_TIME: elapsed}
    runs.log_json(results, schema.A_EVAL_RESULTS)
    if cfg.output_dir:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / schema.A_EVAL_RESULTS).write_text(runs.dump_json(results))
    print(summary_text(results))
    return results


def summary_text(results: dict) -> str:
    sparsity = results["model"].get(schema.M_MODEL_SPARSITY) or 0.0
    lines = [f"model {results['model']['uri']}: {results['model']['params']:,} parameters"
             + (f", {sparsity:.1%} of the projection weights zero" if sparsity > 0.01 else "")]
    sp = results.get("speed")
    if sp:
        lines.append(f"  speed: prefill {sp['prefill_tokens_per_s']:.0f} tok/s, decode "
                     f"{sp['decode_tokens_per_s']:.1f} tok/s ({sp['latency_ms_per_token']:.2f} ms/token)")
    for key, r in results["perplexity"].items():
        lines.append(f"  ppl {key}: {r['ppl']:.4f}")
    zs = results.get("zeroshot")
    if zs:
        for s in zs["scores"]:
            if s["measure"] is None:
                continue      # generative: below
            val = "n/a" if s["score"] is None else f"{s['score']:.4f}"
            lines.append(f"  {s['task']} ({s['measure']}): {val}")
        for g in zs.get("generative", []):
            parts = [f"{k} {g[k]:.4f}" for k in ("exact_match", "f1") if g.get(k) is not None]
            lines.append(f"  {g['task']} (generative, not in the mean): {', '.join(parts) or 'n/a'}")
        if zs["mean"] is not None:
            lines.append(f"  mean accuracy ({zs['convention']}): {zs['mean']:.4f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ entry points

def run_name(cfg: EvalConfig) -> str:
    """``eval-<alias>-<method>-<ratio>`` for a model from a prune / finetune run, else ``eval-<model>``."""
    run_id = store.run_id_in(cfg.model_uri)
    origin = origin_tags(run_id) if run_id else {}
    if schema.TAG_MODEL_ALIAS not in origin:
        return schema.run_name(schema.STAGE_EVAL, _short(cfg.model_uri))
    ratio = origin.get(schema.TAG_SOURCE_RATIO)
    return schema.run_name(schema.STAGE_EVAL, Path(origin[schema.TAG_MODEL_ALIAS]).name,
                           origin.get(schema.TAG_METHOD), float(ratio) if ratio not in (None, "none") else None)


def _tags(cfg: EvalConfig) -> dict:
    return {schema.TAG_PARENT_RUN: cfg.parent_run_id} if cfg.parent_run_id else {}


def main(argv: list[str] | None = None) -> int:
    return runs.entry_point(schema.STAGE_EVAL, lambda: parse(argv), run, run_name=run_name,
                            tags=_tags, raw_params=cli.raw_flags(argv))


def run_child(model_uri: str, config: EvalConfig | None = None, extra_tags: Mapping[str, str] | None = None,
              overrides: Mapping[str, object] | None = None, parent_run_id: str | None = None) -> str:
    """Evaluate ``model_uri`` as a nested child run of the active MLflow run (or of
    ``parent_run_id`` when there is none, as in a Ray worker); return its run id.

    ``config``: the eval settings (default: the defaults); ``overrides``: leaf values as text or
    typed (e.g. ``{"tasks": "none"}``), parsed inside the child so that bad ones mark the child
    FAILED (with its ``extra_tags``, set from its start) and raise :class:`UserError`.
    """
    base = config or EvalConfig()

    def child_config() -> EvalConfig:
        return parse_flat(EvalConfig, {**flat(base), schema.P_MODEL_URI: model_uri, **dict(overrides or {})})
    return runs.child_run(schema.STAGE_EVAL, child_config, run, run_name=run_name, tags=_tags,
                          raw_params={**flat(base), schema.P_MODEL_URI: model_uri, **dict(overrides or {})},
                          extra_tags=extra_tags, parent_run_id=parent_run_id)


if __name__ == "__main__":
    raise SystemExit(main())
