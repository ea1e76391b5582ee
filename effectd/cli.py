"""``effectctl``: submit effects, watch them, and manage the daemon.

Exit codes: 0 success; ``run`` exits with the effect's own exit code (128+N if killed by signal
N, 124 if timed out, 130 if cancelled, 125 if it could not start or was lost); 1 an effect that
was waited for did not succeed, or another error; 2 usage; 3 daemon unavailable; 4 not found;
5 invalid state (e.g. result of a running effect).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import click

from effectd.cliutil import F, fail, handle_errors, json_default, json_out
from effectd.ipc.constants import EXIT_CANCELLED, EXIT_FAILED, EXIT_NOT_STARTED, EXIT_TIMED_OUT, EXIT_UNAVAILABLE

if TYPE_CHECKING:
    from effectd.client import Client, EffectRecord


def _client(autostart: bool = True) -> Client:
    from effectd.client import Client

    return Client(autostart=autostart)


def _pairs(values: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        out[key] = value
    return out


def effect_options(func: F) -> F:
    """Options every submitting command shares."""
    opts = [
        click.option("--name", help="A name for the effect."),
        click.option("--label", "labels", multiple=True, metavar="K=V", help="Label (repeatable)."),
        click.option("--cwd", type=click.Path(file_okay=False), help="Working directory (default: current)."),
        click.option("--env", "envs", multiple=True, metavar="K=V", help="Extra environment variable (repeatable)."),
        click.option("--timeout", type=float, help="Seconds before it is killed and marked timed_out."),
        click.option("--retries", type=int, help="Extra attempts after failed/timed_out/lost."),
        click.option("--priority", type=int, help="Higher runs first (default 0)."),
        click.option("--group", help="Scheduling group."),
        click.option("--after", multiple=True, metavar="ID", help="Run only after this effect succeeded (repeatable)."),
        click.option("--stdin-from", metavar="ID", help="Feed stdin from another effect's stdout."),
        click.option("--max-output-bytes", type=int, help="Cap per output stream."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _common(o: dict[str, Any]) -> dict[str, Any]:
    return {"name": o.get("name"), "labels": _pairs(o.get("labels") or (), "--label") or None,
            "timeout": o.get("timeout"), "retries": o.get("retries"), "priority": o.get("priority"),
            "group": o.get("group"), "after": list(o.get("after") or ()) or None,
            "max_output_bytes": o.get("max_output_bytes")}


def _shell_spec(command: Sequence[str], o: dict[str, Any]) -> dict[str, Any]:
    from effectd.client import shell_spec

    if not command:
        raise click.UsageError("no command given (use: -- CMD ARGS...)")
    cmd: str | Sequence[str] = command[0] if len(command) == 1 and " " in command[0] else list(command)
    return shell_spec(cmd, cwd=o.get("cwd"), env=_pairs(o.get("envs") or (), "--env"),
                      stdin_from=o.get("stdin_from"), **_common(o))


def _record_line(r: EffectRecord) -> str:
    what = r.name or _describe(r.spec)
    extra = ""
    if r.exit_code is not None:
        extra = f" exit={r.exit_code}"
    if r.signal:
        extra += f" signal={r.signal}"
    if r.reason and r.state.value not in ("succeeded", "running", "queued"):
        extra += f" ({r.reason})"
    if r.progress and r.state.value == "running" and r.progress.get("fraction") is not None:
        extra += f" {100 * r.progress['fraction']:.0f}%"
    return f"{r.id}  {r.state.value:<9} {what[:60]}{extra}"


def _describe(spec: dict[str, Any]) -> str:
    kind = spec.get("kind")
    if kind == "shell":
        return str(spec.get("command") or " ".join(spec.get("argv") or []))
    if kind == "python":
        return f"{spec.get('target')}(...)"
    return f"sleep {spec.get('seconds')}"


def exit_code_for(r: EffectRecord) -> int:
    state = r.state.value
    if state == "succeeded":
        return 0
    if state == "failed":
        if r.signal:
            return 128 + r.signal
        if r.exit_code is not None:
            return r.exit_code or EXIT_FAILED
        return EXIT_NOT_STARTED
    if state == "timed_out":
        return EXIT_TIMED_OUT
    if state == "cancelled":
        return EXIT_CANCELLED
    return EXIT_NOT_STARTED


class LazyGroup(click.Group):
    """Subcommands that live in their own modules are imported only when used, so a plain
    ``effectctl status`` does not pay for asyncio or the babysitter driver."""

    LAZY: ClassVar[dict[str, str]] = {"babysitter": "effectd.babysitter.cli:babysitter",
                                      "bridge": "effectd.bridge:bridge"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.LAZY.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        import importlib

        module, _, attr = target.partition(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="effectd", prog_name="effectctl")
def main() -> None:
    """effectctl: run effects in the background with effectd.

    The daemon is found through $EFFECTD_RUNTIME_DIR (default $XDG_RUNTIME_DIR/effectd) and
    started on demand if it is not running.
    """


@main.command(context_settings={"allow_interspersed_args": False})
@effect_options
@click.option("--detach", "-d", is_flag=True, help="Print the id and return at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the final record as JSON (after the output).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@handle_errors
def run(command: tuple[str, ...], detach: bool, as_json: bool, **o: Any) -> None:
    """Run CMD as an effect, stream its output live, exit with its exit code.

    Ctrl-C cancels the effect (its whole process tree)."""
    spec = _shell_spec(command, o)
    with _client() as c:
        eid = c.submit(spec)
        if detach:
            json_out({"id": eid}) if as_json else click.echo(eid)
            return
        cancelled = False

        def on_sigint(signum: int, frame: Any) -> None:
            nonlocal cancelled
            if cancelled:
                raise KeyboardInterrupt
            cancelled = True
            click.echo(f"\neffectctl: cancelling {eid}", err=True)
            # A second connection: the first may be in the middle of a request, and a REQ
            # socket cannot send again before it has its reply.
            with _client(autostart=False) as other:
                other.cancel(eid, reason="interrupted")

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            _copy_stream(c.stream(eid))
            record = c.wait(eid)
        finally:
            signal.signal(signal.SIGINT, previous)
        if as_json:
            json_out(record.to_json())
        elif record.state.value != "succeeded" and record.exit_code is None:
            click.echo(f"effectctl: effect {eid} {record.state.value}"
                       + (f": {record.reason}" if record.reason else ""), err=True)
            if record.error is not None:
                click.echo(f"effectctl: {record.error.type}: {record.error.message}", err=True)
        sys.exit(exit_code_for(record))


def _copy_stream(chunks: Iterator[Any]) -> None:
    out = sys.stdout.buffer
    err = sys.stderr.buffer
    for chunk in chunks:
        target = err if chunk.stream == "stderr" else out
        target.write(chunk.data)
        target.flush()


@main.command(context_settings={"allow_interspersed_args": False})
@effect_options
@click.option("--python", "target", metavar="MOD:FUNC", help="Submit a python effect instead of a command.")
@click.option("--args", "args_json", default="[]", help="python: JSON array of positional arguments.")
@click.option("--kwargs", "kwargs_json", default="{}", help="python: JSON object of keyword arguments.")
@click.option("--sleep", "sleep_seconds", type=float, help="Submit a sleep effect of this many seconds.")
@click.option("--json", "as_json", is_flag=True)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@handle_errors
def submit(command: tuple[str, ...], target: str | None, args_json: str, kwargs_json: str,
           sleep_seconds: float | None, as_json: bool, **o: Any) -> None:
    """Submit an effect in the background and print its id."""
    from effectd.client import python_spec, sleep_spec

    if target:
        try:
            args = json.loads(args_json)
            kwargs = json.loads(kwargs_json)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(str(exc), param_hint="--args/--kwargs") from exc
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise click.BadParameter("--args takes a JSON array, --kwargs a JSON object")
        spec = python_spec(target, args, kwargs, cwd=o.get("cwd"), **_common(o))
    elif sleep_seconds is not None:
        spec = sleep_spec(sleep_seconds, **_common(o))
    else:
        spec = _shell_spec(command, o)
    with _client() as c:
        eid = c.submit(spec)
    json_out({"id": eid}) if as_json else click.echo(eid)


@main.command()
@click.argument("ids", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def status(ids: tuple[str, ...], as_json: bool) -> None:
    """Show effects' state."""
    with _client() as c:
        records = c.status_many(list(ids))
    if as_json:
        json_out([r.to_json() for r in records])
        return
    for r in records:
        click.echo(_record_line(r))


@main.command(name="list")
@click.option("--state", "states", multiple=True, help="Only these states (repeatable).")
@click.option("--label", "labels", multiple=True, metavar="K=V")
@click.option("--name")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def list_(states: tuple[str, ...], labels: tuple[str, ...], name: str | None, limit: int, as_json: bool) -> None:
    """List effects, newest first."""
    with _client() as c:
        records = c.list(states=list(states) or None, labels=_pairs(labels, "--label") or None, name=name,
                         limit=limit)
    if as_json:
        json_out([r.to_json() for r in records])
        return
    for r in records:
        click.echo(_record_line(r))


@main.command()
@click.argument("effect_id")
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the effect is final.")
@click.option("--stderr", "stderr_only", is_flag=True, help="Only stderr.")
@click.option("--stdout", "stdout_only", is_flag=True, help="Only stdout.")
@click.option("--from-offset", type=int, default=0, help="Start at this byte offset of each stream.")
@handle_errors
def logs(effect_id: str, follow: bool, stderr_only: bool, stdout_only: bool, from_offset: int) -> None:
    """Print an effect's output (stdout to stdout, stderr to stderr)."""
    streams = ("stderr",) if stderr_only else ("stdout",) if stdout_only else ("stdout", "stderr")
    with _client() as c:
        if follow:
            _copy_stream(c.stream(effect_id, from_offset=from_offset, streams=streams))
            return
        c.status(effect_id)
        for name in streams:
            target = sys.stderr.buffer if name == "stderr" else sys.stdout.buffer
            offset = from_offset
            while True:
                piece = c.read_output(effect_id, name, offset)
                target.write(piece.data)
                offset = piece.next_offset
                if not piece.data or offset >= piece.size:
                    break
            target.flush()


@main.command()
@click.argument("ids", nargs=-1, required=True)
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 124).")
@click.option("--any", "any_", is_flag=True, help="Return when the first one is final; print it.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def wait(ids: tuple[str, ...], timeout: float | None, any_: bool, as_json: bool) -> None:
    """Wait for effects to be final. Exit 0 if all (or, with --any, the first) succeeded."""
    with _client() as c:
        records = c.wait_many(list(ids), timeout=timeout, return_when="first" if any_ else "all")
    if any_:
        done = sorted((r for r in records if r.final), key=lambda r: r.finished_at or 0)
        records = done[:1] or records
    if as_json:
        json_out([r.to_json() for r in records])
    else:
        for r in records:
            click.echo(_record_line(r))
    if not all(r.final for r in records):
        sys.exit(EXIT_TIMED_OUT)
    sys.exit(0 if all(r.succeeded for r in records) else EXIT_FAILED)


@main.command()
@click.argument("effect_id")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def result(effect_id: str, as_json: bool) -> None:
    """Show the outcome of a final effect (its return value for python effects)."""
    with _client() as c:
        r = c.result(effect_id)
    if as_json:
        json_out(r.to_json())
    else:
        click.echo(_record_line(r))
        if r.result is not None:
            click.echo(json.dumps(r.result, default=json_default))
        if r.error is not None:
            click.echo(r.error.traceback or f"{r.error.type}: {r.error.message}", err=True)
    sys.exit(0 if r.succeeded else EXIT_FAILED)


@main.command()
@click.argument("ids", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def cancel(ids: tuple[str, ...], as_json: bool) -> None:
    """Cancel queued or running effects (running ones lose their whole process tree)."""
    with _client() as c:
        results = c.cancel(*ids)
    if as_json:
        json_out(results)
        return
    for r in results:
        click.echo(f"{r['id']}  {'cancelling' if r['cancelled'] and r['state'] == 'running' else r['state']}")


@main.group()
def group() -> None:
    """Scheduling groups: per-group parallel limits."""


@group.command("set")
@click.argument("name")
@click.option("--parallel", type=int, help="Effects of the group running at once (omit to clear the limit).")
@handle_errors
def group_set(name: str, parallel: int | None) -> None:
    """Set or clear a group's parallel limit (persisted in the journal)."""
    with _client() as c:
        c.set_group_limit(name, parallel)
    click.echo(f"group {name}: " + (f"at most {parallel} at once" if parallel else "no limit"))


@group.command("list")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def group_list(as_json: bool) -> None:
    """Groups with their limits and running/queued counts."""
    with _client() as c:
        groups = c.groups()
    if as_json:
        json_out(groups)
        return
    for g in groups:
        limit = g["parallel"] if g["parallel"] is not None else "-"
        click.echo(f"{g['name']:<24} limit {limit:<6} running {g.get('running', 0):<5} queued {g.get('queued', 0)}")


@main.command()
@click.option("--retain-days", type=float, help="Keep final effects younger than this (default: daemon's).")
@click.option("--retain-count", type=int, help="Keep at most this many final effects.")
@click.option("--retain-bytes", type=int, help="Keep at most this many output bytes.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def gc(retain_days: float | None, retain_count: int | None, retain_bytes: int | None, as_json: bool) -> None:
    """Delete old final effects and their output now; report what was freed."""
    with _client() as c:
        freed = c.gc(retain_days=retain_days, retain_count=retain_count, retain_bytes=retain_bytes)
    if as_json:
        json_out(freed)
    else:
        click.echo(f"removed {freed['removed']} effects, freed {freed['freed_bytes']} bytes; "
                   f"kept {freed['kept']} ({freed['kept_bytes']} bytes)")


@main.group()
def daemon() -> None:
    """Start, stop and inspect the daemon."""


@daemon.command("start")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def daemon_start(as_json: bool) -> None:
    """Start the daemon in the background (no-op if it runs)."""
    with _client() as c:
        info = c.hello()
    if as_json:
        json_out({"pid": info["pid"], "runtime_dir": info["runtime_dir"]})
    else:
        click.echo(f"effectd running (pid {info['pid']}, {info['runtime_dir']})")


@daemon.command("stop")
@click.option("--now", is_flag=True, help="Do not let running effects finish (they become lost).")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for it to exit.")
@handle_errors
def daemon_stop(now: bool, timeout: float) -> None:
    """Stop the daemon (through systemd when systemd manages it)."""
    import subprocess

    from effectd.client.autostart import daemon_pid

    with _client(autostart=False) as c:
        pid = daemon_pid(c.runtime, c.state)
        if pid is None:
            click.echo("effectd is not running")
            return
        info = c.hello()
        unit = os.environ.get("EFFECTD_SYSTEMD_UNIT", "effectd.service")
        if info.get("managed_by") == "systemd" and not now:
            # Stopping through systemd keeps it from restarting the service.
            scope = [] if os.getuid() == 0 and not os.environ.get("XDG_RUNTIME_DIR") else ["--user"]
            subprocess.run(["systemctl", *scope, "stop", unit], check=False)
        else:
            c.shutdown(drain=not now)
        deadline = time.monotonic() + timeout
        while daemon_pid(c.runtime, c.state) is not None:
            if time.monotonic() > deadline:
                fail(f"effectd (pid {pid}) did not stop within {timeout:.0f}s", EXIT_FAILED)
            time.sleep(0.05)
    click.echo(f"effectd stopped (pid {pid})")


@daemon.command("install-unit")
@click.option("--user", "scope", flag_value="user", default=True, help="A systemd --user unit (default).")
@click.option("--system", "scope", flag_value="system", help="A system unit template effectd@.service.")
@click.option("--dry-run", is_flag=True, help="Print the unit and the commands; write nothing.")
@click.option("--path", "unit_dir", type=click.Path(file_okay=False), help="Directory to write the unit to.")
def daemon_install_unit(scope: str, dry_run: bool, unit_dir: str | None) -> None:
    """Write the systemd unit for this installation of effectd and print how to enable it."""
    import shutil
    from pathlib import Path

    from effectd import unitfiles

    exe = shutil.which("effectd") or str(Path(sys.executable).with_name("effectd"))
    exe = str(Path(exe).resolve()) if Path(exe).exists() else exe
    if scope == "user":
        text, name = unitfiles.render_user_unit(exe), unitfiles.USER_UNIT_NAME
        base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "systemd" / "user"
        commands = ["systemctl --user daemon-reload", "systemctl --user enable --now effectd",
                    "loginctl enable-linger \"$USER\"   # optional: keep running while logged out"]
    else:
        text, name = unitfiles.render_system_unit(exe), unitfiles.SYSTEM_UNIT_NAME
        base = Path("/etc/systemd/system")
        commands = ["systemctl daemon-reload", "systemctl enable --now effectd@USERNAME",
                    "export EFFECTD_RUNTIME_DIR=/run/effectd/USERNAME   # for clients of that instance"]
    target = Path(unit_dir) / name if unit_dir else base / name
    if dry_run:
        click.echo(f"# would write {target}:\n{text}")
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        click.echo(f"wrote {target}")
    click.echo("then run:\n  " + "\n  ".join(commands))


@daemon.command("status")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def daemon_status(as_json: bool) -> None:
    """Whether the daemon runs, how it was started, and what it does."""
    from effectd.client.autostart import daemon_pid

    with _client(autostart=False) as c:
        pid = daemon_pid(c.runtime, c.state)
        if pid is None:
            if as_json:
                json_out({"running": False, "runtime_dir": str(c.runtime)})
            else:
                click.echo(f"effectd is not running ({c.runtime})")
            sys.exit(EXIT_UNAVAILABLE)
        info = c.hello()
    if as_json:
        json_out({"running": True, **info})
        return
    counts = info.get("counts", {})
    click.echo(f"effectd {info['daemon_version']} running, pid {info['pid']}, managed by {info['managed_by']}, "
               f"up {info['uptime']:.0f}s{' (draining)' if info.get('draining') else ''}")
    click.echo(f"  runtime {info['runtime_dir']}  state {info['state_dir']}")
    click.echo(f"  workers {len(info['workers'])}  effects: "
               + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) if counts else "  no effects yet")


if __name__ == "__main__":
    main()
