/* Plain-lookup kernels (no bags) over packed tables of mixed widths: the one
 * source for the Cython module hashemb/_cpu/_embed.pyx and the native torch
 * op hashemb/torch/_native.cpp (C++: templates over the float and index types).
 *
 * A layout of T tables is one (4, T) int64 array, rows base, dims, cols,
 * sizes: table t has sizes[t] rows of dims[t] floats from float base[t] of one
 * flat array, and fills columns cols[t] .. cols[t] + dims[t] of an output row
 * of `total` floats. One table (he.embedding) is T = 1.
 *
 * Both kernels check every index before writing anything and return the flat
 * position n * T + t of the first one outside its table (or -1), so bad input
 * never writes out of bounds and the caller words the error.
 *
 * Backward splits the *output columns* among threads in cache-line multiples:
 * each thread walks every sample in order and adds only its columns, so each
 * gradient float is summed by one thread in sample order (bitwise
 * deterministic whatever the thread count), a hot row (every sample on one id)
 * is shared evenly, and no two threads write one cache line. Layouts under two
 * lines split the *rows* of the flat gradient instead. */
#ifndef HASHEMB_EMBED_H
#define HASHEMB_EMBED_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include "hashemb/openmp.h"

/* Floats moved below which one thread wins: a parallel region costs more than
 * the copy, and next to torch's own busy-waiting pool (a training step) extra
 * threads only contend for the cores. */
#define HE_EMBED_SMALL (1 << 16)
#define HE_EMBED_LINE 16 /* floats per 64-byte cache line (float32) */

static inline int he_embed_threads(int64_t work)
{
    return work < HE_EMBED_SMALL ? 1 : he_max_threads();
}

template <typename I>
static inline int64_t he_embed_first_bad(const I* idx, int64_t N, int64_t T, const int64_t* sizes)
{
    for (int64_t n = 0; n < N; n++)
        for (int64_t t = 0; t < T; t++) {
            int64_t v = (int64_t)idx[n * T + t];
            if (v < 0 || v >= sizes[t])
                return n * T + t;
        }
    return -1;
}

/* out[n, cols[t] : cols[t] + dims[t]] = W[base[t] + idx[n, t] dims[t] : ... + dims[t]] */
template <typename R, typename I>
static int64_t he_embed_gather(const R* W, const I* idx, int64_t N, int64_t T,
                               const int64_t* layout, R* out, int64_t total)
{
    const int64_t *base = layout, *dims = layout + T, *cols = layout + 2 * T;
    int64_t bad = he_embed_first_bad(idx, N, T, layout + 3 * T);
    if (bad >= 0)
        return bad;
    int nt = he_embed_threads(N * total);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n = 0; n < N; n++)
        for (int64_t t = 0; t < T; t++)
            memcpy(out + n * total + cols[t], W + base[t] + (int64_t)idx[n * T + t] * dims[t],
                   (size_t)dims[t] * sizeof(R));
    return -1;
}

template <typename R>
static inline void he_embed_add(R* dst, const R* src, int64_t d)
{
    for (int64_t i = 0; i < d; i++)
        dst[i] += src[i];
}

/* A zeroed buffer of S floats of `el` bytes for a dense gradient that `rows`
 * row writes of `total / T`-float rows will touch; release with free().
 * Which pages a gradient touches decides its cost, not its size:
 * - few rows (the estimate below a quarter of the 4 KB pages): calloc, whose
 *   fresh pages fault in, zeroed, only where a row lands (51 MB table, 128
 *   rows: 0.2 ms, where zeroing it all takes 5-15 ms);
 * - many rows: 2 MB-aligned huge pages zeroed by every thread, since faulting
 *   every 4 KB page of a table on first write (two threads contending for the
 *   kernel's page lock) is slower than zeroing it in 2 MB pages: 106 ms vs
 *   ~6 ms at 51 MB. */
static void* he_embed_grad_buffer(int64_t S, size_t el, int64_t rows, int64_t row_floats)
{
    const size_t bytes = (size_t)(S > 0 ? S : 1) * el, page = 4096, huge = (size_t)2 << 20;
    size_t touched = (size_t)rows * ((size_t)row_floats * el > page ? (size_t)row_floats * el : page);
    if (touched < bytes / 4 || bytes < 2 * huge)
        return calloc(bytes / el, el);
    size_t padded = (bytes + huge - 1) / huge * huge;
    char* p = (char*)aligned_alloc(huge, padded);
    if (p == NULL)
        return NULL;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, padded, MADV_HUGEPAGE);
#endif
    const int64_t chunks = (int64_t)(padded / huge);
    int nt = he_embed_threads((int64_t)(bytes / el));
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t c = 0; c < chunks; c++)
        memset(p + c * huge, 0, huge);
    return p;
}

/* out[base[t] + idx[n, t] dims[t] + i] += grad[n, cols[t] + i] for every n, t, i,
 * into a zeroed `out` of S floats (from he_embed_grad_buffer). */
template <typename R, typename I>
static int64_t he_embed_scatter(const R* grad, const I* idx, int64_t N, int64_t T, int64_t total,
                                const int64_t* layout, R* out, int64_t S)
{
    const int64_t *base = layout, *dims = layout + T, *cols = layout + 2 * T;
    int64_t bad = he_embed_first_bad(idx, N, T, layout + 3 * T);
    if (bad >= 0)
        return bad;
    if (N == 0 || total == 0)
        return -1;
    int nt = he_embed_threads(N * total);
    const int64_t lines = (total + HE_EMBED_LINE - 1) / HE_EMBED_LINE;
    if (nt > 1 && lines >= 2) {
        nt = (int)(lines < nt ? lines : nt);
#pragma omp parallel num_threads(nt)
        {
            const int64_t tid = he_thread_num();
            int64_t lo = lines * tid / nt * HE_EMBED_LINE, hi = lines * (tid + 1) / nt * HE_EMBED_LINE;
            lo = lo < total ? lo : total;
            hi = hi < total ? hi : total;
            for (int64_t n = 0; n < N; n++)
                for (int64_t t = 0; t < T; t++) {
                    int64_t a = cols[t] > lo ? cols[t] : lo;
                    int64_t b = cols[t] + dims[t] < hi ? cols[t] + dims[t] : hi;
                    if (a < b)
                        he_embed_add(out + base[t] + (int64_t)idx[n * T + t] * dims[t] - cols[t] + a,
                                     grad + n * total + a, b - a);
                }
        }
    } else if (nt > 1 && S >= (int64_t)nt * HE_EMBED_LINE) {
#pragma omp parallel num_threads(nt)
        {
            const int64_t tid = he_thread_num();
            const int64_t lo = S * tid / nt, hi = S * (tid + 1) / nt;
            for (int64_t n = 0; n < N; n++)
                for (int64_t t = 0; t < T; t++) {
                    int64_t r0 = base[t] + (int64_t)idx[n * T + t] * dims[t];
                    if (lo <= r0 && r0 < hi) /* a row belongs to the thread of its first float */
                        he_embed_add(out + r0, grad + n * total + cols[t], dims[t]);
                }
        }
    } else {
        for (int64_t n = 0; n < N; n++)
            for (int64_t t = 0; t < T; t++)
                he_embed_add(out + base[t] + (int64_t)idx[n * T + t] * dims[t],
                             grad + n * total + cols[t], dims[t]);
    }
    return -1;
}

#endif
