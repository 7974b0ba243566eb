"""The architecture adapter (floor 0) and the self-contained remote modeling file agree."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from gqaprune import arch, calibrate
from gqaprune.remote import modeling_gqaprune as remote

from conftest import GQA_SHAPES, make_tiny_model


def test_remote_file_config_keys_are_the_arch_keys():
    for name in ("CFG_LAYER_HEADS", "CFG_LAYER_KV", "CFG_LAYER_INTER", "CFG_O_BIAS", "CFG_DOWN_BIAS"):
        assert getattr(remote, name) == getattr(arch, name), name


def test_remote_file_imports_only_torch_and_transformers():
    tree = ast.parse(Path(remote.__file__).read_text())
    roots = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
             for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in (n.names if isinstance(n, ast.Import) else [n])}
    assert roots <= {"torch", "transformers"}


@pytest.mark.parametrize("family,n_heads,n_kv", GQA_SHAPES)
def test_walker_steps_reproduce_the_model_forward(family, n_heads, n_kv):
    """Running the captured layers one by one ends exactly where the model's own forward does."""
    model = make_tiny_model(family, n_heads, n_kv)
    if family == "mistral":
        model.config.sliding_window = 5    # per-layer sliding-window masks must be captured too
    ids = torch.randint(3, 97, (5, 12), generator=torch.Generator().manual_seed(0))
    walker = calibrate.LayerWalker(model, ids, batch_size=2, progress=False)
    seen = []
    for step in walker:
        seen.append(step.index)
        assert len(step.inputs) == 3 and step.tokens == 5 * 12
    assert seen == list(range(len(arch.decoder_layers(model))))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]  # after final norm
        cap = walker.captured
        last = [calibrate.run_from(model, 0, h, kw) for h, kw in zip(cap.hidden, cap.kwargs)]
        mine = arch.final_norm(model)(torch.cat(last))
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)


def test_walker_uses_the_modified_layer_and_keeps_a_dense_stream():
    model = make_tiny_model("llama", 8, 2, layers=2)
    ids = torch.randint(3, 97, (4, 10), generator=torch.Generator().manual_seed(1))
    dense_out = []
    for step in calibrate.LayerWalker(model, ids, 4, dense="stream", progress=False):
        if step.index == 0:
            with torch.no_grad():
                step.layer.mlp.down_proj.weight.zero_()     # layer 0 now only adds attention
        else:
            # the walked inputs come from the modified layer 0, the dense ones from the copy
            assert not torch.equal(step.inputs[0], step.dense_inputs[0])
            dense_out = step.dense_inputs
        assert step.dense_layer is not step.layer
    with torch.no_grad():
        dense = make_tiny_model("llama", 8, 2, layers=2)
        ref = dense(input_ids=ids, output_hidden_states=True).hidden_states[1]   # entering layer 1
    torch.testing.assert_close(dense_out[0], ref, rtol=0, atol=1e-6)
