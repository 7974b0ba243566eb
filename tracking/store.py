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
        if name in top or logged_model_of_run(run_id, name) is not None:
            return name
    raise UserError(f"run '{run_id}' has no model artifact ({' or '.join(schema.MODEL_ARTIFACTS)})",
                    "pass a prune or finetune run that finished and logged its model")


def resolve_model_source(source: str) -> Resolved:
    """Alias / HF id / dir / ``runs:/`` / ``models:/`` URI / bare run id -> something loadable."""
    if source.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        use_store()
        return Resolved(_download(source), source, _run_of(source) or run_of_model_uri(source))
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


# ---- logged models, the Model Registry and run artifacts (issue 10) ------------------------------
# Kept apart from the queries above. A model logged by tracking.runs.log_model_dir is an MLflow
# LoggedModel named like its artifact (pruned_model / finetuned_model) whose source run is the run.

def logged_model_of_run(run_id: str, name: str):
    """The READY MLflow LoggedModel called ``name`` that ``run_id`` produced (newest), else None."""
    client = _client()
    try:
        exp = client.get_run(run_id).info.experiment_id
        found = client.search_logged_models(experiment_ids=[exp],
                                            filter_string=f"name = '{name}' AND source_run_id = '{run_id}'")
    except Exception:  # noqa: BLE001 - stores without logged models (older servers)
        return None
    ready = [m for m in found if str(getattr(m.status, "value", m.status)) == "READY"]
    return max(ready, key=lambda m: m.creation_timestamp) if ready else None


def run_of_model_uri(uri: str) -> str | None:
    """The run that produced the model of a ``models:/<name>/<version|alias>`` or
    ``models:/<model id>`` URI (so an eval of a registered model links to its prune run)."""
    m = re.match(r"^models:/([^/]+)(?:/([^/]+))?", uri)
    if not m:
        return None
    client = _client()
    name, ref = m.group(1), m.group(2)
    try:
        if ref is None:
            return client.get_logged_model(name).source_run_id
        if ref.isdigit():
            return client.get_model_version(name, ref).run_id or None
        if ref.lower() == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            return max(versions, key=lambda v: int(v.version)).run_id if versions else None
        return client.get_model_version_by_alias(name, ref).run_id or None
    except Exception:  # noqa: BLE001 - the download reports a bad URI with its own message
        return None


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    source: str          # models:/<model id> (the logged model) it points at
    run_id: str


def register_model(run_id: str, artifact: str, name: str, tags: dict[str, str]) -> RegisteredVersion:
    """A new version of registered model ``name`` from the model ``artifact`` of ``run_id``,
    tagged with ``tags``. A run from before models were logged as MLflow Models (a plain artifact
    directory) gets its checkpoint logged as one first: the registry needs a logged model."""
    model = logged_model_of_run(run_id, artifact)
    if model is None:
        local = _download(f"runs:/{run_id}/{artifact}")
        from tracking.runs import log_model_dir
        log_model_dir(local, artifact, run_id=run_id)
        model = logged_model_of_run(run_id, artifact)
    version = mlflow.register_model(f"models:/{model.model_id}", name,
                                    tags={k: str(v)[:5000] for k, v in tags.items() if v is not None})
    return RegisteredVersion(name, str(version.version), f"models:/{model.model_id}", run_id)


def artifact_paths(run_id: str) -> list[str]:
    """Top-level artifact paths of a run, including the names of the models it logged."""
    client = _client()
    paths = [a.path for a in client.list_artifacts(run_id)]
    return paths + [n for n in schema.MODEL_ARTIFACTS if n not in paths and logged_model_of_run(run_id, n)]


def download_artifact(run_id: str, path: str, dst: str | Path) -> str:
    """Copy one artifact (file or directory, a logged model included) of a run into ``dst``."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/{path}", dst_path=str(dst))
    except Exception as exc:  # noqa: BLE001 - mlflow raises several types
        raise UserError(f"could not fetch '{path}' of run {run_id} ({str(exc).splitlines()[0][:150]})",
                        "check the run in `mlflow ui`; was it logged by this store?") from exc


def load_json_artifact(run_id: str, path: str):
    """A JSON artifact of a run as Python data, or None when the run has no such artifact."""
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")
    except Exception:  # noqa: BLE001 - absent or unreadable: the caller says what is missing
        return None
