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
