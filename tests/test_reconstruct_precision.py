"""reconstruct_stats_dtype: float32 statistics and solves give nearly the float64 refit; bad
values are one-line UserErrors; the default stays float64."""
import pytest
import torch

from conftest import make_tiny_model
from gqaprune.arch import decoder_layers
from gqaprune.errors import UserError
from gqaprune.pipeline import PruneConfig
from gqaprune.structured.plan import LayerPlan, PruningPlan
from gqaprune.structured.reconstruct import NormalEquations, ReconstructionConfig, prune_and_reconstruct
from gqaprune.structured.units import model_shapes
from tracking import cli


def test_float32_normal_equations_exact_values():
    # X = I, Y = [2, 4]^T (as the float64 test): W = [2, 4]; damping 1 towards W0 = 0: [1, 2]
    ne = NormalEquations(2, 1, "cpu", torch.float32)
    ne.add(torch.eye(2), torch.tensor([[2.0], [4.0]]))
    assert ne.xtx.dtype == ne.xty.dtype == torch.float32 and not ne.exact
    w0 = torch.zeros(1, 2, dtype=torch.float64)
    w, used = ne.solve(w0, None, 0.0)
    assert w.dtype == torch.float32 and w.tolist() == [[2.0, 4.0]] and used == 0.0
    assert ne.solve(w0, None, 1.0)[0].tolist() == [[1.0, 2.0]]
    assert ne.solve(w0, torch.tensor([1.0], dtype=torch.float64), 0.0)[0].tolist() == [[1.0, 3.0]]
    assert ne.rel_error(w0) == 1.0 and ne.rel_error(w) == 0.0


def test_float32_blockwise_error_equals_float64_error(monkeypatch):
    """The float64 error of float32 statistics, converted column block by block (blocks of 3 of
    k = 8 columns: a ragged last block), equals the one-shot float64 evaluation of the same sums."""
    import gqaprune.structured.reconstruct as rc
    monkeypatch.setattr(rc, "ERROR_BLOCK", 3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 8, generator=g), torch.randn(50, 5, generator=g)
    lo = NormalEquations(8, 5, "cpu", torch.float32)
    lo.add(x, y)
    hi = NormalEquations(8, 5, "cpu")
    hi.xtx, hi.xty, hi.sx, hi.sy, hi.yy, hi.n = (lo.xtx.double(), lo.xty.double(), lo.sx, lo.sy, lo.yy, lo.n)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    assert lo.rel_error(w) == pytest.approx(hi.rel_error(w), rel=1e-12)


@pytest.mark.parametrize("family,n_heads,n_kv", [("llama", 8, 2), ("qwen2", 4, 4)])
def test_float32_refit_is_close_to_float64(family, n_heads, n_kv):
    ids = torch.randint(3, 97, (8, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for dtype in ("float64", "float32"):
        model = make_tiny_model(family, n_heads, n_kv, layers=2)
        shapes = model_shapes(model)
        plan = PruningPlan("tiny", "manual", 0.3, shapes,
                           [LayerPlan(list(range(0, s.n_kv, 2)) or [0], list(range(0, s.intermediate, 2)))
                            for s in shapes])
        res = prune_and_reconstruct(model, plan, ids, ReconstructionConfig(
            "lstsq", 8, 16, reconstruct_stats_dtype=dtype, show_progress=False))
        out[dtype] = (model, res)
    (m64, r64), (m32, r32) = out["float64"], out["float32"]
    for a, b in zip(decoder_layers(m64), decoder_layers(m32)):
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            wa, wb = a.get_submodule(name).weight, b.get_submodule(name).weight
            torch.testing.assert_close(wb, wa, rtol=1e-3, atol=1e-4 * float(wa.detach().abs().max()))
    for x, y in zip(r64.reports, r32.reports):
        assert y.err_before == pytest.approx(x.err_before, rel=1e-4)
        assert y.err_after == pytest.approx(x.err_after, rel=1e-3)
        assert y.err_after <= y.err_before
    torch.testing.assert_close(m32(ids).logits, m64(ids).logits, rtol=1e-3, atol=1e-4)


def test_default_is_float64_and_bad_values_are_one_line_user_errors():
    assert ReconstructionConfig().reconstruct_stats_dtype == "float64"
    config = cli.parse_config(PruneConfig, ["--model", "m", "--reconstruct_stats_dtype", "float32"], "prune")
    assert config.structured.reconstruction.reconstruct_stats_dtype == "float32"
    for bad in ("float16", "double"):
        with pytest.raises(UserError) as err:
            cli.parse_config(PruneConfig, ["--model", "m", "--reconstruct_stats_dtype", bad], "prune")
        assert str(err.value) == f"unknown reconstruct_stats_dtype '{bad}'; use float64 (default) or float32"
