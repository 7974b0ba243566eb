"""The naming authority is closed: entry points and analysis spell no MLflow name themselves.

Every string literal in ``prune_entry/`` and ``analysis/`` (docstrings aside) that equals a name
defined in ``tracking/schema.py`` fails this test: import the constant instead, so a renamed metric,
param, tag or artifact cannot silently break a writer or a table. One-word names (``model``,
``method``, ``eval``, ...) double as ordinary words and flag values and are not checked; names with
``_`` or ``/`` are.
"""
from __future__ import annotations

import ast
from pathlib import Path

from tracking import schema

REPO = Path(__file__).resolve().parents[1]
KINDS = ("M", "P", "TAG", "A", "STAGE", "LABEL", "RUN")
# Files still being moved onto the schema (none left).
PENDING: set[str] = set()


def schema_names() -> dict[str, str]:
    out = {}
    for key, value in vars(schema).items():
        if key.isupper() and key.split("_")[0] in KINDS and isinstance(value, str) and "{" not in value:
            if "_" in value or "/" in value:
                out.setdefault(value, key)
    return out


def literals(path: Path):
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            docs.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def test_no_literal_spells_a_schema_name():
    names = schema_names()
    assert {"achieved_ratio", "pruning_ratio", "search_point", "source_run_id"} <= set(names)
    hits = []
    for folder in ("prune_entry", "analysis"):
        for path in sorted((REPO / folder).glob("*.py")):
            rel = str(path.relative_to(REPO))
            if rel in PENDING:
                continue
            hits += [f"{rel}:{line}: {value!r} is schema.{names[value]}" for line, value in literals(path)
                     if value in names]
    assert not hits, "\n".join(hits)


def family_prefixes() -> set[str]:
    """``ppl/``, ``zeroshot/``, ``model/``, ... (the families of schema metric names and templates)
    and MLflow's column prefixes ``params.`` / ``metrics.`` / ``tags.``: a literal spelling one of
    them builds or parses a name by hand."""
    out = {schema.PARAMS_PREFIX, schema.METRICS_PREFIX, schema.TAGS_PREFIX}
    for key, value in vars(schema).items():
        if key.isupper() and key.split("_")[0] in KINDS and isinstance(value, str) and "/" in value:
            out.add(value.split("/")[0] + "/")
    return out


def test_no_literal_builds_or_parses_a_name_by_hand():
    prefixes = family_prefixes()
    assert {"ppl/", "zeroshot/", "params.", "tags."} <= prefixes
    hits = []
    for folder in ("prune_entry", "analysis"):
        for path in sorted((REPO / folder).glob("*.py")):
            rel = str(path.relative_to(REPO))
            if rel in PENDING:
                continue
            for line, value in literals(path):
                hits += [f"{rel}:{line}: {value!r} spells the name family {p!r}" for p in prefixes
                         if value == p or (value.startswith(p) and "{" in value)]
    assert not hits, "\n".join(hits)


def test_schema_builds_and_parses_names():
    assert schema.parse(schema.ppl_metric("wikitext2")) == schema.Name("ppl", "wikitext2")
    assert schema.ppl_dataset(schema.ppl_metric("wiki")) == "wiki" and schema.ppl_dataset(schema.M_ZS_MEAN) is None
    assert schema.layer_of(schema.layer_metric(schema.M_LAYER_KEPT, 7)) == 7
    assert schema.layer_of(schema.recon_metric(3, "o_proj", "after")) == 3
    assert schema.layer_of(schema.M_ACHIEVED_RATIO) is None
    assert schema.split_column(schema.param_column(schema.P_PRUNING_RATIO)) == ("params", schema.P_PRUNING_RATIO)
    assert schema.is_protocol_param(schema.P_PPL_PROTOCOL.format(dataset="ptb"))
    assert schema.rate_metric(schema.M_LAYER_TARGET_RATE, 2, "attn") == schema.M_LAYER_BLOCK_TARGET_RATE.format(
        layer=2, block="attn")


def test_one_convention_for_families():
    """Families put the measure first: <measure>/<item> (MLflow folds a group per measure)."""
    for name in (schema.layer_metric(schema.M_LAYER_KEPT, 1), schema.recon_metric(1, "o_proj", "before"),
                 schema.rate_metric(schema.M_LAYER_IMPORTANCE, 1, "mlp"), schema.ppl_metric("x"),
                 schema.M_SEARCH_TIME, schema.M_SEARCH_POINTS):
        group, key = name.split("/", 1)
        assert group and key and "/" not in key, name
