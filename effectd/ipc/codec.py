"""msgpack encoding with the limits every socket input must respect.

Nothing received is trusted: sizes are checked before decoding, container lengths and nesting
are bounded by msgpack's own limits, map keys must be strings and ext types are refused. Never
pickle: a peer must not be able to run code by sending bytes.
"""

from __future__ import annotations

from typing import Any

import msgpack

from effectd.ipc.errors import BadRequest, TooLarge

MAX_REQUEST_BYTES = 16 * 1024 * 1024
"""Largest control message accepted (ZMQ_MAXMSGSIZE on the control socket, and checked here)."""

MAX_WORKER_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest worker->daemon message (a python effect's result travels inline)."""

MAX_CONTAINER_LEN = 100_000
"""Longest array or map accepted in one message."""

MAX_STR_LEN = 8 * 1024 * 1024
MAX_BIN_LEN = 16 * 1024 * 1024


MAX_REPLY_BYTES = 48 * 1024 * 1024
"""Largest control reply the daemon sends (one record is bounded by the request limit plus a
16 MiB python result, so it always fits). Clients accept up to MAX_WORKER_MESSAGE_BYTES."""


def _refuse_ext(code: int, data: bytes) -> Any:
    raise BadRequest(f"msgpack ext type {code} is not accepted")


def pack(obj: Any) -> bytes:
    """Encode one message. Raises TypeError for values msgpack cannot represent."""
    return msgpack.packb(obj, use_bin_type=True, datetime=False)  # type: ignore[no-any-return]


def unpack(data: bytes | memoryview, *, max_bytes: int = MAX_REQUEST_BYTES) -> Any:
    """Decode one message received from a socket, or raise BadRequest / TooLarge."""
    if len(data) > max_bytes:
        raise TooLarge(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            max_str_len=MAX_STR_LEN,
            max_bin_len=MAX_BIN_LEN,
            max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN,
            max_ext_len=0,
        )
    except (BadRequest, TooLarge):
        raise
    except msgpack.ExtraData as exc:
        raise BadRequest("trailing bytes after the msgpack message") from exc
    except msgpack.StackError as exc:
        raise BadRequest("msgpack nesting too deep") from exc
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise BadRequest(f"not a valid msgpack message: {exc}") from exc
    except Exception as exc:  # the C unpacker raises assorted types on hostile input
        raise BadRequest(f"undecodable message: {type(exc).__name__}") from exc
