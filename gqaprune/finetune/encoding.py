"""Records -> tokenized training examples: templates applied, prompt masked, text packed.

Instruction / QA records become ``[BOS] prompt response [EOS]`` through a named template
(``gqaprune.templates``); prompt tokens get label ``IGNORE`` unless ``train_on_prompt``. Plain text
is packed into BOS-prefixed blocks, every text token a target. A seeded slice is held out for
the validation loss (:func:`split_sizes`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gqaprune import data
from gqaprune.errors import UserError
from gqaprune.finetune.records import Records
from gqaprune.templates import Template, get_template, render

IGNORE = -100  # label of tokens that are context only (prompt, BOS, padding)


@dataclass(frozen=True)
class Encoded:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]   # IGNORE where the token is context only

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def _prompt_token_count(tokenizer, prompt: str, full: str, ids: list[int]) -> int:
    """How many leading tokens of ``full`` belong to the prompt.

    Fast tokenizers: by character offsets (a token is a response token when it ends after the
    prompt), exact even where BPE merges across the boundary. Slow ones: the prompt's own
    token count.
    """
    if not prompt:
        return 0
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return sum(1 for _, end in offsets if end <= len(prompt))
    return min(len(tokenizer(prompt, add_special_tokens=False)["input_ids"]), len(ids))


def encode(tokenizer, prompt: str, response: str, seq_len: int, train_on_prompt: bool = False,
           add_special_tokens: bool = True) -> Encoded | None:
    """``[BOS] prompt response [EOS]`` -> ids and labels (prompt masked), cut to ``seq_len``.

    Returns None when truncation leaves no target token.
    """
    full = prompt + response
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    n_prompt = _prompt_token_count(tokenizer, prompt, full, ids)
    labels = [IGNORE if (i < n_prompt and not train_on_prompt) else t for i, t in enumerate(ids)]
    if add_special_tokens:
        if tokenizer.bos_token_id is not None:
            ids, labels = [tokenizer.bos_token_id] + ids, [IGNORE] + labels
        if tokenizer.eos_token_id is not None:
            ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    ids, labels = ids[:seq_len], labels[:seq_len]
    enc = Encoded(tuple(ids), tuple(labels))
    return enc if enc.n_targets > 0 else None


def pack_text(tokenizer, texts: list[str], seq_len: int) -> list[Encoded]:
    """Plain text -> BOS-prefixed blocks of ``seq_len`` tokens, every text token a target.

    Texts are joined by blank lines into one stream (as ``data.token_stream``) and cut into
    consecutive blocks of ``seq_len - 1`` tokens (``seq_len`` without BOS); the ragged tail is
    dropped unless it is the only block. Same window shape as the perplexity protocol.
    """
    stream = data.token_stream(tokenizer, texts).tolist()
    bos = tokenizer.bos_token_id
    body = seq_len - (1 if bos is not None else 0)
    n = len(stream) // body or (1 if len(stream) >= 2 else 0)
    out = []
    for i in range(n):
        chunk = stream[i * body:(i + 1) * body]
        ids = ([bos] if bos is not None else []) + chunk
        out.append(Encoded(tuple(ids), tuple([IGNORE] * (len(ids) - len(chunk)) + chunk)))
    return out


@dataclass(frozen=True)
class DataStats:
    """Sizes of the encoded data (logged as metrics)."""
    train_examples: int
    val_examples: int
    dropped_examples: int      # records whose target did not fit in seq_len (or had none)
    train_target_tokens: int   # target tokens in one pass over the training set


@dataclass
class FinetuneData:
    form: str
    template: Template
    train: list[Encoded]
    val: list[Encoded]
    source: str
    dropped: int          # examples whose target did not fit in seq_len (or empty records)
    example: str          # one rendered training example, prompt and target marked (logged)

    def stats(self) -> DataStats:
        return DataStats(len(self.train), len(self.val), self.dropped,
                         sum(e.n_targets for e in self.train))


def split_sizes(n_available: int, finetune_samples: int | None, val_fraction: float) -> tuple[int, int]:
    """(n_train, n_val): ``val_fraction`` of the examples used is held out for validation.

    With ``finetune_samples`` the training set has that many examples (fewer if the data runs
    out) and validation adds ``val_fraction / (1 - val_fraction)`` of it; at least one
    validation example whenever ``val_fraction > 0``.
    """
    want_val = val_fraction > 0
    if finetune_samples is None:
        n_val = max(int(want_val), round(val_fraction * n_available))
        n_train = n_available - n_val
    else:
        n_val = max(int(want_val), round(val_fraction * finetune_samples / (1 - val_fraction)))
        n_train = min(finetune_samples, n_available - n_val)
    if n_train < 1:
        raise UserError(f"the dataset gives {n_available} usable example(s): too few for training "
                        f"plus {n_val} validation example(s)",
                        "use more data, a longer seq_len, or val_fraction 0")
    return n_train, n_val


def describe_example(tokenizer, enc: Encoded) -> str:
    """Human-readable view of one example: which text is context and which is the target."""
    ctx = [t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE]
    tgt = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE]
    return (f"=== context (no loss, {len(ctx)} tokens) ===\n{tokenizer.decode(ctx)}\n"
            f"=== target (loss, {len(tgt)} tokens) ===\n{tokenizer.decode(tgt)}\n")


def build_data(tokenizer, records: Records, template: str = "auto", seq_len: int = 256,
               finetune_samples: int | None = None, val_fraction: float = 0.05, seed: int = 0,
               train_on_prompt: bool = False) -> FinetuneData:
    """Records -> seeded train / validation examples (see :func:`split_sizes`)."""
    tpl = get_template(template, records.form)
    gen = torch.Generator().manual_seed(seed)
    if records.form == "text":
        pool = pack_text(tokenizer, [r["text"] for r in records.records], seq_len)
        if not pool:
            raise UserError(f"dataset '{records.source}' has fewer than 2 tokens", "pass more text")
        order = torch.randperm(len(pool), generator=gen).tolist()
        n_train, n_val = split_sizes(len(pool), finetune_samples, val_fraction)
        chosen = [pool[i] for i in order[:n_val + n_train]]
        dropped = records.skipped
    else:
        order = torch.randperm(len(records.records), generator=gen).tolist()
        chosen, dropped = _encode_until(tokenizer, records, tpl, order, seq_len, train_on_prompt,
                                        finetune_samples, val_fraction)
        n_train, n_val = split_sizes(len(chosen), finetune_samples, val_fraction)
        dropped += records.skipped
    val, train = chosen[:n_val], chosen[n_val:n_val + n_train]
    return FinetuneData(records.form, tpl, train, val, records.source, dropped,
                        describe_example(tokenizer, train[0]))


def _encode_until(tokenizer, records: Records, tpl: Template, order: list[int], seq_len: int,
                  train_on_prompt: bool, finetune_samples: int | None,
                  val_fraction: float) -> tuple[list[Encoded], int]:
    """Encode records in seeded order, stopping once enough examples exist (big hub sets)."""
    need = None
    if finetune_samples is not None:
        need = finetune_samples + max(int(val_fraction > 0),
                                      round(val_fraction * finetune_samples / (1 - val_fraction)))
    out, dropped = [], 0
    for i in order:
        prompt, response = render(tpl, records.records[i], records.form, tokenizer)
        enc = encode(tokenizer, prompt, response, seq_len, train_on_prompt, tpl.adds_special_tokens)
        if enc is None:
            dropped += 1
            continue
        out.append(enc)
        if need is not None and len(out) >= need:
            break
    if not out:
        raise UserError(f"no example of '{records.source}' keeps a target token within seq_len {seq_len}",
                        "raise seq_len")
    return out, dropped


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example -> input_ids, attention_mask, labels: LongTensor [B, L]."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def check_seq_len(model, seq_len: int) -> None:
    """Examples must fit the model's positions (checked once the model is loaded)."""
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise UserError(f"seq_len {seq_len} exceeds the model's {max_pos} positions", f"pass seq_len <= {max_pos}")
