"""Drive a babysitter run with effectd: every pending effect of a supported kind runs in the
background as an effectd effect, each result is posted the moment it is known, and the run is
re-iterated at once so the next phase starts while slower siblings still run.

    from effectd.babysitter import drive
    result = drive("/abs/.a5c/runs/01J...", babysitter="/path/to/babysitter")
    result.status, result.output, result.exit_code

The loop
--------
``run:iterate --json`` lists the pending effects. Each one of a supported kind becomes one effectd
effect (labels ``babysitter.run`` = the resolved run directory, ``babysitter.effect`` = the
effectId, plus ``babysitter.kind``/``babysitter.label``), unless effectd already has one with
those labels (a restarted driver picks up what an earlier one submitted, running or finished,
and runs nothing twice). The driver never polls: one thread per submitted batch parks a
``wait(return_when="first")`` in the daemon and reports completions in completion order.
As results come in they are posted with ``task:post`` (results that finish together are posted
back to back), then the run is iterated once, which starts whatever the process asks for next.

One SDK call at a time per run
------------------------------
All ``run:iterate`` and ``task:post`` calls go through one lane thread, one after another: the
driver never has two of them working on the run at once, so it never contends for the SDK's
``run.lock`` with itself. What the lane does not serialise is Node's start-up, which is most of a
call's cost (~0.3 s of SDK import): a post's process is started early, *gated*, while other calls
run. A gated post is ``task:post RUN EFFECT --status S --metadata - --stdout-file F1
--stderr-file F2 --value F3 --json`` with a pipe on stdin. Before reading ``--metadata -`` from
stdin it only starts Node, imports the SDK and reads the journal (no lock, no write); it then
waits for stdin. The lane *releases* it (writes the metadata JSON, closes stdin) when it is that
post's turn; it then reads the files, takes ``run.lock``, re-checks the effect under the lock and
commits, in ~40 ms instead of ~350 ms. Gates are started (a) the moment an effect finishes, while
another call may be running, and (b) ahead of time for up to ``prewarm`` running effects (their
``--status`` is guessed ``ok``; a gate that turns out wrong is killed unreleased and replaced).
Crash safety: the value file is written last, by rename, right before the release. A driver
killed before that leaves gates that read EOF on stdin, find no value file and exit 1 without
committing; a gate released (or fully prepared) before the kill commits the correct result.
``--started-at``/``--finished-at`` are passed when the gate is started after the effect ended;
a prewarmed gate cannot know them (they default to the commit time), so effectd's exact times
always go into ``metadata.effectd`` of ``result.json``. ``prewarm=0`` turns (b) off.

Exactly once
------------
Before each post the run's journal is re-read (incrementally) and an effect that already has an
``EFFECT_RESOLVED`` is skipped; ``task:post`` itself re-checks under ``run.lock`` and refuses a
second post ("is not requested" / "already resolved"), which the driver also counts as
"already resolved". Two drivers on one run are refused by a lock file in effectd's runtime dir.
A run whose journal already ends in ``RUN_COMPLETED``/``RUN_FAILED``/``RUN_HALTED`` is reported
without iterating it again (that would append another terminal event).

Kinds and result conventions (see :mod:`effectd.babysitter.sdk`)
------------------------------------------------------------------
* ``shell``: ``taskDef.shell.{command,args,cwd,env,timeout}`` via :func:`parse_shell_task`, run
  as argv (``bash -c`` for command lines). Exit 0 -> ``ok`` with the stdout string; anything else
  (non-zero, signal, timeout, cancelled, lost, could not start) -> ``ok`` with ``{success: false,
  exitCode, stdout, stderr, error}`` (:func:`shell_result_value`), so the process sees it.
* ``node``: ``[node, entry, *args]`` with ``env``/``cwd``/``timeoutMs``. Exit 0 -> ``ok`` with
  stdout parsed as JSON, or the stdout string when it is not JSON. Failure -> ``error``
  ``{name: "NodeTaskError", message, data: {exitCode, signal, timedOut, stdout, stderr}}`` (as
  the SDK's own executor does for node tasks; ``ctx.task`` throws, the process may catch it).
* ``sleep``: an effectd sleep effect of the remaining seconds to ``targetEpochMs``; posted ``ok``
  ``{sleptUntil: ISO}`` at or after the target, never before (posting early wakes the process
  early).
* ``exec_kinds={"agent": "my-runner {task_json}"}``: a shell effect (``bash -c``) where
  ``{task_json}`` is the quoted path of a JSON file holding the action (``{runDir, effectId,
  kind, label, taskDef, schedulerHints, action}``, written to
  ``RUN/tasks/<effectId>/artifacts/effectd-action.json``); ``{effect_id}`` and ``{run_dir}`` are
  replaced too. Exit 0 with JSON on stdout -> ``ok`` with that value; otherwise ``error``
  ``{name: "ExecKindError", ...}``.
* Any other kind (``agent``, ``breakpoint``, ``skill``, ``orchestrator_task``, ...) is left for
  someone else. When only such effects remain the driver stops with status ``waiting``
  (exit code :data:`EXIT_WAITING`) and lists them.

Scheduler hints: ``parallelGroupId`` -> effectd group ``bs-<gid>-<run dir name>``;
``maxConcurrency`` -> :meth:`Client.set_group_limit` on that group (cleared when the run ends);
``timeoutMs`` -> the effect's timeout when the task gives none; ``sleepUntilEpochMs`` -> sleep
target; ``background`` -> label ``babysitter.background`` (everything runs in the background
anyway); ``pollIntervalMs`` is not needed (parked waits, no polling).

When the run ends (completed or failed) effects of the run that are still running in effectd are
cancelled (nobody can post them any more). When the driver stops for any other reason (waiting,
timeout, interrupt, SDK error) they keep running and a new driver picks them up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from effectd.babysitter.sdk import (
    _JOURNAL_NAME,
    BabysitterCli,
    BabysitterError,
    IterateResult,
    PendingEffect,
    _iso,
    _json_dumps,
    _parse_trailing_json,
    parse_node_task,
    parse_shell_task,
    parse_sleep,
    shell_argv,
    shell_result_value,
    sleep_result_value,
)
from effectd.ipc.constants import EXIT_CANCELLED, EXIT_FAILED, EXIT_TIMED_OUT
from effectd.ipc.flock import try_lock, write_holder

if TYPE_CHECKING:
    from effectd.client import Client, EffectRecord

__all__ = [
    "EXIT_COMPLETED",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_TIMED_OUT",
    "EXIT_WAITING",
    "DriveError",
    "DriveEvent",
    "DriveResult",
    "Driver",
    "EffectOutcome",
    "drive",
]

EXIT_COMPLETED = 0
EXIT_WAITING = 6
"""Only effects of kinds the driver does not run remain pending (someone else must post them)."""
EXIT_INTERRUPTED = EXIT_CANCELLED

SUPPORTED_KINDS = ("shell", "node", "sleep")
WAIT_SLICE = 5.0
"""A waiter thread re-arms its parked wait this often (only to notice that the driver stopped)."""
WAIT_CHUNK = 32
"""Effects per waiter thread: a wait reply carries every waited record in full, so one wait on
N effects costs O(N) per completion; chunks keep that bounded."""
LOCK_RETRIES = 3
"""SDK calls that fail on ``run.lock`` held by someone else (after the SDK's own ~10 s) are retried."""
MAX_GATES = 8
"""Gated posts alive at once (each is a Node process of ~75 MB)."""
PREWARM_SLEEP_HORIZON = 5.0
"""A sleep effect gets a prewarmed post only when its target is this close (seconds)."""
_TAIL = 4000
_LIFECYCLE = ("RUN_COMPLETED", "RUN_FAILED", "RUN_HALTED")


class DriveError(Exception):
    """The driver cannot go on (e.g. another driver holds the run, or an SDK call failed)."""


# --------------------------------------------------------------------------------------------
# Results and events


@dataclass
class EffectOutcome:
    """What the driver did with one babysitter effect."""

    effect_id: str
    kind: str
    label: str
    effectd_id: str | None = None
    reused: bool = False
    """effectd already had it (an earlier driver submitted it)."""
    state: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    posted: str | None = None
    """``ok`` | ``error`` | ``already-resolved`` | None (not posted)."""
    posted_at: float | None = None
    post_seconds: float | None = None
    prewarmed: bool = False

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    def to_json(self) -> dict[str, Any]:
        return {
            "effect_id": self.effect_id,
            "kind": self.kind,
            "label": self.label,
            "effectd_id": self.effectd_id,
            "reused": self.reused,
            "state": self.state,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "duration": _round(self.duration),
            "posted": self.posted,
            "post_latency": _round(
                None
                if self.posted_at is None or self.finished_at is None
                else self.posted_at - self.finished_at
            ),
            "post_seconds": _round(self.post_seconds),
            "prewarmed": self.prewarmed,
        }


@dataclass
class DriveResult:
    """The outcome of :meth:`Driver.run`. ``status``: ``completed`` | ``failed`` | ``halted`` |
    ``waiting`` (only kinds nobody here runs are pending) | ``timed_out`` | ``interrupted``."""

    run_dir: Path
    status: str
    output: Any = None
    error: Any = None
    iterations: int = 0
    posts: int = 0
    iterate_seconds: float = 0.0
    post_seconds: float = 0.0
    elapsed: float = 0.0
    effects: list[EffectOutcome] = field(default_factory=list)
    waiting_on: list[PendingEffect] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    already_terminal: bool = False

    @property
    def exit_code(self) -> int:
        return {
            "completed": EXIT_COMPLETED,
            "waiting": EXIT_WAITING,
            "timed_out": EXIT_TIMED_OUT,
            "interrupted": EXIT_INTERRUPTED,
        }.get(self.status, EXIT_FAILED)

    @property
    def waiting_summary(self) -> str:
        """``waiting on 2 effects of kinds agent (1), breakpoint (1): ...`` (empty if none)."""
        if not self.waiting_on:
            return ""
        kinds: dict[str, int] = {}
        for e in self.waiting_on:
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
        what = ", ".join(f"{k} ({n})" for k, n in sorted(kinds.items()))
        items = "; ".join(f"{e.effect_id} {e.kind} {e.display_name!r}" for e in self.waiting_on)
        n = len(self.waiting_on)
        return f"waiting on {n} effect{'s' if n != 1 else ''} of kinds {what}: {items}"

    @property
    def error_message(self) -> str:
        err = self.error
        if isinstance(err, Mapping):
            name, message = err.get("name"), err.get("message")
            if name or message:
                return f"{name or 'Error'}: {message or ''}".rstrip(": ")
        return "" if err is None else str(err)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "status": self.status,
            "exit_code": self.exit_code,
            "output": self.output,
            "error": self.error,
            "already_terminal": self.already_terminal,
            "iterations": self.iterations,
            "posts": self.posts,
            "effects_run": sum(1 for e in self.effects if e.effectd_id and not e.reused),
            "effects_reused": sum(1 for e in self.effects if e.reused),
            "posted": sum(1 for e in self.effects if e.posted in ("ok", "error")),
            "already_resolved": sum(1 for e in self.effects if e.posted == "already-resolved"),
            "elapsed": _round(self.elapsed),
            "iterate_seconds": _round(self.iterate_seconds),
            "post_seconds": _round(self.post_seconds),
            "effects": [e.to_json() for e in self.effects],
            "waiting_on": [
                {"effect_id": e.effect_id, "kind": e.kind, "label": e.display_name}
                for e in self.waiting_on
            ],
            "cancelled": list(self.cancelled),
        }


@dataclass(frozen=True)
class DriveEvent:
    """A progress event. ``kind``: ``iterated`` | ``started`` | ``reused`` | ``finished`` |
    ``posted`` | ``skipped`` | ``unsupported`` | ``cancelled`` | ``retry``."""

    kind: str
    message: str
    at: float
    """Seconds since the driver started."""
    effect_id: str | None = None
    running: int = 0
    posted: int = 0


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# --------------------------------------------------------------------------------------------
# Internals


@dataclass
class _Tracked:
    effect: PendingEffect
    outcome: EffectOutcome
    gate: _Gate | None = None
    record: EffectRecord | None = None
    target_ms: int | None = None  # sleep
    status: str = "ok"  # what the post will be
    payload: Any = None  # value (ok) or error payload (error)
    stdout: str = ""
    stderr: str = ""
    ready: bool = False  # finished, result computed, waiting for its post
    done: bool = False  # posted or skipped


class _Gate:
    """A ``task:post`` process started ahead of its turn and held before it touches the run."""

    def __init__(
        self,
        cli: BabysitterCli,
        run_dir: Path,
        effect_id: str,
        status: str,
        workdir: Path,
        serial: int,
        started_at: float | None = None,
        finished_at: float | None = None,
        with_output: bool = True,
    ) -> None:
        self.effect_id = effect_id
        self.status = status
        self.with_output = with_output
        base = workdir / f"{effect_id}.{serial}"
        self.stdout_path = Path(f"{base}.stdout")
        self.stderr_path = Path(f"{base}.stderr")
        self.payload_path = Path(f"{base}.{'value' if status == 'ok' else 'error'}.json")
        args = [
            "task:post", str(run_dir), effect_id, "--status", status, "--json",
            "--metadata", "-",
        ]
        if with_output:
            args += ["--stdout-file", str(self.stdout_path),
                     "--stderr-file", str(self.stderr_path)]
        args += ["--value" if status == "ok" else "--error", str(self.payload_path)]
        for flag, when in (("--started-at", started_at), ("--finished-at", finished_at)):
            iso = _iso(when)
            if iso is not None:
                args += [flag, iso]
        self.argv = [*cli.command, *args]
        self.timeout = cli.timeout
        env = None if cli.env is None else {**os.environ, **cli.env}
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env,
        )
        self.spawned = time.monotonic()

    def fill(self, stdout: str, stderr: str, payload: Any) -> None:
        """Write the files the post reads after its gate; the payload last, by rename."""
        if self.with_output:
            self.stdout_path.write_text(stdout, encoding="utf-8")
            self.stderr_path.write_text(stderr, encoding="utf-8")
        tmp = Path(f"{self.payload_path}.tmp")
        tmp.write_text(_json_dumps(payload), encoding="utf-8")
        os.replace(tmp, self.payload_path)

    def release(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """Open the gate and wait for the commit (lane thread only)."""
        try:
            out, err = self.proc.communicate(
                _json_dumps(dict(metadata)).encode(), timeout=self.timeout
            )
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise BabysitterError(
                f"babysitter task:post timed out after {self.timeout:g} s",
                command=self.argv, exit_code=None,
            ) from exc
        stdout = out.decode("utf-8", errors="replace")
        stderr = err.decode("utf-8", errors="replace")
        expected = 0 if self.status == "ok" else 1
        parsed: Any = None
        with contextlib.suppress(ValueError):
            parsed = _parse_trailing_json(stdout) if stdout.strip() else None
        if (
            self.proc.returncode == expected
            and isinstance(parsed, dict)
            and parsed.get("status") == self.status
            and isinstance(parsed.get("committed"), dict)
        ):
            return parsed
        raise BabysitterError(
            f"babysitter task:post {self.effect_id} --status {self.status} did not commit",
            command=self.argv, exit_code=self.proc.returncode, stdout=stdout, stderr=stderr,
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.communicate(timeout=10)

    def cleanup(self) -> None:
        for path in (self.stdout_path, self.stderr_path, self.payload_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class _JournalTail:
    """Reads ``journal/`` incrementally: resolved effect ids and the last lifecycle event."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / "journal"
        self.seen: set[str] = set()
        self.resolved: dict[str, int] = {}
        self.last_lifecycle: tuple[str, dict[str, Any]] | None = None

    def refresh(self) -> None:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return
        fresh = []
        for name in names:
            if name in self.seen:
                continue
            match = _JOURNAL_NAME.match(name)
            if match:
                fresh.append((int(match.group(1)), name))
        for _, name in sorted(fresh):
            try:
                with open(self.dir / name, encoding="utf-8") as fh:
                    body = json.load(fh)
            except (OSError, ValueError):
                continue
            self.seen.add(name)
            if not isinstance(body, dict):
                continue
            raw = body.get("data")
            data: dict[str, Any] = raw if isinstance(raw, dict) else {}
            kind = body.get("type")
            if kind == "EFFECT_RESOLVED" and isinstance(data.get("effectId"), str):
                self.resolved[data["effectId"]] = self.resolved.get(data["effectId"], 0) + 1
            elif kind in _LIFECYCLE:
                self.last_lifecycle = (str(kind), data)


def _run_hash(run_dir: Path) -> str:
    return hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]


def _tail(text: str) -> str:
    return text[-_TAIL:]


def _json_or_none(text: str) -> tuple[bool, Any]:
    stripped = text.strip()
    if not stripped:
        return False, None
    try:
        return True, json.loads(stripped)
    except ValueError:
        return False, None


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if value >= 1 else None


def _ms(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return float(value) / 1000.0 if value > 0 else None


# --------------------------------------------------------------------------------------------
# The driver


class Driver:
    """Drives one run to its end (or until only unsupported kinds remain).

    *babysitter*: a :class:`BabysitterCli`, or its command (path, command line or argv).
    *client*: an effectd :class:`~effectd.client.Client`; else one is made from *runtime*/*state*
    (``None``: the environment's defaults) with *autostart*. The driver closes only a client it
    made. *exec_kinds*: ``{kind: command template}`` (see the module notes). *prewarm*: how many
    posts may be started ahead for running effects (0: only when an effect finishes).
    *timeout*: give up after this many seconds (status ``timed_out``; effects keep running).
    *on_event*: called with a :class:`DriveEvent` for progress (from the driver's thread).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        babysitter: BabysitterCli | str | Sequence[str] = "babysitter",
        client: Client | None = None,
        runtime: str | os.PathLike[str] | None = None,
        state: str | os.PathLike[str] | None = None,
        autostart: bool = True,
        exec_kinds: Mapping[str, str] | None = None,
        node: str = "node",
        prewarm: int = 4,
        timeout: float | None = None,
        on_event: Callable[[DriveEvent], None] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        if not (self.run_dir / "run.json").is_file():
            raise DriveError(f"{self.run_dir} is not a babysitter run directory (no run.json)")
        self.cli = babysitter if isinstance(babysitter, BabysitterCli) else BabysitterCli(babysitter)
        self._own_client = client is None
        if client is None:
            from effectd.client import Client

            client = Client(runtime, state=state, autostart=autostart)
        self.client = client
        self.exec_kinds = dict(exec_kinds or {})
        for kind in self.exec_kinds:
            if kind in SUPPORTED_KINDS:
                raise ValueError(f"--exec-kind cannot replace the built-in kind {kind!r}")
        self.node = node
        self.prewarm = max(0, prewarm)
        self.timeout = timeout
        self.on_event = on_event
        self.cwd = Path(cwd).resolve() if cwd is not None else Path.cwd()
        self.run_key = _run_hash(self.run_dir)

        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._lane_jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._stop = threading.Event()
        self._tracked: dict[str, _Tracked] = {}
        self._by_effectd: dict[str, str] = {}
        self._unsupported: dict[str, PendingEffect] = {}
        self._ready: list[str] = []
        self._lane_busy = False
        self._need_iterate = True
        self._terminal: IterateResult | None = None
        self._groups_limited: set[str] = set()
        self._gate_serial = 0
        self._threads: list[threading.Thread] = []
        self._timers: list[threading.Timer] = []
        self._result = DriveResult(run_dir=self.run_dir, status="running")
        self._t0 = time.monotonic()
        self._journal = _JournalTail(self.run_dir)

    # ---- public ---------------------------------------------------------------------------

    def run(self) -> DriveResult:
        """Drive the run; returns when it completed/failed, only unsupported kinds remain, the
        timeout passed, or on KeyboardInterrupt (status ``interrupted``)."""
        self._t0 = time.monotonic()
        lock = self._acquire_driver_lock()
        workdir = Path(tempfile.mkdtemp(prefix="effectd-bs-"))
        self._workdir = workdir
        lane = threading.Thread(target=self._lane, name="babysitter-lane", daemon=True)
        try:
            self.client.connect()
            self._journal.refresh()
            if self._journal.last_lifecycle is not None:
                return self._finish_already_terminal()
            lane.start()
            self._loop()
            return self._result
        except KeyboardInterrupt:
            self._result.status = "interrupted"
            return self._result
        finally:
            self._stop.set()
            self._lane_jobs.put(None)
            for timer in self._timers:
                timer.cancel()
            if lane.is_alive():  # let a post that was released finish its commit
                lane.join(timeout=self.cli.timeout)
            for tracked in self._tracked.values():  # gates never released: no commit
                if tracked.gate is not None:
                    tracked.gate.kill()
                    tracked.gate.cleanup()
            shutil.rmtree(workdir, ignore_errors=True)
            self._result.elapsed = time.monotonic() - self._t0
            self._result.effects = [t.outcome for t in self._tracked.values()]
            self._result.waiting_on = (
                list(self._unsupported.values()) if self._result.status == "waiting" else []
            )
            if self._own_client:
                self.client.close()
            os.close(lock)

    # ---- the loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        deadline = None if self.timeout is None else self._t0 + self.timeout
        while True:
            if self._pump():
                return
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                event = self._events.get(timeout=left)
            except queue.Empty:
                self._result.status = "timed_out"
                return
            self._handle(event)

    def _pump(self) -> bool:
        """Start the next SDK call if the lane is free; True when the drive is over."""
        if self._lane_busy:
            return False
        if self._terminal is not None:
            self._finish_terminal(self._terminal)
            return True
        while self._ready:
            effect_id = self._ready.pop(0)
            if self._start_post(effect_id):
                return False
        if self._need_iterate:
            self._need_iterate = False
            self._lane_busy = True
            self._lane_jobs.put(self._job_iterate)
            return False
        in_flight = [t for t in self._tracked.values() if not t.done]
        if not in_flight:
            if self._unsupported:
                self._result.status = "waiting"
                return True
            raise DriveError(
                f"run:iterate reports status 'waiting' with nothing to run at {self.run_dir}"
            )
        return False

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "iterated":
            self._lane_busy = False
            self._on_iterated(event[1], event[2])
        elif kind == "posted":
            self._lane_busy = False
            self._on_posted(event[1], event[2], event[3])
        elif kind == "done":
            records: list[EffectRecord] = event[1]
            for rec in sorted(records, key=lambda r: (r.finished_at or 0.0, r.id)):
                self._on_finished(rec)
        elif kind == "sleep-due":
            self._mark_ready(event[1])
        elif kind in ("wait-error", "lane-error"):
            raise event[1]
        self._refill_gates()

    # ---- SDK lane ---------------------------------------------------------------------------

    def _lane(self) -> None:
        while True:
            job = self._lane_jobs.get()
            if job is None:
                return
            try:
                job()
            except BaseException as exc:  # handed to the driver thread
                self._events.put(("lane-error", exc))

    def _job_iterate(self) -> None:
        started = time.monotonic()
        outcome: IterateResult | BabysitterError
        for attempt in range(LOCK_RETRIES + 1):
            try:
                outcome = self.cli.iterate(self.run_dir)
                break
            except BabysitterError as exc:
                outcome = exc
                if not exc.lock_contention or attempt == LOCK_RETRIES:
                    break
        self._events.put(("iterated", outcome, time.monotonic() - started))

    def _job_post(self, tracked: _Tracked, gate: _Gate, metadata: dict[str, Any]) -> None:
        started = time.monotonic()
        outcome: dict[str, Any] | BabysitterError
        try:
            outcome = gate.release(metadata)
        except BabysitterError as exc:
            outcome = exc
            if not _already_resolved(exc):
                # A gate can fail on its own (its pre-gate journal read, a lock held too long by
                # someone else): retry with ordinary posts.
                for _ in range(LOCK_RETRIES):
                    try:
                        outcome = self._cold_post(tracked, metadata)
                        break
                    except BabysitterError as again:
                        outcome = again
                        if _already_resolved(again) or not again.lock_contention:
                            break
        self._events.put(("posted", tracked.effect.effect_id, outcome, time.monotonic() - started))

    def _cold_post(self, tracked: _Tracked, metadata: dict[str, Any]) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="effectd-bs-post-") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            out.write_text(tracked.stdout, encoding="utf-8")
            err.write_text(tracked.stderr, encoding="utf-8")
            rec = tracked.record
            with_output = tracked.effect.kind != "sleep"
            common: dict[str, Any] = {
                "stdout_file": out if with_output else None,
                "stderr_file": err if with_output else None,
                "metadata": metadata,
                "started_at": rec.started_at if rec else None,
                "finished_at": rec.finished_at if rec else None,
            }
            if tracked.status == "ok":
                return self.cli.post(
                    self.run_dir, tracked.effect.effect_id, status="ok", value=tracked.payload,
                    **common,
                )
            return self.cli.post(
                self.run_dir, tracked.effect.effect_id, status="error", error=tracked.payload,
                **common,
            )

    # ---- iterate results ------------------------------------------------------------------

    def _on_iterated(self, outcome: IterateResult | BabysitterError, seconds: float) -> None:
        self._result.iterate_seconds += seconds
        if isinstance(outcome, BabysitterError):
            raise DriveError(f"run:iterate failed for {self.run_dir}:\n{outcome}") from outcome
        self._result.iterations += 1
        if outcome.terminal:
            self._terminal = outcome
            self._emit("iterated", f"iterate {self._result.iterations} ({seconds:.2f} s): "
                       f"{outcome.status}")
            return
        if outcome.status != "waiting":
            raise DriveError(f"run:iterate returned status {outcome.status!r}: {outcome.raw}")
        new: list[_Tracked] = []
        for effect in outcome.pending:
            if effect.effect_id in self._tracked or effect.effect_id in self._unsupported:
                continue
            if effect.kind in SUPPORTED_KINDS or effect.kind in self.exec_kinds:
                new.append(self._track(effect))
            else:
                self._unsupported[effect.effect_id] = effect
                self._emit("unsupported", f"waiting for someone else: {effect.kind} effect "
                           f"{effect.effect_id} {effect.display_name!r}", effect.effect_id)
        listed = {e.effect_id for e in outcome.pending}
        for effect_id in list(self._unsupported):
            if effect_id not in listed:  # resolved by someone else meanwhile
                del self._unsupported[effect_id]
        kinds: dict[str, int] = {}
        for t in new:
            kinds[t.effect.kind] = kinds.get(t.effect.kind, 0) + 1
        self._emit("iterated", f"iterate {self._result.iterations} ({seconds:.2f} s): "
                   f"{outcome.reason or outcome.status}, {len(new)} new"
                   + (" (" + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + ")"
                      if kinds else ""))
        self._start(new)

    def _track(self, effect: PendingEffect) -> _Tracked:
        outcome = EffectOutcome(effect.effect_id, effect.kind, effect.display_name)
        tracked = _Tracked(effect, outcome)
        self._tracked[effect.effect_id] = tracked
        return tracked

    # ---- starting effects -----------------------------------------------------------------

    def _labels(self, effect: PendingEffect) -> dict[str, str]:
        labels = {
            "babysitter.run": str(self.run_dir),
            "babysitter.effect": effect.effect_id,
            "babysitter.kind": effect.kind,
            "babysitter.label": effect.display_name[:1000],
        }
        if effect.scheduler_hints.get("background") is True:
            labels["babysitter.background"] = "true"
        return labels

    def _group(self, effect: PendingEffect) -> str | None:
        gid = effect.parallel_group_id
        if gid is None:
            return None
        name = f"bs-{gid}-{self.run_dir.name}"[:128]
        limit = _positive_int(effect.scheduler_hints.get("maxConcurrency"))
        if limit is not None and name not in self._groups_limited:
            self.client.set_group_limit(name, limit)
            self._groups_limited.add(name)
        return name

    def _start(self, new: list[_Tracked]) -> None:
        """Look each new effect up in effectd (an earlier driver may have submitted it), submit
        the others in one atomic ``submit_many``, and park waits on all of them."""
        from effectd.ipc.errors import BadRequest

        watch: list[str] = []
        to_submit: list[tuple[_Tracked, dict[str, Any]]] = []
        for tracked in new:
            effect = tracked.effect
            if effect.kind == "sleep":
                tracked.target_ms = self._sleep_target(effect)
            existing = self.client.list(labels={"babysitter.effect": effect.effect_id,
                                                "babysitter.run": str(self.run_dir)}, limit=10)
            if existing:
                rec = next((r for r in existing if not r.final), existing[0])
                tracked.outcome.effectd_id = rec.id
                tracked.outcome.reused = True
                self._by_effectd[rec.id] = effect.effect_id
                self._emit("reused", f"picked up {effect.display_name} [{effect.kind}] "
                           f"{effect.effect_id}: effectd {rec.id} is {rec.state.value}",
                           effect.effect_id)
                if rec.final:
                    self._on_finished(rec)
                else:
                    watch.append(rec.id)
                continue
            try:
                to_submit.append((tracked, self._spec(tracked)))
            except (ValueError, OSError) as exc:
                self._fail_unrunnable(tracked, str(exc))
        ids: list[str | None] = []
        if to_submit:
            try:
                ids = list(self.client.submit_many([spec for _, spec in to_submit]))
            except BadRequest:  # find the culprit: one at a time
                ids = []
                for tracked, spec in to_submit:
                    try:
                        ids.append(self.client.submit(spec))
                    except BadRequest as exc:
                        ids.append(None)
                        self._fail_unrunnable(tracked, f"effectd refused it: {exc}")
        for (tracked, _), eid in zip(to_submit, ids, strict=True):
            if eid is None:
                continue
            effect = tracked.effect
            tracked.outcome.effectd_id = eid
            self._by_effectd[eid] = effect.effect_id
            watch.append(eid)
            self._emit("started", f"started {effect.display_name} [{effect.kind}] "
                       f"{effect.effect_id} as effectd {eid}", effect.effect_id)
        for i in range(0, len(watch), WAIT_CHUNK):
            waiter = threading.Thread(target=self._waiter, args=(watch[i:i + WAIT_CHUNK],),
                                      name="babysitter-wait", daemon=True)
            self._threads.append(waiter)
            waiter.start()

    def _sleep_target(self, effect: PendingEffect) -> int:
        try:
            return parse_sleep(effect)
        except ValueError:
            return 0  # no target: already due

    def _common(self, tracked: _Tracked, timeout: float | None) -> dict[str, Any]:
        effect = tracked.effect
        if timeout is None:
            timeout = _ms(effect.scheduler_hints.get("timeoutMs"))
        spec: dict[str, Any] = {
            "name": f"bs:{effect.display_name}"[:256],
            "labels": self._labels(effect),
        }
        group = self._group(effect)
        if group is not None:
            spec["group"] = group
        if timeout is not None:
            spec["timeout"] = timeout
        return spec

    def _cwd(self, cwd: str | None) -> str:
        return str(self.cwd / cwd) if cwd else str(self.cwd)

    def _spec(self, tracked: _Tracked) -> dict[str, Any]:
        from effectd.client import shell_spec, sleep_spec

        effect = tracked.effect
        kind = effect.kind
        if kind == "shell":
            sh = parse_shell_task(effect)
            return shell_spec(shell_argv(sh.command), cwd=self._cwd(sh.cwd), env=sh.env,
                              **self._common(tracked, sh.timeout))
        if kind == "node":
            nd = parse_node_task(effect, node=self.node)
            return shell_spec(nd.argv, cwd=self._cwd(nd.cwd), env=nd.env,
                              **self._common(tracked, nd.timeout))
        if kind == "sleep":
            assert tracked.target_ms is not None
            seconds = max(0.0, tracked.target_ms / 1000.0 - time.time())
            common = self._common(tracked, None)
            common.pop("timeout", None)
            return sleep_spec(round(seconds, 3), **common)
        template = self.exec_kinds[kind]
        action_path = self.run_dir / "tasks" / effect.effect_id / "artifacts" / "effectd-action.json"
        action_path.parent.mkdir(parents=True, exist_ok=True)
        action_path.write_text(_json_dumps({
            "runDir": str(self.run_dir), "effectId": effect.effect_id, "kind": kind,
            "label": effect.display_name, "taskDef": effect.task_def,
            "schedulerHints": effect.scheduler_hints, "action": effect.raw,
        }), encoding="utf-8")
        command = (template.replace("{task_json}", shlex.quote(str(action_path)))
                   .replace("{effect_id}", shlex.quote(effect.effect_id))
                   .replace("{run_dir}", shlex.quote(str(self.run_dir))))
        env = {"BABYSITTER_RUN_DIR": str(self.run_dir), "BABYSITTER_EFFECT_ID": effect.effect_id,
               "BABYSITTER_TASK_JSON": str(action_path)}
        return shell_spec(shell_argv(command), cwd=str(self.cwd), env=env,
                          **self._common(tracked, None))

    def _fail_unrunnable(self, tracked: _Tracked, message: str) -> None:
        """A task definition the driver cannot turn into an effect: post it as failed."""
        self._emit("finished", f"cannot run {tracked.effect.display_name}: {message}",
                   tracked.effect.effect_id)
        if tracked.effect.kind == "shell":
            tracked.status, tracked.payload = "ok", shell_result_value(None, "", "", error=message)
        else:
            tracked.status = "error"
            tracked.payload = {"name": "EffectdDriverError", "message": message}
        tracked.outcome.state = "not-run"
        self._mark_ready(tracked.effect.effect_id)

    # ---- waiting --------------------------------------------------------------------------

    def _waiter(self, ids: list[str]) -> None:
        from effectd.client import Client

        pending = list(ids)
        try:
            with Client(self.client.runtime, state=self.client.state, autostart=False) as c:
                while pending and not self._stop.is_set():
                    records = c.wait_many(pending, timeout=WAIT_SLICE, return_when="first")
                    done = [r for r in records if r.final]
                    if done:
                        for r in done:
                            pending.remove(r.id)
                        self._events.put(("done", done))
        except Exception as exc:  # handed to the driver thread
            if not self._stop.is_set():
                self._events.put(("wait-error", exc))

    def _on_finished(self, rec: EffectRecord) -> None:
        effect_id = self._by_effectd.get(rec.id)
        if effect_id is None:
            return
        tracked = self._tracked[effect_id]
        if tracked.record is not None:
            return
        tracked.record = rec
        out = tracked.outcome
        out.state, out.exit_code, out.signal = rec.state.value, rec.exit_code, rec.signal
        out.started_at, out.finished_at = rec.started_at, rec.finished_at
        self._compute_result(tracked, rec)
        took = f" in {rec.duration:.2f} s" if rec.duration is not None else ""
        how = f"exit {rec.exit_code}" if rec.exit_code is not None else rec.state.value
        if rec.signal:
            how += f" signal {rec.signal}"
        self._emit("finished", f"finished {tracked.effect.display_name} [{tracked.effect.kind}]: "
                   f"{how}{took}", effect_id)
        if tracked.effect.kind == "sleep" and tracked.target_ms is not None:
            early = tracked.target_ms / 1000.0 - time.time()
            if early > 0:  # never post a sleep before its target
                timer = threading.Timer(early + 0.001, self._events.put,
                                        args=(("sleep-due", effect_id),))
                timer.daemon = True
                self._timers.append(timer)
                timer.start()
                return
        self._mark_ready(effect_id)

    def _compute_result(self, tracked: _Tracked, rec: EffectRecord) -> None:
        from effectd.ipc.schema import EffectState

        kind = tracked.effect.kind
        if kind == "sleep":
            tracked.status, tracked.payload = "ok", None  # value computed when posted
            return
        stdout = self.client.output(rec.id, "stdout").decode("utf-8", errors="replace")
        stderr = self.client.output(rec.id, "stderr").decode("utf-8", errors="replace")
        tracked.stdout, tracked.stderr = stdout, stderr
        timed_out = rec.state is EffectState.TIMED_OUT
        problem: str | None = None
        if rec.state in (EffectState.CANCELLED, EffectState.LOST):
            problem = f"effect {rec.state.value}" + (f": {rec.reason}" if rec.reason else "")
        elif rec.state is EffectState.FAILED and rec.exit_code is None and rec.signal is None:
            problem = (rec.error.message if rec.error else None) or rec.reason or "did not run"
        exit_code = rec.exit_code if rec.signal is None else None
        if kind == "shell":
            tracked.status = "ok"
            tracked.payload = shell_result_value(exit_code, stdout, stderr, signal=rec.signal,
                                                 timed_out=timed_out, error=problem)
            return
        name = "NodeTaskError" if kind == "node" else "ExecKindError"
        what = "node task" if kind == "node" else f"{kind} command"
        if rec.state is EffectState.SUCCEEDED:
            is_json, value = _json_or_none(stdout)
            if is_json or kind == "node":
                tracked.status, tracked.payload = "ok", value if is_json else stdout
                return
            problem = "exited 0 but printed no JSON on stdout"
        if problem is None:
            if timed_out:
                problem = "timed out"
            elif rec.signal is not None:
                problem = f"killed by signal {rec.signal}"
            else:
                problem = f"exited with code {rec.exit_code}"
        tracked.status = "error"
        tracked.payload = {
            "name": name,
            "message": f"{what} {tracked.effect.display_name!r} {problem}"
            + (f": {_tail(stderr.strip())[-500:]}" if stderr.strip() else ""),
            "data": {"exitCode": exit_code, "signal": rec.signal, "timedOut": timed_out,
                     "stdout": _tail(stdout), "stderr": _tail(stderr)},
        }

    def _mark_ready(self, effect_id: str) -> None:
        tracked = self._tracked[effect_id]
        if tracked.ready or tracked.done:
            return
        tracked.ready = True
        self._ready.append(effect_id)
        self._ready.sort(key=self._completion_key)

    def _completion_key(self, effect_id: str) -> tuple[float, str]:
        rec = self._tracked[effect_id].record
        finished = rec.finished_at if rec is not None and rec.finished_at is not None else 0.0
        return (finished, rec.id if rec is not None else effect_id)

    # ---- posting --------------------------------------------------------------------------

    def _spawn_gate(self, tracked: _Tracked, *, ahead: bool = False) -> None:
        """Give the effect a gated post for its current status (replacing one that does not fit)."""
        if tracked.gate is not None:
            if tracked.gate.status == tracked.status and tracked.gate.proc.poll() is None:
                return
            tracked.gate.kill()
            tracked.gate.cleanup()
            tracked.gate = None
        self._gate_serial += 1
        rec = None if ahead else tracked.record
        try:
            tracked.gate = _Gate(
                self.cli, self.run_dir, tracked.effect.effect_id, tracked.status, self._workdir,
                self._gate_serial,
                started_at=rec.started_at if rec is not None else None,
                finished_at=rec.finished_at if rec is not None else None,
                with_output=tracked.effect.kind != "sleep",
            )
        except OSError as exc:
            raise DriveError(f"cannot run babysitter ({shlex.join(self.cli.command)}): {exc}"
                             ) from exc
        tracked.outcome.prewarmed = ahead

    def _refill_gates(self) -> None:
        """Start gated posts, at most MAX_GATES alive: first for finished effects in completion
        order (their Node start-up overlaps the SDK call that runs now), then up to ``prewarm``
        ahead for running effects."""
        live = [t for t in self._tracked.values() if t.gate is not None and not t.done]
        for t in live:  # a prewarmed gate that guessed the status wrong is replaced
            if t.ready and t.gate is not None and t.gate.status != t.status:
                t.gate.kill()
                t.gate.cleanup()
                t.gate = None
        budget = MAX_GATES - sum(1 for t in live if t.gate is not None)
        for effect_id in self._ready:
            if budget <= 0:
                return
            tracked = self._tracked[effect_id]
            if tracked.gate is None:
                self._spawn_gate(tracked)
                budget -= 1
        ahead = sum(1 for t in live if t.gate is not None and not t.ready)
        now = time.time()
        for tracked in self._tracked.values():
            if budget <= 0 or ahead >= self.prewarm:
                return
            if tracked.gate is not None or tracked.done or tracked.ready:
                continue
            if tracked.outcome.effectd_id is None:
                continue
            if (tracked.target_ms is not None
                    and tracked.target_ms / 1000.0 - now > PREWARM_SLEEP_HORIZON):
                continue
            if tracked.record is None:
                tracked.status = "ok"
            self._spawn_gate(tracked, ahead=tracked.record is None)
            budget -= 1
            ahead += 1

    def _start_post(self, effect_id: str) -> bool:
        """Hand the effect's post to the lane; False if it was skipped (already resolved)."""
        tracked = self._tracked[effect_id]
        self._journal.refresh()
        if effect_id in self._journal.resolved:
            self._skip(tracked, "already resolved in the journal")
            return False
        if tracked.effect.kind == "sleep":
            tracked.payload = sleep_result_value()
        self._spawn_gate(tracked)  # no-op if the gate fits
        gate = tracked.gate
        assert gate is not None
        gate.fill(tracked.stdout, tracked.stderr, tracked.payload)
        rec = tracked.record
        metadata: dict[str, Any] = {"effectd": {
            "effectdId": tracked.outcome.effectd_id,
            "state": rec.state.value if rec else tracked.outcome.state,
            "exitCode": rec.exit_code if rec else None,
            "signal": rec.signal if rec else None,
            "startedAt": _iso(rec.started_at) if rec else None,
            "finishedAt": _iso(rec.finished_at) if rec else None,
            "durationSeconds": _round(rec.duration) if rec else None,
            "reused": tracked.outcome.reused,
        }}
        self._lane_busy = True
        self._lane_jobs.put(lambda: self._job_post(tracked, gate, metadata))
        return True

    def _skip(self, tracked: _Tracked, why: str) -> None:
        tracked.done = True
        tracked.outcome.posted = "already-resolved"
        if tracked.gate is not None:
            tracked.gate.kill()
            tracked.gate.cleanup()
            tracked.gate = None
        self._need_iterate = True
        self._emit("skipped", f"not posting {tracked.effect.display_name}: {why}",
                   tracked.effect.effect_id)

    def _on_posted(self, effect_id: str, outcome: dict[str, Any] | BabysitterError,
                   seconds: float) -> None:
        tracked = self._tracked[effect_id]
        if tracked.gate is not None:
            tracked.gate.cleanup()
            tracked.gate = None
        self._result.post_seconds += seconds
        if isinstance(outcome, BabysitterError):
            if _already_resolved(outcome):
                self._skip(tracked, "task:post says it is already resolved")
                return
            raise DriveError(f"task:post failed for {effect_id} in {self.run_dir}:\n{outcome}"
                             ) from outcome
        tracked.done = True
        tracked.outcome.posted = tracked.status
        tracked.outcome.posted_at = time.time()
        tracked.outcome.post_seconds = seconds
        self._result.posts += 1
        self._need_iterate = True
        self._emit("posted", f"posted {tracked.effect.display_name} ({tracked.status}, "
                   f"{seconds:.2f} s)", effect_id)

    # ---- the end --------------------------------------------------------------------------

    def _finish_terminal(self, res: IterateResult) -> None:
        self._result.status = res.status
        self._result.output = res.output
        self._result.error = res.error
        self._cleanup_run_effects()

    def _finish_already_terminal(self) -> DriveResult:
        assert self._journal.last_lifecycle is not None
        kind, data = self._journal.last_lifecycle
        self._result.already_terminal = True
        self._result.status = {"RUN_COMPLETED": "completed", "RUN_FAILED": "failed"}.get(
            kind, "halted")
        if kind == "RUN_COMPLETED":
            path = self.run_dir / "state" / "output.json"
            with contextlib.suppress(OSError, ValueError):
                self._result.output = json.loads(path.read_text(encoding="utf-8"))
        else:
            self._result.error = data.get("error") or data.get("reason")
        self._emit("iterated", f"the run is already {self._result.status}; not iterating it again")
        self._cleanup_run_effects()
        return self._result

    def _cleanup_run_effects(self) -> None:
        """The run is over: cancel its effects still running, clear group limits we set."""
        try:
            live = self.client.list(states=["queued", "running"],
                                    labels={"babysitter.run": str(self.run_dir)}, limit=10_000)
        except Exception:  # best effort
            live = []
        if live:
            self.client.cancel(*[r.id for r in live], reason="babysitter run ended")
            self._result.cancelled = [r.id for r in live]
            self._emit("cancelled", f"cancelled {len(live)} effect(s) still running: the run "
                       "ended without them")
        for name in self._groups_limited:
            with contextlib.suppress(Exception):
                self.client.set_group_limit(name, None)

    def _acquire_driver_lock(self) -> int:
        self.client.runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.client.runtime / f"babysitter-drive-{self.run_key}.lock"
        fd, holder = try_lock(path)
        if fd is None:
            raise DriveError(f"another driver (pid {holder.strip()[:64] or '?'}) is driving {self.run_dir}")
        write_holder(fd, str(os.getpid()))
        return fd

    def _emit(self, kind: str, message: str, effect_id: str | None = None) -> None:
        if self.on_event is None:
            return
        running = sum(1 for t in self._tracked.values() if t.record is None)
        posted = sum(1 for t in self._tracked.values() if t.done)
        self.on_event(DriveEvent(kind, message, time.monotonic() - self._t0, effect_id,
                                 running, posted))


def _already_resolved(exc: BabysitterError) -> bool:
    return exc.not_requested or "already resolved" in exc.stderr_tail


def drive(run_dir: str | os.PathLike[str], **options: Any) -> DriveResult:
    """``Driver(run_dir, **options).run()``."""
    return Driver(run_dir, **options).run()
