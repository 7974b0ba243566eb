"""Floor 4: one prune run as a core function with typed results.

    outcome = prune(model, tokenizer, config, model_alias="Llama", model_path="meta-llama/...")

1. calibration windows (``data``) for the scorer, if it needs them;
2. layer importance (measured on its own windows, or reused) for allocators that need it;
3. selection (``structured.methods.select``): scorer -> allocator -> a :class:`PruningPlan`,
   or a plan given to replay;
4. the one commit path (``structured.reconstruct.prune_and_reconstruct``): surgery, optionally
   with the layer-by-layer refit of o_proj / down_proj;
5. the gradient diagnosis of Taylor-based plans.

Nothing here logs or parses flags: the entry point (``prune_entry/prune.py``) parses the config,
loads the model, calls :func:`prune` and logs the :class:`PruneOutcome`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from gqaprune import data
from gqaprune.arch import count_parameters
from gqaprune.config import Section, changed, flat, knob
from gqaprune.data import CalibrationConfig
from gqaprune.datadir import DataDirConfig
from gqaprune.errors import UserError
from gqaprune.loading import ModelConfig, RuntimeConfig
from gqaprune.structured.allocation import layer_range
from gqaprune.structured.conditioning import ConditioningInfo, conditioned_keys
from gqaprune.structured.config import METHOD_SECTIONS, StructuredConfig
from gqaprune.structured.diagnosis import Diagnosis, diagnose, verdict
from gqaprune.structured.layer_importance import LayerImportance, compute_layer_importance
from gqaprune.structured.joint import JOINT_METHODS
from gqaprune.structured.methods import METHODS, method_names, resolve, select
from gqaprune.structured.plan import DataInfo, Provenance, PruningPlan, ReconstructionInfo
from gqaprune.structured.rates import RateRow, check_reachable_rates
from gqaprune.sparsity import SparsityOutcome, sparsify
from gqaprune.sparsity import config as sparse_cfg
from gqaprune.sparsity.compressed import check_compressed_export
from gqaprune.sparsity.config import SparsitySection
from gqaprune.structured.reconstruct import DEFAULT_DAMPING, ReconstructResult, prune_and_reconstruct
from gqaprune.structured.scoring import UnitScores
from gqaprune.structured.units import model_shapes

PLAN_METHOD = "plan"    # the method label of a replayed plan
STRUCTURED, SPARSITY = "structured", "sparsity"     # the two kinds of method
# ``damping`` is shared: the relative damping of whichever second-order solve the method runs.
DEFAULT_DAMPINGS = {STRUCTURED: DEFAULT_DAMPING, SPARSITY: sparse_cfg.DEFAULT_DAMPING}


def all_methods() -> tuple[str, ...]:
    """Structured methods (and scorers), then the sparsity methods."""
    return (*method_names(), *sparse_cfg.METHODS)


def method_kind(method: str) -> str:
    return SPARSITY if method in sparse_cfg.METHODS else STRUCTURED


@dataclass(frozen=True)
class OutputConfig(Section):
    """where the pruned model goes"""
    output_dir: str | None = knob(None, "also keep the pruned model in this directory")
    save_model: bool = knob(True, "log the pruned model as an artifact (false: plan and metrics only)")


@dataclass(frozen=True)
class PruneConfig(Section):
    """prune: structured GQA-aware pruning of a causal LM"""
    method: str = knob("taylor", "pruning method: structured (a scorer + an allocator; a scorer's name: that "
                       "scorer ranked globally) or sparsity (wanda, sparsegpt, magnitude_unstructured, "
                       "block_hybrid)", choices=lambda: all_methods())
    damping: float | None = knob(None, "relative damping of the method's second-order solve: the lstsq refit "
                                 "(none: 0.05) or sparsegpt (none: 0.01), relative to mean(diag(X^T X))",
                                 low=0.0, must="a finite number >= 0",
                                 fix="pass e.g. --damping 0.05 (relative to the mean diagonal of X^T X)")
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    data: DataDirConfig = field(default_factory=DataDirConfig)
    structured: StructuredConfig = field(default_factory=StructuredConfig)
    sparsity: SparsitySection = field(default_factory=SparsitySection)
    output: OutputConfig = field(default_factory=OutputConfig)

    def check(self) -> None:
        s = self.structured
        data.check_window_budget("importance_samples x taylor_seq_len", s.rates.importance_samples,
                                 self.calibration.taylor_seq_len)
        data.check_window_budget("reconstruct_samples x reconstruct_seq_len", s.reconstruction.reconstruct_samples,
                                 s.reconstruction.reconstruct_seq_len)
        if self.kind == SPARSITY:
            self._check_sparsity()
            return
        if self.sparsity.sparsity is not None:
            raise UserError(f"sparsity applies to the sparsity methods ({', '.join(sparse_cfg.METHODS)}), not to "
                            f"structured method {self.method}",
                            "drop sparsity and pass pruning_ratio (the fraction of prunable parameters removed)")
        if self.structured.plan is not None:
            return      # a replay decides nothing: the plan's own settings hold
        r = resolve(self.method, self.structured.scorer)
        s = self.structured
        if r.importance and s.layer_start is None and s.layer_end is None:
            # all layers pruned: the average rate is the ratio itself
            check_reachable_rates(s.pruning_ratio, s.rates.min_pruning_rate, s.rates.max_pruning_rate)

    def _check_sparsity(self) -> None:
        if self.structured.pruning_ratio != StructuredConfig().pruning_ratio:
            raise UserError(f"pruning_ratio applies to structured methods, not to sparsity method {self.method}",
                            "drop pruning_ratio and pass sparsity (the fraction of weights set to zero), e.g. 0.5")
        if self.structured.plan is not None:
            raise UserError(f"plan replays structured plans, not sparsity method {self.method}",
                            "drop plan, or replay with a structured method's plan")
        self.sparsity.to_config(self.method, self.damping)          # the method's own rules
        if self.sparsity.sparse_format == "compressed":
            check_compressed_export(self.sparsity.sparsity_pattern)

    @property
    def kind(self) -> str:
        return method_kind(self.method)

    @property
    def method_label(self) -> str:
        return PLAN_METHOD if self.structured.plan and self.kind == STRUCTURED else self.method

    @property
    def ratio(self) -> float | None:
        """The run's target ratio: pruning_ratio (structured) or the target sparsity (sparsity)."""
        if self.kind == STRUCTURED:
            return self.structured.pruning_ratio
        return self.sparsity.to_config(self.method, self.damping).target_sparsity()

    @property
    def needs_calibration(self) -> bool:
        """Whether the run reads calibration windows (scores, layer importance, refit, sparsity)."""
        if self.kind == SPARSITY:
            return self.sparsity.to_config(self.method, self.damping).needs_calibration
        refit = self.structured.reconstruction.reconstruct != "none"
        if self.structured.plan is not None:
            return refit
        return resolve(self.method, self.structured.scorer).needs_calibration or refit

    def resolved_damping(self) -> float:
        return DEFAULT_DAMPINGS[self.kind] if self.damping is None else self.damping


def readers_of(section: str) -> list[str]:
    """The methods whose scorer or allocator reads a config section."""
    return [m for m in method_names() if section in resolve(m).sections]


def applicable(config: PruneConfig) -> tuple[PruneConfig, dict]:
    """The config with the sections the method does not read reset to their defaults (the damping
    resolved), and the values that were set there (``{name: value}``). Entry points say so before
    the run starts and tag the run; params and plans then record only what the method used."""
    config = replace(config, damping=config.resolved_damping())
    if config.kind == SPARSITY:
        dropped = {k: v for k, v in changed(config.structured).items()}
        if not dropped:
            return config, {}
        return replace(config, structured=StructuredConfig()), dropped
    dropped = changed(config, "sparsity")
    sparsity = SparsitySection() if dropped else config.sparsity
    if config.structured.plan is not None:
        return replace(config, sparsity=sparsity), dropped
    reads = resolve(config.method, config.structured.scorer).sections
    sections = {}
    for name in METHOD_SECTIONS:
        diff = changed(config.structured, name)
        if name not in reads and diff:
            dropped.update(diff)
            sections[name] = type(getattr(config.structured, name))()
    if not dropped:
        return config, {}
    return replace(config, sparsity=sparsity, structured=replace(config.structured, **sections)), dropped


def unread(config: PruneConfig) -> set[str]:
    """Leaf names the config's method does not read (whatever their values)."""
    if config.kind == SPARSITY:
        return set(flat(StructuredConfig()))
    out = set(flat(SparsitySection()))
    if config.structured.plan is None:
        reads = resolve(config.method, config.structured.scorer).sections
        for name in METHOD_SECTIONS:
            if name not in reads:
                out |= set(flat(getattr(StructuredConfig(), name)))
    return out


def not_applied_note(config: PruneConfig, dropped: dict) -> str:
    groups: dict[str, list[str]] = {}
    for name in dropped:
        if name in flat(StructuredConfig()) and config.kind == SPARSITY:
            groups.setdefault("structured pruning", []).append(name)
        elif name in flat(SparsitySection()):
            groups.setdefault("sparsity methods", []).append(name)
        else:
            section = next(s for s in METHOD_SECTIONS if name in flat(getattr(StructuredConfig(), s)))
            groups.setdefault(", ".join(readers_of(section)), []).append(name)
    parts = [f"{', '.join(keys)} (read by {who})" for who, keys in groups.items()]
    return (f"note: method {config.method} does not read {'; '.join(parts)}: "
            f"{'it is' if len(dropped) == 1 else 'they are'} not used and not logged")


@dataclass(frozen=True)
class PruneInputs:
    """Artifacts the entry point fetched for this run (a plan to replay, an importance to reuse)."""
    plan: PruningPlan | None = None
    plan_source: str | None = None             # what the user passed (path or runs:/ URI)
    layer_importance: LayerImportance | None = None
    importance_source: str | None = None


@dataclass
class Timings:
    scoring_s: float = 0.0
    importance_s: float = 0.0
    reconstruction_s: float = 0.0
    total_s: float = 0.0


@dataclass
class PruneOutcome:
    plan: PruningPlan | None                   # structured methods (None for sparsity methods)
    scores: UnitScores | None
    layer_importance: LayerImportance | None
    rates: list[RateRow] | None
    conditioning: ConditioningInfo | None
    diagnosis: Diagnosis | None
    reconstruction: ReconstructResult | None
    timings: Timings
    calibration_source: str                    # the resolved calibration dataset
    params_before: int
    params_after: int
    sparsity: SparsityOutcome | None = None    # sparsity methods
    data_sources: list = field(default_factory=list)   # datadir.DataCopy of every source read
    joint: Any = None                          # a joint method's result (obs: structured.obs.ObsResult)


def prune(model, tokenizer, config: PruneConfig, *, model_alias: str, model_path: str,
          inputs: PruneInputs = PruneInputs()) -> PruneOutcome:
    """Decide (or replay) a plan, commit it to ``model`` in place, and diagnose it."""
    t0 = time.perf_counter()
    check_context(model, config)
    params_before = count_parameters(model)
    source = config.calibration.source(model_alias)
    if config.kind == SPARSITY:
        return _sparsify(model, tokenizer, config, source, params_before, t0)
    joint = _joint_of(config, inputs)
    if joint is not None:
        return _joint(model, tokenizer, config, joint, source, model_path, inputs, params_before, t0)
    if inputs.plan is not None:
        plan, sel, imp, t_imp = _replay(model, inputs), None, None, 0.0
        source = _reconstruction_source(config, plan, source)
    else:
        imp, t_imp = _layer_importance(model, tokenizer, config, source, model_path, inputs)
        sel = _select(model, tokenizer, config, source, model_path, imp)
        plan = sel.plan
    recon = _commit(model, tokenizer, config, plan, source)
    total = time.perf_counter() - t0
    alloc = sel.allocation if sel else None
    diag = None if sel is None else _diagnosis(config, sel)
    return PruneOutcome(plan, sel.scores if sel else None, imp, alloc.rates if alloc else None,
                        alloc.conditioning if alloc else None, diag, recon,
                        Timings(sel.scoring_time_s if sel else 0.0, t_imp,
                                recon.time_s if recon else 0.0, total),
                        source, params_before, count_parameters(model),
                        data_sources=_sources(config, source, config.needs_calibration))


def _replay(model, inputs: PruneInputs, check: bool = True) -> PruningPlan:
    plan = inputs.plan
    if check:
        plan.check_compatible(model_shapes(model))
    plan.provenance = replace(plan.provenance, replayed_from=inputs.plan_source)
    return plan


def check_context(model, config: PruneConfig) -> None:
    """Every window the run will draw fits the model's positions."""
    if not config.needs_calibration:
        return
    data.check_context("taylor_seq_len", config.calibration.taylor_seq_len, model)
    if config.kind == STRUCTURED and config.structured.reconstruction.reconstruct != "none":
        data.check_context("reconstruct_seq_len", config.structured.reconstruction.reconstruct_seq_len, model)


def _joint_of(config: PruneConfig, inputs: PruneInputs):
    """The joint method (select + commit in one walk) of this run or of the plan it replays."""
    name = inputs.plan.method if inputs.plan is not None else config.method
    return JOINT_METHODS.get(name) if name in JOINT_METHODS else None


def _joint(model, tokenizer, config: PruneConfig, joint, source: str, model_path: str,
           inputs: PruneInputs, params_before: int, t0: float) -> PruneOutcome:
    """obs-style methods: decide layer by layer and write compensated weights as they go. A replay
    regenerates the calibration windows the plan records (its fingerprint is checked)."""
    calib = config.calibration
    if inputs.plan is not None:
        plan = _replay(model, inputs)
        info = plan.provenance.calibration
        source = _reconstruction_source(config, plan, source)
        ids = _windows(replace(config, calibration=replace(calib, seed=info.seed)), tokenizer, source,
                       info.num_samples, info.seq_len)
        result = joint.replay(model, plan, ids)
        result.plan.provenance = replace(result.plan.provenance, replayed_from=inputs.plan_source)
    else:
        ids = _windows(config, tokenizer, source, calib.taylor_num_samples, calib.taylor_seq_len)
        prov = Provenance(calibration=DataInfo(source, calib.taylor_num_samples, calib.taylor_seq_len, calib.seed))
        result = joint.run(model, ids, config.structured, batch_size=calib.batch_size,
                           damping=config.resolved_damping(), model_name=model_path, provenance=prov)
    return PruneOutcome(result.plan, None, None, None, None, None, None,
                        Timings(0.0, 0.0, result.timings.total_s, time.perf_counter() - t0),
                        source, params_before, count_parameters(model), joint=result,
                        data_sources=_sources(config, source, True))


def _sparsify(model, tokenizer, config: PruneConfig, source: str, params_before: int, t0: float) -> PruneOutcome:
    """Sparsity methods: zeros inside the weights, layer by layer on the walker."""
    calib = config.calibration
    scfg = config.sparsity.to_config(config.method, config.resolved_damping())
    scfg.check_model(model)
    ids = None
    if scfg.needs_calibration:
        ids = _windows(config, tokenizer, source, calib.taylor_num_samples, calib.taylor_seq_len)
    outcome = sparsify(model, ids, scfg, batch_size=calib.batch_size)
    return PruneOutcome(None, None, None, None, None, None, None,
                        Timings(outcome.timings.statistics_s, 0.0, 0.0, time.perf_counter() - t0),
                        source if ids is not None else "none", params_before, count_parameters(model), outcome,
                        data_sources=_sources(config, source, ids is not None))


def _reconstruction_source(config: PruneConfig, plan: PruningPlan, default: str) -> str:
    """Explicit calibration_dataset, else (replaying a plan) the data the plan was made with."""
    if config.calibration.calibration_dataset != data.AUTO:
        return default
    for info in (plan.provenance.reconstruction, plan.provenance.calibration):
        src = getattr(info, "dataset", None)
        if src and data.is_available(src):
            return src
    return default


def _windows(config: "PruneConfig", tokenizer, source: str, n: int, seq_len: int):
    """``n`` seeded calibration windows of ``seq_len`` tokens (data-dir copies when present)."""
    return data.calibration_batches(tokenizer, source, n, seq_len, config.calibration.seed,
                                    data_dir=config.data.resolve())


def _sources(config: "PruneConfig", source: str, used: bool) -> list:
    """Where the calibration data was read from (one DataCopy per part), if it was read."""
    return data.check_source(source, "train", config.data.resolve()) if used else []


def _layer_importance(model, tokenizer, config: PruneConfig, source: str, model_path: str,
                      inputs: PruneInputs) -> tuple[LayerImportance | None, float]:
    """Layer (block) importance for allocators that need it: reused, or measured on its own draw
    of ``importance_samples`` windows. Returns (importance, seconds)."""
    granularity = resolve(config.method, config.structured.scorer).importance
    if granularity is None:
        return None, 0.0
    rates, calib = config.structured.rates, config.calibration
    if inputs.layer_importance is not None:
        imp = inputs.layer_importance
        imp.check_compatible(model_path, model_shapes(model), granularity)
        imp.details = {**imp.details, "reused_from": inputs.importance_source, "time_s": 0.0}
        return imp, 0.0
    ids = _windows(config, tokenizer, source, rates.importance_samples, calib.taylor_seq_len)
    t0 = time.perf_counter()
    imp = compute_layer_importance(
        model, ids, rates.importance_method, granularity, calib.batch_size, model_path,
        extra={"calibration": {"dataset": source, "num_samples": rates.importance_samples,
                               "seq_len": calib.taylor_seq_len, "seed": calib.seed}})
    imp.details["time_s"] = time.perf_counter() - t0
    return imp, imp.details["time_s"]


def _select(model, tokenizer, config: PruneConfig, source: str, model_path: str, imp):
    calib = config.calibration
    r = resolve(config.method, config.structured.scorer)
    batches, prov = None, Provenance()
    if r.scorer.needs_calibration:
        batches = _windows(config, tokenizer, source, calib.taylor_num_samples, calib.taylor_seq_len)
        prov = Provenance(calibration=DataInfo(source, calib.taylor_num_samples, calib.taylor_seq_len, calib.seed))
    return select(model, batches, config.method, config.structured, batch_size=calib.batch_size,
                  seed=calib.seed, model_name=model_path, layer_importance=imp, provenance=prov)


def _commit(model, tokenizer, config: PruneConfig, plan: PruningPlan, source: str) -> ReconstructResult | None:
    """The one commit path: surgery, with the layer-by-layer refit unless reconstruct=none.
    Records the refit's settings in the plan's provenance."""
    rc = replace(config.structured.reconstruction, batch_size=config.calibration.batch_size,
                 damping=config.resolved_damping())
    calib = config.calibration
    ids = None
    if rc.reconstruct != "none":
        ids = _windows(config, tokenizer, source, rc.reconstruct_samples, rc.reconstruct_seq_len)
    result = prune_and_reconstruct(model, plan, ids, rc)
    if rc.reconstruct == "none":
        return None
    plan.provenance = replace(plan.provenance, reconstruction=ReconstructionInfo(
        rc.reconstruct, rc.target, rc.damping, source, rc.reconstruct_samples, rc.reconstruct_seq_len, calib.seed))
    return result


def remedy_settings(config: PruneConfig) -> dict:
    """The settings the diagnosis verdict's remedy depends on (rates + conditioning sections)."""
    return {**flat(config.structured.rates), **flat(config.structured.conditioning)}


def _diagnosis(config: PruneConfig, sel) -> Diagnosis | None:
    plan, s = sel.plan, config.structured
    keys = None
    if sel.allocation.conditioning is not None and sel.scores is not None:
        keys = conditioned_keys(plan.original, sel.scores, s.conditioning)   # what the ranking compared
    diag = diagnose(plan, sel.scores, layer_range(len(plan.original), s.layer_start, s.layer_end), keys)
    if diag is None:
        return None
    diag.verdict = verdict(diag, remedy_settings(config))
    if sel.allocation.conditioning is not None:
        info = sel.allocation.conditioning.to_dict()
        diag.conditioning, diag.block_correction = info["conditioning"], info["block_correction"]
    return diag
