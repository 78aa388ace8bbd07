"""hashemb.theory against exact enumeration of every hash outcome (ideal
randomness), against the formulas written out as double sums, and against
Monte Carlo over the library's own hash seeds. Tolerances come from the
estimators' own confidence intervals (99%) with fixed seeds, never widened."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import hashemb as he
from hashemb import theory
from reference import slots_signs

ZS = [1, 2, 4, 8, 16, 32, 64]
N, M = 4096, 512


# ---- independent references ---------------------------------------------------

def enumerate_outcomes(n, m, Z, wrap, signed):
    """Every equally likely (offsets, signs) outcome of an ideal ROBE-Z map:
    slot-equality matrices C (O, n, n) and sign products G (S, n, n)."""
    B = -(-n // Z)
    R = m if wrap else m - Z + 1
    offs = np.array(list(itertools.product(range(R), repeat=B)))
    pos = np.arange(n) % Z
    slots = offs[:, np.arange(n) // Z] + pos
    if wrap:
        slots %= m
    C = (slots[:, :, None] == slots[:, None, :]).astype(float)
    g = np.array(list(itertools.product([1.0, -1.0], repeat=n))) if signed else np.ones((1, n))
    G = g[:, :, None] * g[:, None, :]
    return C, G


def exact_moments(x, y, m, Z, wrap, signed):
    C, G = enumerate_outcomes(len(x), m, Z, wrap, signed)
    est = np.einsum("oik,sik,ik->os", C, G, np.outer(x, y))
    return est.mean(), est.var()


def paper_variance(x, y, m, Z):
    """Theorem 1 as printed: (1/m) sum over ordered pairs in different blocks."""
    n = len(x)
    blk = np.arange(n) // Z
    diff = blk[:, None] != blk[None, :]
    return float((diff * (np.outer(x * x, y * y) + np.outer(x * y, x * y))).sum() / m)


def feature_hashing_variance(x, y, m):
    """Weinberger et al. (2009): (1/m) sum_{i != j} x_i^2 y_j^2 + x_i y_i x_j y_j."""
    total = 0.0
    for i in range(len(x)):
        for j in range(len(x)):
            if i != j:
                total += x[i] ** 2 * y[j] ** 2 + x[i] * y[i] * x[j] * y[j]
    return total / m


small = st.lists(st.integers(-3, 3), min_size=1, max_size=5)


# ---- closed forms vs exact enumeration ----------------------------------------

@settings(max_examples=40, deadline=None)
@given(xs=small, seed=st.integers(0, 1000), Z=st.integers(1, 3), m=st.integers(3, 4),
       wrap=st.booleans())
def test_theorem1_exact(xs, seed, Z, m, wrap):
    x = np.array(xs, float)
    y = np.random.default_rng(seed).integers(-3, 4, x.shape[0]).astype(float)
    mean, var = exact_moments(x, y, m, Z, wrap, signed=True)
    assert mean == pytest.approx(x @ y, abs=1e-9)
    assert theory.inner_product_variance(x, y, m, block=Z, wrap=wrap) == pytest.approx(var, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(xs=small, seed=st.integers(0, 1000), Z=st.integers(1, 3), m=st.integers(3, 5),
       wrap=st.booleans())
def test_unsigned_bias_exact(xs, seed, Z, m, wrap):
    x = np.array(xs, float)
    y = np.random.default_rng(seed).integers(-3, 4, x.shape[0]).astype(float)
    mean, _ = exact_moments(x, y, m, Z, wrap, signed=False)
    got = theory.inner_product_expectation(x, y, m, block=Z, signed=False, wrap=wrap)
    assert got == pytest.approx(mean, abs=1e-9)
    assert theory.inner_product_expectation(x, y, m, block=Z) == x @ y


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), dim=st.sampled_from([1, 2]), Z=st.sampled_from([1, 2, 4]),
       rows=st.integers(2, 3), m=st.integers(4, 5), wrap=st.booleans())
def test_theorem2_exact(seed, dim, Z, rows, m, wrap):
    if rows * dim > 6 or (Z > dim and (rows * dim) % Z) or Z > m:
        return
    theta = np.random.default_rng(seed).integers(-3, 4, (rows, dim)).astype(float)
    a, b = 0, 1
    C, G = enumerate_outcomes(rows * dim, m, Z, wrap, True)
    t = theta.reshape(-1)
    ia, ib = a * dim + np.arange(dim), b * dim + np.arange(dim)
    ahat = np.einsum("oki,ski,i->osk", C[:, ia], G[:, ia], t)
    bhat = np.einsum("oki,ski,i->osk", C[:, ib], G[:, ib], t)
    want = (ahat * bhat).sum(-1).mean()
    got = theory.embedding_inner_product_expectation(theta, a, b, m, dim=dim, block=Z, wrap=wrap)
    assert got == pytest.approx(want, abs=1e-9)


# ---- closed forms vs the formulas written out ----------------------------------

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 80), Z=st.integers(1, 16),
       m=st.integers(16, 1000))
def test_variance_is_the_papers_double_sum(seed, n, Z, m):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal(n), rng.standard_normal(n)
    assert theory.inner_product_variance(x, y, m, block=Z) == pytest.approx(
        paper_variance(x, y, m, Z), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("wrap", [True, False])
def test_variance_keeps_precision_when_one_block_holds_the_mass(wrap):
    # "all pairs minus same-block pairs" cancelled to 0.0 (wrap) and
    # -2147483648.0 (no wrap) here; the reference sums the cross-block pairs
    # one by one in exact rationals
    from fractions import Fraction
    x = np.concatenate([np.full(8, 1e6), np.full(8, 1e-3)])
    m, Z = 16, 8
    mm = m - Z + 1

    def p(a, c):            # Pr(slot of position a == slot of position c), two blocks
        if wrap:
            return Fraction(1, m)
        d = abs(a - c)
        return Fraction(mm - d, mm * mm) if d < mm else Fraction(0)

    q = [Fraction(v) for v in x]
    want = sum(p(i % Z, k % Z) * (q[i] ** 2 * q[k] ** 2 + q[i] * q[i] * q[k] * q[k])
               for i in range(16) for k in range(16) if i // Z != k // Z)
    got = theory.inner_product_variance(x, x, m, block=Z, wrap=wrap)
    assert got == pytest.approx(float(want), rel=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 40), m=st.integers(1, 100))
def test_z1_is_feature_hashing(seed, n, m):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal(n), rng.standard_normal(n)
    assert theory.inner_product_variance(x, y, m, block=1) == pytest.approx(
        feature_hashing_variance(x, y, m), rel=1e-9, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 300), k=st.integers(0, 6),
       m=st.integers(128, 4096), heavy=st.booleans())
def test_variance_shrinks_as_nested_blocks_grow(seed, n, k, m, heavy):
    rng = np.random.default_rng(seed)
    draw = (lambda: rng.pareto(1.2, n) * rng.choice([-1, 1], n)) if heavy else \
        (lambda: rng.standard_normal(n))
    x, y = draw(), draw()
    v1 = theory.inner_product_variance(x, y, m, block=1)
    vz = theory.inner_product_variance(x, y, m, block=2 ** k)
    v2z = theory.inner_product_variance(x, y, m, block=2 ** (k + 1))
    tol = 1e-9 * v1
    assert vz <= v1 + tol and v2z <= vz + tol


def test_variance_not_monotone_in_z_without_nesting():
    # The paper: "V_Z decreases as Z grows". It does along divisibility (nested
    # blocks), not in general: blocks of 2 keep elements 2, 3 together, blocks
    # of 3 split them.
    x = np.zeros(6)
    x[[2, 3]] = 1.0
    assert theory.inner_product_variance(x, x, 100, block=2) == 0.0
    assert theory.inner_product_variance(x, x, 100, block=3) == pytest.approx(4 / 100)


def test_no_wrap_costs_variance():
    x = np.random.default_rng(0).standard_normal(4096)
    for Z in (8, 64):
        ratio = theory.inner_product_variance(x, x, 256, block=Z, wrap=False) / \
            theory.inner_product_variance(x, x, 256, block=Z)
        # mean collision chance over position pairs: E|d| = (Z^2 - 1) / 3Z
        mm = 256 - Z + 1
        assert ratio == pytest.approx(256 * (mm - (Z * Z - 1) / (3 * Z)) / mm ** 2, rel=0.02)
        assert ratio > 1


# ---- the sketch is the library's map -------------------------------------------

@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), n=st.integers(1, 60), Z=st.sampled_from([1, 2, 4, 8]),
       m=st.integers(8, 200), signed=st.booleans(), wrap=st.booleans())
def test_sketch_matches_reference(seed, n, Z, m, signed, wrap):
    theta = np.random.default_rng(seed % 1000).standard_normal(n)
    got = theory.sketch(theta, m, block=Z, seed=seed, signed=signed, wrap=wrap)
    scheme = he.RobeZ(m, Z, block=Z, seed=seed, signed=signed, wrap=wrap)
    rows = -(-n // Z)
    S, G = slots_signs(scheme, list(range(rows)), [0] * rows)
    t = np.zeros(rows * Z)
    t[:n] = theta
    want = np.zeros(m)
    np.add.at(want, S.reshape(-1), G.reshape(-1) * t)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_sketch_of_a_table_is_hashednet_for_z1():
    theta = np.random.default_rng(1).standard_normal((50, 8))
    got = theory.sketch(theta, 97, block=1, dim=8, seed=5)
    hn = he.HashedNet(97, 8, seed=5, signed=True)
    rows = np.arange(50)
    want = np.bincount(hn.slots(rows).reshape(-1),
                       weights=(hn.signs(rows) * theta).reshape(-1), minlength=97)
    np.testing.assert_allclose(got, want)


# ---- Monte Carlo over the library's seeds (the target) -----------------

FAMILIES = theory.vector_families(N)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("Z", ZS)
def test_monte_carlo_matches_theorem1(family, Z):
    x, y = FAMILIES[family]
    mc = theory.monte_carlo(theory.inner_product_estimates(x, y, M, block=Z, seeds=2000), 0.99)
    assert mc.covers(mean=float(x @ y)), (mc.mean, mc.mean_ci)
    v = theory.inner_product_variance(x, y, M, block=Z)
    assert mc.covers(variance=v), (v, mc.variance_ci)


def test_linear_sign_hash_breaks_theorem1():
    # Pairwise-independent signs are enough for unbiasedness, not for the
    # variance: a grid of (token, element) keys has k1 + k4 = k2 + k3 quadruples.
    x = np.ones(N)
    est = theory.inner_product_estimates(x, x, M, block=8, seeds=300, signs="linear")
    v = theory.inner_product_variance(x, x, M, block=8)
    assert est.var() > 50 * v
    assert theory.monte_carlo(est).covers(mean=float(x @ x))


def test_monte_carlo_unsigned_bias():
    rng = np.random.default_rng(3)
    x, y = rng.random(1024), rng.random(1024)          # positive: a visible bias
    for Z, wrap in [(1, True), (16, True), (16, False)]:
        est = theory.inner_product_estimates(x, y, 64, block=Z, seeds=2000, signed=False,
                                             wrap=wrap)
        want = theory.inner_product_expectation(x, y, 64, block=Z, signed=False, wrap=wrap)
        mc = theory.monte_carlo(est)
        assert mc.covers(mean=want), (Z, wrap, want, mc.mean_ci)
        assert not mc.covers(mean=float(x @ y))


def test_monte_carlo_no_wrap_variance():
    x = np.random.default_rng(4).standard_normal(2048)
    est = theory.inner_product_estimates(x, x, 128, block=32, seeds=2000, wrap=False)
    assert theory.monte_carlo(est).covers(
        mean=float(x @ x), variance=theory.inner_product_variance(x, x, 128, block=32, wrap=False))


def theorem2_table(rows, dim, a, b, seed):
    theta = 0.1 * np.random.default_rng(seed).standard_normal((rows, dim))
    theta[a] = 10.0
    theta[b] = 10.0 + np.arange(dim)
    return theta


@pytest.mark.parametrize("dim,Z,a,b,wrap", [(4, 2, 0, 5, True),    # Z < D: never one block
                                           (4, 4, 0, 5, True),    # ROBE-D
                                           (4, 8, 0, 5, True),    # Z > D, different blocks
                                           (4, 2, 0, 5, False),
                                           (4, 8, 0, 5, False)])  # Z > D, no wrap
def test_theorem2_different_blocks_biased(dim, Z, a, b, wrap):
    theta = theorem2_table(16, dim, a, b, 0)
    # Z > D without wrap at m = Z: every block starts at 0, rows 0 and 5 at
    # other offsets in it never meet (no bias to see); m = 16 has 9 starts
    m = 16 if Z > dim and not wrap else 8
    mc = theory.monte_carlo(theory.embedding_inner_product_estimates(
        theta, a, b, m, dim=dim, block=Z, seeds=2000, wrap=wrap))
    want = theory.embedding_inner_product_expectation(theta, a, b, m, dim=dim, block=Z, wrap=wrap)
    if wrap:
        assert want == pytest.approx(theta[a] @ theta[b] * (1 + 1 / m))
    assert mc.covers(mean=want), (want, mc.mean_ci)
    assert not mc.covers(mean=float(theta[a] @ theta[b]))     # the bias is real


def test_theorem2_same_block_unbiased():
    dim, Z, a, b = 4, 8, 2, 3                                  # r = 2 rows per block
    theta = theorem2_table(16, dim, a, b, 1)
    want = theory.embedding_inner_product_expectation(theta, a, b, 8, dim=dim, block=Z)
    assert want == theta[a] @ theta[b]
    mc = theory.monte_carlo(theory.embedding_inner_product_estimates(
        theta, a, b, 8, dim=dim, block=Z, seeds=2000))
    assert mc.covers(mean=want), (want, mc.mean_ci)


# ---- errors ---------------------------------------------------------------------

@pytest.mark.parametrize("call,exc,match", [
    (lambda: theory.inner_product_variance(np.ones(4), np.ones(5), 8, block=1), ValueError, "y:"),
    (lambda: theory.inner_product_variance(np.ones(4), np.ones(4), 8, block=9), ValueError, "block:"),
    (lambda: theory.inner_product_variance(np.ones(4), np.ones(4), 0, block=1), ValueError, "m:"),
    (lambda: theory.inner_product_variance([], [], 8, block=1), ValueError, "x:"),
    (lambda: theory.inner_product_variance([np.nan], [1.0], 8, block=1), ValueError, "x:"),
    (lambda: theory.inner_product_variance(["a"], ["b"], 8, block=1), TypeError, "x:"),
    (lambda: theory.sketch(np.ones(4), 8, block=2, signs="quadratic"), ValueError, "signs:"),
    (lambda: theory.sketch(np.ones(4), 8, block=2, signed=False, signs="linear"), ValueError, "signs:"),
    (lambda: theory.sketch(np.ones(5), 8, block=1, dim=2), ValueError, "theta:"),
    (lambda: theory.sketch(np.ones(4), 8, block=2, seed=-1), ValueError, "seed"),
    (lambda: theory.inner_product_estimates(np.ones(4), np.ones(4), 8, block=1, seeds=0),
     ValueError, "seeds:"),
    (lambda: theory.inner_product_estimates(np.ones(4), np.ones(4), 8, block=1, seeds=[]),
     ValueError, "seeds:"),
    (lambda: theory.embedding_inner_product_expectation(np.ones(8), 1, 1, 8, dim=2, block=1),
     ValueError, "b:"),
    (lambda: theory.embedding_inner_product_expectation(np.ones(8), 0, 4, 8, dim=2, block=1),
     ValueError, "b:"),
    (lambda: theory.embedding_inner_product_expectation(np.ones(12), 0, 1, 8, dim=4, block=3),
     ValueError, "block:"),
    (lambda: theory.monte_carlo([1.0]), ValueError, "estimates:"),
    # flags, as RobeZ takes them (a string 'False' gave the wrap / signed figures)
    (lambda: theory.inner_product_variance(np.ones(4), np.ones(4), 8, block=2, wrap="False"),
     TypeError, "wrap:"),
    (lambda: theory.inner_product_expectation(np.ones(4), np.ones(4), 8, block=2,
                                              signed="False"), TypeError, "signed:"),
    (lambda: theory.inner_product_expectation(np.ones(4), np.ones(4), 8, block=2, wrap="no"),
     TypeError, "wrap:"),
    (lambda: theory.embedding_inner_product_expectation(np.ones(8), 0, 1, 8, dim=2, block=1,
                                                        wrap="False"), TypeError, "wrap:"),
    (lambda: theory.monte_carlo([1.0, 2.0], confidence=1.0), ValueError, "confidence:"),
])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_monte_carlo_summary_of_a_known_sample():
    """The summary's figures exactly (coverage alone cannot tell the sample
    variance from the population one at 2000 estimates)."""
    import math
    mc = theory.monte_carlo([1.0, 2.0, 3.0, 4.0], confidence=0.95)
    assert mc.mean == 2.5
    assert mc.variance == pytest.approx(5 / 3)                   # ddof=1
    half = 1.959963984540054 * math.sqrt((5 / 3) / 4)
    assert mc.mean_ci == pytest.approx((2.5 - half, 2.5 + half))
