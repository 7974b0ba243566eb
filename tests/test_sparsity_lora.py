"""A sparse model's zero pattern survives LoRA fine-tuning + merge only when the mask is re-applied."""
import pytest
import torch

from conftest import make_tiny_model
from gqaprune.errors import UserError
from gqaprune.sparsity import SparsityConfig, apply_masks, measure, sparsify, weight_masks

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_lora(model, steps=2):
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=TARGETS, task_type="CAUSAL_LM"))
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 97, (4, 12), generator=torch.Generator().manual_seed(3))
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return peft_model


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_mask_survives_finetune_and_merge(pattern):
    model = make_tiny_model("llama", 8, 2, layers=2)
    ids = torch.randint(3, 97, (4, 12), generator=torch.Generator().manual_seed(0))
    cfg = SparsityConfig("wanda", 0.5 if pattern == "unstructured" else None, sparsity_pattern=pattern)
    sparsify(model, ids, cfg, progress=False)
    masks = weight_masks(model)
    peft_model = train_lora(model)
    assert weight_masks(peft_model).keys() == masks.keys()           # keys independent of the wrapper
    merged = peft_model.merge_and_unload().eval()
    # without re-applying, the merged W + BA is dense again: the pattern is broken
    broken = sum(int((~masks[k] & (v != 0)).sum()) for k, v in weight_masks(merged).items())
    assert broken > 0
    dense_merged = {n: p.detach().clone() for n, p in merged.named_parameters()}
    changed = apply_masks(merged, masks)
    assert changed == broken
    after = weight_masks(merged)
    for key, mask in masks.items():
        assert torch.equal(after[key], mask), key                      # zero pattern unchanged
    # kept weights keep their fine-tuned values; only masked entries were zeroed
    for name, p in merged.named_parameters():
        assert torch.equal(p, dense_merged[name] * (p != 0)) if name.endswith("proj.weight") else \
            torch.equal(p, dense_merged[name])
    assert sum(r.zeros for r in measure(merged)) == sum(int((~m).sum()) for m in masks.values())


def test_apply_masks_refuses_masks_of_another_model():
    masks = weight_masks(make_tiny_model("llama", 8, 2, layers=2))
    with pytest.raises(UserError, match="shape"):
        apply_masks(make_tiny_model("llama", 8, 2, layers=2, intermediate=32), masks)
    with pytest.raises(UserError, match="miss"):
        apply_masks(make_tiny_model("llama", 8, 2, layers=3), masks)
