"""Floor 0: what gqaprune knows about transformers decoder models, and nothing of ours above it.

One place owns the decoder layers, the projection names, the architecture checks and the
config keys our checkpoints add. Everything that walks, scores or cuts a model goes through here,
so a new architecture (or a transformers release that moves a module) is one edit.

Layout of a supported model (Llama / Qwen2 / Mistral, transformers 5), tensor shapes with
hd = head_dim, H = hidden, I = intermediate:

    model.model.embed_tokens, .layers[i], .norm, .rotary_emb;  model.lm_head
    layer.input_layernorm -> layer.self_attn.{q [n_heads*hd, H], k/v [n_kv*hd, H], o [H, n_heads*hd]}
    layer.post_attention_layernorm -> layer.mlp.{gate/up [I, H], down [H, I]}
    layer(h) = mlp_half(attn_half(h)): attn_half(h) = h + attn(norm1(h)); mlp_half(m) = m + mlp(norm2(m))
"""
from __future__ import annotations

import torch
from torch import nn

from gqaprune.errors import UserError

# Decoder layers with q/k/v/o + gate/up/down projections (Qwen2 adds q/k/v biases).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")

ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = tuple([("self_attn", n) for n in ATTN_PROJECTIONS] + [("mlp", n) for n in MLP_PROJECTIONS])

# ---- config keys our checkpoints add (read by checkpoint.py and, as literal copies, by the
# self-contained remote/modeling_gqaprune.py; a test pins the two against each other) ----------
CFG_LAYER_HEADS = "gqaprune_layer_num_heads"            # per-layer query heads
CFG_LAYER_KV = "gqaprune_layer_num_kv_heads"            # per-layer KV heads
CFG_LAYER_INTER = "gqaprune_layer_intermediate_sizes"   # per-layer MLP channels
CFG_O_BIAS = "gqaprune_layer_o_proj_bias"               # per-layer bools: o_proj has a bias
CFG_DOWN_BIAS = "gqaprune_layer_down_proj_bias"         # per-layer bools: down_proj has a bias
CFG_BASE_MODEL_TYPE = "gqaprune_base_model_type"        # llama | qwen2 | mistral
REMOTE_PREFIX = "gqaprune_"                             # model_type of remote-code checkpoints
LAYER_SIZE_KEYS = (CFG_LAYER_HEADS, CFG_LAYER_KV, CFG_LAYER_INTER)
BIAS_KEYS = (CFG_O_BIAS, CFG_DOWN_BIAS)


def base_model_type(config) -> str:
    """The stock model_type behind a (possibly remote-code) config."""
    return getattr(config, CFG_BASE_MODEL_TYPE, None) or config.model_type.removeprefix(REMOTE_PREFIX)


# ---- modules -----------------------------------------------------------------------------------

def backbone(model) -> nn.Module:
    """The decoder stack (``model.model``) of a *ForCausalLM or its peft wrapper."""
    inner = model
    for attr in ("base_model", "model"):
        while hasattr(inner, attr) and not hasattr(inner, "layers"):
            inner = getattr(inner, attr)
    if not hasattr(inner, "layers"):
        raise UserError("model has no decoder layers (model.layers)",
                        "only Llama/Qwen2/Mistral-style causal LMs are supported")
    return inner


def decoder_layers(model) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers."""
    return backbone(model).layers


def final_norm(model) -> nn.Module:
    return backbone(model).norm


def lm_head(model) -> nn.Module:
    return model.get_output_embeddings()


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def check_architecture(model) -> None:
    """Only Llama/Qwen2/Mistral-style decoders (q/k/v/o + gate/up/down) can be pruned."""
    mtype = getattr(model.config, "model_type", "?")
    if base_model_type(model.config) not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"unsupported architecture '{mtype}'",
                        f"gqaprune prunes {', '.join(SUPPORTED_MODEL_TYPES)}-style decoder models")
    layer = decoder_layers(model)[0]
    for block, names in (("self_attn", ATTN_PROJECTIONS), ("mlp", MLP_PROJECTIONS)):
        for name in names:
            if not hasattr(getattr(layer, block), name):
                raise UserError(f"architecture '{mtype}' lacks {block}.{name}",
                                "only Llama/Qwen2/Mistral-style decoder layers are supported")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def projection(layer, block: str, name: str) -> nn.Linear:
    return getattr(getattr(layer, block), name)


def layer_parameters(layer):
    """The projection weights/biases of one decoder layer."""
    for block, name in PROJECTIONS:
        yield from projection(layer, block, name).parameters()


def prunable_parameters(model):
    """The projection weights/biases of all decoder layers (the only tensors pruning touches)."""
    for layer in decoder_layers(model):
        yield from layer_parameters(layer)


def named_linears(layer) -> list[tuple[str, nn.Linear]]:
    """(``self_attn.q_proj``, module), ... in forward order."""
    return [(f"{block}.{name}", projection(layer, block, name)) for block, name in PROJECTIONS]


# ---- running one decoder layer (kwargs: what the model's own forward passed to the layer) ------

def attn_half(layer, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """h [B, T, H] -> h + attn(input_layernorm(h)), with the layer's captured forward kwargs."""
    out = layer.self_attn(hidden_states=layer.input_layernorm(h), **kwargs)
    return h + (out[0] if isinstance(out, tuple) else out)


def mlp_half(layer, mid: torch.Tensor) -> torch.Tensor:
    """Residual after attention [B, T, H] -> layer output."""
    return mid + layer.mlp(layer.post_attention_layernorm(mid))


def run_layer(layer, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One whole decoder layer on h [B, T, H] (its own forward, so nothing is replayed)."""
    out = layer(h, **kwargs)
    return out[0] if isinstance(out, tuple) else out
