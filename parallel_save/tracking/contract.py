"""The contract every tracker keeps, and helpers on dirty sets."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Self

import numpy as np

from ..blocks import RamBlock
from ..errors import BlockError, OptionError, ParallelSaveError
from ..format import PAGE_SIZE, check_block_length, check_block_name
from ..stats import PassStats

# One bool per page and block; None: every page.
DirtyPages = dict[str, np.ndarray]


class TrackingError(ParallelSaveError):
    """A tracker cannot work here: the kernel lacks the feature it needs,
    or a dirty log to attach is gone or not a dirty log."""


class DirtyTracker(ABC):
    """What :meth:`Saver.run`, ``iterate(dirty=tracker)`` and
    ``complete(dirty=tracker)`` need from a tracker."""

    #: Pages of each tracked block, by name (None: follows any blocks).
    block_pages: dict[str, int] | None

    @abstractmethod
    def start(self) -> None:
        """Forget what was tracked so far, because a full pass follows:
        from here on, every write is reported by a later ``collect``."""

    @abstractmethod
    def collect(self, final: bool = False) -> DirtyPages:
        """The pages written since the last collect, one bool per page and
        block; they are reported once more if written again.  ``final``
        once the writers have stopped: then nothing may be left behind.
        The pass that saves them must read the pages after this returns."""

    def pages_left(self, collected: DirtyPages | None, last_pass: PassStats) -> int:
        """How many pages are still to save after ``last_pass``, given what
        ``collect`` just returned: what a live save compares with its limit."""
        return count_dirty(collected)

    def close(self) -> None:
        """Release what the tracker holds; safe to call twice."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def block_pages_of(blocks: Sequence[RamBlock] | Mapping[str, int]) -> dict[str, int]:
    """Pages per block name, from RAM blocks or from {name: length in bytes}."""
    if isinstance(blocks, Mapping):
        lengths = dict(blocks)
    else:
        lengths = {}
        for block in blocks:
            if not isinstance(block, RamBlock):
                raise BlockError(f"expected RamBlock objects, got {type(block).__name__}")
            lengths[block.name] = block.length
        if len(lengths) != len(blocks):
            raise BlockError("a block name is given twice")
    for name, length in lengths.items():
        check_block_name(name)
        check_block_length(name, length)
    return {name: length // PAGE_SIZE for name, length in lengths.items()}


def count_dirty(dirty: DirtyPages | None) -> int:
    if dirty is None:
        raise OptionError("count_dirty needs a dirty set, not None (every page)")
    return sum(int(np.count_nonzero(pages)) for pages in dirty.values())


def merge_dirty(first: DirtyPages | None, second: DirtyPages | None) -> DirtyPages | None:
    """Pages dirty in either set (None: every page)."""
    if first is None or second is None:
        return None
    merged = {name: pages.copy() for name, pages in first.items()}
    for name, pages in second.items():
        merged[name] = merged[name] | pages if name in merged else pages.copy()
    return merged
