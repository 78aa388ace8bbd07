"""Tests beside tests/test_lookup.py, each killing a mutant that survived the suite
(mutation round 3, of hashemb/lookup.py)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import hashemb as he


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 20), rows=st.integers(1, 12), D=st.integers(1, 9),
       itype=st.sampled_from([np.int32, np.int64]))
def test_backward_refuses_a_bad_index_at_entry_zero(n, rows, D, itype):
    # the scatter kernel reports the first bad entry's position: position 0
    # must raise too (not only positions >= 1)
    idx = np.zeros(rows, itype)
    idx[0] = n                                  # one past the table, entry 0
    g = np.ones((rows, D), np.float32)
    with pytest.raises(IndexError, match=r"indices\[0\]"):
        he.embedding_backward(g, idx, n)
    midx = np.zeros((rows, 2), itype)
    midx[0, 0] = -1
    with pytest.raises(IndexError, match=r"indices\[0, 0\]"):
        he.multi_embedding_backward(np.ones((rows, 3), np.float32), midx, [n, 2], [1, 2])


def test_backward_refuses_a_grad_of_the_right_size_but_wrong_shape():
    # (2, 3) wanted; (3, 2) has as many floats but is not the output's layout
    idx = np.array([[1, 0], [0, 0]])
    with pytest.raises(ValueError, match=r"grad_output: expected shape \(2, 3\)"):
        he.multi_embedding_backward(np.ones((3, 2), np.float32), idx, [2, 1], [1, 2])
    with pytest.raises(ValueError, match="grad_output: expected shape"):
        he.embedding_backward(np.ones((3, 2, 4), np.float32), np.zeros((2, 3), np.int64), 5)


@pytest.mark.parametrize("n", [7, 9, 16])
def test_unpack_refuses_a_weight_of_the_wrong_size(n):
    # too few floats and too many alike: the views would otherwise silently
    # cover only a prefix of the caller's array
    with pytest.raises(ValueError, match="weight: expected 8 floats"):
        he.unpack(np.zeros(n, np.float32), [2, 3], [1, 2])
