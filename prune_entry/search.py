"""`search` entry point: sweeps of pruning settings, each point a nested prune (+ eval) run.

    python -m prune_entry.search --models demo --methods taylor,magnitude --ratios 0.2,0.35
    python -m prune_entry.search --config configs/sweeps/demo.yaml [--resume true] [--dry_run true]
    mlflow run . -e search -P config=configs/sweeps/demo.yaml --env-manager local

The points are the product models x methods x ratios x grid values. Every point is validated
(its flags parsed as the prune entry point would) before anything runs, so a typo fails in a
second, not after the first hour of a GPU sweep. Each point is a child prune run of the search
run (``prune.run_child``), followed when ``eval`` is on by a child eval run of its pruned model
(``evaluate.run_child``). With ``eval_dense`` (default: on with eval) every model also gets one
child eval run of the unpruned model itself, the ratio-0 baseline, with the same eval flags.
Children carry ``search_run_id`` and ``search_point`` (a hash of the point's resolved prune
settings; for dense evals of model path, "dense" and the eval key) from their start; a re-run of
the same sweep in the same experiment reuses the points that already FINISHED, so a killed sweep
continues where it stopped.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from gqaprune import data
from gqaprune.config import Section, build, flat, knob, leaves, parse_flat
from gqaprune.errors import UserError
from gqaprune.evaluation.config import EvalConfig, ppl_sources, task_plan
from gqaprune.loading import DEMO_ALIAS, resolve_model
from gqaprune.pipeline import (STRUCTURED, PruneConfig, all_methods, applicable, method_kind, readers_of,
                               unread)
from gqaprune.structured import methods
from gqaprune.structured.config import METHOD_SECTIONS, StructuredConfig
from analysis import selection
from analysis.protocol import protocol_of
from analysis.query import PRUNE_IGNORED
from prune_entry import evaluate, prune
from prune_entry.executors import EXECUTORS, ExecutorSettings, PointResult, Progress, make_executor
from tracking import cli
from tracking.cli import Parser, boolean, raw_flags
from tracking import claims, runs, schema, store
from tracking.claims import ClaimSettings
from tracking.connect import tracking_uri

AXES = {schema.P_MODEL: "models", schema.P_METHOD: "methods", schema.P_PRUNING_RATIO: "ratios"}  # PruneConfig field -> sweep key
PRUNE_FIELDS = tuple(leaf.name for leaf in leaves(PruneConfig))
# Flags a sweep sets itself (or that would make points overwrite each other).
PRUNE_RESERVED = {"output_dir": "every point keeps its model in its run's pruned_model artifact"}
EVAL_RESERVED = {schema.P_MODEL_URI: "the sweep evaluates each point's pruned model",
                 "parent_run_id": "eval runs are nested under the search run already",
                 "output_dir": "every eval run logs eval_results.json as an artifact"}
CONFIG_KEYS = ("models", "methods", "ratios", "grid", "prune_args", "eval", "eval_dense", "eval_args",
               "resume", "stop_on_error", schema.P_SELECT_BY)
DEFAULTS = {"models": ["demo"], "methods": ["taylor"], "ratios": [0.2], "grid": {}, "prune_args": {},
            "eval": False, "eval_dense": None, "eval_args": {}, "resume": True, "stop_on_error": False,
            schema.P_SELECT_BY: selection.AUTO}
DENSE = schema.LABEL_DENSE  # method label of the dense (unpruned) baseline rows
# Summary columns read from the children (schema names; ppl/<dataset> columns are added per dataset).
PRUNE_COLUMNS = (schema.M_ACHIEVED_RATIO, schema.M_PARAMS_AFTER)
DIAGNOSIS_COLUMNS = (schema.M_GRAD_NORM_RATIO, schema.M_GRAD_MEAN_RATIO, schema.M_NUM_EXTREME_LAYERS)
RATIO = schema.P_PRUNING_RATIO     # the target ratio column: the prune parameter's name
_HERE = f"{socket.gethostname()}:{os.getpid()}"   # the worker name of points run in this process
STATUS_COLUMNS = ("status", "resumed", "prune_run_id", "eval_run_id", schema.TAG_SEARCH_POINT, "error")


@dataclass(frozen=True)
class SearchConfig:
    models: tuple[str, ...]
    methods: tuple[str, ...]
    ratios: tuple[float, ...]
    grid: dict                  # prune parameter -> tuple of values (strings, as flags)
    prune_args: dict            # prune parameter -> value (string) shared by every point
    eval: bool
    eval_dense: bool            # also evaluate each unpruned model (only when eval is on)
    eval_args: dict             # eval parameter -> value (string)
    resume: bool
    stop_on_error: bool
    dry_run: bool
    config: str | None
    rule: selection.Rule = selection.Rule()   # which point is best (analysis.selection)
    executor: ExecutorSettings = ExecutorSettings()   # where the points run (not part of any key)
    claim_points: bool = False                        # claim each point in the store before running it


@dataclass
class Point:
    """One grid point: the flags of its prune (and eval) child and the keys resume looks up."""
    index: int
    model: str
    method: str
    ratio: float
    grid: dict                  # this point's values of the grid parameters
    prune: PruneConfig | None   # the point's prune settings (None for a dense eval)
    key: str                    # tag search_point: hash of the resolved PruneConfig + model path
    eval: EvalConfig | None = None
    eval_key: str | None = None  # tag search_eval_key: hash of the resolved eval flags
    calibration: str = ""        # the calibration source the prune run will read
    dense: bool = False          # the eval of the unpruned model (no prune child, ratio 0)
    given: dict = field(default_factory=dict)   # the prune settings the sweep set (as written)
    eval_given: dict = field(default_factory=dict)  # the eval settings the sweep set (as written)

    def label(self) -> str:
        if self.dense:
            return f"{_short_model(self.model)} {DENSE}"
        extra = "".join(f" {k}={v}" for k, v in self.grid.items())
        return f"{_short_model(self.model)} {self.method} {self.ratio:g}{extra}"


@dataclass
class Outcome:
    """What happened to a point: run ids, status and (for failures) the one-line reason."""
    point: Point
    status: str = "not run"     # finished | reused | failed | not run
    prune_run_id: str | None = None
    eval_run_id: str | None = None
    resumed: list = field(default_factory=list)  # stages taken over from earlier runs
    error: str = ""
    time_s: float = 0.0
    retryable: bool = True      # False: a bad setting failed it, trying again cannot help

    @property
    def ok(self) -> bool:
        return self.status in ("finished", "reused")


@dataclass(frozen=True)
class Sweep:
    config: SearchConfig
    points: list
    dense: list = field(default_factory=list)   # one dense Point per model when eval_dense

    def ordered(self) -> list:
        """Run (and summary) order: per model its dense eval first, then its points."""
        out = []
        for model in self.config.models:
            out += [d for d in self.dense if d.model == model] + [p for p in self.points if p.model == model]
        return out


# ------------------------------------------------------------------------------ flags and config

@dataclass(frozen=True)
class SearchArgs(Section):
    """search: sweeps of pruning settings, each point a nested prune (+ eval) run"""
    config: str | None = knob(None, "sweep YAML (models, methods, ratios, grid, prune_args, eval, eval_dense, "
                              "eval_args, resume, stop_on_error); command-line values override it")
    models: str | None = knob(None, "comma list of aliases / HF ids / dirs")
    methods: str | None = knob(None, "comma list of pruning methods", )
    ratios: str | None = knob(None, "comma list of pruning ratios in (0, 1)")
    grid: str | None = knob(None, 'other prune parameters to sweep, JSON/YAML: \'{"reconstruct": ["none", "lstsq"]}\'')
    prune_args: str | None = knob(None, 'prune flags shared by every point: "--reconstruct_samples 32 --seed 1" '
                                  '(method-specific ones go only to the methods that read them)')
    eval: bool | None = knob(None, "evaluate every pruned model")
    eval_dense: bool | None = knob(None, "with eval: also evaluate each unpruned model, same eval flags (default true)")
    eval_args: str | None = knob(None, 'eval flags: "--ppl_datasets wikitext2,ptb --tasks standard"')
    resume: bool | None = knob(None, "reuse points that already FINISHED in this experiment (default true)")
    stop_on_error: bool | None = knob(None, "stop (and fail the search) at the first failing point (default false)")
    select_by: str | None = knob(None, "the best point: auto (highest zeroshot/mean_acc, ties / no accuracy: lowest "
                                 "perplexity on the first dataset) or <metric>:max|min (default auto)")
    dry_run: bool = knob(False, "list the points, run nothing (no run is created)")
    verbose: bool = knob(False, "show the known-harmless library warnings (hidden and summarised by default)")
    # Where the points run (not what they are: these never enter a point's key or the YAML).
    executor: str = knob("local", "where points run: local (one at a time, in this process) or ray "
                         "(in parallel, as Ray tasks; pip install -e .[distributed])", choices=EXECUTORS)
    ray_address: str | None = knob(None, "Ray cluster to use: auto, ray://host:10001 (default: RAY_ADDRESS "
                                   "if set, else a Ray instance started on this machine for the sweep)")
    cpus_per_point: float = knob(1.0, "CPUs Ray reserves for each point", low=0.0, low_open=True)
    gpus_per_point: float | None = knob(None, "GPUs Ray reserves for each point (default 1 when the cluster "
                                        "has GPUs, else 0)", low=0.0)
    max_retries: int | None = knob(None, "tries again a point that failed (not for a bad setting) or whose "
                                   "worker died, this many times (default 1 with ray, 0 locally)", low=0)
    claim_points: str = knob("auto", "claim each point in the tracking store before running it, so two "
                             "sweeps or workers never run one point twice: true, false or auto (on with "
                             "ray or a tracking server, off for a local store)", choices=("auto", "true", "false"))


def build_parser() -> Parser:
    return cli.parser_for("search", SearchArgs)


def load_config(path: str) -> dict:
    """A sweep YAML -> dict restricted to CONFIG_KEYS."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"sweep config '{path}' not found",
                        "pass an existing YAML file, e.g. configs/sweeps/demo.yaml")
    import yaml
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"sweep config '{path}' is not valid YAML ({str(exc).splitlines()[0]})",
                        "fix the file (see configs/sweeps/demo.yaml)") from exc
    if not isinstance(raw, dict):
        raise UserError(f"sweep config '{path}' must be a mapping", f"use the keys {', '.join(CONFIG_KEYS)}")
    unknown = sorted(set(raw) - set(CONFIG_KEYS) - {"description"})
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(unknown)} in sweep config '{path}'",
                        f"use {', '.join(CONFIG_KEYS)}")
    return raw


def _flag_value(value, what: str) -> str:
    """A YAML scalar -> the string a flag takes (true/false, none, numbers as written)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, dict)):
        raise UserError(f"{what}: expected a single value, got {value!r}",
                        "sweep several values through the grid instead")
    return str(value)


def _as_list(value, what: str) -> list:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    out = [v.strip() if isinstance(v, str) else v for v in items]
    out = [v for v in out if v != "" and v is not None]
    if not out:
        raise UserError(f"{what} is empty", f"give at least one of {what}")
    return out


def _ratios(value) -> tuple[float, ...]:
    out = []
    for v in _as_list(value, "ratios"):
        try:
            r = float(v)
        except (TypeError, ValueError) as exc:
            raise UserError(f"ratio '{v}' is not a number", "pass ratios like 0.2,0.35") from exc
        if not 0.0 < r < 1.0:
            raise UserError(f"pruning ratio {r:g} is outside (0, 1)", "pass ratios like 0.2,0.35")
        out.append(r)
    return tuple(dict.fromkeys(out))


def _flags(value, what: str) -> dict:
    """``"--a 1 --b=2"`` or a mapping -> {name: value string}; every flag needs a value."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k).lstrip("-"): _flag_value(v, f"{what} {k}") for k, v in value.items()}
    tokens, out, i = shlex.split(str(value)), {}, 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise UserError(f"{what}: expected --name value, got '{tok}'", f'write {what} as "--name value ..."')
        name, eq, val = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise UserError(f"{what}: flag --{name} has no value",
                                "give every flag a value (true/false for switches)")
            val, i = tokens[i + 1], i + 1
        out[name] = val
        i += 1
    return out


def _grid(value) -> dict:
    """JSON/YAML mapping (or its text) -> {prune parameter: tuple of flag values}."""
    if value is None:
        return {}
    if isinstance(value, str):
        import yaml
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UserError(f"grid is not valid JSON/YAML ({str(exc).splitlines()[0]})",
                            'write it as \'{"reconstruct": ["none", "lstsq"]}\'') from exc
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"grid must map prune parameters to lists of values, got {value!r}",
                        'write it as \'{"reconstruct": ["none", "lstsq"]}\'')
    out = {}
    for name, values in value.items():
        values = values if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise UserError(f"grid parameter '{name}' has no values", "give it a list of at least one value")
        out[str(name)] = tuple(dict.fromkeys(_flag_value(v, f"grid {name}") for v in values))
    return out


def _check_prune_names(names, what: str) -> None:
    for name in names:
        if name in AXES:
            raise UserError(f"'{name}' in {what}: it is an axis of the sweep",
                            f"pass it as {AXES[name]} (--{AXES[name]} or the config key)")
        if name in PRUNE_RESERVED:
            raise UserError(f"'{name}' cannot be set in {what}", PRUNE_RESERVED[name])
        if name not in PRUNE_FIELDS:
            allowed = [f for f in PRUNE_FIELDS if f not in AXES and f not in PRUNE_RESERVED]
            raise UserError(f"unknown prune parameter '{name}' in {what}", f"use one of {', '.join(allowed)}")


def _check_eval_args(eval_args: dict) -> None:
    for name in eval_args:
        if name in EVAL_RESERVED:
            raise UserError(f"'{name}' cannot be set in eval_args", EVAL_RESERVED[name])
    try:  # parse on a dummy model: unknown flags and bad values fail now
        eval_config(DEMO_ALIAS, eval_args)
    except UserError as exc:
        raise UserError(f"eval_args: {exc}") from exc


def _executor_settings(args: SearchArgs) -> ExecutorSettings:
    retries = args.max_retries if args.max_retries is not None else (1 if args.executor == "ray" else 0)
    return ExecutorSettings(executor=args.executor, ray_address=args.ray_address,
                            gpus_per_point=args.gpus_per_point, cpus_per_point=args.cpus_per_point,
                            max_retries=retries)


def _claim_points(mode: str, executor: str) -> bool:
    """auto: claim when workers may compete, i.e. on Ray or on a store others share (a server or a
    database); a local sqlite / file store serves one machine, where stale runs are told by pid."""
    if mode != "auto":
        return mode == "true"
    uri = tracking_uri()
    return executor == "ray" or not (uri.startswith(("sqlite:", "file:")) or "://" not in uri)


def _argv(flags: dict) -> list[str]:
    return [tok for k, v in flags.items() for tok in (f"--{k}", str(v))]


def resolve_config(argv: list[str] | None) -> SearchConfig:
    """Defaults < config file < command line; each value checked on its own."""
    cli = vars(build_parser().parse_args(argv))
    args = build(SearchArgs, cli)      # the knobs' choices and bounds
    file = load_config(cli["config"]) if cli["config"] else {}
    raw = {k: cli[k] if cli.get(k) is not None else file.get(k, DEFAULTS[k]) for k in CONFIG_KEYS}
    grid = {**_grid(file.get("grid")), **_grid(cli["grid"])}
    prune_args = {**_flags(file.get("prune_args"), "prune_args"), **_flags(cli["prune_args"], "prune_args")}
    eval_args = {**_flags(file.get("eval_args"), "eval_args"), **_flags(cli["eval_args"], "eval_args")}
    cfg = SearchConfig(
        models=tuple(dict.fromkeys(str(m) for m in _as_list(raw["models"], "models"))),
        methods=tuple(dict.fromkeys(str(m) for m in _as_list(raw["methods"], "methods"))),
        ratios=_ratios(raw["ratios"]), grid=grid,
        prune_args={k: v for k, v in prune_args.items() if k not in grid}, eval=_bool(raw["eval"], "eval"),
        eval_dense=_bool(raw["eval"], "eval") and (raw["eval_dense"] is None
                                                    or _bool(raw["eval_dense"], "eval_dense")),
        eval_args=eval_args, resume=_bool(raw["resume"], "resume"),
        stop_on_error=_bool(raw["stop_on_error"], "stop_on_error"), dry_run=cli["dry_run"],
        config=cli["config"], rule=selection.Rule.parse(str(raw[schema.P_SELECT_BY])),
        executor=_executor_settings(args), claim_points=_claim_points(args.claim_points, args.executor))
    for m in cfg.methods:
        if m not in all_methods():
            raise UserError(f"unknown method '{m}'", f"use one of {', '.join(all_methods())}")
    _check_prune_names(cfg.grid, "grid")
    _check_prune_names(cfg.prune_args, "prune_args")
    for model in cfg.models:
        resolve_model(model, cfg.prune_args.get("models_file"))
    if cfg.eval:
        _check_eval_args(cfg.eval_args)
        if not boolean(cfg.prune_args.get("save_model", "true")):
            raise UserError("eval is on but prune_args sets save_model false (nothing to evaluate)",
                            "drop save_model from prune_args or turn eval off")
    return cfg


def _bool(value, what: str) -> bool:
    try:
        return value if isinstance(value, bool) else boolean(str(value))
    except Exception as exc:  # noqa: BLE001 - argparse's ArgumentTypeError
        raise UserError(f"{what}: expected true or false, got '{value}'", f"set {what} to true or false") from exc


# ------------------------------------------------------------------------------ the points

def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _short_model(model: str) -> str:
    return Path(model).name if Path(model).expanduser().is_dir() else model


def eval_flags_for(model: str, eval_args: dict, models_file: str | None) -> dict:
    """The eval flags of one model's points, with ``auto`` datasets/tasks made explicit.

    The eval run sees a pruned checkpoint (a directory), not the alias, so its ``auto`` would pick
    the hub defaults even for the demo model; the search resolves ``auto`` for the original model.
    """
    cfg = eval_config(DEMO_ALIAS, eval_args)
    if resolve_model(model, models_file).alias != DEMO_ALIAS:
        return dict(eval_args)
    out = dict(eval_args)
    if cfg.ppl.ppl_datasets.strip().lower() == "auto":
        out["ppl_datasets"] = ",".join(k if k == s else f"{k}={s}" for k, s in ppl_sources(cfg, True))
    if cfg.zeroshot.tasks.strip().lower() == "auto":
        out["tasks"] = ",".join(task_plan(cfg, True)[0]) or "none"
    return out


def eval_config(model_uri: str, eval_flags: dict) -> EvalConfig:
    """The eval settings of a point: the sweep's eval flags, parsed as the eval command line would."""
    return evaluate.parse(["--model_uri", model_uri, *_argv(eval_flags)])


def _eval_key(cfg: EvalConfig) -> str:
    values = flat(cfg)
    for name in EVAL_RESERVED:
        values.pop(name, None)
    return _hash(values)


def _point_key(resolved: PruneConfig, model_path: str) -> str:
    """Hash of the resolved prune settings (as every release so far has hashed them: the flat
    leaves, without leaves added later at their default) and the model path."""
    values = {k: v for k, v in flat(resolved).items() if KEY_ADDED_LATER.get(k, _NO_DEFAULT) != v}
    return _hash({**values, schema.TAG_MODEL_PATH: model_path})


# Leaves added after sweeps were first keyed, with the default that reproduces the old behaviour:
# at that default they stay out of the key, so earlier sweeps' points are still found and reused.
_NO_DEFAULT = object()
KEY_ADDED_LATER = {"scorer": methods.AUTO, "reconstruct_stats_dtype": "float64"}


def plan_points(cfg: SearchConfig) -> list[Point]:
    """Every point as a validated PruneConfig (bad points fail here). Method-specific settings go
    only to the methods that read them; a setting no method of the sweep reads is refused."""
    grid_names = list(cfg.grid)
    _check_applies(cfg)
    models_file = cfg.prune_args.get("models_file")
    eval_for = {m: eval_flags_for(m, cfg.eval_args, models_file) for m in cfg.models} if cfg.eval else {}
    points, seen = [], {}
    combos = itertools.product(cfg.models, cfg.methods, cfg.ratios, *(cfg.grid[g] for g in grid_names))
    for index, (model, method, ratio, *values) in enumerate(combos):
        grid = dict(zip(grid_names, values))
        # the ratio axis is pruning_ratio for structured methods and the target sparsity for sparsity ones
        axis = RATIO if method_kind(method) == STRUCTURED else schema.P_SPARSITY
        raw = {schema.P_MODEL: model, schema.P_METHOD: method, axis: ratio, **cfg.prune_args, **grid}
        point = Point(index, model, method, ratio, grid, None, key="")
        try:
            point.prune, dropped = applicable(parse_flat(PruneConfig, raw))   # shared args: only what applies
            prune.preflight(point.prune)
        except UserError as exc:
            raise UserError(f"sweep point '{point.label()}': {exc}") from exc
        skip = set(dropped) | unread(point.prune)
        point.grid = own_grid = {k: v for k, v in grid.items() if k not in skip}
        point.given = {k: v for k, v in raw.items() if k not in dropped}
        spec = resolve_model(model, point.prune.model.models_file)
        point.key = _point_key(point.prune, spec.path)
        point.calibration = point.prune.calibration.source(spec.alias)
        if point.key in seen:
            if own_grid != grid:     # a grid value this method does not read: one point is enough
                continue
            raise UserError(f"points '{seen[point.key]}' and '{point.label()}' are the same prune run",
                            "remove the duplicate model / method / ratio / grid value")
        seen[point.key] = point.label()
        if cfg.eval:
            point.eval_given = eval_for[model]
            point.eval = eval_config(DEMO_ALIAS, point.eval_given)
            point.eval_key = _eval_key(point.eval)
        points.append(point)
    for i, p in enumerate(points):
        p.index = i
    return points


def _check_applies(cfg: SearchConfig) -> None:
    """A method-specific setting (prune_args or grid) that none of the sweep's methods reads."""
    given = set(cfg.prune_args) | set(cfg.grid)
    scorer = cfg.prune_args.get("scorer", methods.AUTO)
    unused = []
    for section in METHOD_SECTIONS:
        names = {leaf.name for leaf in leaves(type(getattr(StructuredConfig(), section)))} & given
        if names and not any(section in methods.resolve(m, scorer).sections for m in cfg.methods
                             if method_kind(m) == STRUCTURED):
            unused += sorted(names)
            readers = readers_of(section)
    if unused:
        raise UserError(f"{', '.join(unused)} apply to none of the sweep's methods ({', '.join(cfg.methods)})",
                        f"drop them, or add a method that reads them ({', '.join(readers)})")


def plan_dense(cfg: SearchConfig, points: list[Point]) -> list[Point]:
    """One eval of each unpruned model, with the eval flags of that model's points.

    Its ``search_point`` hashes (model path, "dense", eval key), so resume reuses a FINISHED dense
    eval with the same flags and re-runs it when they change.
    """
    if not cfg.eval_dense:
        return []
    models_file = cfg.prune_args.get("models_file")
    out = []
    for i, model in enumerate(cfg.models):
        first = next(p for p in points if p.model == model)
        given = dict(first.eval_given)
        if models_file and "models_file" not in cfg.eval_args:  # the eval resolves the alias itself
            given["models_file"] = models_file
        path = resolve_model(model, models_file).path
        out.append(Point(i, model, DENSE, 0.0, {}, None, key=_hash([path, DENSE, first.eval_key]),
                         eval=eval_config(DEMO_ALIAS, given), eval_key=first.eval_key, dense=True,
                         eval_given=given))
    return out


def parse(argv: list[str] | None) -> Sweep:
    cfg = resolve_config(argv)
    points = plan_points(cfg)
    return Sweep(cfg, points, plan_dense(cfg, points))


def preflight(sweep: Sweep) -> None:
    """Data the children will need (calibration, perplexity, zero-shot task datasets: local copies
    or the hub), checked once before the first point runs, so a typo or an offline hub fails in
    seconds, not after the first prune."""
    missing = []
    for p in sweep.points:
        if not p.prune.needs_calibration or p.calibration in missing:
            continue
        try:
            data.check_source(p.calibration, "train", p.prune.data.resolve())
        except UserError:
            missing.append(p.calibration)
    if missing:
        raise UserError(f"calibration dataset(s) {', '.join(missing)} are on the Hugging Face hub, which is "
                        "not reachable (offline), and the data dir has no copy", "add calibration_dataset="
                        "<local .txt/.jsonl file> or data_dir=<local copies> to prune_args, or run where the "
                        "hub is reachable")
    if not sweep.config.eval:
        return
    for model in sweep.config.models:
        cfg = next(p.eval for p in sweep.points if p.model == model)
        ppl_sources(cfg, is_demo=False)   # the eval run sees a pruned checkpoint
        names, to_build = task_plan(cfg, is_demo=False)
        evaluate.prepare_tasks(cfg, names, to_build, log=False)   # offline hub tasks fail now


# ------------------------------------------------------------------------------ resume

def _child_tags(search_id: str, point: Point, stage: str) -> dict:
    tags = {schema.TAG_SEARCH_RUN: search_id, schema.TAG_SEARCH_POINT: point.key}
    if stage == schema.STAGE_EVAL:  # name it by the point, not by the artifact path "pruned_model"
        tags[schema.TAG_SEARCH_EVAL_KEY] = point.eval_key
        tags[schema.TAG_RUN_NAME] = "eval-" + point.label().replace(" ", "-")
    return tags


def finished_prune(experiment_id: str, point: Point) -> str | None:
    found = store.find_runs(experiment_id, {schema.TAG_STAGE: schema.STAGE_PRUNE,
                                            schema.TAG_SEARCH_POINT: point.key})
    return found[0].info.run_id if found else None


def finished_eval(experiment_id: str, point: Point, prune_id: str) -> str | None:
    found = store.find_runs(experiment_id, {schema.TAG_STAGE: schema.STAGE_EVAL,
                                            schema.TAG_SEARCH_POINT: point.key,
                                            schema.TAG_SEARCH_EVAL_KEY: point.eval_key,
                                            schema.TAG_SOURCE_RUN: prune_id})
    return found[0].info.run_id if found else None


def finished_dense(experiment_id: str, point: Point) -> str | None:
    found = store.find_runs(experiment_id, {schema.TAG_STAGE: schema.STAGE_EVAL,
                                            schema.TAG_SEARCH_POINT: point.key,
                                            schema.TAG_SEARCH_EVAL_KEY: point.eval_key})
    return found[0].info.run_id if found else None


def _failed_child(experiment_id: str, search_id: str, point: Point, stage: str) -> str | None:
    """The run of a child that raised (child_run returns no id then): found by the tags it got
    at its start."""
    found = store.find_runs(experiment_id, {schema.TAG_SEARCH_RUN: search_id, schema.TAG_STAGE: stage,
                                            schema.TAG_SEARCH_POINT: point.key}, status=None)
    return found[0].info.run_id if found else None


# ------------------------------------------------------------------------------ running points

def _reason(exc: Exception) -> str:
    if isinstance(exc, UserError):
        return str(exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"


def _child(stage: str, launch, experiment_id: str, search_id: str, point: Point, out: Outcome):
    """Launch one child tagged with its point from birth (``launch(tags)``); return its run id.
    A failure is recorded on ``out`` (a bad setting as not retryable). A KeyboardInterrupt leaves
    the child KILLED, tagged, and stops the sweep."""
    try:
        return launch(_child_tags(search_id, point, stage))
    except Exception as exc:  # noqa: BLE001 - one failing point must not stop the sweep
        out.status, out.error, out.retryable = "failed", f"{stage}: {_reason(exc)}", not isinstance(exc, UserError)
        return _failed_child(experiment_id, search_id, point, stage)


def run_point(point: Point, sweep: Sweep, experiment_id: str, search_id: str) -> Outcome:
    """Prune (unless a finished run exists and resume is on), then evaluate (likewise)."""
    cfg, out, t0 = sweep.config, Outcome(point), time.perf_counter()
    out.prune_run_id = finished_prune(experiment_id, point) if cfg.resume else None
    if out.prune_run_id:
        out.resumed.append(schema.STAGE_PRUNE)
    else:
        out.prune_run_id = _child(schema.STAGE_PRUNE, lambda tags: prune.run_child(point.prune, tags, search_id),
                                  experiment_id, search_id, point, out)
    if cfg.eval and out.status != "failed":
        out.eval_run_id = finished_eval(experiment_id, point, out.prune_run_id) if cfg.resume else None
        if out.eval_run_id:
            out.resumed.append(schema.STAGE_EVAL)
        else:
            uri = f"runs:/{out.prune_run_id}/{schema.A_PRUNED_MODEL}"
            out.eval_run_id = _child(schema.STAGE_EVAL,
                                     lambda tags: evaluate.run_child(uri, point.eval, tags, parent_run_id=search_id),
                                     experiment_id, search_id, point, out)
    if out.status != "failed":
        wanted = 2 if cfg.eval else 1
        out.status = "reused" if len(out.resumed) == wanted else "finished"
    out.time_s = time.perf_counter() - t0
    return out


def run_dense(point: Point, sweep: Sweep, experiment_id: str, search_id: str) -> Outcome:
    """Evaluate the unpruned model as given (alias / dir), unless a finished eval can be reused."""
    out, t0 = Outcome(point), time.perf_counter()
    out.eval_run_id = finished_dense(experiment_id, point) if sweep.config.resume else None
    if out.eval_run_id:
        out.resumed.append(schema.STAGE_EVAL)
        out.status = "reused"
    else:
        out.eval_run_id = _child(schema.STAGE_EVAL,
                                 lambda tags: evaluate.run_child(point.model, point.eval, tags, parent_run_id=search_id),
                                 experiment_id, search_id, point, out)
        if out.status != "failed":
            out.status = "finished"
    out.time_s = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------ summary

def _metrics(run_id: str | None) -> tuple[dict, dict]:
    if not run_id:
        return {}, {}
    run = store.get_run(run_id)
    return run.data.metrics, run.data.params


def summary_rows(outcomes: list[Outcome]) -> pd.DataFrame:
    """One row per point (and dense eval), values read back from the children's runs in the store:
    model, method, ratio, grid values, achieved ratio, parameters, the gradient diagnosis of the
    prune run (Taylor scores), each ``ppl/<dataset>``, ``zeroshot/mean_acc``, each task's score
    (``<task>/<measure>``, the measure the eval used), the eval's perplexity datasets in order,
    status and run ids."""
    rows = []
    grid_names = list(dict.fromkeys(g for o in outcomes for g in o.point.grid))
    for o in outcomes:
        p = o.point
        row = {"model": p.model, "method": p.method, RATIO: p.ratio, **{g: p.grid.get(g) for g in grid_names}}
        pm, _ = _metrics(o.prune_run_id if o.status != "not run" else None)
        em, ep = _metrics(o.eval_run_id)
        if p.dense and o.ok:  # the baseline: nothing removed, its size measured by the eval
            pm = {schema.M_ACHIEVED_RATIO: 0.0, schema.M_PARAMS_AFTER: em.get(schema.M_MODEL_PARAMS)}
        for name in PRUNE_COLUMNS + DIAGNOSIS_COLUMNS:
            row[name] = pm.get(name)
        for key in [k for k in ep.get(schema.P_PPL_RUN, "").split(",") if k]:
            row[schema.ppl_metric(key)] = em.get(schema.ppl_metric(key))
        row[schema.M_ZS_MEAN] = em.get(schema.M_ZS_MEAN)
        for metric in schema.zeroshot_task_metrics(ep.get(schema.P_TASK_MEASURES)).values():
            row[metric] = em.get(metric)
        row[schema.P_PPL_RUN] = ep.get(schema.P_PPL_RUN)
        row.update(status=o.status, resumed="+".join(o.resumed), prune_run_id=o.prune_run_id,
                   eval_run_id=o.eval_run_id, search_point=p.key, error=o.error)
        rows.append(row)
    frame = pd.DataFrame(rows)
    ppl_cols = sorted(c for c in frame.columns if schema.is_ppl(c))
    task_cols = [c for c in frame.columns if c not in ppl_cols and schema.parse(c).group
                 and c != schema.M_ZS_MEAN and frame[c].notna().any()]
    diag = [c for c in DIAGNOSIS_COLUMNS if frame[c].notna().any()]
    front = ["model", "method", RATIO, *grid_names, *PRUNE_COLUMNS, *diag]
    tail = [schema.M_ZS_MEAN] if frame[schema.M_ZS_MEAN].notna().any() else []
    ppl_run = [schema.P_PPL_RUN] if frame[schema.P_PPL_RUN].notna().any() else []
    return frame[front + ppl_cols + tail + task_cols + ppl_run + list(STATUS_COLUMNS)]


def grid_columns(frame: pd.DataFrame) -> list[str]:
    """The grid parameters of a summary frame (the columns between the ratio and the measurements)."""
    cols = list(frame.columns)
    end = cols.index(PRUNE_COLUMNS[0]) if PRUNE_COLUMNS[0] in cols else len(cols)
    return cols[cols.index(RATIO) + 1:end]


def _fmt(column: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if column.endswith("_run_id"):
        return str(value)[:8]
    if column == schema.M_PARAMS_AFTER:
        return f"{int(value):,}"
    if schema.is_ppl(column):
        return f"{value:.2f}"
    if column in (schema.M_ACHIEVED_RATIO, schema.M_ZS_MEAN) or schema.parse(column).group:
        return f"{value:.4f}"
    if column in (schema.M_GRAD_NORM_RATIO, schema.M_GRAD_MEAN_RATIO):
        return f"{value:.3g}"
    if column == schema.M_NUM_EXTREME_LAYERS:
        return f"{int(value)}"
    if column == "model":
        return _short_model(str(value))
    return str(value)


def markdown_table(frame: pd.DataFrame, drop=(schema.TAG_SEARCH_POINT, schema.P_PPL_RUN)) -> str:
    cols = [c for c in frame.columns if c not in drop and not (c == "error" and not frame[c].astype(bool).any())]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(c, row[c]).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines)


def protocol_text(outcomes: list[Outcome]) -> str:
    """How the numbers were measured, from the first eval run that has them (all share the flags
    of their model)."""
    lines = [f"- `{schema.M_ACHIEVED_RATIO}`: fraction of prunable (attention + MLP) parameters removed; "
             f"`{schema.M_PARAMS_AFTER}`: all parameters of the pruned model (method `{DENSE}`: the "
             f"unpruned model as given, evaluated with the same eval flags; its `{schema.M_MODEL_PARAMS}`)."]
    seen = set()
    for o in outcomes:
        _, params = _metrics(o.eval_run_id)
        for key in [k for k in params.get(schema.P_PPL_RUN, "").split(",") if k]:
            text = params.get(schema.P_PPL_PROTOCOL.format(dataset=key))
            if text and (key, text) not in seen:
                seen.add((key, text))
                lines.append(f"- `{schema.ppl_metric(key)}` ({_short_model(o.point.model)}): {text}")
        if params.get(schema.P_TASKS_RUN) and ("zs", o.point.model) not in seen:
            seen.add(("zs", o.point.model))
            lines.append(f"- `{schema.M_ZS_MEAN}` ({_short_model(o.point.model)}): mean over "
                         f"{params.get(schema.P_TASK_MEASURES)}; convention "
                         f"{params.get(schema.P_ACC_CONVENTION)}, {params.get(schema.P_NUM_FEWSHOT)}-shot, "
                         f"limit {params.get(schema.P_LIMIT)}")
    return "\n".join(lines)


def ppl_figure(frame: pd.DataFrame):
    """Perplexity vs achieved ratio: one panel per (ppl dataset, model), one line per method (and
    grid setting), the dense model as the ratio-0 point with a dotted reference line. None when no
    point has a perplexity."""
    ppl_cols = [c for c in frame.columns if schema.is_ppl(c) and frame[c].notna().any()]
    if not ppl_cols:
        return None
    from matplotlib.ticker import PercentFormatter

    from gqaprune.plots import legend_outside, plt, set_title
    models = list(dict.fromkeys(frame["model"]))
    fig, axes = plt.subplots(len(ppl_cols), len(models), figsize=(4.2 * len(models) + 1, 3.4 * len(ppl_cols)),
                             squeeze=False)
    grid_cols = grid_columns(frame)
    for r, col in enumerate(ppl_cols):
        for c, model in enumerate(models):
            ax = axes[r][c]
            sub = frame[(frame["model"] == model) & frame[col].notna()]
            for value in sub.loc[sub["method"] == DENSE, col]:  # the ratio-0 reference
                ax.axhline(value, color="gray", ls=":", lw=1)
                ax.plot([0.0], [value], marker="s", color="black", ls="none", label=f"{DENSE} ({value:.2f})",
                        clip_on=False, zorder=3)
            for series, part in sub[sub["method"] != DENSE].groupby(["method", *grid_cols], sort=False,
                                                                     dropna=False):
                series = series if isinstance(series, tuple) else (series,)
                label = series[0] + "".join(f", {g}={v}" for g, v in zip(grid_cols, series[1:]) if pd.notna(v))
                x = part[schema.M_ACHIEVED_RATIO].fillna(part[RATIO])
                order = x.argsort()
                ax.plot(x.iloc[order], part[col].iloc[order], marker="o", label=label)
            values = sub[col]
            if len(values) and values.max() / max(values.min(), 1e-9) > 5:
                ax.set_yscale("log")
            ax.set_xlim(0, min(1.0, float(sub[RATIO].max() if len(sub) else 0.5) + 0.1))
            ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            set_title(ax, f"{_short_model(model)} · {col}")
            ax.set_xlabel("prunable parameters removed (achieved)")
            ax.set_ylabel(col)
            ax.grid(alpha=0.3)
            if len(sub):
                legend_outside(ax, fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ the best point

START = "_eval_start"   # selection tie-break column: the eval run's start time
KIND = schema.TAG_RATIO_KIND   # selection group column: structured and sparsity ratios never compete


def ratio_kind(method: str) -> str:
    return schema.RATIO_STRUCTURED if method_kind(method) == STRUCTURED else schema.RATIO_SPARSITY


def candidates(frame: pd.DataFrame, outcomes: list[Outcome]) -> pd.DataFrame:
    """The evaluated grid points (not the dense baselines) as selection candidates."""
    keep = [i for i, o in enumerate(outcomes) if o.ok and not o.point.dense and o.eval_run_id]
    rows = frame.iloc[keep].copy()
    rows[START] = [store.get_run(outcomes[i].eval_run_id).info.start_time for i in keep]
    rows["_outcome"] = keep
    rows[KIND] = [ratio_kind(outcomes[i].point.method) for i in keep]
    return rows


def best_config(best: selection.Best, outcome: Outcome, sweep: Sweep) -> selection.BestConfig:
    """The best point as best_config.json writes it: swept (grid) values, every fixed prune
    setting of its resolved config, the metrics it won with, how they were measured."""
    p = outcome.point
    spec = resolve_model(p.model, p.prune.model.models_file)
    swept = {k: selection.typed_value(v) for k, v in p.grid.items()}
    fixed = {k: v for k, v in flat(p.prune).items()
             if k not in swept and k not in AXES and k not in PRUNE_IGNORED}
    row = best.row
    won = best.metrics()
    measured = [c for c in row.index if (schema.is_ppl(c) or schema.parse(c).group or c in PRUNE_COLUMNS
                                         or c in DIAGNOSIS_COLUMNS or c == schema.M_ZS_MEAN)
                and isinstance(row[c], (int, float)) and not pd.isna(row[c])]
    metrics = {**won, **{c: float(row[c]) for c in measured if c not in won}}
    em, params = _metrics(outcome.eval_run_id)
    protocol = {k.metric: protocol_of(k.metric, {**params, **em}, counts=True) for k in best.keys}
    return selection.BestConfig(model=p.model, model_path=spec.path, family=spec.family, variant=spec.variant,
                                method=p.method, pruning_ratio=p.ratio, stage=schema.LABEL_PRUNED, swept=swept,
                                fixed=fixed, metrics=metrics, won_by=best.won_by, candidates=best.candidates,
                                excluded=best.excluded, tied=best.tied, prune_run_id=outcome.prune_run_id,
                                eval_run_id=outcome.eval_run_id, protocol=protocol,
                                ratio_kind=ratio_kind(p.method))


def choose_best(frame: pd.DataFrame, outcomes: list[Outcome], sweep: Sweep) -> tuple[dict, list]:
    """The best point of every (model, ratio) under the selection rule -> (best_config.json, bests)."""
    rule = sweep.config.rule
    rows = candidates(frame, outcomes)
    notes = []
    if not sweep.config.eval:
        notes.append("eval is off: nothing was measured, so no point is best (turn eval on)")
    sel = selection.select(rows, rule, ["model", RATIO, KIND], order=[START, "eval_run_id"],
                           label=lambda g: f"{_short_model(g['model'])} {_ratio_word(g[KIND])} {g[RATIO]:g}")
    groups = {(p.model, p.ratio, ratio_kind(p.method)) for p in sweep.points}
    key = lambda g: (g["model"], g[RATIO], g[KIND])  # noqa: E731
    done = {key(b.group) for b in sel.best} | {key(g) for g, _ in sel.missing}
    missing = list(sel.missing) + [({"model": m, RATIO: r, KIND: k}, "no point of this group finished its eval")
                                   for m, r, k in sorted(groups - done)]
    bests = [(b, best_config(b, outcomes[int(b.row["_outcome"])], sweep)) for b in sel.best]
    doc = selection.document(rule, [c for _, c in bests], missing, notes + sel.notes)
    return doc, bests


def _ratio_word(kind: str) -> str:
    return "sparsity" if kind == schema.RATIO_SPARSITY else "ratio"


def log_best(doc: dict, bests: list, sweep: Sweep) -> str:
    """best_config.json, the best_run_id tags and the Markdown lines of the summary."""
    runs.log_json(doc, schema.A_BEST_CONFIG)
    runs.log_params({schema.P_SELECTION_RULE: sweep.config.rule.describe()})
    tags = {}
    for _, cfg in bests:
        sparse = "_sparsity" if cfg.ratio_kind == schema.RATIO_SPARSITY else ""
        group = f"{_short_model(cfg.model)}_{cfg.pruning_ratio:g}{sparse}"
        tags[schema.best_run_tag(group)] = cfg.prune_run_id
        tags[schema.best_run_tag(group, eval_run=True)] = cfg.eval_run_id
    if len({(p.model, p.ratio, ratio_kind(p.method)) for p in sweep.points}) == 1 and bests:
        tags[schema.TAG_BEST_RUN], tags[schema.TAG_BEST_EVAL_RUN] = bests[0][1].prune_run_id, bests[0][1].eval_run_id
    runs.set_tags(tags)
    lines = [f"Selection rule: {sweep.config.rule.describe()}.", ""]
    for _, cfg in bests:
        won = ", ".join(f"`{k}` {v:.4g}" for k, v in cfg.metrics.items() if k in cfg.won_by)
        swept = ", ".join(f"{k}={v}" for k, v in cfg.swept.items())
        lines.append(f"- **{_short_model(cfg.model)}, {_ratio_word(cfg.ratio_kind)} {cfg.pruning_ratio:g}**: {cfg.method}"
                     f"{' ' + swept if swept else ''} — won by {won} (of {cfg.candidates} points"
                     f"{f', {cfg.excluded} excluded' if cfg.excluded else ''}); prune run `{cfg.prune_run_id}`, "
                     f"eval run `{cfg.eval_run_id}`")
    for item in doc["no_best"]:
        lines.append(f"- no best for {', '.join(f'{k}={v}' for k, v in item['group'].items())}: {item['reason']}")
    lines += [f"- note: {n}" for n in doc["notes"]]
    return "\n".join(lines)


def log_summary(frame: pd.DataFrame, outcomes: list[Outcome], elapsed: float, best_md: str = "") -> str:
    table = markdown_table(frame)
    best = f"## Best configuration\n\n{best_md}\n\n" if best_md else ""
    md = (f"# Search summary\n\n{table}\n\n{best}## How the numbers were measured\n\n{protocol_text(outcomes)}\n\n"
          f"Statuses: finished = run now; reused = taken from earlier FINISHED runs with the same "
          f"`{schema.TAG_SEARCH_POINT}` (column `resumed` says which stages); failed = see `error`; "
          f"method `{DENSE}` = the unpruned model (pruning_ratio 0); "
          f"not run = after a stop_on_error stop.\n")
    runs.log_table(frame, schema.A_SEARCH_SUMMARY)
    runs.log_text(md, schema.A_SEARCH_SUMMARY_MD)
    fig = ppl_figure(frame)
    if fig is not None:
        runs.log_figure(fig, schema.A_SEARCH_FIG)
    grid = [o for o in outcomes if not o.point.dense]
    dense = [o for o in outcomes if o.point.dense]
    runs.log_metrics({schema.M_SEARCH_FINISHED: sum(o.ok for o in grid),
                      schema.M_SEARCH_REUSED: sum(o.status == "reused" for o in grid),
                      schema.M_SEARCH_FAILED: sum(o.status == "failed" for o in grid),
                      schema.M_SEARCH_DENSE: len(dense),
                      schema.M_SEARCH_DENSE_FAILED: sum(o.status == "failed" for o in dense),
                      schema.M_SEARCH_TIME: elapsed})
    return table


# ------------------------------------------------------------------------------ the run

def _params(cfg: SearchConfig) -> dict:
    """The resolved sweep (config file + command line) as ``sweep/<name>`` params; ``mlflow run``
    logs the typed ``-P`` values (often ``none``) under the plain names already."""
    values = {"config": cfg.config, "models": ",".join(cfg.models), "methods": ",".join(cfg.methods),
              "ratios": ",".join(f"{r:g}" for r in cfg.ratios),
              "grid": json.dumps({k: list(v) for k, v in cfg.grid.items()}),
              "prune_args": shlex.join(_argv(cfg.prune_args)), "eval": cfg.eval, "eval_dense": cfg.eval_dense,
              "eval_args": shlex.join(_argv(cfg.eval_args)), "resume": cfg.resume,
              "stop_on_error": cfg.stop_on_error, "dry_run": cfg.dry_run,
              "executor": cfg.executor.executor, "ray_address": cfg.executor.ray_address,
              "cpus_per_point": cfg.executor.cpus_per_point, "gpus_per_point": cfg.executor.gpus_per_point,
              "max_retries": cfg.executor.max_retries, "claim_points": cfg.claim_points,
              schema.P_SELECT_BY: cfg.rule.select_by}
    return {schema.P_SWEEP.format(name=k): v for k, v in values.items()}


def _plan_dict(sweep: Sweep) -> list[dict]:
    """The grid points in order, then the dense evals (``"dense": true``, no prune args)."""
    return [{"index": p.index, "label": p.label(), "model": p.model, "method": p.method,
             RATIO: p.ratio, "grid": p.grid, schema.TAG_SEARCH_POINT: p.key,
             "prune_args": _argv(p.given) if p.prune else [], "eval_args": _argv(p.eval_given) if p.eval else None,
             schema.TAG_SEARCH_EVAL_KEY: p.eval_key, "dense": p.dense}
            for p in sweep.points + sweep.dense]


def dry_run(sweep: Sweep, experiment_id: str | None) -> None:
    """Print the points and which a real run would reuse (no MLflow run is created)."""
    rows, resume = [], sweep.config.resume and experiment_id is not None
    for n, p in enumerate(sweep.ordered(), 1):
        if p.dense:
            prune_id, eval_id = None, finished_dense(experiment_id, p) if resume else None
        else:
            prune_id = finished_prune(experiment_id, p) if resume else None
            eval_id = finished_eval(experiment_id, p, prune_id) if prune_id and p.eval_key else None
        reuse = "+".join(s for s, r in ((schema.STAGE_PRUNE, prune_id), (schema.STAGE_EVAL, eval_id)) if r)
        rows.append({"#": n, "model": p.model, "method": p.method, RATIO: p.ratio,
                     **{g: p.grid.get(g) for g in sweep.config.grid}, "would_reuse": reuse, "prune_run_id": prune_id, schema.TAG_SEARCH_POINT: p.key})
    table = markdown_table(pd.DataFrame(rows), drop=())
    dense = f" + {len(sweep.dense)} dense eval(s)" if sweep.dense else ""
    print(f"dry run: {len(sweep.points)} point(s){dense}, nothing pruned, no run created\n{table}")


def run_any(sweep: Sweep, experiment_id: str, search_id: str, point: Point) -> Outcome:
    """One point, in this process or a Ray worker (the executor's ``work``). Holding the point's
    claim proves no live worker runs it, so its runs still RUNNING are orphans of a dead one."""
    held = claims.current()
    if held is not None:
        held.end_orphans({schema.TAG_SEARCH_POINT: point.key})
    return (run_dense if point.dense else run_point)(point, sweep, experiment_id, search_id)


def run(sweep: Sweep) -> list[Outcome]:
    cfg, points = sweep.config, sweep.points
    runs.log_params(_params(cfg))
    runs.log_metrics({schema.M_SEARCH_POINTS: len(points)})
    runs.log_json(_plan_dict(sweep), schema.A_SEARCH_PLAN)
    import mlflow
    active = mlflow.active_run()
    experiment_id, search_id = active.info.experiment_id, active.info.run_id
    preflight(sweep)
    from tqdm.auto import tqdm
    order = sweep.ordered()
    outcomes = {p.key: Outcome(p) for p in order}
    t0, stopped, done = time.perf_counter(), [], [0]

    def on_done(result: PointResult) -> bool:
        o = result.value if isinstance(result.value, Outcome) else \
            Outcome(result.point, status="failed", error=result.error)   # the worker died or raised
        outcomes[o.point.key] = o
        done[0] += 1
        tqdm.write(_point_line(o, done[0], len(order), result))
        if cfg.stop_on_error and not o.ok and not o.point.dense:  # a failed baseline does not stop it
            stopped.append(o)
            return True
        return False

    def on_progress(p: Progress) -> None:
        try:
            runs.log_metrics(p.metrics(), step=p.completed + p.failed)
        except Exception as exc:  # noqa: BLE001 - live counts are a convenience, never stop a sweep
            print(f"search: live counts not logged ({type(exc).__name__})", file=sys.stderr)

    claim = ClaimSettings(experiment_id) if cfg.claim_points else None
    work = functools.partial(run_any, sweep, experiment_id, search_id)
    make_executor(cfg.executor, claim).run(order, work, on_done=on_done, on_progress=on_progress)
    outcomes = [outcomes[p.key] for p in order]
    frame = summary_rows(outcomes)
    doc, bests = choose_best(frame, outcomes, sweep)
    best_md = log_best(doc, bests, sweep)
    table = log_summary(frame, outcomes, time.perf_counter() - t0, best_md)
    grid = [o for o in outcomes if not o.point.dense]
    dense = f", {sum(o.ok for o in outcomes if o.point.dense)}/{len(sweep.dense)} dense evals ok" if sweep.dense else ""
    print(f"\nsearch summary ({sum(o.ok for o in grid)}/{len(points)} points ok{dense}, "
          f"{time.perf_counter() - t0:.0f}s):\n{table}\n\nbest configuration:\n{best_md}")
    failed = [o for o in outcomes if o.status == "failed"]
    if stopped:
        raise UserError(f"stopped at point '{stopped[0].point.label()}' (stop_on_error): {stopped[0].error}",
                        f"see {schema.A_SEARCH_SUMMARY_MD}; fix it and re-run (finished points are reused)")
    if not any(o.ok for o in grid):
        failed_grid = [o for o in grid if o.status == "failed"]
        raise UserError(f"all {len(points)} points failed: " + "; ".join(
            f"'{o.point.label()}' ({o.error})" for o in failed_grid[:5]) + (" ..." if len(failed_grid) > 5 else ""),
            f"see {schema.A_SEARCH_SUMMARY_MD} and the failed child runs")
    if failed:
        print(f"{len(failed)} point(s) failed: " + "; ".join(f"'{o.point.label()}' ({o.error})" for o in failed))
    return outcomes


def _point_line(o: Outcome, n: int, total: int, result: PointResult | None = None) -> str:
    head = f"[{n}/{total}] {o.point.label()}:"
    tries = f" after {result.attempts} attempts" if result is not None and result.attempts > 1 else ""
    where = f" on {result.worker}" if result is not None and result.worker and result.worker != _HERE else ""
    if not o.ok:
        return f"{head} FAILED{tries}{where} {o.error}"
    pm, _ = _metrics(o.prune_run_id)
    em, ep = _metrics(o.eval_run_id)
    parts = [f"params {int(em.get(schema.M_MODEL_PARAMS, 0)):,}" if o.point.dense
             else f"achieved {pm.get(schema.M_ACHIEVED_RATIO, float('nan')):.3f}"]
    for key in [k for k in ep.get(schema.P_PPL_RUN, "").split(",") if k]:
        parts.append(f"{schema.ppl_metric(key)} {em.get(schema.ppl_metric(key), float('nan')):.2f}")
    if schema.M_ZS_MEAN in em:
        parts.append(f"{schema.M_ZS_MEAN} {em[schema.M_ZS_MEAN]:.4f}")
    ids = ", ".join(f"{stage} {rid[:8]}" for stage, rid in (("prune", o.prune_run_id), ("eval", o.eval_run_id)) if rid)
    note = f" (reused {'+'.join(o.resumed)})" if o.resumed else ""
    return f"{head} {', '.join(parts)} [{ids}]{note}{where}{tries} {o.time_s:.1f}s"


def _run_name(sweep: Sweep) -> str:
    cfg = sweep.config
    base = Path(cfg.config).stem if cfg.config else "-".join(_short_model(m) for m in cfg.models[:3])
    return f"search-{base}-{len(sweep.points)}pts" + ("-dry" if cfg.dry_run else "")


def main(argv: list[str] | None = None) -> int:
    if _is_dry(argv):
        return dry_main(argv)
    return runs.entry_point(schema.STAGE_SEARCH, lambda: parse(argv), run, run_name=_run_name,
                            raw_params=raw_flags(argv))


def _is_dry(argv: list[str] | None) -> bool:
    try:
        return bool(boolean(raw_flags(argv).get("dry_run", "false")))
    except Exception:  # noqa: BLE001 - a bad value: the real parse reports it
        return False


def dry_main(argv: list[str] | None) -> int:
    """``--dry_run true``: parse and list the points; the store is only read (no run, no experiment)."""
    try:
        sweep = parse(argv)
        dry_run(sweep, runs.existing_experiment_id())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
