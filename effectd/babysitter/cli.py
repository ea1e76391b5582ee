"""``effectctl babysitter``: drive a5c-ai babysitter runs with effectd.

Register it on effectctl with::

    from effectd.babysitter.cli import babysitter
    main.add_command(babysitter)

(``python -m effectd.babysitter.cli drive RUN_DIR`` runs the same command stand-alone.)

Exit codes of ``drive``: 0 the run completed; 1 the run failed or was halted (the SDK's error on
stderr), or an SDK call failed; 2 usage; 3 effectd unavailable; 6 only effects of kinds nobody
here runs are pending ("waiting on N effects of kinds ..."; post them, then drive again);
124 ``--timeout`` passed; 130 interrupted. Effects keep running in effectd after 6, 124, 130
and SDK errors: driving the run again picks them up.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import click

from effectd.cliutil import F, handle_errors
from effectd.ipc.constants import EXIT_FAILED


def _handle_errors(func: F) -> F:
    """effectctl's error mapping, plus the driver's own errors."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from effectd.babysitter.driver import DriveError

        try:
            return handle_errors(func)(*args, **kwargs)
        except DriveError as exc:
            click.echo(f"effectctl babysitter: {exc}", err=True)
            sys.exit(EXIT_FAILED)

    return wrapper  # type: ignore[return-value]


def _exec_kinds(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        kind, sep, command = item.partition("=")
        if not sep or not kind.strip() or not command.strip():
            raise click.BadParameter(f"{item!r} is not KIND=COMMAND", param_hint="--exec-kind")
        if kind.strip() in ("shell", "node", "sleep"):
            raise click.BadParameter(f"{kind!r} is run by the driver itself",
                                     param_hint="--exec-kind")
        out[kind.strip()] = command
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def babysitter() -> None:
    """a5c-ai babysitter runs, with their effects run by effectd."""


@babysitter.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--babysitter", "babysitter_cmd", default="babysitter", show_default=True,
              metavar="CMD",
              help="The babysitter CLI: a path or a command line, e.g. "
                   "'npx -y -p @a5c-ai/babysitter-sdk@0.0.187 babysitter'.")
@click.option("--exec-kind", "exec_kinds", multiple=True, metavar="KIND=COMMAND",
              help="Run effects of KIND with this shell command; {task_json} becomes the path "
                   "of a JSON file with the action, and the command's stdout JSON is the value "
                   "(repeatable).")
@click.option("--node", default="node", show_default=True, help="Node binary for node tasks.")
@click.option("--prewarm", type=click.IntRange(min=0), default=4, show_default=True,
              help="Posts started ahead of time for running effects (0: only once they end).")
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 124).")
@click.option("--progress/--no-progress", default=None,
              help="Progress lines on stderr (default: when stderr is a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary at the end.")
@_handle_errors
def drive(run_dir: Path, babysitter_cmd: str, exec_kinds: tuple[str, ...], node: str,
          prewarm: int, timeout: float | None, progress: bool | None, as_json: bool) -> None:
    """Drive the babysitter run in RUN_DIR until it completes.

    Runs every pending shell, node and sleep effect (and --exec-kind kinds) in effectd, in the
    background; posts each result as it finishes and iterates again at once. Restartable: a
    driver started again on the same run runs nothing twice and posts nothing twice."""
    from effectd.babysitter.driver import DriveEvent, Driver

    kinds = _exec_kinds(exec_kinds)
    show = sys.stderr.isatty() if progress is None else progress

    def on_event(ev: DriveEvent) -> None:
        click.echo(f"babysitter [{ev.at:7.2f}s] {ev.message}  (running {ev.running}, "
                   f"posted {ev.posted})", err=True)

    driver = Driver(run_dir, babysitter=babysitter_cmd, exec_kinds=kinds, node=node,
                    prewarm=prewarm, timeout=timeout, on_event=on_event if show else None)
    result = driver.run()
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, sort_keys=True, default=str))
    summary = (f"{result.status}: {result.iterations} iterations, {result.posts} posts, "
               f"{len(result.effects)} effects in {result.elapsed:.2f} s")
    if result.status == "completed":
        if show or not as_json:
            click.echo(f"effectctl babysitter: run {summary}", err=True)
    elif result.status == "waiting":
        click.echo(f"effectctl babysitter: {result.waiting_summary}", err=True)
    elif result.status in ("failed", "halted"):
        message = result.error_message or "(no error recorded)"
        click.echo(f"effectctl babysitter: run {result.status}: {message}", err=True)
    elif result.status == "timed_out":
        click.echo(f"effectctl babysitter: gave up after {timeout} s; effects keep running in "
                   "effectd, drive the run again to resume", err=True)
    elif result.status == "interrupted":
        click.echo("effectctl babysitter: interrupted; effects keep running in effectd, drive "
                   "the run again to resume", err=True)
    sys.exit(result.exit_code)


if __name__ == "__main__":
    babysitter()
