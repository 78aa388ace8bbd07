"""Property tests of the bag kernels (he.embedding_bag(s) and their backward,
fused SGD / Adagrad), against the plain-Python reference of reference.py
(every slot and sign from the formulas, no hashemb code) and against
algebraic laws: fused steps equal their rule applied to the *reference*
gradient (every mode, max included, padding, a later table), backward is
linear in grad_output, mean = sum / count, padding entries contribute
nothing, bags are invariant to the order of their entries and equivariant
to the order of the bags, per-sample weights scale linearly, and the same
bits on one and two threads."""
import numpy as np
from hypothesis import given, settings, strategies as st

import hashemb as he
from reference import bag_backward, bag_forward


def make_scheme(kind, dim, seed):
    if kind == "robe":
        return he.RobeZ(97, dim, block=max(1, dim // 2), seed=seed)
    if kind == "robe-signed":
        return he.RobeZ(61, dim, block=dim, seed=seed, signed=True)
    if kind == "robe-wide":
        return he.RobeZ(53, dim, block=2 * dim, seed=seed, wrap=seed % 2 == 0)
    if kind == "hnet":
        return he.HashedNet(40, dim, seed=seed, signed=seed % 2 == 0)
    if kind == "robe-ref":
        return he.RobeZ.reference(70, dim, block=dim, table_sizes=[9] * 3)
    return he.FullTable([9, 5, 7], dim)


KINDS = ["robe", "robe-signed", "robe-wide", "hnet", "robe-ref", "full"]


@st.composite
def bags(draw, multi=None, modes=("sum", "mean", "max")):
    """(scheme, idx, off (B*T+1, feature-major), M (float64), T, table0, mode, psw, pad, B)."""
    kind = draw(st.sampled_from(KINDS))
    dim = draw(st.sampled_from([1, 2, 4, 6]))
    scheme = make_scheme(kind, dim, draw(st.integers(0, 9)))
    multi = draw(st.booleans()) if multi is None else multi
    T = draw(st.integers(1, 3)) if multi else 1
    table0 = 0 if multi else draw(st.integers(0, 2))
    B = draw(st.integers(1, 6))
    sizes = draw(st.lists(st.integers(0, 5), min_size=T * B, max_size=T * B))
    hi = 5 if kind in ("full", "robe-ref") else 2**40
    n = sum(sizes)
    idx = np.array(draw(st.lists(st.integers(0, hi - 1), min_size=n, max_size=n)), np.int64)
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    mode = draw(st.sampled_from(modes))
    psw = None
    if mode == "sum" and draw(st.booleans()):
        psw = np.array(draw(st.lists(st.floats(-2, 2), min_size=n, max_size=n)), np.float64)
    pad = None
    if not multi and n and draw(st.booleans()):
        pad = int(idx[draw(st.integers(0, n - 1))])
    M = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(scheme.size)
    return scheme, idx, off, M, T, table0, mode, psw, pad, B


def fwd(b, M=None, **over):
    scheme, idx, off, M0, T, table0, mode, psw, pad, B = b
    kw = dict(mode=mode, per_sample_weights=psw)
    kw.update(over)
    M = M0 if M is None else M
    if T == 1:
        return he.embedding_bag(idx, M, off, scheme=scheme, table=table0,
                                include_last_offset=True, padding_idx=pad, **kw)
    return he.embedding_bags(idx, M, off, scheme=scheme, num_tables=T, **kw)


def bwd(b, G, weight=None, optimizer=None, **over):
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    kw = dict(mode=mode, per_sample_weights=psw)
    kw.update(over)
    weight = M if weight is None and kw["mode"] == "max" else weight
    if T == 1:
        return he.embedding_bag_backward(G, idx, off, scheme=scheme, table=table0,
                                         include_last_offset=True, padding_idx=pad,
                                         weight=weight, optimizer=optimizer, **kw)
    return he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T,
                                      weight=weight, optimizer=optimizer, **kw)


def ref_grad(b, G):
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    return bag_backward(scheme, idx, off, G, T, M, table0, mode, psw, pad)


TOL = dict(rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------ fused optimizers

@settings(max_examples=40, deadline=None)
@given(bags(), st.integers(0, 2**32 - 1), st.sampled_from(["sgd", "adagrad"]))
def test_fused_step_is_the_rule_on_the_reference_gradient(b, gseed, opt):
    """One fused step equals its rule applied to the reference gradient
    (computed in plain Python from the formulas, not by hashemb's backward):
    SGD w - lr g, Adagrad s = g^2, w - lr g / (sqrt(s) + eps) on the slots
    with g != 0, every mode (max included: the existing test returns before
    checking anything in max mode), padding and a later table."""
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    G = np.random.default_rng(gseed).standard_normal((B, T * scheme.dim))
    g = ref_grad(b, G)
    lr, eps = 0.1, 1e-3
    W = M.copy()
    optimizer = he.SGD(lr) if opt == "sgd" else he.Adagrad(lr, eps=eps)
    assert bwd(b, G, weight=W, optimizer=optimizer) is None
    if opt == "sgd":
        np.testing.assert_allclose(W.reshape(-1), M - lr * g, **TOL)
        return
    hit = np.abs(g) > 1e-9          # (a sum that cancels may leave a rounding residue)
    np.testing.assert_allclose(W.reshape(-1)[hit], M[hit] - lr * g[hit] / (np.abs(g[hit]) + eps),
                               **TOL)
    assert (np.abs(W.reshape(-1) - M)[~hit] <= lr * 1e-3).all()
    np.testing.assert_allclose(optimizer.state_for(W)[0][hit], g[hit] ** 2, **TOL)


# ------------------------------------------------------------ algebraic laws

@settings(max_examples=40, deadline=None)
@given(bags(), st.integers(0, 2**32 - 1), st.floats(-3, 3), st.floats(-3, 3))
def test_backward_is_linear_in_grad_output(b, gseed, alpha, beta):
    """grad(a G1 + b G2) = a grad(G1) + b grad(G2), in every mode (max's
    argmax depends on the weight, not on the gradient)."""
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    rng = np.random.default_rng(gseed)
    G1, G2 = rng.standard_normal((2, B, T * scheme.dim))
    lhs = bwd(b, alpha * G1 + beta * G2)
    rhs = alpha * bwd(b, G1) + beta * bwd(b, G2)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-9, atol=1e-9)


def _counts(b):
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    c = np.array([sum(1 for x in idx[off[q]:off[q + 1]] if pad is None or x != pad)
                  for q in range(T * B)], np.int64)
    return c.reshape(T, B).T              # (B, T): count of bag b of table t


@settings(max_examples=40, deadline=None)
@given(bags(modes=("mean",)), st.integers(0, 2**32 - 1))
def test_mean_is_sum_over_count(b, gseed):
    """mean = sum / (non-padding entries), empty bags zero; its gradient is
    the sum's gradient of G / count."""
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    D = scheme.dim
    cnt = np.repeat(_counts(b), D, axis=1).astype(np.float64)
    mean, total = fwd(b), fwd(b, mode="sum")
    np.testing.assert_allclose(mean, np.where(cnt > 0, total / np.maximum(cnt, 1), 0), **TOL)
    G = np.random.default_rng(gseed).standard_normal((B, T * D))
    np.testing.assert_allclose(bwd(b, G), bwd(b, np.where(cnt > 0, G / np.maximum(cnt, 1), 0),
                                              mode="sum"), **TOL)


@settings(max_examples=40, deadline=None)
@given(bags(multi=False), st.integers(0, 2**32 - 1), st.integers(1, 6), st.data())
def test_padding_entries_contribute_nothing(b, gseed, extra, data):
    """Padding entries added anywhere (inside bags, whole bags of them) leave
    forward, the gradient and a fused step bit-for-bit unchanged (they are
    dropped before the kernels run)."""
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    hi = 5 if scheme.table_sizes is not None else 2**40
    if pad is None:
        pad = data.draw(st.integers(0, hi - 1))
    keep = idx != pad
    # the same bags without any padding entry ...
    bag_of = np.repeat(np.arange(B), np.diff(off))
    clean = (scheme, idx[keep], np.r_[0, np.cumsum(np.bincount(bag_of[keep], minlength=B))],
             M, T, table0, mode, None if psw is None else psw[keep], None, B)
    # ... and with `extra` more padding entries put at random places in random bags
    per_bag = [list(zip(idx[off[q]:off[q + 1]],
                        [7.0] * (off[q + 1] - off[q]) if psw is None else psw[off[q]:off[q + 1]]))
               for q in range(B)]
    for _ in range(extra):
        q = data.draw(st.integers(0, B - 1))
        per_bag[q].insert(data.draw(st.integers(0, len(per_bag[q]))), (pad, 7.0))
    flat = [e for bag in per_bag for e in bag]
    padded = (scheme, np.array([x for x, _ in flat], np.int64),
              np.r_[0, np.cumsum([len(bag) for bag in per_bag])].astype(np.int64),
              M, T, table0, mode, None if psw is None else np.array([w for _, w in flat]), pad, B)
    out = fwd(padded)
    np.testing.assert_array_equal(out, fwd(clean))
    G = np.random.default_rng(gseed).standard_normal(out.shape)
    np.testing.assert_array_equal(bwd(padded, G), bwd(clean, G))
    if mode != "max":
        W1, W2 = M.copy(), M.copy()
        bwd(padded, G, weight=W1, optimizer=he.Adagrad(0.1))
        bwd(clean, G, weight=W2, optimizer=he.Adagrad(0.1))
        np.testing.assert_array_equal(W1, W2)


def _permuted_within_bags(b, rng):
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    perm = np.arange(len(idx))
    for q in range(len(off) - 1):
        perm[off[q]:off[q + 1]] = rng.permutation(perm[off[q]:off[q + 1]])
    return (scheme, idx[perm], off, M, T, table0, mode, None if psw is None else psw[perm],
            pad, B)


@settings(max_examples=40, deadline=None)
@given(bags(), st.integers(0, 2**32 - 1))
def test_bags_are_invariant_to_the_order_of_their_entries(b, seed):
    """A bag is a multiset: its entries in any order give the same pooled
    row (max: the same bits) and the same gradient."""
    rng = np.random.default_rng(seed)
    p = _permuted_within_bags(b, rng)
    out = fwd(b)
    if b[6] == "max":
        np.testing.assert_array_equal(fwd(p), out)
    else:
        np.testing.assert_allclose(fwd(p), out, **TOL)
    G = rng.standard_normal(out.shape)
    np.testing.assert_allclose(bwd(p, G), bwd(b, G), **TOL)


@settings(max_examples=40, deadline=None)
@given(bags(), st.integers(0, 2**32 - 1))
def test_reordering_the_bags_reorders_the_rows(b, seed):
    """Bags permuted (the same permutation in every table) give the output
    rows permuted, bit for bit, and the gradient of the permuted grad_output
    is the same."""
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    rng = np.random.default_rng(seed)
    perm = rng.permutation(B)
    segs, wsegs, sizes = [], [], []
    for t in range(T):
        for bb in perm:
            q = t * B + bb
            segs.append(idx[off[q]:off[q + 1]])
            sizes.append(off[q + 1] - off[q])
            if psw is not None:
                wsegs.append(psw[off[q]:off[q + 1]])
    p = (scheme, np.concatenate(segs + [np.zeros(0, np.int64)]).astype(np.int64),
         np.r_[0, np.cumsum(sizes)].astype(np.int64), M, T, table0, mode,
         None if psw is None else np.concatenate(wsegs + [np.zeros(0)]), pad, B)
    out = fwd(b)
    np.testing.assert_array_equal(fwd(p), out[perm])
    G = rng.standard_normal(out.shape)
    np.testing.assert_allclose(bwd(p, G[perm]), bwd(b, G), **TOL)


@settings(max_examples=40, deadline=None)
@given(bags(modes=("sum",)), st.floats(-4, 4), st.integers(0, 2**32 - 1))
def test_per_sample_weights_scale_linearly(b, s, gseed):
    """Per-sample weights all s: s times the unweighted bags (and s times
    their gradient); all ones: the unweighted result."""
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    plain = fwd(b, per_sample_weights=None)
    np.testing.assert_allclose(fwd(b, per_sample_weights=np.ones(len(idx))), plain, **TOL)
    np.testing.assert_allclose(fwd(b, per_sample_weights=np.full(len(idx), s)), s * plain,
                               **TOL)
    G = np.random.default_rng(gseed).standard_normal(plain.shape)
    np.testing.assert_allclose(bwd(b, G, per_sample_weights=np.full(len(idx), s)),
                               s * bwd(b, G, per_sample_weights=None), **TOL)


@settings(max_examples=30, deadline=None)
@given(bags())
def test_forward_and_backward_match_the_reference(b):
    """The reference itself, over this file's strategy (a later table with
    padding and per-sample weights in one call), and backward given the
    forward's BagSaved (its run starts) the same gradient and fused step."""
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    out, saved = fwd(b, return_saved=True)
    np.testing.assert_allclose(out, bag_forward(scheme, idx, off, M, T, table0, mode, psw, pad),
                               **TOL)
    G = np.random.default_rng(0).standard_normal(out.shape)
    g = ref_grad(b, G)
    np.testing.assert_allclose(bwd(b, G).reshape(-1), g, **TOL)
    np.testing.assert_allclose(bwd(b, G, saved=saved).reshape(-1), g, **TOL)
    W = M.copy()
    bwd(b, G, weight=W, optimizer=he.SGD(0.5), saved=saved)
    np.testing.assert_allclose(W, M - 0.5 * g, **TOL)


# ------------------------------------------------------------ thread counts

@settings(max_examples=6, deadline=None)
@given(kind=st.sampled_from(["robe", "robe-signed", "hnet", "full"]), seed=st.integers(0, 99),
       mode=st.sampled_from(["sum", "mean", "max"]), weighted=st.booleans())
def test_same_bits_on_one_and_two_threads(kind, seed, mode, weighted):
    """Forward, gradient and fused SGD / Adagrad steps: the same bits on one
    and on two threads (set in this process with he.set_num_threads), at
    sizes (>= 2^16 gradient floats) that split the work between threads."""
    rng = np.random.default_rng(seed)
    scheme = {"robe": he.RobeZ(40009, 8, block=4, seed=seed),
              "robe-signed": he.RobeZ(40009, 8, block=8, seed=seed, signed=True),
              "hnet": he.HashedNet(30011, 8, seed=seed),
              "full": he.FullTable([3000] * 3, 8)}[kind]
    T, B = 3, 4000
    off = np.r_[0, np.cumsum(rng.integers(0, 4, T * B))].astype(np.int64)
    idx = rng.integers(0, 3000, off[-1])
    psw = rng.random(off[-1]) if weighted and mode == "sum" else None
    M = scheme.init_weight(seed=seed, dtype=np.float64)
    G = rng.standard_normal((B, T * scheme.dim))
    kw = dict(scheme=scheme, num_tables=T, mode=mode, per_sample_weights=psw)
    res, old = {}, he.set_num_threads(1)
    try:
        for n in (1, 2):
            he.set_num_threads(n)
            out = he.embedding_bags(idx, M, off, **kw)
            grad = he.embedding_bags_backward(G, idx, off, weight=M, **kw)
            steps = []
            for opt in (he.SGD(0.3), he.Adagrad(0.3)):
                W = M.copy()
                for _ in range(2):
                    he.embedding_bags_backward(G, idx, off, weight=W, optimizer=opt, **kw)
                steps.append(W)
            res[n] = [out, grad] + steps
    finally:
        he.set_num_threads(old)
    for a, b in zip(res[1], res[2]):
        np.testing.assert_array_equal(a, b)
