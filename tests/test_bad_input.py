"""Bad input through both launchers (issue 12): every case is one line `error: <problem>; <fix>`,
a non-zero exit (2 for `python -m`), and a FAILED run that carries the reason; and a sweep killed
by SIGTERM / SIGINT / SIGKILL, restarted, finishes with exactly one finished child per point."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import make_tiny_model, make_word_tokenizer
from tracking import schema

REPO = Path(__file__).resolve().parents[1]
FAST = ["--taylor_num_samples", "4", "--taylor_seq_len", "16", "--reconstruct", "none", "--save_model", "false"]


def child_env(store: str, experiment: str) -> dict:
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, MLFLOW_EXPERIMENT_NAME=experiment, OMP_NUM_THREADS="1")
    env.pop("MLFLOW_EXPERIMENT_ID", None)       # one of name / id: the name chosen here wins
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every broken input once: models, data files, a models file."""
    root = tmp_path_factory.mktemp("bad")
    good = root / "model"
    make_tiny_model("llama", 8, 2).save_pretrained(good)
    make_word_tokenizer(good)
    truncated = root / "truncated"
    make_tiny_model("llama", 8, 2).save_pretrained(truncated)
    make_word_tokenizer(truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    listcfg = root / "listcfg"
    make_tiny_model("llama", 8, 2).save_pretrained(listcfg)
    make_word_tokenizer(listcfg)
    (listcfg / "config.json").write_text(json.dumps([1, 2, 3]))
    (root / "binary.jsonl").write_bytes(b'{"text": "w1 w2"}\n\x00\xff\xfe\x00binary\n')
    (root / "binary.txt").write_bytes(bytes(range(128, 256)) * 40)      # no NUL, not UTF-8
    (root / "blob.bin").write_bytes(b"\x00\x01\x02" * 1000)
    (root / "bad.jsonl").write_text('{"text": "w1 w2"}\n{"text": broken\n')
    (root / "models_bad.json").write_text("{not json")
    (root / "models_nopath.yaml").write_text("Llama:\n  family: Llama\n")
    (root / "corpus.txt").write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 90}" for j in range(40))
                                                 for i in range(60)))
    return root


# (entry point module, MLproject entry, args, message in the one-line error)
CASES = {
    "truncated weights (prune)": ("prune", ["--model", "{truncated}"], "are unreadable"),
    "truncated weights (eval)": ("evaluate", ["--model_uri", "{truncated}", "--tasks", "none", "--speed", "false",
                                              "--ppl_datasets", "c={root}/corpus.txt"], "are unreadable"),
    "config.json is a list": ("prune", ["--model", "{listcfg}"], "holds a JSON list"),
    "binary .jsonl (prune)": ("prune", ["--model", "{model}", "--calibration_dataset", "{root}/binary.jsonl"],
                              "is binary, not text"),
    "binary .jsonl (eval)": ("evaluate", ["--model_uri", "{model}", "--tasks", "none", "--speed", "false",
                                          "--ppl_datasets", "b={root}/binary.jsonl"], "is binary, not text"),
    "binary .txt": ("prune", ["--model", "{model}", "--calibration_dataset", "{root}/binary.txt"],
                    "is not UTF-8 text"),
    "binary .bin": ("prune", ["--model", "{model}", "--calibration_dataset", "{root}/blob.bin"], "is binary"),
    "malformed .jsonl": ("prune", ["--model", "{model}", "--calibration_dataset", "{root}/bad.jsonl"],
                         "line 2 of"),
    "malformed models file": ("prune", ["--model", "Llama", "--models_file", "{root}/models_bad.json"],
                              "is not valid JSON"),
    "models-file entry without path": ("prune", ["--model", "Llama", "--models_file", "{root}/models_nopath.yaml"],
                                       "entry 'Llama' has no path"),
    "huge calibration": ("prune", ["--model", "{model}", "--taylor_num_samples", "1000000000"], "is more than"),
    "window beyond the positions (prune)": ("prune", ["--model", "{model}", "--calibration_dataset",
                                                      "{root}/corpus.txt", "--taylor_seq_len", "1024"],
                                            "exceeds the model's 128 positions"),
    "window beyond the positions (eval)": ("evaluate", ["--model_uri", "{model}", "--tasks", "none", "--speed",
                                                        "false", "--ppl_datasets", "c={root}/corpus.txt",
                                                        "--ppl_seq_len", "2048"], "exceeds the model's 128 positions"),
    "offline hub task in a sweep": ("search", ["--models", "{model}", "--methods", "magnitude", "--eval", "true",
                                               "--prune_args", "--reconstruct none", "--eval_args",
                                               "--tasks piqa --ppl_datasets none --speed false"],
                                    "not reachable"),
}
MLPROJECT_ENTRY = {"prune": "prune", "evaluate": "eval", "search": "search"}
# Through `mlflow run` once per entry point: the launcher adds only the MLproject hop (flags passed
# as -P, the run MLflow opens adopted); the checks behind it are the ones `python -m` runs above.
MLFLOW_RUN_CASES = ["truncated weights (prune)", "binary .jsonl (eval)", "offline hub task in a sweep"]
KEYS = [(c, "python -m") for c in CASES] + [(c, "mlflow run") for c in MLFLOW_RUN_CASES]


def fill(args, files) -> list[str]:
    names = {"root": files, "model": files / "model", "truncated": files / "truncated", "listcfg": files / "listcfg"}
    return [a.format(**{k: str(v) for k, v in names.items()}) for a in args]


def to_params(args: list[str]) -> list[str]:
    """--name value pairs as mlflow run -P name=value."""
    out = []
    for flag, value in zip(args[::2], args[1::2]):
        out += ["-P", f"{flag[2:]}={value}"]
    return out


def launch(launcher: str, module: str, args: list[str], env: dict, tmp_path: Path):
    if launcher == "python -m":
        cmd = [sys.executable, "-m", f"prune_entry.{module}", *args]
    else:
        cmd = [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", MLPROJECT_ENTRY[module],
               "--env-manager", "local", *to_params(args)]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def outcomes(files, tmp_path_factory):
    """Every case through both launchers, two processes at a time: (returncode, stdout, stderr,
    store, experiment) per (case, launcher)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(key):
        case, launcher = key
        module, args, _ = CASES[case]
        work = tmp_path_factory.mktemp("case")
        store = f"sqlite:///{work / 'mlflow.db'}"
        proc = launch(launcher, module, fill(args, files), child_env(store, "bad-input"), work)
        return key, (proc.returncode, proc.stdout, proc.stderr, store)
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, KEYS))


@pytest.mark.slow
@pytest.mark.parametrize(("case", "launcher"), KEYS)
def test_bad_input_is_one_line_and_a_failed_run(case, launcher, outcomes):
    _, _, message = CASES[case]
    code, stdout, stderr, store = outcomes[(case, launcher)]
    out = stdout + stderr
    assert code != 0, out[-2000:]
    if launcher == "python -m":
        assert code == 2, out[-2000:]
        assert "Traceback" not in out, out[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], stderr[-2000:]
    else:
        assert any(line.startswith("error: ") and message in line for line in out.splitlines()), out[-2000:]
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("bad-input")
    ours = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(schema.TAG_STAGE)]
    assert ours, "no run was recorded"
    assert all(r.info.status == "FAILED" for r in ours)
    assert message in ours[0].data.tags[schema.TAG_FAILURE]


# ---- a real sweep killed and restarted ------------------------------------------------------------

def _wait_for_second_prune(client, exp_name: str, proc, log: Path, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        exp = client.get_experiment_by_name(exp_name)
        if exp is not None:
            prunes = [r for r in client.search_runs([exp.experiment_id])
                      if r.data.tags.get(schema.TAG_STAGE) == schema.STAGE_PRUNE]
            if any(r.info.status == "FINISHED" for r in prunes) and any(r.info.status == "RUNNING" for r in prunes):
                return
        time.sleep(0.3)
    raise AssertionError("the second point never started: " + log.read_text()[-3000:])


SIGNALS = ["SIGTERM", "SIGINT", "SIGKILL"]


def _kill_and_resume(files: Path, tmp_path: Path, sig: str) -> tuple[MlflowClient, subprocess.CompletedProcess]:
    """A real sweep (2 points) stopped by ``sig`` while its second point runs, then the same
    command again; its store's client and the second command's outcome."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = child_env(store, "killed-sweep")
    prune_args = f"--calibration_dataset {files / 'corpus.txt'} --taylor_seq_len 16 --reconstruct none"
    cmd = [sys.executable, "-m", "prune_entry.search", "--models", str(files / "model"), "--methods", "taylor",
           "--ratios", "0.2", "--grid", '{"taylor_num_samples": [4, 3000]}', "--prune_args", prune_args,
           "--eval", "false"]
    log = tmp_path / "search.log"
    client = MlflowClient(store)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        _wait_for_second_prune(client, "killed-sweep", proc, log)
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the same command again: the finished point is reused, the killed one runs again
    return client, subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def killed_sweeps(files, tmp_path_factory):
    """The three signals at once (each in its own store): most of the time is waiting."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=len(SIGNALS)) as pool:
        futures = {sig: pool.submit(_kill_and_resume, files, tmp_path_factory.mktemp(f"killed-{sig}"), sig)
                   for sig in SIGNALS}
        return {sig: f.result() for sig, f in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS)
def test_a_killed_sweep_resumes_to_one_finished_child_per_point(killed_sweeps, sig):
    client, done = killed_sweeps[sig]
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    exp = client.get_experiment_by_name("killed-sweep")
    every = client.search_runs([exp.experiment_id])
    assert not [r for r in every if r.info.status == "RUNNING"]
    finished = [r for r in every if r.info.status == "FINISHED" and r.data.tags.get(schema.TAG_STAGE) == schema.STAGE_PRUNE]
    points = [r.data.tags[schema.TAG_SEARCH_POINT] for r in finished]
    assert len(points) == 2 and len(set(points)) == 2          # exactly one finished child per point
    stopped = [r for r in every if r.info.status in ("KILLED", "FAILED")]
    expected = "FAILED" if sig == "SIGKILL" else "KILLED"
    assert stopped and all(r.info.status == expected for r in stopped)
