"""Dataset inputs of entry-point runs: a text source (or task file) and the exact data drawn from it
-> ``tracking.runs.DatasetInput`` (name, source, digest, context, profile), so MLflow's Datasets
column says which data produced which number.

Digests hash exactly what the run used: the token ids of the calibration windows or of the scored
evaluation stream; for an offline zero-shot task its generated item file; for an lm-eval task
served by lm-eval itself, the task name and settings (lm-eval owns that data).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from gqaprune import data
from tracking import runs, schema


def token_digest(ids) -> str:
    """sha256 of token ids (any shape, as int64)."""
    import torch
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def source_uri(source: str) -> str:
    """A registered text source's URI (``gqaprune.data:wikitext2``)."""
    return f"gqaprune.data:{source}"


def text_input(source: str, ids, context: str, **profile) -> runs.DatasetInput:
    """A text source (registered name or local path) and the token ids drawn from it."""
    local = data.is_local(source)
    name = Path(source).name if local else source
    return runs.DatasetInput(name, str(Path(source).expanduser().resolve()) if local else source_uri(source),
                             token_digest(ids), context, local, {"tokens_shape": list(ids.shape), **profile})


def task_input(task: str, item_file: str | None, **profile) -> runs.DatasetInput:
    """A zero-shot task: its generated item file (offline tasks) or lm-eval's own data."""
    if item_file and Path(item_file).is_file():
        digest = hashlib.sha256(Path(item_file).read_bytes()).hexdigest()
        return runs.DatasetInput(task, item_file, digest, schema.CTX_EVALUATION, True, profile)
    digest = hashlib.sha256(repr(sorted({"task": task, **profile}.items())).encode()).hexdigest()
    return runs.DatasetInput(task, f"lm_eval:{task}", digest, schema.CTX_EVALUATION, False,
                             {**profile, "digest_of": "task name and settings (the data is lm-eval's)"})


def examples_input(name: str, source: str, examples, context: str = schema.CTX_TRAINING, **profile) -> runs.DatasetInput:
    """Fine-tuning data: encoded examples (``input_ids`` + ``labels`` each) -> a dataset input whose
    digest covers exactly the token ids and label masks trained (or validated) on."""
    h = hashlib.sha256()
    for e in examples:
        h.update(repr((tuple(e.input_ids), tuple(e.labels))).encode())
    local = data.is_local(source)
    uri = str(Path(source).expanduser().resolve()) if local else f"gqaprune.finetune:{source}"
    return runs.DatasetInput(name, uri, h.hexdigest(), context, local, {"examples": len(examples), **profile})
