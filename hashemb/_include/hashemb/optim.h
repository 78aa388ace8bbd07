/* Row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD): one accumulator per row
 * of a full table instead of one per element. One source for the CPU
 * kernels (_cpu/_bag.pyx) and the CUDA kernels (prepended to every .cu like
 * slots.h and half.h).
 *
 * For a row r of D elements whose gradient over the batch is g (summed
 * over every entry that reads the row, first):
 *
 *     G_r += (1/D) sum_i g_i^2,     w_ri -= lr g_i / (sqrt(G_r) + eps).
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

#endif /* HASHEMB_OPTIM_H */
