"""Throughput and memory of embedding bags on the Criteo Kaggle shape.

Measures, in one run, samples/s of hashemb (RobeZ at 1000x, HashedNet, FullTable)
beside torch.nn.EmbeddingBag and FBGEMM's table-batched embeddings (CPU), for
inference (forward, batch 16384) and a training step (forward + backward +
SGD, batch 2048), plus the peak memory a training step adds. Every ratio is
against a peer measured in the same run.

    python benchmarks/criteo_bags.py                 # the full Criteo shape
    python benchmarks/criteo_bags.py --scale 0.01    # small tables, quick
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from hashemb.data import CRITEO_KAGGLE as CRITEO

D = 16


def cardinalities(scale):
    return [max(1, int(n * scale)) for n in CRITEO]


def batch(card, B, seed):
    rng = np.random.default_rng(seed)
    X = np.stack([rng.integers(0, n, B) for n in card], 1)      # (B, T)
    flat = np.ascontiguousarray(X.T).reshape(-1)                 # feature-major
    return X, flat, np.arange(len(card) * B + 1, dtype=np.int64)


def timeit(fn, iters, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def make_methods(card, compression, train, lr=0.01):
    """name -> (setup() -> step callable), built lazily so memory is per method."""
    import hashemb as he
    T = len(card)
    size = int(sum(card) * D / compression)
    methods = {}

    def he_method(scheme_fn):
        def setup(flat, off, B):
            scheme = scheme_fn()
            W = scheme.init_weight()
            opt = he.SGD(lr)
            G = np.full((B, T * D), 1e-3, np.float32)
            if not train:
                return lambda: he.embedding_bags(flat, W, off, scheme=scheme, num_tables=T)

            def step():
                he.embedding_bags(flat, W, off, scheme=scheme, num_tables=T)
                he.embedding_bags_backward(G, flat, off, scheme=scheme, num_tables=T,
                                           weight=W, optimizer=opt)
            return step
        return setup

    methods["hashemb RobeZ Z=16"] = he_method(lambda: he.RobeZ(size, D, block=16))
    methods["hashemb RobeZ Z=32"] = he_method(lambda: he.RobeZ(size, D, block=32))
    methods["hashemb HashedNet (Z=1)"] = he_method(lambda: he.HashedNet(size, D))
    methods["hashemb FullTable"] = he_method(lambda: he.FullTable(card, D))

    def torch_setup(flat, off, B):
        import torch
        embs = [torch.nn.EmbeddingBag(n, D, mode="sum", sparse=train) for n in card]
        cols = [torch.from_numpy(flat[t * B:(t + 1) * B].copy()) for t in range(T)]
        offs = torch.arange(B)
        if not train:
            def fwd():
                with torch.no_grad():
                    return [e(c, offs) for e, c in zip(embs, cols)]
            return fwd
        opt = torch.optim.SGD([p for e in embs for p in e.parameters()], lr=lr)

        def step():
            opt.zero_grad()
            outs = [e(c, offs) for e, c in zip(embs, cols)]
            torch.cat(outs, 1).sum().backward()
            opt.step()
        return step

    def fbgemm_setup(flat, off, B):
        import torch
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (EmbeddingLocation,
                                                                          PoolingMode)
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)
        emb = SplitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=[(n, D, EmbeddingLocation.HOST, ComputeDevice.CPU) for n in card],
            optimizer=EmbOptimType.EXACT_SGD, learning_rate=lr, pooling_mode=PoolingMode.SUM,
            device="cpu")
        idx, offs = torch.from_numpy(flat), torch.from_numpy(off)
        if not train:
            def fwd():
                with torch.no_grad():
                    return emb(idx, offs)
            return fwd

        def step():
            emb(idx, offs).sum().backward()
        return step

    methods["torch.nn.EmbeddingBag"] = torch_setup
    methods["FBGEMM TBE (CPU)"] = fbgemm_setup
    return methods, size


def run_one(name, args, train, B):
    """Throughput and peak RSS of one method, in this (fresh) process."""
    card = cardinalities(args.scale)
    import hashemb  # noqa: F401  (imports are not the model's memory)
    if not name.startswith("hashemb"):
        import torch  # noqa: F401
    if name.startswith("FBGEMM"):
        # only here: importing fbgemm_gpu slows torch.nn.EmbeddingBag about 4x
        # in the same process (measured), so every method runs in its own
        import fbgemm_gpu  # noqa: F401
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    methods, size = make_methods(card, args.compression, train)
    _, flat, off = batch(card, B, seed=0)
    step = methods[name](flat, off, B)
    t = timeit(step, args.iters)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"name": name, "train": train, "batch": B, "seconds": t, "samples_per_s": B / t,
            "peak_mb": (peak - base) / 1024, "size": size}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="cardinality scale (1 = Criteo Kaggle)")
    ap.add_argument("--compression", type=float, default=1000.0)
    ap.add_argument("--batch", type=int, default=16384, help="inference batch")
    ap.add_argument("--train-batch", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--methods", default="", help="comma-separated subset (substring match)")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--_one", default="", help=argparse.SUPPRESS)
    ap.add_argument("--_train", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._one:   # child process: one method, one mode
        B = args.train_batch if args._train else args.batch
        print(json.dumps(run_one(args._one, args, bool(args._train), B)))
        return

    from tqdm import tqdm
    names, _ = make_methods(cardinalities(args.scale), args.compression, False)
    names = [n for n in names if not args.methods or
             any(s.strip() and s.strip() in n for s in args.methods.split(","))]
    results = []
    jobs = [(n, tr) for tr in (0, 1) for n in names]
    for name, train in tqdm(jobs, desc="benchmark", unit="case"):
        cmd = [sys.executable, os.path.abspath(__file__), "--_one", name, "--_train", str(train),
               "--scale", str(args.scale), "--compression", str(args.compression),
               "--batch", str(args.batch), "--train-batch", str(args.train_batch),
               "--iters", str(args.iters)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            tqdm.write(f"{name}: failed\n{res.stderr[-1500:]}")
            continue
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))

    card = cardinalities(args.scale)
    print(f"\nCriteo Kaggle shape x{args.scale}: {len(card)} tables, {sum(card):,} rows, D={D}; "
          f"compressed array {int(sum(card) * D / args.compression):,} floats "
          f"({args.compression:g}x); {os.cpu_count()} cores")
    for train in (0, 1):
        rows = [r for r in results if r["train"] == train]
        if not rows:
            continue
        peer = {r["name"]: r for r in rows}
        ref_name = "FBGEMM TBE (CPU)" if train else "torch.nn.EmbeddingBag"
        ref = peer.get(ref_name) or peer.get("torch.nn.EmbeddingBag")
        title = (f"training step (forward + backward + SGD), batch {args.train_batch}" if train
                 else f"inference forward, batch {args.batch}")
        print(f"\n{title}\n")
        print(f"| method | samples/s | vs {ref['name'] if ref else '-'} | peak MB added |")
        print("|---|---:|---:|---:|")
        for r in rows:
            ratio = r["samples_per_s"] / ref["samples_per_s"] if ref else float("nan")
            print(f"| {r['name']} | {r['samples_per_s']:,.0f} | {ratio:.2f}x | {r['peak_mb']:,.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
