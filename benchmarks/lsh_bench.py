"""SCMA / LMA: signature build time and peak memory on the Criteo Kaggle shape,
and lookup throughput beside RobeZ and HashedNet in the same run.

Build: the synthetic Criteo generator at full scale (26 fields, 33.76M
tokens), ``--rows`` rows of which 125,000 are sampled; each build runs in its own
process so its peak memory is its own. Lookups: batches of the synthetic test
split (most tokens seen in the sample, as in training), forward at batch 16384
and a training step (forward + backward + fused SGD) at batch 2048, arrays at
1000x compression.

    python benchmarks/lsh_bench.py            # about 2 minutes on 2 cores
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from criteo_bags import peak_rss, spread, timeit  # the same timer, ratio statistic and peak (run from benchmarks/)


def data(rows, seed=0):
    from hashemb.data import SyntheticCriteo
    gen = SyntheticCriteo(scale=1.0, seed=seed)
    return gen, gen.sample(0, rows, "train").cats


def build_one(kind, dim, path, num_points):
    """One build in a fresh process: its peak memory above the loaded data."""
    import hashemb as he
    X = np.load(path)
    base = peak_rss()
    cls = he.LMA if kind == "LMA" else he.LSHTable
    t = time.perf_counter()
    # block=1: element-wise, NUM_HASH x D minhashes per token (the original's table)
    s = cls.fit(X, size=33_762_577 * dim // 1000, dim=dim, num_hashes=2,
                num_points=num_points, block=1)
    sec = time.perf_counter() - t
    peak = peak_rss()
    print(json.dumps({"kind": kind, "dim": dim, "seconds": sec, "sampled": s.num_sampled,
                      "peak_gib": peak / 2 ** 30, "build_gib": (peak - base) / 2 ** 30,
                      "extra_mib": s.extra_bytes() / 2 ** 20}))


def lookups(rows, num_points, rounds, dim=16):
    """samples/s of every scheme, forward and training step, in ``rounds``
    rounds: each round times every scheme once, so a ratio to RobeZ is taken
    within a round (this VM drifts between minutes)."""
    import hashemb as he
    from tqdm.auto import tqdm
    gen, X = data(rows)
    T = X.shape[1]
    size = sum(gen.cardinalities) * dim // 1000
    test = gen.sample(0, 16384, "test").cats
    makers = {
        "RobeZ Z=16": lambda: he.RobeZ(size, dim, block=16),
        "HashedNet (Z=1)": lambda: he.HashedNet(size, dim),
        "LSHTable Z=16": lambda: he.LSHTable.fit(X, size, dim, num_points=num_points, block=16),
        "LMA Z=16": lambda: he.LMA.fit(X, size, dim, num_points=num_points, block=16),
        "LSHTable Z=1": lambda: he.LSHTable.fit(X, size, dim, num_points=num_points),
        "LMA Z=1": lambda: he.LMA.fit(X, size, dim, num_points=num_points),
    }
    schemes = {name: make() for name, make in makers.items()}
    weights = {name: s.init_weight() for name, s in schemes.items()}
    runs = {name: {"forward": [], "train": []} for name in schemes}
    jobs = [(r, name) for r in range(rounds) for name in schemes]
    for _, name in tqdm(jobs, desc="lookups", leave=False):
        s, W = schemes[name], weights[name]
        for B, train in ((16384, False), (2048, True)):
            q = np.ascontiguousarray(test[:B].T).reshape(-1)
            off = np.arange(q.size + 1, dtype=np.int64)
            G = np.ones((B, T * dim), np.float32)
            opt = he.SGD(1e-6)

            def step():     # a training step passes forward's run starts to backward
                out = he.embedding_bags(q, W, off, scheme=s, num_tables=T,
                                        return_saved=train)
                if train:
                    saved = out[1]
                    he.embedding_bags_backward(G, q, off, scheme=s, num_tables=T, weight=W,
                                               optimizer=opt, saved=saved)
            runs[name]["train" if train else "forward"].append(B / timeit(step, 7, warmup=1))
    return runs


def _ratio(runs, name, ref, kind):
    """Median, min and max over rounds of name's samples/s over ref's."""
    return spread(np.array(runs[name][kind]) / np.array(runs[ref][kind]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--num-points", type=int, default=125_000)
    p.add_argument("--repeat", type=int, default=5, help="rounds of the lookup timings")
    p.add_argument("--build-one", nargs=3, metavar=("KIND", "DIM", "NPY"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build_one:
        build_one(args.build_one[0], int(args.build_one[1]), args.build_one[2],
                  args.num_points)
        return
    import tempfile
    tmp = tempfile.NamedTemporaryFile(suffix=".npy", delete=False)
    np.save(tmp, data(args.rows)[1])
    tmp.close()
    print(f"build: {args.rows:,} synthetic Criteo rows (26 fields, 33.76M tokens), "
          f"{args.num_points:,} sampled, NUM_HASH = 2, element-wise (NUM_HASH x D "
          "minhashes per token)")
    print("| scheme | D | seconds | sampled tokens | peak GiB (process) | "
          "GiB above the loaded data | map + data MiB |")
    print("|---|---|---|---|---|---|---|")
    for kind, dim in (("LSHTable", 16), ("LMA", 16), ("LSHTable", 128), ("LMA", 128)):
        r = json.loads(subprocess.run(
            [sys.executable, __file__, "--build-one", kind, str(dim), tmp.name,
             "--num-points", str(args.num_points)], check=True, capture_output=True,
            text=True).stdout.strip().splitlines()[-1])
        print(f"| {kind} | {dim} | {r['seconds']:.2f} | {r['sampled']:,} | {r['peak_gib']:.2f} "
              f"| {r['build_gib']:.2f} | {r['extra_mib']:.0f} |")
    os.unlink(tmp.name)
    runs = lookups(args.rows, args.num_points, args.repeat)
    print(f"\nlookups at 1000x, D=16 (samples/s, median of {args.repeat} rounds; ratios "
          "taken within each round: median (min-max))")
    print("| scheme | forward B=16384 | train step B=2048 | forward / RobeZ | train / RobeZ "
          "| forward / HashedNet | train / HashedNet |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        cells = [f"{a:.2f} ({lo:.2f}-{hi:.2f})" for ref in ("RobeZ Z=16", "HashedNet (Z=1)")
                 for a, lo, hi in (_ratio(runs, name, ref, "forward"),
                                   _ratio(runs, name, ref, "train"))]
        print(f"| {name} | {np.median(r['forward']):,.0f} | {np.median(r['train']):,.0f} | "
              + " | ".join([cells[0], cells[1], cells[2], cells[3]]) + " |")

if __name__ == "__main__":
    main()
