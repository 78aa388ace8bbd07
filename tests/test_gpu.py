"""The GPU backend. Three kinds of checks:

- no GPU needed: every .cu compiles (nvcc to PTX; NVRTC exactly as at run time
  where CuPy is installed), the device struct builder, dispatch rules;
- ``dev`` = "emulator": the launchers of hashemb._gpu run unchanged with NumPy
  arrays and the kernels compiled for the host (tests/gpu_emu.py), against
  the CPU kernels;
- ``dev`` = "cupy": the same bodies through the public API with CuPy arrays on
  a device (skipped without CuPy and a CUDA device).

GPU results must equal the CPU's exactly for slots, forward and the
deterministic backward (same operations in the same order, no FMA
contraction; on a device, float32 subnormals may read as 0, since CuPy
compiles with -ftz=true: Device.same), and to tight tolerance for atomic
backward.
"""
import functools
import gc
import glob
import os
import re
import shutil
import struct
import subprocess
import sys
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import hashemb as he
from hashemb import lookup as _lookup
from hashemb._gpu import _runtime as RT
from hashemb._gpu import bag as GB, embed as GE, slots as GS

import fuzzing
import gpu_emu
from test_bag import batches, make_scheme
from test_rowwise import full_batches, zero_sum_case
from storage16 import BF, DTYPES, FORMATS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "hashemb", "**", "*.cu"), recursive=True)
                  + glob.glob(os.path.join(ROOT, "tests", "**", "*.cu"), recursive=True))
FIXTURE = settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                          HealthCheck.too_slow], deadline=None)


# ------------------------------------------------------------ no GPU needed

@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_cu_file_compiles_to_ptx(cu, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    ptx = tmp_path / "out.ptx"
    r = subprocess.run([nvcc, "-ptx", "-arch=sm_90", "-I", os.path.join(ROOT, "hashemb", "_include"),
                        cu, "-o", str(ptx)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    listed = len(re.findall(r"^HE_KERNEL\(", open(cu).read(), re.M))
    assert len(re.findall(r"^\.visible \.entry|^\.entry", ptx.read_text(), re.M)) >= listed


@pytest.mark.parametrize("family", RT.FAMILIES)
def test_runtime_source_compiles_with_nvrtc(family):
    """What CuPy compiles at run time (slots.h + common.cuh + family.cu, the
    name expressions, the options), through NVRTC, for sm_90 and sm_80."""
    pytest.importorskip("cupy")
    try:
        from cupy.cuda import compiler
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as e:
        pytest.skip(f"NVRTC not available: {e}")
    names = RT.kernel_names(family)
    assert names
    for arch in ("compute_90", "compute_80"):
        prog = compiler._NVRTCProgram(RT.source(family), family + ".cu", name_expressions=names)
        ptx, mapping = prog.compile(RT.NVRTC_OPTIONS + ("-arch=" + arch,))
        assert set(mapping) == set(names) and all(mapping.values())


def test_patch_struct_changes_exactly_the_pointer_offsets():
    for scheme in [he.RobeZ(1000, 16, block=4, signed=True), he.FullTable([3, 4], 8),
                   he.LMA.fit(np.arange(40).reshape(10, 4) % 7, size=101, dim=4, num_points=10)]:
        view = scheme._view
        raw, fields = view.struct_bytes(), view.pointer_fields()
        offsets = [o for o, _ in fields]
        assert len(set(offsets)) == len(offsets) == 8       # every pointer member, once
        for o, a in fields:     # the host struct points at the arrays it names
            assert o % 8 == 0 and o + 8 <= len(raw)
            assert struct.unpack_from("<Q", raw, o)[0] == a.__array_interface__["data"][0]
        fake = [0xDEAD0000_0000_0000 + 0x100 * k + 8 for k in range(len(fields))]
        out = RT.patch_struct(raw, fields, fake)
        assert len(out) == len(raw)
        changed = {i for i in range(len(raw)) if raw[i] != out[i]}
        allowed = {o + i for o in offsets for i in range(8)}
        assert changed <= allowed
        for (o, _), p in zip(fields, fake):
            assert struct.unpack_from("<Q", out, o)[0] == p
        mask = bytearray(out)
        for o in offsets:
            mask[o:o + 8] = raw[o:o + 8]
        assert bytes(mask) == raw
    with pytest.raises(ValueError):
        RT.patch_struct(raw, [(3, None)], [1])


def test_kernel_int_arguments_are_memoised_and_bounded():
    a = RT.i64(12345)
    assert type(a) is np.int64 and a == 12345 and RT.i64(12345) is a
    assert RT.i64(True) == 1 and RT.i64(-(1 << 63)) == -(1 << 63)
    for v in range(10_000):
        assert RT.i64(v) == v
    assert len(RT._I64) <= 4096


def test_kernel_float_arguments_are_memoised_keeping_the_sign_of_zero():
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    a = RT.real(f32, 0.01)
    assert type(a) is np.float32 and a == np.float32(0.01) and RT.real(f32, 0.01) is a
    assert type(RT.real(f64, 0.01)) is np.float64
    z, nz = RT.real(f32, 0.0), RT.real(f32, -0.0)
    assert z is not nz and np.signbit(nz) and not np.signbit(z)
    assert RT.real(f64, np.float64(2.5)) is RT.real(f64, 2.5)


def _fake_cupy_backend(make):
    """A CupyBackend over a stand-in for cupy (no CUDA needed): its C scalar
    constructor is ``make`` (None: CuPy has none)."""
    import threading
    import types

    class Arr:
        pass
    be = object.__new__(RT.CupyBackend)
    be.xp = types.SimpleNamespace(ndarray=Arr)
    be._scalars, be._make_scalar, be._lock = {}, make, threading.Lock()
    return be, Arr


def test_kernels_compile_one_at_a_time_on_first_use():
    """A kernel is compiled alone when first launched (bag.cu whole took
    about 75 s a process), once per device; a failed compile is raised again
    without compiling again."""
    import threading
    import types
    compiled = []

    class Module:
        def __init__(self, code, options, name_expressions):
            compiled.append(tuple(name_expressions))
            if "broken" in name_expressions[0]:
                raise RuntimeError("nvrtc: error")
            self.names = name_expressions

        def get_function(self, name):
            assert name in self.names
            return ("fn", name)
    dev = [0]
    be = object.__new__(RT.CupyBackend)
    be.xp = types.SimpleNamespace(RawModule=Module, cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: dev[0])))
    be._modules, be._functions, be._failed, be._lock = {}, {}, {}, threading.Lock()
    a, b = RT.kernel_names("bag")[:2]
    assert be.function("bag", a) == ("fn", a) and be.function("bag", a) == ("fn", a)
    assert be.function("bag", b) == ("fn", b) and compiled == [(a,), (b,)]
    dev[0] = 1
    be.function("bag", a)
    assert compiled == [(a,), (b,), (a,)]
    for _ in range(2):
        with pytest.raises(RuntimeError, match="nvrtc"):
            be.function("bag", "broken<int>")
    assert compiled.count(("broken<int>",)) == 1


def test_launch_arguments_pack_each_scalar_once():
    """CuPy would build a C scalar for every scalar argument of every launch;
    _pack builds one per scalar object (the memoised i64 / real values) and
    reuses it, arrays pass as they are, and a Python int is refused."""
    made = []
    be, Arr = _fake_cupy_backend(lambda a: made.append(a) or ("C", a))
    x, n, lr = Arr(), RT.i64(7), RT.real(np.dtype(np.float32), 0.5)
    first = be._pack([x, n, lr, n])
    assert first == (x, ("C", n), ("C", lr), ("C", n)) and first[1] is first[3]
    again = be._pack([n, x, lr])
    assert again[0] is first[1] and again[2] is first[2] and len(made) == 2
    other = np.int64(7)                 # an equal value in another object: its own
    assert be._pack([other])[0] == ("C", other) and len(made) == 3
    with pytest.raises(TypeError, match="^kernel argument: expected a cupy.ndarray or a NumPy "
                                        "scalar, got int"):
        be._pack([x, 7])
    plain, _ = _fake_cupy_backend(None)     # no usable constructor: NumPy scalars as given
    assert plain._pack([n, lr])[0] is n


def test_c_scalar_probe_failure_falls_back_to_numpy_scalars():
    import types
    be, _ = _fake_cupy_backend(False)
    probes = []
    capturing = [True]

    def broken(**kw):
        probes.append(kw)
        raise RuntimeError("no compiler")
    be.xp.zeros, be.xp.RawModule = np.zeros, broken
    be.xp.cuda = types.SimpleNamespace(get_current_stream=lambda: types.SimpleNamespace(
        is_capturing=lambda: capturing[0]))
    # no probe (a read back) inside a CUDA graph capture: NumPy scalars for now
    assert be.c_scalars() is None and be._make_scalar is False and probes == []
    capturing[0] = False
    assert be.c_scalars() is None and be._make_scalar is None
    assert be._pack([RT.i64(3)])[0] is RT.i64(3)


@pytest.mark.parametrize("kind", ["robe", "robe-signed", "robe-wide", "hnet", "hnet-ref",
                                  "robe-ref", "full", "lsh"])
def test_bounded_says_whether_bounds_exist(kind):
    """check_bags skips the bounds lookup by scheme._bounded: it must agree
    with _bounds (else a sized table would go unchecked)."""
    schemes = _lsh_schemes() if kind == "lsh" else [make_scheme(kind, 4, 1)]
    for scheme in schemes:
        assert scheme._bounded == (scheme._bounds(0, 1) is not None)
    from hashemb import tt as TT
    assert TT._Sized([3])._bounded


def test_importing_hashemb_does_not_import_cupy():
    code = ("import sys, numpy as np, hashemb as he\n"
            "he.embedding_bag(np.array([[1, 2]]), he.RobeZ(64, 4).init_weight(), scheme=he.RobeZ(64, 4))\n"
            "assert 'cupy' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


class _FakeDeviceArray:
    """Looks like a CuPy array to the dispatcher (its type's module is cupy)."""
    __module__ = "cupy._core.core"


def test_mixing_host_and_device_arrays_is_a_type_error():
    robe = he.RobeZ(64, 4)
    x, M = np.array([[1, 2]]), robe.init_weight()
    with pytest.raises(TypeError, match="^weight: expected a cupy.ndarray like indices"):
        he.embedding_bag(_FakeDeviceArray(), M, scheme=robe)
    with pytest.raises(TypeError, match="^indices: expected a cupy.ndarray like weight"):
        he.embedding_bags(x, _FakeDeviceArray(), scheme=robe, num_tables=2)
    with pytest.raises(TypeError, match="^indices: expected a cupy.ndarray like grad_output"):
        he.embedding_bag_backward(_FakeDeviceArray(), x, scheme=robe)
    with pytest.raises(TypeError, match="^indices: expected a cupy.ndarray like weight"):
        he.embedding(x, _FakeDeviceArray())
    with pytest.raises(TypeError, match="no GPU kernels"):
        he._backend.kernels(_FakeDeviceArray())


class _OnDevice(_FakeDeviceArray):
    """A fake CuPy array on CUDA device ``dev``."""
    __module__ = "cupy._core.core"

    def __init__(self, dev):
        self.data = types.SimpleNamespace(device_id=dev, ptr=0)


def test_arrays_on_different_devices_are_a_value_error():
    # a launch on the weight's device read another device's pointers as its own
    robe = he.RobeZ(64, 4)
    a, b = _OnDevice(0), _OnDevice(1)
    with pytest.raises(ValueError, match="^weight: expected an array on device 0 like "
                                         "indices, got one on device 1"):
        he.embedding_bag(a, b, scheme=robe)
    with pytest.raises(ValueError, match="^offsets: expected an array on device 1"):
        he.embedding_bags(b, _OnDevice(1), a, scheme=robe, num_tables=2)
    with pytest.raises(ValueError, match="^indices: expected an array on device 1 like "
                                         "grad_output"):
        he.embedding_bag_backward(b, a, scheme=robe)
    with pytest.raises(ValueError, match="^weight: expected an array on device 0"):
        he.embedding(a, b)
    with pytest.raises(ValueError, match=r"^cores\[1\]: expected an array on device 0"):
        he.tt_embedding_bag(a, [a, b], _OnDevice(0))
    assert he._backend.on_gpu(x=a, y=_OnDevice(0), z=None)
    with pytest.raises(ValueError, match="^state: expected an array on device 1 like weight"):
        class W(_OnDevice):
            __module__ = "cupy._core.core"
            dtype = np.dtype(np.float32)
            size = 64
            shape = (64,)
            ndim = 1
        class S(W):
            __module__ = "cupy._core.core"
            flags = types.SimpleNamespace(c_contiguous=True, writeable=True)
        he.Adagrad(0.1).use_state(W(1), S(0))


def test_show_config_and_options():
    info = he.show_config()
    assert info["gpu"].startswith(("not available", "cupy "))
    old = he.set_gpu_options(deterministic=True, check_indices=False)
    try:
        assert RT.OPTIONS["deterministic"] and not RT.OPTIONS["check_indices"]
    finally:
        he.set_gpu_options(**old)
    assert old == {"deterministic": False, "check_indices": True}
    with pytest.raises(TypeError):
        he.set_gpu_options(fast=True)
    before = dict(RT.OPTIONS)
    with pytest.raises(TypeError, match=r"^check_indices: expected True or False, got 'no'"):
        he.set_gpu_options(deterministic=True, check_indices="no")
    with pytest.raises(TypeError, match=r"^deterministic: expected True or False, got None"):
        he.set_gpu_options(deterministic=None)
    with pytest.raises(TypeError, match=r"^precompute_starts: expected True, False or None"):
        he.set_gpu_options(precompute_starts=1)
    assert RT.OPTIONS == before             # nothing set when any value is bad
    assert he.set_gpu_options(precompute_starts=np.bool_(True)) == {"precompute_starts": None}
    assert he.set_gpu_options(precompute_starts=None) == {"precompute_starts": True}


def test_gpu_summary_reads_a_saved_run(tmp_path, capsys):
    """scripts/gpu-check ends with benchmarks/gpu_summary.py: issue 4's
    targets from gpu_bench's JSON (session 9's H200 run here) and every
    gpu_profile call; a file not written, or cut short, is said so."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_summary
    finally:
        sys.path.pop(0)
    shutil.copy(os.path.join(ROOT, "docs", "gpu_bench_h200.json"), tmp_path / "gpu_bench.json")
    gpu_summary.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "target hashemb RobeZ 1000x fwd_x_torch >= 3.0: 1.69 (NOT met)" in out
    assert "target hashemb FullTable fwd_x_torch >= 0.8: 0.86 (met)" in out
    assert "deterministic bwd" in out and "gpu_profile.json: not written" in out
    (tmp_path / "gpu_profile.json").write_text('{"calls": {"RobeZ forward": {"host_us": 1')
    gpu_summary.main([str(tmp_path)])
    assert "unreadable" in capsys.readouterr().out


def test_cached_uploads_wait_for_their_stream():
    """A buffer kept for later calls (scheme structs, bounds, layouts, hash
    coefficients) is uploaded asynchronously on the current stream; a call
    on another stream could read it half-written, so its upload is waited
    for. A per-call upload is not (the launch follows on the same stream)."""
    import types
    waits = []
    stream = types.SimpleNamespace(synchronize=lambda: waits.append(1))
    be = object.__new__(RT.CupyBackend)
    be.xp = types.SimpleNamespace(asarray=lambda a: np.array(a), cuda=types.SimpleNamespace(
        get_current_stream=lambda: stream, runtime=types.SimpleNamespace(getDevice=lambda: 0)))
    be.key = "fake"
    np.testing.assert_array_equal(be.to_device(np.arange(3)), np.arange(3))
    assert waits == []
    be.to_device(np.arange(3), kept=True)
    assert waits == [1]
    full = he.FullTable([5, 7], 4)
    waits.clear()
    RT.scheme_bounds(be, full, 0, 2)
    RT.scheme_bounds(be, full, 0, 2)        # cached: no second upload
    assert waits == [1]


def test_device_of_switches_device_only_when_needed():
    """A call on the current device enters a context that does nothing (no
    Device object, no setDevice in and out); another device is switched to."""
    import types
    made = []
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: 1),
        Device=lambda d: made.append(d) or ("switch", d)))
    be = object.__new__(RT.CupyBackend)
    be.xp = fake

    def on(d):
        return types.SimpleNamespace(data=types.SimpleNamespace(device_id=d))
    ctx = be.device_of(on(1))
    with ctx:
        pass
    assert ctx is be.device_of(on(1)) and made == []
    assert be.device_of(on(0)) == ("switch", 0) and made == [0]


def test_bag_calls_make_no_views_or_copies():
    """The host cost of a GPU bag call is mostly array-library calls (about
    10-30 us each on session 9's H200 host): with contiguous inputs a forward
    allocates its output (and the run starts it keeps), a backward given them
    with a fused step allocates nothing, and neither makes a view or a copy."""
    import cProfile
    import pstats
    be = gpu_emu.emu_backend()
    robe = he.RobeZ(999, 16, block=16, seed=1)
    M = robe.init_weight(seed=0)
    x = np.random.default_rng(0).integers(0, 1 << 40, (64, 26))
    G = np.ones((64, 26 * 16), np.float32)
    opt = he.SGD(0.01)
    calls = {}

    def count(fn):
        fn()
        pr = cProfile.Profile()
        pr.enable()
        fn()
        pr.disable()
        return {name: nc for (_, _, name), (_, nc, *_r) in pstats.Stats(pr).stats.items()
                if re.search(r"numpy|ndarray", name)}
    calls["forward"] = count(lambda: GB.forward(x, M, None, robe, 0, 26, "sum", None, True,
                                                None, be=be))
    saved = []
    calls["forward, kept starts"] = count(lambda: saved.append(
        GB.forward(x, M, None, robe, 0, 26, "sum", None, True, None, be=be,
                   return_saved=True)[1]))
    calls["backward, SGD"] = count(lambda: GB.backward(
        G, x, None, robe, 0, 26, "sum", None, True, None, M, opt, be=be, saved=saved[-1]))
    allocs = {k: sum(n for name, n in c.items() if re.search(r"\b(empty|zeros|full)\b", name))
              for k, c in calls.items()}
    views = {k: sum(n for name, n in c.items() if re.search(r"reshape|ravel|copy|astype", name))
             for k, c in calls.items()}
    assert allocs == {"forward": 1, "forward, kept starts": 2, "backward, SGD": 0}, calls
    assert views == dict.fromkeys(calls, 0), calls


# ------------------------------------------------------------ emulator / device

class Dev(gpu_emu.Device):
    """One way of running the GPU code: the host emulator or CuPy on a device."""

    # every call takes device arrays (put) and returns device arrays
    def bag(self, idx, M, off, scheme, table=0, mode="sum", psw=None, pad=None, last=False):
        if self.be:
            return GB.forward(idx, M, off, scheme, table, 1, mode, psw, last, pad, be=self.be)
        return he.embedding_bag(idx, M, off, scheme=scheme, table=table, mode=mode,
                                per_sample_weights=psw, padding_idx=pad, include_last_offset=last)

    def bags(self, idx, M, off, scheme, T, mode="sum", psw=None):
        if self.be:
            return GB.forward(idx, M, off, scheme, 0, T, mode, psw, True, None, be=self.be)
        return he.embedding_bags(idx, M, off, scheme=scheme, num_tables=T, mode=mode,
                                 per_sample_weights=psw)

    def bag_backward(self, G, idx, off, scheme, table=0, mode="sum", psw=None, pad=None,
                     weight=None, optimizer=None, det=None):
        if self.be:
            return GB.backward(G, idx, off, scheme, table, 1, mode, psw, False, pad, weight,
                               optimizer, det, be=self.be)
        return he.embedding_bag_backward(G, idx, off, scheme=scheme, table=table, mode=mode,
                                         per_sample_weights=psw, padding_idx=pad, weight=weight,
                                         optimizer=optimizer, deterministic=det)

    def bags_backward(self, G, idx, off, scheme, T, mode="sum", psw=None, weight=None,
                      optimizer=None, det=None):
        if self.be:
            return GB.backward(G, idx, off, scheme, 0, T, mode, psw, True, None, weight,
                               optimizer, det, be=self.be)
        return he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                          per_sample_weights=psw, weight=weight,
                                          optimizer=optimizer, deterministic=det)

    def slots(self, scheme, x, table=0):
        if self.be:
            return GS.scheme_slots(scheme, x, table, be=self.be)
        return GS.scheme_slots(scheme, x, table)   # Scheme.slots dispatch: see the note

    def signs(self, scheme, x, table=0):
        if self.be:
            return GS.scheme_signs(scheme, x, table, be=self.be)
        return GS.scheme_signs(scheme, x, table)

    def uhash(self, h, keys, m, table=0, block=0):
        if self.be:
            return GS.universal_hash(h, keys, m, table, block, be=self.be)
        return h(keys, m, table=table, block=block)

    def usign(self, h, keys, table=0, element=0):
        if self.be:
            return GS.universal_sign(h, keys, table, element, be=self.be)
        return h.sign(keys, table=table, element=element)

    def embedding(self, idx, W):
        if self.be:
            return GE.gather(idx, W, _lookup._layout(W.shape[0], W.shape[1]), True, be=self.be)
        return he.embedding(idx, W)

    def multi_embedding(self, idx, W, sizes, dims):
        if self.be:
            return GE.gather(idx, W, _lookup._layout(sizes, dims), False, be=self.be)
        return he.multi_embedding(idx, W, sizes, dims)

    def embedding_backward(self, g, idx, n, det=None):
        if self.be:
            lay = _lookup._layout(n, g.shape[-1])
            return GE.scatter(g, idx, lay, True, det, be=self.be).reshape(-1, g.shape[-1])
        return he.embedding_backward(g, idx, n, deterministic=det)

    def multi_embedding_backward(self, g, idx, sizes, dims, det=None):
        if self.be:
            return GE.scatter(g, idx, _lookup._layout(sizes, dims), False, det, be=self.be)
        return he.multi_embedding_backward(g, idx, sizes, dims, deterministic=det)


@pytest.fixture(scope="module", params=["emulator", "cupy"])
def dev(request):
    return Dev(request.param)


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)


def _psw_2d(psw, off, B, T):
    return psw


@FIXTURE
@given(b=batches(), last=st.booleans())
def test_bag_forward_equals_cpu(dev, b, last):
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    want = he.embedding_bag(idx, M, off if last else off[:-1], scheme=scheme, table=table0,
                            mode=mode, per_sample_weights=psw, padding_idx=pad,
                            include_last_offset=last)
    got = dev.bag(dev.put(idx), dev.put(M), dev.put(off if last else off[:-1]), scheme, table0,
                  mode, dev.put(psw), pad, last)
    dev.same(got, want)


@FIXTURE
@given(b=batches(multi=True))
def test_bags_forward_equals_cpu(dev, b):
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    want = he.embedding_bags(idx, M, off, scheme=scheme, num_tables=T, mode=mode,
                             per_sample_weights=psw)
    got = dev.bags(dev.put(idx), dev.put(M), dev.put(off), scheme, T, mode, dev.put(psw))
    assert got.shape == want.shape and got.dtype == want.dtype
    dev.same(got, want)


@FIXTURE
@given(b=batches(multi=True), gseed=st.integers(0, 99), det=st.booleans())
def test_bags_backward_equals_cpu(dev, b, gseed, det):
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    G = np.random.default_rng(gseed).standard_normal((B, T * scheme.dim)).astype(M.dtype)
    want = he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                      per_sample_weights=psw, weight=M)
    got = dev.get(dev.bags_backward(dev.put(G), dev.put(idx), dev.put(off), scheme, T, mode,
                                    dev.put(psw), dev.put(M), det=det))
    assert got.shape == want.shape and got.dtype == want.dtype
    if det:
        dev.same(got, want)
    else:
        np.testing.assert_allclose(got, want, **tol(M.dtype))


@FIXTURE
@given(b=batches(), gseed=st.integers(0, 99), det=st.booleans())
def test_single_bag_backward_equals_cpu(dev, b, gseed, det):
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    G = np.random.default_rng(gseed).standard_normal((B, scheme.dim)).astype(M.dtype)
    want = he.embedding_bag_backward(G, idx, off[:-1], scheme=scheme, table=table0, mode=mode,
                                     per_sample_weights=psw, padding_idx=pad, weight=M)
    got = dev.get(dev.bag_backward(dev.put(G), dev.put(idx), dev.put(off[:-1]), scheme, table0,
                                   mode, dev.put(psw), pad, dev.put(M), det=det))
    if det:
        dev.same(got, want)
    else:
        np.testing.assert_allclose(got, want, **tol(M.dtype))


@FIXTURE
@given(b=batches(multi=True), gseed=st.integers(0, 99), opt=st.sampled_from(["sgd", "adagrad"]),
       det=st.booleans())
def test_fused_optimizers_equal_cpu(dev, b, gseed, opt, det):
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    G = np.random.default_rng(gseed).standard_normal((B, T * scheme.dim)).astype(M.dtype)
    make = (lambda: he.SGD(0.1)) if opt == "sgd" else (lambda: he.Adagrad(0.1, eps=1e-3))
    steps = 1 if mode == "max" else 2       # later maxima may move with rounding
    W, o = M.copy(), make()
    for _ in range(steps):
        he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                   per_sample_weights=psw, weight=W, optimizer=o)
    Wd, od = dev.put(M), make()
    args = (dev.put(G), dev.put(idx), dev.put(off), scheme, T, mode, dev.put(psw))
    for _ in range(steps):
        assert dev.bags_backward(*args, weight=Wd, optimizer=od, det=det) is None
    if det:
        dev.same(Wd, W)
    else:
        np.testing.assert_allclose(dev.get(Wd), W, rtol=1e-4, atol=1e-4)


def _half(b, dtype=np.float16):
    """A batch of test_bag.batches with its array stored as float16 (or
    bfloat16)."""
    scheme, idx, off, M, T, table0, mode, psw, pad, B = b
    return (scheme, idx, off, M.astype(np.float32).astype(dtype), T, table0, mode,
            None if psw is None else psw.astype(np.float32), pad, B)


def _put16(dev, H):
    """H on the device; a bfloat16 array where this CuPy has no bfloat16
    (before CuPy 14, or without ml_dtypes) skips."""
    try:
        return dev.put(H)
    except (TypeError, ValueError, NotImplementedError) as e:
        if H.dtype == np.float16 or dev.kind == "emulator":
            raise
        pytest.skip(f"this CuPy has no {H.dtype}: {e}")


@pytest.mark.parametrize("fmt", FORMATS)
@FIXTURE
@given(b=batches(multi=True), gseed=st.integers(0, 99), det=st.booleans())
def test_half_forward_and_gradient_equal_cpu(dev, fmt, b, gseed, det):
    """16-bit storage (float16, bfloat16): the forward is the CPU's bit for
    bit (float32 out), the gradient (float32) the CPU's bit for bit when
    deterministic."""
    scheme, idx, off, H, T, table0, mode, psw, pad, B = _half(b, fmt.dtype)
    Hd = _put16(dev, H)
    want = he.embedding_bags(idx, H, off, scheme=scheme, num_tables=T, mode=mode,
                             per_sample_weights=psw)
    got = dev.bags(dev.put(idx), Hd, dev.put(off), scheme, T, mode, dev.put(psw))
    assert got.dtype == np.float32
    dev.same(got, want)
    G = np.random.default_rng(gseed).standard_normal((B, T * scheme.dim)).astype(np.float32)
    want = he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                      per_sample_weights=psw, weight=H)
    got = dev.bags_backward(dev.put(G), dev.put(idx), dev.put(off), scheme, T, mode,
                            dev.put(psw), Hd, det=det)
    assert got.dtype == np.float32 and got.shape == H.shape
    if det:
        dev.same(got, want)
    else:
        np.testing.assert_allclose(dev.get(got), want, **tol(np.float32))


def _same_half(dev, got, want, exact):
    """16-bit results: bitwise where the summed gradients are (the
    deterministic path off a device's -ftz), else within one step of the
    format (a sum in another order can round to the neighbouring value),
    or within float32's error of summing in another order, relative to the
    array's scale: a slot whose step nearly cancels its value (1.0 - 0.99999)
    keeps that error alone (a bfloat16 HashedNet step missed by 3.6e-7 at
    8e-6 with one step of 2**-7 allowed)."""
    got = dev.get(got)
    assert got.dtype == want.dtype
    if exact and dev.kind == "emulator":
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    else:
        half = want.dtype == np.float16
        w = want.astype(np.float32).astype(np.float64)
        scale = float(np.abs(w[np.isfinite(w)]).max(initial=0.0))
        np.testing.assert_allclose(got.astype(np.float32).astype(np.float64), w,
                                   rtol=2.0**-10 if half else 2.0**-7,
                                   atol=max(2.0**-24 if half else 2.0**-133, 2.0**-17 * scale))


@pytest.mark.parametrize("fmt", FORMATS)
@FIXTURE
@given(b=batches(multi=True), gseed=st.integers(0, 99), opt=st.sampled_from(["sgd", "adagrad"]),
       det=st.booleans(), sr=st.booleans())
def test_half_fused_optimizers_equal_cpu(dev, fmt, b, gseed, opt, det, sr):
    """16-bit storage with a fused step: the gradient summed in float32,
    then each touched slot moved once and rounded with the same bits (the
    rounding seed comes from the optimizer, the bits from (seed, slot))."""
    scheme, idx, off, H, T, table0, mode, psw, pad, B = _half(b, fmt.dtype)
    G = np.random.default_rng(gseed).standard_normal((B, T * scheme.dim)).astype(np.float32)
    make = (lambda: he.SGD(0.1, stochastic_rounding=sr, seed=gseed)) if opt == "sgd" else \
        (lambda: he.Adagrad(0.1, eps=1e-3, stochastic_rounding=sr, seed=gseed))
    steps = 1 if mode == "max" else 2
    W, o = H.copy(), make()
    for _ in range(steps):
        he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, mode=mode,
                                   per_sample_weights=psw, weight=W, optimizer=o)
    Wd, od = _put16(dev, H), make()
    args = (dev.put(G), dev.put(idx), dev.put(off), scheme, T, mode, dev.put(psw))
    for _ in range(steps):
        assert dev.bags_backward(*args, weight=Wd, optimizer=od, det=det) is None
    _same_half(dev, Wd, W, det)
    if opt == "adagrad":
        assert dev.get(od.state_for(Wd)[0]).dtype == np.float32
    assert not dev.get(od.scratch_for(Wd)).any()


@FIXTURE
@given(b=full_batches(), gseed=st.integers(0, 99),
       dtype=st.sampled_from(DTYPES),
       det=st.booleans(), sr=st.booleans())
def test_rowwise_adagrad_equals_cpu(dev, b, gseed, dtype, det, sr):
    """Row-wise Adagrad of full tables: the gradient summed in the scratch,
    then each touched row claimed and moved once; with the deterministic
    sums, the CPU's bits (float16: the same rounding bits too)."""
    full, idx, off, T, B, mode, psw, pad, D = b
    cdt = np.float32 if dtype in (np.float16, BF) else dtype
    psw = None if psw is None else psw.astype(cdt)
    M = full.init_weight(seed=gseed, dtype=dtype)
    make = lambda: he.RowwiseAdagrad(0.1, eps=1e-3, stochastic_rounding=sr, seed=gseed)  # noqa: E731
    W, o = M.copy(), make()
    Wd, od = _put16(dev, M), make()
    args = (dev.put(idx), dev.put(off), full, T, mode, dev.put(psw))
    for step in range(2):
        G = np.random.default_rng(gseed + step).standard_normal((B, T * D)).astype(cdt)
        he.embedding_bags_backward(G, idx, off, scheme=full, num_tables=T, mode=mode,
                                   per_sample_weights=psw, weight=W, optimizer=o)
        assert dev.bags_backward(dev.put(G), *args, weight=Wd, optimizer=od, det=det) is None
    rows = full.size // D
    if cdt != dtype:
        _same_half(dev, Wd, W, det)
    elif det:
        dev.same(Wd, W)
        dev.same(od.state_for(Wd, rows), o.state_for(W, rows))
    else:
        np.testing.assert_allclose(dev.get(Wd), W, **tol(cdt))
    np.testing.assert_allclose(dev.get(od.state_for(Wd, rows)), o.state_for(W, rows),
                               rtol=1e-4 if cdt == np.float32 else 1e-10)
    assert not dev.get(od.scratch_for(Wd)).any()        # left zeroed for the next call


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_rowwise_zero_sum_moves_nothing_on_the_emulator(dtype):
    """seg_rows moves only elements with a non-zero sum, as the CPU: a -0.0
    weight under a -0.0 sum stays -0.0 (bitwise the CPU's step)."""
    be = gpu_emu.emu_backend()
    full, W, x, g = zero_sum_case(dtype)
    cdt = np.float64 if dtype == np.float64 else np.float32
    G, Wd = g.astype(cdt), W.copy()
    flat, off = x.reshape(-1), np.arange(3)
    he.embedding_bags_backward(G, x, scheme=full, num_tables=1, weight=W,
                               optimizer=he.RowwiseAdagrad(0.1))
    GB.backward(G, flat, off, full, 0, 1, "sum", None, True, None, Wd,
                he.RowwiseAdagrad(0.1), False, be=be)
    np.testing.assert_array_equal(Wd.view(np.uint8), W.view(np.uint8))
    assert np.signbit(W.astype(np.float32)[3, 0])


def test_full_table_steps_sum_per_row_without_a_scratch():
    """A full table large next to its batch: Adagrad (float32, float64) and
    float16 SGD / Adagrad steps sort the entries by row and move each row
    once (seg_rows), with no scratch the size of the table: bitwise the
    CPU's (deterministic flag or not); sum with weights, mean, hot rows,
    and padding in a one-table call."""
    be = gpu_emu.emu_backend()
    full = he.FullTable([5000, 3000], 8)
    rng = np.random.default_rng(5)
    off = np.concatenate([[0], np.cumsum(rng.integers(0, 4, 80))])   # 2 x 40 bags of 0-3
    flat = rng.integers(0, 3000, off[-1])
    flat[::4] = flat[1]                                                 # a hot row
    psw = rng.uniform(0.5, 2, off[-1])
    cases = [(np.float32, lambda: he.Adagrad(0.1, eps=1e-3)),
             (np.float64, lambda: he.Adagrad(0.1, eps=1e-3)),
             (np.float16, lambda: he.SGD(0.3, seed=4)),
             (np.float16, lambda: he.Adagrad(0.1, eps=1e-3, seed=4)),
             (np.float32, lambda: he.RowwiseAdagrad(0.1, eps=1e-3))]
    if BF is not None:
        cases += [(BF, lambda: he.SGD(0.3, seed=4)), (BF, lambda: he.Adagrad(0.1, eps=1e-3, seed=4)),
                  (BF, lambda: he.RowwiseAdagrad(0.1, eps=1e-3, seed=4))]
    for dtype, make in cases:
        cdt = np.float32 if dtype in (np.float16, BF) else dtype
        for mode, pw, T, pad in (("sum", psw.astype(cdt), 2, None), ("mean", None, 2, None),
                                 ("mean", None, 1, int(flat[1]))):
            W = full.init_weight(seed=2, dtype=dtype)
            Wd, o, od = W.copy(), make(), make()
            o_ = off if T == 2 else off[:41]
            f_ = flat[:o_[-1]]
            for step in range(2):
                G = rng.standard_normal((40, 8 * T)).astype(cdt)
                if T == 2:
                    he.embedding_bags_backward(G, f_, o_, scheme=full, num_tables=2, mode=mode,
                                               per_sample_weights=pw, weight=W, optimizer=o)
                else:
                    he.embedding_bag_backward(G, f_, o_, scheme=full, mode=mode, padding_idx=pad,
                                              include_last_offset=True, weight=W, optimizer=o)
                GB.backward(G, f_, o_, full, 0, T, mode, pw, True, pad, Wd, od, False, be=be)
            np.testing.assert_array_equal(Wd.view(np.uint8), W.view(np.uint8))
            assert not od._scratch, (dtype, mode)
    # a one-table call of a later table (table=1): its rows and accumulators
    W = full.init_weight(seed=2)
    Wd, o, od = W.copy(), he.RowwiseAdagrad(0.1), he.RowwiseAdagrad(0.1)
    G = rng.standard_normal((40, 8)).astype(np.float32)
    he.embedding_bag_backward(G, flat[:off[40]], off[:41], scheme=full, table=1,
                              include_last_offset=True, weight=W, optimizer=o)
    GB.backward(G, flat[:off[40]], off[:41], full, 1, 1, "sum", None, True, None, Wd, od, False,
                be=be)
    np.testing.assert_array_equal(Wd, W)
    np.testing.assert_array_equal(od.state_for(Wd, 8000), o.state_for(W, 8000))
    assert o.state_for(W, 8000)[:5000].sum() == 0 and o.state_for(W, 8000)[5000:].any()


def test_half_weights_on_the_emulator_pass_their_bits():
    """The float16 instantiations take the array's bits (he_u16), the same
    launchers and checks; plain lookups keep rejecting float16."""
    be = gpu_emu.emu_backend()
    robe = he.RobeZ(500, 8, block=4)
    H = robe.init_weight(dtype=np.float16)
    X = np.random.default_rng(0).integers(0, 1 << 40, (40, 3))
    be.launches.clear()
    out = GB.forward(X, H, None, robe, 0, 3, "sum", None, True, None, be=be)
    np.testing.assert_array_equal(out, he.embedding_bags(X, H.astype(np.float32), scheme=robe,
                                                         num_tables=3))
    assert all("unsigned short" in k for k in be.launches if k.startswith("bag_forward"))
    with pytest.raises(TypeError, match="weight: expected a float32 or float64"):
        GE.gather(X, np.zeros((4, 8), np.float16), _lookup._layout(4, 8), True, be=be)


@pytest.mark.parametrize("layout", ["BxN", "BxT"])
def test_two_d_input_read_in_place(dev, layout):
    rng = np.random.default_rng(1)
    robe = he.RobeZ(501, 8, block=2, seed=5, signed=True)
    M = robe.init_weight(seed=2)
    x = rng.integers(0, 2**40, (7, 3))
    psw = rng.standard_normal((7, 3)).astype(np.float32)
    G = rng.standard_normal((7, 8 if layout == "BxN" else 24)).astype(np.float32)
    if layout == "BxN":
        want = he.embedding_bag(x, M, scheme=robe, table=2, per_sample_weights=psw)
        got = dev.bag(dev.put(x), dev.put(M), None, robe, 2, psw=dev.put(psw))
        gw = he.embedding_bag_backward(G, x, scheme=robe, table=2, per_sample_weights=psw)
        gg = dev.bag_backward(dev.put(G), dev.put(x), None, robe, 2, psw=dev.put(psw), det=True)
    else:
        want = he.embedding_bags(x, M, scheme=robe, num_tables=3, per_sample_weights=psw)
        got = dev.bags(dev.put(x), dev.put(M), None, robe, 3, psw=dev.put(psw))
        gw = he.embedding_bags_backward(G, x, scheme=robe, num_tables=3, per_sample_weights=psw)
        gg = dev.bags_backward(dev.put(G), dev.put(x), None, robe, 3, psw=dev.put(psw), det=True)
    dev.same(got, want)
    dev.same(gg, gw)


@pytest.mark.parametrize("pre", [True, False, None])
def test_precomputed_run_starts_change_nothing(dev, pre):
    rng = np.random.default_rng(3)
    robe = he.RobeZ(997, 16, block=8, seed=1)
    M = robe.init_weight(seed=0)
    T, B = 4, 9
    off = np.r_[0, np.cumsum(rng.integers(0, 4, T * B))].astype(np.int64)
    idx = rng.integers(-2**62, 2**62, off[-1])
    old = he.set_gpu_options(precompute_starts=pre)
    try:
        got = dev.bags(dev.put(idx), dev.put(M), dev.put(off), robe, T, "mean")
    finally:
        he.set_gpu_options(**old)
    dev.same(got, he.embedding_bags(idx, M, off, scheme=robe,
                                    num_tables=T, mode="mean"))


@pytest.mark.parametrize("fper,bper", [(1, 1), (2, 2), (4, 4), (8, 2), (16, 2)])
def test_every_lane_shape_equals_cpu(dev, fper, bper):
    """Forward at 1 .. 16 elements per lane (both kernel instantiations,
    several passes per bag where D > 32 * per) and backward at 1 .. 4, on
    schemes of one run, many runs and one element per run."""
    rng = np.random.default_rng(fper)
    old = GB.FORWARD_PER, GB.BACKWARD_PER
    GB.FORWARD_PER, GB.BACKWARD_PER = fper, bper
    try:
        for D, scheme in [(16, he.RobeZ(301, 16, block=16, seed=1)),
                          (24, he.RobeZ(301, 24, block=8, seed=2, signed=True)),
                          (16, he.RobeZ(301, 16, block=4, seed=5)),
                          (40, he.HashedNet(200, 40, seed=3)),
                          (5, he.FullTable([6, 4], 5)),
                          (600, he.RobeZ(1201, 600, block=100, seed=4))]:
            T, B = 2, 5
            x = rng.integers(0, 4, (B, T))
            off = np.r_[0, np.cumsum(rng.integers(0, 3, T * B))].astype(np.int64)
            idx = rng.integers(0, 4, off[-1])
            M = scheme.init_weight(seed=5)
            G = rng.standard_normal((B, T * D)).astype(np.float32)
            for mode in ("sum", "mean", "max"):
                dev.same(dev.bags(dev.put(x), dev.put(M), None, scheme, T, mode),
                         he.embedding_bags(x, M, scheme=scheme, num_tables=T, mode=mode))
                dev.same(dev.bags(dev.put(idx), dev.put(M), dev.put(off), scheme, T, mode),
                         he.embedding_bags(idx, M, off, scheme=scheme, num_tables=T, mode=mode))
            W = M.copy()
            he.embedding_bags_backward(G, idx, off, scheme=scheme, num_tables=T, weight=W,
                                       optimizer=he.SGD(0.5))
            Wd = dev.put(M)
            dev.bags_backward(dev.put(G), dev.put(idx), dev.put(off), scheme, T, weight=Wd,
                              optimizer=he.SGD(0.5), det=True)
            dev.same(Wd, W)
            if dev.be is not None:      # the starts a forward of this shape writes
                for X, o in ((x, None), (idx, off)):
                    _, saved = GB.forward(X, M, o, scheme, 0, T, "sum", None, True, None,
                                          be=dev.be, return_saved=True)
                    args = (G, X, o, scheme, 0, T, "sum", None, True, None, M, None, True)
                    np.testing.assert_array_equal(GB.backward(*args, be=dev.be, saved=saved),
                                                  GB.backward(*args, be=dev.be))
            Wd = dev.put(M)
            dev.bags_backward(dev.put(G), dev.put(idx), dev.put(off), scheme, T, weight=Wd,
                              optimizer=he.SGD(0.5), det=False)
            np.testing.assert_allclose(dev.get(Wd), W, rtol=1e-5, atol=1e-5)
    finally:
        GB.FORWARD_PER, GB.BACKWARD_PER = old


def test_lane_counts():
    assert [GB.lanes(16, p) for p in (1, 2, 4, 8, 16)] == [16, 8, 4, 2, 1]
    assert GB.lanes(600, 16) == 32 and GB.lanes(600, 1) == 32 and GB.lanes(5, 4) == 2
    assert [GB._forward_ept(p) for p in (1, 4, 5, 16)] == [4, 4, 16, 16]


def _lsh_schemes():
    X = np.random.default_rng(2).integers(0, 20, (100, 3))
    return [he.LSHTable.fit(X, size=301, dim=5, num_points=80, seed=1, block=1),
            he.LMA.fit(X, size=301, dim=10, num_points=80, seed=1, block=5)]


@pytest.mark.parametrize("kind", ["robe", "robe-signed", "robe-wide", "hnet", "hnet-ref",
                                  "robe-ref", "full", "lsh"])
def test_slots_and_signs_equal_cpu(dev, kind):
    rng = np.random.default_rng(0)
    schemes = _lsh_schemes() if kind == "lsh" else \
        [make_scheme(kind, d, seed) for d in (1, 4, 6) for seed in (0, 1)]
    for s in schemes:
        hi = 5 if kind in ("full", "robe-ref") else 25 if kind == "lsh" else 2**62
        lo = 0 if kind in ("full", "robe-ref", "lsh", "hnet-ref") else -2**62
        x = rng.integers(lo, hi, (4, 3))
        for dt in (np.int64, np.int32):
            if dt == np.int32 and kind not in ("full", "robe-ref", "lsh"):
                xx = x.astype(np.int64) % 2**31
            else:
                xx = x
            xx = xx.astype(dt)
            np.testing.assert_array_equal(dev.get(dev.slots(s, dev.put(xx), 1)), s.slots(xx, 1))
            np.testing.assert_array_equal(dev.get(dev.signs(s, dev.put(xx), 1)), s.signs(xx, 1))


def test_universal_hash_equals_cpu(dev):
    h = he.UniversalHash(seed=11)
    keys = np.array([0, 1, -1, 2**63 - 1, -2**63, 12345678901234], np.int64)
    for k in (keys, keys.view(np.uint64), np.array([0, -1, 7, 2**31 - 1], np.int32)):
        for m, table, block in [(1, 0, 0), (1000, 3, 7), (2**61 + 5, -1, 2**64 - 1)]:
            np.testing.assert_array_equal(dev.get(dev.uhash(h, dev.put(k), m, table, block)),
                                          h(k, m, table=table, block=block))
        np.testing.assert_array_equal(dev.get(dev.usign(h, dev.put(k), 5, 9)),
                                      h.sign(k, table=5, element=9))


def _same_error(fn_cpu, fn_dev, exc):
    """The CPU call and the device call raise ``exc`` with the same message."""
    with pytest.raises(exc) as a:
        fn_cpu()
    with pytest.raises(exc) as b:
        fn_dev()
    assert str(a.value) == str(b.value)


def test_errors_equal_cpu(dev):
    full = he.FullTable([5, 3], 4)
    W = full.init_weight()

    idx, off = np.array([1, 2, 3, 9, 0]), np.array([0, 2, 3, 3, 5])
    _same_error(lambda: he.embedding_bags(idx, W, off, scheme=full, num_tables=2),
         lambda: dev.bags(dev.put(idx), dev.put(W), dev.put(off), full, 2), IndexError)
    x = np.array([[1, 2], [4, 3]])
    _same_error(lambda: he.embedding_bags(x, W, scheme=full, num_tables=2),
         lambda: dev.bags(dev.put(x), dev.put(W), None, full, 2), IndexError)
    # ([0, 9, 2]: a value past the end, then a smaller one, named as past
    # the end; len(indices) is appended after it)
    for bad in ([1, 0, 2, 2], [0, 2, 1, 4], [0, 1, 2, 9], [0, 9, 2], [0, 9, 10, 2]):
        o = np.array(bad)
        _same_error(lambda: he.embedding_bag(idx[:4] % 3, W, o, scheme=full),
             lambda: dev.bag(dev.put(idx[:4] % 3), dev.put(W), dev.put(o), full), ValueError)
    for o in (np.array([0, 1, 2, 3, 7]), np.array([0, 7, 2, 3, 5])):
        _same_error(lambda: he.embedding_bag(idx % 3, W, o, scheme=full, include_last_offset=True),
             lambda: dev.bag(dev.put(idx % 3), dev.put(W), dev.put(o), full, last=True),
             ValueError)
    _same_error(lambda: full.slots(np.array([[0, 5]])),
         lambda: dev.slots(full, dev.put(np.array([[0, 5]]))), IndexError)
    Wp = np.zeros((6, 3), np.float32)
    _same_error(lambda: he.embedding(np.array([[0, 6]]), Wp),
         lambda: dev.embedding(dev.put(np.array([[0, 6]])), dev.put(Wp)), IndexError)


def test_edge_inputs_equal_cpu(dev):
    """One token, uint64 tokens, empty or float64-empty input, and offsets
    with several problems: the CPU's shapes, results and messages (each
    differed on the GPU launchers)."""
    robe, full = he.RobeZ(97, 4, block=2, seed=1), he.FullTable([9], 4)
    M, F = robe.init_weight(), full.init_weight()
    i3 = np.array([1, 2, 3])

    one = np.array(5)
    assert dev.get(dev.slots(robe, dev.put(one))).shape == (4,)
    np.testing.assert_array_equal(dev.get(dev.slots(robe, dev.put(one))), robe.slots(one))
    h = he.UniversalHash(seed=1)
    np.testing.assert_array_equal(dev.get(dev.uhash(h, dev.put(one), 10)), h(one, 10))
    W = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(dev.get(dev.embedding(dev.put(np.array(2)), dev.put(W))), W[2])
    np.testing.assert_array_equal(
        dev.get(dev.embedding_backward(dev.put(np.ones(3, np.float32)), dev.put(np.array(2)), 4)),
        he.embedding_backward(np.ones(3, np.float32), np.array(2), 4))
    _same_error(lambda: he.embedding_bag(one, M, scheme=robe),
         lambda: dev.bag(dev.put(one), dev.put(M), None, robe), ValueError)
    big = np.array([1, 2**63 + 5], np.uint64)
    _same_error(lambda: he.embedding_bag(big, F, np.array([0, 1]), scheme=full),
         lambda: dev.bag(dev.put(big), dev.put(F), dev.put(np.array([0, 1])), full), IndexError)
    _same_error(lambda: full.slots(big), lambda: dev.slots(full, dev.put(big)), IndexError)
    for x, o in ((i3, np.array([], np.int64)), (np.array([]), np.array([0]))):
        np.testing.assert_array_equal(
            dev.get(dev.bag(dev.put(x), dev.put(M), dev.put(o), robe)),
            he.embedding_bag(x, M, o, scheme=robe))
    for o, last in (([0, 7, 8], False), ([0, 7, 8, 9], False), ([0, 7, 8, 9], True)):
        o = np.array(o)
        _same_error(lambda: he.embedding_bag(i3, M, o, scheme=robe, include_last_offset=last),
             lambda: dev.bag(dev.put(i3), dev.put(M), dev.put(o), robe, last=last), ValueError)
    o = np.array([0, 2, 1, 3])
    _same_error(lambda: he.embedding_bags(i3, M, o, scheme=robe, num_tables=2),
         lambda: dev.bags(dev.put(i3), dev.put(M), dev.put(o), robe, 2), ValueError)
    o, w = np.array([0, 5]), np.ones(2, np.float32)
    _same_error(lambda: he.embedding_bag(i3, M, o, scheme=robe, per_sample_weights=w),
         lambda: dev.bag(dev.put(i3), dev.put(M), dev.put(o), robe, psw=dev.put(w)), ValueError)


def test_index_check_opt_out(dev):
    robe = he.RobeZ(100, 4)
    x, off = np.array([3, 4, 5]), np.array([0, 1, 3])
    old = he.set_gpu_options(check_indices=False)
    args = dev.put(x), dev.put(robe.init_weight()), dev.put(off)
    before = len(dev.be.launches) if dev.be else 0
    try:
        got = dev.bag(*args, robe)
    finally:
        he.set_gpu_options(**old)
    np.testing.assert_array_equal(dev.get(got), he.embedding_bag(x, robe.init_weight(), off,
                                                                 scheme=robe))
    if dev.be:      # (this call's launches only: the backend is shared)
        assert dev.be.launches[before:] and "bag_check<long long>" not in dev.be.launches[before:]


@pytest.mark.parametrize("det", [False, True])
def test_plain_lookups_equal_cpu(dev, det):
    rng = np.random.default_rng(4)
    sizes, dims = [7, 1, 300], [3, 16, 5]
    W = rng.standard_normal(sum(n * d for n, d in zip(sizes, dims))).astype(np.float32)
    x = np.stack([rng.integers(0, n, 50) for n in sizes], 1).astype(np.int32)
    np.testing.assert_array_equal(dev.get(dev.multi_embedding(dev.put(x), dev.put(W), sizes, dims)),
                                  he.multi_embedding(x, W, sizes, dims))
    g = rng.standard_normal((50, sum(dims))).astype(np.float32)
    got = dev.get(dev.multi_embedding_backward(dev.put(g), dev.put(x), sizes, dims, det))
    want = he.multi_embedding_backward(g, x, sizes, dims)
    if det:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    T = rng.standard_normal((9, 4))
    xi = rng.integers(0, 9, (5, 2, 3))
    np.testing.assert_array_equal(dev.get(dev.embedding(dev.put(xi), dev.put(T))),
                                  he.embedding(xi, T))
    gi = rng.standard_normal((5, 2, 3, 4))
    got = dev.get(dev.embedding_backward(dev.put(gi), dev.put(xi), 9, det))
    np.testing.assert_allclose(got, he.embedding_backward(gi, xi, 9), rtol=1e-12, atol=1e-12)


def test_plain_lookups_take_the_gpu_options_deterministic_default(dev):
    # the plain lookups' backward defaulted to False, so set_gpu_options'
    # deterministic never reached them (nor FastEmbedding on CUDA)
    rng = np.random.default_rng(5)
    x = rng.integers(0, 9, (40, 2))
    g = rng.standard_normal((40, 2, 4)).astype(np.float32)
    gm = rng.standard_normal((40, 5)).astype(np.float32)
    old = he.set_gpu_options(deterministic=True)
    try:
        before = len(dev.be.launches) if dev.be else 0
        got = dev.get(dev.embedding_backward(dev.put(g), dev.put(x), 9))
        got_m = dev.get(dev.multi_embedding_backward(dev.put(gm), dev.put(x), [9, 9], [2, 3]))
    finally:
        he.set_gpu_options(**old)
    np.testing.assert_array_equal(got, he.embedding_backward(g, x, 9))      # bitwise: sorted
    np.testing.assert_array_equal(got_m, he.multi_embedding_backward(gm, x, [9, 9], [2, 3]))
    if dev.be:
        assert dev.be.launches[before:].count("seg_apply<float>") == 2, dev.be.launches[before:]
    with pytest.raises(TypeError, match="deterministic"):
        he.embedding_backward(g, x, 9, deterministic="no")


def test_unpack_checks_cupy_weights_as_numpy_ones():
    # a strided CuPy weight's reshape copied (writes to the views were lost)
    # and an integer one passed
    class Stand(np.ndarray):        # what is_cupy takes for a CuPy array
        pass
    Stand.__module__ = "cupy"
    for wrap in (lambda a: a, lambda a: a.view(Stand)):
        with pytest.raises(ValueError, match="C-contiguous"):
            he.unpack(wrap(np.zeros((2, 4), np.float32)).T, [2], [4])
        with pytest.raises(TypeError, match="weight"):
            he.unpack(wrap(np.zeros(8, np.int64)), [2], [4])
        views = he.unpack(wrap(np.zeros((4, 2), np.float32)), [2], [4])
        assert [v.shape for v in views] == [(2, 4)]


def test_scheme_struct_cached_per_scheme_and_dropped_with_it():
    be = gpu_emu.emu_backend()
    robe = he.RobeZ(100, 4)
    a = RT.scheme_struct(be, robe)
    assert RT.scheme_struct(be, robe) is a
    key = id(robe)
    assert key in RT._SCHEMES
    del robe, a
    gc.collect()
    assert key not in RT._SCHEMES


def test_index_bounds_uploaded_once_per_scheme_and_tables():
    """The checked call's per-table bounds live on the device with the scheme
    (one upload, not one per call); other tables get their own, and the
    check still names the table and bound."""
    be = gpu_emu.emu_backend()
    full = he.FullTable([5, 7, 9], 2)
    a = RT.scheme_bounds(be, full, 0, 3)
    assert RT.scheme_bounds(be, full, 0, 3) is a
    np.testing.assert_array_equal(a, [5, 7, 9])
    np.testing.assert_array_equal(RT.scheme_bounds(be, full, 1, 2), [7, 9])
    from hashemb._gpu import bag as G
    W = full.init_weight(dtype=np.float64)
    X = np.array([[4, 6, 8], [0, 7, 1]])
    with pytest.raises(IndexError) as cpu:
        he.embedding_bags(X, W, scheme=full, num_tables=3)
    for _ in range(2):          # the second call reads the cached bounds
        with pytest.raises(IndexError) as gpu:
            G.forward(be.to_device(X), be.to_device(W), None, full, 0, 3, "sum", None, False,
                      None, be=be)
        assert str(gpu.value) == str(cpu.value) == \
            "indices[3]: expected 0 <= index < 7 (table 1), got 7"


# ------------------------------------------------------------ device only

def test_device_64bit_index_arithmetic():
    """Slots and output positions past 2^31 floats (16 GiB table)."""
    cp = gpu_emu.cupy_or_skip()
    if cp.cuda.Device().mem_info[0] < 24 * 2**30:
        pytest.skip("needs 24 GiB free device memory")
    rows, D = 2**27 + 5, 32
    full = he.FullTable(rows, D)
    W = cp.zeros((rows, D), cp.float32)
    x = np.array([0, rows - 1, 2**26 + 3], np.int64)
    W[cp.asarray(x)] = cp.arange(3 * D, dtype=cp.float32).reshape(3, D)
    out = he.embedding_bag(cp.asarray(x), W, cp.asarray(np.arange(3)), scheme=full)
    np.testing.assert_array_equal(cp.asnumpy(out), np.arange(3 * D, dtype=np.float32).reshape(3, D))
    g = he.embedding_bag_backward(cp.ones((3, D), cp.float32), cp.asarray(x),
                                  cp.asarray(np.arange(3)), scheme=full)
    assert float(g[rows - 1].sum()) == D
    del W, g


def test_device_theory_sketches_equal_the_cpus():
    """CuPy in, CuPy out; the sums by cupy.bincount's atomics: to rounding."""
    cp = gpu_emu.cupy_or_skip()
    from hashemb import theory
    x = np.random.default_rng(1).standard_normal(300)
    for call in (lambda v: theory.sketch(v, 64, block=4, seed=3),
                 lambda v: theory.sketch(v, 64, block=4, seed=3, signs="linear"),
                 lambda v: theory.inner_product_estimates(v, v[::-1].copy(), 64, block=4,
                                                          seeds=4),
                 lambda v: theory.embedding_inner_product_estimates(v, 0, 3, 64, dim=6,
                                                                    block=3, seeds=[1, 2])):
        got = call(cp.asarray(x))
        assert isinstance(got, cp.ndarray)
        np.testing.assert_allclose(cp.asnumpy(got), call(x), rtol=1e-12, atol=1e-12)


def test_device_torch_bag_function_on_cuda_tensors():
    torch = gpu_emu.torch_cuda()
    from hashemb.torch._function import BagFunction, Lookup
    robe = he.RobeZ(1001, 8, block=4, seed=2)
    M = robe.init_weight(seed=1)
    x = np.random.default_rng(0).integers(0, 2**40, 12)
    off = np.array([0, 3, 3, 8, 12])
    lk = Lookup(robe, 2, mode="mean")
    wc = torch.tensor(M, requires_grad=True)
    wg = torch.tensor(M, device="cuda", requires_grad=True)
    oc = BagFunction.apply(wc, torch.tensor(x), torch.tensor(off), None, lk)
    og = BagFunction.apply(wg, torch.tensor(x, device="cuda"), torch.tensor(off, device="cuda"),
                           None, lk)
    assert og.is_cuda
    np.testing.assert_array_equal(og.cpu().detach().numpy(), oc.detach().numpy())
    (oc * oc).sum().backward()
    (og * og).sum().backward()
    np.testing.assert_allclose(wg.grad.cpu().numpy(), wc.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_device_torch_16bit_modules_on_cuda_tensors(dtype):
    """A torch module of 16-bit storage on CUDA: the CPU module's forward,
    and its fused SGD step's bits (deterministic backward); bfloat16 needs
    CuPy 14 with ml_dtypes (skips on an older CuPy)."""
    torch = gpu_emu.torch_cuda()
    from hashemb.torch import RobeEmbeddingBagCollection
    tdtype = getattr(torch, dtype)
    x = torch.randint(0, 1000, (64, 4))
    mods = [RobeEmbeddingBagCollection([1000] * 4, 16, compression=10, optimizer=he.SGD(0.1),
                                       dtype=tdtype) for _ in range(2)]
    mods[1].cuda()
    old = he.set_gpu_options(deterministic=True)
    try:
        try:
            og = mods[1](x.cuda())
        except TypeError as e:
            if dtype == "bfloat16" and "CuPy 14" in str(e):
                pytest.skip(str(e))
            raise
        oc = mods[0](x)
        np.testing.assert_array_equal(og.detach().cpu().numpy(), oc.detach().numpy())
        oc.square().sum().backward()
        og.square().sum().backward()
    finally:
        he.set_gpu_options(**old)
    assert torch.equal(mods[1].weight.detach().cpu().view(torch.int16),
                       mods[0].weight.detach().view(torch.int16))


@pytest.mark.parametrize("pre", [None, True])
def test_saved_run_starts_on_the_device_equal_the_host(pre):
    """return_saved on the device keeps the run starts (the host's values
    exactly): written by the forward kernel as it hashes, in its one launch
    (default), or by bag_starts (precompute_starts=True); backward given
    them skips that launch and gives the same gradient; a host saved is a
    TypeError there."""
    be = gpu_emu.emu_backend()
    from hashemb._gpu import bag as G
    robe = he.RobeZ(5003, 16, block=4)
    rng = np.random.default_rng(1)
    X = rng.integers(0, 10**6, (40, 3))
    W = robe.init_weight(dtype=np.float64)
    g = rng.standard_normal((40, 48))
    out_h, saved_h = he.embedding_bags(X, W, scheme=robe, num_tables=3, return_saved=True)
    old = he.set_gpu_options(precompute_starts=pre)
    try:
        be.launches.clear()
        out_d, saved_d = G.forward(be.to_device(X), be.to_device(W), None, robe, 0, 3, "sum",
                                   None, True, None, be=be, return_saved=True)
        assert len(be.launches) == (1 if pre is None else 2), be.launches
    finally:
        he.set_gpu_options(**old)
    np.testing.assert_array_equal(out_d, out_h)
    assert saved_d.device and not saved_h.device
    # the host keeps feature-major entries, the device row-major (B, T) ones
    np.testing.assert_array_equal(
        saved_d.starts.reshape(40, 3, 4).transpose(1, 0, 2).reshape(-1), saved_h.starts)
    args = (be.to_device(g), be.to_device(X), None, robe, 0, 3, "sum", None, True, None, None,
            None)
    be.launches.clear()
    with_saved = G.backward(*args, be=be, saved=saved_d)
    assert "bag_starts" not in " ".join(be.launches)
    np.testing.assert_array_equal(with_saved, G.backward(*args, be=be))
    with pytest.raises(TypeError, match="forward on the device"):
        G.backward(*args, be=be, saved=saved_h)


@functools.lru_cache(maxsize=None)
def _lsh_for(D):
    """SCMA and LMA schemes of width D, one run a row (fitted once per D)."""
    X = np.random.default_rng(2).integers(0, 20, (100, 3))
    return (he.LSHTable.fit(X, size=301, dim=D, num_points=80, seed=1, block=D),
            he.LMA.fit(X, size=301, dim=D, num_points=80, seed=1, block=D))


@st.composite
def _one_entry_bags(draw):
    """2-D one-entry batches for the warp kernels: every kind of scheme (run
    starts kept, or row state: signed, many runs), widths around and past a
    warp, partial warps, padding, weights, all modes, both index and float
    types."""
    kind = draw(st.sampled_from(["robe", "robe-wide", "robe-ref", "full", "lsh", "hnet-small",
                                 "robe-signed", "hnet", "hnet-ref"]))
    D = draw(st.sampled_from([1, 3, 4, 8, 16, 24, 40, 64]))
    seed = draw(st.integers(0, 9))
    T = draw(st.integers(1, 4))
    if kind == "robe":
        scheme = he.RobeZ(601, D, block=D // draw(st.sampled_from(
            [r for r in (1, 2, 4) if D % r == 0])), seed=seed, wrap=seed % 2 == 0)
    elif kind == "robe-wide":
        scheme = he.RobeZ(577, D, block=2 * D, seed=seed)
    elif kind == "robe-ref":
        scheme = he.RobeZ.reference(701, D, block=D, table_sizes=[50] * 4)
    elif kind == "full":
        scheme = he.FullTable([50, 7, 30, 9], D)
    elif kind == "lsh":
        scheme = _lsh_for(D)[seed % 2]
        T = min(T, 3)
    elif kind == "hnet-small":
        scheme = he.HashedNet(97, min(D, 4), seed=seed)
    elif kind == "robe-signed":         # GEN: row state kept, signs per element
        scheme = he.RobeZ(613, D, block=D // draw(st.sampled_from(
            [r for r in (1, 2, 8) if D % r == 0])), seed=seed, signed=True)
    elif kind == "hnet":                # GEN: D runs of one float
        scheme = he.HashedNet(89, D, seed=seed, signed=seed % 2 == 0)
    else:
        scheme = he.HashedNet.reference(91, D)
    B = draw(st.integers(0, 70))
    hi = 7 if kind in ("full", "robe-ref", "lsh") else 1 << 40
    X = np.random.default_rng(seed).integers(0, hi, (B, T))
    if draw(st.booleans()):
        X = X.astype(np.int32) if hi < 1 << 31 else X
    mode = draw(st.sampled_from(["sum", "mean", "max"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    psw = None
    if mode == "sum" and draw(st.booleans()):
        psw = np.random.default_rng(seed + 1).uniform(-2, 2, (B, T)).astype(dtype)
    pad = int(X[0, 0]) if T == 1 and B and draw(st.booleans()) else None
    return scheme, X, mode, dtype, psw, pad


@FIXTURE
@given(b=_one_entry_bags(), pre=st.sampled_from([None, True]), keep=st.booleans(),
       opt=st.sampled_from([None, "sgd", "adagrad"]), flat=st.booleans())
def test_one_entry_rows_kernel_equals_cpu(dev, b, pre, keep, opt, flat):
    """The one-entry warp kernels (a warp per 32 bags of one entry: 2-D
    input, or flat feature-major indices with offsets of one entry a bag)
    give the CPU's output bit for bit, keep the host's run starts, and give
    the CPU's gradient or fused step to rounding (the order of their atomic
    adds is another)."""
    scheme, X, mode, dtype, psw, pad = b
    be = dev.be or RT.backend()
    B, T = X.shape
    D = scheme.dim
    M = np.random.default_rng(3).standard_normal(scheme.size).astype(dtype)
    if flat:        # the FBGEMM layout: bag (t, b) is entry t*B + b
        idx, off = np.ascontiguousarray(X.T).reshape(-1), np.arange(B * T + 1)
        psw = None if psw is None else np.ascontiguousarray(psw.T).reshape(-1)
    else:
        idx, off = X, None

    def cpu(backward=False, **kw):
        kw.update(mode=mode, per_sample_weights=psw, scheme=scheme)
        if T == 1:
            fn = he.embedding_bag_backward if backward else he.embedding_bag
            return fn(*kw.pop("g", ()), idx, *(() if backward else (kw.pop("w"),)), off,
                      padding_idx=pad, include_last_offset=True, **kw)
        fn = he.embedding_bags_backward if backward else he.embedding_bags
        return fn(*kw.pop("g", ()), idx, *(() if backward else (kw.pop("w"),)), off,
                  num_tables=T, **kw)
    want = cpu(w=M, return_saved=keep)
    old = he.set_gpu_options(precompute_starts=pre)
    try:
        if dev.be:
            be.launches.clear()
        got = GB.forward(dev.put(idx), dev.put(M), dev.put(off), scheme, 0, T, mode,
                         dev.put(psw), True, pad, be=be, return_saved=keep)
    finally:
        he.set_gpu_options(**old)
    if keep:
        (got, saved), (want, saved_h) = got, want
    dev.same(got, want)
    assert got.shape == (B, T * D)
    if B and dev.be:
        assert any(k.startswith("bag_forward_rows") for k in be.launches), be.launches
    if keep and saved_h.starts is not None and saved.starts is not None and B:
        # the device keeps every entry's starts (a padding entry's are never
        # read); the CPU drops padding first and keeps the live entries'
        R = D // scheme._run
        live = np.repeat((X.T != pad).reshape(-1), R)
        kept = dev.get(saved.starts)
        if not flat:                 # the device keeps 2-D input's entries in its order
            kept = kept.reshape(B, T, R).transpose(1, 0, 2).reshape(-1)
        np.testing.assert_array_equal(kept[live], saved_h.starts)
    G = np.random.default_rng(4).standard_normal((B, T * D)).astype(dtype)
    if opt is None:
        gw = cpu(backward=True, g=(G,), weight=M)
    else:                           # the same step on both
        make = (lambda: he.SGD(0.1)) if opt == "sgd" else (lambda: he.Adagrad(0.1))
        Mh = M.copy()
        cpu(backward=True, g=(G,), weight=Mh, optimizer=make())
    if dev.be:
        be.launches.clear()
    Md = dev.put(M)
    gg = GB.backward(dev.put(G), dev.put(idx), dev.put(off), scheme, 0, T, mode, dev.put(psw),
                     True, pad, Md, None if opt is None else make(), False, be=be,
                     saved=saved if keep else None)
    if opt is None:
        np.testing.assert_allclose(dev.get(gg), gw, **tol(dtype))
    else:
        assert gg is None
        np.testing.assert_allclose(dev.get(Md), Mh, **tol(dtype))
    if B and dev.be:        # (a full table's Adagrad may sum per row instead: seg_rows)
        assert any(k.startswith(("bag_backward_rows", "seg_rows")) for k in be.launches), \
            be.launches


@pytest.mark.parametrize("chunk", [1, 2, 8])
def test_rows_kernels_at_every_chunk_equal_cpu(dev, chunk, monkeypatch):
    """gpu_profile's sweep of the rows kernels' loads in flight (ROWS_CHUNK):
    partial warps and chunks, padding, weights and both run-start sources
    give the CPU's forward bit for bit and its SGD step to rounding."""
    monkeypatch.setattr(GB, "ROWS_CHUNK", chunk)
    be = dev.be or RT.backend()
    rng = np.random.default_rng(chunk)
    for scheme, B, T, pad in ((he.RobeZ(601, 16, block=16, seed=1), 45, 1, True),
                              (he.RobeZ(577, 24, block=8, seed=2), 70, 3, False),
                              (he.RobeZ(613, 3, block=3, seed=3), 33, 2, False)):
        X = rng.integers(0, 1 << 40, (B, T))
        if pad:
            X[::3, 0] = X[0, 0]
        padding = int(X[0, 0]) if pad else None
        psw = rng.uniform(-2, 2, (B, T)).astype(np.float32)
        M = rng.standard_normal(scheme.size).astype(np.float32)
        G = rng.standard_normal((B, T * scheme.dim)).astype(np.float32)
        for pre in (None, True):
            old = he.set_gpu_options(precompute_starts=pre)
            try:
                if dev.be:
                    be.launches.clear()
                got = GB.forward(dev.put(X), dev.put(M), None, scheme, 0, T, "sum",
                                 dev.put(psw), True, padding, be=be)
                Md = dev.put(M)
                GB.backward(dev.put(G), dev.put(X), None, scheme, 0, T, "sum", dev.put(psw),
                            True, padding, Md, he.SGD(0.1), False, be=be)
            finally:
                he.set_gpu_options(**old)
            kw = dict(scheme=scheme, per_sample_weights=psw)
            if T == 1:
                want = he.embedding_bag(X, M, padding_idx=padding, **kw)
                Mh = M.copy()
                he.embedding_bag_backward(G, X, padding_idx=padding, weight=Mh,
                                          optimizer=he.SGD(0.1), **kw)
            else:
                want = he.embedding_bags(X, M, num_tables=T, **kw)
                Mh = M.copy()
                he.embedding_bags_backward(G, X, num_tables=T, weight=Mh,
                                           optimizer=he.SGD(0.1), **kw)
            dev.same(got, want)
            np.testing.assert_allclose(dev.get(Md), Mh, **tol(np.float32))
            if dev.be:
                assert f"bag_forward_rows<float, long long, {'true' if pre else 'false'}, " \
                       f"false, {chunk}>" in be.launches, be.launches
                assert any(k.startswith("bag_backward_rows") and k.endswith(f", {chunk}>")
                           for k in be.launches), be.launches


@pytest.mark.parametrize("fmt", FORMATS)
@FIXTURE
@given(b=_one_entry_bags(), opt=st.sampled_from([None, "sgd", "adagrad"]), flat=st.booleans())
def test_half_one_entry_rows_equal_cpu(dev, fmt, b, opt, flat):
    """16-bit storage through the one-entry warp kernels (2-D input, or
    offsets of one entry a bag): forward bit for bit, gradient and fused
    steps as the general kernels'."""
    scheme, X, mode, dtype, psw, pad = b
    be = dev.be or RT.backend()
    B, T = X.shape
    H = np.random.default_rng(3).standard_normal(scheme.size).astype(np.float32).astype(fmt.dtype)
    Hd = _put16(dev, H)
    psw = None if psw is None else psw.astype(np.float32)
    if flat:
        idx, off = np.ascontiguousarray(X.T).reshape(-1), np.arange(B * T + 1)
        psw = None if psw is None else np.ascontiguousarray(psw.T).reshape(-1)
    else:
        idx, off = X, None
    kw = dict(scheme=scheme, num_tables=T, mode=mode, per_sample_weights=psw)
    if T == 1 and pad is not None:
        kw = dict(scheme=scheme, mode=mode, per_sample_weights=psw, padding_idx=pad,
                  include_last_offset=True)
    fwd = he.embedding_bags if "num_tables" in kw else he.embedding_bag
    bwd = he.embedding_bags_backward if "num_tables" in kw else he.embedding_bag_backward
    want = fwd(idx, H, off, **kw)
    if dev.be:
        be.launches.clear()
    got = GB.forward(dev.put(idx), Hd, dev.put(off), scheme, 0, T, mode, dev.put(psw),
                     True, pad if T == 1 else None, be=be)
    dev.same(got, want)
    if B and dev.be:
        assert any(k.startswith("bag_forward_rows") and GB.storage_arg(H.dtype)[2:] in k
                   for k in be.launches), be.launches
    G = np.random.default_rng(4).standard_normal((B, T * scheme.dim)).astype(np.float32)
    make = {None: lambda: None, "sgd": lambda: he.SGD(0.1, seed=9),
            "adagrad": lambda: he.Adagrad(0.1, seed=9)}[opt]
    Hh = H.copy()
    gw = bwd(G, idx, off, weight=Hh, optimizer=make(), **kw)
    gg = GB.backward(dev.put(G), dev.put(idx), dev.put(off), scheme, 0, T, mode, dev.put(psw),
                     True, pad if T == 1 else None, Hd, make(), False, be=be)
    if opt is None:
        np.testing.assert_allclose(dev.get(gg), gw, **tol(np.float32))
    else:
        _same_half(dev, Hd, Hh, False)


def test_warp_kernels_fit_the_launch_block():
    """common.cuh's warp kernels keep per-warp shared memory for at most
    HE_BLOCK_WARPS warps of a block: the launch block must not exceed it."""
    text = open(os.path.join(ROOT, "hashemb", "_gpu", "common.cuh")).read()
    warps = int(re.search(r"#define HE_BLOCK_WARPS (\d+)", text).group(1))
    assert RT.CupyBackend.block <= 32 * warps and RT.CupyBackend.block % 32 == 0
    assert gpu_emu.EmuBackend.block % 32 == 0
    rows = open(os.path.join(ROOT, "hashemb", "_gpu", "bag.cu")).read()
    assert int(re.search(r"#define HE_ROW_RUNS (\d+)", rows).group(1)) == GB.ROW_RUNS


def test_rows_kernel_takes_only_what_it_can():
    """One-entry 2-D bags take the warp kernels (row state kept for signed
    schemes and HashedNet's many runs); offsets input and several entries
    per bag stay on bag_forward."""
    be = gpu_emu.emu_backend()
    X = np.arange(12).reshape(4, 3)
    for scheme, X_, T, rows in [(he.RobeZ(99, 8, block=8), X, 3, "false, 4>"),
                                (he.RobeZ(99, 8, block=8, signed=True), X, 3, "true, 4>"),
                                (he.HashedNet(99, 8), X, 3, "true, 4>"),
                                (he.RobeZ(99, 8, block=8), X, 1, None),       # (B, 3): 3 a bag
                                (he.RobeZ(99, 8, block=8), X[:, :1], 1, "false, 4>")]:
        be.launches.clear()
        GB.forward(X_, scheme.init_weight(), None, scheme, 0, T, "sum", None, True, None, be=be)
        got = [k for k in be.launches if k.startswith("bag_forward_rows")]
        assert (got[0].endswith(rows) if rows else not got), (scheme, be.launches)
    robe = he.RobeZ(99, 8, block=8)
    for off, rows in [(np.arange(4), True),                # one entry a bag: the check says so
                      (np.array([0, 2, 3, 3]), False)]:    # two, one, none
        for check in (True, False):                         # no check: no knowing
            be.launches.clear()
            he.set_gpu_options(check_indices=check)
            try:
                GB.forward(np.arange(4), robe.init_weight(), off, robe, 0, 1, "sum", None, False,
                           None, be=be)
            finally:
                he.set_gpu_options(check_indices=True)
            assert any(k.startswith("bag_forward_rows") for k in be.launches) == \
                (rows and check), (off, check, be.launches)
    # a backward not given the starts hashes in its warp kernel: one launch
    be.launches.clear()
    GB.backward(np.ones((4, 24), np.float32), X, None, robe, 0, 3, "sum", None, True, None,
                robe.init_weight(), he.SGD(0.1), be=be)
    assert be.launches == ["bag_backward_rows<float, long long, false, false, 4>"], be.launches
    # the deterministic pairs still read starts precomputed once per entry
    be.launches.clear()
    GB.backward(np.ones((4, 24), np.float32), X, None, robe, 0, 3, "sum", None, True, None,
                robe.init_weight(), None, True, be=be)
    assert be.launches[0].startswith("bag_starts") and \
        not any("rows" in k for k in be.launches), be.launches


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_backward_given_forward_starts_equals_backward_alone(mode):
    """Offsets that skip entries, padding, several runs per row: the starts
    a forward wrote as it hashed serve every entry the backward reads."""
    be = gpu_emu.emu_backend()
    rng = np.random.default_rng(7)
    robe = he.RobeZ(997, 12, block=3, seed=2)
    T, B = 3, 6
    off = np.r_[0, np.cumsum(rng.integers(0, 4, T * B))].astype(np.int64)
    idx = rng.integers(0, 6, off[-1] + 2)      # two entries past the last bag
    pad = int(idx[0])
    M = robe.init_weight(seed=1)
    G_ = rng.standard_normal((B, T * 12)).astype(np.float32)
    out, saved = GB.forward(idx, M, off, robe, 0, T, mode, None, True, pad, be=be,
                            return_saved=True)
    assert saved.starts is not None
    for det in (True, False):
        args = (G_, idx, off, robe, 0, T, mode, None, True, pad, M.copy(), None, det)
        np.testing.assert_array_equal(GB.backward(*args, be=be, saved=saved),
                                      GB.backward(*args, be=be))


@pytest.mark.parametrize("where", ["cpu", "emulator"])
def test_saved_of_other_offsets_stays_in_bounds(where):
    """A saved from a forward whose bags covered fewer entries (a misuse:
    other inputs of the same sizes) gives a wrong gradient, but every
    contribution still lands inside the array: the gradient's total is the
    correct one's, and nothing is written out of bounds."""
    rng = np.random.default_rng(3)
    robe = he.RobeZ(997, 8, block=4, seed=1)
    T, B, n = 2, 4, 20
    idx = rng.integers(0, 50, n)
    off_f = np.r_[0, np.sort(rng.integers(0, 6, T * B - 1)), 6].astype(np.int64)
    off_b = np.linspace(0, n, T * B + 1).astype(np.int64)
    M = robe.init_weight(seed=2)
    G_ = rng.standard_normal((B, T * 8)).astype(np.float32)
    if where == "cpu":
        _, saved = he.embedding_bags(idx, M, off_f, scheme=robe, num_tables=T, return_saved=True)
        got = he.embedding_bags_backward(G_, idx, off_b, scheme=robe, num_tables=T, weight=M,
                                         saved=saved)
    else:
        be = gpu_emu.emu_backend()
        _, saved = GB.forward(idx, M, off_f, robe, 0, T, "sum", None, True, None, be=be,
                              return_saved=True)
        saved.starts[:] = np.uint64(1 << 63)        # what an unwritten entry may hold
        got = GB.backward(G_, idx, off_b, robe, 0, T, "sum", None, True, None, M, None,
                          True, be=be, saved=saved)
    want = he.embedding_bags_backward(G_, idx, off_b, scheme=robe, num_tables=T, weight=M)
    assert got.shape == want.shape
    np.testing.assert_allclose(got.sum(dtype=np.float64), want.sum(dtype=np.float64),
                               rtol=1e-5)


def test_device_torch_fast_embeddings_on_cuda():
    """FastEmbedding / FastMultiEmbedding moved to CUDA: the plain-lookup
    kernels through DLPack, equal to the same modules on the CPU (forward
    exactly, gradients to atomic-add tolerance), int32 and int64 indices."""
    torch = gpu_emu.torch_cuda()
    from hashemb.torch import FastEmbedding, FastMultiEmbedding
    g = torch.Generator().manual_seed(0)
    for itype in (torch.int32, torch.int64):
        cpu = FastEmbedding(50, 12)
        gpu = FastEmbedding(50, 12, _weight=cpu.weight.detach().clone()).cuda()
        x = torch.randint(0, 50, (7, 30), generator=g).to(itype)
        up = torch.randn(7, 30, 12, generator=g)
        a, b = cpu(x), gpu(x.cuda())
        assert b.is_cuda
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=0)
        (a * up).sum().backward()
        (b * up.cuda()).sum().backward()
        torch.testing.assert_close(gpu.weight.grad.cpu(), cpu.weight.grad, rtol=1e-5, atol=1e-5)
    sizes, dims = [10, 3, 50, 7], [1, 4, 7, 32]
    cpu = FastMultiEmbedding(sizes, dims)
    gpu = FastMultiEmbedding(sizes, dims, _weight=cpu.weight.detach().clone()).cuda()
    x = torch.stack([torch.randint(0, n, (257,), generator=g) for n in sizes], dim=1)
    a, b = cpu(x), gpu(x.cuda())
    torch.testing.assert_close(b.cpu(), a, rtol=0, atol=0)
    up = torch.randn(a.shape, generator=g)
    (a * up).sum().backward()
    (b * up.cuda()).sum().backward()
    torch.testing.assert_close(gpu.weight.grad.cpu(), cpu.weight.grad, rtol=1e-5, atol=1e-5)


def test_index_helpers_past_32_bits():
    """common.cuh's he_div (32-bit division where both operands fit, 64-bit
    otherwise) and he_bag_of_thread (shift and mask by a power-of-two lane
    count) against Python, on both sides of 2^32: no batch in the other tests
    reaches 2^32 bags."""
    import ctypes
    lib = gpu_emu.build_or_skip()
    div, bag = lib.emu_he_div, lib.emu_he_bag_of_thread
    div.restype = bag.restype = ctypes.c_longlong
    div.argtypes = [ctypes.c_longlong, ctypes.c_longlong]
    bag.argtypes = [ctypes.c_longlong, ctypes.c_longlong, ctypes.POINTER(ctypes.c_longlong)]
    rng = np.random.default_rng(0)
    edges = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 3, 2**62]
    ns = edges + [int(v) for v in rng.integers(0, 2**63 - 1, 200)]
    ds = [1, 2, 3, 26, 16384, 2**31, 2**32 - 1, 2**32, 2**33 + 7, 2**62]
    for n in ns:
        for d in ds:
            assert div(n, d) == n // d, (n, d)
    lane = ctypes.c_longlong()
    for g in ns:
        for W in (1, 2, 4, 8, 16, 32):
            assert bag(g, W, ctypes.byref(lane)) == g // W and lane.value == g % W, (g, W)



def test_fuzz_launchers_on_the_emulator_never_crash():
    """The GPU launchers (bags forward and backward with SGD / Adagrad /
    row-wise Adagrad, atomic and deterministic, on sized (a small and a
    large full table), hashed and reference schemes;
    TT bags; plain lookups) on malformed indices, offsets and padding, run
    on the host emulator (tests/fuzzing.py)."""
    gpu_emu.build_or_skip()
    fuzzing.run("""
        import sys
        import numpy as np
        sys.path.insert(0, TESTS)
        import gpu_emu, hashemb as he
        from hashemb._gpu import bag as GB, tt as GT, embed as GE
        from hashemb import lookup as LK
        be = gpu_emu.EmuBackend(gpu_emu.build())
        rng = np.random.default_rng(1)
        full = he.FullTable([5, 7], 4)
        big = he.FullTable([5000, 7000], 4)       # steps summed per row (seg_rows)
        robe = he.RobeZ(64, 4, block=2)
        ref = he.RobeZ.reference(60, 4, 4)
        cores = he.tt_init(100, [10, 10], [2, 2], [3])
        Wt = rng.standard_normal((50, 8)).astype(np.float32)
        for it in range(600):
            n = int(rng.integers(0, 9))
            idx = rng.integers(-3, 12, n) if it % 2 else rng.integers(-2**62, 2**62, n)
            if it % 4 == 3 and np.abs(idx).max(initial=0) < 2**31:
                idx = idx.astype(np.int32)
            off = np.sort(rng.integers(-2, n + 3, int(rng.integers(0, 6))))
            if it % 5 == 0:
                off = off[::-1].copy()
            if it % 7 == 0:
                off = None
            T = 1 + it % 2
            B = max(((len(off) if off is not None else n) - (T == 2)) // T, 1)
            G = np.ones((B, T * 4), np.float32)
            mode = ["sum", "mean", "max"][it % 3]
            pad = [None, 3, -1][it % 3] if T == 1 else None
            last = bool(it % 2)
            for s in (full, big, robe, ref):
                w = s.init_weight()
                attempt(lambda: GB.forward(idx, w, off, s, 0, T, mode, None, last, pad, be=be))
                for det in (False, True):
                    for opt in (he.SGD(0.1), he.Adagrad(0.1), he.RowwiseAdagrad(0.1)):
                        attempt(lambda: GB.backward(G, idx, off, s, 0, T, mode, None, last, pad,
                                                    w.copy(), opt, det, be=be))
            attempt(lambda: GT.bags(idx, [cores], off, single=True, be=be))
            attempt(lambda: GT.bags_backward(np.ones((B, 4), np.float32), idx, [cores], off,
                                             single=True, optimizer=he.SGD(0.1), be=be))
            attempt(lambda: GE.gather(idx, Wt, LK._layout(50, 8), True, be=be))
    """.replace("TESTS", repr(os.path.join(ROOT, "tests"))))


def test_scheme_cache_survives_a_scheme_freed_under_its_lock():
    """A cached scheme freed while the cache's lock is held (inside make(),
    or by a garbage collection an allocation there starts) drops its entry
    on the same thread: a plain lock deadlocked there, once, in the suite."""
    import threading

    class Be:
        key = "test"

        def current_device(self):
            return 0

    box = [he.RobeZ(100, 4, seed=1)]
    RT._cached(Be(), box[0], "x", lambda: 1)

    def make():
        box.clear()                 # the last reference: its weakref callback runs here
        return 2

    scheme, done = he.RobeZ(100, 4, seed=2), []
    th = threading.Thread(target=lambda: done.append(RT._cached(Be(), scheme, "x", make)),
                          daemon=True)
    th.start()
    th.join(10)
    assert done == [2], "the scheme cache deadlocked on its own lock"
    assert not any(e[0]() is None for e in RT._SCHEMES.values())


def test_pickled_hash_leaves_its_device_coefficients_behind():
    """A UniversalHash used on the GPU keeps its coefficients' device copies
    on itself; pickling them made unpickling need CuPy and that device."""
    import pickle
    be = gpu_emu.emu_backend()
    h = he.UniversalHash(5)
    keys = np.arange(10, dtype=np.int64)
    want = GS.universal_hash(h, keys, 97, be=be)
    assert h.__dict__["_gpu_coef"]
    h2 = pickle.loads(pickle.dumps(h))
    assert "_gpu_coef" not in h2.__dict__ and h2.seed == 5
    np.testing.assert_array_equal(GS.universal_hash(h2, keys, 97, be=be), want)
    np.testing.assert_array_equal(h2(keys, 97), want)


@pytest.fixture
def public_emu(monkeypatch):
    """The public functions' GPU branch on the emulator: (put, get)."""
    monkeypatch.setattr(RT, "_backend", gpu_emu.emu_backend())
    return (gpu_emu.stand,
            lambda a: np.asarray(a).view(np.ndarray))


def test_theory_sketches_take_the_gpu_kernels(public_emu, monkeypatch):
    """theory.sketch and the two estimators on a device table: the rows it
    hashes are device arrays (here the emulator's, through the array module
    theory picks), so the scheme's and UniversalHash's GPU kernels make the
    slots and signs; the sums equal the CPU's (the emulator's bincount is
    NumPy's, so bit for bit)."""
    import types

    from hashemb import theory
    put, get = public_emu
    fake = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("_")})
    fake.arange = lambda *a, **k: put(np.arange(*a, **k))      # device rows
    launches = RT._backend.launches
    x = np.random.default_rng(1).standard_normal(70)
    y = x + np.random.default_rng(2).standard_normal(70)
    want = [theory.sketch(x, 16, block=4, seed=3),
            theory.sketch(x, 16, block=4, seed=3, signs="linear"),
            theory.sketch(x, 17, block=14, dim=7, seed=4, signed=False),
            theory.inner_product_estimates(x, y, 16, block=4, seeds=3),
            theory.embedding_inner_product_estimates(x, 0, 3, 16, dim=7, block=7, seeds=[5, 6])]
    monkeypatch.setattr(theory, "array_module", lambda *a: fake)
    got = [theory.sketch(x, 16, block=4, seed=3),
           theory.sketch(x, 16, block=4, seed=3, signs="linear"),
           theory.sketch(x, 17, block=14, dim=7, seed=4, signed=False),
           theory.inner_product_estimates(x, y, 16, block=4, seeds=3),
           theory.embedding_inner_product_estimates(x, 0, 3, 16, dim=7, block=7, seeds=[5, 6])]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(get(g), w)
    assert {"scheme_slots", "scheme_signs", "universal_hash"} <= {n.split("<")[0] for n in launches}


def _same_public_error(call, put):
    """The GPU branch raises what the CPU raises: type and message."""
    with pytest.raises(Exception) as want:
        call(lambda a: a)
    with pytest.raises(Exception) as got:
        call(put)
    msg = re.sub(r"\b(numpy|cupy)\.(ndarray|Stand) of", "array of", str(got.value))
    assert (type(got.value), msg) == (type(want.value), str(want.value))


def test_sums_of_negative_zeros_are_positive_zero_as_on_the_cpu(public_emu):
    """The CPU's sums start from +0 (a lone unweighted entry is copied): the
    device's started from the first term, so a bag of -0 terms (a zero table
    and negative weights) was -0 there and +0 here."""
    put, get = public_emu
    robe = he.RobeZ(64, 4, block=4)
    for rows in (True, False):
        GB_rows = GB.ROWS
        GB.ROWS = rows
        try:
            for M in (np.full(64, -0.0, np.float32), np.full(64, -0.0, np.float64)):
                for x, off, mode, psw in ((np.array([1, 2]), np.array([0]), "sum", None),
                                          (np.array([1, 2]), np.array([0]), "mean", None),
                                          (np.array([1]), np.array([0]), "sum",
                                           np.ones(1, M.dtype)),
                                          (np.array([1]), np.array([0]), "sum", None),
                                          (np.array([1, 2]), np.array([0, 1]), "sum",
                                           -np.ones(2, M.dtype))):
                    want = he.embedding_bag(x, M, off, scheme=robe, mode=mode,
                                            per_sample_weights=psw)
                    got = get(he.embedding_bag(put(x), put(M), put(off), scheme=robe, mode=mode,
                                               per_sample_weights=put(psw)))
                    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
        finally:
            GB.ROWS = GB_rows


def test_errors_of_two_faults_are_the_cpus(public_emu):
    """Where two checks fail, the GPU branch names what the CPU names: bad
    offsets before a bad padding_idx; a plain lookup's weight dtype before
    its shape; a backward's grad_output dtype before its width or dims,
    and its shape before the indices' values."""
    put, _ = public_emu
    full = he.FullTable([5], 4)
    W = full.init_weight()
    for pad in (9, True, 1.5, "3"):
        _same_public_error(lambda P: he.embedding_bag(P(np.array([1, 2, 3])), P(W),
                                               P(np.array([0, 2, 1])), scheme=full,
                                               padding_idx=pad), put)
        _same_public_error(lambda P: he.embedding_bag_backward(
            P(np.ones((3, 4), np.float32)), P(np.array([1, 2, 3])), P(np.array([0, 2, 1])),
            scheme=full, padding_idx=pad), put)
    for W in (np.zeros(8, np.float16), np.zeros((0, 4), np.int32)):
        _same_public_error(lambda P: he.embedding(P(np.array([1])), P(W)), put)
    _same_public_error(lambda P: he.embedding_backward(P(np.ones((3, 0), np.int64)),
                                                P(np.array([1, 1, 0])), 3), put)
    _same_public_error(lambda P: he.embedding_backward(P(np.ones(7, np.float32)),
                                                P(np.array([[0, 9]])), 5), put)
    _same_public_error(lambda P: he.multi_embedding_backward(P(np.ones((1, 4), np.float32)),
                                                      P(np.array([[0, 9]])), [5, 5], [2, 3]),
                put)
    _same_public_error(lambda P: he.multi_embedding_backward(P(np.ones((1, 4), np.int64)),
                                                      P(np.array([[0, 1]])), [5, 5], [2]), put)


def test_saved_of_a_padded_forward_names_its_padding(public_emu):
    """The device keeps a padding entry's place and leaves its starts
    unwritten: a backward without padding_idx given a padded forward's saved
    read them (a wrong gradient); both backends now name the padding."""
    put, _ = public_emu
    robe = he.RobeZ(64, 4, block=4)
    M = robe.init_weight()
    x, off = np.array([5, 1, 5, 2]), np.array([0, 2])
    for P in (lambda a: a, put):
        _, saved = he.embedding_bag(P(x), P(M), P(off), scheme=robe, padding_idx=5,
                                    return_saved=True)
        with pytest.raises(ValueError, match=r"^saved: expected the forward of these inputs "
                                             r"\(padding token None\), got one of padding "
                                             r"token 5$"):
            he.embedding_bag_backward(P(np.ones((2, 4), np.float32)), P(x), P(off),
                                      scheme=robe, saved=saved)
