/* 16-bit storage: conversions between the 16-bit formats (kept as their
 * bits, uint16_t) and float, one source for the CPU kernels
 * (_cpu/_bag.pyx), the CUDA kernels (prepended to every .cu like slots.h)
 * and the host emulator. Two formats, chosen by a flag `bf` where a
 * function serves both:
 *   - IEEE binary16 (float16, bf = 0): 5 exponent bits, 10 fraction bits;
 *   - bfloat16 (bf = 1): float32's top half, 8 exponent bits (float32's
 *     range), 7 fraction bits.
 *
 * A 16-bit array is storage only: the kernels read each element as a
 * float (exact: every value of either format is a float), pool and scatter
 * in float32, and write 16 bits only where a fused optimizer moves a
 * weight, rounding once per slot and step:
 *   - to nearest, ties to even (IEEE, as NumPy's astype(float16) and
 *     ml_dtypes' astype(bfloat16)), or
 *   - stochastically: up (away from zero) with probability (|x| - |lo|) / ulp,
 *     where lo is |x| truncated to the format, from 32 random bits, so that
 *     the expected stored value is x and updates smaller than half an ulp
 *     still move a weight on average (what makes 16-bit training work;
 *     FBGEMM's default for float16 tables). The bits are a hash of
 *     (seed, slot): the same on any thread count, CPU or GPU.
 * The scalar code is integer arithmetic (no 16-bit float type, no -ftz
 * dependence: subnormal halves are converted from integers); the CUDA build
 * uses the hardware conversion instructions for float16, which are exact
 * and round to nearest even too; the CPU's F16C / AVX2 paths (taken where
 * the machine has them, he_x86) do the same float16 arithmetic eight lanes
 * at a time. So the results are bitwise the same everywhere, with one
 * exception: CuPy compiles every kernel with -ftz=true, so on the device a
 * float32 subnormal (below 2^-126) reads as 0, and bfloat16 shares float32's
 * exponent range: a bfloat16 weight that small reads as 0 there, and an
 * update that small moves it differently (README, GPU backend). */
#ifndef HASHEMB_HALF_H
#define HASHEMB_HALF_H

#ifndef HASHEMB_SLOTS_H
#include "hashemb/slots.h"       /* the integer types and HE_HD */
#endif
#if !defined(__CUDACC_RTC__)
#include <string.h>
#endif

typedef uint32_t he_u32;
typedef uint64_t he_u64;
typedef unsigned short he_u16;

HE_HD float he_bits_f(he_u32 b)
{
#if defined(__CUDA_ARCH__)
    return __int_as_float((int)b);
#else
    float f;
    memcpy(&f, &b, 4);
    return f;
#endif
}

HE_HD he_u32 he_f_bits(float f)
{
#if defined(__CUDA_ARCH__)
    return (he_u32)__float_as_int(f);
#else
    he_u32 b;
    memcpy(&b, &f, 4);
    return b;
#endif
}

/* binary16 bits -> float, exact. Branch-free selects, so loops over a run
 * vectorise. */
HE_HD float he_h2f(he_u16 h)
{
#if defined(__CUDA_ARCH__)
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    he_u32 sign = (he_u32)(h & 0x8000u) << 16;
    he_u32 em = h & 0x7fffu;
    /* normal: exponent rebased 15 -> 127; subnormal or zero: em * 2^-24,
       both exact (an integer below 2^10, a power of two); inf / nan */
    he_u32 normal = (em << 13) + 0x38000000u;
    he_u32 small = he_f_bits((float)(int)em * 5.9604644775390625e-08f);
    he_u32 special = 0x7f800000u | ((em & 0x3ffu) << 13);
    he_u32 b = em < 0x400u ? small : (em >= 0x7c00u ? special : normal);
    return he_bits_f(b | sign);
#endif
}

/* float -> binary16 bits, to nearest, ties to even (overflow to inf; nan
 * stays a quiet nan). */
HE_HD he_u16 he_f2h(float f)
{
#if defined(__CUDA_ARCH__)
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    he_u32 x = he_f_bits(f);
    he_u32 sign = (x >> 16) & 0x8000u;
    he_u32 ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)                              /* inf, nan */
        return (he_u16)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0));
    if (ax >= 0x477ff000u)                              /* >= 65520: rounds to inf */
        return (he_u16)(sign | 0x7c00u);
    if (ax >= 0x38800000u) {                            /* a normal half: >= 2^-14 */
        he_u32 r = ax - 0x38000000u;
        r += 0xfffu + ((r >> 13) & 1u);
        return (he_u16)(sign | (r >> 13));
    }
    if (ax <= 0x33000000u)                              /* <= 2^-25: to zero (a tie too) */
        return (he_u16)sign;
    {                                                   /* a subnormal half */
        he_u32 e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
        he_u32 shift = 126u - e;                        /* 14 .. 24 */
        he_u32 q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        q += (rem > half || (rem == half && (q & 1u))) ? 1u : 0u;
        return (he_u16)(sign | q);
    }
#endif
}

/* float -> binary16 bits, stochastically: |x| truncated to a half, plus one
 * ulp with probability (dropped bits) / 2^(dropped width), compared against
 * the top bits of rnd. Values past the largest half go to inf as the next
 * value up; inf and nan as he_f2h. */
HE_HD he_u16 he_f2h_sr(float f, he_u32 rnd)
{
    he_u32 x = he_f_bits(f);
    he_u32 sign = (x >> 16) & 0x8000u;
    he_u32 ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)
        return he_f2h(f);
    if (ax >= 0x47800000u)                              /* >= 65536 */
        return (he_u16)(sign | 0x7c00u);
    if (ax >= 0x38800000u) {
        he_u32 r = ax - 0x38000000u;                    /* 13 dropped bits */
        he_u32 q = (r >> 13) + (((rnd >> 19) < (r & 0x1fffu)) ? 1u : 0u);
        return (he_u16)(sign | q);
    }
    if (ax < 0x33000000u)                               /* < 2^-25 (float subnormals too) */
        ax = ax < 0x00800000u ? 0u : ax;
    if (ax == 0u)
        return (he_u16)sign;
    {
        /* the value in units of 2^-24 (the smallest half) as a fixed-point
           number with 32 fraction bits: q = integer part, rem = fraction */
        he_u32 e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
        he_u32 shift = 126u - e;                        /* 14 .. 125 */
        he_u64 v = shift >= 56u ? 0u : ((he_u64)m << 32) >> shift;
        he_u32 q = (he_u32)(v >> 32), rem = (he_u32)v;
        q += rnd < rem ? 1u : 0u;
        return (he_u16)(sign | q);
    }
}

/* bfloat16 bits -> float: the top half of its float32, exact. */
HE_HD float he_b2f(he_u16 h)
{
    return he_bits_f((he_u32)h << 16);
}

/* float -> bfloat16 bits, to nearest, ties to even: the low 16 bits
 * rounded into the top half (a carry out of the fraction steps the
 * exponent, up to inf past the largest bfloat16); nan stays a quiet nan. */
HE_HD he_u16 he_f2b(float f)
{
    he_u32 x = he_f_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (he_u16)((x >> 16) | 0x40u);
    return (he_u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

/* float -> bfloat16 bits, stochastically: the top 16 random bits added to
 * the 16 dropped ones, then truncated, so |x| goes up one ulp with
 * probability (dropped bits) / 2^16 (float32 subnormals too; past the
 * largest bfloat16, up is inf); inf and nan as he_f2b. */
HE_HD he_u16 he_f2b_sr(float f, he_u32 rnd)
{
    he_u32 x = he_f_bits(f);
    if ((x & 0x7fffffffu) >= 0x7f800000u)
        return he_f2b(f);
    return (he_u16)((x + (rnd >> 16)) >> 16);
}

/* The format's bits as a float (bf: bfloat16, else float16). */
HE_HD float he_s2f(he_u16 h, int bf)
{
    return bf ? he_b2f(h) : he_h2f(h);
}

/* Chris Wellons' lowbias32 integer mixer: 32-bit multiplies only, so that
 * eight of them run as one AVX2 instruction each (he_half_sgd_run). */
HE_HD he_u32 he_mix32(he_u32 x)
{
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

/* 32 random bits for rounding slot `slot` in the call of `seed` (itself a
 * mixed 64-bit value, new per call): two rounds of he_mix32 over the low
 * and then the high halves of both. */
HE_HD he_u32 he_round_bits(he_u64 seed, he_u64 slot)
{
    return he_mix32(he_mix32((he_u32)slot ^ (he_u32)seed) ^ (he_u32)(slot >> 32) ^
                    (he_u32)(seed >> 32));
}

/* v's bits in the format (bf: bfloat16, else float16), rounded as asked
 * for slot `slot` (seed 0: to nearest; else stochastically, bits from
 * (seed, slot)). */
HE_HD he_u16 he_round16(float v, he_u64 slot, he_u64 seed, int bf)
{
    if (bf)
        return seed ? he_f2b_sr(v, he_round_bits(seed, slot)) : he_f2b(v);
    return seed ? he_f2h_sr(v, he_round_bits(seed, slot)) : he_f2h(v);
}

/* The bits of float(w) - step, rounded (he_round16). */
HE_HD he_u16 he_half_moved(he_u16 w, float step, he_u64 slot, he_u64 seed, int bf)
{
    return he_round16(he_s2f(w, bf) - step, slot, seed, bf);
}

/* w[slot] = w[slot] - step, rounded (he_half_moved). */
HE_HD void he_half_sub(he_u16* w, he_u64 slot, float step, he_u64 seed, int bf)
{
    w[slot] = he_half_moved(w[slot], step, slot, seed, bf);
}

#if !defined(__CUDACC__)
/* y[:n] = a * x (how 0), += a * x (1) or = x (2) for a run of float16 bits x:
 * the CPU kernels' gather of a run. With F16C (checked once at run time:
 * the default build targets baseline x86-64) eight elements convert in one
 * instruction; the arithmetic is the same multiply and add either way (no
 * FMA), so results do not depend on the machine. */
#define HE_S2F_RUN(QUAL, name, conv)                                                  \
    QUAL void name(float* __restrict y, const he_u16* __restrict x, float a, int64_t n,   \
                   int how)                                                              \
    {                                                                                    \
        int64_t i;                                                                       \
        if (how == 0)                                                                    \
            for (i = 0; i < n; i++) y[i] = a * conv(x[i]);                               \
        else if (how == 1)                                                               \
            for (i = 0; i < n; i++) y[i] += a * conv(x[i]);                              \
        else                                                                             \
            for (i = 0; i < n; i++) y[i] = conv(x[i]);                                   \
    }
HE_S2F_RUN(static inline, he_h2f_run_soft, he_h2f)

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
__attribute__((target("avx,f16c"))) static void he_h2f_run_f16c(
    float* __restrict y, const he_u16* __restrict x, float a, int64_t n, int how)
{
    int64_t i = 0;
    const __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(x + i)));
        if (how == 0)
            _mm256_storeu_ps(y + i, _mm256_mul_ps(va, v));
        else if (how == 1)
            _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_mul_ps(va, v)));
        else
            _mm256_storeu_ps(y + i, v);
    }
    if (i < n)
        he_h2f_run_soft(y + i, x + i, a, n - i, how);
}

static inline void he_h2f_run(float* __restrict y, const he_u16* __restrict x, float a,
                              int64_t n, int how)
{
    if (n >= 8 && (he_x86() & 1))
        he_h2f_run_f16c(y, x, a, n, how);
    else
        he_h2f_run_soft(y, x, a, n, how);
}
#else
#define he_h2f_run he_h2f_run_soft
#endif

/* he_h2f_run for bfloat16 bits: a shift per element, which the compiler
 * vectorises on any x86-64 (the same multiply and add, no FMA). Not
 * inlined: its vector loops, inlined into the gather loops, cost the
 * float32 path there registers and instructions (+7% in a forward). */
#if defined(__GNUC__)
HE_S2F_RUN(__attribute__((noinline)) static, he_b2f_run, he_b2f)
#else
HE_S2F_RUN(static, he_b2f_run, he_b2f)
#endif

/* y[:n] = a * x (how 0), += a * x (1) or = x (2) for a run of 16-bit
 * storage x in the format bf (bfloat16, else float16). */
static inline void he_s2f_run(float* __restrict y, const he_u16* __restrict x, float a,
                              int64_t n, int how, int bf)
{
    if (bf)
        he_b2f_run(y, x, a, n, how);
    else
        he_h2f_run(y, x, a, n, how);
}

/* The 16-bit SGD apply over n consecutive slots slot0.. of weight bits w
 * (format bf) and their summed gradient g: where g != 0,
 * w = round(float(w) - lr * g) (he_half_sub: to nearest for seed 0, else
 * stochastically); g = 0 after. With AVX2 and F16C, eight slots a step
 * (he_half_sgd_run_v): the same float arithmetic, the same random bits,
 * and the same rounding, so the same bits as one slot at a time. */
static inline void he_half_sgd_run_soft(he_u16* __restrict w, float* __restrict g, int64_t n,
                                        uint64_t slot0, float lr, uint64_t seed, int bf)
{
    for (int64_t i = 0; i < n; i++)
        if (g[i] != 0) {
            w[i] = he_half_moved(w[i], lr * g[i], slot0 + (uint64_t)i, seed, bf);
            g[i] = 0;
        }
}

#if defined(__x86_64__) && defined(__GNUC__)
/* bfloat16 rounding of eight float32 bit patterns (32-bit lanes, result in
 * the low 16 bits): the scalar he_f2b / he_f2b_sr arithmetic, add then
 * truncate (rnd: the lanes' random bits, or none for to nearest); nan
 * lanes become quiet nans. */
__attribute__((target("avx2"))) static inline __m256i he_f2b_v(__m256i bits, const __m256i* rnd)
{
    const __m256i add = rnd ? _mm256_srli_epi32(*rnd, 16)
                            : _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                               _mm256_and_si256(_mm256_srli_epi32(bits, 16),
                                                                _mm256_set1_epi32(1)));
    const __m256i q = _mm256_srli_epi32(_mm256_add_epi32(bits, add), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(q, _mm256_or_si256(_mm256_srli_epi32(bits, 16),
                                                 _mm256_set1_epi32(0x40)), nan);
}

/* The random bits of slots s .. s + 7 in the call of seed (he_round_bits,
 * eight lanes). */
__attribute__((target("avx2"), always_inline)) static inline __m256i he_round_bits_v(
    uint64_t s, uint64_t seed)
{
    const __m256i m1 = _mm256_set1_epi32(0x7feb352d), m2 = _mm256_set1_epi32((int)0x846ca68bu);
    const __m256i flip = _mm256_set1_epi32(INT32_MIN);
    const __m256i base = _mm256_set1_epi32((int)(he_u32)s);
    const __m256i lo = _mm256_add_epi32(base, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    /* the high half of each lane's slot: +1 where the low half wrapped */
    const __m256i hi = _mm256_sub_epi32(
        _mm256_set1_epi32((int)(he_u32)(s >> 32)),
        _mm256_cmpgt_epi32(_mm256_xor_si256(base, flip), _mm256_xor_si256(lo, flip)));
    __m256i x = _mm256_xor_si256(lo, _mm256_set1_epi32((int)(he_u32)seed));
#define HE_MIX32_V(x)                                                     \
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));                     \
    x = _mm256_mullo_epi32(x, m1);                                         \
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));                     \
    x = _mm256_mullo_epi32(x, m2);                                         \
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    HE_MIX32_V(x)
    x = _mm256_xor_si256(_mm256_xor_si256(x, hi), _mm256_set1_epi32((int)(he_u32)(seed >> 32)));
    HE_MIX32_V(x)
#undef HE_MIX32_V
    return x;
}

/* Eight 16-bit weights wh (format bf) as floats, exact. */
__attribute__((target("avx2,f16c"), always_inline)) static inline __m256 he_s2f_v(__m128i wh,
                                                                                   const int bf)
{
    return bf ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(wh), 16))
              : _mm256_cvtph_ps(wh);
}

/* w[0 .. 8) = v rounded to the format bf in the lanes of live (the others
 * keep wh, w's bits as loaded): to nearest for seed 0, else stochastically
 * with the random bits of slots s .. s + 7; the same bits as he_f2h /
 * he_f2h_sr / he_f2b / he_f2b_sr lane by lane (float16 lanes outside its
 * normal range, stochastically, take that scalar code). */
__attribute__((target("avx2,f16c"), always_inline)) static inline void he_half_put_v(
    he_u16* __restrict w, __m128i wh, __m256 v, __m256 live, uint64_t s, uint64_t seed,
    const int bf)
{
    const __m256i bits = _mm256_castps_si256(v);
    __m128i out;
    if (seed == 0 && !bf) {
        out = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
        __m256i q;
        if (seed == 0) {
            q = he_f2b_v(bits, NULL);
        } else {
            __m256i x = he_round_bits_v(s, seed);
            if (bf) {
                q = he_f2b_v(bits, &x);
            } else {
                /* he_f2h_sr's normal-range case: 13 dropped bits against the
                   top 13 random bits */
                const __m256i ax = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
                const __m256i r = _mm256_sub_epi32(ax, _mm256_set1_epi32(0x38000000));
                const __m256i small = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x38800000), ax);
                const __m256i big = _mm256_cmpgt_epi32(ax, _mm256_set1_epi32(0x477fffff));
                if (!_mm256_testz_si256(_mm256_or_si256(small, big),
                                        _mm256_castps_si256(live))) {
                    float vs[8];
                    const int m = _mm256_movemask_ps(live);
                    _mm256_storeu_ps(vs, v);
                    for (int l = 0; l < 8; l++)
                        if (m >> l & 1)
                            w[l] = he_f2h_sr(vs[l], he_round_bits(seed, s + (uint64_t)l));
                    return;
                }
                q = _mm256_srli_epi32(r, 13);
                const __m256i up = _mm256_cmpgt_epi32(
                    _mm256_and_si256(r, _mm256_set1_epi32(0x1fff)), _mm256_srli_epi32(x, 19));
                q = _mm256_sub_epi32(q, up);                        /* + 1 where up */
                q = _mm256_or_si256(q, _mm256_and_si256(_mm256_srli_epi32(bits, 16),
                                                        _mm256_set1_epi32(0x8000)));
            }
        }
        /* 32 -> 16 bits per lane, in order (then the two 64-bit halves joined) */
        const __m256i pack = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1,
                                              -1, -1, 0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1,
                                              -1, -1, -1, -1);
        q = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(q, pack), 0x08);
        out = _mm256_castsi256_si128(q);
    }
    const __m128i keep = _mm_packs_epi32(_mm256_castsi256_si128(_mm256_castps_si256(live)),
                                         _mm256_extracti128_si256(_mm256_castps_si256(live), 1));
    _mm_storeu_si128((__m128i*)w, _mm_blendv_epi8(wh, out, keep));
}

/* The 16-bit SGD apply, eight slots a step (AVX2; F16C for float16): the
 * same float arithmetic, random bits and rounding as
 * he_half_sgd_run_soft, so the same bits as one slot at a time. */
__attribute__((target("avx2,f16c"), always_inline)) static inline void he_half_sgd_run_v(
    he_u16* __restrict w, float* __restrict g, int64_t n, uint64_t slot0, float lr,
    uint64_t seed, const int bf)
{
    int64_t i = 0;
    const __m256 vlr = _mm256_set1_ps(lr), zero = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 live = _mm256_cmp_ps(gv, zero, _CMP_NEQ_UQ);
        if (_mm256_testz_ps(live, live))
            continue;                                       /* nothing to apply here */
        const __m128i wh = _mm_loadu_si128((const __m128i*)(w + i));
        const __m256 v = _mm256_sub_ps(he_s2f_v(wh, bf), _mm256_mul_ps(vlr, gv));
        he_half_put_v(w + i, wh, v, live, slot0 + (uint64_t)i, seed, bf);
        _mm256_storeu_ps(g + i, zero);
    }
    if (i < n)
        he_half_sgd_run_soft(w + i, g + i, n - i, slot0 + (uint64_t)i, lr, seed, bf);
}

/* one copy per format (bf a constant in each: no per-step tests of it) */
__attribute__((target("avx2,f16c"))) static void he_half_sgd_run_avx2_h(
    he_u16* __restrict w, float* __restrict g, int64_t n, uint64_t slot0, float lr, uint64_t seed)
{
    he_half_sgd_run_v(w, g, n, slot0, lr, seed, 0);
}

__attribute__((target("avx2,f16c"))) static void he_half_sgd_run_avx2_b(
    he_u16* __restrict w, float* __restrict g, int64_t n, uint64_t slot0, float lr, uint64_t seed)
{
    he_half_sgd_run_v(w, g, n, slot0, lr, seed, 1);
}

static inline void he_half_sgd_run(he_u16* __restrict w, float* __restrict g, int64_t n,
                                   uint64_t slot0, float lr, uint64_t seed, int bf)
{
    if (n >= 8 && (he_x86() & 2)) {
        if (bf)
            he_half_sgd_run_avx2_b(w, g, n, slot0, lr, seed);
        else
            he_half_sgd_run_avx2_h(w, g, n, slot0, lr, seed);
    } else
        he_half_sgd_run_soft(w, g, n, slot0, lr, seed, bf);
}
#else
#define he_half_sgd_run he_half_sgd_run_soft
#endif
#endif

#endif
