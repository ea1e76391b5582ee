"""Huey task module for the peer benchmark (the database path comes from EB_HUEY_DB)."""

from __future__ import annotations

import os

from huey import SqliteHuey

# store_none: a no-op returns None, which Huey would otherwise not store (get() would wait forever).
huey = SqliteHuey(filename=os.environ.get("EB_HUEY_DB", "/tmp/eb-huey.db"), store_none=True)


@huey.task()
def noop() -> None:
    return None
