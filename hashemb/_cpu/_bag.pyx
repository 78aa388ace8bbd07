# cython: language_level=3
"""CPU bag kernels: gather-pool forward and scatter-add backward for every scheme.

One kernel family serves all schemes: a kernel walks the bag entries and asks
slots.h for the start of each contiguous run of a row; it never builds an
(N x D) slot array. Forward parallelises over samples (each thread owns whole
output rows). Backward partitions the *slots* among threads: a thread walks
the entries (those bucketed to it) in order and adds only into its own slot
range, so each slot sums its contributions in entry order, whatever the
thread count: results are bitwise deterministic and no thread writes where
another does. Rows of a few runs (full tables, ROBE-Z with Z >= D / 4) given
their run starts take one thread's tight walk (_add_runs), in the same order.
"""
from cython.parallel cimport prange, parallel, threadid
from libc.math cimport sqrt
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, malloc, free
from libc.string cimport memcpy

from hashemb._cpu._slots cimport (SchemeView, he_scheme, HE_FULL, he_row, he_row_begin, he_reads_map,
                                  he_row_data, he_table_probe, he_row_probe, he_probe_hint,
                                  he_row_begin_probed, he_tterm, he_table_term, he_row_begin_t,
                                  he_sign_base, he_run_start, he_run_starts, he_run_slot, he_sign,
                                  he_signs, he_sign_rows, HE_SIGN_ROWS,
                                  he_one_run_k, he_one_run, he_one_run_of, he_one_run_starts,
                                  he_rows_k, he_rows_of, he_rows_starts, HE_ROWS_EACH,
                                  he_max_threads)

ctypedef fused real:
    float
    double

ctypedef fused index_t:
    int32_t
    int64_t

# pooling modes (hashemb/_validate.py MODES order)
cdef enum:
    SUM = 0
    MEAN = 1
    MAX = 2

# what backward does at a slot
cdef enum:
    ACT_ADD = 0       # target[slot] += alpha * g  (gradient, or SGD with alpha=-lr)
    ACT_ADAGRAD = 1   # apply Adagrad where the gradient scratch is non-zero, clear it

# a full table's two-phase step summed per row (_rows_owned), applied
cdef enum:
    ROWS_NONE = 0     # (a dense scratch, or none)
    ROWS_SLOT = 1     # per element: Adagrad's rule, or float16 SGD
    ROWS_ROW = 2      # row-wise Adagrad, one accumulator per row


cdef extern from *:
    """
    #define he_prefetch(p) __builtin_prefetch((const void*)(p), 0, 1)
    #define he_prefetch_w(p) __builtin_prefetch((const void*)(p), 1, 1)
    /* A line to be written, taken owned (prefetchw), where the CPU has the
       instruction (CPUID 0x80000001 ECX bit 8: AMD, Intel since Broadwell);
       else the write prefetch the compiler emits (prefetcht2 on x86-64, as
       he_prefetch_w; PRFM PST on Arm). A step's forward has just read the
       compressed array on every thread, so the backward's adds hit lines
       other cores share, and a store to a shared line waits for their
       copies to be invalidated; prefetchw does that ahead. RobeZ Z=16 SGD at batch 2048
       x 26 on 2 cores: 1.26-1.41x the step (session 33). In the rows path
       (rows of a 2 GB table, in no core's cache) it measured 8-10% slower:
       there he_prefetch_w. */
    #if defined(__x86_64__)
    #include <cpuid.h>
    static int he_prfchw_seen;      /* 0 not asked yet, 1 no, 2 yes */
    static inline int he_prfchw(void)
    {
        int v = __atomic_load_n(&he_prfchw_seen, __ATOMIC_RELAXED);
        if (!v) {
            unsigned a, b, c = 0, d;
            v = __get_cpuid(0x80000001u, &a, &b, &c, &d) && (c & (1u << 8)) ? 2 : 1;
            __atomic_store_n(&he_prfchw_seen, v, __ATOMIC_RELAXED);
        }
        return v == 2;
    }
    #define he_prefetch_own(own, p) do {                                         \
            if (own)                                                             \
                __asm__ __volatile__("prefetchw %0" : : "m"(*(const char*)(p))); \
            else                                                                 \
                __builtin_prefetch((const void*)(p), 1, 1);                      \
        } while (0)
    #else
    static inline int he_prfchw(void) { return 0; }
    #define he_prefetch_own(own, p) ((void)(own), __builtin_prefetch((const void*)(p), 1, 1))
    #endif
    /* y[:n] (+)= a * x[:n] for a run of the array and a gradient or output row,
       which never overlap: restrict drops the compiler's runtime alias checks
       (they cost more than a 16-float run's arithmetic), and the common run
       lengths get fixed trip counts. Elementwise the same arithmetic as a loop. */
    #define HE_AXPY(T, name, op)                                                  \
        static inline void name(T* __restrict y, const T* __restrict x, T a,     \
                                int64_t n)                                       \
        {                                                                        \
            int64_t i;                                                           \
            if (n == 16) { for (i = 0; i < 16; i++) y[i] op a * x[i]; return; }  \
            if (n == 8) { for (i = 0; i < 8; i++) y[i] op a * x[i]; return; }    \
            if (n == 32) { for (i = 0; i < 32; i++) y[i] op a * x[i]; return; }  \
            if (n == 4) { for (i = 0; i < 4; i++) y[i] op a * x[i]; return; }    \
            for (i = 0; i < n; i++) y[i] op a * x[i];                            \
        }
    /* T[st[k]] += a * g[k] for k < n: a row of runs of one float (HashedNet)
       into the whole array, in order (two of its slots may be one). */
    #define HE_SCATTER(T_, name)                                                  \
        static inline void name(T_* __restrict t, const uint64_t* __restrict st,  \
                                const T_* __restrict g, T_ a, int64_t n)          \
        {                                                                        \
            int64_t k;                                                           \
            if (n == 16) { for (k = 0; k < 16; k++) t[st[k]] += a * g[k]; return; } \
            for (k = 0; k < n; k++) t[st[k]] += a * g[k];                        \
        }
    HE_SCATTER(float, he_scatter_f)
    HE_SCATTER(double, he_scatter_d)
    /* The same, only the slots in [lo, hi) (one thread's share): the others'
       adds go to a scratch of 8 (spare[k mod 8]) instead of a branch, which a
       random slot would mispredict half the time. */
    #define HE_SCATTER_IN(T_, name)                                               \
        static inline void name(T_* __restrict t, const uint64_t* __restrict st,  \
                                const T_* __restrict g, T_ a, int64_t n,          \
                                uint64_t lo, uint64_t hi, T_* __restrict spare)   \
        {                                                                        \
            int64_t k;                                                           \
            for (k = 0; k < n; k++) {                                            \
                T_* p = st[k] - lo < hi - lo ? t + st[k] : spare + (k & 7);      \
                *p += a * g[k];                                                  \
            }                                                                    \
        }
    HE_SCATTER_IN(float, he_scatter_in_f)
    HE_SCATTER_IN(double, he_scatter_in_d)
    /* he_prefetch_own of n values' lines, A + st[k] (el bytes each): a
       HashedNet row's slots, taken owned a few entries before its adds
       (the step: 3.57 -> 3.01 ms at batch 2048 x 26, session 33; a signed
       scheme's bags of 8 read 7% slower with it, so they go without);
       nothing where the CPU has no prefetchw */
    static inline void he_prefetch_own_slots(const void* A, size_t el, const uint64_t* st,
                                             int64_t n)
    {
        int64_t k;
        if (!he_prfchw())   /* a read prefetch of 16 lines an entry cost more than it saved */
            return;
        for (k = 0; k < n; k++)
            he_prefetch_own(1, (const char*)A + st[k] * el);
    }
    /* Prefetch n runs of values of type T from A + st[g]: the first line
       and, unless every run is one whole line (tail 0), the value tail on
       (a run may straddle two lines); four a step (the loop's count and
       branch cost about what a prefetch does). Returns the largest start
       where top (whether a run wraps past the array's end), else 0. */
    #define HE_PF_STEP(g)                                                         \
        {                                                                         \
            he_prefetch(A + st[g]);                                               \
            if (tail)                                                             \
                he_prefetch(A + st[g] + tail);                                    \
            if (top)                                                              \
                t = st[g] > t ? st[g] : t;                                        \
        }
    #define HE_PF_LOOP                                                            \
        for (; g + 4 <= n; g += 4) {                                              \
            HE_PF_STEP(g) HE_PF_STEP(g + 1) HE_PF_STEP(g + 2) HE_PF_STEP(g + 3)   \
        }                                                                         \
        for (; g < n; g++)                                                        \
            HE_PF_STEP(g)
    #define HE_PREFETCH_RUNS(T, name)                                             \
        static inline uint64_t name(const T* A, const uint64_t* st, int64_t n,    \
                                    int64_t tail, int top)                        \
        {                                                                         \
            uint64_t t = 0;                                                       \
            int64_t g = 0;                                                        \
            if (tail == 0 && !top) {    /* the cases as loops of their own */     \
                HE_PF_LOOP                                                        \
            } else if (!top) {                                                    \
                HE_PF_LOOP                                                        \
            } else {                                                              \
                HE_PF_LOOP                                                        \
            }                                                                     \
            return t;                                                             \
        }
    HE_PREFETCH_RUNS(float, he_prefetch_runs_f)
    HE_PREFETCH_RUNS(double, he_prefetch_runs_d)
    HE_PREFETCH_RUNS(uint16_t, he_prefetch_runs_h)
    #undef HE_PREFETCH_RUNS
    #undef HE_PF_LOOP
    #undef HE_PF_STEP
    HE_AXPY(float, he_axpy_f, +=)
    HE_AXPY(double, he_axpy_d, +=)
    HE_AXPY(float, he_scal_f, =)
    HE_AXPY(double, he_scal_d, =)
    /* o[g * ostride + i] = sg[g * D + i] * M[st[g] + i] for g < n, i < D:
       signed rows of one run that does not wrap, each times its signs (the
       general loop's products, w = 1 dropped: 1 * v is v) */
    #define HE_SIGNED_ROWS(T, name, attrs)                                        \
        attrs void name(T* __restrict o, int64_t ostride,                        \
                                const T* __restrict M, const uint64_t* st,       \
                                const float* __restrict sg, int64_t n, int64_t D) \
        {                                                                        \
            for (int64_t g = 0; g < n; g++) {                                    \
                T* __restrict y = o + g * ostride;                               \
                const T* __restrict x = M + st[g];                               \
                const float* __restrict z = sg + g * D;                          \
                if (D == 16) { for (int i = 0; i < 16; i++) y[i] = z[i] * x[i]; continue; } \
                for (int64_t i = 0; i < D; i++) y[i] = z[i] * x[i];              \
            }                                                                    \
        }
    HE_SIGNED_ROWS(float, he_signed_rows_gen_f, static inline)
    HE_SIGNED_ROWS(double, he_signed_rows_d, static inline)
    /* y[:n] += term(i) for a signed run that does not wrap: a forward's
       a * (sg * x) (the general loop's products), or a gradient's
       (a * sg) * x into the array where the whole run is the thread's */
    #define HE_SIGNED_RUN(T, name, term)                                          \
        static inline void name(T* __restrict y, const T* __restrict x,          \
                                const float* __restrict sg, T a, int64_t n)      \
        {                                                                        \
            int64_t i;                                                           \
            if (n == 16) { for (i = 0; i < 16; i++) y[i] += term; return; }      \
            for (i = 0; i < n; i++) y[i] += term;                                \
        }
    HE_SIGNED_RUN(float, he_add_signed_f, a * (sg[i] * x[i]))
    HE_SIGNED_RUN(double, he_add_signed_d, a * (sg[i] * x[i]))
    HE_SIGNED_RUN(float, he_scatter_signed_f, a * sg[i] * x[i])
    HE_SIGNED_RUN(double, he_scatter_signed_d, a * sg[i] * x[i])
    /* Signed float32 rows eight floats a step where the CPU has AVX (the
       same loop compiled for it; no FMA): a call a chunk of rows (a call a
       run costs more than AVX saves there) */
    #if defined(HE_X86_VECTOR)
    HE_SIGNED_ROWS(float, he_signed_rows_avx, __attribute__((target("avx"))) static)
    #endif
    static inline void he_signed_rows_f(float* o, int64_t ostride, const float* M,
                                        const uint64_t* st, const float* sg, int64_t n,
                                        int64_t D)
    {
    #if defined(HE_X86_VECTOR)
        if (he_x86() & 1) {
            he_signed_rows_avx(o, ostride, M, st, sg, n, D);
            return;
        }
    #endif
        he_signed_rows_gen_f(o, ostride, M, st, sg, n, D);
    }

    enum { HE_AHEAD = 8 };  /* entries (rows) hashed and prefetched this far ahead */
    /* Backward's add over the whole array for rows of R runs of L floats (no
       padding, unsigned), given every entry's run starts pre: entry j of bag
       q = t B + b adds w psw[j] times run k of the bag's gradient row (the
       row of T blocks of D at grad + b gstride + t D) into the run from
       slot pre[j R + k] (circular in m), in entry order, then run order:
       the general walk's order, so the same bits (w = alpha, over the bag's
       entries where mean). The general walk's tests per run (padding, signs,
       max mode, thread ranges) cost more than a run's add. In C for the
       attributes: a copy for each case, none inlined into another, so that
       each keeps its registers (gcc, given one Cython function with the
       cases inlined, spilled three of them in the case of one run). */
    /* one case of HE_ADD_RUNS: rows of R_ runs of L_ floats (constants but
       for the general case's L) */
    #define HE_ADD_CASE(T_, fn, of, R_, L_)                                       \
        __attribute__((noinline)) static void fn(                                \
            const uint64_t* pre, const int64_t* off, const T_* psw, const T_* grad, \
            int64_t gstride, int64_t B, int64_t T, int64_t D, int mean, T_ alpha,  \
            T_* target, uint64_t m, int64_t L)                                   \
        {                                                                        \
            of(pre, off, psw, grad, gstride, B, T, D, mean, alpha, target, m, R_, L_); \
        }
    #define HE_ADD_RUNS(T_, name, axpy)                                           \
        __attribute__((always_inline)) static inline void name##_of(             \
            const uint64_t* __restrict pre, const int64_t* __restrict off,       \
            const T_* psw, const T_* grad, int64_t gstride, int64_t B,           \
            int64_t T, int64_t D, int mean, T_ alpha, T_* __restrict target,     \
            uint64_t m, int64_t R, int64_t L)                                    \
        {                                                                        \
            int64_t t, b, j, k, i, nent = off[T * B];                            \
            const int own = he_prfchw();                                         \
            for (t = 0; t < T; t++)                                              \
                for (b = 0; b < B; b++) {                                        \
                    const int64_t q = t * B + b;                                 \
                    const T_* g = grad + b * gstride + t * D;                    \
                    T_ w = alpha, ww;                                            \
                    if (b + HE_AHEAD < B) {                                      \
                        /* gradient rows are gstride apart: a stride the      */ \
                        /* hardware prefetcher loses at every page           */ \
                        he_prefetch(g + HE_AHEAD * gstride);                     \
                        he_prefetch(g + HE_AHEAD * gstride + D - 1);             \
                    }                                                            \
                    if (mean && off[q + 1] - off[q] > 1)                         \
                        w = alpha / (off[q + 1] - off[q]);                       \
                    ww = w;                                                      \
                    for (j = off[q]; j < off[q + 1]; j++) {                      \
                        if (__builtin_expect(j + HE_AHEAD < nent, 1))  /* random lines */ \
                            for (k = 0; k < R; k++) {                            \
                                he_prefetch_own(own, target + pre[(j + HE_AHEAD) * R + k]); \
                                he_prefetch_own(own, target + pre[(j + HE_AHEAD) * R + k] + L - 1); \
                            }                                                    \
                        if (psw)                                                 \
                            ww = w * psw[j];                                     \
                        for (k = 0; k < R; k++) {                                \
                            const uint64_t st = pre[j * R + k];                  \
                            if (__builtin_expect(st + (uint64_t)L <= m, 1))      \
                                axpy(target + st, g + k * L, ww, L);             \
                            else    /* the run wraps past the array's end */     \
                                for (i = 0; i < L; i++)                          \
                                    target[he_wrap(st, i, m)] += ww * g[k * L + i]; \
                        }                                                        \
                    }                                                            \
                }                                                                \
        }                                                                        \
        HE_ADD_CASE(T_, name##_1, name##_of, 1, D)                                \
        HE_ADD_CASE(T_, name##_4, name##_of, D / 4, 4)                            \
        HE_ADD_CASE(T_, name##_n, name##_of, D / L, L)                            \
        static inline void name(const uint64_t* pre, const int64_t* off, const T_* psw, \
                                const T_* grad, int64_t gstride, int64_t B, int64_t T,  \
                                int64_t D, int mean, T_ alpha, T_* target, uint64_t m,  \
                                int64_t L)                                       \
        {                                                                        \
            (L == D ? name##_1 : L == 4 ? name##_4 : name##_n)(                  \
                pre, off, psw, grad, gstride, B, T, D, mean, alpha, target, m, L);  \
        }
    HE_ADD_RUNS(float, he_add_back_f, he_axpy_f)
    HE_ADD_RUNS(double, he_add_back_d, he_axpy_d)

    /* y[:D] += w[g] * row g for g < n, in order (w NULL: plain adds; first:
       y taken as zeros, not read): one bag's rows (float32), the bag's sum
       kept in registers instead of stored and reloaded after every row. A
       multiply, then an add, in the same order: he_axpy_f's arithmetic (an
       add of x is a 1 * x's), so the same bits. he_add_rows_f: rows of one
       run, row g at M + st[g], D a multiple of 8, with AVX2 (D = 16: two
       independent chains). he_add_runs_f: rows of R = D / L runs, run k of
       row g at M + st[g * R + k], none wrapping: runs of a multiple of 8
       floats with AVX2, runs of 4 (ROBE-Z, Z = 4) and of 1 (HashedNet) in C
       over a small accumulator array, which the compiler keeps in
       registers. Each takes a segment's bags (HE_SEG_WALK); callers ask
       he_sums_take first. */
    /* A segment's bags (the sums below): entries j..z-1, entry j's run
       starts at st (R a row), bag b first (its entries from off[b], which
       may be before j: its row then holds its sum so far), each bag's
       entries of the segment summed by one `bag` (y its row, w its weights
       or NULL, n entries, first: its first entry is among them, y not
       read). Returns the last bag. */
    #define HE_SEG_WALK(bag)                                                      \
        while (j < z) {                                                           \
            while (off[b + 1] <= j)                                               \
                b++;                                                              \
            {                                                                     \
                const int64_t e_ = off[b + 1] < z ? off[b + 1] : z, n = e_ - j;   \
                float* y = o + b * ostride;                                       \
                const float* w = psw ? psw + j : 0;                               \
                const int first = j == off[b];                                    \
                bag;                                                              \
                st += n * R;                                                      \
                if (sg)                                                           \
                    sg += n * D;                                                  \
                j = e_;                                                           \
            }                                                                     \
        }                                                                         \
        return b;
    #define HE_SEG_ARGS float* o, int64_t ostride, const uint64_t* st, const int64_t* off, \
                        int64_t b, int64_t j, int64_t z, const float* psw, const float* sg
    /* Whether the AVX2 sums take float32 rows of D values in runs of L */
    static inline int he_runs_avx2(int64_t D, int64_t L)
    {
    #if defined(HE_X86_VECTOR)
        return (L % 8 == 0 || (L == 1 && D % 8 == 0)) && (he_x86() & 2);
    #else
        return 0;
    #endif
    }
    /* Whether the C sums below take rows of D values in runs of L (half:
       a 16-bit array): he_add_rows_f, he_add_runs_f and he_add_runs16 are
       called only where this says so. */
    static inline int he_sums_take(int64_t D, int64_t L, int half)
    {
        if (half)
            return L % 8 == 0 && he_runs_avx2(D, L);
        if (L == D)
            return D % 8 == 0 && he_runs_avx2(D, L);
        return he_runs_avx2(D, L) || ((L == 1 || L == 4) && D % 4 == 0);
    }
    #if defined(HE_X86_VECTOR)
    /* Eight values of array A from element i, as floats (fmt 0: float32; 1:
       float16, F16C's conversion; 2: bfloat16, a shift): exact, as he_s2f. */
    __attribute__((target("avx2,f16c"), always_inline)) static inline __m256 he_load8(
        const void* A, uint64_t i, int fmt)
    {
        __m128i h;
        if (fmt == 0)
            return _mm256_loadu_ps((const float*)A + i);
        h = _mm_loadu_si128((const __m128i*)((const uint16_t*)A + i));
        return fmt == 2 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                        : _mm256_cvtph_ps(h);
    }
    /* Eight floats M[q[0]], .., M[q[7]] (runs of one float: HashedNet): two
       four-lane gathers by the 64-bit run starts. */
    __attribute__((target("avx2"), always_inline)) static inline __m256 he_gather8(
        const float* M, const uint64_t* q)
    {
        const __m128 lo = _mm256_i64gather_ps(M, _mm256_loadu_si256((const __m256i*)q), 4);
        const __m128 hi = _mm256_i64gather_ps(M, _mm256_loadu_si256((const __m256i*)(q + 4)), 4);
        return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
    }
    /* sg[k:k+8] * x, a signed row's eight values times their signs (sg
       NULL: x) */
    __attribute__((target("avx"), always_inline)) static inline __m256 he_sgn8(
        __m256 x, const float* sg, int64_t k)
    {
        return sg ? _mm256_mul_ps(_mm256_loadu_ps(sg + k), x) : x;
    }
    /* a + w[g] * x (w NULL: a + x): one row's step of a bag's sum */
    __attribute__((target("avx"), always_inline)) static inline __m256 he_wadd8(
        __m256 a, __m256 x, const float* w, int64_t g)
    {
        return _mm256_add_ps(a, w ? _mm256_mul_ps(_mm256_set1_ps(w[g]), x) : x);
    }
    /* The bag sum of an array A of format fmt, runs of L (a multiple of 8)
       values, D = 16 as two chains; one (rows of one run, L = D) and fmt are
       constants where it is inlined, so each caller gets its own loop. sg:
       a signed bag's signs, D a row (each value times its sign, then the
       weight: the general loop's products), or NULL. */
    __attribute__((target("avx2,f16c"), always_inline)) static inline void he_add_of(
        float* y, const void* A, const uint64_t* st, const float* w, int64_t n, int64_t D,
        int64_t L, int fmt, int one, int first, const float* sg)
    {
        const int64_t R = one ? 1 : D / L;
        int64_t g, c;
        if (D == 16 && L == 1 && fmt == 0) {     /* element-wise rows, gathered */
            __m256 a0 = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y);
            __m256 a1 = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + 8);
            for (g = 0; g < n; g++) {
                a0 = he_wadd8(a0, he_sgn8(he_gather8((const float*)A, st + g * 16), sg, g * 16),
                              w, g);
                a1 = he_wadd8(a1, he_sgn8(he_gather8((const float*)A, st + g * 16 + 8), sg,
                                          g * 16 + 8), w, g);
            }
            _mm256_storeu_ps(y, a0);
            _mm256_storeu_ps(y + 8, a1);
            return;
        }
        if (D == 16) {
            __m256 a0 = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y);
            __m256 a1 = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + 8);
            for (g = 0; g < n; g++) {
                a0 = he_wadd8(a0, he_sgn8(he_load8(A, st[g * R], fmt), sg, g * 16), w, g);
                a1 = he_wadd8(a1, he_sgn8(he_load8(A, R == 1 ? st[g] + 8 : st[g * R + 1], fmt),
                                          sg, g * 16 + 8), w, g);
            }
            _mm256_storeu_ps(y, a0);
            _mm256_storeu_ps(y + 8, a1);
            return;
        }
        for (c = 0; c < D; c += 8) {
            __m256 a = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + c);
            for (g = 0; g < n; g++)
                a = he_wadd8(a, he_sgn8(L == 1 && fmt == 0
                                            ? he_gather8((const float*)A, st + g * R + c)
                                            : he_load8(A, one ? st[g] + c
                                                              : st[g * R + c / L] + c % L, fmt),
                                        sg, g * D + c), w, g);
            _mm256_storeu_ps(y + c, a);
        }
    }
    __attribute__((target("avx2,f16c"))) static int64_t he_add_rows_avx2(
        HE_SEG_ARGS, const float* M, int64_t D)
    {
        const int64_t R = 1;
        if (sg) {       /* (a walk of its own: the unsigned one tests no signs) */
            HE_SEG_WALK(he_add_of(y, M, st, w, n, D, D, 0, 1, first, sg))
        }
        HE_SEG_WALK(he_add_of(y, M, st, w, n, D, D, 0, 1, first, 0))
    }
    /* (a walk of its own for each format and for runs of one float) */
    __attribute__((target("avx2,f16c"))) static int64_t he_add_runs_avx2(
        HE_SEG_ARGS, const void* A, int64_t D, int64_t L, int fmt)
    {
        const int64_t R = D / L;
        if (sg) {       /* signed: any format, one walk (a runs-of-one-float one) */
            if (L == 1 && fmt == 0) {
                HE_SEG_WALK(he_add_of(y, A, st, w, n, D, 1, 0, 0, first, sg))
            }
            HE_SEG_WALK(he_add_of(y, A, st, w, n, D, L, fmt, 0, first, sg))
        }
        if (fmt == 2) {
            HE_SEG_WALK(he_add_of(y, A, st, w, n, D, L, 2, 0, first, 0))
        } else if (fmt == 1) {
            HE_SEG_WALK(he_add_of(y, A, st, w, n, D, L, 1, 0, first, 0))
        } else if (L == 1) {
            HE_SEG_WALK(he_add_of(y, A, st, w, n, D, 1, 0, 0, first, 0))
        }
        HE_SEG_WALK(he_add_of(y, A, st, w, n, D, L, 0, 0, first, 0))
    }
    /* o[g * ostride:][:D] = M[st[g]:][:D] for g < n: one-entry bags of
       one-run rows of D a multiple of 8, 8-float moves (not a memcpy whose
       code depends on the caller's register allocation; D = 16 a loop of
       its own); nt: streaming stores, o and ostride on 32-byte boundaries. */
    __attribute__((target("avx"))) static void he_copy_rows8(
        float* o, int64_t ostride, const float* M, const uint64_t* st, int64_t n, int64_t D,
        int nt)
    {
        int64_t g, c;
        if (D == 16 && nt) {
            for (g = 0; g < n; g++) {
                const float* r = M + st[g];
                _mm256_stream_ps(o + g * ostride, _mm256_loadu_ps(r));
                _mm256_stream_ps(o + g * ostride + 8, _mm256_loadu_ps(r + 8));
            }
        } else if (D == 16) {
            for (g = 0; g < n; g++) {
                const float* r = M + st[g];
                _mm256_storeu_ps(o + g * ostride, _mm256_loadu_ps(r));
                _mm256_storeu_ps(o + g * ostride + 8, _mm256_loadu_ps(r + 8));
            }
        } else if (nt) {
            for (g = 0; g < n; g++)
                for (c = 0; c < D; c += 8)
                    _mm256_stream_ps(o + g * ostride + c, _mm256_loadu_ps(M + st[g] + c));
        } else {
            for (g = 0; g < n; g++)
                for (c = 0; c < D; c += 8)
                    _mm256_storeu_ps(o + g * ostride + c, _mm256_loadu_ps(M + st[g] + c));
        }
    }
    /* 16-bit arrays (H, bf: bfloat16, else float16), runs of a multiple of 8 */
    static inline int64_t he_add_runs16(HE_SEG_ARGS, const uint16_t* H, int64_t D, int64_t L,
                                        int bf)
    {
        return he_add_runs_avx2(o, ostride, st, off, b, j, z, psw, sg, H, D, L, bf ? 2 : 1);
    }
    static inline int64_t he_add_rows_f(HE_SEG_ARGS, const float* M, int64_t D)
    {
        return he_add_rows_avx2(o, ostride, st, off, b, j, z, psw, sg, M, D);
    }
    static inline int he_copy_rows8_f(float* o, int64_t ostride, const float* M,
                                      const uint64_t* st, int64_t n, int64_t D, int nt)
    {
        if (!(he_x86() & 1) || D % 8)
            return 0;
        he_copy_rows8(o, ostride, M, st, n, D, nt);
        return 1;
    }
    #else
    static inline int he_copy_rows8_f(float* o, int64_t ostride, const float* M,
                                      const uint64_t* st, int64_t n, int64_t D, int nt)
    {
        return 0;
    }
    /* (never called: he_sums_take says 0 without AVX2) */
    static inline int64_t he_add_rows_f(HE_SEG_ARGS, const float* M, int64_t D)
    {
        return b;
    }
    static inline int64_t he_add_runs16(HE_SEG_ARGS, const uint16_t* H, int64_t D, int64_t L,
                                        int bf)
    {
        return b;
    }
    #endif
    /* columns c0..c0+W-1 (W = 16 or 4, D - c0 >= W) of runs of LL = 1 or 4 */
    #define HE_ADD_COLS(W, LL)                                                      \
        {                                                                         \
            float acc[W];                                                         \
            int64_t g, i;                                                         \
            for (i = 0; i < W; i++)                                               \
                acc[i] = first ? 0.0f : y[c0 + i];                                \
            for (g = 0; g < n; g++) {                                             \
                const uint64_t* q = st + g * R + c0 / LL;                         \
                const float wg = w ? w[g] : 1.0f;                                 \
                for (i = 0; i < W; i++)                                           \
                    acc[i] += wg * M[q[i / LL] + i % LL];                         \
            }                                                                     \
            for (i = 0; i < W; i++)                                               \
                y[c0 + i] = acc[i];                                               \
        }
    /* a bag's sum over runs of 1 or 4 (he_sums_take: D a multiple of 4); not
       inlined: inside the walk it took 30% more instructions (Z = 4) */
    __attribute__((noinline)) static void he_add_cols(
        float* __restrict y, const float* __restrict M, const uint64_t* __restrict st,
        const float* __restrict w, int64_t n, int64_t D, int64_t L, int first)
    {
        const int64_t R = D / L;
        int64_t c0;
        for (c0 = 0; c0 + 16 <= D; c0 += 16) {
            if (L == 1)
                HE_ADD_COLS(16, 1)
            else
                HE_ADD_COLS(16, 4)
        }
        for (; c0 < D; c0 += 4) {
            if (L == 1)
                HE_ADD_COLS(4, 1)
            else
                HE_ADD_COLS(4, 4)
        }
    }
    #undef HE_ADD_COLS
    static int64_t he_add_runs_f(HE_SEG_ARGS, const float* M, int64_t D, int64_t L)
    {
        const int64_t R = D / L;
    #if defined(HE_X86_VECTOR)
        if (he_runs_avx2(D, L))
            return he_add_runs_avx2(o, ostride, st, off, b, j, z, psw, sg, M, D, L, 0);
    #endif
        /* (unsigned: callers pass signs only where he_runs_avx2 says so) */
        HE_SEG_WALK(he_add_cols(y, M, st, w, n, D, L, first))
    }
    #undef HE_SEG_WALK
    #undef HE_SEG_ARGS

    /* Per-call scratch from one cached block: fresh memory costs page
       faults, and blocks that OpenMP threads free go back to the kernel with
       TLB shootdowns; at a training step's sizes that costs more than the
       kernels' work (measured: a row-wise Adagrad step at 6-9 ms instead of
       2 ms). Taking and giving back are lock-free exchanges, so concurrent
       calls each get a block of their own; blocks over 256 MB are not kept. */
    static char* he_ws_cached = 0;     /* its size in its first 64 bytes */
    static void* he_ws_take(size_t bytes)
    {
        char* b = (char*)__atomic_exchange_n(&he_ws_cached, (char*)0, __ATOMIC_ACQ_REL);
        if (b && *(size_t*)b >= bytes)
            return b + 64;
        free(b);
        b = (char*)malloc(bytes + 64);
        if (!b)
            return 0;
        *(size_t*)b = bytes;
        return b + 64;
    }
    static void he_ws_give(void* p)
    {
        char* b = p ? (char*)p - 64 : 0;
        if (b && *(size_t*)b > ((size_t)256 << 20)) {
            free(b);
            return;
        }
        free(__atomic_exchange_n(&he_ws_cached, b, __ATOMIC_ACQ_REL));
    }
    """
    void he_prefetch(const void* p) noexcept nogil
    void he_prefetch_w(const void* p) noexcept nogil
    int he_prfchw() noexcept nogil
    uint64_t he_prefetch_runs_f(const float* A, const uint64_t* st, int64_t n, int64_t tail,
                                int top) noexcept nogil
    uint64_t he_prefetch_runs_d(const double* A, const uint64_t* st, int64_t n, int64_t tail,
                                int top) noexcept nogil
    uint64_t he_prefetch_runs_h(const uint16_t* A, const uint64_t* st, int64_t n, int64_t tail,
                                int top) noexcept nogil
    void he_scatter_f(float* t, const uint64_t* st, const float* g, float a, int64_t n) noexcept nogil
    void he_prefetch_own_slots(const void* A, size_t el, const uint64_t* st,
                               int64_t n) noexcept nogil
    void he_scatter_d(double* t, const uint64_t* st, const double* g, double a, int64_t n) noexcept nogil
    void he_scatter_in_f(float* t, const uint64_t* st, const float* g, float a, int64_t n,
                         uint64_t lo, uint64_t hi, float* spare) noexcept nogil
    void he_scatter_in_d(double* t, const uint64_t* st, const double* g, double a, int64_t n,
                         uint64_t lo, uint64_t hi, double* spare) noexcept nogil
    void he_axpy_f(float* y, const float* x, float a, int64_t n) noexcept nogil
    void he_axpy_d(double* y, const double* x, double a, int64_t n) noexcept nogil
    void he_scal_f(float* y, const float* x, float a, int64_t n) noexcept nogil
    void he_scal_d(double* y, const double* x, double a, int64_t n) noexcept nogil
    void he_signed_rows_f(float* o, int64_t ostride, const float* M, const uint64_t* st,
                          const float* sg, int64_t n, int64_t D) noexcept nogil
    void he_signed_rows_d(double* o, int64_t ostride, const double* M, const uint64_t* st,
                          const float* sg, int64_t n, int64_t D) noexcept nogil
    void he_add_signed_f(float* y, const float* x, const float* sg, float a,
                         int64_t n) noexcept nogil
    void he_add_signed_d(double* y, const double* x, const float* sg, double a,
                         int64_t n) noexcept nogil
    void he_scatter_signed_f(float* t, const float* g, const float* sg, float a,
                             int64_t n) noexcept nogil
    void he_scatter_signed_d(double* t, const double* g, const float* sg, double a,
                             int64_t n) noexcept nogil
    int he_sums_take(int64_t D, int64_t L, int half) noexcept nogil
    int he_runs_avx2(int64_t D, int64_t L) noexcept nogil
    int64_t he_add_rows_f(float* o, int64_t ostride, const uint64_t* st, const int64_t* off,
                          int64_t b, int64_t j, int64_t z, const float* psw, const float* sg,
                          const float* M, int64_t D) noexcept nogil
    int64_t he_add_runs_f(float* o, int64_t ostride, const uint64_t* st, const int64_t* off,
                          int64_t b, int64_t j, int64_t z, const float* psw, const float* sg,
                          const float* M, int64_t D, int64_t L) noexcept nogil
    int64_t he_add_runs16(float* o, int64_t ostride, const uint64_t* st, const int64_t* off,
                          int64_t b, int64_t j, int64_t z, const float* psw, const float* sg,
                          const uint16_t* H, int64_t D, int64_t L, int bf) noexcept nogil
    int he_copy_rows8_f(float* o, int64_t ostride, const float* M, const uint64_t* st,
                        int64_t n, int64_t D, int nt) noexcept nogil
    enum: AHEAD "HE_AHEAD"
    void he_add_back_f(const uint64_t* pre, const int64_t* off, const float* psw,
                       const float* grad, int64_t gstride, int64_t B, int64_t T, int64_t D,
                       int mean, float alpha, float* target, uint64_t m, int64_t L) noexcept nogil
    void he_add_back_d(const uint64_t* pre, const int64_t* off, const double* psw,
                       const double* grad, int64_t gstride, int64_t B, int64_t T, int64_t D,
                       int mean, double alpha, double* target, uint64_t m,
                       int64_t L) noexcept nogil
    void* he_ws_take(size_t bytes) noexcept nogil
    void he_ws_give(void* p) noexcept nogil


cdef extern from "hashemb/half.h" nogil:
    float he_s2f(uint16_t h, int bf) noexcept
    uint16_t he_round16(float v, uint64_t slot, uint64_t seed, int bf) noexcept
    void he_half_sub(uint16_t* w, uint64_t slot, float step, uint64_t seed, int bf) noexcept
    void he_s2f_run(float* y, const uint16_t* x, float a, int64_t n, int how, int bf) noexcept
    int he_x86() noexcept
    void he_half_sgd_run(uint16_t* w, float* g, int64_t n, uint64_t slot0, float lr,
                         uint64_t seed, int bf) noexcept


cdef extern from "hashemb/optim.h" nogil:
    double he_row_sumsq_f(const float* g, int64_t D) noexcept
    double he_row_sumsq_d(const double* g, int64_t D) noexcept
    double he_row_mult_f(float* G, double ss, int64_t D, float lr, float eps) noexcept
    double he_row_mult_d(double* G, double ss, int64_t D, double lr, double eps) noexcept
    void he_adagrad_run(float* w, float* s, float* g, int64_t n, float lr, float eps) noexcept
    void he_rowwise_run(float* w, const float* g, int64_t n, double mult) noexcept
    void he_half_adagrad_run(uint16_t* w, float* s, float* g, int64_t n, uint64_t slot0,
                             float lr, float eps, uint64_t seed, int bf) noexcept
    void he_half_rowwise_run(uint16_t* w, const float* g, int64_t n, uint64_t slot0,
                             double mult, uint64_t seed, int bf) noexcept


cdef extern from "hashemb/openmp.h" nogil:
    int he_num_threads() noexcept


cdef extern from "hashemb/stream.h" nogil:
    int64_t HE_STREAM_BYTES
    void he_stream_f(float* dst, const float* src, int64_t n) noexcept
    void he_stream_d(double* dst, const double* src, int64_t n) noexcept
    void he_stream_fence() noexcept

DEF CHUNK = 32      # samples per parallel work item (its output stays in L2)
DEF FAR_AHEAD = 16  # forward, a few runs per row from an array far past the caches
DEF FAR_BYTES = 64 << 20  # "far past the caches": arrays from this size on
DEF MAXR = 64       # fast path: at most this many runs per row
DEF SIGNS = 64      # signed schemes: a run's signs computed this many at a time
DEF SEG_RUNS = 128  # multi-hot bags of rows of several runs: runs hashed ahead
DEF SMALL_WORK = 1 << 16  # backward: gradient floats below which one thread runs
DEF OWN_AHEAD = 4   # HashedNet's backward: entries whose slots are taken owned ahead
DEF TOKENS_AHEAD = 2  # _direct_rows: blocks of bags ahead whose tokens are prefetched
DEF CHUNK_BAGS = 8192  # backward with many runs per entry: bags hashed per round


cdef inline void _axpy(real* y, const real* x, real a, int64_t n) noexcept nogil:
    """y[:n] += a * x[:n] (y and x never overlap)."""
    if real is float:
        he_axpy_f(y, x, a, n)
    else:
        he_axpy_d(y, x, a, n)


cdef inline void _scal(real* y, const real* x, real a, int64_t n) noexcept nogil:
    """y[:n] = a * x[:n] (y and x never overlap)."""
    if real is float:
        he_scal_f(y, x, a, n)
    else:
        he_scal_d(y, x, a, n)


cdef inline void _copy_run(real* dst, const real* src, int64_t L) noexcept nogil:
    """dst[:L] = src[:L]. Fixed-size memcpy for the common runs: the compiler
    emits a few vector moves (an element loop stays scalar: dst and src may
    alias as far as it knows); element-wise runs (HashedNet) are one move,
    and other lengths a loop rather than a library call per run."""
    cdef int64_t i
    if L == 1:
        dst[0] = src[0]
    elif L == 16:
        memcpy(dst, src, 16 * sizeof(real))
    elif L == 32:
        memcpy(dst, src, 32 * sizeof(real))
    elif L == 8:
        memcpy(dst, src, 8 * sizeof(real))
    elif L == 4:
        memcpy(dst, src, 4 * sizeof(real))
    elif L == 2:
        memcpy(dst, src, 2 * sizeof(real))
    elif L == 64:
        memcpy(dst, src, 64 * sizeof(real))
    else:
        for i in range(L):
            dst[i] = src[i]


cdef inline real _ld(const real* M, const uint16_t* H, int bf, uint64_t i) noexcept nogil:
    """Element i of the array: M's, or 16-bit H's as a float (H given; bf:
    bfloat16, else float16)."""
    if H != NULL:
        return he_s2f(H[i], bf)
    return M[i]


cdef inline const void* _at(const real* M, const uint16_t* H, uint64_t i) noexcept nogil:
    """Address of element i (for prefetches)."""
    if H != NULL:
        return H + i
    return M + i


cdef inline void _run_h(real* y, const uint16_t* x, int bf, real a, int64_t n,
                        int how) noexcept nogil:
    """y[:n] = a * x (how 0), += a * x (1) or = x (2) for a run of a 16-bit
    array of format bf (real is float wherever H is given; double is a dead
    branch)."""
    cdef int64_t i
    if real is float:
        he_s2f_run(y, x, a, n, how, bf)
    else:
        for i in range(n):
            if how == 1:
                y[i] += a * he_s2f(x[i], bf)
            else:
                y[i] = (a if how == 0 else 1) * he_s2f(x[i], bf)


cdef inline void _pool_in(real* o, real v, real w, int first, int mode) noexcept nogil:
    """Pool one element's value v (sign included) into o: max, or w * v
    set (first entry of the bag) or added."""
    if mode == MAX:
        if first or v > o[0]:
            o[0] = v
    elif first:
        o[0] = w * v
    else:
        o[0] += w * v


cdef inline int64_t _run_signs(const he_scheme* s, const he_row* row, int64_t i0,
                               int64_t n, float* sg, bint whole) noexcept nogil:
    """Where in sg the signs of elements i0 .. i0+n-1 of a row start: there
    already (whole: the row's, from index 0), or hashed into sg[0:n] now.
    (An offset, not a pointer: the pooling loops index the local array.)"""
    if whole:
        return i0
    he_signs(s, row, i0, n, sg)
    return 0


cdef inline void _gather_row(const he_scheme* s, const he_row* row, const uint64_t* r,
                             const real* M, const uint16_t* H, int bf, real w, real* o,
                             int first, int mode, const float* sgn) noexcept nogil:
    """o[i] = / += / max= w * E(x)[i] for one row (r: its run starts, or
    NULL to hash them here; sgn: a signed row's D <= SIGNS signs, hashed
    already for several rows at once by he_sign_rows, or NULL to hash them
    here)."""
    cdef int64_t L = s.run, k, i, i0, n
    cdef uint64_t st
    cdef const real* src
    cdef real* ok
    cdef real v
    cdef float sg[SIGNS]        # the row's signs (he_signs), or SIGNS at a time
    cdef int64_t sk             # where a run's signs start in sg
    # a signed row of up to SIGNS floats takes its signs in one he_signs
    # call (its per-call terms once a row); a longer one a run's chunk at a time
    cdef bint whole = s.is_signed and s.dim <= SIGNS
    if r != NULL and L == 1 and mode != MAX and not s.is_signed and H == NULL:
        # element-wise (HashedNet): one float a run, none wraps
        if first:
            for k in range(s.runs):
                o[k] = w * M[r[k]]
        else:
            for k in range(s.runs):
                o[k] += w * M[r[k]]
        return
    if whole:
        if sgn != NULL:
            memcpy(sg, sgn, s.dim * sizeof(float))
        else:
            he_signs(s, row, 0, s.dim, sg)
        if r != NULL and L == 1:        # element-wise and signed
            for i in range(s.runs):
                _pool_in(o + i, sg[i] * _ld(M, H, bf, r[i]), w, first, mode)
            return
    for k in range(s.runs):
        st = r[k] if r != NULL else he_run_start(s, row, k)
        ok = o + k * L
        if mode != MAX and not s.is_signed and st + <uint64_t>L <= s.size:
            # one contiguous run, no sign, no wrap
            if H != NULL:
                _run_h(ok, H + st, bf, w, L, 0 if first else 1)
            elif first:
                _scal(ok, M + st, w, L)
            else:
                _axpy(ok, M + st, w, L)
        elif mode != MAX and H == NULL and st + <uint64_t>L <= s.size:
            # a signed run, contiguous: its signs a chunk at a time, then
            # one tight loop (the same products: sign * value, then w *)
            for i0 in range(0, L, SIGNS):
                n = min(SIGNS, L - i0)
                sk = _run_signs(s, row, k * L + i0, n, sg, whole)
                src = M + st + i0
                if first:
                    for i in range(n):
                        ok[i0 + i] = w * (sg[sk + i] * src[i])
                else:
                    for i in range(n):
                        ok[i0 + i] += w * (sg[sk + i] * src[i])
        else:
            for i0 in range(0, L, SIGNS):
                n = min(SIGNS, L - i0)
                if s.is_signed:
                    sk = _run_signs(s, row, k * L + i0, n, sg, whole)
                for i in range(i0, i0 + n):
                    v = _ld(M, H, bf, he_run_slot(s, st, i))
                    if s.is_signed:
                        v = sg[sk + i - i0] * v
                    _pool_in(ok + i, v, w, first, mode)


cdef inline void _bag(const he_scheme* s, const index_t* idx, int64_t j0, int64_t j1,
                      const real* M, const uint16_t* H, int bf, const real* psw, real* o, int64_t table, he_tterm tt,
                      int mode, uint64_t* pre) noexcept nogil:
    """o = pool of one bag (entries j0..j1-1) of table `table` (tt: its
    he_table_term), the general case; pre, when given, receives every
    entry's run starts."""
    cdef int64_t j, i, cnt = 0, D = s.dim
    cdef he_row row
    cdef uint64_t here[MAXR]
    cdef uint64_t* r
    # a signed bag's rows take their signs HE_SIGN_ROWS at a time
    cdef bint whole = s.is_signed and D <= SIGNS
    cdef float sgs[HE_SIGN_ROWS * SIGNS]
    for j in range(j0, j1):
        if whole and (j - j0) % HE_SIGN_ROWS == 0:
            he_sign_rows(s, tt, idx + j, sizeof(index_t) == 8, min(HE_SIGN_ROWS, j1 - j), sgs)
        row = he_row_begin_t(s, table, tt, idx[j])
        # the row's run starts hashed in one loop (he_run_starts), not one by one
        r = pre + j * s.runs if pre != NULL else (here if s.runs <= MAXR else NULL)
        if r != NULL:
            _starts_row(s, &row, r)
        _gather_row(s, &row, r, M, H, bf, psw[j] if psw != NULL else 1, o, cnt == 0, mode,
                    sgs + ((j - j0) % HE_SIGN_ROWS) * D if whole else NULL)
        cnt += 1
    if cnt == 0:
        for i in range(D):
            o[i] = 0
    elif mode == MEAN and cnt > 1:
        for i in range(D):
            o[i] = o[i] / cnt


cdef inline void _copy_runs(const he_scheme* s, const uint64_t* r, const real* M, real* o,
                            int64_t L) noexcept nogil:
    """_gather_runs of a float array with runs of L floats (a constant where
    inlined: the copy's length is then chosen once, not once a run)."""
    cdef int64_t k, i
    for k in range(s.runs):
        if r[k] + <uint64_t>L <= s.size:
            _copy_run(o + k * L, M + r[k], L)
        else:
            for i in range(L):
                o[k * L + i] = M[he_run_slot(s, r[k], i)]


cdef inline void _gather_runs(const he_scheme* s, const uint64_t* r, const real* M,
                             const uint16_t* H, int bf, real* o) noexcept nogil:
    """o[:D] = the row whose runs start at r[0..R): each run copied, or slot
    by slot where it wraps past the end of the array."""
    cdef int64_t k, i, L = s.run
    if H == NULL:
        if L == 4:
            _copy_runs(s, r, M, o, 4)
        elif L == 8:
            _copy_runs(s, r, M, o, 8)
        else:
            _copy_runs(s, r, M, o, L)
        return
    for k in range(s.runs):
        if r[k] + <uint64_t>L <= s.size:
            if H != NULL:
                _run_h(o + k * L, H + r[k], bf, 1, L, 2)
            else:
                _copy_run(o + k * L, M + r[k], L)
        else:
            for i in range(L):
                o[k * L + i] = _ld(M, H, bf, he_run_slot(s, r[k], i))


cdef inline void _copy_elems(real* o, const real* M, const uint64_t* r, int64_t R) noexcept nogil:
    """o[k] = M[r[k]] for k < R: a row of runs of one float (HashedNet);
    the common widths with a constant count, which the compiler unrolls."""
    cdef int64_t k
    if R == 16:
        for k in range(16):
            o[k] = M[r[k]]
    elif R == 32:
        for k in range(32):
            o[k] = M[r[k]]
    else:
        for k in range(R):
            o[k] = M[r[k]]


cdef inline bint _far(const he_scheme* s, const uint16_t* H, const real* M) noexcept nogil:
    """Whether the array is far past the caches (FAR_BYTES on)."""
    return <int64_t>(s.size * (2 if H != NULL else sizeof(real))) >= FAR_BYTES


cdef inline bint _prefetch_reads(const he_scheme* s, const real* M, const uint16_t* H,
                                const uint64_t* st, int64_t n, int64_t L) noexcept nogil:
    """Prefetch n runs of L values from st[g] (he_prefetch_runs_*); whether
    one wraps past the array's end (the largest start decides). Runs of one
    value (HashedNet) and a full table's rows never wrap, and where its rows
    are whole lines (D = 16 float32, an array on a line boundary, as
    init_weight makes it) one prefetch a row takes all of one."""
    cdef int64_t es = 2 if H != NULL else sizeof(real)
    cdef bint top = L > 1 and s.kind != HE_FULL
    cdef int64_t tail = L - 1
    cdef uint64_t t
    if s.kind == HE_FULL and L * es == 64 and \
            (<uintptr_t>H if H != NULL else <uintptr_t>M) % 64 == 0:
        tail = 0
    if H != NULL:
        t = he_prefetch_runs_h(H, st, n, tail, top)
    elif real is float:
        t = he_prefetch_runs_f(M, st, n, tail, top)
    else:
        t = he_prefetch_runs_d(M, st, n, tail, top)
    return top and n > 0 and t + <uint64_t>L > s.size


cdef inline void _copy_one_runs(real* o, int64_t ostride, const real* M, const uint64_t* st,
                                int64_t n, int64_t L) noexcept nogil:
    """o[g * ostride:][:L] = M[st[g]:][:L] for g < n (runs that do not wrap)."""
    cdef int64_t g
    for g in range(n):
        _copy_run(o + g * ostride, M + st[g], L)


cdef inline void _signed_row(const he_scheme* s, he_tterm tt, int64_t x, const uint64_t* r,
                             const real* M, const uint16_t* H, int bf, real* o,
                             const float* sgn) noexcept nogil:
    """o = row x of a signed scheme (tt: its table's he_table_term), one
    entry a bag, its run starts r (and, for rows of <= SIGNS floats, its
    signs sgn) hashed already: the general loop's products (_gather_row)."""
    cdef he_row row
    row.base = 0            # (unread: the starts are given)
    row.sbase = he_sign_base(s, tt, x) if sgn == NULL else 0
    _gather_row(s, &row, r, M, H, bf, 1, o, 1, SUM, sgn)


cdef void _one_run_rows(const he_scheme* s, const index_t* x, int64_t n, const real* M,
                        const uint16_t* H, int bf, real* o, int64_t ostride, int64_t table,
                        he_tterm tt, uint64_t* st, bint nt) noexcept nogil:
    """o[g * ostride:][:D] = row x[g] of table `table`, g < n <= CHUNK, for rows of one
    run (he_one_run) and one entry per bag: every row's start hashed into
    st[:n] (he_one_run_starts: four at a time with AVX2) and prefetched,
    then every row copied. Tight loops with the table's constants in
    registers (he_one_run_of) instead of the general pipeline: under half
    the instructions a row."""
    cdef he_one_run_k k = he_one_run_of(s, table, tt)
    cdef int64_t D = s.dim, g
    cdef float sgs[CHUNK * SIGNS]   # the chunk's signs (n <= CHUNK)
    he_one_run_starts(&k, x, sizeof(index_t) == 8, n, st)
    cdef bint wraps = _prefetch_reads(s, M, H, st, n, D)
    if s.is_signed:
        # the rows' signs at once (he_sign_rows), then each row times its signs
        if D <= SIGNS:
            he_sign_rows(s, tt, x, sizeof(index_t) == 8, n, sgs)
        if D <= SIGNS and not wraps and H == NULL:
            if real is float:
                he_signed_rows_f(o, ostride, M, st, sgs, n, D)
            else:
                he_signed_rows_d(o, ostride, M, st, sgs, n, D)
            return
        for g in range(n):
            _signed_row(s, tt, x[g], st + g, M, H, bf, o + g * ostride,
                        sgs + g * D if D <= SIGNS else NULL)
        return
    if wraps or H != NULL:  # a run wrapping past the array's end (ROBE-Z), or 16-bit
        for g in range(n):
            _gather_runs(s, st + g, M, H, bf, o + g * ostride)
    elif real is float and he_copy_rows8_f(o, ostride, M, st, n, D, nt):
        return
    elif D == 16:           # the common widths copied with fixed-size moves
        _copy_one_runs(o, ostride, M, st, n, 16)
    elif D == 32:
        _copy_one_runs(o, ostride, M, st, n, 32)
    elif D == 64:
        _copy_one_runs(o, ostride, M, st, n, 64)
    else:
        _copy_one_runs(o, ostride, M, st, n, D)


cdef void _seg_bags(const he_scheme* s, const index_t* x, const int64_t* off, int64_t n,
                    const real* M, const uint16_t* H, int bf, const real* psw, real* o,
                    int64_t ostride, int64_t table, he_tterm tt, int mode, uint64_t* ring,
                    uint64_t* pre) noexcept nogil:
    """o[b * ostride:][:D] = sum (mean) of psw[j] times row x[j] of table
    `table` (psw NULL: ones), j in off[b]..off[b+1]-1, for bags b < n of a
    scheme that reads no map (signed ones of D <= SIGNS too): the entries'
    run starts hashed a segment of entries at a time (he_rows_starts) and
    prefetched a segment before they are added, in entry order (the
    general _bag's arithmetic): where the C sums take them, by one call a
    segment that walks its bags, a bag's entries in registers from zeros at
    its first (no pass zeroes the bags). A signed segment's signs are
    hashed at once as it is added (he_sign_rows), each value times its
    sign, then the weight. Starts go to pre[j * R] when given, else to the
    two halves of ring in turn (_ring_len: a segment's are at most 2
    SEG_RUNS, or one row's)."""
    cdef int64_t D = s.dim, L = s.run, R = s.runs, j0 = off[0], j1 = off[n]
    cdef int64_t a, z, j, e, b, i, r, cnt, jc, seg = 0
    # entries a segment: CHUNK rows of one run; else about SEG_RUNS runs
    cdef int64_t sn = CHUNK if R == 1 else max(1, min(CHUNK, SEG_RUNS // R))
    cdef uint64_t m = s.size, st
    cdef uint64_t* nxt
    cdef uint64_t* cur = NULL      # starts of the segment being added (entry a - sn first)
    cdef const uint64_t* q
    cdef bint wraps = False, cur_wraps = False
    # the C sums take every segment without a run wrapping past the array's
    # end (a signed one where their AVX2 loops do, which multiply by signs)
    cdef bint sums = real is float and he_sums_take(D, L, H != NULL) and (
        not s.is_signed or he_runs_avx2(D, L))
    cdef float sgs[CHUNK * SIGNS]   # a signed segment's signs
    cdef const float* sgn = sgs if s.is_signed else NULL
    cdef const float* sg
    cdef real* ob
    cdef real w = 1
    cdef he_rows_k k
    he_rows_of(&k, s, table, tt)
    for b in range(n):      # (a bag with entries is zeroed at its first)
        if off[b + 1] == off[b]:
            for i in range(D):
                o[b * ostride + i] = 0
    b = 0
    a = j0
    while a < j1 + sn:
        nxt = pre + a * R if pre != NULL else ring + (seg & 1) * sn * R
        seg += 1
        wraps = False
        if a < j1:          # hash the segment a..z-1 and prefetch its runs
            z = min(a + sn, j1)
            he_rows_starts(&k, x + a, sizeof(index_t) == 8, z - a, nxt)
            # (runs of one float from an array in the caches are not
            # prefetched: HashedNet's bags at 1000x took 25% longer)
            if L > 1 or _far(s, H, M):
                wraps = _prefetch_reads(s, M, H, nxt, (z - a) * R, L)
        if a > j0:          # add the segment before, a bag's entries at a time
            jc = a - sn
            j = jc
            z = min(a, j1)
            if sgn != NULL:
                he_sign_rows(s, tt, x + jc, sizeof(index_t) == 8, z - jc, sgs)
            if real is float and sums and not cur_wraps:     # the C sums' own walk
                if H != NULL:
                    b = he_add_runs16(o, ostride, cur, off, b, j, z, psw, sgn, H, D, L, bf)
                elif R == 1:
                    b = he_add_rows_f(o, ostride, cur, off, b, j, z, psw, sgn, M, D)
                else:
                    b = he_add_runs_f(o, ostride, cur, off, b, j, z, psw, sgn, M, D, L)
                j = z
            while j < z:
                while off[b + 1] <= j:
                    b += 1
                e = min(off[b + 1], z)
                ob = o + b * ostride
                if j == off[b]:
                    for i in range(D):
                        ob[i] = 0
                for j in range(j, e):
                    q = cur + (j - jc) * R
                    if psw != NULL:
                        w = psw[j]
                    if sgn != NULL:
                        sg = sgs + (j - jc) * D
                        if L == 1 and H == NULL:    # element-wise: one float a run, none wraps
                            for r in range(R):
                                ob[r] += w * (sg[r] * M[q[r]])
                            continue
                        for r in range(R):
                            st = q[r]
                            if st + <uint64_t>L > m or H != NULL:   # wrapping, or 16-bit
                                for i in range(L):
                                    ob[r * L + i] += w * (sg[r * L + i] * _ld(
                                        M, H, bf, he_run_slot(s, st, i)))
                            elif real is float:
                                he_add_signed_f(ob + r * L, M + st, sg + r * L, w, L)
                            else:
                                he_add_signed_d(ob + r * L, M + st, sg + r * L, w, L)
                        continue
                    for r in range(R):
                        st = q[r]
                        if st + <uint64_t>L > m:        # a run wrapping past the array's end
                            for i in range(L):
                                ob[r * L + i] += w * _ld(M, H, bf, he_run_slot(s, st, i))
                        elif H != NULL:
                            _run_h(ob + r * L, H + st, bf, w, L, 1)
                        else:
                            _axpy(ob + r * L, M + st, w, L)
                j = e
        cur = nxt
        cur_wraps = wraps
        a += sn
    if mode == MEAN:
        for b in range(n):
            cnt = off[b + 1] - off[b]
            if cnt > 1:
                for i in range(D):
                    o[b * ostride + i] = o[b * ostride + i] / cnt


cdef inline int64_t _ring_len(int64_t runs) noexcept nogil:
    """A thread's run starts in flight: FAR_AHEAD rows' (_forward_chunk's
    pipeline), or two segments of _seg_bags (CHUNK rows of one run, or
    about SEG_RUNS runs), padded by 128 bytes so that threads never share a
    cache line."""
    return max(FAR_AHEAD * runs, 2 * CHUNK, 2 * SEG_RUNS) + 16


cdef void _forward_chunk(const he_scheme* s, const index_t* idx, const int64_t* off,
                         const real* M, const uint16_t* H, int bf, const real* psw, real* out, int64_t B,
                         int64_t T, int64_t ostride, int64_t table0, int mode,
                         int64_t b0, int64_t b1, uint64_t* ring, uint64_t* pre) noexcept nogil:
    """Bags of samples b0..b1-1, table by table (padding dropped before:
    bag.py's _unpadded). Bags of a scheme that reads no map, without max,
    take tight loops: one entry each (the DLRM/Criteo case) of rows of one
    run (full tables, ROBE-Z with Z >= D) _one_run_rows (a signed row then
    times its signs), of unsigned rows of several runs a pipeline that
    copies each row straight from the array, its runs hashed AHEAD bags
    early and prefetched (the gathers are latency-bound, the hashes are
    not); any other sizes, per-sample weights, or signed rows of several
    runs, _seg_bags (signed rows of up to SIGNS floats). Every other bag
    takes the general loop (LSH's single-entry bags a deeper pipeline).
    pre, when given, receives every entry's run starts as they are
    computed (for backward to reuse)."""
    cdef int64_t D = s.dim, L = s.run, R = s.runs, t, b, c, g, j, k, q, n = b1 - b0
    cdef uint64_t m = s.size
    cdef uint64_t* r
    cdef real* o
    cdef const void* hint
    cdef he_row rows[2 * FAR_AHEAD]
    cdef uint64_t probes[2 * FAR_AHEAD]   # map probes, hashed once between two stages
    cdef uint64_t tprobe
    cdef he_tterm tt
    cdef he_row row
    cdef int64_t j0
    cdef bint single
    # rows in flight: 16 when each row is a few lines of an array in DRAM (a
    # full table: measured faster in every A/B pair), else 8 (an array in the
    # caches gains nothing, and 16 element-wise rows of D lines each overflow
    # the core's miss buffers: HashedNet 19% slower)
    cdef int64_t ahead = FAR_AHEAD if R <= 4 and _far(s, H, M) else AHEAD
    # schemes that read memory to find a row's runs (LSH) get two more stages
    cdef int64_t deep = ahead if he_reads_map(s) else 0
    cdef bint fast = ring != NULL and psw == NULL and mode != MAX and not s.is_signed
    # bags of any size (per-sample weights too) hashed a segment at a time;
    # signed ones of rows of up to SIGNS floats too, their signs a segment at once
    cdef bint seg = ring != NULL and mode != MAX and deep == 0 and (
        not s.is_signed or D <= SIGNS)
    # signed rows of one run, one entry a bag: _one_run_rows too, of any D
    # (not the pipeline below: a signed branch there cost its unsigned rows
    # 4% more instructions)
    cdef bint one_signed = ring != NULL and mode != MAX and psw == NULL and s.is_signed \
        and he_one_run(s)
    cdef he_rows_k kr
    for t in range(T):
        tprobe = he_table_probe(s, table0 + t)
        tt = he_table_term(s, table0 + t)
        if seg or one_signed:
            # one entry in every bag of the chunk (2-D input: the DLRM case):
            # bag b is entry j0 + b, and the pipeline needs no offsets
            j0 = off[t * B + b0]
            single = True
            for b in range(1, n + 1):
                if off[t * B + b0 + b] != j0 + b:
                    single = False
                    break
            if single and psw == NULL and he_one_run(s):
                _one_run_rows(s, idx + j0, n, M, H, bf, out + t * D, ostride, table0 + t, tt,
                              ring if pre == NULL else pre + j0, False)
                continue
        if seg:
            if not (single and psw == NULL) or s.is_signed:
                _seg_bags(s, idx, off + t * B + b0, n, M, H, bf, psw, out + t * D, ostride,
                          table0 + t, tt, mode, ring, pre)
                continue
            # one entry in every bag, rows of several runs: hashed ahead bags
            # early, ROBE-Z's four rows a step (ahead is a multiple of 4)
            he_rows_of(&kr, s, table0 + t, tt)
            q = 1 if kr.how == HE_ROWS_EACH else 4
            c = 0
            while c < n + ahead:
                # gather bags c - ahead .. (hashed ahead bags before: their ring slots are c's)
                for g in range(max(c - ahead, 0), min(c - ahead + q, n)):
                    r = ring + (g & (ahead - 1)) * R
                    o = out + g * ostride + t * D
                    if L == 1 and H == NULL:    # element-wise (HashedNet): none wraps
                        _copy_elems(o, M, r, R)
                    elif L == 1:
                        for k in range(R):
                            o[k] = _ld(M, H, bf, r[k])
                    else:
                        _gather_runs(s, r, M, H, bf, o)
                if c < n:       # hash bags c .., prefetch their runs
                    r = ring + (c & (ahead - 1)) * R
                    g = min(q, n - c)
                    he_rows_starts(&kr, idx + j0 + c, sizeof(index_t) == 8, g, r)
                    _prefetch_reads(s, M, H, r, g * R, L)
                    if pre != NULL:
                        memcpy(pre + (j0 + c) * R, r, g * R * sizeof(uint64_t))
                c += q
            continue
        if not fast:
            for b in range(n):
                q = t * B + b0 + b
                _bag(s, idx, off[q], off[q + 1], M, H, bf, psw, out + b * ostride + t * D,
                     table0 + t, tt, mode, pre)
            continue
        for c in range(n + deep + deep + ahead):
            g = c - deep - deep - ahead
            if g >= 0:          # gather bag g (its runs were hashed ahead bags before)
                j = off[t * B + b0 + g]
                o = out + g * ostride + t * D
                if off[t * B + b0 + g + 1] - j == 1:
                    _gather_runs(s, ring + (g & (ahead - 1)) * R, M, H, bf, o)
                else:
                    _bag(s, idx, j, off[t * B + b0 + g + 1], M, H, bf, psw, o, table0 + t, tt,
                         mode, pre)
            q = c - deep
            if 0 <= q < n:      # begin bag q's first row, prefetch what its runs read
                j = off[t * B + b0 + q]
                if off[t * B + b0 + q + 1] > j:
                    rows[q % (2 * FAR_AHEAD)] = he_row_begin_probed(
                        s, table0 + t, idx[j], probes[q % (2 * FAR_AHEAD)]) if deep \
                        else he_row_begin_t(s, table0 + t, tt, idx[j])
                    hint = he_row_data(s, &rows[q % (2 * FAR_AHEAD)])
                    if hint != NULL:
                        he_prefetch(hint)
            q = c - deep - deep
            if 0 <= q < n:      # run starts of bag q, prefetch its runs
                j = off[t * B + b0 + q]
                if off[t * B + b0 + q + 1] > j:
                    r = ring + (q & (ahead - 1)) * R
                    he_run_starts(s, &rows[q % (2 * FAR_AHEAD)], r)
                    for k in range(R):
                        he_prefetch(_at(M, H, r[k]))
                        if L > 1:       # a run of one float is on one line
                            he_prefetch(_at(M, H, r[k] + L - 1))
                    if pre != NULL and off[t * B + b0 + q + 1] - j == 1:
                        for k in range(R):   # (bags of several entries: in _bag)
                            pre[j * R + k] = r[k]
            if deep and c < n:  # the map entry of bag c
                j = off[t * B + b0 + c]
                if off[t * B + b0 + c + 1] > j:
                    probes[c % (2 * FAR_AHEAD)] = he_row_probe(s, tprobe, idx[j])
                    he_prefetch(he_probe_hint(s, probes[c % (2 * FAR_AHEAD)]))


cdef inline void _copy_rows(real* dst, int64_t dstride, const real* src, int64_t width,
                           int64_t n, bint stream) noexcept nogil:
    cdef int64_t r
    if stream:
        for r in range(n):
            if real is float:
                he_stream_f(dst + r * dstride, src + r * width, width)
            else:
                he_stream_d(dst + r * dstride, src + r * width, width)
    elif dstride == width:
        memcpy(dst, src, n * width * sizeof(real))
    else:
        for r in range(n):
            memcpy(dst + r * dstride, src + r * width, width * sizeof(real))


cdef inline void _prefetch_span(const void* p, int64_t nbytes) noexcept nogil:
    """Prefetch the lines of nbytes from p (a hint: any address will do)."""
    cdef int64_t a = 0
    while a < nbytes:
        he_prefetch(<const char*>p + a)
        a += 64


cdef bint _direct_rows(const he_scheme* s, const index_t* idx, const int64_t* off,
                       const real* M, real* out, int64_t B, int64_t T, int64_t ostride,
                       int64_t table0, int64_t b0, int64_t n, uint64_t* ring,
                       uint64_t* pre, bint nt) noexcept nogil:
    """out[b * ostride + t * D:][:D] = row idx[off[t * B + b0 + b]] of table
    table0 + t, b < n, for rows of one run (he_one_run): _one_run_rows
    straight into the output (nt: streaming its lines). Whether every bag held
    one entry: where one does not, it stops (the caller pools the bags
    another way, over whatever it wrote)."""
    cdef int64_t t, b, j0
    for t in range(T):
        j0 = off[t * B + b0]
        # the tokens and offsets of this thread's block of bags after next
        # (26 streams of a few lines each: the hardware prefetcher lags)
        _prefetch_span(idx + j0 + TOKENS_AHEAD * n, n * sizeof(index_t))
        _prefetch_span(off + t * B + b0 + TOKENS_AHEAD * n, n * sizeof(int64_t))
        for b in range(1, n + 1):
            if off[t * B + b0 + b] != j0 + b:
                if t > 0 and nt:    # (what was streamed lands before the plain stores)
                    he_stream_fence()
                return False
        _one_run_rows(s, idx + j0, n, M, NULL, 0, out + t * s.dim, ostride, table0 + t,
                      he_table_term(s, table0 + t), ring if pre == NULL else pre + j0, nt)
    return True


cdef void _forward(const he_scheme* s, const index_t* idx, const int64_t* off,
                   const real* M, const uint16_t* H, int bf, const real* psw, real* out, int64_t B, int64_t T,
                   int64_t ostride, int64_t table0, int mode, int nt, uint64_t* rings,
                   real* bufs, uint64_t* pre) noexcept nogil:
    cdef int64_t c, b0, nb, nchunks = (B + CHUNK - 1) // CHUNK, width = T * s.dim
    cdef int tid
    cdef uint64_t* ring
    cdef real* buf
    # an output beyond the caches is written with streaming stores (it would
    # be evicted before it is read anyway); a small one stays in cache
    cdef bint stream = B * ostride * <int64_t>sizeof(real) >= HE_STREAM_BYTES
    # float32 rows of whole 64-byte lines, one entry a bag: copied straight from
    # the array into the output's lines (no chunk buffer, no second pass),
    # streamed where the output is large (measured faster at every batch, 16
    # to 65536: whole-line stores, so the buffer's sequential sweep bought
    # nothing here)
    cdef bint direct = real is float and H == NULL and psw == NULL and \
        mode != MAX and not s.is_signed and s.dim % 16 == 0 and he_one_run(s) and \
        not he_reads_map(s) and rings != NULL and (not stream or (
            (<uintptr_t>out) % 64 == 0 and ostride % 16 == 0))
    with parallel(num_threads=nt):
        tid = threadid()
        # strides padded by 128 bytes: threads never share a cache line
        ring = rings + tid * _ring_len(s.runs) if rings != NULL else NULL
        buf = bufs + tid * (CHUNK * width + 32)
        for c in prange(nchunks, schedule='static'):
            b0 = c * CHUNK
            nb = min(B - b0, CHUNK)
            if not (direct and _direct_rows(s, idx, off, M, out + b0 * ostride, B, T, ostride,
                                             table0, b0, nb, ring, pre, stream)):
                # pool into a cache-resident buffer, then write the chunk's output
                # rows in one sequential sweep (scattered stores into a large
                # output stall on read-for-ownership misses)
                _forward_chunk(s, idx, off, M, H, bf, psw, buf, B, T, width, table0, mode,
                               b0, b0 + nb, ring, pre)
                _copy_rows(out + b0 * ostride, ostride, buf, width, nb, stream)
        if stream:
            he_stream_fence()


cdef inline bint _wants_starts(const he_scheme* s, int mode) noexcept nogil:
    """Whether backward hashes every entry's run starts up front (and so
    whether a forward can hand them over): unsigned, few runs, not max."""
    return mode != MAX and not s.is_signed and s.runs <= 4


def wants_starts(SchemeView sv, int mode):
    return bool(_wants_starts(&sv.s, mode))


def forward(SchemeView sv, const index_t[::1] indices, const int64_t[::1] offsets,
            const real[::1] weight, const real[::1] psw, real[:, ::1] out,
            int64_t B, int64_t T, int64_t table0, int mode, uint64_t[::1] starts,
            const uint16_t[::1] hweight, int bf=0):
    """out[b, t*D:(t+1)*D] = pool over bag t*B+b; psw of length 0 means none.
    No entry is padding (bag.py drops it: keep_live).
    starts, when not empty (len(indices) * runs, see wants_starts), receives
    every entry's run starts as the gathers compute them: backward given
    them hashes nothing. hweight, when not empty, is the array instead of
    weight: 16-bit values' bits (bf: bfloat16, else float16), read as floats
    (real is float then)."""
    if B == 0 or T == 0:
        return
    cdef const index_t* ip = &indices[0] if indices.shape[0] else NULL
    cdef const real* pp = &psw[0] if psw.shape[0] else NULL
    # per-thread scratch, allocated here so that a failure is a MemoryError;
    # no more threads than chunks (a thread without one only costs a wake-up)
    cdef int nt = <int>min(<int64_t>he_max_threads(), (B + CHUNK - 1) // CHUNK)
    cdef uint64_t* rings = NULL
    cdef real* bufs = <real*>malloc(nt * (CHUNK * T * sv.s.dim + 32) * sizeof(real))
    if sv.s.runs <= MAXR:
        rings = <uint64_t*>malloc(nt * _ring_len(sv.s.runs) * sizeof(uint64_t))
    if bufs == NULL or (sv.s.runs <= MAXR and rings == NULL):
        free(bufs)
        free(rings)
        raise MemoryError("embedding bag forward: no memory for the per-thread buffers")
    cdef uint64_t* pre = NULL
    if starts.shape[0] not in (0, indices.shape[0] * sv.s.runs):
        free(bufs)
        free(rings)
        raise ValueError(f"starts: expected {indices.shape[0] * sv.s.runs} values, "
                         f"got {starts.shape[0]}")
    if starts.shape[0] > 0 and ip != NULL:
        pre = &starts[0]
    cdef const real* M = &weight[0] if weight.shape[0] else NULL
    cdef const uint16_t* H = &hweight[0] if hweight.shape[0] else NULL
    with nogil:
        _forward(&sv.s, ip, &offsets[0], M, H, bf, pp, &out[0, 0], B, T,
                 out.shape[1], table0, mode, nt, rings, bufs, pre)
    free(bufs)
    free(rings)


cdef inline void _adagrad(real* w, uint16_t* hw, int bf, real* g, real* state, uint64_t slot,
                          real lr, real eps, uint64_t seed) noexcept nogil:
    """The update of slot from its summed gradient g, then g = 0 (only where
    g != 0: a zero gradient changes nothing, so skipping it is exact):
    Adagrad (state given), state += g^2, w -= lr * g / (sqrt(state) + eps);
    SGD (no state, float16 weights), w -= lr * g. A float16 weight (hw) is
    rounded once (he_half_sub: to nearest, or stochastically from seed)."""
    cdef real gv = g[slot]
    if gv != 0:
        _rule(w, hw, bf, state, slot, gv, lr, eps, seed)
        g[slot] = 0


cdef inline void _rule(real* w, uint16_t* hw, int bf, real* state, uint64_t slot, real gv, real lr,
                       real eps, uint64_t seed) noexcept nogil:
    """_adagrad's update of slot from its non-zero summed gradient gv."""
    cdef double step        # libm's double sqrt: the step is formed in double
    if state != NULL:
        state[slot] += gv * gv
        step = lr * gv / (sqrt(state[slot]) + eps)
    else:
        step = lr * gv
    if hw != NULL:
        he_half_sub(hw, slot, <float>step, seed, bf)
    else:
        w[slot] -= step


cdef inline void _apply_range(real* w, uint16_t* hw, int bf, real* g, real* state, int64_t lo,
                              int64_t hi, real lr, real eps, uint64_t seed) noexcept nogil:
    """_adagrad at every slot of [lo, hi), whose summed gradients are
    g[0 .. hi - lo) (an apply sweep's scratch, a contiguous run of an apply
    walk, or a row's compact sums). For float32 arithmetic, Adagrad of any
    weight and SGD of a 16-bit one run eight slots a step where the machine
    can (he_adagrad_run, he_half_adagrad_run, he_half_sgd_run: the same
    bits as _rule)."""
    cdef int64_t slot
    if real is float:
        if hw != NULL and state == NULL:
            if hi > lo:
                he_half_sgd_run(hw + lo, g, hi - lo, lo, lr, seed, bf)
            return
        if hw == NULL and state != NULL:
            if hi > lo:
                he_adagrad_run(w + lo, state + lo, g, hi - lo, lr, eps)
            return
        if hw != NULL:
            if hi > lo:
                he_half_adagrad_run(hw + lo, state + lo, g, hi - lo, lo, lr, eps, seed, bf)
            return
    for slot in range(lo, hi):
        if g[slot - lo] != 0:
            _rule(w, hw, bf, state, slot, g[slot - lo], lr, eps, seed)
            g[slot - lo] = 0


cdef void _apply_all(real* w, uint16_t* hw, int bf, real* g, real* state, uint64_t m, real lr,
                     real eps, uint64_t seed, int nt) noexcept nogil:
    """_apply_range over the whole array of m slots (g: the scratch), a range
    of it for each of nt threads."""
    cdef int r
    cdef int64_t lo
    for r in prange(nt, num_threads=nt, schedule='static', chunksize=1):
        lo = <int64_t>_range_lo(m, r, nt)
        _apply_range(w, hw, bf, g + lo, state, lo, <int64_t>_range_lo(m, r + 1, nt), lr, eps,
                     seed)


cdef inline void _add_signed(const he_scheme* s, uint64_t st, int64_t a, int64_t z,
                            const float* sg, const real* g, real alpha, real* target,
                            int64_t lo, int64_t hi) noexcept nogil:
    """Elements a..z-1 of the run starting at slot st: target[slot] +=
    alpha * sg[i - a] * g[i - a] where the slot lies in [lo, hi); a
    contiguous run in one tight loop (the same products: alpha * sign,
    then * g)."""
    cdef int64_t i, sti = <int64_t>st      # slots are < 2^62: signed math is safe
    cdef uint64_t slot
    if st + <uint64_t>z <= s.size and lo <= sti + a and sti + z <= hi:
        if real is float:
            he_scatter_signed_f(target + sti + a, g, sg, alpha, z - a)
        else:
            he_scatter_signed_d(target + sti + a, g, sg, alpha, z - a)
        return
    if st + <uint64_t>z <= s.size:
        for i in range(max(a, lo - sti), min(z, hi - sti)):
            target[sti + i] += alpha * sg[i - a] * g[i - a]
        return
    for i in range(a, z):
        slot = he_run_slot(s, st, i)
        if lo <= <int64_t>slot < hi:
            target[slot] += alpha * sg[i - a] * g[i - a]


cdef inline void _visit(const he_scheme* s, const he_row* row, int64_t k, uint64_t st,
                        int64_t i0, int64_t n, const real* g, real alpha, real* target,
                        uint16_t* htarget, int bf, real* scratch, real* state, real eps,
                        uint64_t seed, int64_t lo, int64_t hi, int act,
                        const float* rsg) noexcept nogil:
    """Act on elements k*L+i0 .. k*L+i0+n-1 of a row (run k starts at slot st)
    whose slots lie in [lo, hi); rsg: the row's signs, or NULL to hash them
    here."""
    cdef int64_t L = s.run, i, a, z
    cdef uint64_t slot
    cdef int64_t sti = <int64_t>st      # slots are < 2^62: signed math is safe
    cdef real gv
    cdef float sg[SIGNS]        # signs of SIGNS elements (he_signs)
    if not s.is_signed and st + <uint64_t>(i0 + n) <= s.size and (act == ACT_ADD
                                                                  or htarget != NULL):
        # contiguous run: clip it to this thread's slot range
        a = i0 if sti + i0 >= lo else lo - sti
        z = i0 + n if sti + i0 + n <= hi else hi - sti
        if z > a and act == ACT_ADD:
            _axpy(target + sti + a, g + (a - i0), alpha, z - a)
        elif z > a:         # a float16 weight's apply pass
            _apply_range(target, htarget, bf, scratch + sti + a, state, sti + a, sti + z, alpha,
                         eps, seed)
        return
    for a in range(i0, i0 + n, SIGNS):
        z = min(a + SIGNS, i0 + n)
        if s.is_signed and act == ACT_ADD:
            if rsg == NULL:
                he_signs(s, row, k * L + a, z - a, sg)
            _add_signed(s, st, a, z, &sg[0] if rsg == NULL else rsg + k * L + a,
                        g + (a - i0), alpha, target, lo, hi)
            continue
        for i in range(a, z):
            slot = he_run_slot(s, st, i)
            if <int64_t>slot < lo or <int64_t>slot >= hi:
                continue
            if act != ACT_ADD:
                _adagrad(target, htarget, bf, scratch, state, slot, alpha, eps, seed)
            else:
                target[slot] += alpha * g[i - i0]


cdef inline bint _touches(int64_t slot, int64_t L, int64_t lo, int64_t hi) noexcept nogil:
    """Whether the run of L slots from slot meets this thread's range [lo, hi)."""
    return lo <= slot + L - 1 and slot < hi


cdef inline bint _wanted(const he_scheme* s, const int64_t* off, const uint64_t* pre,
                         int64_t q, int64_t lo, int64_t hi) noexcept nogil:
    """Whether this thread (slots [lo, hi)) will read bag q's gradient row, as
    far as its first entry's pre-hashed runs tell."""
    cdef int64_t k, j = off[q]
    if j == off[q + 1]:
        return False
    for k in range(s.runs):
        if _touches(<int64_t>pre[j * s.runs + k], s.run, lo, hi):
            return True
    return False


cdef inline void _prefetch_runs(const he_scheme* s, const uint64_t* pre, int64_t j,
                                real* target, uint16_t* htarget, real* scratch, int64_t lo,
                                int64_t hi) noexcept nogil:
    """Prefetch, for writing, the runs of entry j that this thread owns in
    each array given (the target; in an apply pass the float16 weight and
    the scratch it reads: rows of a large table miss in cache otherwise)."""
    cdef int64_t k, slot
    for k in range(s.runs):
        slot = <int64_t>pre[j * s.runs + k]
        if _touches(slot, s.run, lo, hi):
            if target != NULL:
                he_prefetch_w(target + slot)
                he_prefetch_w(target + slot + s.run - 1)
            if htarget != NULL:
                he_prefetch_w(htarget + slot)
                he_prefetch_w(htarget + slot + s.run - 1)
            if scratch != NULL:
                he_prefetch_w(scratch + slot)
                he_prefetch_w(scratch + slot + s.run - 1)


cdef inline void _add_runs(const he_scheme* s, const uint64_t* pre, const int64_t* off,
                           const real* psw, const real* grad, int64_t gstride, int64_t B,
                           int64_t T, int mode, real alpha, real* target) noexcept nogil:
    """Backward's ACT_ADD over the whole array for rows of a few runs,
    from the run starts pre, in the general walk's order
    (he_add_back_f in C)."""
    if real is float:
        he_add_back_f(pre, off, psw, grad, gstride, B, T, s.dim, mode == MEAN, alpha, target,
                      s.size, s.run)
    else:
        he_add_back_d(pre, off, psw, grad, gstride, B, T, s.dim, mode == MEAN, alpha, target,
                      s.size, s.run)


cdef void _backward_part(const he_scheme* s, const index_t* idx, const int64_t* off,
                         const real* psw, const real* grad, int64_t gstride,
                         int64_t B, int64_t T, int64_t table0, int mode, const int64_t* win,
                         real alpha, real* target, uint16_t* htarget, int bf, real* scratch,
                         real* state, real eps, uint64_t seed, int64_t lo, int64_t hi,
                         int act, const uint64_t* pre) noexcept nogil:
    """One thread's share of backward: every entry, only slots in [lo, hi).

    ACT_ADD adds alpha * psw[j] / count * g into target; ACT_ADAGRAD applies the
    update (learning rate alpha, see _adagrad) at each visited slot of target
    or float16 htarget. pre, when given,
    holds every entry's run starts (hashed once, shared by the threads).
    """
    cdef int64_t b, t, j, i, cnt, D = s.dim, L = s.run, k, slot, R = s.runs
    cdef int64_t x, nent = off[T * B]
    # prefetch AHEAD for blocked schemes (a few runs per entry); element-wise
    # ones (HashedNet: D runs) would spend more on the look-ahead than it saves
    cdef bint ahead = pre != NULL and R <= 4 and mode != MAX
    cdef real w, ww
    cdef const real* g
    cdef he_tterm tt
    cdef he_row row
    cdef uint64_t hashed[MAXR]
    cdef real spare[8]          # the other threads' adds (he_scatter_in_f)
    cdef const uint64_t* st
    cdef float rsg[SIGNS]       # a signed row's signs (_visit), rows of <= SIGNS floats
    cdef bint whole = s.is_signed and act == ACT_ADD and D <= SIGNS
    if (pre != NULL and act == ACT_ADD and lo == 0 and <uint64_t>hi == s.size
            and _wants_starts(s, mode)):
        _add_runs(s, pre, off, psw, grad, gstride, B, T, mode, alpha, target)
        return
    for t in range(T):
        tt = he_table_term(s, table0 + t)
        for b in range(B):
            g = grad + b * gstride + t * D
            if mode == MAX:
                for i in range(D):
                    j = win[(t * B + b) * D + i]
                    if j >= 0:
                        row = he_row_begin(s, table0 + t, idx[j])
                        _visit(s, &row, i // L, he_run_start(s, &row, i // L), i % L, 1,
                               g + i, alpha, target, htarget, bf, scratch, state, eps, seed,
                               lo, hi, act, NULL)
                continue
            if ahead and b + AHEAD < B and _wanted(s, off, pre, t * B + b + AHEAD, lo, hi):
                # grad rows are gstride apart: a stride the hardware prefetcher
                # loses at every page, so each row would be a miss
                he_prefetch(g + AHEAD * gstride)
                he_prefetch(g + AHEAD * gstride + D - 1)
            w = alpha
            if mode == MEAN and act == ACT_ADD:
                cnt = off[t * B + b + 1] - off[t * B + b]
                if cnt > 1:
                    w = alpha / cnt
            for j in range(off[t * B + b], off[t * B + b + 1]):
                if ahead and j + AHEAD < nent:
                    # the slots written AHEAD entries on: random lines of the
                    # array, missed in L2 without this (the forward does the same)
                    _prefetch_runs(s, pre, j + AHEAD, target, htarget,
                                   scratch if act == ACT_ADAGRAD else NULL, lo, hi)
                x = idx[j]
                if L == 1 and act == ACT_ADD and not s.is_signed and (pre != NULL
                                                                      or s.runs <= MAXR):
                    # element-wise slots (HashedNet), hashed before or here in
                    # one loop: keep those in [lo, hi)
                    if pre != NULL:
                        st = pre + j * s.runs
                    else:
                        row = he_row_begin_t(s, table0 + t, tt, x)
                        he_run_starts(s, &row, hashed)
                        st = hashed
                    ww = w * psw[j] if psw != NULL else w
                    if lo == 0 and <uint64_t>hi == s.size:     # one thread: every slot
                        if pre != NULL and j + OWN_AHEAD < nent:
                            he_prefetch_own_slots(target, sizeof(real),
                                                  pre + (j + OWN_AHEAD) * s.runs, s.runs)
                        if real is float:
                            he_scatter_f(target, st, g, ww, s.runs)
                        else:
                            he_scatter_d(target, st, g, ww, s.runs)
                        continue
                    if real is float:
                        he_scatter_in_f(target, st, g, ww, s.runs, lo, hi, spare)
                    else:
                        he_scatter_in_d(target, st, g, ww, s.runs, lo, hi, spare)
                    continue
                if pre == NULL:
                    row = he_row_begin_t(s, table0 + t, tt, x)
                if whole:       # the row's signs once, not a run at a time
                    he_signs(s, &row, 0, D, rsg)
                for k in range(s.runs):
                    _visit(s, &row, k,
                           pre[j * s.runs + k] if pre != NULL else he_run_start(s, &row, k),
                           0, L, g + k * L,
                           w * psw[j] if (psw != NULL and act == ACT_ADD) else w,
                           target, htarget, bf, scratch, state, eps, seed, lo, hi, act,
                           rsg if whole else NULL)


cdef inline void _starts_row(const he_scheme* s, const he_row* row, uint64_t* out) noexcept nogil:
    """out[k] = start of run k of a begun row, for every run."""
    he_run_starts(s, row, out)


cdef void _hash_rows(const he_scheme* s, int64_t table, he_tterm tt, const index_t* x,
                     int64_t n, uint64_t* out) noexcept nogil:
    """out[g * R + k] = start of run k of row x[g] of `table` (tt its
    he_table_term), g < n (he_rows_starts)."""
    cdef he_rows_k k
    he_rows_of(&k, s, table, tt)
    he_rows_starts(&k, x, sizeof(index_t) == 8, n, out)


cdef void _signed_part(const he_scheme* s, const int64_t* off, int64_t B, const real* psw,
                       const real* grad, int64_t gstride, int mode, const uint64_t* pre,
                       const float* sgn, real alpha, real* target, int64_t lo,
                       int64_t hi) noexcept nogil:
    """A chunk of a signed scheme's bags (one table), given every entry's run
    starts pre and signs sgn: target[slot] += alpha (/ count, * psw) * sign *
    g for the slots in [lo, hi), in entry order; what _backward_part's
    ACT_ADD does with the signs hashed there, the same products."""
    cdef int64_t b, j, k, cnt, st, D = s.dim, L = s.run, R = s.runs
    cdef real w, ww
    cdef const real* g
    cdef const float* sg
    for b in range(B):
        g = grad + b * gstride
        w = alpha
        if mode == MEAN:
            cnt = off[b + 1] - off[b]
            if cnt > 1:
                w = alpha / cnt
        for j in range(off[b], off[b + 1]):
            ww = w * psw[j] if psw != NULL else w
            sg = sgn + j * D
            if L == 1:          # element-wise: one float a run, none wraps
                for k in range(R):
                    st = <int64_t>pre[j * R + k]
                    if lo <= st < hi:
                        target[st] += ww * sg[k] * g[k]
                continue
            for k in range(R):
                _add_signed(s, pre[j * R + k], 0, L, sg + k * L, g + k * L, ww, target, lo, hi)


DEF PROBES = 16     # ring of map probes in flight (> AHEAD)


cdef void _starts_range(const he_scheme* s, const index_t* idx, const int64_t* off,
                        int64_t B, int64_t T, int64_t table0, uint64_t* pre, int64_t a,
                        int64_t b) noexcept nogil:
    """_run_starts for the entries a <= j < b, whatever tables they span, a
    table at a time. Schemes that read a map (SCMA / LMA) hash each entry's
    probe once, AHEAD entries early, to prefetch its map entry, and begin
    the row from that probe."""
    cdef int64_t t = 0, j, end, R = s.runs
    cdef bint deep = he_reads_map(s)
    cdef uint64_t tprobe
    cdef uint64_t ring[PROBES]
    cdef he_tterm tt
    cdef he_row row
    if a >= b:
        return
    while off[t * B + B] <= a:        # the table of entry a (tables may be empty)
        t += 1
    while a < b:
        end = min(off[t * B + B], b)
        if not deep:
            _hash_rows(s, table0 + t, he_table_term(s, table0 + t), idx + a, end - a,
                       pre + a * R)
        else:
            tprobe = he_table_probe(s, table0 + t)
            for j in range(a, min(a + AHEAD, end)):
                ring[j % PROBES] = he_row_probe(s, tprobe, idx[j])
                he_prefetch(he_probe_hint(s, ring[j % PROBES]))
            for j in range(a, end):
                if j + AHEAD < end:
                    ring[(j + AHEAD) % PROBES] = he_row_probe(s, tprobe, idx[j + AHEAD])
                    he_prefetch(he_probe_hint(s, ring[(j + AHEAD) % PROBES]))
                row = he_row_begin_probed(s, table0 + t, idx[j], ring[j % PROBES])
                _starts_row(s, &row, pre + j * R)
        a = end
        t += 1


cdef void _run_starts(const he_scheme* s, const index_t* idx, const int64_t* off,
                      int64_t B, int64_t T, int64_t table0, uint64_t* pre,
                      int nt) noexcept nogil:
    """pre[j*R + k] = start of run k of entry j, all entries, on nt threads (a
    contiguous share each: one parallel region however many tables there
    are, none at all on one thread; the map entries of memory-read schemes
    prefetched AHEAD entries early)."""
    cdef int64_t j0 = off[0], n = off[T * B] - off[0]
    cdef int p
    if nt <= 1:
        _starts_range(s, idx, off, B, T, table0, pre, j0, j0 + n)
        return
    for p in prange(nt, num_threads=nt, schedule='static', chunksize=1):
        _starts_range(s, idx, off, B, T, table0, pre, j0 + n * p // nt,
                      j0 + n * (p + 1) // nt)


cdef void _argmax(const he_scheme* s, const index_t* idx, const int64_t* off,
                  const real* M, const uint16_t* H, int bf, int64_t B, int64_t T, int64_t table0,
                  int64_t* win, real* best) noexcept nogil:
    """win[q*D + i] = first entry of bag q holding the maximum of element i, or -1
    (best: D floats of scratch)."""
    cdef int64_t q, j, i, k, D = s.dim, L = s.run
    cdef uint64_t st
    cdef real v
    cdef he_row row
    for q in range(T * B):
        for i in range(D):
            win[q * D + i] = -1
        for j in range(off[q], off[q + 1]):
            row = he_row_begin(s, table0 + q // B, idx[j])
            for k in range(s.runs):
                st = he_run_start(s, &row, k)
                for i in range(k * L, k * L + L):
                    v = he_sign(s, &row, i) * _ld(M, H, bf, he_run_slot(s, st, i - k * L))
                    if win[q * D + i] < 0 or v > best[i]:
                        best[i] = v
                        win[q * D + i] = j


cdef inline uint64_t _range_lo(uint64_t m, int64_t r, int nt) noexcept nogil:
    """First slot of thread r's range, floor(m r / nt), without overflowing."""
    return (m // <uint64_t>nt) * <uint64_t>r + ((m % <uint64_t>nt) * <uint64_t>r) // <uint64_t>nt


cdef inline int64_t _owner(uint64_t x, const uint64_t* lo, int nt) noexcept nogil:
    """The thread whose range [lo[r], lo[r+1]) holds slot x (a few compares:
    nt is the thread count)."""
    cdef int64_t r = 0
    while r + 1 < nt and lo[r + 1] <= x:
        r += 1
    return r


cdef inline uint64_t _owners(const he_scheme* s, const uint64_t* pre, int64_t j,
                             const uint64_t* lo, int nt) noexcept nogil:
    """Bit r set when one of entry j's runs touches thread r's slots (nt <= 64)."""
    cdef int64_t k, r, r1
    cdef uint64_t st, end, m = lo[nt], mask = 0
    for k in range(s.runs):
        st = pre[j * s.runs + k]
        end = st + <uint64_t>s.run - 1
        if end >= m:            # wraps: its tail [0, end - m] may span several ranges
            for r in range(_owner(end - m, lo, nt) + 1):
                mask |= (<uint64_t>1) << r
            end = m - 1
        r1 = _owner(end, lo, nt)
        for r in range(_owner(st, lo, nt), r1 + 1):
            mask |= (<uint64_t>1) << r
    return mask


cdef void _bucket_pass(const he_scheme* s, const int64_t* off, const uint64_t* pre,
                       int64_t q0, int64_t q1, const uint64_t* lo, int nt, int64_t* count, int64_t* pos,
                       int64_t* pairs) noexcept nogil:
    """Bags q0..q1-1. First pass (pairs NULL): count[r] += entries touching
    range r. Second pass: write (j, q) at pairs[2 pos[r]] for each, advancing
    pos[r]. The owners are recomputed (a few compares) rather than kept: an
    array of them would be N more words of fresh pages per call."""
    cdef int64_t q, j, r
    cdef uint64_t mask
    for q in range(q0, q1):
        for j in range(off[q], off[q + 1]):
            mask = _owners(s, pre, j, lo, nt)
            r = 0
            while mask:
                if mask & 1:
                    if pairs == NULL:
                        count[r] += 1
                    else:
                        pairs[2 * pos[r]] = j
                        pairs[2 * pos[r] + 1] = q
                        pos[r] += 1
                mask >>= 1
                r += 1


cdef inline const real* _pair_row(const real* grad, const int64_t* pairs, int64_t e, int64_t B,
                                  int64_t gstride, int64_t D) noexcept nogil:
    """The gradient row of bucket pair e's bag q = t*B + b (row b, table t)."""
    cdef int64_t q = pairs[2 * e + 1]
    return grad + (q % B) * gstride + (q // B) * D


cdef inline real _pair_scale(real alpha, const int64_t* moff, const real* psw, int64_t j,
                             int64_t q) noexcept nogil:
    """alpha, over the entries of bag q where mean (moff: the offsets, else
    NULL), times entry j's weight (psw)."""
    cdef real w = alpha
    cdef int64_t cnt
    if moff != NULL:
        cnt = moff[q + 1] - moff[q]
        if cnt > 1:
            w = alpha / cnt
    if psw != NULL:
        w = w * psw[j]
    return w


cdef void _backward_owned(const he_scheme* s, const int64_t* pairs, int64_t n,
                          const real* psw, const real* grad, int64_t gstride, int64_t B,
                          const int64_t* moff, real alpha, real* target, uint16_t* htarget, int bf,
                          real* scratch, real* state, real eps, uint64_t seed, int64_t lo,
                          int64_t hi, int act, const uint64_t* pre) noexcept nogil:
    """One thread's bucket: the entries (j, bag q) whose runs touch its slots
    [lo, hi), in entry order (so each slot sums in entry order, as in
    _backward_part: the same bits). moff: the offsets where mean, else NULL."""
    cdef int64_t e, j, q, k, R = s.runs, L = s.run, D = s.dim
    cdef const real* g
    cdef real w
    for e in range(n):
        if e + AHEAD < n:
            g = _pair_row(grad, pairs, e + AHEAD, B, gstride, D)
            he_prefetch(g)
            he_prefetch(g + D - 1)
            _prefetch_runs(s, pre, pairs[2 * (e + AHEAD)], target, htarget,
                           scratch if act == ACT_ADAGRAD else NULL, lo, hi)
        j = pairs[2 * e]
        q = pairs[2 * e + 1]
        g = _pair_row(grad, pairs, e, B, gstride, D)
        w = _pair_scale(alpha, moff, psw, j, q) if act == ACT_ADD else alpha
        for k in range(R):
            _visit(s, NULL, k, pre[j * R + k], 0, L, g + k * L, w, target, htarget, bf, scratch,
                   state, eps, seed, lo, hi, act, NULL)


cdef inline bint _rows_sparse(const he_scheme* s, int mode) noexcept nogil:
    """Can a two-phase step sum its gradient per row instead of in a dense
    scratch: a full table's runs are whole rows (start = row * D), so two
    entries' runs are the same slots or disjoint; not max mode (whose
    winners are per element)."""
    return s.kind == HE_FULL and s.runs == 1 and mode != MAX


cdef inline void _rowwise(real* w, uint16_t* hw, int bf, const real* g, real* state, uint64_t st,
                          int64_t D, real lr, real eps, uint64_t seed) noexcept nogil:
    """Row-wise Adagrad (optim.h) of the row at slots st .. st + D - 1 from
    its summed gradient g: its accumulator state[st / D] grows by the mean
    square, then every element with g_i != 0 moves by
    lr g_i / (sqrt(G) + eps), formed in double (a 16-bit weight rounds
    once): for float32 arithmetic eight elements a step where the machine
    can (he_rowwise_run, he_half_rowwise_run: the same bits). An all-zero
    gradient changes nothing (G += 0, no element moves), so it is
    skipped."""
    cdef double ss, mult
    cdef int64_t i
    if real is float:
        ss = he_row_sumsq_f(g, D)
    else:
        ss = he_row_sumsq_d(g, D)
    if ss == 0:
        return
    if real is float:
        mult = he_row_mult_f(state + st // <uint64_t>D, ss, D, lr, eps)
        if hw != NULL:
            he_half_rowwise_run(hw + st, g, D, st, mult, seed, bf)
        else:
            he_rowwise_run(w + st, g, D, mult)
    else:
        mult = he_row_mult_d(state + st // <uint64_t>D, ss, D, lr, eps)
        for i in range(D):
            if g[i] != 0:           # a zero sum moves nothing, whatever its sign
                w[st + i] = w[st + i] - mult * g[i]


cdef inline int64_t _rows_cap(int64_t n) noexcept nogil:
    """Open-addressing slots for a bucket of n entries: a power of two >= 2n."""
    cdef int64_t cap = 16
    while cap < 2 * n:
        cap <<= 1
    return cap


cdef inline int64_t _rows_bytes(int64_t n, int64_t D, int64_t rsize) noexcept nogil:
    """Bytes _rows_owned needs for a bucket of n entries (64-byte multiples)."""
    return (((2 * _rows_cap(n) + n + 1) * 8 + n * D * rsize) + 63) // 64 * 64


cdef void _rows_owned(const he_scheme* s, const int64_t* pairs, int64_t n,
                      const real* psw, const real* grad, int64_t gstride, int64_t B,
                      const int64_t* moff, real lr, real* w, uint16_t* hw, int bf, real* state, real eps,
                      uint64_t seed, int rows, const uint64_t* pre, char* mem) noexcept nogil:
    """A full table's two-phase step on one thread's bucket (entries in
    entry order; whole rows: the thread ranges are row-aligned) with no
    dense scratch: each row's gradient is summed, in entry order, in a
    compact buffer found through an open-addressing table keyed by the
    row's start, then every row is moved once: per element (ROWS_SLOT:
    _apply_range, Adagrad's rule or float16 SGD, the same sums in the same
    order as the dense scratch, so the same bits) or row-wise (ROWS_ROW:
    _rowwise). The weight is w, or hw for float16 storage. O(rows touched)
    memory (mem: _rows_bytes(n) of it) instead of the table's size."""
    cdef int64_t e, j, h, u, nu = 0, D = s.dim, cap = _rows_cap(n)
    cdef uint64_t st
    cdef const real* g
    cdef real sc
    cdef real* row
    # entry h of the table: keys[2h] a row's start, keys[2h + 1] its place
    # in acc (one cache line holds both)
    cdef uint64_t* keys = <uint64_t*>mem
    cdef uint64_t* order = keys + 2 * cap
    cdef real* acc = <real*>(order + n + 1)
    for h in range(cap):
        keys[2 * h] = <uint64_t>(-1)        # empty (a start is < 2^62)
    for e in range(n):
        if e + AHEAD < n:
            g = _pair_row(grad, pairs, e + AHEAD, B, gstride, D)
            he_prefetch(g)
            he_prefetch(g + D - 1)
        j = pairs[2 * e]
        g = _pair_row(grad, pairs, e, B, gstride, D)
        sc = _pair_scale(1, moff, psw, j, pairs[2 * e + 1])
        st = pre[j]
        h = <int64_t>((st * <uint64_t>0x9E3779B97F4A7C15) >> 40) & (cap - 1)
        while keys[2 * h] != st and keys[2 * h] != <uint64_t>(-1):
            h = (h + 1) & (cap - 1)
        if keys[2 * h] != st:
            keys[2 * h] = st
            keys[2 * h + 1] = nu
            order[nu] = st
            _scal(acc + nu * D, g, sc, D)       # a row's first entry: its sum starts there
            nu += 1
        else:
            _axpy(acc + keys[2 * h + 1] * D, g, sc, D)
    for u in range(nu):
        if u + AHEAD < nu:
            st = order[u + AHEAD]
            if hw != NULL:
                he_prefetch_w(hw + st)
                he_prefetch_w(hw + st + D - 1)
            else:
                he_prefetch_w(w + st)
                he_prefetch_w(w + st + D - 1)
            if state != NULL:
                he_prefetch_w(state + (st // <uint64_t>D if rows == ROWS_ROW else st))
        st = order[u]
        row = acc + u * D
        if rows == ROWS_ROW:
            _rowwise(w, hw, bf, row, state, st, D, lr, eps, seed)
        else:
            _apply_range(w, hw, bf, row, state, st, st + D, lr, eps, seed)


cdef int _backward_bucketed(const he_scheme* s, const int64_t* off,
                            const real* psw, const real* grad, int64_t gstride, int64_t B,
                            int64_t T, int mode, real alpha,
                            real* target, uint16_t* htarget, int bf, real* scratch, real* state,
                            real eps, uint64_t seed, bint sweep, int nt,
                            const uint64_t* pre, int rows) noexcept nogil:
    """Backward on nt threads where each thread walks only the entries that
    touch its slot range (not every entry, as _backward_part does): the
    entries are bucketed by owner, stably, in two passes over the bags, then
    each thread runs its bucket. Same order per slot, so the same bits as
    one thread. rows (ROWS_SLOT, ROWS_ROW): a full table's two-phase step
    summed per row (_rows_owned), on row-aligned ranges. Returns -1
    (nothing done) when out of memory."""
    cdef int64_t Q = T * B, p, r, total = 0, rbytes = 0
    cdef uint64_t m = s.size
    cdef int64_t* count = <int64_t*>calloc(nt * nt, sizeof(int64_t))
    cdef int64_t* pos = <int64_t*>malloc(nt * nt * sizeof(int64_t))
    cdef int64_t* start = <int64_t*>malloc((nt + 1) * sizeof(int64_t))
    cdef int64_t* rmem = <int64_t*>malloc((nt + 1) * sizeof(int64_t))
    cdef uint64_t* lo = <uint64_t*>malloc((nt + 1) * sizeof(uint64_t))
    # mean bags scale by their entry count, off[q + 1] - off[q] (_pair_scale)
    cdef const int64_t* moff = off if mode == MEAN else NULL
    cdef int64_t* pairs = NULL
    cdef char* ws = NULL
    cdef bint ok = (count != NULL and pos != NULL and start != NULL and rmem != NULL
                    and lo != NULL)
    if ok:
        for r in range(nt + 1):
            lo[r] = _range_lo(m // <uint64_t>s.dim, r, nt) * <uint64_t>s.dim if rows \
                else _range_lo(m, r, nt)
        for p in prange(nt, num_threads=nt, schedule='static', chunksize=1):
            _bucket_pass(s, off, pre, Q * p // nt, Q * (p + 1) // nt, lo, nt,
                         count + p * nt, NULL, NULL)
        for r in range(nt):     # bucket r: the bag blocks' entries in block order
            start[r] = total
            rmem[r] = rbytes
            for p in range(nt):
                pos[p * nt + r] = total
                total += count[p * nt + r]
            if rows:
                rbytes += _rows_bytes(total - start[r], s.dim, sizeof(real))
        start[nt] = total
        rmem[nt] = rbytes
        # one block (he_ws_take): the pairs and the row sums
        ws = <char*>he_ws_take((2 * total + 2) * 8 + rbytes)
        ok = ws != NULL
    if ok:
        pairs = <int64_t*>(ws + rbytes)
        for p in prange(nt, num_threads=nt, schedule='static', chunksize=1):
            _bucket_pass(s, off, pre, Q * p // nt, Q * (p + 1) // nt, lo, nt,
                         NULL, pos + p * nt, pairs)
        for r in prange(nt, num_threads=nt, schedule='static', chunksize=1):
            if rows:        # summed per row, no dense scratch
                _rows_owned(s, pairs + 2 * start[r], start[r + 1] - start[r], psw, grad,
                            gstride, B, moff, alpha, target, htarget, bf, state, eps, seed, rows,
                            pre, ws + rmem[r])
            elif scratch != NULL:     # two phases: the gradient into scratch, then the rule
                _backward_owned(s, pairs + 2 * start[r], start[r + 1] - start[r], psw, grad,
                                gstride, B, moff, 1, scratch, NULL, 0, NULL, NULL, 0, 0, lo[r],
                                lo[r + 1], ACT_ADD, pre)
                if sweep:
                    _apply_range(target, htarget, bf, scratch + lo[r], state, lo[r], lo[r + 1],
                                 alpha, eps, seed)
                else:
                    _backward_owned(s, pairs + 2 * start[r], start[r + 1] - start[r], psw,
                                    grad, gstride, B, moff, alpha, target, htarget, bf, scratch,
                                    state, eps, seed, lo[r], lo[r + 1], ACT_ADAGRAD, pre)
            else:
                _backward_owned(s, pairs + 2 * start[r], start[r + 1] - start[r], psw, grad,
                                gstride, B, moff, alpha, target, NULL, 0, NULL, NULL, 0, 0, lo[r],
                                lo[r + 1], ACT_ADD, pre)
    free(count)
    free(pos)
    free(start)
    free(rmem)
    free(lo)
    he_ws_give(ws)
    return 0 if ok else -1


def backward(SchemeView sv, const index_t[::1] indices, const int64_t[::1] offsets,
             const real[::1] psw, const real[:, :] grad, int64_t B, int64_t T,
             int64_t table0, int mode, const real[::1] weight, real[::1] target, double alpha,
             real[::1] scratch, real[::1] state, double eps, const uint64_t[::1] starts,
             const uint16_t[::1] hweight, uint64_t seed, int rows=ROWS_NONE, int bf=0):
    """Scatter-add of grad into the slots, four ways by what is passed.

    - plain gradient: target = a zero array of size m, alpha = 1;
    - fused SGD: target = weight, alpha = -lr (an in-place update);
    - fused Adagrad: target = weight, alpha = lr, scratch = zeros(m) (kept zero
      between calls), state = the accumulator of squared gradients;
    - a 16-bit weight (hweight, its bits: bfloat16 where bf, else float16;
      weight and target empty): SGD as Adagrad without state (alpha = lr,
      scratch given), or Adagrad, each slot rounded once (seed 0: to
      nearest, else stochastically);
    - rows (a full table's two-phase step; target = weight, or hweight):
      no scratch, each row's gradient summed in a compact per-thread buffer
      (_rows_owned), then applied per element (ROWS_SLOT: Adagrad, or
      float16 SGD; the same bits as the scratch, see wants_scratch) or
      row-wise (ROWS_ROW: row-wise Adagrad, state one value per row).
    weight (or hweight) is read only in max mode, to find each element's
    winning entry. starts, when not empty, are the entries' run starts from
    forward (see wants_starts): nothing is hashed again. grad's rows are
    each contiguous, at any stride (a column slice of a wider gradient), 0
    included (one row repeated).
    """
    cdef const he_scheme* s = &sv.s
    cdef const index_t* ip = &indices[0] if indices.shape[0] else NULL
    cdef const real* pp = &psw[0] if psw.shape[0] else NULL
    cdef int64_t* win = NULL
    cdef int nt = he_max_threads(), tid, nteam
    cdef int64_t lo, hi, slot
    cdef uint64_t m = s.size
    cdef bint sweep
    cdef uint64_t* pre = NULL
    cdef real* best = NULL
    # two phases (Adagrad, or float16 SGD): the gradient summed into scratch,
    # then the rule applied once per touched slot
    cdef bint adagrad = scratch.shape[0] > 0
    cdef real* sp = &scratch[0] if adagrad else NULL
    cdef real* stp = &state[0] if state.shape[0] else NULL
    cdef real* tp = &target[0] if target.shape[0] else NULL
    # written only by an optimizer (the caller passes a writeable array then)
    cdef uint16_t* hp = <uint16_t*>&hweight[0] if hweight.shape[0] else NULL
    cdef const real* M = &weight[0] if weight.shape[0] else NULL
    cdef bint chunked
    cdef uint64_t* buf = NULL
    cdef float* sgn = NULL
    cdef int64_t* loc = NULL
    cdef int64_t most = 0, t, b0, b1, c, i, j0, jj, q, r
    cdef he_tterm tt
    cdef he_row row
    cdef bint done = False
    if B == 0 or T == 0 or ip == NULL:
        return
    if grad.shape[0] != B or grad.shape[1] != T * s.dim or \
            grad.strides[1] != sizeof(real) or grad.strides[0] % sizeof(real) or \
            0 < grad.strides[0] < grad.shape[1] * <int64_t>sizeof(real) or grad.strides[0] < 0:
        raise ValueError(f"grad: expected shape ({B}, {T * s.dim}) with contiguous rows in "
                         f"order (or one row, at stride 0), got shape ({grad.shape[0]}, "
                         f"{grad.shape[1]}), strides ({grad.strides[0]}, {grad.strides[1]})")
    cdef int64_t gs = grad.strides[0] // sizeof(real)     # the rows' stride
    if starts.shape[0] not in (0, indices.shape[0] * s.runs):
        raise ValueError(f"saved: expected {indices.shape[0] * s.runs} run starts, "
                         f"got {starts.shape[0]}")
    if mode == MAX:
        win = <int64_t*>malloc(T * B * s.dim * sizeof(int64_t))
        best = <real*>malloc(s.dim * sizeof(real))
        if win == NULL or best == NULL:
            free(win)
            free(best)
            raise MemoryError("embedding bag backward: no memory for the max-mode winners")
        with nogil:
            _argmax(s, ip, &offsets[0], M, hp, bf, B, T, table0, win, best)
        free(best)
    if nt > 1 and (m < <uint64_t>(4096 * nt) or indices.shape[0] * s.dim < SMALL_WORK):
        # not worth the threads: a parallel region costs more than the work, and
        # inside a torch step extra threads contend with torch's own pool
        nt = 1
    cdef bint own = False
    if _wants_starts(s, mode) and starts.shape[0] > 0:
        pre = <uint64_t*>&starts[0]     # read only
    elif _wants_starts(s, mode):
        # hash each entry once, up front, in parallel: every thread walks every
        # entry, and the walk prefetches the slots it will write from these
        # (at most 4 starts per entry: never an N x D slot array)
        pre = <uint64_t*>malloc(indices.shape[0] * s.runs * sizeof(uint64_t))
        own = pre != NULL
        if pre != NULL:
            with nogil:
                _run_starts(s, ip, &offsets[0], B, T, table0, pre, nt)
    # Adagrad's apply pass: sweep the scratch when it is small next to the work,
    # else walk the entries again (a full table's scratch is mostly zeros)
    sweep = m <= <uint64_t>(8 * s.dim) * <uint64_t>indices.shape[0]
    # many runs per entry (HashedNet-like): hash a chunk of bags once, in parallel,
    # then add the chunk on each thread's slot range (runs of one float: one
    # range, below); chunks bound the starts kept (one thread too: the rows
    # are hashed a batch at a time)
    # signed schemes too, their signs hashed with the starts: each thread
    # walking every entry had hashed every sign (the work) on every thread
    chunked = pre == NULL and mode != MAX and (not adagrad or sweep)
    cdef int parts = 1 if s.run == 1 else nt    # slot ranges of a chunked backward
    if chunked:
        for t in range(T):
            for b0 in range(0, B, CHUNK_BAGS):
                b1 = min(B, b0 + CHUNK_BAGS)
                most = max(most, offsets[t * B + b1] - offsets[t * B + b0])
        buf = <uint64_t*>malloc((most * s.runs + 1) * sizeof(uint64_t))
        loc = <int64_t*>malloc((CHUNK_BAGS + 1) * sizeof(int64_t))
        if s.is_signed:
            sgn = <float*>malloc((most * s.dim + 1) * sizeof(float))
        chunked = buf != NULL and loc != NULL and (sgn != NULL or not s.is_signed)
    if rows:
        if not (_rows_sparse(s, mode) and (hp != NULL or tp != NULL)
                and (rows == ROWS_SLOT or (rows == ROWS_ROW and stp != NULL))):
            free(win)
            if own:
                free(pre)
            raise ValueError("rows: only for a full table's fused step (row-wise: with "
                             "its state)")
        if pre != NULL:
            with nogil:
                done = _backward_bucketed(s, &offsets[0], pp, &grad[0, 0], gs,
                                          B, T, mode, <real>alpha, tp, hp, bf,
                                          NULL, stp, <real>eps, seed, False, min(nt, 64),
                                          pre, rows) == 0
        free(win)
        if own:
            free(pre)
        if not done:
            raise MemoryError("embedding bag backward: no memory for the row sums "
                              "(the weight may be partly updated)")
        return
    if (pre != NULL and (not adagrad or sweep)
            and _wants_starts(s, mode)):
        # rows of a few runs: one thread's walk (_add_runs)
        # took about a third of the bucketed time on two threads (0.27
        # against 0.91 ms, RobeZ SGD at batch 2048 x 26; Z=4, bags of 8:
        # 4.1-4.2 against 27-31 ms), and two threads walking every entry
        # 0.52: the walk, not the adds, is the work.
        # A two-phase step then applies its rule on every thread.
        with nogil:
            _add_runs(s, pre, &offsets[0], pp, &grad[0, 0], gs, B, T, mode,
                      1 if adagrad else <real>alpha, sp if adagrad else tp)
            if adagrad:
                _apply_all(tp, hp, bf, sp, stp, m, <real>alpha, <real>eps, seed, nt)
        free(win)
        if own:
            free(pre)
        return
    if pre != NULL and 1 < nt <= 64:
        with nogil:
            done = _backward_bucketed(s, &offsets[0], pp, &grad[0, 0], gs, B,
                                      T, mode, <real>alpha, tp, hp, bf, sp,
                                      stp, <real>eps, seed, sweep, nt, pre, ROWS_NONE) == 0
        if done:
            free(win)
            if own:
                free(pre)
            return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        nteam = he_num_threads()      # the team may be smaller than nt
        lo = <int64_t>_range_lo(m, tid, nteam)
        hi = <int64_t>_range_lo(m, tid + 1, nteam)
        if chunked:
            for t in range(T):
                tt = he_table_term(s, table0 + t)
                for c in range((B + CHUNK_BAGS - 1) // CHUNK_BAGS):
                    b0 = c * CHUNK_BAGS
                    b1 = min(B, b0 + CHUNK_BAGS)
                    j0 = offsets[t * B + b0]
                    for i in prange(b1 - b0 + 1, schedule='static'):
                        loc[i] = offsets[t * B + b0 + i] - j0
                    r = offsets[t * B + b1] - j0
                    for q in prange(nt, schedule='static', chunksize=1):
                        jj = r * q // nt
                        _hash_rows(s, table0 + t, tt, ip + j0 + jj, r * (q + 1) // nt - jj,
                                   buf + jj * s.runs)
                        if sgn != NULL:
                            he_sign_rows(s, tt, ip + j0 + jj, sizeof(index_t) == 8,
                                         r * (q + 1) // nt - jj, sgn + jj * s.dim)
                    # one iteration per slot range: a barrier before the next chunk.
                    # Runs of one float (HashedNet) take one range: each thread
                    # would walk every entry for a half of the adds, and the
                    # walk is the work (bags of 8 at 1000x: 14-18 ms a
                    # backward on one thread, 26-55 on two)
                    for q in prange(parts, schedule='static', chunksize=1):
                        if sgn != NULL:
                            _signed_part(s, loc, b1 - b0, pp + j0 if pp != NULL else NULL,
                                         &grad[0, 0] + b0 * gs + t * s.dim,
                                         gs, mode, buf, sgn,
                                         1 if adagrad else <real>alpha, sp if adagrad else tp,
                                         <int64_t>_range_lo(m, q, parts),
                                         <int64_t>_range_lo(m, q + 1, parts))
                        else:
                            _backward_part(s, ip + j0, loc, pp + j0 if pp != NULL else NULL,
                                           &grad[0, 0] + b0 * gs + t * s.dim,
                                           gs, b1 - b0, 1, table0 + t, mode, NULL,
                                           1 if adagrad else <real>alpha,
                                           sp if adagrad else tp, NULL, 0, NULL, NULL, 0, 0,
                                           <int64_t>_range_lo(m, q, parts),
                                           <int64_t>_range_lo(m, q + 1, parts), ACT_ADD, buf)
        elif adagrad:
            _backward_part(s, ip, &offsets[0], pp, &grad[0, 0], gs, B, T,
                           table0, mode, win, 1, sp, NULL, 0, NULL, NULL, 0, 0,
                           lo, hi, ACT_ADD, pre)
            if sweep:
                _apply_range(tp, hp, bf, sp + lo, stp, lo, hi, <real>alpha, <real>eps, seed)
            else:
                _backward_part(s, ip, &offsets[0], pp, &grad[0, 0], gs, B,
                               T, table0, mode, win, <real>alpha,
                               tp, hp, bf, sp, stp, <real>eps, seed, lo, hi, ACT_ADAGRAD, pre)
        else:
            _backward_part(s, ip, &offsets[0], pp, &grad[0, 0], gs, B, T,
                           table0, mode, win, <real>alpha, tp,
                           NULL, 0, NULL, NULL, 0, 0, lo, hi, ACT_ADD, pre)
    if chunked and adagrad:
        # the pranges above end without a barrier (each begins with one): a
        # thread may apply a range only once the one range's adds are done
        with nogil:
            _apply_all(tp, hp, bf, sp, stp, m, <real>alpha, <real>eps, seed, nt)
    free(win)
    if own:
        free(pre)
    free(buf)
    free(sgn)
    free(loc)


def offsets_problem(const int64_t[::1] offsets, int64_t n):
    """First position where offsets fail 0 = o[0] <= o[1] <= ... <= o[-1] <= n,
    or -1 when they are valid (one pass, compiled: offsets can be millions long)."""
    return _offsets_problem(&offsets[0], offsets.shape[0], n) if offsets.shape[0] else -1


cdef int64_t _offsets_problem(const int64_t* o, int64_t k, int64_t n) noexcept nogil:
    cdef int64_t i
    if o[0] != 0:
        return 0
    for i in range(1, k):
        if o[i] < o[i - 1]:
            return i
    return k - 1 if o[k - 1] > n else -1


def index_problem(const index_t[::1] indices, const int64_t[::1] offsets, int64_t B,
                  int64_t T, const int64_t[::1] bounds, bint has_pad, int64_t pad):
    """First entry j of table t (bags t*B .. t*B+B-1) with a token outside
    [0, bounds[t]) (padding skipped), or -1 when all are in range. Compared
    unsigned: a negative token is past every bound, and a bound of -2**63
    reads as 2**63 (reference maps: every token >= 0)."""
    cdef int64_t t, j, x, bad = -1
    with nogil:
        for t in range(T):
            for j in range(offsets[t * B], offsets[t * B + B]):
                x = indices[j]
                if <uint64_t>x >= <uint64_t>bounds[t] and not (has_pad and x == pad):
                    bad = j
                    break
            if bad >= 0:
                break
    return bad


cdef void _feature_major(const index_t* x, index_t* o, int64_t B, int64_t T,
                         int nt) noexcept nogil:
    """o[t*B + b] = x[b*T + t], in blocks of 64 samples a thread: each block's
    rows are read once and stay in cache while its T columns are written."""
    cdef int64_t blk, b, t, b0, b1, nblk = (B + 63) // 64
    for blk in prange(nblk, nogil=True, num_threads=nt, schedule='static'):
        b0 = blk * 64
        b1 = min(B, b0 + 64)
        for t in range(T):
            for b in range(b0, b1):
                o[t * B + b] = x[b * T + t]


def feature_major(const index_t[:, ::1] x, index_t[::1] out):
    """out = x.T flattened (bag (t, b) of a (B, T) batch at t*B + b), on up to
    2 threads per MB of it: the copy 2-D input needs for the kernels'
    table-major order."""
    cdef int64_t B = x.shape[0], T = x.shape[1]
    if out.shape[0] != B * T:
        raise ValueError(f"out: expected {B * T} values, got {out.shape[0]}")
    if B * T == 0:
        return
    cdef int nt = <int>max(1, min(<int64_t>he_max_threads(), (B * T * sizeof(index_t)) >> 20))
    with nogil:
        _feature_major(&x[0, 0], &out[0], B, T, nt)


cdef int64_t _live_of(const index_t* idx, int64_t j0, int64_t j1, int64_t pad) noexcept nogil:
    cdef int64_t j, c = 0
    for j in range(j0, j1):
        c += idx[j] != pad
    return c


cdef void _keep_live(const index_t* idx, const real* psw, int64_t j0, int64_t j1,
                     int64_t pad, index_t* out, real* pout, int64_t c,
                     int64_t end) noexcept nogil:
    # every entry is written and the next live one overwrites a pad, so
    # the only branch is the loop's end (at the bag's last live entry), not
    # a test per entry, which mispredicts wherever padding is interleaved
    cdef int64_t j
    for j in range(j0, j1):
        if c == end:
            break
        out[c] = idx[j]
        if psw != NULL:
            pout[c] = psw[j]
        c += idx[j] != pad


cdef int _unpad_threads(int64_t n) noexcept nogil:
    return <int>min(<int64_t>he_max_threads(), max(<int64_t>1, n >> 16))


def live_offsets(const index_t[::1] idx, const int64_t[::1] off, int64_t pad,
                 int64_t[::1] out):
    """out = the offsets of the same bags without their entries equal to
    pad; returns out[-1], the entries left (== off[-1]: no padding)."""
    cdef int64_t nb = off.shape[0] - 1, q
    if out.shape[0] != off.shape[0] or nb < 0:
        raise ValueError(f"out: expected {off.shape[0]} offsets, got {out.shape[0]}")
    out[0] = 0
    if off[nb] == 0:
        out[:] = 0
        return 0
    with nogil:
        for q in prange(nb, num_threads=_unpad_threads(off[nb]), schedule="static"):
            out[q + 1] = _live_of(&idx[0], off[q], off[q + 1], pad)
        for q in range(nb):
            out[q + 1] += out[q]
    return out[nb]


def keep_live(const index_t[::1] idx, const int64_t[::1] off, const real[::1] psw,
              int64_t pad, const int64_t[::1] live, index_t[::1] out, real[::1] pout):
    """The entries of every bag that are not pad (and their per-sample
    weights, where psw is not empty), in order, at the offsets live that
    live_offsets gave: bags without their padding, whose pooled results are
    the same bits (every pool skips padding; mean divides by the entries
    left), for the kernels' tight loops, which take no padding."""
    cdef int64_t nb = off.shape[0] - 1, q
    if (live.shape[0] != off.shape[0] or out.shape[0] != live[nb]
            or pout.shape[0] != (live[nb] if psw.shape[0] else 0)):
        raise ValueError("live, out, pout: expected live_offsets' offsets and their sizes")
    if live[nb] == 0:
        return
    cdef const real* pp = &psw[0] if psw.shape[0] else NULL
    cdef real* po = &pout[0] if pout.shape[0] else NULL
    with nogil:
        for q in prange(nb, num_threads=_unpad_threads(off[nb]), schedule="static"):
            _keep_live(&idx[0], pp, off[q], off[q + 1], pad, &out[0], po, live[q],
                       live[q + 1])


def half_widen(const uint16_t[::1] h, float[::1] out, int bf=0):
    """out = the 16-bit values h as floats (bf: bfloat16 bits, else
    float16; he_s2f, exact)."""
    cdef int64_t i
    if out.shape[0] != h.shape[0]:
        raise ValueError(f"out: expected {h.shape[0]} values, got {out.shape[0]}")
    with nogil:
        for i in range(h.shape[0]):
            out[i] = he_s2f(h[i], bf)


def half_round(const float[::1] x, uint16_t[::1] out, uint64_t seed, int bf=0):
    """out = x rounded to float16 bits (bf: bfloat16) by he_round16: to
    nearest even (seed 0), or stochastically with the bits of (seed, i) for
    element i."""
    cdef int64_t i
    if out.shape[0] != x.shape[0]:
        raise ValueError(f"out: expected {x.shape[0]} values, got {out.shape[0]}")
    with nogil:
        for i in range(x.shape[0]):
            out[i] = he_round16(x[i], i, seed, bf)


ROWS = {"slot": ROWS_SLOT, "row": ROWS_ROW}


def simd_paths():
    """Which vector paths this machine takes (checked at run time; the same
    results as the portable code either way)."""
    own = "; backward adds prefetched owned (prefetchw)" if he_prfchw() else ""
    if he_x86() & 2:
        return "AVX2 + F16C: run starts, optimizer applies, float16 reads" + own
    if he_x86() & 1:
        return "AVX + F16C: float16 reads (scalar run starts and applies)" + own
    return "none: scalar code" + own


def wants_scratch(SchemeView sv, int mode, int64_t n):
    """Does a two-phase fused step of n entries (Adagrad; float16 SGD) need
    the dense scratch (the array's size)? Not where the array is large next
    to the batch and its rows never partly overlap (a full table, not max
    mode): there each row's gradient is summed in a compact buffer instead
    (backward's rows)."""
    return not (_rows_sparse(&sv.s, mode)
                and sv.s.size > <uint64_t>(8 * sv.s.dim) * <uint64_t>n)
