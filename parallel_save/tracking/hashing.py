"""The hash tracker's page hash: keyed, 128 bits, vectorised with numpy.

With ``Saver(..., tracker="hash")`` the channels hash every page a pass
looks at and write only the pages whose hash differs from the one stored
for them in the control segment (16 bytes a page).  Writers need not
cooperate, so the hash must not collide by chance.

The hash: a page is 1024 little-endian 32-bit words m_j; two lanes,
``h_l = sum_j k_lj * m_j  mod 2^64``, with 2 x 1024 uniformly random 64-bit
keys drawn afresh for every save (os.urandom).  Why it is collision-safe:
for two different pages, take a word where they differ, d = m_j - m'_j, a
non-zero integer below 2^32 in size, so d = 2^t * odd with t <= 31.  Given
all the other keys, the lane collides only if k_lj * d hits one value mod
2^64, which at most 2^t of the 2^64 keys do: at most 2^-33 per lane, 2^-66
for both (independent keys).  Keys stay inside the save, so no writer can
aim at a collision.  Words of 64 bits would not do: two words differing
only in their top bit collide with probability 1/2 mod 2^64.

The zero page hashes to (0, 0), whatever the keys.  The control segment
starts zeroed, which therefore says "the file holds zeros here": true of a
new image, whose pages are holes with clear bits, so a pass needs no
special first round.

The cost is two uint64 multiply-adds per 32-bit word (no 64-bit SIMD
multiply before AVX-512): ``python -m bench.tracking`` measures it.
"""

from __future__ import annotations

import os

import numpy as np

from ..control import HASH_LANES as LANES
from ..control import HASH_WORDS as WORDS
from ..format import PAGE_SIZE
from ..stats import PassStats
from .contract import DirtyPages, DirtyTracker

# Pages widened to 64 bits at a time: 1 MiB of scratch, which stays in
# the cache between the widening and the two products, and few enough
# numpy calls per GiB (measured: 32 rows cost 40 % more, 512 no less).
_ROWS = 128


def draw_keys() -> np.ndarray:
    """Fresh keys for one save: (LANES, WORDS) uniformly random uint64."""
    return np.frombuffer(os.urandom(LANES * WORDS * 8), dtype=np.uint64).reshape(LANES, WORDS)


class PageHasher:
    """Hashes runs of pages with one save's keys."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys
        self._wide = np.empty((_ROWS, WORDS), dtype=np.uint64)

    def hash_into(self, pages: np.ndarray, out: np.ndarray) -> None:
        """Hash ``pages`` (n contiguous pages, of any integer dtype) into
        ``out`` (n rows of LANES uint64)."""
        words = pages.view(np.uint32).reshape(-1, WORDS)
        for start in range(0, words.shape[0], _ROWS):
            end = min(start + _ROWS, words.shape[0])
            wide = self._wide[:end - start]
            np.copyto(wide, words[start:end], casting="unsafe")  # zero-extends
            for lane in range(LANES):
                # dot: numpy's plain integer loop, wrapping mod 2^64.
                out[start:end, lane] = wide.dot(self.keys[lane])

    def hash(self, pages: np.ndarray) -> np.ndarray:
        """The hashes of ``pages`` as a new (n, LANES) array."""
        out = np.empty((pages.nbytes // PAGE_SIZE, LANES), dtype=np.uint64)
        self.hash_into(pages, out)
        return out


class HashTracker(DirtyTracker):
    """The tracker that needs no cooperation: every pass looks at every
    page, and the channels write only the pages whose keyed hash changed
    since the file got them.  Give it to the Saver (``tracker=``): it works
    inside the channels, with keys drawn fresh for each save."""

    block_pages = None

    def start(self) -> None:
        pass  # the first pass writes every page anyway

    def collect(self, final: bool = False) -> DirtyPages | None:
        return None  # every page; the channels skip the unchanged ones

    def pages_left(self, collected: DirtyPages | None, last_pass: PassStats) -> int:
        return last_pass.dirty_pages - last_pass.pages_unchanged

    def draw_keys(self) -> np.ndarray:
        return draw_keys()
