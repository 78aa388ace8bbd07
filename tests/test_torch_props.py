"""Property tests of the torch modules' forward / backward against the
plain-Python reference (reference.py: slots and signs from the formulas).
test_torch.py checks the per-sample weights' gradient (Lookup.psw_grad, its
own path: entries looked up as one-entry bags, then dotted) only by
gradcheck, which differentiates hashemb's own forward, and
test_collection_matches_reference leaves out max mode, padding and the
fused optimizers; FastMultiEmbedding has one fixed example."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import hashemb as he
from reference import bag_backward, bag_forward, slots_signs

torch = pytest.importorskip("torch")
from hashemb.torch import (FastMultiEmbedding, HashEmbeddingBag,  # noqa: E402
                           HashEmbeddingBagCollection)


def make_scheme(kind, dim, seed):
    if kind == "robe":
        return he.RobeZ(97, dim, block=max(1, dim // 2), seed=seed)
    if kind == "robe-signed":
        return he.RobeZ(61, dim, block=dim, seed=seed, signed=True)
    if kind == "hnet":
        return he.HashedNet(40, dim, seed=seed, signed=True)
    return he.FullTable([9, 5, 7], dim)


SCHEMES = st.builds(make_scheme, st.sampled_from(["robe", "robe-signed", "hnet", "full"]),
                    st.sampled_from([1, 2, 4]), st.integers(0, 9))


def ref_psw_grad(scheme, idx, off, G, T, table0, M, pad=None):
    """d <out, G> / d psw[j] = <G[bag(j), cols of its table], E(x_j)>, 0 for padding."""
    D, B = scheme.dim, (len(off) - 1) // T
    out = np.zeros(len(idx))
    for q in range(T * B):
        t, b = divmod(q, B)
        for j in range(off[q], off[q + 1]):
            if pad is not None and idx[j] == pad:
                continue
            S, Sg = slots_signs(scheme, [int(idx[j])], [table0 + t])
            out[j] = float((G[b, t * D:(t + 1) * D] * Sg[0] * M[S[0]]).sum())
    return out


@settings(max_examples=30, deadline=None)
@given(scheme=SCHEMES, table=st.integers(0, 2), B=st.integers(1, 5), seed=st.integers(0, 999),
       form=st.sampled_from(["offsets", "2d"]), padded=st.booleans())
def test_single_table_psw_gradient_is_the_reference(scheme, table, B, seed, form, padded):
    """HashEmbeddingBag (a later table, padding): the per-sample weights'
    gradient equals the reference's dot products, 0 at padding entries; the
    weight's gradient the reference's too."""
    rng = np.random.default_rng(seed)
    if form == "2d":
        N = int(rng.integers(1, 4))
        x = rng.integers(0, 5, (B, N))
        flat, off = x.reshape(-1), np.arange(0, B * N + 1, N)
    else:
        sizes = rng.integers(0, 4, B)
        off = np.r_[0, np.cumsum(sizes)]
        flat = rng.integers(0, 5, off[-1])
    pad = int(flat[0]) if padded and len(flat) else None
    emb = HashEmbeddingBag(scheme, table=table, padding_idx=pad, dtype=torch.float64,
                           init_seed=seed, include_last_offset=True)
    M = emb.weight.detach().numpy().reshape(-1).copy()
    w = rng.uniform(-2, 2, len(flat))
    p = torch.tensor(w.reshape(x.shape) if form == "2d" else w, requires_grad=True)
    out = emb(torch.from_numpy(x), per_sample_weights=p) if form == "2d" else \
        emb(torch.from_numpy(flat), torch.from_numpy(off), per_sample_weights=p)
    np.testing.assert_allclose(out.detach().numpy(),
                               bag_forward(scheme, flat, off, M, 1, table, "sum", w, pad),
                               rtol=1e-10, atol=1e-10)
    G = rng.standard_normal(out.shape)
    out.backward(torch.from_numpy(G))
    np.testing.assert_allclose(p.grad.numpy().reshape(-1),
                               ref_psw_grad(scheme, flat, off, G, 1, table, M, pad),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(emb.weight.grad.numpy().reshape(-1),
                               bag_backward(scheme, flat, off, G, 1, M, table, "sum", w, pad),
                               rtol=1e-10, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(scheme=SCHEMES, T=st.integers(1, 3), B=st.integers(1, 5), seed=st.integers(0, 999),
       form=st.sampled_from(["2d", "equal", "unequal"]))
def test_collection_psw_gradient_is_the_reference(scheme, T, B, seed, form):
    """HashEmbeddingBagCollection, the three ways psw_grad takes: 2-D input,
    flat bags of equal counts per table (all tables in one lookup), and of
    unequal counts (a lookup per table)."""
    rng = np.random.default_rng(seed)
    if form == "2d":
        x = rng.integers(0, 5, (B, T))
        flat, off = np.ascontiguousarray(x.T).reshape(-1), np.arange(B * T + 1)
    else:
        sizes = rng.integers(0, 4, T * B)
        if form == "equal":
            sizes = sizes.reshape(T, B)
            sizes[:] = sizes[0]
            sizes = sizes.reshape(-1)
        off = np.r_[0, np.cumsum(sizes)]
        flat = rng.integers(0, 5, off[-1])
    emb = HashEmbeddingBagCollection(scheme, T, dtype=torch.float64, init_seed=seed)
    M = emb.weight.detach().numpy().reshape(-1).copy()
    w = rng.uniform(-2, 2, len(flat))
    if form == "2d":
        p = torch.tensor(w.reshape(T, B).T.copy(), requires_grad=True)
        out = emb(torch.from_numpy(x), per_sample_weights=p)
    else:
        p = torch.tensor(w, requires_grad=True)
        out = emb(torch.from_numpy(flat), torch.from_numpy(off), per_sample_weights=p)
    np.testing.assert_allclose(out.detach().numpy(), bag_forward(scheme, flat, off, M, T, 0,
                                                                 "sum", w),
                               rtol=1e-10, atol=1e-10)
    G = rng.standard_normal(out.shape)
    out.backward(torch.from_numpy(G))
    got = p.grad.numpy().T.reshape(-1) if form == "2d" else p.grad.numpy()
    np.testing.assert_allclose(got, ref_psw_grad(scheme, flat, off, G, T, 0, M),
                               rtol=1e-10, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(scheme=SCHEMES, T=st.integers(1, 3), B=st.integers(1, 5), seed=st.integers(0, 999),
       mode=st.sampled_from(["sum", "mean", "max"]),
       opt=st.sampled_from([None, "sgd", "adagrad"]))
def test_collection_modes_and_fused_steps_are_the_reference(scheme, T, B, seed, mode, opt):
    """Every mode (max included) and both fused optimizers of the module:
    the output is the reference's, the weight's gradient is, and a fused
    step is its rule on the reference gradient (Adagrad's buffer g**2)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 4, T * B)
    off = np.r_[0, np.cumsum(sizes)]
    flat = rng.integers(0, 5, off[-1])
    lr, eps = 0.2, 1e-3
    emb = HashEmbeddingBagCollection(scheme, T, mode=mode, optimizer=opt, lr=lr, eps=eps,
                                     dtype=torch.float64, init_seed=seed)
    M = emb.weight.detach().numpy().reshape(-1).copy()
    out = emb(torch.from_numpy(flat), torch.from_numpy(off))
    np.testing.assert_allclose(out.detach().numpy(), bag_forward(scheme, flat, off, M, T, 0, mode),
                               rtol=1e-10, atol=1e-10)
    G = rng.standard_normal(out.shape)
    out.backward(torch.from_numpy(G))
    g = bag_backward(scheme, flat, off, G, T, M, 0, mode)
    W = emb.weight.detach().numpy().reshape(-1)
    if opt is None:
        np.testing.assert_allclose(emb.weight.grad.numpy().reshape(-1), g, rtol=1e-10,
                                   atol=1e-10)
    elif opt == "sgd":
        assert emb.weight.grad is None
        np.testing.assert_allclose(W, M - lr * g, rtol=1e-10, atol=1e-10)
    else:
        hit = np.abs(g) > 1e-9
        np.testing.assert_allclose(W[hit], M[hit] - lr * g[hit] / (np.abs(g[hit]) + eps),
                                   rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(emb.optimizer_state.numpy()[hit], g[hit] ** 2, rtol=1e-10,
                                   atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(1, 9)), min_size=1, max_size=6),
       st.integers(0, 40), st.integers(0, 999), st.sampled_from([torch.float32, torch.float64]))
def test_fast_multi_embedding_is_the_numpy_gather_and_scatter(tables, B, seed, dtype):
    """FastMultiEmbedding: out[:, block t] = table_t[x[:, t]] exactly, and
    the packed gradient is np.add.at of the output gradient per table."""
    sizes, dims = [n for n, _ in tables], [d for _, d in tables]
    rng = np.random.default_rng(seed)
    packed = rng.standard_normal(sum(n * d for n, d in tables))
    emb = FastMultiEmbedding(sizes, dims, _weight=torch.tensor(packed, dtype=dtype))
    x = np.stack([rng.integers(0, n, B) for n in sizes], 1).reshape(B, len(sizes))
    out = emb(torch.from_numpy(x))
    views, a = [], 0
    for n, d in tables:
        views.append(packed[a:a + n * d].reshape(n, d))
        a += n * d
    want = np.concatenate([v[x[:, t]] for t, v in enumerate(views)] + [np.zeros((B, 0))], 1)
    np.testing.assert_array_equal(out.detach().numpy(), want.astype(out.detach().numpy().dtype))
    G = rng.standard_normal(out.shape)
    out.backward(torch.from_numpy(G).to(dtype))
    grads, c = [], 0
    for t, (n, d) in enumerate(tables):
        gt = np.zeros((n, d))
        np.add.at(gt, x[:, t], G[:, c:c + d])
        grads.append(gt.reshape(-1))
        c += d
    np.testing.assert_allclose(emb.weight.grad.numpy(), np.concatenate(grads),
                               rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-5)
