"""Building on the GPU against the CPU, in one run: the SCMA / LMA fit of a
CuPy X (tokens numbered by sorting, minhash kernels) against the CPU fit of
the same rows, and ``init_weight(like=)`` (NumPy's generator run in parallel
on the device) against the CPU init plus its copy to the device. Every GPU
result is checked equal to the CPU's before it is timed.

    python benchmarks/gpu_build.py                    # a GPU: Criteo shape, 125,000 rows
    python benchmarks/gpu_build.py --dry-run          # no GPU: small, on the host emulator

``--dry-run`` runs the same code through the emulator (tests/cuda/emu.cpp:
the kernels compiled for the host), so the script is tested where there is
no device; its times mean nothing.
"""
import argparse
import json
import os
import sys
import time

import numpy as np


def _median_seconds(fn, sync, repeats):
    """Median wall seconds of fn() with the device synchronised after it."""
    fn()                                   # warm-up: compiles the kernels
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _device(dry_run):
    """(put, get, sync) for the device, or the emulator's stand-ins."""
    if not dry_run:
        import cupy as cp
        return cp.asarray, cp.asnumpy, cp.cuda.get_current_stream().synchronize
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import gpu_emu
    from hashemb._gpu import _runtime as RT
    if gpu_emu.build() is None:
        raise SystemExit("--dry-run: the emulator needs g++")
    RT._backend = gpu_emu.emu_backend()

    class Stand(np.ndarray):
        """A host array the dispatch takes for a CuPy one."""
    Stand.__module__ = "cupy"
    return (lambda a: np.array(a, copy=True).view(Stand),
            lambda a: np.asarray(a).view(np.ndarray), lambda: None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=125_000, help="rows of X, every one sampled")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true",
                    help="the host emulator at a small size (no GPU needed)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import hashemb as he
    from hashemb.data import CRITEO_KAGGLE, SyntheticCriteo
    if args.dry_run:
        args.rows, args.repeats, cards = min(args.rows, 300), 1, [50, 7, 300]
    else:
        cards = CRITEO_KAGGLE
    put, get, sync = _device(args.dry_run)
    X = SyntheticCriteo(scale=1.0, seed=0).sample(0, args.rows, "train").cats
    if args.dry_run:
        X = X[:, :3]
    Xd = put(X)
    D, out = args.dim, []

    def row(what, cpu_s, gpu_s, **extra):
        r = dict(what=what, cpu_s=cpu_s, gpu_s=gpu_s, speedup=cpu_s / gpu_s, **extra)
        out.append(r)
        print(f"{what:<44} cpu {cpu_s * 1e3:9.1f} ms   gpu {gpu_s * 1e3:9.1f} ms   "
              f"{r['speedup']:6.1f}x", flush=True)

    size = max(D, sum(cards) * D // 1000)
    for cls, block in ((he.LSHTable, 1), (he.LSHTable, D), (he.LMA, D)):
        kw = dict(size=size, dim=D, num_points=args.rows, block=block)
        cpu = cls.fit(X, **kw)
        if cls.fit(Xd, **kw) != cpu:
            raise SystemExit(f"{cls.__name__} block={block}: the GPU fit differs from the CPU's")
        row(f"{cls.__name__}.fit block={block} ({args.rows:,} rows)",
            _median_seconds(lambda: cls.fit(X, **kw), lambda: None, args.repeats),
            _median_seconds(lambda: cls.fit(Xd, **kw), sync, args.repeats),
            sampled=cpu.num_sampled)
    for scheme in (he.FullTable(cards, D), he.RobeZ(size, D, block=D)):
        want = scheme.init_weight(seed=1)
        got = get(scheme.init_weight(seed=1, like=Xd))
        if not (got.view(np.uint32) == want.view(np.uint32)).all():
            raise SystemExit(f"{type(scheme).__name__}: the device init differs from the CPU's")
        row(f"{type(scheme).__name__}.init_weight ({want.nbytes / 2**20:,.0f} MiB)",
            _median_seconds(lambda: put(scheme.init_weight(seed=1)), sync, args.repeats),
            _median_seconds(lambda: scheme.init_weight(seed=1, like=Xd), sync, args.repeats),
            mib=want.nbytes / 2**20)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=args.rows, dim=D, dry_run=args.dry_run, results=out), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
