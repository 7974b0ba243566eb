"""`compare` entry point: evaluate models on demand, then the original-vs-pruned report.

    python -m prune_entry.compare --pruned <prune run id> [--original <model|eval run>] \
        [--labels dense,taylor20] [--output_dir reports/] [any eval flag, e.g. --tasks offline]
    mlflow run . -e compare -P pruned=<prune run id> --env-manager local

Each source that is not an eval run (a prune/finetune run id, a URI, an alias, a directory) is
evaluated first as a nested eval run of the analysis run, with the eval flags given here; then
``analysis.compare`` builds the report from the store. ``python -m analysis.compare`` is the
read-only twin (it only reads eval runs that exist).
"""
from __future__ import annotations

from analysis import compare as report
from gqaprune.evaluation.config import EvalConfig
from prune_entry import evaluate
from tracking import runs, schema, store
from tracking.cli import raw_flags


def parse(argv: list[str] | None):
    """(compare options, labels, eval config for on-demand evaluations)."""
    args, extra = report.build_parser("compare").parse_known_args(argv)
    eval_cfg = evaluate.parse(["--model_uri", "x", *extra])  # unknown/invalid eval flags fail now
    return args, report.check_labels(args), eval_cfg, extra


def collector(eval_cfg: EvalConfig, eval_args: list[str]):
    def collect(source: str, label: str | None, notes: list[str]):
        if report.is_run_id(source):
            run = report._get_run(source)
            if run.data.tags.get(schema.TAG_STAGE) == schema.STAGE_EVAL:
                if eval_args:
                    notes.append(f"{source[:8]} is an existing eval run: eval flags were not applied to it")
                return report.collect(source, label, notes)
        child = evaluate.run_child(source, eval_cfg)
        return report.summary_of_run(store.get_run(child), label)
    return collect


def run(parsed) -> dict:
    args, labels, eval_cfg, extra = parsed
    return report.run(args, labels, collector(eval_cfg, extra), logged={"eval_args": " ".join(extra) or "none"})


def main(argv: list[str] | None = None) -> int:
    return runs.entry_point(schema.STAGE_ANALYSIS, lambda: parse(argv), run, run_name=lambda _: schema.RUN_COMPARE,
                            raw_params=raw_flags(argv), experiment=schema.ANALYSIS_EXPERIMENT)


if __name__ == "__main__":
    raise SystemExit(main())
