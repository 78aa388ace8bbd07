"""TT-Rec benchmark on FBTT's setup, with honest figures.

    python -m hashemb tt-bench                 # B=512, pooling 20, E=11M, D=64, ranks 32
    python -m hashemb tt-bench --iters 50 --torch-rows 2000000

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
"""
import argparse
import time

import numpy as np


def _parser():
    p = argparse.ArgumentParser(prog="python -m hashemb tt-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--pooling", type=int, default=20)
    p.add_argument("--num-embeddings", type=int, default=11_000_000)
    p.add_argument("--p", default="200,220,250", help="row factors ('auto': tt_shapes)")
    p.add_argument("--q", default="4,4,4", help="column factors (product = D)")
    p.add_argument("--ranks", default="32,32")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--torch-rows", type=int, default=None,
                   help="rows of the full torch table (default: num-embeddings when it "
                        "fits in half the free memory, else scaled down)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
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


def main(argv=None):
    args = _parser().parse_args(argv)
    from tqdm.auto import tqdm

    import hashemb as he
    n = args.num_embeddings
    q = [int(x) for x in args.q.split(",")]
    D = int(np.prod(q))
    p = he.tt_shapes(n, D, len(q))[0] if args.p == "auto" else [int(x) for x in args.p.split(",")]
    ranks = [int(x) for x in args.ranks.split(",")]
    R = [1] + ranks + [1]
    B, L = args.batch, args.pooling
    nnz = B * L
    rng = np.random.default_rng(args.seed)
    batches = [rng.integers(0, n, nnz) for _ in range(args.warmup + args.iters)]
    off = np.arange(0, nnz + 1, L, dtype=np.int64)

    cores = he.tt_init(n, p, q, ranks, seed=args.seed)
    tt_bytes = sum(c.nbytes for c in cores)
    opt = he.SGD(1e-6)
    fwd_f, bwd_f = chain_flops(p, q, R)

    def tt_step(idx):
        t0 = time.perf_counter()
        out, saved = he.tt_embedding_bag(idx, cores, off, return_saved=True)
        t1 = time.perf_counter()
        he.tt_embedding_bag_backward(out, idx, cores, off, saved=saved, optimizer=opt)
        return t1 - t0, time.perf_counter() - t1

    tf, tb, uniq = [], [], []
    bar = tqdm(total=len(batches), desc="TT (hashemb)", disable=args.no_progress, leave=False)
    for i, idx in enumerate(batches):
        a, b = tt_step(idx)
        if i >= args.warmup:
            tf.append(a)
            tb.append(b)
            uniq.append(len(np.unique(idx)))
        bar.update()
    bar.close()
    tf, tb = float(np.median(tf)), float(np.median(tb))
    U = float(np.mean(uniq))
    # after the TT runs: OpenBLAS's threads spin for a while after a matmul and
    # would take the cores from the TT kernels' OpenMP threads
    peak = sgemm_peak()
    logical_f = nnz * D * 4 + nnz * 8 + B * D * 4
    logical_b = logical_f + nnz * D * 4
    rows = [("TT fwd", tf, nnz * fwd_f, U * fwd_f, logical_f),
            ("TT fwd+bwd (fused SGD)", tf + tb, nnz * (fwd_f + bwd_f), U * (fwd_f + bwd_f),
             logical_f + logical_b)]

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
        rows += [("torch EmbeddingBag fwd", ef, 0, 0, logical_f),
                 ("torch EmbeddingBag fwd+bwd+SGD (sparse)", ef + eb, 0, 0,
                  logical_f + logical_b)]

    print(f"\nTT-Rec benchmark: B={B}, pooling {L} ({nnz} lookups, {U:.0f} distinct rows), "
          f"E={n:,} p={p}, D={D} q={q}, ranks {ranks}; median of {args.iters} iterations")
    print(f"SGEMM peak (numpy {4096}^3 float32 matmul, this run): {peak:.1f} GFLOPS")
    print(f"chain flops per lookup: forward {fwd_f:,}, backward {bwd_f:,}")
    head = ("| what | ms | us/nnz | GFLOPS (chain) | % of SGEMM peak | GFLOPS (done) "
            "| GB/s (logical) |")
    print(head + "\n|" + "---|" * 7)
    for name, t, fc, fd, by in rows:
        gf = f"{fc / t / 1e9:.1f} | {100 * fc / t / 1e9 / peak:.0f}% | {fd / t / 1e9:.1f}" \
            if fc else "- | - | -"
        print(f"| {name} | {t * 1e3:.2f} | {t / nnz * 1e6:.3f} | {gf} | {by / t / 1e9:.2f} |")
    print(f"\nmemory: TT cores {tt_bytes / 2**20:.2f} MiB; full table {n * D * 4 / 2**30:.2f} GiB "
          f"({n * D * 4 / tt_bytes:,.0f}x the cores)")
    if torch_rows is not None and torch_rows != n:
        print(f"note: the torch table was scaled down to {torch_rows:,} rows "
              f"({torch_bytes / 2**30:.2f} GiB) to fit in memory; lookups taken modulo its size")
    return {"peak": peak, "rows": rows, "unique": U}


if __name__ == "__main__":
    main()
