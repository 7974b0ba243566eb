"""Original vs pruned (and fine-tuned) models in one table, from eval runs in the tracking store.

    python -m analysis.compare --original <eval run | model> --pruned <prune run id> [--pruned ...]
        [--labels dense,taylor20] [--output_dir reports/]

Read-only: each ``--original`` / ``--pruned`` is an eval run id, or a prune / finetune run id
(``runs:/`` URI) whose latest finished eval run is used, or a model already evaluated in the store
(an eval run whose ``model_uri`` is it). Without ``--original`` the input model of the first
pruned run's prune run is used. To evaluate models on demand first, use the entry point
``python -m prune_entry.compare`` (same flags plus any eval flag).

Per pruned model the report lists every perplexity dataset, zero-shot task (the measure the
eval run used: ``task_measures``), mean accuracy, parameters, size and speed with
difference = pruned - original and relative % = 100 * difference / original; plus the PPL
degradation (pruned / original) and the parameter reduction 1 - params_pruned / params_original.
Numbers whose protocols differ between the two runs are flagged, never silently compared.
The JSON and Markdown reports are logged to an analysis run (experiment gqaprune-analysis).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tracking import UserError
from tracking.cli import Parser, optional_str, raw_flags
from tracking import runs, schema, store
from tracking.redact import redact

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MODEL_MEM_MB = "model/param_mb"   # report key (not a metric): param_bytes / 2**20


@dataclass
class EvalSummary:
    """What one eval run measured, read back from its params and metrics."""
    run_id: str
    label: str
    model_uri: str
    source_run_id: str | None
    ppl: dict[str, float] = field(default_factory=dict)
    ppl_protocol: dict[str, str] = field(default_factory=dict)
    tasks: dict[str, tuple[str, float]] = field(default_factory=dict)   # task -> (measure, score)
    mean_acc: float | None = None
    zeroshot_protocol: dict[str, str] = field(default_factory=dict)      # convention, fewshot, limit
    model: dict[str, float] = field(default_factory=dict)                # params, size_on_disk_mb
    speed: dict[str, float] = field(default_factory=dict)
    speed_protocol: str | None = None


@dataclass(frozen=True)
class Row:
    section: str          # perplexity | zero-shot | model | speed
    name: str
    original: float | None
    pruned: float | None
    difference: float | None
    relative_pct: float | None
    better: str           # lower | higher
    note: str = ""


# ------------------------------------------------------------------------------ reading

def _csv(text: str | None) -> list[str]:
    return [x for x in (text or "").split(",") if x]


def summary_of_run(run, label: str | None = None) -> EvalSummary:
    """An eval run (MLflow run entity) -> :class:`EvalSummary`."""
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    s = EvalSummary(run.info.run_id, label or default_label(run), p.get(schema.P_MODEL_URI, "?"),
                    t.get(schema.TAG_SOURCE_RUN))
    for key in _csv(p.get(schema.P_PPL_RUN)):
        if schema.ppl_metric(key) in m:
            s.ppl[key] = m[schema.ppl_metric(key)]
            s.ppl_protocol[key] = p.get(schema.P_PPL_PROTOCOL.format(dataset=key), "?")
    measures = dict(item.split("=", 1) for item in _csv(p.get(schema.P_TASK_MEASURES)) if "=" in item)
    for task in _csv(p.get(schema.P_TASKS_RUN)):
        measure = measures.get(task)
        if measure and measure != "None" and schema.task_metric(task, measure) in m:
            s.tasks[task] = (measure, m[schema.task_metric(task, measure)])
    s.mean_acc = m.get(schema.M_ZS_MEAN)
    s.zeroshot_protocol = {k: p.get(k, "?") for k in (schema.P_ACC_CONVENTION, schema.P_NUM_FEWSHOT, schema.P_LIMIT)}
    s.model = {k: m[k] for k in (schema.M_MODEL_PARAMS, schema.M_MODEL_DISK_MB) if k in m}
    if schema.M_MODEL_BYTES in m:
        s.model[MODEL_MEM_MB] = m[schema.M_MODEL_BYTES] / 2**20
    s.speed = {k: m[k] for k in (schema.M_SPEED_PREFILL, schema.M_SPEED_DECODE, schema.M_SPEED_LATENCY,
                                 schema.M_SPEED_PEAK_MEM) if k in m}
    s.speed_protocol = p.get(schema.P_SPEED_PROTOCOL)
    return s


def default_label(run) -> str:
    t, p = run.data.tags, run.data.params
    uri = p.get(schema.P_MODEL_URI, run.info.run_id)
    short = uri[:8] if _RUN_ID.match(uri) else Path(uri.rstrip("/")).name or uri
    method = t.get(schema.TAG_METHOD)
    return f"{method} {short}" if method and method not in short else short


def _get_run(run_id: str):
    try:
        return store.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - mlflow raises several types
        raise UserError(f"run '{run_id}' not found in the tracking store ({redact(runs.tracking_uri())})",
                        "pass a run id from this store (see `mlflow ui`) or set MLFLOW_TRACKING_URI") from exc


def is_run_id(source: str) -> bool:
    return bool(_RUN_ID.match(source)) and not Path(source).exists()


ON_DEMAND_HINT = ("evaluate it first (python -m prune_entry.evaluate --model_uri <it>), or run "
                  "python -m prune_entry.compare, which evaluates models on demand")


def _eval_runs_of(source: str) -> list:
    """Finished eval runs of a model: of a prune/finetune run (by source_run_id), else by model_uri."""
    run_id = source if is_run_id(source) else _run_in_uri(source)
    tags = {schema.TAG_STAGE: schema.STAGE_EVAL}
    if run_id:
        return store.find_runs_anywhere({**tags, schema.TAG_SOURCE_RUN: run_id})
    return [r for r in store.find_runs_anywhere(tags) if r.data.params.get(schema.P_MODEL_URI) == source]


def collect(source: str, label: str | None, notes: list[str]) -> EvalSummary:
    """An eval run id is read; a model (run id, URI, alias, dir) is found by its latest eval run."""
    if is_run_id(source):
        run = _get_run(source)
        if run.data.tags.get(schema.TAG_STAGE) == schema.STAGE_EVAL:
            if run.info.status != "FINISHED":
                raise UserError(f"eval run '{source}' is {run.info.status}", "pass a finished eval run")
            return summary_of_run(run, label)
    found = _eval_runs_of(source)
    if not found:
        raise UserError(f"'{source}' has no finished eval run in the store ({redact(runs.tracking_uri())})", ON_DEMAND_HINT)
    if len(found) > 1:
        notes.append(f"{source[:40]}: {len(found)} eval runs, the latest ({found[0].info.run_id[:8]}) is used")
    return summary_of_run(found[0], label)


def origin_of(source: str) -> str:
    """The unpruned model behind a prune/finetune/eval run: follow source runs to a prune run."""
    run_id = source if is_run_id(source) else (re.match(r"^runs:/([0-9a-f]{32})", source) or [None, None])[1]
    for _ in range(4):
        if not run_id:
            break
        run = _get_run(run_id)
        if run.data.tags.get(schema.TAG_STAGE) == schema.STAGE_PRUNE and schema.P_MODEL in run.data.params:
            return run.data.params[schema.P_MODEL]
        run_id = run.data.tags.get(schema.TAG_SOURCE_RUN) or _run_in_uri(run.data.params.get(schema.P_MODEL_URI, ""))
    raise UserError(f"cannot tell which model '{source}' was pruned from", "pass --original <model or eval run>")


def _run_in_uri(uri: str) -> str | None:
    if is_run_id(uri):
        return uri
    m = re.match(r"^runs:/([0-9a-f]{32})", uri)
    return m.group(1) if m else None


# ------------------------------------------------------------------------------ comparing

def _row(section, name, a, b, better, note="") -> Row:
    diff = None if a is None or b is None else b - a
    rel = None if diff is None or not a else 100.0 * diff / a
    return Row(section, name, a, b, diff, rel, better, note)


def compare(orig: EvalSummary, pruned: EvalSummary) -> dict:
    """Rows + headline numbers for one pruned model against the original."""
    rows, warnings = [], []
    for key in list(dict.fromkeys([*orig.ppl, *pruned.ppl])):
        note = ""
        if key in orig.ppl and key in pruned.ppl and orig.ppl_protocol[key] != pruned.ppl_protocol[key]:
            note = "protocols differ"
            warnings.append(f"ppl {key}: protocols differ ({orig.ppl_protocol[key]} vs {pruned.ppl_protocol[key]})")
        rows.append(_row("perplexity", f"ppl {key}", orig.ppl.get(key), pruned.ppl.get(key), "lower", note))
    if orig.zeroshot_protocol != pruned.zeroshot_protocol and orig.tasks and pruned.tasks:
        warnings.append(f"zero-shot protocols differ: {orig.zeroshot_protocol} vs {pruned.zeroshot_protocol}")
    for task in list(dict.fromkeys([*orig.tasks, *pruned.tasks])):
        (ma, a), (mb, b) = orig.tasks.get(task, (None, None)), pruned.tasks.get(task, (None, None))
        note = "measures differ" if ma and mb and ma != mb else ""
        rows.append(_row("zero-shot", f"{task} ({ma or mb})", a, b, "higher", note))
    if orig.mean_acc is not None or pruned.mean_acc is not None:
        same = set(orig.tasks) == set(pruned.tasks)
        rows.append(_row("zero-shot", "mean accuracy", orig.mean_acc, pruned.mean_acc, "higher",
                         "" if same else "different task sets"))
    for key, name in ((schema.M_MODEL_PARAMS, "parameters"), (schema.M_MODEL_DISK_MB, "size on disk (MB)"),
                      (MODEL_MEM_MB, "weights in memory (MB)")):
        if key in orig.model or key in pruned.model:
            rows.append(_row("model", name, orig.model.get(key), pruned.model.get(key), "lower"))
    # On CPU the peak is the whole process's resident set (libraries, earlier models of the same
    # process), not the model's: compared only when both were measured on CUDA.
    cuda = all(" cuda" in (s.speed_protocol or "") for s in (orig, pruned))
    for key, name, better in ((schema.M_SPEED_PREFILL, "prefill tokens/s", "higher"),
                              (schema.M_SPEED_DECODE, "decode tokens/s", "higher"),
                              (schema.M_SPEED_LATENCY, "latency ms/token", "lower"),
                              (schema.M_SPEED_PEAK_MEM, "peak memory (MB)", "lower")):
        if key == schema.M_SPEED_PEAK_MEM and not cuda:
            continue
        if key in orig.speed or key in pruned.speed:
            rows.append(_row("speed", name, orig.speed.get(key), pruned.speed.get(key), better))
    if orig.speed and pruned.speed and orig.speed_protocol != pruned.speed_protocol:
        warnings.append("speed protocols differ")
    degradation = {k: pruned.ppl[k] / orig.ppl[k] for k in orig.ppl if k in pruned.ppl}
    po, pp = orig.model.get(schema.M_MODEL_PARAMS), pruned.model.get(schema.M_MODEL_PARAMS)
    return {"original": orig.label, "pruned": pruned.label, "rows": [asdict(r) for r in rows],
            "ppl_degradation": degradation,
            "param_reduction": (1 - pp / po) if po and pp is not None else None,
            "warnings": warnings}


# ------------------------------------------------------------------------------ rendering

def _digits(row: dict) -> str:
    """One number format per row, from the size of its values (diffs align with values)."""
    if row["name"] == "parameters":
        return ",.0f"
    big = max(abs(v) for v in (row["original"], row["pruned"], 0.0) if v is not None)
    return ",.1f" if big >= 100 else ".4f"


def _fmt(v: float | None, fmt: str, sign: bool = False) -> str:
    return "-" if v is None else format(v, ("+" if sign else "") + fmt)


def _fmt_rel(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}%"


def _table_rows(cmp: dict) -> list[list[str]]:
    out = []
    for r in cmp["rows"]:
        f = _digits(r)
        out.append([r["name"] + (f" [{r['note']}]" if r["note"] else ""), _fmt(r["original"], f),
                    _fmt(r["pruned"], f), _fmt(r["difference"], f, sign=True), _fmt_rel(r["relative_pct"])])
    return out


def _headline(cmp: dict) -> list[str]:
    out = [f"PPL degradation {k}: x{v:.3f} ({100 * (v - 1):+.1f}%)" for k, v in cmp["ppl_degradation"].items()]
    if cmp["param_reduction"] is not None:
        out.append(f"parameter reduction: {100 * cmp['param_reduction']:.2f}%")
    return out + [f"warning: {w}" for w in cmp["warnings"]]


def terminal_table(cmp: dict) -> str:
    head = ["metric", cmp["original"], cmp["pruned"], "difference", "relative %"]
    body = _table_rows(cmp)
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(5)]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep, *map(line, body), sep, *_headline(cmp)])


def markdown(report: dict) -> str:
    lines = ["# Original vs pruned", ""]
    o = report["original"]
    lines += [f"Original: **{o['label']}** (eval run `{o['run_id']}`, model `{o[schema.P_MODEL_URI]}`)", ""]
    for key, proto in o["ppl_protocol"].items():
        lines.append(f"- perplexity {key}: {proto}")
    zp = o["zeroshot_protocol"]
    if o["tasks"]:
        lines.append(f"- zero-shot: {zp.get(schema.P_NUM_FEWSHOT)}-shot, limit {zp.get(schema.P_LIMIT)}, "
                     f"score convention `{zp.get(schema.P_ACC_CONVENTION)}` (measure per task in the table)")
    if o.get(schema.P_SPEED_PROTOCOL):
        lines.append(f"- speed: {o[schema.P_SPEED_PROTOCOL]}")
    for cmp, p in zip(report["comparisons"], report["pruned"]):
        lines += ["", f"## {cmp['pruned']}", "", f"Eval run `{p['run_id']}`, model `{p[schema.P_MODEL_URI]}`", "",
                  f"| metric | {cmp['original']} | {cmp['pruned']} | difference | relative % |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {' | '.join(r)} |" for r in _table_rows(cmp)]
        lines += [""] + [f"- {h}" for h in _headline(cmp)]
    for n in report.get("notes", []):
        lines.append(f"- note: {n}")
    return "\n".join(lines) + "\n"


def figure(report: dict):
    """Perplexity (left) and zero-shot scores (right), one bar per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = [report["original"], *report["pruned"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, field_name, title, getter in (
            (axes[0], "ppl", "perplexity (lower is better)", lambda m, k: m["ppl"].get(k)),
            (axes[1], "tasks", "zero-shot score (higher is better)",
             lambda m, k: (m["tasks"].get(k) or (None, None))[1])):
        keys = list(dict.fromkeys(k for m in models for k in m[field_name]))
        width = 0.8 / max(1, len(models))
        for i, m in enumerate(models):
            vals = [getter(m, k) for k in keys]
            ax.bar(np.arange(len(keys)) + i * width, [v if v is not None else 0 for v in vals], width,
                   label=m["label"])
        ax.set_xticks(np.arange(len(keys)) + width * (len(models) - 1) / 2, keys, rotation=20, ha="right",
                      fontsize=8)
        ax.set_title(title, fontsize=9)
        if keys:      # beside the bars, never over them
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    fig.tight_layout()
    return fig


def build_report(original: EvalSummary, pruned: list[EvalSummary], notes: list[str]) -> dict:
    return {"original": asdict(original), "pruned": [asdict(p) for p in pruned],
            "comparisons": [compare(original, p) for p in pruned], "notes": notes}


# ------------------------------------------------------------------------------ entry point

def build_parser(prog: str = "compare") -> Parser:
    p = Parser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--original", type=optional_str, default=None,
                   help="eval run id, or a model (alias, dir, URI, prune/finetune run id); "
                        "default: the model the first --pruned was pruned from")
    p.add_argument("--pruned", action="append", required=True,
                   help="eval run id or model; repeat for several")
    p.add_argument("--labels", type=optional_str, default=None,
                   help="comma-separated labels: original first, then each pruned")
    p.add_argument("--output_dir", type=optional_str, default=None, help="also write the reports here")
    return p


def check_labels(args) -> list[str]:
    """Split comma lists of --pruned (MLproject passes one value) and check the labels."""
    args.pruned = [src for item in args.pruned for src in _csv(item)]
    labels = _csv(args.labels)
    if labels and len(labels) != 1 + len(args.pruned):
        raise UserError(f"{len(labels)} labels for {1 + len(args.pruned)} models",
                        "give one label for the original and one per --pruned")
    return labels


def parse(argv: list[str] | None):
    """(compare options, labels)."""
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        raise UserError(f"compare: unrecognized arguments: {' '.join(extra)}",
                        "analysis.compare reads the store only; eval flags belong to python -m prune_entry.compare")
    return args, check_labels(args)


def run(args, labels: list[str], collect_fn=None, logged: dict | None = None) -> dict:
    """Collect every source (``collect_fn(source, label, notes)``; default: from the store), compare,
    log the reports to the active analysis run and write them to ``output_dir``."""
    collect_fn = collect_fn or collect
    notes: list[str] = []
    original_src = args.original or origin_of(args.pruned[0])
    runs.log_params({"original": original_src, "pruned": ",".join(args.pruned), **(logged or {})})
    label = lambda i: labels[i] if labels else None  # noqa: E731
    original = collect_fn(original_src, label(0), notes)
    pruned = [collect_fn(src, label(i + 1), notes) for i, src in enumerate(args.pruned)]
    report = json.loads(redact(runs.dump_json(build_report(original, pruned, notes))))   # no credentials
    for cmp in report["comparisons"]:
        print(redact(terminal_table(cmp)) + "\n")
    md = redact(markdown(report))
    runs.set_tags({schema.TAG_COMPARED_RUNS: ",".join(s.run_id for s in [original, *pruned])})
    runs.log_json(report, schema.A_COMPARE_JSON)
    runs.log_text(md, schema.A_COMPARE_MD)
    runs.log_figure(figure(report), schema.A_COMPARE_FIG)
    metrics = {}
    for i, cmp in enumerate(report["comparisons"]):
        for key, val in cmp["ppl_degradation"].items():
            metrics[schema.compare_metric(i, "ppl_ratio", key)] = val
        if cmp["param_reduction"] is not None:
            metrics[schema.compare_metric(i, "param_reduction")] = cmp["param_reduction"]
    runs.log_metrics(metrics)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / schema.A_COMPARE_JSON).write_text(runs.dump_json(report))
        (out / schema.A_COMPARE_MD).write_text(md)
        print(f"reports: {out / schema.A_COMPARE_JSON}, {out / schema.A_COMPARE_MD}")
    return report


def main(argv: list[str] | None = None) -> int:
    """An analysis run in the analysis experiment: bad input -> one line, exit 2, run FAILED."""
    return runs.entry_point(schema.STAGE_ANALYSIS, lambda: parse(argv), lambda parsed: run(*parsed),
                            run_name=lambda _: schema.RUN_COMPARE, raw_params=raw_flags(argv),
                            experiment=schema.ANALYSIS_EXPERIMENT)


if __name__ == "__main__":
    raise SystemExit(main())
