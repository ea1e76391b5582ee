"""effectd: a local daemon that runs effects (shell commands, Python functions, timers) in the
background, journals every lifecycle event durably and streams their output exactly.

Inside a python effect, :func:`progress` reports progress to whoever watches the effect.
"""

from __future__ import annotations

# The function shadows its module's name on the package: ``effectd.progress(...)`` is the API;
# code that needs the module imports from it (``from effectd.progress import install_hook``).
from effectd.progress import progress

__version__ = "0.1.0"

__all__ = ["__version__", "progress"]
