"""The main job: train DLRM with a full table, ROBE-Z, HashedNet and the hashing
trick on the same data, print one table and plot AUC against compression.

    python -m hashemb demo                       # synthetic Criteo-shaped data
    python -m hashemb demo --dataset movielens   # MovieLens-100k (recbole wheel)
    python -m hashemb demo --data train.tsv      # Criteo TSV
"""
import argparse
import json
import math
import os
import textwrap
import time

import numpy as np

from . import _validate as V

NAMES = {"full": "full (nn.EmbeddingBag)", "robez": "RobeZ", "hashednet": "HashedNet",
         "hashing_trick": "hashing trick", "lsh": "SCMA (LSHTable)", "lma": "LMA", "tt": "TT-Rec"}


def _parser():
    p = argparse.ArgumentParser(prog="python -m hashemb demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=("synthetic", "movielens"), default="synthetic")
    src.add_argument("--data", metavar="TSV", help="a Criteo TSV file (label, I1..I13, C1..C26)")
    # None: not given (the defaults are filled in by main, which refuses a
    # flag the chosen data does not use rather than ignoring it)
    p.add_argument("--scale", type=V.cli_number(float, high=1.0), default=None,
                   help="synthetic: Criteo Kaggle cardinalities times this (default 0.01)")
    p.add_argument("--train-samples", type=V.cli_number(int), default=None,
                   help="synthetic, --data: training rows (default 250000)")
    p.add_argument("--test-samples", type=V.cli_number(int), default=None,
                   help="synthetic, --data: held-out rows (default 50000; --data: the last "
                        "rows read)")
    p.add_argument("--epochs", type=V.cli_number(int), default=None,
                   help="epochs of the full model (default 2; MovieLens 4)")
    p.add_argument("--compressed-epochs", type=V.cli_number(int), default=None,
                   help="epochs of the compressed models (default 2x --epochs, as the "
                        "ROBE paper allows)")
    p.add_argument("--batch-size", type=V.cli_number(int), default=None,
                   help="training batch (default 2048; MovieLens 256)")
    p.add_argument("--optimizer", choices=("sgd", "adagrad", "rowwise_adagrad"), default=None,
                   help="of every part (default sgd; MovieLens adagrad); rowwise_adagrad: "
                        "FBGEMM's row-wise Adagrad for the full table (through hashemb's "
                        "FullTable, fused), per-slot Adagrad for the compressed arrays, "
                        "torch Adagrad for the MLP")
    p.add_argument("--lr", type=V.cli_number(float), default=None,
                   help="learning rate of every part (default 0.5 for sgd, 0.05 for the "
                        "adagrads)")
    p.add_argument("--weight-dtype", choices=("float32", "float16", "bfloat16"),
                   default="float32",
                   help="storage of the hashemb arrays (float16, bfloat16: pooled in float32; "
                        "the fused optimizer rounds each updated slot, see --rounding; "
                        "bfloat16 needs ml_dtypes and the CPU)")
    p.add_argument("--rounding", choices=("stochastic", "nearest"), default="stochastic",
                   help="how a 16-bit array's updates round (hashemb.SGD stochastic_rounding)")
    p.add_argument("--compression", type=V.cli_number(float), default=None,
                   help="compression of the table (default 1000, MovieLens 10)")
    p.add_argument("--sweep", type=V.cli_numbers, default=None,
                   help="comma-separated compressions for the AUC plot "
                        "(default 10,100,1000; MovieLens 10,100); '' for none")
    p.add_argument("--methods", "--embedding", type=str, default="full,robez,hashednet,hashing_trick",
                   help="comma-separated, from full, robez, hashednet, hashing_trick, lsh "
                        "(SCMA), lma (LMA), tt (TT-Rec)")
    p.add_argument("--block", type=V.cli_number(int), default=16, help="ROBE-Z block size Z")
    p.add_argument("--lsh-block", type=V.cli_number(int), default=None,
                   help="SCMA / LMA: elements per run sharing one minhash slot "
                        "(default D = 16; 1 = element-wise, as the originals)")
    p.add_argument("--num-hashes", type=V.cli_number(int, high=63), default=2,
                   help="SCMA / LMA: minhashes per run")
    p.add_argument("--num-points", type=V.cli_number(int), default=125_000,
                   help="SCMA / LMA: training rows sampled for the minhash (default 125000)")
    p.add_argument("--seed", type=V.cli_number(int, high=2**64 - 1, closed=True), default=0)
    p.add_argument("--threads", type=V.cli_number(int), default=None,
                   help="torch threads (default: all)")
    p.add_argument("--device", default="cpu",
                   help="torch device of the models: cpu (default), cuda or cuda:N (the "
                        "hashemb modules then run their CuPy kernels)")
    p.add_argument("--out", default="demo_out", help="folder for the PNG and JSON results")
    p.add_argument("--no-progress", action="store_true")
    return p


def load(args):
    """(train, test, cardinalities, oracle AUC or None, description)."""
    from .data import Batch, CriteoTSV, SyntheticCriteo, load_movielens
    from .metrics import auc
    if args.data:
        n = args.train_samples + args.test_samples
        reader = CriteoTSV(args.data, on_bad="skip")
        b = reader.read(limit=n)
        bad = (f", {reader.skipped} malformed row{'s' * (reader.skipped > 1)} skipped"
               if reader.skipped else "")
        cats, card = [], []
        for t in range(b.cats.shape[1]):      # exact vocabulary: the full table needs it
            vocab, inv = np.unique(b.cats[:, t], return_inverse=True)
            cats.append(inv)
            card.append(len(vocab))
        cats = np.stack(cats, 1).astype(np.int64)
        if len(b.labels) <= args.test_samples:
            # every row would be a test row: the models would train on nothing
            why = ("; a row is malformed without 40 tab-separated fields, a 0/1 label, "
                   "integer I1..I13 and hex C1..C26") if bad else ""
            raise SystemExit(f"--data: expected more than --test-samples = {args.test_samples} "
                             f"readable rows, got {len(b.labels)}{bad} (lower --test-samples"
                             f"{why})")
        cut = len(b.labels) - args.test_samples
        tr = Batch(b.dense[:cut], cats[:cut], b.labels[:cut], None)
        te = Batch(b.dense[cut:], cats[cut:], b.labels[cut:], None)
        _check_both_classes(te.labels, "--test-samples", "the last rows read")
        desc = f"Criteo TSV {args.data}: {cut} train, {len(te.labels)} test{bad}"
        return tr, te, card, None, desc
    if args.dataset == "movielens":
        tr, te, card = load_movielens(seed=args.seed)
        _check_both_classes(te.labels, "--dataset movielens", "its fixed 80/20 split")
        return tr, te, card, None, "MovieLens-100k (rating >= 4), 80/20 split"
    gen = SyntheticCriteo(scale=args.scale, seed=args.seed)
    tr = gen.sample(0, args.train_samples, "train")
    te = gen.sample(0, args.test_samples, "test")
    _check_both_classes(te.labels, "--test-samples", "drawn with --seed")
    desc = (f"synthetic Criteo-shaped data, scale {args.scale} ({sum(gen.cardinalities):,} "
            f"rows), {args.train_samples:,} train / {args.test_samples:,} test samples")
    return tr, te, gen.cardinalities, auc(te.labels, te.prob), desc


def _check_both_classes(labels, flag, what):
    """The test AUC (and the oracle's) needs both labels among the test rows:
    said before any training, naming the flag that sizes the split."""
    y = np.asarray(labels)
    if len(y) and y.min() == y.max():
        hint = " (raise --test-samples)" if flag == "--test-samples" else ""
        rows = f"{len(y):,} rows are" if len(y) > 1 else "1 row is"
        raise SystemExit(f"{flag}: the test split's {rows} all label {int(y[0])} ({what}): "
                         f"the AUC needs both classes{hint}")


def fused_optimizers(args):
    """The optimizers fused into the hashemb modules' backward: the
    compressed arrays' (per slot: SGD, else Adagrad) and the full table's
    (row-wise Adagrad, or None: torch's nn.EmbeddingBag and optimizer), each
    rounding 16-bit storage as ``--rounding`` says."""
    from . import optim
    kw = dict(stochastic_rounding=args.rounding == "stochastic", seed=args.seed)
    fused = (optim.SGD if args.optimizer == "sgd" else optim.Adagrad)(args.lr, **kw)
    full = optim.RowwiseAdagrad(args.lr, **kw) if args.optimizer == "rowwise_adagrad" else None
    return fused, full


def run_method(method, compression, tr, te, card, args, epochs, bar_desc):
    """Train one DLRM; returns the result row."""
    import torch
    from tqdm.auto import tqdm

    from .torch import DLRM, evaluate, make_embedding, train_epoch
    from .torch.dlrm import embedding_params, make_optimizer
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.weight_dtype)       # the hashemb arrays' storage
    fused, full_opt = fused_optimizers(args)
    if method in ("lsh", "lma"):    # SCMA / LMA (issue 6): allocation learned from tr
        from .torch import LSHEmbeddingBagCollection
        emb = LSHEmbeddingBagCollection(tr.cats, card, 16, compression, lma=method == "lma",
                                        num_points=min(args.num_points, len(tr.labels)),
                                        num_hashes=args.num_hashes, block=args.lsh_block,
                                        seed=args.seed, optimizer=fused, lr=args.lr,
                                        init_seed=args.seed, progress=not args.no_progress,
                                        dtype=dtype)
    elif method == "tt":     # TT-Rec (issue 7; float32 cores): ranks chosen to hit the compression
        from .torch.tt import TTEmbeddingBagCollection, tt_ranks_for_compression
        emb = TTEmbeddingBagCollection(card, 16, tt_ranks_for_compression(card, 16, compression),
                                       sparse=True, optimizer=args.optimizer,
                                       learning_rate=args.lr, seed=args.seed)
    else:
        emb = make_embedding(method, card, 16, compression, args.lr, args.seed, args.block,
                             fused if method != "full" else full_opt, dtype=dtype)
    model = DLRM(emb, len(card), num_dense=tr.dense.shape[1], seed=args.seed).to(args.device)
    opt = make_optimizer(model, args.lr, args.optimizer)
    n = len(tr.labels)
    speeds = []
    with tqdm(total=n * epochs, desc=bar_desc, unit="sample", unit_scale=True, leave=False,
              disable=args.no_progress) as bar:
        for ep in range(epochs):
            _, sps = train_epoch(model, opt, tr.dense, tr.cats, tr.labels, args.batch_size,
                                 seed=args.seed * 1000 + ep, progress=bar)
            speeds.append(sps)
    ev = evaluate(model, te.dense, te.cats, te.labels)
    params = embedding_params(model)
    nbytes = sum(p.numel() * p.element_size() for p in emb.parameters())
    extra = emb.scheme.extra_bytes() if hasattr(getattr(emb, "scheme", None), "extra_bytes") else 0
    full_params = sum(card) * 16
    label = NAMES[method] if not (method == "full" and args.optimizer == "rowwise_adagrad") \
        else "full (FullTable, row-wise Adagrad)"
    return {"method": method, "label": label, "nominal": compression,
            "compression": full_params / params,
            "epochs": epochs,
            "embedding_params": params, "memory_mb": (nbytes + extra) / 2 ** 20,
            "auc": ev["auc"], "logloss": ev["logloss"], "train_sps": float(np.median(speeds)),
            "infer_sps": ev["samples_per_s"]}


def _table(rows, oracle):
    head = ("| method | compression | embedding params | memory MB | test AUC | logloss "
            "| train samples/s | inference samples/s |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r.get('label', NAMES[r['method']])} | {r['compression']:.0f}x | "
                     f"{r['embedding_params']:,} | {r['memory_mb']:.2f} | {r['auc']:.4f} | "
                     f"{r['logloss']:.4f} | {r['train_sps']:,.0f} | {r['infer_sps']:,.0f} |")
    if oracle is not None:
        lines.append(f"\noracle AUC (the planted click probabilities): {oracle:.4f}")
    return "\n".join(lines)


def _finite(x):
    """A finite number (not None, NaN or infinite)."""
    try:
        return math.isfinite(x)
    except TypeError:
        return False


def plot(rows, full, oracle, path, title):
    """Test AUC against the achieved compression (each row's
    ``compression``: full-table floats / floats kept) of every compressed
    method, the full table's and the oracle's AUC as lines. A non-finite
    point (a diverged model) is left out; the axis is logarithmic only when
    some point is left; nothing is drawn without a finite point or full
    table's AUC (the oracle's line alone is no result). Draws on a Figure
    of its own (the caller's matplotlib backend and pyplot figures are left
    alone) and saves it as a PNG to ``path`` (a name or a binary file).
    Returns the Figure, or None when nothing was left to draw (nothing is
    written then)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = False
    for m in ("robez", "hashednet", "hashing_trick", "lsh", "lma", "tt"):
        pts = sorted((r["compression"], r["auc"]) for r in rows if r["method"] == m
                     and _finite(r["compression"]) and r["compression"] > 0
                     and _finite(r["auc"]))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=NAMES[m])
            points = True
    line = full is not None and _finite(full["auc"])
    if not (points or line):        # (the oracle alone is no result)
        return None
    if line:
        ax.axhline(full["auc"], color="k", ls="--", label="full table")
    if oracle is not None and _finite(oracle):
        ax.axhline(oracle, color="gray", ls=":", label="oracle")
    if points:
        ax.set_xscale("log")
    ax.set_xlabel("compression (full-table floats / floats kept)")
    ax.set_ylabel("test AUC")
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=9)   # (one line was clipped)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    return fig


def _json_safe(x):
    """``x`` with every non-finite float as None (JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def save_results(out, record, rows, full, oracle, title):
    """results.json (non-finite numbers as null) and auc_vs_compression.png
    in ``out``: each is written to a temporary name first and moved over the
    previous one only when both are written, so a failed save leaves the
    previous pair, and a run with nothing finite to plot removes the
    previous PNG rather than leave it beside the new JSON. Returns the
    PNG's path, or None when there was nothing to plot."""
    js = os.path.join(out, "results.json")
    png = os.path.join(out, "auc_vs_compression.png")
    tmp_js, tmp_png = (os.path.join(out, f".{name}.{os.getpid()}.tmp") for name in
                       ("results.json", "auc_vs_compression.png"))
    try:
        with open(tmp_js, "w") as f:
            json.dump(_json_safe(record), f, indent=1, allow_nan=False)
        with open(tmp_png, "wb") as f:
            drawn = plot(rows, full, oracle, f, title) is not None
        os.replace(tmp_js, js)
        if drawn:
            os.replace(tmp_png, png)
        elif os.path.exists(png):
            os.remove(png)
            print(f"removed the previous {png} (it was not this run's)")
    finally:
        for t in (tmp_js, tmp_png):
            if os.path.exists(t):
                os.remove(t)
    return png if drawn else None


def _check_device(name):
    """The --device value, checked before any data is made: a CUDA device
    needs torch with CUDA and CuPy (the hashemb modules' GPU kernels)."""
    import torch
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise SystemExit(f"--device: expected cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise SystemExit(f"--device: expected cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise SystemExit(f"--device: {name!r} needs torch with CUDA and a GPU; this torch "
                         f"({torch.__version__}) sees none")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SystemExit(f"--device: {name!r}, but torch sees {torch.cuda.device_count()} GPU(s)")
    from ._gpu import _runtime
    if _runtime.device_count() == 0:
        raise SystemExit(f"--device: {name!r} needs CuPy for the hashemb kernels "
                         f"(pip install cupy-cuda12x)")
    return str(dev)


def _fill_data_flags(parser, args):
    """The data flags' defaults, after refusing one the data does not use
    (MovieLens is its fixed 80/20 split; a TSV has its own rows); a flag the
    data does not use stays None."""
    given = {"--scale": args.scale, "--train-samples": args.train_samples,
             "--test-samples": args.test_samples}
    unused = (["--scale"] if args.data else [] if args.dataset == "synthetic" else list(given))
    for flag in unused:
        if given[flag] is not None:
            what = "--data (the file's rows)" if args.data else \
                "--dataset movielens (its fixed 80/20 split of 100,000 ratings)"
            parser.error(f"argument {flag}: not used with {what}")
    if "--scale" not in unused:
        args.scale = 0.01 if args.scale is None else args.scale
    if "--train-samples" not in unused:
        args.train_samples = args.train_samples or 250_000
        args.test_samples = args.test_samples or 50_000


def _resolve(parser, args):
    """Checks the flags that need no data or torch, fills the defaults that
    depend on the data and the optimizer into ``args`` and returns the
    run's other settings: dict(methods, compression, sweep, epochs_c)."""
    # the model's embedding width is 16: ROBE-Z runs of a divisor or a multiple
    # of it, SCMA / LMA runs of a divisor (said here, not by a traceback later)
    if 16 % args.block and args.block % 16:
        parser.error(f"argument --block: expected a divisor or a multiple of 16, got {args.block}")
    if args.lsh_block is not None and 16 % args.lsh_block:
        parser.error(f"argument --lsh-block: expected a divisor of 16, got {args.lsh_block}")
    # a path that exists and is not a folder: a pipe (`<(zcat day_0.gz)`) is read too
    if args.data and (not os.path.exists(args.data) or os.path.isdir(args.data)):
        parser.error(f"argument --data: no such file: {args.data!r}")
    _fill_data_flags(parser, args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        parser.error(f"argument --methods: expected at least one of {', '.join(NAMES)}, "
                     f"got {args.methods!r}")
    for m in methods:
        if m not in NAMES:
            raise SystemExit(f"--methods: expected names from {sorted(NAMES)}, got {m!r}")
    movielens = args.dataset == "movielens" and not args.data
    args.optimizer = args.optimizer or ("adagrad" if movielens else "sgd")
    args.epochs = args.epochs or (4 if movielens else 2)
    args.batch_size = args.batch_size or (256 if movielens else 2048)
    args.lr = args.lr or (0.5 if args.optimizer == "sgd" else 0.05)
    return dict(methods=methods,
                compression=args.compression or (10.0 if movielens else 1000.0),
                sweep=args.sweep if args.sweep is not None else (
                    [10.0, 100.0] if movielens else [10.0, 100.0, 1000.0]),
                epochs_c=args.compressed_epochs or 2 * args.epochs)


def _recorded_args(args, settings, num_train):
    """The run's settings as results.json records them: the values used
    (defaults resolved, the training rows the run had), None for a flag
    that applies to nothing the run did."""
    methods = settings["methods"]
    compressed = any(m != "full" for m in methods)
    minhash = any(m in ("lsh", "lma") for m in methods)
    threads = args.threads
    if threads is None:
        import torch
        threads = torch.get_num_threads()
    rec = dict(vars(args))
    rec.update(
        dataset=None if args.data else args.dataset,
        train_samples=None if args.train_samples is None else num_train,
        methods=methods, threads=threads,
        epochs=args.epochs if "full" in methods else None,
        compression=settings["compression"] if compressed else None,
        sweep=settings["sweep"] if compressed else None,
        compressed_epochs=settings["epochs_c"] if compressed else None,
        block=args.block if "robez" in methods else None,
        lsh_block=(args.lsh_block or 16) if minhash else None,
        num_hashes=args.num_hashes if minhash else None,
        num_points=min(args.num_points, num_train) if minhash else None,
        # the fused steps round only 16-bit arrays
        rounding=args.rounding if args.weight_dtype != "float32" else None)
    return rec


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    settings = _resolve(parser, args)
    V.cli_folder(parser, args.out)
    methods, compression = settings["methods"], settings["compression"]
    sweep, epochs_c = settings["sweep"], settings["epochs_c"]
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = _check_device(args.device)
    t0 = time.perf_counter()
    tr, te, card, oracle, desc = load(args)
    print(f"data: {desc}; CTR {tr.labels.mean():.3f}")
    rows = []
    full = None
    if "full" in methods:
        full = run_method("full", 1.0, tr, te, card, args, args.epochs, "full")
        rows.append(full)
    for c in sorted(set([compression] + sweep), reverse=True):
        for m in methods:
            if m != "full":
                rows.append(run_method(m, c, tr, te, card, args, epochs_c, f"{m} {c:g}x"))
    main_rows = [r for r in rows if r["method"] == "full" or r["nominal"] == compression]
    print(f"\nDLRM (bottom {tr.dense.shape[1]}-512-256-64-16, top 512-256-1, D=16, {args.optimizer} lr {args.lr}, "
          f"batch {args.batch_size}); full {args.epochs} epochs, compressed {epochs_c}")
    print(_table(main_rows, oracle))
    if len(rows) > len(main_rows):
        print("\nAUC vs compression:")
        print(_table([r for r in rows if r not in main_rows], None))
    bad = [r for r in rows if not _finite(r["auc"])]
    if bad:
        print("\nleft out of the plot: " + ", ".join(
            r["method"] if r["method"] == "full" else f"{r['method']} {r['nominal']:g}x"
            for r in bad) + " (non-finite AUC: diverged; null in results.json)")
    record = {"data": desc, "oracle_auc": oracle,
              "args": _recorded_args(args, settings, len(tr.labels)), "rows": rows}
    png = save_results(args.out, record, rows, full, oracle, desc)
    took = f"({time.perf_counter() - t0:.0f} s in all)"
    if png:
        print(f"\nsaved {png} and results.json {took}")
    else:
        print(f"\nno finite AUC to plot: saved {os.path.join(args.out, 'results.json')} only "
              f"{took}")
    return rows
