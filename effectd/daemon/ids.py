"""ULIDs: 48-bit millisecond timestamp + 80 random bits, Crockford base32, 26 characters.

They sort by creation time as strings, which makes ``list`` newest-first and paging by id cheap.
Within one millisecond the generator increments the random part, so ids from one daemon are
strictly increasing.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _encode(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


class UlidGenerator:
    def __init__(self) -> None:
        self._last_ms = -1
        self._last_rand = 0

    def new(self, now: float | None = None) -> str:
        ms = int((time.time() if now is None else now) * 1000)
        if ms <= self._last_ms:
            ms = self._last_ms
            self._last_rand += 1
            if self._last_rand >= 1 << 80:
                ms += 1
                self._last_rand = int.from_bytes(os.urandom(10), "big") >> 1
        else:
            # Leave headroom so increments within the same millisecond never overflow.
            self._last_rand = int.from_bytes(os.urandom(10), "big") >> 1
        self._last_ms = ms
        return _encode(ms, 10) + _encode(self._last_rand, 16)
