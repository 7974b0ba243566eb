"""`demo` entry point (what ``scripts/demo.sh`` runs): prune the built-in demo model and show quality.

    python -m prune_entry.demo [--method taylor] [--pruning_ratio 0.2] [--limit 100] [--verbose true]
                               [any prune flag, e.g. --reconstruct none]

1. the demo model: trained once and cached (``gqaprune.demo.ensure_demo_model`` says so first);
2. a prune run (``prune_entry.prune`` with the defaults of the demo model);
3. two eval runs with the eval defaults (held-out demo perplexity, the offline demo tasks on the
   first ``--limit`` items each; no speed measurement): the pruned model (linked to its prune run)
   and the dense demo model;
4. dense vs pruned side by side, and the command that opens the MLflow UI at the runs table.

Every step is an ordinary run of the ordinary entry points, so the rows the demo leaves in the
store are the rows a study leaves.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import mlflow
import torch

from gqaprune import demo
from gqaprune.loading import DEMO_ALIAS
from prune_entry import evaluate, prune
from tracking import quiet, runs, schema

TASKS = (("demo_continuation", "acc_norm"), ("demo_cloze", "acc"))   # the eval's demo defaults


@dataclass(frozen=True)
class DemoSettings:
    method: str = "taylor"
    pruning_ratio: float = 0.2
    limit: int | None = 100        # items per task (lm-eval's --limit): a first look, not a study
    ppl_nsamples: int | None = None  # perplexity windows (None: all held-out windows)
    verbose: bool = False
    prune_args: tuple[str, ...] = ()  # further flags of the prune entry point


@dataclass(frozen=True)
class ModelRow:
    """One model of the summary, read back from its eval run."""
    label: str
    run_id: str
    params: float | None
    ppl: float | None
    scores: tuple[tuple[str, str, float | None, float | None], ...]   # task, measure, value, stderr


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "all") else int(text)


def parse(argv: list[str] | None) -> DemoSettings:
    p = argparse.ArgumentParser(prog="demo", description=__doc__.splitlines()[0],
                                epilog="Other flags go to the prune entry point (python -m prune_entry.prune --help).")
    p.add_argument("--method", default=DemoSettings.method, help="pruning method (default taylor)")
    p.add_argument("--pruning_ratio", type=float, default=DemoSettings.pruning_ratio,
                   help="fraction of the prunable parameters to remove (default 0.2)")
    p.add_argument("--limit", type=_optional_int, default=DemoSettings.limit,
                   help="items per demo task (default 100 of 300; none: all)")
    p.add_argument("--ppl_nsamples", type=_optional_int, default=None,
                   help="perplexity windows (default: all held-out windows)")
    p.add_argument("--verbose", default="false", choices=("true", "false"),
                   help="show the known-harmless library messages too")
    a, rest = p.parse_known_args(argv)
    return DemoSettings(a.method, a.pruning_ratio, a.limit, a.ppl_nsamples, a.verbose == "true", tuple(rest))


def eval_flags(s: DemoSettings) -> list[str]:
    flags = ["--speed", "false"]      # tokens/s of a 200k-parameter model on a shared CPU say nothing
    if s.limit is not None:
        flags += ["--limit", str(s.limit)]
    if s.ppl_nsamples is not None:
        flags += ["--ppl_nsamples", str(s.ppl_nsamples)]
    return flags + (["--verbose", "true"] if s.verbose else [])


def _step(rc: int, what: str) -> str:
    """The run id of the step that just ended; stop the demo when it failed."""
    last = mlflow.last_active_run()
    if rc != 0 or last is None:
        raise SystemExit(rc or 1)
    print(f"demo: {what} done (run {last.info.run_id})", flush=True)
    return last.info.run_id


def _row(label: str, run_id: str) -> ModelRow:
    m = mlflow.tracking.MlflowClient().get_run(run_id).data.metrics
    scores = tuple((task, measure, m.get(schema.task_metric(task, measure)),
                    m.get(schema.task_metric(task, f"{measure}_stderr"))) for task, measure in TASKS)
    return ModelRow(label, run_id, m.get(schema.M_MODEL_PARAMS), m.get(schema.ppl_metric("demo")), scores)


def _cell(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None and math.isfinite(stderr) else "")


def summary(rows: list[ModelRow]) -> str:
    """Dense vs pruned: parameters, held-out perplexity, task accuracy ± standard error."""
    head = ["model", "parameters", "ppl demo (held-out)"] + [f"{t} ({m})" for t, m, *_ in rows[0].scores]
    lines = [" | ".join(head)]
    for r in rows:
        cells = [r.label, f"{r.params:,.0f}" if r.params else "n/a", f"{r.ppl:.2f}" if r.ppl else "n/a"]
        lines.append(" | ".join(cells + [_cell(v, s) for _, _, v, s in r.scores]))
    return "\n".join(lines)


def protocol(s: DemoSettings) -> str:
    windows = "all" if s.ppl_nsamples is None else f"the first {s.ppl_nsamples}"
    items = "all 300" if s.limit is None else f"the first {s.limit}"
    return (f"perplexity: the held-out demo stories (every 10th, never used for training or "
            f"calibration), {windows} non-overlapping 128-token windows; tasks: 0-shot, 4 choices "
            f"(chance 0.25), {items} items each, built from the same held-out stories; ± is lm-eval's "
            f"standard error")


def main(argv: list[str] | None = None) -> int:
    s = parse(argv)
    # One intra-op thread, as the demo model trains: on a model this small a second thread only adds
    # synchronisation (several times slower on a busy machine; measured in gqaprune.demo).
    previous = torch.get_num_threads()
    torch.set_num_threads(demo.train_threads())
    try:
        return _demo(s)
    finally:
        torch.set_num_threads(previous)


def _demo(s: DemoSettings) -> int:
    quiet.install(s.verbose)
    print(f"demo: prune {s.pruning_ratio:.0%} of the built-in demo model with {s.method}, then evaluate "
          f"the pruned and the dense model (held-out perplexity + 2 offline tasks)", flush=True)
    demo.ensure_demo_model()
    verbose = ["--verbose", "true"] if s.verbose else []
    prune_id = _step(prune.main(["--model", DEMO_ALIAS, "--method", s.method, "--pruning_ratio",
                                 str(s.pruning_ratio), *s.prune_args] + verbose), "prune")
    pruned_eval = _step(evaluate.main(["--model_uri", prune_id] + eval_flags(s)), "eval of the pruned model")
    dense_eval = _step(evaluate.main(["--model_uri", DEMO_ALIAS] + eval_flags(s)), "eval of the dense model")
    rows = [_row("dense demo model", dense_eval), _row(f"{s.method} {s.pruning_ratio:.0%}", pruned_eval)]
    experiment = mlflow.tracking.MlflowClient().get_run(prune_id).info.experiment_id
    print("\n" + summary(rows))
    print(f"({protocol(s)})\n")
    look = runs.where_to_look(experiment, prune_id, schema.STAGE_PRUNE).splitlines()[1:]
    print("demo: done; the prune run and both eval runs are rows of the runs table (one row: ratio and "
          "perplexity).\n" + "\n".join(look))
    return 0


if __name__ == "__main__":
    sys.exit(main())
