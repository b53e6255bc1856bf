"""``python -m hiermask``: the ``hiermask`` command line (see :mod:`hiermask.cli`)."""

from .cli import command

if __name__ == "__main__":
    raise SystemExit(command())
