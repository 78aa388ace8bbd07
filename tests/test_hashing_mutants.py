"""Tests beside tests/test_hashing.py, each killing a mutant that survived the suite
(mutation round 3, of hashemb/hashing.py)."""
import pytest

import hashemb as he
from hashemb.hashing import P, _splitmix64, coefficients

M64 = (1 << 64) - 1
GOLD = 0x9E3779B97F4A7C15


def _unshift(y, s):
    """Inverse of x -> x ^ (x >> s) on 64 bits."""
    x = y
    for _ in range(64 // s + 1):
        x = y ^ (x >> s)
    return x


def _unmix(z):
    """The SplitMix64 state whose output is z (the finaliser is a bijection)."""
    x = _unshift(z, 31)
    x = (x * pow(0x94D049BB133111EB, -1, 1 << 64)) & M64
    x = _unshift(x, 27)
    x = (x * pow(0xBF58476D1CE4E5B9, -1, 1 << 64)) & M64
    return _unshift(x, 30)


def _seed_drawing_zero_at(k):
    """A seed whose (k+1)-th SplitMix64 word is 0 (so its 61-bit value v is 0)."""
    return (_unmix(0) - (k + 1) * GOLD) & M64


def test_unmix_inverts_splitmix():
    for s in (0, 1, 12345, M64):
        state, z = _splitmix64(s)
        assert _unmix(z) == state


@pytest.mark.parametrize("k", [0, 4, 8])
def test_a_zero_draw_is_never_a_multiplier(k):
    # a zero word drawn where a multiplier (A, B, C, ...) goes is rejected:
    # a zero multiplier would drop the table, token or block from the hash
    seed = _seed_drawing_zero_at(k)
    assert _splitmix64((seed + k * GOLD) & M64)[1] >> 3 == 0
    c = coefficients(seed, 12)
    for pos in (0, 1, 2, 4, 5, 6, 8, 9, 10):
        assert 0 < c[pos] < P
    assert all(0 <= v < P for v in c)
    h = he.UniversalHash(seed)
    assert all(int(v) != 0 for v in h.coef[[0, 1, 2, 4, 5, 6, 8, 9, 10]])


def test_a_zero_draw_is_kept_as_a_constant():
    # the constants D0 (position 3) take 0 like any value of [0, P): the
    # draws are exactly uniform there
    seed = _seed_drawing_zero_at(3)
    c = coefficients(seed, 4)
    # (the three draws before it are valid multipliers for this seed)
    assert all(0 < _splitmix64((seed + i * GOLD) & M64)[1] >> 3 < P for i in range(3))
    assert c[3] == 0
    assert he.UniversalHash(seed).coef[3] == 0
