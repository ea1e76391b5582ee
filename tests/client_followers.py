"""Test helper: look at the followers of the streams a test runs (gap and duplicate counters),
without the clients keeping a test-only attribute for it."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from effectd.client.follow import Follower


def record_followers(monkeypatch: pytest.MonkeyPatch) -> list[Follower]:
    """From now until the test ends, every stream's Follower (sync and async clients) is
    appended to the returned list when the stream starts."""
    followers: list[Follower] = []
    start = Follower.start

    def recording(cls: type[Follower], streams: Iterable[str], from_offset: int = 0) -> Follower:
        f = start(streams, from_offset)
        followers.append(f)
        return f

    monkeypatch.setattr(Follower, "start", classmethod(recording))
    return followers
