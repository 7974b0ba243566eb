"""Queries of the tracking store: resolve model/plan URIs and run ids, list runs for analysis."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from gqaprune.errors import UserError
from tracking import schema
from tracking.runs import setup

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Resolved:
    local_path: str | None       # a local file/dir, or None when ``name`` is an alias / hub id
    name: str                    # what to hand to the model resolver when local_path is None
    source_run_id: str | None    # the run the artifact came from, if any


def _client() -> MlflowClient:
    setup()
    return MlflowClient()


def _download(uri: str) -> str:
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except Exception as exc:  # noqa: BLE001 - mlflow raises several types
        raise UserError(f"could not fetch '{uri}' from the tracking store ({str(exc).splitlines()[0][:150]})",
                        "check the run id / artifact path with `mlflow ui` or MLFLOW_TRACKING_URI") from exc


def _run_of(uri: str) -> str | None:
    m = re.match(r"^runs:/([0-9a-f]{32})", uri)
    return m.group(1) if m else None


def model_artifact_of_run(run_id: str) -> str:
    """The model artifact path of a prune/finetune run (finetuned first)."""
    client = _client()
    try:
        client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"run '{run_id}' not found in {mlflow.get_tracking_uri()}",
                        "pass a run id from this tracking store (see `mlflow ui`)") from exc
    top = {a.path for a in client.list_artifacts(run_id)}
    for name in schema.MODEL_ARTIFACTS:
        if name in top:
            return name
    raise UserError(f"run '{run_id}' has no model artifact ({' or '.join(schema.MODEL_ARTIFACTS)})",
                    "pass a prune or finetune run that finished and logged its model")


def resolve_model_source(source: str) -> Resolved:
    """Alias / HF id / dir / ``runs:/`` / ``models:/`` URI / bare run id -> something loadable."""
    if source.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        setup()
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
        setup()
        return _download(source)
    p = Path(source).expanduser()
    if not p.exists():
        raise UserError(f"{what} '{source}' not found", "pass an existing path or a runs:/<id>/<file> URI")
    return str(p)


def get_run(run_id: str):
    return _client().get_run(run_id)


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
