// Host emulator of hashemb's CUDA kernels (tests only; see tests/gpu_emu.py).
//
// The kernels are written for independent threads (no shared memory, barriers
// or shuffles: hashemb/_gpu/common.cuh), so running every thread of a launch
// one after another on the CPU gives what the device computes, up to the
// order of atomic adds. The warp kernels (common.cuh HE_LANES) run a warp at
// a time: HE_EMU makes each warp's lane 0 run the phases of all 32 lanes.
// This file defines the CUDA built-ins the sources use, includes every .cu
// file, and registers each HE_KERNEL instantiation under
// its name expression with its parameter types, so that the Python launchers
// run unchanged with NumPy arrays and every argument is checked against the
// kernel's signature (count, pointer or scalar, size, float or integer).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

struct he_emu_dim3 {
    unsigned long long x, y, z;
};
static he_emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict

static inline float atomicAdd(float* p, float v) { float o = *p; *p = o + v; return o; }
static inline double atomicAdd(double* p, double v) { double o = *p; *p = o + v; return o; }
static inline float atomicExch(float* p, float v) { float o = *p; *p = v; return o; }
static inline unsigned long long atomicExch(unsigned long long* p, unsigned long long v)
{
    unsigned long long o = *p;
    *p = v;
    return o;
}
static inline unsigned int atomicExch(unsigned int* p, unsigned int v)
{
    unsigned int o = *p;
    *p = v;
    return o;
}
static inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long cmp,
                                          unsigned long long v)
{
    unsigned long long o = *p;
    if (o == cmp)
        *p = v;
    return o;
}
static inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v)
{
    unsigned long long o = *p;
    if (v < o)
        *p = v;
    return o;
}
static inline double __longlong_as_double(long long x)
{
    double d;
    std::memcpy(&d, &x, sizeof d);
    return d;
}

typedef void (*he_emu_launch_fn)(void* fn, long long grid, long long block, void** args);

struct he_emu_entry {
    std::string name;
    void* fn;
    he_emu_launch_fn launch;
    std::vector<int> sizes;   // sizeof each parameter
    std::vector<int> kinds;   // 0 pointer, 1 floating point, 2 integer
};

static std::vector<he_emu_entry>& he_emu_registry()
{
    static std::vector<he_emu_entry> r;
    return r;
}

template <typename A>
static int he_emu_kind()
{
    return std::is_pointer<A>::value ? 0 : std::is_floating_point<A>::value ? 1 : 2;
}

template <typename... A, std::size_t... I>
static void he_emu_invoke(void (*f)(A...), void** args, std::index_sequence<I...>)
{
    f(*static_cast<typename std::decay<A>::type*>(args[I])...);
}

template <typename... A>
static void he_emu_launch(void* fn, long long grid, long long block, void** args)
{
    void (*f)(A...) = reinterpret_cast<void (*)(A...)>(fn);
    gridDim = {(unsigned long long)grid, 1, 1};
    blockDim = {(unsigned long long)block, 1, 1};
    for (long long b = 0; b < grid; b++)
        for (long long t = 0; t < block; t++) {
            blockIdx.x = b;
            threadIdx.x = t;
            he_emu_invoke(f, args, std::index_sequence_for<A...>{});
        }
}

template <typename... A>
static int he_emu_register(const char* name, void (*f)(A...))
{
    he_emu_registry().push_back({name, reinterpret_cast<void*>(f), &he_emu_launch<A...>,
                                 {(int)sizeof(A)...}, {he_emu_kind<A>()...}});
    return 0;
}

#define HE_EMU_CAT2(a, b) a##b
#define HE_EMU_CAT(a, b) HE_EMU_CAT2(a, b)
#define HE_KERNEL(...) \
    static int HE_EMU_CAT(he_emu_reg_, __COUNTER__) = he_emu_register(#__VA_ARGS__, &__VA_ARGS__);

#define HE_EMU 1           // warp kernels run a warp at a time (common.cuh HE_LANES)
#include "hashemb/slots.h"
#include "common.cuh"
#include "bag.cu"
#include "segment.cu"
#include "slots.cu"
#include "embed.cu"
#include "tt.cu"
#include "init.cu"

extern "C" {
int emu_count() { return (int)he_emu_registry().size(); }
const char* emu_name(int k) { return he_emu_registry()[k].name.c_str(); }
int emu_nargs(int k) { return (int)he_emu_registry()[k].sizes.size(); }
int emu_arg_size(int k, int i) { return he_emu_registry()[k].sizes[i]; }
int emu_arg_kind(int k, int i) { return he_emu_registry()[k].kinds[i]; }
void emu_launch(int k, long long grid, long long block, void** args)
{
    const he_emu_entry& e = he_emu_registry()[k];
    e.launch(e.fn, grid, block, args);
}
// common.cuh's index helpers, for tests of the ranges no launch reaches
long long emu_he_div(long long n, long long d) { return he_div(n, d); }
long long emu_he_bag_of_thread(long long g, long long W, long long* lane)
{
    return he_bag_of_thread(g, W, lane);
}
}
