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


def __getattr__(name: str) -> object:
    # AsyncClient imports asyncio and zmq.asyncio: only when someone asks for it.
    if name == "AsyncClient":
        from effectd.client.aio import AsyncClient

        return AsyncClient
    raise AttributeError(name)


__all__ = [
    "AsyncClient",
    "Chunk", "Client", "DaemonUnavailable", "EffectError", "EffectRecord", "EffectState", "EffectdError",
    "InvalidState", "NotFound", "OutputSlice", "RequestError", "Unavailable", "python_spec", "shell_spec",
    "sleep_spec",
]
