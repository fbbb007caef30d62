//! A sequential Rust port of the tiled prefill kernel in `kernels/attention.cu` (rows in tiles
//! of FP_ROWS, keys through "shared memory" FP_KEYS at a time, an online softmax per row),
//! tested against a plain softmax attention. It checks the *algorithm* without a GPU: that
//! tiling the keys and merging them online gives the attention every row must see, at context
//! lengths around the tile and block sizes; the kernel itself is checked against the decode
//! kernel by the self-test.

#![cfg(test)]

const FP_ROWS: usize = 16;
const FP_KEYS: usize = 32;

/// One head: `q[rows][hd]` (row r sees positions `< ctx[r]`), keys/values `[pos][hd]` of one
/// sequence reached through `table` (block ids of `block_size` positions) in a paged pool.
#[allow(clippy::too_many_arguments)]
fn flash(
    q: &[f32],
    ctx: &[usize],
    pool_k: &[f32],
    pool_v: &[f32],
    table: &[usize],
    block_size: usize,
    hd: usize,
    scale: f32,
) -> Vec<f32> {
    let rows = ctx.len();
    let mut out = vec![0f32; rows * hd];
    let mut s_k = vec![0f32; FP_KEYS * hd];
    let mut s_v = vec![0f32; FP_KEYS * hd];
    for t0 in (0..rows).step_by(FP_ROWS) {
        let t1 = (t0 + FP_ROWS).min(rows);
        let n_max = ctx[t1 - 1];
        let mut m = vec![f32::NEG_INFINITY; t1 - t0];
        let mut l = vec![0f32; t1 - t0];
        let mut acc = vec![0f32; (t1 - t0) * hd];
        for p0 in (0..n_max).step_by(FP_KEYS) {
            // The tile's keys and values, looked up in the paged pool once for all its rows.
            for kk in 0..FP_KEYS.min(n_max - p0) {
                let p = p0 + kk;
                let slot = table[p / block_size] * block_size + p % block_size;
                s_k[kk * hd..(kk + 1) * hd].copy_from_slice(&pool_k[slot * hd..(slot + 1) * hd]);
                s_v[kk * hd..(kk + 1) * hd].copy_from_slice(&pool_v[slot * hd..(slot + 1) * hd]);
            }
            for r in t0..t1 {
                let i = r - t0;
                let kn = FP_KEYS.min(ctx[r].saturating_sub(p0));
                if kn == 0 {
                    continue;
                }
                // As a warp does it: every visible key's score (one per lane), the tile's
                // maximum, one rescale of the running sums, then the weighted values.
                let s: Vec<f32> = (0..kn)
                    .map(|kk| {
                        (0..hd)
                            .map(|e| q[r * hd + e] * scale * s_k[kk * hd + e])
                            .sum()
                    })
                    .collect();
                let m2 = s.iter().fold(m[i], |a, &b| a.max(b));
                let p: Vec<f32> = s.iter().map(|&x| (x - m2).exp()).collect();
                let corr = (m[i] - m2).exp();
                l[i] = l[i] * corr + p.iter().sum::<f32>();
                for e in 0..hd {
                    let a = &mut acc[i * hd + e];
                    *a *= corr;
                    for (kk, &pk) in p.iter().enumerate() {
                        *a += pk * s_v[kk * hd + e];
                    }
                }
                m[i] = m2;
            }
        }
        for r in t0..t1 {
            let i = r - t0;
            for e in 0..hd {
                out[r * hd + e] = acc[i * hd + e] / l[i];
            }
        }
    }
    out
}

#[test]
fn tiled_online_softmax_equals_plain_attention_at_tile_and_block_edges() {
    let (hd, bs) = (8, 16);
    let mut seed = 0x9e37_79b9u64;
    let mut rnd = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    };
    for ctx_end in [1usize, 15, 16, 17, 1000, 4097] {
        let blocks = ctx_end.div_ceil(bs);
        // Pages in reverse order, so a wrong lookup shows.
        let table: Vec<usize> = (0..blocks).rev().collect();
        let pool_k: Vec<f32> = (0..blocks * bs * hd).map(|_| rnd()).collect();
        let pool_v: Vec<f32> = (0..blocks * bs * hd).map(|_| rnd()).collect();
        let rows = ctx_end.min(21);
        let ctx: Vec<usize> = (ctx_end - rows + 1..=ctx_end).collect();
        let q: Vec<f32> = (0..rows * hd).map(|_| rnd()).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let got = flash(&q, &ctx, &pool_k, &pool_v, &table, bs, hd, scale);
        for (r, &n) in ctx.iter().enumerate() {
            let at = |p: usize| (table[p / bs] * bs + p % bs) * hd;
            let s: Vec<f64> = (0..n)
                .map(|p| {
                    (0..hd)
                        .map(|e| (q[r * hd + e] * scale * pool_k[at(p) + e]) as f64)
                        .sum()
                })
                .collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
            for e in 0..hd {
                let want: f64 = (0..n)
                    .map(|p| (s[p] - mx).exp() / z * pool_v[at(p) + e] as f64)
                    .sum();
                let g = got[r * hd + e] as f64;
                assert!(
                    (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "context {ctx_end}, row {r}, element {e}: {g} vs {want}"
                );
            }
        }
    }
}
