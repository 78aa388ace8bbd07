"""Scheme.init_weight(like=device array): hashemb/_gpu/init.cu draws NumPy's
default_rng(seed).random() stream (PCG64) in parallel on the device, and
must give the CPU's array bit for bit, every scheme, dtype, seed and scale.
Run through the public function on the host emulator (the kernels compiled
for the host, tests/cuda/emu.cpp) and with CuPy on a device (skipped without
one). The PCG64 arithmetic itself is checked against a few lines of Python
big-integer arithmetic, an independent model of the generator."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import hashemb as he
from hashemb._gpu import _runtime as RT
from hashemb._gpu import init as GI

import gpu_emu


@pytest.fixture(params=["emulator", "cupy"])
def like(request, monkeypatch):
    """(a device array to pass as like, its host copy function, the device
    array type: the emulator's launchers make NumPy arrays)."""
    if request.param == "emulator":
        gpu_emu.build_or_skip()
        monkeypatch.setattr(RT, "_backend", gpu_emu.emu_backend())
        return np.zeros(1).view(gpu_emu.Stand), lambda a: np.asarray(a).view(np.ndarray), np.ndarray
    cp = gpu_emu.cupy_or_skip()
    return cp.zeros(1), cp.asnumpy, cp.ndarray


def _dtypes():
    out = [np.float32, np.float64, np.float16]
    try:
        import ml_dtypes
        out.append(ml_dtypes.bfloat16)
    except ImportError:
        pass
    return out


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


SCHEMES = {
    "robe": lambda n: he.RobeZ(n + 15, 16),
    "robe-odd": lambda n: he.RobeZ(2 * n + 1, 8, block=2),
    "full": lambda n: he.FullTable([n // 8 + 1, 3, n // 5 + 1], 8),
    "full-one": lambda n: he.FullTable([n], 4),
    "hnet": lambda n: he.HashedNet(n, 4),
}


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])   # like is stateless
@given(kind=st.sampled_from(sorted(SCHEMES)), n=st.integers(1, 3000),
       dtype=st.sampled_from(_dtypes()), seed=st.integers(0, 2**63),
       scale=st.one_of(st.none(), st.floats(1e-3, 10.0)))
def test_device_init_equals_the_cpu_init(like, kind, n, dtype, seed, scale):
    dev, get, kind_of = like
    scheme = SCHEMES[kind](n)
    want = scheme.init_weight(seed, dtype, scale)
    got = scheme.init_weight(seed, dtype, scale, like=dev)
    assert isinstance(got, kind_of)
    got = get(got)
    assert got.shape == want.shape == scheme.weight_shape and got.dtype == want.dtype
    assert (_bits(got) == _bits(want)).all()


def test_device_init_takes_a_scale_a_table(like):
    dev, get, _ = like
    full = he.FullTable([700, 1, 300, 40], 8)
    for dtype in _dtypes():
        want = full.init_weight(3, dtype, [0.5, 2.0, 1e-2, 7.0])
        got = get(full.init_weight(3, dtype, [0.5, 2.0, 1e-2, 7.0], like=dev))
        assert (_bits(got) == _bits(want)).all()


def test_many_threads_and_parts_cross(like, monkeypatch):
    # a thread's outputs span several tables, and a table several threads
    dev, get, _ = like
    monkeypatch.setattr(GI, "PER", 3)
    full = he.FullTable(list(range(1, 60)), 2)
    for dtype in (np.float32, np.float64):
        want = full.init_weight(11, dtype)
        assert (_bits(get(full.init_weight(11, dtype, like=dev))) == _bits(want)).all()


def test_like_is_checked_by_name():
    robe = he.RobeZ(100, 4)
    with pytest.raises(TypeError, match="like: expected a cupy.ndarray or numpy.ndarray"):
        robe.init_weight(like=[1.0])
    # a NumPy like: the CPU's array (NumPy's like= convention)
    assert (robe.init_weight(4, like=np.zeros(2)) == robe.init_weight(4)).all()
    with pytest.raises(TypeError, match="dtype: expected float16, bfloat16"):
        robe.init_weight(dtype=np.int32, like=np.zeros(1).view(gpu_emu.Stand))
    with pytest.raises(ValueError, match="scale"):
        robe.init_weight(scale=-1.0, like=np.zeros(1).view(gpu_emu.Stand))


def _pcg64_model(seed, count):
    """NumPy's PCG64 outputs from default_rng(seed), in Python integers."""
    st_ = np.random.default_rng(seed).bit_generator.state["state"]
    s, inc, mult, mask = st_["state"], st_["inc"], 0x2360ED051FC65DA44385DF649FCCF645, 2**128 - 1
    out = []
    for _ in range(count):
        s = (s * mult + inc) & mask
        x, r = (s >> 64) ^ (s & (2**64 - 1)), s >> 122
        out.append(((x >> r) | (x << ((64 - r) & 63))) & (2**64 - 1))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2**64 - 1])
def test_the_stream_is_numpys_generator(seed):
    # the model the kernel implements, against NumPy itself: float64 takes
    # output e >> 11, float32 the low then high halves >> 8
    outs = _pcg64_model(seed, 9)
    rng = np.random.default_rng(seed)
    assert rng.random(9).tolist() == [(x >> 11) * 2.0**-53 for x in outs]
    halves = [h for x in outs for h in (x & 0xFFFFFFFF, x >> 32)]
    assert np.random.default_rng(seed).random(18, dtype=np.float32).tolist() == \
        [(h >> 8) * 2.0**-24 for h in halves]
