// Causal grouped-query attention over the paged bf16 KV cache, split over the context
// (flash-decoding): grid = (query row, head, split); each block reduces its share of positions
// with an online softmax and writes a partial (max, sum, acc[head_dim]); attn_combine merges them.
// Decode and (for now) prefill use the same kernel: prefill is one block per (query row, head),
// correct but it re-reads K/V once per query row: a tiled flash-style prefill kernel is future work.
// Bytes per (row, head): n_ctx * head_dim * 2 (K) + the same for V, bf16; GQA heads of one group
// read the same K/V, which L2 serves after the first.
//
// Layout: 4 warps per block; warp w takes positions w, w+4, ...; within a warp each lane holds
// ceil(head_dim/32) consecutive elements (4 for head_dim 128: one 8-byte load of K and of V per
// lane; small test models with head_dim 16 leave half the lanes idle).

#define ATT_WARPS 4
#define MAX_PER_LANE 8  // head_dim <= 256
#define LANE_OK(e) ((e) < per && lane * per + (e) < head_dim)

template <typename KV>
__device__ __forceinline__ void attn_partial_impl(
             const float* __restrict__ q,            // row r, head h at r * q_stride + h * head_dim
             int q_stride,                           // floats per row (the fused qkv: q heads first)
             const KV* __restrict__ kcache,           // this layer: [slots, n_kv_heads, head_dim]
             const KV* __restrict__ vcache,
             const unsigned int* __restrict__ row_ctx,  // positions each row sees (pos + 1)
             const unsigned int* __restrict__ row_table, // offset of the row's block table in tables
             const unsigned int* __restrict__ tables,
             float* __restrict__ part_acc,            // [rows, n_heads, splits, head_dim]
             float* __restrict__ part_ml,             // [rows, n_heads, splits, 2]
             float* __restrict__ out,                 // one split: the result, no combine
             bf16_t* __restrict__ out16,
             int n_heads, int n_kv_heads, int head_dim, int block_size, float scale) {
    int row = blockIdx.x, h = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int per = (head_dim + 31) / 32;
    int kvh = h / (n_heads / n_kv_heads);
    int n_ctx = row_ctx[row];
    int chunk = (n_ctx + splits - 1) / splits;
    int p0 = split * chunk, p1 = min(n_ctx, p0 + chunk);
    const unsigned int* table = tables + row_table[row];

    float qv[MAX_PER_LANE], acc[MAX_PER_LANE];
    const float* qr = q + (u64)row * q_stride + (u64)h * head_dim + lane * per;
#pragma unroll
    for (int e = 0; e < MAX_PER_LANE; e++) {
        qv[e] = LANE_OK(e) ? qr[e] * scale : 0.f;
        acc[e] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int p = p0 + w; p < p1; p += ATT_WARPS) {
        u64 slot = (u64)table[p / block_size] * block_size + p % block_size;
        u64 at = (slot * n_kv_heads + kvh) * head_dim + lane * per;
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < MAX_PER_LANE; e++)
            if (LANE_OK(e)) d += qv[e] * kv_load(kcache, at + e);
        d = warp_sum(d);
        float m2 = fmaxf(m, d);
        float corr = expf(m - m2), pw = expf(d - m2);
        l = l * corr + pw;
#pragma unroll
        for (int e = 0; e < MAX_PER_LANE; e++)
            if (LANE_OK(e)) acc[e] = acc[e] * corr + pw * kv_load(vcache, at + e);
        m = m2;
    }
    // Merge the 4 warps' states through shared memory.
    __shared__ float s_m[ATT_WARPS], s_l[ATT_WARPS];
    __shared__ float s_acc[ATT_WARPS][32 * MAX_PER_LANE];
    if (lane == 0) { s_m[w] = m; s_l[w] = l; }
#pragma unroll
    for (int e = 0; e < MAX_PER_LANE; e++)
        if (LANE_OK(e)) s_acc[w][lane * per + e] = acc[e];
    __syncthreads();
    u64 part = ((u64)row * n_heads + h) * splits + split;
    float gm = -INFINITY;
    for (int i = 0; i < ATT_WARPS; i++) gm = fmaxf(gm, s_m[i]);
    if (splits == 1) {
        // The whole context in this block: finish here as attn_combine would (its factor
        // e^(m - M) is e^0 = 1 with one split: the same numbers), one launch fewer per layer.
        float gl = 0.f;
        for (int i = 0; i < ATT_WARPS; i++)
            if (s_m[i] != -INFINITY) gl += s_l[i] * expf(s_m[i] - gm);
        u64 o = ((u64)row * n_heads + h) * head_dim;
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float a = 0.f;
            for (int i = 0; i < ATT_WARPS; i++)
                if (s_m[i] != -INFINITY) a += s_acc[i][d] * expf(s_m[i] - gm);
            float v = a / gl;
            out[o + d] = v;
            if (out16) out16[o + d] = f32_to_bf16(v);
        }
        return;
    }
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

#define ATTN_ARGS const float *q, int q_stride, const unsigned int *row_ctx, const unsigned int *row_table, \
    const unsigned int *tables, float *part_acc, float *part_ml, float *out, bf16_t *out16, int nh, int nkv, \
    int hd, int bs, float scale
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attn_partial_bf16(const bf16_t* kc, const bf16_t* vc, ATTN_ARGS) {
    attn_partial_impl<bf16_t>(q, q_stride, kc, vc, row_ctx, row_table, tables, part_acc, part_ml, out, out16, nh, nkv, hd, bs, scale);
}
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attn_partial_f32(const float* kc, const float* vc, ATTN_ARGS) {
    attn_partial_impl<float>(q, q_stride, kc, vc, row_ctx, row_table, tables, part_acc, part_ml, out, out16, nh, nkv, hd, bs, scale);
}

// out[row, h, :] = sum_s acc_s * e^(m_s - M) / sum_s l_s * e^(m_s - M). One block per (row, head);
// out16 (when not null) also gets it in bf16, the output projection's operand.
// An empty split has m = -inf and contributes nothing; split 0 always holds position 0.
extern "C" __global__ void attn_combine(const float* __restrict__ part_acc,
                                        const float* __restrict__ part_ml,
                                        float* __restrict__ out, bf16_t* __restrict__ out16,
                                        int splits, int head_dim) {
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
        float v = a / denom;
        out[rh * head_dim + d] = v;
        if (out16) out16[rh * head_dim + d] = f32_to_bf16(v);
    }
}

// Prefill attention, tiled (flash-attention style): a block takes FP_ROWS consecutive query
// rows of one head; the keys and values of their sequence go through shared memory FP_KEYS
// positions at a time, so each K/V row is read once per tile of queries, not once per query row
// (the decode kernel above re-reads the context for every row). Online softmax per row, causal
// (row r sees positions < row_ctx[r]), GQA, paged KV. Rows of a tile that belong to different
// sequences (packed steps) are handled as consecutive groups, each with its own block table.
// Work per (row, tile of 32 keys), one warp: lane j computes key j's whole dot product from
// shared memory (no reduction across lanes per key: the earlier layout, one key at a time with
// a 5-shuffle sum each, was latency-bound); one max and one sum across the warp per tile; then
// every lane adds the 32 weighted values for its ceil(head_dim/32) elements. Warp w holds rows
// w, w + 4, w + 8, w + 12 of the group. head_dim <= FP_MAX_HD (every Llama 3 has 64 or 128).
// CPU twin: flash_model.rs (the same tiling on the host); checked against the decode kernel by
// the self-test at context lengths 1 to 4097.
#define FP_ROWS 16
#define FP_KEYS 32  // one key per lane
#define FP_MAX_HD 128
#define FP_ROWS_PER_WARP (FP_ROWS / ATT_WARPS)

template <typename KV>
__device__ __forceinline__ void attn_prefill_impl(
             const KV* __restrict__ kcache, const KV* __restrict__ vcache,
             const float* __restrict__ q, int q_stride, const unsigned int* __restrict__ row_ctx,
             const unsigned int* __restrict__ row_table, const unsigned int* __restrict__ tables,
             float* __restrict__ out, bf16_t* __restrict__ out16, int rows, int n_heads,
             int n_kv_heads, int head_dim, int block_size, float scale) {
    // K rows padded by one float: lane j reads row j, element e at bank (j + e) % 32 — no
    // conflicts. V is read along a row (lanes take consecutive elements).
    __shared__ float s_k[FP_KEYS][FP_MAX_HD + 1];
    __shared__ float s_v[FP_KEYS][FP_MAX_HD];
    __shared__ float s_q[FP_ROWS][FP_MAX_HD];
    int h = blockIdx.y, kvh = h / (n_heads / n_kv_heads);
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int per = (head_dim + 31) / 32;
    int r_end = min(rows, (int)(blockIdx.x + 1) * FP_ROWS);
    for (int g0 = blockIdx.x * FP_ROWS; g0 < r_end;) {
        // The group: rows sharing g0's block table (one sequence; positions increase).
        unsigned int off = row_table[g0];
        int g1 = g0 + 1;
        while (g1 < r_end && row_table[g1] == off) g1++;
        const unsigned int* table = tables + off;
        int n_max = row_ctx[g1 - 1];
        int base = g0 - (int)blockIdx.x * FP_ROWS;  // the group's first row in s_q
        __syncthreads();  // the previous group's last tile is read by every warp
        for (int t = threadIdx.x; t < (g1 - g0) * head_dim; t += blockDim.x) {
            int r = t / head_dim, d = t % head_dim;
            s_q[base + r][d] = q[(u64)(g0 + r) * q_stride + (u64)h * head_dim + d] * scale;
        }
        float acc[FP_ROWS_PER_WARP][MAX_PER_LANE / 2], m[FP_ROWS_PER_WARP], l[FP_ROWS_PER_WARP];
#pragma unroll
        for (int i = 0; i < FP_ROWS_PER_WARP; i++) {
#pragma unroll
            for (int e = 0; e < MAX_PER_LANE / 2; e++) acc[i][e] = 0.f;
            m[i] = -INFINITY;
            l[i] = 0.f;
        }
        for (int p0 = 0; p0 < n_max; p0 += FP_KEYS) {
            __syncthreads();  // every warp is done with the previous tile (and s_q is written)
            for (int t = threadIdx.x; t < FP_KEYS * head_dim; t += blockDim.x) {
                int kk = t / head_dim, d = t % head_dim, p = p0 + kk;
                float kx = 0.f, vx = 0.f;  // past the context: zeros, weighted 0 below
                if (p < n_max) {
                    u64 slot = (u64)table[p / block_size] * block_size + p % block_size;
                    u64 at = (slot * n_kv_heads + kvh) * head_dim + d;
                    kx = kv_load(kcache, at);
                    vx = kv_load(vcache, at);
                }
                s_k[kk][d] = kx;
                s_v[kk][d] = vx;
            }
            __syncthreads();
#pragma unroll
            for (int i = 0; i < FP_ROWS_PER_WARP; i++) {
                int row = g0 + w + ATT_WARPS * i;
                if (row >= g1) continue;  // warp-uniform: a warp holds whole rows
                int n = row_ctx[row];
                if (p0 >= n) continue;  // warp-uniform: nothing of this tile is visible
                const float* qr = s_q[base + (row - g0)];
                int j = p0 + lane;
                float sc = -INFINITY;
                if (j < n) {
                    float d0 = 0.f;
#pragma unroll 8
                    for (int e = 0; e < head_dim; e++) d0 += qr[e] * s_k[lane][e];
                    sc = d0;
                }
                // Position p0 is visible: the tile's maximum is finite.
                float m2 = fmaxf(m[i], warp_max(sc));
                float pw = j < n ? expf(sc - m2) : 0.f;
                float corr = expf(m[i] - m2);
                l[i] = l[i] * corr + warp_sum(pw);
#pragma unroll
                for (int e = 0; e < MAX_PER_LANE / 2; e++) acc[i][e] *= corr;
                int kn = min(FP_KEYS, n - p0);
                for (int kk = 0; kk < kn; kk++) {
                    float pk = __shfl_sync(0xffffffffu, pw, kk);
#pragma unroll
                    for (int e = 0; e < MAX_PER_LANE / 2; e++)
                        if (LANE_OK(e)) acc[i][e] += pk * s_v[kk][lane * per + e];
                }
                m[i] = m2;
            }
        }
#pragma unroll
        for (int i = 0; i < FP_ROWS_PER_WARP; i++) {
            int row = g0 + w + ATT_WARPS * i;
            if (row >= g1) continue;
            u64 o = ((u64)row * n_heads + h) * head_dim + lane * per;
#pragma unroll
            for (int e = 0; e < MAX_PER_LANE / 2; e++) {
                if (!LANE_OK(e)) continue;
                float v = acc[i][e] / l[i];
                out[o + e] = v;
                if (out16) out16[o + e] = f32_to_bf16(v);
            }
        }
        g0 = g1;
    }
}

#define PREFILL_ARGS const float *q, int q_stride, const unsigned int *row_ctx, const unsigned int *row_table, \
    const unsigned int *tables, float *out, bf16_t *out16, int rows, int nh, int nkv, int hd, int bs, float scale
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attn_prefill_bf16(const bf16_t* kc, const bf16_t* vc, PREFILL_ARGS) {
    attn_prefill_impl<bf16_t>(kc, vc, q, q_stride, row_ctx, row_table, tables, out, out16, rows, nh, nkv, hd, bs, scale);
}
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attn_prefill_f32(const float* kc, const float* vc, PREFILL_ARGS) {
    attn_prefill_impl<float>(kc, vc, q, q_stride, row_ctx, row_table, tables, out, out16, rows, nh, nkv, hd, bs, scale);
}
