"""The contract every dirty-page tracker keeps (:class:`DirtyTracker`), and
the dirty sets they report: a module of its own, so that the trackers
(dirtylog, uffd) and the package that re-exports them import it without an
import cycle through ``tracking/__init__``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Self

import numpy as np

from ..blocks import RamBlock
from ..errors import BlockError, ParallelSaveError
from ..format import PAGE_SIZE, check_block_length, check_block_name

DirtyPages = dict[str, np.ndarray]


class TrackingError(ParallelSaveError):
    """A tracker cannot work here: the kernel lacks the feature it needs,
    or a dirty log to attach is gone or not a dirty log."""


class DirtyTracker(ABC):
    """What :meth:`Saver.run`, ``iterate(dirty=tracker)`` and
    ``complete(dirty=tracker)`` need from a tracker."""

    #: Pages of each tracked block, by name.
    block_pages: dict[str, int]

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


def count_dirty(dirty: DirtyPages) -> int:
    return sum(int(np.count_nonzero(pages)) for pages in dirty.values())


def merge_dirty(first: DirtyPages, second: DirtyPages) -> DirtyPages:
    """Pages dirty in either set."""
    merged = {name: pages.copy() for name, pages in first.items()}
    for name, pages in second.items():
        merged[name] = merged[name] | pages if name in merged else pages.copy()
    return merged
