"""Peak memory per stage on growing widths, a fitted memory model, and its Llama-3-8B projection.

    python -m benchmarks.bench_memory [--quick] [--solve_8b] [--dtype bfloat16|float32]

(about 30 minutes on 2 shared CPU cores; ``--quick`` is a two-minute smoke run on 8-layer models
too small for a meaningful projection: fixed costs dominate there.)

Every (model, stage) runs in a fresh subprocess (``--stage``): the model and inputs are built, the
peak RSS is reset (``/proc/self/clear_refs`` = 5) and the stage runs; the figure is VmHWM after
the stage minus VmRSS before it (CPU, peak resident set; no GPU here). Stages:

* load        building the random-init model in ``--dtype`` (delta over the bare interpreter)
* t1_full / t1         Taylor order 1, old full-gradient path / streamed hooks (vector variant)
* t2_full / t2 / t2_el Taylor order 2: old path (sum g and sum g^2 for every layer, plus every
                       p.grad during backward) / streamed vector / streamed element variant
* recon64 / recon32    lstsq reconstruction of a plan keeping 80% of KV groups and channels,
                       statistics in float64 / float32 (also timed against one dense forward of
                       the same calibration windows, in the same process)
* solve64 / solve32    one NormalEquations.solve of a down_proj-sized system (k = 0.8 I, H),
                       statistics filled beforehand

Per stage, bytes = a * params + b is fitted over the widths (least squares, params = all
parameters) and evaluated at Llama-3-8B (8.03e9 parameters). The solve peak is compared with the
allocation count of the code (:func:`solve_bytes`) and that count is evaluated for Llama-3-8B's
down_proj. Finally the reconstruction cost, in dense calibration forwards, on stories260K.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"
LLAMA3_8B = dict(params=8.03e9, hidden=4096, intermediate=14336, layers=32, prunable=6.98e9)
TAYLOR_STAGES = ("t1_full", "t1", "t2_full", "t2", "t2_el")
RECON_STAGES = ("recon64", "recon32")
SOLVE_STAGES = ("solve64", "solve32")


@dataclass(frozen=True)
class Width:
    hidden: int
    layers: int
    vocab: int

    @property
    def intermediate(self) -> int:
        return int(3.5 * self.hidden)          # Llama-3-8B's ratio 14336 / 4096

    @property
    def heads(self) -> int:
        return max(4, self.hidden // 64)


# ---- inside one stage subprocess ----------------------------------------------------------------
def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _model(w: Width, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=w.vocab, hidden_size=w.hidden, intermediate_size=w.intermediate,
                      num_hidden_layers=w.layers, num_attention_heads=w.heads,
                      num_key_value_heads=max(1, w.heads // 4), head_dim=w.hidden // w.heads,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(cfg, torch_dtype=dtype).eval()


def _plan(model):
    from benchmarks.bench_reconstruct import keep_fraction_plan
    return keep_fraction_plan(model, 0.8)


def run_stage(stage: str, w: Width, dtype_name: str, n_taylor: int, seq: int, n_recon: int) -> dict:
    import torch
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    out: dict = {}
    if stage == "load":
        import transformers  # noqa: F401  (imports are not the model)
        from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401
        base = _status("VmRSS")
        _reset_peak()
        model = _model(w, dtype)
        out["delta"] = _status("VmHWM") - base
        out["params"] = sum(p.numel() for p in model.parameters())
        return out
    if stage in SOLVE_STAGES:
        return _solve_stage(stage, w, out)
    model = _model(w, dtype)
    out["params"] = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    base = None
    if stage in TAYLOR_STAGES:
        from gqaprune.structured.scorers import taylor as tl
        ids = torch.randint(3, w.vocab, (n_taylor, seq), generator=gen)
        order = 2 if stage.startswith("t2") else 1
        variant = "element" if stage == "t2_el" else "vector"
        base = _status("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        if stage.endswith("_full"):
            g, sq = tl.accumulate_gradients(model, ids, 2, order == 2)
            tl.taylor_from_grads(model, g, sq, variant, order)
            del g, sq
        else:
            tl.taylor_scores(model, ids, tl.TaylorConfig(variant, order), batch_size=2)
        out["time_s"] = time.perf_counter() - t0
    elif stage in RECON_STAGES:
        from benchmarks.bench_reconstruct import forward_time
        from gqaprune.structured import reconstruct as rc
        ids = torch.randint(3, w.vocab, (n_recon, seq), generator=gen)
        plan = _plan(model)
        forward_time(model, ids[:8], 8)                                  # warm-up
        out["forward_s"] = forward_time(model, ids, 8)
        base = _status("VmRSS")
        _reset_peak()
        res = rc.prune_and_reconstruct(model, plan, ids, rc.ReconstructionConfig(
            "lstsq", n_recon, seq, reconstruct_stats_dtype="float64" if stage == "recon64" else "float32",
            batch_size=8, show_progress=False))
        out["time_s"] = res.time_s
    else:
        raise SystemExit(f"unknown stage {stage}")
    out["delta"] = _status("VmHWM") - base
    return out


def _solve_stage(stage: str, w: Width, out: dict) -> dict:
    import torch
    from gqaprune.structured.reconstruct import NormalEquations
    k, h = round(0.8 * w.intermediate), w.hidden
    dt = torch.float64 if stage == "solve64" else torch.float32
    gen = torch.Generator().manual_seed(0)
    ne = NormalEquations(k, h, "cpu", dt)
    # statistics filled directly (accumulating 2k tokens would cost 4 k^3 flops): a diagonally
    # dominant, hence positive definite, X^T X
    ne.xtx.normal_(generator=gen)
    ne.xtx += ne.xtx.T.clone()
    ne.xtx.diagonal().add_(3.0 * k)
    ne.xty.normal_(generator=gen)
    ne.yy.fill_(1e6)
    ne.n = 2 * k
    w0 = torch.randn(h, k, generator=gen).to(dt)      # _refit holds w0 in the statistics dtype
    base = _status("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    w_new, _ = ne.solve(w0, None, 0.05)
    ne.rel_error(w_new)
    out.update(time_s=time.perf_counter() - t0, delta=_status("VmHWM") - base, k=k, h=h,
               held=k * k * ne.xtx.element_size() + 2 * k * h * ne.xty.element_size(),
               model=solve_bytes(k, h, ne.xtx.element_size()))
    return out


def solve_bytes(k: int, h: int, s: int) -> int:
    """Peak bytes of one lstsq solve + error check, counted from the code (s = statistics itemsize):
    held throughout X^T X (k^2 s), X^T Y and w0 (2 k H s); plus the damped copy A and its factor L
    (2 k^2 s); after A is freed, L with the right-hand side and the intermediate of the two
    triangular solves (k^2 s + 2 k H s); after L, the float64 error check (about 2 k H * 8)."""
    held = k * k * s + 2 * k * h * s
    return held + max(2 * k * k * s, k * k * s + 2 * k * h * s, k * h * s + 2 * k * h * 8)


def old_solve_bytes(k: int, h: int) -> int:
    """Before this change (float64): an identity next to A and L, and cholesky_solve's copy of L:
    4 k^2 * 8 beyond the held statistics (measured: 0.59 GB at k = 4301)."""
    return k * k * 8 + 2 * k * h * 8 + 4 * k * k * 8


# ---- the driver -----------------------------------------------------------------------------------
def _spawn(stage: str, w: Width, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--stage", stage, "--hidden", str(w.hidden),
           "--layers", str(w.layers), "--vocab", str(w.vocab), "--dtype", args.dtype,
           "--seq_len", str(args.seq_len), "--taylor_samples", str(args.taylor_samples),
           "--recon_samples", str(args.recon_samples)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"stage {stage} H={w.hidden} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a x + b."""
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    return a, my - a * mx


def gb(x: float) -> str:
    return f"{x / 1e9:7.2f} GB"


def stories_cost(repeats: int) -> str:
    """lstsq / bias reconstruction time as a multiple of one dense forward of its calibration set
    (128 x 128 tokens, batch 8), stories260K, all in this process."""
    import torch
    from benchmarks.bench_reconstruct import forward_time
    from gqaprune import checkpoint
    from gqaprune.structured import reconstruct as rc
    if not STORIES.is_dir():
        return f"(stories260K not at {STORIES}: reconstruction cost not measured)"
    torch.set_num_threads(1)
    model = checkpoint.load_model(str(STORIES)).eval()
    ids = torch.randint(3, model.config.vocab_size, (128, 128), generator=torch.Generator().manual_seed(0))
    forward_time(model, ids[:8], 8)
    lines = []
    for mode in ("lstsq", "bias"):
        ratios = []
        for _ in range(repeats):
            t_fwd = forward_time(model, ids, 8)
            m = checkpoint.load_model(str(STORIES)).eval()
            res = rc.prune_and_reconstruct(m, _plan(m), ids, rc.ReconstructionConfig(
                mode, 128, 128, batch_size=8, show_progress=False))
            ratios.append(res.time_s / t_fwd)
        lines.append(f"  {mode:5s}: total reconstruction = {min(ratios):.1f}x-{max(ratios):.1f}x one dense "
                     f"forward of the calibration set ({repeats} runs, forward timed right before each)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small widths, 8 layers (projection not meaningful)")
    ap.add_argument("--dtype", default="bfloat16", help="model dtype (bfloat16 mimics a GPU run)")
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--taylor_samples", type=int, default=4, help="Taylor windows (mini-batches of 2)")
    ap.add_argument("--recon_samples", type=int, default=16)
    ap.add_argument("--solve_8b", action="store_true",
                    help="also measure the solve at Llama-3-8B's down_proj size (k = 11469, H = 4096; ~1 min)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        import torch
        torch.set_num_threads(2)
        print(json.dumps(run_stage(args.stage, Width(args.hidden, args.layers, args.vocab), args.dtype,
                                   args.taylor_samples, args.seq_len, args.recon_samples)))
        return
    # 32 layers and I = 3.5 H as Llama-3-8B: per-layer transients (one layer's float32 saliences,
    # one projection's statistics) are the same share of the parameters as there.
    layers = 8 if args.quick else 32
    widths = [Width(h, layers, 4096 if args.quick else 16384) for h in
              ((128, 192, 256) if args.quick else (256, 384, 512, 640))]
    solve_only = [] if args.quick else [Width(1536, 1, 0)]     # k = 4301: a solve well above RSS noise
    if args.solve_8b:
        solve_only.append(Width(4096, 1, 0))                   # I = 14336, k = 11469 as Llama-3-8B at 0.2
    rows: dict = {}
    for w, stages in [(w, ("load",) + TAYLOR_STAGES + RECON_STAGES + SOLVE_STAGES) for w in widths] + \
                     [(w, SOLVE_STAGES) for w in solve_only]:
        for stage in stages:
            rows[(w, stage)] = r = _spawn(stage, w, args)
            print(f"  measured H={w.hidden:5d} {stage:8s} peak delta {gb(r['delta'])}", file=sys.stderr, flush=True)
    print(f"machine: {os.cpu_count()} CPU cores (shared), no GPU; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"dtype {args.dtype}; random-init Llama, {layers} layers, vocab {widths[0].vocab}, I = 3.5 H, "
          f"head_dim 64, KV heads = heads / 4")
    print(f"peak RSS delta per stage (VmHWM after - VmRSS before, fresh process per stage); Taylor "
          f"{args.taylor_samples} x {args.seq_len} tokens in mini-batches of 2; reconstruction "
          f"{args.recon_samples} x {args.seq_len} tokens, batch 8, plan keeps 80%")
    header = f"{'stage':9s}" + "".join(f" | H={w.hidden:4d} ({rows[(w, 'load')]['params'] / 1e6:5.0f}M)" for w in widths)
    print(header + " | fit a [B/param], b | Llama-3-8B (8.03B)")
    print("-" * len(header) + "-" * 40)
    proj = {}
    for stage in ("load",) + TAYLOR_STAGES + RECON_STAGES:
        xs = [rows[(w, "load")]["params"] for w in widths]
        ys = [rows[(w, stage)]["delta"] for w in widths]
        a, b = fit(xs, ys)
        proj[stage] = a * LLAMA3_8B["params"] + b
        print(f"{stage:9s}" + "".join(f" | {gb(y):>18s}" for y in ys) + f" | {a:5.2f}, {b / 1e6:6.0f} MB | {gb(proj[stage])}")
    print("\nLlama-3-8B projection, weights (load) + stage delta:")
    for stage, what in (("t1_full", "Taylor order 1, before (full gradients)"), ("t1", "Taylor order 1, after (hooks)"),
                        ("t2_full", "Taylor order 2, before (sum g, sum g^2 and every p.grad)"),
                        ("t2", "Taylor order 2 vector, after (hooks, per-unit Fisher sums)"),
                        ("t2_el", "Taylor order 2 element, after (hooks, sum g + sum g^2)"),
                        ("recon64", "lstsq reconstruction, float64 statistics"),
                        ("recon32", "lstsq reconstruction, float32 statistics")):
        print(f"  {what:58s} {gb(proj['load'] + proj[stage])}  (stage delta {gb(proj[stage])})")
    print("  (the fit lumps activations with parameters; Llama-3-8B's 128k vocabulary adds logits not in the fit)")
    print("\nsolve of a down_proj-sized system (k = 0.8 I), measured vs the code's allocation count:")
    for w in widths + solve_only:
        for stage in SOLVE_STAGES:
            r = rows[(w, stage)]
            print(f"  k={r['k']:5d} H={r['h']:5d} {stage}: measured peak delta {gb(r['delta'])}, counted delta "
                  f"{gb(r['model'] - r['held'])} (held before: statistics + w0 {gb(r['held'])}); {r['time_s']:.1f} s")
    k8, h8 = round(0.8 * LLAMA3_8B["intermediate"]), LLAMA3_8B["hidden"]
    old64 = old_solve_bytes(k8, h8)
    print(f"  Llama-3-8B down_proj at ratio 0.2 (k={k8}, H={h8}): statistics {gb(k8 * k8 * 8 + k8 * h8 * 8)} "
          f"(float64); solve peak counted: float64 {gb(solve_bytes(k8, h8, 8))}, float32 {gb(solve_bytes(k8, h8, 4))} "
          f"(before this change: {gb(old64)})")
    print("\nreconstruction time / one dense forward of the same calibration windows (same process):")
    for w in widths:
        for stage in RECON_STAGES:
            r = rows[(w, stage)]
            print(f"  H={w.hidden:5d} {stage}: {r['time_s']:.1f} s / {r['forward_s']:.2f} s = {r['time_s'] / r['forward_s']:.1f}x")
    print("stories260K (5 layers, H 64), 128 x 128 tokens, batch 8, 1 thread, plan keeps 80%:")
    print(stories_cost(1 if args.quick else 3))


if __name__ == "__main__":
    main()
