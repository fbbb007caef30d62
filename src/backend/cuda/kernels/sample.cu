// Sampling on the GPU, the twin of engine::sampler::{sample, sample_masked, token_logprob}: one block of 1024
// threads per logits row; only tokens and log-probs go back to the host (a few bytes per row
// instead of vocab * 4 = 512 KB).
//
// The CPU sorts candidates by (logit desc, id asc) and walks cumulative probabilities. Sorting
// 128K logits per row is avoided here: every "walk to cumulative mass X" is a bisection over the
// logit's order-preserving integer key (passes over the row, which stays in L1/L2), then a walk
// in id order among the tokens tied at the found logit (block-parallel: every thread sums the
// ties in its run of ids, a scan orders the runs; no thread passes over the whole row).
// Decisions are made on f64 probabilities as on the CPU; only the summation order differs, so a
// choice can differ from the CPU's only when the uniform number lands within ~1e-15 (relative)
// of a boundary between two tokens. The bisection's passes weigh tokens with f32 exps and
// settle a step on proven bounds whenever these decide it as the f64 masses would (walk): f64
// exps are left to the rare steps they cannot settle and to walks among tied tokens. Top-k
// counts tokens (integers, no exp).
// Logits with thousands of exact ties (a 13-value grid) give engine::sampler's token too: the
// self-test checks it (0 of 48 rows differ: on an H200 with the all-f64 kernel before the f32
// bounds; on the emulated device with this one).
//
// f64 exps per row at vocab 128256, before (every mass in f64) and after (f32 bounds), counted
// by sample_model.rs (the_f32_path_leaves_almost_no_f64_exps: mean of 48 rows of Llama-like
// logits, N(0, 2.5) plus a strong token every 1009; the log-normalizer's pass included):
//                               f64 exps before   f64 exps after   f32 exps after
//   greedy                              128256                0           128256
//   temperature 1                       389140            11324           471451
//   top-p 0.9                           372873            16032           462035
//   top-k 50 + top-p 0.9, T 0.8         222617                0           128419
// The f64 exps left are those of unsure steps (about 1 walk in 9 here, each one f64 pass over
// the candidates for the exact total); a walk ending on several tied tokens (a coarse grid of
// logits) also sums the total and the mass above the tie in f64.

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

// Min, max or sum of an unsigned int over the block; every thread gets it.
#define RED_MIN 0
#define RED_MAX 1
#define RED_SUM 2
__device__ __forceinline__ unsigned int red_op(unsigned int a, unsigned int b, int op) {
    return op == RED_MIN ? min(a, b) : op == RED_MAX ? max(a, b) : a + b;
}
__device__ unsigned int block_reduce_u(unsigned int v, int op) {
    __shared__ unsigned int s[32];
    for (int o = 16; o > 0; o >>= 1) v = red_op(v, __shfl_xor_sync(0xffffffffu, v, o), op);
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) s[w] = v;
    __syncthreads();
    v = s[0];
    for (int k = 1; k < (int)(blockDim.x >> 5); k++) v = red_op(v, s[k], op);
    __syncthreads();
    return v;
}

// The candidates of a walk: allowed by the mask, and ranked at or above the cut (key, id):
// key > cut_key, or key == cut_key and id <= cut_id.
struct Cands {
    const float* lr;
    const unsigned int* m;
    unsigned int mw;
    int vocab;
    unsigned int cut_key;
    int cut_id;
};

__device__ __forceinline__ bool in_cut(const Cands& c, int j, unsigned int kj) {
    return kj > c.cut_key || (kj == c.cut_key && j <= c.cut_id);
}

// A token's weight as the host has it: exp((l - max) / T) in f64.
__device__ __forceinline__ double w64(float l, float mx, double inv_t) {
    return exp(((double)l - (double)mx) * inv_t);
}

// The same weight on the f32 path: the host's f64 argument x, rounded to f32 (xf), an f32 exp
// of xf, corrected by the rounding (e^(x - xf) = 1 + (x - xf) + O(1e-11)). Relative error at
// most 2^-22 (expf: 2 ulp, CUDA's documented bound, found by tests; F32_REL would still hold at
// 7 ulp) + 2^-24 (the fma's one rounding; e >= e^-87 is a normal float) + 1.5e-11 (|x - xf| <=
// 2^-18 below |x| = 87) < 3.0e-7. Below e^-87 the weight counts 0 (error < 2^-125, absolute;
// every set summed holds the maximum, weight 1, so these are far inside the relative margin);
// outside [-87, 0] (a NaN, or a logit above the maximum: never with finite logits) NaN, which
// settles nothing.
__device__ __forceinline__ float w32(float l, float mx, double inv_t) {
    double x = ((double)l - (double)mx) * inv_t;
    float xf = (float)x;
    if (xf >= -87.f && xf <= 0.f) {
        float e = expf(xf);
        return fmaf(e, (float)(x - (double)xf), e);
    }
    return xf < -87.f ? 0.f : __int_as_float(0x7fc00000);
}

// Candidate mass sum_{key(l) > t} p(l) (strict) in f64: the quantity every decision is made on.
__device__ double mass_above(const Cands& c, unsigned int t, float mx, double inv_t) {
    double s = 0.0;
    for (int j = threadIdx.x; j < c.vocab; j += blockDim.x) {
        if (!allowed(c.m, c.mw, j)) continue;
        float l = c.lr[j];
        unsigned int kj = fkey(l);
        if (in_cut(c, j, kj) && kj > t) s += w64(l, mx, inv_t);
    }
    return block_sum_d(s);
}

// mass_above(t) and the total mass, mass_above(0), in one pass (each token's exp computed
// once); each sum is added in mass_above's order, so both are its values exactly.
__device__ double mass_above_and_total(const Cands& c, unsigned int t, float mx, double inv_t,
                                       double* total) {
    double s = 0.0, a = 0.0;
    for (int j = threadIdx.x; j < c.vocab; j += blockDim.x) {
        if (!allowed(c.m, c.mw, j)) continue;
        float l = c.lr[j];
        unsigned int kj = fkey(l);
        if (!in_cut(c, j, kj) || kj == 0) continue;
        double w = w64(l, mx, inv_t);
        s += w;
        if (kj > t) a += w;
    }
    *total = block_sum_d(s);
    return block_sum_d(a);
}

// Bounds on an f64 mass from the f32 path (see walk), with the pass's count and its nearest
// candidate keys: up, the least above t; down, the greatest at or below t (0 when none).
struct Pass {
    double lo, hi;
    unsigned int n, up, down;
};

// The f32 relative bound (w32's 3.0e-7 plus the f64 sums' ~1e-12, with a margin of 3) and the
// absolute one per token (a weight below e^-87 < 2^-125 counted 0).
#define F32_REL 9.5367431640625e-07    // 2^-20
#define F32_ABS 2.350988701644575e-38  // 2^-125

// One pass over the candidates with key > t: their count and, `weigh`, the bounds on their f64
// mass from f32 weights (no f64 exp).
__device__ Pass pass_above(const Cands& c, unsigned int t, float mx, double inv_t, bool weigh) {
    double s = 0.0;
    unsigned int n = 0, up = 0xffffffffu, down = 0u;
    for (int j = threadIdx.x; j < c.vocab; j += blockDim.x) {
        if (!allowed(c.m, c.mw, j)) continue;
        float l = c.lr[j];
        unsigned int kj = fkey(l);
        if (!in_cut(c, j, kj)) continue;
        if (kj > t) {
            n++;
            up = min(up, kj);
            if (weigh) s += (double)w32(l, mx, inv_t);
        } else {
            down = max(down, kj);
        }
    }
    Pass p;
    s = weigh ? block_sum_d(s) : 0.0;
    p.lo = s * (1.0 - F32_REL);
    p.hi = s * (1.0 + F32_REL) + (double)c.vocab * F32_ABS;
    p.n = block_reduce_u(n, RED_SUM);
    p.up = block_reduce_u(up, RED_MIN);
    p.down = block_reduce_u(down, RED_MAX);
    return p;
}

// How many candidates sit at `key`, and the last of them (-1: none).
__device__ void tied(const Cands& c, unsigned int key, unsigned int* n, int* last) {
    unsigned int cnt = 0;
    int l = -1;
    for (int j = threadIdx.x; j < c.vocab; j += blockDim.x) {
        if (!allowed(c.m, c.mw, j) || fkey(c.lr[j]) != key || !in_cut(c, j, key)) continue;
        cnt++;
        l = j;
    }
    *n = block_reduce_u(cnt, RED_SUM);
    *last = block_reduce_int(l, true);
}

// Each thread's run of ids for the block-parallel walks among tied tokens.
__device__ __forceinline__ void run_of(int vocab, int* j0, int* j1) {
    int chunk = (vocab + (int)blockDim.x - 1) / (int)blockDim.x;
    *j0 = (int)threadIdx.x * chunk;
    *j1 = min(vocab, *j0 + chunk);
}

// The candidate at `pos` (0-based) among those tied at `key`, in id order; past the end, the
// last of them. Block-parallel: each thread counts the ties in its run of ids, a scan orders
// the runs, and the one thread whose run holds `pos` walks it.
__device__ int nth_tied(const Cands& c, unsigned int key, unsigned int pos) {
    __shared__ unsigned int s_scan[SAMPLE_THREADS];
    __shared__ int s_id;
    int j0, j1;
    run_of(c.vocab, &j0, &j1);
    unsigned int cnt = 0;
    int last = -1;
    for (int j = j0; j < j1; j++) {
        if (!allowed(c.m, c.mw, j) || fkey(c.lr[j]) != key || !in_cut(c, j, key)) continue;
        cnt++;
        last = j;
    }
    s_scan[threadIdx.x] = cnt;
    __syncthreads();
    for (int o = 1; o < (int)blockDim.x; o <<= 1) {
        unsigned int add = (int)threadIdx.x >= o ? s_scan[threadIdx.x - o] : 0u;
        __syncthreads();
        s_scan[threadIdx.x] += add;
        __syncthreads();
    }
    unsigned int start = s_scan[threadIdx.x] - cnt;
    int last_all = block_reduce_int(last, true);
    if (threadIdx.x == 0) s_id = last_all;
    __syncthreads();
    if (pos >= start && pos < start + cnt) {
        unsigned int i = start;
        for (int j = j0; j < j1; j++) {
            if (!allowed(c.m, c.mw, j) || fkey(c.lr[j]) != key || !in_cut(c, j, key)) continue;
            if (i == pos) { s_id = j; break; }
            i++;
        }
    }
    __syncthreads();
    return s_id;
}

// Top-k: the k-th candidate in rank order, by counting (no exp): the largest key with at
// least k candidates at or above it, then the right one among the tokens tied there.
__device__ void kth(const Cands& c, unsigned int k, unsigned int* out_key, int* out_id) {
    unsigned int lo = c.cut_key, hi = 0xffffffffu;
    while (lo < hi) {
        unsigned int t = (unsigned int)((((unsigned long long)lo + hi + 1) >> 1) - 1);
        Pass p = pass_above(c, t, 0.f, 0.0, false);
        // See walk for the jumps to the nearest candidate key.
        if (p.n >= k) lo = min(p.up, hi); else hi = max(p.down, lo);
    }
    unsigned int above = lo == 0xffffffffu ? 0u : pass_above(c, lo, 0.f, 0.0, false).n;
    *out_key = lo;
    *out_id = nth_tied(c, lo, k - 1 - above);
}

// A prefix mass passes the target when it exceeds it (the token draw: the host takes the first
// token whose running sum exceeds u * total) or, `ge`, reaches it (the top-p cut: the host keeps
// the shortest prefix with cum / total >= top_p; with equal weights cum == top_p * total happens,
// and the nucleus ends there).
__device__ __forceinline__ bool passes(double mass, double target, bool ge) {
    return ge ? mass >= target : mass > target;
}

// The walk among the candidates tied at `key`, in id order, in f64: the first whose inclusion
// passes `target`, `above` being the mass ranked before them; none (rounding: the target at the
// very end of the mass): the last of them. Block-parallel: each thread sums the ties in its run
// of ids, a scan orders the runs, and the one thread whose run holds the target walks it (no
// thread passes over the whole vocabulary).
__device__ int tie_walk(const Cands& c, unsigned int key, float mx, double inv_t, double target,
                        double above, bool ge) {
    __shared__ double s_scan[SAMPLE_THREADS];
    __shared__ int s_id;
    int j0, j1;
    run_of(c.vocab, &j0, &j1);
    double ms = 0.0;
    int last = -1;
    for (int j = j0; j < j1; j++) {
        if (!allowed(c.m, c.mw, j) || fkey(c.lr[j]) != key || !in_cut(c, j, key)) continue;
        ms += w64(c.lr[j], mx, inv_t);
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
    // The first run whose end passes the target.
    int who = block_reduce_int((ms > 0.0 && passes(start + ms, target, ge)) ? (int)threadIdx.x : (int)blockDim.x, false);
    int last_all = block_reduce_int(last, true);
    if (threadIdx.x == 0) s_id = last_all;
    __syncthreads();
    if ((int)threadIdx.x == who) {
        double cum = start;
        for (int j = j0; j < j1; j++) {
            if (!allowed(c.m, c.mw, j) || fkey(c.lr[j]) != key || !in_cut(c, j, key)) continue;
            double pj = w64(c.lr[j], mx, inv_t);
            if (passes(cum + pj, target, ge)) { s_id = j; break; }
            cum += pj;
        }
    }
    __syncthreads();
    return s_id;
}

// The token at which the cumulative mass (in rank order, among the candidates) first passes
// `scale * total`, total being the f64 mass of every candidate, known here only as bounds
// [t_lo, t_hi] from an f32 pass. Returns its (key, id).
//
// The key is the largest K whose mass at or above it passes the target, found by bisection
// over the keys. Each step is "does the f64 mass above t pass the f64 target?", and is settled
// on f32 bounds when they settle it: the f32 pass (w32, summed in f64) is within F32_REL
// (relative, 3x the worst case) plus F32_ABS per token (absolute) of the f64 mass the old
// all-f64 kernel computed (f64 exp: 1 ulp; each f64 sum of at most vocab/1024 + 10 levels:
// ~1e-14 relative at 128k), whatever its order of summation: so when the f32 bounds on the mass
// lie wholly above (or below) the bounds on the target, the f64 comparison gives that answer
// too. Otherwise (the target within about 1e-6 of a boundary: a fraction ~1e-6 x candidates
// of the walks) the step is decided on the f64 masses themselves, computing the f64 total
// once. Each step thus takes the branch the all-f64 walk takes, and the token is its token.
// The f64 mass only grows as the key threshold falls (its sums add non-negative terms in a
// fixed order; NaN logits aside), so the largest passing key does not depend on which keys are
// tried: a step jumps to the nearest candidate key on its side (no key in between changes the
// mass), which saves the ~15 steps the bisection would spend between two adjacent tokens' keys.
// Among the tokens tied at the key, a single one is the token whatever the masses; several
// (rare with continuous logits) are walked in f64.
__device__ void walk(const Cands& c, float mx, double inv_t, double scale, double t_lo,
                     double t_hi, bool ge, unsigned int* out_key, int* out_id) {
    double tlo = scale * t_lo, thi = scale * t_hi;  // the f64 target lies in [tlo, thi]
    bool exact = false;
    unsigned int lo = c.cut_key, hi = 0xffffffffu;  // the key sought lies in [lo, hi]
    while (lo < hi) {
        unsigned int t = (unsigned int)((((unsigned long long)lo + hi + 1) >> 1) - 1);
        Pass p = pass_above(c, t, mx, inv_t, true);
        bool yes;
        if (p.lo > thi) {
            yes = true;
        } else if (p.hi < tlo) {
            yes = false;
        } else {
            double mass;
            if (!exact) {
                double total;
                mass = mass_above_and_total(c, t, mx, inv_t, &total);
                tlo = thi = scale * total;
                exact = true;
            } else {
                mass = mass_above(c, t, mx, inv_t);
            }
            yes = passes(mass, tlo, ge);
        }
        if (yes) lo = min(p.up, hi); else hi = max(p.down, lo);
    }
    unsigned int key = lo, n;
    int last;
    tied(c, key, &n, &last);
    *out_key = key;
    if (n == 1) {
        // The f64 walk takes it if its inclusion passes the target, and the last tied token,
        // itself, if not.
        *out_id = last;
        return;
    }
    double above;
    if (!exact) {
        double total;
        above = mass_above_and_total(c, key, mx, inv_t, &total);
        tlo = scale * total;
    } else {
        above = mass_above(c, key, mx, inv_t);
    }
    *out_id = tie_walk(c, key, mx, inv_t, tlo, above, ge);
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_rows(const float* __restrict__ logits, int vocab, const SampleRow* __restrict__ params,
            const unsigned int* __restrict__ stage, int max_top, unsigned int* __restrict__ out_token, float* __restrict__ out_logprob,
            unsigned int* __restrict__ out_top_id, float* __restrict__ out_top_lp) {
    int row = blockIdx.x;
    const float* lr = logits + (u64)row * vocab;
    SampleRow p = params[row];
    // Max and argmax (ties: lowest id), and the log-normalizer: f32 weights (w32) summed in f64,
    // within 3.1e-7 relative of the host's f64 sum, i.e. within 3.1e-7 absolute in the log-probs
    // (the self-test's tolerance: 1e-4).
    float bv = -INFINITY;
    int bi = -1;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) better(bv, bi, lr[j], j);
    block_best(bv, bi);
    double se = 0.0;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) se += (double)w32(lr[j], bv, 1.0);
    // Log-probs are those of the raw distribution, mask or not (as on the host).
    double norm = (double)bv + log(block_sum_d(se));

    // The mask: candidates, their count and their best (the sampling's maximum).
    const unsigned int* m = p.mask_words ? stage + p.mask_off : nullptr;
    unsigned int mw = p.mask_words;
    int n_allowed = vocab;
    float mx = bv;
    int tok = bi;
    if (m != nullptr) {
        unsigned int cnt = 0;
        float av = -INFINITY;
        int ai = -1;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x)
            if (allowed(m, mw, j)) { cnt++; better(av, ai, lr[j], j); }
        n_allowed = (int)block_reduce_u(cnt, RED_SUM);
        block_best(av, ai);
        if (n_allowed == 0) m = nullptr;  // the host's rule: the unmasked argmax
        else { mx = av; tok = ai; }
    }
    // One allowed token is taken without sampling (grammar-forced).
    if (!(p.temperature == 0.f || p.top_k == 1 || n_allowed == 1)) {
        double inv_t = 1.0 / (double)p.temperature;
        Cands c;
        c.lr = lr;
        c.m = m;
        c.mw = mw;
        c.vocab = vocab;
        c.cut_key = 0;
        c.cut_id = vocab - 1;
        // Top-k: the k-th ranked token is the cut (everything ranked at or above it stays).
        if (p.top_k > 0 && p.top_k < (unsigned int)n_allowed) kth(c, p.top_k, &c.cut_key, &c.cut_id);
        unsigned int k_key;
        int k_id;
        if (p.top_p < 1.f) {
            // Smallest prefix whose mass reaches top_p * total; its last token is the new cut.
            Pass total = pass_above(c, 0, mx, inv_t, true);
            walk(c, mx, inv_t, (double)p.top_p, total.lo, total.hi, true, &k_key, &k_id);
            c.cut_key = k_key;
            c.cut_id = k_id;
        }
        Pass total = pass_above(c, 0, mx, inv_t, true);
        walk(c, mx, inv_t, uniform01(p.seed, p.n), total.lo, total.hi, false, &k_key, &k_id);
        tok = k_id;
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
