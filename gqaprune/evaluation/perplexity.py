"""Perplexity with an explicit, logged protocol.

Protocol: the evaluation text is tokenized as one stream (texts joined by blank lines, no
special tokens). Windows of ``seq_len`` tokens start every ``stride`` tokens (stride = seq_len:
non-overlapping, the structured-pruning literature's protocol). In a window only the tokens not
already scored by the previous window count, so every token is scored once. With ``bos`` each
window is prefixed by the BOS token (which is context, never a target). ``nsamples`` caps the
number of windows. PPL = exp(total NLL / scored tokens).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gqaprune.errors import UserError


@dataclass(frozen=True)
class PplProtocol:
    dataset: str
    split: str = "validation"
    seq_len: int = 128
    stride: int | None = None     # None -> seq_len (non-overlapping)
    bos: bool = True
    nsamples: int | None = None   # cap on windows
    batch_size: int = 8

    def describe(self) -> str:
        stride = self.stride or self.seq_len
        kind = "non-overlapping" if stride == self.seq_len else f"stride {stride}"
        return (f"{self.dataset} [{self.split}], {self.seq_len}-token {kind} windows, "
                f"{'BOS-prefixed' if self.bos else 'no BOS'}"
                + (f", first {self.nsamples} windows" if self.nsamples else ""))


@dataclass(frozen=True)
class PplResult:
    ppl: float
    nll: float          # mean NLL per scored token (nats)
    tokens: int         # scored tokens
    windows: int
    protocol: PplProtocol

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "windows": self.windows,
                "protocol": asdict(self.protocol), "protocol_text": self.protocol.describe()}


def windows(stream: torch.Tensor, seq_len: int, stride: int | None,
            nsamples: int | None) -> list[tuple[int, int, int]]:
    """(begin, end, new) per window: ``new`` = tokens not covered by the previous window.

    A window scores at most its ``new`` last tokens (fewer without BOS, where its first token
    has no context), so overlapping windows never score a token twice.
    """
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise UserError(f"stride {stride} must be in (0, seq_len={seq_len}]", "use stride <= seq_len")
    out, prev_end, T = [], 0, stream.numel()
    for begin in range(0, T - 1, stride):
        end = min(begin + seq_len, T)
        if end - begin < 2:
            break
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == T or (nsamples and len(out) >= nsamples):
            break
    return out


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, protocol: PplProtocol, bos_id: int | None = None,
               show_progress: bool = True) -> PplResult:
    """Perplexity of ``model`` on a token stream [T] under ``protocol``.

    Windows of equal length are batched; targets are the stream tokens themselves.
    """
    if protocol.bos and bos_id is None:
        raise UserError("BOS-prefixed perplexity needs a tokenizer with a BOS token",
                        "pass --ppl_bos false for this tokenizer")
    spans = windows(stream, protocol.seq_len, protocol.stride, protocol.nsamples)
    if not spans:
        raise UserError(f"evaluation text of {stream.numel()} tokens is too short for one window",
                        "use more text or a shorter ppl_seq_len")
    device = next(model.parameters()).device
    total_nll, total_tok = 0.0, 0
    groups: dict[int, list] = {}
    for span in spans:  # batch windows of the same length together
        groups.setdefault(span[1] - span[0], []).append(span)
    pbar = tqdm(total=len(spans), desc=f"ppl {protocol.dataset}", leave=False, disable=not show_progress)
    for length, group in groups.items():
        for i in range(0, len(group), protocol.batch_size):
            chunk = group[i: i + protocol.batch_size]
            ids = torch.stack([stream[b:e] for b, e, _ in chunk])            # [B, L]
            inp = ids
            if protocol.bos:
                inp = torch.cat([torch.full((len(chunk), 1), bos_id, dtype=ids.dtype), ids], 1)
            logits = model(input_ids=inp.to(device)).logits.float()         # [B, L(+1), V]
            if protocol.bos:
                logits, targets = logits[:, :-1], ids                         # BOS predicts ids[0]
            else:
                logits, targets = logits[:, :-1], ids[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).to(device),
                                  reduction="none").view(len(chunk), -1)      # [B, L or L-1]
            for row, (_, _, new) in zip(nll, chunk):
                n = min(new, row.numel())
                total_nll += float(row[-n:].double().sum())
                total_tok += n
            pbar.update(len(chunk))
    pbar.close()
    mean = total_nll / total_tok
    return PplResult(math.exp(mean), mean, total_tok, len(spans), protocol)
