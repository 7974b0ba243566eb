"""Cost of layer-wise least-squares reconstruction, measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_reconstruct.py [--model DIR|random] [--samples 128 --seq_len 128]

Prints (all measured here, on this machine):
* time of one forward pass of the calibration set through the dense model (batches of
  ``--batch_size``), the reconstruction time per decoder layer, and their ratio;
* where that time goes: float64 solves vs. layer forwards + statistics accumulation;
* memory of one projection's statistics (X^T X [k, k] + X^T Y [k, H] in float64) next to what
  holding its inputs X [n, k] would take, and the two hidden-state buffers of the calibration set.
Default model: ../shared/models/stories260K if present, else (or with ``--model random``) a random
small Llama (hidden 256, MLP 688, 8 heads / 2 KV, 4 layers).
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from gqaprune.arch import decoder_layers
from gqaprune.structured import reconstruct as rc
from gqaprune.structured.plan import LayerPlan, PruningPlan
from gqaprune.structured.units import model_shapes

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"


def load(model_arg: str | None):
    from transformers import LlamaConfig, LlamaForCausalLM
    path = model_arg or (str(STORIES) if STORIES.is_dir() else "random")
    if path != "random":
        from gqaprune import checkpoint
        return checkpoint.load_model(path).eval(), Path(path).name
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), "random tiny Llama (H 256, I 688, 8/2 heads)"


def keep_fraction_plan(model, keep: float) -> PruningPlan:
    """Keep the first ``keep`` fraction of KV groups and channels of every layer."""
    shapes = model_shapes(model)
    layers = [LayerPlan(list(range(max(1, round(s.n_kv * keep)))),
                        list(range(max(1, round(s.intermediate * keep))))) for s in shapes]
    return PruningPlan("bench", "manual", 1 - keep, shapes, layers)


def timed_solves():
    """Wrap NormalEquations.solve to sum its wall time."""
    spent = {"s": 0.0}
    original = rc.NormalEquations.solve

    def solve(self, *a, **kw):
        t0 = time.perf_counter()
        out = original(self, *a, **kw)
        spent["s"] += time.perf_counter() - t0
        return out
    rc.NormalEquations.solve = solve
    return spent, lambda: setattr(rc.NormalEquations, "solve", original)


@torch.no_grad()
def forward_time(model, ids: torch.Tensor, batch_size: int) -> float:
    t0 = time.perf_counter()
    for chunk in ids.split(batch_size):
        model(input_ids=chunk, use_cache=False)
    return time.perf_counter() - t0


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:8.2f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory, or 'random'")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--keep", type=float, default=0.75, help="fraction of KV groups / channels kept")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, name = load(args.model)
    n_layers = len(decoder_layers(model))
    ids = torch.randint(3, model.config.vocab_size, (args.samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    forward_time(model, ids[: args.batch_size], args.batch_size)                    # warm-up
    t_fwd = forward_time(model, ids, args.batch_size)
    plan = keep_fraction_plan(model, args.keep)
    print(f"model: {name}, {n_layers} layers; calibration {args.samples} x {args.seq_len} tokens, "
          f"batch {args.batch_size}; plan keeps {args.keep:.0%} of KV groups and channels")
    print(f"one dense forward pass of the calibration set: {t_fwd:.3f} s "
          f"({t_fwd / n_layers:.3f} s per layer)")
    for mode in ("lstsq", "bias"):
        m = copy.deepcopy(model)
        spent, restore = timed_solves()
        try:
            res = rc.prune_and_reconstruct(m, plan, ids, rc.ReconstructionConfig(
                mode, args.samples, args.seq_len, batch_size=args.batch_size, show_progress=False))
        finally:
            restore()
        per_layer = res.time_s / n_layers
        print(f"\n[{mode}] reconstruction: {res.time_s:.3f} s total, {per_layer:.3f} s per layer; "
              f"ratio per layer / full calibration forward = {per_layer / t_fwd:.2f}x, "
              f"total / forward = {res.time_s / t_fwd:.1f}x; float64 solves {spent['s']:.3f} s "
              f"({spent['s'] / res.time_s:.0%}), forwards + accumulation the rest")
    hidden = model.config.hidden_size
    n_tok = args.samples * args.seq_len
    itemsize = next(model.parameters()).element_size()
    print(f"\nmemory per projection (k kept columns, H = {hidden}, n = {n_tok} tokens):")
    for proj, k in (("o_proj", max(len(lp.kept_kv_groups) * s.group_size * s.head_dim
                                   for s, lp in zip(plan.original, plan.layers))),
                    ("down_proj", max(len(lp.kept_channels) for lp in plan.layers))):
        stats = (k * k + k * hidden + k + hidden) * 8
        print(f"  {proj:9s} k={k:5d}: statistics X^T X + X^T Y (float64) {mb(stats)} | "
              f"bias mode {mb(hidden * 8)} | inputs X [n, k] would be {mb(n_tok * k * itemsize)}")
    print(f"  hidden-state buffers (dense + pruned stream, model dtype): {mb(2 * n_tok * hidden * itemsize)}"
          f"; plus one dense decoder layer copy "
          f"{mb(sum(p.numel() for p in decoder_layers(model)[0].parameters()) * itemsize)}")
    k8, h8 = round(14336 * 0.8), 4096
    print(f"  for scale: Llama-3-8B down_proj at 20% (k={k8}, H={h8}): statistics "
          f"{mb((k8 * k8 + k8 * h8) * 8)}; inputs of 128 x 128 tokens in bf16 {mb(n_tok * k8 * 2)}")


if __name__ == "__main__":
    main()
