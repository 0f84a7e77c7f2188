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

from .blocks import RamBlock  # noqa: E402
from .errors import (BlockError, ChannelError, DirectIOError, FormatError,  # noqa: E402
                     IncompleteImageError, ParallelSaveError, SaveStateError)
from .image import BlockInfo, Image, open_image  # noqa: E402
from .restorer import restore  # noqa: E402
from .saver import Saver, save  # noqa: E402
from .stats import PassStats, RestoreStats, SaveStats, read_status  # noqa: E402
from .tracking import DirtyLog, DirtyTracker, TrackingError, UffdTracker, uffd_support

__all__ = [
    "RamBlock", "Saver", "save", "restore", "open_image", "Image", "BlockInfo",
    "SaveStats", "PassStats", "RestoreStats", "read_status",
    "ParallelSaveError", "FormatError", "IncompleteImageError", "BlockError",
    "ChannelError", "DirectIOError", "SaveStateError", "__version__",
    "DirtyLog", "DirtyTracker", "UffdTracker", "TrackingError", "uffd_support",
]
