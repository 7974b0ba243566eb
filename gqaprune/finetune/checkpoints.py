"""Resumable training state: one directory per configuration key, written atomically."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from gqaprune.errors import UserError

CKPT_FORMAT = "gqaprune.finetune-checkpoint/v1"
# keys of the ``meta`` dict the caller passes to ``train`` (stored with the state and in meta.json)
META_RUN_ID, META_CONFIG_KEY = "run_id", "config_key"


def config_key(payload: dict) -> str:
    """Stable short hash of everything that changes the training trajectory."""
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class CheckpointStore:
    """One directory holding the latest training state (``state.pt``) and a readable meta.json.

    Writes go to a temp file first and are renamed into place, so a kill during a save leaves
    the previous checkpoint intact.
    """

    STATE, META = "state.pt", "meta.json"

    def __init__(self, directory: str | Path):
        self.dir = Path(directory).expanduser()

    def exists(self) -> bool:
        return (self.dir / self.STATE).is_file()

    def meta(self) -> dict:
        path = self.dir / self.META
        return json.loads(path.read_text()) if path.is_file() else {}

    def load(self) -> dict:
        state = torch.load(self.dir / self.STATE, map_location="cpu", weights_only=True)
        if state.get("format") != CKPT_FORMAT:
            raise UserError(f"checkpoint in '{self.dir}' has an unknown format",
                            "delete it or pass resume false")
        return state

    def save(self, state: dict, meta: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / (self.STATE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.dir / self.STATE)
        (self.dir / (self.META + ".tmp")).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        os.replace(self.dir / (self.META + ".tmp"), self.dir / self.META)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
