"""Perplexity evaluation throughput vs a bare batched forward pass over the same tokens.

    OMP_NUM_THREADS=1 python benchmarks/bench_perplexity.py [--model DIR] [--text FILE]

Both sides see identical input batches (BOS + window, ``batch_size`` windows per forward);
the bare side only calls ``model(input_ids=..., use_cache=False)`` on pre-built batches, the perplexity side
is :func:`gqaprune.evaluation.perplexity.perplexity` end to end (batching, loss, bookkeeping).
The two are interleaved ``--rounds`` times and the fastest round of each is kept, which is the
most load-robust estimate on a shared machine; both process CPU time (immune to other
processes when single-threaded) and wall-clock time are reported. Ratio = perplexity tokens/s / forward tokens/s
(target >= 0.90).

Model: --model, else /work/shared/models/stories260K when present, else a random tiny GQA Llama
(8 heads / 2 KV, hidden 64, vocab 512) so the script runs anywhere; text: --text, else the
shared TinyStories file, else random tokens.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gqaprune.evaluation.perplexity import PplProtocol, perplexity, windows

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def load(model_dir: str | None, text: str | None):
    from gqaprune import data
    from gqaprune.loading import load_model_and_tokenizer, resolve_model
    model_dir = model_dir or (str(SHARED / "models/stories260K") if (SHARED / "models/stories260K").is_dir() else None)
    if model_dir:
        model, tok = load_model_and_tokenizer(resolve_model(model_dir))
        text = text or (str(SHARED / "data/tinystories/tinystories_dev.txt")
                        if (SHARED / "data/tinystories").is_dir() else None)
        if text:
            return model, data.eval_stream(tok, text), tok.bos_token_id, model_dir
        return model, torch.randint(3, tok.vocab_size, (24_000,)), tok.bos_token_id, model_dir
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval(), torch.randint(3, 512, (24_000,)), 1, "random tiny Llama"


def bare_batches(stream, proto: PplProtocol, bos_id: int) -> list[torch.Tensor]:
    """The exact input batches perplexity() builds: [B, L+1] per forward."""
    spans = windows(stream, proto.seq_len, proto.stride, proto.nsamples, min_len=1)
    groups: dict[int, list] = {}
    for b, e, _ in spans:
        groups.setdefault(e - b, []).append((b, e))
    out = []
    for group in groups.values():
        for i in range(0, len(group), proto.batch_size):
            ids = torch.stack([stream[b:e] for b, e in group[i:i + proto.batch_size]])
            out.append(torch.cat([torch.full((len(ids), 1), bos_id), ids], 1))
    return out


class Clock:
    """Wall-clock and process CPU time of a block. On a shared machine other processes steal
    wall time but not this process's CPU time, so with one thread CPU time is the steadier
    measure of the work done (both clocks are reported)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


@torch.no_grad()
def time_bare(model, batches) -> Clock:
    with Clock() as c:
        for inp in batches:
            model(input_ids=inp, use_cache=False)   # the cheapest plain forward (no KV cache)
    return c


def time_ppl(model, stream, proto, bos_id) -> tuple[Clock, float]:
    with Clock() as c:
        res = perplexity(model, stream, proto, bos_id, show_progress=False)
    return c, res.ppl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--text")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch_size", type=int, default=8)
    args = ap.parse_args()
    model, stream, bos_id, name = load(args.model, args.text)
    print(f"model: {name}; stream: {stream.numel()} tokens; threads: {torch.get_num_threads()}")
    for seq_len in (128, 256):
        proto = PplProtocol("bench", seq_len=seq_len, bos=True, batch_size=args.batch_size)
        batches = bare_batches(stream, proto, bos_id)
        tokens = stream.numel()
        time_bare(model, batches[:2])                       # warm-up
        bare, ppl_t = [], []
        for _ in range(args.rounds):                        # interleaved rounds
            bare.append(time_bare(model, batches))
            t, ppl = time_ppl(model, stream, proto, bos_id)
            ppl_t.append(t)
        for clock in ("cpu", "wall"):
            fwd = tokens / min(getattr(c, clock) for c in bare)
            ppl_tps = tokens / min(getattr(c, clock) for c in ppl_t)
            print(f"seq_len {seq_len}, batch {args.batch_size}, {clock:4s} time: bare forward {fwd:,.0f} tok/s, "
                  f"perplexity {ppl_tps:,.0f} tok/s (ppl {ppl:.4f}); ratio {ppl_tps / fwd:.3f} "
                  f"(best of {args.rounds} interleaved rounds)")

if __name__ == "__main__":
    main()
