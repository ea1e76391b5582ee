"""Where an effect's output lives on disk: the one definition of the output-dir layout.

    <state dir>/outputs/<effect id>/stdout      bytes the effect wrote, appended as they come
                                   /stderr
                                   /value       msgpack values a python effect yielded, one after another
                                   /final       exists once the effect's final state is journaled:
                                                no byte is appended after it appears
                                   /.claim-<n>  the fence of attempt n (see effectd.journal.outputs)

Workers write these files, the daemon reads them (``read_output``) and marks them final, and a
``stdin_from`` consumer tails them. The layout is part of the contract: a local client may read
the files directly, so it lives in ``ipc``, which every side may import.
"""

from __future__ import annotations

from pathlib import Path

from effectd.ipc.schema import OUTPUT_STREAMS

OUTPUTS_DIR = "outputs"
FINAL_MARKER = "final"


def outputs_root(state_dir: Path) -> Path:
    """The directory holding one directory per effect."""
    return state_dir / OUTPUTS_DIR


def effect_dir(outputs: Path, effect_id: str) -> Path:
    return outputs / effect_id


def stream_path(effect_dir: Path, stream: str) -> Path:
    """The file of one output stream; ValueError for anything but stdout, stderr, value."""
    if stream not in OUTPUT_STREAMS:
        raise ValueError(f"not an output stream: {stream}")
    return effect_dir / stream


def final_marker(effect_dir: Path) -> Path:
    return effect_dir / FINAL_MARKER


def claim_path(effect_dir: Path, attempt: int) -> Path:
    return effect_dir / f".claim-{attempt}"
