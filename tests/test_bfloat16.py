"""bfloat16 storage (ml_dtypes' dtype), its own parts: the roundings of
hashemb/half.h against an exact-rational model of bfloat16 (nearest-even
and stochastic rounding, storage16.py), ml_dtypes and torch; ties through
the vector and the scalar apply; errors. The tests both 16-bit formats
share (the bag functions against the widened array, the fused steps and
row-wise Adagrad against the models, threads, torch modules) are
test_half.py's, run for each format."""
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import hashemb as he
from reference import M64
from storage16 import BF_MAX_BITS, bf_model as model, bf_value as value, round16, round_bits

ml_dtypes = pytest.importorskip("ml_dtypes")
BF = np.dtype(ml_dtypes.bfloat16)


def round_bf(x, seed=0):
    return round16(x, seed, bf=1)


def test_round_to_nearest_matches_the_model_ml_dtypes_and_torch():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 1 << 32, 1_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    grid = np.arange(1 << 16, dtype=np.uint16).view(BF).astype(np.float32)
    grid = np.sort(grid[np.isfinite(grid)])
    mid = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)   # ties (exact)
    top = np.float32(value(BF_MAX_BITS))
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


def test_bfloat16_gradients_and_weights_are_widened_like_float16():
    # grad_output and per-sample weights in bfloat16 were refused as "not
    # floating-point" (ml_dtypes' dtype is of kind "V"), float16 ones taken
    robe = he.RobeZ(100, 4)
    x = np.array([[1, 2], [3, 4]])
    g = np.random.default_rng(0).standard_normal((2, 4)).astype(BF)
    np.testing.assert_array_equal(
        he.embedding_bag_backward(g, x, scheme=robe),
        he.embedding_bag_backward(g.astype(np.float32), x, scheme=robe))
    w = np.array([[0.5, 2.0], [1.5, -1.0]], BF)
    M = robe.init_weight()
    np.testing.assert_array_equal(he.embedding_bag(x, M, scheme=robe, per_sample_weights=w),
                                  he.embedding_bag(x, M, scheme=robe,
                                                   per_sample_weights=w.astype(np.float32)))
