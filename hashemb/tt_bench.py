"""TT-Rec benchmark on FBTT's setup, with honest figures.

    python -m hashemb tt-bench                 # B=512, pooling 20, E=11M, D=64, ranks 32
    python -m hashemb tt-bench --iters 50 --torch-rows 2000000
    python -m hashemb tt-bench --device gpu    # CuPy arrays on the current CUDA device

Prints, for the TT table (hashemb kernels) and the full-table
torch.nn.EmbeddingBag on the same input: time per lookup (nnz), GFLOPS and
GB/s, and the machine's SGEMM peak measured in the same run (a 4096^3 float32
numpy matmul) so the TT figure reads as a fraction of what the CPU can do.

* FLOPs are counted two ways: "chain" = what the naive per-lookup chain
  product does (2 multiply-add flops per term: forward
  sum_k 2 Q_k R_k q_k R_{k+1}, backward twice that plus the first core's
  adds), and "done" = what hashemb actually computes (the same products, but
  once per distinct row of the batch). With uniform random lookups in 11M
  rows the two almost coincide.
* GB/s counts logical bytes, the same for both: the rows looked up
  (nnz * D * 4), the indices (8 each) and the output (B * D * 4); backward
  counts the gradient rows again.
* ``--zipf A``: lookups drawn from a Zipf law of exponent A (rank r with
  probability ~ r^-A, ranks scattered over the rows by a fixed bijection),
  the skew of real click logs, instead of uniformly.
* ``--cache-size N``: also times the TT table with an LFU cache of N rows
  (``he.TTCache``), as the torch module trains it: every step counts its
  lookups, then runs forward and backward with the cache; the cache is
  populated once, after the warm-up steps. Its rows add "TT + cache" lines
  and the share of lookups the cache served.
* ``--device gpu``: the same batches as CuPy arrays (moved to the device
  before timing), timed with CUDA events around each call after a device
  synchronisation, so the figures include the host round trips the TT path
  makes (distinct-row counts); the peak is a cuBLAS SGEMM of
  ``--peak-size``^3 on the device; the torch column is
  torch.nn.EmbeddingBag on CUDA, skipped when torch has no CUDA.
"""
import argparse
import math
import time

import numpy as np

from . import _validate as V
from . import tt as he_tt


def _parser():
    p = argparse.ArgumentParser(prog="python -m hashemb tt-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=V.cli_number(int), default=512)
    p.add_argument("--pooling", type=V.cli_number(int), default=20)
    p.add_argument("--num-embeddings", type=V.cli_number(int), default=11_000_000)
    p.add_argument("--p", type=lambda t: t if t == "auto" else V.cli_ints(t),
                   default="200,220,250", help="row factors ('auto': tt_shapes)")
    p.add_argument("--q", type=V.cli_ints, default="4,4,4", help="column factors (product = D)")
    p.add_argument("--ranks", type=V.cli_ints, default="32,32")
    p.add_argument("--iters", type=V.cli_number(int), default=30)
    p.add_argument("--warmup", type=V.cli_number(int, closed=True), default=3)
    p.add_argument("--torch-rows", type=V.cli_number(int), default=None,
                   help="rows of the full torch table (default: num-embeddings when it "
                        "fits with its gradient in the free memory (2.2x the table), else "
                        "scaled down)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--seed", type=V.cli_number(int, closed=True), default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--zipf", type=V.cli_number(float, low=1.0), default=None,
                   help="Zipf exponent of the lookups (> 1; default uniform)")
    p.add_argument("--cache-size", type=V.cli_number(int, closed=True), default=0,
                   help="also time the table with an LFU cache of this many rows")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: CuPy arrays on the current CUDA device")
    p.add_argument("--peak-size", type=V.cli_number(int), default=None,
                   help="n of the n^3 SGEMM measuring the peak (default 4096 CPU, 8192 GPU)")
    return p


def sgemm_peak(n=4096, reps=3):
    """Best GFLOPS of an n^3 float32 numpy matmul (all threads)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.copy()
    c = a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        np.matmul(a, b, out=c)
        best = max(best, 2.0 * n ** 3 / (time.perf_counter() - t))
    return best / 1e9


def chain_flops(p, q, R):
    """(forward, backward) flops of one row's chain product and its gradient."""
    Q, fwd, bwd = q[0], 0, q[0] * R[1]
    for k in range(1, len(p)):
        f = 2 * Q * R[k] * q[k] * R[k + 1]
        fwd += f
        bwd += 2 * f
        Q *= q[k]
    return fwd, bwd


def _free_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


class _Setup:
    """The benchmark's table and batches (host arrays), from the arguments."""

    def __init__(self, args):
        import hashemb as he
        self.n = n = args.num_embeddings
        self.q = q = list(args.q)
        self.D = D = int(np.prod(q))
        self.p = p = he.tt_shapes(n, D, len(q))[0] if args.p == "auto" else list(args.p)
        self.ranks = list(args.ranks)
        self.R = [1] + self.ranks + [1]
        self.B, self.L = args.batch, args.pooling
        self.nnz = self.B * self.L
        rng = np.random.default_rng(args.seed)
        if args.zipf is None:
            draw = (lambda: rng.integers(0, n, self.nnz))
        else:
            # rank r -> row (r * m) mod n, m coprime to n: the hot rows spread
            # over the table (ranks 0, 1, 2 ... share TT digits, rows apart don't)
            m = 2654435761
            while math.gcd(m, n) != 1:
                m += 2
            draw = (lambda: ((rng.zipf(args.zipf, self.nnz) - 1) % n) * m % n)
        self.batches = [draw() for _ in range(args.warmup + args.iters)]
        self.off = np.arange(0, self.nnz + 1, self.L, dtype=np.int64)
        self.cores = he.tt_init(n, p, q, self.ranks, seed=args.seed)
        self.tt_bytes = sum(c.nbytes for c in self.cores)
        self.fwd_f, self.bwd_f = chain_flops(p, q, self.R)
        self.logical_f = self.nnz * D * 4 + self.nnz * 8 + self.B * D * 4
        self.logical_b = self.logical_f + self.nnz * D * 4

    def tt_rows(self, tf, tb, U, what="TT"):
        """Report rows of the TT forward and forward + backward (U: the
        distinct rows the chain computes)."""
        f, b = self.fwd_f, self.bwd_f
        return [(f"{what} fwd", tf, self.nnz * f, U * f, self.logical_f),
                (f"{what} fwd+bwd (fused SGD)", tf + tb, self.nnz * (f + b), U * (f + b),
                 self.logical_f + self.logical_b)]

    def torch_rows(self, ef, eb, where=""):
        return [(f"torch EmbeddingBag{where} fwd", ef, 0, 0, self.logical_f),
                (f"torch EmbeddingBag{where} fwd+bwd+SGD (sparse)", ef + eb, 0, 0,
                 self.logical_f + self.logical_b)]


def _tt_runs(args, st, batches, step, populate, new_cache, xp, desc):
    """The TT table timed on the batches, and with ``--cache-size`` again with
    a cache (``new_cache()``, filled by ``populate(cache)`` after the warm-up):
    (report rows, mean distinct rows of the plain run, notes). ``step(idx,
    cache)`` runs one forward and backward and returns their seconds."""
    from tqdm.auto import tqdm

    def timed(cache, what):
        tf, tb, uniq, hits = [], [], [], []
        bar = tqdm(total=len(batches), desc=what, disable=args.no_progress, leave=False)
        for i, idx in enumerate(batches):
            a, b = step(idx, cache)
            if cache is not None and i + 1 == args.warmup:
                populate(cache)
            if i >= args.warmup:
                # the rows the chain ran for: those the cache does not hold
                held = cache.slots(idx) >= 0 if cache is not None else None
                tf.append(a)
                tb.append(b)
                uniq.append(int(xp.unique(idx if held is None else idx[~held]).shape[0]))
                hits.append(0 if held is None else int(xp.count_nonzero(held)))
            bar.update()
        bar.close()
        return (float(np.median(tf)), float(np.median(tb)), float(np.mean(uniq)),
                float(np.mean(hits)))

    tf, tb, U, _ = timed(None, desc)
    rows, notes = st.tt_rows(tf, tb, U), []
    if args.cache_size:
        cf, cb, CU, hits = timed(new_cache(), desc.replace("TT", "TT + cache"))
        rows += st.tt_rows(cf, cb, CU, f"TT + cache ({args.cache_size:,} rows)")
        notes.append(_cache_note(args, st, hits, tf + tb, cf + cb))
    return rows, U, notes


def _report(args, st, rows, peak, peak_what, U, torch_rows, torch_bytes, notes=()):
    print(f"\nTT-Rec benchmark: B={st.B}, pooling {st.L} ({st.nnz} lookups, {U:.0f} distinct "
          f"rows), E={st.n:,} p={st.p}, D={st.D} q={st.q}, ranks {st.ranks}; median of "
          f"{args.iters} iterations")
    print(f"SGEMM peak ({peak_what}, this run): {peak:.1f} GFLOPS")
    print(f"chain flops per lookup: forward {st.fwd_f:,}, backward {st.bwd_f:,}")
    head = ("| what | ms | us/nnz | GFLOPS (chain) | % of SGEMM peak | GFLOPS (done) "
            "| GB/s (logical) |")
    print(head + "\n|" + "---|" * 7)
    for name, t, fc, fd, by in rows:
        gf = f"{fc / t / 1e9:.1f} | {100 * fc / t / 1e9 / peak:.0f}% | {fd / t / 1e9:.1f}" \
            if fc else "- | - | -"
        print(f"| {name} | {t * 1e3:.2f} | {t / st.nnz * 1e6:.3f} | {gf} | {by / t / 1e9:.2f} |")
    print(f"\nmemory: TT cores {st.tt_bytes / 2**20:.2f} MiB; full table "
          f"{st.n * st.D * 4 / 2**30:.2f} GiB ({st.n * st.D * 4 / st.tt_bytes:,.0f}x the cores)")
    if torch_rows is not None and torch_rows != st.n:
        why = "as --torch-rows asks" if args.torch_rows else "to fit in memory"
        print(f"note: the torch table was scaled down to {torch_rows:,} rows "
              f"({torch_bytes / 2**30:.2f} GiB) {why}; lookups taken modulo its size")
    for note in notes:
        print(f"note: {note}")
    return {"peak": peak, "rows": rows, "unique": U}


def main(argv=None, be=None):
    """Run the benchmark (``argv``: the command line's arguments). ``be``: a
    GPU backend object for ``--device gpu`` (default CuPy's; the tests pass
    the host emulator's)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:        # the shapes' checks, said as the command line's error (not a traceback)
        q = list(args.q)
        p = list(args.p) if args.p != "auto" else [1] * len(q)
        he_tt.tt_core_shapes(p, q, list(args.ranks))
        if args.p != "auto" and int(np.prod(p, dtype=object)) < args.num_embeddings:
            raise ValueError(f"p: expected factors with product >= --num-embeddings = "
                             f"{args.num_embeddings}, got {args.p}")
    except (ValueError, TypeError) as e:
        V.cli_refusal(parser, e, {"p": "--p", "q": "--q", "tt_ranks": "--ranks"})
    if args.cache_size and args.warmup == 0:
        parser.error("argument --cache-size: expected --warmup >= 1 (the cache is populated "
                     "after the warm-up steps), got --warmup 0")
    if args.device == "gpu":
        return _main_gpu(args, be)
    from tqdm.auto import tqdm

    import hashemb as he
    st = _Setup(args)
    n, D = st.n, st.D
    batches, off, cores = st.batches, st.off, st.cores
    opt = he.SGD(1e-6)

    def step(idx, cache):
        t0 = time.perf_counter()
        if cache is not None:
            cache.count(idx)                # as the torch module does in training
        out, saved = he.tt_embedding_bag(idx, cores, off, cache=cache, return_saved=True)
        t1 = time.perf_counter()
        he.tt_embedding_bag_backward(out, idx, cores, off, cache=cache, saved=saved,
                                     optimizer=opt)
        return t1 - t0, time.perf_counter() - t1

    rows, U, notes = _tt_runs(args, st, batches, step, lambda c: c.populate(cores, n),
                              lambda: he.TTCache(args.cache_size, D), np, "TT (hashemb)")
    # after the TT runs: OpenBLAS's threads spin for a while after a matmul and
    # would take the cores from the TT kernels' OpenMP threads
    peak_n = args.peak_size or 4096
    peak = sgemm_peak(peak_n)

    torch_rows = torch_bytes = None
    if not args.no_torch:
        import torch
        torch_rows = args.torch_rows or n
        if torch_rows * D * 4 * 2.2 > _free_bytes() and args.torch_rows is None:
            torch_rows = int(_free_bytes() / (D * 4 * 2.2))
        emb = torch.nn.EmbeddingBag(torch_rows, D, mode="sum", sparse=True,
                                    _weight=torch.empty(torch_rows, D).uniform_(-1e-3, 1e-3))
        topt = torch.optim.SGD(emb.parameters(), lr=1e-6)
        torch_bytes = emb.weight.numel() * 4
        toff = torch.from_numpy(off[:-1])
        ef, eb = [], []
        bar = tqdm(total=len(batches), desc="torch EmbeddingBag", disable=args.no_progress,
                   leave=False)
        for i, idx in enumerate(batches):
            ti = torch.from_numpy(idx % torch_rows)
            t0 = time.perf_counter()
            out = emb(ti, toff)
            t1 = time.perf_counter()
            topt.zero_grad()
            out.backward(out.detach())
            topt.step()
            t2 = time.perf_counter()
            if i >= args.warmup:
                ef.append(t1 - t0)
                eb.append(t2 - t1)
            bar.update()
        bar.close()
        ef, eb = float(np.median(ef)), float(np.median(eb))
        rows += st.torch_rows(ef, eb)
    return _report(args, st, rows, peak, f"numpy {peak_n}^3 float32 matmul", U, torch_rows,
                   torch_bytes, notes)


def _cache_note(args, st, hits, plain, cached):
    """What the cache bought, in words."""
    return (f"the LFU cache of {args.cache_size:,} rows ({args.cache_size * st.D * 4 / 2**20:.1f} "
            f"MiB) served {100 * hits / st.nnz:.1f}% of the lookups after its populate; "
            f"fwd+bwd {plain * 1e3:.2f} -> {cached * 1e3:.2f} ms ({plain / cached:.2f}x, "
            f"count included)")


# ---------------------------------------------------------------- --device gpu

class _Clock:
    """Time between marks: CUDA events on CuPy's current stream (read after
    the later event completes), or perf_counter on the host emulator, whose
    launches finish before they return."""

    def __init__(self, be):
        self.cp = be.xp if be.name == "cupy" else None

    def sync(self):
        if self.cp is not None:
            self.cp.cuda.Device().synchronize()

    def mark(self):
        if self.cp is None:
            return time.perf_counter()
        ev = self.cp.cuda.Event()
        ev.record()
        return ev

    def seconds(self, a, b):
        if self.cp is None:
            return b - a
        b.synchronize()
        return self.cp.cuda.get_elapsed_time(a, b) / 1e3


def device_sgemm_peak(be, clock, n, reps=3):
    """Best GFLOPS of an n^3 float32 matmul on the device (cuBLAS through CuPy)."""
    a = be.to_device(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    c = be.xp.matmul(a, a)
    best = 0.0
    for _ in range(reps):
        clock.sync()
        t0 = clock.mark()
        be.xp.matmul(a, a, out=c)
        t1 = clock.mark()
        best = max(best, 2.0 * n ** 3 / max(clock.seconds(t0, t1), 1e-12))
    return best / 1e9


def _torch_cuda(args, st, be, tqdm):
    """(rows, table bytes, fwd s, bwd s) of torch.nn.EmbeddingBag on the same
    CUDA device, or a string saying why the column is skipped."""
    if be.name != "cupy":
        return "torch column skipped: not on a CUDA device (emulator backend)"
    try:
        import torch
    except ImportError:
        return "torch column skipped: torch is not installed"
    if not torch.cuda.is_available():
        return "torch column skipped: this torch has no CUDA"
    dev = torch.device("cuda", be.xp.cuda.Device().id)
    free = int(be.xp.cuda.runtime.memGetInfo()[0])
    rows = args.torch_rows or st.n
    if rows * st.D * 4 * 2.2 > free and args.torch_rows is None:
        rows = int(free / (st.D * 4 * 2.2))
    emb = torch.nn.EmbeddingBag(rows, st.D, mode="sum", sparse=True, device=dev)
    with torch.no_grad():
        emb.weight.uniform_(-1e-3, 1e-3)
    topt = torch.optim.SGD(emb.parameters(), lr=1e-6)
    toff = torch.from_numpy(st.off[:-1]).to(dev)
    tidx = [torch.from_numpy(idx % rows).to(dev) for idx in st.batches]
    ef, eb = [], []
    bar = tqdm(total=len(tidx), desc="torch EmbeddingBag (CUDA)", disable=args.no_progress,
               leave=False)
    for i, ti in enumerate(tidx):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        torch.cuda.synchronize(dev)
        ev[0].record()
        out = emb(ti, toff)
        ev[1].record()
        topt.zero_grad()
        out.backward(out.detach())
        topt.step()
        ev[2].record()
        ev[2].synchronize()
        if i >= args.warmup:
            ef.append(ev[0].elapsed_time(ev[1]) / 1e3)
            eb.append(ev[1].elapsed_time(ev[2]) / 1e3)
        bar.update()
    bar.close()
    return rows, emb.weight.numel() * 4, float(np.median(ef)), float(np.median(eb))


def _main_gpu(args, be=None):
    """The benchmark with CuPy arrays: the same table and batches, moved to
    the device before timing, through hashemb's GPU TT path."""
    from tqdm.auto import tqdm

    import hashemb as he
    from ._gpu import _runtime as RT
    from ._gpu import tt as G
    if be is None:
        if RT.device_count() == 0:
            from ._gpu import info
            raise SystemExit(f"tt-bench --device gpu: no CUDA device through CuPy ({info()})")
        be = RT.backend()
    st = _Setup(args)
    clock = _Clock(be)
    cores = [be.to_device(c) for c in st.cores]
    off = be.to_device(st.off)
    batches = [be.to_device(b) for b in st.batches]
    opt = he.SGD(1e-6)

    def step(idx, cache):
        clock.sync()
        t0 = clock.mark()
        if cache is not None:
            G.cache_count(cache, idx, be=be)
        out, saved = G.bags(idx, [cores], off, cache=cache, return_saved=True, single=True,
                            be=be)
        t1 = clock.mark()
        G.bags_backward(out, idx, [cores], off, cache=cache, saved=saved, optimizer=opt,
                        single=True, be=be)
        t2 = clock.mark()
        return clock.seconds(t0, t1), clock.seconds(t1, t2)

    # (the emulator's device arrays are NumPy arrays: a host-made cache is its own)
    rows, U, notes = _tt_runs(
        args, st, batches, step, lambda c: G.cache_populate(c, cores, st.n, be=be),
        lambda: he.TTCache(args.cache_size, st.D, like=cores[0] if be.name == "cupy" else None),
        be.xp, "TT (hashemb, GPU)")
    notes.insert(0, f"device: {he._gpu.info() if be.name == 'cupy' else be.name}")
    peak_n = args.peak_size or 8192
    peak = device_sgemm_peak(be, clock, peak_n)
    torch_rows = torch_bytes = None
    if not args.no_torch:
        res = _torch_cuda(args, st, be, tqdm)
        if isinstance(res, str):
            notes.append(res)
        else:
            torch_rows, torch_bytes, ef, eb = res
            rows += st.torch_rows(ef, eb, " (CUDA)")
    return _report(args, st, rows, peak, f"{be.name} {peak_n}^3 float32 matmul", U,
                   torch_rows, torch_bytes, notes)


if __name__ == "__main__":
    main()
