"""OWL: exact outlier ratios and rates on hand-built numbers; rates average to the target."""
import pytest
import torch

from conftest import make_tiny_model
from gqaprune.errors import UserError
from gqaprune.sparsity import SparsityConfig, sparsify
from gqaprune.sparsity.owl import outlier_ratio, owl_rates


def test_outlier_ratio_exact():
    # 8 scores, mean 20 / 8 = 2.5; above 5 x 2.5 = 12.5: only the 13
    scores = [torch.tensor([[1.0, 1.0], [1.0, 1.0]]), torch.tensor([[1.0, 1.0, 1.0, 13.0]])]
    assert outlier_ratio(scores, 5.0) == pytest.approx(1 / 8)
    assert outlier_ratio(scores, 6.0) == 0.0             # threshold 15


def test_owl_rates_exact_values_plain_mean():
    rates = owl_rates([0.1, 0.2, 0.3], 0.5, 0.08)
    # kept = (0, 0.08, 0.16) - 0.08 + 0.5: more outliers -> lower sparsity
    assert rates == pytest.approx([0.58, 0.5, 0.42])
    assert sum(rates) / 3 == pytest.approx(0.5, abs=1e-12)


def test_owl_rates_weighted_mean_is_the_target():
    rates = owl_rates([0.1, 0.2, 0.3], 0.5, 0.08, layer_weights=[1, 1, 2])
    assert rates == pytest.approx([0.6, 0.52, 0.44])
    assert (rates[0] + rates[1] + 2 * rates[2]) / 4 == pytest.approx(0.5, abs=1e-12)
    assert max(rates) - min(rates) == pytest.approx(2 * 0.08)


def test_equal_outlier_ratios_give_uniform_rates():
    assert owl_rates([0.2, 0.2], 0.6, 0.08) == pytest.approx([0.6, 0.6])


def test_rates_leaving_the_unit_interval_raise_user_error():
    with pytest.raises(UserError, match="owl_lambda"):
        owl_rates([0.0, 1.0], 0.95, 0.2)


@pytest.mark.parametrize("method", ["wanda", "magnitude_unstructured", "sparsegpt"])
def test_sparsify_with_owl_rates_average_to_target(method):
    model = make_tiny_model("llama", 8, 2, layers=4)
    ids = torch.randint(3, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    out = sparsify(model, ids, SparsityConfig(method, 0.5, owl=True), progress=False)
    assert sum(out.layer_rates) / len(out.layer_rates) == pytest.approx(0.5, abs=1e-12)
    assert len(set(round(r, 9) for r in out.layer_rates)) > 1             # non-uniform
    assert max(out.layer_rates) - min(out.layer_rates) == pytest.approx(0.16)
    # per-row rounding keeps the overall sparsity within half a weight per row of the target
    assert out.overall_sparsity == pytest.approx(0.5, abs=0.01)
    # the layer with the most outliers keeps the most weights
    ratios = out.owl.outlier_ratios
    assert out.layer_rates[ratios.index(max(ratios))] == min(out.layer_rates)
    rows = out.layer_rows()
    for row in rows:
        assert row["sparsity"] == pytest.approx(row["target"], abs=1 / 48)
