"""float16 storage: the conversions of hashemb/half.h against NumPy and an
exact-rational model of stochastic rounding; the bag functions on float16
arrays against the same functions on the float32 widening of the array
(bitwise: the conversion is exact and the arithmetic the same); the fused
updates against float32 arithmetic rounded by the reference; and what
stochastic rounding is for (small steps move a weight on average)."""
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import hashemb as he
from hashemb._cpu import _bag
import fuzzing
from reference import M64
from test_bag import batches

def widen(h):
    out = np.empty(h.size, np.float32)
    _bag.half_widen(np.ascontiguousarray(h).view(np.uint16).reshape(-1), out)
    return out


def round_half(x, seed=0):
    out = np.empty(x.size, np.uint16)
    _bag.half_round(np.ascontiguousarray(x, np.float32).reshape(-1), out, seed)
    return out.view(np.float16)


def mix32(x):
    """he_mix32 (lowbias32), exact integers."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def round_bits(seed, slot):
    """he_round_bits, exact integers."""
    seed, slot = int(seed), int(slot)
    return mix32(mix32((slot ^ seed) & 0xFFFFFFFF) ^ (slot >> 32) ^ (seed >> 32) & 0xFFFFFFFF)


def sr_reference(x, rnd):
    """Stochastic rounding of the float32 x: |x| truncated to float16, plus one
    step away from zero when rnd < floor(2^32 (|x| - |lo|) / step); past
    65504 the step up is inf."""
    x = np.float32(x)
    if not np.isfinite(x):
        return np.float16(x)
    ax = Fraction(abs(float(x)))
    with np.errstate(over="ignore"):
        h = np.float16(abs(float(x)))   # nearest; step back if it rounded up
    if np.isinf(h):
        h = np.float16(65504)
    lo = h if Fraction(float(h)) <= ax else np.nextafter(h, np.float16(0))
    with np.errstate(over="ignore"):
        hi = np.nextafter(lo, np.float16(np.inf))
    lo_f = Fraction(float(lo))
    step = Fraction(65536) - lo_f if np.isinf(hi) else Fraction(float(hi)) - lo_f
    p = (ax - lo_f) / step
    up = rnd < int(p * (1 << 32))
    if abs(float(x)) >= 65536:
        r = np.float16(np.inf)
    else:
        r = hi if up else lo
    return -r if x < 0 or (x == 0 and np.signbit(x)) else r


def test_widen_is_exact_on_every_half():
    h = np.arange(1 << 16, dtype=np.uint16)
    got, want = widen(h), h.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_round_to_nearest_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 1 << 32, 2_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    grid = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    grid = grid[np.isfinite(grid)]
    grid.sort()
    mid = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)   # ties
    edges = np.float32([65504, 65519.996, 65520, 65536, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25,
                        2.0**-14, 1e-45, -0.0, 0.0, np.inf, -np.inf, np.nan])
    x = np.concatenate([x, grid, mid, np.nextafter(mid, np.float32(np.inf)),
                        np.nextafter(mid, np.float32(-np.inf)), -mid, edges])
    got = round_half(x)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16)
    nan = np.isnan(x)
    assert np.isnan(got[nan]).all()
    assert np.array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))


@settings(max_examples=300)
@given(st.floats(width=32, allow_nan=False), st.integers(1, M64))
def test_stochastic_rounding_matches_the_exact_model(x, seed):
    got = round_half(np.float32([x] * 3), seed)
    for i in range(3):
        want = sr_reference(x, round_bits(seed, i))
        assert got[i].view(np.uint16) == want.view(np.uint16), (x, i)


def test_stochastic_rounding_is_unbiased_and_brackets():
    # a value a third of the way between two halves, in the normal and the
    # subnormal range: every result is one of the two, and the mean is x
    for lo in (np.float16(0.1), np.float16(2.0**-20), np.float16(-300.0)):
        hi = np.nextafter(lo, np.float16(np.inf) * np.sign(lo))
        x = np.float32(float(lo) + (float(hi) - float(lo)) / 3)
        n = 200_000
        got = round_half(np.full(n, x), seed=7).astype(np.float64)
        assert set(np.unique(got)) <= {float(lo), float(hi)}
        p_up = np.mean(got == float(hi))
        sd = np.sqrt((1 / 3) * (2 / 3) / n)
        assert abs(p_up - 1 / 3) < 5 * sd
        # exact halves never move
        assert np.array_equal(round_half(np.full(100, np.float32(lo)), seed=7),
                              np.full(100, lo))


def _half_batch(b):
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    H = M.astype(np.float16)
    psw = None if psw is None else psw.astype(np.float32)
    return scheme, idx, off, H, widen(H).reshape(H.shape), T, mode, psw, B


@given(batches(multi=True))
def test_forward_equals_the_widened_array_bitwise(b):
    scheme, idx, off, H, W, T, mode, psw, B = _half_batch(b)
    out = he.embedding_bags(idx, H, off, scheme=scheme, num_tables=T, mode=mode,
                            per_sample_weights=psw)
    want = he.embedding_bags(idx, W, off, scheme=scheme, num_tables=T, mode=mode,
                             per_sample_weights=psw)
    assert out.dtype == np.float32
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))


@given(batches(multi=True), st.integers(0, 99))
def test_gradient_equals_the_widened_array_bitwise(b, gseed):
    scheme, idx, off, H, W, T, mode, psw, B = _half_batch(b)
    G = np.random.default_rng(gseed).standard_normal((B, T * scheme.dim)).astype(np.float32)
    got = he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                     per_sample_weights=psw, weight=H)
    want = he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                      per_sample_weights=psw, weight=W)
    assert got.dtype == np.float32 and got.shape == H.shape
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def _expected_update(opt, W32, grad, state, seed):
    """The fused step in float32 from the summed gradient, rounded per slot."""
    g = grad.reshape(-1)
    lr = np.float32(opt.lr)
    if isinstance(opt, he.Adagrad):      # in double from float32 parts, as the kernels
        state += np.where(g != 0, g * g, np.float32(0))
        step = (lr * g).astype(np.float64) / (np.sqrt(state.astype(np.float64))
                                              + float(np.float32(opt.eps)))
        step = np.where(g != 0, step, 0).astype(np.float32)
    else:
        step = lr * g
    v = (W32.reshape(-1) - step.astype(np.float32)).astype(np.float32)
    touched = g != 0
    out = W32.reshape(-1).astype(np.float16)
    if seed == 0:
        with np.errstate(over="ignore"):        # past 65504: inf, as intended
            out[touched] = v[touched].astype(np.float16)
    else:
        for j in np.flatnonzero(touched):
            out[j] = sr_reference(v[j], round_bits(seed, j))
    return out


@settings(max_examples=60)
@given(batches(multi=True), st.integers(0, 99), st.sampled_from(["sgd", "adagrad"]),
       st.booleans())
def test_fused_update_rounds_the_float32_step(b, gseed, opt, sr):
    scheme, idx, off, H, W, T, mode, psw, B = _half_batch(b)
    G = np.random.default_rng(gseed).standard_normal((B, T * scheme.dim)).astype(np.float32)
    make = (lambda: he.SGD(0.1, stochastic_rounding=sr, seed=gseed)) if opt == "sgd" else \
        (lambda: he.Adagrad(0.1, eps=1e-3, stochastic_rounding=sr, seed=gseed))
    optimizer, twin = make(), make()
    Hw = H.copy()
    state = np.zeros(H.size, np.float32)
    for step in range(2):       # Adagrad's state and the rounding stream carry over
        W32 = widen(Hw).reshape(H.shape)
        grad = he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                          per_sample_weights=psw, weight=W32)
        want = _expected_update(twin, W32, grad, state, twin._round_seed(Hw))
        assert he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                          per_sample_weights=psw, weight=Hw,
                                          optimizer=optimizer) is None
        assert np.array_equal(Hw.reshape(-1).view(np.uint16), want.view(np.uint16))
        if opt == "adagrad":
            np.testing.assert_array_equal(optimizer.state_for(Hw)[0], state)
            assert optimizer.state_for(Hw)[0].dtype == np.float32
        assert not optimizer.scratch_for(Hw).any()      # left zeroed for the next call


def test_stochastic_rounding_moves_small_steps_on_average():
    # 64 slots at 1.0, 400 SGD steps of 1e-4 each (a fifth of float16's spacing
    # just below 1): to nearest, nothing ever moves; stochastically
    # the mean lands on 1 - 0.04, as in float32
    full = he.FullTable([1], 64)
    x = np.zeros((1, 1), np.int64)
    g = np.ones((1, 64), np.float32)
    ends = {}
    for sr in (False, True):
        W = np.ones((1, 64), np.float16)
        opt = he.SGD(1e-4, stochastic_rounding=sr, seed=3)
        for _ in range(400):
            he.embedding_bags_backward(g, x, scheme=full, num_tables=1, weight=W, optimizer=opt)
        ends[sr] = W.astype(np.float64)
    assert (ends[False] == 1.0).all()
    # per step the rounding adds at most spacing^2 / 4 of variance (spacing <= 2^-10)
    sd = np.sqrt(400 * (2.0**-10) ** 2 / 4 / 64)
    assert abs(ends[True].mean() - (1 - 0.04)) < 5 * sd
    assert ends[True].std() > 0


def test_rounding_is_the_same_on_any_thread_count():
    code = ("import numpy as np, hashemb as he, hashlib;"
            "r=he.RobeZ(50000, 16, block=4);x=np.random.default_rng(0).integers(0,10**9,(4096,8));"
            "g=np.random.default_rng(1).standard_normal((4096,128)).astype(np.float32);"
            "W=r.init_weight(dtype=np.float16);"
            "[he.embedding_bags_backward(g,x,scheme=r,num_tables=8,weight=W,"
            "optimizer=o) for o in (he.SGD(1e-3, seed=5), he.Adagrad(1e-2, seed=5))];"
            "print(hashlib.sha1(W.tobytes()).hexdigest())")
    outs = fuzzing.outputs_by_threads(code)
    assert len(set(outs.values())) == 1, outs


def test_two_d_input_and_saved_starts():
    robe = he.RobeZ(5000, 16, block=16)
    H = robe.init_weight(seed=2, dtype=np.float16)
    x = np.random.default_rng(0).integers(0, 10**9, (300, 7))
    out, saved = he.embedding_bags(x, H, scheme=robe, num_tables=7, return_saved=True)
    assert np.array_equal(out, he.embedding_bags(x, widen(H), scheme=robe, num_tables=7))
    g = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
    H1, H2 = H.copy(), H.copy()
    he.embedding_bags_backward(g, x, scheme=robe, num_tables=7, weight=H1,
                               optimizer=he.SGD(0.01, seed=1), saved=saved)
    he.embedding_bags_backward(g, x, scheme=robe, num_tables=7, weight=H2,
                               optimizer=he.SGD(0.01, seed=1))
    assert np.array_equal(H1.view(np.uint16), H2.view(np.uint16))
    assert (H1 != H).any()


@pytest.mark.parametrize("scheme", [he.RobeZ(1000, 16), he.FullTable([70_001, 3], 16)],
                         ids=["small", "chunked"])
def test_init_weight_float16(scheme):
    # drawn a chunk at a time (the second spans two chunks and a partial one):
    # the same values as the float32 draw, rounded
    H = scheme.init_weight(seed=4, dtype=np.float16)
    assert H.dtype == np.float16 and H.shape == scheme.weight_shape
    assert np.array_equal(H, scheme.init_weight(seed=4).astype(np.float16))


def test_errors():
    robe = he.RobeZ(100, 4)
    H = robe.init_weight(dtype=np.float16)
    x = np.array([[1, 2]])
    with pytest.raises(TypeError, match="weight: expected a float32 or float64"):
        he.embedding(np.array([1]), np.zeros((3, 4), np.float16))
    with pytest.raises(TypeError, match="weight: expected a float16, bfloat16, float32 or float64"):
        he.embedding_bag(x, H.astype(np.int16), scheme=robe)
    with pytest.raises(ValueError, match="state: expected a writeable C-contiguous float32"):
        he.Adagrad(0.1).use_state(H, np.zeros(100, np.float16))
    with pytest.raises(ValueError, match="weight: expected a writeable C-contiguous"):
        he.embedding_bag_backward(np.ones((1, 4), np.float32), x, scheme=robe,
                                  weight=H[::-1], optimizer=he.SGD(0.1))
    with pytest.raises(TypeError, match="seed"):
        he.SGD(0.1, seed="a")
    with pytest.raises(TypeError, match="dtype: expected float16, bfloat16, float32 or float64"):
        robe.init_weight(dtype=np.int8)


def test_torch_module_float16():
    torch = pytest.importorskip("torch")
    from hashemb.torch import RobeEmbeddingBagCollection
    x = torch.randint(0, 1000, (32, 4))
    ref = RobeEmbeddingBagCollection([1000] * 4, 16, compression=10)
    for opt in (None, "sgd", "adagrad"):
        m = RobeEmbeddingBagCollection([1000] * 4, 16, compression=10, optimizer=opt,
                                       dtype=torch.float16)
        assert m.weight.dtype == torch.float16
        ref.weight.data = m.weight.detach().float()
        y = m(x)
        assert y.dtype == torch.float32 and torch.equal(y, ref(x))
        w0 = m.weight.detach().clone()
        y.square().sum().backward()
        if opt is None:         # autograd hands the float32 gradient over as float16
            assert m.weight.grad.dtype == torch.float16
        else:
            assert m.weight.grad is None and (m.weight != w0).any()
        if opt == "adagrad":
            assert m.optimizer_state.dtype == torch.float32 and m.optimizer_state.any()


@pytest.mark.parametrize("sr", [True, False])
def test_update_at_float16_edges_matches_the_model(sr):
    # weights and steps around float16's subnormals, its largest values and
    # overflow, mixed with ordinary ones in the same eight-slot groups (the
    # vector apply sends such groups to the scalar code): bitwise the model
    full = he.FullTable([64], 8)
    rng = np.random.default_rng(5)
    W = np.concatenate([rng.uniform(-1, 1, 256), rng.uniform(-2e-5, 2e-5, 128),
                        rng.choice([65000.0, -65000.0, 60000.0, 1e-7, 0.0], 128)])
    W = rng.permutation(W).astype(np.float16).reshape(64, 8)
    x = np.arange(64).reshape(64, 1)
    g = rng.choice([0.0, 1e-3, -3e-5, 50.0, -5e4, 1e-9], (64, 8)).astype(np.float32)
    opt, twin = he.SGD(0.5, stochastic_rounding=sr, seed=11), he.SGD(0.5, stochastic_rounding=sr,
                                                                     seed=11)
    for _ in range(3):
        W32 = widen(W).reshape(W.shape)
        grad = he.embedding_bags_backward(g, x, scheme=full, num_tables=1, weight=W32)
        want = _expected_update(twin, W32, grad, None, twin._round_seed(W))
        he.embedding_bags_backward(g, x, scheme=full, num_tables=1, weight=W, optimizer=opt)
        assert np.array_equal(W.reshape(-1).view(np.uint16), want.view(np.uint16))
    assert np.isinf(W).any() and (np.abs(W[np.isfinite(W)]) < 2.0**-14).any()


@pytest.mark.parametrize("opt", ["sgd", "adagrad"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("sr", [True, False])
def test_full_table_step_sums_per_row_without_a_scratch(opt, mode, sr):
    # a full table large next to its batch: the float16 step sums each row's
    # gradient in a compact buffer (no scratch of the table's size is made),
    # duplicates and weights included: bitwise the model's update; and, on a
    # batch big enough for several threads (rows at the edges of their
    # row-aligned ranges), the same bits on 1, 2 and 3 threads
    full = he.FullTable([40_000, 30_011], 8)
    rng = np.random.default_rng(1)
    B, T = 300, 2
    x = rng.integers(0, 30_011, (B, T))
    x[::7] = x[0]                                   # hot rows, summed in entry order
    H = full.init_weight(seed=3, dtype=np.float16)
    g = rng.standard_normal((B, T * 8)).astype(np.float32)
    psw = rng.uniform(0.5, 2, (B, T)).astype(np.float32) if mode == "sum" else None
    flat = np.ascontiguousarray(x.T).reshape(-1)
    # bags of 1 to 3 entries (mean divides), feature-major
    off = np.concatenate([[0], np.sort(rng.choice(np.arange(1, B * T), B * T // 2 - 1,
                                                  replace=False)), [B * T]])
    B = (off.size - 1) // T
    off = off[:B * T + 1]
    flat = flat[:off[-1]]
    g = g[:B]
    pw = None if psw is None else np.ascontiguousarray(psw.T).reshape(-1)[:off[-1]]
    make = (lambda: he.SGD(0.3, stochastic_rounding=sr, seed=2)) if opt == "sgd" else \
        (lambda: he.Adagrad(0.3, eps=1e-3, stochastic_rounding=sr, seed=2))
    optimizer, twin = make(), make()
    state = np.zeros(H.size, np.float32)
    for _ in range(2):
        W32 = widen(H).reshape(H.shape)
        grad = he.embedding_bags_backward(g, flat, off, scheme=full, num_tables=T, mode=mode,
                                          per_sample_weights=pw, weight=W32)
        want = _expected_update(twin, W32, grad, state, twin._round_seed(H))
        he.embedding_bags_backward(g, flat, off, scheme=full, num_tables=T, mode=mode,
                                   per_sample_weights=pw, weight=H, optimizer=optimizer)
        assert np.array_equal(H.reshape(-1).view(np.uint16), want.view(np.uint16))
    assert not optimizer._scratch       # no dense float32 copy of the table
    code = ("import numpy as np, hashemb as he, hashlib;"
            "f=he.FullTable([200_003], 8);r=np.random.default_rng(0);"
            "x=r.integers(0,200_003,(10_000,1));g=r.standard_normal((10_000,8)).astype(np.float32);"
            # the rows at the edges of 2 and 3 threads' ranges (row-aligned)
            "x[:3,0]=[(200_003*8*k//n)//8 for k,n in ((1,2),(1,3),(2,3))];"
            "W=f.init_weight(dtype=np.float16);"
            "[he.embedding_bags_backward(g,x,scheme=f,num_tables=1,weight=W,optimizer=o)"
            " for o in (he.SGD(0.1, seed=5), he.Adagrad(0.1, seed=5))];"
            "print(hashlib.sha1(W.tobytes()).hexdigest())")
    outs = fuzzing.outputs_by_threads(code)
    assert len(set(outs.values())) == 1, outs
