"""Local copies of hub datasets, for GPU nodes without internet.

A *data dir* is a folder of dataset copies laid out by hub id, as written on a machine with
internet by ``python -m prune_entry.fetch_data --to DIR`` (or by hand)::

    DIR/allenai/ai2_arc/ARC-Easy/      save_to_disk of one config: dataset_dict.json, <split>/*.arrow
    DIR/Rowan/hellaswag/               save_to_disk of a dataset without config
    DIR/Salesforce/wikitext/           huggingface-cli download --repo-type dataset --local-dir ...:
        README.md                      the hub's `configs:` metadata maps config -> files, or
        wikitext-2-raw-v1/test-00000-of-00001.parquet   (one folder per config, split in the name)
    DIR/allenai/c4/en/c4-validation.00000-of-00008.json.gz   single hub files, at their hub path

:class:`DataDir` finds the copy of a :class:`DatasetRef` (hub id + config, or listed files) and
returns a :class:`DataCopy`: which files hold which split, the ``datasets`` builder that reads
them (parquet / arrow / json / csv / text, so loading never contacts the hub), and a content
hash for provenance. No copy: the hub (``origin="hub"``), or, when the hub is not reachable, a
:class:`~gqaprune.errors.UserError` naming the expected path.

``DataDir.from_env(path)``: ``path``, else ``$GQAPRUNE_DATA_DIR``, else no data dir (hub only).
``cache_dir`` is a Hugging Face datasets cache passed to every ``load_dataset`` call (None: the
``datasets`` default, which honours ``HF_DATASETS_CACHE``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from gqaprune.config import Section, knob
from gqaprune.errors import UserError
from gqaprune.hub import hub_reachable

DATA_DIR_ENV = "GQAPRUNE_DATA_DIR"
FETCH_HINT = "python -m prune_entry.fetch_data --to DIR"
# File suffix -> the `datasets` packaged builder that reads it (compression suffixes stripped).
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json",
            ".csv": "csv", ".txt": "text"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
EXPORT_SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class DatasetRef:
    """A hub dataset as a loader names it.

    ``files``: ((split, path inside the repo), ...) when only these files are read (C4).
    ``export``: the data is read from the hub's parquet export (``refs/convert/parquet``,
    ``<config>/<split>/*.parquet``): script-based repos that ``datasets`` >= 4 cannot load.
    """
    repo: str
    config: str | None = None
    files: tuple[tuple[str, str], ...] = ()
    export: bool = False

    def label(self) -> str:
        return self.repo + (f" [{self.config}]" if self.config else "")

    def candidates(self, root: Path) -> list[Path]:
        """Folders a copy may sit in, most specific first."""
        base = root / self.repo
        return ([base / self.config] if self.config else []) + [base]


@dataclass(frozen=True)
class DataCopy:
    """Where a dataset is read from: a local copy, the hub, a user file or the built-in corpus."""
    ref: DatasetRef | None
    origin: str                      # "local" | "hub" | "file" | "builtin"
    path: str | None = None          # folder of a local copy / a user file
    layout: str | None = None        # "save_to_disk" | "hub files" (local copies)
    builder: str | None = None       # datasets builder reading the files
    data_files: tuple[tuple[str, tuple[str, ...]], ...] = ()   # (split, absolute files)
    sha256: str | None = None        # content hash (16 hex) of the files read
    name: str | None = None          # source or task name this copy serves

    @property
    def splits(self) -> list[str]:
        return [s for s, _ in self.data_files]

    def files(self, split: str | None = None) -> list[str]:
        return [f for s, fs in self.data_files if split in (None, s) for f in fs]

    def load_kwargs(self, split: str | None = None, cache_dir: Path | str | None = None) -> dict:
        """Keyword arguments of ``datasets.load_dataset`` for all splits (or one)."""
        extra = {"cache_dir": str(cache_dir)} if cache_dir else {}
        if self.origin == "local":
            if split is not None and split not in self.splits:
                raise UserError(f"the local copy {self.path} of {self.ref.label()} has no split "
                                f"'{split}' (it has {', '.join(self.splits) or 'none'})",
                                "fetch the dataset again (all splits) or use a split it has")
            files = {s: list(fs) for s, fs in self.data_files if split in (None, s)}
            return {"path": self.builder, "data_files": files, **extra}
        if self.origin != "hub":
            raise ValueError(f"{self.origin} copies are not read with datasets.load_dataset")
        ref = self.ref
        if ref.export:   # hf:// paths into the parquet export branch ("~parquet")
            splits = [split] if split else list(EXPORT_SPLITS)
            files = {s: f"hf://datasets/{ref.repo}@~parquet/{ref.config or 'default'}/{s}/*.parquet"
                     for s in splits}
            return {"path": "parquet", "data_files": files, **extra}
        kw = {"path": ref.repo, **({"name": ref.config} if ref.config else {})}
        if ref.files:
            kw["data_files"] = {s: [p] for s, p in ref.files if split in (None, s)}
        return {**kw, **extra}

    def describe(self) -> str:
        if self.origin == "local":
            return f"{self.ref.label()}: local copy {self.path} ({self.layout}, sha256 {self.sha256})"
        if self.origin == "hub":
            return f"{self.ref.label()}: Hugging Face hub (or its cache)"
        if self.origin == "file":
            return f"file {self.path} (sha256 {self.sha256})"
        return f"built-in {self.name}"

    def to_dict(self) -> dict:
        return {"name": self.name, "dataset": self.ref.label() if self.ref else None,
                "origin": self.origin, "path": self.path, "layout": self.layout,
                "builder": self.builder, "sha256": self.sha256, "splits": self.splits,
                "describe": self.describe()}


@dataclass(frozen=True)
class DataDir:
    """Settings for where datasets come from: a folder of local copies and an HF cache dir."""
    root: Path | None = None
    cache_dir: Path | None = None

    def __post_init__(self):   # accept str paths
        for name in ("root", "cache_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))

    @classmethod
    def from_env(cls, path: str | Path | None = None,
                 cache_dir: str | Path | None = None) -> "DataDir":
        """``path``, else ``$GQAPRUNE_DATA_DIR``, else none; a given folder must exist."""
        env = os.environ.get(DATA_DIR_ENV, "").strip()
        raw = str(path) if path not in (None, "") else env
        root = Path(raw).expanduser().resolve() if raw else None
        if root is not None and not root.is_dir():
            where = "--data_dir" if path not in (None, "") else f"${DATA_DIR_ENV}"
            raise UserError(f"data dir '{root}' ({where}) is not a folder",
                            f"pass the folder written by `{FETCH_HINT}`")
        cache = Path(cache_dir).expanduser().resolve() if cache_dir not in (None, "") else None
        return cls(root, cache)

    def describe(self) -> str:
        parts = [f"data dir {self.root}" if self.root else "no data dir (hub / HF cache)"]
        if self.cache_dir:
            parts.append(f"HF cache {self.cache_dir}")
        return ", ".join(parts)

    def expected(self, ref: DatasetRef) -> Path:
        """The path a copy of ``ref`` is expected at (for messages)."""
        if self.root is None:
            raise ValueError("no data dir")
        if ref.files:
            return self.root / ref.repo / ref.files[0][1]
        return ref.candidates(self.root)[0]

    def find(self, ref: DatasetRef) -> DataCopy | None:
        """The local copy of ``ref``, or None (also without a data dir)."""
        if self.root is None:
            return None
        for folder, layout, files in _layouts(self.root, ref):
            builder = _builder(files, folder)
            frozen = tuple((s, tuple(str(f) for f in fs)) for s, fs in files.items())
            every = [Path(f) for _, fs in frozen for f in fs]
            return DataCopy(ref, "local", str(folder), layout, builder, frozen,
                            content_hash(every, self.root))
        return None

    def locate(self, ref: DatasetRef) -> DataCopy:
        """The local copy, else the hub (whether or not it is reachable: the HF cache may serve)."""
        return self.find(ref) or DataCopy(ref, "hub")

    def require(self, ref: DatasetRef) -> DataCopy:
        """Like :meth:`locate`, but a missing copy on an offline machine fails at once."""
        copy = self.locate(ref)
        if copy.origin == "hub" and not hub_reachable():
            raise self.missing(ref)
        return copy

    def missing(self, ref: DatasetRef, detail: str = "") -> UserError:
        """The error for a dataset that has no local copy and cannot come from the hub."""
        why = f" ({detail})" if detail else ""
        if self.root is None:
            return UserError(f"dataset {ref.label()} cannot be reached (offline: the Hugging Face hub is "
                             f"not reachable or HF_DATASETS_OFFLINE is set){why}",
                             f"fetch local copies where there is internet (`{FETCH_HINT}`) and pass "
                             f"--data_dir DIR or set {DATA_DIR_ENV}")
        return UserError(f"no local copy of {ref.label()} at {self.expected(ref)} and the Hugging Face "
                         f"hub is not reachable{why}",
                         f"fetch it where there is internet (`{FETCH_HINT}`) and copy the folder there")

    def load(self, ref: DatasetRef, split: str):
        """One split as a ``datasets.Dataset``, from the local copy or the hub."""
        copy = self.require(ref)
        from datasets import load_dataset
        try:
            return load_dataset(**copy.load_kwargs(split, self.cache_dir), split=split)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            where = copy.path if copy.origin == "local" else "the hub"
            raise UserError(f"dataset {ref.label()} [{split}] could not be loaded from {where}: {first}",
                            "check the copy (fetch it again) or the split name") from exc


# ------------------------------------------------------------------------------ layouts

def _layouts(root: Path, ref: DatasetRef):
    """Yield (folder, layout, {split: [files]}) for each way ``ref`` may be stored under ``root``."""
    base = root / ref.repo
    if ref.files:   # single files at their hub paths
        paths = {s: [base / p] for s, p in ref.files}
        if all(p.is_file() for ps in paths.values() for p in ps):
            yield base, "hub files", paths
        return
    for folder in ref.candidates(root):
        if (folder / "dataset_dict.json").is_file():
            yield folder, "save_to_disk", _save_to_disk_files(folder)
            return
    if not base.is_dir():
        return
    configs = _readme_configs(base)
    entry = _pick_config(configs, ref.config)
    if entry is not None:
        files = _config_files(base, entry)
        if files:
            yield base, "hub files", files
            return
    folder = base / ref.config if ref.config else base   # one folder per config, or the repo
    if folder.is_dir():
        files = _inferred_files(folder)
        if files:
            yield folder, "hub files", files


def _save_to_disk_files(folder: Path) -> dict[str, list[Path]]:
    """``DatasetDict.save_to_disk`` folder -> {split: arrow files in shard order}."""
    splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
    out = {}
    for split in splits:
        state = folder / split / "state.json"
        if state.is_file():
            names = [f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
        else:
            names = sorted(p.name for p in (folder / split).glob("*.arrow"))
        out[split] = [folder / split / n for n in names]
    return {s: fs for s, fs in out.items() if fs}


def _front_matter(readme: Path) -> dict:
    import yaml
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        meta = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _readme_configs(base: Path) -> list[dict]:
    """The hub's ``configs:`` metadata of a downloaded repo (README.md front matter)."""
    readme = base / "README.md"
    configs = _front_matter(readme).get("configs") if readme.is_file() else None
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else []


def _pick_config(configs: list[dict], name: str | None) -> dict | None:
    if name is not None:
        return next((c for c in configs if c.get("config_name") == name), None)
    default = [c for c in configs if c.get("default")] or \
              [c for c in configs if c.get("config_name") == "default"]
    return (default or (configs if len(configs) == 1 else [None]))[0]


def _config_files(base: Path, entry: dict) -> dict[str, list[Path]]:
    """``data_files`` of one README config (str, list, or [{split, path}]) -> {split: files}."""
    spec = entry.get("data_files")
    if spec is None and entry.get("data_dir"):
        return _inferred_files(base / entry["data_dir"])
    if isinstance(spec, (str, list)) and not (isinstance(spec, list) and spec and isinstance(spec[0], dict)):
        spec = [{"split": "train", "path": spec}]
    out: dict[str, list[Path]] = {}
    for item in spec or []:
        patterns = item["path"] if isinstance(item["path"], list) else [item["path"]]
        files = sorted({p for pat in patterns for p in base.glob(pat) if p.is_file()})
        if not files:
            return {}       # a config whose files were not downloaded
        out.setdefault(str(item.get("split", "train")), []).extend(files)
    return out


def _is_data_file(p: Path) -> bool:
    if not p.is_file() or any(part.startswith(".") for part in p.parts[-3:]):
        return False
    suffixes = [s for s in p.suffixes if s not in COMPRESSION]
    return bool(suffixes) and suffixes[-1] in BUILDERS and p.name != "README.md"


def _inferred_files(folder: Path) -> dict[str, list[Path]]:
    """Split -> files by ``datasets``' own naming rules (``train-0000.parquet``, ``test/``, ...)."""
    from datasets.data_files import DataFilesDict, get_data_patterns
    try:
        patterns = get_data_patterns(str(folder))
        resolved = DataFilesDict.from_patterns(patterns, base_path=str(folder))
    except Exception:  # noqa: BLE001 - EmptyDatasetError / FileNotFoundError: nothing here
        return {}
    out = {str(split): sorted(Path(f) for f in files if _is_data_file(Path(f)))
           for split, files in resolved.items()}
    return {s: fs for s, fs in out.items() if fs}


def _builder(files: dict[str, list[Path]], folder: Path) -> str:
    kinds = set()
    for p in (p for fs in files.values() for p in fs):
        suffixes = [s for s in p.suffixes if s not in COMPRESSION]
        kinds.add(BUILDERS.get(suffixes[-1] if suffixes else "", "?"))
    if len(kinds) != 1 or "?" in kinds:
        raise UserError(f"the local copy {folder} mixes data file kinds ({', '.join(sorted(kinds))})",
                        "keep one format per dataset copy (parquet, arrow, json or csv)")
    return kinds.pop()


# ------------------------------------------------------------------------------ provenance

@lru_cache(maxsize=4096)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of one file; keyed by size and mtime so a rewritten file is hashed again."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    st = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def content_hash(files: list[Path], base: Path) -> str:
    """Short hash (16 hex) over (path relative to ``base``, file sha256) of every file, sorted:
    the same copy moved to another folder keeps its hash; any changed byte changes it."""
    h = hashlib.sha256()
    for p in sorted(files, key=lambda q: str(q)):
        try:
            rel = Path(p).resolve().relative_to(Path(base).resolve())
        except ValueError:
            rel = Path(p).name
        h.update(f"{rel.as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class DataDirConfig(Section):
    """local dataset copies (offline GPU nodes; see prune_entry.fetch_data)"""
    data_dir: str | None = knob(None, f"folder of local dataset copies laid out by hub id (default: ${DATA_DIR_ENV})")
    cache_dir: str | None = knob(None, "Hugging Face datasets cache directory for every load")

    def resolve(self) -> DataDir:
        return DataDir.from_env(self.data_dir, self.cache_dir)
