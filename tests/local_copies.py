"""Small local copies of the standard datasets, with the hub's real column layouts and features.

Each writer puts a few rows per split into a data dir the way a real copy looks: hub files as
`huggingface-cli download --repo-type dataset` leaves them (parquet / json, with or without the
README `configs:` metadata, one folder per config), `datasets`' `save_to_disk` folders, the
parquet export layout (`<config>/<split>/0000.parquet`), or single hub files (C4).

Multiple-choice rows are built so that the gold answer is the choice with the fewest words in
every row but the last, where it has the most: a near-uniform (random tiny) model scores a
choice by its summed log-likelihood, roughly -log(V) per token, so lm-eval's `acc` is exactly
(n - 1) / n when the task reads the rows and their labels as the hub defines them.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

SHORT, LONG = "w1", "w2 w3 w4 w5 w6 w7 w8 w9"     # choice texts: 1 word vs 8 words
MID = "w10 w11 w12 w13"


def _features(spec: dict):
    from datasets import ClassLabel, Features, Sequence, Value
    kinds = {"str": Value("string"), "int32": Value("int32"), "int64": Value("int64")}

    def one(v):
        if isinstance(v, dict):
            return {k: one(x) for k, x in v.items()}
        if isinstance(v, list) and v and v[0] == "classlabel":
            return ClassLabel(names=v[1:])
        if isinstance(v, list):
            return Sequence(one(v[0]))
        return kinds[v]
    return Features({k: one(v) for k, v in spec.items()})


def _dataset(rows: list[dict], spec: dict):
    from datasets import Dataset
    return Dataset.from_list(rows, features=_features(spec))


def _readme(base: Path, configs: dict[str, list[str]], ext: str = "parquet") -> None:
    """README front matter as the hub writes it: config -> split -> file glob."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {s}\n    path: {name}/{s}-*" for s in splits]
    (base / "README.md").write_text("\n".join(lines + ["---", "", "# a dataset card", ""]))


def write_parquet(base: Path, folder: str, splits: dict[str, list[dict]], spec: dict) -> None:
    for split, rows in splits.items():
        out = base / folder / f"{split}-00000-of-00001.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        _dataset(rows, spec).to_parquet(str(out))


def write_saved(folder: Path, splits: dict[str, list[dict]], spec: dict) -> None:
    from datasets import DatasetDict
    DatasetDict({s: _dataset(r, spec) for s, r in splits.items()}).save_to_disk(str(folder))


def _mc_rows(n: int, make) -> list[dict]:
    """``make(i, choices, gold)`` per row; gold is the shortest choice except in the last row."""
    rows = []
    for i in range(n):
        last = i == n - 1
        choices = [MID, LONG if not last else SHORT, SHORT if not last else LONG, MID]
        gold = 2
        rows.append(make(i, choices, gold))
    return rows


# ------------------------------------------------------------------------------ the 7 tasks

ARC_SPEC = {"id": "str", "question": "str", "choices": {"text": ["str"], "label": ["str"]},
            "answerKey": "str"}


def arc_rows(n: int, tag: str) -> list[dict]:
    return _mc_rows(n, lambda i, ch, g: {
        "id": f"{tag}-{i}", "question": f"w{20 + i} w21 w22 ?",
        "choices": {"text": ch, "label": ["A", "B", "C", "D"]}, "answerKey": "ABCD"[g]})


def write_arc(root: Path, n: dict[str, int]) -> None:
    """allenai/ai2_arc: hub files, README configs, ARC-Easy/ and ARC-Challenge/ parquet."""
    base = root / "allenai" / "ai2_arc"
    for cfg in ("ARC-Easy", "ARC-Challenge"):
        write_parquet(base, cfg, {s: arc_rows(k, f"{cfg}-{s}") for s, k in n.items()}, ARC_SPEC)
    _readme(base, {"ARC-Challenge": list(n), "ARC-Easy": list(n)})


OBQA_SPEC = {"id": "str", "question_stem": "str", "choices": {"text": ["str"], "label": ["str"]},
             "answerKey": "str"}


def write_openbookqa(root: Path, n: dict[str, int]) -> None:
    """allenai/openbookqa [main]: hub parquet files in main/, no README (config folder)."""
    def rows(k, s):
        return _mc_rows(k, lambda i, ch, g: {"id": f"{s}-{i}", "question_stem": f"w{30 + i} w31",
                                             "choices": {"text": ch, "label": list("ABCD")},
                                             "answerKey": "ABCD"[g]})
    write_parquet(root / "allenai" / "openbookqa", "main", {s: rows(k, s) for s, k in n.items()}, OBQA_SPEC)


PIQA_SPEC = {"goal": "str", "sol1": "str", "sol2": "str", "label": "int64"}


def write_piqa(root: Path, n: dict[str, int]) -> None:
    """baber/piqa: save_to_disk of the dataset (no config)."""
    def rows(k):
        out = []
        for i in range(k):
            last = i == k - 1
            sols = (LONG, SHORT) if not last else (SHORT, LONG)
            out.append({"goal": f"w{40 + i} w41", "sol1": sols[0], "sol2": sols[1], "label": 1})
        return out
    write_saved(root / "baber" / "piqa", {s: rows(k) for s, k in n.items()}, PIQA_SPEC)


HELLASWAG_SPEC = {"ind": "int32", "activity_label": "str", "ctx_a": "str", "ctx_b": "str", "ctx": "str",
                  "endings": ["str"], "source_id": "str", "split": "str", "split_type": "str",
                  "label": "str"}


def write_hellaswag(root: Path, n: dict[str, int]) -> None:
    """Rowan/hellaswag: JSON lines hub files in data/, split in the file name."""
    base = root / "Rowan" / "hellaswag" / "data"
    base.mkdir(parents=True, exist_ok=True)
    for split, k in n.items():
        rows = _mc_rows(k, lambda i, ch, g: {
            "ind": i, "activity_label": "w50", "ctx_a": f"w{51 + i} w52", "ctx_b": "w53",
            "ctx": f"w{51 + i} w52 w53", "endings": ch, "source_id": f"src-{i}", "split": split,
            "split_type": "indomain", "label": str(g)})
        (base / f"hellaswag_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


WINOGRANDE_SPEC = {"sentence": "str", "option1": "str", "option2": "str", "answer": "str"}


def write_winogrande(root: Path, n: dict[str, int]) -> None:
    """allenai/winogrande [winogrande_xl]: save_to_disk of the config."""
    def rows(k):
        return [{"sentence": f"w{60 + i} w61 _ w62 w63", "option1": "w64", "option2": "w65",
                 "answer": "1" if i % 2 else "2"} for i in range(k)]
    write_saved(root / "allenai" / "winogrande" / "winogrande_xl", {s: rows(k) for s, k in n.items()},
                WINOGRANDE_SPEC)


BOOLQ_SPEC = {"question": "str", "passage": "str", "idx": "int32", "label": ["classlabel", "False", "True"]}


def write_boolq(root: Path, n: dict[str, int]) -> None:
    """aps/super_glue [boolq]: hub parquet files in boolq/, no README."""
    def rows(k):
        return [{"question": f"w{70 + i} w71", "passage": "w72 w73 w74", "idx": i, "label": i % 2}
                for i in range(k)]
    write_parquet(root / "aps" / "super_glue", "boolq", {s: rows(k) for s, k in n.items()}, BOOLQ_SPEC)


# Rows in the split each lm-eval task scores (test if the YAML has test_split, else validation).
EVAL_ROWS = {"arc_easy": 4, "arc_challenge": 4, "openbookqa": 4, "piqa": 4, "hellaswag": 4,
             "winogrande": 3, "boolq": 3}
# Tasks whose rows decide both measures (see the module docstring): (acc, acc_norm). acc_norm
# (log-likelihood per byte) favours the 4-word distractor (-4.6 nats / 16 bytes) over the gold
# 1-word (/ 3 bytes) and 8-word (/ 24 bytes) choices: never gold; PIQA has no such distractor,
# so the 8-word choice wins, which is gold in the last row only.
LENGTH_DECIDED = {t: (lambda n: ((n - 1) / n, 0.0)) for t in ("arc_easy", "arc_challenge", "openbookqa",
                                                                "hellaswag")}
LENGTH_DECIDED["piqa"] = lambda n: ((n - 1) / n, 1 / n)


def write_standard_tasks(root: Path) -> Path:
    """The 7 standard zero-shot tasks, every split their hub datasets have."""
    write_arc(root, {"train": 2, "validation": 2, "test": 4})
    write_openbookqa(root, {"train": 2, "validation": 2, "test": 4})
    write_piqa(root, {"train": 2, "validation": 4, "test": 2})
    write_hellaswag(root, {"train": 2, "validation": 4, "test": 2})
    write_winogrande(root, {"train": 2, "validation": 3, "test": 2})
    write_boolq(root, {"train": 2, "validation": 3, "test": 2})
    return root


# ------------------------------------------------------------------------------ generative

GSM8K_SPEC = {"question": "str", "answer": "str"}


def write_gsm8k(root: Path) -> None:
    """openai/gsm8k [main]: hub parquet, README configs (main, socratic)."""
    base = root / "openai" / "gsm8k"
    rows = [{"question": f"w{80 + i} w81 ?", "answer": f"w82 w83\n#### {i + 2}"} for i in range(3)]
    write_parquet(base, "main", {"train": rows[:2], "test": rows}, GSM8K_SPEC)
    _readme(base, {"main": ["train", "test"]})


SQUAD_SPEC = {"id": "str", "title": "str", "context": "str", "question": "str",
              "answers": {"text": ["str"], "answer_start": ["int32"]}}


def squad_rows(k: int, tag: str) -> list[dict]:
    return [{"id": f"{tag}{i}", "title": "w90", "context": f"w91 w92 w{93 - i} w1 w2",
             "question": f"w{3 + i} w4 ?", "answers": {"text": [f"w{93 - i}"] if i % 2 == 0 else [],
                                                        "answer_start": [8] if i % 2 == 0 else []}}
            for i in range(k)]


def write_squad_v2(root: Path) -> None:
    """lighteval/squad_v2: save_to_disk (no config)."""
    write_saved(root / "lighteval" / "squad_v2", {"train": squad_rows(2, "t"), "validation": squad_rows(3, "v")},
                SQUAD_SPEC)


# ------------------------------------------------------------------------------ text sources

def wikitext_lines(n: int, seed: int) -> list[str]:
    """WikiText-style rows: headings, paragraphs and the empty lines between them."""
    import random
    rng = random.Random(seed)
    out = []
    for i in range(n):
        out += [f" = w{i % 90} = \n", ""] if i % 5 == 0 else []
        out += [" " + " ".join(f"w{rng.randrange(93)}" for _ in range(30)) + " \n", ""]
    return out


def write_wikitext(root: Path, rows: int = 40) -> Path:
    """Salesforce/wikitext [wikitext-2-raw-v1]: hub parquet with README configs."""
    base = root / "Salesforce" / "wikitext"
    splits = {s: [{"text": t} for t in wikitext_lines(rows, seed)] for s, seed in
              (("train", 0), ("validation", 1), ("test", 2))}
    write_parquet(base, "wikitext-2-raw-v1", splits, {"text": "str"})
    _readme(base, {"wikitext-2-raw-v1": list(splits)})
    return base


def write_ptb(root: Path) -> None:
    """ptb-text-only/ptb_text_only [penn_treebank]: the hub's parquet export layout."""
    from datasets import Dataset
    for split in ("train", "validation", "test"):
        out = root / "ptb-text-only" / "ptb_text_only" / "penn_treebank" / split / "0000.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        Dataset.from_list([{"sentence": f"w{i} w{i + 1} w{i + 2}"} for i in range(20)]).to_parquet(str(out))


def write_c4(root: Path) -> None:
    """allenai/c4: the two single json.gz files the c4 source reads, at their hub paths."""
    for name, seed in (("en/c4-train.00000-of-01024.json.gz", 0), ("en/c4-validation.00000-of-00008.json.gz", 1)):
        out = root / "allenai" / "c4" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"text": " ".join(f"w{(i * 7 + j + seed) % 93}" for j in range(25)),
                             "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{i}"})
                 for i in range(30)]
        with gzip.open(out, "wt") as f:
            f.write("\n".join(lines) + "\n")


def write_squad(root: Path) -> None:
    """rajpurkar/squad [plain_text default]: hub parquet with README configs."""
    base = root / "rajpurkar" / "squad"
    write_parquet(base, "plain_text", {"train": squad_rows(6, "t"), "validation": squad_rows(3, "v")}, SQUAD_SPEC)
    _readme(base, {"plain_text": ["train", "validation"]})


def write_alpaca(root: Path) -> None:
    """yahma/alpaca-cleaned: the one JSON file of the hub repo."""
    base = root / "yahma" / "alpaca-cleaned"
    base.mkdir(parents=True, exist_ok=True)
    rows = [{"output": f"w{i} w5", "input": "" if i % 2 else "w6", "instruction": f"w{i + 7} w8"} for i in range(10)]
    (base / "alpaca_data_cleaned.json").write_text(json.dumps(rows))
