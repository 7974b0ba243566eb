"""Taylor scoring time against the floor: the same number of plain forward+backward passes.

    python -m benchmarks.bench_taylor [--models demo,/path/to/stories260K] [--samples 128]

Both are measured in the same process, interleaved, best of ``--repeats``; the report is the
ratio (target <= 1.3) and the peak memory of each (CPU: resident set growth; GPU: allocated).
"""
from __future__ import annotations

import argparse
import gc
import threading
import time
from pathlib import Path

import torch

from gqaprune import data
from gqaprune.loading import load_model_and_tokenizer, resolve_model
from gqaprune.structured.scorers.taylor import taylor_scores

SHARED_STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"


def plain_fwd_bwd(model, batches, batch_size):
    model.zero_grad(set_to_none=True)
    for start in range(0, batches.shape[0], batch_size):
        ids = batches[start: start + batch_size]
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


class PeakRSS:
    """Peak resident-set growth (MB) while the block runs, sampled every millisecond."""

    def __enter__(self):
        import psutil
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.mb = (self.peak - self.base) / 2**20


def timed(fn) -> tuple[float, float]:
    """(wall time, peak RSS growth in MB) of one call."""
    gc.collect()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
    return elapsed, mem.mb


def interleaved(fns: dict, repeats: int) -> dict:
    """Each function once per round, rounds repeated: (best time, peak MB of the first round) per
    name. Interleaving makes a machine that gets busier during the run slow both alike, so the
    ratio does not drift."""
    out = {name: ([], None) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, mb = timed(fn)
            times, peak = out[name]
            times.append(t)
            out[name] = (times, mb if peak is None else peak)
    return {name: (min(times), peak) for name, (times, peak) in out.items()}


def bench(name: str, samples: int, seq_len: int, batch_size: int, repeats: int) -> dict:
    spec = resolve_model(name)
    model, tok = load_model_and_tokenizer(spec)
    source = "demo" if name == "demo" else str(SHARED_STORIES.parent.parent / "data" / "tinystories" / "tinystories_dev.txt")
    batches = data.calibration_batches(tok, source, samples, seq_len, seed=0)
    plain_fwd_bwd(model, batches[:batch_size], batch_size)        # warm-up
    res = interleaved({"floor": lambda: plain_fwd_bwd(model, batches, batch_size),
                       "taylor": lambda: taylor_scores(model, batches, batch_size=batch_size)}, repeats)
    (floor, floor_mb), (taylor, taylor_mb) = res["floor"], res["taylor"]
    return {"model": name, "samples": samples, "seq_len": seq_len, "floor_s": floor,
            "taylor_s": taylor, "ratio": taylor / floor, "floor_mb": floor_mb, "taylor_mb": taylor_mb,
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "demo" + (f",{SHARED_STORIES}" if SHARED_STORIES.is_dir() else "")
    ap.add_argument("--models", default=default)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"{'model':<16}{'params':>10}{'fwd+bwd s':>11}{'taylor s':>10}{'ratio':>7}"
          f"{'fwd+bwd MB':>12}{'taylor MB':>11}")
    for name in args.models.split(","):
        r = bench(name, args.samples, args.seq_len, args.batch_size, args.repeats)
        print(f"{Path(r['model']).name:<16}{r['params']:>10,}{r['floor_s']:>11.3f}{r['taylor_s']:>10.3f}"
              f"{r['ratio']:>7.2f}{r['floor_mb']:>12.1f}{r['taylor_mb']:>11.1f}")
    print(f"({args.samples} samples x {args.seq_len} tokens, batch {args.batch_size}; time: best of "
          f"{args.repeats} rounds, each round timing fwd+bwd then taylor (interleaved); memory: peak "
          f"resident-set growth during the first round)")


if __name__ == "__main__":
    main()
