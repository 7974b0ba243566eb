"""Quiet by default (tracking/quiet.py): known-harmless library messages are counted, not printed,
and summarised once; everything else passes; a real sweep's log repeats no warning line."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tracking import quiet

REPO = Path(__file__).resolve().parents[1]


def _record(msg: str, name: str = "lm_eval.evaluator") -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, None, None)


def test_known_messages_are_counted_and_summarised_once_others_pass():
    counter = quiet._Counter()
    hidden = ["Overwriting default num_fewshot of piqa from None to 0",
              "Overwriting default num_fewshot of boolq from None to 0",
              "`pretrained` model kwarg is not of type `str`. Many other model arguments may be ignored.",
              "Combined length of context (300) and target (5) exceeds the model's maximum length (256). Truncating 49 tokens from the left."]
    shown = ["CUDA out of memory", "Overwriting the model card"]
    assert [counter.filter(_record(m)) for m in hidden] == [False] * 4
    assert [counter.filter(_record(m)) for m in shown] == [True, True]
    assert counter.counts == Counter({"lm-eval: num_fewshot set explicitly": 2, "lm-eval: model passed in memory": 1,
                                      "lm-eval: context truncated to the window": 1})
    assert counter.summary() == ("note: 4 known-harmless library messages hidden (lm-eval: num_fewshot set "
                                 "explicitly x2, lm-eval: model passed in memory x1, lm-eval: context "
                                 "truncated to the window x1); --verbose true shows them")
    assert quiet._Counter().summary() is None


@pytest.mark.parametrize("flags,env,expected", [({}, "", False), ({"verbose": "true"}, "", True),
                                                 ({}, "1", True), ({"verbose": "false"}, "", False)])
def test_verbose_from_the_flag_or_the_environment(flags, env, expected, monkeypatch):
    monkeypatch.setenv(quiet.ENV_VERBOSE, env)
    assert quiet.wants_verbose(flags) is expected


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# tqdm's bar or its time / rate bracket ("[00:01<00:02, 3.1it/s]", "[00:00, ? examples/s]")
PROGRESS = re.compile(r"%\||\[\d+:\d+(:\d+)?[,<]")
# The toolkit's own per-run lines, which a sweep prints once per eval run by design.
OWN_LINES = re.compile(r"^(data: |mean accuracy|\S+ \((acc|acc_norm)\): )")


def repeated_lines(text: str) -> dict[str, int]:
    """Lines printed more than once (progress-bar redraws excluded: they repeat by design)."""
    lines = [ANSI.sub("", seg).strip() for line in text.splitlines() for seg in line.split("\r")]
    lines = [ln for ln in lines if ln and not PROGRESS.search(ln)]
    return {ln: n for ln, n in Counter(lines).items() if n > 1}


def test_repeated_lines_ignore_progress_bars_and_escapes():
    text = ("a\r b 10%|#  | 1/10\r b 20%|## | 2/10\n\x1b[Anote x\nnote x\nc\n"
            + "Generating test split: 0 examples [00:00, ? examples/s]\n" * 2)
    assert repeated_lines(text) == {"note x": 2}


@pytest.mark.slow
def test_a_sweep_with_zero_shot_evals_repeats_no_warning_line(tmp_path_factory):
    from gqaprune import demo
    model = demo.ensure_demo_model(seed=0, cache_dir=tmp_path_factory.mktemp("quiet-demo"), steps=12, progress=False)
    work = tmp_path_factory.mktemp("quiet")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != quiet.ENV_VERBOSE}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", MLFLOW_EXPERIMENT_NAME="quiet",
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "prune_entry.search", "--models", str(model), "--methods", "taylor",
           "--ratios", "0.2,0.35", "--eval", "true",
           "--prune_args", "--calibration_dataset demo --taylor_num_samples 4 --taylor_seq_len 32 --reconstruct none",
           "--eval_args", "--ppl_datasets demo --ppl_nsamples 4 --tasks demo_continuation,demo_cloze --limit 8 "
                          "--speed false"]
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    # Verbose (GQAPRUNE_VERBOSE=1) this log repeats lm-eval's "Overwriting default num_fewshot ...",
    # "`pretrained` model kwarg is not of type `str` ..." once per eval run; quiet, nothing repeats
    # but the toolkit's own result lines.
    repeated = {ln: n for ln, n in repeated_lines(out).items() if not OWN_LINES.match(ln)}
    assert repeated == {}, repeated
    notes = [ln for ln in out.splitlines() if "known-harmless library messages hidden" in ln]
    assert len(notes) == 1 and "lm-eval" in notes[0], out[-3000:]
