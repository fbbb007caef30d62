// Lets g++ compile herd's CUDA kernels (src/backend/cuda/kernels/*.cu) unchanged as C++17.
// Each thread of a block is a fiber of the emulator's scheduler (exec.cpp): threadIdx reads the
// running fiber's index, __syncthreads and the warp shuffles switch fibers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "emu_rt.h"

typedef emu_uint3 uint3;
typedef emu_uint3 dim3;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// Blocks run one after another, so a function-local static is the block's shared memory. The
// scheduler poisons these variables before every block (found by name in the symbol table).
#define __shared__ static

#define threadIdx (emu_rt::g_cur->tid)
#define blockIdx (emu_rt::g_block_idx)
#define blockDim (emu_rt::g_block_dim)
#define gridDim (emu_rt::g_grid_dim)
#define warpSize 32

// A barrier is a fiber switch (an opaque call) plus a compiler barrier: no value of shared
// memory may be kept in a register across it.
inline void emu_syncthreads_(const char* file, int line) {
    emu_rt::syncthreads(file, line);
    __asm__ __volatile__("" ::: "memory");
}
#define __syncthreads() emu_syncthreads_(__FILE__, __LINE__)

template <typename T>
inline T emu_warp_(int mode, const char* file, int line, unsigned mask, T v, int arg, int width = 32) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    bits = emu_rt::warp_op(mode, mask, bits, arg, width, file, line);
    __asm__ __volatile__("" ::: "memory");
    T r;
    memcpy(&r, &bits, sizeof(T));
    return r;
}
#define __shfl_sync(...) emu_warp_(emu_rt::SHFL_IDX, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) emu_warp_(emu_rt::SHFL_UP, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) emu_warp_(emu_rt::SHFL_DOWN, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) emu_warp_(emu_rt::SHFL_XOR, __FILE__, __LINE__, __VA_ARGS__)
inline void emu_syncwarp_(const char* file, int line, unsigned mask = 0xffffffffu) {
    emu_warp_(emu_rt::WARP_SYNC, file, line, mask, 0, 0);
}
#define __syncwarp(...) emu_syncwarp_(__FILE__, __LINE__, ##__VA_ARGS__)

// Bit casts.
inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
inline int __float_as_int(float f) { int u; memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline long long __double_as_longlong(double d) { long long u; memcpy(&u, &d, 8); return u; }
inline double __longlong_as_double(long long u) { double d; memcpy(&d, &u, 8); return d; }

// CUDA's integer and float min/max overloads.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline unsigned int min(int a, unsigned int b) { return min((unsigned int)a, b); }
inline unsigned int min(unsigned int a, int b) { return min(a, (unsigned int)b); }
inline unsigned int max(int a, unsigned int b) { return max((unsigned int)a, b); }
inline unsigned int max(unsigned int a, int b) { return max(a, (unsigned int)b); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// Precise-math forms of the fast intrinsics (the emulator never uses fast math).
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
