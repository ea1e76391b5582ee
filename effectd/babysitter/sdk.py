"""SDK-facing layer for a5c-ai *babysitter* runs: the ``babysitter`` CLI, the run journal, and
the result conventions an external effect executor must follow.

What the SDK does (its CLI commands, outputs and exit codes, ``run.lock``, the journal format, the
result conventions per kind and a replay limitation of 0.0.187) was checked by hand against the
published npm package ``@a5c-ai/babysitter-sdk@0.0.187`` and is written down in
docs/babysitter.md; it is pinned by ``tests/babysitter_sdk.sh`` and ``tests/test_babysitter_sdk.py``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, NamedTuple

__all__ = [
    "SDK_PACKAGE",
    "SDK_VERSION",
    "BabysitterCli",
    "BabysitterError",
    "IterateResult",
    "JournalEvent",
    "NodeTaskSpec",
    "PendingEffect",
    "ShellTaskSpec",
    "load_task_def",
    "parse_node_task",
    "parse_shell_task",
    "parse_sleep",
    "pending_effect_ids",
    "read_journal",
    "requested_effect_ids",
    "resolved_effect_ids",
    "shell_argv",
    "shell_result_value",
    "sleep_result_value",
]

SDK_PACKAGE = "@a5c-ai/babysitter-sdk"
SDK_VERSION = "0.0.187"

#: Values whose JSON is longer than this go through a temporary ``--value FILE`` instead of
#: ``--value-inline`` (Linux limits one argv string to 128 KiB).
INLINE_VALUE_LIMIT = 64 * 1024

_TAIL_CHARS = 4000
_JOURNAL_NAME = re.compile(r"^(\d+)\.([0-9A-Za-z]+)\.json$")
_TERMINAL_STATUSES = frozenset({"completed", "failed", "halted"})


# --------------------------------------------------------------------------------------------
# Errors


class BabysitterError(Exception):
    """A ``babysitter`` CLI call failed (non-zero exit without a committed result, unparsable
    output, timeout, or the binary could not be started)."""

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str],
        exit_code: int | None,
        stdout: str = "",
        stderr: str = "",
    ) -> None:
        self.message = message
        self.command = list(command)
        self.exit_code = exit_code
        self.stdout_tail = stdout[-_TAIL_CHARS:]
        self.stderr_tail = stderr[-_TAIL_CHARS:]
        super().__init__(message)

    @property
    def lock_contention(self) -> bool:
        """True when the SDK gave up waiting for another holder of ``run.lock``."""
        return "run.lock already held" in self.stderr_tail

    @property
    def not_requested(self) -> bool:
        """True when task:post refused because the effect is already resolved/cancelled."""
        return "is not requested" in self.stderr_tail

    def __str__(self) -> str:
        parts = [
            self.message,
            f"exit code: {self.exit_code}",
            f"command: {shlex.join(self.command)}",
        ]
        if self.stderr_tail.strip():
            parts.append("stderr (tail):\n" + self.stderr_tail.rstrip())
        return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Data model


def _as_dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


@dataclass(frozen=True)
class PendingEffect:
    """One element of ``nextActions`` from ``run:iterate --json``."""

    effect_id: str
    kind: str
    task_def: dict[str, Any]
    scheduler_hints: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_action(cls, action: Mapping[str, Any]) -> PendingEffect:
        effect_id = action.get("effectId")
        if not isinstance(effect_id, str) or not effect_id:
            raise ValueError(f"nextActions element without effectId: {action!r}")
        task_def = _as_dict(action.get("taskDef"))
        kind = action.get("kind") or task_def.get("kind") or ""
        return cls(
            effect_id=effect_id,
            kind=str(kind),
            task_def=task_def,
            scheduler_hints=_as_dict(action.get("schedulerHints")),
            raw=dict(action),
        )

    @property
    def label(self) -> str | None:
        value = self.raw.get("label")
        return value if isinstance(value, str) else None

    @property
    def title(self) -> str | None:
        value = self.task_def.get("title")
        return value if isinstance(value, str) else None

    @property
    def labels(self) -> list[str]:
        value = self.raw.get("labels")
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    @property
    def task_id(self) -> str | None:
        value = self.raw.get("taskId")
        return value if isinstance(value, str) else None

    @property
    def step_id(self) -> str | None:
        value = self.raw.get("stepId")
        return value if isinstance(value, str) else None

    @property
    def invocation_key(self) -> str | None:
        value = self.raw.get("invocationKey")
        return value if isinstance(value, str) else None

    @property
    def parallel_group_id(self) -> str | None:
        value = self.scheduler_hints.get("parallelGroupId")
        return value if isinstance(value, str) else None

    @property
    def display_name(self) -> str:
        """A short human name: label, else title, else task id, else effect id."""
        return self.label or self.title or self.task_id or self.effect_id


@dataclass(frozen=True)
class IterateResult:
    """The outcome of one ``run:iterate``.

    ``output`` is the process's return value (from ``state/output.json``) when completed;
    ``error`` is the last ``RUN_FAILED`` event's ``data.error`` when failed.
    """

    status: str
    pending: list[PendingEffect]
    output: Any
    error: Any
    raw: dict[str, Any] = field(repr=False)

    @property
    def reason(self) -> str | None:
        value = self.raw.get("reason")
        return value if isinstance(value, str) else None

    @property
    def completion_proof(self) -> str | None:
        value = self.raw.get("completionProof")
        return value if isinstance(value, str) else None

    @property
    def terminal(self) -> bool:
        """True for completed/failed/halted: iterating again would append another terminal
        event, so a driver stops here."""
        return self.status in _TERMINAL_STATUSES


class JournalEvent(NamedTuple):
    seq: int
    ulid: str
    type: str
    recorded_at: str | None
    data: dict[str, Any]
    path: Path


class ShellTaskSpec(NamedTuple):
    """What :func:`parse_shell_task` returns.

    ``command`` is a list (run directly) only when the task gave ``shell.args`` *and* a command
    without whitespace; otherwise it is one string for ``bash -c`` (see :func:`shell_argv`).
    ``timeout`` is in seconds (``None`` = none given); ``env`` holds only the task's own
    variables, to be layered over the executor's environment (``None`` = none given).
    """

    command: str | list[str]
    cwd: str | None
    timeout: float | None
    env: dict[str, str] | None


class NodeTaskSpec(NamedTuple):
    """What :func:`parse_node_task` returns: ``argv`` = ``["node", entry, *args]``."""

    argv: list[str]
    cwd: str | None
    env: dict[str, str] | None
    timeout: float | None


# --------------------------------------------------------------------------------------------
# JSON helpers


def _parse_trailing_json(text: str) -> Any:
    """Parse the JSON document at the end of *text*.

    The CLI prints a single JSON document, but a process's own ``console.log`` output can precede
    it on stdout, so try the whole text first, then every line start that begins a JSON object
    or array, from the last one upwards.
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError("empty output")
    try:
        return json.loads(stripped)
    except json.JSONDecodeError:
        pass
    starts = [m.start() for m in re.finditer(r"^[{\[]", text, flags=re.MULTILINE)]
    for start in reversed(starts):
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            continue
    raise ValueError("no JSON document at the end of the output")


def _json_dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _iso(value: datetime | str | float | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value, tz=timezone.utc)
    if value.tzinfo is None:
        value = value.astimezone()
    text = value.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _read_json_file(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


# --------------------------------------------------------------------------------------------
# The CLI wrapper


class BabysitterCli:
    """Thin, synchronous wrapper around the ``babysitter`` CLI.

    *command* is a path, a command line (``"npx -y -p @a5c-ai/babysitter-sdk@0.0.187
    babysitter"``, split with :func:`shlex.split`) or an argv list. *env* is layered over
    :data:`os.environ` for every call. *timeout* bounds each call (seconds); on expiry the CLI
    process is killed and :class:`BabysitterError` raised (exit_code None).

    Every method runs one Node process; calls are independent and may come from several threads,
    but the SDK serialises everything on one run through ``run.lock`` (waiting ~10 s at most).
    """

    def __init__(
        self,
        command: Sequence[str] | str = "babysitter",
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 120.0,
    ) -> None:
        if isinstance(command, str):
            argv = [command] if os.path.exists(command) else shlex.split(command)
        else:
            argv = [str(part) for part in command]
        if not argv:
            raise ValueError("empty babysitter command")
        self.command: list[str] = argv
        self.env: dict[str, str] | None = dict(env) if env is not None else None
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"BabysitterCli({shlex.join(self.command)!r})"

    # -- plumbing ---------------------------------------------------------------------------

    def _environment(self) -> dict[str, str] | None:
        if self.env is None:
            return None
        merged = dict(os.environ)
        merged.update(self.env)
        return merged

    def run_raw(
        self, args: Sequence[str], *, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``<command> *args`` and return the completed process, whatever its exit code."""
        argv = [*self.command, *args]
        try:
            return subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                encoding="utf-8",
                errors="replace",
                env=self._environment(),
                timeout=self.timeout if timeout is None else timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BabysitterError(
                f"babysitter timed out after {exc.timeout:g} s",
                command=argv,
                exit_code=None,
                stdout=_text(exc.stdout),
                stderr=_text(exc.stderr),
            ) from exc
        except OSError as exc:
            raise BabysitterError(
                f"cannot run babysitter: {exc}", command=argv, exit_code=None
            ) from exc

    def _run_json(self, args: Sequence[str]) -> dict[str, Any]:
        proc = self.run_raw(args)
        if proc.returncode != 0:
            raise BabysitterError(
                f"babysitter {args[0]} failed",
                command=proc.args,
                exit_code=proc.returncode,
                stdout=proc.stdout,
                stderr=proc.stderr,
            )
        try:
            parsed = _parse_trailing_json(proc.stdout)
        except ValueError as exc:
            raise BabysitterError(
                f"babysitter {args[0]} printed no JSON ({exc})",
                command=proc.args,
                exit_code=proc.returncode,
                stdout=proc.stdout,
                stderr=proc.stderr,
            ) from exc
        if not isinstance(parsed, dict):
            raise BabysitterError(
                f"babysitter {args[0]} printed JSON that is not an object",
                command=proc.args,
                exit_code=proc.returncode,
                stdout=proc.stdout,
                stderr=proc.stderr,
            )
        return parsed

    # -- commands ---------------------------------------------------------------------------

    def version(self) -> str:
        proc = self.run_raw(["--version"])
        if proc.returncode != 0:
            raise BabysitterError(
                "babysitter --version failed",
                command=proc.args,
                exit_code=proc.returncode,
                stdout=proc.stdout,
                stderr=proc.stderr,
            )
        return proc.stdout.strip()

    def create_run(
        self,
        process_file: Path,
        *,
        export: str = "process",
        run_dir: Path | None = None,
        runs_dir: Path | None = None,
        inputs: Any = None,
        process_id: str | None = None,
        run_id: str | None = None,
    ) -> Path:
        """Create a run for ``process_file#export`` and return its absolute run directory.

        Give either *run_dir* (its parent becomes ``--runs-dir``, its name the run id) or
        *runs_dir* (+ optional *run_id*; a ULID otherwise). *process_id* defaults to the file's
        stem. *inputs* (any JSON value, ``None`` = no inputs) becomes ``inputs.json``.
        """
        process_file = Path(process_file).resolve()
        if run_dir is not None:
            if runs_dir is not None or run_id is not None:
                raise ValueError("give run_dir, or runs_dir/run_id, not both")
            run_dir = Path(run_dir).absolute()
            runs_dir, run_id = run_dir.parent, run_dir.name
        if runs_dir is None:
            raise ValueError("create_run needs run_dir or runs_dir")
        runs_dir = Path(runs_dir).absolute()
        pid = process_id or process_file.stem
        args = [
            "run:create",
            "--process-id",
            pid,
            "--entry",
            f"{process_file}#{export}",
            "--runs-dir",
            str(runs_dir),
            "--json",
        ]
        if run_id is not None:
            args += ["--run-id", run_id]
        with tempfile.TemporaryDirectory(prefix="effectd-babysitter-") as tmp:
            if inputs is not None:
                inputs_path = Path(tmp) / "inputs.json"
                inputs_path.write_text(_json_dumps(inputs), encoding="utf-8")
                args += ["--inputs", str(inputs_path)]
            parsed = self._run_json(args)
        created = parsed.get("runDir")
        if not isinstance(created, str) or not created:
            raise BabysitterError(
                "run:create printed no runDir",
                command=[*self.command, *args],
                exit_code=0,
                stdout=json.dumps(parsed),
            )
        return Path(created)

    def iterate(self, run_dir: Path) -> IterateResult:
        """One ``run:iterate RUN_DIR --json``. Raises :class:`BabysitterError` on failure
        (including ``run.lock`` contention beyond the SDK's ~10 s wait)."""
        run_dir = Path(run_dir).absolute()
        raw = self._run_json(["run:iterate", str(run_dir), "--json"])
        status = str(raw.get("status") or "")
        actions = raw.get("nextActions")
        pending = (
            [PendingEffect.from_action(a) for a in actions if isinstance(a, Mapping)]
            if isinstance(actions, list)
            else []
        )
        output: Any = None
        error: Any = None
        if status == "completed":
            output_path = run_dir / "state" / "output.json"
            if output_path.exists():
                output = _read_json_file(output_path)
        elif status == "failed":
            for event in reversed(read_journal(run_dir)):
                if event.type in ("RUN_FAILED", "PROCESS_RUNTIME_ERROR"):
                    error = event.data.get("error")
                    break
        return IterateResult(status=status, pending=pending, output=output, error=error, raw=raw)

    def post(
        self,
        run_dir: Path,
        effect_id: str,
        *,
        status: Literal["ok", "error"],
        value: Any = None,
        error: Any = None,
        stdout_file: Path | None = None,
        stderr_file: Path | None = None,
        started_at: datetime | str | float | None = None,
        finished_at: datetime | str | float | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Resolve one effect with ``task:post`` and return the CLI's JSON
        (``{"status", "committed": {...}, "resultRef", "stdoutRef", "stderrRef"}``).

        ``ok`` posts *value* (any JSON value; ``None`` posts ``null``). ``error`` posts *error*:
        a mapping ``{name, message, data?}`` as is, an exception as ``{name: type, message}``,
        anything else as ``{name: "Error", message: str(error)}``. For shell effects post a
        failure as ``ok`` with :func:`shell_result_value` instead (see the module notes).
        The CLI exits 1 after committing an error; that is treated as success here. Everything
        else (unknown or already resolved effect, ``run.lock`` held too long, ...) raises
        :class:`BabysitterError`. Times may be datetimes, epoch seconds or ISO strings.
        """
        if status not in ("ok", "error"):
            raise ValueError(f"status must be 'ok' or 'error', not {status!r}")
        if status == "ok" and error is not None:
            raise ValueError("error= is only for status='error'")
        if status == "error" and value is not None:
            raise ValueError("value= is only for status='ok'")
        run_dir = Path(run_dir).absolute()
        args = ["task:post", str(run_dir), effect_id, "--status", status, "--json"]
        for flag, maybe_path in (("--stdout-file", stdout_file), ("--stderr-file", stderr_file)):
            if maybe_path is not None:
                args += [flag, str(Path(maybe_path).absolute())]
        for flag, when in (("--started-at", started_at), ("--finished-at", finished_at)):
            iso = _iso(when)
            if iso is not None:
                args += [flag, iso]
        with tempfile.TemporaryDirectory(prefix="effectd-babysitter-") as tmp:
            if status == "ok":
                text = _json_dumps(value)
                if len(text.encode("utf-8")) <= INLINE_VALUE_LIMIT:
                    args += ["--value-inline", text]
                else:
                    value_path = Path(tmp) / "value.json"
                    value_path.write_text(text, encoding="utf-8")
                    args += ["--value", str(value_path)]
            else:
                error_path = Path(tmp) / "error.json"
                error_path.write_text(_json_dumps(_error_payload(error)), encoding="utf-8")
                args += ["--error", str(error_path)]
            if metadata is not None:
                metadata_path = Path(tmp) / "metadata.json"
                metadata_path.write_text(_json_dumps(dict(metadata)), encoding="utf-8")
                args += ["--metadata", str(metadata_path)]
            proc = self.run_raw(args)
        expected_exit = 0 if status == "ok" else 1
        parsed: Any = None
        if proc.stdout.strip():
            try:
                parsed = _parse_trailing_json(proc.stdout)
            except ValueError:
                parsed = None
        if (
            proc.returncode == expected_exit
            and isinstance(parsed, dict)
            and parsed.get("status") == status
            and isinstance(parsed.get("committed"), dict)
        ):
            return parsed
        raise BabysitterError(
            f"babysitter task:post {effect_id} --status {status} did not commit",
            command=proc.args,
            exit_code=proc.returncode,
            stdout=proc.stdout,
            stderr=proc.stderr,
        )


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", errors="replace")
    return data


def _error_payload(error: Any) -> dict[str, Any]:
    if isinstance(error, Mapping):
        payload = dict(error)
        payload.setdefault("name", "Error")
        payload.setdefault("message", "Task reported failure")
        return payload
    if isinstance(error, BaseException):
        return {"name": type(error).__name__, "message": str(error)}
    if error is None:
        return {"name": "Error", "message": "Task reported failure"}
    return {"name": "Error", "message": str(error)}


# --------------------------------------------------------------------------------------------
# Journal (no Node)


def read_journal(run_dir: Path) -> list[JournalEvent]:
    """All events of ``RUN_DIR/journal/`` in sequence order. Files that do not look like journal
    events (temporary files of an atomic write, other names) are skipped; a file that vanished or
    is not valid JSON is skipped too (a reader racing a writer only ever sees whole files, since
    the SDK writes through rename)."""
    journal_dir = Path(run_dir) / "journal"
    try:
        names = os.listdir(journal_dir)
    except FileNotFoundError:
        return []
    entries: list[tuple[int, str, str]] = []
    for name in names:
        match = _JOURNAL_NAME.match(name)
        if match:
            entries.append((int(match.group(1)), match.group(2), name))
    entries.sort()
    events: list[JournalEvent] = []
    for seq, ulid, name in entries:
        path = journal_dir / name
        try:
            body = _read_json_file(path)
        except (OSError, ValueError):
            continue
        if not isinstance(body, dict):
            continue
        recorded = body.get("recordedAt")
        events.append(
            JournalEvent(
                seq=seq,
                ulid=ulid,
                type=str(body.get("type") or ""),
                recorded_at=recorded if isinstance(recorded, str) else None,
                data=_as_dict(body.get("data")),
                path=path,
            )
        )
    return events


def _effect_ids(run_dir: Path, event_type: str) -> list[str]:
    out: list[str] = []
    for event in read_journal(run_dir):
        if event.type == event_type:
            effect_id = event.data.get("effectId")
            if isinstance(effect_id, str):
                out.append(effect_id)
    return out


def resolved_effect_ids(run_dir: Path) -> dict[str, int]:
    """effectId -> number of ``EFFECT_RESOLVED`` events (1 for every correctly posted effect)."""
    counts: dict[str, int] = {}
    for effect_id in _effect_ids(run_dir, "EFFECT_RESOLVED"):
        counts[effect_id] = counts.get(effect_id, 0) + 1
    return counts


def requested_effect_ids(run_dir: Path) -> set[str]:
    """Every effectId that has an ``EFFECT_REQUESTED`` event."""
    return set(_effect_ids(run_dir, "EFFECT_REQUESTED"))


def pending_effect_ids(run_dir: Path) -> set[str]:
    """Requested effects with no ``EFFECT_RESOLVED``/``EFFECT_CANCELLED`` event yet."""
    done = set(_effect_ids(run_dir, "EFFECT_RESOLVED")) | set(
        _effect_ids(run_dir, "EFFECT_CANCELLED")
    )
    return requested_effect_ids(run_dir) - done


def load_task_def(run_dir: Path, effect_id: str) -> dict[str, Any]:
    """The canonical stored definition ``tasks/<effectId>/task.json``."""
    body = _read_json_file(Path(run_dir) / "tasks" / effect_id / "task.json")
    if not isinstance(body, dict):
        raise ValueError(f"task.json of {effect_id} is not an object")
    return body


# --------------------------------------------------------------------------------------------
# Result conventions and task parsing


def shell_result_value(
    exit_code: int | None,
    stdout: str,
    stderr: str,
    *,
    signal: int | None = None,
    timed_out: bool = False,
    error: str | None = None,
    structured_ok: bool = False,
) -> Any:
    """The value to post (always with ``--status ok``) for a finished shell effect.

    Success (exit 0, no signal, no timeout, no *error*) -> the stdout string, as the SDK's own
    executor posts it; with ``structured_ok=True`` -> ``{"success": True, "exitCode": 0,
    "stdout", "stderr"}``. Anything else -> ``{"success": False, "exitCode", "stdout", "stderr",
    "error"}`` (the shape HEAD's ``task:post`` normalisation produces; the process sees this
    object as the result of ``ctx.task``), plus ``"signal"``/``"timedOut"`` when they apply.
    ``exitCode`` is ``None`` when the process never exited normally (killed, or never started).
    """
    succeeded = exit_code == 0 and signal is None and not timed_out and error is None
    if succeeded:
        if structured_ok:
            return {"success": True, "exitCode": 0, "stdout": stdout, "stderr": stderr}
        return stdout
    if error is not None:
        message = error
    elif timed_out:
        message = "Shell command timed out"
    elif signal is not None:
        message = f"Shell command killed by signal {signal}"
    elif exit_code is None:
        message = "Shell command did not run"
    else:
        message = f"Shell command exited with code {exit_code}"
    value: dict[str, Any] = {
        "success": False,
        "exitCode": exit_code,
        "stdout": stdout,
        "stderr": stderr,
        "error": message,
    }
    if signal is not None:
        value["signal"] = signal
    if timed_out:
        value["timedOut"] = True
    return value


def _ms_to_seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if value != value or value <= 0:  # NaN or non-positive: no timeout
        return None
    return float(value) / 1000.0


def _str_env(value: Any) -> dict[str, str] | None:
    if not isinstance(value, Mapping):
        return None
    env: dict[str, str] = {}
    for key, val in value.items():
        if not isinstance(key, str) or not key or val is None:
            continue
        if isinstance(val, bool):
            env[key] = "true" if val else "false"
        else:
            env[key] = val if isinstance(val, str) else str(val)
    return env


def _task_def_of(effect_or_task_def: PendingEffect | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(effect_or_task_def, PendingEffect):
        return effect_or_task_def.task_def
    return dict(effect_or_task_def)


def parse_shell_task(task_def: PendingEffect | Mapping[str, Any]) -> ShellTaskSpec:
    """Read ``taskDef.shell.{command, args, cwd, timeout, env}`` (falling back to
    ``taskDef.metadata.{command, args, cwd}`` like the SDK's executor).

    * ``command`` + non-empty ``args`` with a whitespace-free command -> argv list
      ``[command, *args]``; otherwise one command line for ``bash -c``: the command, with
      ``args`` shell-quoted and appended (what the SDK's bash path runs).
    * ``timeout`` is milliseconds (``timeoutMs`` accepted too) -> seconds; missing/<=0 -> None.
    * ``cwd`` as given (relative paths are the executor's to resolve); ``env`` as strings.

    Raises ValueError when there is no command string.
    """
    td = _task_def_of(task_def)
    shell = _as_dict(td.get("shell"))
    meta = _as_dict(td.get("metadata"))
    command = shell.get("command") if isinstance(shell.get("command"), str) else meta.get("command")
    if not isinstance(command, str) or not command.strip():
        raise ValueError("shell task without a command")
    raw_args = shell.get("args") if isinstance(shell.get("args"), list) else meta.get("args")
    args = [a for a in raw_args if isinstance(a, str)] if isinstance(raw_args, list) else []
    cwd_value = shell.get("cwd") if isinstance(shell.get("cwd"), str) else meta.get("cwd")
    cwd = cwd_value if isinstance(cwd_value, str) and cwd_value else None
    timeout = _ms_to_seconds(shell.get("timeout"))
    if timeout is None:
        timeout = _ms_to_seconds(shell.get("timeoutMs"))
    env = _str_env(shell.get("env"))
    spec: str | list[str]
    if args and not re.search(r"\s", command):
        spec = [command, *args]
    elif args:
        spec = " ".join([command, *(shlex.quote(a) for a in args)])
    else:
        spec = command
    return ShellTaskSpec(command=spec, cwd=cwd, timeout=timeout, env=env)


def shell_argv(command: str | list[str], *, shell: str | None = None) -> list[str]:
    """argv for a :class:`ShellTaskSpec` command: lists unchanged, strings as
    ``[bash, "-c", command]`` (``/bin/sh`` when there is no bash)."""
    if isinstance(command, list):
        return list(command)
    interpreter = shell or shutil.which("bash") or "/bin/sh"
    return [interpreter, "-c", command]


def parse_node_task(
    task_def: PendingEffect | Mapping[str, Any], *, node: str = "node"
) -> NodeTaskSpec:
    """Read ``taskDef.node.{entry, args, env, cwd, timeoutMs}`` -> argv ``[node, entry, *args]``,
    cwd, env (task variables only) and timeout in seconds (``timeoutMs``; the builder always
    sets it, default 900 000). Raises ValueError without an entry."""
    td = _task_def_of(task_def)
    spec = _as_dict(td.get("node"))
    entry = spec.get("entry")
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError("node task without an entry")
    raw_args = spec.get("args")
    args = (
        [a if isinstance(a, str) else _json_dumps(a) for a in raw_args]
        if isinstance(raw_args, list)
        else []
    )
    cwd = spec.get("cwd") if isinstance(spec.get("cwd"), str) and spec.get("cwd") else None
    timeout = _ms_to_seconds(spec.get("timeoutMs"))
    return NodeTaskSpec(
        argv=[node, entry, *args], cwd=cwd, env=_str_env(spec.get("env")), timeout=timeout
    )


def parse_sleep(effect: PendingEffect | Mapping[str, Any]) -> int:
    """Target time (epoch milliseconds) of a sleep effect.

    Accepts a :class:`PendingEffect`, a raw ``nextActions`` element or a bare taskDef; looks at
    ``taskDef.sleep.targetEpochMs``, ``taskDef.metadata.targetEpochMs``,
    ``schedulerHints.sleepUntilEpochMs``, then ``taskDef.sleep.iso``. Post the effect ok with
    :func:`sleep_result_value` once that time has passed (not before: that wakes it early).
    Raises ValueError when no target is found.
    """
    if isinstance(effect, PendingEffect):
        td, hints = effect.task_def, effect.scheduler_hints
    elif "taskDef" in effect:
        td, hints = _as_dict(effect.get("taskDef")), _as_dict(effect.get("schedulerHints"))
    else:
        td, hints = dict(effect), {}
    sleep = _as_dict(td.get("sleep"))
    for candidate in (
        sleep.get("targetEpochMs"),
        _as_dict(td.get("metadata")).get("targetEpochMs"),
        hints.get("sleepUntilEpochMs"),
    ):
        if (
            isinstance(candidate, (int, float))
            and not isinstance(candidate, bool)
            and candidate == candidate
        ):
            return int(candidate)
    iso = sleep.get("iso")
    if isinstance(iso, str) and iso:
        parsed = datetime.fromisoformat(iso.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return int(parsed.timestamp() * 1000)
    raise ValueError("sleep effect without a target time")


def sleep_result_value(now: float | None = None) -> dict[str, Any]:
    """The ok value the SDK's own executor posts for a finished sleep: ``{"sleptUntil": ISO}``
    (*now* in epoch seconds, default the current time). ``ctx.sleepUntil`` ignores it."""
    return {"sleptUntil": _iso(time.time() if now is None else now)}
