"""Start, link, log and fail MLflow runs.

Entry points call :func:`entry_point`, which opens the run *before* parsing flags, so that every
bad input, even an unknown ``-P`` flag, ends as a FAILED run carrying a one-line reason.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import mlflow

from gqaprune.errors import UserError
from tracking import schema

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else an *absolute* sqlite store in the project root.

    Absolute because ``mlflow run`` starts entry points with the project dir as cwd while a
    user may call ``python -m`` from anywhere; both must write the same store.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


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


def use_store() -> None:
    """Point MLflow at the store (reads need nothing more; no experiment is created)."""
    mlflow.set_tracking_uri(tracking_uri())


def experiment_name(experiment: str | None = None) -> str:
    return experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or schema.DEFAULT_EXPERIMENT


def existing_experiment_id(experiment: str | None = None) -> str | None:
    """The id of the experiment runs would go to, if it exists (nothing is created)."""
    use_store()
    exp = mlflow.get_experiment_by_name(experiment_name(experiment))
    return exp.experiment_id if exp is not None else None


def setup(experiment: str | None = None) -> str:
    """Point MLflow at the store and make sure the experiment exists; return its id."""
    use_store()
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or schema.DEFAULT_EXPERIMENT
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        exp_id = mlflow.create_experiment(name, artifact_location=_artifact_location(tracking_uri()))
    else:
        exp_id = exp.experiment_id
    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(exc, UserError) else f"{type(exc).__name__}: {first}"


@contextmanager
def tracked_run(stage: str, *, run_name: str | None = None, tags: Mapping[str, str] | None = None,
                experiment: str | None = None, nested: bool = False,
                parent_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that always ends: FINISHED, FAILED (reason in ``failure_reason``) or KILLED.

    Picks up ``MLFLOW_RUN_ID`` (set by ``mlflow run``) so the project run is the one we log to.
    """
    exp_id = setup(experiment)
    all_tags = {schema.TAG_STAGE: stage, **(tags or {})}
    if parent_run_id:
        all_tags[schema.TAG_PARENT_RUN] = parent_run_id
    kwargs: dict[str, Any] = dict(run_name=run_name, nested=nested, tags=all_tags)
    if not os.environ.get("MLFLOW_RUN_ID") or nested:
        kwargs["experiment_id"] = exp_id
    run = mlflow.start_run(**kwargs)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.set_tag(schema.TAG_FAILURE, "interrupted by the user")
        mlflow.end_run("KILLED")
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure must close the run
        reason = _one_line(exc) or type(exc).__name__
        mlflow.set_tag(schema.TAG_FAILURE, reason[:5000])
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def entry_point(stage: str, parse: Callable[[], Any], body: Callable[[Any], Any], *,
                run_name: Callable[[Any], str] | None = None,
                tags: Callable[[Any], Mapping[str, str]] | None = None,
                raw_params: Mapping[str, Any] | None = None,
                experiment: str | None = None) -> int:
    """Run ``body(parse())`` inside a tracked run; bad input -> one line on stderr, exit 2.

    ``parse`` runs inside the run so that flag errors are recorded too. Unexpected errors keep
    their traceback (they are bugs) but still leave the run FAILED.
    """
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
                mlflow.set_tag(schema.TAG_RUN_NAME, run_name(config))
            if tags is not None:
                mlflow.set_tags(dict(tags(config)))
            body(config)
            print(where_to_look(run.info.experiment_id, run.info.run_id, stage))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse --help
        return int(exc.code or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1
    return 0


def where_to_look(experiment_id: str, run_id: str, stage: str) -> str:
    """Tell the user where the run is and how to open it in the MLflow UI."""
    uri = tracking_uri()
    ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else "mlflow ui"
    return (f"[{stage}] run {run_id} finished. Results: {uri} (experiment {experiment_id}).\n"
            f"  View them: {ui}  then open "
            f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}\n"
            f"  (all runs: http://127.0.0.1:5000/#/experiments/{experiment_id}/runs)")


def child_run(stage: str, parse: Callable[[], Any], body: Callable[[Any], Any], *,
              run_name: Callable[[Any], str] | None = None,
              tags: Callable[[Any], Mapping[str, str]] | None = None,
              raw_params: Mapping[str, Any] | None = None,
              extra_tags: Mapping[str, str] | None = None) -> str:
    """Run ``body(parse())`` as a nested child of the active run (same experiment); return its id.

    For pipelines (finetune's eval_after, search's grid points). Bad input marks the child
    FAILED and raises the UserError to the caller, which decides whether to go on.
    ``extra_tags`` are set when the child starts, before parsing, so even a child that fails or is
    killed at once carries them (a search finds its point's run by them); they win over the run
    name and tags derived from the parsed config.
    """
    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("child_run needs an active MLflow run")
    experiment = mlflow.get_experiment(parent.info.experiment_id).name
    extra = {k: str(v) for k, v in (extra_tags or {}).items()}
    with tracked_run(stage, nested=True, experiment=experiment, tags=extra) as active:
        try:
            config = parse()
        except UserError:
            if raw_params:
                log_params(raw_params)
            raise
        if run_name is not None and schema.TAG_RUN_NAME not in extra:
            mlflow.set_tag(schema.TAG_RUN_NAME, run_name(config))
        if tags is not None:
            mlflow.set_tags({k: v for k, v in dict(tags(config)).items() if k not in extra})
        body(config)
    return active.info.run_id


# ---- logging helpers: plain values in, MLflow out -----------------------------------------

def log_params(params: Mapping[str, Any]) -> None:
    """Log params as strings (None -> "none"); keys already on the run are left as they are.

    ``mlflow run`` logs the ``-P`` values itself before the entry point starts, and MLflow refuses
    to change a param, so the value the user typed wins over our normalised spelling of it.
    """
    clean = {k: ("none" if v is None else str(v))[:_MAX_PARAM_LEN] for k, v in params.items()}
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    fresh = {k: v for k, v in clean.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    clean = {schema.metric_name(k): float(v) for k, v in metrics.items() if v is not None}
    if clean:
        mlflow.log_metrics(clean, step=step)


def set_tags(tags: Mapping[str, Any]) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items() if v is not None})


def log_json(obj: Any, name: str) -> None:
    mlflow.log_dict(obj, name)


def log_text(text: str, name: str) -> None:
    mlflow.log_text(text, name)


def log_table(frame, name: str) -> None:
    """Log a pandas DataFrame as CSV under ``name``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        frame.to_csv(path, index=False)
        mlflow.log_artifact(str(path))


def log_figure(fig, name: str) -> None:
    mlflow.log_figure(fig, name)
    import matplotlib.pyplot as plt
    plt.close(fig)


def log_file(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_dir(path: str | Path, artifact_path: str) -> None:
    mlflow.log_artifacts(str(path), artifact_path=artifact_path)


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


def artifact_uri(artifact_path: str) -> str:
    return f"runs:/{active_run_id()}/{artifact_path}"


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
