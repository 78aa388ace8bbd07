/*
 * hashemb/_gpu/common.cuh -- what every hashemb CUDA source shares beside the
 * slot math of hashemb/slots.h: 64-bit thread ids, the bag layouts, atomics
 * for both float types, and the list of kernel instantiations.
 *
 * At run time hashemb/_gpu/_runtime.py prepends slots.h and this file to each
 * .cu source before NVRTC compiles it (so CuPy's compile cache sees every edit);
 * compiled standalone (`nvcc -ptx -I hashemb/_include file.cu`, what CI does)
 * or by the host emulator of the tests, the #include lines below do the same.
 *
 * Every kernel is written for independent threads (no shared memory, no
 * barriers, no warp shuffles: a thread's result depends only on its own id,
 * which keeps the kernels obviously race-free apart from the documented
 * atomics, and lets tests/gpu_emu run them, thread after thread, on the
 * CPU), except the warp kernels below (HE_LANES), which the emulator runs a
 * warp at a time.
 */
#ifndef HASHEMB_GPU_COMMON_H
#define HASHEMB_GPU_COMMON_H

#ifndef HASHEMB_SLOTS_H
#include "hashemb/slots.h"
#endif
#ifndef HASHEMB_HALF_H
#include "hashemb/half.h"
#endif
#ifndef HASHEMB_OPTIM_H
#include "hashemb/optim.h"
#endif

typedef long long i64;

/*
 * Warp kernels: the lanes of a warp share what each computed through
 * per-warp shared memory, in phases. HE_LANES(l) { ... } is one phase: on
 * the device every lane runs the body once as lane l; the host emulator
 * (HE_EMU) runs a warp kernel in each warp's lane 0 only (HE_WARP_LEAD),
 * which runs the body for l = 0 .. 31 in turn. So a phase leaves its body
 * only by `continue` (never `return`: the lanes must all reach
 * HE_WARP_SYNC), hands a lane's values to later phases only through
 * HE_WARP_SHARED arrays (locals declared outside the phases are the warp's,
 * the same in every lane), and reads another lane's values only after
 * HE_WARP_SYNC. On the device, warp kernels run in blocks of at most
 * HE_BLOCK_WARPS warps.
 */
#define HE_BLOCK_WARPS 8
#if defined(HE_EMU)
#define HE_WARP_LEAD() \
    if (threadIdx.x & 31) \
        return
#define HE_LANES(l) for (int l = 0; l < 32; l++)
#define HE_WARP_SYNC() ((void)0)
#define HE_WARP_SHARED(type, name, count) type name[count]
#define HE_WARP_BOUNDS
#else
/* on a warp kernel: a launch of a larger block (whose warps would index
   past the per-warp shared arrays) fails instead of running */
#define HE_WARP_BOUNDS __launch_bounds__(32 * HE_BLOCK_WARPS)
#define HE_WARP_LEAD() ((void)0)
#define HE_LANES(l) \
    for (int l = (int)(threadIdx.x & 31), he_once_##l = 1; he_once_##l; he_once_##l = 0)
#define HE_WARP_SYNC() __syncwarp()
#define HE_WARP_SHARED(type, name, count) \
    __shared__ type name##_block[HE_BLOCK_WARPS][count]; \
    type* const name = name##_block[threadIdx.x >> 5]
#endif

/* pooling modes (hashemb/_validate.py MODES order) */
#define HE_SUM 0
#define HE_MEAN 1
#define HE_MAX 2

/* elements a backward lane keeps in registers per pass over a bag's entries
   (the forward takes its count as a template argument) */
#define HE_EPT 4

/* key of "no slot" (padding, entries outside every bag): sorts last */
#define HE_NO_SLOT 0x7FFFFFFFFFFFFFFFLL

/* what a deterministic segment pass does with a slot's summed gradient g */
#define HE_ACT_ADD 0      /* target[slot] += contributions, in entry order        */
#define HE_ACT_ADAGRAD 1  /* state += g^2; w -= lr g / (sqrt(state) + eps)        */

__device__ __forceinline__ i64 he_tid()
{
    return (i64)blockIdx.x * (i64)blockDim.x + (i64)threadIdx.x;
}

/*
 * n / d for n >= 0, d > 0. Where both fit in 32 bits (every batch below 2^32
 * bags) a 32-bit division: a 64-bit one is a long software routine on the
 * GPU, and the bag kernels divide in every thread.
 */
__device__ __forceinline__ i64 he_div(i64 n, i64 d)
{
    if ((((unsigned long long)n | (unsigned long long)d) >> 32) == 0)
        return (i64)((unsigned)n / (unsigned)d);
    return n / d;
}

/* Bag of thread g with W lanes per bag (W a power of two), and its lane. */
__device__ __forceinline__ i64 he_bag_of_thread(i64 g, i64 W, i64* lane)
{
    int shift = 0;
    while ((1LL << shift) < W)
        shift++;
    *lane = g & (W - 1);
    return g >> shift;
}

__device__ __forceinline__ void he_atomic_add(float* p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void he_atomic_add(double* p, double v) { atomicAdd(p, v); }

/* Read a value and leave 0 in one atomic step: exactly one thread gets it. */
__device__ __forceinline__ float he_take(float* p) { return atomicExch(p, 0.0f); }
__device__ __forceinline__ double he_take(double* p)
{
    return __longlong_as_double(
        (long long)atomicExch((unsigned long long*)p, 0ULL));
}

/* bfloat16 storage: its bits in a type of their own, so that a kernel's
 * storage template argument S tells the two 16-bit formats apart (float16
 * storage is he_u16 itself). */
struct he_bf16 {
    he_u16 b;
};

/* Element i of an array as the kernels compute with it: 16-bit storage
 * (float16 bits he_u16, bfloat16 he_bf16) reads as float, exactly (half.h). */
__device__ __forceinline__ float he_weight(const float* M, uint64_t i) { return M[i]; }
__device__ __forceinline__ double he_weight(const double* M, uint64_t i) { return M[i]; }
__device__ __forceinline__ float he_weight(const he_u16* M, uint64_t i) { return he_h2f(M[i]); }
__device__ __forceinline__ float he_weight(const he_bf16* M, uint64_t i) { return he_b2f(M[i].b); }

/*
 * The update of one slot from its summed gradient g, the CPU kernel's exact
 * arithmetic (hashemb/_cpu/_bag.pyx _adagrad: libm's double sqrt, so the
 * step is formed in double for float too): rule 1, Adagrad, state += g^2,
 * w -= lr * g / (sqrt(state) + eps); rule 0, SGD (two-phase only for
 * float16 weights), w -= lr * g. A float16 weight rounds the float step
 * once (half.h he_half_sub: seed 0 to nearest, else stochastically).
 */
template <typename R>
__device__ __forceinline__ void he_apply(R* w, R* state, i64 slot, R g, R lr, R eps, i64 rule,
                                         i64 seed)
{
    (void)seed;
    if (rule) {
        state[slot] += g * g;
        w[slot] = (R)((double)w[slot] -
                      (double)(lr * g) / (sqrt((double)state[slot]) + (double)eps));
    } else {
        w[slot] = (R)((double)w[slot] - (double)(lr * g));
    }
}

/* 16-bit storage (bf: bfloat16, else float16): the step in float, rounded once */
__device__ __forceinline__ void he_apply16(he_u16* w, float* state, i64 slot, float g, float lr,
                                           float eps, i64 rule, i64 seed, int bf)
{
    double step = (double)(lr * g);
    if (rule) {
        state[slot] += g * g;
        step /= sqrt((double)state[slot]) + (double)eps;
    }
    he_half_sub(w, (he_u64)slot, (float)step, (he_u64)seed, bf);
}
__device__ __forceinline__ void he_apply(he_u16* w, float* state, i64 slot, float g, float lr,
                                         float eps, i64 rule, i64 seed)
{
    he_apply16(w, state, slot, g, lr, eps, rule, seed, 0);
}
__device__ __forceinline__ void he_apply(he_bf16* w, float* state, i64 slot, float g, float lr,
                                         float eps, i64 rule, i64 seed)
{
    he_apply16(&w->b, state, slot, g, lr, eps, rule, seed, 1);
}

/* Row-wise Adagrad's parts (optim.h) for both float types: the multiplier
 * (the row's accumulator grows) and one element's move by a step formed in
 * double (float16 storage rounds once, he_half_sub). */
__device__ __forceinline__ double he_row_mult(float* G, double ss, i64 D, float lr, float eps)
{
    return he_row_mult_f(G, ss, D, lr, eps);
}
__device__ __forceinline__ double he_row_mult(double* G, double ss, i64 D, double lr, double eps)
{
    return he_row_mult_d(G, ss, D, lr, eps);
}
template <typename R>
__device__ __forceinline__ void he_row_move(R* w, uint64_t slot, double step, i64 seed)
{
    (void)seed;
    w[slot] = (R)((double)w[slot] - step);
}
__device__ __forceinline__ void he_row_move(he_u16* w, uint64_t slot, double step, i64 seed)
{
    he_half_sub(w, (he_u64)slot, (float)step, (he_u64)seed, 0);
}
__device__ __forceinline__ void he_row_move(he_bf16* w, uint64_t slot, double step, i64 seed)
{
    he_half_sub(&w->b, (he_u64)slot, (float)step, (he_u64)seed, 1);
}
/*
 * Entries j0 .. j1-1 of bag q = t*B + b, and pos0, the position of entry j0 in
 * the CPU kernels' order (table-major, the order a deterministic sum follows).
 *  - use_off: 1-D indices with feature-major offsets of length T*B+1;
 *  - else 2-D (B, rowlen) input read in place: T == 1: bag b is row b
 *    (nper = rowlen entries); T > 1: bag (t, b) is the one entry [b, t]
 *    (rowlen = T, nper = 1). No transposed copy is made.
 */
struct he_range {
    i64 j0, j1, pos0;
};

__device__ __forceinline__ he_range he_bag_range(const int64_t* off, i64 use_off, i64 q, i64 t,
                                                 i64 b, i64 rowlen, i64 nper)
{
    he_range r;
    if (use_off) {
        r.j0 = off[q];
        r.j1 = off[q + 1];
        r.pos0 = r.j0;
    } else {
        r.j0 = b * rowlen + t * nper;
        r.j1 = r.j0 + nper;
        r.pos0 = q * nper;
    }
    return r;
}

/*
 * Table (0 .. T-1) of entry j, or -1 when j lies in no bag. With offsets:
 * binary search of the table starts off[t*B] (T+1 values, read through L1);
 * with invalid offsets the answer is wrong but every read stays in bounds
 * (only the pre-launch check runs on unchecked offsets).
 */
/* Largest k in [0, n) with off[k * stride] <= j (off non-decreasing, off[0] <= j). */
__device__ __forceinline__ i64 he_last_le(const int64_t* off, i64 stride, i64 n, i64 j)
{
    i64 lo = 0, hi = n - 1;
    while (lo < hi) {
        i64 mid = (lo + hi + 1) >> 1;
        if (off[mid * stride] <= j)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

__device__ __forceinline__ i64 he_entry_table(const int64_t* off, i64 use_off, i64 j, i64 B,
                                              i64 T, i64 rowlen)
{
    if (!use_off)
        return T > 1 ? j % rowlen : 0;
    if (j < off[0] || j >= off[T * B])
        return -1;
    return he_last_le(off, B, T, j);
}

/* Position of entry j in the CPU order (see he_bag_range). */
__device__ __forceinline__ i64 he_entry_pos(i64 use_off, i64 j, i64 t, i64 B, i64 T, i64 rowlen)
{
    if (use_off || T == 1)
        return j;
    return t * B + j / rowlen;
}

/*
 * HE_KERNEL(name<args>) lists an instantiation the launchers call by that
 * name expression (hashemb/_gpu/_runtime.py reads these lines). Under NVRTC
 * the name expressions instantiate them; under nvcc (the CI compile check)
 * taking each one's address does, and the host emulator registers them.
 */
#if defined(__CUDACC_RTC__)
#define HE_KERNEL(...)
#elif !defined(HE_KERNEL)
#define HE_CAT2_(a, b) a##b
#define HE_CAT_(a, b) HE_CAT2_(a, b)
#define HE_KERNEL(...) \
    __attribute__((unused)) static void* const HE_CAT_(he_kernel_, __COUNTER__) = (void*)&__VA_ARGS__;
#endif

#endif /* HASHEMB_GPU_COMMON_H */
