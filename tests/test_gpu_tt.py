"""TT-Rec tables on the GPU backend (hashemb/_gpu/tt.py, tt.cu) against the
CPU TT path, in the two ways of tests/test_gpu.py: ``dev`` = "emulator" runs
the launchers unchanged with NumPy arrays and the kernels compiled for the
host (tests/gpu_emu.py); ``dev`` = "cupy" runs the public API with CuPy
arrays on a device (skipped without CuPy and a CUDA device).

The chain products sum in another order than the CPU's register-tiled GEMMs,
so results agree to tight tolerance (1e-5 of the largest value in float32,
1e-12 in float64), not bitwise.
"""
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import hashemb as he
from hashemb._gpu import tt as GT

import gpu_emu

FIXTURE = settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                          HealthCheck.too_slow], deadline=None, max_examples=30)


class Dev(gpu_emu.Device):
    """One way of running the GPU TT code: the host emulator or CuPy on a device."""

    # device arrays in, device arrays out; single: tables = [cores] (tt_embedding_bag)
    def forward(self, idx, tables, off, single=False, **kw):
        if self.be:
            return GT.bags(idx, tables, off, single=single, be=self.be, **kw)
        if single:
            return he.tt_embedding_bag(idx, tables[0], off, **kw)
        return he.tt_embedding_bags(idx, tables, off, **kw)

    def backward(self, g, idx, tables, off, single=False, **kw):
        if self.be:
            res = GT.bags_backward(g, idx, tables, off, single=single, be=self.be, **kw)
            return res[0] if single and res is not None else res
        if single:
            return he.tt_embedding_bag_backward(g, idx, tables[0], off, **kw)
        return he.tt_embedding_bags_backward(g, idx, tables, off, **kw)

    def to_full(self, cores, n):
        if self.be:
            return GT.to_full(cores, n, be=self.be)
        return he.tt_to_full(cores, n)


@pytest.fixture(scope="module", params=["emulator", "cupy"])
def dev(request):
    return Dev(request.param)


@pytest.fixture(params=[None, 1, 2, 32], ids=lambda c: f"chunk{c}")
def chunk(request, monkeypatch):
    """Lookups per chunk of a digit group (and entries per chunk of a row in
    unpooling): 1 and 2 make groups span several chunks (the atomic and the
    combine paths), 32 the cap, None the adaptive size (here with a small
    thread target, so it varies)."""
    monkeypatch.setattr(GT, "CHUNK", request.param)
    monkeypatch.setattr(GT, "TARGET_THREADS", 64)
    monkeypatch.setattr(GT, "UNPOOL_CHUNK", request.param or 32)
    return request.param


@pytest.fixture(params=[False, True], ids=["atomic", "deterministic"])
def det(request):
    old = he.set_gpu_options(deterministic=request.param)
    yield request.param
    he.set_gpu_options(**old)


def close(got, want, dtype, factor=1, bound=None):
    """Agreement to factor * 1e-5 (float32) / 1e-12 (float64) of the largest
    magnitude: of the result, or of ``bound``, the same sums over the
    terms' magnitudes where given (a sum that cancels to far less than its
    terms carries their rounding, whatever the order of the sum)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = factor * (1e-5 if dtype == np.float32 else 1e-12)
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-30,
                0.0 if bound is None else float(np.abs(bound).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


@st.composite
def tt_batch(draw, multi=False):
    """Tables (2-4 cores, ranks 1-9, any q), a batch in 1-D or 2-D layout
    with empty bags and repeated rows, mode, weights, index dtype."""
    T = draw(st.integers(1, 3)) if multi else 1
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    tables, sizes = [], []
    for t in range(T):
        d = draw(st.integers(2, 4))
        p = [draw(st.integers(1, 5)) for _ in range(d)]
        q = [draw(st.integers(1, 4)) for _ in range(d)]
        ranks = [draw(st.integers(1, 9)) for _ in range(d - 1)]
        N = int(np.prod(p))
        sizes.append(draw(st.integers(1, N)))
        tables.append(he.tt_init(N, p, q, ranks, seed=seed % 997 + t, dtype=dtype))
    B = draw(st.integers(0, 6))
    two_d = draw(st.booleans())
    itype = draw(st.sampled_from([np.int32, np.int64]))
    if two_d:
        N = draw(st.integers(0, 4)) if T == 1 else T
        idx = np.stack([rng.integers(0, sizes[t if T > 1 else 0], B) for t in range(N)],
                       axis=1).astype(itype) if N else np.zeros((B, 0), itype)
        off = None
        nnz = idx.size
    else:
        lens = [draw(st.integers(0, 5)) for _ in range(T * B)]
        off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        idx = np.concatenate([rng.integers(0, sizes[q // B] if B else 1, lens[q])
                              for q in range(T * B)] + [np.zeros(0, np.int64)]).astype(itype)
        nnz = idx.size
    mode = draw(st.sampled_from(["sum", "mean"]))
    psw = None
    if mode == "sum" and draw(st.booleans()):
        psw = rng.standard_normal(idx.shape).astype(dtype)
    last = True if (multi or off is None) else draw(st.booleans())
    if off is not None and not last:
        off = off[:-1]
    D = sum(int(np.prod([c.shape[2] for c in cs])) for cs in tables)
    G = rng.standard_normal((B, D))
    return dict(tables=tables, sizes=sizes, idx=idx, off=off, mode=mode, psw=psw, last=last,
                G=G.astype(dtype), dtype=dtype, nnz=nnz, single=not multi)


def _kw(b, dev=None):
    put = dev.put if dev is not None else (lambda a: a)
    kw = dict(mode=b["mode"], per_sample_weights=put(b["psw"]))
    if b["single"]:
        kw.update(include_last_offset=b["last"], num_embeddings=b["sizes"][0])
    else:
        kw.update(num_embeddings=b["sizes"])
    return kw


def _cpu_forward(b):
    if b["single"]:
        return he.tt_embedding_bag(b["idx"], b["tables"][0], b["off"], **_kw(b))
    return he.tt_embedding_bags(b["idx"], b["tables"], b["off"], **_kw(b))


def _cpu_backward(b, tables=None, **extra):
    tables = b["tables"] if tables is None else tables
    if b["single"]:
        return he.tt_embedding_bag_backward(b["G"], b["idx"], tables[0], b["off"], **_kw(b),
                                            **extra)
    return he.tt_embedding_bags_backward(b["G"], b["idx"], tables, b["off"], **_kw(b), **extra)


def _magnitudes(b):
    """The batch with |cores|, |G| and |weights|: its results are the sums
    of the magnitudes of the terms of b's (the scale of their rounding)."""
    return dict(b, tables=[[np.abs(c) for c in cs] for cs in b["tables"]], G=np.abs(b["G"]),
                psw=None if b["psw"] is None else np.abs(b["psw"]))


def _dev_args(dev, b, tables=None):
    return (dev.put(b["idx"]), dev.put(b["tables"] if tables is None else tables),
            dev.put(b["off"]))


# ------------------------------------------------------------ agreement with the CPU

@FIXTURE
@given(b=st.one_of(tt_batch(), tt_batch(multi=True)))
def test_forward_equals_cpu(dev, b):
    want = _cpu_forward(b)
    idx, tables, off = _dev_args(dev, b)
    got = dev.forward(idx, tables, off, single=b["single"], **_kw(b, dev))
    close(dev.get(got), want, b["dtype"], bound=_cpu_forward(_magnitudes(b)))


@FIXTURE
@given(b=st.one_of(tt_batch(), tt_batch(multi=True)))
def test_dense_backward_equals_cpu(dev, chunk, det, b):
    want = _cpu_backward(b)
    bound = _cpu_backward(_magnitudes(b))      # each element's sum of |terms|
    idx, tables, off = _dev_args(dev, b)
    got = dev.backward(dev.put(b["G"]), idx, tables, off, single=b["single"], **_kw(b, dev))
    if b["single"]:
        got, want, bound = [got], [want], [bound]
    assert len(got) == len(want)
    for gt, wt, bd in zip(got, want, bound):
        assert len(gt) == len(wt)
        for x, y, z in zip(dev.get(gt), wt, bd):
            close(x, y, b["dtype"], bound=z)


@FIXTURE
@given(b=st.one_of(tt_batch(), tt_batch(multi=True)), opt=st.sampled_from(["sgd", "adagrad"]))
def test_fused_optimizers_equal_cpu(dev, chunk, det, b, opt):
    make = (lambda: he.SGD(0.1)) if opt == "sgd" else (lambda: he.Adagrad(0.1, eps=0.1))
    cpu = [[c.copy() for c in cs] for cs in b["tables"]]
    o = make()
    for _ in range(2):
        assert _cpu_backward(b, cpu, optimizer=o) is None
    idx, tables, off = _dev_args(dev, b)
    od = make()
    for _ in range(2):
        assert dev.backward(dev.put(b["G"]), idx, tables, off, single=b["single"],
                            optimizer=od, **_kw(b, dev)) is None
    for cs_d, cs in zip(tables, cpu):
        for x, y in zip(cs_d, cs):
            close(dev.get(x), y, b["dtype"])
            if opt == "adagrad":
                # the state is a sum of squared gradients over the 2 steps:
                # gradients that agree to tol of their largest give squares
                # that agree to 2 tol of theirs, per step (a float32 case of
                # 2.1e-5 was seen: cancellation in a chain of 4 cores)
                close(dev.get(od.state_for(x)[0]), o.state_for(y)[0], b["dtype"], factor=4)


@FIXTURE
@given(b=tt_batch())
def test_saved_forward_gives_the_same_backward(dev, b):
    idx, tables, off = _dev_args(dev, b)
    out, saved = dev.forward(idx, tables, off, single=True, return_saved=True, **_kw(b, dev))
    close(dev.get(out), _cpu_forward(b), b["dtype"])
    g = dev.put(b["G"])
    # ordered sums: atomics on a device may add in another order on each call
    old = he.set_gpu_options(deterministic=True)
    try:
        with_saved = dev.backward(g, idx, tables, off, single=True, saved=saved, **_kw(b, dev))
        without = dev.backward(g, idx, tables, off, single=True, **_kw(b, dev))
    finally:
        he.set_gpu_options(**old)
    for x, y in zip(dev.get(with_saved), dev.get(without)):
        np.testing.assert_array_equal(x, y)


def test_deterministic_backward_is_reproducible(dev, chunk):
    """Many lookups of few digits: every slice gradient sums many chunks."""
    rng = np.random.default_rng(3)
    cores = he.tt_init(64, [4, 4, 4], [2, 4, 2], [5, 7], dtype=np.float32)
    idx = rng.integers(0, 64, 300)
    off = np.arange(0, 301, 10)
    G = rng.standard_normal((30, 16)).astype(np.float32)
    want = he.tt_embedding_bag_backward(G, idx, cores, off)
    old = he.set_gpu_options(deterministic=True)
    try:
        runs = [dev.get(dev.backward(dev.put(G), dev.put(idx), [dev.put(cores)], dev.put(off),
                                     single=True)) for _ in range(2)]
    finally:
        he.set_gpu_options(**old)
    for a, b_, w in zip(runs[0], runs[1], want):
        np.testing.assert_array_equal(a, b_)
        close(a, w, np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [2, 3, 4])
def test_to_full_equals_cpu(dev, dtype, d):
    p, q, r = [3, 2, 4, 2][:d], [2, 3, 1, 2][:d], [4, 3, 2][:d - 1]
    cores = he.tt_init(int(np.prod(p)), p, q, r, dtype=dtype)
    n = int(np.prod(p)) - 1
    close(dev.get(dev.to_full(dev.put(cores), n)), he.tt_to_full(cores, n), dtype)


def test_only_distinct_rows_are_computed_and_launches_are_tt_kernels():
    """Dedup: the chain runs over the distinct rows (the digits kernel gets
    one thread per distinct row), and every launch is a tt.cu kernel or the
    shared bag check."""
    be = gpu_emu.emu_backend()
    cores = he.tt_init(1000, [10, 10, 10], [2, 2, 2], [3, 3])
    idx = np.array([5, 7, 5, 5, 999, 7])
    seen = []
    launch = be.launch
    be.launch = lambda fam, name, n, args: (seen.append((fam, name, n)),
                                            launch(fam, name, n, args))[1]
    out = GT.bags(idx, [cores], np.array([0, 3, 6]), single=True, be=be)
    assert ("tt", "tt_digits", 3) in seen
    assert {f for f, _, _ in seen} <= {"tt", "bag"}
    W = he.tt_to_full(cores)
    close(out, np.stack([W[[5, 7, 5]].sum(0), W[[5, 999, 7]].sum(0)]), np.float32)


# ------------------------------------------------------------ dispatch and errors

class _FakeDeviceArray:
    """Looks like a CuPy array to the dispatcher (its type's module is cupy)."""
    __module__ = "cupy._core.core"


def test_mixing_host_and_device_arrays_is_a_type_error():
    cores = he.tt_init(100, [10, 10], [2, 2], [3])
    x, off = np.array([1, 2]), np.array([0, 2])
    fake = _FakeDeviceArray()
    with pytest.raises(TypeError, match=r"^indices: expected a cupy.ndarray like cores\[0\]"):
        he.tt_embedding_bag(x, [fake, fake], off)
    with pytest.raises(TypeError, match=r"^cores\[1\]: expected a cupy.ndarray like indices"):
        he.tt_embedding_bag(fake, [fake, cores[1]], fake)
    with pytest.raises(TypeError, match=r"^offsets: expected a cupy.ndarray like indices"):
        he.tt_embedding_bags(fake, [[fake, fake]], off)
    with pytest.raises(TypeError, match=r"^grad_output: expected a cupy.ndarray like indices"):
        he.tt_embedding_bag_backward(np.ones((1, 4), np.float32), fake, [fake, fake], fake)
    with pytest.raises(TypeError, match=r"^tables\[0\]\[0\]: expected a cupy.ndarray like "
                                        r"tables\[1\]\[0\]"):
        he.tt_embedding_bags_backward(None, None, [cores, [fake, fake]])
    with pytest.raises(TypeError, match=r"^cores\[0\]: expected a cupy.ndarray like cores\[1\]"):
        he.tt_to_full([cores[0], fake])


def _errors(b):
    """(description, call taking (put, api)) of bad inputs; api(name, *args, **kw)
    calls the public function or its GPU launcher."""
    idx, cores, off = b
    G = np.ones((2, 4), np.float32)
    other = he.tt_init(100, [10, 10], [2, 2], [5], seed=1)     # the same rows, ranks 5
    return [
        ("mode max", lambda P, api: api("fwd", P(idx), [P(cores)], P(off), mode="max")),
        ("weights with mean", lambda P, api: api("fwd", P(idx), [P(cores)], P(off), mode="mean",
                                                 per_sample_weights=P(np.ones(3, np.float32)))),
        ("index too large", lambda P, api: api("fwd", P(np.array([1, 2, 100])), [P(cores)],
                                               P(off))),
        ("index negative", lambda P, api: api("fwd", P(np.array([1, -2, 3])), [P(cores)],
                                              P(off))),
        ("num_embeddings", lambda P, api: api("fwd", P(np.array([1, 2, 60])), [P(cores)], P(off),
                                              num_embeddings=50)),
        ("decreasing offsets", lambda P, api: api("fwd", P(idx), [P(cores)],
                                                  P(np.array([0, 2, 1])))),
        ("offsets past the end", lambda P, api: api("fwd", P(idx), [P(cores)],
                                                    P(np.array([0, 2, 4])))),
        ("first offset", lambda P, api: api("fwd", P(idx), [P(cores)], P(np.array([1, 2, 3])))),
        ("float indices", lambda P, api: api("fwd", P(idx.astype(np.float32)), [P(cores)],
                                             P(off))),
        ("1-D without offsets", lambda P, api: api("fwd", P(idx), [P(cores)], None)),
        ("2-D with offsets", lambda P, api: api("fwd", P(idx.reshape(1, 3)), [P(cores)], P(off))),
        ("one core", lambda P, api: api("fwd", P(idx), [P(cores[:1])], P(off))),
        ("rank mismatch", lambda P, api: api("fwd", P(idx), [[P(cores[0]), P(cores[1][:, :2])]],
                                             P(off))),
        ("mixed core dtypes", lambda P, api: api("fwd", P(idx),
                                                 [[P(cores[0]), P(cores[1].astype(np.float64))]],
                                                 P(off))),
        ("grad shape", lambda P, api: api("bwd", P(np.ones((2, 3), np.float32)), P(idx),
                                          [P(cores)], P(off))),
        ("saved of other inputs", lambda P, api: api(
            "bwd", P(G), P(idx), [P(cores)], P(off),
            saved=api("fwd", P(idx[:2]), [P(cores)], P(np.array([0, 1, 2])),
                      return_saved=True)[1])),
        ("saved of other cores", lambda P, api: api(
            "bwd", P(G), P(idx), [P(other)], P(off),
            saved=api("fwd", P(idx), [P(cores)], P(off), return_saved=True)[1])),
        ("bad optimizer", lambda P, api: api("bwd", P(G), P(idx), [P(cores)], P(off),
                                             optimizer="sgd")),
        ("num_embeddings too large", lambda P, api: api("fwd", P(idx), [P(cores)], P(off),
                                                        num_embeddings=101)),
    ]


def test_bad_inputs_raise_what_the_cpu_raises(dev):
    """Every check is shared with the CPU path: same exception, same message."""
    cores = he.tt_init(100, [10, 10], [2, 2], [3])
    b = (np.array([1, 2, 3]), cores, np.array([0, 2, 3]))

    def cpu(name, *args, **kw):        # fwd: (idx, [cores], off); bwd: (g, idx, [cores], off)
        if name == "fwd":
            return he.tt_embedding_bag(args[0], args[1][0], args[2], **kw)
        return he.tt_embedding_bag_backward(args[0], args[1], args[2][0], args[3], **kw)

    def gpu(name, *args, **kw):
        if dev.be:
            fn = GT.bags if name == "fwd" else GT.bags_backward
            return fn(*args, single=True, be=dev.be, **kw)
        return cpu(name, *args, **kw)

    for what, call in _errors(b):
        with pytest.raises(Exception) as want:
            call(lambda a: a, cpu)
        with pytest.raises(Exception) as got:
            call(dev.put, gpu)
        # the GPU checks name an array's module ("cupy.ndarray of dtype ...")
        msg = re.sub(r"\b(numpy|cupy)\.ndarray of", "array of", str(got.value))
        assert (type(got.value), msg) == (type(want.value), str(want.value)), what


def test_saved_of_the_other_backend_is_a_type_error(dev):
    cores = he.tt_init(100, [10, 10], [2, 2], [3])
    idx, off = np.array([1, 2]), np.array([0, 2])
    _, saved = he.tt_embedding_bag(idx, cores, off, return_saved=True)
    with pytest.raises(TypeError, match="^saved: expected a TTSaved of a forward on the device"):
        dev.backward(dev.put(np.ones((1, 4), np.float32)), dev.put(idx), [dev.put(cores)],
                     dev.put(off), single=True, saved=saved)
    _, dsaved = dev.forward(dev.put(idx), [dev.put(cores)], dev.put(off), single=True,
                            return_saved=True)
    with pytest.raises(TypeError, match="^saved: expected a TTSaved of a forward on the host"):
        he.tt_embedding_bag_backward(np.ones((1, 4), np.float32), idx, cores, off, saved=dsaved)


def test_tt_bench_gpu_path_runs_on_the_emulator(capsys):
    """``python -m hashemb tt-bench --device gpu`` end to end at tiny sizes,
    its device calls on the emulator backend (the figures mean nothing here)."""
    from hashemb import tt_bench
    be = gpu_emu.emu_backend()
    res = tt_bench.main(["--device", "gpu", "--batch", "4", "--pooling", "3",
                         "--num-embeddings", "1000", "--p", "10,10,10", "--q", "2,2,2",
                         "--ranks", "3,3", "--iters", "2", "--warmup", "1", "--peak-size", "16",
                         "--no-progress"], be=be)
    out = capsys.readouterr().out
    assert [r[0] for r in res["rows"]] == ["TT fwd", "TT fwd+bwd (fused SGD)"]
    assert all(r[1] > 0 for r in res["rows"]) and 1 <= res["unique"] <= 12
    assert "torch column skipped" in out and "| TT fwd |" in out
    assert {"tt_step_fwd<float>", "tt_step_dG<float>", "tt_apply<float>"} <= set(be.launches)


def test_tt_bench_with_a_cache_on_skewed_lookups(capsys):
    """``--zipf`` and ``--cache-size``: the cached table's rows beside the plain
    one's, on the host and on the emulator backend's device path, with the
    share of lookups the cache served (a Zipf 3 draw is mostly its top rows)."""
    from hashemb import tt_bench
    args = ["--batch", "8", "--pooling", "4", "--num-embeddings", "1000", "--p", "10,10,10",
            "--q", "2,2,2", "--ranks", "3,3", "--iters", "3", "--warmup", "2",
            "--peak-size", "16", "--no-progress", "--no-torch", "--zipf", "3",
            "--cache-size", "8"]
    for extra, kw in (([], {}), (["--device", "gpu"], {"be": gpu_emu.emu_backend()})):
        res = tt_bench.main(args + extra, **kw)
        out = capsys.readouterr().out
        assert [r[0] for r in res["rows"]] == [
            "TT fwd", "TT fwd+bwd (fused SGD)", "TT + cache (8 rows) fwd",
            "TT + cache (8 rows) fwd+bwd (fused SGD)"]
        share = float(re.search(r"served ([0-9.]+)% of the lookups", out).group(1))
        assert 60 < share <= 100
    assert {"tt_cache_find", "tt_cache_insert"} <= set(kw["be"].launches)
    with pytest.raises(SystemExit):
        tt_bench.main(args + ["--warmup", "0"])
    assert "expected --warmup >= 1" in capsys.readouterr().err


def test_tt_bench_on_the_cpu_with_torch_beside_it(capsys):
    """The default CPU command (torch's full table beside the TT table)."""
    pytest.importorskip("torch")
    from hashemb import tt_bench
    res = tt_bench.main(["--batch", "8", "--pooling", "4", "--num-embeddings", "1000",
                         "--p", "10,10,10", "--q", "2,2,2", "--ranks", "3,3", "--iters", "2",
                         "--warmup", "1", "--peak-size", "16", "--no-progress",
                         "--cache-size", "4"])
    assert [r[0] for r in res["rows"]] == [
        "TT fwd", "TT fwd+bwd (fused SGD)", "TT + cache (4 rows) fwd",
        "TT + cache (4 rows) fwd+bwd (fused SGD)", "torch EmbeddingBag fwd",
        "torch EmbeddingBag fwd+bwd+SGD (sparse)"]
    assert all(r[1] > 0 for r in res["rows"])
    assert "| torch EmbeddingBag fwd |" in capsys.readouterr().out


def test_chunk_size_targets_the_thread_count():
    assert GT._chunk(10240, 4 * 128) == GT.MAX_CHUNK        # FBTT's first step: wide enough
    assert GT._chunk(10240, 4 * 4) == 1                      # last step, N = q = 4
    assert GT._chunk(10240, 128) == 10                       # core 0, S = q0 R1 = 128
    assert GT._chunk(3, 1) == 1


@pytest.mark.parametrize("opt", [None, "sgd", "adagrad"])
def test_device_torch_tt_modules_on_cuda_tensors(opt):
    """TTEmbeddingBag(Collection) moved to CUDA: forward, core gradients,
    per-sample-weight gradients and fused updates equal the CPU module's."""
    torch = gpu_emu.torch_cuda()
    from hashemb.torch import TTEmbeddingBag, TTEmbeddingBagCollection
    kw = dict(dtype=torch.float64, seed=3, sparse=opt is not None, optimizer=opt or "sgd",
              learning_rate=0.05)
    cpu = TTEmbeddingBag(500, 6, [3, 4], **kw)
    gpu = TTEmbeddingBag(500, 6, [3, 4], **kw).cuda()
    rng = np.random.default_rng(0)
    idx = torch.from_numpy(rng.integers(0, 500, 40))
    off = torch.tensor([0, 5, 5, 17, 40])
    for _ in range(2):
        psw_c = torch.rand(40, dtype=torch.float64, requires_grad=True)
        psw_g = psw_c.detach().cuda().requires_grad_()
        G = torch.randn(4, 6, dtype=torch.float64)
        oc, og = cpu(idx, off, psw_c), gpu(idx.cuda(), off.cuda(), psw_g)
        assert og.is_cuda
        torch.testing.assert_close(og.cpu(), oc, rtol=1e-12, atol=1e-12)
        (oc * G).sum().backward()
        (og * G.cuda()).sum().backward()
        torch.testing.assert_close(psw_g.grad.cpu(), psw_c.grad, rtol=1e-10, atol=1e-12)
        for a, b in zip(cpu.tt_cores, gpu.tt_cores):
            torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-10, atol=1e-12)
            if opt is None:
                torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gpu.full_weight().cpu(), cpu.full_weight(), rtol=1e-10, atol=1e-12)
    coll = TTEmbeddingBagCollection([300, 40], 8, [4, 4]).cuda()
    x = torch.stack([torch.randint(0, 300, (16,)), torch.randint(0, 40, (16,))], 1).cuda()
    ref = torch.cat([W[x[:, t]] for t, W in enumerate(coll.full_weights())], 1)
    torch.testing.assert_close(coll(x), ref, rtol=1e-5, atol=1e-6)


def _runs_reference(srt, chunk):
    """(cs, cv, gc, gv, run of each position) by walking the sorted keys."""
    cs, cv, gc, gv, run = [], [], [], [], []
    p, L = 0, len(srt)
    while p < L:
        q = p
        while q < L and srt[q] == srt[p]:
            q += 1
        gc.append(len(cs))
        gv.append(srt[p])
        for c0 in range(p, q, chunk):
            cs.append(c0)
            cv.append(srt[p])
        run += [len(gv) - 1] * (q - p)
        p = q
    gc.append(len(cs))
    cs.append(L)
    return cs, cv, gc, gv, run


@FIXTURE
@given(keys=st.lists(st.integers(-3, 6), max_size=40), chunk=st.integers(1, 50))
def test_runs_of_sorted_keys(dev, keys, chunk):
    """_runs (tt_runs_flags, a scan, tt_runs_scatter): the chunks and runs of
    sorted keys and, given the sort's permutation, each entry's run."""
    be = dev.be or GT.RT.backend()
    x = np.array(keys, np.int64)
    order = np.argsort(x, kind="stable")
    cs, cv, gc, gv, run = _runs_reference(x[order], chunk)
    got = GT._runs(be, dev.put(x[order]), chunk, dev.put(order))
    for g, w in zip(got[:4], (cs, cv, gc, gv)):
        np.testing.assert_array_equal(dev.get(g), np.array(w, np.int64))
    inv = np.empty(len(x), np.int64)
    inv[order] = run
    np.testing.assert_array_equal(dev.get(got[4]), inv)
    assert GT._runs(be, dev.put(x[order]), chunk)[4] is None


def test_saved_of_other_table_boundaries_is_a_value_error(dev):
    """A saved whose tables held other entries read the bags' arrays past
    their ends (an ASan heap overflow on the CPU, wrong gradients on the
    emulator): its table boundaries are compared with the offsets'."""
    t0, t1 = he.tt_init(100, [10, 10], [2, 2], [3]), he.tt_init(100, [10, 10], [2, 2], [3], seed=1)
    idx = np.arange(1, 9)
    msg = r"^saved: expected the forward of these offsets \(table 0: entries 0 to 7\), " \
          r"got one of entries 0 to 1$"
    for xp_put, fwd, bwd in ((lambda a: a, he.tt_embedding_bags, he.tt_embedding_bags_backward),
                             (dev.put, dev.forward, dev.backward)):
        tables = [xp_put(t0), xp_put(t1)]
        out, saved = fwd(xp_put(idx), tables, xp_put(np.array([0, 1, 8])), return_saved=True)
        with pytest.raises(ValueError, match=msg):
            bwd(out * 0 + 1, xp_put(idx), tables, xp_put(np.array([0, 7, 8])), saved=saved)
        # the same boundaries, other bags inside them: the saved holds per-entry
        # products, so the gradient is that of a fresh forward
        got = bwd(out * 0 + 1, xp_put(idx), tables, xp_put(np.array([0, 1, 8])), saved=saved)
        want = bwd(out * 0 + 1, xp_put(idx), tables, xp_put(np.array([0, 1, 8])))
        for a, b in zip(got, want):
            for x, y in zip(a, b):
                np.testing.assert_allclose(dev.get(x), dev.get(y), rtol=1e-6)
