"""The pruning plan: the serialisable decision between importance and surgery.

A plan lists, per decoder layer, the KV groups and MLP channels that are *kept*, plus the
original shapes it was computed for and its provenance (method, ratio, data, seed ...). It is
logged as JSON, can be inspected by analysis, and replayed on the same model.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from gqaprune.config import flat
from gqaprune.errors import UserError
from gqaprune.structured.units import LayerShape

PLAN_FORMAT = "gqaprune.plan/v1"


@dataclass(frozen=True)
class DataInfo:
    """Which calibration windows a step used (seeded random windows, see gqaprune.data)."""
    dataset: str
    num_samples: int
    seq_len: int
    seed: int
    fingerprint: str | None = None    # sha256 of the token ids (obs: replay is bit-exact only on them)


@dataclass(frozen=True)
class ReconstructionInfo:
    mode: str
    target: str
    damping: float
    dataset: str
    num_samples: int
    seq_len: int
    seed: int


@dataclass(frozen=True)
class Provenance:
    """How a plan was made: JSON-compatible with every plan written so far (keys as before;
    unknown keys of other versions are kept in ``extra``)."""
    settings: dict = field(default_factory=dict)         # method + every setting of the selection
    calibration: DataInfo | None = None
    conditioning: dict | None = None                      # Conditioning.to_dict() (global allocator)
    layer_importance: dict | None = None                  # method, granularity, per-layer/-block values
    rates: list | None = None                             # RateRow dicts (layerwise / blockwise)
    reconstruction: ReconstructionInfo | None = None
    replayed_from: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = dict(self.extra)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None:
                continue
            if isinstance(value, (DataInfo, ReconstructionInfo)):
                value = {k: v for k, v in asdict(value).items() if v is not None}
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Provenance":
        data = dict(data or {})
        known = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: data.pop(k) for k in list(data) if k in known}
        for key, typ in (("calibration", DataInfo), ("reconstruction", ReconstructionInfo)):
            if isinstance(kw.get(key), dict):
                try:
                    kw[key] = typ(**kw[key])
                except TypeError:       # another version's layout: keep it untyped
                    data[key] = kw.pop(key)
        return cls(**kw, extra=data)

    def with_selection(self, cfg, resolved, seed: int, batch_size: int, alloc) -> "Provenance":
        """Record the structured settings and what the allocator decided."""
        settings = {"method": resolved.method, "scorer": resolved.scorer_name,
                    "allocator": resolved.allocator_name, "batch_size": batch_size, "seed": seed,
                    **{k: v for k, v in flat(cfg).items() if k != "plan"}}
        imp = alloc.layer_importance
        return replace(self, settings=settings,
                       conditioning=alloc.conditioning.conditioning.to_dict() if alloc.conditioning else None,
                       layer_importance=None if imp is None else {
                           "method": imp.method, "granularity": imp.granularity, "layer": imp.layer,
                           "attn": imp.attn, "mlp": imp.mlp},
                       rates=None if alloc.rates is None else [asdict(r) for r in alloc.rates])


@dataclass
class LayerPlan:
    kept_kv_groups: list[int]
    kept_channels: list[int]


@dataclass
class PruningPlan:
    model: str
    method: str
    target_ratio: float
    original: list[LayerShape]
    layers: list[LayerPlan]
    provenance: Provenance = field(default_factory=Provenance)

    # ---- derived numbers ---------------------------------------------------------------
    def pruned_shapes(self) -> list[LayerShape]:
        return [LayerShape(len(lp.kept_kv_groups) * s.group_size, len(lp.kept_kv_groups),
                           s.head_dim, s.hidden, len(lp.kept_channels), s.qkv_bias, s.mlp_bias)
                for s, lp in zip(self.original, self.layers)]

    def prunable_before(self) -> int:
        return sum(s.params for s in self.original)

    def prunable_after(self) -> int:
        return sum(s.params for s in self.pruned_shapes())

    def achieved_ratio(self) -> float:
        return 1.0 - self.prunable_after() / self.prunable_before()

    def is_uniform(self) -> bool:
        shapes = self.pruned_shapes()
        return len({(s.n_kv, s.intermediate) for s in shapes}) == 1

    def layer_summary(self) -> list[dict]:
        """One row per layer: kept counts and fractions (attention, MLP, all)."""
        rows = []
        for i, (s, p) in enumerate(zip(self.original, self.pruned_shapes())):
            rows.append({"layer": i, "kv_groups_before": s.n_kv, "kv_groups_kept": p.n_kv,
                         "channels_before": s.intermediate, "channels_kept": p.intermediate,
                         "kept_attn_frac": p.attn_params / s.attn_params,
                         "kept_mlp_frac": p.mlp_params / s.mlp_params,
                         "kept_frac": p.params / s.params,
                         "pruned_frac": 1.0 - p.params / s.params})
        return rows

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "model": self.model, "method": self.method,
                "target_ratio": self.target_ratio, "achieved_ratio": self.achieved_ratio(),
                "original": [s.to_dict() for s in self.original],
                "layers": [asdict(lp) for lp in self.layers], "provenance": self.provenance.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "PruningPlan":
        if data.get("format") != PLAN_FORMAT:
            raise UserError(f"not a gqaprune plan (format {data.get('format')!r})",
                            f"pass a {PLAN_FORMAT} JSON file written by the prune entry point")
        return cls(data["model"], data["method"], float(data["target_ratio"]),
                   [LayerShape(**s) for s in data["original"]],
                   [LayerPlan(list(lp["kept_kv_groups"]), list(lp["kept_channels"]))
                    for lp in data["layers"]], Provenance.from_dict(data.get("provenance", {})))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"plan file '{p}' not found", "pass the pruning_plan.json of a prune run")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"plan file '{p}' is malformed ({exc})",
                            "pass the pruning_plan.json of a prune run") from exc

    # ---- validation --------------------------------------------------------------------
    def check_compatible(self, shapes: list[LayerShape]) -> None:
        """A plan only replays on a model with exactly the shapes it was computed for."""
        if len(shapes) != len(self.original):
            raise UserError(f"plan is for {len(self.original)} layers but the model has {len(shapes)}",
                            "replay a plan on the model it was computed for")
        for i, (a, b) in enumerate(zip(self.original, shapes)):
            if a != b:
                raise UserError(f"plan layer {i} expects {a} but the model has {b}",
                                "replay a plan on the model it was computed for")
        for i, (s, lp) in enumerate(zip(self.original, self.layers)):
            for name, kept, n in (("KV groups", lp.kept_kv_groups, s.n_kv),
                                  ("channels", lp.kept_channels, s.intermediate)):
                if not kept:
                    raise UserError(f"plan empties layer {i} ({name})",
                                    "every layer must keep at least one KV group and one channel")
                if len(set(kept)) != len(kept) or min(kept) < 0 or max(kept) >= n:
                    raise UserError(f"plan layer {i} has invalid {name} indices",
                                    f"indices must be unique and in [0, {n})")
