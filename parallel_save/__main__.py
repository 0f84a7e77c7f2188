"""``python -m parallel_save``: the same as the ``parallel-save`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
