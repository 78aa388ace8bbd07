"""Plain lookups (he.embedding / he.multi_embedding and their backward) for
CuPy arrays (hashemb/_gpu/embed.cu). Backward adds with atomics, or with
deterministic=True through a stable sort and ordered sums (bitwise the CPU's
sample-order sums)."""
import numpy as np

from .. import _validate as V
from . import _args as A
from . import _runtime as RT
from ._runtime import i64

_LAYOUTS = {}


def _device_layout(be, layout):
    """(base, dims, cols, ctab) of a packed layout on the current device, cached."""
    base, dims, cols, sizes = layout[:4]
    key = (be.key, be.current_device(), tuple(sizes.tolist()), tuple(dims.tolist()))
    hit = _LAYOUTS.get(key)
    if hit is None:
        ctab = np.repeat(np.arange(dims.shape[0], dtype=np.int32), dims)
        hit = tuple(be.to_device(a, kept=True) for a in (base, dims, cols, sizes, ctab))
        if len(_LAYOUTS) > 256:
            _LAYOUTS.clear()
        _LAYOUTS[key] = hit
    return hit


def _rows(be, indices, layout, single, name="indices"):
    """int32/int64 indices, contiguous, one column per table (their values:
    _check_rows)."""
    sizes = layout[3]
    idx = A.as_keys(be, indices, name, index=True)
    T = sizes.shape[0]
    if not single:
        V.check_table_columns(idx, T, name)
    flat = idx.reshape(-1, T)
    return idx, flat


def _check_rows(be, idx, flat, layout, name="indices"):
    """One reduction, IndexError naming the first index outside its table."""
    sizes, T = layout[3], layout[3].shape[0]
    if RT.OPTIONS["check_indices"] and flat.size:
        res = be.xp.full(1, np.uint64(np.iinfo(np.uint64).max), np.uint64)
        dsizes = _device_layout(be, layout)[3]
        be.launch("embed", f"embed_check<{RT.ctype(idx.dtype)}>", flat.size,
                  [flat, i64(flat.shape[0]), i64(T), dsizes, res])
        bad = int(be.to_host(res)[0])
        if bad != np.iinfo(np.uint64).max:
            raise V.index_error(idx, bad, sizes, name)


def gather(indices, weight, layout, single, be=None):
    be = be or RT.backend()
    A.as_array(be, weight, "weight")
    with be.device_of(weight):
        A.weight_dtype(be, weight)
        size, total = layout[4], layout[5]
        w = be.xp.ascontiguousarray(weight).reshape(-1)
        if w.shape[0] != size:
            raise ValueError(f"weight: expected {size} floats, got {w.shape[0]} "
                             f"(shape {weight.shape})")
        idx, flat = _rows(be, indices, layout, single)
        _check_rows(be, idx, flat, layout)
        out = be.xp.empty((flat.shape[0], total), w.dtype)
        base, dims, cols, _, ctab = _device_layout(be, layout)
        be.launch("embed", f"embed_gather<{RT.ctype(w.dtype)}, {RT.ctype(flat.dtype)}>",
                  out.size, [w, flat, i64(flat.shape[0]), i64(flat.shape[1]), base, dims, cols,
                             ctab, i64(total), out])
        return out.reshape(idx.shape + (total,) if single else (idx.shape[0], total))


def float_grad(grad_output, be=None):
    """grad_output checked and in the dtype the kernels take (the CPU's first
    check of a lookup's backward, before its sizes and dims)."""
    be = be or RT.backend()
    A.as_array(be, grad_output, "grad_output")
    with be.device_of(grad_output):
        return A.as_float(be, grad_output, "grad_output")


def scatter(grad_output, indices, layout, single, deterministic=None, be=None):
    be = be or RT.backend()
    # None: set_gpu_options' default, as the bag and TT backwards take it
    deterministic = RT.OPTIONS["deterministic"] if deterministic is None else deterministic
    A.as_array(be, grad_output, "grad_output")
    with be.device_of(grad_output):
        g = A.as_float(be, grad_output, "grad_output")
        if single and g.ndim < 1:
            raise ValueError(f"grad_output: expected shape indices.shape + (dim,), got {g.shape}")
        size, total = layout[4], layout[5]
        # the CPU's order: the indices' type, grad_output's shape, their values
        idx, flat = _rows(be, indices, layout, single)
        want = idx.shape + (total,) if single else (idx.shape[0], total)
        if g.shape != want:
            raise ValueError(f"grad_output: expected shape {want}, got {g.shape}")
        _check_rows(be, idx, flat, layout)
        out = be.xp.zeros(size, g.dtype)
        n = flat.shape[0] * total
        if n == 0:
            return out
        base, dims, cols, _, ctab = _device_layout(be, layout)
        name = f"embed_scatter<{RT.ctype(g.dtype)}, {RT.ctype(flat.dtype)}>"
        head = [g.reshape(-1), flat, i64(flat.shape[0]), i64(flat.shape[1]), base, dims, cols,
                ctab, i64(total)]
        if not deterministic:
            be.launch("embed", name, n, head + [i64(0), out, base])
            return out
        keys = be.xp.empty(n, np.int64)
        be.launch("embed", name, n, head + [i64(1), out, keys])
        order = be.stable_argsort(keys)
        sk, sv = keys[order], g.reshape(-1)[order]
        be.launch("segment", f"seg_apply<{RT.ctype(g.dtype)}>", n,
                  [sk, sv, i64(n), i64(0), out, out, RT.real(g.dtype, 0.0),
                   RT.real(g.dtype, 0.0)])
        return out
