import os
import platform
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

import hashemb as he
import fuzzing
import ml_dtypes
from hashemb._backend import kernels
from reference import bag_backward, bag_forward, sign, slots_signs


def make_scheme(kind, dim, seed, ntables=3):
    if kind == "robe":
        return he.RobeZ(97, dim, block=max(1, dim // 2), seed=seed)
    if kind == "robe-signed":
        return he.RobeZ(61, dim, block=dim, seed=seed, signed=True)
    if kind == "robe-wide":
        return he.RobeZ(53, dim, block=2 * dim, seed=seed, wrap=seed % 2 == 0)
    if kind == "hnet":
        return he.HashedNet(40, dim, seed=seed, signed=seed % 2 == 0)
    if kind == "hnet-ref":
        return he.HashedNet.reference(45, dim)
    if kind == "robe-ref":
        return he.RobeZ.reference(70, dim, block=dim, table_sizes=[9] * ntables)
    return he.FullTable([9, 5, 7][:ntables], dim)


KINDS = ["robe", "robe-signed", "robe-wide", "hnet", "hnet-ref", "robe-ref", "full"]


@st.composite
def batches(draw, multi=False):
    kind = draw(st.sampled_from(KINDS))
    dim = draw(st.sampled_from([1, 2, 4, 6, 8]))
    T = draw(st.integers(1, 3)) if multi else 1
    scheme = make_scheme(kind, dim, draw(st.integers(0, 9)), ntables=3)
    table0 = 0 if multi else draw(st.integers(0, 2))
    B = draw(st.integers(0, 6))
    hi = 5 if kind in ("full", "robe-ref") else 2**40
    sizes = draw(st.lists(st.integers(0, 4), min_size=T * B, max_size=T * B))
    idx = np.array(draw(st.lists(st.integers(0, hi - 1), min_size=sum(sizes),
                                 max_size=sum(sizes))), dtype=np.int64)
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    mode = draw(st.sampled_from(["sum", "mean", "max"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    psw = None
    if mode == "sum" and draw(st.booleans()):
        psw = np.array(draw(st.lists(st.floats(-2, 2), min_size=len(idx), max_size=len(idx))),
                       dtype)
    pad = None
    if not multi and len(idx) and draw(st.booleans()):
        pad = int(idx[0])
    M = np.random.default_rng(draw(st.integers(0, 99))).standard_normal(scheme.size).astype(dtype)
    if draw(st.booleans()) and (len(idx) == 0 or idx.max() < 2**31):
        idx = idx.astype(np.int32)
    return scheme, idx, off, M, T, table0, mode, psw, pad, B


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)


@given(batches())
def test_embedding_bag_matches_reference(b):
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    out = he.embedding_bag(idx, M, off[:-1], scheme=scheme, table=table0, mode=mode,
                           per_sample_weights=psw, padding_idx=pad)
    want = bag_forward(scheme, idx, off, M, 1, table0, mode, psw, pad)
    assert out.shape == (B, scheme.dim) and out.dtype == M.dtype
    np.testing.assert_allclose(out, want, **tol(M.dtype))
    # include_last_offset gives the same
    out2 = he.embedding_bag(idx, M, off, scheme=scheme, table=table0, mode=mode,
                            per_sample_weights=psw, padding_idx=pad, include_last_offset=True)
    np.testing.assert_array_equal(out, out2)


@given(batches(multi=True))
def test_embedding_bags_matches_reference(b):
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    out = he.embedding_bags(idx, M, off, scheme=scheme, num_tables=T, mode=mode,
                            per_sample_weights=psw)
    want = bag_forward(scheme, idx, off, M, T, 0, mode, psw)
    assert out.shape == (B, T * scheme.dim)
    np.testing.assert_allclose(out, want, **tol(M.dtype))


@given(batches(multi=True), st.integers(0, 99))
def test_backward_matches_reference_and_is_adjoint(b, gseed):
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    G = np.random.default_rng(gseed).standard_normal((B, T * scheme.dim)).astype(M.dtype)
    grad = he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                      per_sample_weights=psw, weight=M)
    assert grad.shape == M.shape and grad.dtype == M.dtype
    want = bag_backward(scheme, idx, off, G.astype(np.float64), T, M, 0, mode, psw)
    np.testing.assert_allclose(grad.reshape(-1), want, **tol(M.dtype))
    if mode != "max":
        # <forward(w), g> == <w, backward(g)>: forward is linear in w
        out = he.embedding_bags(idx, M, off, scheme=scheme, num_tables=T, mode=mode,
                                per_sample_weights=psw)
        lhs = float((out.astype(np.float64) * G).sum())
        rhs = float((M.astype(np.float64) * grad.reshape(-1)).sum())
        assert abs(lhs - rhs) <= 1e-4 * (1 + abs(lhs))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("scheme", [he.RobeZ(1009, 200, block=100, seed=4, signed=True),
                                    he.RobeZ(150, 136, block=136, seed=1, signed=True),
                                    he.HashedNet(301, 70, seed=2, signed=True),
                                    he.HashedNet(301, 16, seed=3, signed=True)], ids=repr)
def test_signed_runs_longer_than_a_sign_chunk(scheme, mode):
    """Signed runs of more than 64 elements (the kernels take a run's signs
    64 at a time), contiguous and wrapping past the array's end, forward and
    backward against the reference; signs() against the reference too.
    Signed element-wise rows: of more than 64 runs, and of fewer (whose
    signs the kernels take a row at a time), with per-sample weights."""
    rng = np.random.default_rng(7)
    T, B = 2, 40
    sizes = rng.integers(0, 4, T * B)
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    idx = rng.integers(0, 10**6, off[-1])
    M = rng.standard_normal(scheme.size).astype(np.float64)
    psw = rng.random(off[-1]) if mode == "sum" else None
    out = he.embedding_bags(idx, M, off, scheme=scheme, num_tables=T, mode=mode,
                            per_sample_weights=psw)
    np.testing.assert_allclose(out, bag_forward(scheme, idx, off, M, T, 0, mode, psw),
                               rtol=1e-12, atol=1e-12)
    G = rng.standard_normal(out.shape)
    grad = he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                      per_sample_weights=psw, weight=M)
    np.testing.assert_allclose(grad, bag_backward(scheme, idx, off, G, T, M, 0, mode, psw),
                               rtol=1e-12, atol=1e-12)
    tok = idx[:20]
    np.testing.assert_array_equal(scheme.signs(tok, table=1),
                                  [[sign(scheme, 1, int(x), i) for i in range(scheme.dim)]
                                   for x in tok])


@given(dim=st.sampled_from([1, 3, 8, 12, 16, 24, 33, 64, 65]), rows=st.integers(1, 70),
       seed=st.integers(0, 2**64 - 1), wide=st.booleans(),
       dtype=st.sampled_from(["float32", "float64", "float16", "bfloat16"]),
       wraps=st.booleans(), hnet=st.booleans(), tables=st.integers(1, 3))
def test_signed_rows_many_at_once(dim, rows, seed, wide, dtype, wraps, hnet, tables):
    """Signed rows take their signs many at once (he_sign_rows: four rows a
    step stepped through the sign cubic by forward differences where D <= 64,
    a row at a time past it, tails of 1-3 rows, 32 rows a batch): one entry
    a bag (rows of one run: times their signs straight from the array, or
    through the general loop where a row wraps), bags of several entries,
    the backward, and signs() with its tables changing inside a batch, all
    against the reference; float32, float64 and 16-bit arrays (pooled in
    float32: the C sums multiply by the signs)."""
    if hnet:
        scheme = he.HashedNet(97, dim, seed=seed, signed=True)
    else:
        # a small array: rows wrap past its end (the general loop's rows)
        scheme = he.RobeZ(dim + 3 if wraps else 100_003, dim, block=dim, seed=seed,
                          signed=True)
    rng = np.random.default_rng(seed % 2**32)
    x = rng.integers(-2**31, 2**31, (rows, tables)).astype(np.int64 if wide else np.int32)
    M = rng.standard_normal(scheme.size).astype(ml_dtypes.bfloat16 if dtype == "bfloat16"
                                                else dtype)
    pooled = np.float64 if dtype == "float64" else np.float32
    idx = x.T.reshape(-1)
    off = np.arange(rows * tables + 1, dtype=np.int64)
    want = bag_forward(scheme, idx.astype(np.int64), off, M.astype(np.float64), tables)
    out = he.embedding_bags(x, M, scheme=scheme, num_tables=tables)
    np.testing.assert_array_equal(out, want.astype(pooled))    # a sign times a float: exact
    # bags of up to 40 entries
    sizes = rng.integers(0, 41, max(1, rows // 8) * tables)
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    idx = rng.integers(0, 10**9, off[-1]).astype(x.dtype)
    got = he.embedding_bags(idx, M, off, scheme=scheme, num_tables=tables)
    np.testing.assert_allclose(got, bag_forward(scheme, idx.astype(np.int64), off,
                                                M.astype(np.float64), tables),
                               rtol=1e-5, atol=1e-5)
    tok, tab = x[:, 0].astype(np.int64), rng.integers(0, tables, rows)
    sgn = np.empty((rows, dim), np.float32)
    kernels().signs(scheme._view, tok, tab, sgn)
    np.testing.assert_array_equal(sgn, slots_signs(scheme, tok, tab)[1])
    if dtype in ("float16", "bfloat16"):
        return
    G = rng.standard_normal(got.shape).astype(M.dtype)
    grad = he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=tables, weight=M)
    np.testing.assert_allclose(grad, bag_backward(scheme, idx.astype(np.int64), off,
                                                  G.astype(np.float64), tables),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("scheme", [he.RobeZ(1000, 16, block=16, seed=3, signed=True),
                                    he.RobeZ(1000, 16, block=8, seed=3, signed=True),
                                    he.RobeZ(1000, 16, block=4, seed=3, signed=True),
                                    he.RobeZ(1000, 24, block=2, seed=3, signed=True),
                                    he.HashedNet(97, 16, seed=3, signed=True),
                                    he.HashedNet(97, 24, seed=3, signed=True),
                                    he.HashedNet(97, 12, seed=3, signed=True)], ids=repr)
def test_signed_bags_each_sums_path(scheme, mode, dtype):
    """Signed multi-hot bags in every path of the segment loop: the C sums
    with signs (rows of one run, runs of 8, HashedNet's gathered floats at D
    = 16 and 24, 16-bit arrays) and the loop that multiplies in Cython (runs
    of 4 or 2, D = 12 element-wise: the sums there take no signs), with
    per-sample weights and empty bags, against the reference."""
    rng = np.random.default_rng(11)
    T = 2
    off = np.concatenate([[0], np.cumsum(rng.integers(0, 41, 30 * T))]).astype(np.int64)
    idx = rng.integers(0, 10**9, off[-1])
    M = rng.standard_normal(scheme.size).astype(ml_dtypes.bfloat16 if dtype == "bfloat16"
                                                else dtype)
    psw = rng.random(off[-1]).astype(np.float32) if mode == "sum" else None
    got = he.embedding_bags(idx, M, off, scheme=scheme, num_tables=T, mode=mode,
                            per_sample_weights=psw)
    np.testing.assert_allclose(got, bag_forward(scheme, idx, off, M.astype(np.float64), T, 0,
                                                mode, psw), rtol=1e-5, atol=1e-5)


@given(batches(), st.integers(0, 99))
def test_single_table_backward(b, gseed):
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    G = np.random.default_rng(gseed).standard_normal((B, scheme.dim))
    grad = he.embedding_bag_backward(G, idx, off[:-1], scheme=scheme, table=table0, mode=mode,
                                     per_sample_weights=psw, padding_idx=pad, weight=M)
    want = bag_backward(scheme, idx, off, G, 1, M, table0, mode, psw, pad)
    np.testing.assert_allclose(grad.reshape(-1), want, **tol(M.dtype))


@given(batches(multi=True), st.integers(0, 99), st.sampled_from(["sgd", "adagrad"]))
def test_fused_optimizer_equals_backward_then_update(b, gseed, opt):
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    G = np.random.default_rng(gseed).standard_normal((B, T * scheme.dim)).astype(M.dtype)
    grad = he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                      per_sample_weights=psw, weight=M).reshape(-1)
    W = M.copy()
    lr, eps = 0.1, 1e-3
    optimizer = he.SGD(lr) if opt == "sgd" else he.Adagrad(lr, eps=eps)
    for step in range(2):   # Adagrad's state carries over between calls
        assert he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                          per_sample_weights=psw, weight=W,
                                          optimizer=optimizer) is None
    want = M.astype(np.float64)
    if opt == "sgd":
        want = want - 2 * lr * grad
    else:
        s = np.zeros_like(want)
        for _ in range(2):
            s += grad.astype(np.float64) ** 2
            want = want - np.where(grad != 0, lr * grad / (np.sqrt(s) + eps), 0)
    if mode == "max":       # the second step's maxima can move: check one step only
        return
    np.testing.assert_allclose(W, want, rtol=1e-4, atol=1e-4)


def adagrad_model(W, state, grad, lr, eps):
    """hashemb.Adagrad's float32 step from the summed gradient, in NumPy:
    where g != 0, s += g*g in float32; the step lr*g (float32) over
    sqrt(s) + eps in float64; the weight moved in float64, rounded once."""
    g = grad.reshape(-1)
    hit = g != 0
    state[hit] = state[hit] + g[hit] * g[hit]
    step = (np.float32(lr) * g[hit]).astype(np.float64) / (
        np.sqrt(state[hit].astype(np.float64)) + float(np.float32(eps)))
    flat = W.reshape(-1)
    flat[hit] = (flat[hit].astype(np.float64) - step).astype(np.float32)


@pytest.mark.parametrize("scheme", [he.RobeZ(4099, 16, block=16), he.HashedNet(3001, 8),
                                    he.RobeZ(100_003, 8, block=4),
                                    he.RobeZ(100_003, 8, block=4, signed=True),
                                    he.FullTable([20_000, 7_001], 16)],
                         ids=["robe-sweep", "hashednet", "robe-walk", "robe-signed-walk",
                              "full-rows"])
def test_float32_adagrad_step_is_the_model_bit_for_bit(scheme):
    # the apply runs eight slots a step where the machine can (AVX2) and the
    # rest one at a time: either way each slot's step is the model's, over
    # three calls (the state carries over), through the scratch sweep, the
    # walk and a full table's per-row sums; steps large next to the weights
    rng = np.random.default_rng(0)
    T, B = 2, 300
    x = rng.integers(0, 7_001, (B, T))
    x[::4] = x[1]
    W = (rng.standard_normal(scheme.size) * 0.01).astype(np.float32)
    opt = he.Adagrad(0.7, eps=1e-6)
    Wm, state = W.copy(), np.zeros(scheme.size, np.float32)
    for step in range(3):
        G = rng.standard_normal((B, T * scheme.dim)).astype(np.float32) * 10.0 ** (step - 1)
        grad = he.embedding_bags_backward(G, x, scheme=scheme, num_tables=T, weight=Wm)
        adagrad_model(Wm, state, grad, opt.lr, opt.eps)
        he.embedding_bags_backward(G, x, scheme=scheme, num_tables=T, weight=W, optimizer=opt)
        assert np.array_equal(W.view(np.uint32), Wm.view(np.uint32)), step
    np.testing.assert_array_equal(opt.state_for(W)[0], state)


@pytest.mark.parametrize("make", [lambda: he.Adagrad(0.1),
                                  lambda: he.SGD(0.1, stochastic_rounding=False)],
                         ids=["adagrad", "sgd-float16-scratch"])
def test_optimizer_state_dies_with_its_weight(make):
    """State is keyed by address; a freed weight's entry is dropped, so a
    new array that the allocator puts at the same address starts from zeros
    (it took the old accumulator before: 19 of 20 new weights here), and a
    live weight, or a view of it, keeps its state."""
    robe = he.RobeZ(1 << 16, 16)
    g, x = np.ones((4, 16), np.float32), np.arange(1, 5).reshape(4, 1)
    opt = make()
    dtype = np.float16 if isinstance(opt, he.SGD) else np.float32
    for i in range(20):
        W = robe.init_weight(seed=i, dtype=dtype)
        fresh = W.copy()
        he.embedding_bag_backward(g, x, scheme=robe, weight=W, optimizer=opt)
        he.embedding_bag_backward(g, x, scheme=robe, weight=fresh, optimizer=make())
        np.testing.assert_array_equal(W, fresh)
        del W, fresh
    # (glibc reuses the address almost every time; ASan's quarantine never does)
    assert len(getattr(opt, "state", {})) == 0 and len(opt._scratch) == 0
    W = robe.init_weight(dtype=dtype)
    ref, twin = W.copy(), make()
    for view in (W, W[:], W):
        he.embedding_bag_backward(g, x, scheme=robe, weight=view, optimizer=opt)
        he.embedding_bag_backward(g, x, scheme=robe, weight=ref, optimizer=twin)
        np.testing.assert_array_equal(W, ref)


def test_optimizers_leave_no_finalizers_on_a_weight_they_outlived():
    # each optimizer put a finalizer on the weight and none was detached when
    # the optimizer died: 1.3 KB a step for a new optimizer per step, until
    # the weight was freed
    import weakref
    robe = he.RobeZ(1 << 12, 16)
    g, x = np.ones((4, 16), np.float32), np.arange(1, 5).reshape(4, 1)
    W = robe.init_weight()
    before = len(weakref.finalize._registry)
    for _ in range(200):
        he.embedding_bag_backward(g, x, scheme=robe, weight=W, optimizer=he.Adagrad(0.1))
    assert len(weakref.finalize._registry) == before
    kept = he.Adagrad(0.1)
    he.embedding_bag_backward(g, x, scheme=robe, weight=W, optimizer=kept)
    assert len(weakref.finalize._registry) == before + 2 and len(kept.state) == 1
    del W
    assert len(kept.state) == 0 and len(weakref.finalize._registry) == before


@pytest.mark.skipif(platform.machine() != "x86_64" or sys.maxsize < 2**32
                    or not os.path.exists("/proc/cpuinfo"),
                    reason="a 64-bit build on Linux x86-64, which lists the CPU's flags")
def test_write_prefetch_follows_the_cpu():
    # Linux calls CPUID 0x80000001 ECX bit 8 (PRFCHW, prefetchw) "3dnowprefetch".
    # On Intel it copies the bit; on AMD it also sets the flag for any 64-bit
    # part (K8 had prefetchw without the bit), so there only the flag follows
    # from the kernels' choice. A wrong bit would run prefetchw where it may
    # not exist, or never.
    with open("/proc/cpuinfo") as f:
        info = {}
        for line in f:
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.split())
    ours, linux = "prefetchw" in kernels().simd_paths(), "3dnowprefetch" in info["flags"]
    if info.get("vendor_id") == ["GenuineIntel"]:
        assert ours == linux
    else:
        assert linux or not ours


def test_two_d_input_and_dtypes():
    robe = he.RobeZ(1000, 8, block=4)
    M = robe.init_weight(seed=1)
    x = np.array([[1, 2, 3], [4, 5, 6]])
    a = he.embedding_bag(x, M, scheme=robe)
    b = he.embedding_bag(x.reshape(-1).astype(np.int32), M, np.array([0, 3], np.int32), scheme=robe)
    np.testing.assert_array_equal(a, b)
    # non-contiguous input
    xs = np.array([[1, 9, 2, 9, 3], [4, 9, 5, 9, 6]])[:, ::2]
    np.testing.assert_array_equal(he.embedding_bag(xs, M, scheme=robe), a)
    # uint64 tokens are their bit pattern
    big = np.array([2**63 + 5], np.uint64)
    c = he.embedding_bag(big, M, np.array([0]), scheme=robe)
    d = he.embedding_bag(big.view(np.int64), M, np.array([0]), scheme=robe)
    np.testing.assert_array_equal(c, d)


@given(st.integers(0, 300), st.integers(1, 40), st.sampled_from([np.int32, np.int64]))
def test_feature_major_copy_is_the_transpose(B, T, dtype):
    """2-D (B, T) input reaches the kernels in table-major order through a
    blocked parallel copy; it equals NumPy's transpose, on one thread and
    on several (above 1 MB), and checks its output's length."""
    from hashemb._cpu import _bag
    for b in (B, 9000 if T <= 20 else B):           # 9000 x >= 15 int64: > 1 MB
        x = np.random.default_rng(B + T).integers(-2**31, 2**31, (b, T)).astype(dtype)
        out = np.empty(b * T, dtype)
        _bag.feature_major(x, out)
        np.testing.assert_array_equal(out, np.ascontiguousarray(x.T).reshape(-1))
    with pytest.raises(ValueError, match="^out: expected"):
        _bag.feature_major(np.zeros((2, 3), dtype), np.empty(5, dtype))


def test_two_d_offsets_are_kept_read_only_and_bounded():
    """2-D input's offsets are made once per shape (read only: no kernel
    may write them), the two latest kept, a huge one never."""
    from hashemb import _validate as V
    a = V._even_offsets(11, 3)
    assert a is V._even_offsets(11, 3) and not a.flags.writeable
    np.testing.assert_array_equal(a, np.arange(0, 31, 3))
    V._even_offsets(7, 1)
    V._even_offsets(9, 2)
    assert len(V._EVEN) == 2 and (11, 3) not in V._EVEN
    big = V._even_offsets((1 << 21) + 1, 1)
    assert big[-1] == 1 << 21 and ((1 << 21) + 1, 1) not in V._EVEN


def test_multi_table_2d_input_is_one_index_per_table():
    robe = he.RobeZ(5000, 16, block=16)
    M = robe.init_weight()
    X = np.random.default_rng(0).integers(0, 10**9, size=(37, 26))
    out = he.embedding_bags(X, M, scheme=robe, num_tables=26)
    for t in (0, 7, 25):
        col = he.embedding_bag(X[:, t:t + 1], M, scheme=robe, table=t)
        np.testing.assert_array_equal(out[:, t * 16:(t + 1) * 16], col)


def test_large_batch_fast_path_matches_general_path():
    # one index per bag takes the prefetching copy path; with per-sample
    # weights the segment loop (_seg_bags), whose w * row is one rounding:
    # both must agree exactly
    for scheme in (he.RobeZ(3001, 16, block=16), he.RobeZ(3001, 16, block=4),
                   he.RobeZ(3001, 8, block=32), he.FullTable([50] * 4, 16),
                   he.HashedNet(3001, 16)):
        M = scheme.init_weight(seed=2)
        hi = 50 if isinstance(scheme, he.FullTable) else 10**12
        X = np.random.default_rng(1).integers(0, hi, size=(1000, 4))
        w = np.random.default_rng(2).standard_normal(X.shape).astype(np.float32)
        a = he.embedding_bags(X, M, scheme=scheme, num_tables=4)
        b = he.embedding_bags(X, M, scheme=scheme, num_tables=4, per_sample_weights=w)
        np.testing.assert_array_equal(b, a * np.repeat(w, scheme.dim, axis=1))


@pytest.mark.parametrize("scheme", [
    he.RobeZ.reference(3001, 16, block=4, table_sizes=[50] * 4),   # rows hashed one by one
    he.RobeZ.reference(3001, 16, block=16, table_sizes=[50] * 4),
    he.HashedNet.reference(3001, 8), he.RobeZ(3001, 16, block=4), he.RobeZ(3001, 16, block=8),
    he.RobeZ(3001, 8, block=32), he.HashedNet(3001, 16), he.FullTable([50] * 4, 16)], ids=repr)
def test_one_entry_bags_of_many_tables_match_slots(scheme):
    """Bags of one entry each over 4 tables (the offset-free pipeline: its
    row hashing is set up per table), against the rows that slots() gives;
    the backward's plain gradient against np.add.at over the same slots."""
    rng = np.random.default_rng(4)
    T, D = 4, scheme.dim
    X = rng.integers(0, 50, size=(1000, T))
    M = scheme.init_weight(seed=1)
    out = he.embedding_bags(X, M, scheme=scheme, num_tables=T)
    G = rng.standard_normal(out.shape).astype(np.float32)
    want = np.zeros(M.size, np.float64)
    for t in range(T):
        sl = scheme.slots(X[:, t], table=t)
        np.testing.assert_array_equal(out[:, t * D:(t + 1) * D], M.reshape(-1)[sl])
        np.add.at(want, sl.reshape(-1), G[:, t * D:(t + 1) * D].reshape(-1))
    grad = he.embedding_bags_backward(G, X, scheme=scheme, num_tables=T)
    np.testing.assert_allclose(grad.reshape(-1), want, rtol=1e-5, atol=1e-4)


def fold_edge_tokens(scheme, table, P=(1 << 61) - 1):
    """int64 tokens whose ROBE-Z row hash (A e + B u + D0) mod P is 0 .. 7,
    each residue in every 64-bit representative u + j P: the values at
    which a lazily reduced sum needs its last conditional subtraction."""
    A, B, _, D0 = (int(v) for v in scheme.hash.coef[:4])
    inv = pow(B, P - 2, P)
    out = []
    for r in range(8):
        u = (r - A * table - D0) * inv % P
        out += [u + j * P for j in range(9) if u + j * P < 1 << 64]
    return np.array(out, np.uint64).view(np.int64)


def base_tokens(scheme, table, bases, P=(1 << 61) - 1):
    """Tokens whose ROBE-Z row hash (A e + B u + D0) mod P is each of bases."""
    A, B, _, D0 = (int(v) for v in scheme.hash.coef[:4])
    inv = pow(B, P - 2, P)
    return np.array([(b - A * table - D0) * inv % P for b in bases], np.int64)


@pytest.mark.parametrize("scheme", [he.HashedNet(1009, 6, seed=2),
                                    he.RobeZ(1009, 20, block=4, seed=3),
                                    he.RobeZ(2**40 + 15, 16, block=2, seed=4),
                                    he.RobeZ(1000, 16, block=4, seed=5, wrap=False)],
                         ids=repr)
def test_run_starts_at_the_wrap_of_P(scheme):
    # rows of several runs take their run starts from residues (one division a
    # row, he_robe_run_start; four at a time with AVX2, then a scalar tail):
    # rows whose hash plus a run's coefficient lands on P - 1, P and P + 1,
    # where the sum wraps, and on 0 and P - 1, against the reference
    from reference import slot
    P = (1 << 61) - 1
    rc = [int(c) for c in scheme._run_coef[:scheme.dim // scheme.block]]
    bases = [0, 1, P - 1] + [(P + d - c) % P for c in rc for d in (-1, 0, 1)]
    for t in range(2):
        x = base_tokens(scheme, t, bases)
        want = [[slot(scheme, t, int(v), i) for i in range(scheme.dim)] for v in x]
        assert (scheme.slots(x, table=t) == want).all()
    if scheme.size > 10**6:
        return          # (no array of 2^40 floats: the slots above are the check)
    X = np.stack([base_tokens(scheme, t, bases) for t in range(2)], 1)
    M = scheme.init_weight(seed=1)
    want = [[M[slot(scheme, t, int(X[b, t]), i)] for t in range(2) for i in range(scheme.dim)]
            for b in range(len(X))]
    np.testing.assert_array_equal(he.embedding_bags(X, M, scheme=scheme, num_tables=2), want)


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_one_entry_rows_of_one_run_take_any_token(dtype):
    # one-entry bags of one-run rows hash a table's tokens in one pass (four
    # at a time with AVX2; Z > D: the block x div Z/D hashed, x mod Z/D the
    # row in it, past the array's end wrapping): every 64-bit token, int32
    # ones sign-extended as slots() takes them, and the hash's fold edges,
    # against the reference
    from reference import slot
    rng = np.random.default_rng(5)
    for scheme in (he.RobeZ(1009, 8, block=8, seed=3), he.RobeZ(1009, 8, block=16, seed=4),
                   he.RobeZ(101, 8, block=32, seed=6)):
        M = scheme.init_weight(seed=1)
        info = np.iinfo(dtype)
        cols = [np.concatenate([[info.min, info.min + 1, -1, 0, 1, info.max],
                                rng.integers(info.min, info.max, 30, dtype=dtype)])
                for _ in range(2)]
        if dtype == np.int64:
            rows = scheme.block // scheme.dim
            # blocks whose hash is at a fold edge: their first and last rows
            edges = [np.array([u * rows + j for u in fold_edge_tokens(scheme, t).view(np.uint64)
                               .astype(object) for j in (0, rows - 1) if u * rows + j < 1 << 64],
                              np.uint64).view(np.int64) for t in range(2)]
            cols = [np.concatenate([c, e]) for c, e in zip(cols, edges)]
            for t, c in enumerate(cols):        # the scalar hash (slots() of one-run rows)
                assert (scheme.slots(c, table=t) ==
                        [[slot(scheme, t, int(x), i) for i in range(8)] for x in c]).all()
        n = min(len(c) for c in cols)
        X = np.stack([c[:n] for c in cols], 1).astype(dtype)
        out, saved = he.embedding_bags(X, M, scheme=scheme, num_tables=2, return_saved=True)
        want = [[M[slot(scheme, t, int(X[b, t]), i)] for t in range(2) for i in range(8)]
                for b in range(n)]
        np.testing.assert_array_equal(out, want)
        # the run starts backward takes over: each row's first slot (below size)
        assert (saved.starts == [slot(scheme, t, int(X[b, t]), 0)
                                 for t in range(2) for b in range(n)]).all()
        # batches of 3 hash one token at a time (the scalar he_one_run_start)
        np.testing.assert_array_equal(
            np.concatenate([he.embedding_bags(X[b:b + 3], M, scheme=scheme, num_tables=2)
                            for b in range(0, n, 3)]), want)


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("scheme", [he.RobeZ(37, 8, block=8, seed=2),        # most rows wrap
                                    he.RobeZ(41, 8, block=16, seed=3),
                                    he.FullTable([9, 5], 8)], ids=repr)
def test_one_entry_rows_of_one_run_backward(scheme, mode):
    # one-entry bags of one-run rows take one walk over the run starts
    # (_add_one_runs): the reference gradient, per-sample weights and runs
    # that wrap past the array's end included, and the fused SGD step
    rng = np.random.default_rng(7)
    B, T = 40, 2
    hi = 5 if isinstance(scheme, he.FullTable) else 2**40
    X = rng.integers(0, hi, (B, T))
    psw = rng.standard_normal((B, T)).astype(np.float32) if mode == "sum" else None
    G = rng.standard_normal((B, T * 8)).astype(np.float32)
    flat, off = np.ascontiguousarray(X.T).reshape(-1), np.arange(T * B + 1)
    want = bag_backward(scheme, flat, off, G, T, mode=mode,
                        psw=None if psw is None else psw.T.reshape(-1))
    for x, o in ((X, None), (flat, off)):
        p = psw if o is None or psw is None else psw.T.reshape(-1)
        got = he.embedding_bags_backward(G, x, o, scheme=scheme, num_tables=T, mode=mode,
                                         per_sample_weights=p)
        np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-5, atol=1e-6)
        W = scheme.init_weight(seed=1)
        W0 = W.copy().reshape(-1)
        he.embedding_bags_backward(G, x, o, scheme=scheme, num_tables=T, mode=mode,
                                   per_sample_weights=p, weight=W, optimizer=he.SGD(0.5))
        np.testing.assert_allclose(W.reshape(-1), W0 - 0.5 * want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("scheme", [he.RobeZ(37, 8, block=8, seed=2),        # most rows wrap
                                    he.RobeZ(1009, 8, block=16, seed=3),
                                    he.RobeZ(100003, 16, block=16, seed=4),
                                    he.FullTable([9, 5], 8), he.FullTable([9, 5], 24),
                                    he.FullTable([9, 5], 6),
                                    # rows of several runs: of 1 float (AVX2 gathers at
                                    # D = 16, 24; the C sums over 16 and 4 columns at
                                    # D = 20; D = 6 row by row), of 4 (some wrap), of 8
                                    # and 16 (AVX), of 2 (row by row)
                                    he.HashedNet(30011, 16, seed=5), he.HashedNet(997, 20),
                                    he.HashedNet(1000, 6), he.HashedNet(1009, 24),
                                    he.RobeZ(37, 16, block=4, seed=6),
                                    he.RobeZ(100003, 16, block=4), he.RobeZ(1009, 12, block=4),
                                    he.RobeZ(100003, 16, block=8), he.RobeZ(1009, 24, block=8),
                                    he.RobeZ(5003, 32, block=16), he.RobeZ(500, 8, block=2)],
                         ids=repr)
def test_bags_hashed_by_segment(scheme, mode, dtype):
    # bags of several entries (empty ones too) are hashed a segment at a
    # time (_seg_bags) and, given their starts, rows of one run are walked
    # once by backward (_add_one_runs): the reference forward, gradient,
    # fused SGD and Adagrad steps, float and 16-bit arrays, per-sample
    # weights, over several chunks and segments that straddle bags
    rng = np.random.default_rng(11)
    B, T = 75, 2
    hi = 5 if isinstance(scheme, he.FullTable) else 2**31 - 1
    sizes = rng.integers(0, 9, T * B)
    sizes[:5] = [0, 1, 40, 0, 3]                # a bag longer than a segment
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    flat = rng.integers(0, hi, off[-1]).astype(dtype)
    # per-sample weights (sum mode only)
    psw = rng.standard_normal(off[-1]).astype(np.float32) if mode == "sum" else None
    kw = dict(scheme=scheme, num_tables=T, mode=mode, per_sample_weights=psw)
    M = scheme.init_weight(seed=1)
    want = bag_forward(scheme, flat, off, M, T, mode=mode, psw=psw)
    out, saved = he.embedding_bags(flat, M, off, return_saved=True, **kw)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    for dt in (np.float16, "bfloat16"):
        if dt == "bfloat16":
            dt = pytest.importorskip("ml_dtypes").bfloat16
        H = M.astype(dt)
        np.testing.assert_allclose(
            he.embedding_bags(flat, H, off, **kw),
            bag_forward(scheme, flat, off, H.astype(np.float32), T, mode=mode, psw=psw),
            rtol=1e-5, atol=1e-6)
    G = rng.standard_normal((B, T * scheme.dim)).astype(np.float32)
    grad = bag_backward(scheme, flat, off, G, T, mode=mode, psw=psw)
    got = he.embedding_bags_backward(G, flat, off, saved=saved, **kw)
    # float32 sums of many terms (a tiny array: every slot shared) cancel
    atol = 1e-6 * max(1, np.abs(grad).max())
    np.testing.assert_allclose(got.reshape(-1), grad, rtol=1e-5, atol=atol)
    W = M.copy()
    he.embedding_bags_backward(G, flat, off, weight=W, optimizer=he.SGD(0.5), saved=saved,
                               **kw)
    np.testing.assert_allclose(W.reshape(-1), M.reshape(-1) - 0.5 * grad, rtol=1e-5,
                               atol=atol)
    W = M.copy()
    he.embedding_bags_backward(G, flat, off, weight=W, optimizer=he.Adagrad(0.5, eps=1e-8),
                               saved=saved, **kw)
    hit = grad != 0
    want_w = M.reshape(-1).astype(np.float64)
    want_w[hit] -= 0.5 * grad[hit] / (np.abs(grad[hit]) + 1e-8)
    np.testing.assert_allclose(W.reshape(-1), want_w, rtol=1e-4, atol=1e-5)


def test_full_table_equals_plain_lookup():
    full = he.FullTable([10, 20], 4)
    W = full.init_weight(seed=3)
    x = np.array([[0, 19], [5, 5], [9, 0]])
    out = he.embedding_bags(x, W, scheme=full, num_tables=2)
    np.testing.assert_array_equal(out[:, :4], W[x[:, 0]])
    np.testing.assert_array_equal(out[:, 4:], W[10 + x[:, 1]])


def test_padding_idx_negative_for_full_table():
    full = he.FullTable(10, 2)
    W = full.init_weight()
    x = np.array([[9, 1, 9]])
    a = he.embedding_bag(x, W, scheme=full, mode="mean", padding_idx=-1)
    np.testing.assert_allclose(a[0], W[1])


def test_empty_bags_and_batches():
    robe = he.RobeZ(100, 4)
    M = robe.init_weight()
    out = he.embedding_bag(np.array([3]), M, np.array([0, 0, 1, 1]), scheme=robe, mode="max")
    assert (out[[0, 2, 3]] == 0).all() and (out[1] != 0).any()
    assert he.embedding_bag(np.zeros(0, np.int64), M, np.zeros(0, np.int64),
                            scheme=robe).shape == (0, 4)
    g = he.embedding_bag_backward(np.ones((2, 4)), np.zeros(0, np.int64), np.array([0, 0]),
                                  scheme=robe)
    assert g.shape == (100,) and not g.any()


def test_backward_deterministic_across_threads():
    code = ("import numpy as np, hashemb as he;"
            "r=he.RobeZ(50000, 16, block=4);x=np.random.default_rng(0).integers(0,10**9,(4096,8));"
            "g=np.random.default_rng(1).standard_normal((4096,128)).astype(np.float32);"
            "print(he.embedding_bags_backward(g,x,scheme=r,num_tables=8).tobytes().hex()[:0] or "
            "__import__('hashlib').sha1(he.embedding_bags_backward(g,x,scheme=r,num_tables=8)"
            ".tobytes()).hexdigest())")
    assert len(set(fuzzing.outputs_by_threads(code).values())) == 1


@pytest.mark.parametrize("scheme", [he.RobeZ(20000, 16, block=16), he.RobeZ(20011, 8, block=2),
                                    he.RobeZ(20000, 8, block=4, signed=True),
                                    he.HashedNet(30000, 4), he.HashedNet(30000, 8),
                                    he.FullTable([3000] * 3, 8)],
                         ids=repr)
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("empty", [None, 1], ids=["", "table1-empty"])
def test_threaded_backward_on_large_arrays(scheme, mode, empty):
    # arrays large enough for the multi-thread, pre-hashed paths; the reference
    # is np.add.at over the (separately verified) slots and signs
    # (and enough gradient floats, >= 2^16, for more than one thread); a whole
    # empty table inside a thread's share of the pre-hashed entries
    rng = np.random.default_rng(5)
    T, B, D = 3, 5000, scheme.dim
    sizes = rng.integers(0, 4, T * B)
    if empty is not None:
        sizes[empty * B:(empty + 1) * B] = 0
    off = np.concatenate([[0], np.cumsum(sizes)])
    idx = rng.integers(0, 3000, off[-1])
    G = rng.standard_normal((B, T * D))
    W = scheme.init_weight(dtype=np.float64)
    grad = he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode)
    want = np.zeros(scheme.size)
    q = np.repeat(np.arange(T * B), sizes)                  # bag of each entry
    c = 1.0 / sizes[q] if mode == "mean" else np.ones(len(q))
    for t in range(T):
        sel = q // B == t
        S = scheme.slots(idx[sel], table=t)
        Sg = scheme.signs(idx[sel], table=t).astype(np.float64)
        rows = G[q[sel] % B, t * D:(t + 1) * D] * c[sel, None]
        np.add.at(want, S.ravel(), (Sg * rows).ravel())
    np.testing.assert_allclose(grad.reshape(-1), want, rtol=1e-10, atol=1e-10)
    # fused SGD through the same paths
    W2 = W.copy()
    he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode, weight=W2,
                               optimizer=he.SGD(0.5))
    np.testing.assert_allclose(W2, W - 0.5 * want.reshape(W.shape), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("opt", [None, "sgd", "adagrad"])
def test_chunked_element_wise_backward_spans_chunks(opt):
    """HashedNet (8 runs per entry) hashes bags in chunks of 8192 (on every
    thread) and adds them on one slot range, Adagrad applying each thread's
    range after all of them: 9000 bags per table span two chunks. The oracle
    is np.add.at over the (separately verified) slots."""
    rng = np.random.default_rng(8)
    scheme = he.HashedNet(40_000, 8)
    T, B, D = 2, 9000, 8
    sizes = rng.integers(0, 3, T * B)
    off = np.concatenate([[0], np.cumsum(sizes)])
    idx = rng.integers(0, 10 ** 6, off[-1])
    psw = rng.random(off[-1])
    G = rng.standard_normal((B, T * D))
    want = np.zeros(scheme.size)
    q = np.repeat(np.arange(T * B), sizes)                  # bag of each entry
    t, b = np.divmod(q, B)
    for tt in range(T):
        sel = t == tt
        S = scheme.slots(idx[sel], table=tt)
        gs = G[b[sel]][:, tt * D:(tt + 1) * D] * psw[sel, None]
        np.add.at(want, S, gs)
    W = scheme.init_weight(dtype=np.float64)
    kw = dict(scheme=scheme, num_tables=T, per_sample_weights=psw)
    if opt is None:
        grad = he.embedding_bags_backward(G, idx, off, **kw)
        np.testing.assert_allclose(grad, want, rtol=1e-10, atol=1e-10)
    elif opt == "sgd":
        W2 = W.copy()
        he.embedding_bags_backward(G, idx, off, weight=W2, optimizer=he.SGD(0.5), **kw)
        np.testing.assert_allclose(W2, W - 0.5 * want, rtol=1e-10, atol=1e-10)
    else:
        W2, ada = W.copy(), he.Adagrad(0.5, eps=1e-8)
        he.embedding_bags_backward(G, idx, off, weight=W2, optimizer=ada, **kw)
        state = want ** 2
        np.testing.assert_allclose(W2, W - 0.5 * want / (np.sqrt(state) + 1e-8),
                                   rtol=1e-9, atol=1e-9)


_THREADS_CODE = r"""
import hashlib, numpy as np, hashemb as he
h = hashlib.sha1()
rng = np.random.default_rng(3)
# >= 2^16 gradient floats (more than one thread); Adagrad sweeps the scratch of
# the small arrays and walks the entries again for the large one (m > 8 N D)
# HashedNet: the chunked backward's one slot range and Adagrad's apply after
# it, and (the large array) each thread's range of every entry's adds;
# signed schemes: chunked too, their signs hashed with the starts, runs
# clipped to each thread's range
for scheme in [he.RobeZ(50021, 16, block=16), he.RobeZ(40009, 8, block=2),
               he.RobeZ(5000011, 16, block=16), he.HashedNet(40009, 8),
               he.HashedNet(5000011, 8), he.HashedNet(40009, 8, signed=True),
               he.RobeZ(40009, 16, block=8, signed=True)]:
    D = scheme.dim
    for N in (24000,):
        T, B = 3, N // 3
        sizes = rng.integers(0, 4, T * B)
        off = np.concatenate([[0], np.cumsum(sizes)])
        idx = rng.integers(0, 10**6, off[-1])
        idx[::7] = 5                                       # padding
        psw = rng.random(off[-1])
        G = rng.standard_normal((B, T * D))
        for kw in [dict(per_sample_weights=psw, padding_idx=5), dict(mode="mean")]:
            common = dict(scheme=scheme, num_tables=T, **kw) if "padding_idx" not in kw else None
            if common is None:       # padding needs one table: split by table
                for t in range(T):
                    sl = slice(off[t * B], off[(t + 1) * B])
                    o = off[t * B:(t + 1) * B + 1] - off[t * B]
                    g = he.embedding_bag_backward(G[:, t * D:(t + 1) * D], idx[sl], o,
                                                  scheme=scheme, table=t,
                                                  per_sample_weights=psw[sl], padding_idx=5,
                                                  include_last_offset=True)
                    h.update(g.tobytes())
                continue
            h.update(he.embedding_bags_backward(G, idx, off, **common).tobytes())
            for opt in (he.SGD(0.3), he.Adagrad(0.3)):
                W = scheme.init_weight(dtype=np.float64)
                he.embedding_bags_backward(G, idx, off, weight=W, optimizer=opt, **common)
                he.embedding_bags_backward(G, idx, off, weight=W, optimizer=opt, **common)
                h.update(W.tobytes())
print(h.hexdigest())
"""


def test_bucketed_backward_same_bits_on_any_thread_count():
    """The multi-thread backward buckets entries by the slot range they touch
    (runs crossing a range boundary or wrapping past the end go to both
    owners), or (HashedNet) hashes chunks of bags in parallel for one range
    or each thread's; each slot must still sum in entry order: the same bits
    on 1, 2, 3 and 8 threads, for weights, padding, mean, SGD and both
    Adagrad passes."""
    outs = fuzzing.outputs_by_threads(_THREADS_CODE, ("1", "2", "3", "8"))
    assert len(set(outs.values())) == 1, outs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_forward_output_streamed(dtype):
    """Outputs of 8 MB and more are written with streaming stores: rows of an
    odd width (unaligned starts), both dtypes, every value as the gather."""
    rng = np.random.default_rng(11)
    full = he.FullTable([50] * 5, 7)
    B = 70_000                                   # 70000 x 35 floats >= 8 MB
    X = rng.integers(0, 50, (B, 5))
    W = full.init_weight(dtype=dtype)
    out = he.embedding_bags(X, W, scheme=full, num_tables=5)
    want = np.concatenate([W[t * 50 + X[:, t]] for t in range(5)], axis=1)
    np.testing.assert_array_equal(out, want)
    robe = he.RobeZ(10_007, 16, block=4, signed=True)
    X = rng.integers(0, 10 ** 9, (B, 2))
    M = robe.init_weight(dtype=dtype)
    out = he.embedding_bags(X, M, scheme=robe, num_tables=2)
    want = np.concatenate([M[robe.slots(X[:, t], table=t)] * robe.signs(X[:, t], table=t)
                           for t in range(2)], axis=1)
    np.testing.assert_allclose(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", [he.RobeZ(1009, 16, block=16), he.RobeZ(50_021, 16, block=32),
                                    he.FullTable([300] * 8, 16), he.RobeZ(3001, 32, block=32),
                                    he.FullTable([300] * 8, 64)], ids=repr)
@pytest.mark.parametrize("B", [300, 20_000])
def test_one_hot_rows_copied_straight_into_the_output(scheme, B):
    """One-entry bags of float32 rows of whole 64-byte lines (D a multiple
    of 16, one run) are copied from the array straight into the output's
    lines (streamed into an output of 8 MB and more): the output starts on
    a line; every value is the gather's, runs wrapping past the array's
    end (a small ROBE-Z array) included; a block of bags that holds a
    longer bag in its last table is pooled the other way over what was
    copied; the saved run starts are the slots' first ones."""
    rng = np.random.default_rng(5)
    T = 8                                        # B = 20000: 20000 x 8 x 16 floats >= 8 MB
    X = rng.integers(0, 300, (B, T))
    W = scheme.init_weight()
    flat_w = W.reshape(-1)
    want = np.concatenate([flat_w[scheme.slots(X[:, t], table=t)] for t in range(T)], axis=1)
    out, saved = he.embedding_bags(X, W, scheme=scheme, num_tables=T, return_saved=True)
    assert out.ctypes.data % 64 == 0
    np.testing.assert_array_equal(out, want)
    starts = saved.starts.reshape(T, B)
    for t in range(T):
        np.testing.assert_array_equal(starts[t], scheme.slots(X[:, t], table=t)[:, 0])
    k = B // 4
    # bag k of the last table gets a second entry: that block of bags
    # (and only the bags from there on) is pooled the buffered way
    flat = X.T.reshape(-1)
    sizes = np.ones(T * B, np.int64)
    sizes[(T - 1) * B + k] = 2
    flat = np.insert(flat, (T - 1) * B + k + 1, X[7, 0])
    off = np.concatenate([[0], np.cumsum(sizes)])
    want[k, (T - 1) * scheme.dim:] += flat_w[scheme.slots(X[7:8, 0], table=T - 1)][0]
    out = he.embedding_bags(flat, W, off, scheme=scheme, num_tables=T)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    np.testing.assert_array_equal(np.delete(out, k, axis=0), np.delete(want, k, axis=0))


_SAVED_SCHEMES = [he.RobeZ(5003, 16, block=16), he.RobeZ(5003, 16, block=4),
                  he.RobeZ(5003, 8, block=8, signed=True), he.HashedNet(5003, 8),
                  he.FullTable([300, 200], 8)]


@pytest.mark.parametrize("scheme", _SAVED_SCHEMES, ids=repr)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("B", [3, 5000])
@pytest.mark.parametrize("single", [False, True], ids=["bags", "one-per-bag"])
def test_saved_run_starts_give_the_same_bits(scheme, mode, B, single):
    """return_saved hashes every entry's run starts once in forward and
    backward reuses them: the output, the gradient and fused SGD / Adagrad
    steps are the same bits as without (one thread or several: B = 5000 gives
    more than 2^16 gradient floats), for bags of 0-3 entries and for one
    entry per bag (forward's offset-free path). Where backward would not use
    starts (signed, many runs, max) none are kept."""
    rng = np.random.default_rng(3)
    T = 2
    sizes = np.ones(T * B, np.int64) if single else rng.integers(0, 4, T * B)
    off = np.concatenate([[0], np.cumsum(sizes)])
    idx = rng.integers(0, 200, off[-1])
    psw = rng.random(off[-1]) if mode == "sum" and not single else None
    W = scheme.init_weight(dtype=np.float64)
    kw = dict(scheme=scheme, num_tables=T, mode=mode, per_sample_weights=psw)
    out = he.embedding_bags(idx, W, off, **kw)
    out2, saved = he.embedding_bags(idx, W, off, return_saved=True, **kw)
    np.testing.assert_array_equal(out2, out)
    R = scheme.dim // scheme._run
    if mode == "max" or scheme._signed or R > 4:
        assert saved.starts is None
    else:
        assert saved.starts.shape == (off[-1] * R,)
        want = np.concatenate([scheme.slots(idx[off[t * B]:off[(t + 1) * B]], table=t)
                               [:, ::scheme._run] for t in range(T)]).reshape(-1)
        np.testing.assert_array_equal(saved.starts, want.astype(np.uint64))
    G = rng.standard_normal(out.shape)
    bw = dict(kw, weight=W if mode == "max" else None)
    np.testing.assert_array_equal(he.embedding_bags_backward(G, idx, off, saved=saved, **bw),
                                  he.embedding_bags_backward(G, idx, off, **bw))
    for opt in (he.SGD(0.1), he.Adagrad(0.1)):
        if mode == "max":
            continue
        a, b = W.copy(), W.copy()
        for _ in range(2):
            he.embedding_bags_backward(G, idx, off, weight=a, optimizer=opt, saved=saved, **kw)
        opt2 = type(opt)(0.1)
        for _ in range(2):
            he.embedding_bags_backward(G, idx, off, weight=b, optimizer=opt2, **kw)
        np.testing.assert_array_equal(a, b)


def test_saved_single_table_and_errors():
    robe = he.RobeZ(1000, 16, block=16)
    W = robe.init_weight()
    x, off = np.array([5, 6, 7, 8]), np.array([0, 1, 3])
    out, saved = he.embedding_bag(x, W, off, scheme=robe, table=2, return_saved=True)
    assert "3 bags, 4 indices" in repr(saved)
    g = np.ones_like(out)
    np.testing.assert_array_equal(
        he.embedding_bag_backward(g, x, off, scheme=robe, table=2, saved=saved),
        he.embedding_bag_backward(g, x, off, scheme=robe, table=2))
    # padding and bags of several entries: padding is dropped before the
    # kernels run, so the starts kept are those of every other entry
    rng = np.random.default_rng(0)
    xp = rng.integers(0, 50, 3000)
    xp[::5] = 7
    offp = np.sort(rng.integers(0, 3000, 600))
    offp[0] = 0
    for kw in (dict(padding_idx=7), dict(padding_idx=7, per_sample_weights=rng.random(3000)),
               dict(mode="mean")):
        o1, sv = he.embedding_bag(xp, W, offp, scheme=robe, table=1, return_saved=True, **kw)
        np.testing.assert_array_equal(o1, he.embedding_bag(xp, W, offp, scheme=robe, table=1,
                                                           **kw))
        live = xp[xp != 7] if "padding_idx" in kw else xp
        np.testing.assert_array_equal(sv.starts,
                                      robe.slots(live, table=1)[:, 0].astype(np.uint64))
        gp = rng.standard_normal(o1.shape).astype(np.float32)
        np.testing.assert_array_equal(
            he.embedding_bag_backward(gp, xp, offp, scheme=robe, table=1, saved=sv, **kw),
            he.embedding_bag_backward(gp, xp, offp, scheme=robe, table=1, **kw))
    with pytest.raises(ValueError, match="saved: expected the forward of these inputs"):
        he.embedding_bag_backward(g, x, off, scheme=robe, table=1, saved=saved)
    with pytest.raises(ValueError, match="saved: expected the forward of these inputs"):
        he.embedding_bag_backward(g[:1], x[:2], off[:1], scheme=robe, table=2, saved=saved)
    with pytest.raises(ValueError, match="another scheme"):
        he.embedding_bag_backward(g, x, off, scheme=he.RobeZ(1000, 16, block=16, seed=1),
                                  table=2, saved=saved)
    with pytest.raises(TypeError, match="saved: expected a BagSaved"):
        he.embedding_bag_backward(g, x, off, scheme=robe, table=2, saved=("not", "saved"))
    gpu_saved = he.BagSaved(None, robe, 2, 1, 3, 4, 0, True)
    with pytest.raises(TypeError, match="saved: expected a BagSaved of a forward on the host"):
        he.embedding_bag_backward(g, x, off, scheme=robe, table=2, saved=gpu_saved)
    bad = he.BagSaved(np.zeros(3, np.uint64), robe, 2, 1, 3, 4, 0, False)
    with pytest.raises(ValueError, match="saved: expected 4 run starts, got 3"):
        he.embedding_bag_backward(g, x, off, scheme=robe, table=2, saved=bad)


@pytest.mark.parametrize("scheme", [he.RobeZ(5003, 16, block=16), he.RobeZ(5003, 16, block=4),
                                    he.HashedNet(5003, 8), he.FullTable(300, 8),
                                    he.RobeZ(5003, 8, block=8, signed=True)], ids=repr)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("n", [40, 400_000])
def test_padding_dropped_gives_the_bits_of_unpadded_bags(scheme, mode, n):
    """The CPU drops padding entries before its kernels run (their tight
    loops take none): forward, gradient, saved starts and fused steps equal,
    bit for bit, those of the same bags given without padding (built here
    with NumPy), and the reference. Bags padded at the end, in the middle,
    wholly, empty; entries past the last offset; int32 and int64; on two
    threads (n = 400,000 entries)."""
    rng = np.random.default_rng(n)
    pad = 17
    sizes = rng.integers(0, 7, n // 3)
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    idx = rng.integers(0, 300, off[-1] + 5)                 # 5 entries in no bag
    idx[rng.random(idx.shape[0]) < 0.3] = pad
    idx[off[3]:off[5]] = pad                                # whole bags of padding
    psw = rng.random(idx.shape[0]) if mode == "sum" else None
    keep = idx[:off[-1]] != pad
    live_off = np.concatenate([[0], np.cumsum(keep)])[off].astype(np.int64)
    for dt in (np.int64, np.int32):
        x = idx.astype(dt)
        W = scheme.init_weight(dtype=np.float64)
        kw = dict(scheme=scheme, table=0, mode=mode, include_last_offset=True)
        out, saved = he.embedding_bag(x, W, off, per_sample_weights=psw, padding_idx=pad,
                                      return_saved=True, **kw)
        lx = x[:off[-1]][keep]
        lpsw = None if psw is None else psw[:off[-1]][keep]
        want = he.embedding_bag(lx, W, live_off, per_sample_weights=lpsw, **kw)
        np.testing.assert_array_equal(out, want)
        if n < 1000:                                         # the reference is slow
            np.testing.assert_allclose(out, bag_forward(
                scheme, x[:off[-1]], off, W, 1, 0, mode,
                psw if psw is None else psw[:off[-1]], pad), rtol=1e-12, atol=1e-12)
        if saved.starts is not None:
            R = scheme.dim // scheme._run
            assert saved.starts.shape == (lx.shape[0] * R,)
        G = rng.standard_normal(out.shape)
        wt = W if mode == "max" else None
        g = he.embedding_bag_backward(G, x, off, per_sample_weights=psw, padding_idx=pad,
                                      weight=wt, saved=saved, **kw)
        np.testing.assert_array_equal(g, he.embedding_bag_backward(
            G, lx, live_off, per_sample_weights=lpsw, weight=wt, **kw))
        if mode == "max":
            continue
        for opt in (he.SGD(0.1), he.Adagrad(0.1)):
            a, b = W.copy(), W.copy()
            opt2 = type(opt)(0.1)
            for _ in range(2):
                he.embedding_bag_backward(G, x, off, per_sample_weights=psw, padding_idx=pad,
                                          weight=a, optimizer=opt, saved=saved, **kw)
                he.embedding_bag_backward(G, lx, live_off, per_sample_weights=lpsw,
                                          weight=b, optimizer=opt2, **kw)
            np.testing.assert_array_equal(a, b)


def test_padding_buffers_are_per_thread_and_per_call():
    """The dropped-padding buffers are kept per thread between calls: calls
    from several Python threads at once (the kernels release the GIL), of
    shrinking and growing sizes, each get their own bags' result."""
    import threading
    robe = he.RobeZ(5003, 8, block=8)
    W = robe.init_weight()
    rng = np.random.default_rng(5)
    cases = []
    for n in (50_000, 300, 120_000, 7):
        x = rng.integers(0, 40, (n, 4))
        psw = rng.random(x.shape).astype(np.float32)
        want = he.embedding_bag(np.where(x == 3, 0, x), W, scheme=robe,
                                per_sample_weights=np.where(x == 3, 0, psw).astype(np.float32))
        cases.append((x, psw, want))
    bad = []

    def run(order):
        for _ in range(5):
            for i in order:
                x, psw, want = cases[i]
                out = he.embedding_bag(x, W, scheme=robe, per_sample_weights=psw, padding_idx=3)
                if not np.allclose(out, want, rtol=1e-6, atol=1e-6):
                    bad.append(i)

    threads = [threading.Thread(target=run, args=(o,)) for o in ([0, 1, 2, 3], [3, 2, 1, 0])]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not bad


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_arrays_past_two_to_the_32_elements(dtype):
    """Element offsets past 2**31 and 2**32 (row * D + base in 64 bits): a
    full table of 2**28 + 3 rows of 16 after one of 5, forward (sum, mean,
    empty bags) and a fused SGD step on its last rows, against NumPy's
    indexing. The array is 16 GiB (8 GiB in float16) of lazily mapped zeros:
    only the rows touched are ever paged in."""
    N, D = (1 << 28) + 3, 16
    s = he.FullTable([5, N], D)
    try:
        W = np.zeros(s.size, dtype)
    except MemoryError:
        pytest.skip("no 16 GiB of address space for the lazily mapped array")
    V = W.reshape(-1, D)
    rows = np.array([0, N - 1, N - 2, (1 << 27) + 5, N - 1], np.int64)
    V[5 + rows] = np.arange(rows.size * D, dtype=dtype).reshape(-1, D) % 251
    x = np.stack([np.full(rows.size, 4), rows], 1)
    out = he.embedding_bags(x, W, scheme=s, num_tables=2)
    np.testing.assert_array_equal(out[:, D:], V[5 + rows].astype(np.float32))
    flat = np.concatenate([np.zeros(3, np.int64), [N - 1, N - 2, 7]])
    off = np.array([0, 1, 2, 3, 5, 6, 6], np.int64)
    mean = he.embedding_bags(flat, W, off, scheme=s, num_tables=2, mode="mean")
    np.testing.assert_allclose(mean[0, D:], (V[5 + N - 1].astype(np.float32) + V[5 + N - 2]) / 2)
    assert not mean[2, D:].any()
    want = V[5 + rows].astype(np.float32) - np.array([1, 2, 1, 1, 2])[:, None]
    he.embedding_bags_backward(np.ones_like(out), x, scheme=s, num_tables=2, weight=W,
                               optimizer=he.SGD(1.0, stochastic_rounding=False))
    np.testing.assert_array_equal(V[5 + rows], want.astype(dtype))
    assert (V[4] == -5).all()            # table 0's row 4, once a sample



_TEAM_CODE = """
import hashlib, numpy as np, hashemb as he
rng = np.random.default_rng(0)
h = lambda a: hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]
X = rng.integers(0, 2**40, size=(2048, 4))
g = rng.standard_normal((2048, 64)).astype(np.float32)
print(h(he.embedding_bag_backward(g[:, :16], X, scheme=he.RobeZ(50_000, 16),
                                  mode="max", weight=he.RobeZ(50_000, 16).init_weight())))
print(h(he.embedding_bags_backward(g, X, scheme=he.HashedNet(50_000, 16), num_tables=4)))
for s in (he.RobeZ(50_000, 16, signed=True), he.HashedNet(2_000_000, 16)):
    M = s.init_weight(seed=1)       # Adagrad: a sweep of a small array; a walk of a large one
    he.embedding_bags_backward(g, X, scheme=s, num_tables=4, weight=M, optimizer=he.Adagrad(0.1))
    print(h(M))
I = rng.integers(0, 1000, size=4096)
print(h(he.embedding_backward(rng.standard_normal((4096, 64)).astype(np.float32), I, 1000)))
"""


def test_a_smaller_thread_team_than_asked_still_covers_every_slot():
    """OpenMP may start fewer threads than a region asks for
    (OMP_THREAD_LIMIT, OMP_DYNAMIC on a loaded machine, a call from inside
    a parallel region): the backward paths that split the array's slots by
    thread id (max mode, signed and element-wise schemes, Adagrad's apply,
    FastEmbedding's columns) split them by the team they got. They had
    split by the count asked for, and a team of 2 for 4 dropped half the
    updates (a max-mode gradient kept 20,396 of 72,100 entries)."""
    one = fuzzing.outputs_by_threads(_TEAM_CODE, ("1",))["1"]
    short = fuzzing.outputs_by_threads(_TEAM_CODE, ("4",), OMP_THREAD_LIMIT="2")["4"]
    assert short == one


def test_a_wrapped_run_longer_than_a_thread_range_moves_every_slot():
    """A run that wraps past the end of the array puts its tail at the
    start; when the run is longer than one thread's slot range (wide rows,
    many threads), the tail spans several ranges, and every one must take
    it (only the first did: 46,122 of 65,536 slots moved at 16 threads)."""
    D, m = 65536, 600_000
    robe = he.RobeZ(m, D, seed=0)
    tok = next(x for x in range(100_000) if robe.slots(np.array([x]))[0, 0] > m - 20_000)
    old = he.set_num_threads(16)
    try:
        for dtype, opt in ((np.float32, he.Adagrad(0.1)),
                           (np.float16, he.SGD(0.1, stochastic_rounding=False))):
            W = np.zeros(m, dtype)
            he.embedding_bag_backward(np.ones((1, D), np.float32), np.array([[tok]]),
                                      scheme=robe, weight=W, optimizer=opt)
            assert np.count_nonzero(W) == D, dtype
    finally:
        he.set_num_threads(old)


def test_forked_child_runs_kernels_after_the_parent_did():
    """GCC's OpenMP thread pool does not survive fork: a child (a DataLoader
    worker, a multiprocessing pool) that called a kernel after the parent
    ran one on two threads waited forever. It runs on one thread now, with
    the parent's result; he.set_num_threads is checked and restores."""
    import hashlib
    import multiprocessing as mp
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    robe = he.RobeZ(100_000, 16)
    M = robe.init_weight()
    x = np.random.default_rng(0).integers(0, 10 ** 6, (20_000, 26))
    old = he.set_num_threads(2)
    try:
        want = he.embedding_bags(x, M, scheme=robe, num_tables=26)   # a team of two
        ctx = mp.get_context("fork")
        q = ctx.Queue()

        def child():
            out = he.embedding_bags(x, M, scheme=robe, num_tables=26)
            # (a digest: a child with 33 MB queued would not exit before
            # the parent read it, and the parent joins first)
            q.put((he.set_num_threads(1), hashlib.sha256(out.tobytes()).hexdigest()))
        p = ctx.Process(target=child)
        p.start()
        p.join(60)
        hung = p.is_alive()
        if hung:
            p.kill()
        assert not hung, "the forked child hung in its first parallel region"
        threads, got = q.get(timeout=10)
        assert threads == 1 and got == hashlib.sha256(want.tobytes()).hexdigest()
    finally:
        he.set_num_threads(old)
    with pytest.raises(ValueError, match="n: expected 1 <= n"):
        he.set_num_threads(0)


def _vm_flags(address):
    """The VmFlags of the mapping holding ``address`` (Linux), or None."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    return None


def test_a_large_scratch_is_mapped_without_huge_pages():
    """The two-phase step's scratch is mostly zeros, written a few slots a
    step; NumPy asks for transparent huge pages on large arrays, which made
    each scattered write fault in 2 MB (a 1 GB array's scratch was all
    resident after one step of 1024 rows). A large one now maps with
    MADV_NOHUGEPAGE ("nh"), zeroed and 64-byte aligned; a small one is
    NumPy's."""
    big = np.zeros(4 << 20, np.float32)             # 16 MB
    s = he.Adagrad(0.1).scratch_for(big)
    flags = _vm_flags(s.ctypes.data)
    if flags is None:
        pytest.skip("no /proc/self/smaps")
    assert "nh" in flags and s.ctypes.data % 64 == 0 and not s.any() and s.flags.writeable
    small = he.Adagrad(0.1).scratch_for(np.zeros(1000, np.float32))
    assert small.shape == (1000,) and not small.any()


@pytest.mark.parametrize("scheme", [he.FullTable([10], 4), he.RobeZ(1009, 8, block=4, seed=1),
                                    he.HashedNet(1009, 6, seed=2)], ids=repr)
def test_max_mode_ties_send_the_gradient_to_the_first_entry(scheme):
    """Every value ties: each element's gradient goes to the bag's first
    entry, as torch's (a last-wins argmax was caught only by chance, by
    bfloat16's ties in a CPU-vs-emulator test)."""
    W = np.ones(scheme.weight_shape, np.float32)
    idx = np.array([3, 5, 7, 2, 8])
    off = np.array([0, 3])                              # bags {3, 5, 7}, {2, 8}
    G = np.arange(1, 2 * scheme.dim + 1, dtype=np.float32).reshape(2, scheme.dim)
    got = he.embedding_bag_backward(G, idx, off, scheme=scheme, mode="max", weight=W)
    want = bag_backward(scheme, idx, np.r_[off, len(idx)], G.astype(np.float64), 1,
                        M=W, mode="max")
    np.testing.assert_array_equal(got.reshape(-1), want)


def test_forked_child_gets_hashemb_locks_unlocked():
    """A child forked while another thread held one of hashemb's locks (the
    native op's build lock for its whole 20-30 s build, the TT workspace
    pool's, ...) inherited it held, with no thread to release it, and hung
    at its first use (a DataLoader worker starting then)."""
    import multiprocessing as mp
    import threading
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    import hashemb._gpu._runtime as RT
    import hashemb.torch._native as N
    from hashemb import _backend, _validate, optim, tt
    places = [(N, "_lock"), (tt, "_POOL_LOCK"), (optim, "_CALLS_LOCK"),
              (_validate, "_EVEN_LOCK"), (RT, "_SCHEMES_LOCK")]
    registered = {(id(ns), name) for ns, name, _ in _backend._LOCKS}
    assert all((id(vars(m)), name) in registered for m, name in places)
    held, done = threading.Event(), threading.Event()

    def hold():
        locks = [getattr(m, name) for m, name in places]
        for lock in locks:
            lock.acquire()
        held.set()
        done.wait(60)
        for lock in locks:
            lock.release()
    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    try:
        ctx = mp.get_context("fork")
        q = ctx.Queue()

        def child():
            q.put([getattr(m, name).acquire(timeout=5) for m, name in places])
        p = ctx.Process(target=child)
        p.start()
        p.join(60)
        assert q.get(timeout=10) == [True] * len(places)
    finally:
        done.set()
        t.join()


def test_saved_starts_are_read_only():
    """The kernels trust a saved's run starts: one edited through the public
    attribute sent a fused step out of bounds (an ASan heap overflow)."""
    robe = he.RobeZ(1000, 16, block=16)
    M = robe.init_weight()
    x = np.array([[1, 2], [3, 4]])
    out, saved = he.embedding_bag(x, M, scheme=robe, return_saved=True)
    with pytest.raises(ValueError, match="read-only"):
        saved.starts[0] = 5000
    fresh = M.copy()
    he.embedding_bag_backward(np.ones_like(out), x, scheme=robe, weight=M,
                              optimizer=he.SGD(0.1), saved=saved)
    he.embedding_bag_backward(np.ones_like(out), x, scheme=robe, weight=fresh,
                              optimizer=he.SGD(0.1))
    np.testing.assert_array_equal(M, fresh)


_STRIDE_SCHEMES = [he.RobeZ(5003, 16, block=16), he.RobeZ(5003, 8, block=4),
                   he.RobeZ(5003, 8, block=8, signed=True), he.HashedNet(5003, 8),
                   he.FullTable([300, 200], 8)]


@pytest.mark.parametrize("scheme, opt", [
    (s, o) for s in _STRIDE_SCHEMES for o in (None, "sgd", "adagrad", "rowwise")
    if o != "rowwise" or isinstance(s, he.FullTable)],     # (row-wise: a full table's)
    ids=lambda v: repr(v) if isinstance(v, he.Scheme) else str(v))
@pytest.mark.parametrize("layout", ["column slice", "one row repeated", "reversed rows",
                                    "every other column"])
def test_backward_takes_a_gradient_of_any_layout(scheme, opt, layout):
    """A gradient whose rows are each contiguous at any stride (a column
    slice of a wider one, as a DLRM's interaction hands back) or one row
    repeated (stride 0: a broadcast row, a sum's gradient) is read in place;
    any other layout is copied: every layout gives the contiguous
    gradient's bits, plain or through a fused step, with saved run starts
    or without."""
    rng = np.random.default_rng(9)
    T, B = 2, 3000                               # > 2^16 gradient floats: several threads
    W0 = scheme.init_weight()
    X = rng.integers(0, 200, (B, T))
    width = T * scheme.dim
    wide = rng.standard_normal((B, 2 * width + 3)).astype(np.float32)
    G = {"column slice": wide[:, 3:3 + width],
         "one row repeated": np.broadcast_to(wide[0, :width], (B, width)),
         "reversed rows": wide[::-1, :width],
         "every other column": wide[:, :2 * width:2]}[layout]
    assert not G.flags.c_contiguous
    make = {None: lambda: None, "sgd": lambda: he.SGD(0.1), "adagrad": lambda: he.Adagrad(0.1),
            "rowwise": lambda: he.RowwiseAdagrad(0.1)}[opt]
    results = []
    for g in (np.ascontiguousarray(G), G):
        for keep in (False, True):
            W = W0.copy()
            _, saved = he.embedding_bags(X, W, scheme=scheme, num_tables=T, return_saved=True)
            o = make()
            res = he.embedding_bags_backward(g, X, scheme=scheme, num_tables=T, weight=W,
                                             optimizer=o, saved=saved if keep else None)
            if o is not None:
                he.embedding_bags_backward(g, X, scheme=scheme, num_tables=T, weight=W,
                                           optimizer=o)     # the state carries over
            results.append((W if res is None else res).tobytes())
    assert len(set(results)) == 1


def test_a_gradient_with_rows_in_order_is_not_copied():
    """What the kernels read in place, V.as_grad hands over as it is (the
    same array object); a float64 one for float32 weights is converted."""
    from hashemb import _validate as V
    wide = np.zeros((100, 40), np.float32)
    for g in (wide[:, 8:24], np.broadcast_to(wide[0, :16], (100, 16)), wide[:, :16]):
        assert V.as_grad(g, (100, 16), np.float32, rows=True) is g
    for g in (wide[::-1, :16], wide[:, :32:2]):
        out = V.as_grad(g, (100, 16), np.float32, rows=True)
        assert out.flags.c_contiguous and np.array_equal(out, g)
    g = wide.astype(np.float64)[:, :16]
    assert V.as_grad(g, (100, 16), np.float32, rows=True).dtype == np.float32
    # one value (a sum's gradient in torch), or a row of another dtype,
    # repeated: one row made once, at stride 0
    for g in (np.broadcast_to(np.float32(0.5), (100, 16)),
              np.broadcast_to(np.full(16, 0.5), (100, 16))):
        out = V.as_grad(g, (100, 16), np.float32, rows=True)
        assert out.dtype == np.float32 and out.strides == (0, 4) and np.array_equal(out, g)
    assert not np.shares_memory(V.as_grad(wide[:, 8:24], (100, 16), np.float32), wide)


def test_the_kernel_refuses_a_gradient_it_cannot_read_in_place():
    """The Cython backward itself names grad for a layout it cannot read
    (columns apart, rows overlapping or reversed, another shape): never an
    out-of-bounds read."""
    scheme = he.RobeZ(5003, 8, block=8)
    X = np.zeros((10, 2), np.int64)
    k = kernels(X)
    off = np.arange(21, dtype=np.int64)
    flat = X.T.reshape(-1).copy()
    wide = np.zeros((10, 40), np.float32)
    target = np.zeros(scheme.size, np.float32)
    e, u = np.empty(0, np.float32), np.empty(0, np.uint64)
    for g in (wide[:, :32:2], np.lib.stride_tricks.as_strided(wide, (10, 16), (8, 4)),
              wide[::-1, :16], wide[:, :8]):
        with pytest.raises(ValueError, match="grad: expected shape"):
            k.backward(scheme._view, flat, off, e, g, 10, 2, 0, 0, e, target, 1.0, e, e, 0.0,
                       u, np.empty(0, np.uint16), 0)


def test_backward_reads_the_2d_batch_its_saved_kept():
    """A 2-D forward that keeps its run starts keeps its feature-major batch
    too, and backward given that saved (the same shape, tables and mode,
    nothing else) reads it instead of transposing the tokens again: the same
    bits as hashing anew; a saved of another mode is still refused."""
    from hashemb import bag as hb
    rng = np.random.default_rng(2)
    for scheme in (he.RobeZ(5003, 16, block=16), he.FullTable([300, 200, 100], 8)):
        X = rng.integers(0, 100, (500, 3))
        W = scheme.init_weight()
        out, saved = he.embedding_bags(X, W, scheme=scheme, num_tables=3, return_saved=True)
        assert saved._batch is not None and saved._batch[0] == X.shape
        b = saved._batch[1]
        np.testing.assert_array_equal(b.idx, X.T.reshape(-1))
        args = (saved, X, None, None, None, scheme, 0, 3, "sum")
        assert hb._saved_batch(*args) is b
        for i, other in ((1, X[:-1]), (2, np.arange(1501)), (3, np.ones(1500)), (4, 0),
                         (5, he.RobeZ(5003, 16, block=16)), (6, 1), (7, 2), (8, "mean")):
            changed = list(args)
            changed[i] = other
            assert hb._saved_batch(*changed) is None, i
        G = rng.standard_normal(out.shape).astype(np.float32)
        got = he.embedding_bags_backward(G, X, scheme=scheme, num_tables=3, saved=saved)
        want = he.embedding_bags_backward(G, X, scheme=scheme, num_tables=3)
        assert got.tobytes() == want.tobytes()
        with pytest.raises(ValueError, match="saved: expected the forward"):
            he.embedding_bags_backward(G, X, scheme=scheme, num_tables=3, mode="mean",
                                       saved=saved)
    # nothing kept where backward would not take it
    _, saved = he.embedding_bags(X, W, scheme=scheme, num_tables=3, return_saved=True,
                                 per_sample_weights=np.ones((500, 3)))
    assert saved._batch is None
    _, saved = he.embedding_bag(X, W, scheme=scheme, return_saved=True, padding_idx=0)
    assert saved._batch is None
    _, saved = he.embedding_bag(X, W, scheme=scheme, return_saved=True)
    assert saved._batch is not None
    _, saved = he.embedding_bags(X.T.reshape(-1), W, np.arange(1501), scheme=scheme,
                                 num_tables=3, return_saved=True)
    assert saved._batch is None


def test_large_outputs_reuse_a_block_nothing_refers_to(monkeypatch):
    """Outputs from RECYCLE_BYTES on come from a block an earlier output left
    once nothing refers to it (glibc maps each such allocation anew, so its
    pages were faulted in and zeroed every call): dropped, its block serves
    the next output; alive as a slice, a reshaped view or a torch tensor,
    it is never written; at most RECYCLE_KEEP blocks stay held."""
    from hashemb import _backend
    monkeypatch.setattr(_backend, "RECYCLE_BYTES", 1 << 16)
    monkeypatch.setattr(_backend, "_RECYCLED", [])
    rng = np.random.default_rng(4)
    robe = he.RobeZ(5003, 16, block=16)
    M = robe.init_weight()
    X = [rng.integers(0, 10 ** 6, (2000, 4)) for _ in range(6)]   # 512 KB outputs

    def fwd(i):
        return he.embedding_bags(X[i], M, scheme=robe, num_tables=4)

    want = [fwd(i).copy() for i in range(6)]
    out = fwd(0)
    block = out.ctypes.data         # (an address: a reference would hold the block)
    np.testing.assert_array_equal(out, want[0])
    del out
    out = fwd(1)
    assert out.ctypes.data == block and out.ctypes.data % 64 == 0    # reused once dropped
    np.testing.assert_array_equal(out, want[1])
    views = [out[5:9], out.reshape(-1)[::3]]
    del out
    for i in range(2, 6):                                      # never over a live view
        out = fwd(i)
        assert out.ctypes.data != block
        np.testing.assert_array_equal(out, want[i])
        np.testing.assert_array_equal(views[0], want[1][5:9])
        np.testing.assert_array_equal(views[1], want[1].reshape(-1)[::3])
    kept = [fwd(i) for i in range(6)]                          # all alive at once
    assert len(_backend._RECYCLED) <= _backend.RECYCLE_KEEP
    for i in range(6):
        np.testing.assert_array_equal(kept[i], want[i])
    del kept
    small = he.embedding_bags(X[0][:10], M, scheme=robe, num_tables=4)   # below the size
    assert all(small.base is not b for b in _backend._RECYCLED)


def test_a_torch_tensor_over_an_output_keeps_its_block(monkeypatch):
    """torch.from_numpy of an output holds its block: a later output never
    writes over the tensor's values."""
    torch = pytest.importorskip("torch")
    from hashemb import _backend
    monkeypatch.setattr(_backend, "RECYCLE_BYTES", 1 << 16)
    monkeypatch.setattr(_backend, "_RECYCLED", [])
    robe = he.RobeZ(5003, 16, block=16)
    M = robe.init_weight()
    X = np.arange(8000).reshape(2000, 4)
    t = torch.from_numpy(he.embedding_bags(X, M, scheme=robe, num_tables=4))
    want = t.clone()
    for k in range(1, 5):
        he.embedding_bags(X * k + 7, M, scheme=robe, num_tables=4)
    assert torch.equal(t, want)


def test_saved_starts_of_entries_outside_every_bag_stay_in_bounds():
    """Offsets that end before the last entry (include_last_offset) leave
    entries outside every bag: forward writes no start for them, and they
    read 0 (a valid slot), so a backward handed that saved with offsets
    that do cover them stays in bounds; where every entry is in a bag,
    every start is the entry's slot."""
    robe = he.RobeZ(5003, 16, block=16)
    M = robe.init_weight()
    idx = np.arange(10) * 7919
    _, saved = he.embedding_bag(idx, M, np.array([0, 3, 6]), scheme=robe,
                                include_last_offset=True, return_saved=True)
    np.testing.assert_array_equal(saved.starts[:6], robe.slots(idx[:6])[:, 0])
    np.testing.assert_array_equal(saved.starts[6:], 0)
    g = np.ones((2, 16), np.float32)
    he.embedding_bag_backward(g, idx, np.array([0, 3, 10]), scheme=robe,
                              include_last_offset=True, weight=M, optimizer=he.SGD(0.1),
                              saved=saved)
    _, saved = he.embedding_bag(idx, M, np.array([0, 3, 10]), scheme=robe,
                                include_last_offset=True, return_saved=True)
    np.testing.assert_array_equal(saved.starts, robe.slots(idx)[:, 0])


def test_plain_lookups_and_tt_bags_take_recycled_outputs(monkeypatch):
    """he.embedding and he.tt_embedding_bag outputs from RECYCLE_BYTES on
    come from the recycled blocks too (values as from a fresh array)."""
    from hashemb import _backend
    monkeypatch.setattr(_backend, "RECYCLE_BYTES", 1 << 12)
    monkeypatch.setattr(_backend, "ALIGN_BYTES", 1 << 12)
    monkeypatch.setattr(_backend, "_RECYCLED", [])
    rng = np.random.default_rng(6)
    W = rng.standard_normal((500, 32)).astype(np.float32)
    x = rng.integers(0, 500, 300)
    out = he.embedding(x, W)
    assert out.base is _backend._RECYCLED[-1]
    np.testing.assert_array_equal(out, W[x])
    cores = he.tt_init(1000, [10, 10, 10], [2, 2, 4], [8, 8], seed=1)
    X = rng.integers(0, 1000, (300, 1))
    bag = he.tt_embedding_bag(X, cores)
    assert bag.base is _backend._RECYCLED[-1]
    np.testing.assert_allclose(bag, he.tt_to_full(cores)[X[:, 0]], rtol=1e-5, atol=1e-6)
