# cython: language_level=3
# distutils: language = c++
"""CPU kernels of plain lookups (no bags) over packed tables of mixed widths:
thin typed entry points to hashemb/embed.h, whose kernels the native torch op
(hashemb/torch/_native.cpp) shares. The layout is one (4, T) int64 array,
rows base, dims, cols, sizes (see the header)."""
from cython.view cimport array as cvarray
from libc.stdint cimport int32_t, int64_t

import numpy as np

ctypedef fused real:
    float
    double

ctypedef fused index_t:
    int32_t
    int64_t


cdef extern from "hashemb/embed.h" nogil:
    void* he_embed_grad_buffer(int64_t S, size_t el, int64_t rows, int64_t row_floats)
    void he_embed_grad_free(void* data)
    int64_t he_embed_gather[R, I](const R* W, const I* idx, int64_t N, int64_t T,
                                  const int64_t* layout, R* out, int64_t total)
    int64_t he_embed_scatter[R, I](const R* grad, const I* idx, int64_t N, int64_t T,
                                   int64_t total, const int64_t* layout, R* out, int64_t S)


def gather(const real[::1] W, const index_t[:, ::1] idx, const int64_t[:, ::1] layout,
           real[:, ::1] out):
    """out[n, cols[t]:cols[t]+dims[t]] = W[base[t] + idx[n, t]*dims[t] : ... + dims[t]].
    Returns -1, or (nothing written) the flat position n * T + t of the first
    index outside its table. One call does both: at small batches a call costs
    more than the check."""
    cdef int64_t N = idx.shape[0], T = idx.shape[1], bad
    if N == 0:
        return -1
    cdef const real* w = &W[0]
    cdef const index_t* x = &idx[0, 0]
    cdef real* o = &out[0, 0]
    with nogil:
        bad = he_embed_gather(w, x, N, T, &layout[0, 0], o, out.shape[1])
    return bad


def scatter_add(const real[:, ::1] grad, const index_t[:, ::1] idx,
                const int64_t[:, ::1] layout, real[::1] out):
    """out[base[t] + idx[n, t]*dims[t] + i] += grad[n, cols[t] + i] for every n, t, i
    (``out`` from :func:`grad_buffer`). Returns -1, or (nothing
    written) the flat position of the first index outside its table, as gather."""
    cdef int64_t N = idx.shape[0], T = idx.shape[1], bad
    cdef const real* g = &grad[0, 0] if N and grad.shape[1] else NULL
    cdef const index_t* x = &idx[0, 0] if N else NULL
    cdef real* o = &out[0] if out.shape[0] else NULL
    with nogil:
        bad = he_embed_scatter(g, x, N, T, grad.shape[1], &layout[0, 0], o, out.shape[0])
    return bad


def grad_buffer(int64_t n, dtype, int64_t rows, int64_t row_floats):
    """A zeroed 1-D array of n floats for a dense gradient that ``rows`` row
    writes of ``row_floats`` floats will touch (hashemb/embed.h says how it
    is allocated and why)."""
    dt = np.dtype(dtype)
    cdef cvarray a = cvarray(shape=(max(n, 1),), itemsize=dt.itemsize, format=dt.char,
                             mode="c", allocate_buffer=False)
    a.data = <char*>he_embed_grad_buffer(n, dt.itemsize, rows, row_floats)
    if a.data == NULL:
        raise MemoryError(f"{n} floats for a gradient")
    a.callback_free_data = he_embed_grad_free
    return np.asarray(a)[:n]
