"""Start, link, log and close MLflow runs: every run ends, and nothing computed is lost.

Entry points call :func:`entry_point`, which opens the run *before* parsing flags, so that every
bad input, even an unknown ``-P`` flag, ends as a FAILED run carrying a one-line reason.

What each status means (see README "Run statuses"):

* FINISHED: the body returned.
* FAILED: it raised; ``failure_reason`` holds the one-line reason. ``failure_reason = killed``:
  the process died without closing the run (SIGKILL, OOM, lost node), found by the next entry
  point on the experiment (:func:`close_stale_runs`); ``liveness/closed_by`` says how it knew.
* KILLED: stopped by a signal (``failure_reason = killed by SIGTERM`` / ``SIGINT`` / ``SIGHUP``),
  and every nested run that was open with it.

Logging goes through :mod:`tracking.retry` (bounded back-off on a locked SQLite file or a server
that went away) and, when the budget is spent, into :mod:`tracking.spool`, uploaded later.
Every value written or printed goes through :func:`tracking.redact.redact`.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import mlflow
from mlflow.tracking import MlflowClient

from gqaprune.errors import UserError
from tracking import connect, liveness, quiet, retry, schema, spool
from tracking.connect import PROJECT_ROOT, tracking_uri  # noqa: F401 - part of this module's API
from tracking.redact import redact

_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
_MAX_TAG_LEN = 5000
CLOSE_BUDGET_S = 10.0   # closing after a stop signal: schedulers send SIGKILL soon after SIGTERM
REPLAY_EVERY_S = 30.0   # while a run's ops wait in the spool: how often to try the store again
# Tags of an `mlflow run` launcher run copied to the run that holds its results.
_LAUNCHER_TAGS = ("mlflow.source.", "mlflow.project.", "mlflow.gitRepoURL", "mlflow.user")
_URL_TAGS = ("mlflow.source.git.repoURL", "mlflow.gitRepoURL", "mlflow.source.name")


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside a sqlite store (``<db dir>/mlruns``); servers choose their own.

    Without this, MLflow puts a sqlite store's artifacts in ``./mlruns`` of the current
    directory, so two stores used from one directory would mix their artifact folders.
    """
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        root = db.parent if db.is_absolute() else Path.cwd() / db.parent
        return (root / "mlruns").as_uri()
    return None


def _client() -> MlflowClient:
    return MlflowClient(tracking_uri())


def call_store(fn: Callable[[], Any], what: str, policy: retry.RetryPolicy | None = None):
    """``fn()`` with the store's bounded retries (see :mod:`tracking.retry`)."""
    return retry.call(fn, tracking_uri(), what, policy)


def use_store() -> None:
    """Point MLflow at the store (reads need nothing more; no experiment is created).

    The first use in a process initialises a fresh SQLite store under a file lock, or probes a
    server (an unreachable one fails here, in seconds) - see :mod:`tracking.connect`.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    connect.ensure_store(uri)


# ------------------------------------------------------------------------------ experiments

def experiment_name(experiment: str | None = None) -> str:
    """The experiment our runs go to: ``experiment`` (an entry point's explicit choice), else
    ``MLFLOW_EXPERIMENT_NAME``, else ``gqaprune``; the same for ``python -m`` and ``mlflow run``
    (whose launcher run in Default is redirected, see :func:`tracked_run`).

    ``MLFLOW_EXPERIMENT_ID`` is not read: ``mlflow run`` sets it to Default's id for its worker,
    and ``mlflow.set_experiment`` writes it into this process's environment.
    """
    return experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or schema.DEFAULT_EXPERIMENT


def _get_or_create(name: str) -> str:
    client = _client()

    def get_or_create() -> str:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri()))
            except Exception as exc:  # noqa: BLE001 - created by another process meanwhile
                if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = client.get_experiment_by_name(name)
        if exp.lifecycle_stage == "deleted":
            raise UserError(f"experiment '{name}' is deleted in {redact(tracking_uri())}",
                            f"restore it (mlflow experiments restore --experiment-id {exp.experiment_id}) "
                            "or choose another with MLFLOW_EXPERIMENT_NAME")
        return exp.experiment_id

    with connect.store_lock(tracking_uri()):
        return call_store(get_or_create, f"opening experiment '{name}'")


def existing_experiment_id(experiment: str | None = None) -> str | None:
    """The id of the experiment runs would go to, if it exists (nothing is created)."""
    use_store()
    exp = mlflow.get_experiment_by_name(experiment_name(experiment))
    return exp.experiment_id if exp is not None else None


def setup(experiment: str | None = None) -> str:
    """Point MLflow at the store and make sure the experiment exists; return its id."""
    use_store()
    exp_id = _get_or_create(experiment_name(experiment))
    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


# ------------------------------------------------------------------------------ liveness

def _beat(run_id: str) -> None:
    """Heartbeat of one open run; reopens it if a sweeper took its silence for death."""
    client = _client()
    client.set_tag(run_id, schema.TAG_HEARTBEAT, str(int(time.time())))
    run = client.get_run(run_id)
    tags = run.data.tags
    if run.info.status == "FAILED" and tags.get(schema.TAG_FAILURE) == schema.REASON_KILLED \
            and tags.get(schema.TAG_CLOSED_BY):
        client.update_run(run_id, status="RUNNING")
        client.delete_tag(run_id, schema.TAG_FAILURE)
        client.set_tag(run_id, schema.TAG_CLOSED_BY, f"reopened: its heartbeat resumed at {time.ctime()} "
                                                    f"(was: {tags[schema.TAG_CLOSED_BY]})"[:_MAX_TAG_LEN])


_HEARTBEAT = liveness.Heartbeat(_beat)


def _close_dead(client: MlflowClient, run, verdict: liveness.Verdict, status_was: str) -> None:
    me = liveness.current()
    why = (f"{verdict.why}; closed by process {me.pid} on {me.host} at {time.ctime()}"
           + ("" if status_was == "RUNNING" else f" (it was {status_was} without a reason)"))
    client.log_batch(run.info.run_id, tags=_run_tags({schema.TAG_FAILURE: schema.REASON_KILLED,
                                                      schema.TAG_CLOSED_BY: why}))
    if status_was == "RUNNING":
        client.set_terminated(run.info.run_id, "FAILED", end_time=verdict.last_seen_ms or None)


def close_stale_runs(experiment_id: str) -> list[str]:
    """Close the runs of the experiment whose process died without closing them; return their ids.

    RUNNING runs whose process is gone (see :mod:`tracking.liveness`) end FAILED with
    ``failure_reason = killed``; FAILED runs of ours without a reason (``mlflow run`` marks its
    run FAILED when the worker died) get that reason, and KILLED runs that ``mlflow run`` turned
    FAILED are KILLED again. Three filtered queries that return only such runs: cheap enough for
    every entry point, and the way a restarted sweep closes the children of the sweep that was
    killed.
    """
    client = _client()
    own = set(_HEARTBEAT.runs()) | {os.environ.get("MLFLOW_RUN_ID")}
    queries = {"RUNNING": "attributes.status = 'RUNNING'",
               "FAILED": (f"attributes.status = 'FAILED' and tags.`{schema.TAG_PID}` IS NOT NULL "
                          f"and tags.`{schema.TAG_FAILURE}` IS NULL")}
    closed = []
    for status, query in queries.items():
        found = call_store(lambda q=query: client.search_runs([experiment_id], q, max_results=1000),
                           "looking for runs left open")
        for run in found:
            if run.info.run_id in own:
                continue
            verdict = liveness.judge(run.data.tags, run.info.start_time)
            if not verdict.alive:
                call_store(lambda r=run, v=verdict, s=status: _close_dead(client, r, v, s), "closing a dead run")
                closed.append(run.info.run_id)
    _unflip_killed(client, experiment_id)
    return closed


def _unflip_killed(client: MlflowClient, experiment_id: str) -> None:
    """Runs we ended KILLED that ``mlflow run`` then marked FAILED (see
    :func:`tracking.liveness.reassert_after`, which normally repairs them at once) become KILLED."""
    prefix = schema.REASON_SIGNAL.split("{")[0]
    query = f"attributes.status = 'FAILED' and tags.`{schema.TAG_FAILURE}` LIKE '{prefix}SIG%'"
    found = call_store(lambda: client.search_runs([experiment_id], query, max_results=1000),
                       "looking for stopped runs")
    for run in found:
        call_store(lambda r=run: client.set_terminated(r.info.run_id, "KILLED", end_time=r.info.end_time),
                   "marking a stopped run KILLED")


def close_if_dead(run_id: str) -> bool:
    """Close one run (e.g. the run a resume continues) if its process is gone; True if closed."""
    client = _client()
    run = call_store(lambda: client.get_run(run_id), f"reading run {run_id}")
    if run.info.status != "RUNNING" or run_id in _HEARTBEAT.runs():
        return False
    verdict = liveness.judge(run.data.tags, run.info.start_time)
    if verdict.alive:
        return False
    call_store(lambda: _close_dead(client, run, verdict, "RUNNING"), "closing a dead run")
    return True


# ------------------------------------------------------------------------------ runs

def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return redact(first if isinstance(exc, UserError) else f"{type(exc).__name__}: {first}")


def _run_tags(tags: Mapping[str, Any]):
    from mlflow.entities import RunTag
    return [RunTag(k, redact(str(v))[:_MAX_TAG_LEN]) for k, v in tags.items() if v is not None]


def _pop_fluent(run_id: str) -> None:
    """Take the run off MLflow's active-run stack without another store call (it is closed, or
    its closing waits in the spool)."""
    try:
        from mlflow.tracking import fluent
        stack = fluent._active_run_stack.get()
        for i in range(len(stack) - 1, -1, -1):
            if stack[i].info.run_id == run_id:
                del stack[i]
                break
        fluent._last_active_run_id.set(run_id)
        os.environ.pop("MLFLOW_RUN_ID", None)
    except (AttributeError, ImportError):  # a future MLflow: its own end_run, best effort
        try:
            mlflow.end_run()
        except Exception:  # noqa: BLE001
            pass


def _close(run_id: str, status: str, reason: str | None = None, *, urgent: bool = False,
           fluent: bool = True) -> None:
    """End a run: heartbeat off, reason tag, status. Stop signals wait until it is done."""
    policy = retry.RetryPolicy(CLOSE_BUDGET_S) if urgent else None
    with liveness.closing():
        _HEARTBEAT.remove(run_id)
        try:
            if reason:
                _submit(run_id, spool.Op("tags", {schema.TAG_FAILURE: redact(reason)[:_MAX_TAG_LEN]}), policy)
            _submit(run_id, spool.Op("terminate", {"status": status}, timestamp_ms=spool.now_ms()), policy)
        finally:
            if fluent:
                _pop_fluent(run_id)


def _launcher_to_redirect(launcher_id: str):
    """The ``mlflow run`` launcher's run when it sits in MLflow's Default experiment without the
    user asking for Default: MLflow cannot move a run, so our results go to a new run in the
    named experiment (see :func:`tracked_run`). None otherwise."""
    client = _client()
    run = call_store(lambda: client.get_run(launcher_id), "reading the mlflow run launcher's run")
    if run.info.experiment_id != schema.MLFLOW_DEFAULT_EXPERIMENT_ID:
        return None
    default = call_store(lambda: client.get_experiment(schema.MLFLOW_DEFAULT_EXPERIMENT_ID), "reading Default")
    if default is not None and os.environ.get("MLFLOW_EXPERIMENT_NAME") == default.name:
        return None
    return run


def _start(stage: str, exp_id: str, run_name, tags: dict, nested: bool, top: bool):
    """Start (or, under ``mlflow run``, take over) the run; returns (active run, launcher stub id)."""
    launcher_id = os.environ.get("MLFLOW_RUN_ID") if top else None
    launcher = _launcher_to_redirect(launcher_id) if launcher_id else None
    kwargs: dict[str, Any] = dict(run_name=run_name, nested=nested, tags=tags)
    if launcher is not None:
        os.environ.pop("MLFLOW_RUN_ID")
        tags.update({k: v for k, v in launcher.data.tags.items() if k.startswith(_LAUNCHER_TAGS)})
        tags[schema.TAG_LAUNCHER_RUN] = launcher_id
    if not os.environ.get("MLFLOW_RUN_ID") or nested:
        kwargs["experiment_id"] = exp_id
    run = call_store(lambda: mlflow.start_run(**kwargs), f"starting the {stage} run")
    run_id = run.info.run_id
    fix = {k: redact(v) for k, v in run.data.tags.items() if k in _URL_TAGS and redact(v) != v}
    if launcher is not None:  # the stub points to the real run; -P params follow the results
        exp_name = call_store(lambda: _client().get_experiment(exp_id).name, "reading the experiment")
        _submit(launcher_id, spool.Op("tags", {
            schema.TAG_STAGE: stage, schema.TAG_MOVED_TO: run_id, schema.TAG_MOVED_TO_EXPERIMENT: exp_name,
            schema.TAG_NOTE: f"Results are in experiment '{exp_name}', run {run_id} (gqaprune logs "
                            f"every launcher to its named experiment so that resume sees all runs).",
            **liveness.identity_tags(), **{k: redact(v) for k, v in launcher.data.tags.items()
                                           if k in _URL_TAGS and redact(v) != v}}))
        if launcher.data.params:
            _submit(run_id, spool.Op("params", dict(launcher.data.params)))
    if fix:
        _submit(run_id, spool.Op("tags", fix))
    return run, (launcher_id if launcher is not None else None)


@contextmanager
def tracked_run(stage: str, *, run_name: str | None = None, tags: Mapping[str, str] | None = None,
                experiment: str | None = None, nested: bool = False,
                parent_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that always ends: FINISHED, FAILED (reason in ``failure_reason``) or KILLED.

    The outermost run of a process also: closes the experiment's runs whose process died
    (:func:`close_stale_runs`), uploads spooled logging of earlier runs, turns SIGTERM / SIGINT /
    SIGHUP into a KILLED close of every open run, and tags its process for liveness checks
    (plus a heartbeat thread). Under ``mlflow run`` it takes over the launcher's run
    (``MLFLOW_RUN_ID``), unless that run sits in MLflow's Default experiment: then the results go
    to a new run in the named experiment and the launcher's run points to it (``moved_to_run_id``)
    and ends with the same status.
    """
    top = not nested and mlflow.active_run() is None
    with liveness.stop_on_signals():
        exp_id = setup(experiment)
        if top:
            _replay_spool()
            close_stale_runs(exp_id)
            if os.environ.get("MLFLOW_RUN_ID"):
                liveness.die_with_parent()
        all_tags = {schema.TAG_STAGE: stage, **(tags or {}), **liveness.identity_tags()}
        if parent_run_id:
            all_tags[schema.TAG_PARENT_RUN] = parent_run_id
        run, stub = _start(stage, exp_id, run_name, all_tags, nested, top)
        launcher = stub or (os.environ.get("MLFLOW_RUN_ID") if top else None)
        parent_pid = os.getppid()
        if stub:  # our launcher runs in Default left by killed workers
            close_stale_runs(schema.MLFLOW_DEFAULT_EXPERIMENT_ID)
        run_id = run.info.run_id
        for rid in (run_id, stub):
            if rid:
                _HEARTBEAT.add(rid)
        outcome: tuple[str, str | None, bool] = ("FINISHED", None, False)
        try:
            yield run
        except liveness.Stopped as exc:
            liveness.stop_handled()
            outcome = ("KILLED", exc.reason, True)
            raise
        except KeyboardInterrupt:
            liveness.mark_stopping()
            outcome = ("KILLED", schema.REASON_INTERRUPTED, True)
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure must close the run
            outcome = ("FAILED", _one_line(exc) or type(exc).__name__, False)
            raise
        finally:
            _finish(run_id, outcome, stub=stub, launcher=launcher, launcher_pid=parent_pid, top=top)


def _finish(run_id: str, outcome: tuple[str, str | None, bool], *, stub: str | None, launcher: str | None,
            launcher_pid: int, top: bool) -> None:
    """Close the run (and the launcher's stub with the same status); a KILLED launcher run gets a
    helper that sets KILLED again after ``mlflow run`` has marked it FAILED; report the spool."""
    status, reason, urgent = outcome
    try:
        _close(run_id, status, reason, urgent=urgent)
    finally:
        if stub:
            _close(stub, status, reason, urgent=urgent, fluent=False)
        if launcher and status == "KILLED":
            liveness.reassert_after(launcher_pid, status, [launcher], tracking_uri())
        if top:
            _report_spool(run_id)


# ------------------------------------------------------------------------------ entry points

def entry_point(stage: str, parse: Callable[[], Any], body: Callable[[Any], Any], *,
                run_name: Callable[[Any], str] | None = None,
                tags: Callable[[Any], Mapping[str, str]] | None = None,
                raw_params: Mapping[str, Any] | None = None,
                experiment: str | None = None) -> int:
    """Run ``body(parse())`` inside a tracked run; bad input -> one line on stderr, exit 2.

    ``parse`` runs inside the run so that flag errors are recorded too. Unexpected errors keep
    their traceback (they are bugs) but still leave the run FAILED. A stop signal ends the run
    KILLED and returns 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
    """
    quiet.install(quiet.wants_verbose(dict(raw_params or {})))
    if raw_params is not None and "help" in raw_params:
        try:  # --help prints and exits: no run to record
            parse()
        except SystemExit as exc:
            return int(exc.code or 0)
    try:
        with tracked_run(stage, experiment=experiment) as run:
            try:
                config = parse()
            except UserError:
                if raw_params:  # keep what the user typed on the FAILED run
                    log_params(raw_params)
                raise
            if run_name is not None:
                set_tags({schema.TAG_RUN_NAME: run_name(config)})
            if tags is not None:
                set_tags(dict(tags(config)))
            body(config)
            print(where_to_look(run.info.experiment_id, run.info.run_id, stage))
    except UserError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse --help
        return int(exc.code or 0)
    except liveness.Stopped as exc:
        print(f"stopped: {exc.reason}; the run is KILLED", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1
    late = liveness.take_pending()
    if late:  # the signal came while the finished run was being closed: it stays FINISHED
        return 128 + late
    return 0


def mlflow_cli() -> str:
    """The MLflow CLI as the user can type it: this environment's own ``mlflow`` (relative to the
    working directory when under it, e.g. ``.venv/bin/mlflow``), since a plain ``mlflow`` is not
    found in a shell where the virtual env is not activated; ``mlflow`` when there is no such file."""
    cli = Path(sys.executable).parent / "mlflow"
    if not cli.is_file():
        return "mlflow"
    cwd = Path.cwd()
    return str(cli.relative_to(cwd)) if cwd != Path(cwd.anchor) and cwd in cli.parents else str(cli)


def where_to_look(experiment_id: str, run_id: str, stage: str) -> str:
    """Tell the user where the run is and how to open it in the MLflow UI (no credentials)."""
    uri = redact(tracking_uri())
    if connect.is_server(uri):
        ui, base = "the tracking server's UI", uri.rstrip("/")
    else:
        ui = f"{mlflow_cli()} ui" + (f" --backend-store-uri {uri}" if uri.startswith("sqlite:") else "")
        base = "http://127.0.0.1:5000"
    return (f"[{stage}] run {run_id} finished. Results: {uri} (experiment {experiment_id}).\n"
            f"  View them: {ui}  then open {base}/#/experiments/{experiment_id}/runs/{run_id}\n"
            f"  (all runs: {base}/#/experiments/{experiment_id}/runs)")


def child_run(stage: str, parse: Callable[[], Any], body: Callable[[Any], Any], *,
              run_name: Callable[[Any], str] | None = None,
              tags: Callable[[Any], Mapping[str, str]] | None = None,
              raw_params: Mapping[str, Any] | None = None,
              extra_tags: Mapping[str, str] | None = None, parent_run_id: str | None = None) -> str:
    """Run ``body(parse())`` as a nested child of the active run (same experiment); return its id.
    With no active run (a Ray worker runs a search point) the child hangs under ``parent_run_id``.

    For pipelines (finetune's eval_after, search's grid points). Bad input marks the child
    FAILED and raises the UserError to the caller, which decides whether to go on.
    ``extra_tags`` are set when the child starts, before parsing, so even a child that fails or is
    killed at once carries them (a search finds its point's run by them); they win over the run
    name and tags derived from the parsed config.
    """
    active_parent = mlflow.active_run()
    if active_parent is None and parent_run_id is None:
        raise RuntimeError("child_run needs an active MLflow run or a parent_run_id")
    parent = active_parent or call_store(lambda: _client().get_run(parent_run_id), "reading the parent run")
    experiment = call_store(lambda: mlflow.get_experiment(parent.info.experiment_id).name, "reading the experiment")
    extra = {k: str(v) for k, v in (extra_tags or {}).items()}
    with tracked_run(stage, nested=True, experiment=experiment, tags=extra,
                     parent_run_id=None if active_parent else parent_run_id) as active:
        try:
            config = parse()
        except UserError:
            if raw_params:
                log_params(raw_params)
            raise
        if run_name is not None and schema.TAG_RUN_NAME not in extra:
            set_tags({schema.TAG_RUN_NAME: run_name(config)})
        if tags is not None:
            set_tags({k: v for k, v in dict(tags(config)).items() if k not in extra})
        body(config)
    return active.info.run_id


# ------------------------------------------------------------------------------ the write path

_next_replay: dict[str, float] = {}
_spooled_note: set[str] = set()


def _try_replay(uri: str, run_id: str) -> bool:
    """Upload the run's spool if the store answers now (at most every REPLAY_EVERY_S)."""
    if time.monotonic() < _next_replay.get(run_id, 0.0):
        return False
    try:
        spool.replay_run(_client(), uri, run_id)
        return True
    except Exception as exc:  # noqa: BLE001
        if not retry.is_transient(exc):
            raise
        _next_replay[run_id] = time.monotonic() + REPLAY_EVERY_S
        return False


def _submit(run_id: str, op: spool.Op, policy: retry.RetryPolicy | None = None) -> None:
    """Apply ``op`` to the run with bounded retries; when the store stays away, spool it."""
    uri = tracking_uri()
    if spool.has_pending(uri, run_id) and not _try_replay(uri, run_id):
        spool.append(uri, run_id, op)
        return
    try:
        retry.call(lambda: spool.apply(_client(), run_id, op), uri,
                   f"logging {op.kind} of run {run_id[:8]}", policy)
    except retry.StoreUnavailable as exc:
        where = spool.append(uri, run_id, op)
        _next_replay[run_id] = time.monotonic() + REPLAY_EVERY_S
        if run_id not in _spooled_note:
            _spooled_note.add(run_id)
            print(f"warning: {exc}\n  nothing is lost: the logging of run {run_id} goes on in {where} and is "
                  f"uploaded when the store answers (next logging call, next entry point, or "
                  f"`python -m tracking.spool`)", file=sys.stderr)


def _replay_spool() -> None:
    report = spool.replay_all(tracking_uri(), _client())
    for run_id, n in report.uploaded.items():
        print(f"uploaded {n} spooled logging call(s) of run {run_id}", file=sys.stderr)


def _report_spool(run_id: str) -> None:
    uri = tracking_uri()
    waiting = [r for r in spool.pending_runs(uri) if r in _spooled_note or r == run_id]
    if waiting:
        print(f"warning: the store {redact(uri)} did not take everything; kept in {spool.store_dir(uri)} "
              f"for run(s) {', '.join(waiting)}: uploaded by the next entry point on this store or by "
              f"`python -m tracking.spool`", file=sys.stderr)


def _active() -> str:
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("logging needs an active run (tracking.runs.tracked_run)")
    return run.info.run_id


# ---- logging helpers: plain values in, MLflow out -----------------------------------------

def log_params(params: Mapping[str, Any]) -> None:
    """Log params as strings (None -> "none"); keys already on the run are left as they are.

    ``mlflow run`` logs the ``-P`` values itself before the entry point starts, and MLflow refuses
    to change a param, so the value the user typed wins over our normalised spelling of it.
    """
    clean = {k: redact("none" if v is None else str(v))[:_MAX_PARAM_LEN] for k, v in params.items()}
    if clean:
        _submit(_active(), spool.Op("params", clean))


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    clean = {schema.metric_name(k): float(v) for k, v in metrics.items() if v is not None}
    if clean:
        _submit(_active(), spool.Op("metrics", clean, step=step or 0, timestamp_ms=spool.now_ms()))


def set_tags(tags: Mapping[str, Any]) -> None:
    clean = {k: redact(str(v))[:_MAX_TAG_LEN] for k, v in tags.items() if v is not None}
    if clean:
        _submit(_active(), spool.Op("tags", clean))


def _log_content(write: Callable[[Path], None], name: str) -> None:
    """Write an artifact ``name`` (``dir/file.ext``) through a temporary file, then log it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(name).name
        write(path)
        parent = str(Path(name).parent)
        log_file(path, None if parent in ("", ".") else parent)


def log_json(obj: Any, name: str) -> None:
    if name.endswith((".yaml", ".yml")):
        import yaml
        text = yaml.dump(obj, indent=2, default_flow_style=False)
    else:
        text = json.dumps(obj, indent=2, default=str)
    log_text(text, name)


def log_text(text: str, name: str) -> None:
    _log_content(lambda p: p.write_text(redact(text), encoding="utf-8"), name)


def log_table(frame, name: str) -> None:
    """Log a pandas DataFrame as CSV under ``name``."""
    log_text(frame.to_csv(index=False), name)


def log_figure(fig, name: str) -> None:
    import matplotlib.pyplot as plt
    try:
        _log_content(lambda p: fig.savefig(p), name)
    finally:
        plt.close(fig)


def log_file(path: str | Path, artifact_path: str | None = None) -> None:
    _submit(_active(), spool.Op("artifact", local_path=str(path), artifact_path=artifact_path))


def log_dir(path: str | Path, artifact_path: str) -> None:
    _submit(_active(), spool.Op("artifact", local_path=str(path), artifact_path=artifact_path))


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


def artifact_uri(artifact_path: str) -> str:
    return f"runs:/{active_run_id()}/{artifact_path}"


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)


# ---- MLflow's own conventions: models and dataset inputs (issue 10) ------------------------------
# Kept apart from the helpers above: a logged model appears under the run's Models column and can
# be registered; a dataset input appears under Datasets with its name, source and digest.
from dataclasses import dataclass  # noqa: E402 - this section's own import (kept apart)

def log_model_dir(path: str | Path, name: str, *, checkpoint_format: str = "vanilla",
                  tags: Mapping[str, Any] | None = None, run_id: str | None = None) -> str:
    """Log a saved checkpoint directory as an MLflow Model named ``name`` (A_PRUNED_MODEL /
    A_FINETUNED_MODEL) of the active run (or ``run_id``); return its model id.

    The model's files are the checkpoint's own plus ``MLmodel`` (see tracking.model_flavor), so
    ``runs:/<run>/<name>`` keeps downloading a directory our loader and ``from_pretrained`` read.
    The run's params become the model's params (MLflow copies them), so the registry and the
    Models tab show the configuration that made the model.
    """
    from mlflow.models import Model

    from tracking import model_flavor
    info = Model.log(None, flavor=model_flavor, name=name, run_id=run_id, checkpoint_dir=str(path),
                     checkpoint_format=checkpoint_format,
                     tags={schema.TAG_CHECKPOINT_FORMAT: checkpoint_format,
                           **{k: str(v) for k, v in (tags or {}).items() if v is not None}})
    return info.model_id


@dataclass(frozen=True)
class DatasetInput:
    """One dataset a run read, as MLflow shows it under Datasets.

    ``name``: what a reader recognises (``wikitext2``, ``tinystories_dev.txt``, ``piqa``);
    ``source``: a local path (``local`` true: source type ``local``) or a URI of a named source
    (source type DATASET_SOURCE_TYPE: ``gqaprune.data:<name>``, ``lm_eval:<task>``); ``digest``:
    a hash of exactly the data
    used (token ids of the windows / the scored stream); ``context``: one of schema.CTX_*;
    ``profile``: how it was used (windows, tokens, split, seed, ...).
    """
    name: str
    source: str
    digest: str
    context: str
    local: bool = False
    profile: Mapping[str, Any] | None = None


def _dataset_entity(ds: DatasetInput):
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    class RegisteredSource(DatasetSource):
        def __init__(self, uri: str):
            self.uri = uri

        @staticmethod
        def _get_source_type() -> str:
            return schema.DATASET_SOURCE_TYPE

        def load(self, **kwargs):
            raise NotImplementedError("load it with gqaprune.data.load_texts(name)")

        @staticmethod
        def _can_resolve(raw_source) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source):
            return cls(str(raw_source))

        def to_dict(self) -> dict:
            return {"uri": self.uri}

        @classmethod
        def from_dict(cls, source_dict: dict):
            return cls(source_dict["uri"])

    class Described(MetaDataset):
        def to_dict(self) -> dict:
            out = super().to_dict()
            if ds.profile:
                out["profile"] = json.dumps(dict(ds.profile), sort_keys=True, default=str)
            return out

        @property
        def profile(self):
            return dict(ds.profile) if ds.profile else None

    if ds.local:
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        with warnings.catch_warnings():   # MLflow registers two equivalent local source types
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(Path(ds.source).expanduser().resolve()))
    else:
        source = RegisteredSource(ds.source)
    return Described(source, name=ds.name, digest=ds.digest[:36])


def log_dataset(ds: DatasetInput) -> None:
    """Record ``ds`` as a dataset input of the active run (context tag ``mlflow.data.context``)."""
    mlflow.log_input(_dataset_entity(ds), context=ds.context)
