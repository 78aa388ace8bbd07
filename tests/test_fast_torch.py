"""FastEmbedding / FastMultiEmbedding against torch.nn.Embedding itself."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings, strategies as st  # noqa: E402

from hashemb.torch import FastEmbedding, FastMultiEmbedding, _native  # noqa: E402


@pytest.fixture(params=["native", "python"], scope="module", autouse=True)
def path(request):
    """Every test twice: through the native C++ op (built here on first use;
    CI must build it) and through the Python autograd.Function fallback."""
    if request.param == "native":
        if os.environ.get("HASHEMB_TORCH_NATIVE", "1") == "0":
            pytest.skip("HASHEMB_TORCH_NATIVE=0")
        assert _native.module() is not None, _native.status()
        yield "native"
        return
    saved = dict(_native._state)
    _native._state.update(module=None, status="disabled (test)")
    try:
        yield "python"
    finally:
        _native._state.update(saved)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 200), D=st.integers(1, 64),
       shape=st.sampled_from([(5,), (300,), (4, 6), (2, 3, 2)]),
       itype=st.sampled_from([torch.int32, torch.int64]))
def test_fast_embedding_is_nn_embedding(seed, n, D, shape, itype):
    g = torch.Generator().manual_seed(seed)
    ref = torch.nn.Embedding(n, D)
    fast = FastEmbedding(n, D, _weight=ref.weight.detach().clone())
    x = torch.randint(0, n, shape, generator=g).to(itype)
    up = torch.randn(shape + (D,), generator=g)
    a, b = ref(x), fast(x)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    (a * up).sum().backward()
    (b * up).sum().backward()
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)


def test_fast_multi_embedding_is_cat_of_embeddings():
    g = torch.Generator().manual_seed(0)
    sizes, dims = [10, 3, 50, 7, 1, 20, 4, 9, 30, 2], list(range(1, 33, 3))[:10]
    refs = [torch.nn.Embedding(n, d) for n, d in zip(sizes, dims)]
    packed = torch.cat([r.weight.detach().reshape(-1) for r in refs])
    fast = FastMultiEmbedding(sizes, dims, _weight=packed.clone())
    x = torch.stack([torch.randint(0, n, (257,), generator=g) for n in sizes], dim=1)
    want = torch.cat([r(x[:, t]) for t, r in enumerate(refs)], dim=1)
    got = fast(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    up = torch.randn(got.shape, generator=g)
    (want * up).sum().backward()
    (got * up).sum().backward()
    for view, r in zip(fast.unpacked(), refs):
        torch.testing.assert_close(view, r.weight.detach())
    grads = torch.cat([r.weight.grad.reshape(-1) for r in refs])
    torch.testing.assert_close(fast.weight.grad, grads, rtol=1e-5, atol=1e-5)


def test_float64_noncontiguous_and_detached_grads():
    # the CPU fast path reads tensors' buffers directly: a double table, a
    # weight made non-contiguous after construction, a broadcast (stride-0)
    # upstream gradient and a negated one must all give nn.Embedding's results
    ref = torch.nn.Embedding(7, 5).double()
    fast = FastEmbedding(7, 5, _weight=ref.weight.detach().clone())
    x = torch.tensor([[6, 0, 6], [3, 3, 1]])
    (-ref(x)).sum().backward()
    (-fast(x)).sum().backward()
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=0, atol=0)
    fast.weight = torch.nn.Parameter(ref.weight.detach().t().contiguous().t())
    assert not fast.weight.is_contiguous()
    torch.testing.assert_close(fast(x), ref(x), rtol=0, atol=0)


def test_gradcheck():
    w = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[0, 5, 5], [2, 2, 2]])
    assert torch.autograd.gradcheck(lambda w: _apply(w, x, 6, 3, True), (w,))
    w2 = torch.randn(2 * 1 + 4 * 3, dtype=torch.float64, requires_grad=True)
    x2 = torch.tensor([[1, 3], [0, 3], [1, 0]])
    assert torch.autograd.gradcheck(lambda w: _apply(w, x2, (2, 4), (1, 3), False), (w2,))


def _apply(w, x, sizes, dims, single):
    from hashemb.lookup import _layout
    from hashemb.torch.fast import _lookup_apply
    lay = _layout(sizes, dims)
    return _lookup_apply(w, x, lay, torch.tensor(lay.packed), single)


def test_errors_and_training_step():
    emb = FastEmbedding(4, 2)
    with pytest.raises(IndexError, match="indices"):
        emb(torch.tensor([4]))
    with pytest.raises(TypeError, match="input"):
        emb(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="_weight"):
        FastEmbedding(4, 2, _weight=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="dims"):
        FastMultiEmbedding([3, 4], [1])
    one = FastMultiEmbedding(5, 3)          # ints, as multi_embedding takes (it raised)
    assert (one.sizes, one.dims) == ((5,), (3,)) and one(torch.tensor([[4]])).shape == (1, 3)
    with pytest.raises(TypeError, match="sizes"):
        FastMultiEmbedding([3.0], [1])
    with pytest.raises(ValueError, match="num_embeddings"):
        FastEmbedding(0, 2)
    with pytest.raises(TypeError, match="num_embeddings"):
        FastEmbedding(3.5, 2)
    with pytest.raises(TypeError, match="embedding_dim"):
        FastEmbedding(3, True)
    m = FastMultiEmbedding([3, 4], [2, 2])
    with pytest.raises(ValueError, match=r"input: expected shape \(B, 2\)"):
        m(torch.tensor([[0, 1, 2]]))
    with pytest.raises(IndexError, match=r"indices\[1, 1\].*< 4 \(table 1\), got 4"):
        m(torch.tensor([[0, 1], [2, 4]]))
    with pytest.raises(TypeError, match="weight"):
        FastEmbedding(4, 2).half()(torch.tensor([1]))
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    before = m.weight.detach().clone()
    m(torch.tensor([[2, 0]])).sum().backward()
    opt.step()
    changed = (m.weight.detach() != before).nonzero().reshape(-1).tolist()
    assert changed == [4, 5, 6, 7]          # row 2 of table 0, row 0 of table 1
