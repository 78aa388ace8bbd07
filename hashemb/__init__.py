"""hashemb: compressed embedding tables (ROBE-Z, HashedNet, FullTable baseline) as
fast array functions. NumPy arrays run on Cython + OpenMP kernels, CuPy arrays
on CUDA kernels compiled at run time (CuPy is imported only when one arrives)."""
import sys as _sys

from .bag import (BagSaved, embedding_bag, embedding_bag_backward, embedding_bags,
                  embedding_bags_backward)
from .lookup import (embedding, embedding_backward, multi_embedding,
                        multi_embedding_backward, unpack)
from .hashing import UniversalHash
from .optim import SGD, Adagrad, RowwiseAdagrad
from .schemes import FullTable, HashedNet, RobeZ, Scheme
from .lsh import LMA, LSHTable
from . import theory
from .tt import (TTCache, TTSaved, tt_core_shapes, tt_embedding_bag, tt_embedding_bag_backward,
                 tt_embedding_bags, tt_embedding_bags_backward, tt_init, tt_shapes, tt_to_full)

__version__ = "0.1.0"

__all__ = [
    "UniversalHash", "Scheme", "RobeZ", "HashedNet", "FullTable", "LSHTable", "LMA",
    "embedding_bag", "embedding_bag_backward", "embedding_bags", "embedding_bags_backward",
    "BagSaved",
    "SGD", "Adagrad", "RowwiseAdagrad", "show_config", "set_gpu_options", "set_num_threads",
    "theory",
    "embedding", "embedding_backward", "multi_embedding", "multi_embedding_backward", "unpack",
    "tt_shapes", "tt_core_shapes", "tt_init", "tt_to_full", "tt_embedding_bag",
    "tt_embedding_bag_backward", "tt_embedding_bags", "tt_embedding_bags_backward", "TTCache",
    "TTSaved",
]


def set_num_threads(n):
    """Threads of the CPU kernels called from this thread (OpenMP's
    ``omp_set_num_threads``; the default is ``OMP_NUM_THREADS`` or the
    cores); returns the previous value. A forked child of a process that
    loaded the kernels starts at one thread (see the README's Training
    and determinism): raise it there only if the parent never ran a
    kernel on several threads. Results are the same bits on any count.

    Parameters
    ----------
    n : int
        Threads, 1 <= n < 65536.

    Returns
    -------
    int
        The thread count before the call.

    Examples
    --------
    >>> import hashemb as he
    >>> old = he.set_num_threads(1)
    >>> he.set_num_threads(old)
    1
    """
    from . import _validate as V
    from ._cpu import _slots
    n = V.check_positive_int(n, "n", upper=1 << 16)
    old = _slots.max_threads()
    _slots.set_max_threads(n)
    return old


def set_gpu_options(**options):
    """Options of the GPU backend (``check_indices``, ``deterministic``,
    ``precompute_starts``); returns the previous values. See
    :func:`hashemb._gpu.set_options`. CPU kernels ignore them (the CPU is
    always deterministic and always checks indices).

    Parameters
    ----------
    check_indices : bool, optional
        Check offsets and sized tables' tokens on the device before each launch.
    deterministic : bool, optional
        The default of backward's ``deterministic``.
    precompute_starts : bool or None, optional
        When the bag kernels hash run starts in a pass of their own.

    Returns
    -------
    dict
        The previous values of the options given (``{}`` when none is):
        pass it back as keywords to restore them.

    Raises
    ------
    TypeError
        An unknown option, or a value other than True / False (or None for
        ``precompute_starts``).

    Examples
    --------
    >>> import hashemb as he
    >>> old = he.set_gpu_options(deterministic=True)   # bitwise-reproducible backward
    >>> he.set_gpu_options(**old)["deterministic"]
    True
    """
    from ._gpu import OPTIONS, set_options
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"options: expected some of {', '.join(sorted(OPTIONS))}, "
                        f"got unknown {', '.join(unknown)}")
    return set_options(**options)


def show_config():
    """What this build has: a dict (also printed) with the version, OpenMP and
    its thread count, the CPU's vector paths (AVX2 run starts and optimizer
    applies, F16C float16 reads, each used only where the machine has
    them, with the same results as the scalar code), the GPU
    backend's state (CuPy version and device, or why it is not available)
    and whether FastEmbedding's native torch op is built in this process.

    Returns
    -------
    dict
        ``version`` (str), ``openmp`` (bool), ``threads`` (int, the CPU
        kernels' current count), ``simd`` (str), ``gpu`` (str) and
        ``torch op`` (str: "hashemb.torch not imported" until it is).

    Examples
    --------
    >>> import hashemb as he
    >>> info = he.show_config()              # doctest: +ELLIPSIS
    version  ...
    >>> sorted(info)
    ['gpu', 'openmp', 'simd', 'threads', 'torch op', 'version']
    >>> info["version"] == he.__version__
    True
    """
    from ._cpu import _bag, _slots, _tt
    from ._gpu import info as gpu_info
    native = _sys.modules.get("hashemb.torch._native")   # never imports torch itself
    info = {
        "version": __version__,
        "openmp": _slots.has_openmp(),
        "threads": _slots.max_threads(),
        "simd": f"{_bag.simd_paths()}; TT products: {_tt.gemm_lanes()} float lanes",
        "gpu": gpu_info(),
        # FastEmbedding's native CPU op, built on first use
        "torch op": native.status() if native else "hashemb.torch not imported",
    }
    for k, v in info.items():
        print(f"{k:8s} {v}")
    return info
