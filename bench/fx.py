"""Tiny effect functions the benchmark's python effects call (imported by effectd workers)."""

from __future__ import annotations

from collections.abc import Iterator


def noop() -> None:
    return None


def gen(n: int) -> Iterator[int]:
    """A generator effect: yields ``n`` small ints (streamed as msgpack values)."""
    yield from range(n)
