"""Property tests of the TT kernels against a NumPy reference that shares no
code with hashemb (no tt_to_full, no torch): each row by its own chain of
matrix products, each core's gradient by the chain rule written out per
row. Covers what test_tt.py checks only against other hashemb paths or at
fixed shapes: several tables in one call (tt_embedding_bags and its
backward, flat and 2-D input), fused SGD / Adagrad against their rules on
the reference gradient, tt_to_full, and the LFU cache (TTCache.count
against collections.Counter, populate's choice and stable slots, lookups
and gradients of cached rows)."""
import collections

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import hashemb as he


# ------------------------------------------------------------ reference

def digits(x, p):
    """Row x's slice of each core (core 0 the most significant digit)."""
    out = []
    for pk in reversed(p):
        out.append(x % pk)
        x //= pk
    return out[::-1]


def ref_row(cores, x):
    """W[x] = vec(G0[x0] G1[x1] ... ) flattened q0-major, by explicit products."""
    dig = digits(int(x), [c.shape[0] for c in cores])
    M = cores[0][dig[0]][0]                                 # (q0, R1)
    for k in range(1, len(cores)):
        G = cores[k][dig[k]]                                # (R_k, q_k, R_k+1)
        M = np.einsum("ar,rcs->acs", M, G).reshape(-1, G.shape[2])
    return M.reshape(-1)


def ref_row_grads(cores, x, g):
    """d <W[x], g> / d G_k[x_k] for every core k: (slice index, gradient) pairs."""
    p = [c.shape[0] for c in cores]
    dig, d = digits(int(x), p), len(cores)
    out = []
    for k in range(d):
        L = np.ones((1, 1))
        for j in range(k):
            G = cores[j][dig[j]]
            L = np.einsum("ar,rcs->acs", L, G).reshape(-1, G.shape[2])
        Rt = np.ones((1, 1))
        for j in range(d - 1, k, -1):
            G = cores[j][dig[j]]
            Rt = np.einsum("rcs,sb->rcb", G, Rt).reshape(G.shape[0], -1)
        g3 = g.reshape(L.shape[0], cores[k].shape[2], Rt.shape[1])
        out.append((dig[k], np.einsum("ar,acb,sb->rcs", L, g3, Rt)))
    return out


def ref_bags(tables, idx, off, B, mode, psw, G=None, skip=None):
    """Forward (B, sum D) and, given G, every core's gradient, tables feature-major.
    ``skip[t]``: rows whose gradient goes elsewhere (a cache), with it."""
    Ds = [int(np.prod([c.shape[2] for c in cores])) for cores in tables]
    out = np.zeros((B, sum(Ds)))
    grads = [[np.zeros(c.shape) for c in cores] for cores in tables]
    rowg = [collections.defaultdict(lambda D=D: np.zeros(D)) for D in Ds]
    col = 0
    for t, cores in enumerate(tables):
        for b in range(B):
            q = t * B + b
            js = range(off[q], off[q + 1])
            for j in js:
                c = psw[j] if psw is not None else (1.0 / len(js) if mode == "mean" else 1.0)
                out[b, col:col + Ds[t]] += c * ref_row(cores, idx[j])
                if G is None:
                    continue
                g = c * G[b, col:col + Ds[t]]
                if skip is not None and int(idx[j]) in skip[t]:
                    rowg[t][int(idx[j])] += g
                    continue
                for k, (v, gk) in enumerate(ref_row_grads(cores, idx[j], g)):
                    grads[t][k][v] += gk
        col += Ds[t]
    return out, grads, rowg


# ------------------------------------------------------------ strategies

@st.composite
def tt_tables(draw, T=None):
    T = draw(st.integers(1, 3)) if T is None else T
    tables, sizes = [], []
    for t in range(T):
        d = draw(st.integers(2, 3))
        p = [draw(st.integers(1, 4)) for _ in range(d)]
        q = [draw(st.integers(1, 3)) for _ in range(d)]
        r = [draw(st.integers(1, 5)) for _ in range(d - 1)]
        N = int(np.prod(p))
        tables.append(he.tt_init(N, p, q, r, seed=draw(st.integers(0, 999)), dtype=np.float64))
        sizes.append(draw(st.integers(1, N)))
    return tables, sizes


@st.composite
def tt_batches(draw):
    tables, sizes = draw(tt_tables())
    T = len(tables)
    B = draw(st.integers(0, 5))
    lens = draw(st.lists(st.integers(0, 4), min_size=T * B, max_size=T * B))
    idx = np.concatenate([np.array(draw(st.lists(st.integers(0, sizes[q // B] - 1),
                                                  min_size=n, max_size=n)), np.int64)
                          for q, n in enumerate(lens)] + [np.zeros(0, np.int64)])
    off = np.r_[0, np.cumsum(lens)].astype(np.int64)
    mode = draw(st.sampled_from(["sum", "mean"]))
    psw = None
    if mode == "sum" and draw(st.booleans()):
        psw = np.array(draw(st.lists(st.floats(-2, 2), min_size=len(idx), max_size=len(idx))))
    return tables, sizes, idx, off, B, mode, psw, draw(st.integers(0, 2**32 - 1))


TOL = dict(rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------ bags

@settings(max_examples=40, deadline=None)
@given(tt_batches())
def test_table_batched_bags_match_the_reference(b):
    """tt_embedding_bags (several tables of different shapes in one call,
    feature-major offsets) and its backward against the reference."""
    tables, sizes, idx, off, B, mode, psw, seed = b
    kw = dict(mode=mode, per_sample_weights=psw, num_embeddings=sizes)
    out = he.tt_embedding_bags(idx, tables, off, **kw)
    G = np.random.default_rng(seed).standard_normal(out.shape)
    want, wgrads, _ = ref_bags(tables, idx, off, B, mode, psw, G)
    np.testing.assert_allclose(out, want, **TOL)
    grads = he.tt_embedding_bags_backward(G, idx, tables, off, **kw)
    assert len(grads) == len(tables)
    for gt, wt in zip(grads, wgrads):
        for g, w in zip(gt, wt):
            np.testing.assert_allclose(g, w, **TOL)


@settings(max_examples=25, deadline=None)
@given(tt_tables(), st.integers(0, 6), st.integers(0, 2**32 - 1))
def test_two_d_input_is_one_row_per_table(tt, B, seed):
    """2-D (B, T) input: out[b, cols_t] = W_t[x[b, t]], gradients as the
    reference's one-entry bags."""
    tables, sizes = tt
    T = len(tables)
    rng = np.random.default_rng(seed)
    x = np.stack([rng.integers(0, n, B) for n in sizes], 1).reshape(B, T)
    out = he.tt_embedding_bags(x, tables, num_embeddings=sizes)
    flat, off = np.ascontiguousarray(x.T).reshape(-1), np.arange(B * T + 1)
    G = rng.standard_normal(out.shape)
    want, wgrads, _ = ref_bags(tables, flat, off, B, "sum", None, G)
    np.testing.assert_allclose(out, want, **TOL)
    for gt, wt in zip(he.tt_embedding_bags_backward(G, x, tables, num_embeddings=sizes),
                      wgrads):
        for g, w in zip(gt, wt):
            np.testing.assert_allclose(g, w, **TOL)


@settings(max_examples=25, deadline=None)
@given(tt_tables(T=1))
def test_tt_to_full_is_every_reference_row(tt):
    tables, sizes = tt
    cores = tables[0]
    W = he.tt_to_full(cores, sizes[0])
    np.testing.assert_allclose(W, np.stack([ref_row(cores, x) for x in range(sizes[0])]), **TOL)


@settings(max_examples=30, deadline=None)
@given(tt_batches(), st.sampled_from(["sgd", "adagrad"]), st.booleans())
def test_fused_step_is_the_rule_on_the_reference_gradient(b, opt, saved):
    """One fused step on every table's cores equals SGD's / Adagrad's rule
    on the reference gradient (not on hashemb's own dense gradient), with
    and without the forward's saved products; Adagrad's state is g**2."""
    tables, sizes, idx, off, B, mode, psw, seed = b
    kw = dict(mode=mode, per_sample_weights=psw, num_embeddings=sizes)
    G = np.random.default_rng(seed).standard_normal(
        (B, sum(int(np.prod([c.shape[2] for c in cores])) for cores in tables)))
    _, wgrads, _ = ref_bags(tables, idx, off, B, mode, psw, G)
    before = [[c.copy() for c in cores] for cores in tables]
    lr, eps = 0.1, 1e-3
    optimizer = he.SGD(lr) if opt == "sgd" else he.Adagrad(lr, eps)
    sv = he.tt_embedding_bags(idx, tables, off, return_saved=True, **kw)[1] if saved else None
    assert he.tt_embedding_bags_backward(G, idx, tables, off, optimizer=optimizer, saved=sv,
                                         **kw) is None
    for cores, old, wt in zip(tables, before, wgrads):
        for c, c0, g in zip(cores, old, wt):
            step = lr * g if opt == "sgd" else lr * g / (np.abs(g) + eps)
            np.testing.assert_allclose(c, c0 - step, **TOL)
            if opt == "adagrad":
                np.testing.assert_allclose(optimizer.state_for(c)[0].reshape(c.shape), g * g,
                                           **TOL)


# ------------------------------------------------------------ the LFU cache

@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 60), max_size=30), min_size=1, max_size=4),
       st.integers(1, 6))
def test_cache_counts_are_a_counter_and_populate_takes_the_most_frequent(batches, capacity):
    """count() over several calls equals collections.Counter (below the
    3/4 load cap); populate() caches the `capacity` most frequent rows
    (ties: smaller id), rows that stay keep their slots, new rows fill the
    free slots in ascending order with their reference values, free slots
    hold zeros, and slots() inverts rows."""
    cores = he.tt_init(64, [4, 4, 4], [2, 1, 2], [3, 2], seed=1, dtype=np.float64)
    cache = he.TTCache(capacity, 4, dtype=np.float64)
    seen = collections.Counter()
    prev = np.full(capacity, -1)
    for x in batches:
        cache.count(np.array(x, np.int64))
        seen.update(x)
        held = cache.keys >= 0
        assert dict(zip(cache.keys[held].tolist(), cache.freq[held].tolist())) == dict(seen)
        changed = cache.populate(cores)
        top = sorted(seen, key=lambda r: (-seen[r], r))[:capacity]
        rows = np.full(capacity, -1)
        rows[:len(cache.rows)] = cache.rows
        assert sorted(r for r in rows if r >= 0) == sorted(top)
        stay = [s for s in range(capacity) if prev[s] in top and prev[s] >= 0]
        assert all(rows[s] == prev[s] for s in stay)
        new = [r for r in sorted(top) if r not in prev[stay]]
        free = [s for s in range(capacity) if s not in stay][:len(new)]
        assert [rows[s] for s in free] == new
        np.testing.assert_array_equal(changed, np.flatnonzero(rows != prev))
        for s, r in enumerate(rows):
            if r < 0:
                assert (cache.weight[s] == 0).all()
            elif s in free:
                np.testing.assert_allclose(cache.weight[s], ref_row(cores, r), **TOL)
        np.testing.assert_array_equal(cache.slots(np.array(top, np.int64)),
                                      [int(np.flatnonzero(rows == r)[0]) for r in top])
        assert (cache.slots(np.array([r for r in range(64) if r not in top])) == -1).all()
        prev = rows


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 47), min_size=1, max_size=40), st.integers(1, 4),
       st.sampled_from(["sum", "mean", "weighted"]), st.integers(0, 2**32 - 1))
def test_cached_rows_are_read_and_trained_in_the_cache(rows, capacity, mode, seed):
    """With a cache, a cached row's lookup reads its (trained) cache row and
    its gradient goes to the cache: cores' gradient = the reference's with
    those rows left out, the cache's = the reference row gradient; fused
    SGD moves the cache row by lr times it."""
    rng = np.random.default_rng(seed)
    cores = he.tt_init(48, [3, 4, 4], [2, 2, 1], [3, 2], seed=2, dtype=np.float64)
    cache = he.TTCache(capacity, 4, dtype=np.float64)
    idx = np.array(rows, np.int64)
    cache.count(idx)
    cache.populate(cores)
    cache.weight += rng.standard_normal(cache.weight.shape)      # as if trained
    B = 4
    off = np.r_[0, np.sort(rng.integers(0, len(idx) + 1, B - 1)), len(idx)].astype(np.int64)
    cached = {int(r): s for s, r in enumerate(cache.rows) if r >= 0}
    psw = rng.uniform(-2, 2, len(idx)) if mode == "weighted" else None
    mode = "sum" if mode == "weighted" else mode
    kw = dict(mode=mode, per_sample_weights=psw, cache=cache)
    out = he.tt_embedding_bag(idx, cores, off, **kw)
    want = np.zeros((B, 4))
    for b in range(B):
        n = off[b + 1] - off[b]
        for j in range(off[b], off[b + 1]):
            x = int(idx[j])
            row = cache.weight[cached[x]] if x in cached else ref_row(cores, x)
            want[b] += row * (psw[j] if psw is not None else 1 / n if mode == "mean" else 1)
    np.testing.assert_allclose(out, want, **TOL)
    G = rng.standard_normal(out.shape)
    grads = he.tt_embedding_bag_backward(G, idx, cores, off, **kw)
    _, wgrads, rowg = ref_bags([cores], idx, off, B, mode, psw, G, skip=[set(cached)])
    for g, w in zip(grads[:-1], wgrads[0]):
        np.testing.assert_allclose(g, w, **TOL)
    dcache = np.zeros_like(cache.weight)
    for r, g in rowg[0].items():
        dcache[cached[r]] = g
    np.testing.assert_allclose(grads[-1], dcache, **TOL)
    before = cache.weight.copy()
    he.tt_embedding_bag_backward(G, idx, cores, off, optimizer=he.SGD(0.5), **kw)
    np.testing.assert_allclose(cache.weight, before - 0.5 * dcache, **TOL)


# ------------------------------------------------------------ the torch module

@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 3), B=st.integers(1, 5), seed=st.integers(0, 999),
       use_cache=st.booleans(), form=st.sampled_from(["2d", "offsets"]))
def test_module_forward_and_gradients_are_the_reference(T, B, seed, use_cache, form):
    """TTEmbeddingBagCollection (several tables, a cache or not): output,
    every core's gradient, the caches' gradients and the per-sample
    weights' gradient (<row, grad>, the cached row's value for a cached
    row) against the reference; test_tt.py has gradcheck of one table only."""
    torch = pytest.importorskip("torch")
    from hashemb.torch import TTEmbeddingBagCollection
    rng = np.random.default_rng(seed)
    sizes = [int(rng.integers(5, 40)) for _ in range(T)]
    emb = TTEmbeddingBagCollection(sizes, 4, [3, 2], tt_p_shapes=[2, 4, 5],
                                   tt_q_shapes=[2, 1, 2], use_cache=use_cache, cache_size=2,
                                   seed=seed, dtype=torch.float64)
    if form == "2d":
        x = np.stack([rng.integers(0, n, B) for n in sizes], 1)
        flat, off = np.ascontiguousarray(x.T).reshape(-1), np.arange(T * B + 1)
    else:
        lens = rng.integers(0, 4, T * B)
        off = np.r_[0, np.cumsum(lens)]
        flat = np.concatenate([rng.integers(0, sizes[q // B], n) for q, n in enumerate(lens)]
                              + [np.zeros(0, np.int64)]).astype(np.int64)
    if use_cache:
        emb.train()
        emb(torch.from_numpy(flat), torch.from_numpy(off))       # counts the rows
        emb.cache_populate()
        with torch.no_grad():
            for w in emb.cache_weights:
                w.add_(torch.from_numpy(rng.standard_normal(tuple(w.shape))))   # "trained"
    d = 3
    tables = [[c.detach().numpy() for c in emb.tt_cores[t * d:(t + 1) * d]] for t in range(T)]
    cached = [{int(r): s for s, r in enumerate(c.rows) if r >= 0} for c in emb._cache_objs] \
        if use_cache else [{} for _ in range(T)]
    w = rng.uniform(-2, 2, len(flat))
    if form == "2d":
        p = torch.tensor(w.reshape(T, B).T.copy(), requires_grad=True)
        out = emb(torch.from_numpy(x), per_sample_weights=p)
    else:
        p = torch.tensor(w, requires_grad=True)
        out = emb(torch.from_numpy(flat), torch.from_numpy(off), per_sample_weights=p)
    G = rng.standard_normal(tuple(out.shape))
    out.backward(torch.from_numpy(G))
    # reference: a cached row reads the cache, its gradient goes there
    want = np.zeros((B, 4 * T))
    pg = np.zeros(len(flat))
    for q in range(T * B):
        t, b = divmod(q, B)
        for j in range(off[q], off[q + 1]):
            xj = int(flat[j])
            row = (emb.cache_weights[t].detach().numpy()[cached[t][xj]] if xj in cached[t]
                   else ref_row(tables[t], xj))
            want[b, 4 * t:4 * t + 4] += w[j] * row
            pg[j] = row @ G[b, 4 * t:4 * t + 4]
    np.testing.assert_allclose(out.detach().numpy(), want, **TOL)
    got_pg = p.grad.numpy().T.reshape(-1) if form == "2d" else p.grad.numpy()
    np.testing.assert_allclose(got_pg, pg, **TOL)
    _, wgrads, rowg = ref_bags(tables, flat, off, B, "sum", w, G,
                               skip=[set(c) for c in cached])
    for t in range(T):
        for k in range(d):
            np.testing.assert_allclose(emb.tt_cores[t * d + k].grad.numpy(), wgrads[t][k], **TOL)
        if use_cache:
            dc = np.zeros((2, 4))
            for r, g in rowg[t].items():
                dc[cached[t][r]] = g
            np.testing.assert_allclose(emb.cache_weights[t].grad.numpy(), dc, **TOL)
