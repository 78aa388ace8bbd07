import numpy as np
import pytest
from hypothesis import given, strategies as st

import hashemb as he
from reference import P, uhash, usign

KEYS64 = st.integers(-(1 << 63), (1 << 64) - 1)


def test_known_answers_never_change():
    # frozen vectors: a change here changes every trained model's memory layout
    h = he.UniversalHash(0)
    assert h.coef.tolist() == [2036776052082325941, 995035815274294462, 60952127433943209,
                               2238701422097567805, 245218775303261843, 754761825157895261,
                               400912003250038364, 1779065233200043367,
                               566520145124077912, 2195233314247382548,
                               914192909980805025, 1754825900881050590]
    assert h(np.array([0, 1, 2, 2**40, -1]), 1000).tolist() == [805, 316, 778, 151, 186]
    # the cubic sign of session 3 (4-wise independent); slots are unchanged
    assert h.sign(np.arange(8)).tolist() == [-1, -1, 1, -1, -1, -1, -1, 1]


def test_coefficients_in_range_and_seeded():
    for seed in (0, 1, 2**63, 2**64 - 1):
        c = he.UniversalHash(seed).coef.astype(object)
        assert all(0 < v < P for v in c[[0, 1, 2, 4, 5, 6, 8, 9, 10]])
        assert all(0 <= v < P for v in c[[3, 7, 11]])
    assert he.UniversalHash(1).coef.tolist() != he.UniversalHash(2).coef.tolist()
    assert he.UniversalHash(7).coef.tolist() == he.UniversalHash(7).coef.tolist()


@given(seed=st.integers(0, 2**64 - 1), keys=st.lists(KEYS64, min_size=1, max_size=20),
       m=st.integers(1, 2**62 - 1), table=KEYS64, block=KEYS64)
def test_hash_equals_exact_integer_math(seed, keys, m, table, block):
    h = he.UniversalHash(seed)
    arr = np.array([k % 2**64 for k in keys], dtype=np.uint64)
    got = h(arr, m, table=table, block=block)
    want = [uhash(h.coef, table, k, block, m) for k in keys]
    assert got.tolist() == want
    s = h.sign(arr, table=table, element=block)
    assert s.tolist() == [usign(h.coef, table, k, block) for k in keys]


def test_int_dtypes_agree():
    h = he.UniversalHash(3)
    x = np.arange(-50, 50)
    a = h(x.astype(np.int64), 97)
    b = h(x.astype(np.int32), 97)
    c = h(x.astype(np.int64).view(np.uint64), 97)
    assert (a == b).all() and (a == c).all()


def test_large_keys_do_not_wrap():
    # a*x in plain uint64 would wrap for x near 2^61: check against Python ints
    h = he.UniversalHash(5)
    keys = [P - 1, P, P + 1, 2**61, 2**63 - 1, 2**64 - 1]
    got = h(np.array(keys, dtype=np.uint64), 2**40 + 3)
    assert got.tolist() == [uhash(h.coef, 0, k, 0, 2**40 + 3) for k in keys]


@pytest.mark.parametrize("seed", [0, 7, 2**64 - 1])
def test_keys_equal_mod_p_are_one_key(seed):
    # the spec reduces keys mod P, and 2**64 = 8 mod P: int64 -j is 8 - j
    # (documented: a -1 sentinel shares token 7's slots and signs)
    h = he.UniversalHash(seed)
    neg, pos = np.array([-1, -2, -8, -9]), np.array([7, 6, 0, P - 1])
    assert (h(neg, 10**9) == h(pos, 10**9)).all()
    assert (h.sign(neg) == h.sign(pos)).all()
    assert (h(np.array([5, P + 5], np.uint64), 10**9)[0]
            == h(np.array([5, P + 5], np.uint64), 10**9)[1])


def test_hash_errors():
    h = he.UniversalHash(0)
    with pytest.raises(TypeError, match="keys"):
        h(np.array([1.5]), 10)
    with pytest.raises(ValueError, match="m"):
        h(np.array([1]), 0)
    with pytest.raises(TypeError, match="seed"):
        he.UniversalHash(1.5)
    with pytest.raises(ValueError, match="seed"):
        he.UniversalHash(-1)
    with pytest.raises(TypeError, match="keys"):
        h("abc", 10)
