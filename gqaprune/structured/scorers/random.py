"""``random``: uniform random scores (seeded), the baseline every informed scorer must beat."""
from __future__ import annotations

import torch

from gqaprune.structured.scoring import SCORERS, Scorer, UnitScores
from gqaprune.structured.units import model_shapes


def random_scores(model, batches=None, section=None, *, batch_size: int = 4, seed: int = 0) -> UnitScores:
    """Uniform random scores, seeded; ranked without any cost normalisation (power 0)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = model_shapes(model)
    return UnitScores([torch.rand(s.n_kv, generator=gen) for s in shapes],
                      [torch.rand(s.intermediate, generator=gen) for s in shapes], power=0.0)


SCORERS.register("random", Scorer(random_scores, needs_calibration=False, summary="uniform random (seeded)"))
