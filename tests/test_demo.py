"""The main job end to end on tiny settings: synthetic data and a Criteo TSV."""
import json
import re

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

import hashemb as he                                     # noqa: E402
from hashemb.__main__ import main                       # noqa: E402
from hashemb.data import SyntheticCriteo                # noqa: E402

TINY = ["--train-samples", "3000", "--test-samples", "1000", "--epochs", "1",
        "--batch-size", "512", "--no-progress", "--threads", "1"]


def test_demo_synthetic(tmp_path, capsys):
    assert main(["demo", "--scale", "0.0005", "--sweep", "10", "--out", str(tmp_path)] + TINY) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    methods = {(r["method"], r["nominal"]) for r in res["rows"]}
    assert methods == {("full", 1.0)} | {(m, c) for m in ("robez", "hashednet", "hashing_trick")
                                          for c in (10.0, 1000.0)}
    for r in res["rows"]:
        assert 0.4 < r["auc"] <= 1 and r["train_sps"] > 0 and r["infer_sps"] > 0
    assert (tmp_path / "auc_vs_compression.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| full (nn.EmbeddingBag) | 1x |" in out and "| hashing trick |" in out
    assert "oracle AUC" in out
    # what the rows report: compressed models train twice the full one's
    # epochs, the measured compression, the main table at --compression
    full = sum(SyntheticCriteo(scale=0.0005).cardinalities) * 16
    for r in res["rows"]:
        assert r["epochs"] == (1 if r["method"] == "full" else 2)
        assert r["compression"] == pytest.approx(full / r["embedding_params"])
    main_table, sweep = out.split("AUC vs compression:")
    ratio = lambda text: [int(c) for c in re.findall(r"\| RobeZ \| (\d+)x \|", text)]
    assert [c > 500 for c in ratio(main_table)] == [True]      # the 1000x run
    assert [c < 50 for c in ratio(sweep)] == [True]            # the 10x sweep point


def test_demo_criteo_tsv(tmp_path):
    b = SyntheticCriteo(scale=0.0005, seed=2).sample(0, 4000)
    lines = []
    for i in range(len(b.labels)):
        dense = [str(int(np.expm1(v))) for v in b.dense[i]]
        cats = [format(int(c) * 7919 + t, "x") for t, c in enumerate(b.cats[i])]
        lines.append("\t".join([str(int(b.labels[i]))] + dense + cats))
    lines.insert(7, "garbage row")                      # skipped, not fatal
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(lines) + "\n")
    assert main(["demo", "--data", str(path), "--sweep", "", "--methods", "full,robez",
                 "--compression", "10", "--out", str(tmp_path)] + TINY) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["full", "robez"]
    assert "3000 train, 1000 test, 1 malformed row skipped" in res["data"]
    # a file with no more rows than --test-samples would train on nothing
    small = tmp_path / "small.tsv"
    small.write_text("\n".join(lines[:201]) + "\n")      # 200 rows and the garbage one
    with pytest.raises(SystemExit, match="more than --test-samples = 1000 readable rows, got "
                                         "200, 1 malformed row skipped"):
        main(["demo", "--data", str(small), "--sweep", "", "--methods", "robez",
              "--test-samples", "1000"] + TINY)
    exact = tmp_path / "exact.tsv"                      # as many rows as --test-samples
    exact.write_text("\n".join(lines[:7] + lines[8:101]) + "\n")
    with pytest.raises(SystemExit, match="more than --test-samples = 100 readable rows, got 100"):
        main(["demo", "--data", str(exact), "--sweep", "", "--methods", "robez",
              "--test-samples", "100"] + TINY[4:])


@pytest.mark.parametrize("args, flag, said", [
    (["--dataset", "movielens", "--train-samples", "1000"], "--train-samples",
     "--dataset movielens"),
    (["--dataset", "movielens", "--scale", "0.5"], "--scale", "--dataset movielens"),
    (["--data", __file__, "--scale", "0.5"], "--scale", "--data"),
])
def test_demo_refuses_data_flags_the_data_does_not_use(args, flag, said, tmp_path, capsys):
    # MovieLens ignored all three, a TSV --scale: a run that silently did not
    # do what its command line said
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path)] + args)
    assert e.value.code == 2
    assert re.search(f"argument {flag}: not used with {said}", capsys.readouterr().err)


def test_cli_usage(capsys):
    assert main([]) == 0
    assert main(["nope"]) == 2


def test_demo_lsh_methods_count_their_map(tmp_path):
    """--embedding lsh,lma: fitted on the training split; memory includes the
    sampled-token map and data, so it exceeds the array's floats."""
    assert main(["demo", "--scale", "0.0005", "--sweep", "", "--embedding", "lsh,lma",
                 "--num-points", "2000", "--out", str(tmp_path)] + TINY) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["lsh", "lma"]
    for r in rows:
        assert 0.4 < r["auc"] <= 1
        assert r["memory_mb"] * 2 ** 20 > r["embedding_params"] * 4


def test_demo_device_is_checked_before_any_work(tmp_path):
    import torch
    with pytest.raises(SystemExit, match=r"^--device: expected cpu, cuda or cuda:N, got 'tpu'$"):
        main(["demo", "--device", "tpu", "--out", str(tmp_path)] + TINY)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r"^--device: 'cuda' needs torch with CUDA"):
            main(["demo", "--device", "cuda", "--out", str(tmp_path)] + TINY)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("cli, flag, value, said", [
    ("demo", "--epochs", "0", r"a value in \(0, inf\), got 0"),     # 0 read as the default
    ("demo", "--epochs", "-1", r"\(0, inf\), got -1"),              # trained nothing
    ("demo", "--epochs", "1.5", "an integer, got '1.5'"),
    ("demo", "--batch-size", "0", r"\(0, inf\)"),
    ("demo", "--lr", "nan", r"\(0, inf\), got nan"),
    ("demo", "--scale", "2", r"\(0, 1\], got 2"),
    ("demo", "--seed", "-1", r"\[0, 18446744073709551615\], got -1"),
    ("demo", "--seed", str(1 << 64), r"\[0, 18446744073709551615\], got 18446744073709551616"),
    ("demo", "--methods", ",", "expected at least one of full, robez"),   # trained nothing
    ("demo", "--sweep", "10,x", "a number, got 'x'"),
    ("demo", "--block", "3", "a divisor or a multiple of 16, got 3"),
    ("demo", "--lsh-block", "32", "a divisor of 16, got 32"),
    ("demo", "--data", "/nonexistent.tsv", "no such file"),
    ("lsh-table", "--size", "0", r"\(0, inf\), got 0"),
    ("lsh-table", "--num-hash", "64", r"\(0, 63\], got 64"),
    ("tt-bench", "--iters", "-2", r"\(0, inf\), got -2"),
    ("tt-bench", "--q", "4,x", "an integer, got 'x'"),        # (tracebacks before)
    ("tt-bench", "--ranks", "0,4", r"\(0, inf\), got 0"),
    ("tt-bench", "--ranks", "4", "expected 2 ranks"),
    ("tt-bench", "--p", "2,2,2", "product >= --num-embeddings"),
    ("tt-bench", "--zipf", "1", r"\(1, inf\), got 1"),         # (the law has no sum at 1)
    ("tt-bench", "--cache-size", "-1", r"\[0, inf\), got -1"),
])
def test_command_lines_reject_bad_numbers(cli, flag, value, said, tmp_path, capsys):
    """argparse's usage error naming the flag (exit 2), before any work."""
    rest = ["--data", "x.npy", "--dim", "16"] if cli == "lsh-table" else []
    with pytest.raises(SystemExit) as e:
        main([cli, flag, value] + rest + (["--out", str(tmp_path)] if cli == "demo" else []))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(f"argument {flag}: .*{said}", err), err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("args, flag, said", [
    (["--size", "4"], "--block", "expected block <= size = 4"),
    (["--block", "3"], "--block", "a divisor of dim=16"),
    (["--lma", "--signature-size", "1"], "--num-hash", "signature_size = 1"),
    (["--seed", str(1 << 64)], "--seed", "seed < 18446744073709551616"),
])
def test_lsh_table_names_the_flag_the_library_refused(args, flag, said, tmp_path, capsys):
    # the checks behind the flags (tracebacks before)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 100, (500, 3)))
    with pytest.raises(SystemExit) as e:
        main(["lsh-table", "--data", str(tmp_path / "x.npy"), "--dim", "16"] + args)
    assert e.value.code == 2
    assert re.search(f"argument {flag}: .*{re.escape(said)}", capsys.readouterr().err)


def test_lsh_table_says_the_file_it_saved(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 100, (500, 3)))
    main(["lsh-table", "--data", str(tmp_path / "x.npy"), "--dim", "8", "--out",
          str(tmp_path / "tbl")])
    assert f"saved {tmp_path / 'tbl.npz'}" in capsys.readouterr().out
    assert he.LSHTable.load(tmp_path / "tbl.npz").dim == 8


def test_demo_on_cuda(tmp_path):
    """Every method on the GPU (device only): the hashemb modules through
    their CuPy kernels, the full table through torch."""
    import torch
    from hashemb._gpu import _runtime
    if not torch.cuda.is_available() or _runtime.device_count() == 0:
        pytest.skip("needs torch with CUDA, CuPy and a device")
    assert main(["demo", "--device", "cuda", "--scale", "0.0005", "--sweep", "",
                 "--methods", "full,robez,hashednet,hashing_trick,lsh,lma,tt",
                 "--num-points", "2000", "--compression", "100", "--out", str(tmp_path)]
                + TINY) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 7
    for r in rows:
        assert 0.4 < r["auc"] <= 1 and r["train_sps"] > 0


def test_demo_rowwise_adagrad(tmp_path, capsys):
    """--optimizer rowwise_adagrad: the full table through hashemb's FullTable
    with a fused row-wise Adagrad, the compressed arrays with per-slot
    Adagrad."""
    assert main(["demo", "--scale", "0.0005", "--sweep", "", "--methods", "full,robez",
                 "--optimizer", "rowwise_adagrad", "--out", str(tmp_path)] + TINY) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["full (FullTable, row-wise Adagrad)", "RobeZ"]
    # at these tiny settings only the compressed model learns (the full
    # table's 272K floats see 3000 samples once: 0.49 here, as with torch's
    # Adagrad); the default run's figures are in the README
    assert 0 < rows[0]["auc"] <= 1 and rows[1]["auc"] > 0.55
    assert rows[0]["compression"] == 1.0
    assert "| full (FullTable, row-wise Adagrad) | 1x |" in capsys.readouterr().out


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_demo_rounding_reaches_every_fused_optimizer(rounding):
    # --rounding is the compressed arrays' and the row-wise full table's
    from hashemb import demo
    args = demo._parser().parse_args(["--optimizer", "rowwise_adagrad", "--rounding", rounding,
                                      "--seed", "3", "--lr", "0.2"])
    fused, full = demo.fused_optimizers(args)
    assert isinstance(fused, he.Adagrad) and isinstance(full, he.RowwiseAdagrad)
    for o in (fused, full):
        assert o.stochastic_rounding == (rounding == "stochastic") and o.seed == 3
        assert o.lr == 0.2
    args = demo._parser().parse_args(["--optimizer", "sgd", "--lr", "0.5"])
    fused, full = demo.fused_optimizers(args)
    assert isinstance(fused, he.SGD) and full is None


def _strict_json(path):
    """The file parsed as strict JSON (a bare NaN or Infinity is an error)."""
    def refuse(name):
        raise ValueError(f"{path}: not JSON: {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_demo_plot_draws_the_achieved_compression(tmp_path, monkeypatch):
    # the x axis says "full-table floats / floats kept": the measured ratio,
    # not the requested one (LSH / TT runs miss it by a lot)
    from matplotlib.axes import Axes
    from hashemb import demo
    drawn, plot = {}, Axes.plot

    def spy(self, *a, **k):
        drawn[k.get("label")] = list(a[0])
        return plot(self, *a, **k)
    monkeypatch.setattr(Axes, "plot", spy)
    rows = [dict(method="robez", nominal=10.0, compression=12.5, auc=0.7),
            dict(method="robez", nominal=100.0, compression=80.0, auc=0.68),
            dict(method="tt", nominal=10.0, compression=31.0, auc=0.69)]
    demo.plot(rows, None, None, str(tmp_path / "p.png"), "t")
    assert drawn == {"RobeZ": [12.5, 80.0], "TT-Rec": [31.0]}
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_demo_plot_leaves_the_callers_backend_alone(tmp_path):
    # a library function: matplotlib.use("Agg") in it switched the caller's
    # backend (and it drew through pyplot's global figure list)
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from hashemb import demo
    before = matplotlib.get_backend()
    try:
        matplotlib.use("svg")
        figs = plt.get_fignums()
        demo.plot([dict(method="robez", nominal=10.0, compression=10.0, auc=0.7)],
                  dict(auc=0.72), 0.8, str(tmp_path / "p.png"), "t")
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == figs
    finally:
        matplotlib.use(before)
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_demo_plot_leaves_out_non_finite_points(tmp_path):
    from hashemb import demo
    nan = float("nan")
    rows = [dict(method="robez", nominal=10.0, compression=10.0, auc=nan),
            dict(method="robez", nominal=100.0, compression=100.0, auc=0.7)]
    fig = demo.plot(rows, dict(auc=nan), None, str(tmp_path / "a.png"), "t")
    ax = fig.axes[0]
    assert [list(line.get_xdata()) for line in ax.lines] == [[100.0]]
    assert ax.get_xscale() == "log"
    # only the full table's line: drawn on a linear axis (no log of nothing)
    fig = demo.plot(rows[:1], dict(auc=0.7), None, str(tmp_path / "b.png"), "t")
    assert fig.axes[0].get_xscale() == "linear" and (tmp_path / "b.png").exists()
    # no finite model AUC (the oracle's line alone is no result): no figure, no file
    assert demo.plot(rows[:1], dict(auc=nan), 0.8, str(tmp_path / "c.png"), "t") is None
    assert not (tmp_path / "c.png").exists()


def test_demo_every_model_diverged(tmp_path, capsys):
    """--lr 1e6: every AUC is NaN. The JSON says null (strict JSON), no PNG is
    drawn (a log axis of nothing crashed tight_layout after all the
    training), and the previous run's PNG is not left beside the new JSON."""
    (tmp_path / "auc_vs_compression.png").write_bytes(b"an older run's plot")
    (tmp_path / "results.json").write_text("{}")
    assert main(["demo", "--scale", "0.0005", "--sweep", "", "--methods", "full,robez",
                 "--lr", "1e6", "--out", str(tmp_path)] + TINY) == 0
    res = _strict_json(tmp_path / "results.json")
    assert [r["auc"] for r in res["rows"]] == [None, None]
    assert not (tmp_path / "auc_vs_compression.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]     # no temporaries
    out = capsys.readouterr().out
    assert "left out of the plot: full, robez 1000x (non-finite AUC: diverged" in out
    assert "no finite AUC to plot" in out and "removed the previous" in out


def test_demo_results_are_replaced_together(tmp_path, monkeypatch):
    # both files are written to temporary names, then moved over the old
    # ones: a plot that fails leaves the previous pair as it was
    from hashemb import demo
    (tmp_path / "results.json").write_text('{"old": 1}')
    (tmp_path / "auc_vs_compression.png").write_bytes(b"old")

    def broken(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(demo, "plot", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["demo", "--scale", "0.0005", "--sweep", "", "--methods", "robez",
              "--out", str(tmp_path)] + TINY)
    assert (tmp_path / "results.json").read_text() == '{"old": 1}'
    assert (tmp_path / "auc_vs_compression.png").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auc_vs_compression.png",
                                                          "results.json"]


@pytest.mark.parametrize("where", ["under_a_file", "a_file", "read_only"])
def test_demo_checks_out_before_any_work(where, tmp_path, capsys, monkeypatch):
    import os
    from hashemb import demo
    (tmp_path / "f").write_text("x")
    out = {"under_a_file": tmp_path / "f" / "sub", "a_file": tmp_path / "f",
           "read_only": tmp_path / "ro"}[where]
    if where == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        out.mkdir()
        out.chmod(0o500)
    monkeypatch.setattr(demo, "load", lambda args: pytest.fail("loaded data before --out"))
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(out)] + TINY)
    assert e.value.code == 2
    assert re.search(r"argument --out: cannot write the results into .*"
                     r"(Not a directory|not a folder|Permission denied)", capsys.readouterr().err)


def test_demo_records_the_settings_it_used(tmp_path):
    # defaults resolved (compression, sweep, compressed epochs), None for the
    # flags the run does not use (the minhash ones, --scale of a TSV, ...)
    assert main(["demo", "--scale", "0.0005", "--sweep", "10", "--methods", "full,robez",
                 "--out", str(tmp_path)] + TINY) == 0
    a = _strict_json(tmp_path / "results.json")["args"]
    assert (a["compression"], a["sweep"], a["compressed_epochs"], a["epochs"]) == (
        1000.0, [10.0], 2, 1)
    assert (a["dataset"], a["scale"], a["train_samples"], a["test_samples"]) == (
        "synthetic", 0.0005, 3000, 1000)
    assert (a["optimizer"], a["lr"], a["batch_size"], a["block"]) == ("sgd", 0.5, 512, 16)
    assert a["methods"] == ["full", "robez"] and a["threads"] == 1
    assert a["lsh_block"] is a["num_hashes"] is a["num_points"] is a["rounding"] is None


def test_demo_records_movielens_without_the_synthetic_flags():
    # MovieLens runs recorded --scale 0.01, 250000 / 50000 samples: flags
    # _fill_data_flags filled in and the run never used
    from hashemb import demo
    p = demo._parser()
    args = p.parse_args(["--dataset", "movielens", "--methods", "robez,lsh",
                         "--weight-dtype", "float16"])
    s = demo._resolve(p, args)
    a = demo._recorded_args(args, s, num_train=80_000)
    assert a["scale"] is a["train_samples"] is a["test_samples"] is None
    assert (a["compression"], a["sweep"], a["compressed_epochs"], a["epochs"]) == (
        10.0, [10.0, 100.0], 8, None)                     # no full model: no --epochs
    assert (a["optimizer"], a["lr"], a["batch_size"]) == ("adagrad", 0.05, 256)
    assert (a["lsh_block"], a["num_hashes"], a["num_points"]) == (16, 2, 80_000)
    assert a["rounding"] == "stochastic" and a["block"] == 16
    args = p.parse_args(["--data", __file__, "--methods", "full"])
    a = demo._recorded_args(args, demo._resolve(p, args), num_train=10)
    assert a["dataset"] is a["scale"] is a["compression"] is a["sweep"] is None
    assert a["compressed_epochs"] is a["block"] is None and a["train_samples"] == 10


@pytest.mark.parametrize("source", ["synthetic", "tsv"])
def test_demo_refuses_a_test_split_of_one_class(source, tmp_path):
    # the AUC needs both labels: synthetic data failed in the oracle AUC's
    # traceback, a TSV after all the training
    from hashemb import demo
    argv = ["demo", "--sweep", "", "--methods", "robez", "--out", str(tmp_path)]
    if source == "tsv":
        b = SyntheticCriteo(scale=0.0005, seed=2).sample(0, 300)
        labels = np.r_[b.labels[:200], np.zeros(100)]            # the last 100 all 0
        lines = ["\t".join([str(int(labels[i]))] + [str(int(np.expm1(v))) for v in b.dense[i]]
                           + [format(int(c) + 1, "x") for c in b.cats[i]])
                 for i in range(300)]
        (tmp_path / "t.tsv").write_text("\n".join(lines) + "\n")
        argv += ["--data", str(tmp_path / "t.tsv"), "--test-samples", "100"]
    else:
        argv += ["--scale", "0.0005", "--test-samples", "1"]
    with pytest.raises(SystemExit, match=r"^--test-samples: the test split's \d+ rows? "
                                         r"(are|is) all label 0"):
        main(argv + ["--train-samples", "300", "--no-progress", "--threads", "1"])
    assert not (tmp_path / "results.json").exists()
