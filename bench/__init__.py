"""Throughput benchmarks of parallel-save against its peers.

    python -m bench --size 2G --runs 3          # from a checkout of the repository

One image lives in shared memory; every contender saves (or restores) the
same bytes, round after round, so that a noisy disk hits all of them alike:
parallel-save at several channel counts, QEMU's own mapped-ram save and load
over the same memory file, ``dd`` as the ceiling for the same non-zero
bytes, and ``numpy.ndarray.tofile`` as what a Python user would write.

Modules: ``workload`` (the image, the files, dropping caches), ``probe``
(one parallel-save or numpy operation in a fresh process), ``memory`` (peak
RssAnon of a process tree), ``contenders`` (what runs, and how it is timed),
``report`` (medians, ratios against the targets, table, JSON, plot).
"""
