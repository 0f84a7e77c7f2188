import numpy as np

import parallel_save as ps


def test_round_trip_one_block(shm, tmp_path):
    block = shm.block("ram0", 1024, fill=0.5, seed=1)
    image = tmp_path / "vm.img"
    stats = ps.save(image, [block], channels=2)
    assert stats.pages_written + stats.zero_pages == 1024
    target = shm.block("ram0", 1024, fill="garbage")
    ps.restore(image, [target], channels=3)
    assert np.array_equal(target.array, block.array)
