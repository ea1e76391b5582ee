"""The kinds of effect a worker runs, one module each (shell, python, sleep) on a shared base."""
