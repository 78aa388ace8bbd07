"""Throughput and memory of embedding bags on the Criteo Kaggle shape.

Measures, in one run, samples/s of hashemb (RobeZ at 1000x, HashedNet, FullTable)
beside torch.nn.EmbeddingBag and FBGEMM's table-batched embeddings (CPU), for
inference (forward, batch 16384) and a training step (forward + backward +
SGD, batch 2048; variants with Adagrad, row-wise Adagrad, float16 or
bfloat16 storage), plus the peak memory a training step adds. Every ratio is against
a peer measured in the same run (a variant also against the same variant of
the peer: FBGEMM's for training, torch's for inference, where there is one).

    python benchmarks/criteo_bags.py                 # the full Criteo shape
    python benchmarks/criteo_bags.py --scale 0.01    # small tables, quick
    python benchmarks/criteo_bags.py --json docs/criteo_bags.json --plot docs/criteo_bags.png
    python benchmarks/criteo_bags.py --pooling 8      # multi-hot: bags of 8 indices
    python benchmarks/criteo_bags.py --from-json docs/criteo_bags.json --plot c.png
                        # a saved run's rounds summarised again by this code (no measuring)
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


def batch(card, B, seed, pooling=1):
    """(X, flat, offsets) of B samples: `pooling` indices per table per
    sample (bags of that many entries), feature-major; X is the (B, T)
    array of the one-index case (None otherwise)."""
    rng = np.random.default_rng(seed)
    if pooling > 1:
        flat = np.concatenate([rng.integers(0, n, B * pooling) for n in card])
        return None, flat, np.arange(0, len(card) * B * pooling + 1, pooling, dtype=np.int64)
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

    def he_method(scheme_fn, two_d=False, dtype=np.float32, optim="sgd"):
        def setup(flat, off, B):
            scheme = scheme_fn()
            if dtype == "bfloat16":
                import ml_dtypes
                W = scheme.init_weight(dtype=ml_dtypes.bfloat16)
            else:
                W = scheme.init_weight(dtype=dtype)
            opt = {"sgd": he.SGD, "adagrad": he.Adagrad,
                   "rowwise": he.RowwiseAdagrad}[optim](lr)
            G = np.full((B, T * D), 1e-3, np.float32)
            x, o = flat, off
            if two_d:           # the same batch as a (B, T) array, what a DLRM hands over
                x, o = np.ascontiguousarray(flat.reshape(T, B).T), None
            if not train:
                return lambda: he.embedding_bags(x, W, o, scheme=scheme, num_tables=T)

            def step():         # backward reuses forward's run starts, as the torch modules do
                _, saved = he.embedding_bags(x, W, o, scheme=scheme, num_tables=T,
                                             return_saved=True)
                he.embedding_bags_backward(G, x, o, scheme=scheme, num_tables=T,
                                           weight=W, optimizer=opt, saved=saved)
            return step
        return setup

    methods["hashemb RobeZ Z=16"] = he_method(lambda: he.RobeZ(size, D, block=16))
    methods["hashemb RobeZ Z=16, (B, T) input"] = he_method(lambda: he.RobeZ(size, D, block=16),
                                                           two_d=True)
    methods["hashemb RobeZ Z=32"] = he_method(lambda: he.RobeZ(size, D, block=32))
    methods["hashemb RobeZ Z=4"] = he_method(lambda: he.RobeZ(size, D, block=4))
    methods["hashemb HashedNet (Z=1)"] = he_method(lambda: he.HashedNet(size, D))
    # the signed map the ROBE paper analyses (its experiments run unsigned)
    methods["hashemb RobeZ Z=16, signed"] = he_method(
        lambda: he.RobeZ(size, D, block=16, signed=True))
    methods["hashemb FullTable"] = he_method(lambda: he.FullTable(card, D))
    # float16 storage (pooled in float32; a fused step rounds stochastically)
    methods["hashemb RobeZ Z=16, float16"] = he_method(lambda: he.RobeZ(size, D, block=16),
                                                      dtype=np.float16)
    methods["hashemb FullTable, float16"] = he_method(lambda: he.FullTable(card, D),
                                                      dtype=np.float16)
    # bfloat16 storage (ml_dtypes' dtype; the same kernels, another rounding)
    methods["hashemb RobeZ Z=16, bfloat16"] = he_method(lambda: he.RobeZ(size, D, block=16),
                                                       dtype="bfloat16")
    methods["hashemb FullTable, bfloat16"] = he_method(lambda: he.FullTable(card, D),
                                                       dtype="bfloat16")
    # the training step with Adagrad (one accumulator per element) and
    # row-wise Adagrad (one per row: FBGEMM's EXACT_ROWWISE_ADAGRAD)
    methods["hashemb FullTable, Adagrad"] = he_method(lambda: he.FullTable(card, D),
                                                      optim="adagrad")
    methods["hashemb FullTable, rowwise Adagrad"] = he_method(lambda: he.FullTable(card, D),
                                                              optim="rowwise")
    methods["hashemb RobeZ Z=16, Adagrad"] = he_method(lambda: he.RobeZ(size, D, block=16),
                                                       optim="adagrad")
    # FBGEMM's usual training set-up: float16 tables with EXACT_ROWWISE_ADAGRAD
    methods["hashemb FullTable, float16, rowwise Adagrad"] = he_method(
        lambda: he.FullTable(card, D), dtype=np.float16, optim="rowwise")
    methods["hashemb RobeZ Z=16, float16, Adagrad"] = he_method(
        lambda: he.RobeZ(size, D, block=16), dtype=np.float16, optim="adagrad")

    def torch_setup(flat, off, B, optim="sgd", dtype=None):
        import torch
        embs = [torch.nn.EmbeddingBag(n, D, mode="sum", sparse=train, dtype=dtype)
                for n in card]
        cols = [torch.from_numpy(flat[off[t * B]:off[(t + 1) * B]].copy()) for t in range(T)]
        offs = [torch.from_numpy(off[t * B:(t + 1) * B] - off[t * B]) for t in range(T)]
        if not train:
            def fwd():
                with torch.no_grad():
                    return [e(c, o) for e, c, o in zip(embs, cols, offs)]
            return fwd
        opt = (torch.optim.SGD if optim == "sgd" else torch.optim.Adagrad)(
            [p for e in embs for p in e.parameters()], lr=lr)

        def step():
            opt.zero_grad()
            outs = [e(c, o) for e, c, o in zip(embs, cols, offs)]
            torch.cat(outs, 1).float().sum().backward()
            opt.step()
        return step

    def fbgemm_setup(flat, off, B, half=False, optim="sgd"):
        import torch
        from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (EmbeddingLocation,
                                                                          PoolingMode)
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)
        emb = SplitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=[(n, D, EmbeddingLocation.HOST, ComputeDevice.CPU) for n in card],
            optimizer={"sgd": EmbOptimType.EXACT_SGD, "adagrad": EmbOptimType.EXACT_ADAGRAD,
                       "rowwise": EmbOptimType.EXACT_ROWWISE_ADAGRAD}[optim],
            learning_rate=lr, pooling_mode=PoolingMode.SUM,
            device="cpu", weights_precision=SparseType.FP16 if half else SparseType.FP32)
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
    methods["FBGEMM TBE (CPU), float16"] = lambda flat, off, B: fbgemm_setup(flat, off, B, True)
    # FBGEMM's CPU kernels have no bfloat16 ("not implemented for 'BFloat16'"):
    # torch's bfloat16 tables (rounded to nearest by torch's SGD) are the peer
    methods["torch.nn.EmbeddingBag, bfloat16"] = \
        lambda flat, off, B: torch_setup(flat, off, B, dtype=__import__("torch").bfloat16)
    methods["torch.nn.EmbeddingBag, Adagrad"] = \
        lambda flat, off, B: torch_setup(flat, off, B, optim="adagrad")
    methods["FBGEMM TBE (CPU), Adagrad"] = \
        lambda flat, off, B: fbgemm_setup(flat, off, B, optim="adagrad")
    methods["FBGEMM TBE (CPU), rowwise Adagrad"] = \
        lambda flat, off, B: fbgemm_setup(flat, off, B, optim="rowwise")
    methods["FBGEMM TBE (CPU), float16, rowwise Adagrad"] = \
        lambda flat, off, B: fbgemm_setup(flat, off, B, True, optim="rowwise")
    methods["FBGEMM TBE (CPU), float16, Adagrad"] = \
        lambda flat, off, B: fbgemm_setup(flat, off, B, True, optim="adagrad")
    return methods, size


def peak_rss():
    """This process's peak resident memory in bytes (VmHWM: unlike ru_maxrss it is
    not inherited from the parent across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(name, args, train, B):
    """Throughput and peak RSS of one method, in this (fresh) process."""
    card = cardinalities(args.scale)
    # imports are not the model's memory: every one a method makes happens
    # before the base is read (ml_dtypes for bfloat16 added 7 MB to those
    # rows, and torch's first optimizer imports torch._dynamo, 71 MB)
    import hashemb  # noqa: F401
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        pass
    if not name.startswith("hashemb"):
        import torch
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    if name.startswith("FBGEMM"):
        # only here: importing fbgemm_gpu slows torch.nn.EmbeddingBag about 4x
        # in the same process (measured), so every method runs in its own
        import fbgemm_gpu  # noqa: F401
    base = peak_rss()
    methods, size = make_methods(card, args.compression, train)
    _, flat, off = batch(card, B, seed=0, pooling=args.pooling)
    step = methods[name](flat, off, B)
    t = timeit(step, args.iters)
    peak = peak_rss()
    return {"name": name, "train": train, "batch": B, "seconds": t, "samples_per_s": B / t,
            "peak_mb": (peak - base) / 2**20, "size": size}


def main(argv=None):
    global D
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="cardinality scale (1 = Criteo Kaggle)")
    ap.add_argument("--compression", type=float, default=1000.0)
    ap.add_argument("--batch", type=int, default=16384, help="inference batch")
    ap.add_argument("--train-batch", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dim", type=int, default=D, help="embedding dimension D")
    ap.add_argument("--pooling", type=int, default=1,
                    help="indices per table per sample (multi-hot bags; 1 = Criteo's one-hot)")
    ap.add_argument("--methods", default="", help="comma-separated subset (substring match)")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--plot", default="", help="write a PNG of throughput and memory here")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of every method (ratios are taken within a round)")
    ap.add_argument("--from-json", default="",
                    help="summarise a saved --json run's rounds with this code, print its "
                         "tables and write --json (the saved run with the new summary) and "
                         "--plot; nothing is measured, the saved run's settings are used")
    ap.add_argument("--_one", default="", help=argparse.SUPPRESS)
    ap.add_argument("--_train", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    D = args.dim

    if args._one:   # child process: one method, one mode
        B = args.train_batch if args._train else args.batch
        print(json.dumps(run_one(args._one, args, bool(args._train), B)))
        return

    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        saved = {**saved, "summary": summarise(saved["rounds"])}
        D = saved["args"].get("dim", 16)        # (runs before --dim were D = 16)
        return _publish(saved, argparse.Namespace(**saved["args"]), args)

    from tqdm import tqdm
    names, _ = make_methods(cardinalities(args.scale), args.compression, False)
    names = [n for n in names if not args.methods or
             any(s.strip() and s.strip() in n for s in args.methods.split(","))]
    if args.pooling > 1:    # a (B, T) array holds one index per table
        names = [n for n in names if "(B, T) input" not in n]
    # every round runs each method once, in its own process; the rounds give
    # the spread of the within-round ratios (this VM varies run to run)
    # (an optimizer variant's forward is the plain method's: training only)
    jobs = [(r, tr, n) for r in range(args.repeat) for tr in (0, 1) for n in names
            if tr or "Adagrad" not in n]
    rounds = []
    for rnd, train, name in tqdm(jobs, desc="benchmark", unit="case"):
        cmd = [sys.executable, os.path.abspath(__file__), "--_one", name, "--_train", str(train),
               "--scale", str(args.scale), "--compression", str(args.compression),
               "--batch", str(args.batch), "--train-batch", str(args.train_batch),
               "--iters", str(args.iters), "--pooling", str(args.pooling),
               "--dim", str(args.dim)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            tqdm.write(f"{name}: failed\n{res.stderr[-1500:]}")
            continue
        rounds.append(dict(json.loads(res.stdout.strip().splitlines()[-1]), round=rnd))
    saved = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
             "cores": os.cpu_count(), "summary": summarise(rounds), "rounds": rounds}
    return _publish(saved, args, args)


def _publish(saved, run, args):
    """A run's tables printed, and --json (the whole run) and --plot written;
    ``run``: the settings it ran with (the saved ones for --from-json)."""
    results, cores = saved["summary"], saved.get("cores")
    report(results, run, cores)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(saved, f, indent=1)
    if args.plot and results:
        plot(results, run, title(run, cores), args.plot)
        print(f"\nsaved {args.plot}")
    return saved


def _cores(cores):
    return f"{cores} cores; " if cores else ""


def title(args, cores):
    """The plot's title: the shape, the compression, the machine's cores
    (where known) and the rounds."""
    card = cardinalities(args.scale)
    bags = f"; {args.pooling} indices per bag" if args.pooling > 1 else ""
    return (f"Criteo Kaggle shape x{args.scale:g}: {len(card)} tables, {sum(card):,} rows, "
            f"D={D}{bags}; {args.compression:g}x; {_cores(cores)}median of "
            f"{args.repeat} round(s)")


def report(results, args, cores):
    """The run's header line and its markdown tables (inference, training)."""
    card = cardinalities(args.scale)
    bags = f"; {args.pooling} indices per bag" if args.pooling > 1 else ""
    print(f"\nCriteo Kaggle shape x{args.scale}: {len(card)} tables, {sum(card):,} rows, D={D}{bags}; "
          f"compressed array {int(sum(card) * D / args.compression):,} floats "
          f"({args.compression:g}x); {_cores(cores)}{args.repeat} round(s), each "
          f"method in its own process per round")
    for train in (0, 1):
        rows = [r for r in results if r["train"] == train]
        if not rows:
            continue
        ref = rows[0]["ref"]
        # each method steps with its own rule (SGD unless named): the main ratio is
        # against the reference's SGD step, the last column against its own rule's
        head = (f"training step (forward + backward + the method's optimizer step; vs the "
                f"reference's SGD step), batch {args.train_batch}" if train
                else f"inference forward, batch {args.batch}")
        print(f"\n{head}\n")
        peers = any(r["peer"] for r in rows)
        print(f"| method | samples/s (median) | vs {ref or '-'}: median | min - max over "
              f"rounds | peak MB added |" + (" vs the same variant of it: median (min - max) |"
                                             if peers else ""))
        print("|---|---:|---:|---:|---:|" + ("---:|" if peers else ""))
        for r in rows:
            same = (f" {r['peer_ratio']:.2f}x ({r['peer_min']:.2f} - {r['peer_max']:.2f}) |"
                    if r["peer"] else " |") if peers else ""
            print(f"| {r['name']} | {r['samples_per_s']:,.0f} | {r['ratio']:.2f}x | "
                  f"{r['ratio_min']:.2f} - {r['ratio_max']:.2f} | {r['peak_mb']:,.0f} |" + same)


REFS = {0: "torch.nn.EmbeddingBag", 1: "FBGEMM TBE (CPU)"}


def spread(ratios):
    """(median, min, max) of within-round ratios (NaNs when there are none)."""
    r = np.asarray(ratios, dtype=float)
    if r.size == 0:
        return float("nan"), float("nan"), float("nan")
    return float(np.median(r)), float(r.min()), float(r.max())


def summarise(rounds):
    """Per (method, mode): median samples/s and peak memory over the rounds,
    and the median / min / max of its ratio to the mode's reference measured
    in the same round (torch for inference, FBGEMM for training, else torch)."""
    out = []
    for train in (0, 1):
        got = [r for r in rounds if r["train"] == train]
        present = {r["name"] for r in got}
        ref = REFS[train] if REFS[train] in present else (
            REFS[0] if REFS[0] in present else None)
        for name in dict.fromkeys(r["name"] for r in got):
            mine = [r for r in got if r["name"] == name]
            ratios = []
            for r in mine:
                peer = [p for p in got if p["name"] == ref and p["round"] == r["round"]]
                if peer:
                    ratios.append(r["samples_per_s"] / peer[0]["samples_per_s"])
            ratio, lo, hi = spread(ratios)
            # the peer with the same variant (", float16", ", rowwise Adagrad", ...):
            # the mode's reference's, else the other one's (FBGEMM has no CPU
            # bfloat16, torch no float16 inference), whether or not the plain
            # reference ran
            suffix = name[name.index(","):] if "," in name else ""
            peer = next((p + suffix for p in (REFS[train], REFS[1 - train]) if suffix
                         and p + suffix in present and p + suffix != name), None)
            same = spread([r["samples_per_s"] / p["samples_per_s"] for r in mine for p in got
                           if p["name"] == peer and p["round"] == r["round"]])
            out.append({"name": name, "train": train, "ref": ref, "batch": mine[0]["batch"],
                        "samples_per_s": float(np.median([r["samples_per_s"] for r in mine])),
                        "peak_mb": float(np.median([r["peak_mb"] for r in mine])),
                        "ratio": ratio, "ratio_min": lo, "ratio_max": hi, "rounds": len(mine),
                        "peer": peer, "peer_ratio": same[0], "peer_min": same[1],
                        "peer_max": same[2]})
    return out


def plot(results, args, title, path):
    """Median samples/s of every method for inference and training (bars, with
    the median within-round ratio to the reference and its min - max range),
    and the peak memory a training step adds (log scale). Draws on a Figure
    of its own (the caller's matplotlib backend is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    names = list(dict.fromkeys(r["name"] for r in results))
    y = np.arange(len(names))
    color = ["tab:blue" if n.startswith("hashemb") else "tab:gray" for n in names]
    fig = Figure(figsize=(14, 0.5 * len(names) + 1.9))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, sharey=True)
    for ax, train in zip(axes, (0, 1)):
        got = {r["name"]: r for r in results if r["train"] == train}
        vals = [got[n]["samples_per_s"] if n in got else 0.0 for n in names]
        ax.barh(y, vals, color=color)
        for i, n in enumerate(names):
            if n in got and np.isfinite(got[n]["ratio"]):
                r = got[n]
                # a variant (float16, an Adagrad step) against the same variant of
                # its peer where one ran, else against the reference
                same = r["peer"] and np.isfinite(r["peer_ratio"])
                lo, mid, hi = ((r["peer_min"], r["peer_ratio"], r["peer_max"]) if same
                               else (r["ratio_min"], r["ratio"], r["ratio_max"]))
                ax.text(vals[i], i, f" {mid:.2f}x ({lo:.2f}-{hi:.2f})"
                        + (" same variant" if same else ""), va="center", fontsize=7)
        ref = next(iter(got.values()))["ref"] if got else None
        ax.set_xlim(0, max(vals + [1.0]) * 1.45)
        ax.set_xlabel(f"samples/s (ratio vs {ref or '-'})", fontsize=8)
        ax.set_title(f"inference forward, batch {args.batch}" if train == 0 else
                     f"training step (fwd + bwd + optimizer), batch {args.train_batch}",
                     fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    mem = {r["name"]: r["peak_mb"] for r in results if r["train"] == 1}
    vals = [max(mem.get(n, 0.0), 0.1) for n in names]
    axes[2].barh(y, vals, color=color)
    for i, v in enumerate(vals):
        axes[2].text(v, i, f" {v:,.0f} MB", va="center", fontsize=7)
    axes[2].set_xscale("log")
    axes[2].set_xlim(right=max(vals) * 20)
    axes[2].set_xlabel("MB (log scale)", fontsize=8)
    axes[2].set_title("peak memory a training step adds", fontsize=9)
    axes[0].set_yticks(y, names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


if __name__ == "__main__":
    main()
