/*
 * hashemb/_gpu/init.cu -- Scheme.init_weight on the GPU: NumPy's
 * default_rng(seed).random() stream, bit for bit, drawn in parallel.
 *
 * NumPy's default generator is PCG64 (XSL-RR 128/64): a 128-bit LCG
 * s' = s M + inc whose k-th 64-bit output is xsl_rr(s after k + 1 steps).
 * random(float64) takes output e for element e, (x >> 11) 2^-53; random
 * (float32) takes the low, then the high 32 bits of output e / 2 for
 * element e, (u >> 8) 2^-24. An LCG jumps k steps in O(log k) (Brown,
 * "Random number generation with arbitrary strides", 1994), so each thread
 * jumps to its first output and steps through `per` of them.
 */
#ifndef HASHEMB_GPU_COMMON_H
#include "common.cuh"
#endif

struct he_u128 {
    uint64_t hi, lo;
};

/* the low 128 bits of a b */
HE_HD he_u128 he_mul_u128(he_u128 a, he_u128 b)
{
    he_u128 r;
    he_mul128(a.lo, b.lo, &r.hi, &r.lo);
    r.hi += a.hi * b.lo + a.lo * b.hi;
    return r;
}

HE_HD he_u128 he_add_u128(he_u128 a, he_u128 b)
{
    he_u128 r;
    r.lo = a.lo + b.lo;
    r.hi = a.hi + b.hi + (r.lo < a.lo);
    return r;
}

/* PCG's 128-bit default multiplier (NumPy's PCG64) */
HE_HD he_u128 he_pcg_mult()
{
    he_u128 m = {0x2360ED051FC65DA4ULL, 0x4385DF649FCCF645ULL};
    return m;
}

/* The state k steps after s. */
HE_HD he_u128 he_pcg_advance(he_u128 s, he_u128 inc, uint64_t k)
{
    he_u128 acc_mult = {0, 1}, acc_plus = {0, 0}, mult = he_pcg_mult(), plus = inc;
    const he_u128 one = {0, 1};
    while (k) {
        if (k & 1) {
            acc_mult = he_mul_u128(acc_mult, mult);
            acc_plus = he_add_u128(he_mul_u128(acc_plus, mult), plus);
        }
        plus = he_mul_u128(he_add_u128(mult, one), plus);
        mult = he_mul_u128(mult, mult);
        k >>= 1;
    }
    return he_add_u128(he_mul_u128(acc_mult, s), acc_plus);
}

/* One step, then the XSL-RR output of the new state. */
HE_HD uint64_t he_pcg_next(he_u128* s, he_u128 inc)
{
    *s = he_add_u128(he_mul_u128(*s, he_pcg_mult()), inc);
    const uint64_t x = s->hi ^ s->lo;
    const unsigned r = (unsigned)(s->hi >> 58);
    return (x >> r) | (x << ((64 - r) & 63));
}

/* The stored value of a draw v already spread to [-s, s]: float and double
 * as they are, 16-bit storage rounded once to nearest (half.h, as the CPU's
 * half_round with seed 0). */
__device__ __forceinline__ void he_init_store(float* w, i64 e, float v) { w[e] = v; }
__device__ __forceinline__ void he_init_store(double* w, i64 e, double v) { w[e] = v; }
__device__ __forceinline__ void he_init_store(unsigned short* w, i64 e, float v)
{
    w[e] = he_round16(v, 0, 0, 0);
}
__device__ __forceinline__ void he_init_store(he_bf16* w, i64 e, float v)
{
    w[e].b = he_round16(v, 0, 0, 1);
}

/* w[e] = u_e * s2[p] - s1[p] for the n elements of storage S (R, or
 * 16-bit storage of float), u_e the e-th draw of random(R) (R: float or
 * double) from state (s_hi, s_lo) and increment
 * (inc_hi, inc_lo), p the part bounds[p] <= e < bounds[p+1] (nparts
 * contiguous parts from 0 to n: a FullTable's tables, each its own scale),
 * s2 = R(2 scale) and s1 = R(scale) as NumPy's in-place float32 / float64
 * arithmetic rounds them (the sources compile with -fmad=false, so the
 * product is rounded before the subtraction, as NumPy's two steps). */
template <typename R, typename S = R>
__global__ void init_uniform(unsigned long long s_hi, unsigned long long s_lo,
                             unsigned long long inc_hi, unsigned long long inc_lo, i64 n,
                             const int64_t* __restrict__ bounds, const R* __restrict__ s2,
                             const R* __restrict__ s1, i64 nparts, i64 per,
                             S* __restrict__ w)
{
    const int per_out = sizeof(R) == 4 ? 2 : 1;       /* draws per 64-bit output */
    const i64 first_out = he_tid() * per;
    i64 e = first_out * per_out;
    if (e >= n)
        return;
    const he_u128 inc = {inc_hi, inc_lo};
    he_u128 s = he_pcg_advance(he_u128{s_hi, s_lo}, inc, (uint64_t)first_out);
    i64 lo = 0, hi = nparts - 1;                        /* the part of e */
    while (lo < hi) {
        const i64 mid = (lo + hi + 1) / 2;
        if (bounds[mid] <= e)
            lo = mid;
        else
            hi = mid - 1;
    }
    i64 p = lo;
    const i64 end = e + per * per_out < n ? e + per * per_out : n;
    while (e < end) {
        const uint64_t x = he_pcg_next(&s, inc);
        for (int h = 0; h < per_out && e < end; h++, e++) {
            R u;
            if (sizeof(R) == 4)
                u = (R)((uint32_t)(x >> (32 * h)) >> 8) * (R)(1.0f / 16777216.0f);
            else
                u = (R)(x >> 11) * (R)(1.0 / 9007199254740992.0);
            while (e >= bounds[p + 1])
                p++;
            const R prod = u * s2[p];
            he_init_store(w, e, prod - s1[p]);
        }
    }
}

HE_KERNEL(init_uniform<float>)
HE_KERNEL(init_uniform<double>)
HE_KERNEL(init_uniform<float, unsigned short>)
HE_KERNEL(init_uniform<float, he_bf16>)
