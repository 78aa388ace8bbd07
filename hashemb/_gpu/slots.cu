/*
 * hashemb/_gpu/slots.cu -- Scheme.slots / Scheme.signs and UniversalHash on
 * the GPU: the CUDA twins of hashemb/_cpu/_slots.pyx slots, signs,
 * universal_hash and universal_sign, one thread per output value.
 */
#ifndef HASHEMB_GPU_COMMON_H
#include "common.cuh"
#endif

/* out[r*D + i] = slot(table, tok[r], i) for r < n, i < D. */
template <typename I>
__global__ void scheme_slots(const he_scheme* __restrict__ s, const I* __restrict__ tok, i64 n,
                             i64 table, int64_t* __restrict__ out)
{
    const i64 g = he_tid(), D = s->dim;
    if (g >= n * D)
        return;
    const i64 r = g / D;
    const int i = (int)(g - r * D), L = (int)s->run, k = i / L;
    const he_row row = he_row_begin(s, table, (i64)tok[r]);
    out[g] = (int64_t)he_run_slot(s, he_run_start(s, &row, k), i - k * L);
}

/* out[r*D + i] = g(table, tok[r], i) in {+1, -1} (1 for unsigned schemes). */
template <typename I>
__global__ void scheme_signs(const he_scheme* __restrict__ s, const I* __restrict__ tok, i64 n,
                             i64 table, float* __restrict__ out)
{
    const i64 g = he_tid(), D = s->dim;
    if (g >= n * D)
        return;
    const i64 r = g / D;
    const he_row row = he_row_begin(s, table, (i64)tok[r]);
    out[g] = (float)he_sign(s, &row, g - r * D);
}

/* out[r] = ((A*table + B*keys[r] + C*block + D0) mod P) mod m; coef = [A, B, C, D0]. */
template <typename K>
__global__ void universal_hash(const uint64_t* __restrict__ coef, const K* __restrict__ keys,
                               i64 n, unsigned long long table, unsigned long long block,
                               unsigned long long m, unsigned long long m_inv,
                               int64_t* __restrict__ out)
{
    const i64 g = he_tid();
    if (g >= n)
        return;
    out[g] = (int64_t)he_hash(coef, table, (uint64_t)keys[g], block, m, m_inv);
}

/* out[r] = g(table, keys[r], element); coef = [A', B', C', D0', Q1, Q2, Q3, Q0]. */
template <typename K>
__global__ void universal_sign(const uint64_t* __restrict__ coef, const K* __restrict__ keys,
                               i64 n, unsigned long long table, unsigned long long element,
                               float* __restrict__ out)
{
    const i64 g = he_tid();
    if (g >= n)
        return;
    const uint64_t k = he_addmod(he_hash_base(coef, table, (uint64_t)keys[g]),
                                 he_mulmod(coef[2], he_fold(element)));
    out[g] = (float)he_sign_of_key(coef + 4, k);
}

/* SCMA / LMA build: sig[i*F + f] = (uint32) min over keys[ptr[i] .. ptr[i+1]) of
 * h_f(key) = (a_f key + b_f) mod P, one thread per (token, function): the
 * twin of lsh_signatures in _cpu/_slots.pyx (same 61-bit minimum, then 32 bits).
 * Tokens of more than `cap` keys are skipped here: lsh_minhash_chunks splits
 * them over many threads (a token in every sampled row would otherwise be one
 * thread's serial loop over the whole sample, the tail of the launch). */
__global__ void lsh_minhash(const uint64_t* __restrict__ mh, const int64_t* __restrict__ ptr,
                            const uint64_t* __restrict__ keys, i64 n, i64 F, i64 cap,
                            uint32_t* __restrict__ sig)
{
    const i64 g = he_tid();
    if (g >= n * F)
        return;
    const i64 i = g / F, f = g - i * F;
    if (ptr[i + 1] - ptr[i] > cap)
        return;
    uint64_t best = HE_P;
    for (i64 j = ptr[i]; j < ptr[i + 1]; j++) {
        const uint64_t v = he_lsh_value(mh, f, keys[j]);
        best = v < best ? v : best;
    }
    sig[g] = (uint32_t)best;
}

/* The long tokens' minimum, one thread per (chunk of at most `cap` keys,
 * function): keys[lo[c] .. hi[c]) belong to long token tok[c], whose running
 * minimum best[tok[c]*F + f] (61-bit, from HE_P) takes the chunk's by an
 * atomic min: any order gives the same minimum, so the same bits as the CPU. */
__global__ void lsh_minhash_chunks(const uint64_t* __restrict__ mh,
                                   const int64_t* __restrict__ tok,
                                   const int64_t* __restrict__ lo,
                                   const int64_t* __restrict__ hi, i64 nchunks, i64 F,
                                   const uint64_t* __restrict__ keys,
                                   unsigned long long* __restrict__ best)
{
    const i64 g = he_tid();
    if (g >= nchunks * F)
        return;
    const i64 c = g / F, f = g - c * F;
    uint64_t m = HE_P;
    for (i64 j = lo[c]; j < hi[c]; j++) {
        const uint64_t v = he_lsh_value(mh, f, keys[j]);
        m = v < m ? v : m;
    }
    atomicMin(best + tok[c] * F + f, (unsigned long long)m);
}

/* sig[ids[t]*F + f] = (uint32) best[t*F + f]: the long tokens' signatures. */
__global__ void lsh_minhash_store(const unsigned long long* __restrict__ best,
                                  const int64_t* __restrict__ ids, i64 nlong, i64 F,
                                  uint32_t* __restrict__ sig)
{
    const i64 g = he_tid();
    if (g >= nlong * F)
        return;
    const i64 t = g / F;
    sig[ids[t] * F + (g - t * F)] = (uint32_t)best[g];
}

/* SCMA: out[i*R + k] = start of run k from token i's signature (he_lsh_slot). */
__global__ void lsh_starts(const he_scheme* __restrict__ s, const uint32_t* __restrict__ sig,
                           i64 n, i64 F, uint32_t* __restrict__ out)
{
    const i64 g = he_tid(), R = s->runs;
    if (g >= n * R)
        return;
    const i64 i = g / R;
    out[g] = (uint32_t)he_lsh_slot(s, sig + i * F, 0, g - i * R);
}

/* keys[r] = he_lsh_row_key(salt, rows[r]): the minhash key of each sampled
 * row (the twin of lsh_row_keys in _cpu/_slots.pyx). */
__global__ void lsh_row_keys(const int64_t* __restrict__ rows, i64 n,
                             unsigned long long salt, uint64_t* __restrict__ keys)
{
    const i64 g = he_tid();
    if (g >= n)
        return;
    keys[g] = he_lsh_row_key(salt, (uint64_t)rows[g]);
}

/* out[r] = id of (table, tok[r]) in the scheme's map, -1 for a token absent
 * from the sample (the twin of lsh_find in _cpu/_slots.pyx). */
template <typename I>
__global__ void lsh_lookup(const he_scheme* __restrict__ s, const I* __restrict__ tok, i64 n,
                           i64 table, int64_t* __restrict__ out)
{
    const i64 g = he_tid();
    if (g >= n)
        return;
    out[g] = he_lsh_find(s, table, (uint64_t)(int64_t)tok[g]);
}

HE_KERNEL(lsh_row_keys)
HE_KERNEL(lsh_lookup<int>)
HE_KERNEL(lsh_lookup<long long>)
HE_KERNEL(lsh_minhash)
HE_KERNEL(lsh_minhash_chunks)
HE_KERNEL(lsh_minhash_store)
HE_KERNEL(lsh_starts)
HE_KERNEL(scheme_slots<int>)
HE_KERNEL(scheme_slots<long long>)
HE_KERNEL(scheme_signs<int>)
HE_KERNEL(scheme_signs<long long>)
HE_KERNEL(universal_hash<int>)
HE_KERNEL(universal_hash<long long>)
HE_KERNEL(universal_sign<int>)
HE_KERNEL(universal_sign<long long>)
