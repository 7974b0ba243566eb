"""Claims in the tracking store: one live holder per point, takeover of gone holders, and no
point run twice by concurrent processes (sqlite store, spawned contenders)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tracking import claims
from tracking.claims import ClaimSettings, Owner, PointBusy


@pytest.fixture(scope="module")
def _db(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('claims') / 'claims.db'}"


@pytest.fixture
def store(_db, tmp_path, monkeypatch):
    """A private sqlite store (one per module: creating one takes seconds) and a fresh
    experiment; returns its id."""
    import mlflow
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _db)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(_db)            # MlflowClient() below: other tests set the global
    yield MlflowClient(_db).create_experiment(f"sweep-{tmp_path.name}",
                                              artifact_location=(tmp_path / "art").as_uri())
    mlflow.set_tracking_uri(before)


def _settings(exp_id, **kw):
    return ClaimSettings(exp_id, **{"heartbeat_s": 0.2, "stale_after_s": 30.0, **kw})


def _plant(exp_id, key, gen, owner: Owner, heartbeat: float | None = None):
    """Write a claim as another worker would have left it."""
    client = MlflowClient()
    reg = claims.ensure_registry(client, exp_id)[0].info.run_id
    client.log_param(reg, f"claim/{key}/{gen}", owner.value())
    if heartbeat is not None:
        client.set_tag(reg, f"hb/{owner.token}", str(heartbeat))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_claim_is_busy_until_release_then_next_generation(store):
    s = _settings(store)
    first = claims.claim(s, "p1")
    assert first.gen == 0 and claims.current() is first
    with pytest.raises(PointBusy) as busy:
        claims.claim(s, "p1")
    assert busy.value.holder.token == first.owner.token
    other = claims.claim(s, "p2")           # other points are free
    other.release()
    first.release()
    assert claims.current() is None
    again = claims.claim(s, "p1")
    assert again.gen == 1 and again.taken_over == ()   # the previous holder ended, not gone
    again.release()
    state = claims.point_state(claims.list_registries(MlflowClient(), store), "p1")
    assert sorted(state.gens) == [0, 1]
    assert state.ended == {first.owner.token: "done", again.owner.token: "done"} | {
        k: v for k, v in state.ended.items() if k not in (first.owner.token, again.owner.token)}


def test_registry_run_is_finished_and_tagged_claims(store):
    claims.claim(_settings(store), "p").release()
    (reg,) = claims.list_registries(MlflowClient(), store)
    assert reg.info.status == "FINISHED"
    assert reg.data.tags["stage"] == claims.STAGE_CLAIMS


def test_dead_pid_on_this_host_is_taken_over_at_once(store):
    me = claims.new_owner()
    dead = Owner(me.host, me.boot, _dead_pid(), "1", "deadbeef", time.time())
    _plant(store, "p", 0, dead, heartbeat=time.time())     # fresh heartbeat, but the pid is gone
    slept = []
    held = claims.claim(_settings(store), "p", sleep=slept.append)
    assert held.gen == 1 and [o.token for o in held.taken_over] == ["deadbeef"]
    assert slept == []                                      # no grace wait for a dead pid
    held.release()


def test_reused_pid_counts_as_gone(store):
    me = claims.new_owner()
    reused = Owner(me.host, me.boot, os.getpid(), "999999999", "oldproc", time.time())
    _plant(store, "p", 0, reused, heartbeat=time.time())
    held = claims.claim(_settings(store), "p")
    assert held.gen == 1
    held.release()


@pytest.mark.parametrize("age, busy", [(5.0, True), (120.0, False)])
def test_other_host_judged_by_heartbeat_age(store, age, busy):
    far = Owner("elsewhere", "boot-x", 4242, "1", "far", time.time() - 3600)
    _plant(store, "p", 0, far, heartbeat=time.time() - age)
    s = _settings(store, stale_after_s=60.0, grace_s=0.0)
    if busy:
        with pytest.raises(PointBusy):
            claims.claim(s, "p")
    else:
        held = claims.claim(s, "p")
        assert held.gen == 1 and held.taken_over[0].token == "far"
        held.release()


def test_stale_holder_that_beats_during_grace_is_not_taken_over(store):
    far = Owner("elsewhere", "boot-x", 4242, "1", "far", time.time() - 3600)
    _plant(store, "p", 0, far, heartbeat=time.time() - 600)   # the server was down, say

    def grace(seconds):                                       # the holder speaks again meanwhile
        reg = claims.list_registries(MlflowClient(), store)[0].info.run_id
        MlflowClient().set_tag(reg, "hb/far", str(time.time()))
    with pytest.raises(PointBusy):
        claims.claim(_settings(store, stale_after_s=60.0), "p", sleep=grace)


def test_heartbeat_refreshes_while_held(store):
    held = claims.claim(_settings(store, heartbeat_s=0.1), "p")
    time.sleep(0.6)
    state = claims.point_state(claims.list_registries(MlflowClient(), store), "p")
    assert state.heartbeat[held.owner.token] > held.owner.time
    held.release()


def test_claim_is_written_to_every_registry(store):
    client = MlflowClient()
    for _ in range(2):   # two sweeps started together each created one
        run = client.create_run(store, tags={claims.TAG_REGISTRY: "true"})
        client.set_terminated(run.info.run_id, "FINISHED")
    held = claims.claim(_settings(store), "p")
    assert len(held.registries) == 2
    regs = claims.list_registries(client, store)
    assert all(f"claim/p/0" in r.data.params for r in regs)
    held.release()


def test_lost_write_on_a_second_registry_withdraws(store, monkeypatch):
    """A contender that wins on one registry but finds a rival's claim on the next (written
    between its read and its write) must not hold the point."""
    client = MlflowClient()
    regs = []
    for _ in range(2):
        run = client.create_run(store, tags={claims.TAG_REGISTRY: "true"})
        client.set_terminated(run.info.run_id, "FINISHED")
        regs.append(run.info.run_id)
    rival = claims.new_owner()   # this process, so it counts as live
    cas = claims._cas

    def racing_cas(cl, run_id, name, value):
        if run_id == sorted(regs)[1] and name == "claim/p/0":
            cl.log_param(run_id, name, rival.value())    # the rival gets there first
        return cas(cl, run_id, name, value)
    monkeypatch.setattr(claims, "_cas", racing_cas)
    with pytest.raises(PointBusy) as busy:
        claims.claim(_settings(store), "p")
    assert busy.value.holder.token == rival.token
    state = claims.point_state(claims.list_registries(client, store), "p")
    mine = [t for t in state.gens[0] if t != rival.token]
    assert [state.ended.get(t) for t in mine] == ["withdrawn"]


def test_end_orphans_closes_running_runs_of_the_point_as_killed(store):
    client = MlflowClient()
    orphan = client.create_run(store, tags={"search_point": "p"})
    done = client.create_run(store, tags={"search_point": "p"})
    client.set_terminated(done.info.run_id, "FINISHED")
    other = client.create_run(store, tags={"search_point": "q"})
    with claims.claim(_settings(store), "p") as held:
        assert held.end_orphans({"search_point": "p"}) == [orphan.info.run_id]
    closed = client.get_run(orphan.info.run_id)
    assert closed.info.status == "FAILED" and closed.data.tags["failure_reason"] == "killed"
    assert "point p claimed by" in closed.data.tags["liveness/closed_by"]
    assert client.get_run(done.info.run_id).info.status == "FINISHED"
    assert client.get_run(other.info.run_id).info.status == "RUNNING"


# ---------------------------------------------------------------------------- concurrency

def _contender(index, exp_id, keys, work_dir, barrier, race_exp):
    """Race for one point of a fresh experiment (no registry yet: each may create one), then run
    every point that is not done yet, claiming each first; revisit busy ones."""
    settings = ClaimSettings(exp_id, heartbeat_s=0.5, stale_after_s=60.0)
    rng = random.Random(index)
    todo = list(keys)
    rng.shuffle(todo)
    barrier.wait()
    try:
        first = claims.claim(ClaimSettings(race_exp, heartbeat_s=0.5), "race")
        Path(work_dir, f"race-won-{index}").touch()
        deadline = time.monotonic() + 60    # hold it until the others have tried
        while len(list(Path(work_dir).glob("race-*"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        first.release()
    except PointBusy:
        Path(work_dir, f"race-busy-{index}").touch()
    while todo:
        key = todo.pop(0)
        done = Path(work_dir, "done", key)
        if done.exists():
            continue
        try:
            held = claims.claim(settings, key)
        except PointBusy:
            todo.append(key)
            time.sleep(0.05)
            continue
        if not done.exists():       # resume check under the claim, as search does
            with open(Path(work_dir, "runs.log"), "a") as log:
                log.write(json.dumps({"key": key, "pid": os.getpid(), "gen": held.gen}) + "\n")
            time.sleep(rng.uniform(0.0, 0.05))
            done.touch()
        held.release()


def _die_holding(exp_id, key):
    """A worker that dies while it holds a claim."""
    claims.claim(ClaimSettings(exp_id, heartbeat_s=0.5, stale_after_s=60.0), key)
    os._exit(3)


def test_concurrent_contenders_never_run_a_point_twice(store, tmp_path):
    keys = [f"point{i:02d}" for i in range(12)]
    (tmp_path / "done").mkdir()
    ctx = mp.get_context("spawn")
    dier = ctx.Process(target=_die_holding, args=(store, keys[0]))
    dier.start()
    dier.join(timeout=60)
    assert dier.exitcode == 3
    barrier = ctx.Barrier(3)        # three contenders start together (racing for the registry too)
    race = MlflowClient().create_experiment(f"race-{tmp_path.name}")
    procs = [ctx.Process(target=_contender, args=(i, store, keys, str(tmp_path), barrier, race)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=150)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(list(tmp_path.glob("race-won-*"))) == 1 and len(list(tmp_path.glob("race-busy-*"))) == 2
    lines = [json.loads(x) for x in (tmp_path / "runs.log").read_text().splitlines()]
    assert sorted(x["key"] for x in lines) == keys, "every point ran exactly once"
    assert len({x["pid"] for x in lines}) >= 2, "the work was shared"
    assert [x["gen"] for x in lines if x["key"] == keys[0]] == [1], "the dead holder's point was taken over"
