"""The demo study: does informed selection beat random on the demo model, as on real models?

Why: the demo model is where a new user first sees the methods compared, so it must order them as
real models do (taylor well ahead of random at 35%, issue 16). This is the small, in-process
version of ``configs/sweeps/demo.yaml`` (no MLflow, seconds on a CPU): every (method,
reconstruction, seed) point prunes a fresh copy of the model and is scored by held-out perplexity.

Protocol: calibration = ``calibration_samples`` seeded windows of ``seq_len`` tokens from the demo
corpus's training stories (``data.calibration_batches``, seed = the point's seed, which also seeds
``random``); evaluation = the held-out stories (every 10th, ``data.eval_stream``), non-overlapping
``seq_len``-token windows without BOS (the eval entry point's default protocol), the first
``ppl_nsamples`` windows (None: all).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from gqaprune import checkpoint, data
from gqaprune.evaluation.perplexity import PplProtocol, perplexity
from gqaprune.structured.config import StructuredConfig
from gqaprune.structured.methods import select
from gqaprune.structured.reconstruct import ReconstructionConfig, prune_and_reconstruct
from gqaprune.structured.surgery import apply_plan


@dataclass(frozen=True)
class StudySettings:
    methods: tuple[str, ...] = ("taylor", "magnitude", "random")
    ratio: float = 0.35
    seeds: tuple[int, ...] = (0, 1)
    reconstruct: tuple[str, ...] = ("none", "lstsq")
    calibration_samples: int = 32
    seq_len: int = 128
    ppl_nsamples: int | None = None


@dataclass(frozen=True)
class StudyRow:
    method: str
    reconstruct: str
    seed: int
    achieved_ratio: float        # fraction of the prunable (projection) parameters removed
    ppl: float                   # held-out demo perplexity after pruning
    plan_sha256: str             # of the kept units (provenance excluded: it holds timings)


@dataclass(frozen=True)
class StudyResult:
    settings: StudySettings
    dense_ppl: float
    rows: tuple[StudyRow, ...]   # in (seed, method, reconstruct) order
    protocol: str

    def ppls(self, method: str, reconstruct: str) -> list[float]:
        return [r.ppl for r in self.rows if r.method == method and r.reconstruct == reconstruct]

    def ranking(self, reconstruct: str) -> list[str]:
        """Methods from best (lowest worst-seed perplexity) to worst."""
        return sorted(self.settings.methods, key=lambda m: max(self.ppls(m, reconstruct)))

    def table(self) -> str:
        """Markdown: one row per method x reconstruction, perplexity per seed."""
        seeds = self.settings.seeds
        lines = ["| method | reconstruct | achieved ratio | " + " | ".join(f"ppl seed {s}" for s in seeds) + " |",
                 "|---|---|---|" + "---|" * len(seeds),
                 f"| dense | - | 0 | " + " | ".join(f"{self.dense_ppl:.3f}" for _ in seeds) + " |"]
        for rec in self.settings.reconstruct:
            for m in self.settings.methods:
                rows = [r for r in self.rows if r.method == m and r.reconstruct == rec]
                lines.append(f"| {m} | {rec} | {rows[0].achieved_ratio:.3f} | "
                             + " | ".join(f"{r.ppl:.3f}" for r in rows) + " |")
        return "\n".join(lines)

    def figure(self, title: str):
        """Held-out perplexity per method (one bar per seed), a panel per reconstruction, dense line."""
        from gqaprune.plots import legend_outside, plt

        recs, methods, seeds = self.settings.reconstruct, self.settings.methods, self.settings.seeds
        fig, axes = plt.subplots(1, len(recs), figsize=(3.2 * len(recs) + 2.0, 3.4), squeeze=False,
                                 sharey=True)
        width = 0.8 / len(seeds)
        for ax, rec in zip(axes[0], recs):
            for k, seed in enumerate(seeds):
                vals = [next(r.ppl for r in self.rows if (r.method, r.reconstruct, r.seed) == (m, rec, seed))
                        for m in methods]
                ax.bar([i + (k - (len(seeds) - 1) / 2) * width for i in range(len(methods))], vals, width,
                       color=f"C{k}", label=f"seed {seed}")
            ax.axhline(self.dense_ppl, color="k", lw=1, ls="--", label="dense")
            ax.set_xticks(range(len(methods)), methods, fontsize=8)
            ax.set_title(f"reconstruct: {rec}", fontsize=9)
        axes[0][0].set_ylabel("held-out perplexity (demo)")
        legend_outside(axes[0][-1])
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        return fig


def plan_sha256(plan) -> str:
    d = plan.to_dict()
    kept = {"original": d["original"], "layers": d["layers"]}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def run_study(model_dir: str | Path, settings: StudySettings = StudySettings()) -> StudyResult:
    """Prune a fresh copy of the model at every point; held-out perplexity of each.

    Runs on one intra-op thread, as the demo model trains: on matrices this small a second thread
    only adds synchronisation (several times slower on a busy machine), and one fixed count keeps
    the perplexities bit-identical from run to run."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_study(model_dir, settings)
    finally:
        torch.set_num_threads(previous)


def _run_study(model_dir: str | Path, s: StudySettings) -> StudyResult:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    stream = data.eval_stream(tok, "demo")                              # (T,)
    proto = PplProtocol("demo", seq_len=s.seq_len, bos=False, nsamples=s.ppl_nsamples)

    def ppl(model) -> float:
        return perplexity(model, stream, proto, tok.bos_token_id, show_progress=False).ppl

    dense = ppl(checkpoint.load_model(model_dir).eval())
    rows = []
    for seed in s.seeds:
        calib = data.calibration_batches(tok, "demo", s.calibration_samples, s.seq_len, seed=seed)  # (N, T)
        for method in s.methods:
            for rec in s.reconstruct:
                rows.append(_point(model_dir, calib, method, rec, seed, s, ppl))
    return StudyResult(s, dense, tuple(rows), _protocol(s))


def _point(model_dir, calib: torch.Tensor, method: str, rec: str, seed: int, s: StudySettings, ppl) -> StudyRow:
    torch.manual_seed(seed)
    model = checkpoint.load_model(model_dir).eval()
    plan = select(model, calib, method, StructuredConfig(pruning_ratio=s.ratio), seed=seed).plan
    if rec == "none":
        apply_plan(model, plan)
    else:
        prune_and_reconstruct(model, plan, calib, ReconstructionConfig(reconstruct=rec, show_progress=False))
    return StudyRow(method, rec, seed, round(plan.achieved_ratio(), 6), ppl(model), plan_sha256(plan))


def _protocol(s: StudySettings) -> str:
    windows = "all" if s.ppl_nsamples is None else f"the first {s.ppl_nsamples}"
    return (f"structured pruning at {s.ratio:.0%} of the prunable parameters; calibration: "
            f"{s.calibration_samples} windows x {s.seq_len} tokens of the demo training stories "
            f"(seed = the point's seed); perplexity: {windows} non-overlapping {s.seq_len}-token "
            f"windows of the held-out demo stories (every 10th), no BOS per window")
