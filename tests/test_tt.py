"""TT-Rec tables: forward/backward against torch on the reconstructed table and
an independent pure-torch chain product, fused SGD/Adagrad against their rules,
shapes, initial moments, the LFU cache, the torch module and error paths."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fuzzing
import hashemb as he

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from hashemb.torch import TTEmbeddingBag, TTEmbeddingBagCollection


# ------------------------------------------------------------ independent oracle

def torch_chain_rows(cores, rows):
    """Rows of a TT table by explicit per-row chain products (no reshaping tricks
    shared with hashemb): W[x] = G0[x0] @ G1[x1] @ ... flattened q0-major."""
    p = [c.shape[0] for c in cores]
    out = []
    for x in rows.tolist():
        dig = []
        for pk in reversed(p):
            dig.append(x % pk)
            x //= pk
        dig = dig[::-1]
        # M has shape (prod q so far, R): rows enumerate output digits q0-major
        M = cores[0][dig[0]].reshape(cores[0].shape[2], cores[0].shape[3])
        for k in range(1, len(cores)):
            G = cores[k][dig[k]]                      # (R_k, q_k, R_k+1)
            M = torch.einsum("ar,rcs->acs", M, G).reshape(-1, G.shape[2])
        out.append(M.reshape(-1))
    return torch.stack(out)


def full_torch(cores, n):
    return torch_chain_rows(cores, torch.arange(n))


@st.composite
def tt_case(draw):
    d = draw(st.integers(2, 4))
    p = [draw(st.integers(1, 5)) for _ in range(d)]
    q = [draw(st.integers(1, 4)) for _ in range(d)]
    ranks = [draw(st.integers(1, 9)) for _ in range(d - 1)]
    N = int(np.prod(p))
    n = draw(st.integers(1, N))
    B = draw(st.integers(0, 6))
    lens = [draw(st.integers(0, 5)) for _ in range(B)]
    nnz = sum(lens)
    idx = draw(st.lists(st.integers(0, n - 1), min_size=nnz, max_size=nnz))
    mode = draw(st.sampled_from(["sum", "mean"]))
    weighted = mode == "sum" and draw(st.booleans())
    last = draw(st.booleans())
    itype = draw(st.sampled_from([np.int32, np.int64]))
    seed = draw(st.integers(0, 2**31))
    return d, p, q, ranks, n, lens, np.array(idx, itype), mode, weighted, last, seed


def _offsets(lens, last):
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return off if last else off[:-1]


@settings(max_examples=40, deadline=None)
@given(tt_case())
def test_forward_backward_match_torch(case):
    d, p, q, ranks, n, lens, idx, mode, weighted, last, seed = case
    rng = np.random.default_rng(seed)
    cores = he.tt_init(int(np.prod(p)), p, q, ranks, seed=seed % 1000, dtype=np.float64)
    off = _offsets(lens, last)
    psw = rng.standard_normal(idx.shape[0]) if weighted else None
    out = he.tt_embedding_bag(idx, cores, off, mode=mode, per_sample_weights=psw,
                              include_last_offset=last, num_embeddings=n)
    # 1. forward against F.embedding_bag on tt_to_full
    W = torch.tensor(he.tt_to_full(cores, n), requires_grad=True)
    ref = F.embedding_bag(torch.from_numpy(idx.astype(np.int64)), W,
                          torch.from_numpy(off), mode=mode,
                          per_sample_weights=None if psw is None else torch.from_numpy(psw),
                          include_last_offset=last)
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    # 2. backward to the cores against autograd through the independent chain
    G = rng.standard_normal(out.shape)
    grads = he.tt_embedding_bag_backward(G, idx, cores, off, mode=mode, per_sample_weights=psw,
                                         include_last_offset=last, num_embeddings=n)
    tc = [torch.tensor(c, requires_grad=True) for c in cores]
    Wt = full_torch(tc, n)
    np.testing.assert_allclose(Wt.detach().numpy(), W.detach().numpy(), rtol=1e-12, atol=1e-14)
    r2 = F.embedding_bag(torch.from_numpy(idx.astype(np.int64)), Wt, torch.from_numpy(off),
                         mode=mode,
                         per_sample_weights=None if psw is None else torch.from_numpy(psw),
                         include_last_offset=last)
    (r2 * torch.from_numpy(G)).sum().backward()
    for g, c in zip(grads, tc):
        assert g.shape == c.shape
        np.testing.assert_allclose(g, c.grad.numpy(), rtol=1e-9, atol=1e-12)
    # 3. with the forward's saved products: the same gradients
    out2, saved = he.tt_embedding_bag(idx, cores, off, mode=mode, per_sample_weights=psw,
                                      include_last_offset=last, num_embeddings=n,
                                      return_saved=True)
    np.testing.assert_array_equal(out2, out)
    grads2 = he.tt_embedding_bag_backward(G, idx, cores, off, mode=mode, per_sample_weights=psw,
                                          include_last_offset=last, num_embeddings=n,
                                          saved=saved)
    for a, b in zip(grads, grads2):
        np.testing.assert_array_equal(a, b)


def test_float32_large_ranks_2d_input():
    """The vectorised tiles (ranks >= 8, q = 4) in float32, 2-D input, duplicates."""
    p, q, r = [20, 22, 25], [4, 4, 4], [32, 32]
    cores = he.tt_init(11000, p, q, r, seed=3)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 11000, (64, 20))
    idx[:, 0] = 7                                          # a hot row
    out = he.tt_embedding_bag(idx, cores)
    W = he.tt_to_full(cores)
    ref = W[idx].sum(1)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=1e-6 * np.abs(ref).max())
    G = rng.standard_normal(out.shape).astype(np.float32)
    grads = he.tt_embedding_bag_backward(G, idx, cores)
    tc = [torch.tensor(c.astype(np.float64), requires_grad=True) for c in cores]
    rows = torch_chain_rows(tc, torch.from_numpy(np.unique(idx)))
    inv = torch.from_numpy(np.searchsorted(np.unique(idx), idx))
    (rows[inv].sum(1) * torch.from_numpy(G.astype(np.float64))).sum().backward()
    for g, c in zip(grads, tc):
        ref_g = c.grad.numpy()
        np.testing.assert_allclose(g, ref_g, rtol=1e-3, atol=1e-4 * np.abs(ref_g).max())


_CHAIN_BITS = r"""
import hashlib, numpy as np, hashemb as he
from hashemb._cpu import _tt
h = hashlib.sha1()
rng = np.random.default_rng(5)
for p, q, r in CHAINS:
    n = int(np.prod(p))
    idx = rng.integers(0, n, BATCH)
    for opt in (None, he.SGD(0.05), he.Adagrad(0.05)):
        cores = he.tt_init(n, p, q, r, seed=4)
        out = he.tt_embedding_bag(idx, cores)
        G = rng.standard_normal(out.shape).astype(np.float32)
        h.update(out.tobytes())
        if opt is None:
            for g in he.tt_embedding_bag_backward(G, idx, cores):
                h.update(g.tobytes())
        else:
            for _ in range(2):
                he.tt_embedding_bag_backward(G, idx, cores, optimizer=opt)
            for c in cores:
                h.update(c.tobytes())
print(_tt.gemm_lanes(), h.hexdigest())
"""


def _chain_bits(chains, batch):
    """A script printing the product lanes and a digest of the forward,
    gradients and two fused steps (SGD, Adagrad) of each (p, q, ranks) chain."""
    return _CHAIN_BITS.replace("CHAINS", repr(chains)).replace("BATCH", repr(batch))


# FBTT's q = 4 (the narrow last step, fused into the one before it) and a
# 4-core chain with a wider last core, both big enough for several threads
_THREADS_CODE = _chain_bits([([20, 22, 25], [4, 4, 4], [32, 32]),
                             ([6, 5, 7, 8], [2, 3, 2, 8], [8, 16, 8])], (400, 9))


def test_same_bits_on_any_thread_count():
    """Forward chunks and backward groups are handed out dynamically, and the
    last chain step runs fused per chunk: every output, gradient and fused
    update must still be the same bits on 1, 2 and 3 threads."""
    outs = fuzzing.outputs_by_threads(_THREADS_CODE)
    assert len(set(outs.values())) == 1, outs


# products (q * R and R of these chains) of 16, 32, 48, 96 and 128 columns,
# which take the 16-lane copy, beside widths that are no multiple of 16 and
# stay on the 8-lane one, with tails of 1..7 columns past its vectors
_LANES_CODE = _chain_bits([([20, 22, 25], [4, 4, 4], [32, 32]), ([9, 8, 7], [2, 4, 2], [16, 24]),
                           ([12, 10], [8, 6], [16]), ([9, 8, 7], [3, 5, 2], [17, 9]),
                           ([5, 6, 7], [2, 2, 3], [48, 31])], (300, 5))


def test_avx512_products_are_the_avx2_bits():
    """The 16-lane (AVX-512) copy of the chain products, where the CPU has
    it, gives the 8-lane copy's bits: each output a lane summed in index
    order with FMA in both (the last columns of a product too: padded vector
    tiles, not a scalar loop a compiler fuses under one target and not
    another). On a CPU without AVX-512 both runs take the 8-lane copy."""
    on = fuzzing.outputs_by_threads(_LANES_CODE, counts=("2",), HASHEMB_TT_AVX512="1")["2"]
    off = fuzzing.outputs_by_threads(_LANES_CODE, counts=("2",), HASHEMB_TT_AVX512="0")["2"]
    lanes_on, bits_on = on.split()
    lanes_off, bits_off = off.split()
    assert int(lanes_off) <= 8 and int(lanes_on) in (int(lanes_off), 16)
    assert bits_on == bits_off


def test_concurrent_calls_from_python_threads():
    """Python threads running TT lookups and gradients at once (the kernels
    drop the GIL) get what one thread gets: the chain's pooled scratch
    buffers go to one call at a time."""
    import threading
    p, q, r = [20, 22, 25], [4, 4, 4], [16, 16]
    cores = he.tt_init(11000, p, q, r, seed=3)
    rng = np.random.default_rng(1)
    jobs = [rng.integers(0, 11000, (256, 8)) for _ in range(6)]
    G = rng.standard_normal((256, 64)).astype(np.float32)
    want = [(he.tt_embedding_bag(x, cores), he.tt_embedding_bag_backward(G, x, cores))
            for x in jobs]
    got, errors = [None] * len(jobs), []

    def run(i):
        try:
            for _ in range(5):
                got[i] = (he.tt_embedding_bag(jobs[i], cores),
                          he.tt_embedding_bag_backward(G, jobs[i], cores))
                assert np.array_equal(got[i][0], want[i][0])
        except BaseException as e:          # (raised in the main thread below)
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for (o, gs), (wo, wgs) in zip(got, want):
        np.testing.assert_array_equal(o, wo)
        for g, wg in zip(gs, wgs):
            np.testing.assert_array_equal(g, wg)


def test_adjoint():
    """<forward(cores) linearised, g> is bilinear: backward is its adjoint in each core."""
    rng = np.random.default_rng(1)
    cores = he.tt_init(60, [3, 4, 5], [2, 3, 2], [3, 4], dtype=np.float64)
    idx = rng.integers(0, 60, 30)
    off = np.array([0, 10, 10, 30])
    G = rng.standard_normal((3, 12))
    grads = he.tt_embedding_bag_backward(G, idx, cores, off)
    for k in range(3):        # out is linear in core k: <out, G> = <core k, grad k>
        val = (he.tt_embedding_bag(idx, cores, off) * G).sum()
        assert math.isclose(val, float((cores[k] * grads[k]).sum()), rel_tol=1e-10)


# the second shape's last slices are 1 x 1: their transpose is no copy by itself
@pytest.mark.parametrize("q, ranks, D", [([2, 2, 4], [6, 5], 16), ([2, 2, 1], [6, 1], 4)])
@pytest.mark.parametrize("opt", ["sgd", "adagrad"])
def test_fused_optimizers_follow_the_rules(opt, q, ranks, D):
    rng = np.random.default_rng(2)
    cores = he.tt_init(200, [5, 8, 5], q, ranks, dtype=np.float64)
    idx = rng.integers(0, 100, 40)          # slices 3, 4 of core 0 are never touched
    off = np.arange(0, 41, 4)
    lr, eps = 0.05, 1e-8
    ref = [c.copy() for c in cores]
    optim = he.SGD(lr) if opt == "sgd" else he.Adagrad(lr, eps)
    state = [np.zeros_like(c) for c in cores]
    for step in range(3):
        G = rng.standard_normal((10, D))
        g = he.tt_embedding_bag_backward(G, idx, ref, off)     # dense gradient first
        for k in range(3):
            if opt == "sgd":
                ref[k] -= lr * g[k]
            else:
                state[k] += g[k] ** 2
                ref[k] -= lr * g[k] / (np.sqrt(state[k]) + eps)
        assert he.tt_embedding_bag_backward(G, idx, cores, off, optimizer=optim) is None
        for k in range(3):
            np.testing.assert_allclose(cores[k], ref[k], rtol=1e-12, atol=1e-14)
    if opt == "adagrad":       # the state: one accumulator per core element
        for k in range(3):
            np.testing.assert_allclose(optim.state_for(cores[k])[0].reshape(cores[k].shape),
                                       state[k], rtol=1e-12)
        assert (state[0][3:] == 0).all() and (optim.state_for(cores[0])[0] != 0).any()


def test_fused_with_saved_equals_recompute():
    rng = np.random.default_rng(3)
    a = he.tt_init(1000, [10, 10, 10], [4, 2, 2], [8, 8])
    b = [c.copy() for c in a]
    idx = rng.integers(0, 1000, (16, 5))
    G = rng.standard_normal((16, 16)).astype(np.float32)
    _, saved = he.tt_embedding_bag(idx, a, return_saved=True)
    he.tt_embedding_bag_backward(G, idx, a, saved=saved, optimizer=he.Adagrad(0.1))
    he.tt_embedding_bag_backward(G, idx, b, optimizer=he.Adagrad(0.1))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_table_batched_matches_single_tables():
    rng = np.random.default_rng(4)
    tables = [he.tt_init(100, [10, 10], [4, 4], [5], seed=1),
              he.tt_init(60, [3, 4, 5], [2, 1, 3], [2, 7], seed=2),
              he.tt_init(24, [2, 3, 2, 2], [1, 2, 2, 1], [2, 3, 2], seed=3)]
    sizes = [100, 55, 24]
    B = 7
    lens = rng.integers(0, 4, 3 * B)
    off = np.concatenate([[0], np.cumsum(lens)])
    idx = np.concatenate([rng.integers(0, sizes[t], lens[t * B:(t + 1) * B].sum())
                          for t in range(3)])
    out = he.tt_embedding_bags(idx, tables, off, num_embeddings=sizes)
    G = rng.standard_normal(out.shape).astype(np.float32)
    grads = he.tt_embedding_bags_backward(G, idx, tables, off, num_embeddings=sizes)
    col = 0
    for t, cores in enumerate(tables):
        o = off[t * B:(t + 1) * B + 1]
        seg, o = idx[o[0]:o[-1]], o - o[0]
        D = int(np.prod([c.shape[2] for c in cores]))
        np.testing.assert_allclose(out[:, col:col + D], he.tt_embedding_bag(seg, cores, o),
                                   rtol=1e-6, atol=1e-7)
        g1 = he.tt_embedding_bag_backward(G[:, col:col + D], seg, cores, o)
        for a, b in zip(grads[t], g1):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        col += D
    x = rng.integers(0, 24, (5, 3))                         # 2-D (B, T)
    np.testing.assert_allclose(
        he.tt_embedding_bags(x, tables),
        np.concatenate([he.tt_to_full(c)[x[:, t]] for t, c in enumerate(tables)], 1),
        rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ shapes and init

@pytest.mark.parametrize("n", [1, 7, 1000, 1_000_000, 1_000_003, 11_000_000, 33_762_577, 2**31 - 1])
@pytest.mark.parametrize("d", [2, 3, 4])
def test_tt_shapes_properties(n, d):
    D = 64
    p, q = he.tt_shapes(n, D, d)
    assert len(p) == len(q) == d
    assert int(np.prod(q)) == D
    assert n <= int(np.prod(p)) <= max(n * 1.1, n)
    assert p == sorted(p, reverse=True)
    # balance: no factorisation of prod(p) (nor of n itself) is more balanced
    m = int(np.prod(p))
    ent = he.tt._entropy(p)
    for f in he.tt._factorisations(m, d) + he.tt._factorisations(n, d):
        assert he.tt._entropy(f) <= ent + 1e-12


@settings(max_examples=300, deadline=None)
@given(n=st.one_of(st.integers(1, 10**6), st.sampled_from([720720, 479001600, 963761198400])),
       d=st.integers(2, 4))
def test_most_balanced_is_the_best_of_every_factorisation(n, d):
    # the branch and bound against the exhaustive list (68 s at 963,761,198,400
    # in 4 cores: it ran on every tt_shapes); ties as max() over that list
    if n > 10**9 and d == 4:
        n = 963761198400 // 1000       # (the list itself is too slow there)
    every = he.tt._factorisations(n, d)
    want = max(every, key=lambda f: (round(he.tt._entropy(f), 12), -f[0]))
    assert he.tt._most_balanced(n, d) == want


def test_tt_shapes_examples():
    assert he.tt_shapes(11_000_000, 64) == ([250, 220, 200], [4, 4, 4])
    assert he.tt_shapes(1_000_000, 64) == ([100, 100, 100], [4, 4, 4])
    p, _ = he.tt_shapes(1_000_003, 16)          # a prime: rounded up, balanced
    assert max(p) / min(p) < 1.1
    assert he.tt_shapes(1_000_003, 16, round_up=False)[0] == [1_000_003, 1, 1]


@settings(max_examples=300, deadline=None)
@given(n=st.one_of(st.integers(1, 10**7),
                   st.tuples(st.integers(2, 10**5), st.integers(2, 10**5)).map(
                       lambda ab: ab[0] * ab[1])))
def test_prime_factors_against_trial_division(n):
    def ref(m):
        out, f = [], 2
        while f * f <= m:
            while m % f == 0:
                out.append(f)
                m //= f
            f += 1
        return out + ([m] if m > 1 else [])
    assert he.tt._prime_factors(n) == ref(n)


def test_tt_shapes_of_huge_hard_sizes_is_quick():
    # trial division took 88 s for the prime 2**61 - 1 (an allowed
    # num_embeddings); Pollard's rho splits semiprimes of two 31-bit primes
    import time
    big = [2**61 - 1, (2**31 - 1) * (2**30 - 35), 1000003**2 * 7, 2**60, 3**38]
    t = time.perf_counter()
    for n in big:
        f = he.tt._prime_factors(n)
        assert math.prod(f) == n and all(he.tt._is_prime(x) for x in f)
    assert he.tt._prime_factors(big[1]) == [2**30 - 35, 2**31 - 1]
    p, _ = he.tt_shapes(2**61 - 1, 16)
    assert 2**61 - 1 <= math.prod(p) <= (2**61 - 1) * 1.1
    assert time.perf_counter() - t < 10


def _entry_moments(kind, n, shapes, D):
    """Exact mean and variance of one full-table entry under tt_init's documented
    core law (i.i.d. entries with mean m1 and second moment m2), by a transfer
    matrix over pairs of rank paths."""
    d = len(shapes)
    P = float(np.prod([s[3] for s in shapes[:-1]]))
    if kind == "approx-normal":
        s2 = (3.0 * n * P) ** (-1.0 / d)
        m1, m2 = 0.0, s2
    elif kind == "approx-uniform":
        b = math.sqrt(3.0) * (3.0 * n * P) ** (-1.0 / (2 * d))
        m1, m2 = 0.0, b * b / 3
    elif kind == "normal":
        sig = 1.0 / (math.sqrt(n) * shapes[0][3])
        m1, m2 = 0.0, sig * sig
    else:
        c = (2.0 / (n + D)) ** (1.0 / (2 * d)) * P ** (-1.0 / (2 * d))
        m1, m2 = c / 2, c * c / 3
    mean = P * m1 ** d
    v = np.ones(1)                                   # over pairs (r, r') of rank 0
    for (_, Ra, _, Rb) in shapes:
        M = np.full((Ra * Ra, Rb * Rb), m1 * m1)
        for r in range(Ra):
            for s in range(Rb):
                M[r * Ra + r, s * Rb + s] = m2
        v = v @ M
    return mean, float(v.sum()) - mean ** 2


@pytest.mark.parametrize("kind", he.tt.WEIGHT_DISTS)
def test_weight_dist_moments(kind):
    """Mean and variance of the full table's entries over seeds against the exact
    moments; the tolerance is 4 standard errors of the across-seed spread."""
    n, p, q, r = 400, [5, 8, 10], [2, 2, 2], [3, 4]
    shapes = he.tt_core_shapes(p, q, r)
    mean, var = _entry_moments(kind, n, shapes, 8)
    ms, vs = [], []
    for seed in range(60):
        W = he.tt_to_full(he.tt_init(n, p, q, r, kind, seed=seed, dtype=np.float64), n)
        ms.append(W.mean())
        vs.append(((W - mean) ** 2).mean())
    ms, vs = np.array(ms), np.array(vs)
    assert abs(ms.mean() - mean) <= 4 * ms.std(ddof=1) / math.sqrt(len(ms)) + 1e-15
    assert abs(vs.mean() - var) <= 4 * vs.std(ddof=1) / math.sqrt(len(vs))
    if kind.startswith("approx"):
        assert math.isclose(var, 1 / (3 * n), rel_tol=1e-12)


# ------------------------------------------------------------ cache

def test_cache_same_forward_then_trains_cached_rows():
    rng = np.random.default_rng(5)
    cores = he.tt_init(1000, [10, 10, 10], [4, 2, 2], [8, 8], dtype=np.float64)
    idx = np.concatenate([np.full(50, 3), np.full(30, 7), rng.integers(0, 1000, 40)])
    rng.shuffle(idx)
    off = np.arange(0, 121, 6)
    cache = he.TTCache(2, 16, dtype=np.float64)
    cache.count(idx)
    cache.populate(cores)
    assert list(cache.rows) == [3, 7]
    plain = he.tt_embedding_bag(idx, cores, off)
    cached = he.tt_embedding_bag(idx, cores, off, cache=cache)
    np.testing.assert_allclose(cached, plain, rtol=1e-13, atol=1e-15)
    G = rng.standard_normal(plain.shape)
    g_plain = he.tt_embedding_bag_backward(G, idx, cores, off)
    g = he.tt_embedding_bag_backward(G, idx, cores, off, cache=cache)
    # cached rows' gradient goes to the cache: the row gradient of W[3], W[7]
    Wt = torch.tensor(he.tt_to_full(cores), requires_grad=True)
    (F.embedding_bag(torch.from_numpy(idx), Wt, torch.from_numpy(off), mode="sum",
                     include_last_offset=True)
     * torch.from_numpy(G)).sum().backward()
    np.testing.assert_allclose(g[-1][:2], Wt.grad.numpy()[[3, 7]], rtol=1e-12)
    # and the cores get the gradient of the other rows only
    keep = ~np.isin(idx, [3, 7])
    w = np.where(keep, 1.0, 0.0)
    g_rest = he.tt_embedding_bag_backward(G, idx, cores, off, per_sample_weights=w)
    for a, b in zip(g[:3], g_rest):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    assert not np.allclose(g[0], g_plain[0])
    # fused SGD trains the cached copy directly
    before = cache.weight.copy()
    he.tt_embedding_bag_backward(G, idx, cores, off, cache=cache, optimizer=he.SGD(0.1))
    np.testing.assert_allclose(cache.weight[:2], before[:2] - 0.1 * g[-1][:2], rtol=1e-12)
    # and fused Adagrad: the rule on the rows hit, from their summed gradient
    # (the step takes only those rows, not the whole cache's zeros)
    before, ada = cache.weight.copy(), he.Adagrad(0.1, eps=1e-3)
    he.tt_embedding_bag_backward(G, idx, cores, off, cache=cache, optimizer=ada)
    acc = ada.state_for(cache.weight)[0].reshape(cache.weight.shape)
    np.testing.assert_allclose(acc[:2], g[-1][:2] ** 2, rtol=1e-12)
    np.testing.assert_allclose(cache.weight[:2], before[:2] - 0.1 * g[-1][:2] / (
        np.abs(g[-1][:2]) + 1e-3), rtol=1e-12)
    # eviction: a row leaving the cache reverts to its (untrained) TT value
    cache.count(np.full(500, 11))
    cache.count(np.full(400, 12))
    cache.populate(cores)
    assert list(cache.rows) == [11, 12]
    np.testing.assert_allclose(he.tt_embedding_bag(np.array([3]), cores, np.array([0, 1]),
                                                   cache=cache)[0],
                               he.tt_to_full(cores)[3], rtol=1e-13)


def test_cache_slots_are_stable_and_fused_state_stays_with_its_row():
    # populate re-sorted the cached rows without their optimizer state: a row
    # coming in took an evicted row's Adagrad sums (its first step 22x too
    # small) and a row that stayed restarted from another's
    cores = he.tt_init(1000, [10, 10, 10], [2, 2, 2], [4, 4], dtype=np.float64)
    full = he.tt_to_full(cores)
    cache = he.TTCache(2, 8, dtype=np.float64)
    cache.count(np.array([5, 5, 7, 7, 7]))
    ada = he.Adagrad(0.1, eps=1e-10)
    np.testing.assert_array_equal(cache.populate(cores, optimizer=ada), [0, 1])
    assert list(cache.rows) == [5, 7]
    one = np.array([0, 1])
    for _ in range(3):                                  # train row 7 (slot 1)
        he.tt_embedding_bag_backward(np.ones((1, 8)), np.array([7]), cores, one,
                                     cache=cache, optimizer=ada)
    trained7, acc = cache.weight[1].copy(), ada.state_for(cache.weight)[0].reshape(2, 8)
    assert (acc[1] == 3).all() and (acc[0] == 0).all()
    cache.count(np.full(9, 9))                          # 9 and 7 now the two most used
    np.testing.assert_array_equal(cache.populate(cores, optimizer=ada), [0])
    assert list(cache.rows) == [9, 7] and cache.num_cached == 2
    np.testing.assert_array_equal(cache.weight[1], trained7)     # kept, slot and value
    np.testing.assert_allclose(cache.weight[0], full[9], rtol=1e-13)    # new, from the cores
    assert (acc[1] == 3).all() and (acc[0] == 0).all()           # 9 starts afresh
    he.tt_embedding_bag_backward(np.ones((1, 8)), np.array([9]), cores, one, cache=cache,
                                 optimizer=ada)
    np.testing.assert_allclose(cache.weight[0], full[9] - 0.1 / (1 + 1e-10), rtol=1e-12)
    np.testing.assert_array_equal(cache.slots(np.array([7, 9, 5])), [1, 0, -1])
    # a lookup reads each row from its slot
    got = he.tt_embedding_bag(np.array([9, 7, 5]), cores, np.arange(4), cache=cache)
    np.testing.assert_array_equal(got[:2], np.stack([cache.weight[0], trained7]))
    np.testing.assert_allclose(got[2], full[5], rtol=1e-13)
    # fewer rows than slots (none past num_embeddings): the freed slot holds zeros
    np.testing.assert_array_equal(cache.populate(cores, num_embeddings=6, optimizer=ada), [0, 1])
    assert list(cache.rows) == [5, -1] and (cache.weight[1] == 0).all() and (acc == 0).all()
    with pytest.raises(TypeError, match="optimizer"):
        cache.populate(cores, optimizer="adagrad")
    with pytest.raises(ValueError, match="rows: expected distinct"):
        cache.rows = [3, 3]
    # a cache pickled when rows was a plain sorted attribute
    import pickle
    old = pickle.loads(pickle.dumps(cache))
    old.__dict__.pop("_rows"), old.__dict__.pop("_ids"), old.__dict__.pop("_slot_of")
    state = dict(old.__dict__, rows=np.array([4, 7]))
    fresh = he.TTCache.__new__(he.TTCache)
    fresh.__setstate__(state)
    np.testing.assert_array_equal(fresh.slots(np.array([7, 4, 5])), [1, 0, -1])


@pytest.mark.parametrize("sparse", [True, False])
def test_module_cache_populate_keeps_optimizer_state_with_its_row(sparse):
    # sparse: the fused Adagrad's accumulators; dense: a torch Adagrad's, by
    # slot, which the returned changed slots let the caller zero
    torch.manual_seed(0)
    kw = dict(use_cache=True, cache_size=2, seed=1, dtype=torch.float64)
    m = TTEmbeddingBag(1000, 8, [4, 4], sparse=sparse, optimizer="adagrad",
                       learning_rate=0.1, **kw) if sparse else \
        TTEmbeddingBag(1000, 8, [4, 4], **kw)
    opt = None if sparse else torch.optim.Adagrad(m.parameters(), lr=0.1)
    m.train()
    m(torch.tensor([[5, 5, 7, 7, 7]]))
    assert [s.tolist() for s in m.cache_populate()] == [[0, 1]]
    for _ in range(3):                                      # rows 5 and 7 train
        m(torch.tensor([[7, 5]])).sum().backward()
        if opt:
            opt.step()
            opt.zero_grad()
    acc = (m.optimizer_state_3 if sparse else opt.state[m.cache_weights[0]]["sum"]).clone()
    assert (acc > 0).all()
    m(torch.full((1, 9), 9))
    changed = m.cache_populate()
    assert [s.tolist() for s in changed] == [[0]]
    assert list(m._cache_objs[0].rows) == [9, 7]
    now = m.optimizer_state_3 if sparse else opt.state[m.cache_weights[0]]["sum"]
    torch.testing.assert_close(now[1], acc[1])              # 7's sums, still in its slot
    # 9 took 5's slot: the fused sums start at zero, torch's are the caller's to zero
    assert torch.equal(now[0], torch.zeros_like(now[0]) if sparse else acc[0])
    assert TTEmbeddingBag(10, 8, [2, 2]).cache_populate()[0].size == 0


def test_module_cache_on_off_same_forward():
    torch.manual_seed(0)
    x = torch.randint(0, 500, (64, 4))
    x[:, 0] = 9
    a = TTEmbeddingBag(500, 8, [4, 4], use_cache=True, cache_size=16, seed=1)
    b = TTEmbeddingBag(500, 8, [4, 4], seed=1)
    a.train()
    a(x)                                   # counts frequencies
    a.cache_populate()
    assert 9 in a._cache_objs[0].rows
    torch.testing.assert_close(a(x), b(x))


def test_cache_frequency_table_stops_inserting_at_three_quarters():
    # a full linear-probing table scans every slot for each new row (300x
    # slower counts): new rows stop at 3/4 of the slots, known rows still count
    c = he.TTCache(4, 2, hashtbl_size=1024)
    c.count(np.arange(2000))
    assert np.count_nonzero(c.keys >= 0) == 768
    held = c.keys[c.keys >= 0]
    assert set(held) <= set(range(2000)) and len(set(held)) == 768
    c.count(np.repeat(held[:3], 5))
    c.count(np.arange(5000, 6000))          # no room: not counted
    assert np.count_nonzero(c.keys >= 0) == 768
    assert sorted(c.freq[np.isin(c.keys, held[:3])]) == [6, 6, 6]
    c.populate(he.tt_init(10_000, [10, 10, 100], [1, 1, 2], [2, 2]))
    np.testing.assert_array_equal(c.rows, np.sort(held[:3].tolist() + [min(
        set(held) - set(held[:3].tolist()))]))
    c.reset()
    c.count(np.arange(5000, 6000))          # room again after reset
    assert np.count_nonzero(c.keys >= 0) == 768
    with pytest.raises(ValueError, match=r"hashtbl_size: expected at least 4/3 capacity = 1334"):
        he.TTCache(1000, 2, hashtbl_size=1000)      # could not hold 1000 rows' counts


def test_collection_with_caches_takes_dense_gradients():
    # two tables with caches: backward's gradients come per table (cores, then
    # cache) but the parameters are all cores, then all caches (it raised)
    torch.manual_seed(0)
    x = torch.randint(0, 20, (32, 2))
    x[:, 0] = 5
    a = TTEmbeddingBagCollection([50, 20], 4, [2, 2], use_cache=True, cache_size=2, seed=3,
                                 dtype=torch.float64)
    b = TTEmbeddingBagCollection([50, 20], 4, [2, 2], seed=3, dtype=torch.float64)
    a.train()
    a(x)
    a.cache_populate()
    G = torch.randn(32, 8, dtype=torch.float64)
    (a(x) * G).sum().backward()
    (b(x) * G).sum().backward()
    # the whole gradient of each table's rows: the cores' (uncached rows) plus
    # the cache's (cached rows), as the uncached module's of every row
    for t in range(2):
        rows = torch.from_numpy(a._cache_objs[t].rows)
        W = b.full_weights()[t].detach().requires_grad_()
        (F.embedding(x[:, t], W) * G[:, 4 * t:4 * t + 4]).sum().backward()
        torch.testing.assert_close(a.cache_weights[t].grad[:len(rows)], W.grad[rows])
    # the cores': the uncached module's with the cached rows weighted 0
    keep = torch.stack([~torch.isin(x[:, t], torch.from_numpy(a._cache_objs[t].rows))
                        for t in range(2)], 1).double()
    c = TTEmbeddingBagCollection([50, 20], 4, [2, 2], seed=3, dtype=torch.float64)
    (c(x, per_sample_weights=keep) * G).sum().backward()
    assert len(list(a.tt_cores)) == 6
    for pa, pc in zip(a.tt_cores, c.tt_cores):
        torch.testing.assert_close(pa.grad, pc.grad)


def test_module_cache_sizes_a_table():
    """cache_size as one size a table: each table's cache holds that many rows
    (0: none), the memory counts just those, a table with a cache of every
    one of its rows reads and trains them all in the cache, and the others
    train as they would with an int size."""
    torch.manual_seed(0)
    x = torch.stack([torch.randint(0, 5, (64,)), torch.randint(0, 900, (64,)),
                     torch.randint(0, 300, (64,))], 1)
    kw = dict(use_cache=True, seed=2, sparse=True, learning_rate=0.5)
    a = TTEmbeddingBagCollection([5, 900, 300], 8, [3, 3], cache_size=[5, 16, 0], **kw)
    assert [c.capacity for c in a._cache_objs] == [5, 16, 0]
    plain = TTEmbeddingBagCollection([5, 900, 300], 8, [3, 3], seed=2)
    assert a.memory_bytes() == plain.memory_bytes() + (5 + 16) * 8 * 4
    b = TTEmbeddingBagCollection([5, 900, 300], 8, [3, 3], cache_size=16, **kw)
    for m in (a, b):
        m(x)
        m.cache_populate()
    assert a._cache_objs[0].num_cached == 5 and a._cache_objs[2].num_cached == 0
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)      # same rows, same values
    before = [c.detach().clone() for c in a.tt_cores[:3]]
    for m in (a, b):
        m(x).sum().backward()
    assert all(torch.equal(p, q) for p, q in zip(a.tt_cores[:3], before))   # table 0 all cached
    # table 1 (16 rows in both) trains the same; table 2 (none cached here) does not
    assert all(torch.equal(p, q) for p, q in zip(a.tt_cores[3:6], b.tt_cores[3:6]))
    torch.testing.assert_close(a.cache_weights[1], b.cache_weights[1], rtol=0, atol=0)
    assert not all(torch.equal(p, q) for p, q in zip(a.tt_cores[6:], b.tt_cores[6:]))
    with pytest.raises(ValueError, match=r"^cache_size: expected an int or 3 sizes"):
        TTEmbeddingBagCollection([5, 900, 300], 8, [3, 3], cache_size=[5, 16], **kw)
    with pytest.raises(ValueError, match=r"^cache_size: expected > 0 with use_cache=True"):
        TTEmbeddingBagCollection([5, 900, 300], 8, [3, 3], cache_size=[0, 0, 0], **kw)


def test_module_cache_survives_state_dict_round_trip(tmp_path):
    # which rows are cached is not a parameter: it travels in the extra state,
    # else the loaded module reads its trained cached rows from the cores
    kw = dict(use_cache=True, cache_size=16, seed=1, sparse=True, learning_rate=0.5)
    torch.manual_seed(0)
    x = torch.randint(0, 500, (64, 3))
    x[:, 0] = 7
    a = TTEmbeddingBag(500, 8, [4, 4], **kw)
    a.train()
    a(x)
    a.cache_populate()
    a(x).sum().backward()
    a.eval()
    torch.save(a.state_dict(), tmp_path / "tt.pt")
    b = TTEmbeddingBag(500, 8, [4, 4], **kw)
    b.load_state_dict(torch.load(tmp_path / "tt.pt", weights_only=True))
    b.eval()
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    np.testing.assert_array_equal(b._cache_objs[0].rows, a._cache_objs[0].rows)
    b.train()                                   # the frequencies went along too
    a.train()
    a(x)
    b(x)
    np.testing.assert_array_equal(b._cache_objs[0].freq, a._cache_objs[0].freq)
    c = TTEmbeddingBag(500, 8, [4, 4], **dict(kw, hashtbl_size=2048))
    with pytest.raises(ValueError, match="hashtbl_size"):
        c.load_state_dict(a.state_dict())
    d = TTEmbeddingBag(500, 8, [4, 4], seed=1)          # no caches: the cores alone
    d.load_state_dict(a.state_dict(), strict=False)
    assert all(torch.equal(p, q) for p, q in zip(d.tt_cores, a.tt_cores))
    # a state saved before the caches travelled (no extra state) loads strictly
    old = {k: v for k, v in TTEmbeddingBag(500, 8, [4, 4]).state_dict().items()
           if k != "_extra_state"}
    TTEmbeddingBag(500, 8, [4, 4]).load_state_dict(old)
    c2 = TTEmbeddingBagCollection([500, 500], 8, [4, 4], use_cache=True, cache_size=16)
    with pytest.raises(ValueError, match="expected 2 LFU caches"):
        c2.set_extra_state(a.get_extra_state())


# ------------------------------------------------------------ torch module

def test_module_matches_embedding_bag_and_conventions():
    torch.manual_seed(0)
    emb = TTEmbeddingBag(300, 12, [5, 6], dtype=torch.float64, mode="mean")
    W = emb.full_weight()
    idx = torch.randint(0, 300, (20,))
    off = torch.tensor([0, 3, 3, 11, 20])
    ref = F.embedding_bag(idx, W, off, mode="mean", include_last_offset=True)
    torch.testing.assert_close(emb(idx, off), ref)
    emb2 = TTEmbeddingBag(300, 12, [5, 6], dtype=torch.float64, include_last_offset=False)
    torch.testing.assert_close(emb2(idx, off[:-1]), F.embedding_bag(idx, W, off[:-1], mode="sum"))
    x2 = idx.reshape(4, 5)
    torch.testing.assert_close(emb2(x2), F.embedding_bag(x2, W, mode="sum"))


def test_module_inference_and_frozen_cores():
    """no_grad gives the same values with no graph; frozen cores (all
    requires_grad False) take no fused step even when per-sample weights
    take a gradient."""
    torch.manual_seed(0)
    emb = TTEmbeddingBag(300, 12, [5, 6], optimizer="sgd", learning_rate=0.5, sparse=True)
    idx, off = torch.randint(0, 300, (20,)), torch.tensor([0, 3, 3, 11, 20])
    psw = torch.rand(20)
    want = emb(idx, off, psw)
    with torch.no_grad():
        got = emb(idx, off, psw)
    assert got.grad_fn is None and torch.equal(got, want)
    before = [c.detach().clone() for c in emb.tt_cores]
    for c in emb.tt_cores:
        c.requires_grad_(False)
    p = psw.clone().requires_grad_()
    emb(idx, off, p).sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(torch.equal(c, b) for c, b in zip(emb.tt_cores, before))
    for c in emb.tt_cores:
        c.requires_grad_(True)
    emb(idx, off).sum().backward()
    assert not all(torch.equal(c, b) for c, b in zip(emb.tt_cores, before))


def test_gradcheck_module_float64():
    torch.manual_seed(0)
    emb = TTEmbeddingBag(40, 6, [3, 2], tt_p_shapes=[2, 4, 5], tt_q_shapes=[3, 1, 2],
                         dtype=torch.float64)
    idx = torch.tensor([1, 5, 5, 39, 0, 17])
    off = torch.tensor([0, 2, 2, 6])
    psw = torch.rand(6, dtype=torch.float64, requires_grad=True)

    def f(psw, *cores):
        return emb(idx, off, psw)
    assert torch.autograd.gradcheck(f, (psw, *emb.tt_cores))


def test_module_sparse_fused_sgd_and_adagrad():
    torch.manual_seed(0)
    idx = torch.randint(0, 1000, (32, 3))
    for opt in ("sgd", "adagrad"):
        dense = TTEmbeddingBag(1000, 8, [4, 4], dtype=torch.float64, seed=2)
        fused = TTEmbeddingBag(1000, 8, [4, 4], dtype=torch.float64, seed=2, sparse=True,
                               optimizer=opt, learning_rate=0.05)
        topt = (torch.optim.SGD if opt == "sgd" else
                lambda p, lr: torch.optim.Adagrad(p, lr=lr, eps=1e-10,
                                                  initial_accumulator_value=0.0))(
            dense.parameters(), lr=0.05)
        for _ in range(3):
            G = torch.randn(32, 8, dtype=torch.float64)
            topt.zero_grad()
            (dense(idx) * G).sum().backward()
            topt.step()
            (fused(idx) * G).sum().backward()
            assert all(p.grad is None for p in fused.tt_cores)
        for a, b in zip(dense.tt_cores, fused.tt_cores):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert he.torch.dense_parameters(fused) == []


def test_collection_and_ranks_for_compression():
    from hashemb.torch.tt import tt_ranks_for_compression
    sizes = [5000, 20000, 3]
    r = tt_ranks_for_compression(sizes, 16, 20)
    emb = TTEmbeddingBagCollection(sizes, 16, r)
    assert sum(p.numel() for p in emb.parameters()) <= sum(sizes) * 16 / 20
    x = torch.stack([torch.randint(0, n, (10,)) for n in sizes], 1)
    out = emb(x)
    ref = torch.cat([W[x[:, t]] for t, W in enumerate(emb.full_weights())], 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # (0 divided by zero; a negative or NaN one returned rank 1)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="compression: expected a finite number > 0"):
            tt_ranks_for_compression(sizes, 16, bad)
    with pytest.raises(ValueError, match="num_embeddings"):
        tt_ranks_for_compression([], 16, 20)


# ------------------------------------------------------------ errors

def test_errors():
    cores = he.tt_init(100, [10, 10], [4, 4], [5])
    idx, off = np.array([1, 2]), np.array([0, 2])
    # row ids are int64: more rows than that is named (an OverflowError before)
    with pytest.raises(ValueError, match=r"cores: expected prod\(p\) <= 2\*\*62 rows"):
        he.tt_embedding_bag(np.array([5]), [np.zeros((65536, 1, 1, 1), np.float32)] * 4,
                            np.array([0, 1]))
    with pytest.raises(IndexError, match="indices"):
        he.tt_embedding_bag(np.array([100]), cores, np.array([0, 1]))
    with pytest.raises(IndexError, match="indices"):
        he.tt_embedding_bag(np.array([50]), cores, np.array([0, 1]), num_embeddings=50)
    with pytest.raises(IndexError):
        he.tt_embedding_bag(np.array([-1]), cores, np.array([0, 1]))
    with pytest.raises(TypeError, match="indices"):
        he.tt_embedding_bag(np.array([1.5]), cores, np.array([0, 1]))
    with pytest.raises(TypeError, match="cores"):
        he.tt_embedding_bag(idx, cores[0], off)
    with pytest.raises(ValueError, match="cores"):
        he.tt_embedding_bag(idx, cores[:1], off)
    with pytest.raises(ValueError, match=r"cores\[1\]"):
        he.tt_embedding_bag(idx, [cores[0], cores[1][:, :3]], off)
    with pytest.raises(TypeError, match=r"cores\[1\]"):
        he.tt_embedding_bag(idx, [cores[0], cores[1].astype(np.float64)], off)
    with pytest.raises(ValueError, match="mode"):
        he.tt_embedding_bag(idx, cores, off, mode="max")
    with pytest.raises(ValueError, match="offsets"):
        he.tt_embedding_bag(idx, cores, np.array([0, 3]))
    with pytest.raises(ValueError, match="offsets"):
        he.tt_embedding_bag(idx, cores, np.array([1, 2]))
    with pytest.raises(ValueError, match="per_sample_weights"):
        he.tt_embedding_bag(idx, cores, off, per_sample_weights=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="per_sample_weights"):
        he.tt_embedding_bag(idx, cores, off, mode="mean", per_sample_weights=np.ones(2))
    with pytest.raises(ValueError, match="grad_output"):
        he.tt_embedding_bag_backward(np.ones((2, 16), np.float32), idx, cores, off)
    with pytest.raises(TypeError, match="optimizer"):
        he.tt_embedding_bag_backward(np.ones((1, 16), np.float32), idx, cores, off,
                                     optimizer="sgd")
    ro = [c.copy() for c in cores]
    ro[0].flags.writeable = False
    with pytest.raises(ValueError, match=r"cores\[0\]"):
        he.tt_embedding_bag_backward(np.ones((1, 16), np.float32), idx, ro, off,
                                     optimizer=he.SGD(0.1))
    _, saved = he.tt_embedding_bag(idx, cores, off, return_saved=True)
    with pytest.raises(ValueError, match="saved"):
        he.tt_embedding_bag_backward(np.ones((1, 16), np.float32), np.array([1, 2, 3]), cores,
                                     np.array([0, 3]), saved=saved)
    with pytest.raises(ValueError, match="weight_dist"):
        he.tt_init(100, [10, 10], [4, 4], [5], "xavier")
    with pytest.raises(ValueError, match="p"):
        he.tt_init(101, [10, 10], [4, 4], [5])
    with pytest.raises(ValueError, match="tt_ranks"):
        he.tt_init(100, [10, 10], [4, 4], [5, 5])
    with pytest.raises(ValueError, match="num_cores"):
        he.tt_shapes(100, 16, 5)
    with pytest.raises(ValueError, match="tt_q_shapes"):
        TTEmbeddingBag(100, 16, [4, 4], tt_q_shapes=[2, 2, 2])
    emb = TTEmbeddingBag(100, 16, [4, 4])
    with pytest.raises(TypeError, match="input"):
        emb(torch.tensor([1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="offsets"):
        emb(torch.tensor([1, 2]))
    with pytest.raises(IndexError):
        emb(torch.tensor([[100]]))


def test_module_input_on_another_device_is_a_type_error():
    emb = TTEmbeddingBag(100, 4, [3, 3])
    idx = torch.tensor([1, 2], device="meta")
    with pytest.raises(TypeError, match=r"^input: expected a tensor on cpu \(the cores' device\)"):
        emb(idx, torch.tensor([0, 2], device="meta"))


@pytest.mark.parametrize("use_cache", [False, True])
def test_torch_module_differentiates_the_cores_its_forward_read(use_cache):
    """functional_call's replacement cores: forward reads them, and backward
    gives their gradients (it had read the module's own cores back, which
    functional_call restores before backward: wrong gradients); a core
    changed in place between forward and backward is refused, as torch
    refuses it for its own functions."""
    import copy
    torch.manual_seed(0)
    m = TTEmbeddingBag(1000, 8, [4, 4], use_cache=use_cache, cache_size=8,
                       dtype=torch.float64)
    x = torch.randint(0, 1000, (6, 2))
    if use_cache:
        m(x)                    # counts, then cache the most used rows
        m.cache_populate()
    ref = copy.deepcopy(m)
    new = {n: (p.detach() * 2).requires_grad_() for n, p in m.named_parameters()}
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(2)
    out = torch.func.functional_call(m, new, (x,))
    want = ref(x)
    torch.testing.assert_close(out, want)
    (out ** 2).sum().backward()
    (want ** 2).sum().backward()
    for (name, p), q in zip(new.items(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert all(p.grad is None for p in m.parameters())
    out = m(x)
    with torch.no_grad():
        m.tt_cores[0].mul_(2)
    with pytest.raises(RuntimeError, match="inplace"):
        out.sum().backward()


def test_cache_gradient_in_mean_mode_is_the_row_gradient():
    """Cached rows in mean mode take 1/|bag| of the bag's gradient, as the
    full table's rows (only sum mode was tested with a cache)."""
    rng = np.random.default_rng(5)
    cores = he.tt_init(1000, [10, 10, 10], [4, 2, 2], [8, 8], dtype=np.float64)
    idx = np.concatenate([np.full(50, 3), np.full(30, 7), rng.integers(0, 1000, 40)])
    rng.shuffle(idx)
    off = np.array([0, 1, 4, 10, 30, 31, 60, 120])        # bags of 1, 3, 6, 20, 1, 29, 60
    cache = he.TTCache(2, 16, dtype=np.float64)
    cache.count(idx)
    cache.populate(cores)
    assert list(cache.rows) == [3, 7]
    np.testing.assert_allclose(he.tt_embedding_bag(idx, cores, off, mode="mean", cache=cache),
                               he.tt_embedding_bag(idx, cores, off, mode="mean"), rtol=1e-12)
    G = rng.standard_normal((len(off) - 1, 16))
    g = he.tt_embedding_bag_backward(G, idx, cores, off, mode="mean", cache=cache)
    Wt = torch.tensor(he.tt_to_full(cores), requires_grad=True)
    (F.embedding_bag(torch.from_numpy(idx), Wt, torch.from_numpy(off), mode="mean",
                     include_last_offset=True) * torch.from_numpy(G)).sum().backward()
    np.testing.assert_allclose(g[-1][:2], Wt.grad.numpy()[[3, 7]], rtol=1e-12)


@pytest.mark.parametrize("convert", ["half", "bfloat16"])
def test_module_of_16_bit_cores_is_refused_by_name(convert):
    """TT tables compute in float32 or float64: a module converted with
    .half() or .bfloat16() is refused naming its cores and the way back
    (the error had named tables[0][0] of a call the user never made)."""
    m = getattr(TTEmbeddingBag(100, 4, [2, 2]), convert)()
    with pytest.raises(TypeError, match=r"tt_cores: expected float32 or float64 .* \.float\(\)"):
        m(torch.tensor([[1]]))
    m.float()(torch.tensor([[1]]))


# -- from a mutation round: each kills a mutant the suite let through

def test_tt_shapes_ties_go_to_the_fewest_rows():
    assert he.tt_shapes(841, 4, 2)[0] == [29, 29]          # 29^2 and 30^2 equally balanced


def test_tt_shapes_waste_bound_is_inclusive():
    assert he.tt_shapes(32, 4, 2, max_waste=0.25)[0] == [8, 5]   # 40 = 1.25 * 32


def test_cache_takes_a_table_of_four_thirds_capacity():
    assert he.TTCache(1000, 2, hashtbl_size=1334).keys.shape == (1334,)


def test_cache_arrays_are_checked_before_the_kernels_read_them():
    """A cache's rows, weight, keys and freq are public attributes; one of
    another size was read past its end (ASan heap overflows in pool and in
    the torch module after a cache weight of another shape was swapped in)."""
    cores = he.tt_init(1000, [10, 10, 10], [2, 2, 2], [3, 3])
    x, off = np.array([999]), np.array([0, 1])
    with pytest.raises(ValueError, match=r"^rows: expected at most 2 slots \(the capacity\), "
                                         r"got 1000$"):
        he.TTCache(2, 8).rows = np.arange(1000)
    cache = he.TTCache(4, 8)
    cache.weight = np.zeros((1, 8), np.float32)
    with pytest.raises(ValueError, match=r"^cache\[0\].weight: expected a C-contiguous array "
                                         r"of shape \(4, 8\), got array of dtype float32"):
        he.tt_embedding_bag(x, cores, off, cache=cache)
    cache = he.TTCache(4, 8)
    cache.weight = np.zeros((8, 4), np.float32).T
    with pytest.raises(ValueError, match=r"^cache\[0\].weight"):
        he.tt_embedding_bag(x, cores, off, cache=cache)
    cache = he.TTCache(4, 8)
    cache.freq = np.zeros(3, np.int64)
    with pytest.raises(ValueError, match=r"^cache\[0\]: expected keys and freq of one length"):
        he.tt_embedding_bag(x, cores, off, cache=cache)
    cache = he.TTCache(4, 8)
    cache.__dict__["_rows"] = np.arange(5)         # past the setter's check
    with pytest.raises(ValueError, match=r"^cache\[0\].rows: expected at most 4 slots"):
        he.tt_embedding_bag(x, cores, off, cache=cache)

    emb = TTEmbeddingBagCollection([1000], 16, [8], use_cache=True, cache_size=64)
    emb.train()
    emb(torch.arange(64).reshape(-1, 1))
    emb.cache_populate()
    emb.eval()
    emb.cache_weights[0].data = torch.zeros(1, 16)
    with pytest.raises(ValueError, match=r"^cache_weights\[0\]: expected shape \(64, 16\), "
                                         r"got \(1, 16\)$"):
        emb(torch.arange(64).reshape(-1, 1))


def test_saved_of_other_caches_is_a_value_error():
    """A saved's cache hits name slots of the forward's cache as populated
    then: with no cache, another cache, or the cache populated since, the
    backward dropped the cached rows' gradient, raised numpy's unnamed
    IndexError, or stepped other rows."""
    cores = he.tt_init(1000, [10, 10, 10], [2, 2, 2], [3, 3])
    cache = he.TTCache(8, 8)
    x, off = np.arange(20), np.array([0, 10, 20])
    cache.count(x)
    cache.populate(cores)
    out, saved = he.tt_embedding_bag(x, cores, off, cache=cache, return_saved=True)
    g = np.ones_like(out)
    for c, msg in ((None, r"\(table 0: no cache\), got one of a cache"),
                   (he.TTCache(8, 8), r"\(table 0: this cache\), got one of another cache")):
        with pytest.raises(ValueError, match=r"^saved: expected the forward of these caches " + msg):
            he.tt_embedding_bag_backward(g, x, cores, off, cache=c, saved=saved)
    want = he.tt_embedding_bag_backward(g, x, cores, off, cache=cache)
    got = he.tt_embedding_bag_backward(g, x, cores, off, cache=cache, saved=saved)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    cache.populate(cores)               # moves no row: the saved still names the slots
    he.tt_embedding_bag_backward(g, x, cores, off, cache=cache, saved=saved)
    for _ in range(3):
        cache.count(np.arange(500, 520))
    cache.populate(cores)               # rows 500.. come in
    with pytest.raises(ValueError, match="^saved: expected a forward after table 0's cache was "
                                         "last populated"):
        he.tt_embedding_bag_backward(g, x, cores, off, cache=cache, saved=saved)
    _, plain = he.tt_embedding_bag(x, cores, off, return_saved=True)
    with pytest.raises(ValueError, match=r"\(table 0: this cache\), got one of no cache"):
        he.tt_embedding_bag_backward(g, x, cores, off, cache=cache, saved=plain)


def test_cache_pickled_before_versions_still_trains():
    """A TTCache pickled before it kept a version of its slots (a saved
    cache, or a TT module saved whole) loads with one: the first training
    step raised AttributeError."""
    import pickle
    cores = he.tt_init(1000, [10, 10, 10], [2, 2, 2], [3, 3])
    cache = he.TTCache(8, 8)
    x, off = np.arange(20), np.array([0, 10, 20])
    cache.count(x)
    cache.populate(cores)
    state = dict(cache.__dict__)
    state.pop("_version")
    old = he.TTCache.__new__(he.TTCache)
    old.__setstate__(pickle.loads(pickle.dumps(state)))
    out, saved = he.tt_embedding_bag(x, cores, off, cache=old, return_saved=True)
    got = he.tt_embedding_bag_backward(np.ones_like(out), x, cores, off, cache=old, saved=saved)
    want = he.tt_embedding_bag_backward(np.ones_like(out), x, cores, off, cache=cache)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_tt_init_like():
    cores = he.tt_init(1000, [10, 10, 10], [2, 2, 2], [4, 4], seed=3)
    same = he.tt_init(1000, [10, 10, 10], [2, 2, 2], [4, 4], seed=3, like=np.zeros(1))
    assert all((a == b).all() for a, b in zip(cores, same))
    with pytest.raises(TypeError, match="like: expected a cupy.ndarray or numpy.ndarray"):
        he.tt_init(1000, [10, 10, 10], [2, 2, 2], [4, 4], like=[0.0])


def test_tt_init_like_a_device_array():
    cores = he.tt_init(1000, [10, 10, 10], [2, 2, 2], [4, 4], seed=3)
    import gpu_emu
    cp = gpu_emu.cupy_or_skip()
    dev = he.tt_init(1000, [10, 10, 10], [2, 2, 2], [4, 4], seed=3, like=cp.zeros(1))
    assert all(isinstance(c, cp.ndarray) and (c.get() == a).all() for c, a in zip(dev, cores))
