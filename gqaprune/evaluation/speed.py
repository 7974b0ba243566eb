"""Model facts that show what pruning bought: size, generation speed, peak memory.

Speed protocol (``measure_speed``): ``batch_size`` prompts of ``prompt_len`` random token ids
(seeded; speed does not depend on content). One untimed warm-up pass, then ``repeats`` timed
passes; each pass is

* prefill: one forward over the prompts with the KV cache on ->
  prefill tokens/s = batch_size * prompt_len / time;
* decode: ``new_tokens`` greedy steps, one token per sequence per step, reusing the cache ->
  decode tokens/s = batch_size * new_tokens / time, latency per token = time / new_tokens
  (one step of the whole batch, in ms).

The median over passes is reported. Peak memory covers the timed passes only: CUDA max
allocated, or on CPU the process's peak resident set (Linux VmHWM, reset before timing), which
includes the Python/torch baseline of a few hundred MB. Wall-clock, so the numbers depend on the machine and its
load (thread count is whatever torch uses): compare models measured on the same machine.
"""
from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gqaprune.arch import count_parameters
from gqaprune.utils import peak_memory_mb, reset_peak_memory


@dataclass(frozen=True)
class ModelFacts:
    params: int
    param_bytes: int               # parameters + buffers in memory, at the loaded dtype
    size_on_disk_bytes: int | None  # weight files of the checkpoint (None: no local checkpoint)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SpeedResult:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    latency_ms_per_token: float
    peak_memory_mb: float          # CUDA: max allocated; CPU: peak RSS of the process while timed
    prompt_len: int
    new_tokens: int
    batch_size: int
    repeats: int
    device: str
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"batch {self.batch_size}, {self.prompt_len}-token random prompt, {self.new_tokens} greedy "
                f"tokens with KV cache, median of {self.repeats} passes after 1 warm-up, {self.device} "
                f"{self.dtype}")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def size_on_disk(path: str | Path | None) -> int | None:
    """Bytes of the weight files in a checkpoint directory (tokenizer/config excluded)."""
    if path is None or not Path(path).is_dir():
        return None
    files = [p for p in Path(path).rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    return sum(p.stat().st_size for p in files) if files else None


def model_facts(model, checkpoint_dir: str | Path | None = None) -> ModelFacts:
    tensors = list(model.parameters()) + list(model.buffers())
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return ModelFacts(count_parameters(model), nbytes, size_on_disk(checkpoint_dir))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kwarg(model) -> str:
    """The forward's KV-cache argument: ``cache`` in transformers >= 5.2x, ``past_key_values`` before
    (passing the old name only earns a deprecation warning per call)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


def _one_pass(model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy generation from ``prompt`` [B, P]."""
    name = _cache_kwarg(model)
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    _sync(device)
    t1 = time.perf_counter()
    past = _cache_of(out)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)                     # [B, 1]
    for _ in range(new_tokens):
        out = model(input_ids=nxt, use_cache=True, **{name: past})
        past = _cache_of(out)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)                 # [B, 1]
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


@torch.no_grad()
def measure_speed(model, vocab_size: int, prompt_len: int = 128, new_tokens: int = 64,
                  batch_size: int = 1, repeats: int = 3, seed: int = 0) -> SpeedResult:
    """Prefill and decode throughput of ``model`` (see the module docstring)."""
    param = next(model.parameters())
    device = param.device
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos:  # stay inside the positions the model was trained for
        prompt_len = max(1, min(prompt_len, max_pos - new_tokens))
        new_tokens = min(new_tokens, max_pos - prompt_len)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (batch_size, prompt_len), generator=gen).to(device)  # [B, P]
    _one_pass(model, prompt, new_tokens, device)  # warm-up: allocator, kernels, lazy inits
    reset_peak_memory(device)
    times = [_one_pass(model, prompt, new_tokens, device) for _ in range(max(1, repeats))]
    pre = statistics.median(t[0] for t in times)
    dec = statistics.median(t[1] for t in times)
    dec_tps = batch_size * new_tokens / dec if new_tokens and dec > 0 else float("nan")
    return SpeedResult(batch_size * prompt_len / pre, dec_tps,
                       1000 * dec / new_tokens if new_tokens else float("nan"),
                       peak_memory_mb(device), prompt_len, new_tokens, batch_size, max(1, repeats),
                       str(device), str(param.dtype).removeprefix("torch."))
