/* Row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD): one accumulator per row
 * of a full table instead of one per element. One source for the CPU
 * kernels (_cpu/_bag.pyx) and the CUDA kernels (prepended to every .cu like
 * slots.h and half.h).
 *
 * For a row r of D elements whose gradient over the batch is g (summed
 * over every entry that reads the row, first):
 *
 *     G_r += (1/D) sum_i g_i^2,     w_ri -= lr g_i / (sqrt(G_r) + eps),
 *
 * the second only where g_i != 0: a zero sum moves nothing, whatever its
 * sign (w - (-0.0) would turn a -0.0 weight into +0.0, and the sign of a
 * zero sum depends on how it was summed).
 *
 * Precision, the same on every device: the squares are summed in double in
 * element order; the mean is rounded to the accumulator's type (the
 * weight's, float32 for float16 storage) and added there; the multiplier
 * lr / (sqrt(G_r) + eps) and each step lr g_i / (...) are formed in double
 * (as hashemb's per-element Adagrad forms its step), then the weight moves
 * by the step (a float16 weight rounds once: half.h he_half_sub). So the
 * CPU and the GPU, given the same sums, move a row to the same bits. */
#ifndef HASHEMB_OPTIM_H
#define HASHEMB_OPTIM_H

#ifndef HASHEMB_SLOTS_H
#include "hashemb/slots.h"       /* the integer types and HE_HD */
#endif
#if !defined(__CUDACC_RTC__) && !defined(__CUDACC__)
#include <math.h>
#endif

/* sum_i g_i^2 of a row, in double, in element order (0 exactly when every
 * g_i is 0: a float's square never underflows in double). The CPU's sum;
 * the GPU's seg_rows adds the same squares in the same order as it forms
 * each element's sum. */
#define HE_ROW_SUMSQ(T, name)                                          \
    HE_HD double name(const T* g, int64_t D)                           \
    {                                                                  \
        double ss = 0;                                                 \
        for (int64_t i = 0; i < D; i++)                                \
            ss += (double)g[i] * (double)g[i];                         \
        return ss;                                                     \
    }
HE_ROW_SUMSQ(float, he_row_sumsq_f)
HE_ROW_SUMSQ(double, he_row_sumsq_d)

/* G += ss / D (rounded to G's type), then lr / (sqrt(G) + eps) in double. */
#define HE_ROW_MULT(T, name)                                                   \
    HE_HD double name(T* G, double ss, int64_t D, T lr, T eps)                 \
    {                                                                          \
        *G += (T)(ss / (double)D);                                             \
        return (double)lr / (sqrt((double)*G) + (double)eps);                  \
    }
HE_ROW_MULT(float, he_row_mult_f)
HE_ROW_MULT(double, he_row_mult_d)

#if !defined(__CUDACC__)
#include "hashemb/half.h"        /* 16-bit rounding; he_x86: what the CPU can run */
/* The CPU's runs of the fused rules, over n consecutive slots (slot0 ..) of
 * a weight that is float32 (w32; w16 NULL) or 16-bit bits (w16, format
 * bf), and their summed gradients g (_bag.pyx _apply_range, _rowwise):
 *   - per-element Adagrad (hashemb.Adagrad; the state s, float32), where
 *     g != 0: s += g^2 (float), d = (double)(lr g) / (sqrt((double)s) + eps),
 *     then g = 0 (libm's double sqrt, as _rule);
 *   - row-wise Adagrad (one row; mult from he_row_mult), where g != 0:
 *     d = mult g, in double;
 * and the element moves by d: a float32 weight to (float)(w - d), in
 * double; a 16-bit one by (float)d, rounded once (he_half_moved: to
 * nearest for seed 0, else stochastically). */
static inline void he_move1(float* __restrict w32, he_u16* __restrict w16, int64_t i, double d,
                            uint64_t slot0, uint64_t seed, int bf)
{
    if (w16)
        w16[i] = he_half_moved(w16[i], (float)d, slot0 + (uint64_t)i, seed, bf);
    else
        w32[i] = (float)((double)w32[i] - d);
}

static inline void he_adagrad_soft(float* __restrict w32, he_u16* __restrict w16,
                                   float* __restrict s, float* __restrict g, int64_t n,
                                   uint64_t slot0, float lr, float eps, uint64_t seed, int bf)
{
    for (int64_t i = 0; i < n; i++)
        if (g[i] != 0) {
            const float gv = g[i];
            s[i] = s[i] + gv * gv;
            he_move1(w32, w16, i, (double)(lr * gv) / (sqrt((double)s[i]) + (double)eps), slot0,
                     seed, bf);
            g[i] = 0;
        }
}

static inline void he_rowwise_soft(float* __restrict w32, he_u16* __restrict w16,
                                   const float* __restrict g, int64_t n, uint64_t slot0,
                                   double mult, uint64_t seed, int bf)
{
    for (int64_t i = 0; i < n; i++)
        if (g[i] != 0)
            he_move1(w32, w16, i, mult * (double)g[i], slot0, seed, bf);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* Eight slots a step (AVX2; F16C for 16-bit weights): the same operations,
 * each correctly rounded (float square, sum and product; double sqrt, sum,
 * quotient, product and difference; the same roundings to float and to
 * the 16-bit format, he_half_put_v), so the same bits as the scalar runs;
 * the default build targets baseline x86-64, so this is chosen at run
 * time. bf < 0: a float32 weight; one copy of each loop per weight type. */

/* Lanes i .. i + 7 moved by the double steps d (low and high four) where
 * live. */
__attribute__((target("avx2,f16c"), always_inline)) static inline void he_move_v(
    float* __restrict w32, he_u16* __restrict w16, int64_t i, const __m256d* d, __m256 live,
    uint64_t slot0, uint64_t seed, const int bf)
{
    if (bf < 0) {
        const __m256 wv = _mm256_loadu_ps(w32 + i);
        const __m128 lo = _mm256_cvtpd_ps(_mm256_sub_pd(
            _mm256_cvtps_pd(_mm256_castps256_ps128(wv)), d[0]));
        const __m128 hi = _mm256_cvtpd_ps(_mm256_sub_pd(
            _mm256_cvtps_pd(_mm256_extractf128_ps(wv, 1)), d[1]));
        _mm256_storeu_ps(w32 + i, _mm256_blendv_ps(
            wv, _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1), live));
    } else {
        const __m256 step = _mm256_insertf128_ps(
            _mm256_castps128_ps256(_mm256_cvtpd_ps(d[0])), _mm256_cvtpd_ps(d[1]), 1);
        const __m128i wh = _mm_loadu_si128((const __m128i*)(w16 + i));
        he_half_put_v(w16 + i, wh, _mm256_sub_ps(he_s2f_v(wh, bf), step), live,
                      slot0 + (uint64_t)i, seed, bf);
    }
}

__attribute__((target("avx2,f16c"), always_inline)) static inline void he_adagrad_v(
    float* __restrict w32, he_u16* __restrict w16, float* __restrict s, float* __restrict g,
    int64_t n, uint64_t slot0, float lr, float eps, uint64_t seed, const int bf)
{
    int64_t i = 0;
    const __m256 vlr = _mm256_set1_ps(lr), zero = _mm256_setzero_ps();
    const __m256d veps = _mm256_set1_pd((double)eps);
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 live = _mm256_cmp_ps(gv, zero, _CMP_NEQ_UQ);
        if (_mm256_testz_ps(live, live))
            continue;                                       /* nothing to apply here */
        const __m256 s0 = _mm256_loadu_ps(s + i);
        const __m256 sv = _mm256_add_ps(s0, _mm256_mul_ps(gv, gv));
        const __m256 num = _mm256_mul_ps(vlr, gv);
        __m256d d[2];
        for (int h = 0; h < 2; h++) {
            const __m128 n4 = h ? _mm256_extractf128_ps(num, 1) : _mm256_castps256_ps128(num);
            const __m128 s4 = h ? _mm256_extractf128_ps(sv, 1) : _mm256_castps256_ps128(sv);
            d[h] = _mm256_div_pd(_mm256_cvtps_pd(n4),
                                 _mm256_add_pd(_mm256_sqrt_pd(_mm256_cvtps_pd(s4)), veps));
        }
        he_move_v(w32, w16, i, d, live, slot0, seed, bf);
        _mm256_storeu_ps(s + i, _mm256_blendv_ps(s0, sv, live));
        _mm256_storeu_ps(g + i, zero);
    }
    if (i < n)
        he_adagrad_soft(bf < 0 ? w32 + i : NULL, bf < 0 ? NULL : w16 + i, s + i, g + i, n - i,
                        slot0 + (uint64_t)i, lr, eps, seed, bf);
}

__attribute__((target("avx2,f16c"), always_inline)) static inline void he_rowwise_v(
    float* __restrict w32, he_u16* __restrict w16, const float* __restrict g, int64_t n,
    uint64_t slot0, double mult, uint64_t seed, const int bf)
{
    int64_t i = 0;
    const __m256d vm = _mm256_set1_pd(mult);
    const __m256 zero = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256d d[2] = {
            _mm256_mul_pd(vm, _mm256_cvtps_pd(_mm256_castps256_ps128(gv))),
            _mm256_mul_pd(vm, _mm256_cvtps_pd(_mm256_extractf128_ps(gv, 1)))};
        he_move_v(w32, w16, i, d, _mm256_cmp_ps(gv, zero, _CMP_NEQ_UQ), slot0, seed, bf);
    }
    if (i < n)
        he_rowwise_soft(bf < 0 ? w32 + i : NULL, bf < 0 ? NULL : w16 + i, g + i, n - i,
                        slot0 + (uint64_t)i, mult, seed, bf);
}

#define HE_OPT_COPIES(sfx, bf)                                                                \
    __attribute__((target("avx2,f16c"))) static void he_adagrad_avx2##sfx(                    \
        float* __restrict w32, he_u16* __restrict w16, float* __restrict s,                   \
        float* __restrict g, int64_t n, uint64_t slot0, float lr, float eps, uint64_t seed)   \
    {                                                                                         \
        he_adagrad_v(w32, w16, s, g, n, slot0, lr, eps, seed, bf);                            \
    }                                                                                         \
    __attribute__((target("avx2,f16c"))) static void he_rowwise_avx2##sfx(                    \
        float* __restrict w32, he_u16* __restrict w16, const float* __restrict g, int64_t n,  \
        uint64_t slot0, double mult, uint64_t seed)                                           \
    {                                                                                         \
        he_rowwise_v(w32, w16, g, n, slot0, mult, seed, bf);                                  \
    }
HE_OPT_COPIES(_f, -1)
HE_OPT_COPIES(_h, 0)
HE_OPT_COPIES(_b, 1)
#undef HE_OPT_COPIES
/* where the machine can, a run of eight or more goes to the vector copy */
#define HE_TRY_VECTOR(n, call)                                                                \
    if ((n) >= 8 && (he_x86() & 2)) {      /* AVX2 and F16C */                                \
        call;                                                                                 \
        return;                                                                               \
    }
#else
#define HE_TRY_VECTOR(n, call)
#endif

/* The runs, float32 and 16-bit (format bf), for the Cython kernels. */
static inline void he_adagrad_run(float* __restrict w, float* __restrict s, float* __restrict g,
                                  int64_t n, float lr, float eps)
{
    HE_TRY_VECTOR(n, he_adagrad_avx2_f(w, NULL, s, g, n, 0, lr, eps, 0))
    he_adagrad_soft(w, NULL, s, g, n, 0, lr, eps, 0, 0);
}

static inline void he_half_adagrad_run(he_u16* __restrict w, float* __restrict s,
                                       float* __restrict g, int64_t n, uint64_t slot0, float lr,
                                       float eps, uint64_t seed, int bf)
{
    HE_TRY_VECTOR(n, (bf ? he_adagrad_avx2_b : he_adagrad_avx2_h)(NULL, w, s, g, n, slot0, lr,
                                                                  eps, seed))
    he_adagrad_soft(NULL, w, s, g, n, slot0, lr, eps, seed, bf);
}

static inline void he_rowwise_run(float* __restrict w, const float* __restrict g, int64_t n,
                                  double mult)
{
    HE_TRY_VECTOR(n, he_rowwise_avx2_f(w, NULL, g, n, 0, mult, 0))
    he_rowwise_soft(w, NULL, g, n, 0, mult, 0, 0);
}

static inline void he_half_rowwise_run(he_u16* __restrict w, const float* __restrict g, int64_t n,
                                       uint64_t slot0, double mult, uint64_t seed, int bf)
{
    HE_TRY_VECTOR(n, (bf ? he_rowwise_avx2_b : he_rowwise_avx2_h)(NULL, w, g, n, slot0, mult,
                                                                  seed))
    he_rowwise_soft(NULL, w, g, n, slot0, mult, seed, bf);
}
#undef HE_TRY_VECTOR
#endif

#endif /* HASHEMB_OPTIM_H */
