"""GPU throughput of embedding bags on the Criteo Kaggle shape.

26 tables with the Criteo Kaggle cardinalities (33.76M rows), one index per
table per sample, D = 16 and 64, batch 16384 and 65536. In one run, on one
GPU: torch.nn.EmbeddingBag on CUDA with full tables (one bag module over the
concatenated tables: one launch, its fastest form) beside hashemb's RobeZ at
1000x compression and hashemb's FullTable (the same full tables through
hashemb's kernels, sharing torch's weight memory via DLPack), HashedNet and
SCMA / LMA at the same compression. A hashemb training step is the forward
with ``return_saved=True`` and the fused-SGD backward given what it kept, the
calls the torch modules make. Reported:
samples/s, GB/s of logical bytes (index reads, embedding rows read, output
written; a training step adds gradient reads and the rows' read-modify-write)
and their share of the GPU's peak DRAM bandwidth, and ratios against torch
measured in the same run. A compressed array lives in L2, so its logical
bytes can exceed the DRAM peak: the share says how far the work outruns what
DRAM could feed.

SCMA / LMA are fitted (on the CPU) to a pool of --pool random rows and
looked up with batches drawn from that pool, so every token is a sampled one
(as in training: the map and signature path); RobeZ is timed again on the
same batches, and their rows give the ratio to it ("x RobeZ").

    python benchmarks/gpu_bench.py                     # the full shape (CUDA)
    python benchmarks/gpu_bench.py --json out.json --plot out.png
    python benchmarks/gpu_bench.py --from-json docs/gpu_bench_h200.json --plot g.png
                                                       # the plot of a saved run (no GPU)
    python benchmarks/gpu_bench.py --device cpu --scale 0.001 --batches 256 --iters 2
                                                       # dry run of the script on the CPU
"""
import argparse
import json
import time

import numpy as np

from hashemb.data import CRITEO_KAGGLE as CRITEO

# peak DRAM bandwidth (GB/s) by device name, when the driver does not say
PEAKS = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000,
         "H100 NVL": 3900, "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555,
         "A100 80GB PCIe": 1935, "A100-PCIE-40GB": 1555, "L40S": 864, "L4": 300}


def peak_gbs(torch, device, override):
    if override:
        return float(override)
    if device == "cpu":
        return float("nan")
    name = torch.cuda.get_device_name()
    try:
        import cupy
        p = cupy.cuda.runtime.getDeviceProperties(torch.cuda.current_device())
        if p.get("memoryClockRate") and p.get("memoryBusWidth"):
            return 2 * p["memoryClockRate"] * 1e3 * p["memoryBusWidth"] / 8 / 1e9
    except Exception:
        pass
    for k, v in PEAKS.items():
        if k in name:
            return float(v)
    return float("nan")


def timed(fn, sync, iters, warmup=3):
    """Median seconds per call over `iters` rounds of 5 calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        for _ in range(5):
            fn()
        sync()
        times.append((time.perf_counter() - t) / 5)
    return float(np.median(times))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--batches", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--compression", type=float, default=1000.0)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--scale", type=float, default=1.0, help="table sizes times this")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--peak-gbs", type=float, default=None, help="override the DRAM peak")
    ap.add_argument("--no-check", action="store_true",
                    help="he.set_gpu_options(check_indices=False): no pre-launch index check "
                         "(FullTable's check is one reduction and one synchronisation per call)")
    ap.add_argument("--pool", type=int, default=125000,
                    help="rows SCMA / LMA are fitted to (their batches come from them)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG: samples/s and ratio to torch per method")
    ap.add_argument("--from-json", default=None,
                    help="plot (--plot) a saved --json run instead of measuring")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        if args.plot:
            plot(saved, args.plot)
        return saved

    import torch
    import hashemb as he
    if args.no_check:
        he.set_gpu_options(check_indices=False)
    if args.device == "cuda":
        import cupy as xp
        if not torch.cuda.is_available():
            raise SystemExit("gpu_bench: torch sees no CUDA device (use --device cpu for a dry run)")

        def sync():
            torch.cuda.synchronize()

        def as_xp(t):
            return xp.from_dlpack(t.detach())
    else:
        xp = np

        def sync():
            pass

        def as_xp(t):
            return t.detach().numpy()

    dev = args.device
    card = [max(1, int(n * args.scale)) for n in CRITEO]
    T, rows = len(card), sum(card)
    base = torch.tensor(np.r_[0, np.cumsum(card)[:-1]], device=dev)
    peak = peak_gbs(torch, dev, args.peak_gbs)
    print(he.show_config()["gpu"] if dev == "cuda" else "dry run on the CPU")
    print(f"tables {T}, rows {rows}, peak DRAM {peak:.0f} GB/s\n")
    head = (f"{'D':>3} {'batch':>6} {'method':<24} {'fwd Ms/s':>9} {'fwd GB/s':>9} {'%peak':>6} "
            f"{'x torch':>7} {'train Ms/s':>10} {'train GB/s':>10} {'%peak':>6} {'x torch':>7}")
    print(head)
    results = []
    gpu_name = he.show_config()["gpu"] if dev == "cuda" else "cpu (dry run)"

    def save():
        run = {"device": gpu_name, "peak_GBps": peak, "rows": rows, "pool": args.pool,
               "results": results}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(run, f, indent=1)
        return run

    rng = np.random.default_rng(0)
    pool = np.stack([rng.integers(0, n, args.pool) for n in card], 1)
    for D in args.dims:
        size = int(rows * D / args.compression)
        robe = he.RobeZ(size, D, block=D, seed=0)
        full = he.FullTable(card, D)
        hnet = he.HashedNet(size, D, seed=0)
        Z = min(D, 16)
        # the pool-rows RobeZ runs the minhash schemes' Z, so that "x RobeZ"
        # compares one layout of runs (at D = 64, block=D read one 64-float run)
        robe_z = robe if Z == D else he.RobeZ(size, D, block=Z, seed=0)
        fit = dict(num_points=args.pool, block=Z, progress=False)
        minhash = [(f"SCMA Z={Z}", he.LSHTable.fit(pool, size, D, **fit)),
                   (f"LMA Z={Z}", he.LMA.fit(pool, size, D, **fit))]
        torch.manual_seed(0)
        emb = torch.nn.EmbeddingBag(rows, D, mode="sum", sparse=True).to(dev)
        topt = torch.optim.SGD(emb.parameters(), lr=args.lr)
        W_full = as_xp(emb.weight)                       # the same memory as torch's
        M_robe = xp.asarray(robe.init_weight(seed=0))
        M_robe_z = M_robe if robe_z is robe else xp.asarray(robe_z.init_weight(seed=0))
        M_robe16 = M_robe.astype(np.float16)            # float16 storage, pooled in float32
        W_full16 = W_full.astype(np.float16)
        M_hnet = xp.asarray(hnet.init_weight(seed=0))
        M_mh = [xp.asarray(s.init_weight(seed=0)) for _, s in minhash]
        for B in args.batches:
            g = torch.Generator(device=dev).manual_seed(B)
            X = torch.stack([torch.randint(0, n, (B,), device=dev, generator=g) for n in card], 1)
            Xp = xp.asarray(np.ascontiguousarray(pool[rng.integers(0, args.pool, B)]))
            flat = (X + base).reshape(-1)                # row-major (B, T): bag b*T + t
            offs = torch.arange(0, B * T, device=dev)
            G = torch.randn(B, T * D, device=dev, generator=g)
            Xx, Gx = as_xp(X), as_xp(G)

            def t_fwd():
                return emb(flat, offs).view(B, T * D)

            def t_step():
                out = emb(flat, offs).view(B, T * D)
                out.backward(G)
                topt.step()
                topt.zero_grad(set_to_none=True)

            def h_fwd(scheme, M, X=None):
                X = Xx if X is None else X
                return lambda: he.embedding_bags(X, M, scheme=scheme, num_tables=T)

            def h_step(scheme, M, det, X=None, opt=None):
                X = Xx if X is None else X
                opt = opt or he.SGD(args.lr)

                def step():
                    # as the torch modules make it: the forward keeps its run
                    # starts for the backward, which then hashes nothing
                    _, saved = he.embedding_bags(X, M, scheme=scheme, num_tables=T,
                                                 return_saved=True)
                    he.embedding_bags_backward(Gx, X, scheme=scheme, num_tables=T, weight=M,
                                               optimizer=opt, deterministic=det, saved=saved)
                return step

            # the same tables through both: outputs must agree. A mismatch or a
            # failed first call is reported loudly, and the other methods are
            # still timed (a device lease is short; each method's own errors
            # become its row's)
            try:
                with torch.no_grad():
                    want = t_fwd()
                    got = he.embedding_bags(Xx, W_full, scheme=full, num_tables=T)
                    diff = float(np.abs(np.asarray(torch.as_tensor(got).cpu() if dev == "cpu"
                                                   else xp.asnumpy(got))
                                        - want.cpu().numpy()).max())
                if not diff < 1e-5:
                    print(f"!! FullTable through hashemb differs from torch by {diff}")
            except Exception as e:          # noqa: BLE001 (reported, the rest still runs)
                print(f"!! FullTable against torch failed: {type(e).__name__}: {e}")

            def nbytes(itemsize):
                # logical bytes of (forward, step) with rows of this storage: indices
                # + rows read + float32 output written; a step adds the indices, the
                # float32 gradient read and a read-modify-write of every row
                row = D * itemsize
                fwd = B * T * (8 + row + 4 * D)
                return fwd, fwd + B * T * (8 + 4 * D + 2 * row)

            methods = [("torch.nn.EmbeddingBag", t_fwd, t_step),
                       (f"hashemb RobeZ {args.compression:g}x", h_fwd(robe, M_robe),
                        h_step(robe, M_robe, False)),
                       ("  deterministic bwd", None, h_step(robe, M_robe, True)),
                       ("hashemb FullTable", h_fwd(full, W_full), h_step(full, W_full, False)),
                       ("  row-wise Adagrad step", None,
                        h_step(full, W_full, False, opt=he.RowwiseAdagrad(args.lr))),
                       ("hashemb RobeZ float16", h_fwd(robe, M_robe16),
                        h_step(robe, M_robe16, False)),
                       ("hashemb FullTable float16", h_fwd(full, W_full16),
                        h_step(full, W_full16, False)),
                       (f"hashemb HashedNet {args.compression:g}x", h_fwd(hnet, M_hnet),
                        h_step(hnet, M_hnet, False)),
                       ("hashemb RobeZ, pool rows", h_fwd(robe_z, M_robe_z, Xp),
                        h_step(robe_z, M_robe_z, False, Xp))]
            methods += [(f"hashemb {name}", h_fwd(s, M, Xp), h_step(s, M, False, Xp))
                        for (name, s), M in zip(minhash, M_mh)]
            ref, robe_pool = {}, {}
            for name, fwd, step in methods:
                row = {"D": D, "batch": B, "method": name.strip()}
                try:
                    with torch.no_grad():
                        tf = timed(fwd, sync, args.iters) if fwd else None
                    ts = timed(step, sync, args.iters) if step else None
                except Exception as e:      # (a kernel that fails to compile, say)
                    row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}"
                    results.append(row)
                    save()
                    print(f"{D:>3} {B:>6} {name:<24} failed: {row['error']}")
                    continue
                # (float16 rows are half the bytes: charged float32's, their GB/s
                # read 1.3-1.4x too high)
                fwd_bytes, step_bytes = nbytes(2 if "float16" in name else 4)
                for kind, t, nb in (("fwd", tf, fwd_bytes), ("train", ts, step_bytes)):
                    if t is None:
                        continue
                    row[f"{kind}_s"] = t
                    row[f"{kind}_samples_per_s"] = B / t
                    row[f"{kind}_GBps"] = nb / t / 1e9
                    row[f"{kind}_share_of_peak"] = nb / t / 1e9 / peak
                    if name.startswith("torch"):
                        ref[kind] = B / t
                    if name.endswith("pool rows"):
                        robe_pool[kind] = B / t
                    if kind in ref:
                        row[f"{kind}_x_torch"] = B / t / ref[kind]
                    if kind in robe_pool and not name.endswith("pool rows"):
                        row[f"{kind}_x_robez"] = B / t / robe_pool[kind]
                results.append(row)
                save()          # after every row: a cut run keeps what it measured

                def cells(kind, w):
                    if f"{kind}_x_torch" not in row:
                        return " " * (w + 9 + 7 + 7 + 3)
                    return (f"{row[f'{kind}_samples_per_s'] / 1e6:>{w}.2f} "
                            f"{row[f'{kind}_GBps']:>9.0f} {100 * row[f'{kind}_share_of_peak']:>5.0f}% "
                            f"{row[f'{kind}_x_torch']:>7.2f}")
                x_robe = "".join(f"  {kind} {row[f'{kind}_x_robez']:.2f}x RobeZ"
                                 for kind in ("fwd", "train") if f"{kind}_x_robez" in row)
                print(f"{D:>3} {B:>6} {name:<24} {cells('fwd', 9)} {cells('train', 10)}{x_robe}")
            del X, flat, offs, G, Xx, Gx, Xp
        del emb, topt, W_full, M_robe, M_hnet, M_mh, M_robe16, W_full16
        if dev == "cuda":
            torch.cuda.empty_cache()
    run = save()
    if args.plot:
        plot(run, args.plot)
    return run


def plot(run, path):
    """Samples/s of every method, forward and training step, one panel per
    (D, batch), each bar labelled with its ratio to torch in the same run
    (unlabelled where torch's row of that shape failed). A shape whose every
    row failed is left out (said); with none left nothing is written.
    Draws on a Figure of its own (the caller's matplotlib backend is left
    alone); returns it, or None."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    res = run["results"]
    shapes = []
    for D, B in dict.fromkeys((r["D"], r["batch"]) for r in res):
        rows = [r for r in res if (r["D"], r["batch"]) == (D, B)]
        if any(f"{kind}_s" in r for r in rows for kind in ("fwd", "train")):
            shapes.append((D, B))
        else:
            print(f"D={D}, batch {B}: no row to plot ({sum('error' in r for r in rows)} failed)")
    if not shapes:
        print(f"no measured row in the run: {path} not written")
        return None
    fig = Figure(figsize=(12, 3.2 * len(shapes)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(shapes), 2, squeeze=False)
    for row, (D, B) in zip(axes, shapes):
        for ax, kind, what in zip(row, ("fwd", "train"),
                                  ("forward", "training step (fwd + bwd + SGD)")):
            ax.set_title(f"{what}, D={D}, batch {B}", fontsize=9)
            got = [r for r in res if (r["D"], r["batch"]) == (D, B) and f"{kind}_s" in r]
            if not got:
                ax.set_axis_off()
                continue
            names = [r["method"] for r in got]
            vals = [r[f"{kind}_samples_per_s"] / 1e6 for r in got]
            y = np.arange(len(got))
            ax.barh(y, vals, color=["tab:gray" if n.startswith("torch") else "tab:blue"
                                    for n in names])
            for i, r in enumerate(got):
                x = r.get(f"{kind}_x_torch")
                if x is not None:
                    ax.text(vals[i], i, f" {x:.2f}x", va="center", fontsize=7)
            ax.set_yticks(y, names, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlim(0, max(vals) * 1.25)
            ax.set_xlabel("million samples/s (ratio to torch.nn.EmbeddingBag)", fontsize=8)
            ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Criteo shape, 26 tables: {run.get('device', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


if __name__ == "__main__":
    main()
