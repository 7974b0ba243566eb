"""MLproject is pinned against the command lines (which are generated from the config trees):
every entry point lists exactly its tool's parameters, with the same defaults, and passes each one."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from analysis import compare as analysis_compare
from analysis import consolidate, cross_model
from gqaprune.config import leaves
from gqaprune.evaluation.config import EvalConfig
from gqaprune.pipeline import PruneConfig
from prune_entry import compare, evaluate, finetune, search
from tracking import cli

REPO = Path(__file__).resolve().parents[1]
ENTRY = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]

PARSERS = {
    "prune": lambda: cli.parser_for("prune", PruneConfig),
    "eval": lambda: cli.parser_for("eval", EvalConfig),
    "finetune": finetune.build_parser,
    "search": search.build_parser,
    "cross_model": cross_model.build_parser,
    "consolidate": consolidate.build_parser,
    "compare": analysis_compare.build_parser,
}


def actions(parser):
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def test_every_tool_has_an_entry_point_and_back():
    assert set(ENTRY) == set(PARSERS) | {"main"}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_parameters_and_defaults_match_the_command_line(name):
    entry, acts = ENTRY[name], actions(PARSERS[name]())
    assert set(entry["parameters"]) == set(acts), name
    for param, spec in entry["parameters"].items():
        act = acts[param]
        if "default" not in spec:          # required in MLproject (e.g. compare's pruned)
            assert act.required or act.default is None
            continue
        given = spec["default"]
        text = {True: "true", False: "false"}.get(given, given) if isinstance(given, bool) else str(given)
        value = act.type(text) if act.type else text
        assert value == act.default, (name, param, value, act.default)
        assert f"{{{param}}}" in entry["command"], (name, param)


def test_main_is_a_subset_of_prune():
    acts = actions(PARSERS["prune"]())
    assert set(ENTRY["main"]["parameters"]) <= set(acts)


def test_prune_flags_are_the_config_leaves():
    assert set(actions(PARSERS["prune"]())) == {leaf.name for leaf in leaves(PruneConfig)}


def test_compare_entry_point_evaluates_on_demand():
    assert "prune_entry.compare" in ENTRY["compare"]["command"]
    assert compare.parse(["--pruned", "a,b", "--tasks", "none"])[0].pruned == ["a", "b"]
    assert evaluate.parse(["--tasks", "none"]).zeroshot.tasks == "none"
