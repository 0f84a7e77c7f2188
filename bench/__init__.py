"""Throughput benchmarks of parallel-save against its peers.

    python -m bench                  # from a checkout: 1 GiB, 3 workloads, 2 regimes
    python -m bench --matrix         # 1, 4 and 8 GiB

Per workload (random, dense, guest) and size, one image lives in shared
memory; every contender saves (or restores) the same bytes, round after
round, so that a noisy disk hits all of them alike: parallel-save at
several channel counts, QEMU's own mapped-ram save and load over the same
memory file, and the floors (one writer, one reader, ``dd``, memcpy) that
say what this machine allows; warm and durable regimes apart.

Modules: ``workload`` (the images, the files, dropping caches), ``probe``
(one parallel-save operation or floor in a fresh process), ``memory`` (peak
RssAnon, Pss_Anon and page tables of a process tree), ``contenders`` (what
runs, its peer and floor, and how it is timed), ``report`` (medians, ratios,
targets, table, JSON, plot), ``qemu`` (the QEMU driver).
"""
