# cython: language_level=3
"""CPU kernels of plain lookups (no bags) over packed tables of mixed widths.

A layout is T tables; table t has its rows of ``dims[t]`` floats starting at
float ``base[t]`` of one flat array, and fills output columns
``cols[t] .. cols[t] + dims[t]`` of a row of ``total`` floats; the kernels take
it as one (4, T) int64 array, rows base, dims, cols, sizes. One table is the
case T = 1 (``he.embedding``); many small tables packed without padding are
``he.multi_embedding``.

Backward splits the *output columns* among threads in cache-line multiples:
each thread walks every sample in order and adds only its columns, so each
float of the gradient is summed by one thread in sample order (bitwise
deterministic, independent of the thread count), hot rows (all samples on one
id) are shared evenly, and no two threads write one cache line. Narrow layouts
(< 2 lines) split the *rows* instead, by ranges of the flat array.
"""
from cython.parallel cimport prange, parallel, threadid
from libc.stdint cimport int32_t, int64_t
from libc.string cimport memcpy, memset

from hashemb._cpu._slots cimport he_max_threads

ctypedef fused real:
    float
    double

ctypedef fused index_t:
    int32_t
    int64_t

DEF LINE = 16        # floats per 64-byte cache line (float32; float64 uses 2 lines)
DEF SMALL = 1 << 16  # floats moved below which one thread wins: a parallel region
                     # costs more than the copy, and next to torch's own busy-waiting
                     # pool (a training step) extra threads only contend for cores


cdef inline int _threads(int64_t work) noexcept nogil:
    return 1 if work < SMALL else he_max_threads()


cdef int64_t _first_bad(const index_t[:, ::1] idx, const int64_t[::1] sizes) noexcept nogil:
    """n * T + t of the first index outside [0, sizes[t]), or -1. Run before
    any write, so bad input never writes out of bounds."""
    cdef int64_t n, t, v, T = idx.shape[1]
    for n in range(idx.shape[0]):
        for t in range(T):
            v = idx[n, t]
            if v < 0 or v >= sizes[t]:
                return n * T + t
    return -1


def gather(const real[::1] W, const index_t[:, ::1] idx, const int64_t[:, ::1] layout,
           real[:, ::1] out):
    """out[n, cols[t]:cols[t]+dims[t]] = W[base[t] + idx[n, t]*dims[t] : ... + dims[t]].
    Returns -1, or (nothing written) the flat position n * T + t of the first
    index outside its table. One call does both: at small batches a call costs
    more than the check."""
    cdef int64_t n, t, T = idx.shape[1]
    cdef int nt = _threads(out.shape[0] * out.shape[1])
    cdef int64_t bad
    cdef const int64_t[::1] base = layout[0], dims = layout[1], cols = layout[2]
    cdef const int64_t[::1] sizes = layout[3]
    with nogil:
        bad = _first_bad(idx, sizes)
        if bad < 0:
            for n in prange(idx.shape[0], schedule='static', num_threads=nt):
                for t in range(T):
                    memcpy(&out[n, cols[t]], &W[base[t] + idx[n, t] * dims[t]],
                           dims[t] * sizeof(real))
    return bad


cdef inline void _add(real* dst, const real* src, int64_t d) noexcept nogil:
    cdef int64_t i
    for i in range(d):
        dst[i] += src[i]


cdef void _zero(real[::1] out) noexcept nogil:
    """out[:] = 0 with every thread (a dense gradient of a large table is
    bandwidth-bound on its zeroing, which one thread cannot saturate)."""
    cdef int64_t c, S = out.shape[0], step = 1 << 16
    cdef int nt = _threads(S)
    if S == 0:
        return
    for c in prange((S + step - 1) // step, schedule='static', num_threads=nt):
        memset(&out[c * step], 0, min(step, S - c * step) * sizeof(real))


def scatter_add(const real[:, ::1] grad, const index_t[:, ::1] idx,
                const int64_t[:, ::1] layout, real[::1] out, bint zero=True):
    """out[base[t] + idx[n, t]*dims[t] + i] += grad[n, cols[t] + i] for every n, t, i,
    after zeroing ``out`` if ``zero``. Returns -1, or (nothing written) the
    flat position of the first index outside its table, as gather."""
    cdef int64_t N = idx.shape[0], T = idx.shape[1], total = grad.shape[1]
    cdef int64_t S = out.shape[0]
    cdef int nt = _threads(N * total)
    cdef int64_t lines = (total + LINE - 1) // LINE
    cdef int tid
    cdef int64_t n, t, lo, hi, a, b, r0, bad
    cdef const int64_t[::1] base = layout[0], dims = layout[1], cols = layout[2]
    cdef const int64_t[::1] sizes = layout[3]
    with nogil:
        bad = _first_bad(idx, sizes)
        if bad < 0 and zero:
            _zero(out)
    if bad >= 0:
        return bad
    if N == 0 or total == 0:
        return -1
    if nt > 1 and lines >= 2:
        nt = <int>min(<int64_t>nt, lines)
        with nogil, parallel(num_threads=nt):
            tid = threadid()
            lo = min(lines * tid // nt * LINE, total)
            hi = min(lines * (tid + 1) // nt * LINE, total)
            for n in range(N):
                for t in range(T):
                    a = max(cols[t], lo)
                    b = min(cols[t] + dims[t], hi)
                    if a < b:
                        r0 = base[t] + idx[n, t] * dims[t] - cols[t]
                        _add(&out[r0 + a], &grad[n, a], b - a)
    elif nt > 1 and S >= nt * LINE:
        with nogil, parallel(num_threads=nt):
            tid = threadid()
            lo = S * tid // nt
            hi = S * (tid + 1) // nt
            for n in range(N):
                for t in range(T):
                    r0 = base[t] + idx[n, t] * dims[t]
                    if lo <= r0 < hi:         # a row belongs to the thread of its first float
                        _add(&out[r0], &grad[n, cols[t]], dims[t])
    else:
        with nogil:
            for n in range(N):
                for t in range(T):
                    _add(&out[base[t] + idx[n, t] * dims[t]], &grad[n, cols[t]], dims[t])
    return -1
