"""The TT LFU cache on the GPU backend (TTCache(..., like=device array);
hashemb/_gpu/tt.py cache_count / cache_populate and the cached rows of the
forward and backward) against the CPU's TTCache, in the two ways of
tests/test_gpu_tt.py: the launchers on the host emulator with NumPy arrays,
or the public API with CuPy arrays on a device (skipped without one).

What must agree exactly: the (row, count) pairs of the frequency table (its
slots may differ: the device inserts in parallel), the rows held and their
slots, the changed slots, the Adagrad state reset, and the cached rows'
values where they come from the cache. Chain products and sums agree to
the tolerance of tests/test_gpu_tt.py.
"""
import re

import numpy as np
import pytest
from hypothesis import given, strategies as st

import hashemb as he
from hashemb._gpu import _runtime as RT
from hashemb._gpu import tt as GT

import gpu_emu
from test_gpu_tt import FIXTURE, Dev, _kw, _magnitudes, chunk, close, det, tt_batch  # noqa: F401


class CacheDev(Dev):
    """Dev with the cache's own calls: a device cache, its count and populate."""

    def cache(self, capacity, dim, hashtbl_size=None, dtype=np.float32):
        if self.be:         # the emulator's device arrays are NumPy arrays
            return he.TTCache(capacity, dim, hashtbl_size, dtype)
        return he.TTCache(capacity, dim, hashtbl_size, dtype, like=self.cp.zeros(1))

    def count(self, cache, idx):
        if self.be:
            return GT.cache_count(cache, idx, be=self.be)
        return cache.count(idx)

    def populate(self, cache, cores, n=None, optimizer=None):
        if self.be:
            return GT.cache_populate(cache, cores, n, optimizer, be=self.be)
        return cache.populate(cores, n, optimizer=optimizer)

    def copy_of(self, cpu):
        """A device cache holding a CPU cache's rows, values and counts."""
        c = self.cache(cpu.capacity, cpu.dim, cpu.keys.shape[0], cpu.weight.dtype)
        c.rows = self.put(cpu.rows)
        c.weight[...] = self.put(cpu.weight)
        c.keys[...], c.freq[...] = self.put(cpu.keys), self.put(cpu.freq)
        c._used = None
        return c


@pytest.fixture(scope="module", params=["emulator", "cupy"])
def dev(request):
    return CacheDev(request.param)


def pairs(cache, get):
    """{row: count} of a frequency table, whatever its slots."""
    k, f = get(cache.keys), get(cache.freq)
    return dict(zip(k[k >= 0].tolist(), f[k >= 0].tolist()))


def used(cache, get):
    u = cache._used
    return None if u is None else int(np.asarray(get(u) if not isinstance(u, int) else u)
                                      .reshape(-1)[0])


# ---------------------------------------------------------------- count

@FIXTURE
@given(data=st.data())
def test_count_holds_the_cpus_rows_and_counts(dev, data):
    """Batch after batch, the device table holds the CPU's (row, count)
    pairs: rows already held add their counts, new rows go in while there
    is room under the load cap (the first in entry order), and a row that
    finds none is not counted at all; with a small table the cap binds."""
    size = data.draw(st.integers(2, 40), "hashtbl_size")
    cap = data.draw(st.integers(0, max(0, size * 3 // 4)), "capacity")
    itype = data.draw(st.sampled_from([np.int32, np.int64, np.uint64]), "dtype")
    cpu, gpu = he.TTCache(cap, 4, size), dev.cache(cap, 4, size)
    for _ in range(data.draw(st.integers(1, 4), "batches")):
        ids = data.draw(st.lists(st.integers(0, 60), max_size=50), "ids")
        shape = (-1,) if data.draw(st.booleans(), "flat") or len(ids) % 2 else (2, -1)
        x = np.array(ids, np.int64).astype(itype).reshape(shape)
        cpu.count(x)
        dev.count(gpu, dev.put(x))
        assert pairs(gpu, dev.get) == pairs(cpu, dev.get)
        assert used(gpu, dev.get) == cpu._used


def test_count_errors_are_the_cpus(dev):
    cpu, gpu = he.TTCache(2, 4), dev.cache(2, 4)
    for bad in (np.array([1.0, 2.0]), np.array([3, -2, 1]), np.array([3, 2**63], np.uint64)):
        with pytest.raises(Exception) as want:
            cpu.count(bad)
        with pytest.raises(Exception) as got:
            dev.count(gpu, dev.put(bad))
        msg = re.sub(r"\b(numpy|cupy)\.ndarray of", "array of", str(got.value))
        assert (type(got.value), msg) == (type(want.value), str(want.value))
    assert pairs(gpu, dev.get) == {}            # nothing counted before the check


def test_count_without_the_index_check_counts_the_valid_rows(dev):
    """check_indices=False skips the check's read back: negative ids then count
    nowhere and take no room in the table (they filled it, so that a later
    valid row was not counted), and no slot outside it is touched (the
    emulator under ASan checks every access)."""
    old = he.set_gpu_options(check_indices=False)
    try:
        gpu = dev.cache(2, 4, 8)
        dev.count(gpu, dev.put(np.array([-1, 5, -7, 5, 3])))
        assert pairs(gpu, dev.get) == {5: 2, 3: 1} and used(gpu, dev.get) == 2
        gpu = dev.cache(2, 4, 8)
        dev.count(gpu, dev.put(np.array([-2, -3, -4, -5, -6, -7])))
        dev.count(gpu, dev.put(np.array([5, 5])))
        assert pairs(gpu, dev.get) == {5: 2} and used(gpu, dev.get) == 1
        assert int((dev.get(gpu.keys) != -1).sum()) == 1
    finally:
        he.set_gpu_options(**old)


def test_count_of_nothing_is_nothing(dev):
    """An empty batch, np.asarray([]) (float64) included, as on the CPU."""
    gpu = dev.cache(2, 4, 8)
    for empty in (np.asarray([]), np.zeros(0, np.int32), np.zeros((3, 0), np.int64)):
        he.TTCache(2, 4, 8).count(empty)
        dev.count(gpu, dev.put(empty))
    assert pairs(gpu, dev.get) == {} and used(gpu, dev.get) == 0


# ---------------------------------------------------------------- populate

@FIXTURE
@given(data=st.data(), opt=st.sampled_from([None, "sgd", "adagrad"]))
def test_populate_picks_the_cpus_rows_and_slots(dev, data, opt):
    """Two rounds of count + populate: the same rows in the same slots, the
    same changed slots, rows that stay keep their trained values exactly,
    incoming rows take their TT values, and a fused Adagrad's state is
    zeroed at the changed slots only."""
    dtype = data.draw(st.sampled_from([np.float32, np.float64]), "dtype")
    p = [data.draw(st.integers(2, 6), "p") for _ in range(3)]
    n = data.draw(st.integers(1, int(np.prod(p))), "num_embeddings")
    cores = he.tt_init(int(np.prod(p)), p, [2, 1, 2], [3, 2], seed=data.draw(st.integers(0, 99)),
                       dtype=dtype)
    cap = data.draw(st.integers(0, 8), "capacity")
    cpu, gpu = he.TTCache(cap, 4, dtype=dtype), dev.cache(cap, 4, dtype=dtype)
    make = {None: lambda: None, "sgd": lambda: he.SGD(0.1),
            "adagrad": lambda: he.Adagrad(0.1)}[opt]
    ocpu, ogpu = make(), make()
    dcores = dev.put(cores)
    for rnd in range(2):
        ids = np.array(data.draw(st.lists(st.integers(0, int(np.prod(p)) - 1), max_size=40),
                                 f"ids{rnd}"), np.int64)
        cpu.count(ids)
        dev.count(gpu, dev.put(ids))
        if isinstance(ocpu, he.Adagrad) and cap:
            for o, c in ((ocpu, cpu), (ogpu, gpu)):
                o.state_for(c.weight)[0][:] = dev.put(np.ones(cap * 4, dtype)) \
                    if c is gpu else 1.0
        want = cpu.populate(cores, n, optimizer=ocpu)
        got = dev.populate(gpu, dcores, n, optimizer=ogpu)
        np.testing.assert_array_equal(dev.get(got), want)
        np.testing.assert_array_equal(dev.get(gpu.rows), cpu.rows)
        stay = np.setdiff1d(np.arange(cap), want)
        np.testing.assert_array_equal(dev.get(gpu.weight)[stay], cpu.weight[stay])
        close(dev.get(gpu.weight), cpu.weight, dtype)
        np.testing.assert_array_equal(dev.get(gpu.slots(dev.put(np.arange(-2, 60)))),
                                      cpu.slots(np.arange(-2, 60)))
        if isinstance(ocpu, he.Adagrad) and cap:
            np.testing.assert_array_equal(dev.get(ogpu.state_for(gpu.weight)[0]),
                                          ocpu.state_for(cpu.weight)[0])
        # as if trained: both caches' rows move the same way
        w = cpu.weight * 2 + 1
        cpu.weight[...] = w
        gpu.weight[...] = dev.put(w)


# ---------------------------------------------------------------- lookups

def _caches_for(b, data, dev):
    """Per table: None or a CPU cache holding some of the batch's rows and
    others, and its device copy."""
    cpu, gpu = [], []
    for t, (cores, n) in enumerate(zip(b["tables"], b["sizes"])):
        D = int(np.prod([c.shape[2] for c in cores]))
        if data.draw(st.booleans(), f"cache{t}"):
            cpu.append(None)
            gpu.append(None)
            continue
        c = he.TTCache(data.draw(st.integers(1, 6), f"capacity{t}"), D, dtype=b["dtype"])
        c.count(np.asarray(b["idx"]).reshape(-1)[:data.draw(st.integers(0, 12), f"seen{t}")]
                % n)
        c.count(np.array(data.draw(st.lists(st.integers(0, n - 1), max_size=8), f"ids{t}")))
        c.populate(cores, n)
        c.weight += 0.5                 # trained: not the cores' values
        cpu.append(c)
        gpu.append(dev.copy_of(c))
    return cpu, gpu


def _on(b, single, cache):
    return (cache[0] if single else cache) if cache is not None else None


@FIXTURE
@given(b=st.one_of(tt_batch(), tt_batch(multi=True)), data=st.data())
def test_cached_forward_and_gradient_equal_cpu(dev, chunk, det, b, data):
    cpu, gpu = _caches_for(b, data, dev)
    single = b["single"]
    idx, tables, off = dev.put(b["idx"]), dev.put(b["tables"]), dev.put(b["off"])
    fwd = he.tt_embedding_bag if single else he.tt_embedding_bags
    want = fwd(b["idx"], b["tables"][0] if single else b["tables"], b["off"], **_kw(b),
               cache=_on(b, single, cpu))
    got = dev.forward(idx, tables, off, single=single, **_kw(b, dev), cache=_on(b, single, gpu))
    close(dev.get(got), want, b["dtype"])
    bwd = he.tt_embedding_bag_backward if single else he.tt_embedding_bags_backward
    want = bwd(b["G"], b["idx"], b["tables"][0] if single else b["tables"], b["off"], **_kw(b),
               cache=_on(b, single, cpu))
    bound = bwd(np.abs(b["G"]), b["idx"], [np.abs(c) for c in b["tables"][0]] if single
                else [[np.abs(c) for c in cs] for cs in b["tables"]], b["off"],
                **_kw(_magnitudes(b)), cache=_on(b, single, cpu))
    got = dev.backward(dev.put(b["G"]), idx, tables, off, single=single, **_kw(b, dev),
                       cache=_on(b, single, gpu))
    if single:
        got, want, bound = [got], [want], [bound]
    for gt, wt, bd in zip(got, want, bound):
        assert len(gt) == len(wt)           # the cores', then the cache's when it has one
        for x, y, z in zip(dev.get(gt), wt, bd):
            close(x, y, b["dtype"], bound=z)


@FIXTURE
@given(b=st.one_of(tt_batch(), tt_batch(multi=True)), data=st.data(),
       opt=st.sampled_from(["sgd", "adagrad"]), keep=st.booleans())
def test_cached_fused_step_equals_cpu(dev, det, b, data, opt, keep):
    """The fused rule trains the cached rows in the cache and the others in
    the cores, as on the CPU (``keep``: the backward given the forward's saved)."""
    cpu, gpu = _caches_for(b, data, dev)
    single = b["single"]
    make = (lambda: he.SGD(0.1)) if opt == "sgd" else (lambda: he.Adagrad(0.1, eps=0.1))
    ocpu, ogpu = make(), make()
    tcpu = [[c.copy() for c in cs] for cs in b["tables"]]
    tgpu = dev.put(b["tables"])
    idx, off = dev.put(b["idx"]), dev.put(b["off"])
    fwd = he.tt_embedding_bag if single else he.tt_embedding_bags
    bwd = he.tt_embedding_bag_backward if single else he.tt_embedding_bags_backward
    for _ in range(2):
        kw = {}
        if keep:
            kw["saved"] = fwd(b["idx"], tcpu[0] if single else tcpu, b["off"], **_kw(b),
                              cache=_on(b, single, cpu), return_saved=True)[1]
        bwd(b["G"], b["idx"], tcpu[0] if single else tcpu, b["off"], **_kw(b),
            cache=_on(b, single, cpu), optimizer=ocpu, **kw)
        kw = {}
        if keep:
            kw["saved"] = dev.forward(idx, tgpu, off, single=single, **_kw(b, dev),
                                      cache=_on(b, single, gpu), return_saved=True)[1]
        assert dev.backward(dev.put(b["G"]), idx, tgpu, off, single=single, **_kw(b, dev),
                            cache=_on(b, single, gpu), optimizer=ogpu, **kw) is None
    for cs, ds in zip(tcpu, tgpu):
        for c, d in zip(cs, ds):
            close(dev.get(d), c, b["dtype"], factor=10)
    for c, g in zip(cpu, gpu):
        if c is not None:
            close(dev.get(g.weight), c.weight, b["dtype"], factor=10)


def test_every_row_cached_leaves_the_cores_alone(dev):
    """A batch of cached rows only: no chain runs, the cores' gradient is
    zero, a fused step moves the cache's rows and not the cores."""
    cores = he.tt_init(100, [10, 10], [2, 2], [3], seed=3)
    cpu = he.TTCache(3, 4)
    cpu.count(np.array([4, 4, 9, 9, 17]))
    cpu.populate(cores)
    gpu = dev.copy_of(cpu)
    idx, off = np.array([4, 9, 4, 17]), np.array([0, 1, 4])
    G = np.arange(8, dtype=np.float32).reshape(2, 4)
    out = dev.forward(dev.put(idx), [dev.put(cores)], dev.put(off), single=True, cache=gpu)
    np.testing.assert_array_equal(dev.get(out), he.tt_embedding_bag(idx, cores, off, cache=cpu))
    got = dev.backward(dev.put(G), dev.put(idx), [dev.put(cores)], dev.put(off), single=True,
                       cache=gpu)
    want = he.tt_embedding_bag_backward(G, idx, cores, off, cache=cpu)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(dev.get(x), y)
    assert not any(np.asarray(dev.get(x)).any() for x in got[:2])
    dcores = dev.put(cores)
    dev.backward(dev.put(G), dev.put(idx), [dcores], dev.put(off), single=True, cache=gpu,
                 optimizer=he.SGD(0.5))
    for d, c in zip(dcores, cores):
        np.testing.assert_array_equal(dev.get(d), c)
    he.tt_embedding_bag_backward(G, idx, cores, off, cache=cpu, optimizer=he.SGD(0.5))
    np.testing.assert_array_equal(dev.get(gpu.weight), cpu.weight)


def test_saved_of_a_repopulated_cache_is_a_value_error(dev):
    """As on the CPU: a forward's saved names cache slots, so one from before
    a populate that moved rows (or from another cache) is refused."""
    cores = he.tt_init(100, [10, 10], [2, 2], [3])
    idx, off, g = np.array([4, 9, 4]), np.array([0, 3]), np.ones((1, 4), np.float32)
    host = (lambda a: a, lambda: he.TTCache(2, 4), he.tt_embedding_bag,
            he.tt_embedding_bag_backward, lambda c, x: c.count(x), lambda c, k: c.populate(k))
    device = (dev.put, lambda: dev.cache(2, 4),
              lambda i, k, o, **kw: dev.forward(i, [k], o, single=True, **kw),
              lambda g, i, k, o, **kw: dev.backward(g, i, [k], o, single=True, **kw),
              dev.count, dev.populate)
    for put, make, fwd, bwd, count, populate in (host, device):
        cache, k = make(), put(cores)
        count(cache, put(idx))
        populate(cache, k)
        _, saved = fwd(put(idx), k, put(off), cache=cache, return_saved=True)
        count(cache, put(np.array([50] * 9)))
        populate(cache, k)
        with pytest.raises(ValueError, match="^saved: expected a forward after table 0's "
                                             "cache was last populated"):
            bwd(put(g), put(idx), k, put(off), cache=cache, saved=saved)
        with pytest.raises(ValueError, match=r"^saved: expected the forward of these caches"):
            bwd(put(g), put(idx), k, put(off), cache=make(), saved=saved)


# ---------------------------------------------------------------- sides

@pytest.fixture
def public_emu(monkeypatch):
    monkeypatch.setattr(RT, "_backend", gpu_emu.emu_backend())
    return gpu_emu.stand


def test_a_cache_on_the_other_side_is_a_type_error(public_emu):
    """A device cache with host tables, and a host cache's count / slots given
    device ids: TypeErrors naming them (hashemb never copies between host and
    device). (A host cache with device tables: the device test below.)"""
    put = public_emu
    cores = he.tt_init(100, [10, 10], [2, 2], [3])
    idx, off = np.array([1, 2]), np.array([0, 2])
    host = he.TTCache(2, 4)
    with pytest.raises(TypeError, match=r"^indices: expected a numpy\.ndarray \(this TTCache "
                                        r"is on the host"):
        host.count(put(idx))
    with pytest.raises(TypeError, match=r"^rows: expected a numpy\.ndarray \(this TTCache "
                                        r"is on the host"):
        host.slots(put(idx))
    devc = he.TTCache(2, 4)
    devc.keys, devc.freq = devc.keys.view(gpu_emu.Stand), devc.freq.view(gpu_emu.Stand)
    for call in (lambda: he.tt_embedding_bag(idx, cores, off, cache=devc),
                 lambda: he.tt_embedding_bag_backward(np.ones((1, 4), np.float32), idx, cores,
                                                      off, cache=devc)):
        with pytest.raises(TypeError, match=r"^cache\[0\]: expected a TTCache on the host "
                                            r"like the tables \(TTCache\(\.\.\., like=None\)\), "
                                            r"got one on a device$"):
            call()
    with pytest.raises(TypeError, match=r"^like: expected None, a numpy\.ndarray or a "
                                        r"cupy\.ndarray"):
        he.TTCache(2, 4, like=[1, 2])


def test_device_host_cache_with_device_tables_is_a_type_error():
    cp = gpu_emu.cupy_or_skip()
    cores = [cp.asarray(c) for c in he.tt_init(100, [10, 10], [2, 2], [3])]
    idx, off = cp.asarray([1, 2]), cp.asarray([0, 2])
    for call in (lambda: he.tt_embedding_bag(idx, cores, off, cache=he.TTCache(2, 4)),
                 lambda: he.tt_embedding_bag_backward(cp.ones((1, 4), cp.float32), idx, cores,
                                                      off, cache=he.TTCache(2, 4))):
        with pytest.raises(TypeError, match=r"^cache\[0\]: expected a TTCache on a device "
                                            r"like the tables \(TTCache\(\.\.\., like=a device "
                                            r"array\)\), got one on the host$"):
            call()
    devc = he.TTCache(2, 4, like=idx)
    with pytest.raises(TypeError, match=r"^indices: expected a cupy\.ndarray"):
        devc.count(np.array([1, 2]))
    with pytest.raises(TypeError, match=r"^cores\[0\]: expected a cupy array"):
        devc.populate(he.tt_init(100, [10, 10], [2, 2], [3]))


# ---------------------------------------------------------------- torch on CUDA

def test_device_torch_tt_module_with_cache_trains_as_on_the_cpu():
    """TTEmbeddingBag(use_cache=True) moved to CUDA counts, populates and
    trains its caches there, as the CPU module does; its state (the caches'
    rows and counts) loads on either side."""
    torch = gpu_emu.torch_cuda()
    from hashemb.torch import TTEmbeddingBag
    torch.manual_seed(0)
    cpu = TTEmbeddingBag(300, 8, [4, 4], use_cache=True, cache_size=6, sparse=True,
                         optimizer="adagrad", learning_rate=0.1).double()
    gpu = TTEmbeddingBag(300, 8, [4, 4], use_cache=True, cache_size=6, sparse=True,
                         optimizer="adagrad", learning_rate=0.1).double()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    rng = np.random.default_rng(0)
    for step in range(6):
        x = torch.from_numpy(rng.zipf(1.5, 64) % 300)
        off = torch.arange(0, 65, 4)
        for m, dev_ in ((cpu, "cpu"), (gpu, "cuda")):
            m(x.to(dev_), off.to(dev_)).square().sum().backward()
            if step % 2 == 1:
                m.cache_populate()
    np.testing.assert_array_equal(gpu._cache_objs[0].rows.get(), cpu._cache_objs[0].rows)
    torch.testing.assert_close(gpu.cache_weights[0].cpu(), cpu.cache_weights[0],
                               rtol=1e-9, atol=1e-12)
    for a, b in zip(gpu.tt_cores, cpu.tt_cores):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)
    back = TTEmbeddingBag(300, 8, [4, 4], use_cache=True, cache_size=6, sparse=True,
                          optimizer="adagrad", learning_rate=0.1).double()
    back.load_state_dict(gpu.state_dict())
    np.testing.assert_array_equal(back._cache_objs[0].rows, cpu._cache_objs[0].rows)
