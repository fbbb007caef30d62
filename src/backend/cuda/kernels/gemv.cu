// out[r, j] (+)= sum_k x[r, k] * W[j, k] for a few rows r (decode at batch <= GEMV_MAX_ROWS): a
// weight-streaming alternative to cuBLASLt for the memory-bound case, selected with HERD_GEMV=1
// (bench A/B on a GPU; off by default until measured). bf16 weights and bf16 x (the same
// operands the GEMM reads), f32 accumulation, f32 out; `accumulate` adds to out (the residual,
// as the GEMM's beta = 1). One warp per weight row: each lane reads 4 bf16 (8 bytes) of the row
// per load, 4 loads in flight, so a warp streams 1 KB of the row per iteration; x comes from L1/L2
// (every warp of the grid reads it). Then one warp reduction per x row. Needs k % 4 == 0 and
// 8-byte aligned rows (the dispatch checks).
#define GEMV_MAX_ROWS 4
#define GEMV_WARPS 8

__device__ __forceinline__ void bf16x4(u64 v, float* f) {
    f[0] = __uint_as_float((unsigned int)(v & 0xffffu) << 16);
    f[1] = __uint_as_float((unsigned int)((v >> 16) & 0xffffu) << 16);
    f[2] = __uint_as_float((unsigned int)((v >> 32) & 0xffffu) << 16);
    f[3] = __uint_as_float((unsigned int)((v >> 48) & 0xffffu) << 16);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_bf16(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w, float* __restrict__ out,
          int m, int n, int k, int accumulate) {
    int lane = threadIdx.x & 31;
    int j = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (j >= n) return;  // warp-uniform: a warp is one weight row
    const u64* wr = (const u64*)(w + (u64)j * k);
    int k4 = k / 4;
    float acc[GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; r++) acc[r] = 0.f;
    for (int i0 = lane; i0 < k4; i0 += 32 * 4) {
        u64 wv[4];
#pragma unroll
        for (int u = 0; u < 4; u++) wv[u] = (i0 + 32 * u < k4) ? wr[i0 + 32 * u] : 0ull;
#pragma unroll
        for (int u = 0; u < 4; u++) {
            int i = i0 + 32 * u;
            if (i >= k4) break;
            float wf[4];
            bf16x4(wv[u], wf);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; r++) {
                if (r >= m) break;
                float xf[4];
                bf16x4(((const u64*)(x + (u64)r * k))[i], xf);
                acc[r] += wf[0] * xf[0] + wf[1] * xf[1] + wf[2] * xf[2] + wf[3] * xf[3];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; r++) {
        if (r >= m) break;
        float s = warp_sum(acc[r]);
        if (lane == 0) {
            float* o = out + (u64)r * n + j;
            *o = accumulate ? *o + s : s;
        }
    }
}
