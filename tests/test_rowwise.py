"""Row-wise Adagrad (he.RowwiseAdagrad, FBGEMM's EXACT_ROWWISE_ADAGRAD):
the fused step against a NumPy model of hashemb/optim.h (bitwise, from the
kernel's own summed gradient, which test_bag checks against the reference),
against a float64 model from the reference gradient (tolerance), against
FBGEMM itself where it is installed, on any thread count, for float16
storage, in the torch module, and its errors. Also: a float32 full table's
per-element Adagrad sums per row (no array-sized scratch) with the same bits
as the scratch."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import hashemb as he
import fuzzing
from reference import bag_backward
from storage16 import DTYPES, rowwise_model


@st.composite
def full_batches(draw):
    """(scheme, flat indices, offsets, T, B, mode, psw, pad, D): a few full
    tables, bags of 0-4 entries with hot rows."""
    D = draw(st.sampled_from([1, 4, 8, 16]))
    T = draw(st.integers(1, 3))
    sizes = draw(st.lists(st.integers(1, 40), min_size=T, max_size=T))
    B = draw(st.integers(1, 12))
    mode = draw(st.sampled_from(["sum", "mean"]))
    counts = draw(st.lists(st.integers(0, 4), min_size=T * B, max_size=T * B))
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    idx = np.concatenate([rng.integers(0, min(sizes[q // B], 3) if rng.random() < 0.5
                                       else sizes[q // B], counts[q])
                          for q in range(T * B)] + [np.zeros(0, np.int64)]).astype(
        draw(st.sampled_from([np.int32, np.int64])))
    psw = rng.uniform(0.5, 2, idx.size) if mode == "sum" and draw(st.booleans()) else None
    pad = draw(st.sampled_from([None, 0]))
    return he.FullTable(sizes, D), idx, off, T, B, mode, psw, pad, D


def _step(full, idx, off, T, mode, psw, pad, W, G, opt):
    if T == 1:
        return he.embedding_bag_backward(G, idx, off[:-1], scheme=full, mode=mode,
                                         per_sample_weights=psw, padding_idx=pad, weight=W,
                                         optimizer=opt)
    return he.embedding_bags_backward(G, idx, off, scheme=full, num_tables=T, mode=mode,
                                      per_sample_weights=psw, weight=W, optimizer=opt)


@settings(max_examples=80, deadline=None)
@given(full_batches(), st.sampled_from([np.float32, np.float64]), st.integers(0, 99))
def test_step_equals_the_model_bitwise(b, dtype, gseed):
    full, idx, off, T, B, mode, psw, pad, D = b
    if T > 1:
        pad = None
    psw = None if psw is None else psw.astype(dtype)
    rng = np.random.default_rng(gseed)
    W = full.init_weight(seed=gseed, dtype=dtype)
    want = W.copy()
    state = np.zeros(full.size // D, dtype)
    opt = he.RowwiseAdagrad(0.1, eps=1e-3)
    for _ in range(3):      # the state carries over
        G = rng.standard_normal((B, T * D)).astype(dtype)
        grad = _step(full, idx, off, T, mode, psw, pad, want, G, None)
        rowwise_model(want, state, grad, opt.lr, opt.eps)
        assert _step(full, idx, off, T, mode, psw, pad, W, G, opt) is None
        np.testing.assert_array_equal(W, want)
        np.testing.assert_array_equal(opt.state_for(W, full.size // D), state)


@settings(max_examples=40, deadline=None)
@given(full_batches(), st.integers(0, 99))
def test_step_against_the_float64_reference(b, gseed):
    # the reference gradient (tests/reference.py) in float64, then the rule
    full, idx, off, T, B, mode, psw, pad, D = b
    pad = pad if T == 1 else None
    rng = np.random.default_rng(gseed)
    W = full.init_weight(seed=1, dtype=np.float64)
    G = rng.standard_normal((B, T * D))
    grad = bag_backward(full, idx, off, G, T, W.reshape(-1), 0, mode, psw, pad).reshape(-1, D)
    lr, eps = 0.05, 1e-6
    G2 = (grad ** 2).mean(axis=1)
    want = W - np.where(G2[:, None] > 0, lr * grad / (np.sqrt(G2)[:, None] + eps), 0)
    _step(full, idx, off, T, mode, psw, pad, W, G, he.RowwiseAdagrad(lr, eps=eps))
    np.testing.assert_allclose(W, want, rtol=1e-12, atol=1e-12)


def zero_sum_case(dtype):
    """A full table of -0.0 weights and two rows whose gradient sums are
    -0.0 in some elements (one entry each: a per-row sum starts from it)
    and non-zero in the others; D 13: eight elements a step and a tail."""
    full = he.FullTable([1000], 13)
    W = np.full((1000, 13), -0.0, np.float32).astype(dtype)
    x = np.array([[3], [7]])
    g = np.tile(np.resize([-0.0, 1, -0.0, 2, 0.0, -0.0, 3, -0.0, 4, -0.0], 13), (2, 1))
    return full, W, x, g


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_a_zero_sum_moves_nothing_whatever_its_sign(dtype):
    # w - (-0.0) would turn a -0.0 weight into +0.0, and the sign of a zero
    # sum depends on how it was summed (this one -0.0; a dense gradient
    # summed into zeros gives +0.0): only non-zero sums move an element
    full, W, x, g = zero_sum_case(dtype)
    cdt = np.float64 if dtype == np.float64 else np.float32
    he.embedding_bags_backward(g.astype(cdt), x, scheme=full, num_tables=1, weight=W,
                               optimizer=he.RowwiseAdagrad(0.1))
    bits = W.view(np.uint64 if dtype == np.float64 else
                  np.uint16 if W.itemsize == 2 else np.uint32)
    sign = bits[0, 0]                       # -0.0's bits
    moved = g[0] != 0
    assert (bits[[3, 7]][:, ~moved] == sign).all()
    assert (bits[[3, 7]][:, moved] != sign).all()
    assert (bits[np.setdiff1d(np.arange(1000), [3, 7])] == sign).all()


def test_same_bits_on_any_thread_count():
    # a batch big enough for several threads, whose row-aligned ranges
    # split the table between them
    code = ("import numpy as np, hashemb as he, hashlib;"
            "f=he.FullTable([200_003, 1000], 16);r=np.random.default_rng(0);"
            "x=r.integers(0,1000,(20_000,2));g=r.standard_normal((20_000,32)).astype(np.float32);"
            "x[:3,0]=[200_003*k//n for k,n in ((1,2),(1,3),(2,3))];"
            "W=f.init_weight();o=he.RowwiseAdagrad(0.1);"
            "[he.embedding_bags_backward(g,x,scheme=f,num_tables=2,weight=W,optimizer=o)"
            " for _ in range(2)];"
            "print(hashlib.sha1(W.tobytes()+o.state_for(W,f.size//16).tobytes()).hexdigest())")
    outs = fuzzing.outputs_by_threads(code)
    assert len(set(outs.values())) == 1, outs


def test_per_element_adagrad_sums_per_row_with_the_scratch_bits():
    # a float32 full table large next to its batch: Adagrad sums each row in
    # a compact buffer (no scratch of the table's size); the bits are those
    # of the dense scratch (a small table next to the same batch takes it)
    rng = np.random.default_rng(3)
    x = rng.integers(0, 50, (400, 1))
    x[::3] = 7
    g = rng.standard_normal((400, 8)).astype(np.float32)
    big, small = he.FullTable([100_000], 8), he.FullTable([50], 8)
    Wb = big.init_weight(seed=1)
    Ws = Wb[:50].copy()
    ob, osm = he.Adagrad(0.1), he.Adagrad(0.1)
    for _ in range(2):
        he.embedding_bags_backward(g, x, scheme=big, num_tables=1, weight=Wb, optimizer=ob)
        he.embedding_bags_backward(g, x, scheme=small, num_tables=1, weight=Ws, optimizer=osm)
    assert not ob._scratch and osm._scratch
    np.testing.assert_array_equal(Wb[:50], Ws)
    np.testing.assert_array_equal(ob.state_for(Wb)[0][:400], osm.state_for(Ws)[0])


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("kind", ["EXACT_ROWWISE_ADAGRAD", "EXACT_ADAGRAD", "EXACT_SGD"])
def test_matches_fbgemm(mode, kind):
    """FBGEMM's own fused optimizers (CPU) against hashemb's on a full table:
    EXACT_ROWWISE_ADAGRAD / RowwiseAdagrad, and, as an independent check of
    the older ones, EXACT_ADAGRAD / Adagrad and EXACT_SGD / SGD; three steps
    over three tables with bags of 0-3 entries and repeated rows."""
    pytest.importorskip("fbgemm_gpu")
    import torch
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (EmbeddingLocation,
                                                                      PoolingMode)
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)
    card, D, B, lr, eps = [50, 7, 300], 8, 32, 0.3, 1e-6
    rng = np.random.default_rng(0)
    emb = SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(n, D, EmbeddingLocation.HOST, ComputeDevice.CPU) for n in card],
        optimizer=getattr(EmbOptimType, kind), learning_rate=lr, eps=eps,
        pooling_mode=PoolingMode.SUM if mode == "sum" else PoolingMode.MEAN, device="cpu")
    full = he.FullTable(card, D)
    W = np.concatenate([w.detach().numpy().copy() for w in emb.split_embedding_weights()])
    W0 = W.copy()
    opt = {"EXACT_ROWWISE_ADAGRAD": lambda: he.RowwiseAdagrad(lr, eps=eps),
           "EXACT_ADAGRAD": lambda: he.Adagrad(lr, eps=eps),
           "EXACT_SGD": lambda: he.SGD(lr)}[kind]()
    for _ in range(3):
        counts = rng.integers(0, 4, len(card) * B)
        off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        idx = np.concatenate([rng.integers(0, min(card[q // B], 5), c)
                              for q, c in enumerate(counts)]).astype(np.int64)
        G = rng.standard_normal((B, len(card) * D)).astype(np.float32)
        out = emb(torch.from_numpy(idx), torch.from_numpy(off))
        out.backward(torch.from_numpy(G))
        he.embedding_bags_backward(G, idx, off, scheme=full, num_tables=len(card), mode=mode,
                                   weight=W, optimizer=opt)
    theirs = np.concatenate([w.detach().numpy() for w in emb.split_embedding_weights()])
    assert np.abs(theirs - W0).max() > 0.1          # the steps moved the rows
    # within a few float32 spacings: FBGEMM forms its steps in float32 (and
    # sums a row's gradient in another order)
    np.testing.assert_allclose(W, theirs, rtol=2e-6, atol=5e-7)


def test_errors():
    x = np.array([[1, 2]])
    g = np.ones((1, 8), np.float32)
    robe = he.RobeZ(1000, 4)
    with pytest.raises(ValueError, match="optimizer: RowwiseAdagrad .*FullTable.*RobeZ"):
        he.embedding_bag_backward(g[:, :4], x, scheme=robe, weight=robe.init_weight(),
                                  optimizer=he.RowwiseAdagrad(0.1))
    full = he.FullTable([10], 8)
    with pytest.raises(ValueError, match="optimizer: RowwiseAdagrad expected mode 'sum' or "
                                         "'mean'.*got 'max'"):
        he.embedding_bag_backward(g, x, scheme=full, mode="max", weight=full.init_weight(),
                                  optimizer=he.RowwiseAdagrad(0.1))
    with pytest.raises(ValueError, match="lr"):
        he.RowwiseAdagrad(-1.0)
    with pytest.raises(ValueError, match="eps"):
        he.RowwiseAdagrad(0.1, eps=float("nan"))
    W = full.init_weight()
    opt = he.RowwiseAdagrad(0.1)
    with pytest.raises(ValueError, match="state: expected .*one value per row"):
        opt.use_state(W, np.zeros(7, np.float32))
    # a (rows, D) weight's row count is checked as the state is bound (it
    # failed only at the next step); a flat weight's at the step
    assert W.shape == (10, 8)
    with pytest.raises(ValueError, match=r"state: expected .*one value per row \(10\)"):
        opt.use_state(W, np.zeros(80, np.float32))
    flat = W.reshape(-1)
    opt.use_state(flat, np.zeros(80, np.float32))   # divides the size, but not 10 rows
    with pytest.raises(ValueError, match="state: expected 10 values"):
        he.embedding_bag_backward(g, x, scheme=full, weight=flat, optimizer=opt)
    cores = he.tt_init(8, [2, 4], [2, 4], [2])
    with pytest.raises(TypeError, match="optimizer: expected None, hashemb.SGD or "
                                        "hashemb.Adagrad, got RowwiseAdagrad"):
        he.tt_embedding_bag_backward(np.ones((1, 8), np.float32), np.array([1]), cores,
                                     np.array([0, 1]), optimizer=he.RowwiseAdagrad(0.1))


@pytest.mark.parametrize("kind", ["adagrad", "rowwise"])
def test_a_copied_optimizer_keeps_no_arrays_by_address(kind):
    # a pickled copy kept the original's accumulators keyed by the original
    # weights' addresses: a later weight at such an address took one (a first
    # step of half its size), and the copy's own weights stepped from zeros
    import gc
    import pickle
    full = he.FullTable([10], 8)
    x, g = np.array([[2]]), np.ones((1, 8), np.float32)
    opt = he.Adagrad(0.1) if kind == "adagrad" else he.RowwiseAdagrad(0.1)
    W = full.init_weight()
    for _ in range(3):
        he.embedding_bag_backward(g, x, scheme=full, weight=W, optimizer=opt)
    copy = pickle.loads(pickle.dumps(opt))
    assert copy.state == {} and copy._scratch == {} and copy.lr == opt.lr
    addr = W.__array_interface__["data"][0]
    del W
    gc.collect()
    for _ in range(50):             # a fresh weight, ideally at the freed address
        W2 = full.init_weight()
        if W2.__array_interface__["data"][0] == addr:
            break
    before = W2.copy()
    he.embedding_bag_backward(g, x, scheme=full, weight=W2, optimizer=copy)
    np.testing.assert_allclose(W2[2], before[2] - 0.1, rtol=1e-6)    # from zeros
    assert opt.state == {}          # the original forgot the freed weight's


def test_torch_module():
    torch = pytest.importorskip("torch")
    from hashemb.torch import HashEmbeddingBagCollection
    full = he.FullTable([30, 20], 4)
    mod = HashEmbeddingBagCollection(full, 2, optimizer="rowwise_adagrad", lr=0.1)
    assert mod.optimizer_state.shape == (50,)
    W0 = mod.weight.detach().numpy().copy()
    x = torch.tensor([[1, 2], [1, 19]])
    mod(x).sum().backward()
    want, state = W0.copy(), np.zeros(50, np.float32)
    grad = he.embedding_bags_backward(np.ones((2, 8), np.float32), x.numpy(), scheme=full,
                                      num_tables=2, weight=W0)
    rowwise_model(want, state, grad, 0.1, 1e-10)
    np.testing.assert_array_equal(mod.weight.detach().numpy(), want)
    np.testing.assert_array_equal(mod.optimizer_state.numpy(), state)
    sd = mod.state_dict()
    assert "optimizer_state" in sd and sd["optimizer_state"].shape == (50,)
    with pytest.raises(ValueError, match="optimizer: RowwiseAdagrad .*FullTable"):
        HashEmbeddingBagCollection(he.RobeZ(100, 4), 2, optimizer="rowwise_adagrad")


@settings(max_examples=30, deadline=None)
@given(full_batches(), st.integers(0, 99))
def test_one_element_rows_are_adagrad(b, gseed):
    # D = 1: a row's mean square is its element's square, so the rule is
    # per-element Adagrad's (formed in another order: to float32 rounding)
    full, idx, off, T, B, mode, psw, pad, D = b
    full = he.FullTable(full.table_sizes, 1)
    pad = pad if T == 1 else None
    psw = None if psw is None else psw.astype(np.float32)
    G = np.random.default_rng(gseed).standard_normal((B, T)).astype(np.float32)
    W = full.init_weight(seed=gseed)
    Wa = W.copy()
    ro, ao = he.RowwiseAdagrad(0.1, eps=1e-3), he.Adagrad(0.1, eps=1e-3)
    for _ in range(2):
        _step(full, idx, off, T, mode, psw, pad, W, G, ro)
        _step(full, idx, off, T, mode, psw, pad, Wa, G, ao)
    np.testing.assert_allclose(W, Wa, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ro.state_for(W, W.size), ao.state_for(Wa)[0], rtol=1e-6)


def test_make_embedding_full_rowwise_starts_from_the_torch_rows():
    # the demo's full baseline with row-wise Adagrad: the same initial rows
    # as the torch one, so the optimizer is the only difference
    torch = pytest.importorskip("torch")
    from hashemb.torch import make_embedding
    a = make_embedding("full", [100, 50], 4, seed=3)
    b = make_embedding("full", [100, 50], 4, seed=3, optimizer="rowwise_adagrad", lr=0.1)
    assert torch.equal(torch.cat([t.weight for t in a.tables]), b.weight)
    assert b.optimizer_state.shape == (150,) and b._lookup.optimizer.lr == 0.1


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_two_d_input_and_saved_starts(dtype):
    # (B, T) input, and the run starts a forward kept (return_saved /
    # saved): the same bits as flat indices with offsets
    full = he.FullTable([300, 20, 7000], 8)
    rng = np.random.default_rng(8)
    X = np.stack([rng.integers(0, n, 50) for n in (300, 20, 7000)], 1)
    flat = np.ascontiguousarray(X.T).reshape(-1)
    off = np.arange(flat.size + 1, dtype=np.int64)
    W0 = full.init_weight(seed=1, dtype=dtype)
    outs = []
    for two_d, keep in ((False, False), (True, False), (True, True), (False, True)):
        W, opt = W0.copy(), he.RowwiseAdagrad(0.1, seed=3)
        x, o = (X, None) if two_d else (flat, off)
        for step in range(2):
            G = np.random.default_rng(step).standard_normal((50, 24)).astype(np.float32)
            saved = he.embedding_bags(x, W, o, scheme=full, num_tables=3,
                                      return_saved=True)[1] if keep else None
            he.embedding_bags_backward(G, x, o, scheme=full, num_tables=3, weight=W,
                                       optimizer=opt, saved=saved)
        outs.append(W)
    for W in outs[1:]:
        np.testing.assert_array_equal(W.view(np.uint16 if dtype == np.float16 else np.uint32),
                                      outs[0].view(np.uint16 if dtype == np.float16 else np.uint32))
    assert not np.array_equal(outs[0], W0)


def test_single_table_call_of_a_later_table():
    # embedding_bag_backward(table=1) moves table 1's rows (after table 0's),
    # with their accumulators at the same rows
    full = he.FullTable([30, 20], 4)
    x = np.array([[3], [19], [3]])
    g = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    W1, W2 = full.init_weight(seed=1), full.init_weight(seed=1)
    o1, o2 = he.RowwiseAdagrad(0.1), he.RowwiseAdagrad(0.1)
    he.embedding_bag_backward(g, x, scheme=full, table=1, weight=W1, optimizer=o1)
    X = np.concatenate([np.full((3, 1), 0), x], 1)           # table 0's entries: zero grad
    G = np.concatenate([np.zeros((3, 4), np.float32), g], 1)
    he.embedding_bags_backward(G, X, scheme=full, num_tables=2, weight=W2, optimizer=o2)
    np.testing.assert_array_equal(W1, W2)
    s1 = o1.state_for(W1, 50)
    np.testing.assert_array_equal(s1, o2.state_for(W2, 50))
    assert np.flatnonzero(s1).tolist() == [33, 49]


# -- from a mutation round: each kills a mutant the suite let through

def test_forget_keeps_a_newer_entry():
    import weakref
    from hashemb.optim import _forget
    opt, old, new = he.Adagrad(0.1), np.zeros(4), np.ones(4)
    opt.state["k"] = new
    _forget(weakref.ref(opt), "state", "k", weakref.ref(old))
    assert opt.state["k"] is new


def test_pickled_optimizer_carries_no_scratch():
    import pickle
    robe, w, opt = he.RobeZ(1 << 20, 4), np.zeros(1 << 20, np.float32), he.Adagrad(0.1)
    he.embedding_bag_backward(np.ones((1, 4), np.float32), np.array([[3]]), scheme=robe,
                              weight=w, optimizer=opt)
    assert len(pickle.dumps(opt)) < 10_000


def test_rowwise_state_of_no_values_is_a_value_error():
    with pytest.raises(ValueError, match="state"):
        he.RowwiseAdagrad(0.1).use_state(np.zeros(12, np.float32), np.zeros(0, np.float32))


def test_uint64_padding_idx_two_to_the_63():
    r = he.RobeZ(64, 4, seed=0)
    M = r.init_weight(seed=1)
    out = he.embedding_bag(np.array([2 ** 63, 5], np.uint64), M, np.array([0]), scheme=r,
                           padding_idx=2 ** 63)
    np.testing.assert_array_equal(out, he.embedding_bag(np.array([5]), M, np.array([0]), scheme=r))


def test_zero_lr_and_eps_are_allowed():
    assert he.SGD(0.0).lr == 0.0 and he.Adagrad(0.1, eps=0.0).eps == 0.0


def test_two_tables_need_two_columns():
    robe = he.RobeZ(64, 4)
    with pytest.raises(ValueError, match=r"indices: expected shape \(B, num_tables=2\)"):
        he.embedding_bags(np.zeros((4, 3), np.int64), robe.init_weight(), scheme=robe,
                          num_tables=2)
