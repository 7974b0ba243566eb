"""Llama / Qwen2 / Mistral models whose decoder layers have different sizes after pruning.

This file is copied into every non-uniform checkpoint written by gqaprune and referenced from
``auto_map`` in its config.json, so ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` works on any machine with transformers, without gqaprune installed.
It must therefore import nothing but torch and transformers.

The config keeps the original (valid) head counts and adds per-layer lists:
``gqaprune_layer_num_heads``, ``gqaprune_layer_num_kv_heads``,
``gqaprune_layer_intermediate_sizes``. After the stock model is built, each layer's projections
are replaced by Linear modules of the recorded sizes; then the weights load as usual.
Optional per-layer bool lists ``gqaprune_layer_o_proj_bias`` / ``gqaprune_layer_down_proj_bias``
(written when reconstruction added biases, which stock Llama/Qwen2/Mistral lack) say which
o_proj / down_proj carry a bias; absent lists keep the stock choice.
"""
from torch import nn
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

# Literal copies of gqaprune.arch.CFG_* (this file may import nothing of gqaprune; a test pins them).
CFG_LAYER_HEADS = "gqaprune_layer_num_heads"
CFG_LAYER_KV = "gqaprune_layer_num_kv_heads"
CFG_LAYER_INTER = "gqaprune_layer_intermediate_sizes"
CFG_O_BIAS = "gqaprune_layer_o_proj_bias"
CFG_DOWN_BIAS = "gqaprune_layer_down_proj_bias"


def _linear(old: nn.Linear, in_features: int, out_features: int, bias=None) -> nn.Linear:
    bias = old.bias is not None if bias is None else bool(bias)
    return nn.Linear(in_features, out_features, bias=bias,
                     device=old.weight.device, dtype=old.weight.dtype)


def resize_decoder_layers(model, config) -> None:
    """Give layer i ``heads[i]`` query heads, ``kv[i]`` KV heads and ``inter[i]`` MLP channels."""
    heads = getattr(config, CFG_LAYER_HEADS, None)
    kv = getattr(config, CFG_LAYER_KV, None)
    inter = getattr(config, CFG_LAYER_INTER, None)
    o_bias = getattr(config, CFG_O_BIAS, None)
    down_bias = getattr(config, CFG_DOWN_BIAS, None)
    if heads is None or kv is None or inter is None:
        if o_bias is None and down_bias is None:
            return
        n = len(model.model.layers)
        heads = [config.num_attention_heads] * n
        kv = [config.num_key_value_heads] * n
        inter = [config.intermediate_size] * n
    hidden = config.hidden_size
    hd = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = _linear(attn.q_proj, hidden, heads[i] * hd)
        attn.k_proj = _linear(attn.k_proj, hidden, kv[i] * hd)
        attn.v_proj = _linear(attn.v_proj, hidden, kv[i] * hd)
        attn.o_proj = _linear(attn.o_proj, heads[i] * hd, hidden, o_bias and o_bias[i])
        mlp.gate_proj = _linear(mlp.gate_proj, hidden, inter[i])
        mlp.up_proj = _linear(mlp.up_proj, hidden, inter[i])
        mlp.down_proj = _linear(mlp.down_proj, inter[i], hidden, down_bias and down_bias[i])


class GQAPrunedLlamaConfig(LlamaConfig):
    model_type = "gqaprune_llama"


class GQAPrunedQwen2Config(Qwen2Config):
    model_type = "gqaprune_qwen2"


class GQAPrunedMistralConfig(MistralConfig):
    model_type = "gqaprune_mistral"


class GQAPrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = GQAPrunedLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        resize_decoder_layers(self, config)


class GQAPrunedQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = GQAPrunedQwen2Config

    def __init__(self, config):
        super().__init__(config)
        resize_decoder_layers(self, config)


class GQAPrunedMistralForCausalLM(MistralForCausalLM):
    config_class = GQAPrunedMistralConfig

    def __init__(self, config):
        super().__init__(config)
        resize_decoder_layers(self, config)


# base model_type -> the stock config class (checkpoints whose model_type is the stock one)
STOCK_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}

# base model_type -> (config class, model class)
CLASSES = {
    "llama": (GQAPrunedLlamaConfig, GQAPrunedLlamaForCausalLM),
    "qwen2": (GQAPrunedQwen2Config, GQAPrunedQwen2ForCausalLM),
    "mistral": (GQAPrunedMistralConfig, GQAPrunedMistralForCausalLM),
}
