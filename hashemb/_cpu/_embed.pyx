# cython: language_level=3
# distutils: language = c++
"""CPU kernels of plain lookups (no bags) over packed tables of mixed widths:
thin typed entry points to hashemb/embed.h, whose kernels the native torch op
(hashemb/torch/_native.cpp) shares. The layout is one (4, T) int64 array,
rows base, dims, cols, sizes (see the header)."""
from cython.view cimport array as cvarray
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport calloc, free

import numpy as np

ctypedef fused real:
    float
    double

ctypedef fused index_t:
    int32_t
    int64_t


cdef extern from "hashemb/embed.h" nogil:
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
    (``out`` from :func:`zeros`: see hashemb/embed.h). Returns -1, or (nothing
    written) the flat position of the first index outside its table, as gather."""
    cdef int64_t N = idx.shape[0], T = idx.shape[1], bad
    cdef const real* g = &grad[0, 0] if N and grad.shape[1] else NULL
    cdef const index_t* x = &idx[0, 0] if N else NULL
    cdef real* o = &out[0] if out.shape[0] else NULL
    with nogil:
        bad = he_embed_scatter(g, x, N, T, grad.shape[1], &layout[0, 0], o, out.shape[0])
    return bad


def zeros(int64_t n, dtype):
    """A zeroed 1-D array of n floats straight from calloc. np.zeros asks the
    kernel for transparent huge pages above 4 MB, so one scattered row zeroes
    a whole 2 MB page: a 51 MB gradient touched in 128 rows costs 2.9 ms that
    way, 0.2 ms in 4 KB pages."""
    dt = np.dtype(dtype)
    cdef cvarray a = cvarray(shape=(max(n, 1),), itemsize=dt.itemsize, format=dt.char,
                             mode="c", allocate_buffer=False)
    a.data = <char*>calloc(max(n, 1), dt.itemsize)
    if a.data == NULL:
        raise MemoryError(f"{n} floats for a gradient")
    a.callback_free_data = free
    return np.asarray(a)[:n]
