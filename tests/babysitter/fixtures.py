"""pytest fixtures for tests that drive real babysitter runs (real SDK, no fakes).

Import them from ``tests/conftest.py``::

    from tests.babysitter.fixtures import babysitter_cli, babysitter_sdk, make_run  # noqa: F401

* ``babysitter_sdk`` (session): the installed SDK (:class:`BabysitterSdk`). Looked up in
  ``$EFFECTD_BABYSITTER_SDK_DIR`` when set (only there), else in the default cache
  ``~/.cache/effectd-test/babysitter-sdk`` (where ``tests/babysitter_sdk.sh`` installs it), else
  as ``babysitter`` on PATH. Node is needed too. When the SDK is missing the test is SKIPPED with
  the reason, except when ``$CI`` is set: then it FAILS (the real-SDK tests are never skipped in
  CI; ``.ci/run`` runs ``tests/babysitter_sdk.sh`` first).
* ``babysitter_cli``: an :class:`effectd.babysitter.BabysitterCli` for that SDK.
* ``make_run``: ``make_run("parallel_three", inputs=None) -> Path`` creates a run of one of the
  process files of this directory (``.mjs`` optional) under ``tmp_path`` and returns its run
  directory. The process files are copied to ``tmp_path/babysitter/processes/`` next to a
  ``node_modules`` symlink to the SDK's, so their ``import ... from "@a5c-ai/babysitter-sdk"``
  resolves; runs go to ``tmp_path/babysitter/runs/``.

Process files here (each says what it does in its header): ``parallel_three`` (a: three
parallel shell tasks, 0.2/1/2 s), ``two_phase`` (b: two branches, phase 1 then phase 2, one
``ctx.parallel.all`` per phase), ``failing_shell`` (c: exit 3, inspected by the process),
``two_phase_pipelined`` (pins an SDK 0.0.187 limitation), ``sleep_until`` (``ctx.sleepUntil``)
and ``node_task`` (``nodeTask``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from effectd.babysitter import SDK_PACKAGE, SDK_VERSION, BabysitterCli

__all__ = [
    "DEFAULT_SDK_DIR",
    "PROCESS_DIR",
    "SDK_DIR_ENV",
    "BabysitterSdk",
    "babysitter_cli",
    "babysitter_sdk",
    "find_babysitter_sdk",
    "make_run",
]

SDK_DIR_ENV = "EFFECTD_BABYSITTER_SDK_DIR"
DEFAULT_SDK_DIR = Path.home() / ".cache" / "effectd-test" / "babysitter-sdk"
PROCESS_DIR = Path(__file__).resolve().parent
INSTALL_HINT = "install it with: bash tests/babysitter_sdk.sh"

MakeRun = Callable[..., Path]


@dataclass(frozen=True)
class BabysitterSdk:
    binary: Path
    node_modules: Path  # the node_modules directory that holds @a5c-ai/babysitter-sdk
    version: str

    def cli(self, **kwargs: Any) -> BabysitterCli:
        return BabysitterCli([str(self.binary)], **kwargs)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _node_modules_of(binary: Path) -> Path | None:
    """The ``node_modules`` directory that holds the package the binary belongs to."""
    real = binary.resolve()
    for parent in real.parents:
        if parent.name == "node_modules" and (parent / SDK_PACKAGE).is_dir():
            return parent
    return None


def find_babysitter_sdk() -> BabysitterSdk | str:
    """The installed SDK, or a string saying why none was found."""
    if shutil.which("node") is None:
        return "node is not installed (needed by the babysitter SDK)"
    env_dir = os.environ.get(SDK_DIR_ENV)
    candidates: list[Path] = []
    if env_dir:
        candidates.append(Path(env_dir) / "node_modules" / ".bin" / "babysitter")
    else:
        candidates.append(DEFAULT_SDK_DIR / "node_modules" / ".bin" / "babysitter")
        on_path = shutil.which("babysitter")
        if on_path:
            candidates.append(Path(on_path))
    reasons: list[str] = []
    for binary in candidates:
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            reasons.append(f"no babysitter binary at {binary}")
            continue
        node_modules = _node_modules_of(binary)
        if node_modules is None:
            reasons.append(f"{binary} is not inside a node_modules holding {SDK_PACKAGE}")
            continue
        try:
            proc = subprocess.run(
                [str(binary), "--version"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            reasons.append(f"{binary} --version failed: {exc}")
            continue
        if proc.returncode != 0:
            reasons.append(f"{binary} --version exited {proc.returncode}: {proc.stderr.strip()}")
            continue
        return BabysitterSdk(binary=binary, node_modules=node_modules, version=proc.stdout.strip())
    return f"{SDK_PACKAGE} {SDK_VERSION} not found ({'; '.join(reasons)}); {INSTALL_HINT}"


def _missing(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"{reason} [CI is set: real-SDK tests are never skipped]", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def babysitter_sdk() -> BabysitterSdk:
    found = find_babysitter_sdk()
    if isinstance(found, str):
        _missing(found)
        raise AssertionError("unreachable")
    return found


@pytest.fixture
def babysitter_cli(babysitter_sdk: BabysitterSdk) -> BabysitterCli:
    return babysitter_sdk.cli(timeout=60.0)


def _prepare_workdir(workdir: Path, sdk: BabysitterSdk) -> Path:
    processes = workdir / "processes"
    if not processes.is_dir():
        processes.mkdir(parents=True)
        for source in PROCESS_DIR.glob("*.mjs"):
            shutil.copy2(source, processes / source.name)
        (workdir / "node_modules").symlink_to(sdk.node_modules, target_is_directory=True)
    return processes


@pytest.fixture
def make_run(
    babysitter_cli: BabysitterCli, babysitter_sdk: BabysitterSdk, tmp_path: Path
) -> MakeRun:
    workdir = tmp_path / "babysitter"

    def _make(process_name: str, *, inputs: Any = None, export: str = "process") -> Path:
        processes = _prepare_workdir(workdir, babysitter_sdk)
        file_name = process_name if process_name.endswith(".mjs") else f"{process_name}.mjs"
        process_file = processes / file_name
        if not process_file.is_file():
            known = sorted(p.stem for p in processes.glob("*.mjs"))
            raise FileNotFoundError(f"no babysitter process {process_name!r}; known: {known}")
        return babysitter_cli.create_run(
            process_file,
            export=export,
            runs_dir=workdir / "runs",
            inputs=inputs,
            process_id=process_file.stem.replace("_", "-"),
        )

    return _make
