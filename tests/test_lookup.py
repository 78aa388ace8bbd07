"""Plain lookups (he.embedding, he.multi_embedding) against NumPy fancy
indexing and np.add.at, over shapes, dtypes, widths and the threaded paths."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import hashemb as he


def ref_multi(idx, tables):
    return np.concatenate([t[idx[:, j]] for j, t in enumerate(tables)], axis=1)


def ref_multi_grad(g, idx, tables):
    out, c = [], 0
    for j, t in enumerate(tables):
        gt = np.zeros_like(t, dtype=g.dtype)
        np.add.at(gt, idx[:, j], g[:, c:c + t.shape[1]])
        out.append(gt.reshape(-1))
        c += t.shape[1]
    return np.concatenate(out)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 300), D=st.integers(1, 70),
       shape=st.sampled_from([(0,), (1,), (7,), (3, 5), (2, 3, 4), (600,)]),
       itype=st.sampled_from([np.int32, np.int64]), ftype=st.sampled_from([np.float32, np.float64]),
       hot=st.sampled_from(["uniform", "same", "half"]))
def test_embedding_matches_numpy(seed, n, D, shape, itype, ftype, hot):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, D)).astype(ftype)
    if hot == "uniform":
        idx = rng.integers(0, n, shape)
    elif hot == "same":
        idx = np.full(shape, n - 1)
    else:
        idx = np.minimum(rng.geometric(0.5, shape) - 1, n - 1)
    idx = idx.astype(itype)
    out = he.embedding(idx, W)
    assert out.dtype == ftype and out.shape == shape + (D,)
    np.testing.assert_array_equal(out, W[idx])
    g = rng.standard_normal(shape + (D,)).astype(ftype)
    got = he.embedding_backward(g, idx, n)
    want = np.zeros((n, D), np.float64)
    np.add.at(want, idx.reshape(-1), g.reshape(-1, D).astype(np.float64))
    assert got.shape == (n, D) and got.dtype == ftype
    np.testing.assert_allclose(got, want, rtol=1e-5 if ftype == np.float32 else 1e-12, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), T=st.integers(1, 12), B=st.integers(0, 300),
       ftype=st.sampled_from([np.float32, np.float64]))
def test_multi_embedding_matches_numpy(seed, T, B, ftype):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 50, T).tolist()
    dims = rng.integers(1, 33, T).tolist()
    tables = [rng.standard_normal((n, d)).astype(ftype) for n, d in zip(sizes, dims)]
    W = np.concatenate([t.reshape(-1) for t in tables])
    idx = np.stack([rng.integers(0, n, B) for n in sizes], axis=1).astype(np.int64).reshape(B, T)
    out = he.multi_embedding(idx, W, sizes, dims)
    np.testing.assert_array_equal(out, ref_multi(idx, tables))
    g = rng.standard_normal(out.shape).astype(ftype)
    got = he.multi_embedding_backward(g, idx, sizes, dims)
    np.testing.assert_allclose(got, ref_multi_grad(g.astype(np.float64), idx, tables),
                               rtol=1e-5, atol=1e-4)
    for view, t in zip(he.unpack(W, sizes, dims), tables):
        np.testing.assert_array_equal(view, t)


def test_backward_is_deterministic_and_exact_in_order():
    # hot id, wide rows: the column-split path; each float summed in sample order
    rng = np.random.default_rng(0)
    g = rng.standard_normal((20000, 96)).astype(np.float32)
    idx = np.zeros(20000, np.int64)
    a = he.embedding_backward(g, idx, 3)
    b = he.embedding_backward(g, idx, 3)
    np.testing.assert_array_equal(a, b)
    want = np.zeros(96, np.float32)
    for row in g:                       # float32, sample order: bit for bit
        want += row
    np.testing.assert_array_equal(a[0], want)
    assert not a[1:].any()


def test_narrow_rows_split_by_rows():
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 5000, 50000)
    g = rng.standard_normal((50000, 4)).astype(np.float32)
    want = np.zeros((5000, 4))
    np.add.at(want, idx, g.astype(np.float64))
    np.testing.assert_allclose(he.embedding_backward(g, idx, 5000), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 40, 3000, 60000])
@pytest.mark.parametrize("D", [8, 48])
def test_large_gradient_buffers(rows, D):
    # a 12-38 MB gradient: few rows take fresh pages split by rows, many rows a
    # reused or pre-faulted buffer and the column or row split (hashemb/embed.h);
    # every path must start from zeros and add every row
    n = 400_000 if D == 8 else 200_000
    rng = np.random.default_rng(rows)
    idx = rng.integers(0, n, rows)
    idx[: rows // 2] = idx[0]                       # a hot row among them
    g = rng.standard_normal((rows, D)).astype(np.float32)
    got = he.embedding_backward(g, idx, n)
    want = np.zeros((n, D))
    np.add.at(want, idx, g.astype(np.float64))
    # the hot row sums rows/2 float32 terms in order: its rounding grows with them
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 + 1e-6 * rows)


@pytest.mark.parametrize("n,dtype", [(0, np.float32), (7, np.float64), (1 << 20, np.float32),
                                     (3 << 20, np.float64)])
@pytest.mark.parametrize("rows", [1, 1 << 20])
def test_grad_buffer_is_zeroed_and_writable(n, dtype, rows):
    from hashemb._cpu import _embed
    a = _embed.grad_buffer(n, dtype, rows, 8)
    assert a.shape == (n,) and a.dtype == dtype and a.flags.writeable and a.flags.c_contiguous
    assert not a.any()
    a[:] = 1
    assert a.sum() == n
    del a                                   # a large dense one is kept for reuse:
    b = _embed.grad_buffer(n, dtype, rows, 8)   # the same size again comes back zeroed
    assert not b.any()


@pytest.mark.parametrize("call,exc,match", [
    (lambda: he.embedding(np.array([3]), np.zeros((3, 2), np.float32)), IndexError, r"indices\[0\]"),
    (lambda: he.embedding(np.array([[0, -1]]), np.zeros((3, 2), np.float32)), IndexError,
     r"indices\[0, 1\]: expected 0 <= index < 3, got -1"),
    (lambda: he.embedding(np.array([0.0]), np.zeros((3, 2), np.float32)), TypeError, "indices:"),
    (lambda: he.embedding(np.array([0]), np.zeros((3, 2), np.int32)), TypeError, "weight:"),
    (lambda: he.embedding(np.array([0]), np.zeros(6, np.float32)), ValueError, "weight:"),
    (lambda: he.embedding_backward(np.zeros((2, 3), np.float32), np.array([0, 1]), 3, ), None, None),
    (lambda: he.embedding_backward(np.zeros((3, 2), np.float32), np.array([0, 1]), 3), ValueError,
     "grad_output:"),
    (lambda: he.embedding_backward(np.zeros((2, 2), np.float32), np.array([0, 5]), 3), IndexError,
     r"indices\[1\]"),
    (lambda: he.embedding_backward(np.zeros((2, 2), np.float32), np.array([0, 1]), 0), ValueError,
     "num_embeddings:"),
    (lambda: he.multi_embedding(np.zeros((2, 2), np.int64), np.zeros(5, np.float32), [2, 1], [1, 2]),
     ValueError, "weight: expected 4 floats"),
    (lambda: he.multi_embedding(np.zeros((2, 3), np.int64), np.zeros(4, np.float32), [2, 1], [1, 2]),
     ValueError, "indices: expected shape"),
    (lambda: he.multi_embedding(np.array([[0, 1]]), np.zeros(4, np.float32), [2, 1], [1, 2]),
     IndexError, r"\(table 1\)"),
    (lambda: he.multi_embedding(np.zeros((2, 2), np.int64), np.zeros(4, np.float32), [2, 1], [1]),
     ValueError, "dims:"),
    (lambda: he.multi_embedding_backward(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int64),
                                         [2, 1], [1, 2]), ValueError, "grad_output:"),
])
def test_errors(call, exc, match):
    if exc is None:
        call()
        return
    with pytest.raises(exc, match=match):
        call()


def test_layout_arguments_are_checked_on_every_call():
    # the layout cache took 2.0 and True as 2 and 1: after a valid call the
    # same layout given as floats or bools was accepted
    X, W = np.array([[0], [1]]), np.zeros(4, np.float32)
    he.multi_embedding(X, W, sizes=[2], dims=[2])
    for sizes, dims in (([2.0], [2]), ([2], [True, True][:1]), (2.0, 2), ([2], np.array([2.0]))):
        with pytest.raises(TypeError, match="(sizes|dims): expected an integer"):
            he.multi_embedding(X, W, sizes=sizes, dims=dims)
    np.testing.assert_array_equal(he.multi_embedding(X, W + 1, sizes=np.int64(2), dims=[2]),
                                  np.ones((2, 2), np.float32))
    np.testing.assert_array_equal(he.multi_embedding(X, W + 1, sizes=np.array(2), dims=2),
                                  np.ones((2, 2), np.float32))     # a 0-d array: one table


def test_unpack_gives_views_or_refuses():
    w = np.zeros(8, np.float32)
    a, b = he.unpack(w, [2, 3], [1, 2])
    b[2, 1] = 5
    assert w[2 + 5] == 5                    # a view: the caller's array moved
    with pytest.raises(ValueError, match="weight: expected a C-contiguous array"):
        he.unpack(np.zeros(16, np.float32)[::2], [2, 3], [1, 2])   # views of a copy before
