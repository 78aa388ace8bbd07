"""Scheme.slots / Scheme.signs and UniversalHash for CuPy arrays
(hashemb/_gpu/slots.cu), with the CPU's checks and results."""
import numpy as np

from .. import _validate as V
from . import _args as A
from . import _runtime as RT
from ._runtime import i64


def _tokens(be, scheme, indices, table):
    idx = A.as_keys(be, indices, "indices")
    table = V.check_table(table, scheme)
    flat = idx.reshape(-1)
    n = flat.shape[0]
    b = A.Bags(flat, n, None, n, n, None, 1, 1, 0, False, 0, idx.shape, False)
    A.check_bags(be, scheme, b, table, unsigned=V.is_uint64(indices))
    return idx, flat, table


def _scheme_map(kernel, dtype, scheme, indices, table, be):
    be = be or RT.backend()
    A.as_array(be, indices, "indices")
    with be.device_of(indices):
        idx, flat, table = _tokens(be, scheme, indices, table)
        out = be.xp.empty((flat.shape[0], scheme.dim), dtype)
        if flat.shape[0]:
            be.launch("slots", f"{kernel}<{RT.ctype(flat.dtype)}>", flat.shape[0] * scheme.dim,
                      [RT.scheme_struct(be, scheme), flat, i64(flat.shape[0]), i64(table), out])
        return out.reshape(idx.shape + (scheme.dim,))


def scheme_slots(scheme, indices, table=0, be=None):
    """scheme.slots(indices, table) for a device array: int64, indices.shape + (dim,)."""
    return _scheme_map("scheme_slots", np.int64, V.check_scheme(scheme), indices, table, be)


def scheme_signs(scheme, indices, table=0, be=None):
    """scheme.signs(indices, table) for a device array: float32 +-1."""
    return _scheme_map("scheme_signs", np.float32, V.check_scheme(scheme), indices, table, be)


def _coef(be, h, part):
    """The hash's coefficients on the current device (cached on the object)."""
    cache = h.__dict__.setdefault("_gpu_coef", {})
    key = (be.key, be.current_device(), part)
    if key not in cache:
        c = h.coef[:4] if part == "hash" else h.coef[4:]
        cache[key] = be.to_device(np.ascontiguousarray(c), kept=True)
    return cache[key]


def universal_hash(h, keys, m, table=0, block=0, be=None):
    """h(keys, m, table=, block=) for a device array: int64 slots in [0, m)."""
    be = be or RT.backend()
    A.as_array(be, keys, "keys")
    with be.device_of(keys):
        k = A.as_keys(be, keys, "keys")
        table, block = V.check_key(table, "table"), V.check_key(block, "block")
        m = V.check_positive_int(m, "m", upper=1 << 62)
        out = be.xp.empty(k.shape, np.int64)
        flat = k.reshape(-1)
        be.launch("slots", f"universal_hash<{RT.ctype(flat.dtype)}>", flat.shape[0],
                  [_coef(be, h, "hash"), flat, i64(flat.shape[0]), np.uint64(table),
                   np.uint64(block), np.uint64(m), np.uint64(((1 << 64) - 1) // m),
                   out.reshape(-1)])
        return out


def universal_sign(h, keys, table=0, element=0, be=None):
    """h.sign(keys, table=, element=) for a device array: float32 +-1."""
    be = be or RT.backend()
    A.as_array(be, keys, "keys")
    with be.device_of(keys):
        k = A.as_keys(be, keys, "keys")
        table, element = V.check_key(table, "table"), V.check_key(element, "element")
        out = be.xp.empty(k.shape, np.float32)
        flat = k.reshape(-1)
        be.launch("slots", f"universal_sign<{RT.ctype(flat.dtype)}>", flat.shape[0],
                  [_coef(be, h, "sign"), flat, i64(flat.shape[0]), np.uint64(table),
                   np.uint64(element), out.reshape(-1)])
        return out
