"""The effectd client library (sync: :class:`Client`; asyncio: ``effectd.client.aio``)."""

from effectd.client.records import Chunk, EffectError, EffectRecord, OutputSlice
from effectd.client.spec import python_spec, shell_spec, sleep_spec
from effectd.client.sync import Client
from effectd.ipc.errors import (
    DaemonUnavailable,
    EffectdError,
    InvalidState,
    NotFound,
    RequestError,
    Unavailable,
)
from effectd.ipc.schema import EffectState

__all__ = [
    "Chunk", "Client", "DaemonUnavailable", "EffectError", "EffectRecord", "EffectState", "EffectdError",
    "InvalidState", "NotFound", "OutputSlice", "RequestError", "Unavailable", "python_spec", "shell_spec",
    "sleep_spec",
]
