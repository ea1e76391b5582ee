"""systemd unit files for effectd, rendered from one place.

The files shipped in ``systemd/`` are renders of these functions with
``effectd_path="/usr/local/bin/effectd"``; a test keeps them identical, so the unit text lives
here and only here. Packaging or ``effectctl`` can render a unit pointing at wherever the
``effectd`` console script really is (``shutil.which("effectd")``).

Two units:

* ``effectd.service`` -- a *user* unit (``systemctl --user``), the normal way to run effectd:
  one daemon per login user, running commands as that user.
* ``effectd@.service`` -- a *system* template, ``effectd@USER.service`` runs a daemon as the
  dedicated account ``USER`` (``User=%i``). A template rather than one unit with a fixed
  ``User=``: effectd runs commands with the rights of the account it runs as, so one daemon per
  account is the unit of isolation, and a template lets an administrator run several (a CI
  account, a headless host's user without lingering) without editing the unit. The price is that
  every path must carry the instance name, or two instances would share ``/run/effectd`` and one
  stopping would delete the other's sockets.

Specifiers differ between the two managers (``man systemd.unit``, "Specifiers"):

====  ======================  =============================================================
      system manager          user manager
====  ======================  =============================================================
%t    ``/run``                ``$XDG_RUNTIME_DIR`` (e.g. ``/run/user/1000``)
%S    ``/var/lib``            ``$XDG_CONFIG_HOME`` (``~/.config``) up to at least systemd 252;
                              later releases moved it to ``$XDG_STATE_HOME``
====  ======================  =============================================================

``%t/effectd`` is therefore exactly the runtime dir effectd picks by itself in both cases, but
``%S/effectd`` in a user unit is *not* the state dir effectd picks (``$XDG_STATE_HOME/effectd``,
i.e. ``~/.local/state/effectd``) on systemd 252 (Debian 12). ``StateDirectory=``
follows the same root as ``%S``. So the user unit sets neither: the daemon under systemd, a
daemon started by hand and one autostarted by ``effectctl`` all use the same journal on every
systemd version, and the daemon creates its state dir (mode 0700) itself as it must anyway.
The system unit has no such default to agree with and uses ``StateDirectory=`` and ``%S``.

Pure text: no imports from the rest of effectd, so it can be used without the runtime deps.
"""

from __future__ import annotations

DRAIN_TIMEOUT_SECONDS = 30
"""``--drain-timeout`` passed by the units (the daemon's own default is also 30)."""

STOP_TIMEOUT_SECONDS = 45
"""``TimeoutStopSec=``: the drain timeout plus time to kill effects and stop workers."""

WATCHDOG_SECONDS = 30
"""``WatchdogSec=``; the daemon pings every half of it (``SystemdNotifier.watchdog_interval``)."""

RESTART_SECONDS = 2
"""``RestartSec=``: long enough not to spin, short enough that clients barely notice."""

USER_UNIT_NAME = "effectd.service"
SYSTEM_UNIT_NAME = "effectd@.service"
SHIPPED_EFFECTD_PATH = "/usr/local/bin/effectd"
"""The ``ExecStart=`` binary of the units shipped in ``systemd/``."""

# Shared by both units. Comments in unit files must be whole lines: systemd has no trailing
# comments, a "#" after a value is part of the value.
_SERVICE_COMMON = """\
# Type=notify: the daemon sends READY=1 once its sockets are bound and the journal is
# replayed, so `systemctl start` returns only when clients can connect. Only the main
# process may notify (its children do not get NOTIFY_SOCKET at all).
Type=notify
NotifyAccess=main
ExecStart={exec_start}

# The daemon's main loop sends WATCHDOG=1 every WatchdogSec/2. A wedged loop stops pinging,
# systemd aborts the daemon (SIGABRT) and restarts it; its workers survive (see KillMode).
WatchdogSec={watchdog}
Restart=on-failure
RestartSec={restart}

# SIGTERM makes the daemon drain: no new submits, running effects get --drain-timeout
# seconds, then their process trees are killed and the workers stopped. The stop timeout
# must exceed the drain timeout or systemd SIGKILLs the daemon in the middle of the drain.
TimeoutStopSec={stop_timeout}

# KillMode=process: systemd signals only the daemon, never its workers or effects.
# - Clean stop/restart: the daemon's drain stops the workers itself.
# - Crash, kill -9 or watchdog abort: the workers and their effects keep running, and the
#   restarted daemon re-adopts them. With the default control-group (or mixed) mode systemd
#   would kill every running effect whenever the daemon crashed.
# The cost: systemd no longer cleans up stray processes. If the daemon dies for good (start
# limit hit, `systemctl stop` during a restart delay, SIGKILL after TimeoutStopSec) its
# workers stay in the unit's cgroup ("left-over process" in the log) until a new daemon
# re-adopts them or they exit through the daemon's orphan timeout; `systemctl {kill_hint}`
# ends them at once.
KillMode=process

# Sockets and lock. Preserved across restarts (automatic and `systemctl restart`) so
# surviving workers still find the daemon's endpoints; removed on a real stop.
RuntimeDirectory={runtime_directory}
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=restart
Environment=EFFECTD_RUNTIME_DIR=%t/{runtime_directory}
"""

_LIMITS = """\
# A daemon that keeps crashing gives up after 5 starts in 60 s instead of looping forever.
StartLimitIntervalSec=60
StartLimitBurst=5
"""


def _exec_start(effectd_path: str) -> str:
    if not effectd_path.startswith("/"):
        raise ValueError(f"ExecStart needs an absolute path, got {effectd_path!r}")
    if any(c.isspace() for c in effectd_path) or "%" in effectd_path:
        # systemd would split on the whitespace or expand the specifier; quoting rules for
        # ExecStart are not worth reproducing for a path nobody should use.
        raise ValueError(f"effectd path must not contain whitespace or '%': {effectd_path!r}")
    return f"{effectd_path} --drain-timeout {DRAIN_TIMEOUT_SECONDS}"


def _service_common(effectd_path: str, runtime_directory: str, kill_hint: str) -> str:
    return _SERVICE_COMMON.format(
        exec_start=_exec_start(effectd_path),
        watchdog=WATCHDOG_SECONDS,
        restart=RESTART_SECONDS,
        stop_timeout=STOP_TIMEOUT_SECONDS,
        runtime_directory=runtime_directory,
        kill_hint=kill_hint,
    )


def render_user_unit(effectd_path: str) -> str:
    """The ``systemctl --user`` unit ``effectd.service``, running ``effectd_path``."""
    return f"""\
# effectd, per-user service (systemd --user).
# Generated by effectd.unitfiles.render_user_unit(): change that, not this file.
#
# Install:  cp effectd.service ~/.config/systemd/user/
#           systemctl --user daemon-reload && systemctl --user enable --now effectd
# To keep effects running while you are logged out:  loginctl enable-linger "$USER"
#
# Effects inherit this service's environment, which is the user manager's and not your
# login shell's: add what commands need (PATH, ...) in ~/.config/environment.d/*.conf or
# with `systemctl --user import-environment PATH`.

[Unit]
Description=effectd background effects daemon
{_LIMITS}
[Service]
{_service_common(effectd_path, "effectd", "--user kill effectd")}
# No EFFECTD_STATE_DIR and no StateDirectory= here, on purpose: in a user manager %S (and
# StateDirectory=) is ~/.config on systemd <= 252 and ~/.local/state only on later releases,
# while effectd defaults to $XDG_STATE_HOME/effectd (~/.local/state/effectd). Leaving it to
# the daemon keeps one journal whether effectd runs here, by hand or autostarted.

# No sandboxing (NoNewPrivileges=, PrivateTmp=, ProtectHome=, ...): effects are this daemon's
# descendants, so any restriction here would silently change what users' commands can do
# (sudo stops working, files written to /tmp are invisible to the user's shell, ...).

[Install]
WantedBy=default.target
"""


def render_system_unit(effectd_path: str) -> str:
    """The system template unit ``effectd@.service``: ``effectd@USER`` runs as ``USER``."""
    return f"""\
# effectd, system service template: effectd@USER.service runs a daemon as the existing
# account USER (typically a dedicated one, e.g. `useradd --system --create-home effectd-ci`).
# Generated by effectd.unitfiles.render_system_unit(): change that, not this file.
#
# Install:  cp effectd@.service /etc/systemd/system/
#           systemctl daemon-reload && systemctl enable --now effectd@USER
#
# Paths (system manager: %t is /run, %S is /var/lib), one set per instance:
#   runtime (sockets, lock):  /run/effectd/USER
#   state (journal, outputs): /var/lib/effectd/USER
# Clients do not find the runtime dir by themselves (they look in $XDG_RUNTIME_DIR/effectd):
#   EFFECTD_RUNTIME_DIR=/run/effectd/USER EFFECTD_STATE_DIR=/var/lib/effectd/USER effectctl ...
# run as USER (the directories are 0700 and owned by USER).

[Unit]
Description=effectd background effects daemon for %i
# Stopped before the network goes down at shutdown, so draining effects still have it.
After=network.target
{_LIMITS}
[Service]
User=%i
{_service_common(effectd_path, "effectd/%i", "kill effectd@USER")}
StateDirectory=effectd/%i
StateDirectoryMode=0700
Environment=EFFECTD_STATE_DIR=%S/effectd/%i

# Opt-in hardening, off by default: effects are this daemon's descendants, so every line
# below also applies to the commands users submit. ProtectSystem=strict makes the whole file
# system read-only for them except the runtime and state dirs above and ReadWritePaths=;
# NoNewPrivileges=yes breaks setuid programs (sudo, ping on some systems) in effects.
# Enable what your effects can live with:
#ProtectSystem=strict
#ReadWritePaths=/srv/effectd
#NoNewPrivileges=yes

[Install]
WantedBy=multi-user.target
"""


def render_units(effectd_path: str) -> dict[str, str]:
    """Unit file name -> text for both units, as shipped in ``systemd/``."""
    return {
        USER_UNIT_NAME: render_user_unit(effectd_path),
        SYSTEM_UNIT_NAME: render_system_unit(effectd_path),
    }
