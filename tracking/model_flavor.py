"""The MLflow flavor of our checkpoints: an MLflow Model whose files *are* the checkpoint directory.

``tracking.runs.log_model_dir`` logs a saved checkpoint through ``mlflow.models.Model.log`` with
this module as the flavor. The model's artifact root holds the checkpoint's own files
(``config.json``, weights, tokenizer, ``modeling_gqaprune.py`` for the remote-code form) plus
MLflow's ``MLmodel``, so the same directory

* loads with ``gqaprune.checkpoint.load_model(dir)`` and ``AutoModelForCausalLM.from_pretrained(dir)``
  (``trust_remote_code=True`` for the remote-code form) — ``MLmodel`` is one more file they ignore;
* is an MLflow Model: listed under the run's *Models*, registrable, downloadable as
  ``runs:/<run>/pruned_model``, ``models:/<model id>`` or ``models:/<name>/<version>``;
* loads as a pyfunc (``mlflow.pyfunc.load_model(uri).predict(["prompt", ...])``: greedy
  continuations), which needs this project importable, as every gqaprune command does.

Files are hard-linked into MLflow's staging directory when possible, so logging a 16 GB
checkpoint stages no second copy on disk.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from tracking import schema


def _link_tree(src: Path, dst: Path) -> None:
    for f in sorted(src.rglob("*")):
        if not f.is_file():
            continue
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:   # another file system, or links not allowed
            shutil.copy2(f, target)


def save_model(path, mlflow_model, checkpoint_dir, checkpoint_format: str = "vanilla") -> None:
    """Called by ``mlflow.models.Model.log``: stage the checkpoint under ``path`` and write MLmodel."""
    import mlflow.pyfunc
    src, out = Path(checkpoint_dir), Path(path)
    if not (src / "config.json").is_file():
        raise ValueError(f"'{src}' is not a checkpoint directory (no config.json)")
    out.mkdir(parents=True, exist_ok=True)
    _link_tree(src, out)
    mlflow_model.add_flavor(schema.MODEL_FLAVOR, checkpoint_format=checkpoint_format, data=".",
                            loader="gqaprune.checkpoint.load_model(dir) or "
                                   "AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)")
    mlflow.pyfunc.add_to_model(mlflow_model, loader_module=__name__)
    mlflow_model.save(str(out / "MLmodel"))


class _Generator:
    """pyfunc wrapper: prompts (list of str, or a DataFrame whose first column holds them) ->
    greedy continuations (``params={"max_new_tokens": n}``, default 32)."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()

    def predict(self, data, params=None):
        import torch
        prompts = list(data.iloc[:, 0]) if hasattr(data, "iloc") else [data] if isinstance(data, str) else list(data)
        new = int((params or {}).get("max_new_tokens", 32))
        out = []
        for prompt in prompts:
            ids = self.tokenizer(str(prompt), return_tensors="pt")["input_ids"]
            with torch.no_grad():
                gen = self.model.generate(ids, max_new_tokens=new, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
            out.append(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out


def _load_pyfunc(path: str):
    return _Generator(path)
