"""Why a 16-bit array's updates round stochastically: the same training run
with a float32 array, and float16 and bfloat16 ones rounded stochastically
(hashemb's default) and to nearest.

    python examples/float16_rounding.py                  # ~3 s on 2 cores
    python examples/float16_rounding.py --steps 300 --out /tmp/f.png

Left: 64 weights at 1.0 take SGD steps of a fifth of float16's spacing
just below 1 (a 39th of bfloat16's). Right: a ROBE-Z array (10x) learns one target vector per token
(squared error) at a learning rate whose steps are mostly below half a
spacing, its loss taken over every token each 20 steps and after the last.
Prints the final figures that README.md quotes and writes a two-panel PNG
(default: docs/float16_rounding.png of this repository, from any folder).
"""
import argparse
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

import hashemb as he
from hashemb._validate import cli_folder

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "float16_rounding.png"

try:
    from ml_dtypes import bfloat16
except ImportError:        # bfloat16 needs ml_dtypes (pip install ml_dtypes)
    bfloat16 = None
KINDS = [("float32", np.float32, True), ("float16, stochastic", np.float16, True),
         ("float16, to nearest", np.float16, False)] + (
    [("bfloat16, stochastic", bfloat16, True), ("bfloat16, to nearest", bfloat16, False)]
    if bfloat16 is not None else [])


def drift(steps, step=1e-4):
    """Mean of 64 weights from 1.0 after each of ``steps`` SGD steps of ``step``."""
    full = he.FullTable([1], 64)
    x = np.zeros((1, 1), np.int64)
    g = np.ones((1, 64), np.float32)
    out = {}
    for name, dtype, sr in KINDS:
        W = np.ones((1, 64), dtype)
        opt = he.SGD(step, stochastic_rounding=sr, seed=1)
        means = []
        for _ in range(steps):
            he.embedding_bags_backward(g, x, scheme=full, num_tables=1, weight=W, optimizer=opt)
            means.append(float(W.astype(np.float32).astype(np.float64).mean()))
        out[name] = means
    return out


def loss_steps(steps, every=20):
    """The steps after which :func:`regression` takes its losses: 0, every
    ``every`` steps, and ``steps`` (after the last update)."""
    return list(range(0, steps, every)) + [steps]


def regression(steps, tokens, batch, lr, every=20, seed=0):
    """Squared error of E(x) against a fixed target per token, over every
    token, after each of :func:`loss_steps` SGD steps on random batches (the
    last: after every update)."""
    D = 16
    robe = he.RobeZ(tokens * D // 10, D, block=D, seed=seed)
    rng = np.random.default_rng(seed)
    target = rng.normal(0, 0.25, (tokens, D)).astype(np.float32)
    batches = rng.integers(0, tokens, (steps, batch, 1))
    every_token = np.arange(tokens).reshape(-1, 1)
    out = {}
    for name, dtype, sr in tqdm(KINDS, desc="regression", unit="kind"):
        W = robe.init_weight(seed=seed, dtype=dtype)
        opt = he.SGD(lr, stochastic_rounding=sr, seed=seed)
        def loss():
            err = he.embedding_bags(every_token, W, scheme=robe, num_tables=1) - target
            return float(0.5 * (err.astype(np.float64) ** 2).sum(1).mean())
        losses = []
        for step, x in enumerate(batches):
            if step % every == 0:
                losses.append(loss())
            err = he.embedding_bags(x, W, scheme=robe, num_tables=1) - target[x[:, 0]]
            he.embedding_bags_backward(err / batch, x, scheme=robe, num_tables=1, weight=W,
                                       optimizer=opt)
        losses.append(loss())       # after the last update: the final loss
        out[name] = losses
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=5_000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="the PNG (default: %(default)s)")
    args = ap.parse_args(argv)
    cli_folder(ap, Path(args.out).parent)   # before any work
    d = drift(min(args.steps, 400))
    r = regression(args.steps, args.tokens, args.batch, args.lr)
    print(f"{'kind':<22} {'mean weight after drift':>24} {'start loss':>11} {'final loss':>11}")
    for name, _, _ in KINDS:
        print(f"{name:<22} {d[name][-1]:>24.5f} {r[name][0]:>11.5f} {r[name][-1]:>11.5f}")
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    a, b = fig.subplots(1, 2)
    for name, _, _ in KINDS:
        ls = "--" if "stoch" in name else "-"
        color = {"float32": "k", "float16": "tab:blue", "bfloat16": "tab:orange"}[name.split(",")[0]]
        a.plot(np.arange(1, len(d[name]) + 1), d[name], label=name, ls=ls, color=color)
        b.plot(loss_steps(args.steps), r[name], label=name, ls=ls, color=color)
    a.set(title="64 weights from 1.0, SGD steps of 1e-4\n(spacing just below 1: float16 "
                "2^-11 = 4.9e-4, bfloat16 2^-8 = 3.9e-3)",
          xlabel="step", ylabel="mean weight")
    b.set(title=f"ROBE-Z 10x regression, lr {args.lr:g}, batch {args.batch}",
          xlabel="step", ylabel="squared error / 2, mean over every token")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"saved {args.out}")
    return d, r


if __name__ == "__main__":
    main()
