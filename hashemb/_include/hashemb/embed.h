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

/* Dense gradients: which pages the rows touch decides the cost, not the size
 * (a fresh page costs a fault, ~3 us in a VM, and two threads faulting one
 * process's pages serialise in the kernel).
 * - small (< 4 MB): malloc + memset (glibc recycles warm heap memory);
 * - large, rows covering under 1/HE_EMBED_SPARSE of it: fresh anonymous
 *   pages, zero without a memset, faulted only where a row lands (51 MB
 *   table, 128 rows: 0.2 ms, where zeroing it all takes 5-15 ms);
 * - large and dense: the last released buffer of the same length if there
 *   is one (warm pages, zeroed by every thread), else fresh pages faulted in
 *   by one thread. Huge pages are not asked for: with the kernel's default
 *   defrag policy an madvise'd region can stall for milliseconds compacting.
 * One released buffer (at most HE_EMBED_KEEP bytes) is kept for the next
 * step: a training loop frees its gradient and asks for the same size again,
 * which is what glibc's heap reuse gives torch below 32 MB. The header in the
 * 64 bytes before the data says how to release a buffer (he_embed_grad_free).
 * glibc's calloc cannot be trusted with this choice: it memsets a recycled
 * chunk or hands out fresh pages depending on its history. */
#ifndef HE_EMBED_SPARSE
#define HE_EMBED_SPARSE 64
#endif
#define HE_EMBED_HDR 64
#define HE_EMBED_LARGE ((size_t)4 << 20)
#define HE_EMBED_KEEP ((size_t)256 << 20)

typedef struct {
    void* base;
    size_t length; /* 0: malloc'd */
} he_embed_hdr;

#if defined(__linux__) && defined(MADV_NOHUGEPAGE)
#define HE_EMBED_MMAP 1
static char* he_embed_kept;   /* a released mapping (its header at +0), or NULL */
#endif

/* 1: the buffer is large and the rows cover under 1/HE_EMBED_SPARSE of its
 * pages, so it comes fresh and the writes are page faults; 0: it is small
 * (malloc'd) or dense (zeroed). The buffer and the scatter both ask this. */
static inline int he_embed_sparse(int64_t S, size_t el, int64_t rows, int64_t row_floats)
{
#ifdef HE_EMBED_MMAP
    const size_t bytes = (size_t)(S > 0 ? S : 1) * el, page = 4096, row = (size_t)row_floats * el;
    return bytes >= HE_EMBED_LARGE &&
           (size_t)rows * (row > page ? row : page) < bytes / HE_EMBED_SPARSE;
#else
    (void)S, (void)el, (void)rows, (void)row_floats;
    return 0;
#endif
}

static void* he_embed_grad_buffer(int64_t S, size_t el, int64_t rows, int64_t row_floats)
{
    const size_t bytes = (size_t)(S > 0 ? S : 1) * el, page = 4096;
    char *base, *data;
#ifdef HE_EMBED_MMAP
    if (bytes >= HE_EMBED_LARGE) {
        const size_t length = bytes + HE_EMBED_HDR;
        const int dense = !he_embed_sparse(S, el, rows, row_floats);
        if (dense) {
            base = __atomic_exchange_n(&he_embed_kept, (char*)NULL, __ATOMIC_ACQ_REL);
            if (base != NULL && ((he_embed_hdr*)base)->length == length) {
                data = base + HE_EMBED_HDR;
                const int64_t chunks = (int64_t)((bytes + page * 16 - 1) / (page * 16));
                int nt = he_embed_threads((int64_t)(bytes / el));
                (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt)
                for (int64_t c = 0; c < chunks; c++) {
                    size_t lo = (size_t)c * page * 16, n = bytes - lo < page * 16 ? bytes - lo : page * 16;
                    memset(data + lo, 0, n);
                }
                return data;
            }
            if (base != NULL)
                munmap(base, ((he_embed_hdr*)base)->length);
        }
        base = (char*)mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (base == (char*)MAP_FAILED)
            return NULL;
        madvise(base, length, MADV_NOHUGEPAGE);
        data = base + HE_EMBED_HDR;
        if (dense)
            for (size_t off = 0; off < bytes; off += page)
                data[off] = 0;
        ((he_embed_hdr*)base)->base = base;
        ((he_embed_hdr*)base)->length = length;
        return data;
    }
#endif
    (void)rows, (void)row_floats;
    base = (char*)malloc(bytes + HE_EMBED_HDR);
    if (base == NULL)
        return NULL;
    data = base + HE_EMBED_HDR;
    memset(data, 0, bytes);
    ((he_embed_hdr*)base)->base = base;
    ((he_embed_hdr*)base)->length = 0;
    return data;
}

static void he_embed_grad_free(void* data)
{
    char* base = (char*)data - HE_EMBED_HDR;
    he_embed_hdr h = *(he_embed_hdr*)base;
#ifdef HE_EMBED_MMAP
    if (h.length) {
        if (h.length <= HE_EMBED_KEEP)
            base = __atomic_exchange_n(&he_embed_kept, base, __ATOMIC_ACQ_REL);
        if (base != NULL)
            munmap(base, ((he_embed_hdr*)base)->length);
        return;
    }
#endif
    free(h.base);
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
    /* Rows written sparsely into a fresh buffer cost page faults, not adds:
     * split them by rows, so no two threads fault the same page (split by
     * columns, both would, and faults of one page serialise: 512 rows into
     * 51 MB took 6.5 ms that way). */
    const int sparse = he_embed_sparse(S, sizeof(R), N * T, total / T);
    if (nt > 1 && lines >= 2 && !sparse) {
        nt = (int)(lines < nt ? lines : nt);
#pragma omp parallel num_threads(nt)
        {
            const int64_t tid = he_thread_num(), nth = he_num_threads();
            int64_t lo = lines * tid / nth * HE_EMBED_LINE, hi = lines * (tid + 1) / nth * HE_EMBED_LINE;
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
            const int64_t tid = he_thread_num(), nth = he_num_threads();
            const int64_t lo = S * tid / nth, hi = S * (tid + 1) / nth;
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
