"""Reconstruction-aware structured selection (``obs``) on stories260K, measured in one run.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_obs                 # the table (3 seeds, 20% / 35%)
    OMP_NUM_THREADS=1 python -m benchmarks.bench_obs --tune          # choose settings (training split)

Protocol (printed with the table):
* model ../shared/models/stories260K (float32, CPU, 1 thread);
* calibration: ``data.calibration_batches`` on ../shared/data/tinystories/tinystories_dev.txt:
  ``--samples`` windows of ``--seq_len`` tokens (BOS first) from the *training* paragraphs (all but
  every 10th), seeded by the seed; every method of a seed gets the same windows;
* held-out perplexity: ``data.eval_stream(tok, dev, "validation")`` (every 10th paragraph, joined
  by single newlines), ``evaluation.perplexity`` with non-overlapping 256-token windows, once with
  BOS prefixed to each window (today's default) and once without BOS;
* methods: ``obs`` (this method; uniform / global / depth allocation), ``taylor`` + lstsq and
  ``random`` + lstsq (today's core: ``methods.select`` then ``reconstruct.prune_and_reconstruct``
  with its defaults), and the issue's reference (uniform per layer, refit to the unpruned layer's
  outputs on the pruned inputs, channels from the joint choice: ``target=local, mlp_reselect=false``);
* time: ``obs`` wall time against one forward pass of the calibration set through the dense model
  and against the lstsq reconstruction of the taylor baseline (its ``time_s``, scoring excluded);
* memory: the statistics and greedy state ``obs`` held at once, against storing the inputs.

``--tune`` never reads the held-out paragraphs: it writes the training paragraphs to a temporary
file, calibrates on that file's training part and scores perplexity on its held-out part (every
10th *training* paragraph), for a small grid of settings.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

# tqdm reads TQDM_DISABLE when it is imported: silence the taylor scorer's bar in the table.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from gqaprune import checkpoint, data  # noqa: E402
from gqaprune.arch import decoder_layers  # noqa: E402
from gqaprune.evaluation.perplexity import PplProtocol, perplexity  # noqa: E402
from gqaprune.structured.obs import ObsSettings, obs_prune  # noqa: E402
from gqaprune.structured.units import model_shapes  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
DEV = SHARED / "data" / "tinystories" / "tinystories_dev.txt"
PPL_LEN = 256

REFERENCE = ObsSettings(allocation="uniform", target="local", mlp_reselect=False)
OBS_VARIANTS = {"obs uniform": ObsSettings(allocation="uniform"),
                "obs global": ObsSettings(allocation="global"),
                "obs depth": ObsSettings(allocation="depth")}


def baseline(model, ids: torch.Tensor, method: str, ratio: float, seed: int, plan=None):
    """Today's core, in one place: a scorer's plan (unless ``plan`` is given), then surgery +
    lstsq reconstruction with its defaults. Returns (plan, ReconstructResult)."""
    from gqaprune.structured.config import StructuredConfig
    from gqaprune.structured.methods import select
    from gqaprune.structured.reconstruct import ReconstructionConfig, prune_and_reconstruct
    if plan is None:
        plan = select(model, ids, method, StructuredConfig(pruning_ratio=ratio), seed=seed).plan
    recon = prune_and_reconstruct(model, plan, ids, ReconstructionConfig(reconstruct="lstsq", show_progress=False))
    return plan, recon


def ppl(model, stream: torch.Tensor, bos_id: int, bos: bool) -> float:
    return perplexity(model, stream, PplProtocol("tinystories", "validation", PPL_LEN, bos=bos),
                      bos_id, show_progress=False).ppl


@torch.no_grad()
def forward_time(model, ids: torch.Tensor, batch_size: int) -> float:
    t0 = time.perf_counter()
    for chunk in ids.split(batch_size):
        model(input_ids=chunk, use_cache=False)
    return time.perf_counter() - t0


def run_one(dense, name: str, ids, ratio: float, seed: int):
    """(pruned model, achieved ratio) for one method."""
    model = copy.deepcopy(dense)
    if name in ("taylor+lstsq", "random+lstsq"):
        plan, _ = baseline(model, ids, name.split("+")[0], ratio, seed)
        return model, plan.achieved_ratio()
    settings = REFERENCE if name == "reference" else OBS_VARIANTS[name]
    res = obs_prune(model, ids, replace(settings, pruning_ratio=ratio), "stories260K", progress=False)
    return model, res.plan.achieved_ratio()


def table(args, tok, dense) -> None:
    stream = data.eval_stream(tok, str(DEV), "validation")
    names = ["taylor+lstsq", "random+lstsq", "reference", *OBS_VARIANTS]
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"dense: held-out PPL {ppl(dense, stream, tok.bos_token_id, True):.3f} (BOS) / "
          f"{ppl(dense, stream, tok.bos_token_id, False):.3f} (no BOS); {stream.numel()} held-out tokens")
    results: dict = {}
    for seed in seeds:
        ids = data.calibration_batches(tok, str(DEV), args.samples, args.seq_len, seed)
        for ratio in ratios:
            for name in names:
                model, achieved = run_one(dense, name, ids, ratio, seed)
                results[name, ratio, seed] = (ppl(model, stream, tok.bos_token_id, True),
                                              ppl(model, stream, tok.bos_token_id, False), achieved)
    print_table(results, names, ratios, seeds)
    print_targets(results, ratios, seeds)
    print_cost(args, tok, dense, max(ratios))


def print_table(results, names, ratios, seeds) -> None:
    print(f"\nheld-out PPL, seeds {'/'.join(map(str, seeds))} (mean) — BOS | no BOS; achieved ratio")
    head = f"{'method':14s}" + "".join(f" | {f'{r:.0%} BOS':>22s} | {f'{r:.0%} no BOS':>22s} | ach."
                                       for r in ratios)
    print(head + "\n" + "-" * len(head))
    for name in names:
        line = f"{name:14s}"
        for r in ratios:
            for k in (0, 1):
                vals = [results[name, r, s][k] for s in seeds]
                cell = "/".join(f"{v:.2f}" for v in vals) + f" ({statistics.mean(vals):.2f})"
                line += f" | {cell:>22s}"
            line += f" | {statistics.mean(results[name, r, s][2] for s in seeds):.3f}"
        print(line)


def print_targets(results, ratios, seeds) -> None:
    print("\ntargets (held-out, BOS): obs <= 9.0 at 20%, <= 16.0 at 35%, and >= 15% below random+lstsq "
          "at 35% for every seed")
    for name in OBS_VARIANTS:
        parts = []
        for r, goal in ((0.2, 9.0), (0.35, 16.0)):
            if r in ratios:
                worst = max(results[name, r, s][0] for s in seeds)
                parts.append(f"{r:.0%}: worst seed {worst:.2f} {'<=' if worst <= goal else '>'} {goal} "
                             f"{'OK' if worst <= goal else 'MISSED'}")
        if 0.35 in ratios:
            gains = [1 - results[name, 0.35, s][0] / results["random+lstsq", 0.35, s][0] for s in seeds]
            parts.append("vs random+lstsq at 35%: " + "/".join(f"{g:.0%}" for g in gains) +
                         (" OK" if min(gains) >= 0.15 else " MISSED"))
        print(f"  {name:12s} " + "; ".join(parts))


def print_cost(args, tok, dense, ratio: float) -> None:
    """Wall times at ``ratio`` (seed 0), each the median of ``--repeats`` interleaved runs."""
    ids = data.calibration_batches(tok, str(DEV), args.samples, args.seq_len, 0)
    n_layers = len(decoder_layers(dense))
    forward_time(dense, ids[:8], 8)                                                  # warm-up
    plan, _ = baseline(copy.deepcopy(dense), ids, "taylor", ratio, 0)
    runs: dict = {"forward": [], "lstsq": [], **{n: [] for n in ("reference", *OBS_VARIANTS)}}
    last = {}
    for _ in range(args.repeats):
        runs["forward"].append(forward_time(dense, ids, 8))
        runs["lstsq"].append(baseline(copy.deepcopy(dense), ids, "taylor", ratio, 0, plan)[1].time_s)
        for name in ("reference", *OBS_VARIANTS):
            settings = REFERENCE if name == "reference" else OBS_VARIANTS[name]
            last[name] = obs_prune(copy.deepcopy(dense), ids, replace(settings, pruning_ratio=ratio),
                                   progress=False)
            runs[name].append(last[name].timings.total_s)
    med = {k: statistics.median(v) for k, v in runs.items()}
    t_fwd, recon = med["forward"], med["lstsq"]
    print(f"\ncost at {ratio:.0%}, seed 0, median of {args.repeats} interleaved runs ({args.samples} x "
          f"{args.seq_len} calibration tokens, batch 8, {n_layers} layers, 1 thread):\n"
          f"  one dense forward of the calibration set {t_fwd:.3f} s; lstsq reconstruction of the taylor "
          f"plan {recon:.3f} s = {recon / t_fwd:.2f} forwards ({recon / n_layers / t_fwd:.2f} per layer)")
    for name in ("reference", *OBS_VARIANTS):
        t = last[name].timings
        print(f"  {name:12s} {med[name]:.3f} s = {med[name] / t_fwd:.2f} forwards "
              f"({med[name] / n_layers / t_fwd:.2f} per layer) = {med[name] / recon:.2f}x lstsq "
              f"[last run: profile {t.profile_s:.3f}, forwards+stats {t.forward_s:.3f}, greedy "
              f"{t.select_s:.3f}, solves {t.solve_s:.3f}]")
    res = last["obs global"]
    n_tok = ids.numel()
    s = model_shapes(dense)[0]
    inputs = n_tok * (s.n_heads * s.head_dim + s.intermediate) * 4
    print(f"  memory: statistics + greedy state held at once ({res.settings.stats_dtype}) "
          f"{res.stats_bytes / 2**10:.1f} KiB, vs {inputs / 2**20:.1f} MiB to store one layer's "
          f"o_proj + down_proj inputs; hidden-state buffers (pruned + dense stream) "
          f"{2 * n_tok * s.hidden * 4 / 2**20:.1f} MiB")


# ---- choosing settings on the training paragraphs only ---------------------------------------
TUNE_GRID = {
    "uniform d=0.05": ObsSettings(allocation="uniform"),
    "uniform d=0.01": ObsSettings(allocation="uniform", damping=0.01),
    "uniform d=0.2": ObsSettings(allocation="uniform", damping=0.2),
    "global stream": ObsSettings(allocation="global"),
    "global none": ObsSettings(allocation="global", error_scale="none"),
    "depth 0.25": ObsSettings(allocation="depth", depth_spread=0.25),
    "depth 0.5": ObsSettings(allocation="depth", depth_spread=0.5),
    "reference": REFERENCE,
    "uniform no-reselect": ObsSettings(allocation="uniform", mlp_reselect=False),
    "uniform local": ObsSettings(allocation="uniform", target="local"),
}


def tune(args, tok, dense) -> None:
    train = data.split_local(data.read_local_texts(DEV), "train")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train_paragraphs.txt"
        path.write_text("\n\n".join(train))
        stream = data.eval_stream(tok, str(path), "validation")     # every 10th training paragraph
        ratios = [float(r) for r in args.ratios.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
        print(f"tuning split: {len(train)} training paragraphs; calibration on 90% of them, PPL "
              f"(BOS, {PPL_LEN}-token windows) on the other 10% ({stream.numel()} tokens)")
        for name, settings in TUNE_GRID.items():
            line = f"{name:20s}"
            for r in ratios:
                vals = []
                for seed in seeds:
                    ids = data.calibration_batches(tok, str(path), args.samples, args.seq_len, seed)
                    model = copy.deepcopy(dense)
                    obs_prune(model, ids, replace(settings, pruning_ratio=r), progress=False)
                    vals.append(ppl(model, stream, tok.bos_token_id, True))
                cells = "/".join(f"{v:.2f}" for v in vals)
                line += f" | {r:.0%}: {cells} ({statistics.mean(vals):.2f})"
            print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(STORIES))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--ratios", default="0.2,0.35")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--repeats", type=int, default=3, help="timing runs per method (median)")
    ap.add_argument("--tune", action="store_true",
                    help="grid of settings on a split of the training paragraphs")
    args = ap.parse_args()
    if not (Path(args.model).is_dir() and DEV.is_file()):
        raise SystemExit(f"needs {args.model} and {DEV} (the shared test assets)")
    torch.set_num_threads(1)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model)
    dense = checkpoint.load_model(args.model).eval()
    print(f"model {args.model}; calibration {args.samples} x {args.seq_len} tokens from the training "
          f"paragraphs of {DEV.name}; PPL: {PPL_LEN}-token non-overlapping windows")
    (tune if args.tune else table)(args, tok, dense)


if __name__ == "__main__":
    main()
