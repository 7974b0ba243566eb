"""The built-in ``demo`` model: a tiny GQA Llama the toolkit trains for itself.

Why: every pruning path (scoring, GQA-aware head removal, evaluation, checkpoints) must be
runnable and testable on a machine with no internet and no GPU.  Random-weight models are
useless for that (pruning them changes nothing measurable), and any hub model needs a
download.  So the toolkit trains its own small model, in about two minutes on one
CPU core, on short stories generated from a seeded grammar (``demo_corpus.py``): recurring
names and objects and a plot per story, so pruning damage shows in perplexity *and* in
the offline zero-shot tasks built from the held-out stories.

What: a byte-level BPE tokenizer (vocab 1024) and a 4-layer Llama (hidden 48, MLP 128) with 8
query heads sharing 4 key/value heads (GQA groups of 2, head_dim 6: 4 prunable KV groups per
layer, so group-level selection matters), trained with AdamW and a warmup + cosine schedule on
random 256-token windows, one CPU thread (see :class:`DemoRecipe`, :func:`train_threads`).

Determinism: the corpus is generated from a fixed seed, the tokenizer trainer is
deterministic, weights are seeded with ``torch.manual_seed(seed)``, windows come from a
seeded ``torch.Generator`` and the thread count is pinned (see :func:`train_threads`), so
one seed gives bitwise-identical weights on one machine.

Caching: :func:`ensure_demo_model` trains once into
``$GQAPRUNE_CACHE`` (default ``~/.cache/gqaprune``) ``/demo-<DEMO_VERSION>-seed<seed>``;
training writes into a hidden temp dir that is renamed into place only when complete, so
an interrupted run never leaves a half cache.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from gqaprune.demo_corpus import CORPUS_VERSION, HOLDOUT_EVERY, corpus_sha256, demo_texts

DEMO_VERSION = "v2"           # bump when anything below changes the trained weights
CACHE_ENV = "GQAPRUNE_CACHE"
SEQ_LEN = 128                 # evaluation window (tokens) of the recorded held-out perplexity
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0, 1, 2, 3
UNK, BOS, EOS, PAD = SPECIAL_TOKENS
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "demo_info.json")


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the trained weights besides the seed."""
    vocab_size: int = 1024
    hidden_size: int = 48
    intermediate_size: int = 128
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 6
    max_positions: int = 512
    steps: int = 700
    batch_size: int = 8
    seq_len: int = 256            # training window (tokens): longer than any task prompt
    peak_lr: float = 1e-2
    weight_decay: float = 0.1
    warmup_frac: float = 0.05
    final_lr_frac: float = 0.1


RECIPE = DemoRecipe()
DEFAULT_STEPS = RECIPE.steps
VOCAB_SIZE = RECIPE.vocab_size
# One training step on one thread: CPU time per step, 0.158 s measured over 60 steps on the 2-core
# machine at load 5.3 (2026-12-02), which bounds the wall time per step on an idle core from above.
# The first-run message quotes it.
SECONDS_PER_STEP_IDLE = 0.16


# -------------------------------------------------------------------------- tokenizer

def build_demo_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Train a deterministic byte-level BPE and wrap it for ``transformers``.

    Byte-level: any text (not only the stories) encodes without ``<unk>``. Like Llama
    tokenizers it prepends ``<s>`` to every encoded text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=UNK))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    bos_id = bpe.token_to_id(BOS)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, pad_token=PAD,
                                   model_max_length=RECIPE.max_positions)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one id stream, each as ``<s> text </s>`` -> LongTensor (n_tokens,)."""
    encodings = tokenizer.backend_tokenizer.encode_batch(texts)  # post-processor adds <s>
    ids = [i for enc in encodings for i in enc.ids + [tokenizer.eos_token_id]]
    return torch.tensor(ids, dtype=torch.long)


def training_stream(tokenizer, texts: list[str], seed: int) -> torch.Tensor:
    """The training id stream (n_tokens,): texts separated by ``</s> <s>``, ``\n`` or ``\n\n``.

    Why mixed: the toolkit feeds text in all three forms (calibration windows join paragraphs
    with blank lines, held-out perplexity streams with single newlines, lm-eval scores single
    documents), and a model that only ever saw ``</s> <s>`` pays for every unfamiliar newline.
    The separator of each boundary is drawn from a seeded ``random.Random``.
    """
    import random

    rng = random.Random(seed)
    seps = {"eos": [tokenizer.eos_token_id, tokenizer.bos_token_id],
            "nl": tokenizer("\n", add_special_tokens=False)["input_ids"],
            "nlnl": tokenizer("\n\n", add_special_tokens=False)["input_ids"]}
    bodies = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ids = [tokenizer.bos_token_id]
    for enc in bodies:
        ids += enc.ids + seps[rng.choice(("eos", "nl", "nlnl"))]
    return torch.tensor(ids, dtype=torch.long)


# ------------------------------------------------------------------------------ model

def demo_config(tokenizer, recipe: DemoRecipe = RECIPE):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=recipe.vocab_size, hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads, num_key_value_heads=recipe.num_kv_heads,
        head_dim=recipe.head_dim, max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def sample_windows(stream: torch.Tensor, generator: torch.Generator,
                   batch_size: int, seq_len: int) -> torch.Tensor:
    """Random windows of the stream (n_tokens,) -> LongTensor (batch_size, seq_len)."""
    starts = torch.randint(0, len(stream) - seq_len + 1, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len)                       # (seq_len,)
    return stream[starts[:, None] + offsets[None, :]]     # (batch_size, seq_len)


def lr_factor(step: int, steps: int, recipe: DemoRecipe = RECIPE) -> float:
    """Linear warmup over the first ``warmup_frac`` of steps, then cosine decay to
    ``final_lr_frac`` of the peak."""
    warmup = max(1, int(steps * recipe.warmup_frac))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    low = recipe.final_lr_frac
    return low + (1 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
    """Always 1 intra-op thread.

    Why not 2 on a 2-core machine: (1) on a busy machine 2 OpenMP threads wait for each other's
    descheduled thread and are several times *slower* than 1 (measured on a shared 2-core box at
    load ~6: 2.05 s/step with 2 threads, 0.37 s/step with 1); (2) the thread count changes the
    float reductions, hence the bits, so one fixed count gives the same cached model on every
    machine of an architecture whatever its core count or load. An idle 2-core machine would
    train about 1.8x faster with 2 threads; the 1-thread run still fits the first-run budget.
    """
    return 1


def _train_loop(model, stream: torch.Tensor, seed: int, recipe: DemoRecipe,
                progress: bool) -> list[float]:
    """AdamW on random windows of ``stream``; returns the per-step training losses."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.peak_lr, betas=(0.9, 0.95),
                                  weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, recipe.steps, recipe))
    model.train()
    losses = []
    bar = tqdm(range(recipe.steps), desc="training demo model", unit="step", disable=not progress)
    for step in bar:
        batch = sample_windows(stream, generator, recipe.batch_size, recipe.seq_len)  # (B, T)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == recipe.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def train_demo_model(seed: int = 0, steps: int = DEFAULT_STEPS,
                     out_dir: str | Path | None = None, progress: bool = True,
                     recipe: DemoRecipe = RECIPE) -> dict:
    """Train tokenizer + model from scratch; save both to ``out_dir`` if given.

    Returns the training record that is also written to ``demo_info.json``.
    """
    from transformers import LlamaForCausalLM

    recipe = replace(recipe, steps=steps)
    threads, previous_threads = train_threads(), torch.get_num_threads()
    torch.set_num_threads(threads)  # pinned: the thread count affects the bits
    try:
        tokenizer = build_demo_tokenizer(demo_texts("train"), recipe.vocab_size)
        train_stream = training_stream(tokenizer, demo_texts("train"), seed)  # (n_train,)
        valid_stream = token_stream(tokenizer, demo_texts("validation"))  # (n_valid,)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(demo_config(tokenizer, recipe)).float()
        start = time.perf_counter()
        losses = _train_loop(model, train_stream, seed, recipe, progress)
        train_seconds = time.perf_counter() - start
        ppl = held_out_perplexity(model, valid_stream)
    finally:
        torch.set_num_threads(previous_threads)
    info = _training_record(seed, recipe, threads, losses, train_seconds, ppl,
                            len(train_stream), len(valid_stream))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "demo_info.json").write_text(json.dumps(info, indent=2) + "\n")  # written last
    return info


def _training_record(seed: int, recipe: DemoRecipe, threads: int, losses: list[float],
                     train_seconds: float, ppl: float, train_tokens: int, valid_tokens: int) -> dict:
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "version": DEMO_VERSION, "seed": seed, "steps": recipe.steps,
        "recipe": asdict(recipe), "threads": threads,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_step": round(train_seconds / max(1, recipe.steps), 4),
        "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "initial_train_loss": round(losses[0], 4) if losses else None,
        "final_train_loss": round(sum(tail) / len(tail), 4) if losses else None,
        "heldout_perplexity": round(ppl, 3),
        "heldout_tokens": valid_tokens, "train_tokens": train_tokens,
        "heldout_method": (f"exp(mean next-token NLL) over consecutive non-overlapping "
                           f"{SEQ_LEN}-token windows of the held-out demo stories (every "
                           f"{HOLDOUT_EVERY}th story, each as '<s> text </s>'), no BOS per window, "
                           f"no context carried across windows; uniform baseline = "
                           f"{recipe.vocab_size}"),
        "corpus": CORPUS_VERSION, "corpus_sha256": corpus_sha256(),
        "python": sys.version.split()[0], "torch": torch.__version__,
    }


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


def first_run_message(target: Path, steps: int = DEFAULT_STEPS) -> str:
    """What a user reads before the one-time training starts."""
    estimate = steps * SECONDS_PER_STEP_IDLE
    return (f"demo model: not cached yet, training it once: a {RECIPE.num_layers}-layer GQA Llama "
            f"({RECIPE.num_heads} query / {RECIPE.num_kv_heads} KV heads), {steps} steps on generated "
            f"stories, 1 CPU thread; about {estimate:.0f} s on an idle machine, longer on a busy one.\n"
            f"demo model: cached in {target} (set {CACHE_ENV} to move it); later runs reuse it.")


def ensure_demo_model(seed: int = 0, cache_dir: str | Path | None = None,
                      steps: int = DEFAULT_STEPS, progress: bool = True,
                      notify: Callable[[str], None] | None = print) -> Path:
    """Directory of the trained demo model, training it first if no complete copy is cached.

    ``notify`` receives one message before training starts (None: silent).
    """
    target = demo_model_dir(seed, cache_dir, steps)
    if is_complete(target):
        return target
    if notify is not None:
        notify(first_run_message(target, steps))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        info = train_demo_model(seed, steps, tmp, progress)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if notify is not None:
        notify(f"demo model: trained in {info['train_seconds']:.0f} s, held-out perplexity "
               f"{info['heldout_perplexity']:.2f}; saved to {target}")
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
