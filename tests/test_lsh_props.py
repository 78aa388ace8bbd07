"""Property tests of SCMA (he.LSHTable) and LMA (he.LMA) with a reference
that uses no hashemb code: reference.lsh_slot asks the scheme's own token
map (scheme.lookup_ids) which stored row a token has, so the slots and bags
tests of test_lsh.py are not independent of that map. Here every token's
slots come from its occurrence set in X alone (minhash of its row keys,
then the combine), sampled or not, and bags are pooled by NumPy over those
slots; hypothesis draws the data, shapes, blocks and small arrays that wrap."""
import numpy as np
from hypothesis import assume, given, settings, strategies as st

import hashemb as he
from reference import lsh_absent_key, lsh_combine, lsh_row_key, lsh_signature


def independent_slots(s, X, tokens, table):
    """(len(tokens), dim) slots from the formulas: a token seen in column
    ``table`` of X (every row sampled) starts its runs at the combined
    minhash signature of its rows' keys, an unseen one at that of its
    absent key; runs of Z elements wrap around the array."""
    salt = int(s._lsh["salt"])
    col = X[:, table].astype(np.int64).view(np.uint64)
    out = np.empty((len(tokens), s.dim), np.int64)
    for r, x in enumerate(tokens):
        u = int(np.int64(x).view(np.uint64))
        rows = np.flatnonzero(col == np.uint64(u))
        keys = ([lsh_row_key(salt, int(q)) for q in rows] if rows.size
                else [lsh_absent_key(salt, table, u)])
        sig = lsh_signature(s, keys)
        for i in range(s.dim):
            k, z = divmod(i, s.block)
            out[r, i] = (lsh_combine(s, sig, k) + z) % s.size
    return out


@st.composite
def fitted(draw):
    cls = draw(st.sampled_from([he.LSHTable, he.LMA]))
    rows, T = draw(st.integers(1, 25)), draw(st.integers(1, 3))
    vocab = draw(st.integers(1, 8))
    X = np.array(draw(st.lists(st.lists(st.integers(-vocab, vocab), min_size=T, max_size=T),
                               min_size=rows, max_size=rows)), np.int64)
    dim = draw(st.sampled_from([1, 2, 3, 4, 6]))
    block = draw(st.sampled_from([z for z in range(1, dim + 1) if dim % z == 0]))
    size = draw(st.one_of(st.integers(block, block + 3), st.integers(50, 5000)))
    s = cls.fit(X, size=size, dim=dim, num_hashes=draw(st.integers(1, 3)), num_points=rows,
                seed=draw(st.integers(0, 2**32)), block=block)
    assume(s.clashes == 0)
    return s, X, T, vocab


@settings(max_examples=25, deadline=None)
@given(fitted(), st.data())
def test_slots_from_occurrence_sets_alone(f, data):
    """slots(): every element's slot equals the one computed from the
    token's occurrence set (sampled) or absent key (unseen), in [0, size);
    signs all +1; int32, int64 and uint64 tokens agree."""
    s, X, T, vocab = f
    table = data.draw(st.integers(0, T - 1))
    tokens = np.array(data.draw(st.lists(st.integers(-vocab - 3, vocab + 3), min_size=1,
                                         max_size=10)), np.int64)
    got = s.slots(tokens, table=table)
    np.testing.assert_array_equal(got, independent_slots(s, X, tokens, table))
    assert ((got >= 0) & (got < s.size)).all()
    assert (s.signs(tokens, table=table) == 1).all()
    np.testing.assert_array_equal(s.slots(tokens.astype(np.int32), table=table), got)
    np.testing.assert_array_equal(s.slots(tokens.view(np.uint64), table=table), got)


@settings(max_examples=25, deadline=None)
@given(fitted(), st.sampled_from(["sum", "mean", "max"]), st.integers(0, 2**32 - 1), st.data())
def test_bags_pool_the_independent_slots(f, mode, seed, data):
    """embedding_bags and its gradient (and a fused SGD step) through an LSH
    scheme equal NumPy pooling over the independent slots (np.add.at for
    the gradient; max sends each element to the first maximal entry)."""
    s, X, T, vocab = f
    rng = np.random.default_rng(seed)
    B = data.draw(st.integers(1, 5))
    sizes = rng.integers(0, 4, T * B)
    off = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    idx = rng.integers(-vocab - 2, vocab + 3, off[-1])
    psw = rng.random(off[-1]) if mode == "sum" and data.draw(st.booleans()) else None
    M = rng.standard_normal(s.size)
    D = s.dim
    want = np.zeros((B, T * D))
    G = rng.standard_normal((B, T * D))
    grad = np.zeros(s.size)
    for t in range(T):
        for b in range(B):
            q = t * B + b
            js = range(off[q], off[q + 1])
            if not js:
                continue
            S = independent_slots(s, X, idx[off[q]:off[q + 1]], t)
            c = np.ones(len(js)) if psw is None else psw[off[q]:off[q + 1]]
            V = c[:, None] * M[S]
            g = G[b, t * D:(t + 1) * D]
            if mode == "max":
                want[b, t * D:(t + 1) * D] = V.max(0)
                win = V.argmax(0)
                np.add.at(grad, S[win, np.arange(D)], g)
                continue
            scale = 1.0 / len(js) if mode == "mean" else 1.0
            want[b, t * D:(t + 1) * D] = V.sum(0) * scale
            np.add.at(grad, S, scale * c[:, None] * g)
    kw = dict(scheme=s, num_tables=T, mode=mode, per_sample_weights=psw)
    np.testing.assert_allclose(he.embedding_bags(idx, M, off, **kw), want, rtol=1e-10,
                               atol=1e-10)
    np.testing.assert_allclose(he.embedding_bags_backward(G, idx, off, weight=M, **kw), grad,
                               rtol=1e-10, atol=1e-10)
    W = M.copy()
    he.embedding_bags_backward(G, idx, off, weight=W, optimizer=he.SGD(0.25), **kw)
    np.testing.assert_allclose(W, M - 0.25 * grad, rtol=1e-10, atol=1e-10)


@settings(max_examples=15, deadline=None)
@given(fitted())
def test_save_load_keeps_every_slot(f):
    """A scheme rebuilt from its config gives every token the same slots
    (the map and its arrays travel whole)."""
    s, X, T, vocab = f
    t = he.Scheme.from_config(s.config())
    q = np.arange(-vocab - 3, vocab + 4)
    for table in range(T):
        np.testing.assert_array_equal(t.slots(q, table=table), s.slots(q, table=table))
