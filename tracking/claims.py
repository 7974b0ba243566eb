"""Claims: a worker claims a grid point in the tracking store before it runs the point.

Two sweeps started together (or two Ray workers given the same point after a retry) must never
run a point twice, and a point whose worker is gone must be taken over. The store is the only
thing every worker shares, and MLflow has no compare-and-set, except one: **a run's params are
immutable**. ``log_param(run, key, value)`` inserts a row whose primary key is (run, key); a
second insert with another value fails ("Changing param values is not allowed") and one with the
same value is a no-op. That holds on every SQL store (sqlite, PostgreSQL, MySQL) and through a
tracking server, which runs on one of them, and it makes a retried request (lost response)
harmless.

Protocol (``claim``):

* The claims live on *registry* runs of the sweep's experiment (tag ``stage = claims``, ended
  FINISHED at once; logging to an ended run is allowed). Normally there is one; two sweeps
  started together may each create one, so a claim is written to **every** registry, and the
  registry list is read again after writing until no new one appeared. Two contenders cannot
  both win: each wrote to every registry the other could have seen (the one that committed its
  registry last sees the other's, and the write to a shared registry is the compare-and-set).
* A point's claims come in generations: param ``claim/<point>/<gen>`` = the owner (host, boot
  id, pid, process start time, a random token, time). The first claim is generation 0. The
  owner of the latest generation holds the point while it is *live*: not ended (tag
  ``end/<token>``, set at release) and not gone. *Gone*: on the same host (hostname + boot id)
  its pid is dead or belongs to another process; on any host its heartbeat (tag ``hb/<token>``,
  refreshed every ``heartbeat_s`` by a thread) is older than ``stale_after_s`` (default: the
  runs' rule, ``GQAPRUNE_STALE_AFTER_S``, 300 s), and still
  unchanged when read again ``grace_s`` later (a server outage delays heartbeats; the second
  read after the owner's back-off lets a live owner speak). Staleness compares clocks of
  different machines: keep them synchronised (NTP) well within ``stale_after_s``.
* A contender that finds the latest generation live raises :class:`PointBusy` (the executor
  tries again later); if it is ended or gone, it claims generation + 1. A contender that lost a
  write withdraws (``end/<token> = withdrawn``) and reads the state again.

The holder of a claim is the only process running the point, so runs of that point still
RUNNING are orphans of a gone worker: :meth:`Claim.end_orphans` ends them FAILED ``killed``.
"""
from __future__ import annotations

import contextvars
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable

from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tracking import liveness, retry, schema
from tracking.connect import tracking_uri

STAGE_CLAIMS = schema.STAGE_CLAIMS     # TAG_STAGE of the registry runs (analysis ignores it)
TAG_REGISTRY = schema.TAG_CLAIMS_REGISTRY
REGISTRY_NAME = "sweep-claims"
END_DONE, END_FAILED, END_WITHDRAWN, END_KILLED = "done", "failed", "withdrawn", "killed"

_current: contextvars.ContextVar["Claim | None"] = contextvars.ContextVar("gqaprune_claim", default=None)


@dataclass(frozen=True)
class ClaimSettings:
    experiment_id: str              # the sweep's experiment: registries and point runs live there
    heartbeat_s: float = 10.0       # how often a holder refreshes its heartbeat
    stale_after_s: float | None = None  # heartbeat older than this: holder gone (None: the runs'
    #                                     rule, GQAPRUNE_STALE_AFTER_S, default 300 s)
    grace_s: float | None = None    # second look before a takeover (default 2 x heartbeat_s; longer
    #                                 than the store retries' longest back-off, 15 s)

    @property
    def grace(self) -> float:
        return 2 * self.heartbeat_s if self.grace_s is None else self.grace_s

    @property
    def stale(self) -> float:
        return liveness.stale_after_s() if self.stale_after_s is None else self.stale_after_s


@dataclass(frozen=True)
class Owner:
    host: str
    boot: str           # /proc/sys/kernel/random/boot_id: same host name after a reboot is not the same host
    pid: int
    started: str        # process start time in clock ticks since boot (guards against pid reuse)
    token: str          # unique per claim
    time: float         # when the claim was made (epoch seconds)

    def value(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def parse(cls, text: str) -> "Owner | None":
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None

    def describe(self) -> str:
        return f"{self.host} pid {self.pid}"


@dataclass(frozen=True)
class PointState:
    """What the registries say about one point: owners by generation, ends, heartbeats."""
    gens: dict          # gen -> {token: Owner}
    ended: dict         # token -> end reason
    heartbeat: dict     # token -> latest heartbeat (epoch seconds)

    @property
    def latest(self) -> int | None:
        return max(self.gens) if self.gens else None

    def last_sign(self, owner: Owner) -> float:
        return max(self.heartbeat.get(owner.token, 0.0), owner.time)


class PointBusy(Exception):
    """The point is claimed by a live worker; try again later (not a failure of the point)."""

    def __init__(self, key: str, holder: Owner):
        super().__init__(f"point {key} is being run by {holder.describe()} (claimed "
                         f"{time.strftime('%H:%M:%S', time.localtime(holder.time))})")
        self.key, self.holder = key, holder


# ---------------------------------------------------------------------------- this process

def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: [state, ppid, ...]; [] where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _start_ticks(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat: start time in clock ticks since boot."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else ""


def new_owner() -> Owner:
    pid = os.getpid()
    return Owner(socket.gethostname(), _boot_id(), pid, _start_ticks(pid), uuid.uuid4().hex, time.time())


def pid_gone(owner: Owner) -> bool:
    """True when ``owner`` ran on this host and its process no longer exists (False: alive or
    not this host, where only the heartbeat can tell)."""
    if owner.host != socket.gethostname() or owner.boot != _boot_id():
        return False
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass                        # alive, another user's
    fields = _stat(owner.pid)
    if fields and fields[0] in ("Z", "X"):   # killed, not yet reaped by its parent (Ray's raylet)
        return True
    started = fields[19] if len(fields) > 19 else ""
    return bool(owner.started and started and started != owner.started)


# ---------------------------------------------------------------------------- store access

def _retry(call: Callable, what: str = "claiming a sweep point"):
    """The store's own retry rule (tracking.retry): back-off on a locked SQLite file or a server
    that went away, within a bounded budget; other errors at once."""
    return retry.call(call, tracking_uri(), what)


def _client() -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri())


def _param_key(key: str, gen: int) -> str:
    return f"claim/{key}/{gen}"


def list_registries(client: MlflowClient, experiment_id: str) -> list:
    """The registry runs (with their params and tags), oldest id first."""
    runs = _retry(lambda: client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_REGISTRY}` = 'true'",
        run_view_type=ViewType.ACTIVE_ONLY, max_results=1000))
    return sorted(runs, key=lambda r: r.info.run_id)


def ensure_registry(client: MlflowClient, experiment_id: str) -> list:
    regs = list_registries(client, experiment_id)
    if regs:
        return regs
    run = _retry(lambda: client.create_run(experiment_id, run_name=REGISTRY_NAME, tags={
        TAG_REGISTRY: "true", schema.TAG_STAGE: STAGE_CLAIMS, schema.TAG_RUN_NAME: REGISTRY_NAME}))
    _retry(lambda: client.set_terminated(run.info.run_id, "FINISHED"))  # never RUNNING
    return list_registries(client, experiment_id)


def prepare(settings: "ClaimSettings") -> None:
    """The driver makes the sweep's registry before it hands points out, so parallel workers find
    one instead of each creating its own (several registries still work: claims are written to
    every one)."""
    ensure_registry(_client(), settings.experiment_id)


def point_state(registries: list, key: str) -> PointState:
    gens, ended, heartbeat = {}, {}, {}
    prefix = f"claim/{key}/"
    for reg in registries:
        for name, value in reg.data.params.items():
            if name.startswith(prefix):
                owner = Owner.parse(value)
                if owner is not None:
                    gens.setdefault(int(name[len(prefix):]), {})[owner.token] = owner
        for name, value in reg.data.tags.items():
            if name.startswith("end/"):
                ended[name[4:]] = value
            elif name.startswith("hb/"):
                try:
                    heartbeat[name[3:]] = max(heartbeat.get(name[3:], 0.0), float(value))
                except ValueError:
                    pass
    return PointState(gens, ended, heartbeat)


def _cas(client: MlflowClient, run_id: str, name: str, value: str) -> bool:
    """Write param ``name`` = ``value`` unless another value is there; True when ours is there."""
    try:
        _retry(lambda: client.log_param(run_id, name, value))
        return True
    except MlflowException:
        current = _retry(lambda: client.get_run(run_id)).data.params.get(name)
        if current is None:
            raise
        return current == value


def _write_everywhere(client: MlflowClient, experiment_id: str, name: str, value: str,
                      first: list) -> tuple[bool, list[str]]:
    """Write to every registry, re-reading the list until no new one appeared.

    Returns (won, registries written to)."""
    seen, written, regs = set(), [], first
    while True:
        fresh = [r.info.run_id for r in regs if r.info.run_id not in seen]
        if not fresh:
            return True, written
        for run_id in fresh:
            seen.add(run_id)
            if not _cas(client, run_id, name, value):
                return False, written
            written.append(run_id)
        regs = list_registries(client, experiment_id)


def _set_tag_on(client: MlflowClient, run_ids: list[str], name: str, value: str) -> None:
    for run_id in run_ids:
        _retry(lambda: client.set_tag(run_id, name, value))


# ---------------------------------------------------------------------------- claims

@dataclass
class Claim:
    """A held claim on one point. Release it (or use it as a context manager)."""
    key: str
    gen: int
    owner: Owner
    settings: ClaimSettings
    registries: list[str]
    taken_over: tuple = ()          # Owners of the previous generation that were gone
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _token: object = field(default=None, repr=False)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"claim-{self.key[:8]}", daemon=True)
        self._thread.start()
        self._token = _current.set(self)

    def _beat(self) -> None:
        client, warned = _client(), False
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                _set_tag_on(client, self.registries, f"hb/{self.owner.token}", f"{time.time():.3f}")
            except Exception as exc:  # noqa: BLE001 - a missed beat is not fatal; staleness is judged later
                if not warned:
                    print(f"claims: heartbeat of point {self.key} failed ({type(exc).__name__}); "
                          "retrying", file=sys.stderr)
                    warned = True

    def release(self, end: str = END_DONE) -> None:
        """End the claim (``done`` / ``failed``); the next contender claims a new generation."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            _set_tag_on(_client(), self.registries, f"end/{self.owner.token}", end)
        except Exception as exc:  # noqa: BLE001 - the heartbeat stops, so it goes stale and is taken over
            print(f"claims: could not release point {self.key} ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200]}); it is taken over after {self.settings.stale:g}s",
                  file=sys.stderr)
        if self._token is not None:
            try:
                _current.reset(self._token)
            except ValueError:      # released from another thread / context than it was taken in
                pass
            self._token = None

    def end_orphans(self, tags: dict[str, str], reason: str = "") -> list[str]:
        """End every RUNNING run of this point (carrying all ``tags``) FAILED with
        ``failure_reason = killed``: the claim proves that no live worker is running them (also
        runs without liveness tags, which ``runs.close_stale_runs`` leaves alone). Their ids."""
        client = _client()
        filt = " and ".join([f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status = 'RUNNING'"])
        runs = _retry(lambda: client.search_runs([self.settings.experiment_id], filter_string=filt,
                                                 max_results=1000))
        why = reason or (f"its worker is gone: point {self.key} claimed by {self.owner.describe()} at "
                         f"{time.ctime()}")
        for run in runs:   # the same marks as tracking.runs.close_stale_runs: FAILED, reason "killed"
            _retry(lambda r=run: client.set_tag(r.info.run_id, schema.TAG_FAILURE, schema.REASON_KILLED))
            _retry(lambda r=run: client.set_tag(r.info.run_id, schema.TAG_CLOSED_BY, why[:5000]))
            _retry(lambda r=run: client.set_terminated(r.info.run_id, "FAILED"))
        return [r.info.run_id for r in runs]

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(END_DONE if exc_type is None else END_FAILED)


def current() -> Claim | None:
    """The claim held by the code running now (set by :func:`claim`, cleared at release)."""
    return _current.get()


def _gone(client: MlflowClient, settings: ClaimSettings, key: str, owner: Owner, state: PointState,
          sleep: Callable[[float], None]) -> bool:
    if pid_gone(owner):
        return True
    if time.time() - state.last_sign(owner) <= settings.stale:
        return False
    sleep(settings.grace)       # stale by the clock: look again before taking over
    again = point_state(list_registries(client, settings.experiment_id), key)
    return owner.token in again.ended or again.last_sign(owner) == state.last_sign(owner)


def claim(settings: ClaimSettings, key: str, *, sleep: Callable[[float], None] = time.sleep,
          attempts: int = 8) -> Claim:
    """Claim point ``key`` for this process (heartbeat started) or raise :class:`PointBusy`."""
    client = _client()
    for _ in range(attempts):
        regs = ensure_registry(client, settings.experiment_id)
        state = point_state(regs, key)
        gen, gone = 0, ()
        if state.latest is not None:
            owners = [o for o in state.gens[state.latest].values() if o.token not in state.ended]
            live = [o for o in owners if not _gone(client, settings, key, o, state, sleep)]
            if live:
                raise PointBusy(key, min(live, key=lambda o: o.time))
            gen, gone = state.latest + 1, tuple(owners)
        owner = new_owner()
        won, written = _write_everywhere(client, settings.experiment_id, _param_key(key, gen), owner.value(), regs)
        if won:
            held = Claim(key, gen, owner, settings, written, taken_over=gone)
            held.start_heartbeat()
            return held
        _set_tag_on(client, written, f"end/{owner.token}", END_WITHDRAWN)
    state = point_state(list_registries(client, settings.experiment_id), key)
    owners = list(state.gens.get(state.latest, {}).values()) if state.latest is not None else []
    if owners:
        raise PointBusy(key, max(owners, key=lambda o: o.time))
    raise RuntimeError(f"could not claim point {key} in {attempts} attempts")
