"""Save -> load -> same logits, for uniform (vanilla config) and non-uniform (remote code) models."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from gqaprune import checkpoint
from gqaprune.structured.plan import LayerPlan, PruningPlan
from gqaprune.structured.surgery import apply_plan
from gqaprune.structured.units import model_shapes
from tests.conftest import GQA_SHAPES, make_tiny_model
from tests.test_surgery import random_plan


def uniform_plan(model, kv_keep, ch_keep):
    shapes = model_shapes(model)
    return PruningPlan("tiny", "hand", 0.2, shapes,
                       [LayerPlan(list(range(kv_keep)), list(range(ch_keep))) for _ in shapes])


def roundtrip(model, tmp_path):
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = model(ids).logits
    info = checkpoint.save_model(model, None, tmp_path)
    ours = checkpoint.load_model(tmp_path)
    torch.testing.assert_close(ours(ids).logits, expected, rtol=0, atol=0)
    return info, ids, expected


@pytest.mark.parametrize("family,n_heads,n_kv", GQA_SHAPES)
def test_non_uniform_saves_remote_code_and_reloads(family, n_heads, n_kv, tmp_path):
    model = apply_plan(make_tiny_model(family, n_heads, n_kv), random_plan(make_tiny_model(family, n_heads, n_kv), seed=5))
    info, ids, expected = roundtrip(model, tmp_path)
    if info["format"] == "remote_code":
        cfg = json.loads((tmp_path / "config.json").read_text())
        # the stock model_type: config and tokenizer load without custom code; only the model needs it
        assert cfg["model_type"] == family and set(cfg["auto_map"]) == {"AutoModelForCausalLM"}
        assert (tmp_path / checkpoint.REMOTE_FILE).is_file()
        remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
        torch.testing.assert_close(remote(ids).logits, expected, rtol=0, atol=0)


def test_uniform_divisible_saves_vanilla_config(tmp_path):
    model = make_tiny_model("llama", 8, 2)          # hidden 64, head_dim 8
    apply_plan(model, uniform_plan(model, 1, 30))   # 4 heads: 64 % 4 == 0
    info, ids, expected = roundtrip(model, tmp_path)
    assert info["format"] == "vanilla"
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_attention_heads"] == 4
    assert cfg["num_key_value_heads"] == 1 and cfg["intermediate_size"] == 30
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=0)


def test_uniform_but_indivisible_uses_remote_code(tmp_path):
    # 8 heads / 8 KV -> keep 6 groups = 6 heads; 64 % 6 != 0, transformers would reject it.
    model = make_tiny_model("llama", 8, 8)
    apply_plan(model, uniform_plan(model, 6, 40))
    info, ids, expected = roundtrip(model, tmp_path)
    assert info["format"] == "remote_code"
    remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    torch.testing.assert_close(remote(ids).logits, expected, rtol=0, atol=0)


def test_plain_load_of_non_uniform_checkpoint_needs_remote_code(tmp_path):
    model = apply_plan(make_tiny_model("llama", 8, 2), random_plan(make_tiny_model("llama", 8, 2), seed=5))
    checkpoint.save_model(model, None, tmp_path)
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(tmp_path)  # no trust_remote_code: refused


def test_tokenizer_and_config_of_a_pruned_checkpoint_need_no_custom_code(tmp_path, monkeypatch):
    """AutoTokenizer / AutoConfig never reach transformers' "run custom code?" question (any such
    question is made an error here); only the model needs trust_remote_code."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto import configuration_auto, tokenization_auto
    from conftest import make_word_tokenizer

    asked = []

    def no_questions(trust_remote_code, model_name, has_local_code, has_remote_code, *args, **kwargs):
        if has_remote_code and trust_remote_code is None:
            asked.append(model_name)
            raise AssertionError("custom code was asked for")
        return bool(trust_remote_code)
    model = apply_plan(make_tiny_model("llama", 8, 2), random_plan(make_tiny_model("llama", 8, 2), seed=5))
    checkpoint.save_model(model, make_word_tokenizer(tmp_path / "tok"), tmp_path / "m")
    for module in (configuration_auto, tokenization_auto):
        monkeypatch.setattr(module, "resolve_trust_remote_code", no_questions)
    assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "llama"
    assert AutoTokenizer.from_pretrained(tmp_path / "m")("w1 w2")["input_ids"]
    assert asked == []
    # the guard works: a config that names custom code for AutoConfig is asked about
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["auto_map"]["AutoConfig"] = "modeling_gqaprune.GQAPrunedLlamaConfig"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AssertionError, match="custom code was asked for"):
        AutoConfig.from_pretrained(tmp_path / "m")


def test_added_biases_keep_their_own_config_type(tmp_path):
    """o_proj / down_proj biases with uniform sizes: no stock class may load them silently."""
    from gqaprune.arch import CFG_DOWN_BIAS
    model = make_tiny_model("llama", 8, 2)
    for layer in model.model.layers:
        layer.mlp.down_proj.bias = torch.nn.Parameter(torch.full((64,), 0.1))
    setattr(model.config, CFG_DOWN_BIAS, [True] * 3)
    info, ids, expected = roundtrip(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert info["format"] == "remote_code" and cfg["model_type"] == "gqaprune_llama"
    assert "AutoConfig" in cfg["auto_map"]
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(tmp_path)
