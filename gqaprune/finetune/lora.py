"""LoRA through peft: which projections get adapters, attach, and merge back into plain weights.

peft sizes each adapter from its own layer, so pruned layers of different widths work. Merge:
W' = W + (lora_alpha / lora_r) B A folded into every adapted Linear (``merge_and_unload``); a
sparse model's zero pattern is kept across it by ``gqaprune.finetune.masks``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from gqaprune.config import Section, knob
from gqaprune.errors import UserError

SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
               "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
GROUPS = {"all": ("q", "k", "v", "o", "gate", "up", "down"), "attn": ("q", "k", "v", "o"),
          "mlp": ("gate", "up", "down")}
DEFAULT_TARGETS = "q,k,v,o,gate,up,down"


def parse_targets(spec: str) -> list[str]:
    """``"q,k,gate"`` / ``"attn"`` / ``"q_proj,lm_head"`` -> module names (order kept, unique)."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        for short in GROUPS.get(part, (part,)):
            full = SHORT_NAMES.get(short, short)
            if full and full not in names:
                names.append(full)
    if not names:
        raise UserError("target_modules is empty", f"pass e.g. {DEFAULT_TARGETS}")
    return names


@dataclass(frozen=True)
class LoraConfig(Section):
    """LoRA adapters (peft; the base model stays frozen)"""
    lora_r: int = knob(8, "LoRA rank", low=1, fix="pass e.g. 8")
    lora_alpha: float = knob(16.0, "LoRA scale numerator (the update is lora_alpha / lora_r * B A)",
                             low=0.0, low_open=True, must="> 0", fix="pass e.g. 16")
    lora_dropout: float = knob(0.05, "dropout on the adapter input", low=0.0, high=1.0, high_open=True,
                               fix="pass e.g. 0.05")
    target_modules: str = knob(DEFAULT_TARGETS, "comma list: q,k,v,o,gate,up,down (or full names, all, attn, mlp)")

    def check(self) -> None:
        parse_targets(self.target_modules)


def resolve_targets(model: nn.Module, spec: str) -> list[str]:
    """Target names checked against the model's Linear layers (by last name component)."""
    names = parse_targets(spec)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    missing = [n for n in names if n not in linear]
    if missing:
        raise UserError(f"target module(s) {', '.join(missing)} not found in the model",
                        f"use some of {', '.join(linear)} (or short names q,k,v,o,gate,up,down, all, attn, mlp)")
    return names


def attach_lora(model: nn.Module, lora: LoraConfig, gradient_checkpointing: bool = False):
    """Wrap ``model`` in a peft LoRA model: only the adapters train (base frozen)."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    config = PeftLoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                            target_modules=resolve_targets(model, lora.target_modules),
                            bias="none", task_type="CAUSAL_LM")
    model.config.use_cache = False
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings():  # peft 0.21 still reads the renamed is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def merge(peft_model) -> nn.Module:
    """``merge_and_unload``: W + (alpha/r) B A folded into each base Linear -> a plain model."""
    model = peft_model.merge_and_unload()
    # transformers 5 renamed gradient -> activation checkpointing; use whichever exists.
    new_api = hasattr(model, "activation_checkpointing_disable")
    enabled = getattr(model, "is_activation_checkpointing" if new_api else "is_gradient_checkpointing", False)
    if enabled:
        (model.activation_checkpointing_disable if new_api else model.gradient_checkpointing_disable)()
    model.config.use_cache = True
    return model.eval()
