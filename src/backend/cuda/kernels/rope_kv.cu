// RoPE (Meta's interleaved pairs, per-pair inv_freq: Llama 3.1 scaling is folded into the table)
// fused with the write of K and V into the paged cache (bf16).
// One block per token row; threads over (head, pair). The input is the fused QKV GEMM's output,
// each row [q (n_heads heads) | k | v (n_kv_heads heads each)], f32. Bytes per token: read q, k,
// v, write q, k back rotated, write k, v to the cache in bf16.
// Cache layout per layer: [slot, kv_head, head_dim], slot = block * block_size + offset: the same
// as the CPU backend, so a token's K for all heads is one contiguous run.
template <typename KV>
__device__ void rope_store_kv_impl(float* __restrict__ qkv,
                                   const float* __restrict__ inv_freq,
                                   const unsigned int* __restrict__ positions,
                                   const long long* __restrict__ slots,
                                   KV* __restrict__ kcache, KV* __restrict__ vcache,
                                   int n_heads, int n_kv_heads, int head_dim) {
    int row = blockIdx.x;
    float pos = (float)positions[row];
    int half = head_dim / 2;
    float* qr = qkv + (u64)row * (n_heads + 2 * n_kv_heads) * head_dim;
    float* kr = qr + n_heads * head_dim;
    const float* vr = kr + n_kv_heads * head_dim;
    // A negative slot is a padding row of a decode graph: rotated, never stored.
    long long slot = slots[row];
    u64 base = slot < 0 ? 0 : (u64)slot * n_kv_heads * head_dim;
    for (int t = threadIdx.x; t < n_heads * half; t += blockDim.x) {
        int h = t / half, i = t % half;
        // The angle is rounded to f32 before sin/cos, as the CPU backend and torch do;
        // precise sincosf (no fast math) so the rotation matches the CPU to f32 rounding.
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        float* p = qr + h * head_dim + 2 * i;
        float a = p[0], b = p[1];
        p[0] = a * c - b * s;
        p[1] = a * s + b * c;
        if (h < n_kv_heads && slot >= 0) {
            float* pk = kr + h * head_dim + 2 * i;
            float ka = pk[0], kb = pk[1];
            float k0 = ka * c - kb * s, k1 = ka * s + kb * c;
            pk[0] = k0;
            pk[1] = k1;
            u64 at = base + h * head_dim + 2 * i;
            kv_store(kcache, at, k0);
            kv_store(kcache, at + 1, k1);
            const float* pv = vr + h * head_dim + 2 * i;
            kv_store(vcache, at, pv[0]);
            kv_store(vcache, at + 1, pv[1]);
        }
    }
}

#define ROPE_ARGS float *qkv, const float *inv_freq, \
    const unsigned int *positions, const long long *slots
extern "C" __global__ void rope_store_kv_bf16(ROPE_ARGS, bf16_t* kc, bf16_t* vc, int nh, int nkv, int hd) {
    rope_store_kv_impl<bf16_t>(qkv, inv_freq, positions, slots, kc, vc, nh, nkv, hd);
}
extern "C" __global__ void rope_store_kv_f32(ROPE_ARGS, float* kc, float* vc, int nh, int nkv, int hd) {
    rope_store_kv_impl<float>(qkv, inv_freq, positions, slots, kc, vc, nh, nkv, hd);
}
