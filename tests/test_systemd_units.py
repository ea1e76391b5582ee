"""The shipped systemd units: equal to their renders, valid for systemd, with the key directives.

``systemd-analyze verify`` exits 0 even for unknown keys and unparsable values (it only warns),
so a unit passes here only if verify exits 0 *and* prints nothing. It also checks that
ExecStart's binary exists, so the units are rendered with this interpreter as the binary.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from effectd import unitfiles

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = REPO / "systemd"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (in order); comment and blank lines skipped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"line {lineno} outside any section: {raw!r}"
        assert "=" in line, f"line {lineno} is not key=value: {raw!r}"
        assert not raw.endswith("\\"), f"line {lineno}: no continuation lines expected"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def single(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values is not None, f"[{section}] {key}= missing"
    assert len(values) == 1, f"[{section}] {key}= set {len(values)} times"
    return values[0]


def environment(unit: dict[str, dict[str, list[str]]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in unit["Service"].get("Environment", []):
        for assignment in value.split():
            name, _, val = assignment.partition("=")
            env[name] = val
    return env


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value)
    assert match, f"unexpected time span {value!r}"
    number = float(match.group(1))
    return number * 60 if match.group(2) in ("min", "m") else number


# -- the shipped files are the renders -----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "render"),
    [
        ("effectd.service", unitfiles.render_user_unit),
        ("effectd@.service", unitfiles.render_system_unit),
    ],
)
def test_shipped_unit_is_the_render(name: str, render: object) -> None:
    assert callable(render)
    shipped = (SYSTEMD_DIR / name).read_text(encoding="utf-8")
    assert shipped == render(unitfiles.SHIPPED_EFFECTD_PATH), (
        f"systemd/{name} drifted from effectd.unitfiles; regenerate it with "
        f"python -c 'from effectd import unitfiles as u; "
        f'[open(f"systemd/{{n}}", "w").write(t) for n, t in '
        f"u.render_units(u.SHIPPED_EFFECTD_PATH).items()]'"
    )


def test_render_units_names_both_files() -> None:
    units = unitfiles.render_units("/opt/effectd/bin/effectd")
    assert set(units) == {"effectd.service", "effectd@.service"}
    assert {p.name for p in SYSTEMD_DIR.glob("*.service")} == set(units)
    for text in units.values():
        assert "ExecStart=/opt/effectd/bin/effectd --drain-timeout 30\n" in text


@pytest.mark.parametrize("bad", ["effectd", "bin/effectd", "/opt/my effectd", "/opt/%i/effectd"])
def test_render_rejects_unusable_paths(bad: str) -> None:
    with pytest.raises(ValueError):
        unitfiles.render_user_unit(bad)
    with pytest.raises(ValueError):
        unitfiles.render_system_unit(bad)


# -- key directives -------------------------------------------------------------------------


def _common_directives(unit: dict[str, dict[str, list[str]]]) -> None:
    service = "Service"
    assert single(unit, service, "Type") == "notify"
    assert single(unit, service, "NotifyAccess") == "main"
    assert seconds(single(unit, service, "WatchdogSec")) == 30
    assert single(unit, service, "Restart") == "on-failure"
    assert 1 <= seconds(single(unit, service, "RestartSec")) <= 10
    assert single(unit, service, "KillMode") == "process"
    assert single(unit, service, "RuntimeDirectoryMode") == "0700"
    assert single(unit, service, "RuntimeDirectoryPreserve") == "restart"
    exec_start = single(unit, service, "ExecStart").split()
    assert exec_start == [unitfiles.SHIPPED_EFFECTD_PATH, "--drain-timeout", "30"]
    drain = float(exec_start[exec_start.index("--drain-timeout") + 1])
    assert seconds(single(unit, service, "TimeoutStopSec")) > drain + 5
    # Nothing kills the process tree or sandboxes the effects by default.
    for key in ("KillSignal", "NoNewPrivileges", "PrivateTmp", "ProtectHome", "ProtectSystem"):
        assert key not in unit[service], key


def test_user_unit_directives() -> None:
    text = (SYSTEMD_DIR / "effectd.service").read_text(encoding="utf-8")
    unit = parse_unit(text)
    _common_directives(unit)
    assert single(unit, "Service", "RuntimeDirectory") == "effectd"
    # %t is $XDG_RUNTIME_DIR in a user manager: the runtime dir effectd picks by itself.
    assert environment(unit) == {"EFFECTD_RUNTIME_DIR": "%t/effectd"}
    # %S / StateDirectory= are ~/.config in a user manager on systemd 252; effectd keeps its
    # state in $XDG_STATE_HOME/effectd, so the user unit must not redirect it.
    assert "StateDirectory" not in unit["Service"]
    assert "User" not in unit["Service"]
    assert single(unit, "Install", "WantedBy") == "default.target"


def test_system_unit_directives() -> None:
    text = (SYSTEMD_DIR / "effectd@.service").read_text(encoding="utf-8")
    unit = parse_unit(text)
    _common_directives(unit)
    assert single(unit, "Service", "User") == "%i"
    # Per-instance directories: two instances must not share (or delete) each other's.
    assert single(unit, "Service", "RuntimeDirectory") == "effectd/%i"
    assert single(unit, "Service", "StateDirectory") == "effectd/%i"
    assert single(unit, "Service", "StateDirectoryMode") == "0700"
    assert environment(unit) == {
        "EFFECTD_RUNTIME_DIR": "%t/effectd/%i",
        "EFFECTD_STATE_DIR": "%S/effectd/%i",
    }
    assert single(unit, "Install", "WantedBy") == "multi-user.target"
    # The opt-in hardening is documented, commented out.
    for line in ("#ProtectSystem=strict", "#ReadWritePaths=", "#NoNewPrivileges=yes"):
        assert any(row.startswith(line) for row in text.splitlines()), line


# -- systemd-analyze verify ----------------------------------------------------------------


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        message = "systemd-analyze not found: apt-get install systemd"
        if os.environ.get("CI"):
            pytest.fail(message)  # never skipped in CI
        pytest.skip(message)
    return path


def verify(tool: str, unit_path: Path, tmp_path: Path, *, user: bool) -> str:
    """Run ``systemd-analyze [--user] verify`` and return its output; fail on error."""
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        # A user manager resolves %t and RuntimeDirectory= from it; without one running here,
        # --user verify fails with "Failed to lookup RuntimeDirectory path" unless it is set.
        "XDG_RUNTIME_DIR": str(runtime),
        # Warnings (unknown key, bad value) are what we are after: make sure they are shown.
        "SYSTEMD_LOG_LEVEL": "info",
        "SYSTEMD_LOG_COLOR": "0",
        "SYSTEMD_PAGER": "",
    }
    args = [tool, *(["--user"] if user else []), "--man=no", "verify", str(unit_path)]
    proc = subprocess.run(
        args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{output}"
    return output


def render_into(tmp_path: Path, name: str, text: str) -> Path:
    unit_dir = tmp_path / "units"
    unit_dir.mkdir(exist_ok=True)
    path = unit_dir / name
    path.write_text(text, encoding="utf-8")
    return path


def test_user_unit_passes_systemd_analyze_verify(systemd_analyze: str, tmp_path: Path) -> None:
    path = render_into(tmp_path, "effectd.service", unitfiles.render_user_unit(sys.executable))
    output = verify(systemd_analyze, path, tmp_path, user=True)
    assert output == ""


@pytest.mark.parametrize("instance", ["", "effectd-ci"])
def test_system_unit_passes_systemd_analyze_verify(
    systemd_analyze: str, tmp_path: Path, instance: str
) -> None:
    template = render_into(
        tmp_path, "effectd@.service", unitfiles.render_system_unit(sys.executable)
    )
    # The bare template is verified through a made-up instance; also verify a named one, which
    # loads the template from the same directory.
    target = template.with_name(f"effectd@{instance}.service") if instance else template
    output = verify(systemd_analyze, target, tmp_path, user=False)
    assert output == ""


def test_system_unit_hardening_lines_are_valid(systemd_analyze: str, tmp_path: Path) -> None:
    text = unitfiles.render_system_unit(sys.executable)
    for key in ("ProtectSystem", "ReadWritePaths", "NoNewPrivileges"):
        text = re.sub(rf"^#({key}=)", r"\1", text, count=1, flags=re.M)
    assert "\nProtectSystem=strict\n" in text
    path = render_into(tmp_path, "effectd@.service", text)
    assert verify(systemd_analyze, path, tmp_path, user=False) == ""


def test_verify_catches_a_broken_unit(systemd_analyze: str, tmp_path: Path) -> None:
    """Guards the guard: a misspelt key is reported, so a clean run above means something."""
    text = unitfiles.render_user_unit(sys.executable).replace("KillMode=", "Kilmode=")
    path = render_into(tmp_path, "effectd.service", text)
    output = verify(systemd_analyze, path, tmp_path, user=True)
    assert "Kilmode" in output
    missing = unitfiles.render_user_unit(str(tmp_path / "no-such-effectd"))
    path.write_text(missing, encoding="utf-8")
    with pytest.raises(AssertionError, match="not executable"):
        verify(systemd_analyze, path, tmp_path, user=True)
