"""Numbers both sides of the contract rely on, defined once.

Heartbeats and orphan timeout are the daemon-worker contract; the output cap and retention
defaults are promises to clients (documented in README "Limits and defaults"); exit codes are what
scripts and systemd read from ``effectd``, ``effectctl`` and ``effectctl babysitter``.
"""

from __future__ import annotations

HEARTBEAT_INTERVAL = 1.0
"""Seconds between heartbeats in each direction (any message counts as one)."""
HEARTBEAT_LIVENESS = 3
"""Silent intervals after which the peer is considered gone."""
DEFAULT_ORPHAN_TIMEOUT = 300.0
"""Seconds a worker keeps its effects running without a daemon before it kills them and exits."""

DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024 * 1024
"""Cap per output stream of an effect (``max_output_bytes``)."""

DEFAULT_RETAIN_DAYS = 7.0
DEFAULT_RETAIN_COUNT = 10_000
DEFAULT_RETAIN_BYTES = 2 * 1024 * 1024 * 1024
MIN_KEY_WINDOW_DAYS = 7.0
"""Request keys are remembered at least this long (or ``retain_days`` if longer): a client may
retry a submit long after its effects were collected, and must not get a second run."""

# Exit codes of the command-line tools (effectctl, effectctl babysitter).
EXIT_FAILED = 1
"""An effect that was waited for did not succeed, or another error."""
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4
EXIT_INVALID_STATE = 5
EXIT_TIMED_OUT = 124
"""Like timeout(1): an effect timed out, or the command's own ``--timeout`` passed."""
EXIT_NOT_STARTED = 125
"""The effect could not start or was lost."""
EXIT_CANCELLED = 130
"""128 + SIGINT: the effect was cancelled, or the command interrupted."""

# Exit codes of the daemon (``effectd``), read by the autostarting client and by systemd.
EXIT_JOURNAL_LOST = 74
"""EX_IOERR: the journal was deleted or replaced under us. Non-zero, so systemd's
``Restart=on-failure`` starts a new daemon on whatever journal is at the path now."""
EXIT_ALREADY_RUNNING = 75
"""EX_TEMPFAIL: another daemon already runs for this runtime dir or on this state dir."""
