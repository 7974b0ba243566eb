"""Offline multiple-choice tasks built from any text corpus, in lm-eval's YAML + JSONL form.

Why: the seven standard zero-shot tasks live on the Hugging Face hub. The demo model, the
TinyStories models and any machine without internet still need a zero-shot score that moves
when pruning damages the model, so we build tasks from text we have.

Two kinds, both from the corpus's held-out paragraphs (``data.split_local``: every 10th
paragraph of a local file; the demo corpus's held-out stories), never the calibration part:

* ``<corpus>_continuation`` (HellaSwag-style): a paragraph is cut at the sentence boundary
  nearest its middle (inside a single sentence: at the middle word); the model picks the true
  ending among ``n_choices`` endings, the others taken from other paragraphs and chosen with a
  similar word count (so length alone does not give the answer away). Preferred measure:
  ``acc_norm`` (log-likelihood per byte), as for HellaSwag.
* ``<corpus>_cloze`` (LAMBADA-style, multiple choice): the context ends right before a word
  that already occurred earlier in the paragraph (a name, an object); the distractors are
  words of similar length and the same capitalisation from other paragraphs that do not occur
  in the context, so only reading the context identifies the answer. Preferred measure: ``acc``.

Each task is a directory entry ``<name>.yaml`` + ``<name>.jsonl`` (test docs) +
``<name>_fewshot.jsonl`` (few-shot docs from the training paragraphs), loadable with
``lm_eval.tasks.TaskManager(include_path=dir)``. Built deterministically from (corpus, seed).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from gqaprune import data
from gqaprune.errors import UserError

KINDS = ("continuation", "cloze")
PREFERRED_MEASURE = {"continuation": "acc_norm", "cloze": "acc"}
DEMO_CORPUS = "demo"
TASKS_VERSION = 1   # bump when item construction changes (part of the cache key)

_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+")
_WORD = re.compile(r"(?<![\w'])([A-Za-z]{3,})(?![\w'])")
_STOP = frozenset("""the and was were that this with they them their there then than have has
had for but not you your are his her she him its it's our out all can one day said when what
who why how into from very would could should will just like some also each been more most
other such only over about after before again because any did does doing down each few here
off once own same too under until while which where these those""".split())


@dataclass(frozen=True)
class OfflineTask:
    """What to build: ``name`` must end in ``_continuation`` or ``_cloze``."""
    name: str
    corpus: str               # "demo" or a text/jsonl file path
    n_choices: int = 4
    max_items: int = 500
    fewshot_items: int = 50
    seed: int = 0

    @property
    def kind(self) -> str:
        return split_name(self.name)[1]


def split_name(name: str) -> tuple[str, str]:
    """``tinystories_cloze`` -> (``tinystories``, ``cloze``); UserError for other names."""
    for kind in KINDS:
        if name.endswith("_" + kind) and len(name) > len(kind) + 1:
            return name[: -len(kind) - 1], kind
    raise UserError(f"'{name}' is not an offline task name",
                    f"name offline tasks <corpus>_{'|'.join(KINDS)}")


def is_offline_name(name: str) -> bool:
    return any(name.endswith("_" + k) and len(name) > len(k) + 1 for k in KINDS)


# ------------------------------------------------------------------------------ passages

def corpus_paragraphs(corpus: str, split: str) -> list[str]:
    """Held-out (split != "train") or training paragraphs of a corpus, blank-line separated."""
    if corpus == DEMO_CORPUS:
        texts = data.load_texts(DEMO_CORPUS, "train" if split == "train" else "validation")
    else:
        texts = data.split_local(data.read_local_texts(corpus), "train" if split == "train" else "validation")
    paras = [p.strip() for t in texts for p in t.split("\n\n")]
    return [p for p in paras if len(p.split()) >= 8]


def _split_point(text: str) -> int | None:
    """Char index where the ending starts: the sentence boundary nearest the middle, else the
    whitespace nearest the middle. None when either side would be under 3 words."""
    mid = len(text) / 2
    cands = [m.end() for m in _SENT_END.finditer(text) if m.end() < len(text)]
    if not cands:
        cands = [m.end() for m in re.finditer(r"\s+", text)]
    cands = [c for c in cands if len(text[:c].split()) >= 3 and len(text[c:].split()) >= 3]
    return min(cands, key=lambda c: abs(c - mid)) if cands else None


def _clip_words(text: str, max_words: int, from_left: bool) -> str:
    words = text.split()
    if len(words) <= max_words:
        return text.strip()
    kept = words[-max_words:] if from_left else words[:max_words]
    return " ".join(kept)


def _distinct(pool: list[str], k: int, rng: random.Random) -> list[str] | None:
    """``k`` different strings from ``pool`` in random order (None if there are fewer)."""
    unique = list(dict.fromkeys(pool))
    return rng.sample(unique, k) if len(unique) >= k else None


def continuation_items(paras: list[str], n_choices: int, seed: int, max_items: int,
                       max_context_words: int = 80, max_ending_words: int = 30) -> list[dict]:
    """HellaSwag-style docs ``{query, choices, gold}`` (see the module docstring)."""
    rng = random.Random(seed)
    pairs = []
    for i, p in enumerate(paras):
        cut = _split_point(p)
        if cut is not None:
            pairs.append((i, _clip_words(p[:cut], max_context_words, True),
                          _clip_words(p[cut:], max_ending_words, False)))
    if len(pairs) < n_choices:
        return []
    lengths = [len(e.split()) for _, _, e in pairs]
    items = []
    for idx, (i, ctx, ending) in enumerate(pairs[:max_items]):
        n = len(ending.split())
        others = [k for k in range(len(pairs)) if k != idx and pairs[k][2] != ending]
        close = [k for k in others if abs(lengths[k] - n) <= max(2, 0.3 * n)]
        pool = close if len({pairs[k][2] for k in close}) >= n_choices - 1 else others
        distract = _distinct([pairs[k][2] for k in pool], n_choices - 1, rng)
        if distract is None:
            continue
        gold = rng.randrange(n_choices)
        choices = distract[:gold] + [ending] + distract[gold:]
        items.append({"query": ctx, "choices": choices, "gold": gold, "source": i})
    return items


def _cloze_target(p: str) -> tuple[int, str] | None:
    """(char offset, word) of the last word in the paragraph's second half that also occurs
    earlier and follows a space (so ``context + " " + word`` reproduces the text)."""
    words = list(_WORD.finditer(p))
    for m in reversed(words):
        w, start = m.group(1), m.start(1)
        if start < len(p) / 2:
            break
        if w.lower() in _STOP or start == 0 or p[start - 1] != " ":
            continue
        if re.search(rf"(?<![\w']){w}(?![\w'])", p[:start - 1]):
            return start, w
    return None


def cloze_items(paras: list[str], n_choices: int, seed: int, max_items: int,
                max_context_words: int = 120) -> list[dict]:
    """LAMBADA-style multiple-choice docs ``{query, choices, gold}``."""
    rng = random.Random(seed)
    vocab = sorted({m.group(1) for p in paras for m in _WORD.finditer(p)
                    if m.group(1).lower() not in _STOP})
    items = []
    for i, p in enumerate(paras):
        if len(items) >= max_items:
            break
        hit = _cloze_target(p)
        if hit is None:
            continue
        start, word = hit
        context = p[:start - 1]
        seen = {m.group(1).lower() for m in _WORD.finditer(context)}
        ok = [w for w in vocab if w.lower() not in seen and w != word and w[0].isupper() == word[0].isupper()]
        close = [w for w in ok if abs(len(w) - len(word)) <= 2]
        pool = close if len(close) >= n_choices - 1 else ok
        if len(pool) < n_choices - 1:
            continue
        distract = rng.sample(pool, n_choices - 1)
        gold = rng.randrange(n_choices)
        items.append({"query": _clip_words(context, max_context_words, True),
                      "choices": distract[:gold] + [word] + distract[gold:], "gold": gold, "source": i})
    return items


BUILDERS = {"continuation": continuation_items, "cloze": cloze_items}


# ------------------------------------------------------------------------------ writing

def _yaml(name: str, test_file: Path, fewshot_file: Path, meta: dict) -> str:
    """lm-eval task config: local JSON files, multiple choice, acc and acc_norm."""
    return "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(test_file))}",
        f"    train: {json.dumps(str(fewshot_file))}",
        "output_type: multiple_choice",
        "test_split: test",
        "training_split: train",
        "fewshot_split: train",
        'doc_to_text: "{{query}}"',
        'doc_to_target: "{{gold}}"',
        'doc_to_choice: "{{choices}}"',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        f"  version: {TASKS_VERSION}.0",
        f"  gqaprune: {json.dumps(meta)}",
        ""])


def _write_jsonl(items: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))


def write_task_files(name: str, items: list[dict], fewshot: list[dict], out_dir: str | Path,
                     meta: dict | None = None) -> Path:
    """Any ``{query, choices, gold}`` docs -> ``<name>.yaml`` + JSONL files; returns the YAML path.

    lm-eval scores ``query + " " + choice`` (its default target delimiter), so queries carry no
    trailing and choices no leading whitespace.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test_file, fewshot_file = out / f"{name}.jsonl", out / f"{name}_fewshot.jsonl"
    _write_jsonl(items, test_file)
    _write_jsonl(fewshot or items[:1], fewshot_file)
    yaml_file = out / f"{name}.yaml"
    yaml_file.write_text(_yaml(name, test_file.resolve(), fewshot_file.resolve(), meta or {}))
    return yaml_file


def build_task(task: OfflineTask, out_dir: str | Path) -> dict:
    """Write ``<name>.yaml``, ``<name>.jsonl`` and ``<name>_fewshot.jsonl`` into ``out_dir``.

    Returns {name, kind, corpus, items, fewshot_items, chance, preferred_measure, yaml}.
    """
    if task.n_choices < 2:
        raise UserError(f"offline tasks need >= 2 choices, got {task.n_choices}", "use n_choices >= 2")
    build = BUILDERS[task.kind]
    test = build(corpus_paragraphs(task.corpus, "validation"), task.n_choices, task.seed, task.max_items)
    if len(test) < 2:
        raise UserError(f"corpus '{task.corpus}' yields only {len(test)} {task.kind} items",
                        "use a larger text file (paragraphs separated by blank lines)")
    fewshot = build(corpus_paragraphs(task.corpus, "train"), task.n_choices, task.seed + 1,
                    task.fewshot_items) or test[:1]
    meta = {"version": TASKS_VERSION, "builder": "gqaprune", **asdict(task)}
    yaml_file = write_task_files(task.name, test, fewshot, out_dir, meta)
    return {"name": task.name, "kind": task.kind, "corpus": str(task.corpus), "items": len(test),
            "fewshot_items": len(fewshot), "chance": 1.0 / task.n_choices,
            "preferred_measure": PREFERRED_MEASURE[task.kind], "yaml": str(yaml_file)}


def corpus_fingerprint(corpus: str) -> str:
    """Short content hash: a cached task directory is reused only for identical text."""
    if corpus == DEMO_CORPUS:
        text = "\x00".join(data.load_texts(DEMO_CORPUS, "train") + data.load_texts(DEMO_CORPUS, "validation"))
        raw = text.encode()
    else:
        p = Path(corpus).expanduser()
        if not p.is_file():
            raise UserError(f"task corpus '{corpus}' not found", "pass an existing .txt/.jsonl file")
        raw = p.read_bytes()
    return hashlib.sha256(raw).hexdigest()[:16]


def build_tasks(tasks: list[OfflineTask], root: str | Path) -> tuple[Path, list[dict]]:
    """Build every task into one directory under ``root`` keyed by content; return (dir, infos).

    The key covers the task settings and corpus hashes, so an existing directory holds exactly
    these tasks and is reused (lm-eval's dataset cache then hits too).
    """
    key_src = json.dumps([[asdict(t), corpus_fingerprint(t.corpus)] for t in tasks] + [TASKS_VERSION],
                         sort_keys=True)
    out = Path(root) / hashlib.sha256(key_src.encode()).hexdigest()[:16]
    manifest = out / "manifest.json"
    if manifest.is_file():
        return out, json.loads(manifest.read_text())
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=root))  # renamed into place when complete
    infos = [build_task(t, tmp) for t in tasks]
    # Paths inside the YAMLs must point at the final directory.
    for info in infos:
        y = Path(info["yaml"])
        y.write_text(y.read_text().replace(str(tmp.resolve()), str(out.resolve())))
        info["yaml"] = str(out / y.name)
    (tmp / "manifest.json").write_text(json.dumps(infos, indent=2))
    if out.exists():   # a concurrent build won the race; its content is identical
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(out)
    return out, infos
