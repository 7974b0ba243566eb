"""Reconstruction-aware structured selection (obs): exact OBS algebra on hand-built tensors,
allocation rules, and invariants on tiny models across GQA shapes (pruned == masked dense with the
compensated weights, bit-exact replay, achieved ratio, save -> load)."""
import math
from dataclasses import fields, replace

import pytest
import torch

from gqaprune import checkpoint
from gqaprune.errors import UserError
from gqaprune.structured.obs import ObsSettings, calibration_fingerprint, obs_commit, obs_prune
from gqaprune.structured.obs_alloc import LayerCurve, depth_budgets, global_budgets, uniform_budgets
from gqaprune.structured.obs_math import GramStats, ObsProjection, greedy_remove, refit_kept
from gqaprune.structured.plan import PruningPlan
from gqaprune.structured.units import LayerShape, group_rows, model_shapes
from tests.conftest import GQA_SHAPES, STORIES, TINYSTORIES, make_tiny_model, needs_shared

F64 = torch.float64


def problem(n=200, k=12, h=5, seed=0, noise=0.0):
    """X [n, k] with correlated columns, W [h, k], Y = X W^T (+ noise)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=gen, dtype=F64) @ torch.randn(k, k, generator=gen, dtype=F64)
    w = torch.randn(h, k, generator=gen, dtype=F64)
    y = x @ w.T + noise * torch.randn(n, h, generator=gen, dtype=F64)
    stats = GramStats(k, h, F64, "cpu")
    stats.add(x, y)
    return x, w, y, stats


def sq(a):
    return float(a.square().sum())


# ---- the OBS algebra ------------------------------------------------------------------------
def test_obs_error_exact_values_on_orthogonal_inputs():
    # X = diag(2, 3): H = diag(4, 9), H^-1 = diag(1/4, 1/9); W = [[1, 1]] -> err_j = W_j^2 / (1 / H_jj).
    stats = GramStats(2, 1, F64, "cpu")
    stats.add(torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=F64), torch.tensor([[2.0], [3.0]], dtype=F64))
    proj = ObsProjection(stats, torch.tensor([[1.0, 1.0]], dtype=F64), 1, damping=0.0)
    torch.testing.assert_close(proj.errors(), torch.tensor([4.0, 9.0], dtype=F64), rtol=1e-12, atol=0)
    proj.remove(0)     # orthogonal columns: nothing to compensate
    torch.testing.assert_close(proj.w, torch.tensor([[0.0, 1.0]], dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("width", [1, 3, 4])
def test_obs_error_equals_measured_increase_after_compensation(width):
    x, w, _, stats = problem()
    for j in range(12 // width):
        proj = ObsProjection(stats, w, width, damping=0.0)
        predicted = float(proj.errors()[j])
        proj.remove(j)
        assert proj.w[:, j * width:(j + 1) * width].abs().max() == 0
        assert sq(x @ w.T - x @ proj.w.T) == pytest.approx(predicted, rel=1e-9)


def test_sequential_removals_sum_to_the_total_increase_over_the_refit():
    x, w, y, stats = problem(noise=0.5)                   # Y is not X W^T: the refit W* differs
    proj = ObsProjection(stats, w, 4, damping=0.0)
    optimum = sq(x @ proj.w.T - y)
    steps = [float(proj.errors()[j]) for j in (2,)] + [0.0]
    proj.remove(2)
    steps[1] = float(proj.errors()[0])
    proj.remove(0)
    assert sq(x @ proj.w.T - y) - optimum == pytest.approx(sum(steps), rel=1e-9)


def test_compensated_weights_equal_the_least_squares_refit_on_kept_columns():
    x, w, y, stats = problem(noise=0.3)
    proj = ObsProjection(stats, w, 3, damping=0.0)
    proj.remove(1)
    proj.remove(3)
    kept = torch.tensor([0, 1, 2, 6, 7, 8])
    lstsq = torch.linalg.lstsq(x[:, kept], y).solution.T                   # [h, |K|]
    torch.testing.assert_close(proj.w[:, kept], lstsq, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(refit_kept(stats, w, kept, 0.0), lstsq, rtol=1e-8, atol=1e-9)


def test_damped_compensation_is_the_ridge_refit_towards_the_current_weights():
    x, w, y, stats = problem(noise=0.3)
    damping = 0.1
    lam = damping * float((x * x).sum(0).mean())
    proj = ObsProjection(stats, w, 4, damping)
    proj.remove(0)
    kept = torch.arange(4, 12)
    xk = x[:, kept]
    ridge = torch.linalg.solve(xk.T @ xk + lam * torch.eye(8, dtype=F64), xk.T @ y + lam * w[:, kept].T).T
    torch.testing.assert_close(proj.w[:, kept], ridge, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(refit_kept(stats, w, kept, damping), ridge, rtol=1e-9, atol=1e-10)


def test_chunked_float32_statistics_match_float64():
    x, w, y, ref = problem()
    f32 = GramStats(12, 5, torch.float32, "cpu")
    for part in range(0, 200, 37):
        f32.add(x[part:part + 37].float(), y[part:part + 37].float())
    assert f32.n == ref.n == 200 and f32.xtx.dtype == torch.float32
    torch.testing.assert_close(f32.xtx.double(), ref.xtx, rtol=1e-5, atol=1e-3)
    assert ref.rel_error(w) == pytest.approx(0.0, abs=1e-7)
    assert f32.nbytes() == (12 * 12 + 12 * 5) * 4


def test_greedy_ranks_units_by_error_per_parameter_and_meets_the_budget():
    # attn: 2 groups of 2 orthogonal columns, err = 8 each (cost 8 -> 1 per parameter);
    # mlp: 3 channels with err 1, 3, 6 (cost 2 -> 0.5, 1.5, 3 per parameter).
    def proj(diag, w, width):
        st = GramStats(len(diag), 1, F64, "cpu")
        st.add(torch.diag(torch.tensor(diag, dtype=F64)).sqrt(), torch.zeros(len(diag), 1, dtype=F64))
        return ObsProjection(st, torch.tensor([w], dtype=F64), width, 0.0, refit=False)

    projs = {"attn": proj([4.0, 4.0, 4.0, 4.0], [1.0, 1.0, 1.0, 1.0], 2),
             "mlp": proj([1.0, 3.0, 6.0], [1.0, 1.0, 1.0], 1)}
    steps = greedy_remove(projs, {"attn": 8, "mlp": 2}, budget=11)
    # channel 0 (0.5/param), attn group 0 (1/param), then channel 1 still fits (removed 10 + 2/2
    # <= 11); the last group does not fit, and the last channel must stay.
    assert [(s.kind, s.index) for s in steps] == [("mlp", 0), ("attn", 0), ("mlp", 1)]
    assert [s.error for s in steps] == pytest.approx([1.0, 8.0, 3.0])
    everything = greedy_remove({"mlp": proj([1.0, 2.0, 6.0], [1.0, 1.0, 1.0], 1)}, {"mlp": 2}, budget=1e9)
    assert len(everything) == 2                                            # the last channel stays


# ---- allocation -------------------------------------------------------------------------------
SHAPES = [LayerShape(8, 2, 8, 64, 48)] * 4


def test_uniform_and_depth_budgets_meet_the_target():
    uni = uniform_budgets(SHAPES, range(1, 3), 1000)
    assert uni == [0.0, 500.0, 500.0, 0.0]
    depth = depth_budgets(SHAPES, range(4), 4000, spread=0.5, max_rate=0.8)
    assert sum(depth) == pytest.approx(4000)
    # rates (1 - 0.5, 1 - 0.5/3, 1 + 0.5/3, 1 + 0.5) x the mean
    assert [d / 1000 for d in depth] == pytest.approx([0.5, 5 / 6, 7 / 6, 1.5])


def test_global_budgets_merge_convex_hulls_by_normalised_slope():
    # layer 0: errors 1, then 10 per 100 params; layer 1 (scale 2): 4 per 100 params (slope 0.02).
    curves = [LayerCurve(0, [0, 100, 200], [0, 1, 11]), LayerCurve(1, [0, 100, 200], [0, 4, 8], scale=2.0)]
    assert global_budgets(SHAPES[:2], curves, 150) == [100.0, 50.0]
    assert global_budgets(SHAPES[:2], curves, 350) == [150.0, 200.0]
    # a non-convex curve: the hull skips the expensive first step in favour of the average
    hull = LayerCurve(0, [0, 100, 200], [0, 5, 6]).hull()
    assert hull == [(200, 6)]


# ---- settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [dict(pruning_ratio=1.0), dict(pruning_ratio=0.0), dict(allocation="best"),
                                 dict(damping=-1.0), dict(damping=math.inf), dict(stats_dtype="float16"),
                                 dict(batch_size=0), dict(max_layer_rate=0.0), dict(depth_spread=1.0),
                                 dict(error_scale="loss"), dict(target="dense")])
def test_bad_settings_raise_one_line_user_errors(bad):
    with pytest.raises(UserError) as err:
        ObsSettings(**bad).validate()
    assert "\n" not in str(err.value) and ";" in str(err.value)


def test_every_setting_has_help_and_choice_fields_list_choices():
    for f in fields(ObsSettings):
        assert f.metadata.get("help"), f.name
    choices = {f.name: f.metadata["choices"] for f in fields(ObsSettings) if "choices" in f.metadata}
    assert set(choices) == {"allocation", "stats_dtype", "error_scale", "target"}
    assert all(getattr(ObsSettings(), n) in c for n, c in choices.items())


# ---- tiny models across GQA shapes ------------------------------------------------------------
def calib(n=12, T=16, seed=0):
    return torch.randint(3, 97, (n, T), generator=torch.Generator().manual_seed(seed))


SETTINGS = ObsSettings(pruning_ratio=0.3, batch_size=5)


def masked_dense(dense, pruned, plan):
    """``dense`` with the pruned model's compensated o_proj / down_proj weights in the kept columns
    and zeros in the removed ones."""
    with torch.no_grad():
        for d, p, s, lp in zip(dense.model.layers, pruned.model.layers, plan.original, plan.layers):
            cols = group_rows(s, sorted(lp.kept_kv_groups), "q")
            o = torch.zeros_like(d.self_attn.o_proj.weight)
            o[:, cols] = p.self_attn.o_proj.weight
            d.self_attn.o_proj.weight.copy_(o)
            down = torch.zeros_like(d.mlp.down_proj.weight)
            down[:, sorted(lp.kept_channels)] = p.mlp.down_proj.weight
            d.mlp.down_proj.weight.copy_(down)
    return dense


@pytest.mark.parametrize("family,n_heads,n_kv", GQA_SHAPES)
def test_pruned_equals_masked_dense_with_compensated_weights(family, n_heads, n_kv):
    model = make_tiny_model(family, n_heads, n_kv)
    res = obs_prune(model, calib(), SETTINGS, progress=False)
    plan = res.plan
    ids = calib(2, 10, seed=7)
    expected = masked_dense(make_tiny_model(family, n_heads, n_kv), model, plan)(ids).logits
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert [s.params for s in model_shapes(model)] == [s.params for s in plan.pruned_shapes()]
    # compensation never does worse than surgery alone on the calibration tokens
    assert all(r.err_after <= r.err_pruned * (1 + 1e-4) + 1e-6 for r in res.projections)
    assert {(r.layer, r.proj) for r in res.projections} == \
        {(i, p) for i in range(3) for p in ("o_proj", "down_proj")}


@pytest.mark.parametrize("family,n_heads,n_kv,allocation", [
    ("llama", 4, 4, "uniform"), ("llama", 8, 2, "global"), ("llama", 8, 1, "depth"),
    ("qwen2", 8, 2, "global"), ("llama", 8, 2, "uniform"), ("llama", 8, 2, "depth")])
def test_achieved_ratio_within_one_unit_of_the_target(family, n_heads, n_kv, allocation):
    model = make_tiny_model(family, n_heads, n_kv)
    shapes = model_shapes(model)
    res = obs_prune(model, calib(), replace(SETTINGS, allocation=allocation), progress=False)
    total = sum(s.params for s in shapes)
    removed = total - sum(s.params for s in model_shapes(model))
    assert abs(removed - 0.3 * total) <= max(s.channel_cost for s in shapes)
    assert res.plan.achieved_ratio() == pytest.approx(removed / total)
    assert sum(r.removed_params for r in res.layers) == removed
    if n_kv == 1:      # MQA: the one KV group stays, the MLP pays for everything
        assert all(len(lp.kept_kv_groups) == 1 for lp in res.plan.layers)


REPLAY_SHAPES = [("llama", 4, 4), ("llama", 8, 2), ("llama", 8, 1), ("qwen2", 8, 2)]


@pytest.mark.parametrize("family,n_heads,n_kv", REPLAY_SHAPES)
def test_plan_replays_bit_exact(family, n_heads, n_kv):
    ids = calib()
    model = make_tiny_model(family, n_heads, n_kv)
    plan = obs_prune(model, ids, SETTINGS, "tiny", progress=False,
                     provenance={"calibration": {"dataset": "random ids", "seed": 0}}).plan
    plan = PruningPlan.from_dict(plan.to_dict())                                  # through JSON types
    replay = make_tiny_model(family, n_heads, n_kv)
    res = obs_commit(replay, plan, ids, SETTINGS, progress=False)
    a, b = model.state_dict(), replay.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert all(math.isnan(r.obs_error) for r in res.projections)
    assert plan.method == "obs" and ObsSettings.from_dict(plan.provenance.settings) == SETTINGS
    assert plan.provenance.calibration.num_samples == 12
    assert plan.provenance.calibration.dataset == "random ids"
    assert plan.provenance.calibration.fingerprint == calibration_fingerprint(ids)
    with pytest.raises(UserError):
        ObsSettings.from_dict({"pruning_ratio": 0.3, "dampening": 0.1})


def test_float64_statistics_give_the_same_plan_on_a_tiny_model():
    ids = calib()
    p32 = obs_prune(make_tiny_model("llama", 8, 2), ids, SETTINGS, progress=False)
    p64 = obs_prune(make_tiny_model("llama", 8, 2), ids, replace(SETTINGS, stats_dtype="float64"),
                    progress=False)
    assert [lp.kept_channels for lp in p32.plan.layers] == [lp.kept_channels for lp in p64.plan.layers]
    assert p64.stats_bytes == 2 * p32.stats_bytes


def test_layers_outside_the_range_are_untouched():
    model, dense = make_tiny_model("llama", 8, 2), make_tiny_model("llama", 8, 2)
    res = obs_prune(model, calib(), replace(SETTINGS, layer_start=1, pruning_ratio=0.2), progress=False)
    assert [r.layer for r in res.layers] == [1, 2]
    for (name, p), q in zip(model.model.layers[0].named_parameters(), dense.model.layers[0].parameters()):
        assert torch.equal(p, q), name


def test_save_load_same_logits_and_replay_refuses_another_model(tmp_path):
    model = make_tiny_model("qwen2", 8, 2)
    res = obs_prune(model, calib(), replace(SETTINGS, allocation="depth"), progress=False)
    ids = calib(2, 10, seed=3)
    checkpoint.save_model(model, None, tmp_path)
    torch.testing.assert_close(checkpoint.load_model(tmp_path)(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(UserError):
        obs_commit(make_tiny_model("llama", 8, 1), res.plan, calib(), SETTINGS, progress=False)
    fig = res.figure("tiny")
    assert len(fig.axes) == 2


# ---- stories260K ------------------------------------------------------------------------------
@needs_shared
@pytest.mark.shared
def test_stories260k_35_percent_stays_below_18_on_held_out_text():
    """Held-out TinyStories PPL (every 10th paragraph, 256-token non-overlapping BOS windows)
    after obs at 35% with 32 calibration windows of 128 tokens (seed 0)."""
    from transformers import AutoTokenizer

    from gqaprune import data
    from gqaprune.evaluation.perplexity import PplProtocol, perplexity
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = checkpoint.load_model(STORIES).eval()
    ids = data.calibration_batches(tok, str(TINYSTORIES), 32, 128, seed=0)
    res = obs_prune(model, ids, ObsSettings(pruning_ratio=0.35), "stories260K", progress=False)
    protocol = PplProtocol("tinystories", seq_len=256, bos=True)
    ppl = perplexity(model, data.eval_stream(tok, str(TINYSTORIES)), protocol, tok.bos_token_id,
                     show_progress=False).ppl
    assert abs(res.plan.achieved_ratio() - 0.35) < 0.01
    assert ppl < 18
