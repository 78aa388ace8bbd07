"""16-bit storage in the tests: the kernels' conversions (through _bag),
exact-rational models of both formats' rounding (independent of half.h's
bit arithmetic), the fused steps' models (SGD / Adagrad, and row-wise
Adagrad for any weight dtype), and FORMATS, the two formats as the tests
shared by float16 and bfloat16 (test_half.py) take them."""
from fractions import Fraction

import numpy as np
import pytest

import hashemb as he
from hashemb._cpu import _bag

try:
    import ml_dtypes
    BF = np.dtype(ml_dtypes.bfloat16)
except ImportError:         # bfloat16's tests skip
    BF = None


def widen(h):
    """The float16 or bfloat16 array h as float32 (the kernels' he_s2f), flat."""
    out = np.empty(h.size, np.float32)
    bf = int(h.dtype != np.float16)
    _bag.half_widen(np.ascontiguousarray(h).view(np.uint16).reshape(-1), out, bf)
    return out


def round16(x, seed=0, bf=0):
    """x rounded by the kernels to float16 (bf 0) or bfloat16 (bf 1) bits:
    to nearest for seed 0, else stochastically (bits of (seed, i))."""
    out = np.empty(np.size(x), np.uint16)
    _bag.half_round(np.ascontiguousarray(x, np.float32).reshape(-1), out, seed, bf)
    return out


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
    """Stochastic rounding of the float32 x to float16: |x| truncated to
    float16, plus one step away from zero when rnd < floor(2^32 (|x| - |lo|)
    / step); past 65504 the step up is inf."""
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


BF_MAX_BITS = 0x7F7F          # the largest finite bfloat16


def bf_value(bits):
    """The exact value of the non-negative bfloat16 bits (0x7f80: 2^128, the
    step past the largest value, where IEEE rounding overflows to inf)."""
    e, m = bits >> 7, bits & 0x7F
    if e == 0:
        return Fraction(m, 128) * Fraction(1, 2**126)
    return (1 + Fraction(m, 128)) * Fraction(2) ** (e - 127)


def bf_floor_bits(ax):
    """The largest bfloat16 bits whose value is <= the Fraction ax >= 0 (a
    binary search over the ordered finite values)."""
    lo, hi = 0, BF_MAX_BITS
    if bf_value(hi) <= ax:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if bf_value(mid) <= ax else (lo, mid)
    return lo


def bf_model(x, rnd=None):
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
    lo = bf_floor_bits(ax)
    lo_v, hi_v = bf_value(lo), bf_value(lo + 1)
    if rnd is None:
        d_lo, d_hi = ax - lo_v, hi_v - ax
        up = d_hi < d_lo or (d_hi == d_lo and lo & 1)
    else:
        k = (ax - lo_v) / (hi_v - lo_v) * 65536
        assert k.denominator == 1       # the step spans 2^16 float32 spacings
        up = k > 0 and (rnd >> 16) >= 65536 - k
    return (lo + 1 if up else lo) | sign


class Fmt:
    """One 16-bit format as the shared tests see it: its dtype, the kernels'
    flag, the spacing of its values just below 1, and its rounding of
    float32 values to bits by the models above."""

    def __init__(self, name, dtype, bf, spacing):
        self.name, self.dtype, self.bf, self.spacing = name, dtype, bf, spacing

    def nearest(self, v):
        """Bits of the float32 array v rounded to nearest (NumPy's and
        ml_dtypes' conversions, which the conversion tests check against
        the models)."""
        with np.errstate(over="ignore"):        # past the largest value: inf, as intended
            return np.asarray(v, np.float32).astype(self.dtype).view(np.uint16)

    def stochastic(self, x, rnd):
        """Bits of the float32 x rounded stochastically with the random bits rnd."""
        if self.bf:
            return bf_model(x, rnd)
        return int(sr_reference(x, rnd).view(np.uint16))

    def __repr__(self):
        return self.name


F16 = Fmt("float16", np.dtype(np.float16), 0, 2.0**-11)
BF16 = Fmt("bfloat16", BF, 1, 2.0**-8)
# every weight dtype the bag functions take (bfloat16 where ml_dtypes is)
DTYPES = [np.float32, np.float64, np.float16] + ([BF] if BF is not None else [])

FORMATS = [pytest.param(F16, id="float16"),
           pytest.param(BF16, id="bfloat16",
                        marks=pytest.mark.skipif(BF is None, reason="ml_dtypes not installed"))]


def expected_update(opt, W32, grad, state, seed, fmt):
    """The fused SGD / Adagrad step in float32 from the summed gradient,
    each touched slot rounded once by the format's model (its bits, flat)."""
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
    touched = g != 0
    out = fmt.nearest(W32.reshape(-1))      # exact: W32 is the widened array
    if seed == 0:
        out[touched] = fmt.nearest(v[touched])
    else:
        for j in np.flatnonzero(touched):
            out[j] = fmt.stochastic(v[j], round_bits(seed, j))
    return out


def rowwise_model(W, state, grad, lr, eps, seed=0):
    """The row-wise Adagrad step of hashemb/optim.h from the summed gradient
    ``grad`` (W's shape, or flat), rows with a non-zero gradient only: the
    squares summed in double in element order, the mean added to the state
    in its type (float32 for 16-bit storage), the multiplier and the steps
    in double; the elements with a non-zero gradient move. W is updated in
    place; a 16-bit W has each moved element rounded once by its format's
    model (to nearest for seed 0, else with the bits of (seed, slot))."""
    D = W.shape[-1]
    g64 = np.asarray(grad).reshape(-1, D).astype(np.float64)
    fmt = next((f for f in (F16, BF16) if f.dtype is not None and f.dtype == W.dtype), None)
    R = np.float32 if fmt else W.dtype.type
    ss = np.add.accumulate(g64 * g64, axis=1)[:, -1]      # sequential, as the kernels
    hit = ss != 0
    state[hit] = state[hit] + (ss[hit] / D).astype(R)
    mult = float(R(lr)) / (np.sqrt(state.astype(np.float64)) + float(R(eps)))
    step = mult[:, None] * g64
    moved = g64.reshape(-1) != 0
    if fmt is None:
        flat = W.reshape(-1)
        flat[moved] = (flat.astype(np.float64) - step.reshape(-1))[moved].astype(R)
        return
    with np.errstate(over="ignore"):        # past the largest float: inf, as intended
        v = (widen(W) - step.astype(np.float32).reshape(-1)).astype(np.float32)
    bits = W.reshape(-1).view(np.uint16)
    j = np.flatnonzero(moved)
    if seed == 0:
        bits[j] = fmt.nearest(v[j])
    else:
        for k in j:
            bits[k] = fmt.stochastic(v[k], round_bits(seed, k))
