/*
 * hashemb/_gpu/segment.cu -- passes over a whole array: the deterministic
 * backward's segment sums, a full table's per-row steps and Adagrad's sweep.
 *
 * Deterministic backward (bag and plain lookups): every contribution is
 * written as a (slot key, value) pair in the CPU kernels' entry order; a
 * stable sort by key keeps that order within each slot; seg_apply then gives
 * each slot to one thread, which adds its values one after another. Each slot
 * therefore sums exactly as the CPU kernel does (same values, same order, no
 * fused multiply-add: the sources compile with -fmad=false), so the result is
 * bitwise the CPU's and the same on every run.
 */
#ifndef HASHEMB_GPU_COMMON_H
#include "common.cuh"
#endif

/* Is sorted position k the first of a run of equal keys (not HE_NO_SLOT)? */
__device__ __forceinline__ bool he_run_head(const int64_t* __restrict__ keys, i64 k, i64 n)
{
    return k < n && keys[k] != HE_NO_SLOT && (k == 0 || keys[k - 1] != keys[k]);
}

/*
 * keys (sorted, n of them, HE_NO_SLOT last) and vals in the same order: the
 * thread at the first position of each run of equal keys sums the run in
 * order. HE_ACT_ADD: target[key] += v_1, += v_2, ... (gradient, or SGD with
 * the learning rate folded into the values); HE_ACT_ADAGRAD: g = v_1 + v_2 +
 * ... from 0, then Adagrad (he_apply) where g != 0 (target = the weight).
 */
template <typename R>
__global__ void seg_apply(const int64_t* __restrict__ keys, const R* __restrict__ vals, i64 n,
                          i64 act, R* __restrict__ target, R* __restrict__ state, R lr, R eps)
{
    const i64 k = he_tid();
    if (!he_run_head(keys, k, n))
        return;
    const int64_t key = keys[k];
    if (act == HE_ACT_ADD) {
        R acc = target[key];
        for (i64 e = k; e < n && keys[e] == key; e++)
            acc += vals[e];
        target[key] = acc;
    } else {
        R acc = 0;
        for (i64 e = k; e < n && keys[e] == key; e++)
            acc += vals[e];
        if (acc != (R)0)
            he_apply(target, state, (i64)key, acc, lr, eps, 1, 0);
    }
}

/*
 * target[keys[k]] += vals[k] (atomic) for every pair with a slot: max-mode
 * SGD, whose winners must all be found (bag_backward out_mode 1) before the
 * weight they are read from changes.
 */
template <typename R>
__global__ void pairs_add(const int64_t* __restrict__ keys, const R* __restrict__ vals, i64 n,
                          R* __restrict__ target)
{
    const i64 k = he_tid();
    if (k >= n || keys[k] == HE_NO_SLOT)
        return;
    he_atomic_add(target + keys[k], vals[k]);
}

/*
 * The apply pass of a two-phase update (Adagrad; SGD of float16 weights) as
 * a sweep of the array (when it is small next to the batch): where the
 * scratch gradient is non-zero, update (he_apply: rule, seed) and clear it.
 * S: the weight's storage (R, or he_u16 for float16 with R float).
 */
template <typename R, typename S = R>
__global__ void adagrad_sweep(S* __restrict__ w, R* __restrict__ scratch, R* __restrict__ state,
                              i64 m, R lr, R eps, i64 rule, i64 seed)
{
    const i64 k = he_tid();
    if (k >= m)
        return;
    const R g = scratch[k];
    if (g != (R)0) {
        he_apply(w, state, k, g, lr, eps, rule, seed);
        scratch[k] = 0;
    }
}

/*
 * A full table's two-phase step from bag_row_keys' pairs, sorted stably by
 * key (HE_NO_SLOT last), one thread per (position k, element i): the thread
 * of a row's first position sums element i's contributions
 * vals[e] * grad[grow[e] + i] in entry order, from the first (the CPU's
 * _rows_owned: the same sums, the same bits). A row's D elements run as D
 * threads whose reads of a gradient row are one coalesced line: a hot row
 * (one category in half of a 65536 batch: 32768 entries) costs its entry
 * count in dependent loads, not D times that twice over in one thread.
 * Rules 1 (Adagrad) and 0 (SGD of 16-bit storage; seed: rounding) move the
 * element where its sum is non-zero (he_apply). Rule 2 (row-wise Adagrad)
 * writes the sum to acc[k * D + i]; seg_rows_apply then forms the row's
 * square sum in element order and moves it. No scratch the size of the
 * table, and deterministic whatever the thread order.
 */
template <typename R, typename S = R>
__global__ void seg_rows(const int64_t* __restrict__ keys, const R* __restrict__ vals,
                         const int64_t* __restrict__ grow, i64 n, const R* __restrict__ grad,
                         i64 D, S* __restrict__ w, R* __restrict__ state, R lr, R eps, i64 rule,
                         i64 seed, R* __restrict__ acc)
{
    const i64 t = he_tid();
    if (t >= n * D)
        return;
    const i64 k = t / D, i = t - k * D;
    if (!he_run_head(keys, k, n))
        return;
    const int64_t key = keys[k];
    R a = vals[k] * grad[grow[k] + i];
    for (i64 e = k + 1; e < n && keys[e] == key; e++)
        a += vals[e] * grad[grow[e] + i];
    if (rule == 2)
        acc[t] = a;
    else if (a != (R)0)
        he_apply(w, state, (i64)((uint64_t)key + (uint64_t)i), a, lr, eps, rule, seed);
}

/*
 * Row-wise Adagrad's move from seg_rows' sums (acc, D per position; only a
 * row's first position is read): the thread of that position adds the
 * squares in element order (in double, as the CPU), updates the row's state
 * once (he_row_mult) and moves every element with a non-zero sum.
 */
template <typename R, typename S = R>
__global__ void seg_rows_apply(const int64_t* __restrict__ keys, i64 n,
                               const R* __restrict__ acc, i64 D, S* __restrict__ w,
                               R* __restrict__ state, R lr, R eps, i64 seed)
{
    const i64 k = he_tid();
    if (!he_run_head(keys, k, n))
        return;
    const R* a = acc + k * D;
    double ss = 0;
    for (i64 i = 0; i < D; i++)
        ss += (double)a[i] * (double)a[i];
    if (ss == 0)
        return;
    const uint64_t st = (uint64_t)keys[k];
    const double mult = he_row_mult(state + st / (uint64_t)D, ss, D, lr, eps);
    for (i64 i = 0; i < D; i++)
        if (a[i] != (R)0)
            he_row_move(w, st + (uint64_t)i, mult * (double)a[i], seed);
}

HE_KERNEL(seg_apply<float>)
HE_KERNEL(seg_apply<double>)
HE_KERNEL(pairs_add<float>)
HE_KERNEL(pairs_add<double>)
HE_KERNEL(adagrad_sweep<float>)
HE_KERNEL(adagrad_sweep<double>)
HE_KERNEL(adagrad_sweep<float, unsigned short>)
HE_KERNEL(adagrad_sweep<float, he_bf16>)
HE_KERNEL(seg_rows<float>)
HE_KERNEL(seg_rows<double>)
HE_KERNEL(seg_rows<float, unsigned short>)
HE_KERNEL(seg_rows<float, he_bf16>)
HE_KERNEL(seg_rows_apply<float>)
HE_KERNEL(seg_rows_apply<double>)
HE_KERNEL(seg_rows_apply<float, unsigned short>)
HE_KERNEL(seg_rows_apply<float, he_bf16>)
