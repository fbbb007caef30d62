// Embedding gather, fused residual add + RMSNorm, SiLU·mul, f32 -> bf16 cast, row gather.
// All memory-bound: each reads its inputs once and writes its output once.

// One block per token; a row of 4096 bf16 = 8 KB read, 16 KB f32 written.
extern "C" __global__ void embed_gather(const bf16_t* __restrict__ table,
                                        const unsigned int* __restrict__ tokens,
                                        float* __restrict__ out, int dim) {
    const bf16_t* src = table + (u64)tokens[blockIdx.x] * dim;
    float* dst = out + (u64)blockIdx.x * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = bf16_to_f32(src[i]);
}

// x += y (when y is not null), then out = x * rsqrt(mean(x^2) + eps) * w. One block per row:
// the sum of squares needs the whole row, and a row (<= 16K f32) stays in L1 between the passes.
// Bytes: read x (+ y), write x (if y) and out: 3-4 row passes instead of 5 for add then norm.
// out16 (when not null) gets out rounded to bf16 as well: the next GEMM's operand without a
// cast kernel of its own.
extern "C" __global__ void add_rmsnorm(float* __restrict__ x, const float* __restrict__ y,
                                       const float* __restrict__ w, float* __restrict__ out,
                                       bf16_t* __restrict__ out16, int cols, float eps) {
    float* xr = x + (u64)blockIdx.x * cols;
    float* orow = out + (u64)blockIdx.x * cols;
    float ss = 0.f;
    if (y != nullptr) {
        const float* yr = y + (u64)blockIdx.x * cols;
        for (int i = threadIdx.x; i < cols; i += blockDim.x) {
            float v = xr[i] + yr[i];
            xr[i] = v;
            ss += v * v;
        }
    } else {
        for (int i = threadIdx.x; i < cols; i += blockDim.x) ss += xr[i] * xr[i];
    }
    ss = block_sum(ss);
    float r = 1.0f / sqrtf(ss / (float)cols + eps);
    bf16_t* o16 = out16 ? out16 + (u64)blockIdx.x * cols : nullptr;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float v = xr[i] * r * w[i];
        orow[i] = v;
        if (o16) o16[i] = f32_to_bf16(v);
    }
}

// silu(g) * u with the CPU's formula (g / (1 + exp(-g)) * u, precise expf), from the fused
// gate/up GEMM's output: row r is [gate (f) | up (f)]. out is [rows, f]; out16 (when not null)
// also gets it in bf16, the down projection's operand.
extern "C" __global__ void silu_mul(const float* __restrict__ gu, float* __restrict__ out,
                                    bf16_t* __restrict__ out16, u64 n, u64 f) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 r = i / f, j = i - r * f;
        const float* row = gu + 2 * f * r;
        float a = row[j];
        float v = a / (1.0f + expf(-a)) * row[f + j];
        out[i] = v;
        if (out16) out16[i] = f32_to_bf16(v);
    }
}

// x += y.
extern "C" __global__ void add_in_place(float* __restrict__ x, const float* __restrict__ y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        x[i] += y[i];
}

// f32 -> bf16, the GEMM's A operand (activations are kept f32 between kernels for accuracy).
extern "C" __global__ void cast_bf16(const float* __restrict__ x, bf16_t* __restrict__ out, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(x[i]);
}

// out[r] = x[rows[r]]: one block per output row.
extern "C" __global__ void select_rows(const float* __restrict__ x, const unsigned int* __restrict__ rows,
                                       float* __restrict__ out, int cols) {
    const float* src = x + (u64)rows[blockIdx.x] * cols;
    float* dst = out + (u64)blockIdx.x * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) dst[i] = src[i];
}

// x = hi + lo with hi = bf16(x), lo = bf16(x - hi): [hi rows; lo rows] as one [2m, k] GEMM input,
// so one GEMM reads the weights once and x carries ~16 mantissa bits (--gpu-numerics accurate).
// The two halves of the f32 result are summed by add_in_place.
extern "C" __global__ void cast_bf16_split(const float* __restrict__ x, bf16_t* __restrict__ out, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float v = x[i];
        bf16_t hi = f32_to_bf16(v);
        out[i] = hi;
        out[n + i] = f32_to_bf16(v - bf16_to_f32(hi));
    }
}

// ncclAllGather's [rank][rows][cols] -> [rows][rank][cols]: each rank's vocab shard of a logits row
// side by side (tensor-parallel output projection). One block per (row, rank).
// CPU twin: the reorder loop in CpuBackend::all_gather_cols (the self-test compares them).
extern "C" __global__ void gather_cols_reorder(const float* __restrict__ src, float* __restrict__ dst,
                                               int rows, int cols, int world) {
    const int i = blockIdx.x, r = blockIdx.y;
    const float* s = src + ((u64)r * rows + i) * cols;
    float* d = dst + ((u64)i * world + r) * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) d[c] = s[c];
}
