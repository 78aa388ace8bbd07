"""Scheme.init_weight on the GPU (hashemb/_gpu/init.cu init_uniform): the
draws of NumPy's default_rng(seed).random(), bit for bit, spread to [-s, s]
as the CPU spreads them, with no host copy of the array."""
import numpy as np

from .. import _validate as V
from . import _runtime as RT
from ._runtime import i64
from .bag import storage_arg

PER = 64        # 64-bit generator outputs a thread (one O(log n) jump each)


def init_uniform(shape, dtype, rng, parts, like, be=None):
    """A new device array of ``shape`` and ``dtype`` on ``like``'s device:
    ``rng.random`` (a fresh default_rng: its PCG64 state is read, not
    advanced) spread to [-scale, scale] over each (first, end, scale) part
    of the flat array; float16 / bfloat16 hold the float32 draw rounded to
    nearest once."""
    be = be or RT.backend()
    state = rng.bit_generator.state
    if state["bit_generator"] != "PCG64" or state["has_uint32"]:
        raise ValueError("rng: expected a fresh default_rng (PCG64)")
    s, inc = state["state"]["state"], state["state"]["inc"]
    bf = V.format16(dtype)
    real = np.dtype(np.float64 if dtype == np.float64 else np.float32)
    n = int(np.prod(shape, dtype=np.int64))
    with be.device_of(like):
        if bf is None:
            w = be.xp.empty(shape, dtype)
        else:
            w = be.xp.empty(shape, np.uint16)
        bounds = np.array([a for a, _, _ in parts] + [parts[-1][1]], np.int64)
        s2 = np.array([2 * scale for _, _, scale in parts], real)
        s1 = np.array([scale for _, _, scale in parts], real)
        draws = n if real == np.float64 else (n + 1) // 2
        name = f"init_uniform<{RT.ctype(real)}{storage_arg(dtype)}>"
        be.launch("init", name, -(-draws // PER),
                  [np.uint64(s >> 64), np.uint64(s & (2**64 - 1)), np.uint64(inc >> 64),
                   np.uint64(inc & (2**64 - 1)), i64(n), be.to_device(bounds),
                   be.to_device(s2), be.to_device(s1), i64(len(parts)), i64(PER), w])
        if bf is None:
            return w
        try:
            return w.view(dtype)
        except (TypeError, ValueError) as e:
            raise TypeError(f"dtype: {dtype} on the device needs CuPy 14 or newer with "
                            f"ml_dtypes (CuPy's bfloat16), got CuPy "
                            f"{getattr(be.xp, '__version__', '?')} ({e})") from None
