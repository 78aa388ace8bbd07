"""The GPU launchers on the CPU: hashemb/_gpu's kernels compiled for the host
(tests/cuda/emu.cpp, g++) and a backend that hands them NumPy arrays.

Every thread of a launch runs, one after another; each argument is checked
against the kernel's C signature (what CuPy would pack silently wrong). What
this cannot see: races, warp-level timing, NVRTC-only compile errors (the
NVRTC test covers those where CuPy is installed), and device memory limits.
"""
import contextlib
import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np

from hashemb._gpu import _runtime as RT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_lib = None


def build():
    """The emulator library (loaded once per process), or None without g++.

    The build is shared by every process on the machine through a file named
    by a hash of the command and every source it reads (pytest-xdist workers
    and the fuzzers' subprocesses would otherwise each spend 10-25 s on it);
    a lock makes the first process build it while the others wait.
    """
    global _lib
    if _lib is not None:
        return _lib
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    # HASHEMB_EMU_ASAN=1: AddressSanitizer + UndefinedBehaviorSanitizer build
    # (run the process with libasan preloaded: scripts/asan): every kernel
    # access checked against its buffer, undefined arithmetic an error
    asan = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
            "-fno-omit-frame-pointer"] if os.environ.get("HASHEMB_EMU_ASAN") == "1" else []
    dirs = [os.path.join(ROOT, "hashemb", "_include", "hashemb"),
            os.path.join(ROOT, "hashemb", "_gpu"), os.path.join(ROOT, "tests", "cuda")]
    cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas", *asan,
           "-I", os.path.join(ROOT, "hashemb", "_include"), "-I", dirs[1],
           os.path.join(dirs[2], "emu.cpp"), "-o"]
    # named by what is built, not where: a scratch copy of the tree
    # (scripts/asan) finds the build of the same sources
    h = hashlib.sha256(" ".join(cmd).replace(ROOT, "").encode())
    for d in dirs:
        for f in sorted(f for f in os.listdir(d) if f.endswith((".h", ".cu", ".cuh", ".cpp"))):
            with open(os.path.join(d, f), "rb") as fh:
                h.update(f.encode() + b"\0" + fh.read())
    cache = os.path.join(tempfile.gettempdir(), f"hashemb_emu_{os.getuid()}")
    os.makedirs(cache, exist_ok=True)
    out = os.path.join(cache, h.hexdigest()[:20] + ".so")
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(out):
            tmp = f"{out}.{os.getpid()}"
            subprocess.run(cmd + [tmp], check=True, capture_output=True)
            os.replace(tmp, out)
            _forget_old(cache, keep=out)
    lib = ctypes.CDLL(out)
    lib.emu_name.restype = ctypes.c_char_p
    lib.emu_launch.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                               ctypes.POINTER(ctypes.c_void_p)]
    _lib = lib
    return lib


def _forget_old(cache, keep, days=2):
    """Removes builds of other sources, days old, from the shared cache."""
    for f in os.listdir(cache):
        path = os.path.join(cache, f)
        if not path.startswith(keep) and time.time() - os.path.getmtime(path) > days * 86400:
            with contextlib.suppress(OSError):
                os.remove(path)


def build_or_skip():
    """The emulator library, or a pytest skip without a C++ compiler."""
    import pytest
    lib = build()
    if lib is None:
        pytest.skip("no C++ compiler for the GPU emulator")
    return lib


def emu_backend():
    """An EmuBackend (a pytest skip without a C++ compiler)."""
    return EmuBackend(build_or_skip())


class Stand(np.ndarray):
    """What hashemb's dispatch takes for a CuPy array: a host array that the
    emulator's launchers read, so that the public functions' GPU branch and
    their own checks (their order included) run as they do for CuPy."""


Stand.__module__ = "cupy"


def stand(a):
    """A copy of a as a Stand (None stays None)."""
    return None if a is None else np.array(a, copy=True).view(Stand)


def cupy_or_skip():
    """cupy, where it imports and sees a CUDA device; otherwise a pytest skip."""
    import pytest
    cp = pytest.importorskip("cupy")
    if RT.device_count() == 0:
        pytest.skip("no CUDA device")
    return cp


def torch_cuda():
    """torch, where CuPy, a device and a CUDA build of torch are all there;
    otherwise a pytest skip."""
    import pytest
    cupy_or_skip()
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    return torch


class EmuBackend:
    """RT.CupyBackend's interface over NumPy arrays and the host emulator."""

    name = "numpy (GPU emulator)"
    key = "emu"
    block = 64
    xp = np

    def __init__(self, lib):
        self.lib = lib
        self.index = {lib.emu_name(k).decode(): k for k in range(lib.emu_count())}
        self.launches = []

    def is_array(self, x):
        return isinstance(x, np.ndarray)

    def device_of(self, a):
        return contextlib.nullcontext()

    def current_device(self):
        return 0

    def ptr(self, a):
        return a.ctypes.data

    def to_device(self, host, kept=False):
        return np.array(host, copy=True)    # new memory: pointer patching is exercised

    def to_host(self, a):
        return np.asarray(a).copy()

    def stable_argsort(self, a):
        return np.argsort(a, kind="stable")

    def launch(self, family, name, nthreads, args):
        nthreads = int(nthreads)
        if nthreads <= 0:
            return
        assert name in RT.kernel_names(family), (family, name)
        k = self.index[name]
        lib = self.lib
        assert lib.emu_nargs(k) == len(args), (name, lib.emu_nargs(k), len(args))
        keep, ptrs = [], []
        for i, a in enumerate(args):
            size, kind = lib.emu_arg_size(k, i), lib.emu_arg_kind(k, i)
            if isinstance(a, np.ndarray):
                assert kind == 0, f"{name} argument {i}: array for a scalar parameter"
                v = ctypes.c_void_p(a.ctypes.data)
            else:
                assert isinstance(a, np.generic), f"{name} argument {i}: {type(a)} (not NumPy)"
                assert kind != 0, f"{name} argument {i}: scalar {a!r} for a pointer parameter"
                assert a.dtype.itemsize == size, \
                    f"{name} argument {i}: {a.dtype} for a {size}-byte parameter"
                assert (a.dtype.kind == "f") == (kind == 1), \
                    f"{name} argument {i}: {a.dtype} for a {'float' if kind == 1 else 'integer'}"
                v = ctypes.create_string_buffer(a.tobytes(), size)
            keep.append(v)
            ptrs.append(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
                        if isinstance(v, ctypes.c_void_p) else ctypes.cast(v, ctypes.c_void_p))
        arr = (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs)
        self.launches.append(name)
        grid = (nthreads + self.block - 1) // self.block
        lib.emu_launch(k, grid, self.block, arr)


class Device:
    """One way of running the GPU code in a test: the host emulator (``be``
    set, launchers called with it) or CuPy on a device (``be`` None, the
    public functions); skips when neither a C++ compiler nor a device is
    there. ``put`` / ``get`` move arrays, or lists of them, in and out."""

    def __init__(self, kind):
        self.kind = kind
        if kind == "emulator":
            self.be = emu_backend()
        else:
            self.cp, self.be = cupy_or_skip(), None

    def put(self, a):
        if a is None:
            return None
        if isinstance(a, list):
            return [self.put(x) for x in a]
        return np.array(a, copy=True) if self.kind == "emulator" else self.cp.asarray(a)

    def get(self, a):
        if isinstance(a, list):
            return [self.get(x) for x in a]
        return np.asarray(a) if self.kind == "emulator" else self.cp.asnumpy(a)

    def same(self, got, want):
        """got (a device array) equals want bit for bit, except on a device
        for float32 subnormals: CuPy compiles every kernel with -ftz=true
        (after the options it is given), so a result or operand below
        float32's smallest normal may read as 0 there. Normal values must
        still agree exactly (atol is far below their last bit)."""
        got = self.get(got)
        if self.kind != "emulator" and np.asarray(want).dtype == np.float32:
            np.testing.assert_allclose(got, want, rtol=0, atol=np.finfo(np.float32).tiny)
        else:
            # (the sign of a zero result may differ: see the README's GPU
            # backend; tests of it compare the bits themselves)
            np.testing.assert_array_equal(got, want)
