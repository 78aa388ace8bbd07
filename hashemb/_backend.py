"""Pick the kernels by array type: NumPy -> hashemb._cpu. Never copies between
host and device behind the caller's back."""
import types

import numpy as np

_cpu = None


def _cpu_kernels():
    global _cpu
    if _cpu is None:
        from ._cpu import _bag, _embed, _slots
        _cpu = types.SimpleNamespace(**{k: getattr(m, k) for m in (_slots, _bag, _embed)
                                        for k in dir(m) if not k.startswith("__")})
    return _cpu


def is_cupy(x):
    return type(x).__module__.split(".")[0] == "cupy"


def array_module(*arrays):
    """numpy for NumPy arrays; TypeError for a mix or for device arrays."""
    for x in arrays:
        if x is not None and is_cupy(x):
            raise TypeError(
                f"expected numpy.ndarray inputs, got {type(x).__module__}.{type(x).__name__}: "
                "this build of hashemb has no GPU backend (hashemb.show_config())")
    return np


def kernels(*arrays):
    """The kernel namespace for these arrays (the CPU one)."""
    array_module(*arrays)
    return _cpu_kernels()
