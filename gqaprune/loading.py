"""Floor 4: model aliases, and loading a model + tokenizer (our own pruned checkpoints included).

Architecture facts (decoder layers, projection names, checks) live on floor 0, ``gqaprune.arch``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gqaprune import checkpoint
from gqaprune.arch import check_architecture
from gqaprune.config import Section, knob
from gqaprune.errors import UserError
from gqaprune.hub import hub_reachable

DEMO_ALIAS = "demo"


@dataclass(frozen=True)
class ModelSpec:
    alias: str     # what the user typed
    path: str      # HF hub id or local directory
    family: str    # Llama | Qwen | Mistral | Demo | custom
    variant: str   # Base | Instruct


BUILTIN_ALIASES: dict[str, ModelSpec] = {
    a.alias: a for a in (
        ModelSpec("Llama", "meta-llama/Meta-Llama-3-8B", "Llama", "Base"),
        ModelSpec("Llama-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "Llama", "Instruct"),
        ModelSpec("Qwen", "Qwen/Qwen2.5-7B", "Qwen", "Base"),
        ModelSpec("Qwen-Instruct", "Qwen/Qwen2.5-7B-Instruct", "Qwen", "Instruct"),
        ModelSpec("Mistral", "mistralai/Mistral-7B-v0.3", "Mistral", "Base"),
        ModelSpec("Mistral-Instruct", "mistralai/Mistral-7B-Instruct-v0.3", "Mistral", "Instruct"),
    )
}

ALIASES_ENV = "GQAPRUNE_MODELS"  # path of a user aliases file (JSON or YAML)


def load_alias_file(path: str | os.PathLike) -> dict[str, ModelSpec]:
    """Read ``{alias: {path, family?, variant?}}`` (or ``{alias: path}``) from JSON/YAML."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"model aliases file '{p}' not found", "pass an existing JSON or YAML file")
    fix = "write {alias: {path: ..., family: ..., variant: ...}} or {alias: path} as JSON or YAML"
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix in (".yaml", ".yml"):
            import yaml
            raw = yaml.safe_load(text) or {}
        else:
            raw = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:      # JSONDecodeError is a ValueError
        raise UserError(f"model aliases file '{p}' is not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'} "
                        f"({str(exc).splitlines()[0][:120]})", fix) from exc
    except Exception as exc:  # noqa: BLE001 - yaml.YAMLError and friends
        raise UserError(f"model aliases file '{p}' could not be parsed ({str(exc).splitlines()[0][:120]})", fix) from exc
    if not isinstance(raw, dict):
        raise UserError(f"model aliases file '{p}' holds a {type(raw).__name__}, not a mapping of aliases", fix)
    out = {}
    for alias, entry in raw.items():
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise UserError(f"model aliases file '{p}': entry '{alias}' has no path", fix)
        base = BUILTIN_ALIASES.get(alias)
        out[alias] = ModelSpec(alias, entry["path"],
                               entry.get("family", base.family if base else "custom"),
                               entry.get("variant", base.variant if base else
                                         ("Instruct" if "instruct" in alias.lower() else "Base")))
    return out


def known_aliases(aliases_file: str | None = None) -> dict[str, ModelSpec]:
    table = dict(BUILTIN_ALIASES)
    file = aliases_file or os.environ.get(ALIASES_ENV)
    if file:
        table.update(load_alias_file(file))
    return table


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def infer_family(name: str) -> str:
    low = name.lower()
    for fam in ("llama", "qwen", "mistral"):
        if fam in low:
            return fam.capitalize()
    return "custom"


def resolve_model(name: str, aliases_file: str | None = None) -> ModelSpec:
    """Alias, ``demo``, local directory or HF hub id -> :class:`ModelSpec`."""
    table = known_aliases(aliases_file)
    if name in table:
        return table[name]
    if name == DEMO_ALIAS:
        return ModelSpec(DEMO_ALIAS, DEMO_ALIAS, "Demo", "Base")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory '{path}' has no config.json",
                            "point --model at a Hugging Face model folder")
        variant = "Instruct" if "instruct" in path.name.lower() else "Base"
        return ModelSpec(name, str(path.resolve()), infer_family(str(path)), variant)
    if _looks_like_hub_id(name):
        variant = "Instruct" if "instruct" in name.lower() else "Base"
        return ModelSpec(name, name, infer_family(name), variant)
    raise UserError(f"unknown model '{name}'",
                    f"use one of {', '.join(sorted(table) + [DEMO_ALIAS])}, an HF id (org/name) "
                    f"or an existing local directory")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' requested but no GPU is visible", "use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"unknown device '{device}'", "use auto, cpu, cuda or cuda:N") from exc


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelConfig(Section):
    """the model to prune"""
    model: str = knob(DEMO_ALIAS, "alias (Llama, Qwen-Instruct, ...), demo, HF id (org/name) or local directory")
    models_file: str | None = knob(None, f"aliases file (JSON/YAML) that overrides the built-in aliases "
                                   f"(default: ${ALIASES_ENV})")


@dataclass(frozen=True)
class RuntimeConfig(Section):
    """where and in which precision the model runs"""
    dtype: str = knob("auto", "auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16",
                      choices=("auto", *_DTYPES), kind="dtype")
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")
    verbose: bool = knob(False, "show the known-harmless library warnings that are hidden and summarised "
                         "by default (also GQAPRUNE_VERBOSE=1)")

    def resolved(self) -> tuple[torch.device, torch.dtype]:
        device = resolve_device(self.device)
        return device, resolve_dtype(self.dtype, device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype '{dtype}'", f"use auto or one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def load_model_and_tokenizer(spec: ModelSpec, dtype: torch.dtype = torch.float32,
                             device: torch.device | str = "cpu"):
    """Load a causal LM and its tokenizer; pruned checkpoints load through our own loader."""
    from transformers import AutoTokenizer

    path = spec.path
    if spec.alias == DEMO_ALIAS and spec.path == DEMO_ALIAS:
        from gqaprune.demo import ensure_demo_model
        path = str(ensure_demo_model())
    # A hub id on a machine that cannot reach the hub: use the local HF cache or fail at once
    # (the hub client would otherwise retry for about a minute before giving up).
    offline = not Path(path).exists() and not hub_reachable()
    if offline and not _in_hf_cache(path):
        raise UserError(f"model '{path}' could not be fetched from the Hugging Face hub (offline)",
                        "download it first (huggingface-cli download) and pass the local directory, "
                        "or map the alias to it in a models file (GQAPRUNE_MODELS)")
    try:
        model = checkpoint.load_model(path, dtype=dtype, local_files_only=offline)
        # trust_remote_code=False: our pruned checkpoints carry an auto_map for the *model*; the
        # tokenizer is a stock one and must not trigger transformers' "run custom code?" prompt.
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False,
                                                  local_files_only=offline)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt weights (safetensors, torch) and friends
        if not _unreadable_weights(exc):
            _reraise_loading(exc, path)
        raise UserError(f"the model weights in '{path}' are unreadable ({str(exc).splitlines()[0][:160]})",
                        "the checkpoint is truncated or corrupt: download / copy it again") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_architecture(model)
    return model.to(device).eval(), tokenizer


def _unreadable_weights(exc: BaseException) -> bool:
    """A truncated or corrupt weights file (safetensors header / size errors, torch unpickling)."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(k in text for k in ("safetensor", "deserializ", "incomplete metadata", "invalid header",
                                   "unexpected eof", "pytorchstreamreader", "file too small"))


def _reraise_loading(exc: BaseException, path: str):
    """Loading errors a user can fix, as one-line UserErrors; anything else is a bug (re-raised)."""
    if isinstance(exc, ValueError):   # e.g. a model folder without any tokenizer files
        raise UserError(f"could not load the model or tokenizer from '{path}': "
                        f"{str(exc).splitlines()[0][:200]}",
                        "check the folder holds config.json, weights and tokenizer files") from exc
    if isinstance(exc, OSError):
        if Path(path).exists():
            raise UserError(f"could not load model files from '{path}': {str(exc).splitlines()[0]}",
                            "check the folder holds config.json, weights and a tokenizer") from exc
        raise UserError(
            f"model '{path}' could not be fetched from the Hugging Face hub",
            "download it first (huggingface-cli download) and pass the local directory, "
            "or map the alias to it in a models file (GQAPRUNE_MODELS)") from exc
    raise exc
