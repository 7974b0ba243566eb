"""2:4 speedup of one linear layer with torch's semi-structured sparse kernels (CUDA only).

    python -m benchmarks.bench_semistructured [--in_features 4096 --out_features 11008 --tokens 4096]

Without a CUDA GPU it prints exactly "skipped: needs a CUDA GPU" and exits 0.
With one: a float16 ``nn.Linear`` is pruned to 2:4 (``gqaprune.sparsity.masks.nm_mask`` on |W|),
its weight converted with ``torch.sparse.to_sparse_semi_structured``, and the dense and sparse
forward on the same [tokens, in] input are timed with CUDA events (median of ``--repeats`` after
warm-up), interleaved in one run; prints both times, the speedup (dense / sparse) and the largest
output difference against the dense masked layer.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

SKIP = "skipped: needs a CUDA GPU"


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` measured with CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def run(in_features: int, out_features: int, tokens: int, repeats: int) -> int:
    from torch.sparse import to_sparse_semi_structured

    from gqaprune.sparsity.masks import nm_mask
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        print(f"skipped: semi-structured sparse kernels need compute capability >= 8.0, found {major}.{minor}")
        return 0
    dev = torch.device("cuda")
    dense = torch.nn.Linear(in_features, out_features, bias=False).half().to(dev).eval()
    dense.weight.mul_(nm_mask(dense.weight.abs().float(), 2, 4))
    sparse = torch.nn.Linear(in_features, out_features, bias=False).half().to(dev).eval()
    sparse.weight = torch.nn.Parameter(to_sparse_semi_structured(dense.weight.detach().clone()),
                                       requires_grad=False)
    x = torch.randn(tokens, in_features, dtype=torch.float16, device=dev)
    for _ in range(10):
        dense(x), sparse(x)
    torch.cuda.synchronize()
    t_dense, t_sparse = [], []
    for _ in range(3):                                     # interleave to share any clock drift
        t_dense.append(timed(lambda: dense(x), repeats))
        t_sparse.append(timed(lambda: sparse(x), repeats))
    d, s = min(t_dense), min(t_sparse)
    diff = (dense(x) - sparse(x)).abs().max().item()
    print(f"{torch.cuda.get_device_name()}: Linear {in_features} -> {out_features}, {tokens} tokens, float16")
    print(f"dense {d:.3f} ms, 2:4 semi-structured {s:.3f} ms, speedup {d / s:.2f}x; "
          f"max |dense - sparse| = {diff:.3g}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in_features", type=int, default=4096)
    ap.add_argument("--out_features", type=int, default=11008)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(SKIP)
        return 0
    return run(args.in_features, args.out_features, args.tokens, args.repeats)


if __name__ == "__main__":
    sys.exit(main())
