/* Small matrix products for the tensor-train (TT-Rec) chain, on row pointers.
 *
 * A TT lookup multiplies a per-lookup matrix by a slice of a core shared by
 * every lookup with the same digit. Grouping the lookups by digit turns the
 * many tiny products into a few real GEMMs whose rows live at scattered
 * addresses; these kernels take those rows as arrays of pointers, so nothing
 * is gathered into a contiguous buffer first. Two shapes cover the chain
 * (forward and both backward products, any width):
 *
 *   nn:  C[r][j]      (=|+=) sum_s A[r][s] * B[s*ldb + j]   rows r < M, j < N, s < K
 *        (optionally given B^T too, which the narrow N = 4 kernel reads)
 *   tn:  C[i*ldc + j] (=|+=) sum_r A[r][i] * D[r][j]        i < M, j < N, rows r < K
 *
 * The register tiles are written with GCC/Clang vector extensions, so the
 * compiler emits SSE2 on the baseline and, through target_clones, an AVX2+FMA
 * copy picked at load time on CPUs that have it (no -march=native needed);
 * with GCC, a 16-lane AVX-512 copy takes the float products whose columns
 * are a multiple of 16 on CPUs that have x86-64-v4 (below). Other compilers
 * get plain loops.
 *
 * Numerics: each output is summed in index order of s (or r), one vector
 * lane per output column (the last columns too, in zero-padded vectors);
 * results are deterministic, independent of the thread count and the same
 * in the AVX2 and AVX-512 copies, but a float sum may differ in the last
 * bits from another summation order (BLAS, torch) and without FMA (SSE2).
 */
#ifndef HASHEMB_TT_GEMM_H
#define HASHEMB_TT_GEMM_H

#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"   /* vector arguments of inlined helpers */
#endif

#if defined(__GNUC__) || defined(__clang__)
#define HE_VEC 1
#else
#define HE_VEC 0
#endif

#if HE_VEC && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && \
    ((defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && __GNUC__ >= 12))
#define HE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HE_CLONES
#endif

#if HE_VEC
#define HE_INLINE static inline __attribute__((always_inline))
/* under-aligned and may_alias: loads and stores straight from float arrays */
typedef float he_v8f __attribute__((vector_size(32), aligned(4), may_alias));
typedef double he_v4d __attribute__((vector_size(32), aligned(8), may_alias));
typedef float he_v4f __attribute__((vector_size(16), aligned(4), may_alias));
typedef double he_v2d __attribute__((vector_size(16), aligned(8), may_alias));
#else
#define HE_INLINE static inline
#endif

#define HE_TOP HE_CLONES

#if HE_VEC && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && \
    !defined(__clang__) && __GNUC__ >= 12
/* float: 16 lanes, for CPUs with AVX-512 (two 512-bit FMA units on server
 * cores: twice the AVX2 copy's peak). Compiled for x86-64-v4 whatever the
 * build's flags, and entered from the 8-lane nn / tn below for products
 * whose columns are a multiple of 16 (HE_WIDER_COLS: with 8 columns left
 * over, the 8-lane copy's two-vector tiles were faster, 24 and 40 columns
 * measured) on a CPU that has it (he_tt_wider). Every output is one vector
 * lane summed in index order with FMA in both copies (their last columns
 * too: padded tiles, no scalar loop), so the results are the 8-lane copy's
 * bit for bit. GCC only: clang 14's target_clones resolver ran the SSE2
 * clone on Intel and AMD CPUs (no FMA: other bits than this copy's).
 * HASHEMB_TT_AVX512=0 turns it off (A/B runs). */
#define HE_WIDE 1
#define HE_WIDER_COLS(N) ((N) >= 16 && (N) % 16 == 0)
#define HE_TOP16 __attribute__((target("arch=x86-64-v4")))
typedef float he_v16f __attribute__((vector_size(64), aligned(4), may_alias));
HE_TOP16 static void he_tt_nn_f16(int64_t M, int64_t N, int64_t K, const float* const* A,
                                  const float* B, int64_t ldb, const float* Bt, float* const* C,
                                  int add);
HE_TOP16 static void he_tt_tn_f16(int64_t M, int64_t N, int64_t K, const float* const* A,
                                  const float* const* D, float* C, int64_t ldc, int add);

#include <stdlib.h>
#include <strings.h>

static int he_tt_wider_state = -1;

/* Whether the 16-lane copy runs here: the CPU and the OS have all of
 * x86-64-v4, what it is compiled for, and HASHEMB_TT_AVX512 is not "0"
 * (or "off", "false", "no"). Read once (relaxed atomics: threads that race
 * compute the same value). */
static int he_tt_wider(void)
{
    int v = __atomic_load_n(&he_tt_wider_state, __ATOMIC_RELAXED);
    if (v < 0) {
        const char* env = getenv("HASHEMB_TT_AVX512");
        const int off = env && (env[0] == '0' || !strcasecmp(env, "off") ||
                                !strcasecmp(env, "false") || !strcasecmp(env, "no"));
        v = !off && __builtin_cpu_supports("x86-64-v4");
        __atomic_store_n(&he_tt_wider_state, v, __ATOMIC_RELAXED);
    }
    return v;
}
#define HE_WIDER(name) he_tt_##name##_f16
#else
#define HE_WIDE 0
#endif

/* float: 8 lanes */
#define HE_T float
#define HE_V he_v8f
#define HE_H he_v4f
#define HE_W 8
#define HE_FN(name) he_tt_##name##_f
#include "_tt_gemm_impl.h"
#undef HE_T
#undef HE_V
#undef HE_H
#undef HE_W
#undef HE_FN

#undef HE_WIDER

#if HE_WIDE
#undef HE_INLINE
#define HE_INLINE static inline __attribute__((always_inline, target("arch=x86-64-v4")))
#undef HE_TOP
#define HE_TOP HE_TOP16
#define HE_T float
#define HE_V he_v16f
#define HE_H he_v8f
#define HE_W 16
#define HE_FN(name) he_tt_##name##_f16
#include "_tt_gemm_impl.h"
#undef HE_T
#undef HE_V
#undef HE_H
#undef HE_W
#undef HE_FN
#undef HE_INLINE
#define HE_INLINE static inline __attribute__((always_inline))
#undef HE_TOP
#define HE_TOP HE_CLONES
#endif

/* Float lanes the products run on here: 16 (AVX-512), 8 (AVX2 + FMA),
 * 4 (the baseline's SSE2) or 1 (plain loops), for show_config. A clang
 * build says 4: clang 14's target_clones resolver ran the SSE2 clone on
 * Intel and AMD CPUs alike. */
static int he_tt_gemm_lanes(void)
{
#if HE_WIDE
    if (he_tt_wider())
        return 16;
#endif
#if HE_VEC && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && \
    !defined(__clang__) && __GNUC__ >= 12
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 8 : 4;
#elif HE_VEC
    return 4;
#else
    return 1;
#endif
}

/* double: 4 lanes */
#define HE_T double
#define HE_V he_v4d
#define HE_H he_v2d
#define HE_W 4
#define HE_FN(name) he_tt_##name##_d
#include "_tt_gemm_impl.h"
#undef HE_T
#undef HE_V
#undef HE_H
#undef HE_W
#undef HE_FN

#endif
