"""Registry of text sources and seeded token batches for calibration, evaluation and training.

A source is a function ``(split) -> list[str]``; hub sources also take ``data_dir``. Hub sources
(wikitext2, c4, ptb, squad, mixed) read the local copy in the data dir when there is one
(``gqaprune.datadir``: ``--data_dir`` / ``$GQAPRUNE_DATA_DIR``), else need ``datasets`` and a
reachable hub; ``mixed:a,b`` blends any sources or files. Any local ``.txt`` / ``.jsonl`` /
``.json`` path and the built-in ``demo`` corpus work offline.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from gqaprune.config import Section, knob
from gqaprune.datadir import DataCopy, DataDir, DatasetRef, file_sha256
from gqaprune.demo_corpus import demo_texts
from gqaprune.errors import UserError
from gqaprune.hub import hub_reachable  # noqa: F401 - re-exported for the entry points
from gqaprune.registry import Registry

# name -> (split) -> list of texts
SOURCES: Registry[Callable[[str], list[str]]] = Registry("dataset")
HUB_SOURCES: set[str] = set()
AUTO = "auto"


def register_source(name: str, hub: bool = True):
    def deco(fn):
        SOURCES.register(name, fn)
        if hub:
            HUB_SOURCES.add(name)
        return fn
    return deco


MAX_CALIBRATION_TOKENS = 1 << 26    # 67M token ids (512 MB as int64) per draw: bounded before allocation


def check_window_budget(what: str, samples: int, seq_len: int) -> None:
    """``samples`` windows of ``seq_len`` tokens must fit the bound before anything is allocated."""
    if samples * seq_len > MAX_CALIBRATION_TOKENS:
        raise UserError(f"{what}: {samples:,} windows x {seq_len:,} tokens = {samples * seq_len:,} tokens is more "
                        f"than {MAX_CALIBRATION_TOKENS:,}", f"lower the number of windows (e.g. 128-1024) or their length")


def check_context(what: str, seq_len: int, model) -> None:
    """A window longer than the model's positions would run beyond what it was trained on."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise UserError(f"{what} {seq_len} exceeds the model's {limit} positions", f"pass {what} <= {limit}")


def default_source(model_alias: str) -> str:
    """What ``auto`` means: the demo corpus for the demo model, WikiText2 otherwise."""
    return "demo" if model_alias == "demo" else "wikitext2"


@dataclass(frozen=True)
class CalibrationConfig(Section):
    """calibration data (seeded random windows of the training split)"""
    calibration_dataset: str = knob(AUTO, "auto (demo corpus for the demo model, else wikitext2), a "
                                    "registered source, or a .txt/.jsonl/.json path")
    taylor_num_samples: int = knob(128, "calibration windows for the scores", low=1)
    taylor_seq_len: int = knob(128, "tokens per calibration window (BOS first)", low=1)
    batch_size: int = knob(4, "windows per forward (and backward) pass", low=1)
    seed: int = knob(0, "seed of the window sampling (and of random scores)")

    def check(self) -> None:
        check_window_budget("taylor_num_samples x taylor_seq_len", self.taylor_num_samples, self.taylor_seq_len)
        name = self.calibration_dataset
        if name != AUTO and not is_available(name):
            raise UserError(f"unknown calibration_dataset '{name}'",
                            f"use auto, one of {', '.join(sorted(SOURCES))}, or an existing file path")

    def source(self, model_alias: str) -> str:
        return default_source(model_alias) if self.calibration_dataset == AUTO else self.calibration_dataset


WIKITEXT2 = DatasetRef("Salesforce/wikitext", "wikitext-2-raw-v1")
# The hub repo is script-based (unloadable by datasets >= 4): read its parquet export.
PTB = DatasetRef("ptb-text-only/ptb_text_only", "penn_treebank", export=True)
_C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz",
             "validation": "en/c4-validation.00000-of-00008.json.gz"}
C4 = {k: DatasetRef("allenai/c4", files=((k, f),)) for k, f in _C4_FILES.items()}
SQUAD = DatasetRef("rajpurkar/squad")
MIXED_PARTS = ("wikitext2", "c4", "squad")
MIXED_PREFIX = "mixed:"


def _split(split: str, valid: str = "validation") -> str:
    return {"train": "train", "validation": valid, "test": "test"}.get(split, split)


def _c4_key(split: str) -> str:
    return "train" if split == "train" else "validation"


def source_refs(name: str, split: str | None = None) -> list[DatasetRef]:
    """Hub datasets the registered source ``name`` reads (``split`` None: for every split).

    For fetch planning and provenance; ``mixed[:a,b]`` lists its hub parts, files list nothing.
    """
    if name == "wikitext2":
        return [WIKITEXT2]
    if name == "ptb":
        return [PTB]
    if name == "c4":
        return list(C4.values()) if split is None else [C4[_c4_key(split)]]
    if name == "squad":
        return [SQUAD]
    if name == "mixed" or name.startswith(MIXED_PREFIX):
        return [r for part in mixed_parts(name) if part in SOURCES for r in source_refs(part, split)]
    return []


def _load_hub(ref: DatasetRef, split: str, data_dir: DataDir | None):
    """One split of ``ref``: the data dir's copy if there is one, else the hub (fails at once
    offline, naming the expected local path)."""
    return (data_dir or DataDir.from_env()).load(ref, split)


@register_source("wikitext2")
def wikitext2(split: str, data_dir: DataDir | None = None) -> list[str]:
    ds = _load_hub(WIKITEXT2, _split(split), data_dir)
    # One stream joined with blank lines, as in the perplexity literature (SparseGPT/Wanda).
    return ["\n\n".join(ds["text"])]


@register_source("ptb")
def ptb(split: str, data_dir: DataDir | None = None) -> list[str]:
    ds = _load_hub(PTB, _split(split), data_dir)
    return [" ".join(ds["sentence"])]


@register_source("c4")
def c4(split: str, data_dir: DataDir | None = None) -> list[str]:
    key = _c4_key(split)
    ds = _load_hub(C4[key], key, data_dir)
    return list(ds["text"][:20000]) if key == "train" else list(ds["text"][:1100])


@register_source("squad")
def squad(split: str, data_dir: DataDir | None = None) -> list[str]:
    ds = _load_hub(SQUAD, _split(split), data_dir)
    return [f"{c}\n{q}" for c, q in zip(ds["context"], ds["question"])]


def mixed_parts(name: str) -> list[str]:
    """``mixed`` -> wikitext2, c4, squad; ``mixed:a,b`` -> [a, b] (source names or files)."""
    if name == "mixed":
        return list(MIXED_PARTS)
    parts = [p.strip() for p in name[len(MIXED_PREFIX):].split(",") if p.strip()]
    bad = [p for p in parts if p == "mixed" or p.startswith(MIXED_PREFIX)]
    if len(parts) < 2 or bad:
        raise UserError(f"'{name}' must blend at least two sources, none of them mixed",
                        "write mixed:<source or file>,<source or file>[,...], e.g. mixed:wikitext2,squad")
    return parts


def _part_texts(part: str, split: str, data_dir: DataDir | None) -> list[str]:
    if part in SOURCES:
        return load_texts(part, split, data_dir=data_dir)
    if is_local(part):   # files: calibration sees only their training paragraphs
        return split_local(read_local_texts(part), "train" if split == "train" else "validation")
    raise UserError(f"unknown part '{part}' of a mixed source",
                    f"use {', '.join(sorted(set(SOURCES) - {'mixed'}))} or a .txt/.jsonl/.json file")


@register_source("mixed")
def mixed(split: str, data_dir: DataDir | None = None, parts: list[str] | None = None) -> list[str]:
    """Equal blend (by characters, roughly) of ``parts`` (default wikitext2, c4, squad).

    Each part is a registered source (its data-dir copy when there is one) or a local file.
    """
    texts = [_part_texts(p, split, data_dir) for p in (parts or MIXED_PARTS)]
    budget = min(sum(len(t) for t in p) for p in texts)
    out = []
    for p in texts:
        used = 0
        for t in p:
            if used >= budget:
                break
            out.append(t[: budget - used])
            used += len(out[-1])
    return out


def check_source(name: str, split: str = "train", data_dir: DataDir | None = None) -> list[DataCopy]:
    """Where ``name`` will be read from, without loading it: one :class:`DataCopy` per part.

    Fails at once (UserError) for an unknown name, a missing file, or a hub dataset that has
    no local copy while the hub is not reachable (naming the expected path). Entry points call
    it before loading a model and log ``[c.to_dict() for c in copies]``.
    """
    dd = data_dir or DataDir.from_env()
    if name == "mixed" or name.startswith(MIXED_PREFIX):
        return [c for part in mixed_parts(name) for c in check_source(part, split, dd)]
    if name in SOURCES and name not in HUB_SOURCES:
        return [DataCopy(None, "builtin", name=name)]
    if name in SOURCES:
        return [_named(dd.require(ref), name) for ref in source_refs(name, split)]
    if is_local(name):
        p = Path(name).expanduser()
        if not p.is_file():
            raise UserError(f"data file '{p}' not found", "pass an existing .txt, .jsonl or .json file")
        return [DataCopy(None, "file", str(p.resolve()), sha256=file_sha256(p)[:16], name=name)]
    raise UserError(f"unknown dataset '{name}'",
                    f"use one of {', '.join(sorted(SOURCES))}, mixed:<a>,<b>, or a path to a "
                    ".txt/.jsonl/.json file")


def _named(copy: DataCopy, name: str) -> DataCopy:
    from dataclasses import replace
    return replace(copy, name=name)


def load_hub_records(repo: str, split: str = "train", config: str | None = None,
                     data_dir: DataDir | None = None) -> tuple[list[dict], DataCopy]:
    """Records of a hub dataset (e.g. alpaca for fine-tuning) and where they came from."""
    dd = data_dir or DataDir.from_env()
    ref = DatasetRef(repo, config)
    copy = dd.require(ref)
    return list(dd.load(ref, split)), _named(copy, repo)


@register_source("demo", hub=False)
def demo(split: str) -> list[str]:
    return demo_texts("train" if split == "train" else "validation")


def _as_record(rec, path: Path, lineno: int) -> dict:
    if not isinstance(rec, dict):
        raise UserError(f"record {lineno} of '{path}' is a JSON {type(rec).__name__}, not an object",
                        "give each record a 'text' field (or context+question, or Alpaca fields)")
    return rec


def _record_text(rec: dict, path: Path, lineno: int) -> str:
    if "text" in rec:
        return str(rec["text"])
    if "context" in rec and "question" in rec:
        return f"{rec['context']}\n{rec['question']}"
    if "instruction" in rec:
        return "\n".join(str(rec[k]) for k in ("instruction", "input", "output") if rec.get(k))
    raise UserError(f"record {lineno} of '{path}' has none of the fields text / context+question / "
                    "instruction", "give each JSON record a 'text' field")


def read_text_file(p: Path) -> str:
    """A text file's contents; a binary file (NUL bytes, or not UTF-8) is bad input."""
    raw = p.read_bytes()
    if b"\x00" in raw[:1 << 16]:
        raise UserError(f"data file '{p}' is binary, not text", "pass a UTF-8 .txt, .jsonl or .json file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"data file '{p}' is not UTF-8 text (byte {exc.start}: {exc.reason})",
                        "pass a UTF-8 .txt, .jsonl or .json file") from exc


def _json(text: str, p: Path, where: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UserError(f"{where} of '{p}' is not valid JSON ({str(exc).splitlines()[0][:100]})",
                        "write one JSON object per line (.jsonl) or a JSON list (.json)") from exc


def read_local_texts(path: str | Path) -> list[str]:
    """``.txt``: paragraphs split on blank lines; ``.jsonl``/``.json``: one text per record."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"data file '{p}' not found", "pass an existing .txt, .jsonl or .json file")
    text = read_text_file(p)
    if p.suffix == ".jsonl":
        lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
        texts = [_record_text(_as_record(_json(ln, p, f"line {n}"), p, n), p, n) for n, ln in lines]
    elif p.suffix == ".json":
        data = _json(text, p, "the file")
        data = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise UserError(f"'{p}' holds a JSON {type(data).__name__}, not a list of records",
                            "write a JSON list of records (or {\"data\": [...]})")
        texts = [_record_text(_as_record(r, p, i + 1), p, i + 1) for i, r in enumerate(data)]
    else:
        texts = [para.strip() for para in text.split("\n\n") if para.strip()]
    if not texts:
        raise UserError(f"data file '{p}' holds no text", "pass a non-empty file")
    return texts


def is_available(name: str) -> bool:
    """A registered source, a ``mixed:a,b`` blend of available parts, or an existing local file
    (no hub is contacted: ``check_source`` tells whether a hub source can be read)."""
    if name.startswith(MIXED_PREFIX):
        return all(is_available(p) for p in mixed_parts(name))
    return name in SOURCES or Path(name).expanduser().is_file()


def is_local(name: str) -> bool:
    if name in SOURCES or name.startswith(MIXED_PREFIX):
        return False
    return Path(name).expanduser().exists() or "/" in name or Path(name).suffix in (".txt", ".jsonl", ".json")


def load_texts(name: str, split: str = "train", data_dir: DataDir | None = None) -> list[str]:
    """Texts of a registered source (hub sources: from ``data_dir``'s copy when there is one;
    None: ``DataDir.from_env()``), of ``mixed:a,b``, or of a local file."""
    if name.startswith(MIXED_PREFIX):
        return mixed(split, data_dir, mixed_parts(name))
    if name in HUB_SOURCES:
        return SOURCES.get(name)(split, data_dir=data_dir)
    if name in SOURCES:
        return SOURCES.get(name)(split)
    if is_local(name):
        return read_local_texts(name)
    raise UserError(f"unknown dataset '{name}'",
                    f"use one of {', '.join(sorted(SOURCES))}, mixed:<a>,<b>, or a path to a "
                    ".txt/.jsonl/.json file")


def split_local(texts: list[str], split: str, every: int = 10) -> list[str]:
    """Deterministic train/held-out split of a local corpus by paragraph index.

    Every ``every``-th paragraph (index % every == every - 1) is held out; the rest is for
    calibration / training. Interleaving keeps both parts representative of the whole file
    (a corpus whose style drifts from start to end would make a tail split unrepresentative).
    """
    if len(texts) < every:
        return texts
    held = split not in ("train",)
    return [t for i, t in enumerate(texts) if (i % every == every - 1) == held]


def token_stream(tokenizer, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Concatenate texts (blank-line joined) and tokenize once -> 1-D LongTensor [T]."""
    ids: list[int] = []
    for t in texts:
        # verbose=False: a corpus stream is longer than the model's context on purpose.
        ids.extend(tokenizer(t + "\n\n", add_special_tokens=False, verbose=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def sample_windows(stream: torch.Tensor, n_samples: int, seq_len: int, seed: int,
                   bos_id: int | None = None) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens -> LongTensor [n_samples, seq_len].

    With ``bos_id`` the first position of each window is BOS (seq_len - 1 text tokens).
    """
    body = seq_len - (1 if bos_id is not None else 0)
    if stream.numel() <= body:
        raise UserError(f"calibration text has {stream.numel()} tokens, fewer than one window of "
                        f"{body}", "use more text or a shorter sequence length")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - body, (n_samples,), generator=gen)
    windows = torch.stack([stream[s: s + body] for s in starts.tolist()])
    if bos_id is not None:
        windows = torch.cat([torch.full((n_samples, 1), bos_id, dtype=torch.long), windows], 1)
    return windows


def calibration_batches(tokenizer, source: str, n_samples: int, seq_len: int, seed: int,
                        split: str = "train", data_dir: DataDir | None = None) -> torch.Tensor:
    """Seeded calibration samples -> LongTensor [n_samples, seq_len].

    Local files are split 90/10 so that calibration never sees the held-out tail used for
    evaluation.
    """
    if n_samples < 1 or seq_len < 2:
        raise UserError(f"need at least 1 sample of 2 tokens (got {n_samples} x {seq_len})",
                        "raise the number of samples / sequence length")
    texts = load_texts(source, split, data_dir=data_dir)
    if is_local(source):
        texts = split_local(texts, split)
    # Enough tokens for diverse windows without tokenizing a whole corpus.
    stream = token_stream(tokenizer, texts, max_tokens=max(n_samples * seq_len * 20, 200_000))
    return sample_windows(stream, n_samples, seq_len, seed, tokenizer.bos_token_id)


def eval_stream(tokenizer, name: str, split: str = "validation",
                max_tokens: int | None = None, data_dir: DataDir | None = None) -> torch.Tensor:
    """Held-out token stream [T] for perplexity: texts joined by single newlines.

    Local files: the held-out tail (last 10% of paragraphs, never used for calibration) for any
    split but "train"; blank lines collapse to single newlines.
    """
    texts = load_texts(name, split, data_dir=data_dir)
    if is_local(name):
        texts = split_local(texts, "train" if split == "train" else "validation")
    ids = tokenizer("\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


# ---- structured record sources (fine-tuning data) ------------------------------------------------
# Beside the text SOURCES: hub datasets whose records have a fixed *form* (instruction: Alpaca's
# instruction / input / output; qa: SQuAD's context / question / answers). ``gqaprune.finetune``
# checks and normalises the records; a source only fetches them.

@dataclass(frozen=True)
class RecordSource:
    """A hub dataset of structured records: ``load()`` -> (raw records, the DataCopy read)."""
    repo: str            # Hugging Face dataset id
    form: str            # instruction | qa
    split: str
    description: str

    @property
    def ref(self) -> DatasetRef:
        return DatasetRef(self.repo)

    def load(self, name: str, data_dir: DataDir | None = None) -> tuple[list, DataCopy]:
        """Raw records of ``split`` and where they came from: the data dir's copy when there is
        one (``None``: ``DataDir.from_env()``), else the hub. ``name`` is what the user asked for
        (it names the dataset in errors)."""
        dd = data_dir or DataDir.from_env()
        if dd.find(self.ref) is None and not hub_reachable():
            if dd.root is not None:
                raise dd.missing(self.ref)
            raise UserError(f"dataset '{name}' ({self.repo}) needs the Hugging Face hub, which is not "
                            "reachable (offline or HF_DATASETS_OFFLINE set)",
                            "pass a local .json/.jsonl file in the same form, fetch a local copy "
                            "(python -m prune_entry.fetch_data --to DIR, then --data_dir DIR), "
                            "or run where the hub is reachable")
        return load_hub_records(self.repo, self.split, data_dir=dd)

    def describe(self, copy: DataCopy) -> str:
        """What the records are, for the log: ``repo [split]`` and the local copy if one was read."""
        where = f" (local copy {copy.path}, sha256 {copy.sha256})" if copy.origin == "local" else ""
        return f"{self.repo} [{self.split}]{where}"


RECORD_SOURCES: Registry[RecordSource] = Registry("dataset")
_ALPACA = RecordSource("yahma/alpaca-cleaned", "instruction", "train",
                       "Alpaca-cleaned: 52k instruction / input / output records")
for _name in ("alpaca", "alpaca-cleaned", "yahma/alpaca-cleaned"):
    RECORD_SOURCES.register(_name, _ALPACA)
RECORD_SOURCES.register("squad", RecordSource("rajpurkar/squad", "qa", "train",
                                              "SQuAD v1.1: context / question / answers"))
