"""Wall time (and quality) of the first ten minutes with the demo model, on a fresh cache.

    python -m benchmarks.bench_demo [--skip cached,study,sweep,finetune] [--via_script] [--keep DIR]

Every step runs the real command line as a subprocess, with a fresh temporary cache
(``GQAPRUNE_CACHE=<tmp>/cache``, so the demo model is trained from scratch) and a fresh tracking
store (``MLFLOW_TRACKING_URI=sqlite:///<tmp>/mlflow.db``, artifacts next to it):

1. ``demo, first run``: what ``scripts/demo.sh`` runs after its set-up, ``python -m prune_entry.demo``
   (``--via_script``: ``bash scripts/demo.sh`` itself, set-up included): trains the demo model (its
   training time is read from ``demo_info.json``), prunes 20% with taylor, evaluates the pruned and
   the dense model;
2. ``demo, cached``: the same command again (the trained model is reused);
3. ``demo study``: ``gqaprune.demo_study.run_study`` on the trained model, in this process
   (taylor / magnitude / random at 35%, without and with the lstsq refit, seeds 0 and 1);
4. ``finetune``: ``python -m prune_entry.finetune --model_uri <prune run> --eval_after true``
   (the default LoRA, then the default eval of the merged model);
5. ``demo sweep``: ``python -m prune_entry.search --config configs/sweeps/demo.yaml``.

The machine is shared, so each row also gives the CPU time of the subprocess tree (user + sys)
and the 1-minute load average before and after; compare runs by CPU time, and quote wall times
measured at load < 1 as "on an idle 2-core machine". Then a quality table (from the store): dense
vs pruned vs pruned + LoRA on the demo perplexity and tasks, and the sweep's summary.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CMD = [sys.executable, "-m", "prune_entry.demo"]


@dataclass
class Timing:
    step: str
    wall_s: float
    cpu_s: float
    load_before: float
    load_after: float
    note: str = ""


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_step(step: str, cmd: list[str], env: dict, log_dir: Path) -> tuple[Timing, str]:
    """Run ``cmd`` in the repo, its output to ``log_dir/<step>.log``; fail loudly on exit != 0."""
    load0, cpu0, t0 = os.getloadavg()[0], children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, children_cpu() - cpu0
    log = log_dir / (re.sub(r"\W+", "_", step) + ".log")
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{step} failed (exit {proc.returncode}); see {log}")
    print(f"  {step}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    return Timing(step, wall, cpu, load0, os.getloadavg()[0]), proc.stdout


def environment(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(GQAPRUNE_CACHE=str(tmp / "cache"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    # `mlflow` and `python` of this interpreter's environment, as an activated venv would give.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def latest_run(tracking_uri: str, stage: str, **tags) -> str:
    from mlflow.tracking import MlflowClient

    from tracking import schema

    client = MlflowClient(tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    filt = " and ".join([f"tags.{schema.TAG_STAGE} = '{stage}'"] +
                        [f"tags.{k} = '{v}'" for k, v in tags.items()])
    found = client.search_runs(exps, filt, order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        raise SystemExit(f"no {stage} run in {tracking_uri}")
    return found[0].info.run_id


def metrics_of(tracking_uri: str, run_id: str) -> dict:
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri).get_run(run_id).data.metrics


def quality_rows(tracking_uri: str, evals: dict[str, str]) -> list[str]:
    """Markdown rows: model | ppl demo | continuation acc_norm | cloze acc (± standard error, items)."""
    from tracking import schema

    tasks = (("demo_continuation", "acc_norm"), ("demo_cloze", "acc"))
    rows = ["| model | params | ppl demo | demo_continuation acc_norm | demo_cloze acc |", "|---|---|---|---|---|"]
    for label, run_id in evals.items():
        m = metrics_of(tracking_uri, run_id)
        ppl = m.get(schema.ppl_metric("demo"))
        cells = [f"{m[schema.M_MODEL_PARAMS]:,.0f}" if schema.M_MODEL_PARAMS in m else "-",
                 "-" if ppl is None else f"{ppl:.3f}"]
        for task, measure in tasks:
            v = m.get(schema.task_metric(task, measure))
            se = m.get(schema.task_metric(task, f"{measure}_stderr"))
            n = m.get(schema.metric_name(task, "n_samples"))
            cells.append("-" if v is None else f"{v:.3f}" + (f" ± {se:.3f}" if se is not None else "")
                         + (f" (n={n:.0f})" if n is not None else ""))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def sweep_summary(tracking_uri: str) -> str:
    import mlflow
    from tracking import schema

    mlflow.set_tracking_uri(tracking_uri)
    run_id = latest_run(tracking_uri, schema.STAGE_SEARCH)
    path = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{schema.A_SEARCH_SUMMARY_MD}")
    return Path(path).read_text()


def _exp(loss: float | None) -> str:
    import math
    return "-" if loss is None else f"{math.exp(loss):.2f}"


def timing_table(rows: list[Timing]) -> str:
    lines = ["| step | wall s | CPU s | load avg (1 min) before -> after | note |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.step} | {r.wall_s:.1f} | {r.cpu_s:.1f} | {r.load_before:.2f} -> "
                     f"{r.load_after:.2f} | {r.note} |")
    return "\n".join(lines)


def demo_training_note(cache: Path) -> tuple[str, dict]:
    infos = sorted(cache.glob("demo-*/demo_info.json"))
    if not infos:
        return "no demo_info.json", {}
    info = json.loads(infos[0].read_text())
    return (f"training {info['train_seconds']:.1f} s ({info['steps']} steps, "
            f"{info['seconds_per_step']:.3f} s/step, {info['threads']} threads, load "
            f"{info.get('loadavg_1min')}); held-out ppl {info['heldout_perplexity']:.2f}"), info


def demo_evals(uri: str, prune_run: str) -> dict[str, str]:
    """The demo's two eval runs: the dense model's and the pruned model's (linked to ``prune_run``)."""
    from mlflow.tracking import MlflowClient

    from tracking import schema

    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(exps, f"tags.{schema.TAG_STAGE} = '{schema.STAGE_EVAL}'",
                               order_by=["attributes.start_time ASC"])
    pruned = [r for r in found if r.data.tags.get(schema.TAG_SOURCE_RUN) == prune_run]
    dense = [r for r in found if schema.TAG_SOURCE_RUN not in r.data.tags]
    return {"dense demo model": dense[0].info.run_id, "taylor 20% (demo.sh)": pruned[0].info.run_id}


def run_study_step(cache: Path):
    """The in-process demo study on the freshly trained model (one thread, as the demo trains)."""
    from gqaprune.demo_study import StudySettings, run_study

    model_dir = next(p for p in cache.glob("demo-*") if (p / "demo_info.json").is_file())
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    cpu0 = time.process_time()
    study = run_study(model_dir, StudySettings())
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(f"  demo study: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    n = len(study.rows)
    return Timing("demo study (in-process)", wall, cpu, load0, os.getloadavg()[0],
                  f"{n} pruned models + dense, held-out perplexity each"), study


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def print_study(study) -> None:
    print(f"\n## Demo study ({study.protocol})\n")
    print(study.table())
    for rec in study.settings.reconstruct:
        beats = max(study.ppls("taylor", rec)) < min(study.ppls("random", rec))
        print(f"\nreconstruct {rec}: ranking {' < '.join(study.ranking(rec))}; taylor beats random "
              f"on every seed: {'yes' if beats else 'NO'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip", default="", help="comma list of: cached, study, sweep, finetune")
    p.add_argument("--via_script", action="store_true", help="run bash scripts/demo.sh (set-up included)")
    p.add_argument("--keep", default=None, help="keep cache, store and logs in this directory")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)   # `kill <pid>` still prints the timings so far
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-demo-"))
    tmp.mkdir(parents=True, exist_ok=True)
    env, uri = environment(tmp), f"sqlite:///{tmp / 'mlflow.db'}"
    print(f"bench_demo: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()} "
          f"{platform.processor() or ''}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, work dir {tmp}",
          flush=True)
    demo = ["bash", "scripts/demo.sh"] if args.via_script else DEMO_CMD
    rows: list[Timing] = []
    try:
        timing, _ = run_step("demo, first run (trains)", demo, env, tmp)
        timing.note, info = demo_training_note(tmp / "cache")
        rows.append(timing)
        prune_run = latest_run(uri, "prune")
        evals = demo_evals(uri, prune_run)
        if "cached" not in skip:
            rows.append(run_step("demo, cached", demo, env, tmp)[0])
        py = [sys.executable, "-m"]
        study = None
        if "study" not in skip:
            timing, study = run_study_step(tmp / "cache")
            rows.append(timing)
            print_study(study)
        if "finetune" not in skip:
            ft = run_step("finetune + eval_after (defaults)", py + ["prune_entry.finetune", "--model_uri", prune_run,
                                                                   "--eval_after", "true", "--progress", "false"], env, tmp)[0]
            rows.append(ft)
            ft_run = latest_run(uri, "finetune")
            from mlflow.tracking import MlflowClient
            from tracking import schema
            fm = metrics_of(uri, ft_run)
            if schema.M_FT_STEPS in fm:
                ft.note = (f"{int(fm[schema.M_FT_STEPS])} LoRA steps in {fm.get(schema.M_FT_TIME, 0):.0f} s; "
                           f"val_ppl {_exp(fm.get(schema.M_FT_VAL_LOSS_BEFORE))} -> "
                           f"{_exp(fm.get(schema.M_FT_VAL_LOSS_AFTER))}")
            child = MlflowClient(uri).get_run(ft_run).data.tags.get(schema.TAG_FT_EVAL_RUN)
            if child:
                evals["taylor 20% + LoRA (default finetune)"] = child
        print("\n## Quality (held-out demo stories: all perplexity windows; the demo's evals: the first 100 "
              "items per task, finetune's eval_after: all 300; protocol in each eval run's eval_results.json)\n")
        print("\n".join(quality_rows(uri, evals)), flush=True)
        if "sweep" not in skip:
            rows.append(run_step("demo sweep", py + ["prune_entry.search", "--config", "configs/sweeps/demo.yaml"], env, tmp)[0])
            print("\n## Demo sweep summary\n")
            print(sweep_summary(uri))
    finally:   # the timings so far, also when a step failed or the run was interrupted
        print("\n## Demo wall time (fresh cache; CPU = user + sys of the step's processes)\n")
        print(timing_table(rows), flush=True)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
