"""One timed operation in a fresh process: a parallel-save save, restore or
incremental passes, or numpy's ``tofile``.

    python -m bench.probe '{"op": "save", "image": ..., "out": ..., ...}'

A fresh process per run, like the fresh QEMU each of its runs needs: no run
inherits another's warm state, and the process tree whose memory is
sampled holds nothing but the operation (the benchmark's own bookkeeping
would otherwise count as coordinator memory, and be copied into every
forked channel).  The clock starts after the imports; the result is one
JSON line on stdout.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

import parallel_save as ps

BLOCK = "ram0"  # QEMU's name for the RAM of "-M none" with backend id ram0


def _image_block(spec: dict[str, Any]) -> ps.RamBlock:
    return ps.RamBlock.from_file(BLOCK, spec["image"], length=spec["size"], writable=False)


def save(spec: dict[str, Any]) -> dict[str, Any]:
    block = _image_block(spec)
    started = time.perf_counter()
    stats = ps.save(spec["out"], [block], spec["channels"], direct_io=spec["direct_io"],
                    sync=spec["sync"])
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "phases": stats.phases,
            "pages_written": stats.pages_written, "zero_pages": stats.zero_pages,
            "bytes_written": stats.bytes_written,
            "write_calls": sum(c.write_calls for c in stats.channel_stats),
            "control_bytes": stats.control_bytes}


def passes(spec: dict[str, Any]) -> dict[str, Any]:
    """A first pass over every page, then one pass per dirty fraction, each
    over random pages (the memory itself is unchanged: what is timed is
    finding and rewriting the dirty pages)."""
    block = _image_block(spec)
    rng = np.random.default_rng(spec["seed"])
    timed = {}
    with ps.Saver(spec["out"], [block], spec["channels"], direct_io=spec["direct_io"],
                  sync=spec["sync"]) as saver:
        started = time.perf_counter()
        saver.setup()
        saver.iterate()
        first = time.perf_counter() - started
        for fraction in spec["fractions"]:
            dirty = rng.random(block.pages) < fraction
            started = time.perf_counter()
            saver.iterate(dirty={BLOCK: dirty})
            timed[str(fraction)] = time.perf_counter() - started
    return {"first_pass": first, "passes": timed}


def restore(spec: dict[str, Any]) -> dict[str, Any]:
    """Into a fresh, all-zero destination, so ``assume_zero`` (QEMU's own
    assumption on load) holds."""
    target = ps.RamBlock.from_file(BLOCK, spec["destination"], length=spec["size"])
    started = time.perf_counter()
    stats = ps.restore(spec["source"], [target], spec["channels"],
                       direct_io=spec["direct_io"], assume_zero=True)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "pages_read": stats.pages_read,
            "pages_zeroed": stats.pages_zeroed, "control_bytes": stats.control_bytes}


def tofile(spec: dict[str, Any]) -> dict[str, Any]:
    image = np.memmap(spec["image"], dtype=np.uint8, mode="r", shape=(spec["size"],))
    started = time.perf_counter()
    image.tofile(spec["out"])
    return {"seconds": time.perf_counter() - started}


OPERATIONS = {"save": save, "passes": passes, "restore": restore, "tofile": tofile}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(args[0])
    print(json.dumps(OPERATIONS[spec["op"]](spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
