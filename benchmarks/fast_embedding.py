"""FastEmbedding / FastMultiEmbedding against torch.nn.Embedding, the original's
scenarios: forward + Linear(D, 1) + backward, timed per phase in one run.

    python benchmarks/fast_embedding.py                  # default grid, ~3 min on 2 cores
    python benchmarks/fast_embedding.py --quick          # a few cells
    python benchmarks/fast_embedding.py --out docs/fast_embedding.png
    python benchmarks/fast_embedding.py --device cuda --quick    # on a GPU (CuPy kernels)

Index scenarios: uniform; "half" (id 0 half the time, id 1 a quarter, ... powers
of 1/2); "same" (every sample the same id); "hot20" (80% uniform, 20% one id).
Ratios are torch time / hashemb time (above 1: hashemb faster), measured
in the same process with the same inputs (each scenario: torch's iterations,
then hashemb's). On CUDA every phase
ends with torch.cuda.synchronize(), so a phase is its wall time on the device.
"""
import argparse
import json
import os
import time

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from hashemb.torch import FastEmbedding, FastMultiEmbedding  # noqa: E402

SCENARIOS = ["uniform", "half", "same", "hot20"]


def make_indices(scenario, n, B, rng):
    if scenario == "uniform":
        x = rng.integers(0, n, B)
    elif scenario == "half":
        x = np.minimum(rng.geometric(0.5, B) - 1, n - 1)
    elif scenario == "same":
        x = np.zeros(B, np.int64)
    else:
        x = rng.integers(0, n, B)
        x[rng.random(B) < 0.2] = n // 2
    return torch.from_numpy(x.astype(np.int64))


def _sync(x):
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def time_phases(emb, head, x, budget):
    """Median forward and backward seconds of emb -> head -> sum -> backward."""
    fwd, bwd = [], []
    head(emb(x)).sum().backward()       # warm-up: first-use builds, allocator, caches
    start = time.perf_counter()
    while len(fwd) < 5 or (time.perf_counter() - start < budget and len(fwd) < 200):
        for p in (*emb.parameters(), *head.parameters()):
            p.grad = None
        _sync(x)
        t0 = time.perf_counter()
        loss = head(emb(x)).sum()
        _sync(x)
        t1 = time.perf_counter()
        loss.backward()
        _sync(x)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    return float(np.median(fwd)), float(np.median(bwd))


class SeparateEmbeddings(torch.nn.Module):
    """What FastMultiEmbedding replaces: one nn.Embedding per table and a cat."""

    def __init__(self, sizes, dims):
        super().__init__()
        self.tables = torch.nn.ModuleList(torch.nn.Embedding(n, d) for n, d in zip(sizes, dims))

    def forward(self, x):
        return torch.cat([t(x[:, i]) for i, t in enumerate(self.tables)], dim=1)


def single(grid, budget, rng, dev="cpu"):
    rows = []
    cells = [(s, n, D, B) for s in grid["scenarios"] for n in grid["n"] for D in grid["D"]
             for B in grid["B"] if n * D <= grid["max_floats"]]
    for s, n, D, B in tqdm(cells, desc="embedding", unit="cell"):
        ref = torch.nn.Embedding(n, D)
        fast = FastEmbedding(n, D, _weight=ref.weight.detach().clone()).to(dev)
        ref, head = ref.to(dev), torch.nn.Linear(D, 1).to(dev)
        x = make_indices(s, n, B, rng).to(dev)
        tf, tb = time_phases(ref, head, x, budget)
        hf, hb = time_phases(fast, head, x, budget)
        rows.append(dict(scenario=s, n=n, D=D, B=B, torch_fwd=tf, torch_bwd=tb, fast_fwd=hf,
                         fast_bwd=hb, bwd=tb / hb, step=(tf + tb) / (hf + hb)))
    return rows


def multi(batches, budget, rng, dev="cpu"):
    dims = np.linspace(1, 32, 10).astype(int).tolist()
    sizes = [int(v) for v in rng.integers(10, 10_000, 10)]
    ref = SeparateEmbeddings(sizes, dims)
    fast = FastMultiEmbedding(sizes, dims, _weight=torch.cat(
        [t.weight.detach().reshape(-1) for t in ref.tables]))
    ref, fast = ref.to(dev), fast.to(dev)
    head = torch.nn.Linear(sum(dims), 1).to(dev)
    rows = []
    for B in tqdm(batches, desc="multi", unit="batch"):
        x = torch.stack([torch.from_numpy(rng.integers(0, n, B)) for n in sizes], dim=1).to(dev)
        tf, tb = time_phases(ref, head, x, budget)
        hf, hb = time_phases(fast, head, x, budget)
        rows.append(dict(B=B, torch_fwd=tf, torch_bwd=tb, fast_fwd=hf, fast_bwd=hb,
                         fwd=tf / hf, bwd=tb / hb, step=(tf + tb) / (hf + hb)))
    return rows, sizes, dims


def heat_map(rows, path, key="bwd"):
    scen = sorted({r["scenario"] for r in rows}, key=SCENARIOS.index)
    Bs = sorted({r["B"] for r in rows})
    ys = sorted({(r["n"], r["D"]) for r in rows})
    fig, axes = plt.subplots(1, len(scen), figsize=(4.2 * len(scen), 0.32 * len(ys) + 2.2),
                             squeeze=False)
    for ax, s in zip(axes[0], scen):
        grid = np.full((len(ys), len(Bs)), np.nan)
        for r in rows:
            if r["scenario"] == s:
                grid[ys.index((r["n"], r["D"])), Bs.index(r["B"])] = r[key]
        im = ax.imshow(np.log2(grid), cmap="RdYlGn", vmin=-3, vmax=3, aspect="auto")
        for i in range(len(ys)):
            for j in range(len(Bs)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(Bs)), [str(b) for b in Bs], fontsize=7)
        ax.set_yticks(range(len(ys)), [f"n={n:g} D={d}" for n, d in ys] if ax is axes[0][0]
                      else [], fontsize=7)
        ax.set_xlabel("batch")
        ax.set_title(f"{s}: torch / hashemb ({key})", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="log2 speed-up", shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def summary(rows, multi_rows, sizes, dims, dev="cpu"):
    where = f"{torch.get_num_threads()} threads" if dev == "cpu" else torch.cuda.get_device_name()
    print(f"\ntorch {torch.__version__}, {where}; ratios torch/hashemb, batch >= 128")
    print(f"{'scenario':9s} {'bwd min':>8s} {'bwd med':>8s} {'bwd max':>8s} "
          f"{'step min':>9s} {'step med':>9s}")
    for s in SCENARIOS:
        r = [x for x in rows if x["scenario"] == s and x["B"] >= 128]
        if r:
            b = np.array([x["bwd"] for x in r])
            st = np.array([x["step"] for x in r])
            print(f"{s:9s} {b.min():8.2f} {np.median(b):8.2f} {b.max():8.2f} "
                  f"{st.min():9.2f} {np.median(st):9.2f}")
    print(f"\nmulti: 10 tables, dims {dims}, sizes {sizes}")
    print(f"{'batch':>6s} {'fwd':>6s} {'bwd':>6s} {'step':>6s}   (torch: separate nn.Embedding + cat)")
    for r in multi_rows:
        print(f"{r['B']:6d} {r['fwd']:6.2f} {r['bwd']:6.2f} {r['step']:6.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a handful of cells")
    ap.add_argument("--budget", type=float, default=0.05, help="seconds per measurement")
    ap.add_argument("--out", default="fast_embedding.png")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: both sides on the GPU (hashemb through its CuPy kernels)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    if args.quick:
        grid = dict(scenarios=SCENARIOS, n=[10, 100_000], D=[32], B=[32, 1024],
                    max_floats=1 << 26)
        batches = [128, 4096]
    else:
        grid = dict(scenarios=SCENARIOS, n=[10, 1000, 100_000, 1_000_000], D=[8, 32, 128, 256],
                    B=[2 ** 5, 2 ** 7, 2 ** 10, 2 ** 12, 2 ** 14], max_floats=1 << 26)
        batches = [2 ** k for k in range(5, 15)]
    rows = single(grid, args.budget, rng, args.device)
    multi_rows, sizes, dims = multi(batches, args.budget, rng, args.device)
    summary(rows, multi_rows, sizes, dims, args.device)
    heat_map(rows, args.out)
    table = os.path.splitext(args.out)[0] + ".json"
    with open(table, "w") as f:
        json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(),
                       device=args.device if args.device == "cpu" else
                       torch.cuda.get_device_name(), single=rows,
                       multi=multi_rows, sizes=sizes, dims=dims), f, indent=1)
    print(f"\nwrote {args.out} and {table} (every cell's timings)")
    return rows, multi_rows


if __name__ == "__main__":
    main()
