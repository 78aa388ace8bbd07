"""bfloat16 storage (ml_dtypes' dtype): the conversions of hashemb/half.h
against an exact-rational model of bfloat16 (nearest-even and stochastic
rounding), ml_dtypes and torch; the bag functions on bfloat16 arrays
against the same functions on the float32 widening of the array (bitwise:
the conversion is exact and the arithmetic the same); the fused updates
(SGD, Adagrad, row-wise Adagrad; the per-slot scratch and the per-row
sums) against float32 arithmetic rounded by the model; thread-count
independence; the torch modules; errors."""
import sys
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import hashemb as he
from hashemb._cpu import _bag
import fuzzing
from reference import M64
from test_bag import batches
from test_half import round_bits

ml_dtypes = pytest.importorskip("ml_dtypes")
BF = np.dtype(ml_dtypes.bfloat16)
MAX_BITS = 0x7F7F          # the largest finite bfloat16


def widen(h):
    out = np.empty(h.size, np.float32)
    _bag.half_widen(np.ascontiguousarray(h).view(np.uint16).reshape(-1), out, 1)
    return out


def round_bf(x, seed=0):
    out = np.empty(np.size(x), np.uint16)
    _bag.half_round(np.ascontiguousarray(x, np.float32).reshape(-1), out, seed, 1)
    return out


def value(bits):
    """The exact value of the non-negative bfloat16 bits (0x7f80: 2^128, the
    step past the largest value, where IEEE rounding overflows to inf)."""
    e, m = bits >> 7, bits & 0x7F
    if e == 0:
        return Fraction(m, 128) * Fraction(1, 2**126)
    return (1 + Fraction(m, 128)) * Fraction(2) ** (e - 127)


def floor_bits(ax):
    """The largest bfloat16 bits whose value is <= the Fraction ax >= 0 (a
    binary search over the ordered finite values)."""
    lo, hi = 0, MAX_BITS
    if value(hi) <= ax:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if value(mid) <= ax else (lo, mid)
    return lo


def model(x, rnd=None):
    """float32 x -> bfloat16 bits: to nearest, ties to even (rnd None), or
    stochastically: up one step with probability (|x| - lo) / step, taken
    as up where the top 16 bits of rnd are >= 2^16 (1 - that probability)."""
    x = np.float32(x)
    sign = 0x8000 if np.signbit(x) else 0
    if np.isnan(x):
        return 0x7FC0 | sign
    if np.isinf(x):
        return 0x7F80 | sign
    ax = Fraction(abs(float(x)))
    lo = floor_bits(ax)
    lo_v, hi_v = value(lo), value(lo + 1)
    if rnd is None:
        d_lo, d_hi = ax - lo_v, hi_v - ax
        up = d_hi < d_lo or (d_hi == d_lo and lo & 1)
    else:
        k = (ax - lo_v) / (hi_v - lo_v) * 65536
        assert k.denominator == 1       # the step spans 2^16 float32 spacings
        up = k > 0 and (rnd >> 16) >= 65536 - k
    return (lo + 1 if up else lo) | sign


def test_widen_is_exact_on_every_bfloat16():
    h = np.arange(1 << 16, dtype=np.uint16)
    got, want = widen(h), h.view(BF).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_round_to_nearest_matches_the_model_ml_dtypes_and_torch():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 1 << 32, 1_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    grid = np.arange(1 << 16, dtype=np.uint16).view(BF).astype(np.float32)
    grid = np.sort(grid[np.isfinite(grid)])
    mid = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)   # ties (exact)
    top = np.float32(value(MAX_BITS))
    edges = np.float32([top, np.nextafter(top, np.float32(np.inf)), 3.4028235e38, 1e-45,
                        1.1754942e-38, 2.0**-133, 1.5 * 2.0**-133, -0.0, 0.0, np.inf, -np.inf,
                        np.nan])
    x = np.concatenate([x, grid, mid, np.nextafter(mid, np.float32(np.inf)),
                        np.nextafter(mid, np.float32(-np.inf)), -mid, edges])
    got = round_bf(x)
    nan = np.isnan(x)
    assert np.isnan(got[nan].view(BF).astype(np.float32)).all()
    assert np.array_equal(got[~nan], x[~nan].astype(BF).view(np.uint16))
    torch = pytest.importorskip("torch")
    want = torch.from_numpy(x[~nan]).to(torch.bfloat16).view(torch.int16).numpy()
    assert np.array_equal(got[~nan], want.view(np.uint16))
    pick = rng.choice(x.size, 3000, replace=False)
    for i in np.concatenate([pick, np.arange(x.size - edges.size, x.size)]):
        assert got[i] == model(x[i]) or nan[i], (x[i], got[i])


@settings(max_examples=300)
@given(st.floats(width=32, allow_nan=False), st.integers(1, M64))
def test_stochastic_rounding_matches_the_exact_model(x, seed):
    got = round_bf(np.float32([x] * 3), seed)
    for i in range(3):
        assert got[i] == model(x, round_bits(seed, i)), (x, i)


def test_stochastic_rounding_is_unbiased_and_brackets():
    # a value a third of the way between two bfloat16 values, normal and
    # subnormal, and near the largest (whose step up is inf): every result is
    # one of the two, and the up-rate is a third
    for lo_bits in (0x3DCC, 0x0002, 0xC396, 0x7F7E):
        lo = np.uint16(lo_bits).view(BF).astype(np.float32)
        hi = np.uint16(lo_bits + 1).view(BF).astype(np.float32)
        x = np.float32(float(lo) + (float(hi) - float(lo)) / 3)
        n = 200_000
        got = round_bf(np.full(n, x), seed=7)
        assert set(np.unique(got)) <= {lo_bits, lo_bits + 1}
        p_up = np.mean(got == lo_bits + 1)
        assert abs(p_up - 1 / 3) < 5 * np.sqrt((1 / 3) * (2 / 3) / n)
        assert np.array_equal(round_bf(np.full(100, lo), seed=7), np.full(100, lo_bits))


def _bf_batch(b):
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    H = M.astype(np.float32).astype(BF)
    psw = None if psw is None else psw.astype(np.float32)
    return scheme, idx, off, H, widen(H).reshape(H.shape), T, mode, psw, B


@given(batches(multi=True))
def test_forward_equals_the_widened_array_bitwise(b):
    scheme, idx, off, H, W, T, mode, psw, B = _bf_batch(b)
    out = he.embedding_bags(idx, H, off, scheme=scheme, num_tables=T, mode=mode,
                            per_sample_weights=psw)
    want = he.embedding_bags(idx, W, off, scheme=scheme, num_tables=T, mode=mode,
                             per_sample_weights=psw)
    assert out.dtype == np.float32
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))


@given(batches(multi=True), st.integers(0, 99))
def test_gradient_equals_the_widened_array_bitwise(b, gseed):
    scheme, idx, off, H, W, T, mode, psw, B = _bf_batch(b)
    G = np.random.default_rng(gseed).standard_normal((B, T * scheme.dim)).astype(np.float32)
    got = he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                     per_sample_weights=psw, weight=H)
    want = he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                      per_sample_weights=psw, weight=W)
    assert got.dtype == np.float32 and got.shape == H.shape
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def expected_update(opt, W32, grad, state, seed):
    """The fused step in float32 from the summed gradient, each touched
    slot rounded by the model (bfloat16 bits)."""
    g = grad.reshape(-1)
    lr = np.float32(opt.lr)
    if isinstance(opt, he.Adagrad):      # in double from float32 parts, as the kernels
        state += np.where(g != 0, g * g, np.float32(0))
        step = (lr * g).astype(np.float64) / (np.sqrt(state.astype(np.float64))
                                              + float(np.float32(opt.eps)))
        step = np.where(g != 0, step, 0).astype(np.float32)
    else:
        step = lr * g
    with np.errstate(over="ignore"):        # past the largest float: inf, as intended
        v = (W32.reshape(-1) - step.astype(np.float32)).astype(np.float32)
    out = W32.reshape(-1).astype(BF).view(np.uint16)
    for j in np.flatnonzero(g != 0):
        out[j] = model(v[j], round_bits(seed, j) if seed else None)
    return out


@settings(max_examples=40)
@given(batches(multi=True), st.integers(0, 99), st.sampled_from(["sgd", "adagrad"]),
       st.booleans())
def test_fused_update_rounds_the_float32_step(b, gseed, opt, sr):
    scheme, idx, off, H, W, T, mode, psw, B = _bf_batch(b)
    G = np.random.default_rng(gseed).standard_normal((B, T * scheme.dim)).astype(np.float32)
    make = (lambda: he.SGD(0.1, stochastic_rounding=sr, seed=gseed)) if opt == "sgd" else \
        (lambda: he.Adagrad(0.1, eps=1e-3, stochastic_rounding=sr, seed=gseed))
    optimizer, twin = make(), make()
    Hw = H.copy()
    state = np.zeros(H.size, np.float32)
    for _ in range(2):       # Adagrad's state and the rounding stream carry over
        W32 = widen(Hw).reshape(H.shape)
        grad = he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                          per_sample_weights=psw, weight=W32)
        want = expected_update(twin, W32, grad, state, twin._round_seed(Hw))
        assert he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                          per_sample_weights=psw, weight=Hw,
                                          optimizer=optimizer) is None
        assert np.array_equal(Hw.reshape(-1).view(np.uint16), want)
        if opt == "adagrad":
            np.testing.assert_array_equal(optimizer.state_for(Hw)[0], state)
        assert not optimizer.scratch_for(Hw).any()      # left zeroed for the next call


@pytest.mark.parametrize("sr", [True, False])
def test_update_at_bfloat16_edges_matches_the_model(sr):
    # weights and steps at bfloat16's subnormals and its largest values
    # (overflow to inf), mixed with ordinary ones: bitwise the model
    full = he.FullTable([64], 8)
    rng = np.random.default_rng(5)
    W = np.concatenate([rng.uniform(-1, 1, 256), rng.uniform(-2e-39, 2e-39, 128),
                        rng.choice([3.38e38, -3.38e38, 3e38, 1e-40, 0.0], 128)])
    W = rng.permutation(W).astype(np.float32).astype(BF).reshape(64, 8)
    x = np.arange(64).reshape(64, 1)
    g = rng.choice([0.0, 1e-3, -3e-41, 5e36, -5e37, 1e-39], (64, 8)).astype(np.float32)
    opt, twin = (he.SGD(0.5, stochastic_rounding=sr, seed=11) for _ in range(2))
    for _ in range(3):
        W32 = widen(W).reshape(W.shape)
        grad = he.embedding_bags_backward(g, x, scheme=full, num_tables=1, weight=W32)
        want = expected_update(twin, W32, grad, None, twin._round_seed(W))
        he.embedding_bags_backward(g, x, scheme=full, num_tables=1, weight=W, optimizer=opt)
        assert np.array_equal(W.reshape(-1).view(np.uint16), want)
    W32 = widen(W)
    assert np.isinf(W32).any() and (np.abs(W32[np.isfinite(W32)]) < 2.0**-126).any()


@pytest.mark.parametrize("D", [8, 5])
def test_apply_rounds_ties_to_even(D):
    # SGD steps to nearest that land exactly halfway between two bfloat16
    # values (ties: to the even one), just above and just below halfway,
    # through the eight-slot apply (D = 8: one call, whose sweep runs eight
    # slots a step) and the scalar one (D = 5: a row per call, summed and
    # applied per row): the model's bits, and ml_dtypes'
    full = he.FullTable([64], D)
    k = np.arange(64 * D) % 100
    half = (k + 0.5) * 2.0**-7                      # bfloat16's spacing on [1, 2) is 2^-7
    nudge = np.array([0.0, 2.0**-23, -2.0**-23])[np.arange(64 * D) % 3]
    g = -(half + nudge).astype(np.float32).reshape(64, D)
    for sign in (1, -1):
        W = np.full((64, D), sign, np.float32).astype(BF)
        opt = he.SGD(1.0, stochastic_rounding=False)
        rows = [np.arange(64)] if D == 8 else [[r] for r in range(64)]
        for r in rows:
            he.embedding_bags_backward(sign * g[r], np.reshape(r, (-1, 1)), scheme=full,
                                       num_tables=1, weight=W, optimizer=opt)
        v = (np.float32(sign) - np.float32(sign) * g.reshape(-1)).astype(np.float32)
        assert np.array_equal(W.reshape(-1).view(np.uint16), v.astype(BF).view(np.uint16))
        assert all(W.reshape(-1).view(np.uint16)[j] == model(v[j]) for j in range(0, v.size, 7))


def test_stochastic_rounding_moves_small_steps_on_average():
    # 64 slots at 1.0, 300 SGD steps of 4e-4 (a tenth of bfloat16's spacing
    # just below 1, 2^-8): to nearest, nothing ever moves; stochastically the
    # mean lands on 1 - 0.12, as in float32
    full = he.FullTable([1], 64)
    x = np.zeros((1, 1), np.int64)
    g = np.ones((1, 64), np.float32)
    ends = {}
    for sr in (False, True):
        W = np.ones((1, 64), BF)
        opt = he.SGD(4e-4, stochastic_rounding=sr, seed=3)
        for _ in range(300):
            he.embedding_bags_backward(g, x, scheme=full, num_tables=1, weight=W, optimizer=opt)
        ends[sr] = W.astype(np.float64)
    assert (ends[False] == 1.0).all()
    # per step the rounding adds at most spacing^2 / 4 of variance (spacing <= 2^-8)
    sd = np.sqrt(300 * (2.0**-8) ** 2 / 4 / 64)
    assert abs(ends[True].mean() - (1 - 0.12)) < 5 * sd
    assert ends[True].std() > 0


@pytest.mark.parametrize("opt", ["sgd", "adagrad"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_full_table_step_sums_per_row_without_a_scratch(opt, mode):
    # a full table large next to its batch: each row's gradient summed in a
    # compact buffer (no table-sized scratch), hot rows and weights included:
    # bitwise the model's update
    full = he.FullTable([40_000, 30_011], 8)
    rng = np.random.default_rng(1)
    B, T = 300, 2
    x = rng.integers(0, 30_011, (B, T))
    x[::7] = x[0]
    H = full.init_weight(seed=3, dtype=BF)
    g = rng.standard_normal((B, T * 8)).astype(np.float32)
    psw = rng.uniform(0.5, 2, (B, T)).astype(np.float32) if mode == "sum" else None
    make = (lambda: he.SGD(0.3, seed=2)) if opt == "sgd" else \
        (lambda: he.Adagrad(0.3, eps=1e-3, seed=2))
    optimizer, twin = make(), make()
    state = np.zeros(H.size, np.float32)
    for _ in range(2):
        W32 = widen(H).reshape(H.shape)
        grad = he.embedding_bags_backward(g, x, scheme=full, num_tables=T, mode=mode,
                                          per_sample_weights=psw, weight=W32)
        want = expected_update(twin, W32, grad, state, twin._round_seed(H))
        he.embedding_bags_backward(g, x, scheme=full, num_tables=T, mode=mode,
                                   per_sample_weights=psw, weight=H, optimizer=optimizer)
        assert np.array_equal(H.reshape(-1).view(np.uint16), want)
    assert not optimizer._scratch       # no dense float32 copy of the table


def test_rowwise_adagrad_rounds_each_element_once():
    from test_rowwise import rowwise_model
    full = he.FullTable([5000, 3000], 16)
    rng = np.random.default_rng(4)
    x = rng.integers(0, 3000, (400, 2))
    x[::5] = x[1]
    H = full.init_weight(seed=1, dtype=BF)
    g = rng.standard_normal((400, 32)).astype(np.float32)
    for sr in (True, False):
        opt, twin = (he.RowwiseAdagrad(0.05, stochastic_rounding=sr, seed=9) for _ in range(2))
        Hw, Wm = H.copy(), H.copy()
        state = np.zeros(full.size // 16, np.float32)
        for _ in range(2):
            grad = he.embedding_bags_backward(g, x, scheme=full, num_tables=2,
                                              weight=widen(Wm).reshape(H.shape))
            rowwise_model(Wm, state, grad, twin.lr, twin.eps, twin._round_seed(Wm))
            he.embedding_bags_backward(g, x, scheme=full, num_tables=2, weight=Hw, optimizer=opt)
            assert np.array_equal(Hw.view(np.uint16), Wm.view(np.uint16))
        np.testing.assert_array_equal(opt.state_for(Hw, full.size // 16), state)


def test_the_same_bits_on_any_thread_count():
    code = ("import numpy as np, hashemb as he, hashlib, ml_dtypes;"
            "bf=ml_dtypes.bfloat16;"
            "r=he.RobeZ(50000, 16, block=4);x=np.random.default_rng(0).integers(0,10**9,(4096,8));"
            "g=np.random.default_rng(1).standard_normal((4096,128)).astype(np.float32);"
            "W=r.init_weight(dtype=bf);"
            "[he.embedding_bags_backward(g,x,scheme=r,num_tables=8,weight=W,"
            "optimizer=o) for o in (he.SGD(1e-3, seed=5), he.Adagrad(1e-2, seed=5))];"
            "f=he.FullTable([200_003], 8);y=np.random.default_rng(2).integers(0,200_003,(10_000,1));"
            "y[:3,0]=[(200_003*8*k//n)//8 for k,n in ((1,2),(1,3),(2,3))];"
            "h=np.random.default_rng(3).standard_normal((10_000,8)).astype(np.float32);"
            "F=f.init_weight(dtype=bf);"
            "[he.embedding_bags_backward(h,y,scheme=f,num_tables=1,weight=F,optimizer=o)"
            " for o in (he.SGD(0.1, seed=5), he.Adagrad(0.1, seed=5), he.RowwiseAdagrad(0.1, seed=5))];"
            "print(hashlib.sha1(W.tobytes()).hexdigest(), hashlib.sha1(F.tobytes()).hexdigest())")
    outs = fuzzing.outputs_by_threads(code)
    assert len(set(outs.values())) == 1, outs


@pytest.mark.parametrize("scheme", [he.RobeZ(1000, 16), he.FullTable([70_001, 3], 16)],
                         ids=["small", "chunked"])
def test_init_weight(scheme):
    # drawn a chunk at a time: the float32 draw rounded to nearest
    H = scheme.init_weight(seed=4, dtype=BF)
    assert H.dtype == BF and H.shape == scheme.weight_shape
    assert np.array_equal(H.view(np.uint16), scheme.init_weight(seed=4).astype(BF).view(np.uint16))
    # and float16 draws stay what they were (NumPy's rounding of the same values)
    assert np.array_equal(scheme.init_weight(seed=4, dtype=np.float16),
                          scheme.init_weight(seed=4).astype(np.float16))


def test_two_d_input_and_saved_starts():
    robe = he.RobeZ(5000, 16, block=16)
    H = robe.init_weight(seed=2, dtype=BF)
    x = np.random.default_rng(0).integers(0, 10**9, (300, 7))
    out, saved = he.embedding_bags(x, H, scheme=robe, num_tables=7, return_saved=True)
    assert np.array_equal(out, he.embedding_bags(x, widen(H).reshape(H.shape), scheme=robe,
                                                 num_tables=7))
    g = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
    H1, H2 = H.copy(), H.copy()
    he.embedding_bags_backward(g, x, scheme=robe, num_tables=7, weight=H1,
                               optimizer=he.SGD(0.01, seed=1), saved=saved)
    he.embedding_bags_backward(g, x, scheme=robe, num_tables=7, weight=H2,
                               optimizer=he.SGD(0.01, seed=1))
    assert np.array_equal(H1.view(np.uint16), H2.view(np.uint16))
    assert (H1.view(np.uint16) != H.view(np.uint16)).any()


def test_torch_modules():
    torch = pytest.importorskip("torch")
    from hashemb.torch import RobeEmbeddingBagCollection, make_embedding
    x = torch.randint(0, 1000, (32, 4))
    ref = RobeEmbeddingBagCollection([1000] * 4, 16, compression=10)
    for opt in (None, "sgd", "adagrad"):
        m = RobeEmbeddingBagCollection([1000] * 4, 16, compression=10, optimizer=opt,
                                       dtype=torch.bfloat16)
        assert m.weight.dtype == torch.bfloat16
        # the same draws as float32, rounded to nearest (torch's rounding too)
        assert torch.equal(m.weight.detach(), ref.weight.detach().to(torch.bfloat16))
        ref2 = RobeEmbeddingBagCollection([1000] * 4, 16, compression=10)
        ref2.weight.data = m.weight.detach().float()
        y = m(x)
        assert y.dtype == torch.float32 and torch.equal(y, ref2(x))
        w0 = m.weight.detach().clone()
        y.square().sum().backward()
        if opt is None:         # autograd hands the float32 gradient over as bfloat16
            assert m.weight.grad.dtype == torch.bfloat16
            y2 = ref2(x)
            y2.square().sum().backward()
            assert torch.equal(m.weight.grad, ref2.weight.grad.to(torch.bfloat16))
        else:
            assert m.weight.grad is None and (m.weight != w0).any()
        if opt == "adagrad":
            assert m.optimizer_state.dtype == torch.float32 and m.optimizer_state.any()
        state = m.state_dict()
        back = RobeEmbeddingBagCollection([1000] * 4, 16, compression=10, optimizer=opt,
                                          dtype=torch.bfloat16)
        back.load_state_dict(state)
        assert torch.equal(back(x), m(x))
    e = make_embedding("full", [100, 200], optimizer="rowwise_adagrad", lr=0.1,
                       dtype=torch.bfloat16)
    assert e.weight.dtype == torch.bfloat16 and e.optimizer_state.shape == (300,)
    e(torch.randint(0, 100, (8, 2))).sum().backward()
    assert e.optimizer_state.dtype == torch.float32 and e.optimizer_state.any()


def test_errors(monkeypatch):
    robe = he.RobeZ(100, 4)
    H = robe.init_weight(dtype=BF)
    x = np.array([[1, 2]])
    with pytest.raises(TypeError, match="weight: expected a float32 or float64"):
        he.embedding(np.array([1]), np.zeros((3, 4), BF))
    with pytest.raises(ValueError, match="state: expected a writeable C-contiguous float32"):
        he.Adagrad(0.1).use_state(H, np.zeros(100, BF))
    with pytest.raises(ValueError, match="weight: expected a writeable C-contiguous"):
        he.embedding_bag_backward(np.ones((1, 4), np.float32), x, scheme=robe,
                                  weight=H[::-1], optimizer=he.SGD(0.1))
    with pytest.raises(ValueError, match="weight: expected shape"):
        he.embedding_bag(x, H[:50], scheme=robe)
    torch = pytest.importorskip("torch")
    from hashemb.torch import RobeEmbeddingBagCollection
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)      # as if not installed
    with pytest.raises(ImportError, match="bfloat16 weights need the ml_dtypes package"):
        RobeEmbeddingBagCollection([10], 4, compression=2, dtype=torch.bfloat16)
