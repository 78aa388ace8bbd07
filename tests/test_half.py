"""16-bit storage. float16: the conversions of hashemb/half.h against NumPy
and an exact-rational model of stochastic rounding. Both formats (float16
and bfloat16; bfloat16's own conversion tests are test_bfloat16.py): the
bag functions on 16-bit arrays against the same functions on the float32
widening of the array (bitwise: the conversion is exact and the
arithmetic the same); the fused updates against float32 arithmetic
rounded by the models (storage16.py); the same bits on any thread count;
the torch modules; and what stochastic rounding is for (small steps move
a weight on average)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import hashemb as he
import fuzzing
from reference import M64
from storage16 import (FORMATS, expected_update, round16, round_bits, rowwise_model,
                       sr_reference, widen)
from test_bag import batches


def round_half(x, seed=0):
    return round16(x, seed).view(np.float16)


@pytest.mark.parametrize("fmt", FORMATS)
def test_widen_is_exact_on_every_value(fmt):
    h = np.arange(1 << 16, dtype=np.uint16).view(fmt.dtype)
    got, want = widen(h), h.astype(np.float32)
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


def _batch16(b, fmt):
    """A batch of test_bag.batches with its array stored in the format."""
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    H = M.astype(np.float32).astype(fmt.dtype)
    psw = None if psw is None else psw.astype(np.float32)
    return scheme, idx, off, H, widen(H).reshape(H.shape), T, mode, psw, B


@pytest.mark.parametrize("fmt", FORMATS)
@given(b=batches(multi=True))
def test_forward_equals_the_widened_array_bitwise(fmt, b):
    scheme, idx, off, H, W, T, mode, psw, B = _batch16(b, fmt)
    out = he.embedding_bags(idx, H, off, scheme=scheme, num_tables=T, mode=mode,
                            per_sample_weights=psw)
    want = he.embedding_bags(idx, W, off, scheme=scheme, num_tables=T, mode=mode,
                             per_sample_weights=psw)
    assert out.dtype == np.float32
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("fmt", FORMATS)
@given(b=batches(multi=True), gseed=st.integers(0, 99))
def test_gradient_equals_the_widened_array_bitwise(fmt, b, gseed):
    scheme, idx, off, H, W, T, mode, psw, B = _batch16(b, fmt)
    G = np.random.default_rng(gseed).standard_normal((B, T * scheme.dim)).astype(np.float32)
    got = he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                     per_sample_weights=psw, weight=H)
    want = he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                      per_sample_weights=psw, weight=W)
    assert got.dtype == np.float32 and got.shape == H.shape
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=50)
@given(b=batches(multi=True), gseed=st.integers(0, 99), opt=st.sampled_from(["sgd", "adagrad"]),
       sr=st.booleans())
def test_fused_update_rounds_the_float32_step(fmt, b, gseed, opt, sr):
    scheme, idx, off, H, W, T, mode, psw, B = _batch16(b, fmt)
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
        want = expected_update(twin, W32, grad, state, twin._round_seed(Hw), fmt)
        assert he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                          per_sample_weights=psw, weight=Hw,
                                          optimizer=optimizer) is None
        assert np.array_equal(Hw.reshape(-1).view(np.uint16), want)
        if opt == "adagrad":
            np.testing.assert_array_equal(optimizer.state_for(Hw)[0], state)
            assert optimizer.state_for(Hw)[0].dtype == np.float32
        assert not optimizer.scratch_for(Hw).any()      # left zeroed for the next call


@pytest.mark.parametrize("fmt", FORMATS)
def test_stochastic_rounding_moves_small_steps_on_average(fmt):
    # 64 slots at 1.0, 400 SGD steps of 1e-4 each (a fifth of float16's
    # spacing just below 1, a 39th of bfloat16's): to nearest, nothing ever
    # moves; stochastically the mean lands on 1 - 0.04, as in float32
    full = he.FullTable([1], 64)
    x = np.zeros((1, 1), np.int64)
    g = np.ones((1, 64), np.float32)
    ends = {}
    for sr in (False, True):
        W = np.ones((1, 64), fmt.dtype)
        opt = he.SGD(1e-4, stochastic_rounding=sr, seed=3)
        for _ in range(400):
            he.embedding_bags_backward(g, x, scheme=full, num_tables=1, weight=W, optimizer=opt)
        ends[sr] = widen(W).astype(np.float64)
    assert (ends[False] == 1.0).all()
    # per step the rounding adds at most spacing^2 / 4 of variance
    sd = np.sqrt(400 * fmt.spacing ** 2 / 4 / 64)
    assert abs(ends[True].mean() - (1 - 0.04)) < 5 * sd
    assert ends[True].std() > 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_rounding_is_the_same_on_any_thread_count(fmt):
    # a hashed array (SGD and Adagrad), and a full table summed per row with
    # rows at the edges of 2 and 3 threads' row-aligned ranges (SGD,
    # Adagrad, row-wise Adagrad)
    dtype = "np.float16" if fmt.bf == 0 else "__import__('ml_dtypes').bfloat16"
    code = ("import numpy as np, hashemb as he, hashlib;"
            "r=he.RobeZ(50000, 16, block=4);x=np.random.default_rng(0).integers(0,10**9,(4096,8));"
            "g=np.random.default_rng(1).standard_normal((4096,128)).astype(np.float32);"
            f"W=r.init_weight(dtype={dtype});"
            "[he.embedding_bags_backward(g,x,scheme=r,num_tables=8,weight=W,"
            "optimizer=o) for o in (he.SGD(1e-3, seed=5), he.Adagrad(1e-2, seed=5))];"
            "f=he.FullTable([200_003], 8);y=np.random.default_rng(2).integers(0,200_003,(10_000,1));"
            "y[:3,0]=[(200_003*8*k//n)//8 for k,n in ((1,2),(1,3),(2,3))];"
            "h=np.random.default_rng(3).standard_normal((10_000,8)).astype(np.float32);"
            f"F=f.init_weight(dtype={dtype});"
            "[he.embedding_bags_backward(h,y,scheme=f,num_tables=1,weight=F,optimizer=o)"
            " for o in (he.SGD(0.1, seed=5), he.Adagrad(0.1, seed=5), he.RowwiseAdagrad(0.1, seed=5))];"
            "print(hashlib.sha1(W.tobytes()).hexdigest(), hashlib.sha1(F.tobytes()).hexdigest())")
    outs = fuzzing.outputs_by_threads(code)
    assert len(set(outs.values())) == 1, outs


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_d_input_and_saved_starts(fmt):
    robe = he.RobeZ(5000, 16, block=16)
    H = robe.init_weight(seed=2, dtype=fmt.dtype)
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
    assert (H1.view(np.uint16) != H.view(np.uint16)).any()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scheme", [he.RobeZ(1000, 16), he.FullTable([70_001, 3], 16)],
                         ids=["small", "chunked"])
def test_init_weight(fmt, scheme):
    # drawn a chunk at a time (the second spans two chunks and a partial one):
    # the same values as the float32 draw, rounded to nearest
    H = scheme.init_weight(seed=4, dtype=fmt.dtype)
    assert H.dtype == fmt.dtype and H.shape == scheme.weight_shape
    assert np.array_equal(H.view(np.uint16), fmt.nearest(scheme.init_weight(seed=4)).reshape(H.shape))


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


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_module(fmt):
    torch = pytest.importorskip("torch")
    from hashemb.torch import RobeEmbeddingBagCollection, make_embedding
    tdtype = torch.float16 if fmt.bf == 0 else torch.bfloat16
    x = torch.randint(0, 1000, (32, 4))
    ref = RobeEmbeddingBagCollection([1000] * 4, 16, compression=10)
    for opt in (None, "sgd", "adagrad"):
        m = RobeEmbeddingBagCollection([1000] * 4, 16, compression=10, optimizer=opt,
                                       dtype=tdtype)
        assert m.weight.dtype == tdtype
        # the same draws as float32, rounded to nearest (torch's rounding too)
        assert torch.equal(m.weight.detach(), ref.weight.detach().to(tdtype))
        twin = RobeEmbeddingBagCollection([1000] * 4, 16, compression=10)
        twin.weight.data = m.weight.detach().float()
        y = m(x)
        assert y.dtype == torch.float32 and torch.equal(y, twin(x))
        w0 = m.weight.detach().clone()
        y.square().sum().backward()
        if opt is None:         # autograd hands the float32 gradient over in the array's dtype
            twin(x).square().sum().backward()
            assert m.weight.grad.dtype == tdtype
            assert torch.equal(m.weight.grad, twin.weight.grad.to(tdtype))
        else:
            assert m.weight.grad is None and (m.weight != w0).any()
        if opt == "adagrad":
            assert m.optimizer_state.dtype == torch.float32 and m.optimizer_state.any()
        back = RobeEmbeddingBagCollection([1000] * 4, 16, compression=10, optimizer=opt,
                                          dtype=tdtype)
        back.load_state_dict(m.state_dict())
        assert torch.equal(back(x), m(x))
    e = make_embedding("full", [100, 200], optimizer="rowwise_adagrad", lr=0.1, dtype=tdtype)
    assert e.weight.dtype == tdtype and e.optimizer_state.shape == (300,)
    e(torch.randint(0, 100, (8, 2))).sum().backward()
    assert e.optimizer_state.dtype == torch.float32 and e.optimizer_state.any()


# per format: uniform weights near 0 (its subnormals), weights near its
# largest values, steps; and the bound below which a value is subnormal
# per format: weights around its subnormals (tiny) and largest values (big),
# SGD's steps, its smallest normal, and Adagrad's large lr (steps of about
# lr, with eps 1: past the largest value from the big weights)
EDGES = {"float16": (2e-5, [65000.0, -65000.0, 60000.0, 1e-7, 0.0, -0.0],
                     [0.0, 1e-3, -3e-5, 50.0, -5e4, 1e-9], 2.0**-14, 3000.0),
         "bfloat16": (2e-39, [3.38e38, -3.38e38, 3e38, 1e-40, 0.0, -0.0],
                      [0.0, 1e-3, -3e-41, 5e36, -5e37, 1e-39], 2.0**-126, 3e37)}
# Adagrad's gradients: |lr g| stays a float; -3e-41 (a float32 subnormal)
# and 1e-9 give subnormal steps at lr 0.5; a zero sum, of either sign,
# moves nothing (w - (-0.0) would turn a -0.0 weight into +0.0)
ADAGRAD_GRADS = [0.0, -0.0, 1e-3, -3e-5, 0.5, -0.9, 1e-9, -3e-41]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("sr", [True, False])
@pytest.mark.parametrize("opt", ["sgd", "adagrad", "rowwise"])
def test_update_at_the_edges_matches_the_model(fmt, sr, opt):
    # weights and steps around the format's subnormals, its largest values
    # and overflow, mixed with ordinary ones in the same eight-slot groups
    # (float16's vector apply sends such groups to the scalar code): bitwise
    # the model, and the edges reached
    tiny, big, steps, normal, big_lr = EDGES[fmt.name]
    full = he.FullTable([64], 8)
    rng = np.random.default_rng(5)
    W = np.concatenate([rng.uniform(-1, 1, 256), rng.uniform(-tiny, tiny, 128),
                        rng.choice(big, 128)])
    W = rng.permutation(W).astype(np.float32).astype(fmt.dtype).reshape(64, 8)
    x = np.arange(64).reshape(64, 1)
    g = rng.choice(steps if opt == "sgd" else ADAGRAD_GRADS, (64, 8)).astype(np.float32)
    for lr in [0.5] if opt == "sgd" else [0.5, big_lr]:
        make = {"sgd": lambda: he.SGD(lr, stochastic_rounding=sr, seed=11),
                "adagrad": lambda: he.Adagrad(lr, eps=1.0, stochastic_rounding=sr, seed=11),
                "rowwise": lambda: he.RowwiseAdagrad(lr, eps=1.0, stochastic_rounding=sr,
                                                     seed=11)}[opt]
        o, twin = make(), make()
        state = np.zeros(64 if opt == "rowwise" else W.size, np.float32)
        for _ in range(3):      # the state carries over
            W32 = widen(W).reshape(W.shape)
            grad = he.embedding_bags_backward(g, x, scheme=full, num_tables=1, weight=W32)
            seed = twin._round_seed(W)
            if opt == "rowwise":
                want = W.copy()
                rowwise_model(want, state, grad, lr, 1.0, seed)
                want = want.reshape(-1).view(np.uint16)
            else:
                want = expected_update(twin, W32, grad, state if opt == "adagrad" else None,
                                       seed, fmt)
            he.embedding_bags_backward(g, x, scheme=full, num_tables=1, weight=W, optimizer=o)
            assert np.array_equal(W.reshape(-1).view(np.uint16), want)
    W32 = widen(W)
    assert np.isinf(W32).any() and (np.abs(W32[np.isfinite(W32)]) < normal).any()
    # a -0.0 weight stays -0.0 under a -0.0 gradient (the fused step's sum
    # keeps the sign, the model's gradient, summed into zeros, does not)
    if opt != "sgd":
        neg = (W.reshape(-1).view(np.uint16) == 0x8000) & (g.reshape(-1) == 0) & np.signbit(
            g.reshape(-1))
        assert neg.any()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("D", [8, 13, 16])
@pytest.mark.parametrize("sr", [True, False])
def test_rowwise_adagrad_rounds_each_element_once(fmt, D, sr):
    # every element of a moved row, rounded once: eight a step where the
    # machine can, the rest (D 13) one at a time; hot rows summed first
    full = he.FullTable([3000, 700], D)
    rng = np.random.default_rng(4)
    x = rng.integers(0, 700, (150, 2))
    x[::5] = x[1]
    H = full.init_weight(seed=1, dtype=fmt.dtype)
    opt, twin = (he.RowwiseAdagrad(0.05, eps=1e-4, stochastic_rounding=sr, seed=9)
                 for _ in range(2))
    want, state = H.copy(), np.zeros(full.size // D, np.float32)
    for _ in range(2):          # the state and the rounding stream carry over
        g = rng.standard_normal((150, 2 * D)).astype(np.float32)
        grad = he.embedding_bags_backward(g, x, scheme=full, num_tables=2,
                                          weight=widen(want).reshape(H.shape))
        rowwise_model(want, state, grad, twin.lr, twin.eps, twin._round_seed(want))
        he.embedding_bags_backward(g, x, scheme=full, num_tables=2, weight=H, optimizer=opt)
        assert np.array_equal(H.view(np.uint16), want.view(np.uint16))
    np.testing.assert_array_equal(opt.state_for(H, full.size // D), state)
    assert opt.state_for(H, full.size // D).dtype == np.float32
    assert not opt._scratch


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("opt", ["sgd", "adagrad"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("sr", [True, False])
def test_full_table_step_sums_per_row_without_a_scratch(fmt, opt, mode, sr):
    # a full table large next to its batch: the 16-bit step sums each row's
    # gradient in a compact buffer (no scratch of the table's size is made),
    # duplicates, weights and bags of 1 to 3 entries included: bitwise the
    # model's update
    full = he.FullTable([40_000, 30_011], 8)
    rng = np.random.default_rng(1)
    B, T = 300, 2
    x = rng.integers(0, 30_011, (B, T))
    x[::7] = x[0]                                   # hot rows, summed in entry order
    H = full.init_weight(seed=3, dtype=fmt.dtype)
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
        want = expected_update(twin, W32, grad, state, twin._round_seed(H), fmt)
        he.embedding_bags_backward(g, flat, off, scheme=full, num_tables=T, mode=mode,
                                   per_sample_weights=pw, weight=H, optimizer=optimizer)
        assert np.array_equal(H.reshape(-1).view(np.uint16), want)
    assert not optimizer._scratch       # no dense float32 copy of the table
