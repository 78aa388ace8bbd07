"""ROBE-Z theory, checked: Theorem 1's variance against Monte Carlo for every Z,
and Theorem 2's bias, on hashemb's own hash.

    python examples/theory_variance.py                 # 2000 seeds, ~15 s on 2 cores
    python examples/theory_variance.py --seeds 200 --out /tmp/t.png

Prints the table that README.md quotes and writes a two-panel PNG (default:
docs/theory_variance.png of this repository, from any folder).
"""
import argparse
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from hashemb import theory
from hashemb._validate import cli_folder

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "theory_variance.png"

ZS = [1, 2, 4, 8, 16, 32, 64]


def theorem1(n, m, seeds):
    rows = []
    fams = theory.vector_families(n)
    cases = [(f, Z, s) for f in fams for Z in ZS for s in ("cubic", "linear")
             if s == "cubic" or f == "all-ones"]
    for fam, Z, signs in tqdm(cases, desc="Theorem 1", unit="case"):
        x, y = fams[fam]
        mc = theory.monte_carlo(theory.inner_product_estimates(
            x, y, m, block=Z, seeds=seeds, signs=signs))
        v = theory.inner_product_variance(x, y, m, block=Z)
        rows.append(dict(family=fam, Z=Z, signs=signs, theory=v, mc=mc,
                         inside=mc.covers(mean=float(x @ y), variance=v)))
    return rows


def theorem2(seeds, rng):
    """E<a^, b^> / <a, b> against m: rows a, b large, the rest of theta small."""
    dim, rows_n = 4, 16
    out = []
    for m in tqdm([8, 16, 32, 64, 128], desc="Theorem 2", unit="m"):
        for label, Z, a, b in [("different blocks (Z=2)", 2, 0, 5),
                               ("same block (Z=8)", 8, 2, 3)]:
            theta = 0.1 * rng.standard_normal((rows_n, dim))
            theta[a], theta[b] = 10.0, 10.0 + np.arange(dim)
            ab = float(theta[a] @ theta[b])
            mc = theory.monte_carlo(theory.embedding_inner_product_estimates(
                theta, a, b, m, dim=dim, block=Z, seeds=seeds))
            want = theory.embedding_inner_product_expectation(theta, a, b, m, dim=dim, block=Z)
            out.append(dict(label=label, m=m, ratio=mc.mean / ab, lo=mc.mean_ci[0] / ab,
                            hi=mc.mean_ci[1] / ab, theory=want / ab))
    return out


def plot(t1, t2, n, m, seeds, path):
    fig = Figure(figsize=(12, 4.6))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    colors = {"gaussian": "C0", "pareto": "C1", "zipf": "C4", "all-ones": "C2"}
    for fam, c in colors.items():
        r = [row for row in t1 if row["family"] == fam and row["signs"] == "cubic"]
        v0 = r[0]["theory"]
        ax1.plot(ZS, [row["theory"] / v0 for row in r], "-", color=c, label=f"{fam}: Theorem 1")
        ax1.errorbar(ZS, [row["mc"].variance / v0 for row in r],
                     yerr=np.array([[row["mc"].variance - row["mc"].variance_ci[0],
                                     row["mc"].variance_ci[1] - row["mc"].variance]
                                    for row in r]).T / v0,
                     fmt="o", color=c, capsize=3, label=f"{fam}: Monte Carlo (99% CI)")
    lin = [row for row in t1 if row["signs"] == "linear"]
    v0 = [row for row in t1 if row["family"] == "all-ones"][0]["theory"]
    ax1.plot(ZS, [row["mc"].variance / v0 for row in lin], "x--", color="C3",
             label="all-ones, linear (pairwise) sign hash")
    ax1.set(xscale="log", yscale="log", xlabel="block size Z", ylabel="Var / V_1 (theory)",
            title=f"Theorem 1: inner-product variance, n={n}, m={m}, {seeds} seeds")
    ax1.set_xticks(ZS, [str(z) for z in ZS])
    ax1.legend(fontsize=7, loc="center right")
    for label, c in [("different blocks (Z=2)", "C0"), ("same block (Z=8)", "C1")]:
        r = [row for row in t2 if row["label"] == label]
        ms = [row["m"] for row in r]
        ax2.plot(ms, [row["theory"] for row in r], "-", color=c, label=f"{label}: theory")
        ax2.errorbar(ms, [row["ratio"] for row in r],
                     yerr=[[row["ratio"] - row["lo"] for row in r],
                           [row["hi"] - row["ratio"] for row in r]],
                     fmt="o", color=c, capsize=3, label=f"{label}: Monte Carlo (99% CI)")
    ax2.set(xscale="log", xlabel="m", ylabel="E<a^, b^> / <a, b>",
            title="Theorem 2: embedding inner product, D=4")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="vector length")
    ap.add_argument("--m", type=int, default=512, help="array size")
    ap.add_argument("--seeds", type=int, default=2000, help="hash seeds per point")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="the PNG (default: %(default)s)")
    args = ap.parse_args(argv)
    cli_folder(ap, Path(args.out).parent)   # before any work
    rng = np.random.default_rng(2026)
    t1 = theorem1(args.n, args.m, args.seeds)
    t2 = theorem2(4 * args.seeds, rng)      # the bias is small: 4x the seeds
    print(f"\nTheorem 1 (n={args.n}, m={args.m}, {args.seeds} seeds): empirical / theoretical variance")
    print(f"{'family':10s} {'signs':6s} " + " ".join(f"{'Z=' + str(z):>7s}" for z in ZS))
    for fam in ("gaussian", "pareto", "zipf", "all-ones"):
        for signs in ("cubic", "linear"):
            r = [row for row in t1 if row["family"] == fam and row["signs"] == signs]
            if r:
                print(f"{fam:10s} {signs:6s} " + " ".join(
                    f"{row['mc'].variance / row['theory']:6.3f}{'' if row['inside'] else '*'}"
                    for row in r))
    print("(* = theory outside the 99% interval)")
    print(f"\nTheorem 2 ({4 * args.seeds} seeds): E<a^,b^>/<a,b>, Monte Carlo [theory]")
    for row in t2:
        print(f"  {row['label']:24s} m={row['m']:3d}  {row['ratio']:.4f} "
              f"[{row['theory']:.4f}]  99% CI ({row['lo']:.4f}, {row['hi']:.4f})")
    plot(t1, t2, args.n, args.m, args.seeds, args.out)
    print(f"\nwrote {args.out}")
    return t1, t2


if __name__ == "__main__":
    main()
