"""Find and kill the *whole* process tree of one effect, without blocking the worker.

Why this module exists
----------------------
A worker process supervises several effect children at once.  Each child is
started with ``start_new_session=True`` and with ``EFFECTD_EFFECT_ID=<effect id>``
in its environment.  Cancelling an effect (or timing it out) must terminate
everything the effect started, and "everything" is harder to pin down than it
looks:

* killing the root pid leaves its children running;
* ``killpg`` of the root's process group misses anything that called
  ``setsid()``/``setpgid()`` -- which is exactly what daemons and
  ``setsid sleep 300 &`` do;
* walking ``children(recursive=True)`` misses double-forked processes whose
  intermediate parent has exited: they are reparented to the nearest *child
  subreaper* (the worker, once it called :func:`become_subreaper`) or to init,
  and are no longer below the root at all.

So an effect's processes are identified by the union of several independent
signals (see :func:`effect_processes`): the root (when its identity still
matches) and its descendants, every process of our uid whose environment
carries ``EFFECTD_EFFECT_ID == effect_id`` (the environment is inherited across
``fork``/``setsid``/double fork, which is how escapees are found even when we
are not their subreaper, e.g. a restarted daemon cleaning up after a dead
worker), the members of the root's session/process group, and the descendants
of all of those.

Safety rules
------------
* A pid alone never identifies a process: pids are recycled.  Processes are
  tracked as :class:`ProcessIdentity` (pid + psutil ``create_time``) and are only
  signalled after re-checking that identity.  On Linux the check is race free:
  a pidfd is opened first, the identity is verified *after* opening it, and the
  signal is sent through the pidfd, so a pid recycled between scan and signal
  is never hit.
* pid <= 1, our own pid, our ancestors, our own process group and our own
  session are never signalled.
* Zombies are never counted as alive, and killing never reaps: an exit
  status belongs to whoever owns the pid (a run's pidfd, a ``Popen``).  If a
  kill reaped a dead child, its owner's next ``waitpid`` would fail with
  ECHILD, which ``subprocess.Popen`` reports as exit code 0 -- a failed effect
  reported as succeeded.  Orphans adopted as subreaper are collected
  separately by :func:`reap_orphan_zombies`, which skips every owned pid.

Non-blocking kill
-----------------
The worker's I/O loop must never stall for seconds, so :class:`TreeKill` is a
two-phase state machine driven by the caller: :meth:`TreeKill.start` sends
SIGTERM (+ SIGCONT so stopped processes can act on it) and returns at once;
:meth:`TreeKill.poll` re-scans, terms newcomers, and after the grace period
SIGKILLs every survivor, re-scanning a few times per call because a dying parent
may still fork.  Each call costs one ``/proc`` pass plus reading the environment
of same-uid processes that were not seen before (results are cached per
identity).  (A blocking ``kill_tree`` built on it lives with the tests, its only user.)

Limitations
-----------
* A process that *execs with a cleared/replaced environment* (``env -i``,
  ``execve(..., envp=NULL)``) cannot be found by marker.  It is still found when
  it is a descendant of any found process, or a member of the root's
  session/process group; a process that both clears its environment and escapes
  the tree and the session (e.g. ``setsid env -i cmd`` whose parent then exits)
  is not found -- except, by the worker, while it holds the effect's output
  pipes (:class:`PipeHolderKill`).  ``/proc/<pid>/environ`` shows the environment as of
  ``execve``; later ``setenv``/``unsetenv`` calls do not hide the marker.
* Processes of another uid (setuid programs) are only found through the
  descendant/session relations, and may not be killable (AccessDenied); the
  kill then does not complete (a :class:`TreeKill` with ``give_up_after`` counts them as leaked).
* Identities compare the wall-clock ``create_time`` psutil computes from the
  boot time; if the system clock is stepped so that the kernel's boot time
  changes, previously recorded identities stop matching.  That fails safe: the
  root is no longer matched by identity (it is still found by marker) and no
  wrong process is signalled.
* A process in uninterruptible sleep (``D`` state) survives SIGKILL until the
  kernel lets it go; :meth:`TreeKill.poll` keeps returning ``False`` meanwhile.

Modules
-------
:mod:`.identity` (process identities, the only ways to signal), :mod:`.scan` (finding an
effect's processes and the holders of its pipes), :mod:`.kill` (:class:`TreeKill`,
:class:`PipeHolderKill`), :mod:`.reaping` (subreaper, exit statuses). Import from this package.
"""

from __future__ import annotations

from effectd.daemon.proctree.identity import EFFECT_MARKER_ENV, ProcessIdentity, is_alive
from effectd.daemon.proctree.kill import DEFAULT_KILL_GRACE, KILL_GIVE_UP, PipeHolderKill, TreeKill
from effectd.daemon.proctree.reaping import become_subreaper, collect_exit_status, own_children, reap_orphan_zombies
from effectd.daemon.proctree.scan import effect_processes, pipe_holders

__all__ = [
    "DEFAULT_KILL_GRACE",
    "EFFECT_MARKER_ENV",
    "KILL_GIVE_UP",
    "PipeHolderKill",
    "ProcessIdentity",
    "TreeKill",
    "become_subreaper",
    "collect_exit_status",
    "effect_processes",
    "is_alive",
    "own_children",
    "pipe_holders",
    "reap_orphan_zombies",
]
