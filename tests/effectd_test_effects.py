"""Python effects used by the tests (importable by workers: the test daemon's PYTHONPATH has tests/)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import effectd


def add(a: int, b: int) -> int:
    return a + b


def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"args": list(args), "kwargs": kwargs}


def boom(message: str = "boom") -> None:
    raise ValueError(message)


def count(n: int, delay: float = 0.0) -> Iterator[int]:
    for i in range(n):
        if delay:
            time.sleep(delay)
        yield i


def prints(text: str) -> str:
    print(text)
    print(f"err:{text}", file=sys.stderr)
    return "printed"


def exit_hard(code: int = 1) -> None:
    os._exit(code)


def unserializable() -> object:
    return object()


def with_progress(steps: int) -> int:
    for i in range(steps):
        effectd.progress((i + 1) / steps, f"step {i + 1}")
    return steps


def block_forever() -> None:
    while True:
        time.sleep(3600)


def leak_memory(megabytes: int) -> int:
    global _LEAK
    _LEAK = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(_LEAK), 4096):
        _LEAK[i] = 1
    return megabytes


_LEAK: bytearray = bytearray()


def huge_string(megabytes: int) -> str:
    return "x" * (megabytes * 1024 * 1024)


def int_keys() -> dict[int, int]:
    return {1: 2}


def cwd() -> str:
    return os.getcwd()


def nap(seconds: float) -> str:
    time.sleep(seconds)
    return "rested"
