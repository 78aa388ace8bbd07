"""Run-time side of the GPU backend: CuPy (imported on first use), one NVRTC
module per kernel family and device, launches, and the device copy of a
scheme's C struct.

Every launcher in hashemb._gpu talks to a *backend* object: ``xp`` (the array
module), ``launch``, ``ptr``, ``to_device``, ``to_host``, ``device_of``. The
real one is :class:`CupyBackend`; the tests run the same launchers with NumPy
arrays and the kernels compiled for the host (tests/gpu_emu), so everything
but the silicon is exercised on machines without a GPU.
"""
import contextlib
import math
import os
import re
import struct
import threading
import weakref

import numpy as np

from .._backend import fork_safe_lock

_HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(os.path.dirname(_HERE), "_include", "hashemb", "slots.h")
HALF = os.path.join(os.path.dirname(_HERE), "_include", "hashemb", "half.h")
OPTIM = os.path.join(os.path.dirname(_HERE), "_include", "hashemb", "optim.h")
COMMON = os.path.join(_HERE, "common.cuh")
FAMILIES = ("bag", "segment", "slots", "embed", "tt", "init")

# -fmad=false: no contraction of a*b + c into one rounding, so sums and
# updates round exactly as the CPU kernels (compiled without FMA) do.
NVRTC_OPTIONS = ("-fmad=false",)

_KERNEL_LINE = re.compile(r"^HE_KERNEL\((.+)\)\s*$", re.M)

OPTIONS = {
    # one reduction on the device before each launch: offsets well formed and
    # tokens of sized tables in range (IndexError); False skips it (no sync)
    "check_indices": True,
    # backward through sort + ordered segment sums (bitwise the CPU result)
    # instead of atomics
    "deterministic": False,
    # None: a forward hashes per lane in its one launch, and with
    # return_saved writes the run starts as it goes (unsigned schemes of <= 4
    # runs per row); a backward not given them precomputes them (bag_starts);
    # True / False: always precompute / never use them, where unsigned
    "precompute_starts": None,
}


def _read(path):
    with open(path) as f:
        return f.read()


def source(family):
    """The text NVRTC compiles: slots.h, half.h, optim.h, common.cuh, then <family>.cu,
    each under a #line marker so compile errors name the right file and line."""
    parts = []
    for path in (HEADER, HALF, OPTIM, COMMON, os.path.join(_HERE, family + ".cu")):
        parts.append(f'#line 1 "{os.path.basename(path)}"\n{_read(path)}')
    return "\n".join(parts)


def kernel_names(family):
    """Name expressions of the instantiations a family lists (HE_KERNEL lines)."""
    return [m.strip() for m in _KERNEL_LINE.findall(_read(os.path.join(_HERE, family + ".cu")))]


_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double",
           np.dtype(np.int32): "int", np.dtype(np.int64): "long long",
           np.dtype(np.float16): "unsigned short"}     # float16 storage: its bits


def ctype(dtype):
    """C name of a kernel template argument for a NumPy dtype."""
    try:
        return _CTYPES[dtype]           # a dtype object already (every launcher's case)
    except KeyError:
        return _CTYPES[np.dtype(dtype)]


_I64 = {}


def _kept(memo, key, value):
    """memo[key] = value; a memo of 4096 is emptied first (the values a
    batch brings vary: a memo keeps the ones that repeat, boundedly)."""
    if len(memo) >= 4096:
        memo.clear()
    memo[key] = value
    return value


def i64(v):
    """v as a kernel's 64-bit integer argument. Launches take a dozen of them,
    mostly the same few values, so they are kept (a dict lookup is a quarter
    of np.int64's cost)."""
    try:
        return _I64[v]
    except KeyError:
        return _kept(_I64, v, np.int64(v))


_REAL = {}


def real(dtype, v):
    """v as a kernel's floating-point argument of ``dtype`` (float32 or
    float64), kept like ``i64``'s integers (learning rates and scales repeat
    every step); -0.0 is kept apart from 0.0."""
    key = (dtype, v, math.copysign(1.0, v))
    try:
        return _REAL[key]
    except KeyError:
        return _kept(_REAL, key, dtype.type(v))


# ------------------------------------------------------------------ CuPy

_cupy = None


def import_cupy():
    """cupy, imported on first use (importing hashemb never imports it)."""
    global _cupy
    if _cupy is None:
        import cupy
        _cupy = cupy
    return _cupy


def device_count():
    """CUDA devices CuPy sees: 0 without CuPy, a driver or a device."""
    try:
        return int(import_cupy().cuda.runtime.getDeviceCount())
    except Exception:       # ImportError, CUDARuntimeError (no driver), ...
        return 0


# what c_scalars launches: each argument's bits, read back
_PROBE = r"""
extern "C" __global__ void he_probe(long long a, double b, float c, int d, long long* out)
{
    out[0] = a;
    out[1] = __double_as_longlong(b);
    out[2] = __float_as_int(c);
    out[3] = d;
}
"""

_SAME_DEVICE = contextlib.nullcontext()      # stateless: one serves every call


class CupyBackend:
    """Launches on CuPy's current stream and the device of the arrays."""

    name = "cupy"
    key = "cupy"
    block = 256

    def __init__(self):
        self.xp = import_cupy()
        self._modules = {}
        self._functions = {}
        self._failed = {}               # (family, name, device) -> its compile error
        self._lock = threading.Lock()
        self._scalars = {}              # id(NumPy scalar) -> (it, its C scalar)
        self._make_scalar = False       # not probed yet (c_scalars)

    def is_array(self, x):
        return isinstance(x, self.xp.ndarray)

    def device_of(self, a):
        """Context: a's device current (kernels, allocations and the
        compiled module of that device). Where it already is, the common
        case, a context that does nothing: no Device object, and no device
        switch in and out, on every call."""
        dev = a.data.device_id
        if dev == self.xp.cuda.runtime.getDevice():
            return _SAME_DEVICE
        return self.xp.cuda.Device(dev)

    def current_device(self):
        return self.xp.cuda.runtime.getDevice()     # no Device object per call

    def ptr(self, a):
        return a.data.ptr

    def to_device(self, host, kept=False):
        """A device copy of ``host``. ``kept``: a buffer cached and read by
        later calls on any stream; CuPy's upload is asynchronous on the
        current one, so it is waited for (once per buffer) before another
        stream can see it."""
        a = self.xp.asarray(host)
        if kept:
            self.xp.cuda.get_current_stream().synchronize()
        return a

    def to_host(self, a):
        return self.xp.asnumpy(a)

    def stable_argsort(self, a):
        return self.xp.argsort(a)        # CuPy's sort is always stable (thrust)

    def function(self, family, name):
        """Kernel ``name`` of ``family`` on the current device, compiled on
        its first use, alone: a family compiled whole took about 75 s a
        process for bag.cu's 124 instantiations (CuPy keeps no disk cache of
        a module with name expressions), where a process uses a few. A
        failed compile is kept and raised again, not retried per launch."""
        dev = self.current_device()
        key = (family, name, dev)
        fn = self._functions.get(key)
        if fn is None:
            with self._lock:
                fn = self._functions.get(key)
                if fn is None:
                    if key in self._failed:
                        raise self._failed[key]
                    try:
                        mod = self.xp.RawModule(code=source(family), options=NVRTC_OPTIONS,
                                                name_expressions=[name])
                        fn = mod.get_function(name)
                    except Exception as e:
                        self._failed[key] = e
                        raise
                    self._modules[key] = mod
                    self._functions[key] = fn
        return fn

    def launch(self, family, name, nthreads, args):
        """name<...>(args) over nthreads threads (1-D grid of 256-thread blocks)."""
        nthreads = int(nthreads)
        if nthreads <= 0:
            return
        grid = (nthreads + self.block - 1) // self.block
        self.function(family, name)((grid,), (self.block,), self._pack(args))

    def _pack(self, args):
        """The launch's arguments, each NumPy scalar as a kept C scalar.

        CuPy turns every scalar argument into a C scalar object at every
        launch (a bag launch has about 15); given one, it passes it as is.
        The launchers' integers are the memoised objects of ``i64``, so a
        memo by identity (holding the scalar, so that its id is not reused)
        makes each once. Where this CuPy cannot make them (checked once, by
        a launch: ``c_scalars``), scalars pass as they are."""
        make = self.c_scalars()
        memo = self._scalars
        out = []
        for a in args:
            if isinstance(a, np.generic):
                if make is not None:
                    ent = memo.get(id(a))
                    if ent is None or ent[0] is not a:
                        ent = _kept(memo, id(a), (a, make(a)))
                    a = ent[1]
            elif not isinstance(a, self.xp.ndarray):
                # CuPy packs a Python int as whatever it likes: never pass one
                raise TypeError(f"kernel argument: expected a cupy.ndarray or a NumPy scalar, "
                                f"got {type(a).__name__}")
            out.append(a)
        return tuple(out)

    def c_scalars(self):
        """CuPy's C scalar constructor, or None where this CuPy has none that
        works: checked once per process by a probe launch (c_scalar_probe),
        not while the stream is being captured into a CUDA graph (the probe
        reads its result back: NumPy scalars until a launch outside one)."""
        if self._make_scalar is False:
            if self._capturing():
                return None
            with self._lock:
                if self._make_scalar is False:
                    self._make_scalar = self.c_scalar_probe()
        return self._make_scalar

    def _capturing(self):
        try:
            return bool(self.xp.cuda.get_current_stream().is_capturing())
        except Exception:       # a CuPy without it: no capture to protect
            return False

    def c_scalar_probe(self):
        """cupy._core._scalar.CScalar if a launch given C scalars of an int64,
        a float64 (-0.0), a float32 and an int32 reads back exactly their
        bits; else None (any error included)."""
        try:
            from cupy._core._scalar import CScalar
            vals = (np.int64(-(1 << 62) - 7), np.float64(-0.0), np.float32(-1.25), np.int32(-3))
            out = self.xp.zeros(4, np.int64)
            fn = self.xp.RawModule(code=_PROBE).get_function("he_probe")
            fn((1,), (1,), tuple(CScalar(v) for v in vals) + (out,))
            want = [int(vals[0]), int(vals[1].view(np.int64)), int(vals[2].view(np.int32)),
                    int(vals[3])]
            return CScalar if [int(v) for v in self.to_host(out)] == want else None
        except Exception:       # another CuPy: scalars go as NumPy scalars
            return None


_backend = None


def backend():
    global _backend
    if _backend is None:
        _backend = CupyBackend()
    return _backend


@contextlib.contextmanager
def torch_stream(tensor):
    """CuPy's current device and stream = torch's current ones for ``tensor``."""
    cp = import_cupy()
    import torch
    dev = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(dev)
    with cp.cuda.Device(dev), cp.cuda.ExternalStream(stream.cuda_stream, dev):
        yield


# ------------------------------------------------------- scheme structs

def patch_struct(raw, fields, pointers):
    """``raw`` (the he_scheme struct as bytes) with the 8-byte pointer at each
    field offset replaced by the matching entry of ``pointers``."""
    buf = bytearray(raw)
    if len(fields) != len(pointers):
        raise ValueError(f"pointers: expected {len(fields)}, got {len(pointers)}")
    for (offset, _), p in zip(fields, pointers):
        if offset % 8 or offset < 0 or offset + 8 > len(buf):
            raise ValueError(f"pointer field at byte {offset} of a {len(buf)}-byte struct")
        struct.pack_into("<Q", buf, offset, int(p))
    return bytes(buf)


_SCHEMES = {}       # id(scheme) -> [weakref, SchemeView, {(backend, device, what): value}]
# re-entrant: a scheme freed while the lock is held (by make(), or by a
# garbage collection that any allocation under it can start) runs _forget
# on this thread; a plain Lock deadlocked there (seen once in the test suite)
fork_safe_lock(globals(), "_SCHEMES_LOCK", threading.RLock)


def _forget(key, ref):
    with _SCHEMES_LOCK:
        ent = _SCHEMES.get(key)
        if ent is not None and ent[0] is ref:
            del _SCHEMES[key]


def _cached(be, scheme, what, make):
    """make() for this scheme, backend and device, built once and kept with
    the scheme (rebuilt if its view changes, dropped with it)."""
    view = scheme._view
    key = id(scheme)
    with _SCHEMES_LOCK:
        ent = _SCHEMES.get(key)
        if ent is None or ent[0]() is not scheme or ent[1] is not view:
            ref = weakref.ref(scheme, lambda r, k=key: _forget(k, r))
            ent = [ref, view, {}]
            _SCHEMES[key] = ent
        k = (be.key, be.current_device(), what)
        if k not in ent[2]:
            ent[2][k] = make()
        return ent[2][k]


def scheme_struct(be, scheme):
    """Device buffer holding the scheme's he_scheme struct with device
    pointers (pass it as ``const he_scheme*``). Built once per scheme and
    device from ``SchemeView.struct_bytes`` / ``pointer_fields``: the layout
    is never mirrored in Python, so new struct fields come for free. Rebuilt
    if the scheme's view changes; dropped with the scheme."""
    def make():
        view = scheme._view
        fields = view.pointer_fields()
        arrays = [be.to_device(np.ascontiguousarray(a)) for _, a in fields]
        raw = patch_struct(view.struct_bytes(), fields, [be.ptr(a) for a in arrays])
        return be.to_device(np.frombuffer(raw, np.uint8).copy(), kept=True), arrays
    return _cached(be, scheme, "struct", make)[0]


def scheme_bounds(be, scheme, table0, T):
    """``scheme._bounds(table0, T)`` on the device, or None: uploaded once
    per (scheme, device, tables), not on every checked call (a TT table's
    per-call sizes object, which has no kernel view, is uploaded each time)."""
    def make():
        h = scheme._bounds(table0, T)
        return None if h is None else be.to_device(h, kept=True)
    if not hasattr(scheme, "_view"):
        return make()
    return _cached(be, scheme, ("bounds", table0, T), make)
