"""``python -m parallel_save`` and the ``parallel-save`` command."""

import os


def main() -> int:
    # The command never multiplies matrices, but numpy's BLAS starts a
    # thread per CPU when imported, which spins for about 0.1 s looking for
    # work: on 2 CPUs, a core taken from a save that starts at once.  Set
    # before numpy's first import; a setting of the caller's is kept.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from .cli import main as command

    return command()


if __name__ == "__main__":
    raise SystemExit(main())
