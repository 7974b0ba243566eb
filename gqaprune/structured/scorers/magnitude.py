"""``magnitude``: the L2 norm of all weights (and biases) of each unit."""
from __future__ import annotations

from gqaprune.arch import decoder_layers
from gqaprune.structured.scoring import SCORERS, Scorer, UnitScores, reduce_units
from gqaprune.structured.units import model_shapes, unit_views


def magnitude_scores(model, batches=None, section=None, *, batch_size: int = 4, seed: int = 0) -> UnitScores:
    """||unit weights||_2 per KV group [n_kv] and per MLP channel [I]; no calibration."""
    attn, mlp = [], []
    for layer, shape in zip(decoder_layers(model), model_shapes(model)):
        a, m = unit_views(layer, shape, lambda p: p.detach())
        attn.append(reduce_units(a, "l2sq").sqrt())
        mlp.append(reduce_units(m, "l2sq").sqrt())
    return UnitScores(attn, mlp, power=2.0)


SCORERS.register("magnitude", Scorer(magnitude_scores, needs_calibration=False,
                                     summary="L2 norm of all the unit's weights"))
