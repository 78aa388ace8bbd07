"""GPU backend: CUDA kernels compiled at run time by CuPy (NVRTC), one module
per kernel family and device, launched on CuPy's current stream.

Sources: ``bag.cu`` (embedding bags), ``segment.cu`` (deterministic segment
sums, Adagrad sweep), ``slots.cu`` (slots, signs, universal hash),
``embed.cu`` (plain lookups) and ``tt.cu`` (TT-Rec chain products, pooling,
core gradients), each compiled after the text of
``hashemb/_include/hashemb/slots.h`` (the one source of the slot math, shared
with the CPU kernels) and ``common.cuh``. Nothing here imports CuPy until a
CuPy array reaches a hashemb function.
"""
import numpy as np

from ._runtime import OPTIONS, device_count

_UNSET = object()


def set_options(*, check_indices=_UNSET, deterministic=_UNSET, precompute_starts=_UNSET):
    """Options of the GPU backend; returns the previous values (a dict that
    can be passed back as keywords to restore them).

    check_indices : bool
        Before each launch, check offsets and the tokens of sized tables
        (FullTable, reference schemes) on the device: one reduction and one
        8-32 byte read (a synchronisation). False skips it: invalid input is
        then undefined behaviour, as with FBGEMM's bounds_check_mode NONE.
    deterministic : bool
        Default of backward's ``deterministic``: sort + ordered segment sums,
        bitwise equal to the CPU (slower, N*D-sized temporaries) instead of
        atomic adds. The TT backward (which has no ``deterministic``
        argument) follows it: per-chunk partial gradients summed in a fixed
        order, the same bits on every run (not the CPU's bits: its GEMMs sum
        in another order).
    precompute_starts : bool or None
        True: hash each (entry, run) once in a pass of its own (bag_starts)
        before every bag kernel (unsigned schemes); False: never, every lane
        hashes; None (default): a forward hashes per lane in its one launch
        and, with ``return_saved``, writes the starts for its backward as it
        goes; a backward not given them runs bag_starts (schemes of <= 4
        runs per row that need hashing).
    """
    new = {"check_indices": check_indices, "deterministic": deterministic,
           "precompute_starts": precompute_starts}
    for k, v in new.items():       # all checked before any is set
        if v is _UNSET or isinstance(v, (bool, np.bool_)) or (v is None and
                                                               k == "precompute_starts"):
            continue
        want = "True, False or None" if k == "precompute_starts" else "True or False"
        raise TypeError(f"{k}: expected {want}, got {v!r}")
    old = {}
    for k, v in new.items():
        if v is not _UNSET:
            old[k] = OPTIONS[k]
            OPTIONS[k] = None if v is None else bool(v)
    return old


def info():
    """CuPy's version and the current device, or why the backend is unavailable."""
    try:
        import cupy
    except Exception as e:       # ImportError and broken installs alike
        return f"not available (cupy not importable: {type(e).__name__})"
    n = device_count()
    if n == 0:
        return f"cupy {cupy.__version__}, no CUDA device"
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return (f"cupy {cupy.__version__}, {n} device(s), current {dev.id}: {name} "
            f"(sm_{props['major']}{props['minor']}, {props['totalGlobalMem'] / 2**30:.0f} GiB)")


__all__ = ["set_options", "info", "device_count", "OPTIONS"]
