"""7. bulk streaming: a shell effect ``head -c SIZE /dev/zero`` consumed live with
``Client.stream`` (streaming starts right after submit), then replayed once it finished.

Baseline, same run: Python reading the same producer's pipe directly (``subprocess`` +
``os.read(fd, 64 KiB)``). The effect gets ``max_output_bytes`` above SIZE so nothing is
truncated. While the live stream runs, daemon + workers RSS is sampled (for scenario 10)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import Any

from bench.common import BenchDaemon, Row, ScenarioResult, Sizes, run_helper, sampling_rss
from effectd.client.follow import Follower


def consume(c: Any, eid: str) -> tuple[int, int]:
    total = chunks = 0
    for chunk in c.stream(eid):
        total += len(chunk.data)
        chunks += 1
    return total, chunks


REPEAT_BYTES = 4 << 20


def repeat_check(c: Any) -> list[dict[str, Any]]:
    """Two more output-heavy shell effects on the same worker: do they keep all their output?
    (Regression check: a worker once closed stale pipe fds that later effects had reused.)"""
    out = []
    for _ in range(2):
        rec = c.wait(c.submit_shell(["head", "-c", str(REPEAT_BYTES), "/dev/zero"],
                                    max_output_bytes=REPEAT_BYTES * 2))
        out.append({"state": rec.state.value, "reason": rec.reason, "bytes": rec.sizes.get("stdout", 0)})
    return out


@contextlib.contextmanager
def recorded_followers() -> Iterator[list[Follower]]:
    """The Follower of every stream started inside the block (its gap counters), without the
    client keeping them."""
    followers: list[Follower] = []
    original = Follower.__dict__["start"]
    start = Follower.start

    def recording(cls: type[Follower], streams: Iterable[str], from_offset: int = 0) -> Follower:
        f = start(streams, from_offset)
        followers.append(f)
        return f

    Follower.start = classmethod(recording)  # type: ignore[method-assign, assignment]
    try:
        yield followers
    finally:
        Follower.start = original  # type: ignore[method-assign]


def run(sizes: Sizes, shared: dict[str, Any]) -> ScenarioResult:
    res = ScenarioResult("streaming", f"bulk stream head -c {sizes.stream_bytes >> 20} MiB")
    size = sizes.stream_bytes
    with BenchDaemon() as d:
        c = d.client()
        c.wait(c.submit_shell(["true"]))  # warm: the measured effect is not the worker's first
        with sampling_rss(d) as rss:
            t0 = time.perf_counter()
            eid = c.submit_shell(["head", "-c", str(size), "/dev/zero"], max_output_bytes=size + (1 << 20))
            live_error = None
            try:
                with recorded_followers() as followers:
                    live_bytes, live_chunks = consume(c, eid)
            except Exception as exc:
                live_error = f"live stream failed: {type(exc).__name__}: {exc}"
                live_bytes = live_chunks = -1
            live_s = time.perf_counter() - t0
        rec = c.wait(eid)
        gaps_filled = followers[0].gaps_filled if followers else None
        t0 = time.perf_counter()
        replay_bytes, replay_chunks = consume(c, eid)
        replay_s = time.perf_counter() - t0
        repeat = repeat_check(c)
    shared["stream_rss"] = rss
    pipe = run_helper("bench.baselines:pipe_read", size, 3)
    live_rate = size / live_s / 1e6
    replay_rate = size / replay_s / 1e6
    res.details = {"size": size, "live": {"bytes": live_bytes, "chunks": live_chunks, "seconds": live_s,
                                          "MBps": live_rate, "gaps_filled": gaps_filled},
                   "replay": {"bytes": replay_bytes, "chunks": replay_chunks, "seconds": replay_s,
                              "MBps": replay_rate},
                   "effect": {"state": rec.state.value, "sizes": rec.sizes, "truncated": rec.truncated},
                   "pipe": pipe, "rss_during_live": rss, "repeat_check": repeat}
    if live_error is None:
        res.rows.append(Row("live stream", live_rate, "MB/s", pipe["rate"], "raw pipe os.read 64 KiB",
                            ">= 0.5x baseline", live_rate >= 0.5 * pipe["rate"]))
    res.rows.append(Row("replay after finish", replay_rate, "MB/s", pipe["rate"], "raw pipe os.read 64 KiB",
                        ">= 1x baseline", replay_rate >= pipe["rate"]))
    errors = []
    if live_error is not None:
        errors.append(live_error)
    elif live_bytes != size:
        errors.append(f"live stream delivered {live_bytes} of {size} bytes")
    if replay_bytes != size:
        errors.append(f"replay delivered {replay_bytes} of {size} bytes")
    if any(r["state"] != "succeeded" or r["bytes"] != REPEAT_BYTES for r in repeat):
        errors.append("CORRECTNESS: later `head -c 4 MiB` effects in the same worker ended "
                      + ", ".join(f"{r['state']} ({r['reason']}, {r['bytes']} B)" for r in repeat))
    res.error = "; ".join(errors) or None
    return res
