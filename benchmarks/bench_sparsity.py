"""Wanda-family sparsity on stories260K: held-out perplexity, time, calibration memory — one run.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_sparsity [--model DIR] [--text FILE]
        [--samples 128 --seq_len 128 --batch_size 4] [--figure wanda_owl.png]

Protocol (printed with the results):
* model: ../shared/models/stories260K (5 layers, 8 q / 4 KV heads, hidden 64, MLP 172), float32, CPU,
  one thread;
* calibration: ``gqaprune.data.calibration_batches`` — 128 seeded (seed 0) windows x 128 tokens
  (BOS + 127) from the *training* paragraphs of tinystories_dev.txt (every 10th paragraph held out);
* perplexity: the held-out paragraphs (``data.eval_stream(tok, path, "validation")``), 256-token
  non-overlapping BOS-prefixed windows, every token scored once (``evaluation.perplexity``);
* sparsity: zeros / weights over the 7 projection matrices of the 5 decoder layers (embeddings,
  lm_head, norms, biases never pruned), measured from the weights after pruning;
* time: ``sparsify``'s process CPU time divided by the CPU time of one forward pass of the whole
  calibration set through the dense model (same batch size, best of 3), both measured here with one
  thread (CPU time is immune to other processes on a shared machine; wall time is printed too);
* memory: what calibration holds (statistics of one layer + one layer's inputs [N, T, H]; the
  walker also holds that layer's outputs while advancing, so 2x) against the whole model's
  activations (every hidden state of a full forward with ``output_hidden_states``, summed over
  the calibration set), all as tensor bytes of the tensors themselves.

Requirement (exit 1 if not met): held-out perplexity sparsegpt < wanda < magnitude at 50%
unstructured and at 2:4.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from gqaprune import data
from gqaprune.arch import decoder_layers
from gqaprune.evaluation.perplexity import PplProtocol, perplexity
from gqaprune.sparsity import SparsityConfig, sparsify

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "data" / "tinystories" / "tinystories_dev.txt"

RUNS = [  # (label, config)
    ("magnitude 50%", SparsityConfig("magnitude_unstructured", 0.5)),
    ("wanda 50%", SparsityConfig("wanda", 0.5)),
    ("sparsegpt 50%", SparsityConfig("sparsegpt", 0.5)),
    ("sparsegpt 50% (row selection)", SparsityConfig("sparsegpt", 0.5, sparsegpt_selection="row")),
    ("magnitude 2:4", SparsityConfig("magnitude_unstructured", sparsity_pattern="2:4")),
    ("wanda 2:4", SparsityConfig("wanda", sparsity_pattern="2:4")),
    ("sparsegpt 2:4", SparsityConfig("sparsegpt", sparsity_pattern="2:4")),
    ("magnitude 50% + OWL", SparsityConfig("magnitude_unstructured", 0.5, owl=True)),
    ("wanda 50% + OWL", SparsityConfig("wanda", 0.5, owl=True)),
    ("sparsegpt 50% + OWL", SparsityConfig("sparsegpt", 0.5, owl=True)),
    # stories260K's MLP width 172 = 4 x 43: the largest block size dividing every matrix is 4
    ("block_hybrid B4 .35/.45/.2 (2:4 tier)", SparsityConfig("block_hybrid", sparsity_pattern="2:4", block_size=4,
                                                             tier_fractions=(0.35, 0.45, 0.2))),
    ("block_hybrid B4 .25/.5/.25 (2:4 tier)", SparsityConfig("block_hybrid", sparsity_pattern="2:4", block_size=4,
                                                             tier_fractions=(0.25, 0.5, 0.25))),
]
ORDER_CHECKS = [("50% unstructured", ("sparsegpt 50%", "wanda 50%", "magnitude 50%")),
                ("2:4", ("sparsegpt 2:4", "wanda 2:4", "magnitude 2:4"))]


@torch.no_grad()
def forward_time(model, ids: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(CPU s, wall s) of one forward pass of ``ids`` in chunks of ``batch_size``."""
    c0, t0 = time.process_time(), time.perf_counter()
    for chunk in ids.split(batch_size):
        model(input_ids=chunk, use_cache=False)
    return time.process_time() - c0, time.perf_counter() - t0


@torch.no_grad()
def all_hidden_state_bytes(model, ids: torch.Tensor, batch_size: int) -> int:
    """Bytes of every hidden state of a full forward (embeddings + each layer's output) over ids."""
    total = 0
    for chunk in ids.split(batch_size):
        states = model(input_ids=chunk, use_cache=False, output_hidden_states=True).hidden_states
        total += sum(h.numel() * h.element_size() for h in states[:-1])   # inputs of every layer
    return total


def mb(n: float) -> str:
    return f"{n / 2**20:.2f} MB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(STORIES))
    ap.add_argument("--text", default=str(TINYSTORIES))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--ppl_seq_len", type=int, default=256)
    ap.add_argument("--figure", default=None, help="save the per-layer figure of wanda + OWL here")
    args = ap.parse_args()
    if not Path(args.model).is_dir() or not Path(args.text).is_file():
        print(f"skipped: needs {args.model} and {args.text}")
        return 0
    torch.set_num_threads(1)
    from gqaprune.loading import load_model_and_tokenizer, resolve_model
    dense, tok = load_model_and_tokenizer(resolve_model(args.model))
    dense.eval()
    calib = data.calibration_batches(tok, args.text, args.samples, args.seq_len, seed=0)
    stream = data.eval_stream(tok, args.text, "validation")
    proto = PplProtocol(Path(args.text).name + " held-out", seq_len=args.ppl_seq_len, bos=True)

    def ppl(model) -> float:
        return perplexity(model, stream, proto, tok.bos_token_id, show_progress=False).ppl

    forward_time(dense, calib[: args.batch_size], args.batch_size)                 # warm-up
    c_fwd, t_fwd = min(forward_time(dense, calib, args.batch_size) for _ in range(3))
    n_layers = len(decoder_layers(dense))
    print(f"model {args.model} ({n_layers} layers); calibration {args.samples} x {args.seq_len} tokens "
          f"(training paragraphs of {Path(args.text).name}, seed 0), batch {args.batch_size}")
    print(f"perplexity protocol: {proto.describe()}, {stream.numel()} tokens")
    print(f"one forward pass of the calibration set through the dense model: {c_fwd:.3f} s CPU, "
          f"{t_fwd:.3f} s wall (best of 3)")
    dense_ppl = ppl(dense)
    print(f"dense perplexity {dense_ppl:.3f}\n")
    print("| run | pattern | achieved sparsity | held-out PPL | CPU s | x forward (CPU) | wall s | layer passes |")
    print("|---|---|---|---|---|---|---|---|")
    results, outcomes = {}, {}
    for label, cfg in RUNS:
        model = copy.deepcopy(dense)
        c0 = time.process_time()
        out = sparsify(model, calib, cfg, batch_size=args.batch_size, progress=False)
        cpu = time.process_time() - c0
        results[label], outcomes[label] = ppl(model), out
        passes = out.calibration.layer_passes if out.calibration else 0
        print(f"| {label} | {cfg.sparsity_pattern} | {out.overall_sparsity:.4f} | {results[label]:.3f} | "
              f"{cpu:.2f} | {cpu / c_fwd:.2f} | {out.timings.total_s:.2f} | {passes} |")
    report_details(outcomes)
    report_memory(dense, calib, args.batch_size, outcomes)
    if args.figure:
        outcomes["wanda 50% + OWL"].figure().savefig(args.figure, dpi=120)
        print(f"\nfigure: {args.figure}")
    return check_order(results)


def report_details(outcomes) -> None:
    print("\nlayer passes = passes of the whole calibration set through one decoder layer "
          "(statistics pass + advance per layer; OWL adds one pass per layer)")
    for label in ("wanda 50% + OWL", "sparsegpt 50% + OWL", "magnitude 50% + OWL"):
        o = outcomes[label]
        print(f"{label}: outlier ratios {[round(r, 4) for r in o.owl.outlier_ratios]} -> layer rates "
              f"{[round(r, 4) for r in o.layer_rates]} (mean {sum(o.layer_rates) / len(o.layer_rates):.6f}), "
              f"achieved per layer {[round(r['sparsity'], 4) for r in o.layer_rows()]}")
    for label, o in outcomes.items():
        if o.tiers:
            d, n, r = (sum(getattr(t, f) for t in o.tiers) for f in ("dense", "nm", "removed"))
            tot = d + n + r
            print(f"{label}: tiles dense {d / tot:.4f} / 2:4 {n / tot:.4f} / removed {r / tot:.4f} of {tot}; "
                  f"implied {o.target:.4f}, achieved {o.overall_sparsity:.4f}")
        if o.nm_check is not None:
            print(f"{label}: N:M check {o.nm_check.groups} groups, {o.nm_check.exact} with exactly N "
                  f"non-zeros, {o.nm_check.violations} violations")
    for label in ("sparsegpt 50%", "sparsegpt 2:4"):
        t = outcomes[label].timings
        print(f"{label}: statistics {t.statistics_s:.2f} s, solves + masks {t.prune_s:.2f} s, "
              f"walk {t.walk_s:.2f} s; largest damping used {outcomes[label].max_damping}")


def report_memory(dense, calib, batch_size, outcomes) -> None:
    whole = all_hidden_state_bytes(dense, calib, batch_size)
    print("\ncalibration memory (tensor bytes, measured):")
    for label in ("wanda 50%", "sparsegpt 50%", "wanda 50% + OWL"):
        c = outcomes[label].calibration
        held = c.peak_stats_bytes + 2 * c.layer_activation_bytes
        print(f"  {label}: statistics {c.peak_stats_bytes / 2**10:.1f} KB + one layer's inputs "
              f"{mb(c.layer_activation_bytes)} (x2 with its outputs while advancing) = {mb(held)}")
    print(f"  whole model's activations (every layer's input over the calibration set, "
          f"output_hidden_states): {mb(whole)}")


def check_order(results) -> int:
    ok = True
    print()
    for name, (sgpt, wanda, mag) in ORDER_CHECKS:
        met = results[sgpt] < results[wanda] < results[mag]
        ok &= met
        print(f"requirement at {name}: sparsegpt {results[sgpt]:.3f} < wanda {results[wanda]:.3f} < "
              f"magnitude {results[mag]:.3f}: {'met' if met else 'NOT MET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
