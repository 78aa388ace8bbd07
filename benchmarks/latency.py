"""Per-call latency of small inference batches on the Criteo Kaggle shape.

What a served model pays for one lookup of all 26 tables: at a batch of one
the work is 26 rows, so the time is the call's own overhead (argument checks,
tensor views, dispatch), not memory. Measured, in one process and in turn
round by round (so every method sees the same noise), under
``torch.no_grad()``:

- the hashemb torch module (``HashEmbeddingBagCollection``, one kernel call
  for all tables) over RobeZ Z=16 at 1000x and over full tables,
- the NumPy function under it (``he.embedding_bags``),
- torch.nn.EmbeddingBag holding all 26 tables in one table, its indices
  shifted in advance (torch's floor: one call, nothing else),
- 26 torch.nn.EmbeddingBag modules and a ``torch.cat`` (how DLRM's reference
  code holds its tables).

FBGEMM is left out: importing it into a process slows torch about 4x (see
criteo_bags.py, which runs each method in its own process).

    python benchmarks/latency.py                       # batches 1, 16, 256
    python benchmarks/latency.py --batches 1 --json docs/latency.json
    python benchmarks/latency.py --scale 0.01          # small full tables, quick
"""
import argparse
import json
import math
import time

import numpy as np
import torch
from tqdm import tqdm

import hashemb as he
from hashemb.data import CRITEO_KAGGLE as CRITEO
from hashemb.torch import HashEmbeddingBagCollection

D = 16
PEER = "torch.nn.EmbeddingBag, one table"


def make_methods(card, compression):
    """name -> fn(X) for a (B, T) int64 tensor X of per-table indices."""
    T, total = len(card), sum(card)
    robe = HashEmbeddingBagCollection(he.RobeZ(max(D, math.ceil(total * D / compression)), D),
                                      num_tables=T)
    full = HashEmbeddingBagCollection(he.FullTable(card, D), num_tables=T)
    scheme, M = robe.scheme, robe.weight.detach().numpy()
    one = torch.nn.EmbeddingBag(total, D, mode="sum")
    base = torch.tensor(np.concatenate([[0], np.cumsum(card)[:-1]]), dtype=torch.int64)
    many = torch.nn.ModuleList(torch.nn.EmbeddingBag(n, D, mode="sum") for n in card)
    shifted = {}

    def torch_one(X):
        # indices shifted and offsets made once per input, outside the timing
        key = id(X)
        if key not in shifted:
            flat = (X + base).reshape(-1)
            shifted.clear()
            shifted[key] = (flat, torch.arange(0, flat.shape[0], 1))
        return one(*shifted[key])

    return {
        "hashemb module, RobeZ Z=16": robe,
        "hashemb module, FullTable": full,
        "he.embedding_bags (NumPy), RobeZ Z=16":
            lambda X: he.embedding_bags(X.numpy(), M, scheme=scheme, num_tables=T),
        PEER: torch_one,
        "torch.nn.EmbeddingBag x26 + cat":
            lambda X: torch.cat([e(X[:, t:t + 1]) for t, e in enumerate(many)], dim=1),
    }


def time_calls(fn, X, calls):
    t = time.perf_counter()
    for _ in range(calls):
        fn(X)
    return (time.perf_counter() - t) / calls


def measure(methods, card, batches, rounds, calls, seed=0):
    """{batch: {method: [seconds a call, one per round]}}; methods run in
    turn within each round, so a slow spell of the machine hits them all."""
    rng = np.random.default_rng(seed)
    results = {}
    with torch.no_grad():
        for B in batches:
            X = torch.from_numpy(np.stack([rng.integers(0, n, B) for n in card], 1))
            times = {name: [] for name in methods}
            for fn in methods.values():     # warm: first-call allocations, caches
                time_calls(fn, X, max(10, calls // 10))
            n = max(50, calls * 16 // (B + 15))      # fewer calls for larger batches
            for _ in tqdm(range(rounds), desc=f"batch {B}", leave=False):
                for name, fn in methods.items():
                    times[name].append(time_calls(fn, X, n))
            results[B] = times
    return results


def table(results):
    lines = []
    for B, times in results.items():
        peer = np.array(times[PEER])
        lines += [f"batch {B}", "",
                  "| method | us a call (min) | us a call (median) | vs " + PEER
                  + ": median (min - max over rounds) |",
                  "|---|---:|---:|---:|"]
        for name, t in times.items():
            t = np.array(t)
            r = peer / t            # > 1: faster than the peer
            lines.append(f"| {name} | {t.min() * 1e6:.1f} | {np.median(t) * 1e6:.1f} | "
                         f"{np.median(r):.2f}x ({r.min():.2f} - {r.max():.2f}) |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,16,256",
                   help="comma-separated batch sizes (samples a call)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="cardinality scale (1 = Criteo Kaggle)")
    p.add_argument("--compression", type=float, default=1000.0)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--calls", type=int, default=2000,
                   help="calls a round at batch 1 (fewer, at least 50, at larger batches)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and hashemb threads (1: a served model's usual set-up)")
    p.add_argument("--json", help="write every round's figures here")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if any(b < 1 for b in batches) or args.rounds < 1 or args.calls < 1 or args.threads < 1:
        p.error("--batches, --rounds, --calls and --threads take positive integers")
    if not (args.scale > 0 and args.compression > 0):
        p.error("--scale and --compression take numbers > 0")
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    he_threads = he.set_num_threads(args.threads)
    card = [max(1, int(n * args.scale)) for n in CRITEO]
    try:
        results = measure(make_methods(card, args.compression), card, batches, args.rounds,
                          args.calls)
    finally:       # (a caller's process keeps its own)
        torch.set_num_threads(torch_threads)
        he.set_num_threads(he_threads)
    print(f"Criteo Kaggle shape x{args.scale}: {len(card)} tables, {sum(card):,} rows, D={D}; "
          f"{args.threads} thread(s), {args.rounds} rounds, no_grad\n")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seconds_a_call": {
                str(B): t for B, t in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
