"""Where a GPU call's time goes: host (Python and launches) or device, and
which kernel.

For the gpu_bench shape (26 Criteo tables, one index per table, D, batch) and
the tt-bench shape, each hashemb call is timed three ways in one run:

- ``cupyx.profiler.benchmark``: host seconds per call and device seconds per
  call (events around it on the stream); a call whose host time exceeds its
  device time is bound by Python and launches, not by the GPU;
- its kernel launches are recorded and replayed alone, back to back: device
  time per kernel, the floor a call would reach with no host cost;
- cProfile over repeated calls: the host functions that cost most.

torch.nn.EmbeddingBag (CUDA, one module over the concatenated tables) is
timed the same way for reference.

    python benchmarks/gpu_profile.py                  # D=16, batch 16384
    python benchmarks/gpu_profile.py --dim 64 --batch 65536 --top 30
"""
import argparse
import cProfile
import io
import json
import pstats

import numpy as np

from hashemb.data import CRITEO_KAGGLE as CRITEO


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16384)
    ap.add_argument("--compression", type=float, default=1000.0)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--top", type=int, default=18, help="cProfile rows per call")
    ap.add_argument("--no-tt", action="store_true")
    ap.add_argument("--no-host", action="store_true", help="skip the host-cost breakdown")
    ap.add_argument("--json", default=None,
                    help="write every profiled call's host / device / kernel microseconds "
                         "here (rewritten after each, so a run cut short keeps what it did)")
    args = ap.parse_args(argv)
    results = {}

    import cupy as cp
    from cupyx.profiler import benchmark
    import torch

    import hashemb as he
    from hashemb._gpu import _runtime as RT
    from hashemb._gpu import tt as GT

    be = RT.backend()
    print(he._gpu.info())
    launches = []
    real_launch = be.launch

    def recording(family, name, nthreads, a):
        launches.append((family, name, int(nthreads), tuple(a)))
        return real_launch(family, name, nthreads, a)

    def replay(rec, reps=50):
        """Device microseconds of each recorded launch, replayed alone."""
        rows = []
        for family, name, n, a in rec:
            fn = be.function(family, name)
            grid = ((n + be.block - 1) // be.block,)
            start, end = cp.cuda.Event(), cp.cuda.Event()
            fn(grid, (be.block,), a)
            start.record()
            for _ in range(reps):
                fn(grid, (be.block,), a)
            end.record()
            end.synchronize()
            rows.append((name, n, cp.cuda.get_elapsed_time(start, end) * 1e3 / reps))
        return rows

    def profile(label, fn, kernels=True, cprof=False):
        fn()
        cp.cuda.Device().synchronize()
        r = benchmark(fn, n_repeat=args.repeat, n_warmup=5)
        host = float(np.median(r.cpu_times)) * 1e6
        dev = float(np.median(r.gpu_times[0])) * 1e6
        print(f"\n=== {label}: host {host:.1f} us/call, device span {dev:.1f} us/call")
        results[label] = {"host_us": host, "device_us": dev}
        if kernels:
            launches.clear()
            be.launch = recording
            try:
                fn()
            finally:
                be.launch = real_launch
            cp.cuda.Device().synchronize()
            rows = replay(list(launches))
            total = sum(t for _, _, t in rows)
            print(f"  {len(rows)} launches, {total:.1f} us of kernels replayed alone")
            for name, n, t in rows:
                print(f"  {t:9.1f} us  {n:>10} threads  {name}")
            results[label]["kernels_us"] = total
            results[label]["launches"] = [[name, n, t] for name, n, t in rows]
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "calls": results}, f, indent=1)
        if cprof:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(50):
                fn()
            pr.disable()
            cp.cuda.Device().synchronize()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(args.top)
            lines = [l for l in s.getvalue().splitlines() if l.strip()]
            print("  cProfile, 50 calls, by own time:")
            for l in lines[2:]:
                print("   ", l[:150])
        return host, dev

    D, B, T = args.dim, args.batch, len(CRITEO)
    rows = sum(CRITEO)
    size = int(rows * D / args.compression)
    robe = he.RobeZ(size, D, block=D, seed=0)
    hnet = he.HashedNet(size, D, seed=0)
    full = he.FullTable(list(CRITEO), D)
    M = cp.asarray(robe.init_weight(seed=0))
    Mh = cp.asarray(hnet.init_weight(seed=0))
    g = torch.Generator(device="cuda").manual_seed(0)
    X = torch.stack([torch.randint(0, n, (B,), device="cuda", generator=g) for n in CRITEO], 1)
    Xx = cp.from_dlpack(X)
    G = cp.asarray(np.random.default_rng(0).standard_normal((B, T * D)).astype(np.float32))
    opt = he.SGD(0.01)

    emb = torch.nn.EmbeddingBag(rows, D, mode="sum", sparse=True).cuda()
    topt = torch.optim.SGD(emb.parameters(), lr=0.01)
    base = torch.tensor(np.r_[0, np.cumsum(CRITEO)[:-1]], device="cuda")
    flat = (X + base).reshape(-1)
    offs = torch.arange(0, B * T, device="cuda")
    Gt = torch.as_tensor(G, device="cuda")
    W = cp.from_dlpack(emb.weight.detach())

    def t_fwd():
        with torch.no_grad():
            emb(flat, offs)

    def t_step():
        emb(flat, offs).view(B, T * D).backward(Gt)
        topt.step()
        topt.zero_grad(set_to_none=True)

    print(f"tables {T}, batch {B}, D {D}, RobeZ {args.compression:g}x ({size} floats)")
    if not args.no_host:
        host_costs(cp, he, be, Xx, M, robe, T, B, D)
    tf, _ = profile("torch EmbeddingBag forward", t_fwd, kernels=False)
    ts, _ = profile("torch EmbeddingBag step", t_step, kernels=False)

    def unchecked(fn):
        def run():
            old = he.set_gpu_options(check_indices=False)
            try:
                fn()
            finally:
                he.set_gpu_options(**old)
        return run

    def fwd(scheme, W_):
        return lambda: he.embedding_bags(Xx, W_, scheme=scheme, num_tables=T)

    def step(scheme, W_, opt_=None):
        def run():
            _, saved = he.embedding_bags(Xx, W_, scheme=scheme, num_tables=T, return_saved=True)
            he.embedding_bags_backward(G, Xx, scheme=scheme, num_tables=T, weight=W_,
                                       optimizer=opt_ or opt, saved=saved)
        return run

    # most telling first (a bounded run may be cut short): the default
    # paths, the warp kernels' loads in flight (bag.ROWS_CHUNK), the
    # one-entry warp kernel against bag_forward (bag.ROWS), the
    # A/B of the step's starts (written by the forward vs bag_starts), and
    # the elements-per-lane sweeps of bag_forward (bag.FORWARD_PER 1 .. 16,
    # BACKWARD_PER 1 .. 4), which 2-D one-entry input no longer reaches
    # unless ROWS is off
    from hashemb._gpu import bag as GB
    profile("RobeZ forward", fwd(robe, M), cprof=True)
    profile("RobeZ step (forward writes the starts, SGD backward)", step(robe, M), cprof=True)
    # the FBGEMM layout of the same batch: flat feature-major indices, offsets
    # of one entry a bag (the pre-launch check finds them so: the warp kernels)
    Xf = cp.ascontiguousarray(Xx.T).reshape(-1)
    Of = cp.arange(B * T + 1, dtype=np.int64)
    profile("RobeZ forward, flat indices + offsets of one entry a bag",
            lambda: he.embedding_bags(Xf, M, Of, scheme=robe, num_tables=T))
    # the warp kernels' loads in flight per lane (bag.ROWS_CHUNK, default 4)
    chunk = GB.ROWS_CHUNK
    try:
        for c in (1, 2, 8):
            GB.ROWS_CHUNK = c
            profile(f"RobeZ forward, ROWS_CHUNK={c}", fwd(robe, M))
            profile(f"RobeZ step, ROWS_CHUNK={c}", step(robe, M))
    finally:
        GB.ROWS_CHUNK = chunk
    GB.ROWS = False
    try:
        profile("RobeZ forward, ROWS=False (bag_forward, not the one-entry warp kernel)",
                fwd(robe, M))
        profile("RobeZ forward, flat indices + offsets, ROWS=False",
                lambda: he.embedding_bags(Xf, M, Of, scheme=robe, num_tables=T))
        profile("RobeZ step, ROWS=False", step(robe, M))
        profile("FullTable forward, ROWS=False, check_indices=False", unchecked(fwd(full, W)))
        profile("HashedNet forward, ROWS=False", fwd(hnet, Mh))
        profile("HashedNet step, ROWS=False", step(hnet, Mh))
    finally:
        GB.ROWS = True
    profile("HashedNet forward (warp kernel keeping row state)", fwd(hnet, Mh))
    profile("HashedNet step", step(hnet, Mh))
    # float16 storage: half the bytes read; RobeZ's step sums into a float32
    # scratch, then a sweep rounds each slot; FullTable's sorts its entries
    # by row and moves each row once (seg_rows)
    M16, W16 = M.astype(np.float16), W.astype(np.float16)
    profile("RobeZ forward, float16", fwd(robe, M16))
    profile("RobeZ step, float16 (stochastic rounding)", step(robe, M16))
    profile("FullTable forward, float16, check_indices=False", unchecked(fwd(full, W16)))
    profile("FullTable step, float16, check_indices=False", unchecked(step(full, W16)))
    del M16, W16
    # Adagrad and row-wise Adagrad of the full table: per-row sums (a
    # stable sort of one key per entry, seg_rows), no table-sized scratch
    profile("FullTable step, Adagrad, check_indices=False",
            unchecked(step(full, W, he.Adagrad(0.01))))
    profile("FullTable step, row-wise Adagrad, check_indices=False",
            unchecked(step(full, W, he.RowwiseAdagrad(0.01))))
    he.set_gpu_options(precompute_starts=True)
    profile("RobeZ step, precompute_starts=True (bag_starts, then the forward)", step(robe, M))
    profile("RobeZ forward, precompute_starts=True", fwd(robe, M))
    he.set_gpu_options(precompute_starts=None)
    default = GB.FORWARD_PER, GB.BACKWARD_PER
    try:
        GB.ROWS = False             # the sweeps of bag_forward's lanes
        for p in (1, 2, 4, 8, 16):
            GB.FORWARD_PER = p
            profile(f"RobeZ forward, ROWS=False, {p} element(s) per lane", fwd(robe, M))
        GB.FORWARD_PER, GB.ROWS = default[0], True
        for p in (1, 2, 4):
            GB.BACKWARD_PER = p
            profile(f"RobeZ step, backward {p} element(s) per lane", step(robe, M))
        GB.BACKWARD_PER = default[1]
        profile("FullTable forward", fwd(full, W))
        he.set_gpu_options(check_indices=False)
        profile("FullTable forward, check_indices=False", fwd(full, W))
        profile("FullTable step, check_indices=False", step(full, W))
        he.set_gpu_options(precompute_starts=True)
        profile("FullTable step, check_indices=False, precompute_starts=True", step(full, W))
        he.set_gpu_options(check_indices=True, precompute_starts=None)
        GB.ROWS = False
        for p in (1, 4, 16):
            GB.FORWARD_PER = p
            profile(f"FullTable forward, ROWS=False, {p} element(s) per lane, "
                    "check_indices=False", unchecked(fwd(full, W)))
        GB.FORWARD_PER, GB.ROWS = default[0], True
        for p in (1, 2, 4):
            GB.BACKWARD_PER = p
            profile(f"FullTable step, backward {p} element(s) per lane, check_indices=False",
                    unchecked(step(full, W)))
    finally:
        GB.FORWARD_PER, GB.BACKWARD_PER = default
        GB.ROWS = True
        he.set_gpu_options(check_indices=True, precompute_starts=None)

    # the same calls through the torch adapter (CUDA tensors, DLPack, torch's
    # stream), as a DLRM makes them: what the adapter adds to a call
    from hashemb.torch import HashEmbeddingBagCollection
    mod = HashEmbeddingBagCollection(robe, T, optimizer="sgd", lr=0.01).cuda()

    def mod_fwd():
        with torch.no_grad():
            mod(X)

    def mod_step():
        mod(X).backward(Gt)
    profile("RobeZ forward, torch module (HashEmbeddingBagCollection)", mod_fwd, cprof=True)
    profile("RobeZ step, torch module (fused SGD)", mod_step, cprof=True)

    if args.no_tt:
        return
    n, p, q, ranks, L, Bt = 11_000_000, [200, 220, 250], [4, 4, 4], [32, 32], 20, 512
    cores = [cp.asarray(c) for c in he.tt_init(n, p, q, ranks, seed=0)]
    rng = np.random.default_rng(0)
    idx = cp.asarray(rng.integers(0, n, Bt * L))
    off = cp.asarray(np.arange(0, Bt * L + 1, L, dtype=np.int64))
    print(f"\nTT: n {n}, p {p}, q {q}, ranks {ranks}, batch {Bt} x {L}")

    def tt_fwd():
        GT.bags(idx, [cores], off, single=True, be=be)

    def tt_step():
        out, saved = GT.bags(idx, [cores], off, return_saved=True, single=True, be=be)
        GT.bags_backward(out, idx, [cores], off, saved=saved, optimizer=he.SGD(1e-6),
                         single=True, be=be)

    profile("TT forward", tt_fwd)
    profile("TT forward + fused SGD backward", tt_step)


def host_costs(cp, he, be, X, M, scheme, T, B, D, n=200, rounds=7):
    """Host microseconds per call of the pieces a bag call is made of (no
    synchronisation inside a timed loop; a sync between rounds keeps the
    launch queue short): what a cheaper launch path would have to remove."""
    import time

    from hashemb._gpu._runtime import i64
    src = ('extern "C" __global__ void k1(long long a) {}\n'
           'extern "C" __global__ void k20(' +
           ", ".join(f"long long a{i}" for i in range(20)) + ") {}\n"
           'extern "C" __global__ void k6p14(' +
           ", ".join([f"const float* p{i}" for i in range(6)] +
                     [f"long long a{i}" for i in range(14)]) + ") {}\n")
    mod = cp.RawModule(code=src)
    k1, k20, k6 = (mod.get_function(k) for k in ("k1", "k20", "k6p14"))
    one = (np.int64(1),)
    twenty = tuple(np.int64(i) for i in range(20))
    arrs = tuple(cp.empty(4, np.float32) for _ in range(6))
    mixed = arrs + tuple(np.int64(i) for i in range(14))
    make = be.c_scalars()           # None where this CuPy has no usable C scalars
    kept20 = tuple(make(a) for a in twenty) if make else twenty
    bag_args = list(arrs) + [i64(i) for i in range(14)]
    out = cp.empty((B, T * D), np.float32)
    real_launch = be.launch

    def no_launch():
        be.launch = lambda *a: None
        try:
            he.embedding_bags(X, M, scheme=scheme, num_tables=T)
        finally:
            be.launch = real_launch

    def device_context():
        with cp.cuda.Device(out.device.id):
            pass

    items = [
        ("cupy.empty((B, T*D), float32)", lambda: cp.empty((B, T * D), np.float32)),
        ("x.reshape(-1)", lambda: out.reshape(-1)),
        ("cupy.ascontiguousarray(contiguous x)", lambda: cp.ascontiguousarray(out)),
        ("x.device.id", lambda: out.device.id),
        ("with cupy.cuda.Device(id): pass", device_context),
        ("np.int64(v)", lambda: np.int64(5)),
        ("RawKernel launch, 1 scalar", lambda: k1((1,), (32,), one)),
        ("RawKernel launch, 20 scalars", lambda: k20((1,), (32,), twenty)),
        ("RawKernel launch, 6 arrays + 14 scalars", lambda: k6((1,), (32,), mixed)),
        (f"RawKernel launch, 20 kept C scalars ({'CScalar' if make else 'none: NumPy'})",
         lambda: k20((1,), (32,), kept20)),
        ("hashemb's _pack of 6 arrays + 14 memoised ints", lambda: be._pack(bag_args)),
        ("he.embedding_bags, launches stubbed out", no_launch),
        ("he.embedding_bags (RobeZ forward)",
         lambda: he.embedding_bags(X, M, scheme=scheme, num_tables=T)),
    ]
    print("\n=== host cost per call (us, median of rounds of %d calls)" % n)
    for label, fn in items:
        fn()
        per = []
        for _ in range(rounds):
            cp.cuda.Device().synchronize()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            per.append((time.perf_counter() - t) / n * 1e6)
        cp.cuda.Device().synchronize()
        print(f"  {float(np.median(per)):8.2f}  {label}")


if __name__ == "__main__":
    main()
