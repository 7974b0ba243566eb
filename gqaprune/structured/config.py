"""The structured-pruning section of the prune config tree: which units go, and the refit.

Method-specific knobs live in their own sections (``taylor``, ``conditioning``, ``rates``) next to
the code that reads them; which sections a method reads follows from its scorer and allocator
(``methods.resolve(...).sections``), so a knob that does not apply to the chosen method is refused
(see ``gqaprune.pipeline.PruneConfig.check``), never silently ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from gqaprune.config import Section, knob
from gqaprune.structured.conditioning import Conditioning
from gqaprune.structured.methods import AUTO
from gqaprune.structured.obs import ObsConfig
from gqaprune.structured.rates import RatesConfig
from gqaprune.structured.reconstruct import ReconstructionConfig
from gqaprune.structured.scorers.taylor import TaylorConfig
from gqaprune.structured.scoring import SCORERS

# sections that only some methods read (by the scorer's / allocator's ``section`` name)
METHOD_SECTIONS = ("taylor", "conditioning", "rates", "obs", "reconstruction")


@dataclass(frozen=True)
class StructuredConfig(Section):
    """structured pruning (KV groups and MLP channels)"""
    pruning_ratio: float = knob(0.2, "fraction of prunable (attention + MLP) parameters to remove",
                                low=0.0, high=1.0, low_open=True, high_open=True, fix="pass e.g. 0.2 for 20%")
    scorer: str = knob(AUTO, "unit scorer; auto: the method's own (taylor for taylor/layerwise/blockwise)",
                       choices=lambda: (AUTO, *SCORERS.names()))
    layer_start: int | None = knob(None, "prune only layers >= layer_start (none: from the first)")
    layer_end: int | None = knob(None, "prune only layers < layer_end (none: to the last)")
    plan: str | None = knob(None, "replay this pruning_plan.json (path or runs:/ URI) instead of scoring")
    taylor: TaylorConfig = field(default_factory=TaylorConfig)
    conditioning: Conditioning = field(default_factory=Conditioning)
    rates: RatesConfig = field(default_factory=RatesConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    obs: ObsConfig = field(default_factory=ObsConfig)
