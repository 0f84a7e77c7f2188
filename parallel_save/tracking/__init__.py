"""Dirty-page tracking for live saves: which pages changed since the last
pass, found while the memory keeps changing.

Three ways, one contract (:class:`DirtyTracker`, contract.py), chosen by who
writes:

- :class:`DirtyLog` (dirtylog.py): writers in any process attached to the
  image mark what they wrote in a shared log;
- the hash tracker (hashing.py, ``Saver(..., tracker="hash")``): no
  cooperation at all; the channels hash every page they look at and write
  only those whose hash changed since the previous pass;
- :class:`UffdTracker` (uffd.py): the kernel write-protects the blocks and
  reports the written pages, for writers inside the saving process.

The one rule every tracker keeps: a page written after the tracker last
reported it is reported again, at the latest by ``collect(final=True)``
once the writers have stopped.  A page reported more often than needed
costs a write; a page not reported is a corrupted save.
"""

from .contract import (
    DirtyPages,
    DirtyTracker,
    TrackingError,
    block_pages_of,
    count_dirty,
    merge_dirty,
)
from .dirtylog import DirtyLog
from .hashing import HashTracker, PageHasher
from .uffd import UffdTracker, uffd_support

__all__ = [
    "DirtyLog",
    "DirtyPages",
    "DirtyTracker",
    "HashTracker",
    "PageHasher",
    "TrackingError",
    "UffdTracker",
    "block_pages_of",
    "count_dirty",
    "merge_dirty",
    "uffd_support",
]
