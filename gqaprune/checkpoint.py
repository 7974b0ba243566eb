"""Save and load (pruned) models.

* Uniform layers whose head count divides the hidden size -> a vanilla config; any
  ``from_pretrained`` loads it.
* Otherwise (layers differ, or transformers would reject hidden % heads) -> the "remote code"
  form: ``model_type`` becomes ``gqaprune_<base>``, ``auto_map`` points at
  ``modeling_gqaprune.py`` copied beside the weights, and the config lists per-layer sizes.
  It loads with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` anywhere,
  and with :func:`load_model` here without trusting remote code.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from gqaprune.arch import (BIAS_KEYS, CFG_BASE_MODEL_TYPE, LAYER_SIZE_KEYS, REMOTE_PREFIX,
                           base_model_type)
from gqaprune.errors import UserError
from gqaprune.remote import modeling_gqaprune as remote
from gqaprune.structured.units import model_shapes

REMOTE_FILE = "modeling_gqaprune.py"


def needs_remote_code(model) -> bool:
    """Non-uniform / non-divisible layers, or o_proj/down_proj biases added by reconstruction."""
    shapes = model_shapes(model)
    uniform = len({(s.n_heads, s.n_kv, s.intermediate) for s in shapes}) == 1
    divisible = shapes[0].hidden % shapes[0].n_heads == 0
    return not (uniform and divisible) or _added_bias(model.config)


def _remote_config(cfg: dict, base: str, own_type: bool) -> dict:
    """The remote-code form of a config dict.

    Default: the stock ``model_type`` (so ``AutoConfig`` / ``AutoTokenizer`` load it without custom
    code and never ask "run custom code?") and ``auto_map`` for ``AutoModelForCausalLM`` only: the
    model needs ``trust_remote_code=True``, the tokenizer and config do not. A plain load of the
    model without it fails loudly on the per-layer sizes. ``own_type`` (o_proj / down_proj biases
    added by reconstruction, sizes possibly uniform): a ``gqaprune_<base>`` model_type and config
    class, so that no stock class can load the weights silently without those biases.
    """
    conf_cls, model_cls = remote.CLASSES[base]
    module = REMOTE_FILE.removesuffix(".py")
    auto_map = {"AutoModelForCausalLM": f"{module}.{model_cls.__name__}"}
    if own_type:
        auto_map["AutoConfig"] = f"{module}.{conf_cls.__name__}"
    cfg.update(model_type=conf_cls.model_type if own_type else base, architectures=[model_cls.__name__],
               **{CFG_BASE_MODEL_TYPE: base}, auto_map=auto_map)
    return cfg


def _added_bias(config) -> bool:
    return any(any(getattr(config, key, None) or []) for key in BIAS_KEYS)


def save_model(model, tokenizer, out_dir: str | Path) -> dict:
    """``save_pretrained`` model + tokenizer; returns {"format": "vanilla"|"remote_code", ...}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remote_form = needs_remote_code(model)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if remote_form:
        base = base_model_type(model.config)
        if base not in remote.CLASSES:
            raise ValueError(f"cannot write remote code for model_type {base}")
        cfg_path = out / "config.json"
        cfg = _remote_config(json.loads(cfg_path.read_text()), base, own_type=_added_bias(model.config))
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        shutil.copyfile(Path(remote.__file__), out / REMOTE_FILE)
    return {"format": "remote_code" if remote_form else "vanilla", "path": str(out)}


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, local_files_only: bool = False):
    """Load any checkpoint: our pruned forms through our own classes, others through Auto*."""
    from transformers import AutoModelForCausalLM

    cfg_path = Path(path) / "config.json"
    if cfg_path.is_file():
        cfg = read_config(cfg_path)
        if str(cfg.get("model_type", "")).startswith(REMOTE_PREFIX):   # own config type (biases; older releases)
            _, model_cls = remote.CLASSES[cfg.get(CFG_BASE_MODEL_TYPE) or
                                          cfg["model_type"].removeprefix(REMOTE_PREFIX)]
            return model_cls.from_pretrained(str(path), dtype=dtype)
        if cfg.get(CFG_BASE_MODEL_TYPE) in remote.CLASSES:              # stock config type, our layers
            base = cfg[CFG_BASE_MODEL_TYPE]
            config = remote.STOCK_CONFIGS[base].from_pretrained(str(path))
            return remote.CLASSES[base][1].from_pretrained(str(path), config=config, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=local_files_only)


def read_config(cfg_path: Path) -> dict:
    """A model folder's config.json as a dict; anything else is bad input (one-line UserError)."""
    fix = "the folder needs the config.json a Hugging Face model was saved with"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"'{cfg_path}' is not valid JSON ({str(exc).splitlines()[0][:120]})", fix) from exc
    if not isinstance(cfg, dict):
        raise UserError(f"'{cfg_path}' holds a JSON {type(cfg).__name__}, not a model config (an object)", fix)
    return cfg


def layer_sizes(config) -> dict:
    """Per-layer sizes recorded in a pruned config (empty for an unpruned one)."""
    return {k: getattr(config, k) for k in LAYER_SIZE_KEYS if getattr(config, k, None) is not None}
