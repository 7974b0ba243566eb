"""The unit scorers, one module each; importing this package registers them in ``SCORERS``.

A new scorer: one new module here (a function returning UnitScores, registered with a Scorer
spec) and one name in the import line below.
"""
from gqaprune.structured.scorers import activation, magnitude, random, taylor  # noqa: F401  (registers them)
from gqaprune.structured.scoring import SCORERS  # noqa: F401
