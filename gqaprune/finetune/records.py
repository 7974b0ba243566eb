"""Fine-tuning data: a dataset name or file -> :class:`Records` of one *form*.

Forms (the fields a record needs; ``gqaprune.templates`` turns each into prompt + response):
  * ``instruction`` (Alpaca): ``instruction``, optional ``input``, ``output``
  * ``qa`` (SQuAD): ``context``, ``question``, ``answers`` (SQuAD's dict or list) or ``answer``
  * ``text``: ``text``

The form is detected from the first record; a record that does not fit is a ``UserError`` naming
the record, the missing field and the expected form. Hub datasets come from the data registry's
record sources (``gqaprune.data.RECORD_SOURCES``), text sources from its text registry.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gqaprune import data
from gqaprune.datadir import DataCopy, DataDir
from gqaprune.errors import UserError

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
    copies: list[DataCopy] = field(default_factory=list)   # what was read (data dir copy, hub, file)


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


def records_of(raw: list, source: str, copies: list[DataCopy] = ()) -> Records:
    """Raw JSON records -> :class:`Records` of the form of the first record (``copies``: where
    they were read from, logged)."""
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
    return Records(form, out, source, skipped, list(copies))


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


def known_datasets() -> list[str]:
    """Every dataset name ``load_records`` accepts besides file paths (record + text sources)."""
    return sorted(set(data.RECORD_SOURCES) | set(data.SOURCES))


def is_known(dataset: str) -> bool:
    """A registered record or text source, or an existing local file."""
    return dataset in data.RECORD_SOURCES or dataset in data.SOURCES or Path(dataset).expanduser().is_file()


def load_records(dataset: str, data_dir: DataDir | None = None) -> Records:
    """A dataset name or local file -> :class:`Records` (training part only).

    Hub datasets (record and text sources) are read from ``data_dir``'s local copy when there is
    one (None: ``DataDir.from_env()``, i.e. ``$GQAPRUNE_DATA_DIR``), else from the hub.

    Local files lose every 10th record (``data.split_local``): that slice is what
    ``data.eval_stream`` scores, so fine-tuning on a file never trains on its evaluation text.
    Registered text sources (wikitext2, demo, ...) use their ``train`` split; record sources
    (alpaca, squad) their registered split.
    """
    if dataset in data.RECORD_SOURCES:
        src = data.RECORD_SOURCES.get(dataset)
        raw, copy = src.load(dataset, data_dir)
        return records_of(raw, src.describe(copy), [copy])
    if dataset in data.SOURCES:
        copies = data.check_source(dataset, "train", data_dir)      # fails at once offline
        texts = data.load_texts(dataset, "train", data_dir=data_dir)
        return records_of([{"text": t} for t in texts], f"{dataset} [train]", copies)
    if data.is_local(dataset):
        raw = read_local_records(dataset)
        if not raw:
            raise UserError(f"dataset '{dataset}' is empty", "pass a file with at least one record")
        kept = data.split_local(raw, "train")
        return records_of(kept, f"{dataset} [train part: all but every 10th record]",
                          data.check_source(dataset, "train", data_dir))
    raise UserError(f"unknown dataset '{dataset}'",
                    f"use one of {', '.join(known_datasets())} or a path to a .json/.jsonl/.txt file")

