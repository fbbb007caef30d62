// Causal grouped-query attention over the paged bf16 KV cache, split over the context
// (flash-decoding): grid = (query row, head, split); each block reduces its share of positions
// with an online softmax and writes a partial (max, sum, acc[head_dim]); attn_combine merges them.
// Decode and (for now) prefill use the same kernel: prefill is one block per (query row, head),
// correct but it re-reads K/V once per query row: a tiled flash-style prefill kernel is future work.
// Bytes per (row, head): n_ctx * head_dim * 2 (K) + the same for V, bf16; GQA heads of one group
// read the same K/V, which L2 serves after the first.
//
// Layout: 4 warps per block; warp w takes positions w, w+4, ...; within a warp each lane holds
// head_dim/32 consecutive elements (4 for head_dim 128: one 8-byte load of K and of V per lane).

#define ATT_WARPS 4
#define MAX_PER_LANE 8  // head_dim <= 256

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attn_partial(const float* __restrict__ q,            // [rows, n_heads * head_dim]
             const bf16_t* __restrict__ kcache,       // this layer: [slots, n_kv_heads, head_dim]
             const bf16_t* __restrict__ vcache,
             const unsigned int* __restrict__ row_ctx,  // positions each row sees (pos + 1)
             const unsigned int* __restrict__ row_table, // offset of the row's block table in tables
             const unsigned int* __restrict__ tables,
             float* __restrict__ part_acc,            // [rows, n_heads, splits, head_dim]
             float* __restrict__ part_ml,             // [rows, n_heads, splits, 2]
             int n_heads, int n_kv_heads, int head_dim, int block_size, float scale) {
    int row = blockIdx.x, h = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int per = head_dim / 32;
    int kvh = h / (n_heads / n_kv_heads);
    int n_ctx = row_ctx[row];
    int chunk = (n_ctx + splits - 1) / splits;
    int p0 = split * chunk, p1 = min(n_ctx, p0 + chunk);
    const unsigned int* table = tables + row_table[row];

    float qv[MAX_PER_LANE], acc[MAX_PER_LANE];
    const float* qr = q + ((u64)row * n_heads + h) * head_dim + lane * per;
#pragma unroll
    for (int e = 0; e < MAX_PER_LANE; e++) {
        qv[e] = (e < per) ? qr[e] * scale : 0.f;
        acc[e] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int p = p0 + w; p < p1; p += ATT_WARPS) {
        u64 slot = (u64)table[p / block_size] * block_size + p % block_size;
        u64 at = (slot * n_kv_heads + kvh) * head_dim + lane * per;
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < MAX_PER_LANE; e++)
            if (e < per) d += qv[e] * bf16_to_f32(kcache[at + e]);
        d = warp_sum(d);
        float m2 = fmaxf(m, d);
        float corr = expf(m - m2), pw = expf(d - m2);
        l = l * corr + pw;
#pragma unroll
        for (int e = 0; e < MAX_PER_LANE; e++)
            if (e < per) acc[e] = acc[e] * corr + pw * bf16_to_f32(vcache[at + e]);
        m = m2;
    }
    // Merge the 4 warps' states through shared memory.
    __shared__ float s_m[ATT_WARPS], s_l[ATT_WARPS];
    __shared__ float s_acc[ATT_WARPS][32 * MAX_PER_LANE];
    if (lane == 0) { s_m[w] = m; s_l[w] = l; }
#pragma unroll
    for (int e = 0; e < MAX_PER_LANE; e++)
        if (e < per) s_acc[w][lane * per + e] = acc[e];
    __syncthreads();
    u64 part = ((u64)row * n_heads + h) * splits + split;
    float gm = -INFINITY;
    for (int i = 0; i < ATT_WARPS; i++) gm = fmaxf(gm, s_m[i]);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.f;
        for (int i = 0; i < ATT_WARPS; i++)
            if (s_m[i] != -INFINITY) a += s_acc[i][d] * expf(s_m[i] - gm);
        part_acc[part * head_dim + d] = a;
    }
    if (threadIdx.x == 0) {
        float gl = 0.f;
        for (int i = 0; i < ATT_WARPS; i++)
            if (s_m[i] != -INFINITY) gl += s_l[i] * expf(s_m[i] - gm);
        part_ml[part * 2] = gm;
        part_ml[part * 2 + 1] = gl;
    }
}

// out[row, h, :] = sum_s acc_s * e^(m_s - M) / sum_s l_s * e^(m_s - M). One block per (row, head).
// An empty split has m = -inf and contributes nothing; split 0 always holds position 0.
extern "C" __global__ void attn_combine(const float* __restrict__ part_acc,
                                        const float* __restrict__ part_ml,
                                        float* __restrict__ out, int splits, int head_dim) {
    u64 rh = blockIdx.x;
    const float* ml = part_ml + rh * splits * 2;
    float gm = -INFINITY;
    for (int s = 0; s < splits; s++) gm = fmaxf(gm, ml[2 * s]);
    float denom = 0.f;
    for (int s = 0; s < splits; s++)
        if (ml[2 * s] != -INFINITY) denom += ml[2 * s + 1] * expf(ml[2 * s] - gm);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.f;
        for (int s = 0; s < splits; s++)
            if (ml[2 * s] != -INFINITY) a += part_acc[(rh * splits + s) * head_dim + d] * expf(ml[2 * s] - gm);
        out[rh * head_dim + d] = a / denom;
    }
}
