"""Queries of the tracking store: resolve model/plan URIs and run ids, list runs for analysis."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from gqaprune.errors import UserError
from tracking import schema
from tracking.redact import redact
from tracking.runs import call_store, use_store

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Resolved:
    local_path: str | None       # a local file/dir, or None when ``name`` is an alias / hub id
    name: str                    # what to hand to the model resolver when local_path is None
    source_run_id: str | None    # the run the artifact came from, if any


def _client() -> MlflowClient:
    use_store()
    return MlflowClient()


def _download(uri: str) -> str:
    try:
        return call_store(lambda: mlflow.artifacts.download_artifacts(artifact_uri=uri), f"fetching {uri}")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - mlflow raises several types
        first = (redact(str(exc)).splitlines() or [type(exc).__name__])[0][:150]
        raise UserError(f"could not fetch '{redact(uri)}' from the tracking store ({first})",
                        "check the run id / artifact path with `mlflow ui` or MLFLOW_TRACKING_URI") from exc


def _run_of(uri: str) -> str | None:
    m = re.match(r"^runs:/([0-9a-f]{32})", uri)
    return m.group(1) if m else None


def run_id_in(source: str) -> str | None:
    """The run id a model source names: a bare run id or a ``runs:/<id>/...`` URI (else None)."""
    if _RUN_ID.match(source) and not Path(source).exists():
        return source
    return _run_of(source)


def model_artifact_of_run(run_id: str) -> str:
    """The model artifact path of a prune/finetune run (finetuned first)."""
    client = _client()
    try:
        call_store(lambda: client.get_run(run_id), f"reading run {run_id}")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"run '{run_id}' not found in {redact(mlflow.get_tracking_uri())}",
                        "pass a run id from this tracking store (see `mlflow ui`)") from exc
    top = {a.path for a in call_store(lambda: client.list_artifacts(run_id), f"listing run {run_id}")}
    for name in schema.MODEL_ARTIFACTS:
        if name in top:
            return name
    raise UserError(f"run '{run_id}' has no model artifact ({' or '.join(schema.MODEL_ARTIFACTS)})",
                    "pass a prune or finetune run that finished and logged its model")


def resolve_model_source(source: str) -> Resolved:
    """Alias / HF id / dir / ``runs:/`` / ``models:/`` URI / bare run id -> something loadable."""
    if source.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        use_store()
        return Resolved(_download(source), source, _run_of(source))
    if _RUN_ID.match(source) and not Path(source).exists():
        path = model_artifact_of_run(source)
        return Resolved(_download(f"runs:/{source}/{path}"), source, source)
    p = Path(source).expanduser()
    if p.exists():
        return Resolved(str(p.resolve()), source, None)
    return Resolved(None, source, None)


def resolve_file(source: str, what: str) -> str:
    """A local path or a ``runs:/`` artifact URI -> local file path."""
    if source.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        use_store()
        return _download(source)
    p = Path(source).expanduser()
    if not p.exists():
        raise UserError(f"{what} '{source}' not found", "pass an existing path or a runs:/<id>/<file> URI")
    return str(p)


def get_run(run_id: str):
    client = _client()
    return call_store(lambda: client.get_run(run_id), f"reading run {run_id}")


def search_runs(experiment_names: list[str] | None = None, filter_string: str = "",
                include_failed: bool = False):
    """Runs of the given experiments (default: all) as a pandas DataFrame."""
    client = _client()
    if experiment_names:
        exps = [e for e in (client.get_experiment_by_name(n) for n in experiment_names) if e]
    else:
        exps = client.search_experiments()
    if not exps:
        import pandas as pd
        return pd.DataFrame()
    status = "" if include_failed else "attributes.status = 'FINISHED'"
    filt = " and ".join(f for f in (filter_string, status) if f)
    return mlflow.search_runs(experiment_ids=[e.experiment_id for e in exps], filter_string=filt)


def find_runs(experiment_id: str, tags: dict[str, str], status: str | None = "FINISHED") -> list:
    """Runs (MLflow entities, newest first) of one experiment carrying every ``tags`` value.

    For resumable pipelines: a search finds the points it finished before by their tags.
    ``status=None`` returns runs in any state.
    """
    parts = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    if status:
        parts.append(f"attributes.status = '{status}'")
    client = _client()
    return call_store(lambda: client.search_runs([experiment_id], filter_string=" and ".join(parts),
                                                 order_by=["attributes.start_time DESC"]),
                      "looking up runs by tag")


def find_runs_anywhere(tags: dict[str, str], status: str | None = "FINISHED") -> list:
    """Runs of every experiment carrying every ``tags`` value, newest first."""
    client = _client()
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return []
    parts = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    if status:
        parts.append(f"attributes.status = '{status}'")
    return call_store(lambda: client.search_runs(ids, filter_string=" and ".join(parts),
                                                 order_by=["attributes.start_time DESC"]),
                      "looking up runs by tag")


# ---- whole-store queries for analysis/ (tables and figures) --------------------------------

def experiment_names() -> dict[str, str]:
    """Experiment id -> name of every active experiment in the store."""
    return {e.experiment_id: e.name for e in _client().search_experiments()}


def _with_experiment(frame, names: dict[str, str]):
    if not frame.empty:
        frame = frame.assign(experiment=frame["experiment_id"].map(names))
    return frame


def runs_of_experiments(experiments: list[str] | None = None, include_failed: bool = False):
    """All runs of the named experiments (default: every experiment) as MLflow's DataFrame.

    Columns as ``mlflow.search_runs`` (run_id, status, start_time, ``params.*``, ``metrics.*``,
    ``tags.*``) plus ``experiment`` (the name). An unknown experiment name is a UserError naming
    the ones that exist, never an empty table.
    """
    names = experiment_names()
    ids = list(names)
    if experiments:
        by_name = {v: k for k, v in names.items()}
        unknown = [e for e in experiments if e not in by_name]
        if unknown:
            raise UserError(f"unknown experiment(s) {', '.join(unknown)} in {redact(mlflow.get_tracking_uri())}",
                            f"use one of: {', '.join(sorted(by_name)) or '(the store has none)'}")
        ids = [by_name[e] for e in experiments]
    if not ids:
        import pandas as pd
        return pd.DataFrame()
    status = "" if include_failed else "attributes.status = 'FINISHED'"
    return _with_experiment(mlflow.search_runs(experiment_ids=ids, filter_string=status), names)


def runs_by_id(run_ids):
    """The given runs (any experiment, any status) in the same DataFrame form; unknown ids are absent."""
    run_ids = sorted({r for r in run_ids if isinstance(r, str) and _RUN_ID.match(r)})
    names = experiment_names()
    if not run_ids or not names:
        import pandas as pd
        return pd.DataFrame()
    frames = []
    for i in range(0, len(run_ids), 100):  # keep each filter string short
        quoted = ",".join(f"'{r}'" for r in run_ids[i:i + 100])
        frames.append(mlflow.search_runs(experiment_ids=list(names),
                                         filter_string=f"attributes.run_id IN ({quoted})"))
    import pandas as pd
    frames = [f for f in frames if not f.empty]
    return _with_experiment(pd.concat(frames, ignore_index=True), names) if frames else pd.DataFrame()
