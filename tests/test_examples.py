"""The examples run end to end (small settings) and write their figures."""
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest


def run_example(path, argv, monkeypatch):
    path = str(Path(__file__).resolve().parents[1] / path)
    monkeypatch.setattr(sys, "argv", [path] + argv)
    return runpy.run_path(path, run_name="not_main")


def _cuda_device():
    try:
        import cupy  # noqa: F401
        from hashemb._gpu import _runtime as RT
        return RT.device_count() > 0
    except Exception:
        return False


def test_readme_python_examples_run():
    """Every self-contained Python example of the README (a block that starts
    with its imports) runs as printed; the CuPy one where there is a device
    (scripts/gpu-check runs this test on the GPU machine)."""
    import re
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S)
              if b.startswith(("import ", "from "))]
    assert len(blocks) >= 4, "the README's examples are no longer found"
    ran = 0
    for code in blocks:
        if "import cupy" in code and not _cuda_device():
            continue
        if "import torch" in code:
            pytest.importorskip("torch")
        exec(compile(code, "README.md", "exec"), {})
        ran += 1
    assert ran >= 3


def test_theory_variance_example(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    ns = run_example("examples/theory_variance.py", [], monkeypatch)
    out = tmp_path / "t.png"
    t1, t2 = ns["main"](["--n", "256", "--m", "64", "--seeds", "40", "--out", str(out)])
    assert out.stat().st_size > 10_000
    assert {r["family"] for r in t1} == {"gaussian", "pareto", "zipf", "all-ones"}
    assert len(t2) == 10


def test_float16_rounding_example(tmp_path, monkeypatch):
    """float16 rounded stochastically follows float32 where rounding to
    nearest stalls (the drift and the regression of the example)."""
    pytest.importorskip("matplotlib")
    ns = run_example("examples/float16_rounding.py", [], monkeypatch)
    out = tmp_path / "f.png"
    d, r = ns["main"](["--steps", "300", "--out", str(out)])
    f32, sr, rn, bsr, brn = (k for k, _, _ in ns["KINDS"])
    gain = r[f32][0] - r[f32][-1]
    assert gain > 0
    # bfloat16's spacing is 8x float16's: its stochastic mean is noisier
    for s, n, close in ((sr, rn, 1e-3), (bsr, brn, 4e-3)):
        assert d[n][-1] == 1.0 and abs(d[s][-1] - d[f32][-1]) < close < 1 - d[f32][-1]
        assert abs(r[s][-1] - r[f32][-1]) < 0.05 * gain
        assert r[f32][0] - r[n][-1] < 0.5 * gain
    assert out.stat().st_size > 10_000


def test_readme_cross_references_name_existing_sections():
    """'see Speed', 'see Learned allocation', ...: every capitalised 'see X'
    in the README names a section that is there (a section once went
    missing while the Status still pointed at it)."""
    import re
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    heads = [h.strip() for h in re.findall(r"^## (.*)$", text, re.M)]
    refs = set(re.findall(r"\bsee ([A-Z][\w-]*(?: [a-z][\w-]*)*)", text))
    assert refs, "the pattern no longer matches the README's references"
    missing = sorted(r for r in refs if not any(h.startswith(r) for h in heads))
    assert not missing, f"README refers to missing sections: {missing}"


def _criteo_bags():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import criteo_bags
    finally:
        sys.path.pop(0)
    return criteo_bags


def test_criteo_bags_ratios_are_taken_within_a_round():
    cb = _criteo_bags()
    rounds = [dict(name=n, train=0, batch=8, peak_mb=m, samples_per_s=v, round=r)
              for r, n, v, m in [(0, "torch.nn.EmbeddingBag", 100.0, 9), (0, "hashemb X", 300.0, 1),
                                 (1, "torch.nn.EmbeddingBag", 400.0, 9), (1, "hashemb X", 400.0, 3),
                                 (2, "torch.nn.EmbeddingBag", 200.0, 9), (2, "hashemb X", 400.0, 2)]]
    rows = {r["name"]: r for r in cb.summarise(rounds)}
    x = rows["hashemb X"]
    assert x["ref"] == "torch.nn.EmbeddingBag" and x["rounds"] == 3
    assert (x["ratio"], x["ratio_min"], x["ratio_max"]) == (2.0, 1.0, 3.0)
    assert x["samples_per_s"] == 400.0 and x["peak_mb"] == 2.0
    assert rows["torch.nn.EmbeddingBag"]["ratio"] == 1.0
    # a variant's peer is the same variant of the mode's reference (FBGEMM
    # for a training step, before torch's), also where the plain one did not run
    v = ", float16, rowwise Adagrad"
    rounds = [dict(name=n + v, train=1, batch=8, peak_mb=1, samples_per_s=s, round=0)
              for n, s in [("hashemb X", 300.0), ("FBGEMM TBE (CPU)", 100.0),
                           ("torch.nn.EmbeddingBag", 50.0)]]
    x = {r["name"]: r for r in cb.summarise(rounds)}["hashemb X" + v]
    assert x["peer"] == "FBGEMM TBE (CPU)" + v and x["peer_ratio"] == 3.0
    # an inference variant torch has not (float16) takes FBGEMM's (it had none)
    rounds = [dict(name=n, train=0, batch=8, peak_mb=1, samples_per_s=s, round=0)
              for n, s in [("hashemb X, float16", 300.0), ("FBGEMM TBE (CPU), float16", 150.0),
                           ("torch.nn.EmbeddingBag", 50.0)]]
    x = {r["name"]: r for r in cb.summarise(rounds)}["hashemb X, float16"]
    assert x["peer"] == "FBGEMM TBE (CPU), float16" and x["peer_ratio"] == 2.0


def test_criteo_bags_benchmark_runs_and_plots(tmp_path):
    pytest.importorskip("torch")
    cb = _criteo_bags()
    png, js = tmp_path / "cb.png", tmp_path / "cb.json"
    cb.main(["--scale", "0.0005", "--iters", "1", "--batch", "256", "--train-batch", "64",
             "--methods", "RobeZ Z=16,torch", "--plot", str(png), "--json", str(js)])
    import json
    res = json.loads(js.read_text())
    names = ("hashemb RobeZ Z=16", "hashemb RobeZ Z=16, (B, T) input",
             "hashemb RobeZ Z=16, float16", "hashemb RobeZ Z=16, bfloat16",
             "torch.nn.EmbeddingBag", "torch.nn.EmbeddingBag, bfloat16",
             "hashemb RobeZ Z=16, signed")
    steps = ("hashemb RobeZ Z=16, Adagrad", "torch.nn.EmbeddingBag, Adagrad",  # training only
             "hashemb RobeZ Z=16, float16, Adagrad")
    assert {(r["name"], r["train"]) for r in res["summary"]} == {
        (n, t) for n in names for t in (0, 1)} | {(n, 1) for n in steps}
    assert all(r["samples_per_s"] > 0 for r in res["rounds"]) and len(res["rounds"]) == 17
    # a variant's ratio to the same variant of the peer (torch's Adagrad and
    # bfloat16 here)
    for mine, peer in ((steps[0], steps[1]), (names[3], names[5])):
        row = next(r for r in res["summary"] if r["name"] == mine and r["train"])
        assert row["peer"] == peer and row["peer_ratio"] > 0
    assert png.stat().st_size > 5000


def test_criteo_bags_takes_the_dimension(tmp_path, capsys):
    """--dim sets D in every method's process and in the report."""
    cb = _criteo_bags()
    js = tmp_path / "cb.json"
    try:
        cb.main(["--scale", "0.0005", "--iters", "1", "--batch", "64", "--train-batch", "32",
                 "--methods", "RobeZ Z=32", "--dim", "32", "--json", str(js)])
    finally:
        cb.D = 16
    import json
    res = json.loads(js.read_text())
    assert res["args"]["dim"] == 32 and len(res["rounds"]) == 2
    assert res["rounds"][0]["size"] == int(sum(cb.cardinalities(0.0005)) * 32 / 1000)
    assert "D=32" in capsys.readouterr().out


def test_latency_benchmark_runs(tmp_path, capsys):
    pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import latency
    finally:
        sys.path.pop(0)
    js = tmp_path / "lat.json"
    latency.main(["--scale", "0.0005", "--batches", "1,4", "--rounds", "2", "--calls", "20",
                  "--json", str(js)])
    import json
    res = json.loads(js.read_text())["seconds_a_call"]
    assert set(res) == {"1", "4"} and set(res["1"]) == {
        "hashemb module, RobeZ Z=16", "hashemb module, FullTable",
        "he.embedding_bags (NumPy), RobeZ Z=16", "torch.nn.EmbeddingBag, one table",
        "torch.nn.EmbeddingBag x26 + cat"}
    assert all(len(t) == 2 and min(t) > 0 for b in res.values() for t in b.values())
    out = capsys.readouterr().out
    assert "batch 4" in out and "vs torch.nn.EmbeddingBag, one table" in out
    with pytest.raises(SystemExit):
        latency.main(["--batches", "0"])


def test_criteo_bags_pooling(tmp_path):
    # --pooling N: bags of N indices per table per sample, feature-major, the
    # same bags for every method (torch's per-table offsets included)
    pytest.importorskip("torch")
    cb = _criteo_bags()
    X, flat, off = cb.batch([5, 7], 4, 0, pooling=3)
    assert X is None and len(flat) == 24 and (off == np.arange(0, 25, 3)).all()
    assert flat[:12].max() < 5 and flat[12:].max() < 7
    js = tmp_path / "cb.json"
    cb.main(["--scale", "0.0005", "--iters", "1", "--batch", "64", "--train-batch", "32",
             "--methods", "RobeZ Z=32,torch.nn.EmbeddingBag,", "--pooling", "3",
             "--json", str(js)])
    import json
    res = json.loads(js.read_text())
    assert res["args"]["pooling"] == 3
    names = {r["name"] for r in res["summary"]}
    assert {"hashemb RobeZ Z=32", "torch.nn.EmbeddingBag"} <= names
    assert all(r["samples_per_s"] > 0 for r in res["rounds"])


def test_own_model_example(tmp_path, monkeypatch):
    """The plug-into-your-model example: three embeddings train, the state
    round trip gives the same bits, the compressed ones use far less memory."""
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    ns = run_example("examples/own_model.py", [], monkeypatch)
    out = tmp_path / "m.png"
    res = ns["main"](["--scale", "0.001", "--samples", "3000", "--epochs", "2",
                      "--batch", "512", "--no-progress", "--out", str(out)])
    assert [r["kind"] for r in res] == ["full", "100", "1000"]
    for r in res:
        assert len(r["aucs"]) == 2 and all(0.4 < a <= 1 for a in r["aucs"])
        assert r["same_after_load"]
    # 100x and 1000x fewer floats; the memory counts weights and Adagrad
    # state alike: hashemb's fused accumulator and torch's state_sum (the
    # full tables' was left out), one float per weight
    from hashemb.data import SyntheticCriteo
    full = sum(SyntheticCriteo(scale=0.001).cardinalities) * 16 * 4
    assert res[0]["memory_mb"] == pytest.approx(2 * full / 2 ** 20, rel=1e-4)
    assert res[1]["memory_mb"] == pytest.approx(2 * full / 100 / 2 ** 20, rel=1e-3)
    assert res[0]["memory_mb"] > 40 * res[1]["memory_mb"]
    assert res[1]["memory_mb"] > 5 * res[2]["memory_mb"]
    assert out.stat().st_size > 10_000


def test_tt_cache_example(tmp_path, monkeypatch, capsys):
    """TT tables with and without LFU caches at equal memory: every run
    within the budget, the cached ones holding a share of the test lookups,
    the PNG and the JSON written."""
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    ns = run_example("examples/tt_cache.py", [], monkeypatch)
    out = tmp_path / "c.png"
    rows = ns["main"](["--samples", "3000", "--test-samples", "1000", "--epochs", "2",
                       "--cache-sizes", "0,16", "--seeds", "1", "--batch-size", "512",
                       "--no-progress", "--out", str(out)])
    assert [r["cache_size"] for r in rows] == [0, 16]
    budget = rows[0]["floats"] * rows[0]["compression"] / 100
    for r in rows:
        assert r["floats"] <= budget and 0.4 < r["auc"] <= 1
    plain, cached = rows
    assert 0 < cached["test_lookups_cached"] <= 1
    assert cached["ranks"][0] < plain["ranks"][0]          # the cache's floats come from them
    # the memory counted is the module's: its cores at those ranks and the caches' rows
    from hashemb.data import SyntheticCriteo
    from hashemb.torch.tt import TTEmbeddingBagCollection
    card = SyntheticCriteo(scale=0.01).cardinalities
    for r in rows:
        cores = TTEmbeddingBagCollection(card, 16, r["ranks"]).memory_bytes() // 4
        assert r["floats"] == cores + sum(min(r["cache_size"], n) for n in card) * 16
    assert out.stat().st_size > 10_000 and (tmp_path / "c.json").stat().st_size > 100
    for bad, said in (("4096", "4096 rows a table leave no room for TT cores"),
                      ("16,16", "expected distinct integers >= 0")):
        with pytest.raises(SystemExit):
            ns["main"](["--cache-sizes", bad, "--out", str(out), "--no-progress"])
        assert said in capsys.readouterr().err


def test_gpu_bench_dry_run_on_the_cpu(tmp_path):
    """benchmarks/gpu_bench.py's dry run (--device cpu): every method times,
    FullTable agrees with torch before timing, and the SCMA / LMA rows carry
    their ratio to RobeZ on the same pool batches."""
    pytest.importorskip("torch")
    import importlib.util
    import json
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    gb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gb)
    js = tmp_path / "g.json"
    gb.main(["--device", "cpu", "--scale", "0.001", "--batches", "64", "--iters", "1",
             "--dims", "8", "--pool", "500", "--json", str(js),
             "--plot", str(tmp_path / "a.png")])
    res = json.loads(js.read_text())["results"]
    assert (tmp_path / "a.png").stat().st_size > 10_000
    again = gb.main(["--from-json", str(js), "--plot", str(tmp_path / "b.png")])
    assert again["results"] == res and (tmp_path / "b.png").stat().st_size > 10_000
    names = [r["method"] for r in res]
    assert names == ["torch.nn.EmbeddingBag", "hashemb RobeZ 1000x", "deterministic bwd",
                     "hashemb FullTable", "row-wise Adagrad step", "hashemb RobeZ float16",
                     "hashemb FullTable float16",
                     "hashemb HashedNet 1000x", "hashemb RobeZ, pool rows",
                     "hashemb SCMA Z=8", "hashemb LMA Z=8"]
    assert all(r["train_samples_per_s"] > 0 for r in res)
    # logical bytes by the rows' storage: 2 bytes an element for the float16 arrays
    for r in res:
        item = 2 if "float16" in r["method"] else 4
        B, T, D = 64, 26, 8
        fwd = B * T * (8 + D * item + 4 * D)
        assert math.isclose(r["train_GBps"] * r["train_s"] * 1e9,
                            fwd + B * T * (8 + 4 * D + 2 * D * item), rel_tol=1e-9)
        if "fwd_s" in r:
            assert math.isclose(r["fwd_GBps"] * r["fwd_s"] * 1e9, fwd, rel_tol=1e-9)
    assert all(r["fwd_x_robez"] > 0 and r["train_x_robez"] > 0 for r in res[-2:])
    assert not any("fwd_x_robez" in r for r in res[:-2])


def test_gpu_build_dry_run_on_the_emulator(tmp_path, monkeypatch, capsys):
    """benchmarks/gpu_build.py --dry-run: each device build is checked equal to
    the CPU's, then timed beside it, through the host emulator."""
    import importlib.util
    import json
    from hashemb._gpu import _runtime as RT
    monkeypatch.setattr(RT, "_backend", RT._backend)      # the dry run sets the emulator
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_build.py"
    spec = importlib.util.spec_from_file_location("gpu_build", path)
    gb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gb)
    js = tmp_path / "b.json"
    assert gb.main(["--dry-run", "--json", str(js)]) == 0
    res = json.loads(js.read_text())["results"]
    assert [r["what"].split(" (")[0] for r in res] == [
        "LSHTable.fit block=1", "LSHTable.fit block=16", "LMA.fit block=16",
        "FullTable.init_weight", "RobeZ.init_weight"]
    assert all(r["cpu_s"] > 0 and r["gpu_s"] > 0 for r in res)
    assert "LMA.fit block=16" in capsys.readouterr().out


def _gpu_bench():
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    gb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gb)
    return gb


def test_gpu_bench_plots_a_run_with_failed_rows(tmp_path, capsys):
    """--from-json of a run where torch's row of one shape failed (its
    ratios are missing: a KeyError) and every row of another failed (max()
    of nothing): the ratios are left off, the empty shape is skipped."""
    pytest.importorskip("matplotlib")
    import json
    gb = _gpu_bench()

    def ok(D, B, method, fwd, train, x=True):
        r = {"D": D, "batch": B, "method": method}
        for kind, sps in (("fwd", fwd), ("train", train)):
            if sps is not None:
                r.update({f"{kind}_s": B / sps, f"{kind}_samples_per_s": sps})
                if x:
                    r[f"{kind}_x_torch"] = sps / 1e6
        return r
    err = "RuntimeError: CUDA error: out of memory"
    run = {"device": "synthetic", "results": [
        ok(16, 64, "torch.nn.EmbeddingBag", 1e6, 2e5),
        ok(16, 64, "hashemb RobeZ 1000x", 3e6, 1e6),
        ok(16, 64, "  deterministic bwd", None, 9e5),
        {"D": 16, "batch": 128, "method": "torch.nn.EmbeddingBag", "error": err},
        ok(16, 128, "hashemb RobeZ 1000x", 3e6, 1e6, x=False),
        {"D": 64, "batch": 64, "method": "torch.nn.EmbeddingBag", "error": err},
        {"D": 64, "batch": 64, "method": "hashemb RobeZ 1000x", "error": err}]}
    js = tmp_path / "run.json"
    js.write_text(json.dumps(run))
    png = tmp_path / "p.png"
    assert gb.main(["--from-json", str(js), "--plot", str(png)]) == run
    assert png.stat().st_size > 10_000
    fig = gb.plot(run, str(tmp_path / "q.png"))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [f"{w}, D=16, batch {b}" for b in (64, 128)
                      for w in ("forward", "training step (fwd + bwd + SGD)")]
    labels = [[t.get_text().strip() for t in ax.texts] for ax in fig.axes]
    assert labels == [["1.00x", "3.00x"], ["0.20x", "1.00x", "0.90x"], [], []]
    assert "D=64, batch 64: no row to plot (2 failed)" in capsys.readouterr().out
    # no shape left at all: no plot, said
    run["results"] = run["results"][-2:]
    assert gb.plot(run, str(tmp_path / "r.png")) is None
    assert not (tmp_path / "r.png").exists()


def test_criteo_bags_summarises_a_saved_run_again(tmp_path, capsys):
    """--from-json: a saved run's rounds summarised by the current code (a
    summary made by an older peer logic had no peer for an inference
    float16 variant), its tables printed, the JSON rewritten with only the
    summary changed and the plot drawn; nothing measured."""
    pytest.importorskip("matplotlib")
    import json
    cb = _criteo_bags()
    rounds = [dict(name=n, train=t, batch=8, seconds=1.0, samples_per_s=s, peak_mb=1.0, size=5,
                   round=r)
              for r in (0, 1) for t in (0, 1)
              for n, s in [("hashemb RobeZ Z=16, float16", 300.0 + r),
                           ("FBGEMM TBE (CPU), float16", 150.0), ("FBGEMM TBE (CPU)", 100.0),
                           ("torch.nn.EmbeddingBag", 50.0)]]
    args = dict(scale=0.001, compression=1000.0, batch=8, train_batch=8, iters=1, pooling=1,
                methods="", json="/elsewhere.json", plot="", repeat=2)
    old = [dict(r, peer=None, peer_ratio=float("nan")) for r in cb.summarise(rounds)]
    src = tmp_path / "run.json"
    src.write_text(json.dumps({"args": args, "cores": 2, "summary": old, "rounds": rounds}))
    js, png = tmp_path / "again.json", tmp_path / "again.png"
    cb.main(["--from-json", str(src), "--json", str(js), "--plot", str(png)])
    res = json.loads(js.read_text())
    assert res["args"] == args and res["rounds"] == rounds and res["cores"] == 2
    row = next(r for r in res["summary"] if r["name"] == "hashemb RobeZ Z=16, float16"
               and r["train"] == 0)
    assert row["peer"] == "FBGEMM TBE (CPU), float16" and row["peer_ratio"] == 2.0033333333333334
    assert png.stat().st_size > 5000
    out = capsys.readouterr().out
    assert "Criteo Kaggle shape x0.001: 26 tables" in out and "2 cores; 2 round(s)" in out
    assert "| hashemb RobeZ Z=16, float16 | 300 | 6.01x | 6.00 - 6.02 | 1 | 2.00x (2.00 - 2.01) |" \
        in out


EXAMPLES = {   # tiny settings, and a line each prints before it saves
    "examples/float16_rounding.py": (["--steps", "40", "--tokens", "300"], "final loss"),
    "examples/theory_variance.py": (["--n", "128", "--m", "64", "--seeds", "10"], "Theorem 2"),
    "examples/own_model.py": (["--scale", "0.0005", "--samples", "1000", "--epochs", "1",
                               "--batch", "512", "--no-progress"], "| ROBE-Z 1000x |"),
}


@pytest.mark.parametrize("path", sorted(EXAMPLES))
def test_examples_write_from_any_folder(path, tmp_path, monkeypatch, capsys):
    """The default --out is the repository's docs/ wherever the example runs
    (a docs/ relative to the current folder crashed at save time, after all
    the work); an --out's folder is made; the results are printed before the
    PNG is saved; the caller's matplotlib backend is left alone."""
    matplotlib = pytest.importorskip("matplotlib")
    pytest.importorskip("torch")
    from matplotlib.figure import Figure
    argv, printed = EXAMPLES[path]
    before = matplotlib.get_backend()
    try:
        matplotlib.use("svg")
        ns = run_example(path, [], monkeypatch)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    repo = Path(__file__).resolve().parents[1]
    assert ns["DEFAULT_OUT"] == repo / "docs" / Path(path).with_suffix(".png").name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    saved = []

    def fail(self, fname, *a, **k):
        saved.append(fname)
        raise OSError("disk full")
    monkeypatch.setattr(Figure, "savefig", fail)
    with pytest.raises(OSError, match="disk full"):
        ns["main"](argv + ["--out", "figs/deep/x.png"])
    assert saved == ["figs/deep/x.png"] and (elsewhere / "figs" / "deep").is_dir()
    assert printed in capsys.readouterr().out
    # an --out that cannot be written: said before any work, naming the flag
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as e:
        ns["main"](argv + ["--out", str(tmp_path / "f" / "x.png")])
    assert e.value.code == 2
    assert "argument --out: cannot write the results into" in capsys.readouterr().err


def test_float16_rounding_final_loss_is_after_the_last_step(monkeypatch):
    # the loss was taken every 20 steps before the update: the "final" one
    # was step steps-20's; the loss after step 40 of a 40-step run is the
    # one taken at step 40 of a longer run (the same first 40 batches)
    ns = run_example("examples/float16_rounding.py", [], monkeypatch)
    assert ns["loss_steps"](40) == [0, 20, 40] and ns["loss_steps"](45) == [0, 20, 40, 45]
    short = ns["regression"](40, 300, 64, 0.03)
    long = ns["regression"](60, 300, 64, 0.03)
    for name, _, _ in ns["KINDS"]:
        assert len(short[name]) == 3 and len(long[name]) == 4
        assert short[name][:3] == long[name][:3]
        assert short[name][-1] < short[name][1]
