/* Streaming (non-temporal) copies for large outputs of the bag kernels
 * (_cpu/_bag.pyx). The plain lookups (embed.h) keep memcpy: they gather rows
 * straight into the output, and streaming measured slower there.
 *
 * dst[:n] = src[:n] without reading dst's lines first (a plain store into a
 * line that is not cached reads it from memory: read-for-ownership), which
 * halves the traffic of writing an output too large to stay in cache.
 * Stores are weakly ordered: call he_stream_fence() on the writing thread
 * before another thread reads dst. Plain memcpy where SSE2 is missing. */
#ifndef HASHEMB_STREAM_H
#define HASHEMB_STREAM_H
#include <stdint.h>
#include <string.h>

/* outputs from this size on are streamed; smaller ones stay in cache for
 * whatever reads them next */
#define HE_STREAM_BYTES ((int64_t)8 << 20)

#if defined(__SSE2__)
#include <emmintrin.h>
static inline void he_stream_f(float* dst, const float* src, int64_t n)
{
    int64_t i = 0;
    while (i < n && ((uintptr_t)(dst + i) & 15))
        dst[i] = src[i], i++;
    for (; i + 4 <= n; i += 4)
        _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
    for (; i < n; i++)
        dst[i] = src[i];
}
static inline void he_stream_d(double* dst, const double* src, int64_t n)
{
    int64_t i = 0;
    while (i < n && ((uintptr_t)(dst + i) & 15))
        dst[i] = src[i], i++;
    for (; i + 2 <= n; i += 2)
        _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
    for (; i < n; i++)
        dst[i] = src[i];
}
static inline void he_stream_fence(void) { _mm_sfence(); }
#else
static inline void he_stream_f(float* dst, const float* src, int64_t n)
{
    memcpy(dst, src, (size_t)n * sizeof(float));
}
static inline void he_stream_d(double* dst, const double* src, int64_t n)
{
    memcpy(dst, src, (size_t)n * sizeof(double));
}
static inline void he_stream_fence(void) {}
#endif

#endif
