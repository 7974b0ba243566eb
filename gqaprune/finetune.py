"""LoRA recovery fine-tuning of (pruned) causal LMs: data -> examples -> LoRA -> merged model.

Why a hand-written loop instead of ``transformers.Trainer``: resuming must be *exact* (a run
killed at step N and resumed gives the same adapter as one that never stopped), the loss must
be the mean over the response tokens of the whole optimizer step (not a mean of micro-batch
means), and the loop must report through plain callbacks because the core never imports MLflow.

Pipeline:
  1. :func:`load_records` - a dataset name or file -> records of one *form* (instruction / qa /
     text), with the missing field named when a record does not fit.
  2. :func:`build_data` - records -> tokenized :class:`Encoded` examples through a named template
     (``gqaprune.templates``); prompt tokens get label -100 unless ``train_on_prompt``; plain text
     is packed into BOS-prefixed blocks; a seeded slice is held out for the validation loss.
  3. :func:`attach_lora` - peft LoRA on the chosen projections (works on pruned layers of any
     size), :func:`train` - AdamW, linear warmup + linear decay, gradient accumulation,
     resumable checkpoints (:class:`CheckpointStore`), and :func:`merge` - ``merge_and_unload``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gqaprune import data
from gqaprune.errors import UserError
from gqaprune.templates import Template, get_template, render

IGNORE = -100  # label of tokens that are context only (prompt, BOS, padding)

# ------------------------------------------------------------------------------ datasets

# Hub datasets with a fixed form (need the hub; fail fast offline).
HUB_DATASETS = {
    "alpaca": ("yahma/alpaca-cleaned", "instruction", "train"),
    "alpaca-cleaned": ("yahma/alpaca-cleaned", "instruction", "train"),
    "yahma/alpaca-cleaned": ("yahma/alpaca-cleaned", "instruction", "train"),
    "squad": ("rajpurkar/squad", "qa", "train"),
}
FORM_FIELDS = {"instruction": ("instruction", "output"), "qa": ("context", "question", "answers"),
               "text": ("text",)}
FORM_TEXT = {"instruction": "Alpaca form {instruction, input (optional), output}",
             "qa": "SQuAD form {context, question, answers or answer}",
             "text": "text form {text}"}
EXPECTED_FORMS = "; ".join(FORM_TEXT.values())


@dataclass
class Records:
    form: str            # instruction | qa | text
    records: list[dict]  # normalised: instruction/input/output, context/question/answer, or text
    source: str          # where they came from (logged)
    skipped: int = 0     # records without a usable target (empty text, unanswerable question)


def detect_form(rec, where: str) -> str:
    """The form of one record; a record that fits none names what it has and what is expected."""
    if not isinstance(rec, dict):
        raise UserError(f"{where} is not a JSON object", f"give each record the fields of the {EXPECTED_FORMS}")
    keys = set(rec)
    if keys & {"instruction", "output"}:
        return "instruction"
    if keys & {"context", "question", "answers", "answer"}:
        return "qa"
    if "text" in keys:
        return "text"
    raise UserError(f"{where} has fields {sorted(keys)}, which fit no known form",
                    f"expected {EXPECTED_FORMS}")


def _missing(rec: dict, form: str) -> str | None:
    for name in FORM_FIELDS[form]:
        if name == "answers":
            if "answers" not in rec and "answer" not in rec:
                return "answers"
        elif name not in rec:
            return name
    return None


def _first_answer(ans) -> str:
    """SQuAD answers in any of their shapes -> the first answer text ('' if unanswerable)."""
    if isinstance(ans, dict):
        ans = ans.get("text", [])
    if isinstance(ans, str):
        return ans
    for a in ans or []:
        text = a.get("text", "") if isinstance(a, dict) else str(a)
        if text:
            return text
    return ""


def normalise(rec: dict, form: str, where: str) -> dict | None:
    """Check the fields of ``form`` and return the normalised record (None: nothing to learn)."""
    if not isinstance(rec, dict) or (miss := _missing(rec, form)) is not None:
        what = "is not a JSON object" if not isinstance(rec, dict) else f"lacks field '{miss}'"
        raise UserError(f"{where} {what} (the data is in {FORM_TEXT[form]})",
                        f"give every record the fields of the {FORM_TEXT[form]}")
    if form == "instruction":
        out = {"instruction": str(rec["instruction"]), "input": str(rec.get("input") or ""),
               "output": str(rec["output"])}
        return out if out["output"].strip() else None
    if form == "qa":
        answer = _first_answer(rec["answers"] if "answers" in rec else rec["answer"])
        return {"context": str(rec["context"]), "question": str(rec["question"]),
                "answer": answer} if answer.strip() else None
    text = str(rec["text"])
    return {"text": text} if text.strip() else None


def records_of(raw: list, source: str) -> Records:
    """Raw JSON records -> :class:`Records` of the form of the first record."""
    if not raw:
        raise UserError(f"dataset '{source}' is empty", "pass a dataset with at least one record")
    form = detect_form(raw[0], f"record 1 of '{source}'")
    out, skipped = [], 0
    for i, rec in enumerate(raw):
        norm = normalise(rec, form, f"record {i + 1} of '{source}'")
        if norm is None:
            skipped += 1
        else:
            out.append(norm)
    if not out:
        raise UserError(f"dataset '{source}' has no record with a non-empty target "
                        f"({skipped} empty)", "pass records with non-empty outputs / answers / text")
    return Records(form, out, source, skipped)


def _flatten_squad(raw: list) -> list:
    """Original SQuAD JSON (articles -> paragraphs -> qas) -> flat context/question/answers."""
    if not raw or not isinstance(raw[0], dict) or "paragraphs" not in raw[0]:
        return raw
    return [{"context": p["context"], "question": qa["question"], "answers": qa.get("answers", [])}
            for article in raw for p in article["paragraphs"] for qa in p["qas"]]


def read_local_records(path: str | Path) -> list:
    """``.jsonl``: one record a line; ``.json``: a list (or {"data": [...]}); else paragraphs."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"data file '{p}' not found", "pass an existing .json, .jsonl or .txt file")
    if p.suffix == ".jsonl":
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        try:
            return [json.loads(ln) for ln in lines]
        except json.JSONDecodeError as exc:
            raise UserError(f"'{p}' is not valid JSON Lines ({exc})", "write one JSON object per line") from exc
    if p.suffix == ".json":
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"'{p}' is not valid JSON ({exc})", "write a JSON list of records") from exc
        raw = raw.get("data", raw) if isinstance(raw, dict) else raw
        if not isinstance(raw, list):
            raise UserError(f"'{p}' holds a JSON {type(raw).__name__}, not a list of records",
                            "write a JSON list of records (or {\"data\": [...]})")
        return _flatten_squad(raw)
    raw_text = p.read_text(encoding="utf-8", errors="replace")
    return [{"text": para.strip()} for para in raw_text.split("\n\n") if para.strip()]


def _hub_records(name: str) -> tuple[list, str]:
    repo, form, split = HUB_DATASETS[name]
    if not data.hub_reachable():
        raise UserError(f"dataset '{name}' ({repo}) needs the Hugging Face hub, which is not reachable "
                        "(offline or HF_DATASETS_OFFLINE set)",
                        "pass a local .json/.jsonl file in the same form, or run where the hub is reachable")
    from datasets import load_dataset
    try:
        ds = load_dataset(repo, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds
        raise UserError(f"dataset '{repo}' could not be loaded: {str(exc).splitlines()[0][:200]}",
                        "check the network or pass a local file") from exc
    return list(ds), f"{repo} [{split}]"


def load_records(dataset: str) -> Records:
    """A dataset name or local file -> :class:`Records` (training part only).

    Local files lose every 10th record (``data.split_local``): that slice is what
    ``data.eval_stream`` scores, so fine-tuning on a file never trains on its evaluation text.
    Registered text sources (wikitext2, demo, ...) use their ``train`` split.
    """
    if dataset in HUB_DATASETS:
        raw, source = _hub_records(dataset)
        return records_of(raw, source)
    if dataset in data.SOURCES:
        texts = data.load_texts(dataset, "train")
        return records_of([{"text": t} for t in texts], f"{dataset} [train]")
    if data.is_local(dataset):
        raw = read_local_records(dataset)
        if not raw:
            raise UserError(f"dataset '{dataset}' is empty", "pass a file with at least one record")
        kept = data.split_local(raw, "train")
        return records_of(kept, f"{dataset} [train part: all but every 10th record]")
    known = sorted(set(HUB_DATASETS) | set(data.SOURCES))
    raise UserError(f"unknown dataset '{dataset}'",
                    f"use one of {', '.join(known)} or a path to a .json/.jsonl/.txt file")


# ------------------------------------------------------------------------------ tokenization

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


@dataclass
class FinetuneData:
    form: str
    template: Template
    train: list[Encoded]
    val: list[Encoded]
    source: str
    dropped: int          # examples whose target did not fit in seq_len (or empty records)
    example: str          # one rendered training example, prompt and target marked (logged)

    def stats(self) -> dict:
        return {"train_examples": len(self.train), "val_examples": len(self.val),
                "dropped_examples": self.dropped,
                "train_target_tokens": sum(e.n_targets for e in self.train)}


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


# ------------------------------------------------------------------------------ LoRA

SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
               "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
GROUPS = {"all": ("q", "k", "v", "o", "gate", "up", "down"), "attn": ("q", "k", "v", "o"),
          "mlp": ("gate", "up", "down")}
DEFAULT_TARGETS = "q,k,v,o,gate,up,down"


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: str = DEFAULT_TARGETS   # comma list: short names, full names, all/attn/mlp


def parse_targets(spec: str) -> list[str]:
    """``"q,k,gate"`` / ``"attn"`` / ``"q_proj,lm_head"`` -> module names (order kept, unique)."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        for short in GROUPS.get(part, (part,)):
            full = SHORT_NAMES.get(short, short)
            if full and full not in names:
                names.append(full)
    if not names:
        raise UserError("target_modules is empty", f"pass e.g. {DEFAULT_TARGETS}")
    return names


def resolve_targets(model: nn.Module, spec: str) -> list[str]:
    """Target names checked against the model's Linear layers (by last name component)."""
    names = parse_targets(spec)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    missing = [n for n in names if n not in linear]
    if missing:
        raise UserError(f"target module(s) {', '.join(missing)} not found in the model",
                        f"use some of {', '.join(linear)} (or short names q,k,v,o,gate,up,down, all, attn, mlp)")
    return names


def attach_lora(model: nn.Module, lora: LoraSettings, gradient_checkpointing: bool = False):
    """Wrap ``model`` in a peft LoRA model: only the adapters train (base frozen).

    peft sizes each adapter from its own layer, so pruned layers of different widths work.
    """
    from peft import LoraConfig, get_peft_model
    if lora.r < 1:
        raise UserError(f"lora_r must be >= 1, got {lora.r}", "pass e.g. 8")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=resolve_targets(model, lora.target_modules),
                        bias="none", task_type="CAUSAL_LM")
    model.config.use_cache = False
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings():  # peft 0.21 still reads the renamed is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def merge(peft_model) -> nn.Module:
    """``merge_and_unload``: W + (alpha/r) B A folded into each base Linear -> a plain model."""
    model = peft_model.merge_and_unload()
    # transformers 5 renamed gradient -> activation checkpointing; use whichever exists.
    new_api = hasattr(model, "activation_checkpointing_disable")
    enabled = getattr(model, "is_activation_checkpointing" if new_api else "is_gradient_checkpointing", False)
    if enabled:
        (model.activation_checkpointing_disable if new_api else model.gradient_checkpointing_disable)()
    model.config.use_cache = True
    return model.eval()


# ------------------------------------------------------------------------------ loss

def nll_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over target tokens and their count (position t predicts t+1)."""
    device = next(p for p in model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device))
    logits = out.logits[:, :-1].float()                       # [B, L-1, V]
    targets = batch["labels"][:, 1:].to(device)               # [B, L-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


@torch.no_grad()
def mean_loss(model: nn.Module, examples: list[Encoded], batch_size: int, pad_id: int) -> float:
    """Mean target-token NLL over ``examples`` (eval mode; restores the previous mode)."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        s, n = nll_sum(model, collate(examples[i:i + batch_size], pad_id))
        total, count = total + float(s), count + n
    model.train(was_training)
    return total / max(count, 1)


def accumulate_gradients(model: nn.Module, batches: list[dict], n_tokens: int, scaler=None) -> float:
    """Backward of sum(NLL) / n_tokens over micro-batches: the gradient of the mean target NLL of
    the whole optimizer step, whatever the split into micro-batches. Returns the summed NLL."""
    total = 0.0
    for batch in batches:
        loss_sum, _ = nll_sum(model, batch)
        loss = loss_sum / max(n_tokens, 1)
        (scaler.scale(loss) if scaler else loss).backward()
        total += float(loss_sum.detach())
    return total


# ------------------------------------------------------------------------------ schedule

@dataclass(frozen=True)
class TrainSettings:
    learning_rate: float = 1e-4
    epochs: int = 1
    batch_size: int = 4
    gradient_accumulation: int = 1
    seed: int = 0
    max_steps: int | None = None     # total optimizer steps (overrides epochs, sets the schedule)
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 50       # optimizer steps between checkpoints (also at epoch ends)
    show_progress: bool = True

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation


def steps_per_epoch(n_train: int, s: TrainSettings) -> int:
    return math.ceil(n_train / s.examples_per_step)


def total_steps(n_train: int, s: TrainSettings) -> int:
    return s.max_steps if s.max_steps is not None else s.epochs * steps_per_epoch(n_train, s)


def lr_at(step: int, total: int, s: TrainSettings) -> float:
    """LR of update ``step`` (0-based): linear warmup over ceil(warmup_ratio*total), linear decay."""
    warm = math.ceil(s.warmup_ratio * total)
    if step < warm:
        return s.learning_rate * (step + 1) / warm
    return s.learning_rate * max(0.0, (total - step) / max(1, total - warm))


def epoch_order(n_train: int, epoch: int, seed: int) -> list[int]:
    """Seeded shuffle of the training examples for one epoch (a function of seed and epoch only)."""
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def micro_batches(n_train: int, step: int, s: TrainSettings) -> list[list[int]]:
    """Example indices of optimizer step ``step``: ``gradient_accumulation`` lists of <= batch_size."""
    spe = steps_per_epoch(n_train, s)
    order = epoch_order(n_train, step // spe, s.seed)
    start = (step % spe) * s.examples_per_step
    chunk = order[start:start + s.examples_per_step]
    return [chunk[i:i + s.batch_size] for i in range(0, len(chunk), s.batch_size)]


# ------------------------------------------------------------------------------ checkpoints

CKPT_FORMAT = "gqaprune.finetune-checkpoint/v1"


def config_key(payload: dict) -> str:
    """Stable short hash of everything that changes the training trajectory."""
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class CheckpointStore:
    """One directory holding the latest training state (``state.pt``) and a readable meta.json.

    Writes go to a temp file first and are renamed into place, so a kill during a save leaves
    the previous checkpoint intact.
    """

    STATE, META = "state.pt", "meta.json"

    def __init__(self, directory: str | Path):
        self.dir = Path(directory).expanduser()

    def exists(self) -> bool:
        return (self.dir / self.STATE).is_file()

    def meta(self) -> dict:
        path = self.dir / self.META
        return json.loads(path.read_text()) if path.is_file() else {}

    def load(self) -> dict:
        state = torch.load(self.dir / self.STATE, map_location="cpu", weights_only=True)
        if state.get("format") != CKPT_FORMAT:
            raise UserError(f"checkpoint in '{self.dir}' has an unknown format",
                            "delete it or pass resume false")
        return state

    def save(self, state: dict, meta: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / (self.STATE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.dir / self.STATE)
        (self.dir / (self.META + ".tmp")).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        os.replace(self.dir / (self.META + ".tmp"), self.dir / self.META)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------ training

@dataclass
class Callbacks:
    """Hooks the entry point uses to log; the core stays free of MLflow."""
    on_step: Callable[[dict], None] | None = None        # {"step", "epoch", "train_loss", "lr", "tokens"}
    on_validation: Callable[[dict], None] | None = None  # {"step", "epoch", "val_loss"}
    should_stop: Callable[[int], bool] | None = None     # graceful stop after this step (checkpointed)


@dataclass
class TrainResult:
    history: dict                 # {"train": [...per step], "val": [...per evaluation]}
    start_step: int               # 0, or the step a resumed run continued from
    final_step: int
    total_steps: int
    completed: bool
    train_time_s: float           # wall time of the optimizer steps, summed over resumes
    resumed: bool = False


class _Loop:
    """State of one training run: model, optimizer, step counter, history."""

    def __init__(self, model, data: FinetuneData, s: TrainSettings, pad_id: int):
        self.model, self.data, self.s, self.pad_id = model, data, s, pad_id
        self.params = [p for _, p in trainable_parameters(model)]
        self.names = [n for n, _ in trainable_parameters(model)]
        self.opt = torch.optim.AdamW(self.params, lr=s.learning_rate, weight_decay=s.weight_decay)
        self.scaler = _grad_scaler(model)
        self.n_train = len(data.train)
        self.spe = steps_per_epoch(self.n_train, s)
        self.total = total_steps(self.n_train, s)
        self.step = 0
        self.elapsed = 0.0
        self.history: dict = {"train": [], "val": []}

    # -- one optimizer step ------------------------------------------------------------
    def run_step(self) -> dict:
        """Gradient of the mean NLL over *all* target tokens of the step, then one update."""
        groups = [collate([self.data.train[i] for i in idx], self.pad_id)
                  for idx in micro_batches(self.n_train, self.step, self.s)]
        n_tokens = sum(int((g["labels"][:, 1:] != IGNORE).sum()) for g in groups)
        lr = lr_at(self.step, self.total, self.s)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.model.train()
        total = accumulate_gradients(self.model, groups, n_tokens, self.scaler)
        if self.scaler:
            self.scaler.unscale_(self.opt)
        if self.s.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.s.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "epoch": (self.step - 1) // self.spe, "lr": lr,
                "train_loss": total / max(n_tokens, 1), "tokens": n_tokens}

    def validate(self) -> dict:
        loss = mean_loss(self.model, self.data.val, self.s.batch_size, self.pad_id)
        rec = {"step": self.step, "epoch": self.step / self.spe, "val_loss": loss}
        self.history["val"].append(rec)
        return rec

    # -- checkpoints -------------------------------------------------------------------
    def state(self, meta: dict) -> dict:
        return {"format": CKPT_FORMAT, "step": self.step, "total_steps": self.total,
                "adapter": {n: p.detach().cpu().clone() for n, p in zip(self.names, self.params)},
                "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "history": self.history, "elapsed_s": self.elapsed, "meta": meta}

    def restore(self, state: dict) -> None:
        if state["total_steps"] != self.total or sorted(state["adapter"]) != sorted(self.names):
            raise UserError("the checkpoint was written by a different training setup",
                            "pass resume false to start over, or restore the original parameters")
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(state["adapter"][n].to(p.device, p.dtype))
        self.opt.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step, self.elapsed, self.history = state["step"], state["elapsed_s"], state["history"]


def _grad_scaler(model):
    """fp16 weights on CUDA need loss scaling; bf16 and fp32 do not."""
    p = next(model.parameters())
    if p.device.type == "cuda" and any(q.dtype == torch.float16 for q in model.parameters()):
        return torch.amp.GradScaler("cuda")
    return None


def train(model, data: FinetuneData, settings: TrainSettings, pad_id: int,
          store: CheckpointStore | None = None, resume_state: dict | None = None,
          callbacks: Callbacks | None = None, meta: dict | None = None) -> TrainResult:
    """Train the trainable (LoRA) parameters of ``model``; resumable from ``resume_state``.

    Order per step: update -> ``on_step`` -> validation at epoch ends (and after the last
    step) -> checkpoint every ``checkpoint_every`` steps, at epoch ends and on a graceful stop.
    A fresh run also measures the validation loss before the first step (step 0).
    """
    cb = callbacks or Callbacks()
    loop = _Loop(model, data, settings, pad_id)
    if resume_state is not None:
        loop.restore(resume_state)
    start = loop.step
    if start == 0 and data.val:
        _emit(cb.on_validation, loop.validate())
    elif cb.on_validation:
        for rec in loop.history["val"]:  # replay, so a resumed run's log is complete
            cb.on_validation(rec)
    if cb.on_step and start:
        for rec in loop.history["train"]:
            cb.on_step(rec)
    bar = tqdm(total=loop.total, initial=start, desc="finetune", disable=not settings.show_progress)
    completed = True
    while loop.step < loop.total:
        t0 = time.perf_counter()
        rec = loop.run_step()
        loop.elapsed += time.perf_counter() - t0
        loop.history["train"].append(rec)
        bar.set_postfix(loss=f"{rec['train_loss']:.3f}", lr=f"{rec['lr']:.2e}", refresh=False)
        bar.update(1)
        _emit(cb.on_step, rec)
        epoch_end = loop.step % loop.spe == 0 or loop.step == loop.total
        if epoch_end and data.val:
            _emit(cb.on_validation, loop.validate())
        stop = cb.should_stop is not None and cb.should_stop(loop.step) and loop.step < loop.total
        if store is not None and (stop or epoch_end or loop.step % settings.checkpoint_every == 0):
            store.save(loop.state(meta or {}), {**(meta or {}), "step": loop.step, "total_steps": loop.total})
        if stop:
            completed = False
            break
    bar.close()
    return TrainResult(loop.history, start, loop.step, loop.total, completed, loop.elapsed,
                       resumed=start > 0)


def _emit(fn, rec) -> None:
    if fn is not None:
        fn(rec)


# ------------------------------------------------------------------------------ figures

def training_curves_figure(history: dict, title: str):
    """Left: training loss per step and validation loss per epoch; right: learning rate."""
    from gqaprune import plots  # noqa: F401 - selects the Agg backend
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6))
    tr, va = history["train"], history["val"]
    if tr:
        ax_loss.plot([r["step"] for r in tr], [r["train_loss"] for r in tr], lw=1, label="training loss")
        ax_lr.plot([r["step"] for r in tr], [r["lr"] for r in tr], lw=1.2, color="tab:green")
    if va:
        ax_loss.plot([r["step"] for r in va], [r["val_loss"] for r in va], "o-", color="tab:red",
                     label="validation loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("mean target-token NLL (nats)")
    ax_loss.legend(fontsize=8)
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
