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
/* Per-element Adagrad (hashemb.Adagrad) over n consecutive slots of a
 * float32 weight w, its state s and their summed gradient g, the CPU
 * kernels' rule (_bag.pyx _rule) a run at a time: where g != 0,
 *     s += g^2 (float),  w = (float)(w - (double)(lr g) / (sqrt((double)s) + eps)),
 * then g = 0. The step is formed in double (libm's double sqrt). */
static inline void he_adagrad_run_soft(float* __restrict w, float* __restrict s,
                                       float* __restrict g, int64_t n, float lr, float eps)
{
    for (int64_t i = 0; i < n; i++)
        if (g[i] != 0) {
            const float gv = g[i];
            s[i] = s[i] + gv * gv;
            const double step = (double)(lr * gv) / (sqrt((double)s[i]) + (double)eps);
            w[i] = (float)((double)w[i] - step);
            g[i] = 0;
        }
}

/* A row's row-wise step over float32 weights w from its summed gradient
 * g and multiplier mult (he_row_mult): where g_i != 0,
 * w_i = (float)(w_i - mult g_i), in double. */
static inline void he_rowwise_run_soft(float* __restrict w, const float* __restrict g, int64_t n,
                                       double mult)
{
    for (int64_t i = 0; i < n; i++)
        if (g[i] != 0)
            w[i] = (float)((double)w[i] - mult * (double)g[i]);
}

/* The same rule over 16-bit weight bits w (format bf, slots slot0 ..):
 * the step formed as above, rounded to float, then he_half_moved (to
 * nearest for seed 0, else stochastically). */
static inline void he_half_adagrad_run_soft(he_u16* __restrict w, float* __restrict s,
                                            float* __restrict g, int64_t n, uint64_t slot0,
                                            float lr, float eps, uint64_t seed, int bf)
{
    for (int64_t i = 0; i < n; i++)
        if (g[i] != 0) {
            const float gv = g[i];
            s[i] = s[i] + gv * gv;
            const double step = (double)(lr * gv) / (sqrt((double)s[i]) + (double)eps);
            w[i] = he_half_moved(w[i], (float)step, slot0 + (uint64_t)i, seed, bf);
            g[i] = 0;
        }
}

/* A row's row-wise step over 16-bit weight bits w (format bf, slots
 * slot0 ..) from its summed gradient g and multiplier mult (he_row_mult):
 * where g_i != 0, w_i moves by (float)(mult g_i), rounded once
 * (he_half_moved). */
static inline void he_half_rowwise_run_soft(he_u16* __restrict w, const float* __restrict g,
                                            int64_t n, uint64_t slot0, double mult,
                                            uint64_t seed, int bf)
{
    for (int64_t i = 0; i < n; i++)
        if (g[i] != 0)
            w[i] = he_half_moved(w[i], (float)(mult * (double)g[i]), slot0 + (uint64_t)i, seed,
                                 bf);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* Eight slots a step (AVX2): the same operations, each correctly rounded
 * (float square and sum, float product, double sqrt, sum, quotient and
 * difference, one rounding to float), so the same bits as the scalar rule;
 * the default build targets baseline x86-64, so this is chosen at run
 * time. */
__attribute__((target("avx2"))) static void he_adagrad_run_avx2(
    float* __restrict w, float* __restrict s, float* __restrict g, int64_t n, float lr,
    float eps)
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
        const __m256 wv = _mm256_loadu_ps(w + i);
        __m128 half[2];
        for (int h = 0; h < 2; h++) {
            const __m128 n4 = h ? _mm256_extractf128_ps(num, 1) : _mm256_castps256_ps128(num);
            const __m128 s4 = h ? _mm256_extractf128_ps(sv, 1) : _mm256_castps256_ps128(sv);
            const __m128 w4 = h ? _mm256_extractf128_ps(wv, 1) : _mm256_castps256_ps128(wv);
            const __m256d den = _mm256_add_pd(_mm256_sqrt_pd(_mm256_cvtps_pd(s4)), veps);
            const __m256d step = _mm256_div_pd(_mm256_cvtps_pd(n4), den);
            half[h] = _mm256_cvtpd_ps(_mm256_sub_pd(_mm256_cvtps_pd(w4), step));
        }
        const __m256 moved = _mm256_insertf128_ps(_mm256_castps128_ps256(half[0]), half[1], 1);
        _mm256_storeu_ps(s + i, _mm256_blendv_ps(s0, sv, live));
        _mm256_storeu_ps(w + i, _mm256_blendv_ps(wv, moved, live));
        _mm256_storeu_ps(g + i, zero);
    }
    if (i < n)
        he_adagrad_run_soft(w + i, s + i, g + i, n - i, lr, eps);
}

/* he_rowwise_run_soft eight elements a step: the same double product and
 * difference (no FMA), one rounding to float, so the same bits. */
__attribute__((target("avx2"))) static void he_rowwise_run_avx2(float* __restrict w,
                                                                const float* __restrict g,
                                                                int64_t n, double mult)
{
    int64_t i = 0;
    const __m256d vm = _mm256_set1_pd(mult);
    const __m256 zero = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i), wv = _mm256_loadu_ps(w + i);
        __m128 half[2];
        for (int h = 0; h < 2; h++) {
            const __m128 g4 = h ? _mm256_extractf128_ps(gv, 1) : _mm256_castps256_ps128(gv);
            const __m128 w4 = h ? _mm256_extractf128_ps(wv, 1) : _mm256_castps256_ps128(wv);
            half[h] = _mm256_cvtpd_ps(_mm256_sub_pd(_mm256_cvtps_pd(w4),
                                                    _mm256_mul_pd(vm, _mm256_cvtps_pd(g4))));
        }
        const __m256 moved = _mm256_insertf128_ps(_mm256_castps128_ps256(half[0]), half[1], 1);
        _mm256_storeu_ps(w + i, _mm256_blendv_ps(wv, moved, _mm256_cmp_ps(gv, zero, _CMP_NEQ_UQ)));
    }
    if (i < n)
        he_rowwise_run_soft(w + i, g + i, n - i, mult);
}

static inline void he_rowwise_run(float* __restrict w, const float* __restrict g, int64_t n,
                                  double mult)
{
    if (n >= 8 && (he_x86() & 2))
        he_rowwise_run_avx2(w, g, n, mult);
    else
        he_rowwise_run_soft(w, g, n, mult);
}

/* lr g / (sqrt(s) + eps) of eight lanes, in double, rounded to float
 * (he_adagrad_run_avx2's step, kept in float for a 16-bit weight). */
__attribute__((target("avx2"), always_inline)) static inline __m256 he_adagrad_step_v(
    __m256 num, __m256 s, __m256d eps)
{
    __m128 half[2];
    for (int h = 0; h < 2; h++) {
        const __m128 n4 = h ? _mm256_extractf128_ps(num, 1) : _mm256_castps256_ps128(num);
        const __m128 s4 = h ? _mm256_extractf128_ps(s, 1) : _mm256_castps256_ps128(s);
        const __m256d den = _mm256_add_pd(_mm256_sqrt_pd(_mm256_cvtps_pd(s4)), eps);
        half[h] = _mm256_cvtpd_ps(_mm256_div_pd(_mm256_cvtps_pd(n4), den));
    }
    return _mm256_insertf128_ps(_mm256_castps128_ps256(half[0]), half[1], 1);
}

/* he_half_adagrad_run_soft eight slots a step: the same operations and
 * the same rounding (he_half_put_v), so the same bits. */
__attribute__((target("avx2,f16c"), always_inline)) static inline void he_half_adagrad_run_v(
    he_u16* __restrict w, float* __restrict s, float* __restrict g, int64_t n, uint64_t slot0,
    float lr, float eps, uint64_t seed, const int bf)
{
    int64_t i = 0;
    const __m256 vlr = _mm256_set1_ps(lr), zero = _mm256_setzero_ps();
    const __m256d veps = _mm256_set1_pd((double)eps);
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 live = _mm256_cmp_ps(gv, zero, _CMP_NEQ_UQ);
        if (_mm256_testz_ps(live, live))
            continue;
        const __m256 s0 = _mm256_loadu_ps(s + i);
        const __m256 sv = _mm256_add_ps(s0, _mm256_mul_ps(gv, gv));
        const __m256 step = he_adagrad_step_v(_mm256_mul_ps(vlr, gv), sv, veps);
        const __m128i wh = _mm_loadu_si128((const __m128i*)(w + i));
        const __m256 v = _mm256_sub_ps(he_s2f_v(wh, bf), step);
        he_half_put_v(w + i, wh, v, live, slot0 + (uint64_t)i, seed, bf);
        _mm256_storeu_ps(s + i, _mm256_blendv_ps(s0, sv, live));
        _mm256_storeu_ps(g + i, zero);
    }
    if (i < n)
        he_half_adagrad_run_soft(w + i, s + i, g + i, n - i, slot0 + (uint64_t)i, lr, eps, seed,
                                 bf);
}

/* he_half_rowwise_run_soft eight elements a step. */
__attribute__((target("avx2,f16c"), always_inline)) static inline void he_half_rowwise_run_v(
    he_u16* __restrict w, const float* __restrict g, int64_t n, uint64_t slot0, double mult,
    uint64_t seed, const int bf)
{
    int64_t i = 0;
    const __m256d vm = _mm256_set1_pd(mult);
    const __m256 zero = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 live = _mm256_cmp_ps(gv, zero, _CMP_NEQ_UQ);
        const __m128 lo = _mm256_cvtpd_ps(_mm256_mul_pd(vm, _mm256_cvtps_pd(_mm256_castps256_ps128(gv))));
        const __m128 hi = _mm256_cvtpd_ps(_mm256_mul_pd(vm, _mm256_cvtps_pd(_mm256_extractf128_ps(gv, 1))));
        const __m128i wh = _mm_loadu_si128((const __m128i*)(w + i));
        const __m256 v = _mm256_sub_ps(he_s2f_v(wh, bf),
                                       _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1));
        he_half_put_v(w + i, wh, v, live, slot0 + (uint64_t)i, seed, bf);
    }
    if (i < n)
        he_half_rowwise_run_soft(w + i, g + i, n - i, slot0 + (uint64_t)i, mult, seed, bf);
}

/* one copy per format, as he_half_sgd_run */
#define HE_HALF_OPT_COPIES(sfx, bf)                                                           \
    __attribute__((target("avx2,f16c"))) static void he_half_adagrad_run_avx2##sfx(          \
        he_u16* __restrict w, float* __restrict s, float* __restrict g, int64_t n,           \
        uint64_t slot0, float lr, float eps, uint64_t seed)                                   \
    {                                                                                         \
        he_half_adagrad_run_v(w, s, g, n, slot0, lr, eps, seed, bf);                          \
    }                                                                                         \
    __attribute__((target("avx2,f16c"))) static void he_half_rowwise_run_avx2##sfx(          \
        he_u16* __restrict w, const float* __restrict g, int64_t n, uint64_t slot0,          \
        double mult, uint64_t seed)                                                           \
    {                                                                                         \
        he_half_rowwise_run_v(w, g, n, slot0, mult, seed, bf);                                \
    }
HE_HALF_OPT_COPIES(_h, 0)
HE_HALF_OPT_COPIES(_b, 1)
#undef HE_HALF_OPT_COPIES

static inline void he_half_adagrad_run(he_u16* __restrict w, float* __restrict s,
                                       float* __restrict g, int64_t n, uint64_t slot0, float lr,
                                       float eps, uint64_t seed, int bf)
{
    if (n >= 8 && (he_x86() & 2))
        (bf ? he_half_adagrad_run_avx2_b : he_half_adagrad_run_avx2_h)(w, s, g, n, slot0, lr, eps,
                                                                        seed);
    else
        he_half_adagrad_run_soft(w, s, g, n, slot0, lr, eps, seed, bf);
}

static inline void he_half_rowwise_run(he_u16* __restrict w, const float* __restrict g, int64_t n,
                                       uint64_t slot0, double mult, uint64_t seed, int bf)
{
    if (n >= 8 && (he_x86() & 2))
        (bf ? he_half_rowwise_run_avx2_b : he_half_rowwise_run_avx2_h)(w, g, n, slot0, mult, seed);
    else
        he_half_rowwise_run_soft(w, g, n, slot0, mult, seed, bf);
}

static inline void he_adagrad_run(float* __restrict w, float* __restrict s, float* __restrict g,
                                  int64_t n, float lr, float eps)
{
    if (n >= 8 && (he_x86() & 2))      /* AVX2 (with F16C, as every AVX2 CPU has) */
        he_adagrad_run_avx2(w, s, g, n, lr, eps);
    else
        he_adagrad_run_soft(w, s, g, n, lr, eps);
}
#else
#define he_adagrad_run he_adagrad_run_soft
#define he_rowwise_run he_rowwise_run_soft
#define he_half_adagrad_run he_half_adagrad_run_soft
#define he_half_rowwise_run he_half_rowwise_run_soft
#endif
#endif

#endif /* HASHEMB_OPTIM_H */
