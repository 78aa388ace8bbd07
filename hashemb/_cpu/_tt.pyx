# cython: language_level=3
"""CPU kernels of the tensor-train (TT-Rec) embedding bag.

A row x of a TT table is the chain product G_0[x_0] G_1[x_1] ... G_{d-1}[x_{d-1}]
of core slices (core k has shape (p_k, R_k, q_k, R_{k+1})). hashemb.tt keeps,
for every lookup l, the partial product T_k[l] of the first k cores as a
(Q_k, R_k) matrix, Q_k = q_0 ... q_{k-1}. One chain step is

    T_{k+1}[l] (Q_k, q_k R_{k+1}) = T_k[l] (Q_k, R_k) @ G_k[x_k[l]] (R_k, q_k R_{k+1})

and every lookup with the same digit x_k multiplies by the same slice, so the
lookups are grouped by digit (a counting sort) and each group is one GEMM whose
rows are the groups' T_k rows, wherever they lie (_tt_gemm.h takes row
pointers). Backward mirrors it per group v of digit k:

    dT_k[l]  = dT_{k+1}[l] @ G_k[v]^T                  (nn, rows of the group)
    dG_k[v]  = sum_l T_k[l]^T dT_{k+1}[l]              (tn, one sum per group)

then writes dG_k[v] to the dense gradient or applies the fused SGD / Adagrad
step to G_k[v] at once: a slice is touched only by its own group, which one
thread owns, and G_k[v] is read (transposed copy) before it is updated.

Threads: forward splits groups into chunks of at most CHUNK_ROWS rows and
hands chunks out dynamically; backward hands out whole groups (a group's
gradient is one sum). Every result is deterministic and independent of the
thread count.
"""
from cython.parallel cimport prange, parallel
from libc.math cimport sqrt
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport malloc, free

ctypedef fused real:
    float
    double

cdef extern from "hashemb/openmp.h" nogil:
    int he_max_threads()
    int he_has_openmp()

cdef extern from "_tt_gemm.h" nogil:
    void he_tt_nn_f(int64_t M, int64_t N, int64_t K, const float* const* A,
                    const float* B, int64_t ldb, float* const* C, int add)
    void he_tt_nn_d(int64_t M, int64_t N, int64_t K, const double* const* A,
                    const double* B, int64_t ldb, double* const* C, int add)
    void he_tt_tn_f(int64_t M, int64_t N, int64_t K, const float* const* A,
                    const float* const* D, float* C, int64_t ldc, int add)
    void he_tt_tn_d(int64_t M, int64_t N, int64_t K, const double* const* A,
                    const double* const* D, double* C, int64_t ldc, int add)

DEF CHUNK_ROWS = 128     # rows of one forward work item (a multiple of the 4-row tile)
DEF SMALL = 1 << 17      # multiply-adds below which one thread wins (a parallel
                         # region costs more; next to torch's pool it only contends)

cdef enum:
    OPT_NONE = 0
    OPT_SGD = 1
    OPT_ADAGRAD = 2


def has_openmp():
    return bool(he_has_openmp())


cdef inline int _threads(int64_t work) noexcept nogil:
    return 1 if work < SMALL else he_max_threads()


cdef inline void _nn(int64_t M, int64_t N, int64_t K, const real** A, const real* B,
                     int64_t ldb, real** C, int add) noexcept nogil:
    if real is float:
        he_tt_nn_f(M, N, K, A, B, ldb, C, add)
    else:
        he_tt_nn_d(M, N, K, A, B, ldb, C, add)


cdef inline void _tn(int64_t M, int64_t N, int64_t K, const real** A, const real** D,
                     real* C, int64_t ldc, int add) noexcept nogil:
    if real is float:
        he_tt_tn_f(M, N, K, A, D, C, ldc, add)
    else:
        he_tt_tn_d(M, N, K, A, D, C, ldc, add)


def group_by(const int64_t[::1] digit, int64_t p, int64_t[::1] perm, int64_t[::1] start):
    """Counting sort: perm lists the lookups by digit (stable), group v is
    perm[start[v]:start[v+1]]; start has p + 1 entries."""
    cdef int64_t L = digit.shape[0], l, v
    with nogil:
        for v in range(p + 1):
            start[v] = 0
        for l in range(L):
            start[digit[l] + 1] += 1
        for v in range(p):
            start[v + 1] += start[v]
        for l in range(L):
            v = digit[l]
            perm[start[v]] = l
            start[v] += 1
        for v in range(p, 0, -1):
            start[v] = start[v - 1]
        start[0] = 0


def digits(const int64_t[::1] rows, const int64_t[::1] p, int64_t[:, ::1] out):
    """out[k, l] = k-th mixed-radix digit of rows[l] (most significant first)."""
    cdef int64_t L = rows.shape[0], d = p.shape[0], l, k, x
    with nogil:
        for l in range(L):
            x = rows[l]
            for k in range(d - 1, -1, -1):
                out[k, l] = x % p[k]
                x = x // p[k]


cdef int64_t _chunks(const int64_t[::1] start, int64_t per, int64_t* cs, int64_t* cv) noexcept nogil:
    """Split every group into runs of at most ``per`` lookups; fills the start
    (position in perm) and group of each run when cs is not NULL; returns
    the number of runs."""
    cdef int64_t v, a, n = 0
    for v in range(start.shape[0] - 1):
        a = start[v]
        while a < start[v + 1]:
            if cs != NULL:
                cs[n] = a
                cv[n] = v
            n += 1
            a += per
    return n


def step_forward(const real[::1] A, const int64_t[::1] a_off, const real[::1] core,
                 int64_t R, int64_t N, const int64_t[::1] perm, const int64_t[::1] start,
                 int64_t Q, real[::1] out):
    """out[l] (Q, N) = A[a_off[l]:] (Q, R) @ core[v*R*N:] (R, N), v the group of l;
    out[l] starts at l*Q*N."""
    cdef int64_t L = perm.shape[0], per = max(1, CHUNK_ROWS // Q), nc, c, a, b, j, i, l, v, m
    cdef int64_t* cs
    cdef int64_t* cv
    cdef const real** Ap
    cdef real** Cp
    cdef int nt
    if L == 0 or N == 0:
        return
    nc = _chunks(start, per, NULL, NULL)
    cs = <int64_t*>malloc(2 * nc * sizeof(int64_t))
    cv = cs + nc
    _chunks(start, per, cs, cv)
    nt = _threads(L * Q * R * N)
    with nogil, parallel(num_threads=nt):
        Ap = <const real**>malloc(per * Q * sizeof(real*))
        Cp = <real**>malloc(per * Q * sizeof(real*))
        for c in prange(nc, schedule='dynamic'):
            a = cs[c]
            v = cv[c]
            b = min(a + per, start[v + 1])
            m = 0
            for j in range(a, b):
                l = perm[j]
                for i in range(Q):
                    Ap[m] = &A[a_off[l] + i * R]
                    Cp[m] = &out[(l * Q + i) * N]
                    m = m + 1
            _nn(m, N, R, Ap, &core[v * R * N], N, Cp, 0)
        free(Ap)
        free(Cp)
    free(cs)


cdef inline void _apply(real* w, real* g, real* state, int64_t n, int opt, real lr,
                        real eps) noexcept nogil:
    """The update of one slice from its whole gradient g (n values)."""
    cdef int64_t i
    if opt == OPT_SGD:
        for i in range(n):
            w[i] -= lr * g[i]
    else:
        for i in range(n):
            state[i] += g[i] * g[i]
            w[i] -= lr * g[i] / (sqrt(state[i]) + eps)


def step_backward(const real[::1] A, const int64_t[::1] a_off, const real[::1] dC,
                  real[::1] core, int64_t R, int64_t N, const int64_t[::1] perm,
                  const int64_t[::1] start, int64_t Q, real[::1] dA, real[::1] grad,
                  int opt, double lr, double eps, real[::1] state):
    """Backward of step_forward for dC = d out: dA[l] (Q, R) at l*Q*R (skipped
    when dA is empty) and the slice gradients sum_l A[l]^T dC[l] of the
    touched groups, written to grad[v*R*N:] (opt 0; the rest of grad is left
    alone) or applied to core in place (opt 1 SGD, 2 Adagrad with state)."""
    cdef int64_t L = perm.shape[0], per = max(1, CHUNK_ROWS // Q), P = start.shape[0] - 1
    cdef int64_t RN = R * N, v, a, b, j, i, l, m, s, t
    cdef bint want_dA = dA.shape[0] > 0
    cdef bint flip = N < 8 and R > N      # narrow N: sum dG^T (R wide) instead
    cdef const real** Ap
    cdef const real** Dp
    cdef real** Cp
    cdef real* Gt
    cdef real* G
    cdef real* H
    cdef int nt
    if L == 0 or RN == 0:
        return
    nt = _threads(L * Q * RN * 2)
    with nogil, parallel(num_threads=nt):
        Ap = <const real**>malloc(per * Q * sizeof(real*))
        Dp = <const real**>malloc(per * Q * sizeof(real*))
        Cp = <real**>malloc(per * Q * sizeof(real*))
        Gt = <real*>malloc(3 * RN * sizeof(real))
        G = Gt + RN
        H = G + RN
        for v in prange(P, schedule='dynamic'):
            if start[v] == start[v + 1]:
                continue
            if want_dA:
                for s in range(R):            # Gt (N, R) = core[v]^T
                    for t in range(N):
                        Gt[t * R + s] = core[v * RN + s * N + t]
            a = start[v]
            while a < start[v + 1]:
                b = min(a + per, start[v + 1])
                m = 0
                for j in range(a, b):
                    l = perm[j]
                    for i in range(Q):
                        Ap[m] = &A[a_off[l] + i * R]
                        Dp[m] = &dC[(l * Q + i) * N]
                        Cp[m] = &dA[(l * Q + i) * R] if want_dA else NULL
                        m = m + 1
                if want_dA:
                    _nn(m, R, N, Dp, Gt, R, Cp, 0)
                if flip:                       # H (N, R) = sum dC^T A, then G = H^T
                    _tn(N, R, m, Dp, Ap, H, R, a > start[v])
                else:
                    _tn(R, N, m, Ap, Dp, G, N, a > start[v])
                a = b
            if flip:
                for s in range(R):
                    for t in range(N):
                        G[s * N + t] = H[t * R + s]
            if opt == OPT_NONE:
                for s in range(RN):
                    grad[v * RN + s] = G[s]
            else:
                _apply(&core[v * RN], G, &state[v * RN] if opt == OPT_ADAGRAD else NULL,
                       RN, opt, <real>lr, <real>eps)
        free(Ap)
        free(Dp)
        free(Cp)
        free(Gt)


def first_backward(const real[::1] dT, real[::1] core, int64_t S,
                   const int64_t[::1] perm, const int64_t[::1] start, real[::1] grad,
                   int opt, double lr, double eps, real[::1] state):
    """Core 0: its slice v (S = q_0 R_1 values) gets sum of dT[l] over group v."""
    cdef int64_t P = start.shape[0] - 1, v, j, s, l
    cdef real* G
    cdef int nt = _threads(perm.shape[0] * S * 8)
    if perm.shape[0] == 0 or S == 0:
        return
    with nogil, parallel(num_threads=nt):
        G = <real*>malloc(S * sizeof(real))
        for v in prange(P, schedule='dynamic'):
            if start[v] == start[v + 1]:
                continue
            for s in range(S):
                G[s] = 0
            for j in range(start[v], start[v + 1]):
                l = perm[j]
                for s in range(S):
                    G[s] += dT[l * S + s]
            if opt == OPT_NONE:
                for s in range(S):
                    grad[v * S + s] = G[s]
            else:
                _apply(&core[v * S], G, &state[v * S] if opt == OPT_ADAGRAD else NULL,
                       S, opt, <real>lr, <real>eps)
        free(G)


def pool(const real[:, ::1] Y, const real[:, ::1] cache, const int64_t[::1] src,
         const int64_t[::1] off, const real[::1] psw, int mean, real[:, ::1] out,
         int64_t col0):
    """out[b, col0:col0+D] = sum_{n in bag b} w_n row(n), row(n) = Y[src[n]]
    (src >= 0) or cache[-src[n]-1]; w_n = psw[n], 1/|bag| (mean) or 1."""
    cdef int64_t B = off.shape[0] - 1, D = Y.shape[1], b, n, i, cnt
    cdef bint has_w = psw.shape[0] > 0
    cdef const real* row
    cdef real w
    cdef int nt = _threads(src.shape[0] * D * 4)
    with nogil:
        for b in prange(B, schedule='static', num_threads=nt):
            for i in range(D):
                out[b, col0 + i] = 0
            cnt = off[b + 1] - off[b]
            for n in range(off[b], off[b + 1]):
                row = &Y[src[n], 0] if src[n] >= 0 else &cache[-src[n] - 1, 0]
                w = psw[n] if has_w else (<real>1 / cnt if mean else 1)
                for i in range(D):
                    out[b, col0 + i] += w * row[i]


def unpool(const real[:, ::1] g, int64_t col0, const int64_t[::1] bag,
           const real[::1] psw, const int64_t[::1] cnt, int mean,
           const int64_t[::1] order, const int64_t[::1] ustart, real[:, ::1] dY):
    """dY[u] = sum over the lookups n of unique row u (order[ustart[u]:ustart[u+1]])
    of w_n g[bag[n], col0:col0+D]."""
    cdef int64_t U = ustart.shape[0] - 1, D = dY.shape[1], u, j, n, i
    cdef bint has_w = psw.shape[0] > 0
    cdef real w
    cdef const real* gr
    cdef int nt = _threads(order.shape[0] * D * 4)
    with nogil:
        for u in prange(U, schedule='static', num_threads=nt):
            for i in range(D):
                dY[u, i] = 0
            for j in range(ustart[u], ustart[u + 1]):
                n = order[j]
                w = psw[n] if has_w else (<real>1 / cnt[bag[n]] if mean else 1)
                gr = &g[bag[n], col0]
                for i in range(D):
                    dY[u, i] += w * gr[i]


cdef inline uint64_t _mix(uint64_t x) noexcept nogil:
    """splitmix64 finaliser: spreads consecutive row ids over the table."""
    x = (x ^ (x >> 30)) * <uint64_t>0xbf58476d1ce4e5b9ULL
    x = (x ^ (x >> 27)) * <uint64_t>0x94d049bb133111ebULL
    return x ^ (x >> 31)


def count(const int64_t[::1] rows, int64_t[::1] keys, int64_t[::1] freq):
    """LFU frequencies: freq[slot of row] += 1 for every row, in a linear-probing
    table (keys -1 = empty). A row not yet present when the table is full is
    not counted. Returns how many were dropped that way."""
    cdef int64_t S = keys.shape[0], n, j, probe, x, dropped = 0
    with nogil:
        for n in range(rows.shape[0]):
            x = rows[n]
            j = <int64_t>(_mix(<uint64_t>x) % <uint64_t>S)
            for probe in range(S):
                if keys[j] == x:
                    freq[j] += 1
                    break
                if keys[j] == -1:
                    keys[j] = x
                    freq[j] = 1
                    break
                j = j + 1
                if j == S:
                    j = 0
            else:
                dropped += 1
    return dropped
