"""The figures a GPU run decides by, in a few lines: issue 4's targets from
gpu_bench's JSON, and every gpu_profile call's host / device / kernel
microseconds. scripts/gpu-check prints it last, so it is in the tail of the
output even where the logs come back only as an archive.

    python benchmarks/gpu_summary.py gpu_out/        # the folder gpu-check wrote
"""
import argparse
import json
import os

# issue 4 (batch 16384): method -> (column, target ratio to torch)
TARGETS = [("hashemb RobeZ 1000x", "fwd_x_torch", 3.0),
           ("hashemb RobeZ 1000x", "train_x_torch", 2.0),
           ("hashemb FullTable", "fwd_x_torch", 0.8),
           ("hashemb FullTable", "train_x_torch", 0.8)]


def bench_lines(path):
    with open(path) as f:
        rows = json.load(f)["results"]
    out = []
    for r in rows:
        if r["method"] == "torch.nn.EmbeddingBag":
            continue
        if "error" in r:
            out.append(f"  D={r['D']:<3} batch={r['batch']:<6} {r['method']:<34} "
                       f"failed: {r['error']}")
            continue
        fx, tx = (r.get(k) for k in ("fwd_x_torch", "train_x_torch"))
        out.append(f"  D={r['D']:<3} batch={r['batch']:<6} {r['method']:<34} "
                   f"fwd {'-' if fx is None else f'{fx:.2f}x':>6}  "
                   f"train {'-' if tx is None else f'{tx:.2f}x':>6}")
    for method, col, want in TARGETS:
        got = [r[col] for r in rows if r["method"] == method and r["batch"] == 16384
               and r["D"] == 16 and r.get(col) is not None]
        if got:
            verdict = "met" if got[0] >= want else "NOT met"
            out.append(f"  target {method} {col} >= {want}: {got[0]:.2f} ({verdict})")
    return out


def profile_lines(path):
    with open(path) as f:
        calls = json.load(f)["calls"]
    out = []
    for label, c in calls.items():
        k = c.get("kernels_us")
        out.append(f"  host {c['host_us']:7.1f}  device {c['device_us']:7.1f}  "
                   f"kernels {'' if k is None else f'{k:7.1f}':>7} us  {label}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("folder", nargs="?", default="gpu_out")
    args = ap.parse_args(argv)
    for name, fn in (("gpu_bench.json", bench_lines), ("gpu_profile.json", profile_lines)):
        path = os.path.join(args.folder, name)
        if not os.path.exists(path):
            print(f"== {name}: not written")
            continue
        print(f"== {name}")
        try:
            print("\n".join(fn(path)))
        except (ValueError, KeyError, TypeError) as e:     # a run cut short mid-write
            print(f"  unreadable: {e!r}")


if __name__ == "__main__":
    main()
