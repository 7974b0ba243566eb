"""The built-in ``demo`` model: a tiny GQA Llama the toolkit trains for itself.

Why: every pruning path (scoring, GQA-aware head removal, evaluation, checkpoints) must be
runnable and testable on a machine with no internet and no GPU.  Random-weight models are
useless for that (pruning them changes nothing measurable), and any hub model needs a
download.  So the toolkit trains its own small model, in about a minute on two CPU cores,
on text every Python installation ships: the standard library's ``pydoc_data.topics``
(the language reference pages behind ``help("if")`` etc.).

What: a byte-level BPE tokenizer (vocab 512) and a 4-layer Llama with 8 query heads
sharing 2 key/value heads (GQA, head_dim 8), trained with AdamW and a warmup + cosine
schedule on random 128-token windows.  The result is a real (if small) language model
whose held-out perplexity is far below the uniform 512, so pruning damage is visible.

Determinism: topics are sorted by name, the tokenizer trainer is deterministic, weights are
seeded with ``torch.manual_seed(seed)``, windows come from a seeded ``torch.Generator`` and
the thread count is pinned (see :func:`train_threads`), so one seed gives bitwise-identical
weights on one machine.

Caching: :func:`ensure_demo_model` trains once into
``$GQAPRUNE_CACHE`` (default ``~/.cache/gqaprune``) ``/demo-v1-seed<seed>``; training
writes into a hidden temp dir that is renamed into place only when complete, so an
interrupted run never leaves a half cache.

Note the corpus is the running Python's own pydoc text, so it differs slightly between
Python versions; ``demo_info.json`` records the version and a hash of the corpus.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from gqaprune.demo_corpus import HOLDOUT_EVERY, corpus_sha256, demo_texts

DEMO_VERSION = "v1"           # bump when anything below changes the trained weights
CACHE_ENV = "GQAPRUNE_CACHE"
DEFAULT_STEPS = 700           # ~0.086 s/step on 2 idle CPU cores -> ~60 s of training
VOCAB_SIZE = 512
SEQ_LEN = 128                 # training and evaluation window length (tokens)
BATCH_SIZE = 16
PEAK_LR = 6e-3
WEIGHT_DECAY = 0.1
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0, 1, 2, 3
UNK, BOS, EOS, PAD = SPECIAL_TOKENS
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "demo_info.json")


# -------------------------------------------------------------------------- tokenizer

def build_demo_tokenizer(texts: list[str]):
    """Train a deterministic byte-level BPE (vocab 512) and wrap it for ``transformers``.

    Like Llama tokenizers it prepends ``<s>`` to every encoded text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=UNK))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    bos_id = bpe.token_to_id(BOS)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, pad_token=PAD, model_max_length=2 * SEQ_LEN)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one id stream, each as ``<s> text </s>`` -> LongTensor (n_tokens,)."""
    encodings = tokenizer.backend_tokenizer.encode_batch(texts)  # post-processor adds <s>
    ids = [i for enc in encodings for i in enc.ids + [tokenizer.eos_token_id]]
    return torch.tensor(ids, dtype=torch.long)


# ------------------------------------------------------------------------------ model

def demo_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=2 * SEQ_LEN, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def sample_windows(stream: torch.Tensor, generator: torch.Generator,
                   batch_size: int = BATCH_SIZE, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Random windows of the stream (n_tokens,) -> LongTensor (batch_size, seq_len)."""
    starts = torch.randint(0, len(stream) - seq_len + 1, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len)                       # (seq_len,)
    return stream[starts[:, None] + offsets[None, :]]     # (batch_size, seq_len)


def lr_factor(step: int, steps: int) -> float:
    """Linear warmup over the first 5% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def held_out_perplexity(model, stream: torch.Tensor, seq_len: int = SEQ_LEN) -> float:
    """exp(mean next-token NLL) over consecutive non-overlapping ``seq_len`` windows, no BOS.

    Each window is scored independently (no context carried over), so its first token is
    never predicted; the last, shorter window is kept if it has at least 2 tokens.
    """
    from gqaprune.evaluation.perplexity import PplProtocol, perplexity

    model.eval()
    protocol = PplProtocol("demo", seq_len=seq_len, bos=False)
    return perplexity(model, stream, protocol, show_progress=False).ppl


# --------------------------------------------------------------------------- training

def train_threads() -> int:
    """``min(2, cores)``, capped further by an explicit ``OMP_NUM_THREADS``.

    On a busy shared machine 2 OpenMP threads are ~3x slower than 1 (each step waits for
    the descheduled thread), so a user who sets ``OMP_NUM_THREADS=1`` gets 1 thread.
    """
    threads = min(2, os.cpu_count() or 1)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    return min(threads, int(env)) if env.isdigit() and int(env) > 0 else threads


def _train_loop(model, stream: torch.Tensor, seed: int, steps: int, progress: bool) -> list[float]:
    """AdamW on random windows of ``stream``; returns the per-step training losses."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95),
                                  weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="training demo model", unit="step", disable=not progress)
    for step in bar:
        batch = sample_windows(stream, generator)         # (BATCH_SIZE, SEQ_LEN)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def train_demo_model(seed: int = 0, steps: int = DEFAULT_STEPS,
                     out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Train tokenizer + model from scratch; save both to ``out_dir`` if given.

    Returns the training record that is also written to ``demo_info.json``.
    """
    from transformers import LlamaForCausalLM

    threads, previous_threads = train_threads(), torch.get_num_threads()
    torch.set_num_threads(threads)  # pinned: the thread count affects the bits
    try:
        tokenizer = build_demo_tokenizer(demo_texts("train"))
        train_stream = token_stream(tokenizer, demo_texts("train"))      # (n_train,)
        valid_stream = token_stream(tokenizer, demo_texts("validation"))  # (n_valid,)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(demo_config(tokenizer)).float()
        start = time.perf_counter()
        losses = _train_loop(model, train_stream, seed, steps, progress)
        train_seconds = time.perf_counter() - start
        ppl = held_out_perplexity(model, valid_stream)
    finally:
        torch.set_num_threads(previous_threads)
    tail = losses[-max(1, steps // 10):]
    info = {
        "version": DEMO_VERSION, "seed": seed, "steps": steps, "batch_size": BATCH_SIZE,
        "seq_len": SEQ_LEN, "peak_lr": PEAK_LR, "threads": threads,
        "train_seconds": round(train_seconds, 2),
        "initial_train_loss": round(losses[0], 4) if losses else None,
        "final_train_loss": round(sum(tail) / len(tail), 4) if losses else None,
        "heldout_perplexity": round(ppl, 3),
        "heldout_tokens": len(valid_stream),
        "heldout_method": (f"exp(mean next-token NLL) over consecutive non-overlapping "
                           f"{SEQ_LEN}-token windows of the held-out pydoc topics (every "
                           f"{HOLDOUT_EVERY}th topic by sorted name, each as '<s> text </s>'), "
                           f"no context carried across windows; uniform baseline = {VOCAB_SIZE}"),
        "corpus": "pydoc_data.topics.topics",
        "corpus_sha256": corpus_sha256(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "demo_info.json").write_text(json.dumps(info, indent=2) + "\n")  # written last
    return info


# ------------------------------------------------------------------------------ cache

def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gqaprune").expanduser()


def demo_model_dir(seed: int = 0, cache_dir: str | Path | None = None,
                   steps: int = DEFAULT_STEPS) -> Path:
    """Where the demo model for ``seed`` lives (non-default step counts get their own dir)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    suffix = "" if steps == DEFAULT_STEPS else f"-steps{steps}"
    return root / f"demo-{DEMO_VERSION}-seed{seed}{suffix}"


def is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in REQUIRED_FILES)


def ensure_demo_model(seed: int = 0, cache_dir: str | Path | None = None,
                      steps: int = DEFAULT_STEPS, progress: bool = True) -> Path:
    """Directory of the trained demo model, training it first if no complete copy is cached."""
    target = demo_model_dir(seed, cache_dir, steps)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        train_demo_model(seed, steps, tmp, progress)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _publish(tmp: Path, target: Path) -> None:
    """Atomically move the finished ``tmp`` dir to ``target`` (same filesystem)."""
    tmp.chmod(0o755)  # mkdtemp makes it owner-only
    if target.exists() and not is_complete(target):
        shutil.rmtree(target, ignore_errors=True)  # leftover of an older, broken cache
    try:
        os.rename(tmp, target)
    except OSError:
        if not is_complete(target):  # lost a race to a concurrent trainer: theirs is fine
            raise
