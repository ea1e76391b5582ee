"""Run one benchmark function in a fresh interpreter: ``python -m bench.helpers MOD:FUNC JSONARGS``.

Prints the function's JSON-serialisable result as the last line of stdout."""

from __future__ import annotations

import importlib
import json
import sys


def main() -> int:
    target, args = sys.argv[1], json.loads(sys.argv[2])
    mod, _, func = target.partition(":")
    result = getattr(importlib.import_module(mod), func)(*args)
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
