// Shared helpers for every herd kernel. No CUDA headers are included: bf16 is handled as raw
// 16-bit storage with explicit conversions, so NVRTC needs no include directory at run time
// (the GPU machine's wheels may ship libnvrtc without cuda_bf16.h).
// They compile under NVRTC 13.0 (tests/cuda_nvrtc.rs); the self-test checks each against its CPU twin.
typedef unsigned short bf16_t;
typedef unsigned long long u64;
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float bf16_to_f32(bf16_t v) {
    return __uint_as_float(((unsigned int)v) << 16);  // bf16 is the top half of an f32: exact
}

// Round to nearest even, NaN kept a quiet NaN: the same rounding torch and `half` use.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float s[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) s[w] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    v = (threadIdx.x < nw) ? s[threadIdx.x] : 0.f;
    if (w == 0) v = warp_sum(v);
    if (threadIdx.x == 0) s[0] = v;
    __syncthreads();
    return s[0];
}

__device__ double block_sum_d(double v) {
    __shared__ double s[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) s[w] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    v = (threadIdx.x < nw) ? s[threadIdx.x] : 0.0;
    if (w == 0) v = warp_sum_d(v);
    if (threadIdx.x == 0) s[0] = v;
    __syncthreads();
    return s[0];
}

// The KV cache is bf16 (default) or f32 (--gpu-numerics accurate): one kernel body, two types.
__device__ __forceinline__ float kv_load(const bf16_t* p, u64 i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ float kv_load(const float* p, u64 i) { return p[i]; }
__device__ __forceinline__ void kv_store(bf16_t* p, u64 i, float v) { p[i] = f32_to_bf16(v); }
__device__ __forceinline__ void kv_store(float* p, u64 i, float v) { p[i] = v; }
