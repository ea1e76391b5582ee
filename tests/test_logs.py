"""configure_logging: line format, journald priorities, rotation cap, level choice, idempotence."""

from __future__ import annotations

import io
import logging
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from effectd.daemon.logs import (
    LEVEL_ENV,
    configure_logging,
    journal_stream_active,
    parse_level,
    reset_logging,
)

TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4}"
log = logging.getLogger("effectd.test")


def ours(root: logging.Logger) -> list[logging.Handler]:
    return [h for h in root.handlers if getattr(h, "_effectd_handler", False)]


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    reset_logging()
    logging.captureWarnings(False)
    root.setLevel(level)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)


@pytest.fixture
def stream(tmp_path: Path) -> Iterator[TextIO]:
    """A stream with a real file descriptor, like stderr."""
    with open(tmp_path / "stderr.txt", "w+", encoding="utf-8") as f:
        yield f


def journal_env(f: TextIO) -> dict[str, str]:
    st = os.fstat(f.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def lines_of(f: TextIO) -> list[str]:
    f.flush()
    f.seek(0)
    return f.read().splitlines()


# -- plain stderr format -------------------------------------------------------------------


def test_plain_line_format_with_fields(stream: TextIO) -> None:
    configure_logging("INFO", stream=stream, environ={})
    log.info(
        "effect %s finished",
        "ab12",
        extra={"fields": {"rc": 0, "cmd": "make -j2", "empty": "", "q": 'say "hi"'}},
    )
    log.debug("not shown at INFO")
    (line,) = lines_of(stream)
    assert re.fullmatch(
        TIMESTAMP + r' INFO effectd\.test: effect ab12 finished rc=0 cmd="make -j2" empty="" '
        r'q="say \\"hi\\""',
        line,
    ), line


def test_one_line_per_record(stream: TextIO) -> None:
    configure_logging("DEBUG", stream=stream, environ={})
    log.warning("first\nsecond", extra={"fields": {"out": "a\nb"}})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("it failed")
    lines = lines_of(stream)
    assert len(lines) == 2
    assert lines[0].endswith(r'effectd.test: first\nsecond out="a\nb"')
    assert " ERROR effectd.test: it failed | Traceback (most recent call last):" in lines[1]
    assert lines[1].endswith("RuntimeError: boom")


def test_stream_defaults_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", environ={})
    log.info("to stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.fullmatch(TIMESTAMP + r" INFO effectd\.test: to stderr\n", captured.err)


# -- journald ------------------------------------------------------------------------------


def test_journal_stream_priority_prefix_and_no_timestamp(stream: TextIO) -> None:
    configure_logging("DEBUG", stream=stream, environ=journal_env(stream))
    log.debug("d")
    log.info("i", extra={"fields": {"k": "v"}})
    log.warning("w")
    log.error("e")
    log.critical("c")
    log.log(25, "between INFO and WARNING")
    assert lines_of(stream) == [
        "<7>DEBUG effectd.test: d",
        "<6>INFO effectd.test: i k=v",
        "<4>WARNING effectd.test: w",
        "<3>ERROR effectd.test: e",
        "<2>CRITICAL effectd.test: c",
        "<6>Level 25 effectd.test: between INFO and WARNING",
    ]


def test_inherited_journal_stream_for_another_fd_is_ignored(stream: TextIO, tmp_path: Path) -> None:
    # JOURNAL_STREAM is inherited by descendants; it counts only if it names *our* stream.
    with open(tmp_path / "other", "w", encoding="utf-8") as other:
        env = journal_env(other)
    configure_logging("INFO", stream=stream, environ=env)
    log.warning("w")
    (line,) = lines_of(stream)
    assert re.fullmatch(TIMESTAMP + r" WARNING effectd\.test: w", line)


@pytest.mark.parametrize("value", ["", "garbage", "1:x", "12"])
def test_malformed_journal_stream(stream: TextIO, value: str) -> None:
    assert not journal_stream_active(stream, {"JOURNAL_STREAM": value})


def test_stream_without_fd_is_not_the_journal() -> None:
    assert not journal_stream_active(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


# -- log file and rotation -----------------------------------------------------------------


def test_log_file_rotation_is_capped(tmp_path: Path, stream: TextIO) -> None:
    log_file = tmp_path / "state" / "logs" / "effectd.log"
    max_bytes, backups = 2000, 2
    # JOURNAL_STREAM matches stream, but a log file wins and takes no journald prefixes.
    configure_logging(
        "INFO",
        log_file=log_file,
        max_bytes=max_bytes,
        backups=backups,
        stream=stream,
        environ=journal_env(stream),
    )
    for i in range(500):
        log.info("record %d", i, extra={"fields": {"payload": "x" * 40}})
    for handler in ours(logging.getLogger()):
        handler.flush()

    files = sorted(p.name for p in log_file.parent.iterdir())
    assert files == ["effectd.log", "effectd.log.1", "effectd.log.2"]
    total = 0
    for name in files:
        path = log_file.parent / name
        size = path.stat().st_size
        assert 0 < size <= max_bytes, (name, size)
        total += size
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        for line in path.read_text(encoding="utf-8").splitlines():
            assert re.fullmatch(TIMESTAMP + r" INFO effectd\.test: record \d+ payload=x+", line)
    assert total <= max_bytes * (backups + 1)
    assert stat.S_IMODE(log_file.parent.stat().st_mode) == 0o700
    # The newest record is in the live file; nothing went to the stream.
    assert "record 499 " in log_file.read_text(encoding="utf-8")
    assert lines_of(stream) == []


# -- level ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "env", "expected"),
    [
        ("INFO", {}, logging.INFO),
        ("debug", {LEVEL_ENV: "ERROR"}, logging.DEBUG),  # an explicit level wins
        (logging.WARNING, {}, logging.WARNING),
        (None, {LEVEL_ENV: "debug"}, logging.DEBUG),
        (None, {LEVEL_ENV: "warn"}, logging.WARNING),
        (None, {LEVEL_ENV: "15"}, 15),
        (None, {}, logging.INFO),
    ],
)
def test_level_choice(
    stream: TextIO, given: str | int | None, env: dict[str, str], expected: int
) -> None:
    configure_logging(given, stream=stream, environ=env)
    assert logging.getLogger().level == expected


def test_invalid_env_level_falls_back_to_info_with_warning(stream: TextIO) -> None:
    configure_logging(None, stream=stream, environ={LEVEL_ENV: "chatty"})
    assert logging.getLogger().level == logging.INFO
    (line,) = lines_of(stream)
    assert f"ignoring invalid {LEVEL_ENV}, using INFO value=chatty" in line


def test_invalid_level_argument_raises(stream: TextIO) -> None:
    with pytest.raises(ValueError):
        configure_logging("chatty", stream=stream, environ={})
    with pytest.raises(ValueError):
        parse_level("")


# -- idempotence ---------------------------------------------------------------------------


def test_configure_twice_does_not_duplicate(stream: TextIO, tmp_path: Path) -> None:
    root = logging.getLogger()
    foreign = len(root.handlers)
    configure_logging("INFO", stream=stream, environ={})
    configure_logging("INFO", stream=stream, environ={})
    assert len(ours(root)) == 1
    assert len(root.handlers) == foreign + 1
    log.info("once")
    assert len(lines_of(stream)) == 1

    # Reconfiguring to a file replaces the stream handler instead of adding to it.
    log_file = tmp_path / "effectd.log"
    configure_logging("INFO", log_file=log_file, environ={})
    configure_logging("INFO", log_file=log_file, environ={})
    assert len(ours(root)) == 1
    log.info("to the file")
    ours(root)[0].flush()
    assert len(lines_of(stream)) == 1
    assert log_file.read_text(encoding="utf-8").count("to the file") == 1

    reset_logging()
    assert ours(root) == []
    assert len(root.handlers) == foreign
