"""Plans written before the pipeline refactor still load, keep their provenance, and replay to the
same weights (hashes recorded with the code of commit dc8b114 on this fixture)."""
import hashlib
import json
from pathlib import Path

import torch

from conftest import make_tiny_model
from gqaprune.structured.plan import DataInfo, PruningPlan, ReconstructionInfo
from gqaprune.structured.reconstruct import ReconstructionConfig, prune_and_reconstruct

PLAN = Path(__file__).parent / "data" / "plan_v1_qwen2_taylor.json"
SURGERY_SHA = "d99dd3b4a6a33bd7ef25b4aaa1cbfa091d6bbcea1368bdefe8c9255d61f336da"
LSTSQ_SHA = "fcf3caf07df6c540e769fcdfe35c9ada307e68b382f90b8effcf1cd4ce1cec1a"


def digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_old_plan_loads_with_typed_provenance_and_round_trips():
    raw = json.loads(PLAN.read_text())
    plan = PruningPlan.load(PLAN)
    prov = plan.provenance
    assert prov.settings["method"] == "taylor" and prov.settings["normalization"] == "none"
    assert prov.calibration == DataInfo("x.txt", 8, 16, 0)
    assert isinstance(prov.reconstruction, ReconstructionInfo) and prov.reconstruction.target == "residual"
    assert prov.conditioning == raw["provenance"]["conditioning"]
    assert plan.to_dict()["provenance"] == raw["provenance"]          # nothing lost, nothing added


def test_old_plan_replays_to_the_same_weights():
    plan = PruningPlan.load(PLAN)
    model = make_tiny_model("qwen2", 8, 2, layers=3)
    prune_and_reconstruct(model, plan, None, ReconstructionConfig(reconstruct="none", show_progress=False))
    assert digest(model) == SURGERY_SHA
    model = make_tiny_model("qwen2", 8, 2, layers=3)
    ids = torch.randint(3, 97, (8, 16), generator=torch.Generator().manual_seed(0))
    prune_and_reconstruct(model, plan, ids, ReconstructionConfig(reconstruct="lstsq", show_progress=False))
    assert digest(model) == LSTSQ_SHA
