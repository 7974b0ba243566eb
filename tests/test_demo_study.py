"""The demo study (gqaprune.demo_study) orders the methods as real models do, deterministically.

The full demo model takes about 1.5 minutes to train, too long for a unit test; these tests train
the same recipe for STEPS steps (held-out perplexity about 45 instead of 2: a partly trained model,
which already separates the methods). The full model's study is in ``benchmarks/bench_demo.py`` and
the README.
"""
import pytest

from gqaprune import demo
from gqaprune.demo_study import StudySettings, run_study
from tests.figure_layout import layout_problems

STEPS = 60
SETTINGS = StudySettings(methods=("taylor", "random"), ratio=0.35, seeds=(0, 1), reconstruct=("none",),
                         calibration_samples=8, ppl_nsamples=48)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return demo.ensure_demo_model(seed=0, cache_dir=tmp_path_factory.mktemp("demo-cache"), steps=STEPS,
                                  progress=False, notify=None)


@pytest.fixture(scope="module")
def study(model_dir):
    return run_study(model_dir, SETTINGS)


def test_taylor_beats_random_at_35_percent_on_every_seed(study):
    taylor, rand = study.ppls("taylor", "none"), study.ppls("random", "none")
    assert len(taylor) == len(rand) == 2
    assert study.dense_ppl < min(taylor)                     # pruning 35% costs something
    assert max(taylor) < min(rand), study.table()
    assert study.ranking("none") == ["taylor", "random"]
    assert all(0.33 < r.achieved_ratio < 0.37 for r in study.rows)


def test_the_study_is_deterministic(study, model_dir):
    """Same model, same settings: the same plans (kept units), bit-identical perplexities, same order;
    another seed gives other units for random."""
    again = run_study(model_dir, SETTINGS)
    assert again.rows == study.rows and again.dense_ppl == study.dense_ppl
    assert again.table() == study.table()
    by_seed = {r.seed: r.plan_sha256 for r in study.rows if r.method == "random"}
    assert by_seed[0] != by_seed[1]


def test_study_table_and_figure(study):
    table = study.table().splitlines()
    assert table[0] == "| method | reconstruct | achieved ratio | ppl seed 0 | ppl seed 1 |"
    assert [line.split(" | ")[0] for line in table[2:]] == ["| dense", "| taylor", "| random"]
    fig = study.figure("demo model · taylor vs random at 35% · held-out perplexity")
    assert layout_problems(fig) == []
    assert "windows" in study.protocol and "35%" in study.protocol


def test_layout_check_catches_what_it_should():
    """The checker itself: a title cut at the edges, a legend over the data, repeated labels."""
    from gqaprune.plots import legend_outside, plt

    fig, ax = plt.subplots(figsize=(2.5, 2))
    ax.plot([0, 1], [0, 1], label="taylor")
    ax.plot([0, 1], [1, 0], label="taylor")
    ax.legend(loc="center")
    ax.set_title("a title far too long for a figure of this small size, cut at both edges")
    problems = layout_problems(fig)
    assert any("exceeds the canvas" in p for p in problems)
    assert any("overlaps the data area" in p for p in problems)
    assert any("repeated legend labels" in p for p in problems)
    fig, ax = plt.subplots(figsize=(4, 2.5))
    ax.plot([0, 1], [0, 1], label="taylor")
    ax.plot([0, 1], [1, 0], label="random")
    ax.set_title("fits")
    legend_outside(ax)
    fig.tight_layout()
    assert layout_problems(fig) == []
