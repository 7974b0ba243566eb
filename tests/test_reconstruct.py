"""Layer-wise least-squares reconstruction: exact values on hand-built problems, invariants, and
end to end across Llama / Qwen2 / Mistral GQA shapes."""
import math
import os

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from conftest import GQA_SHAPES, make_tiny_model
from gqaprune import checkpoint
from gqaprune.errors import UserError
from gqaprune.arch import decoder_layers
from gqaprune.structured.plan import LayerPlan, PruningPlan
from gqaprune.arch import CFG_DOWN_BIAS, CFG_O_BIAS
from gqaprune.structured.reconstruct import (NormalEquations,
                                             ReconstructionConfig, ShiftStats, prune_and_reconstruct)
from gqaprune.structured.surgery import apply_plan
from gqaprune.structured.units import group_rows, model_shapes
from prune_entry import prune
from tracking import schema, store


def settings(**kw):
    kw = {("reconstruct" if k == "mode" else k): v for k, v in kw.items()}
    return ReconstructionConfig(**{"show_progress": False, **kw})


def calib(n=16, T=16, vocab=97, seed=0):
    return torch.randint(3, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


def plan_for(model, keep_groups, keep_channels):
    """A plan keeping ``keep_groups(n_kv)`` KV groups and ``keep_channels(I)`` channels per layer."""
    shapes = model_shapes(model)
    return PruningPlan("tiny", "manual", 0.3, shapes,
                       [LayerPlan(keep_groups(s.n_kv), keep_channels(s.intermediate)) for s in shapes])


def half_plan(model):
    """Drop the odd KV groups (when there are >= 2) and the odd MLP channels of every layer."""
    return plan_for(model, lambda n: list(range(0, n, 2)) if n > 1 else [0],
                    lambda i: list(range(0, i, 2)))


# ---- the solve, on hand-built statistics ------------------------------------------------------
def test_ridge_towards_pruned_weights_exact_values():
    # X = I (2 tokens, 2 columns), Y = [2, 4]^T -> X^T X = I, X^T Y = [2, 4]^T, mean diag = 1.
    ne = NormalEquations(2, 1, "cpu")
    ne.add(torch.eye(2), torch.tensor([[2.0], [4.0]]))
    w0 = torch.zeros(1, 2, dtype=torch.float64)
    def check(w, expected):
        torch.testing.assert_close(w, torch.tensor([expected], dtype=torch.float64), rtol=1e-14, atol=1e-14)

    w, used = ne.solve(w0, None, damping=0.0)
    check(w, [2.0, 4.0])
    assert used == 0.0
    # damping 1 -> lam = 1: W = (X^T Y + lam W0^T) / (1 + lam) = [1, 2] (towards W0 = 0)
    check(ne.solve(w0, None, damping=1.0)[0], [1.0, 2.0])
    # ... and towards W0 = [4, 0]: [(2 + 4) / 2, 4 / 2]
    check(ne.solve(torch.tensor([[4.0, 0.0]], dtype=torch.float64), None, 1.0)[0], [3.0, 2.0])
    # an existing bias b is a fixed offset: the weights fit Y - b
    check(ne.solve(w0, torch.tensor([1.0], dtype=torch.float64), 0.0)[0], [1.0, 3.0])
    # relative error ||XW^T - Y|| / ||Y||: W0 = 0 gives 1; the exact fit 0
    assert ne.rel_error(w0) == 1.0 and ne.rel_error(torch.tensor([[2.0, 4.0]], dtype=torch.float64)) == 0.0


def test_bias_compensation_is_the_mean_output_change():
    st = ShiftStats(2, "cpu")
    pred = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    y = torch.tensor([[2.0, 1.0], [6.0, 1.0]])          # changes d = [1, 1], [3, 1]; mean [2, 1]
    st.add(pred, y)
    assert st.mean_change().tolist() == [2.0, 1.0]
    # ||d||^2 = 2 + 10 = 12, ||y||^2 = 5 + 37 = 42; after: sum ||d - mean||^2 = 1 + 1 = 2
    assert st.rel_error(False) == pytest.approx(math.sqrt(12 / 42))
    assert st.rel_error(True) == pytest.approx(math.sqrt(2 / 42))


def test_exact_recovery_when_removed_columns_are_combinations_of_kept_ones():
    gen = torch.Generator().manual_seed(0)
    kept = torch.randn(200, 5, generator=gen, dtype=torch.float64)        # [n, k]
    c = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    full = torch.cat([kept, kept @ c], 1)                                  # removed = kept @ C
    w_dense = torch.randn(4, 8, generator=gen, dtype=torch.float64)        # [H, 8]
    ne = NormalEquations(5, 4, "cpu")
    ne.add(kept, full @ w_dense.T)
    w, _ = ne.solve(w_dense[:, :5].clone(), None, damping=0.0)
    torch.testing.assert_close(w, w_dense[:, :5] + w_dense[:, 5:] @ c.T, rtol=1e-10, atol=1e-10)
    assert ne.rel_error(w) < 1e-7 < ne.rel_error(w_dense[:, :5])


def test_chunked_accumulation_equals_one_shot():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, 6, generator=gen, dtype=torch.float64)          # [b, T, k]
    y = torch.randn(3, 40, 4, generator=gen, dtype=torch.float64)
    one, chunked = NormalEquations(6, 4, "cpu"), NormalEquations(6, 4, "cpu")
    one.add(x, y)
    for i in range(3):
        for j in range(0, 40, 7):                                          # uneven chunks
            chunked.add(x[i, j:j + 7], y[i, j:j + 7])
    assert one.n == chunked.n == 120
    w0 = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    for a, b in ((one.xtx, chunked.xtx), (one.xty, chunked.xty), (one.sx, chunked.sx)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(one.solve(w0, None, 0.01)[0], chunked.solve(w0, None, 0.01)[0],
                               rtol=1e-12, atol=1e-12)
    # float32 activations: float32 chunk products, float64 sums -> same solution to ~1e-6
    single = NormalEquations(6, 4, "cpu")
    for i in range(3):
        single.add(x[i].float(), y[i].float())
    torch.testing.assert_close(single.solve(w0, None, 0.01)[0], one.solve(w0, None, 0.01)[0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["zero column", "duplicated column", "fewer tokens than columns", "all zero"])
def test_rank_deficient_inputs_never_give_nan(case):
    gen = torch.Generator().manual_seed(2)
    n = 3 if case == "fewer tokens than columns" else 50
    x = torch.randn(n, 6, generator=gen)
    if case == "zero column":
        x[:, 2] = 0
    elif case == "duplicated column":
        x[:, 3] = x[:, 1]
    elif case == "all zero":
        x.zero_()
    ne = NormalEquations(6, 3, "cpu")
    ne.add(x, torch.randn(n, 3, generator=gen))
    w0 = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    w, used = ne.solve(w0, None, damping=0.0)
    assert torch.isfinite(w).all()
    assert ne.rel_error(w) <= ne.rel_error(w0) + 1e-12
    if case == "all zero":
        assert torch.equal(w, w0)                 # nothing to learn from: weights unchanged
    else:
        assert used > 0                           # singular: damping raised automatically
        if case == "zero column":                 # an unexcited column keeps its weights
            torch.testing.assert_close(w[:, 2], w0[:, 2])


# ---- whole models -------------------------------------------------------------------------
def duplicated_model(family, n_heads, n_kv):
    """Odd KV groups copy the even ones (q/k/v rows and biases) and odd MLP channels copy the even
    ones (gate/up rows), so the dense output is exactly reproducible from the even units."""
    model = make_tiny_model(family, n_heads, n_kv, layers=2, intermediate=16).double()
    with torch.no_grad():
        for layer, s in zip(decoder_layers(model), model_shapes(model)):
            for g in range(1, s.n_kv, 2):
                for proj, kind in (("q_proj", "q"), ("k_proj", "kv"), ("v_proj", "kv")):
                    lin = getattr(layer.self_attn, proj)
                    dst, src = group_rows(s, [g], kind), group_rows(s, [g - 1], kind)
                    lin.weight[dst] = lin.weight[src]
                    if lin.bias is not None:
                        lin.bias[dst] = lin.bias[src]
            for proj in ("gate_proj", "up_proj"):
                w = getattr(layer.mlp, proj).weight
                w[1::2] = w[0::2]
    return model


@pytest.mark.parametrize("family,n_heads,n_kv", GQA_SHAPES)
def test_reproducible_dense_output_is_recovered_exactly(family, n_heads, n_kv):
    dense = duplicated_model(family, n_heads, n_kv)
    ids = calib(24, 16)
    want = dense(ids).logits
    plain = apply_plan(duplicated_model(family, n_heads, n_kv), half_plan(dense))
    refit = duplicated_model(family, n_heads, n_kv)
    result = prune_and_reconstruct(refit, half_plan(refit), ids, settings(damping=0.0))
    assert not torch.allclose(plain(ids).logits, want, atol=1e-3)        # pruning alone hurts
    torch.testing.assert_close(refit(ids).logits, want, rtol=1e-7, atol=1e-7)
    assert max(r.err_after for r in result.reports) < 1e-6


@pytest.mark.parametrize("family,n_heads,n_kv", GQA_SHAPES)
@pytest.mark.parametrize("mode,damping", [("lstsq", 0.0), ("lstsq", 0.05), ("lstsq", 10.0), ("bias", 0.0)])
def test_error_never_rises_and_architecture_matches_apply_plan(family, n_heads, n_kv, mode, damping):
    model = make_tiny_model(family, n_heads, n_kv, layers=2)
    reference = apply_plan(make_tiny_model(family, n_heads, n_kv, layers=2), half_plan(model))
    result = prune_and_reconstruct(model, half_plan(model), calib(), settings(mode=mode, damping=damping))
    assert [(r.layer, r.proj) for r in result.reports] == [(0, "o_proj"), (0, "down_proj"),
                                                          (1, "o_proj"), (1, "down_proj")]
    for r in result.reports:
        assert r.err_after <= r.err_before + 1e-9, r
        assert r.tokens == 16 * 16 and math.isfinite(r.err_after)
    assert result.reports[1].err_after < result.reports[1].err_before  # layer 0 MLP: learnt
    assert model_shapes(model) == model_shapes(reference)
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all()
        touched = "o_proj" in name or "down_proj" in name
        if not touched:                            # only o_proj / down_proj are refit
            assert torch.equal(p, ref[name]), name
        elif mode == "lstsq":
            assert not name.endswith("bias") or name in ref   # lstsq adds no bias
    has_bias = [layer.mlp.down_proj.bias is not None for layer in decoder_layers(model)]
    assert has_bias == [mode == "bias"] * 2
    assert getattr(model.config, CFG_DOWN_BIAS, None) == ([True, True] if mode == "bias" else None)


def test_batch_size_does_not_change_the_result():
    a, b = make_tiny_model("qwen2", 8, 2).double(), make_tiny_model("qwen2", 8, 2).double()
    prune_and_reconstruct(a, half_plan(a), calib(), settings(batch_size=16))
    prune_and_reconstruct(b, half_plan(b), calib(), settings(batch_size=3))   # uneven last chunk
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-9, msg=name)


def test_bias_mode_is_flaps_compensation_on_the_first_layer():
    """Layer 0's o_proj input is the same in the dense and pruned model, so its new bias must be
    W_o[:, removed] @ mean(x[removed]) over the calibration tokens (FLAP's formula)."""
    dense = make_tiny_model("llama", 8, 2, layers=2)
    ids = calib()
    seen = []
    hook = dense.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    dense(ids)
    hook.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1]).double()                     # [n, n_heads*hd]
    s = model_shapes(dense)[0]
    removed = group_rows(s, [1], "q")
    w = dense.model.layers[0].self_attn.o_proj.weight.detach().double()
    want = w[:, removed] @ x[:, removed].mean(0)
    model = make_tiny_model("llama", 8, 2, layers=2)
    prune_and_reconstruct(model, half_plan(model), ids, settings(mode="bias"))
    torch.testing.assert_close(model.model.layers[0].self_attn.o_proj.bias.double(), want,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family,n_heads,n_kv", [("llama", 8, 2), ("qwen2", 8, 2), ("mistral", 8, 1)])
@pytest.mark.parametrize("mode", ["lstsq", "bias"])
def test_saved_model_reloads_with_equal_logits(family, n_heads, n_kv, mode, word_tokenizer, tmp_path):
    model = make_tiny_model(family, n_heads, n_kv, layers=2)
    prune_and_reconstruct(model, half_plan(model), calib(), settings(mode=mode))
    info = checkpoint.save_model(model, word_tokenizer, tmp_path / "m")
    # uniform halves stay vanilla after lstsq; added biases need the remote-code form
    assert info["format"] == ("remote_code" if mode == "bias" else "vanilla")
    ids = calib(2, 12, seed=5)
    want = model(ids).logits
    torch.testing.assert_close(checkpoint.load_model(tmp_path / "m")(ids).logits, want, rtol=0, atol=0)
    if mode == "bias":
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
        torch.testing.assert_close(theirs(ids).logits, want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["lstsq", "bias"])
def test_projections_that_already_have_a_bias(mode, word_tokenizer, tmp_path):
    """Llama with attention_bias: o_proj's own bias is a fixed offset (lstsq) or updated (bias)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                         attention_bias=True)).eval()
    with torch.no_grad():
        for layer in decoder_layers(model):
            layer.self_attn.o_proj.bias.normal_(0, 0.5)
    old_bias = model.model.layers[0].self_attn.o_proj.bias.detach().clone()
    result = prune_and_reconstruct(model, half_plan(model), calib(), settings(mode=mode))
    assert all(r.err_after <= r.err_before + 1e-9 for r in result.reports)
    new_bias = model.model.layers[0].self_attn.o_proj.bias.detach()
    assert torch.equal(new_bias, old_bias) == (mode == "lstsq")
    info = checkpoint.save_model(model, word_tokenizer, tmp_path / "m")
    assert info["format"] == ("remote_code" if mode == "bias" else "vanilla")
    ids = calib(2, 12, seed=5)
    torch.testing.assert_close(checkpoint.load_model(tmp_path / "m")(ids).logits, model(ids).logits,
                               rtol=0, atol=0)


def test_checkpoints_without_bias_flags_load_as_before(word_tokenizer, tmp_path):
    model = make_tiny_model("llama", 8, 2, layers=2)
    apply_plan(model, plan_for(model, lambda n: [0], lambda i: list(range(i - 3))))
    assert checkpoint.save_model(model, word_tokenizer, tmp_path / "m")["format"] == "vanilla"
    loaded = checkpoint.load_model(tmp_path / "m")
    assert not hasattr(loaded.config, CFG_O_BIAS)
    assert all(layer.self_attn.o_proj.bias is None for layer in decoder_layers(loaded))


def test_under_determined_without_damping_names_the_tokens_needed():
    model = make_tiny_model("llama", 8, 2, layers=2, intermediate=48)
    plan = half_plan(model)          # keeps 4 heads x 8 = 32 o_proj columns and 24 channels
    with pytest.raises(UserError, match="20 calibration tokens < 32 kept columns") as exc:
        prune_and_reconstruct(model, plan, calib(2, 10), settings(damping=0.0))
    assert "reconstruct_seq_len >= 32 tokens" in str(exc.value)
    prune_and_reconstruct(model, plan, calib(2, 10), settings(damping=0.05))   # ridge: fine
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kw,message", [({"damping": -0.1}, "damping must be a finite number >= 0"),
                                        ({"damping": float("nan")}, "damping must be"),
                                        ({"mode": "qr"}, "unknown reconstruct mode 'qr'"),
                                        ({"target": "x"}, "unknown reconstruction target")])
def test_bad_settings(kw, message):
    with pytest.raises(UserError, match=message):
        settings(**kw).check()


# ---- the prune entry point --------------------------------------------------------------------
def last_run():
    client = MlflowClient()
    exp = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]


def common_args(model_dir, text_file):
    return ["--model", str(model_dir), "--pruning_ratio", "0.3", "--calibration_dataset", str(text_file),
            "--taylor_num_samples", "4", "--taylor_seq_len", "16", "--importance_samples", "4",
            "--reconstruct_samples", "8", "--reconstruct_seq_len", "32"]


@pytest.mark.parametrize("method", ["taylor", "magnitude", "random", "layerwise", "blockwise"])
def test_entry_point_reconstructs_after_every_method(method, tracking_store, saved_tiny_model, text_file):
    model_dir = saved_tiny_model("llama", 8, 2)   # (the qwen2 fixture's word tokenizer yields no ids)
    assert prune.main(common_args(model_dir, text_file) + ["--method", method]) == 0
    run = last_run()
    m, p = run.data.metrics, run.data.params
    assert p["reconstruct"] == "lstsq" and p["damping"] == "0.05"       # the default
    for layer in range(3):
        for proj in ("o_proj", "down_proj"):
            before = m[schema.recon_metric(layer, proj, "before")]
            assert m[schema.recon_metric(layer, proj, "after")] <= before + 1e-9
    assert m[schema.M_RECON_ERR_MEAN.format(when="after")] < m[schema.M_RECON_ERR_MEAN.format(when="before")]
    assert m[schema.M_RECON_TIME] > 0
    names = set(store.artifact_paths(run.info.run_id))   # the pruned model is an MLflow Model
    assert {schema.A_RECON_ERRORS, schema.A_RECON_ERRORS_FIG, schema.A_PRUNED_MODEL} <= names
    plan = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{schema.A_PLAN}")
    assert plan["provenance"]["reconstruction"] == {
        "mode": "lstsq", "target": "residual", "damping": 0.05, "dataset": str(text_file),
        "num_samples": 8, "seq_len": 32, "seed": 0}
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/{schema.A_PRUNED_MODEL}")
    assert sum(x.numel() for x in checkpoint.load_model(local).parameters()) == m[schema.M_PARAMS_AFTER]


def test_entry_point_bias_mode_and_plan_replay(tracking_store, saved_tiny_model, text_file):
    model_dir = saved_tiny_model("mistral", 8, 2)
    args = common_args(model_dir, text_file) + ["--reconstruct", "bias", "--method", "magnitude"]
    assert prune.main(args) == 0
    first = last_run()
    assert first.data.tags["checkpoint_format"] == "remote_code"
    # replaying the plan (calibration_dataset auto -> the data recorded in the plan) is identical
    assert prune.main(["--model", str(model_dir), "--plan", f"runs:/{first.info.run_id}/{schema.A_PLAN}",
                       "--reconstruct", "bias", "--reconstruct_samples", "8",
                       "--reconstruct_seq_len", "32"]) == 0
    ids = calib(2, 12)
    a, b = (checkpoint.load_model(mlflow.artifacts.download_artifacts(
        f"runs:/{r.info.run_id}/{schema.A_PRUNED_MODEL}")) for r in (first, last_run()))
    assert a.model.layers[0].mlp.down_proj.bias is not None
    torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("extra,message", [
    (["--reconstruct", "svd"], "unknown reconstruct mode 'svd'"),
    (["--damping", "-1"], "damping must be a finite number >= 0"),
    (["--reconstruct_samples", "0"], "reconstruct_samples must be >= 1"),
    (["--damping", "0", "--reconstruct_samples", "1", "--reconstruct_seq_len", "8"],
     "8 calibration tokens < 64 kept columns"),
])
def test_entry_point_bad_input(extra, message, tracking_store, saved_tiny_model, text_file, capsys):
    model_dir = saved_tiny_model("llama", 8, 2)
    args = ["--model", str(model_dir), "--method", "magnitude", "--pruning_ratio", "0.3",
            "--calibration_dataset", str(text_file), "--save_model", "false", *extra]
    assert prune.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err
    assert last_run().info.status == "FAILED"
