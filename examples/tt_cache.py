"""Does TT-Rec's LFU cache pay for its memory? DLRM at equal memory.

TT-Rec keeps the most used rows of each table uncompressed beside the
tensor-train cores (``use_cache=True``): the hot rows are then trained as a
full table's rows are, the others through the cores. The cache costs memory
(``min(cache_size, rows)`` full rows a table: the module takes a size a
table), so the fair question is at equal memory:
for a budget of ``--compression`` times fewer floats than the full tables,
is a TT table with lower ranks plus a cache better than the TT table alone?

For each cache size (rows a table), the ranks are the largest common rank
whose cores and caches together fit the budget; a DLRM (the demo's model) is
trained on the synthetic Criteo-shaped log for ``--epochs`` epochs, the
caches counting every training lookup and repopulated at the start of
every epoch after the first (their rows then train in the cache). Memory
counts the parameters (cores and cache rows), not the caches' frequency
tables (2 x 1024 int64 a table, used in training only). Reported
per seed: test AUC, the floats kept, and the share of test lookups the
caches hold.

    python examples/tt_cache.py                          # about 8 min on 2 cores
    python examples/tt_cache.py --cache-sizes 0,32 --seeds 1 --samples 50000

Prints a table and writes a PNG (test AUC against the cache's share of the
memory, a point per seed) and a JSON of every run; the defaults are
docs/tt_cache.png and docs/tt_cache.json of this repository, from any folder.
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from hashemb import _validate as V
from hashemb.data import SyntheticCriteo
from hashemb.torch import DLRM, evaluate, train_epoch
from hashemb.torch.dlrm import make_optimizer
from hashemb.torch.tt import TTEmbeddingBagCollection, tt_ranks_for_compression

D = 16
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "tt_cache.png"


def cached_rows(card, cache_size):
    """Rows cached a table: ``cache_size``, or all of a smaller table's."""
    return [min(cache_size, n) for n in card]


def ranks_within(card, budget, cache_size):
    """The largest common rank whose cores and caches (``cached_rows`` of D
    floats) hold at most ``budget`` floats, or None."""
    left = budget - sum(cached_rows(card, cache_size)) * D
    if left <= 0:
        return None
    r = tt_ranks_for_compression(card, D, sum(card) * D / left)
    emb = TTEmbeddingBagCollection(card, D, r)
    return r if emb.memory_bytes() / 4 <= left else None


def held_share(emb, cats):
    """Share of the lookups of ``cats`` (n, T) whose row a cache holds."""
    held = sum(int(np.count_nonzero(c.slots(cats[:, t]) >= 0))
               for t, c in enumerate(emb._cache_objs or []))
    return held / cats.size


def run(card, tr, te, ranks, cache_size, seed, args, bar):
    torch.manual_seed(seed)
    emb = TTEmbeddingBagCollection(card, D, ranks, sparse=True, optimizer="sgd",
                                   learning_rate=args.lr, seed=seed, use_cache=cache_size > 0,
                                   cache_size=cached_rows(card, cache_size))
    model = DLRM(emb, len(card), num_dense=tr.dense.shape[1], seed=seed)
    opt = make_optimizer(model, args.lr, "sgd")
    for ep in range(args.epochs):
        if cache_size and ep > 0:
            emb.cache_populate()        # the rows counted so far; trained in the cache after
        train_epoch(model, opt, tr.dense, tr.cats, tr.labels, args.batch_size,
                    seed=seed * 1000 + ep, progress=bar)
    ev = evaluate(model, te.dense, te.cats, te.labels)
    floats = emb.memory_bytes() // 4
    return {"cache_size": cache_size, "ranks": list(ranks), "seed": seed, "auc": ev["auc"],
            "logloss": ev["logloss"], "floats": int(floats),
            "cache_floats": sum(cached_rows(card, cache_size)) * D,
            "compression": sum(card) * D / floats,
            "test_lookups_cached": held_share(emb, te.cats) if cache_size else 0.0}


def plot(rows, path, title):
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    share = np.array([r["cache_floats"] / r["floats"] for r in rows])
    auc = np.array([r["auc"] for r in rows])
    ax.scatter(100 * share, auc, color="C0", alpha=0.6, label="a seed")
    xs = sorted(set(share.tolist()))
    ax.plot([100 * x for x in xs], [auc[share == x].mean() for x in xs], "o-", color="C1",
            label="mean over seeds")
    for x in xs:
        r = next(r for r, s in zip(rows, share) if s == x)
        ax.annotate(f"ranks {r['ranks'][0]}, cache {r['cache_size']}",
                    (100 * x, auc[share == x].mean()), textcoords="offset points",
                    xytext=(4, 6), fontsize=7)
    ax.set_xlabel("share of the memory in the LFU caches (%)")
    ax.set_ylabel("test AUC")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=V.cli_number(int), default=250_000, help="training rows")
    p.add_argument("--test-samples", type=V.cli_number(int), default=50_000)
    p.add_argument("--scale", type=V.cli_number(float, high=1.0), default=0.01,
                   help="of the Criteo Kaggle cardinalities (the demo's default)")
    p.add_argument("--compression", type=V.cli_number(float), default=100.0,
                   help="full-table floats / floats kept (cores and caches)")
    p.add_argument("--cache-sizes", default="0,32,64,128,256",
                   help="rows a table, comma-separated (0: TT alone)")
    p.add_argument("--seeds", type=V.cli_number(int), default=4)
    p.add_argument("--epochs", type=V.cli_number(int), default=4,
                   help="the demo's for compressed models")
    p.add_argument("--batch-size", type=V.cli_number(int), default=2048)
    p.add_argument("--lr", type=V.cli_number(float), default=0.5)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="the PNG (the JSON beside it)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        sizes = [int(s) for s in str(args.cache_sizes).split(",") if s.strip()]
    except ValueError:
        p.error(f"argument --cache-sizes: expected integers, got {args.cache_sizes!r}")
    if not sizes or min(sizes) < 0 or len(set(sizes)) < len(sizes):
        p.error(f"argument --cache-sizes: expected distinct integers >= 0, got "
                f"{args.cache_sizes!r}")
    V.cli_folder(p, os.path.dirname(os.path.abspath(args.out)))

    gen = SyntheticCriteo(scale=args.scale, seed=0)
    card = gen.cardinalities
    budget = sum(card) * D / args.compression
    plan = [(c, ranks_within(card, budget, c)) for c in sizes]
    for c, r in plan:
        if r is None:
            p.error(f"argument --cache-sizes: {c} rows a table leave no room for TT cores in "
                    f"{budget:,.0f} floats (--compression {args.compression:g})")
    tr = gen.sample(0, args.samples, "train")
    te = gen.sample(0, args.test_samples, "test")
    rows = []
    with tqdm(total=len(plan) * args.seeds * args.epochs * args.samples, unit="sample",
              unit_scale=True, disable=args.no_progress, desc="DLRM with TT tables") as bar:
        for seed in range(args.seeds):
            for c, r in plan:
                rows.append(run(card, tr, te, r, c, seed, args, bar))
    head = ("| cache rows a table | ranks | floats kept | compression | share in caches "
            "| test lookups cached | test AUC (per seed) | mean |")
    print(f"\nDLRM, TT-Rec tables at {args.compression:g}x ({budget:,.0f} floats), "
          f"{args.samples:,} samples x {args.epochs} epochs, {args.seeds} seed(s)\n")
    print(head + "\n|" + "---|" * 8)
    for c, r in plan:
        mine = [x for x in rows if x["cache_size"] == c]
        aucs = [x["auc"] for x in mine]
        x = mine[0]
        print(f"| {c} | {r[0]} | {x['floats']:,} | {x['compression']:.0f}x | "
              f"{100 * x['cache_floats'] / x['floats']:.0f}% | "
              f"{100 * np.mean([m['test_lookups_cached'] for m in mine]):.0f}% | "
              f"{', '.join(f'{a:.4f}' for a in aucs)} | {np.mean(aucs):.4f} |")
    plot(rows, args.out, f"DLRM, TT-Rec at {args.compression:g}x: the LFU cache at equal "
                         f"memory ({args.seeds} seed(s))")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"args": vars(args), "runs": rows}, f, indent=1)
    print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
