"""The native torch op of FastEmbedding / FastMultiEmbedding (_native.cpp),
built on first use with torch.utils.cpp_extension (about 20-30 s, once): cached
under ``$HASHEMB_CACHE`` (default ``~/.cache/hashemb``) in a folder named by a
hash of the sources, the torch version and the Python ABI, so an edit or a
new torch builds a new one and never loads a stale one.

``HASHEMB_TORCH_NATIVE=0`` skips it. When it cannot be built (no C++
compiler or ninja) the modules run through a Python autograd.Function with
the same kernels and results, slower at small batches, and a warning says so
once.
"""
import contextlib
import hashlib
import os
import re
import sys
import sysconfig
import warnings

from .._backend import fork_safe_lock

_HERE = os.path.dirname(os.path.abspath(__file__))
_INCLUDE = os.path.join(os.path.dirname(_HERE), "_include")
_BAD = re.compile(r"hashemb-bad-index=(\d+)")

fork_safe_lock(globals(), "_lock")
_state = {"module": None, "status": "not built yet"}


def module():
    """The built extension, or None (disabled or failed: see :func:`status`)."""
    if _state["module"] is not None or _state["status"] != "not built yet":
        return _state["module"]
    with _lock:
        if _state["status"] == "not built yet":
            _build()
    return _state["module"]


def status():
    """'built', 'not built yet', 'disabled (HASHEMB_TORCH_NATIVE=0)' or 'failed: ...'."""
    return _state["status"]


def _build():
    if os.environ.get("HASHEMB_TORCH_NATIVE", "1") == "0":
        _state["status"] = "disabled (HASHEMB_TORCH_NATIVE=0)"
        return
    try:
        import torch
        from torch.utils.cpp_extension import load
        # the op's source and every header it may include: a change to any
        # of them names a new build folder
        hdr = os.path.join(_INCLUDE, "hashemb")
        sources = [os.path.join(_HERE, "_native.cpp")] + sorted(
            os.path.join(hdr, f) for f in os.listdir(hdr) if f.endswith(".h"))
        h = hashlib.sha256(f"{torch.__version__} {sysconfig.get_config_var('SOABI')}".encode())
        for path in sources:
            with open(path, "rb") as f:
                h.update(f.read())
        root = os.environ.get("HASHEMB_CACHE") or os.path.join(
            os.path.expanduser("~"), ".cache", "hashemb")
        build = os.path.join(root, "torch-native-" + h.hexdigest()[:16])
        os.makedirs(build, exist_ok=True)
        if not any(f.endswith(".so") for f in os.listdir(build)):
            print("hashemb: building the native torch op for FastEmbedding (once, ~20-30 s) "
                  f"in {build}", file=sys.stderr, flush=True)
        with _build_lock(build):
            _state["module"] = load(
                "hashemb_native", sources[:1], extra_include_paths=[_INCLUDE],
                extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                build_directory=build, verbose=False)
        # torch loads it without a sys.modules entry: the at-fork hook
        # (hashemb._backend) looks for this name to give a forked child one
        # OpenMP thread (the op's parallel regions hung there otherwise)
        sys.modules.setdefault("hashemb_native", _state["module"])
        _state["status"] = "built"
    except Exception as e:          # no compiler, no ninja, headers missing: run in Python
        _state["status"] = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[-1]}"
        warnings.warn(f"hashemb: the native torch op did not build ({_state['status']}); "
                      "FastEmbedding runs through a Python autograd.Function (same results, "
                      "~40 us more per step)", RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def _build_lock(build):
    """This build folder to one process at a time, by an flock the kernel
    releases when its holder dies. torch's own lock is a file that a builder
    killed mid-build (a CI timeout) leaves behind, and every later process
    waited on it forever; holding ours, such a file is stale and goes."""
    try:
        import fcntl
    except ImportError:         # (not POSIX: torch's lock alone)
        yield
        return
    with open(os.path.join(build, "hashemb.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            stale = os.path.join(build, "lock")
            if os.path.exists(stale):
                os.remove(stale)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def bad_index(error):
    """The flat position a native IndexError reports, or None if it is not ours."""
    m = _BAD.search(str(error))
    return int(m.group(1)) if m else None
