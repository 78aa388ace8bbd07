// Compile check of the one slot header under nvcc (CI has nvcc but no GPU):
// every device-side path of hashemb/slots.h is instantiated here.
#include "hashemb/slots.h"

extern "C" __global__ void slots_of(const he_scheme s, const long long* tokens,
                                    long long table, long long n, long long* slots,
                                    float* signs)
{
    long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (t >= n * s.dim)
        return;
    long long r = t / s.dim, i = t % s.dim;
    he_row row = he_row_begin(&s, table, tokens[r]);
    uint64_t st = he_run_start(&s, &row, i / s.run);
    slots[t] = (long long)he_run_slot(&s, st, i % s.run);
    signs[t] = (float)he_sign(&s, &row, i);
}
