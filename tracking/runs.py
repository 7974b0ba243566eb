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
