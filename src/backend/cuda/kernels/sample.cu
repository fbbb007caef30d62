// Sampling on the GPU, the twin of engine::sampler::{sample, sample_masked, token_logprob}: one block of 1024
// threads per logits row; only tokens and log-probs go back to the host (a few bytes per row
// instead of vocab * 4 = 512 KB).
//
// The CPU sorts candidates by (logit desc, id asc) and walks cumulative probabilities. Sorting
// 128K logits per row is avoided here: every "walk to cumulative mass X" is a bisection over the
// logit's order-preserving integer key (32 passes over the row, which stays in L1/L2), then a walk
// in id order among the tokens tied at the found logit (block-parallel: every thread sums the
// ties in its run of ids, a scan orders the runs; no thread passes over the whole row).
// Probabilities are f64 as on the CPU; only the summation order differs, so a choice can differ
// from the CPU's only when the uniform number lands within ~1e-15 (relative) of a boundary
// between two tokens.
// Logits with thousands of exact ties (a 13-value grid) give engine::sampler's token too: the
// self-test checks it (0 of 48 rows differ, on the emulated device and on an H200).

#define SAMPLE_THREADS 1024

struct SampleRow {
    float temperature;
    float top_p;
    unsigned int top_k;   // 0 = off
    unsigned int n_top;   // top log-probs wanted (<= max_top)
    u64 seed;
    u64 n;                // tokens this request generated so far
    // Structured outputs: the allowed-token bitmask (bit j of word j/32 = token j) at word
    // `mask_off` of the staging buffer, `mask_words` words; mask_words 0 = every token allowed.
    unsigned int mask_off;
    unsigned int mask_words;
};

// The row's mask (nullptr: all allowed). A disallowed token is no candidate at all, as if its
// logit were -inf: it weighs nothing and ranks last (engine::sampler::sample_masked).
__device__ __forceinline__ bool allowed(const unsigned int* m, unsigned int mw, int j) {
    if (m == nullptr) return true;
    unsigned int w = (unsigned int)j >> 5;
    return w < mw && ((m[w] >> (j & 31)) & 1u);
}

__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Identical to engine::sampler::uniform.
__device__ double uniform01(u64 seed, u64 n) {
    u64 r = mix64(mix64(seed) ^ (n * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull));
    return (double)(r >> 11) / 9007199254740992.0;
}

// Order-preserving key of a float: a > b  <=>  key(a) > key(b). -0 and +0 get one key, as they
// compare equal on the host.
__device__ __forceinline__ unsigned int fkey(float f) {
    unsigned int u = (f == 0.f) ? 0u : __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// (value, id) ranking: larger value first, then lower id. Returns the better of two.
__device__ __forceinline__ void better(float& v, int& i, float v2, int i2) {
    if (v2 > v || (v2 == v && i2 < i) || i < 0) { v = v2; i = i2; }
}

__device__ void block_best(float& v, int& i) {
    __shared__ float sv[32];
    __shared__ int si[32];
    for (int o = 16; o > 0; o >>= 1) {
        float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        int i2 = __shfl_xor_sync(0xffffffffu, i, o);
        if (i2 >= 0) better(v, i, v2, i2);
    }
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) { sv[w] = v; si[w] = i; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int k = 1; k < (int)(blockDim.x >> 5); k++)
            if (si[k] >= 0) better(sv[0], si[0], sv[k], si[k]);
    }
    __syncthreads();
    v = sv[0];
    i = si[0];
}

// Min (or max) of an int over the block; every thread gets it.
__device__ int block_reduce_int(int v, bool want_max) {
    __shared__ int s[32];
    for (int o = 16; o > 0; o >>= 1) {
        int v2 = __shfl_xor_sync(0xffffffffu, v, o);
        v = want_max ? max(v, v2) : min(v, v2);
    }
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) s[w] = v;
    __syncthreads();
    v = s[0];
    for (int k = 1; k < (int)(blockDim.x >> 5); k++) v = want_max ? max(v, s[k]) : min(v, s[k]);
    __syncthreads();
    return v;
}

// Candidate mass sum_{key(l) > t} p(l) (strict) over the row, with p = exp((l - max) / T).
__device__ double mass_above(const float* lr, const unsigned int* m, unsigned int mw, int vocab,
                             unsigned int t, float mx, double inv_t, unsigned int cut_key,
                             int cut_id) {
    double s = 0.0;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        if (!allowed(m, mw, j)) continue;
        unsigned int kj = fkey(lr[j]);
        bool cand = kj > cut_key || (kj == cut_key && j <= cut_id);
        if (cand && kj > t) s += exp(((double)lr[j] - (double)mx) * inv_t);
    }
    return block_sum_d(s);
}

// The token at which the cumulative mass (in rank order, among candidates) first reaches
// `target`: returns (its key, its id) and the mass ranked before it in *before.
// Candidates: rank <= (cut_key, cut_id), i.e. key > cut_key, or key == cut_key and id <= cut_id.
__device__ void walk_to(const float* lr, const unsigned int* m, unsigned int mw, int vocab, float mx, double inv_t, unsigned int cut_key,
                        int cut_id, double target, unsigned int* out_key, int* out_id,
                        double* before) {
    // Largest key K with mass(key >= K) > target, by bisection over [cut_key, 0xffffffff].
    unsigned long long lo = cut_key, hi = 0xffffffffull;  // answer key in [lo, hi]
    while (lo < hi) {
        unsigned long long mid = (lo + hi + 1) >> 1;
        double mm = mass_above(lr, m, mw, vocab, (unsigned int)(mid - 1), mx, inv_t, cut_key, cut_id);
        // mass(key >= mid) > target  => the answer's key is >= mid
        if (mm > target) lo = mid; else hi = mid - 1;
    }
    unsigned int key = (unsigned int)lo;
    double above = (key == 0xffffffffu) ? 0.0 : mass_above(lr, m, mw, vocab, key, mx, inv_t, cut_key, cut_id);
    // Among the candidates tied at `key`, walk in id order, block-parallel: each thread sums the
    // ties of its own run of ids, a scan orders the runs, and the one thread whose run holds the
    // target walks it (no thread passes over the whole vocabulary).
    __shared__ double s_scan[SAMPLE_THREADS];
    __shared__ int s_id;
    __shared__ double s_before;
    int chunk = (vocab + (int)blockDim.x - 1) / (int)blockDim.x;
    int j0 = (int)threadIdx.x * chunk, j1 = min(vocab, j0 + chunk);
    double ms = 0.0;
    int last = -1;
    for (int j = j0; j < j1; j++) {
        if (!allowed(m, mw, j) || fkey(lr[j]) != key || (key == cut_key && j > cut_id)) continue;
        ms += exp(((double)lr[j] - (double)mx) * inv_t);
        last = j;
    }
    // Inclusive scan of the runs' masses in thread (= id) order.
    s_scan[threadIdx.x] = ms;
    __syncthreads();
    for (int o = 1; o < (int)blockDim.x; o <<= 1) {
        double add = (int)threadIdx.x >= o ? s_scan[threadIdx.x - o] : 0.0;
        __syncthreads();
        s_scan[threadIdx.x] += add;
        __syncthreads();
    }
    double start = above + (s_scan[threadIdx.x] - ms);
    double total = s_scan[blockDim.x - 1];
    // The first run whose end passes the target; when none does (rounding: the target at the
    // very end of the mass), the last tied id with everything before it.
    int who = block_reduce_int((ms > 0.0 && target < start + ms) ? (int)threadIdx.x : (int)blockDim.x, false);
    int last_all = block_reduce_int(last, true);
    if (threadIdx.x == 0) {
        s_id = last_all;
        s_before = above + total;
    }
    __syncthreads();
    if ((int)threadIdx.x == who) {
        double cum = start;
        for (int j = j0; j < j1; j++) {
            if (!allowed(m, mw, j) || fkey(lr[j]) != key || (key == cut_key && j > cut_id)) continue;
            double pj = exp(((double)lr[j] - (double)mx) * inv_t);
            if (target < cum + pj) { s_id = j; s_before = cum; break; }
            cum += pj;
        }
    }
    __syncthreads();
    *out_key = key;
    *out_id = s_id;
    *before = s_before;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_rows(const float* __restrict__ logits, int vocab, const SampleRow* __restrict__ params,
            const unsigned int* __restrict__ stage, int max_top, unsigned int* __restrict__ out_token, float* __restrict__ out_logprob,
            unsigned int* __restrict__ out_top_id, float* __restrict__ out_top_lp) {
    int row = blockIdx.x;
    const float* lr = logits + (u64)row * vocab;
    SampleRow p = params[row];
    // Max and argmax (ties: lowest id), and the log-normalizer in f64 like the CPU.
    float bv = -INFINITY;
    int bi = -1;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) better(bv, bi, lr[j], j);
    block_best(bv, bi);
    double se = 0.0;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) se += exp((double)lr[j] - (double)bv);
    // Log-probs are those of the raw distribution, mask or not (as on the host).
    double norm = (double)bv + log(block_sum_d(se));

    // The mask: candidates, their count and their best (the sampling's maximum).
    const unsigned int* m = p.mask_words ? stage + p.mask_off : nullptr;
    unsigned int mw = p.mask_words;
    int n_allowed = vocab;
    float mx = bv;
    int tok = bi;
    if (m != nullptr) {
        double cnt = 0.0;
        float av = -INFINITY;
        int ai = -1;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x)
            if (allowed(m, mw, j)) { cnt += 1.0; better(av, ai, lr[j], j); }
        n_allowed = (int)block_sum_d(cnt);
        block_best(av, ai);
        if (n_allowed == 0) m = nullptr;  // the host's rule: the unmasked argmax
        else { mx = av; tok = ai; }
    }
    // One allowed token is taken without sampling (grammar-forced).
    if (!(p.temperature == 0.f || p.top_k == 1 || n_allowed == 1)) {
        double inv_t = 1.0 / (double)p.temperature;
        // Top-k: the k-th ranked token is the cut (everything ranked at or above it stays).
        unsigned int cut_key = 0;
        int cut_id = vocab - 1;
        double total;
        unsigned int k_key;
        int k_id;
        double before;
        if (p.top_k > 0 && p.top_k < (unsigned int)n_allowed) {
            // Walking with unit mass per token: reuse walk_to with inv_t = 0 (every p = 1).
            walk_to(lr, m, mw, vocab, mx, 0.0, 0, vocab - 1, (double)p.top_k - 0.5, &k_key, &k_id, &before);
            cut_key = k_key;
            cut_id = k_id;
        }
        total = mass_above(lr, m, mw, vocab, 0, mx, inv_t, cut_key, cut_id);
        if (p.top_p < 1.f) {
            // Smallest prefix whose mass reaches top_p * total.
            walk_to(lr, m, mw, vocab, mx, inv_t, cut_key, cut_id, (double)p.top_p * total, &k_key, &k_id, &before);
            // walk_to finds the token whose inclusion reaches the target: it is the last kept.
            cut_key = k_key;
            cut_id = k_id;
            total = mass_above(lr, m, mw, vocab, 0, mx, inv_t, cut_key, cut_id);
        }
        double target = uniform01(p.seed, p.n) * total;
        unsigned int t_key;
        int t_id;
        walk_to(lr, m, mw, vocab, mx, inv_t, cut_key, cut_id, target, &t_key, &t_id, &before);
        tok = t_id;
    }
    if (threadIdx.x == 0) {
        out_token[row] = (unsigned int)tok;
        out_logprob[row] = (float)((double)lr[tok] - norm);
    }
    // Top log-probs: n_top passes of "best below the previous one" in rank order.
    float pv = INFINITY;
    int pi = -1;
    for (int t = 0; t < max_top; t++) {
        float v = -INFINITY;
        int i = -1;
        if (t < (int)p.n_top) {
            for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
                float lj = lr[j];
                bool below = pi < 0 || lj < pv || (lj == pv && j > pi);
                if (below) better(v, i, lj, j);
            }
        }
        block_best(v, i);
        if (threadIdx.x == 0) {
            out_top_id[(u64)row * max_top + t] = (unsigned int)(i < 0 ? 0 : i);
            out_top_lp[(u64)row * max_top + t] = i < 0 ? -INFINITY : (float)((double)v - norm);
        }
        pv = v;
        pi = i;
    }
}
