/*
 * hashemb/slots.h -- the hash and slot math of every hashemb scheme.
 *
 * ONE source for the CPU (Cython, via `cdef extern`) and the GPU (its text is
 * prepended to the CUDA sources, so CuPy's compile cache sees every edit).
 * Everything here is a pure function of its arguments: no allocation, no I/O.
 *
 * A scheme maps (table e, token x, element i) to a slot of the flat array M of
 * m floats. Every scheme cuts a row of D elements into D/L contiguous *runs* of
 * L elements; run k starts at slot he_run_start(...) and continues circularly
 * (slot + j mod m). FullTable and ROBE-D are one run of D, ROBE-Z runs of Z,
 * HashedNet runs of 1. The bag kernels only ever ask for run starts, so a new
 * scheme is a new case here, not a new kernel.
 */
#ifndef HASHEMB_SLOTS_H
#define HASHEMB_SLOTS_H

#if defined(__CUDACC_RTC__)
typedef unsigned long long uint64_t;
typedef long long int64_t;
typedef unsigned int uint32_t;
typedef int int32_t;
#else
#include <stdint.h>
#endif

#if defined(__CUDACC__)
#define HE_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define HE_HD static inline __attribute__((always_inline))  /* hot-loop helpers */
#else
#define HE_HD static inline
#endif

/* The Mersenne prime 2^61 - 1 of hashemb's universal family. */
#define HE_P 0x1FFFFFFFFFFFFFFFULL

/* Scheme kinds (keep in sync with hashemb/schemes.py). */
#define HE_FULL 0       /* slot = (rows before table e + x) * D + i            */
#define HE_ROBE 1       /* ROBE-Z, Z <= D: blocks of Z at hashed offsets        */
#define HE_ROBE_WIDE 2  /* ROBE-Z, Z > D: Z/D consecutive rows share a block    */
#define HE_ROBE_REF 3   /* the ROBE authors' exact map (P = 2038074743)        */
#define HE_HNET_REF 4   /* seed 000's HashedEmbeddingBag hash                   */
#define HE_LSH_TABLE 5  /* SCMA: minhash-learned slot table of sampled tokens   */
#define HE_LMA 6        /* LMA: minhash signature of sampled tokens, slots on the fly */

/* Coefficient positions in he_scheme.coef. */
#define HE_CA 0  /* table   */
#define HE_CB 1  /* token   */
#define HE_CC 2  /* block   */
#define HE_CD 3  /* constant */
#define HE_SA 4  /* sign hash: independent coefficients */
#define HE_SB 5
#define HE_SC 6
#define HE_SD 7
#define HE_Q 8   /* sign polynomial q(k) = Q0 + Q1 k + Q2 k^2 + Q3 k^3: Q1, Q2, Q3, Q0 */
#define HE_NCOEF 12

typedef struct he_scheme {
    int32_t kind;
    int32_t is_signed;      /* multiply element i by g(e, x, i) in {+1, -1}     */
    int64_t dim;            /* D                                               */
    int64_t run;            /* L: elements per contiguous run (divides D)      */
    int64_t runs;           /* D / L, so that no kernel divides per row        */
    uint64_t size;          /* m: floats in the array                          */
    uint64_t mod;           /* divisor of the run-start hash: m, or m - Z + 1  */
    uint64_t mod_inv;       /* floor((2^64 - 1) / mod), for he_fastmod         */
    uint64_t p_mod;         /* P mod `mod` (he_robe_run_start)                 */
    uint64_t rows;          /* HE_ROBE_WIDE: r = Z / D rows per block          */
    uint64_t rows_inv;
    uint64_t ref_p;         /* HE_ROBE_REF / HE_HNET_REF inner prime            */
    uint64_t ref_p_inv;
    uint64_t coef[HE_NCOEF];/* universal-hash coefficients, see HE_C*, HE_S*, HE_Q */
    const uint64_t* run_coef;   /* [2 D/L] (HE_ROBE): C k mod P per run k, then each mod `mod` */
    const uint64_t* sign_coef;  /* [D]:   C' * i mod P (per element i)         */
    const int64_t* table_base;  /* [num_tables]: rows before table e           */
    int64_t num_tables;         /* tables with a size (0: any table id)        */
    /* HE_LSH_TABLE / HE_LMA (see he_lsh_find, he_lsh_slot) */
    const uint64_t* lsh_keys;   /* [cap]: fingerprint << 32 | id; 0 = empty     */
    uint64_t lsh_mask;          /* cap - 1 (cap a power of two, >= 2x the tokens) */
    uint64_t lsh_salt;          /* keys of sample rows and of absent tokens    */
    const uint32_t* lsh_data;   /* [ids x width]: run starts (TABLE) or signatures (LMA) */
    int64_t lsh_width;          /* D/Z (TABLE) or K signature values (LMA)     */
    int64_t lsh_nh;             /* NUM_HASH: signature values per run          */
    const int32_t* lsh_pick;    /* [D/Z x NH]: signature positions of run k    */
    const uint64_t* lsh_mh;     /* [2F]: minhash functions a_f, b_f            */
    const uint64_t* lsh_mix;    /* [NH + D/Z]: odd multipliers A_h, then c_k   */
} he_scheme;

/* ---- 128-bit product and arithmetic mod P -------------------------------- */

HE_HD void he_mul128(uint64_t a, uint64_t b, uint64_t* hi, uint64_t* lo)
{
#if defined(__CUDA_ARCH__)
    *lo = a * b;
    *hi = __umul64hi(a, b);
#else
    unsigned __int128 p = (unsigned __int128)a * b;
    *lo = (uint64_t)p;
    *hi = (uint64_t)(p >> 64);
#endif
}

/* x mod P for any 64-bit x: 2^61 == 1 (mod P), so fold the top 3 bits down. */
HE_HD uint64_t he_fold(uint64_t x)
{
    x = (x & HE_P) + (x >> 61);          /* < 2^61 + 8 */
    return x >= HE_P ? x - HE_P : x;
}

/* a * b mod P for a, b < P: the product is < 2^122, split at bit 61. */
HE_HD uint64_t he_mulmod(uint64_t a, uint64_t b)
{
    uint64_t hi, lo;
    he_mul128(a, b, &hi, &lo);
    return he_fold((lo & HE_P) + ((hi << 3) | (lo >> 61)));
}

/* (a + b) mod P for a, b < P. */
HE_HD uint64_t he_addmod(uint64_t a, uint64_t b)
{
    uint64_t s = a + b;
    return s >= HE_P ? s - HE_P : s;
}

/*
 * v mod d without a division instruction: inv = floor((2^64-1)/d) is precomputed
 * once per scheme; q = mulhi(v, inv) is floor(v/d) or one less (the error of inv
 * is below 1 and v < 2^64), so one conditional subtraction makes it exact.
 * Valid for every 64-bit v and 1 <= d < 2^63.
 */
HE_HD uint64_t he_fastmod(uint64_t v, uint64_t d, uint64_t inv)
{
    uint64_t q, lo;
    he_mul128(v, inv, &q, &lo);
    uint64_t r = v - q * d;
    return r >= d ? r - d : r;
}

HE_HD uint64_t he_fastdiv(uint64_t v, uint64_t d, uint64_t inv)
{
    uint64_t q, lo;
    he_mul128(v, inv, &q, &lo);
    return (v - q * d) >= d ? q + 1 : q;
}

/*
 * (a * u + b) mod P for a < P, b < 2^62 and any 64-bit u, with one full
 * reduction instead of three: u is only folded once (u' < 2^61 + 8, u' == u
 * mod P), so a * u' < 2^123 splits at bit 61 into two parts below 2^61 and
 * 2^62, and b plus both stays below 5 * 2^61 < 2^64 for he_fold. The same
 * residue as he_addmod(he_mulmod(a, he_fold(u)), b mod P): a row hash's
 * three folds cost more than its multiply.
 */
HE_HD uint64_t he_muladd(uint64_t a, uint64_t u, uint64_t b)
{
    uint64_t hi, lo;
    he_mul128(a, (u & HE_P) + (u >> 61), &hi, &lo);
    return he_fold(b + (lo & HE_P) + ((hi << 3) | (lo >> 61)));
}

/* he_hash_base given ta = A*e mod P, the part fixed for a whole table. */
HE_HD uint64_t he_hash_base_t(const uint64_t* c, uint64_t ta, uint64_t u)
{
    return he_muladd(c[1], u, ta + c[3]);
}

/* (A*e + B*u + D0) mod P: the part of h(e, u, c) that is fixed for a row. */
HE_HD uint64_t he_hash_base(const uint64_t* c, uint64_t e, uint64_t u)
{
    return he_hash_base_t(c, he_mulmod(c[0], he_fold(e)), u);
}

/* h(e, u, c) = ((A*e + B*u + C*c + D0) mod P) mod m, in full. */
HE_HD uint64_t he_hash(const uint64_t* c, uint64_t e, uint64_t u, uint64_t blk,
                       uint64_t m, uint64_t m_inv)
{
    uint64_t v = he_addmod(he_hash_base(c, e, u), he_mulmod(c[2], he_fold(blk)));
    return he_fastmod(v, m, m_inv);
}

/* ---- minhash memory allocation (SCMA / LMA) -------------------------------- */

/* SplitMix64's finaliser: a bijection of 64-bit words with full avalanche
 * (also where a TTCache frequency table starts probing for a row: the
 * CPU's count in _tt.pyx and the GPU's tt_cache_find / tt_cache_insert). */
HE_HD uint64_t he_mix64(uint64_t x)
{
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* Minhash key of sample row r (< P). Keys are scrambled so that the linear
 * minhash functions never see the arithmetic structure of row numbers. */
HE_HD uint64_t he_lsh_row_key(uint64_t salt, uint64_t r)
{
    return he_fold(he_mix64(r ^ salt));
}

/* Key of the random singleton set of a token absent from the sample. */
HE_HD uint64_t he_lsh_absent_key(uint64_t salt, int64_t field, uint64_t token)
{
    return he_fold(he_mix64(he_mix64(token ^ ~salt) + (uint64_t)field * 0x9E3779B97F4A7C15ULL));
}

/* Minhash function f on a key: h_f(k) = (a_f k + b_f) mod P (the 61-bit value
 * a minimum is taken over). */
HE_HD uint64_t he_lsh_value(const uint64_t* mh, int64_t f, uint64_t key)
{
    return he_addmod(he_mulmod(mh[2 * f], key), mh[2 * f + 1]);
}

/* A signature value: the minimum kept to 32 bits (of a singleton: h_f itself). */
HE_HD uint32_t he_lsh_hash(const uint64_t* mh, int64_t f, uint64_t key)
{
    return (uint32_t)he_lsh_value(mh, f, key);
}

/* The field's part of he_lsh_probe (a kernel walking one table hashes it once). */
HE_HD uint64_t he_lsh_field_key(uint64_t salt, int64_t field)
{
    return he_mix64((uint64_t)field ^ salt);
}

/* 64-bit hash of (field, token): its low bits place it in the map, its high
 * 32 bits are its fingerprint there. */
HE_HD uint64_t he_lsh_probe(uint64_t salt, int64_t field, uint64_t token)
{
    return he_mix64(token + he_lsh_field_key(salt, field));
}

HE_HD uint64_t he_lsh_fingerprint(uint64_t h)
{
    return (h >> 32) | 1;     /* never 0: an all-zero entry is empty */
}

/*
 * Id of a sampled token, or -1: linear probing in the map of 8-byte entries
 * fingerprint << 32 | id. A token is recognised by its 31-bit fingerprint
 * along its probe run (about 2 entries at load <= 1/2), so an unsampled token
 * is taken for a sampled one with probability about 2^-30: it then shares
 * that token's runs, which is what a random collision does anyway.
 */
HE_HD int64_t he_lsh_find_probed(const he_scheme* s, uint64_t h)
{
    uint64_t fp = he_lsh_fingerprint(h);
    for (h &= s->lsh_mask;; h = (h + 1) & s->lsh_mask) {
        uint64_t e = s->lsh_keys[h];
        if (e == 0)
            return -1;
        if ((e >> 32) == fp)
            return (int64_t)(e & 0xFFFFFFFFULL);
    }
}

HE_HD int64_t he_lsh_find(const he_scheme* s, int64_t field, uint64_t token)
{
    return he_lsh_find_probed(s, he_lsh_probe(s->lsh_salt, field, token));
}

/*
 * Start of run k (Z elements) from the token's signature values v_h = sig[pick[k, h]]:
 * fastrange(c_k + sum_h A_h v_h mod 2^64, m) = floor(m (c_k + sum_h A_h v_h) / 2^64).
 * Equal picked values give equal starts (tokens with Jaccard similarity J share
 * run k with probability J^NH); unequal ones collide at about 1/m
 * (multiply-add over 32-bit values with random 64-bit A_h is universal).
 * `sig` is the stored signature (stride 1), or NULL with `key` to evaluate the
 * minhash functions of a random singleton {key} instead.
 */
HE_HD uint64_t he_lsh_slot(const he_scheme* s, const uint32_t* sig, uint64_t key, int64_t k)
{
    const int32_t* pick = s->lsh_pick + k * s->lsh_nh;
    uint64_t v = s->lsh_mix[s->lsh_nh + k];
    for (int64_t h = 0; h < s->lsh_nh; h++) {
        uint32_t x = sig ? sig[pick[h]] : he_lsh_hash(s->lsh_mh, pick[h], key);
        v += s->lsh_mix[h] * (uint64_t)x;
    }
    uint64_t hi, lo;
    he_mul128(v, s->size, &hi, &lo);
    return hi;
}

/* ---- rows and runs -------------------------------------------------------- */

/* What a row needs once, before its runs: hash bases (or the row's first slot). */
typedef struct he_row {
    uint64_t base;    /* run-start hash base, or the first slot (FULL, WIDE)   */
    uint64_t sbase;   /* sign-hash base                                        */
} he_row;

/* The row of a sampled (id found) or absent token of table `field`, from its map probe h. */
HE_HD he_row he_lsh_row(const he_scheme* s, int64_t field, uint64_t token, uint64_t h)
{
    /* base: the token's id, sbase = 1; or absent: its singleton key, sbase = 0 */
    he_row r;
    int64_t id = he_lsh_find_probed(s, h);
    r.base = id >= 0 ? (uint64_t)id : he_lsh_absent_key(s->lsh_salt, field, token);
    r.sbase = id >= 0;
    return r;
}

HE_HD int he_reads_map(const he_scheme* s)
{
    return s->kind == HE_LSH_TABLE || s->kind == HE_LMA;
}

/*
 * The parts of a row's hash bases fixed by its table e: A e mod P (run-start
 * hash) and A' e mod P (sign hash), so that a loop over one table's rows
 * multiplies them once (he_row_begin_t):
 * he_row_begin_t(s, e, he_table_term(s, e), x) == he_row_begin(s, e, x).
 */
typedef struct he_tterm {
    uint64_t a, sa;
} he_tterm;

HE_HD he_tterm he_table_term(const he_scheme* s, int64_t table)
{
    he_tterm t;
    uint64_t e = he_fold((uint64_t)table);
    t.a = s->kind == HE_ROBE || s->kind == HE_ROBE_WIDE ? he_mulmod(s->coef[HE_CA], e) : 0;
    t.sa = s->is_signed ? he_mulmod(s->coef[HE_SA], e) : 0;
    return t;
}

/*
 * Rows of one run (full tables, ROBE-Z with Z >= D: he_one_run(s)) of one
 * table, with what the table fixes worked out once: k = he_one_run_of(s, e,
 * tt), then he_one_run_start(&k, x) is row x's one run start (wide
 * ROBE-Z's rows in he_row_begin_t too). A loop over the table's
 * rows keeps k in registers; through s it reloads the fields after every
 * store (a store of a run start may alias them), and re-reads the kind.
 * ROBE-Z's sum A e + D0 + C 0 is taken mod P once: the terms are each
 * below P, so folding them together gives the same residue.
 */
typedef struct he_one_run_k {
    int kind;
    uint64_t add, mul, mod, inv, rows, rows_inv, size, dim;
} he_one_run_k;

HE_HD int he_one_run(const he_scheme* s)
{
    return s->runs == 1 &&
           (s->kind == HE_FULL || s->kind == HE_ROBE || s->kind == HE_ROBE_WIDE);
}

HE_HD he_one_run_k he_one_run_of(const he_scheme* s, int64_t table, he_tterm tt)
{
    he_one_run_k k;
    k.kind = s->kind;
    k.mul = s->coef[HE_CB];
    k.mod = s->mod;
    k.inv = s->mod_inv;
    k.rows = s->rows;
    k.rows_inv = s->rows_inv;
    k.size = s->size;
    k.dim = (uint64_t)s->dim;
    if (s->kind == HE_FULL)
        k.add = (uint64_t)s->table_base[table];
    else if (s->kind == HE_ROBE)
        k.add = he_fold(tt.a + s->coef[HE_CD] + s->run_coef[0]);
    else        /* below 2^62, as he_muladd takes it (he_hash_base_t's sum) */
        k.add = tt.a + s->coef[HE_CD];
    return k;
}

HE_HD uint64_t he_one_run_start(const he_one_run_k* k, uint64_t x)
{
    if (k->kind == HE_FULL)
        return (k->add + x) * k->dim;
    if (k->kind == HE_ROBE)
        return he_fastmod(he_muladd(k->mul, x, k->add), k->mod, k->inv);
    /* HE_ROBE_WIDE: Z / D consecutive rows share a block */
    const uint64_t blk = he_fastdiv(x, k->rows, k->rows_inv);
    const uint64_t h = he_fastmod(he_muladd(k->mul, blk, k->add), k->mod, k->inv);
    const uint64_t slot = h + (x - blk * k->rows) * k->dim;
    return slot >= k->size ? slot - k->size : slot;
}

/* A signed row's sign-hash base, (A'e + B'x + D0') mod P (he_row.sbase). */
HE_HD uint64_t he_sign_base(const he_scheme* s, he_tterm tt, int64_t token)
{
    return he_hash_base_t(s->coef + HE_SA, tt.sa, (uint64_t)token);
}

HE_HD he_row he_row_begin_t(const he_scheme* s, int64_t table, he_tterm tt, int64_t token)
{
    he_row r;
    uint64_t x = (uint64_t)token;
    r.sbase = 0;
    switch (s->kind) {
    case HE_FULL:
        r.base = (uint64_t)(s->table_base[table] + token) * (uint64_t)s->dim;
        break;
    case HE_ROBE_WIDE: {
        const he_one_run_k k = he_one_run_of(s, table, tt);
        r.base = he_one_run_start(&k, x);
        break;
    }
    case HE_ROBE:
        r.base = he_hash_base_t(s->coef, tt.a, x);
        break;
    case HE_ROBE_REF: {
        /* key(x, c) = (R2*x + R1*c + R0) mod p with x the global token id */
        uint64_t xg = (uint64_t)(token + (s->num_tables ? s->table_base[table] : 0));
        r.base = he_fastmod(xg, s->ref_p, s->ref_p_inv) * s->coef[2] + s->coef[0];
        break;
    }
    case HE_LSH_TABLE:
    case HE_LMA:             /* unsigned schemes */
        return he_lsh_row(s, table, x, he_lsh_probe(s->lsh_salt, table, x));
    default: /* HE_HNET_REF: r*K1 + K3, uint64 arithmetic as in the reference */
        r.base = x * s->coef[0] + s->coef[2];
        break;
    }
    if (s->is_signed)
        r.sbase = he_sign_base(s, tt, token);
    return r;
}

HE_HD he_row he_row_begin(const he_scheme* s, int64_t table, int64_t token)
{
    return he_row_begin_t(s, table, he_table_term(s, table), token);
}

/* First slot of run k (elements k*L .. k*L+L-1) of a row. */
HE_HD uint64_t he_run_start(const he_scheme* s, const he_row* r, int64_t k)
{
    switch (s->kind) {
    case HE_ROBE:
        return he_fastmod(he_addmod(r->base, s->run_coef[k]), s->mod, s->mod_inv);
    case HE_ROBE_REF: {
        uint64_t key = he_fastmod(r->base + s->coef[1] * (uint64_t)k, s->ref_p, s->ref_p_inv);
        return he_fastmod(key, s->mod, s->mod_inv);
    }
    case HE_HNET_REF: {
        uint64_t v = r->base + (uint64_t)k * s->coef[1];
        return he_fastmod(he_fastmod(v, s->ref_p, s->ref_p_inv), s->mod, s->mod_inv);
    }
    case HE_LSH_TABLE:
        if (r->sbase)
            return s->lsh_data[r->base * (uint64_t)s->lsh_width + (uint64_t)k];
        return he_lsh_slot(s, 0, r->base, k);
    case HE_LMA:
        return he_lsh_slot(s, r->sbase ? s->lsh_data + r->base * (uint64_t)s->lsh_width : 0,
                           r->base, k);
    default: /* HE_FULL, HE_ROBE_WIDE: one run of D */
        return r->base;
    }
}

/*
 * Run k's start of a ROBE-Z row, he_fastmod(he_addmod(base, c), m), from
 * residues instead of a division: bm = base mod m (once a row), cm = c mod m
 * and pm = P mod m (once a scheme), c = run_coef[k]. base + c < 2P wraps past
 * P iff (base + c + 1) >> 61 (P = 2^61 - 1), and then loses P, so the start
 * is bm + cm - w pm mod m, a value in (-m, 2m): one correction either way.
 */
HE_HD uint64_t he_robe_run_start(uint64_t base, uint64_t bm, uint64_t c, uint64_t cm,
                                  uint64_t pm, uint64_t m)
{
    const uint64_t w = (base + c + 1) >> 61;
    const int64_t v = (int64_t)(bm + cm) - (int64_t)((0 - w) & pm);
    return (uint64_t)(v < 0 ? v + (int64_t)m : v >= (int64_t)m ? v - (int64_t)m : v);
}

#if !defined(__CUDACC__) && defined(__x86_64__) && defined(__GNUC__)
#define HE_X86_VECTOR 1
#include <immintrin.h>
/* What the CPU can run, probed once (the default build targets baseline
 * x86-64): bit 0 AVX + F16C (half.h's conversions), bit 1 AVX2 + F16C as
 * well (the eight-slot applies, the run starts below). */
static inline int he_x86(void)
{
    static int has = -1;        /* a benign race: every thread stores the same */
    if (has < 0)
        has = (__builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c")) |
              (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) << 1;
    return has;
}

/* Four lanes of he_fastmod(v, m, inv) (AVX2), given mh = m >> 32 and
 * ih = inv >> 32: q, the high half of v * inv, built from four 32 x 32-bit
 * products, then r = v - q m and one conditional subtraction: the same
 * integer arithmetic, so the same values. r < 2m < 2^63 (m < 2^62), so
 * the signed compare is exact. he_fastdivmod_v also gives the lanes of
 * he_fastdiv(v, m, inv) in *quot (when not NULL). */
__attribute__((target("avx2"), always_inline)) static inline __m256i he_fastdivmod_v(
    __m256i v, __m256i vm, __m256i mh, __m256i vi, __m256i ih, __m256i* quot)
{
    const __m256i lo32 = _mm256_set1_epi64x(0xffffffffLL);
    const __m256i vh = _mm256_srli_epi64(v, 32);
    const __m256i ll = _mm256_mul_epu32(v, vi), lh = _mm256_mul_epu32(v, ih);
    const __m256i hl = _mm256_mul_epu32(vh, vi), hh = _mm256_mul_epu32(vh, ih);
    const __m256i mid = _mm256_add_epi64(
        _mm256_add_epi64(_mm256_srli_epi64(ll, 32), _mm256_and_si256(lh, lo32)),
        _mm256_and_si256(hl, lo32));
    const __m256i q = _mm256_add_epi64(
        _mm256_add_epi64(hh, _mm256_srli_epi64(lh, 32)),
        _mm256_add_epi64(_mm256_srli_epi64(hl, 32), _mm256_srli_epi64(mid, 32)));
    const __m256i qm = _mm256_add_epi64(
        _mm256_mul_epu32(q, vm),
        _mm256_slli_epi64(_mm256_add_epi64(_mm256_mul_epu32(q, mh),
                                           _mm256_mul_epu32(_mm256_srli_epi64(q, 32), vm)),
                          32));
    const __m256i r = _mm256_sub_epi64(v, qm);
    const __m256i ge = _mm256_cmpgt_epi64(vm, r);       /* r < m: no correction */
    if (quot)       /* he_fastdiv's quotient: q, plus one where r >= m */
        *quot = _mm256_sub_epi64(q, _mm256_andnot_si256(ge, _mm256_set1_epi64x(-1)));
    return _mm256_sub_epi64(r, _mm256_andnot_si256(ge, vm));
}

__attribute__((target("avx2"), always_inline)) static inline __m256i he_fastmod_v(
    __m256i v, __m256i vm, __m256i mh, __m256i vi, __m256i ih)
{
    return he_fastdivmod_v(v, vm, mh, vi, ih, 0);
}

/* out[k] = he_robe_run_start(base, bm, rc[k], rm[k], pm, m) for k < n - n % 4,
 * four runs a step (AVX2); returns that count. Every sum stays below 2^63
 * (base, rc < P; bm, rm, pm < m < 2^62), so the signed compares are exact. */
__attribute__((target("avx2"))) static int64_t he_robe_starts_avx2(uint64_t base, uint64_t bm,
                                                                  const uint64_t* rc,
                                                                  const uint64_t* rm,
                                                                  uint64_t pm, int64_t n,
                                                                  uint64_t m, uint64_t* out)
{
    const __m256i b1 = _mm256_set1_epi64x((long long)(base + 1));
    const __m256i vbm = _mm256_set1_epi64x((long long)bm);
    const __m256i vpm = _mm256_set1_epi64x((long long)pm);
    const __m256i vm = _mm256_set1_epi64x((long long)m);
    const __m256i vm1 = _mm256_set1_epi64x((long long)(m - 1));
    const __m256i zero = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 4 <= n; k += 4) {
        const __m256i w = _mm256_srli_epi64(
            _mm256_add_epi64(b1, _mm256_loadu_si256((const __m256i*)(rc + k))), 61);
        __m256i v = _mm256_sub_epi64(
            _mm256_add_epi64(vbm, _mm256_loadu_si256((const __m256i*)(rm + k))),
            _mm256_and_si256(_mm256_sub_epi64(zero, w), vpm));
        v = _mm256_add_epi64(v, _mm256_and_si256(_mm256_cmpgt_epi64(zero, v), vm));
        v = _mm256_sub_epi64(v, _mm256_and_si256(_mm256_cmpgt_epi64(v, vm1), vm));
        _mm256_storeu_si256((__m256i*)(out + k), v);
    }
    return k;
}

/*
 * Four lanes of he_muladd(a, u, b) (AVX2; ah = a >> 32): its residue by
 * another split of the product a u (a = ah 2^32 + al, u = uh 2^32 + ul;
 * u folded once, as there): with 2^61 == 1 and 2^64 == 8 mod P, a u == 8
 * hh + (mid >> 29) + ((mid mod 2^29) << 32) + (ll mod 2^61) + (ll >> 61),
 * mid = lh + hl < 2^63, hh < 2^59, and b (< 2^62) plus all of it stays
 * below 2^64, so one fold gives he_muladd's value.
 */
__attribute__((target("avx2"), always_inline)) static inline __m256i he_muladd_v(
    __m256i u, __m256i va, __m256i ah, __m256i vb)
{
    const __m256i P = _mm256_set1_epi64x((long long)HE_P);
    const __m256i Pm1 = _mm256_set1_epi64x((long long)(HE_P - 1));
    const __m256i m29 = _mm256_set1_epi64x((1LL << 29) - 1);
    u = _mm256_add_epi64(_mm256_and_si256(u, P), _mm256_srli_epi64(u, 61));
    const __m256i uh = _mm256_srli_epi64(u, 32);
    const __m256i ll = _mm256_mul_epu32(u, va), hh = _mm256_mul_epu32(uh, ah);
    const __m256i mid = _mm256_add_epi64(_mm256_mul_epu32(u, ah), _mm256_mul_epu32(uh, va));
    __m256i t = _mm256_add_epi64(
        _mm256_add_epi64(_mm256_add_epi64(vb, _mm256_slli_epi64(hh, 3)),
                         _mm256_add_epi64(_mm256_srli_epi64(mid, 29),
                                          _mm256_slli_epi64(_mm256_and_si256(mid, m29), 32))),
        _mm256_add_epi64(_mm256_and_si256(ll, P), _mm256_srli_epi64(ll, 61)));
    t = _mm256_add_epi64(_mm256_and_si256(t, P), _mm256_srli_epi64(t, 61));
    return _mm256_sub_epi64(t, _mm256_and_si256(_mm256_cmpgt_epi64(t, Pm1), P));
}

/* Four tokens x[i..i+3] as 64-bit lanes: int64 (wide) or sign-extended int32. */
__attribute__((target("avx2"), always_inline)) static inline __m256i he_tokens_v(
    const void* x, int wide, int64_t i)
{
    return wide ? _mm256_loadu_si256((const __m256i*)((const int64_t*)x + i))
                : _mm256_cvtepi32_epi64(_mm_loadu_si128((const __m128i*)((const int32_t*)x + i)));
}

/*
 * out[i] = he_one_run_start(k, x[i]) for i < n - n % 4, ROBE-Z's rows
 * (k->kind HE_ROBE, or HE_ROBE_WIDE: Z > D) four at a time (AVX2);
 * returns that count. x holds int64 tokens (wide) or int32 ones, taken as
 * he_one_run_start takes them (sign-extended); he_muladd_v hashes them.
 */
__attribute__((target("avx2"), always_inline)) static inline int64_t he_robe_one_starts_of(
    const he_one_run_k* k, const void* x, int wide, int64_t n, uint64_t* out, int in_blocks)
{
    const __m256i va = _mm256_set1_epi64x((long long)k->mul), ah = _mm256_srli_epi64(va, 32);
    const __m256i vb = _mm256_set1_epi64x((long long)k->add);
    const __m256i vm = _mm256_set1_epi64x((long long)k->mod), mh = _mm256_srli_epi64(vm, 32);
    const __m256i vi = _mm256_set1_epi64x((long long)k->inv), ih = _mm256_srli_epi64(vi, 32);
    /* in_blocks (HE_ROBE_WIDE, a constant where inlined): the block of x
       (x div rows) is hashed, x mod rows picks the row inside it */
    const __m256i vr = _mm256_set1_epi64x((long long)k->rows), rh = _mm256_srli_epi64(vr, 32);
    const __m256i vri = _mm256_set1_epi64x((long long)k->rows_inv);
    const __m256i rih = _mm256_srli_epi64(vri, 32);
    const __m256i vd = _mm256_set1_epi64x((long long)k->dim);
    const __m256i vs = _mm256_set1_epi64x((long long)k->size);
    const __m256i vs1 = _mm256_set1_epi64x((long long)(k->size - 1));
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        __m256i xv = he_tokens_v(x, wide, i);
        __m256i within = _mm256_setzero_si256();
        if (in_blocks) {
            __m256i blk;
            within = _mm256_mul_epu32(he_fastdivmod_v(xv, vr, rh, vri, rih, &blk), vd);
            xv = blk;
        }
        __m256i t = he_fastmod_v(he_muladd_v(xv, va, ah, vb), vm, mh, vi, ih);
        if (in_blocks) {    /* slot = h + (x mod rows) dim, less size past the end */
            t = _mm256_add_epi64(t, within);
            t = _mm256_sub_epi64(t, _mm256_and_si256(_mm256_cmpgt_epi64(t, vs1), vs));
        }
        _mm256_storeu_si256((__m256i*)(out + i), t);
    }
    return i;
}

/* Full tables' (add + x) dim, four a step: 64 bits by 32 (dim) as two
 * 32 x 32 products, the high one shifted; the same 64-bit result. */
__attribute__((target("avx2"), always_inline)) static inline int64_t he_full_starts_of(
    const he_one_run_k* k, const void* x, int wide, int64_t n, uint64_t* out)
{
    const __m256i va = _mm256_set1_epi64x((long long)k->add);
    const __m256i vd = _mm256_set1_epi64x((long long)k->dim);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const __m256i t = _mm256_add_epi64(he_tokens_v(x, wide, i), va);
        const __m256i hi = _mm256_mul_epu32(_mm256_srli_epi64(t, 32), vd);
        _mm256_storeu_si256((__m256i*)(out + i),
                            _mm256_add_epi64(_mm256_mul_epu32(t, vd), _mm256_slli_epi64(hi, 32)));
    }
    return i;
}

__attribute__((target("avx2"))) static int64_t he_one_starts_avx2(const he_one_run_k* k,
                                                                      const void* x, int wide,
                                                                      int64_t n, uint64_t* out)
{
    if (k->kind == HE_FULL)
        return he_full_starts_of(k, x, wide, n, out);
    if (k->kind == HE_ROBE_WIDE)
        return he_robe_one_starts_of(k, x, wide, n, out, 1);
    return he_robe_one_starts_of(k, x, wide, n, out, 0);
}
#endif

/* out[k] = he_run_start(s, r, k) for every run k of a row: the scheme's
 * case chosen once, not per run (HashedNet rows have D runs of one float);
 * ROBE-Z's from residues (he_robe_run_start: one division a row, not one a
 * run), four at a time where the CPU has AVX2. */
HE_HD void he_run_starts(const he_scheme* s, const he_row* r, uint64_t* out)
{
    int64_t k = 0;
    if (s->kind == HE_ROBE) {
        const uint64_t base = r->base, m = s->mod, pm = s->p_mod;
        const uint64_t bm = he_fastmod(base, m, s->mod_inv);
        const uint64_t *rc = s->run_coef, *rm = s->run_coef + s->runs;
#if defined(HE_X86_VECTOR)
        if (s->runs >= 4 && (he_x86() & 2))
            k = he_robe_starts_avx2(base, bm, rc, rm, pm, s->runs, m, out);
#endif
        for (; k < s->runs; k++)
            out[k] = he_robe_run_start(base, bm, rc[k], rm[k], pm, m);
        return;
    }
    for (; k < s->runs; k++)
        out[k] = he_run_start(s, r, k);
}

/* out[i] = he_one_run_start(k, x[i]) for i < n (x: int64 tokens if wide,
 * else int32): full tables' and ROBE-Z's (Z >= D) four at a time where the
 * CPU has AVX2. */
HE_HD void he_one_run_starts(const he_one_run_k* k, const void* x, int wide, int64_t n,
                             uint64_t* out)
{
    int64_t i = 0;
#if defined(HE_X86_VECTOR)
    /* (a block's offsets x mod rows times dim = Z below 2^32: 32-bit products) */
    if ((k->kind == HE_ROBE || k->kind == HE_FULL ||
         (k->kind == HE_ROBE_WIDE && k->rows * k->dim < ((uint64_t)1 << 32)))
        && n >= 4 && (he_x86() & 2))
        i = he_one_starts_avx2(k, x, wide, n, out);
#endif
    for (; i < n; i++)
        out[i] = he_one_run_start(k, wide ? (uint64_t)((const int64_t*)x)[i]
                                          : (uint64_t)(int64_t)((const int32_t*)x)[i]);
}

#if !defined(__CUDACC__)
/*
 * Rows of several runs of one ROBE-Z table (HE_ROBE, Z < D; HashedNet is Z
 * = 1), their run starts a batch of rows at a time (CPU): he_runs_of(&k,
 * s, e, tt) once a table, then he_runs_starts(&k, x, wide, n, out) gives
 * out[i R + r] = he_run_start of run r of row x[i] (R = D / Z runs), the
 * values he_run_starts gives.
 *
 * Why: a row's starts are bm + rm[r] - w_r pm mod m (he_robe_run_start),
 * and w_r = [base + rc[r] >= P] = [rc[r] > P - 1 - base], so run r's
 * residue is rm[r] or, when w_r, rw[r] = (rm[r] - pm) mod m, and bm plus
 * it is below 2m: one subtraction. With m < 2^31 that is 32-bit
 * arithmetic, eight runs a step (AVX2), after four rows are hashed at once
 * (he_muladd_v). An eight-lane step holds 8 / R rows (R = 2, 4, 8) or an
 * eighth of one (R a multiple of 8); its two 64-bit compares of rc with
 * the rows' thresholds fill the even and the odd lanes (a blend), so rcd
 * keeps rc in that order: rcd[8j + i] = rc of lane 2i, rcd[8j + 4 + i] =
 * rc of lane 2i + 1.
 */
#define HE_RUNS_VEC 128     /* runs of a row the eight-lane step takes */

typedef struct he_runs_k {
    const he_scheme* s;
    uint64_t add;               /* the table's part of the row hash (he_hash_base_t) */
    int lanes;                  /* eight-lane steps: 1 rows of R | 8, 2 rows of 8 | R, 0 none */
    uint64_t rcd[HE_RUNS_VEC];
    uint32_t rm32[HE_RUNS_VEC], rw32[HE_RUNS_VEC];  /* a step's lanes (R | 8) or a row's */
    int32_t thr_idx[4][8], bm_idx[4][8];            /* R | 8: a step's rows among four */
} he_runs_k;

static inline void he_runs_of(he_runs_k* k, const he_scheme* s, he_tterm tt)
{
    const int64_t R = s->runs;
    const uint64_t *rc = s->run_coef, *rm = s->run_coef + R, pm = s->p_mod;
    k->s = s;
    k->add = tt.a + s->coef[HE_CD];      /* below 2^62, as he_muladd takes it */
    k->lanes = 0;
#if defined(HE_X86_VECTOR)
    if (!(he_x86() & 2) || s->mod >= ((uint64_t)1 << 31) || R < 2)
        return;
    const int64_t n = R <= 8 ? 8 : R;   /* lanes of one step, or of a row */
    if ((R <= 8 && 8 % R) || (R > 8 && (R % 8 || R > HE_RUNS_VEC)))
        return;
    /* lane p's run, p mod R: R | 8 is a power of two, and n = R otherwise
       (no division: this runs once a table in every chunk of a forward) */
    const int64_t rmask = R <= 8 ? R - 1 : -1;
    const int rshift = __builtin_ctzll((unsigned long long)R);    /* log2 R where R <= 8 */
    for (int64_t p = 0; p < n; p++) {
        const uint64_t r = rm[p & rmask];
        k->rm32[p] = (uint32_t)r;
        k->rw32[p] = (uint32_t)(r >= pm ? r - pm : r + s->mod - pm);
    }
    for (int64_t j = 0; j < n / 8; j++)
        for (int i = 0; i < 4; i++) {
            k->rcd[8 * j + i] = rc[(8 * j + 2 * i) & rmask];
            k->rcd[8 * j + 4 + i] = rc[(8 * j + 2 * i + 1) & rmask];
        }
    if (R <= 8)     /* step j of four rows: lanes 8j .. 8j + 7 of their 4R */
        for (int j = 0; j < R / 2; j++)
            for (int i = 0; i < 8; i++) {
                const int ra = (8 * j + 2 * (i / 2)) >> rshift, rb = (8 * j + i) >> rshift;
                k->thr_idx[j][i] = 2 * ra + (i & 1);    /* 64-bit lane i / 2: row ra */
                k->bm_idx[j][i] = 2 * rb;               /* low half of row rb's bm */
            }
    k->lanes = R <= 8 ? 1 : 2;
#endif
}

#if defined(HE_X86_VECTOR)
/* Eight run starts from 32-bit lanes: lane p's residue rm or (where the
 * 64-bit compare of rc with the row's threshold P - 1 - base says the sum
 * wraps) rw, plus bm, less m once; stored widened to 64 bits. */
__attribute__((target("avx2"), always_inline)) static inline void he_runs_step8(
    const he_runs_k* k, int64_t j, __m256i thr, __m256i bm32, __m256i m32, uint64_t* out)
{
    const __m256i wa = _mm256_cmpgt_epi64(_mm256_loadu_si256((const __m256i*)(k->rcd + 8 * j)),
                                          thr);
    const __m256i wb = _mm256_cmpgt_epi64(
        _mm256_loadu_si256((const __m256i*)(k->rcd + 8 * j + 4)), thr);
    const __m256i w = _mm256_blend_epi32(wa, wb, 0xAA);
    __m256i v = _mm256_blendv_epi8(_mm256_loadu_si256((const __m256i*)(k->rm32 + 8 * j)),
                                   _mm256_loadu_si256((const __m256i*)(k->rw32 + 8 * j)), w);
    v = _mm256_add_epi32(v, bm32);
    v = _mm256_min_epu32(v, _mm256_sub_epi32(v, m32));     /* < 2m <= 2^32 */
    _mm256_storeu_si256((__m256i*)out, _mm256_cvtepu32_epi64(_mm256_castsi256_si128(v)));
    _mm256_storeu_si256((__m256i*)(out + 4), _mm256_cvtepu32_epi64(_mm256_extracti128_si256(v, 1)));
}

/* he_runs_starts' rows i < n - n % 4 (k->lanes), four at a time; returns that count. */
__attribute__((target("avx2"))) static int64_t he_runs_starts_avx2(const he_runs_k* k,
                                                                  const void* x, int wide,
                                                                  int64_t n, uint64_t* out)
{
    const he_scheme* s = k->s;
    const __m256i va = _mm256_set1_epi64x((long long)s->coef[HE_CB]), ah = _mm256_srli_epi64(va, 32);
    const __m256i vb = _mm256_set1_epi64x((long long)k->add);
    const __m256i vm = _mm256_set1_epi64x((long long)s->mod), mh = _mm256_srli_epi64(vm, 32);
    const __m256i vi = _mm256_set1_epi64x((long long)s->mod_inv), ih = _mm256_srli_epi64(vi, 32);
    const __m256i pm1 = _mm256_set1_epi64x((long long)(HE_P - 1));
    const __m256i m32 = _mm256_set1_epi32((int)s->mod);
    const int64_t R = s->runs;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const __m256i base = he_muladd_v(he_tokens_v(x, wide, i), va, ah, vb);
        const __m256i bm = he_fastmod_v(base, vm, mh, vi, ih);
        const __m256i thr = _mm256_sub_epi64(pm1, base);     /* w where rc > thr */
        uint64_t* o = out + i * R;
        if (k->lanes == 1) {
            for (int64_t j = 0; j < R / 2; j++)
                he_runs_step8(k, 0, _mm256_permutevar8x32_epi32(
                                        thr, _mm256_loadu_si256((const __m256i*)k->thr_idx[j])),
                              _mm256_permutevar8x32_epi32(
                                  bm, _mm256_loadu_si256((const __m256i*)k->bm_idx[j])),
                              m32, o + 8 * j);
            continue;
        }
        uint64_t th[4], b[4];
        _mm256_storeu_si256((__m256i*)th, thr);
        _mm256_storeu_si256((__m256i*)b, bm);
        for (int r = 0; r < 4; r++) {
            const __m256i t1 = _mm256_set1_epi64x((long long)th[r]);
            const __m256i b1 = _mm256_set1_epi32((int)b[r]);
            for (int64_t j = 0; j < R / 8; j++)
                he_runs_step8(k, j, t1, b1, m32, o + r * R + 8 * j);
        }
    }
    return i;
}
#endif

static inline void he_runs_starts(const he_runs_k* k, const void* x, int wide, int64_t n,
                                  uint64_t* out)
{
    int64_t i = 0;
    he_row row;
#if defined(HE_X86_VECTOR)
    if (k->lanes)
        i = he_runs_starts_avx2(k, x, wide, n, out);
#endif
    row.sbase = 0;      /* the rest row by row: he_row_begin_t's base, he_run_starts */
    for (; i < n; i++) {
        row.base = he_muladd(k->s->coef[HE_CB], wide ? (uint64_t)((const int64_t*)x)[i]
                                          : (uint64_t)(int64_t)((const int32_t*)x)[i], k->add);
        he_run_starts(k->s, &row, out + i * k->s->runs);
    }
}

/*
 * Run starts of the rows of one table, a batch at a time, for any scheme:
 * rows of one run (he_one_run_starts) and ROBE-Z's rows of several runs
 * (he_runs_starts) four a step with AVX2, any other row by row
 * (he_row_begin_t, he_run_starts; a map's probes not prefetched). Set up
 * once a table, he_rows_of(&k, s, table, tt); then
 * he_rows_starts(&k, x, wide, n, out): out[g R + r] = start of run r of row
 * x[g], g < n (x int64 where wide, else int32, sign-extended). The kernels'
 * one dispatch; one copy (not inlined), called once a batch of rows.
 */
enum { HE_ROWS_ONE, HE_ROWS_ROBE, HE_ROWS_EACH };

typedef struct he_rows_k {
    const he_scheme* s;
    int how;                    /* HE_ROWS_ONE, HE_ROWS_ROBE or HE_ROWS_EACH */
    int64_t table;
    he_tterm tt;
    he_one_run_k one;
    he_runs_k runs;
} he_rows_k;

static inline void he_rows_of(he_rows_k* k, const he_scheme* s, int64_t table, he_tterm tt)
{
    k->s = s;
    k->table = table;
    k->tt = tt;
    if (he_one_run(s)) {
        k->how = HE_ROWS_ONE;
        k->one = he_one_run_of(s, table, tt);
    } else if (s->kind == HE_ROBE) {
        k->how = HE_ROWS_ROBE;
        he_runs_of(&k->runs, s, tt);
    } else {
        k->how = HE_ROWS_EACH;
    }
}

__attribute__((noinline, unused)) static void he_rows_starts(const he_rows_k* k, const void* x,
                                                            int wide, int64_t n, uint64_t* out)
{
    if (k->how == HE_ROWS_ONE) {
        he_one_run_starts(&k->one, x, wide, n, out);
    } else if (k->how == HE_ROWS_ROBE) {
        he_runs_starts(&k->runs, x, wide, n, out);
    } else {
        for (int64_t g = 0; g < n; g++) {
            const he_row row = he_row_begin_t(k->s, k->table, k->tt,
                                              wide ? ((const int64_t*)x)[g]
                                                   : (int64_t)((const int32_t*)x)[g]);
            he_run_starts(k->s, &row, out + g * k->s->runs);
        }
    }
}
#endif

/*
 * Sign of a sign-hash key k = (A'e + B'x + C'i + D0') mod P:
 * g = 1 - 2 * (q(k) mod 2) with q a random cubic over GF(P). The linear key
 * alone is only pairwise independent, and the parity of linear keys of
 * (x, i) grids is visibly correlated in fours (k1 + k4 = k2 + k3 forces
 * E[g1 g2 g3 g4] ~ 1/3); the variance of a signed sketch (ROBE Theorem 1)
 * needs 4-wise independent signs, which a cubic of distinct keys gives.
 */
HE_HD int he_sign_of_key(const uint64_t* q, uint64_t k)
{
    uint64_t v = he_addmod(he_mulmod(q[2], k), q[1]);   /* Horner: ((Q3 k + Q2) k + Q1) k + Q0 */
    v = he_addmod(he_mulmod(v, k), q[0]);
    v = he_addmod(he_mulmod(v, k), q[3]);
    return 1 - 2 * (int)(v & 1);
}

/* g(e, x, i) in {+1, -1} (see he_sign_of_key), or 1 for an unsigned scheme. */
HE_HD int he_sign(const he_scheme* s, const he_row* r, int64_t i)
{
    if (!s->is_signed)
        return 1;
    return he_sign_of_key(s->coef + HE_Q, he_addmod(r->sbase, s->sign_coef[i]));
}

#if !defined(__CUDACC__)
/*
 * out[j] = he_sign(s, r, i0 + j) for j < n, as floats: a run's signs at
 * once (the CPU kernels of signed schemes, where the signs are most of the
 * work). With AVX2 four elements a step, and the cubic expanded around each
 * element's c_i (hashing.sign_terms, stored after c in sign_coef): with
 * s = r->sbase, q(s + c_i) = Q3 s^3 + s^2 B2_i + s B1_i + B0_i, two
 * multiply-adds mod P an element (he_muladd_v, exact and fully reduced
 * like he_mulmod and he_addmod) where Horner takes three, so the same
 * residues and the same parities. s^2 and Q3 s^3 are made once a call.
 */
#if defined(HE_X86_VECTOR)
__attribute__((target("avx2"))) static int64_t he_signs_avx2(const he_scheme* s,
                                                             const he_row* r, int64_t i0,
                                                             int64_t n, float* out)
{
    const uint64_t sb = r->sbase, s2 = he_mulmod(sb, sb);
    const __m256i vs = _mm256_set1_epi64x((long long)sb);
    const __m256i vs2 = _mm256_set1_epi64x((long long)s2);
    const __m256i k3 = _mm256_set1_epi64x((long long)he_mulmod(s->coef[HE_Q + 2],
                                                               he_mulmod(s2, sb)));
    const uint64_t* b0 = s->sign_coef + s->dim + i0;
    const uint64_t* b1 = b0 + s->dim;
    const uint64_t* b2 = b1 + s->dim;
    const __m256i one = _mm256_set1_epi64x(1);
    const __m256i low = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);   /* 64-bit lanes' low halves */
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const __m256i c2 = _mm256_loadu_si256((const __m256i*)(b2 + j));
        const __m256i c1 = _mm256_loadu_si256((const __m256i*)(b1 + j));
        /* B0 + Q3 s^3 < 2P, below the 2^62 he_muladd_v takes */
        __m256i v = he_muladd_v(vs2, c2, _mm256_srli_epi64(c2, 32),
                                _mm256_add_epi64(k3, _mm256_loadu_si256((const __m256i*)(b0 + j))));
        v = he_muladd_v(vs, c1, _mm256_srli_epi64(c1, 32), v);
        const __m256i g = _mm256_sub_epi64(one, _mm256_slli_epi64(_mm256_and_si256(v, one), 1));
        _mm_storeu_ps(out + j, _mm_cvtepi32_ps(_mm256_castsi256_si128(
                                   _mm256_permutevar8x32_epi32(g, low))));
    }
    return j;
}
#endif

/* HE_HD: inlined (a call of its own costs about 36 instructions a row) */
HE_HD void he_signs(const he_scheme* s, const he_row* r, int64_t i0, int64_t n, float* out)
{
    int64_t j = 0;
#if defined(HE_X86_VECTOR)
    if (s->is_signed && n >= 4 && (he_x86() & 2))
        j = he_signs_avx2(s, r, i0, n, out);
#endif
    for (; j < n; j++)
        out[j] = (float)he_sign(s, r, i0 + j);
}

/*
 * Whole rows' signs, several rows at once: out[g * D + i] = he_sign(s, row
 * with sign base sb[g], i) for g < n. With AVX2 and D <= 64, four rows a
 * step, one a lane: f(i) = q(sb + c_i) is a cubic in i over GF(P) (c_i =
 * C' i), so each lane starts at f(0) and its first two forward
 * differences (five multiply-adds a row, Horner in sb, from the table
 * hashing.sign_terms stores after the 4 D terms; the third difference is
 * one constant) and steps to f(i + 1) by three additions mod P where
 * he_signs takes two multiply-adds an element: the same residues, so the
 * same signs. The parities are gathered as a D-bit mask a lane (element i
 * at bit i), then widened to floats eight a step. Other rows (D > 64, no
 * AVX2, the last n mod 4) take he_signs.
 */
#if defined(HE_X86_VECTOR)
__attribute__((target("avx2"), always_inline)) static inline __m256i he_addmod_v(__m256i a,
                                                                                 __m256i b)
{
    const __m256i P = _mm256_set1_epi64x((long long)HE_P);
    const __m256i t = _mm256_add_epi64(a, b);       /* < 2P < 2^63: signed compare exact */
    return _mm256_sub_epi64(t, _mm256_and_si256(
                                   _mm256_cmpgt_epi64(t, _mm256_set1_epi64x((long long)(HE_P - 1))),
                                   P));
}

__attribute__((target("avx2"))) static int64_t he_signs_of_avx2(const he_scheme* s,
                                                               const uint64_t* sb, int64_t n,
                                                               float* out)
{
    const int64_t D = s->dim;
    const uint64_t* t = s->sign_coef + 4 * D;
#define HE_BC(v) _mm256_set1_epi64x((long long)(v))
#define HE_MA(u, a, b) he_muladd_v(u, HE_BC(a), HE_BC((a) >> 32), b)
    const __m256i one = HE_BC(1), d3 = HE_BC(t[8]);
    const __m256i plus = _mm256_set1_epi32(0x3f800000), neg = _mm256_set1_epi32(INT32_MIN);
    /* element i's bit in its 32-bit half of the mask */
    static const uint32_t bit[32] = {
        1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,
        1u << 8,  1u << 9,  1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15,
        1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21, 1u << 22, 1u << 23,
        1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31};
    int64_t g = 0;
    for (; g + 4 <= n; g += 4) {
        const __m256i sv = _mm256_loadu_si256((const __m256i*)(sb + g));
        /* Horner in s: f(0) = ((Q3 s + B2) s + B1) s + B0, and so on */
        __m256i f = HE_MA(sv, s->coef[HE_Q + 2], HE_BC(t[2]));
        f = he_muladd_v(sv, f, _mm256_srli_epi64(f, 32), HE_BC(t[1]));
        f = he_muladd_v(sv, f, _mm256_srli_epi64(f, 32), HE_BC(t[0]));
        __m256i d1 = HE_MA(sv, t[5], HE_BC(t[4]));                     /* Delta f(0) */
        d1 = he_muladd_v(sv, d1, _mm256_srli_epi64(d1, 32), HE_BC(t[3]));
        __m256i d2 = HE_MA(sv, t[7], HE_BC(t[6]));                     /* Delta^2 f(0) */
        /* parity of f(i) to bit i: shifted in from the top, D steps */
        __m256i bits = _mm256_setzero_si256();
        for (int64_t i = 0; i < D; i++) {
            bits = _mm256_or_si256(_mm256_srli_epi64(bits, 1),
                                   _mm256_slli_epi64(_mm256_and_si256(f, one), 63));
            f = he_addmod_v(f, d1);
            d1 = he_addmod_v(d1, d2);
            d2 = he_addmod_v(d2, d3);
        }
        uint64_t mask[4];
        _mm256_storeu_si256((__m256i*)mask, _mm256_srli_epi64(bits, (int)(64 - D)));
        for (int r = 0; r < 4; r++) {
            float* o = out + (g + r) * D;
            const __m256i lo = _mm256_set1_epi32((int)(uint32_t)mask[r]);
            const __m256i hi = _mm256_set1_epi32((int)(uint32_t)(mask[r] >> 32));
            int64_t i = 0;
            for (; i + 8 <= D; i += 8) {
                const __m256i sel = _mm256_loadu_si256((const __m256i*)(bit + i % 32));
                const __m256i b = _mm256_and_si256(i < 32 ? lo : hi, sel);
                _mm256_storeu_si256((__m256i*)(o + i),
                                    _mm256_or_si256(plus, _mm256_and_si256(
                                                              _mm256_cmpeq_epi32(b, sel), neg)));
            }
            for (; i < D; i++)
                o[i] = (mask[r] >> i) & 1 ? -1.0f : 1.0f;
        }
    }
#undef HE_MA
#undef HE_BC
    return g;
}
#endif

static inline void he_signs_of(const he_scheme* s, const uint64_t* sb, int64_t n, float* out)
{
    int64_t g = 0;
#if defined(HE_X86_VECTOR)
    if (s->is_signed && s->dim <= 64 && (he_x86() & 2))
        g = he_signs_of_avx2(s, sb, n, out);
#endif
    for (; g < n; g++) {
        he_row r;
        r.base = 0;
        r.sbase = sb[g];
        he_signs(s, &r, 0, s->dim, out + g * s->dim);
    }
}

/* out[g * D + i] = sign of element i of row x[g] (int64 tokens if wide,
 * else int32) of the table whose he_table_term is tt, g < n: sign bases
 * HE_SIGN_ROWS at a time (four a step with AVX2), then he_signs_of. */
#define HE_SIGN_ROWS 32     /* sign bases kept at once */
#if defined(HE_X86_VECTOR)
/* sb[g] = he_sign_base(s, tt, x[g]) for g < n - n % 4, four a step (AVX2:
 * he_muladd_v is he_muladd's four lanes); returns that count. */
__attribute__((target("avx2"))) static int64_t he_sign_bases_avx2(const he_scheme* s,
                                                                 he_tterm tt, const void* x,
                                                                 int wide, int64_t n,
                                                                 uint64_t* sb)
{
    const __m256i va = _mm256_set1_epi64x((long long)s->coef[HE_SB]);
    const __m256i ah = _mm256_srli_epi64(va, 32);
    const __m256i vb = _mm256_set1_epi64x((long long)(tt.sa + s->coef[HE_SD]));
    int64_t g = 0;
    for (; g + 4 <= n; g += 4)
        _mm256_storeu_si256((__m256i*)(sb + g), he_muladd_v(he_tokens_v(x, wide, g), va, ah, vb));
    return g;
}
#endif

static inline void he_sign_rows(const he_scheme* s, he_tterm tt, const void* x, int wide,
                                int64_t n, float* out)
{
    uint64_t sb[HE_SIGN_ROWS];
    for (int64_t a = 0; a < n; a += HE_SIGN_ROWS) {
        const int64_t c = n - a < HE_SIGN_ROWS ? n - a : HE_SIGN_ROWS;
        int64_t g = 0;
#if defined(HE_X86_VECTOR)
        if (he_x86() & 2)
            g = he_sign_bases_avx2(s, tt, wide ? (const void*)((const int64_t*)x + a)
                                               : (const void*)((const int32_t*)x + a),
                                   wide, c, sb);
#endif
        for (; g < c; g++)
            sb[g] = he_sign_base(s, tt, wide ? ((const int64_t*)x)[a + g]
                                             : (int64_t)((const int32_t*)x)[a + g]);
        he_signs_of(s, sb, c, out + a * s->dim);
    }
}
#endif

/*
 * Memory a lookup reads before its run starts are known, for the kernels to
 * prefetch a few rows ahead (schemes that read a map, he_reads_map): the map
 * entry of (table, token), he_probe_hint, and the stored data row a found
 * token's run starts read, he_row_data. NULL for the schemes whose slots are
 * pure arithmetic. The map probe is hashed once (its field part once per
 * table) and kept between the prefetch and the row's start:
 * probe = he_row_probe(s, he_table_probe(s, t), x) (0 for the schemes that
 * read no map); he_row_begin_probed(s, t, x, probe) == he_row_begin(s, t, x).
 */
HE_HD uint64_t he_table_probe(const he_scheme* s, int64_t table)
{
    return he_reads_map(s) ? he_lsh_field_key(s->lsh_salt, table) : 0;
}

HE_HD uint64_t he_row_probe(const he_scheme* s, uint64_t table_probe, int64_t token)
{
    return he_reads_map(s) ? he_mix64((uint64_t)token + table_probe) : 0;
}

HE_HD const void* he_probe_hint(const he_scheme* s, uint64_t probe)
{
    return he_reads_map(s) ? (const void*)(s->lsh_keys + (probe & s->lsh_mask)) : 0;
}

HE_HD he_row he_row_begin_probed(const he_scheme* s, int64_t table, int64_t token,
                                 uint64_t probe)
{
    if (he_reads_map(s))
        return he_lsh_row(s, table, (uint64_t)token, probe);
    return he_row_begin(s, table, token);
}

HE_HD const void* he_row_data(const he_scheme* s, const he_row* r)
{
    if (he_reads_map(s) && r->sbase)
        return s->lsh_data + r->base * (uint64_t)s->lsh_width;
    return 0;
}

/* start + j, circular in an array of m floats (start < m, j < m). */
HE_HD uint64_t he_wrap(uint64_t start, int64_t j, uint64_t m)
{
    uint64_t slot = start + (uint64_t)j;
    return slot >= m ? slot - m : slot;
}

/* Slot of element j of a run that starts at `start` (circular in m). */
HE_HD uint64_t he_run_slot(const he_scheme* s, uint64_t start, int64_t j)
{
    return he_wrap(start, j, s->size);
}

#endif /* HASHEMB_SLOTS_H */
