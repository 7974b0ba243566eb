"""Joint structured methods: select and commit in one layer walk (the registry).

A scorer + allocator method decides a plan from scores and then commits it (surgery, optional
refit). A *joint* method decides layer by layer on the already-pruned model and writes
compensated weights as it goes (``obs``), so its decision and its commit are one walk; its plan
still replays (``replay``: the same compensation for fixed kept sets).

    JOINT_METHODS.register("obs", JointMethod(run, replay, section="obs", summary=...))

``run(model, ids, structured_cfg, *, batch_size, damping, model_name, provenance)`` and
``replay(model, plan, ids, *, progress)`` return a result with ``plan``, ``layer_rows()``,
``projection_rows()``, ``figure(title)``, ``timings.total_s`` and ``stats_bytes``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gqaprune.registry import Registry


@dataclass(frozen=True)
class JointMethod:
    run: Callable
    replay: Callable
    section: str              # the config section it reads (an attribute of StructuredConfig)
    summary: str = ""


JOINT_METHODS: Registry[JointMethod] = Registry("method")
