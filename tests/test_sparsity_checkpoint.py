"""Sparse checkpoints: the normal Hugging Face checkpoint round-trips zeros and logits; the
compressed-tensors export refuses with the alternative where the package cannot write it."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import GQA_SHAPES, make_tiny_model
from gqaprune.errors import UserError
from gqaprune.sparsity import SparsityConfig, sparsify, weight_masks
from gqaprune.sparsity import compressed


@pytest.mark.parametrize("family,n_heads,n_kv", GQA_SHAPES[:4])
def test_dense_checkpoint_round_trips_zeros_and_logits(tmp_path, family, n_heads, n_kv):
    model = make_tiny_model(family, n_heads, n_kv, layers=2)
    ids = torch.randint(3, 97, (4, 12), generator=torch.Generator().manual_seed(0))
    sparsify(model, ids, SparsityConfig("wanda", sparsity_pattern="2:4"), progress=False)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    a, b = weight_masks(model), weight_masks(loaded)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_format_names():
    assert compressed.format_for("2:4") == "sparse-24-bitmask"
    assert compressed.format_for("4:8") == "sparse-bitmask"
    assert compressed.format_for("unstructured") == "sparse-bitmask"


@pytest.mark.parametrize("pattern", ["2:4", "unstructured", "4:8"])
def test_compressed_export_refuses_with_the_alternative(tmp_path, pattern):
    """The installed compressed-tensors (if any) is asked, through its registry, for a writer."""
    formats = compressed.writable_sparse_formats()
    assert compressed.format_for(pattern) not in formats     # true of every release that works with transformers 5
    with pytest.raises(UserError) as info:
        compressed.save_compressed(make_tiny_model(layers=1), None, tmp_path, pattern)
    text = str(info.value)
    assert compressed.format_for(pattern) in text and "sparse_format=dense" in text and "\n" not in text
    assert not any(tmp_path.iterdir())                         # nothing half-written


def test_compressed_export_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(compressed, "installed_version", lambda: None)
    with pytest.raises(UserError, match="needs the compressed-tensors package.*sparse_format=dense"):
        compressed.save_compressed(make_tiny_model(layers=1), None, tmp_path, "2:4")
