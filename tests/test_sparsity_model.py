"""sparsify() on tiny Llama / Qwen2 / Mistral models across GQA shapes: invariants (only counted
weights change; masked dense == pruned), exact counts, the N:M check, layer-by-layer calibration
on the already-sparsified model, statistics hooks, bad input, and the figure."""
import copy

import pytest
import torch

from conftest import GQA_SHAPES, make_tiny_model
from gqaprune import arch
from gqaprune.errors import UserError
from gqaprune.sparsity import SparsityConfig, measure, nm_check, sparsify, sparsity_figure
from gqaprune.sparsity.masks import removed_count, unstructured_row_mask
from gqaprune.sparsity.scores import wanda_scores
from gqaprune.sparsity.stats import SHARED_INPUT, collect

CONFIGS = [SparsityConfig("wanda", 0.5), SparsityConfig("magnitude_unstructured", 0.3),
           SparsityConfig("sparsegpt", 0.5, sparsegpt_blocksize=16, sparsegpt_selection="row"),
           SparsityConfig("sparsegpt", 0.5, sparsegpt_blocksize=16),
           SparsityConfig("wanda", sparsity_pattern="2:4"), SparsityConfig("sparsegpt", sparsity_pattern="4:8", sparsegpt_blocksize=16),
           SparsityConfig("block_hybrid", sparsity_pattern="2:4", block_size=8)]


def calib(n=4, T=12, seed=0):
    return torch.randint(3, 97, (n, T), generator=torch.Generator().manual_seed(seed))


def untouched(model):
    """Every parameter that is not a counted projection weight."""
    counted = {id(lin.weight) for layer in arch.decoder_layers(model) for _, lin in arch.named_linears(layer)}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in counted}


@pytest.mark.parametrize("family,n_heads,n_kv", GQA_SHAPES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{c.sparsity_pattern}-{c.sparsegpt_selection}")
def test_sparsify_invariants_across_gqa_shapes(family, n_heads, n_kv, config):
    model = make_tiny_model(family, n_heads, n_kv, layers=2)
    before_w = {f"{i}.{n}": lin.weight.detach().clone() for i, layer in enumerate(arch.decoder_layers(model))
                for n, lin in arch.named_linears(layer)}
    others = untouched(model)
    out = sparsify(model, calib(), config, progress=False)
    # embeddings, lm_head, norms and biases are never touched
    for name, p in model.named_parameters():
        if name in others:
            assert torch.equal(p, others[name]), name
    rows = measure(model)
    assert out.counted_weights == sum(r.total for r in rows)
    nm = config.nm
    for r in rows:
        w = arch.projection(arch.decoder_layers(model)[r.layer], *r.projection.split("."))
        zeros_per_row = (w.weight == 0).sum(1)
        if config.method == "block_hybrid":
            continue
        if nm:
            assert nm_check(model, *nm).ok and out.nm_check.violations == 0
            assert out.nm_check.exact == out.nm_check.groups
        elif config.method == "sparsegpt" and config.sparsegpt_selection == "block":
            assert r.zeros == removed_count(r.total, config.sparsity)
        else:
            assert torch.all(zeros_per_row == removed_count(r.cols, config.sparsity)), r
        if config.method != "sparsegpt":       # masking only: pruned == masked dense
            dense = before_w[f"{r.layer}.{r.projection}"]
            assert torch.equal(w.weight, dense * (w.weight != 0))
    if config.method == "block_hybrid":
        tiles = sum(t.tiles for t in out.tiers)
        assert sum(t.dense for t in out.tiers) / tiles == pytest.approx(0.35, abs=0.07)
        expected = sum((t.nm * 0.5 + t.removed) * 64 for t in out.tiers) / out.counted_weights
        assert out.overall_sparsity == pytest.approx(expected, abs=1e-12)
    else:
        assert out.overall_sparsity == pytest.approx(config.target_sparsity(), abs=0.5 / 48)
    logits = model(input_ids=calib(2, 8, seed=1)).logits
    assert torch.isfinite(logits).all()


def test_calibration_sees_the_already_sparsified_layers():
    """Layer 1's Wanda statistics come from layer 0 *after* it was pruned (model's own forward)."""
    model = make_tiny_model("llama", 8, 2, layers=2)
    ids = calib()
    reference = copy.deepcopy(model)
    sparsify(model, ids, SparsityConfig("wanda", 0.5), progress=False)
    layers = arch.decoder_layers(reference)
    # prune layer 0 of the reference with stats from its dense inputs, via the model's own forward
    sq = {}

    def grab(layer):
        hooks = [lin.register_forward_pre_hook(lambda m, a, n=n: sq.__setitem__(n, (a[0].reshape(-1, a[0].shape[-1]) ** 2).sum(0)))
                 for n, lin in arch.named_linears(layer)]
        with torch.no_grad():
            reference(input_ids=ids)
        for h in hooks:
            h.remove()
    for idx in (0, 1):
        grab(layers[idx])
        for name, lin in arch.named_linears(layers[idx]):
            keep = unstructured_row_mask(wanda_scores(lin.weight, sq[name]), 0.5)
            with torch.no_grad():
                lin.weight.mul_(keep)
    for a, b in zip(arch.decoder_layers(model), layers):
        for (name, la), (_, lb) in zip(arch.named_linears(a), arch.named_linears(b)):
            assert torch.equal(la.weight == 0, lb.weight == 0), name


def test_shared_input_statistics_equal_each_projections_own():
    model = make_tiny_model("qwen2", 8, 2, layers=1)
    layer = arch.decoder_layers(model)[0]
    own = {}
    hooks = [lin.register_forward_pre_hook(lambda m, a, n=n: own.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
             for n, lin in arch.named_linears(layer)]
    h = model.model.embed_tokens(calib(2, 8))
    kwargs = {"position_embeddings": model.model.rotary_emb(h, torch.arange(8)[None]), "attention_mask": None}
    with torch.no_grad():
        stats, _ = collect(layer, [h], [kwargs], hessian=True)
    for hk in hooks:
        hk.remove()
    assert set(SHARED_INPUT) == {"self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj"}
    for name, x in own.items():
        assert torch.allclose(stats.col_sq_of(name), (x ** 2).sum(0), rtol=1e-5)
        assert torch.allclose(stats.hessian_of(name), x.T @ x / 16, rtol=1e-4, atol=1e-6)
    assert stats.tokens == 16


def test_calibration_report_counts_passes_and_one_layers_activations():
    model = make_tiny_model("llama", 8, 2, layers=3)
    out = sparsify(model, calib(4, 12), SparsityConfig("wanda", 0.5, owl=True), batch_size=2, progress=False)
    c = out.calibration
    assert c.layer_passes == 3 + 2 * 3            # OWL pass (stats = advance) + stats and advance per layer
    assert c.layer_activation_bytes == 4 * 12 * 64 * 4          # [N, T, H] float32
    assert c.all_layers_activation_bytes == 3 * c.layer_activation_bytes
    assert c.peak_stats_bytes == 4 * (64 + 64 + 64 + 48)        # col_sq of q, o, gate, down inputs
    assert out.timings.total_s >= out.timings.owl_s + out.timings.statistics_s + out.timings.prune_s
    assert sparsify(make_tiny_model(layers=1), None, SparsityConfig("magnitude_unstructured", 0.5),
                    progress=False).calibration is None


BAD = [
    (dict(method="wanda", sparsity=1.0), "outside [0, 1)"),
    (dict(method="wanda", sparsity=-0.1), "outside [0, 1)"),
    (dict(method="wanda", sparsity=float("nan")), "outside [0, 1)"),
    (dict(method="wanda"), "needs a target sparsity"),
    (dict(method="pruneit", sparsity=0.5), "unknown sparsity method"),
    (dict(method="wanda", sparsity_pattern="4:4"), "0 < N < M"),
    (dict(method="wanda", sparsity_pattern="5:4"), "0 < N < M"),
    (dict(method="wanda", sparsity_pattern="two:four"), "neither"),
    (dict(method="wanda", sparsity=0.6, sparsity_pattern="2:4"), "contradicts"),
    (dict(method="block_hybrid", sparsity_pattern="2:4", tier_fractions=(0.3, 0.3, 0.3)), "sum to"),
    (dict(method="block_hybrid", sparsity_pattern="2:4", tier_fractions=(-0.1, 0.6, 0.5)), "negative"),
    (dict(method="block_hybrid", sparsity_pattern="2:4", tier_fractions="0.5,0.5"), "needs 3 values"),
    (dict(method="block_hybrid", sparsity_pattern="2:4", block_size=6), "multiple of M=4"),
    (dict(method="block_hybrid"), "needs an N:M pattern"),
    (dict(method="wanda", sparsity_pattern="2:4", owl=True), "owl works with"),
    (dict(method="wanda", sparsity=0.5, owl=True, owl_m=0), "owl_m"),
    (dict(method="sparsegpt", sparsity_pattern="2:4", sparsegpt_blocksize=126), "multiple of 4"),
    (dict(method="sparsegpt", sparsity=0.5, damping=-1.0), "damping"),
    (dict(method="sparsegpt", sparsity=0.5, hessian_dtype="float16"), "hessian_dtype"),
    (dict(method="sparsegpt", sparsity=0.5, sparsegpt_selection="column"), "sparsegpt_selection"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_settings_raise_one_line_user_error_with_a_fix(kwargs, message):
    with pytest.raises(UserError) as info:
        SparsityConfig(**kwargs).validate()
    text = str(info.value)
    assert message in text and "; " in text and "\n" not in text


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="wanda", sparsity_pattern="3:32"), "does not divide the input dimension 48"),  # down_proj in = 48
    (dict(method="block_hybrid", sparsity_pattern="2:4", block_size=32), "does not divide layer 0 .*divisor is 16"),
])
def test_shapes_are_checked_against_the_model(kwargs, message):
    with pytest.raises(UserError, match=message):
        sparsify(make_tiny_model(layers=1), calib(), SparsityConfig(**kwargs), progress=False)


def test_calibrated_methods_need_calibration_ids():
    with pytest.raises(UserError, match="needs calibration token windows; pass calibration_ids"):
        sparsify(make_tiny_model(layers=1), None, SparsityConfig("wanda", 0.5), progress=False)
    with pytest.raises(UserError, match="magnitude_unstructured with owl needs"):
        sparsify(make_tiny_model(layers=1), None, SparsityConfig("magnitude_unstructured", 0.5, owl=True))


def test_string_tier_fractions_and_implied_sparsity():
    cfg = SparsityConfig("block_hybrid", sparsity_pattern="2:4", tier_fractions="0.35,0.45,0.2")
    assert cfg.tier_fractions == (0.35, 0.45, 0.2)
    assert cfg.target_sparsity() == pytest.approx(0.45 * 0.5 + 0.2)
    assert SparsityConfig("wanda", sparsity_pattern="1:4").target_sparsity() == 0.75
    SparsityConfig("wanda", 0.5, sparsity_pattern="2:4").validate()      # consistent value accepted


def test_every_field_has_help_text():
    from dataclasses import fields
    for f in fields(SparsityConfig):
        assert f.metadata.get("help"), f.name


def test_figure_and_rows():
    model = make_tiny_model("llama", 8, 2, layers=3)
    out = sparsify(model, calib(), SparsityConfig("wanda", 0.5, owl=True), progress=False)
    fig = sparsity_figure(out)
    assert len(fig.axes[0].patches) == 3 * 3
    rows = out.layer_rows()
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert rows[0]["outlier_ratio"] == out.owl.outlier_ratios[0]
    metrics = out.metrics()
    assert metrics["overall_sparsity"] == out.overall_sparsity
    assert metrics["layer_02_target"] == out.layer_rates[2]
    assert len(out.projection_rows()) == 3 * 7
