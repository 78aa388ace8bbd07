/* float16 storage: conversions between IEEE binary16 (kept as its 16 bits,
 * uint16_t) and float, one source for the CPU kernels (_cpu/_bag.pyx), the
 * CUDA kernels (prepended to every .cu like slots.h) and the host emulator.
 *
 * A float16 array is storage only: the kernels read each element as a
 * float (exact: every binary16 value is a float), pool and scatter in
 * float32, and write float16 only where a fused optimizer moves a weight,
 * rounding once per slot and step:
 *   - to nearest, ties to even (IEEE, as NumPy's astype(float16)), or
 *   - stochastically: up (away from zero) with probability (|x| - |lo|) / ulp,
 *     where lo is |x| truncated to float16, from 32 random bits, so that the
 *     expected stored value is x and updates smaller than half an ulp still
 *     move a weight on average (what makes float16 training work; FBGEMM's
 *     default for float16 tables). The bits are a hash of (seed, slot):
 *     the same on any thread count, CPU or GPU.
 * Integer arithmetic only (no float16 type, no F16C, no -ftz dependence:
 * subnormal halves are converted from integers), so results are bitwise the
 * same everywhere; the CUDA build uses the hardware conversion instructions,
 * which are exact and round to nearest even too. */
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
#define HE_HALF_FN HE_HD

HE_HALF_FN float he_bits_f(he_u32 b)
{
#if defined(__CUDA_ARCH__)
    return __int_as_float((int)b);
#else
    float f;
    memcpy(&f, &b, 4);
    return f;
#endif
}

HE_HALF_FN he_u32 he_f_bits(float f)
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
HE_HALF_FN float he_h2f(he_u16 h)
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
HE_HALF_FN he_u16 he_f2h(float f)
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
HE_HALF_FN he_u16 he_f2h_sr(float f, he_u32 rnd)
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

/* 32 random bits for rounding slot `slot` in the call of `seed`
 * (SplitMix64's finaliser of their sum). */
HE_HALF_FN he_u32 he_round_bits(he_u64 seed, he_u64 slot)
{
    he_u64 z = seed + (slot + 1u) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (he_u32)((z ^ (z >> 31)) >> 32);
}

/* w[slot] = w - step, rounded as asked (seed 0: to nearest; else
 * stochastically, bits from (seed, slot)). */
HE_HALF_FN void he_half_sub(he_u16* w, he_u64 slot, float step, he_u64 seed)
{
    float v = he_h2f(w[slot]) - step;
    w[slot] = seed ? he_f2h_sr(v, he_round_bits(seed, slot)) : he_f2h(v);
}

#if !defined(__CUDACC__)
/* y[:n] = a * x (how 0), += a * x (1) or = x (2) for a run of float16 bits x:
 * the CPU kernels' gather of a run. With F16C (checked once at run time:
 * the default build targets baseline x86-64) eight elements convert in one
 * instruction; the arithmetic is the same multiply and add either way (no
 * FMA), so results do not depend on the machine. */
static inline void he_h2f_run_soft(float* __restrict y, const he_u16* __restrict x, float a,
                                   int64_t n, int how)
{
    int64_t i;
    if (how == 0)
        for (i = 0; i < n; i++) y[i] = a * he_h2f(x[i]);
    else if (how == 1)
        for (i = 0; i < n; i++) y[i] += a * he_h2f(x[i]);
    else
        for (i = 0; i < n; i++) y[i] = he_h2f(x[i]);
}

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

static inline int he_has_f16c(void)
{
    static int has = -1;        /* a benign race: every thread stores the same */
    if (has < 0)
        has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
    return has;
}

static inline void he_h2f_run(float* __restrict y, const he_u16* __restrict x, float a,
                              int64_t n, int how)
{
    if (n >= 8 && he_has_f16c())
        he_h2f_run_f16c(y, x, a, n, how);
    else
        he_h2f_run_soft(y, x, a, n, how);
}
#else
#define he_h2f_run he_h2f_run_soft
#endif
#endif

#endif
