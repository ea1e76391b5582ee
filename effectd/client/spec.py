"""Building effect specifications (the ``effect`` map of ``submit``) from Python arguments."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any


def common_fields(*, name: str | None = None, labels: Mapping[str, str] | None = None,
                  timeout: float | None = None, retries: int | None = None,
                  retry_backoff: float | None = None, priority: int | None = None,
                  group: str | None = None, after: Sequence[str] | None = None,
                  after_any_outcome: bool | None = None,
                  max_output_bytes: int | None = None) -> dict[str, Any]:
    fields = {"name": name, "labels": dict(labels) if labels else None, "timeout": timeout,
              "retries": retries, "retry_backoff": retry_backoff, "priority": priority,
              "group": group, "after": list(after) if after else None,
              "after_any_outcome": after_any_outcome, "max_output_bytes": max_output_bytes}
    return {k: v for k, v in fields.items() if v is not None}


def shell_spec(command: str | Sequence[str], *, cwd: str | os.PathLike[str] | None = None,
               env: Mapping[str, str] | None = None, inherit_env: bool = True,
               stdin_from: str | None = None, rlimits: Mapping[str, int] | None = None,
               **common: Any) -> dict[str, Any]:
    """A shell effect: a string runs with ``/bin/sh -c``, a sequence is executed directly.

    By default the child gets the caller's working directory and environment (plus ``env``)."""
    spec: dict[str, Any] = {"kind": "shell"}
    if isinstance(command, str):
        spec["command"] = command
    else:
        spec["argv"] = [str(a) for a in command]
    spec["cwd"] = str(cwd) if cwd is not None else os.getcwd()
    full_env = dict(os.environ) if inherit_env else {}
    full_env.update(env or {})
    spec["env"] = full_env
    if stdin_from:
        spec["stdin_from"] = stdin_from
    if rlimits:
        spec["rlimits"] = dict(rlimits)
    spec.update(common_fields(**common))
    return spec


def python_spec(target: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
                cwd: str | os.PathLike[str] | None = None, **common: Any) -> dict[str, Any]:
    """A python effect: ``"package.module:function"`` called with msgpack-able arguments."""
    spec: dict[str, Any] = {"kind": "python", "target": target, "args": list(args),
                            "kwargs": dict(kwargs or {}),
                            "cwd": str(cwd) if cwd is not None else os.getcwd()}
    spec.update(common_fields(**common))
    return spec


def sleep_spec(seconds: float, **common: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"kind": "sleep", "seconds": seconds}
    spec.update(common_fields(**common))
    return spec
