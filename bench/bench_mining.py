"""Benchmark of SaHa cluster construction (g2e.mining) on random unit embeddings.

  python bench/bench_mining.py [--rows 100000] [--dim 1536] [--positives 10000]

N rows with unique queries and positives drawn from a smaller shared set (so candidates have
several owners), top_k=15, pool_mult=3 (the release defaults). Prints the wall time of the
similarity/top-pool search and of the bookkeeping (owner walk, ordering, marking). The
release's loop (a CPU flat index searched one anchor at a time, Python bookkeeping) takes
about 52 s on the default input on a 2-core CPU.

Measured (default input, JAX on CPU): 6.2-6.5 s wall in total (search wait 1.8 s,
bookkeeping 3.5-3.7 s, 10-11 s CPU) on 2 otherwise idle cores (`taskset -c 0,1` on the
16-core Xeon host of an H100 machine); on the shared 2-core development VM 9-10 s of CPU,
its wall time depending on the other load. With one H100 (query similarities then on the
device): search wait 3.0 s (mostly moving [256, 100000] similarity blocks to the host),
bookkeeping 1.0 s, plus a one-off ~12 s of XLA GPU autotuning per new matmul shape
(XLA_FLAGS=--xla_gpu_autotune_level=0 cuts it to ~1 s).
A classification-like input (`--rows 50000 --positives 24`: every candidate owned by ~2000
queries) takes 10.1 s on the 2 idle cores (query similarities on the device path).
"""

import argparse
import os
import time

import numpy as np

from g2e import mining


def unit_rows(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--positives", type=int, default=10_000)
    parser.add_argument("--top_k", type=int, default=15)
    parser.add_argument("--pool_mult", type=int, default=3)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    queries = unit_rows(rng, args.rows, args.dim)
    positives = unit_rows(rng, args.positives, args.dim)
    positive_ids = rng.integers(0, args.positives, args.rows)
    positive_rows = positives[positive_ids]
    query_keys = list(range(args.rows))
    positive_keys = positive_ids.tolist()

    load_before = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    result = mining.mine_clusters(query_keys, positive_keys, queries, positive_rows,
                                  top_k=args.top_k, pool_mult=args.pool_mult,
                                  keep_retrieval_order=False, block_size=args.block_size)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    report = result.report
    print(f"rows={args.rows} dim={args.dim} positives={args.positives} top_k={args.top_k} "
          f"pool_mult={args.pool_mult} block_size={args.block_size}")
    print(f"clusters={report['clusters']} (phase 1: {report['phase1']['clusters']}, "
          f"phase 2: {report['phase2']['clusters']}), mean size "
          f"{report['cluster_size']['mean']:.2f}, rows uncovered {report['rows_uncovered']}, "
          f"anchors searched {report['phase1']['anchors_searched']}"
          f"+{report['phase2']['anchors_searched']}")
    # The search alone, without the bookkeeping running beside it, over as many rows as the
    # mining pass searched (same block shape; compiled already).
    searched = result.timing["blocks"] * args.block_size
    tick = time.perf_counter()
    mining.top_pool(queries[:searched], positives, report["pool"], block_size=args.block_size)
    search_alone = time.perf_counter() - tick
    print(f"similarity + top-pool alone for the {searched} rows searched: {search_alone:.2f} s")
    # The next block is searched while this one is walked, so the search figure is the time
    # spent waiting for it (incl. the one compilation), not hidden behind the bookkeeping.
    print(f"search wait (similarity + top-pool): {result.timing['search_s']:.2f} s")
    print(f"bookkeeping (owner walk, ordering, marking): {result.timing['bookkeeping_s']:.2f} s")
    print(f"total mine_clusters: {total:.2f} s wall, {cpu:.2f} s CPU (all threads); "
          f"load average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
