"""Tests beside tests/test_schemes.py, each killing a mutant that survived the suite
(mutation round 3, of hashemb/schemes.py)."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import hashemb as he
from hashemb import schemes as S


def test_equality_needs_the_same_type_and_the_same_tables():
    # RobeZ with Z = 1 computes HashedNet's slots, but they are different
    # schemes (their configs differ): equal only to their own kind
    assert he.RobeZ(100, 8, block=1) != he.HashedNet(100, 8)
    assert he.HashedNet(100, 8) != he.RobeZ(100, 8, block=1)
    # the same total rows in another order is another layout
    assert he.FullTable([3, 5], 4) != he.FullTable([5, 3], 4)
    assert he.FullTable([3, 5], 4) == he.FullTable([3, 5], 4)
    assert he.RobeZ.reference(1000, 8, block=4, table_sizes=[10, 20]) != \
        he.RobeZ.reference(1000, 8, block=4, table_sizes=[20, 10])
    for s in (he.FullTable([3, 5], 4), he.HashedNet(100, 8)):
        assert he.Scheme.from_config(s.config()) == s


def test_saved_of_another_full_table_layout_is_refused():
    # a BagSaved is checked against the backward's scheme: one of another
    # table layout (same size, same dim) must not pass
    a, b = he.FullTable([3, 5], 4), he.FullTable([5, 3], 4)
    W = a.init_weight()
    x = np.array([[0, 1], [2, 2]])
    out, saved = he.embedding_bags(x, W, scheme=a, num_tables=2, return_saved=True)
    with pytest.raises(ValueError, match="saved:"):
        he.embedding_bags_backward(np.ones_like(out), x, scheme=b, num_tables=2, weight=W,
                                   saved=saved)


@pytest.mark.parametrize("scale", [[0.1, 0.2, 0.3], [0.1]])
def test_per_table_scales_must_match_the_table_count(scale):
    with pytest.raises(ValueError, match="scale: expected a number, or 2"):
        he.FullTable([3, 5], 4).init_weight(scale=scale)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_16bit_init_of_tables_starting_inside_a_chunk(dtype):
    # 16-bit init draws a chunk of 2**20 floats at a time; the second table
    # here starts 408576 floats before the second chunk: every value is the
    # float32 init rounded once, its table's scale included
    full = he.FullTable([40000] * 3, 16)
    w = full.init_weight(seed=3, dtype=dtype)
    np.testing.assert_array_equal(w, full.init_weight(seed=3).astype(dtype))


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5), dim=st.integers(1, 6),
       chunk=st.integers(1, 97), dtype=st.sampled_from([np.float16, ml_dtypes.bfloat16]))
def test_16bit_init_is_the_float32_init_rounded_whatever_the_chunk(sizes, dim, chunk, dtype):
    full = he.FullTable(sizes, dim)
    want = full.init_weight(seed=5).astype(dtype)
    old = S._INIT_CHUNK
    S._INIT_CHUNK = chunk
    try:
        w = full.init_weight(seed=5, dtype=dtype)
    finally:
        S._INIT_CHUNK = old
    np.testing.assert_array_equal(w, want)


def test_full_table_floats_must_stay_below_2_61():
    # rows * dim == 2**61 is one past the largest layout slots address
    with pytest.raises(ValueError, match=r"num_embeddings: expected rows \* dim < 2\*\*61"):
        he.FullTable([1 << 57], 16)
    with pytest.raises(ValueError, match=r"num_embeddings: expected rows \* dim < 2\*\*61"):
        he.FullTable([1 << 56, 1 << 56], 16)
    assert he.FullTable([(1 << 57) - 1], 16).size == (1 << 61) - 16
