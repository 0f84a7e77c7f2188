"""parallel-save: save and restore large memory images in parallel, in
QEMU's mapped-ram migration file format.

    import parallel_save as ps
    blocks = [ps.RamBlock("ram0", shm.buf)]
    with ps.Saver("vm.img", blocks, channels=4) as saver:
        saver.setup()
        saver.iterate()
        saver.complete(dirty={"ram0": changed})
    ps.restore("vm.img", {"ram0": other.buf}, channels=4)
    with ps.open_image("vm.img") as image: ...
"""

__version__ = "0.1.0"

from .blocks import RamBlock
from .errors import (
    BlockError,
    ChannelError,
    ClosedImageError,
    DirectIOError,
    FileError,
    FormatError,
    ImageNotFoundError,
    IncompleteImageError,
    ParallelSaveError,
    SaveStateError,
)
from .image import BlockInfo, Image, open_image
from .restorer import restore
from .saver import Saver, save
from .stats import PassStats, RestoreStats, SaveStats, read_status
from .tracking import DirtyLog, DirtyTracker, TrackingError, UffdTracker, uffd_support
from .verify import BlockVerdict, VerifyResult, describe_image, verify_image

__all__ = [
                     "BlockError",
                     "BlockInfo",
                     "BlockVerdict",
                     "ChannelError",
                     "ClosedImageError",
                     "DirectIOError",
                     "DirtyLog",
                     "DirtyTracker",
                     "FileError",
                     "FormatError",
                     "Image",
                     "ImageNotFoundError",
                     "IncompleteImageError",
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
                     "describe_image",
                     "open_image",
                     "read_status",
                     "restore",
                     "save",
                     "uffd_support",
                     "verify_image",
]
