"""The plan as an artifact: JSON round trip, replay gives the same model, validation."""
import json

import pytest
import torch

from gqaprune.errors import UserError
from gqaprune.structured.config import StructuredConfig
from gqaprune.structured.methods import select
from gqaprune.structured.plan import PruningPlan
from gqaprune.structured.surgery import apply_plan
from tests.conftest import make_tiny_model


def test_plan_json_round_trip_and_replay(tmp_path):
    model = make_tiny_model("qwen2", 8, 2)
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    plan = select(model, ids, "taylor", StructuredConfig(pruning_ratio=0.25), model_name="tiny").plan
    path = plan.save(tmp_path / "plan.json")
    loaded = PruningPlan.load(path)
    assert loaded.to_dict() == plan.to_dict()
    data = json.loads(path.read_text())
    assert data["format"] == "gqaprune.plan/v1"
    assert data["provenance"]["settings"]["method"] == "taylor"
    a = apply_plan(model, plan)(ids).logits
    b = apply_plan(make_tiny_model("qwen2", 8, 2), loaded)(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_summary_rows_match_pruned_shapes():
    model = make_tiny_model("llama", 8, 2)
    plan = select(model, None, "magnitude", StructuredConfig(pruning_ratio=0.3)).plan
    rows = plan.layer_summary()
    assert [r["kv_groups_kept"] for r in rows] == [len(lp.kept_kv_groups) for lp in plan.layers]
    assert all(0 < r["kept_frac"] <= 1 for r in rows)


def test_plan_rejects_other_model():
    plan = select(make_tiny_model("llama", 8, 2), None, "magnitude", StructuredConfig(pruning_ratio=0.3)).plan
    with pytest.raises(UserError, match="plan is for 3 layers but the model has 2"):
        apply_plan(make_tiny_model("llama", 8, 2, layers=2), plan)
    with pytest.raises(UserError, match="expects"):
        apply_plan(make_tiny_model("llama", 8, 4), plan)


def test_plan_that_empties_a_layer_is_rejected():
    model = make_tiny_model("llama", 8, 2)
    plan = select(model, None, "magnitude", StructuredConfig(pruning_ratio=0.3)).plan
    plan.layers[1].kept_kv_groups = []
    with pytest.raises(UserError, match="empties layer 1"):
        apply_plan(model, plan)


def test_malformed_plan_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        PruningPlan.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match="not a gqaprune plan"):
        PruningPlan.load(bad)
