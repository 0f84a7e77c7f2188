"""parallel-save: save and restore large memory images in parallel, in
QEMU's mapped-ram migration file format.

Example (README.md has more: live saves, checkpoints, restores)::

    import numpy as np
    from multiprocessing import shared_memory
    import parallel_save as ps

    shm = shared_memory.SharedMemory(create=True, size=1 << 20)
    try:
        with ps.RamBlock("ram0", shm.buf) as ram:
            ram.array[:4096] = 7
            ps.save("vm.img", [ram], channels=2)
            copy = np.zeros(ram.length, dtype=np.uint8)
            with ps.open_image("vm.img") as image:
                image.read_block("ram0", out=copy)
            assert copy.tobytes() == ram.array.tobytes()
    finally:
        shm.close()
        shm.unlink()

The names below are imported when first used: a channel started as a new
interpreter imports only the modules it needs (its start-up time is the
caller's wait).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    BlockError,
    ChannelError,
    ClosedImageError,
    DestinationError,
    DirectIOError,
    FileError,
    FormatError,
    ImageNotFoundError,
    ImageWriteError,
    IncompleteImageError,
    OptionError,
    ParallelSaveError,
    SaveStateError,
)

# Public name -> the module that defines it.
_LAZY = {
    "clean": "artifacts",
    "wait_channels": "channels",
    "Checkpointer": "checkpoint", "CheckpointStats": "checkpoint",
    "latest_checkpoint": "checkpoint", "restore_latest": "checkpoint",
    "RamBlock": "blocks",
    "BlockInfo": "image", "Image": "image", "open_image": "image",
    "restore": "restorer",
    "Saver": "saver", "save": "saver",
    "PassStats": "stats", "RestoreStats": "stats", "SaveStats": "stats",
    "read_status": "stats",
    "DirtyLog": "tracking", "DirtyTracker": "tracking", "HashTracker": "tracking",
    "TrackingError": "tracking", "UffdTracker": "tracking", "uffd_support": "tracking",
    "BlockVerdict": "verify", "VerifyResult": "verify", "describe_image": "verify",
    "verify_image": "verify",
}

if TYPE_CHECKING:
    from .artifacts import clean
    from .blocks import RamBlock
    from .channels import wait_channels
    from .checkpoint import Checkpointer, CheckpointStats, latest_checkpoint, restore_latest
    from .image import BlockInfo, Image, open_image
    from .restorer import restore
    from .saver import Saver, save
    from .stats import PassStats, RestoreStats, SaveStats, read_status
    from .tracking import (
        DirtyLog,
        DirtyTracker,
        HashTracker,
        TrackingError,
        UffdTracker,
        uffd_support,
    )
    from .verify import BlockVerdict, VerifyResult, describe_image, verify_image


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'parallel_save' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "BlockError",
    "BlockInfo",
    "BlockVerdict",
    "ChannelError",
    "CheckpointStats",
    "Checkpointer",
    "ClosedImageError",
    "DestinationError",
    "DirectIOError",
    "DirtyLog",
    "DirtyTracker",
    "FileError",
    "FormatError",
    "HashTracker",
    "Image",
    "ImageNotFoundError",
    "ImageWriteError",
    "IncompleteImageError",
    "OptionError",
    "ParallelSaveError",
    "PassStats",
    "RamBlock",
    "RestoreStats",
    "SaveStateError",
    "SaveStats",
    "Saver",
    "TrackingError",
    "UffdTracker",
    "VerifyResult",
    "__version__",
    "clean",
    "describe_image",
    "latest_checkpoint",
    "open_image",
    "read_status",
    "restore",
    "restore_latest",
    "save",
    "uffd_support",
    "verify_image",
    "wait_channels",
]
