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
    # an upstream gradient that reaches the op as a negative view (the native
    # op read its raw bits: the gradient came out with the wrong sign)
    for m in (ref, fast):
        m.weight.grad = None
        m(x).backward(torch._neg_view(torch.ones(2, 3, 5, dtype=torch.float64)))
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=0, atol=0)
    e = torch.nn.Embedding(7, 1).double()
    f1 = FastEmbedding(7, 1, _weight=e.weight.detach().clone())
    for m in (e, f1):               # the same through public ops: a conjugated complex
        y = m(torch.tensor([3]))
        (torch.complex(torch.zeros_like(y), y).conj() * (2 + 3j)).real.sum().backward()
    torch.testing.assert_close(f1.weight.grad, e.weight.grad, rtol=0, atol=0)
    assert e.weight.grad[3, 0] == 3.0


def test_a_weight_put_in_the_modules_place_must_fit_its_layout():
    # the layout is fixed at construction: a smaller weight assigned (or given
    # to functional_call) was read and written past its end (a segfault, or a
    # corrupted heap in backward), a wider one read as the wrong rows
    f = FastEmbedding(1 << 12, 8)
    f.weight = torch.nn.Parameter(torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"weight: expected shape \(4096, 8\).*got \(4, 8\)"):
        f(torch.tensor([(1 << 12) - 1]))
    g = FastEmbedding(4, 2)
    g.weight = torch.nn.Parameter(torch.arange(12.0).reshape(4, 3))
    with pytest.raises(ValueError, match=r"weight: expected shape \(4, 2\)"):
        g(torch.tensor([3]))
    with pytest.raises(ValueError, match="weight"):
        torch.func.functional_call(FastEmbedding(64, 8), {"weight": torch.zeros(4, 8)},
                                   (torch.tensor([63]),))
    m = FastMultiEmbedding([3, 4], [2, 2])
    m.weight = torch.nn.Parameter(torch.zeros(10))
    with pytest.raises(ValueError, match=r"weight: expected shape \(14,\) \(a 1-D tensor"):
        m(torch.tensor([[0, 3]]))


def test_native_op_checks_the_weight_against_the_layout_itself():
    native = _native.module()
    if native is None:
        pytest.skip("the python path: _lookup_apply's check is the only one")
    from hashemb.lookup import _layout
    lay = _layout(64, 8)
    with pytest.raises(ValueError, match="weight: expected 512 floats"):
        native.lookup(torch.zeros(4, 8), torch.tensor([63]), torch.tensor(lay.packed),
                      lay.total, True)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_compiles_and_traces():
    # forward opaque to torch.compile (it failed in torch._numpy), and
    # torch.jit.trace runs the python function (the tracer recorded only the
    # native op's output allocation: a trace returned uninitialised memory)
    ref = torch.nn.Embedding(6, 3)
    f = FastEmbedding(6, 3, _weight=ref.weight.detach().clone())
    x = torch.tensor([1, 5, 5])
    model = torch.compile(torch.nn.Sequential(f, torch.nn.Linear(3, 1)), backend="eager")
    lin = model._orig_mod[1]
    torch.testing.assert_close(model(x), lin(ref(x)))
    model(x).sum().backward()
    lin.zero_grad()
    lin(ref(x)).sum().backward()
    torch.testing.assert_close(f.weight.grad, ref.weight.grad)
    m = FastMultiEmbedding([5, 7], [2, 3])
    y = torch.tensor([[4, 6], [0, 1]])
    torch.testing.assert_close(torch.compile(m, backend="eager")(y), m(y))
    traced = torch.jit.trace(f, (torch.tensor([1, 5]),))
    z = torch.tensor([0, 3])
    torch.testing.assert_close(traced(z), ref(z), rtol=0, atol=0)


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
    with pytest.raises(TypeError, match="_weight: expected a torch.Tensor"):
        FastMultiEmbedding([3], [2], _weight=[0.0] * 6)
    # (a float16 or integer weight was built and failed at the first call)
    with pytest.raises(TypeError, match="^_weight: expected a float32 or float64 tensor, "
                                        "got torch.float16$"):
        FastEmbedding(4, 2, _weight=torch.zeros(4, 2, dtype=torch.float16))
    with pytest.raises(TypeError, match="^_weight: expected a float32 or float64 tensor"):
        FastMultiEmbedding([3], [2], _weight=torch.zeros(6, dtype=torch.int64))
    with pytest.raises(TypeError, match="positional"):
        FastEmbedding(10, 3, 0)         # nn.Embedding's padding_idx: not _weight
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


def test_forked_child_runs_the_native_op_after_the_parent_did(path, tmp_path):
    """The native op runs its own OpenMP regions and torch loads it without
    a sys.modules entry, so the at-fork hook missed it: a forked child that
    called FastEmbedding after its parent had, on two threads, waited
    forever. Run in a fresh process (no other hashemb kernel loaded)."""
    import subprocess
    import sys
    import multiprocessing as mp
    if path != "native":
        pytest.skip("its subprocess runs the native op itself: once, under the native variant")
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    script = tmp_path / "fork_native.py"
    script.write_text(
        "import hashlib, multiprocessing as mp, torch\n"
        "torch.set_num_threads(2)\n"
        "from hashemb.torch import FastEmbedding, _native\n"
        "emb = FastEmbedding(100000, 64)\n"
        "x = torch.randint(0, 100000, (1 << 16,))\n"
        "with torch.no_grad():\n"
        "    want = hashlib.sha256(emb(x).numpy().tobytes()).hexdigest()\n"
        "assert _native.module() is not None, _native.status()\n"
        "def child(q):\n"
        "    with torch.no_grad():\n"
        "        q.put(hashlib.sha256(emb(x).numpy().tobytes()).hexdigest())\n"
        "ctx = mp.get_context('fork'); q = ctx.Queue()\n"
        "p = ctx.Process(target=child, args=(q,)); p.start(); p.join(60)\n"
        "if p.is_alive():\n"
        "    p.kill(); print('HUNG')\n"
        "else:\n"
        "    print('same' if q.get(timeout=10) == want else 'differs')\n")
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "same", r.stdout


def test_a_build_killed_mid_way_leaves_no_lock_behind(tmp_path):
    # torch's lock file, left by a builder that died, made every later first
    # use wait forever; under hashemb's flock such a file is stale and goes
    (tmp_path / "lock").write_text("")
    with _native._build_lock(str(tmp_path)):
        assert not (tmp_path / "lock").exists()


# -- from a mutation round: each kills a mutant the suite let through

def test_fast_embedding_of_a_transposed_input():
    from hashemb.torch import FastEmbedding
    ref = torch.nn.Embedding(50, 4)
    f = FastEmbedding(50, 4, _weight=ref.weight.detach().clone())
    x = torch.randint(0, 50, (6, 5)).t()                   # not contiguous
    torch.testing.assert_close(f(x), ref(x), rtol=0, atol=0)


def test_dtype_the_lookup_cannot_run_is_refused_at_construction():
    # a float16 module was built and failed at its first call; an integer
    # one failed inside torch.randn with a NotImplementedError
    for bad in (torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.complex64,
                torch.bool, "float32", np.float32):
        with pytest.raises(TypeError, match="dtype: expected None, torch.float32 or "
                                            "torch.float64"):
            FastEmbedding(10, 4, dtype=bad)
        with pytest.raises(TypeError, match="dtype"):
            FastMultiEmbedding([10, 3], [4, 2], dtype=bad)
        with pytest.raises(TypeError, match="dtype"):       # checked with _weight too
            FastEmbedding(10, 4, dtype=bad, _weight=torch.zeros(10, 4))
    for good in (None, torch.float32, torch.float64):
        emb = FastEmbedding(10, 4, dtype=good)
        multi = FastMultiEmbedding([10, 3], [4, 2], dtype=good)
        want = good or torch.float32
        assert emb.weight.dtype == multi.weight.dtype == want
        assert emb(torch.tensor([[1, 9]])).dtype == want
        assert multi(torch.tensor([[9, 2]])).shape == (1, 6)


def test_device_keyword():
    torch.manual_seed(3)
    a = FastEmbedding(10, 4, device="cpu")
    torch.manual_seed(3)
    assert torch.equal(a.weight, FastEmbedding(10, 4).weight) and a.weight.device.type == "cpu"
    w = torch.zeros(12)
    assert FastMultiEmbedding([2, 2], [3, 3], _weight=w, device="cpu").weight.data_ptr() == \
        w.data_ptr()
    with pytest.raises(ValueError, match="device: expected cpu"):
        FastMultiEmbedding([2, 2], [3, 3], _weight=w, device="cuda")
    with pytest.raises(ValueError, match="device: expected a torch device"):
        FastEmbedding(10, 4, device="tpu9")
    if torch.cuda.is_available():
        m = FastMultiEmbedding([5, 7], [2, 3], device="cuda")
        assert m.weight.is_cuda and m(torch.tensor([[1, 2]], device="cuda")).shape == (1, 5)
