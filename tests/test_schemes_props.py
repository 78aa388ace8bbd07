"""Property tests of Scheme.slots / Scheme.signs over every scheme kind:
test_schemes.py draws only RobeZ (and the reference maps) by hypothesis;
FullTable's slots are checked at fixed points, HashedNet's signs and the
dtype agreement of tokens only in fixed examples. Here: FullTable against
its layout formula, every kind's slots in [0, size) and signs in {-1, +1}
equal to the reference, the same for int32 / int64 / uint64 tokens and
for any shape of indices."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import hashemb as he
from reference import slots_signs


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=5), dim=st.integers(1, 9),
       data=st.data())
def test_full_table_slots_are_its_row_major_layout(sizes, dim, data):
    """slot(t, x, i) = (rows of the tables before t + x) * D + i; signs 1;
    tokens outside [0, n_t) an IndexError."""
    full = he.FullTable(sizes, dim)
    t = data.draw(st.integers(0, len(sizes) - 1))
    x = np.array(data.draw(st.lists(st.integers(0, sizes[t] - 1), min_size=1, max_size=10)))
    want = (sum(sizes[:t]) + x)[:, None] * dim + np.arange(dim)
    np.testing.assert_array_equal(full.slots(x, table=t), want)
    assert (full.signs(x, table=t) == 1).all()
    assert full.size == sum(sizes) * dim and full.weight_shape == (sum(sizes), dim)
    bad = data.draw(st.sampled_from([-1, sizes[t], sizes[t] + 7]))
    with pytest.raises(IndexError):
        full.slots(np.array([bad]), table=t)


def _scheme(kind, size, dim, seed):
    if kind == "robe":
        return he.RobeZ(size, dim, block=dim, seed=seed, signed=seed % 2 == 1)
    if kind == "robe-wide":
        return he.RobeZ(size + 2 * dim, dim, block=2 * dim, seed=seed, wrap=seed % 3 == 0)
    if kind == "hnet":
        return he.HashedNet(size, dim, seed=seed, signed=seed % 2 == 0)
    return he.HashedNet.reference(size, dim)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["robe", "robe-wide", "hnet", "hnet-ref"]),
       size=st.integers(1, 3000), dim=st.sampled_from([1, 2, 3, 4, 8, 16]),
       seed=st.integers(0, 2**64 - 1), table=st.integers(0, 40),
       tokens=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=12),
       shape=st.sampled_from(["flat", "2d", "scalar"]))
def test_slots_in_range_signs_are_units_and_token_dtypes_agree(kind, size, dim, seed, table,
                                                               tokens, shape):
    s = _scheme(kind, max(size, dim), dim, seed)
    x = np.array(tokens, np.int64)
    S, G = slots_signs(s, x, [table] * len(x))
    got = s.slots(x, table=table)
    sg = s.signs(x, table=table)
    np.testing.assert_array_equal(got, S)
    np.testing.assert_array_equal(sg, G)
    assert ((got >= 0) & (got < s.size)).all()
    assert set(np.unique(sg)) <= {-1.0, 1.0} and sg.dtype == np.float32
    if not s.signed:
        assert (sg == 1).all()
    for dt in (np.int32, np.uint64):
        np.testing.assert_array_equal(s.slots(x.astype(dt), table=table), got)
        np.testing.assert_array_equal(s.signs(x.astype(dt), table=table), sg)
    if shape == "2d" and len(x) % 2 == 0:
        np.testing.assert_array_equal(s.slots(x.reshape(2, -1), table=table),
                                      got.reshape(2, -1, dim))
    if shape == "scalar":
        np.testing.assert_array_equal(s.slots(np.int64(x[0]), table=table), got[0])
