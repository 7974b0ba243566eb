"""Perplexity with an explicit, logged protocol.

Protocol: the evaluation text is tokenized once as one stream (``data.eval_stream``: texts
joined by newlines, no special tokens). Windows of ``seq_len`` tokens start every ``stride``
tokens (stride = seq_len: non-overlapping; the last window may be shorter). A window scores
only the tokens the previous window did not cover.

Default (the literature's protocol, as in SparseGPT / Wanda / LLM-Pruner, so numbers compare
with published tables): non-overlapping windows with no BOS inserted, each window a plain
``model(x, labels=x)``: its first token has no context and is not scored, so a window scores
``seq_len - 1`` tokens. Option ``bos``: each window is prefixed by the BOS token (context,
never a target), so every stream token is scored exactly once: a different protocol,
logged by ``describe()`` (stories260K on the held-out TinyStories paragraphs, 256-token windows:
5.20 with BOS, 4.68 without). The literature also drops a last window shorter than ``seq_len``;
it is kept here (4.68 either way on that text).
``nsamples`` caps the number of windows. PPL = exp(sum NLL / scored tokens), NLL in nats.
"""
from __future__ import annotations

import inspect
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
    bos: bool = False             # False: the literature's protocol; True: BOS before every window
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
            nsamples: int | None, min_len: int = 2) -> list[tuple[int, int, int]]:
    """(begin, end, new) per window: ``new`` = tokens not covered by the previous window.

    A window scores at most its ``new`` last tokens (fewer without BOS, where its first token
    has no context), so overlapping windows never score a token twice. A trailing window
    shorter than ``min_len`` is dropped (with BOS a 1-token window is still scoreable).
    """
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise UserError(f"stride {stride} must be in (0, seq_len={seq_len}]", "use stride <= seq_len")
    out, prev_end, T = [], 0, stream.numel()
    for begin in range(0, T, stride):
        end = min(begin + seq_len, T)
        if end - begin < min_len:
            break
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == T or (nsamples and len(out) >= nsamples):
            break
    return out


def _device_of(model) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _forward_kwargs(model) -> tuple[bool, dict]:
    """(accepts ``logits_to_keep``, extra kwargs) for ``model.forward``.

    HF causal LMs can skip the LM head for positions we do not score (V x d per token), and
    need no KV cache for one-shot scoring (``use_cache=False``).
    """
    try:
        names = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False, {}
    return "logits_to_keep" in names, ({"use_cache": False} if "use_cache" in names else {})


def _chunk_nll(model, inp: torch.Tensor, scored: torch.Tensor, keep: bool,
               extra: dict | None = None) -> tuple[float, int]:
    """Sum of NLL over the last ``scored[i]`` tokens of each row of ``inp`` [B, L_in].

    Only the last ``n = max(scored)`` positions are predicted: logits at input positions
    ``L_in-1-n .. L_in-2`` predict tokens ``L_in-n .. L_in-1``.
    """
    n, L_in = int(scored.max()), inp.shape[1]
    if keep:  # positions as a tensor: logits come out contiguous, no [B, L, V] slice copy
        positions = torch.arange(L_in - 1 - n, L_in - 1, device=inp.device)   # [n]
        logits = model(input_ids=inp, logits_to_keep=positions, **(extra or {})).logits.float()  # [B, n, V]
    else:
        logits = model(input_ids=inp, **(extra or {})).logits[:, L_in - 1 - n: L_in - 1].float()  # [B, n, V]
    targets = inp[:, -n:]                                                      # [B, n]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          reduction="none").view(inp.shape[0], n)              # [B, n]
    cols = torch.arange(n, device=inp.device)                                  # [n]
    mask = cols[None, :] >= (n - scored.to(inp.device))[:, None]               # [B, n]
    return float(nll.double()[mask].sum()), int(mask.sum())


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, protocol: PplProtocol, bos_id: int | None = None,
               show_progress: bool = True) -> PplResult:
    """Perplexity of ``model`` on a token stream [T] under ``protocol``.

    Windows of equal length are batched; targets are the stream tokens themselves. Models whose
    forward takes ``logits_to_keep`` (HF causal LMs) compute logits only for scored positions.
    """
    if protocol.bos and bos_id is None:
        raise UserError("BOS-prefixed perplexity needs a tokenizer with a BOS token",
                        "pass --ppl_bos false for this tokenizer")
    if protocol.batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {protocol.batch_size}", "pass a positive batch size")
    spans = windows(stream, protocol.seq_len, protocol.stride, protocol.nsamples,
                    min_len=1 if protocol.bos else 2)
    if not spans:
        raise UserError(f"evaluation text of {stream.numel()} tokens is too short for one window",
                        "use more text or a shorter ppl_seq_len")
    device, (keep, extra) = _device_of(model), _forward_kwargs(model)
    stream = stream.to(device)
    total_nll, total_tok = 0.0, 0
    groups: dict[int, list] = {}
    for span in spans:  # batch windows of the same length together
        groups.setdefault(span[1] - span[0], []).append(span)
    pbar = tqdm(total=len(spans), desc=f"ppl {protocol.dataset}", leave=False, disable=not show_progress)
    for length, group in groups.items():
        for i in range(0, len(group), protocol.batch_size):
            chunk = group[i: i + protocol.batch_size]
            inp = torch.stack([stream[b:e] for b, e, _ in chunk])              # [B, L]
            if protocol.bos:
                bos = torch.full((len(chunk), 1), bos_id, dtype=inp.dtype, device=device)
                inp = torch.cat([bos, inp], 1)                                  # [B, L+1]; BOS is context
            # A window scores its `new` tokens, at most all tokens that have a predecessor.
            scored = torch.tensor([min(new, inp.shape[1] - 1) for _, _, new in chunk])  # [B]
            nll, tok = _chunk_nll(model, inp, scored, keep, extra)
            total_nll += nll
            total_tok += tok
            pbar.update(len(chunk))
    pbar.close()
    mean = total_nll / total_tok
    return PplResult(math.exp(mean), mean, total_tok, len(spans), protocol)
