//! Per-request sampling: greedy, temperature, top-k, top-p; log-probs of the raw distribution.
//!
//! The random number for a request's n-th token is a pure function of (seed, n): a counter-based
//! generator, so a request's tokens never depend on the batch, on preemption, or on which rank or
//! device samples (a GPU sampler computes the same number).

use super::request::{SamplingParams, TokenLogprob};

/// splitmix64 finalizer: a strong 64-bit mix.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// Uniform number in [0, 1) for token `n` of the stream `seed`.
pub fn uniform(seed: u64, n: u64) -> f64 {
    let r = mix64(
        mix64(seed)
            ^ n.wrapping_mul(0x9e3779b97f4a7c15)
                .wrapping_add(0x632be59bd9b4e019),
    );
    (r >> 11) as f64 / (1u64 << 53) as f64
}

/// A fresh seed for requests that name none.
pub fn random_seed(salt: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    mix64(t ^ mix64(salt ^ std::process::id() as u64))
}

/// An order-preserving map of a logit to u32, reversed so that ascending keys mean descending
/// logits. -0.0 counts as +0.0, as a float comparison has it.
fn descending_key(v: f32) -> u32 {
    let v = if v == 0.0 { 0.0 } else { v };
    let b = v.to_bits();
    let ascending = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    !ascending
}

/// Index of the largest logit; ties go to the lowest id.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// log-softmax normalizer: `logsumexp(logits)` in f64.
pub fn log_normalizer(logits: &[f32]) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln()
}

/// The `n` most likely tokens with their log-probs, most likely first (ties: lower id first).
pub fn top_logprobs(logits: &[f32], norm: f64, n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return Vec::new();
    }
    let cmp = |a: &u32, b: &u32| {
        logits[*b as usize]
            .partial_cmp(&logits[*a as usize])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(b))
    };
    idx.select_nth_unstable_by(n - 1, cmp);
    idx.truncate(n);
    idx.sort_by(cmp);
    idx.into_iter()
        .map(|i| (i, (logits[i as usize] as f64 - norm) as f32))
        .collect()
}

/// Choose the next token. `n` is how many tokens this request has generated so far.
pub fn sample(logits: &[f32], p: &SamplingParams, seed: u64, n: u64) -> u32 {
    if p.temperature == 0.0 || p.top_k == 1 {
        return argmax(logits);
    }
    let inv_t = 1.0 / p.temperature as f64;
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let weight = |i: u32| ((logits[i as usize] as f64 - max) * inv_t).exp();
    // Candidates in a total order: most likely first, ties to the lower id. As u64 keys
    // (descending logit in the high half, id in the low half) they sort several times faster
    // than through a float comparator.
    let mut keys: Vec<u64> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| ((descending_key(v) as u64) << 32) | i as u64)
        .collect();
    if p.top_k > 0 && p.top_k < keys.len() {
        keys.select_nth_unstable(p.top_k - 1);
        keys.truncate(p.top_k);
    }
    let mut idx: Vec<u32> = Vec::new();
    // Mass of every candidate, and how much of it the sorted prefix must hold before the answer
    // is known: top_p of it (nucleus), else all of it.
    let total: f64 = keys.iter().map(|&k| weight(k as u32)).sum();
    let u = uniform(seed, n);
    let nucleus = p.top_p < 1.0;
    // Sorting all 128k candidates costs ~10 ms per token: sort growing prefixes instead (the
    // answer nearly always lies in the first few hundred). The result equals a full sort's.
    let len = keys.len();
    let mut k = 256.min(len);
    loop {
        if k < len {
            keys.select_nth_unstable(k - 1);
        }
        keys[..k].sort_unstable();
        idx.clear();
        idx.extend(keys[..k].iter().map(|&key| key as u32));
        let probs: Vec<f64> = idx[..k].iter().map(|&i| weight(i)).collect();
        let mut cum = 0.0;
        let mut kept = None;
        if nucleus {
            // Smallest prefix whose share of the mass reaches top_p (at least one token).
            for (j, q) in probs.iter().enumerate() {
                cum += q;
                if cum / total >= p.top_p as f64 {
                    kept = Some((j + 1, cum));
                    break;
                }
            }
        } else if k == len {
            kept = Some((k, total));
        } else {
            // Without a nucleus the walk can stop as soon as the prefix passes the target.
            let target = u * total;
            for (j, q) in probs.iter().enumerate() {
                cum += q;
                if target < cum {
                    return idx[j];
                }
            }
        }
        if let Some((keep, mass)) = kept {
            let target = u * mass;
            let mut cum = 0.0;
            for (j, q) in probs[..keep].iter().enumerate() {
                cum += q;
                if target < cum {
                    return idx[j];
                }
            }
            return idx[keep - 1];
        }
        if k == len {
            // Rounding left the nucleus a hair short of top_p: keep everything.
            let target = u * cum;
            let mut c = 0.0;
            for (j, q) in probs.iter().enumerate() {
                c += q;
                if target < c {
                    return idx[j];
                }
            }
            return idx[k - 1];
        }
        k = (k * 8).min(len);
    }
}

/// Log-prob report for a chosen token.
pub fn token_logprob(logits: &[f32], token: u32, top_n: usize) -> TokenLogprob {
    let norm = log_normalizer(logits);
    TokenLogprob {
        token_id: token,
        logprob: (logits[token as usize] as f64 - norm) as f32,
        top: top_logprobs(logits, norm, top_n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, top_p: f32, top_k: usize) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_p,
            top_k,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_picks_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]), 1);
        assert_eq!(sample(&[0.0, 3.0, 1.0], &params(0.0, 1.0, 0), 1, 0), 1);
    }

    #[test]
    fn uniform_is_uniform_enough_and_deterministic() {
        let xs: Vec<f64> = (0..10000).map(|n| uniform(42, n)).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        assert!(xs.iter().all(|&x| (0.0..1.0).contains(&x)));
        assert_eq!(uniform(42, 7), uniform(42, 7));
        assert_ne!(uniform(42, 7), uniform(43, 7));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax([ln 1, ln 3]) = [0.25, 0.75]
        let logits = [0f32, 3f32.ln()];
        let n = 20000;
        let ones = (0..n)
            .filter(|&i| sample(&logits, &params(1.0, 1.0, 0), 9, i) == 1)
            .count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [5.0f32, 4.0, 0.0, -1.0];
        for i in 0..500 {
            let t = sample(&logits, &params(1.0, 1.0, 2), 3, i);
            assert!(t < 2);
            // p(0) = 0.72, p(1) = 0.27: top_p 0.5 keeps only token 0.
            assert_eq!(sample(&logits, &params(1.0, 0.5, 0), 3, i), 0);
        }
    }

    /// The plain algorithm: sort everything, cut top-k and top-p, walk the cumulative mass.
    fn sample_by_full_sort(logits: &[f32], p: &SamplingParams, seed: u64, n: u64) -> u32 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_by(|a, b| {
            logits[*b as usize]
                .partial_cmp(&logits[*a as usize])
                .unwrap()
                .then(a.cmp(b))
        });
        if p.top_k > 0 {
            idx.truncate(p.top_k);
        }
        let max = logits[idx[0] as usize] as f64;
        let w: Vec<f64> = idx
            .iter()
            .map(|&i| ((logits[i as usize] as f64 - max) / p.temperature as f64).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let mut keep = w.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (j, q) in w.iter().enumerate() {
                cum += q;
                if cum / total >= p.top_p as f64 {
                    keep = j + 1;
                    break;
                }
            }
        }
        let mass: f64 = w[..keep].iter().sum();
        let target = uniform(seed, n) * mass;
        let mut cum = 0.0;
        for (j, q) in w[..keep].iter().enumerate() {
            cum += q;
            if target < cum {
                return idx[j];
            }
        }
        idx[keep - 1]
    }

    #[test]
    fn growing_prefixes_choose_what_a_full_sort_chooses() {
        // A flat-ish distribution over 5000 tokens, so answers often lie beyond the first prefix.
        let logits: Vec<f32> = (0..5000u32)
            .map(|i| ((i * 7919) % 1000) as f32 / 400.0)
            .collect();
        for (t, top_p, top_k) in [
            (1.0, 1.0, 0),
            (1.0, 0.9, 0),
            (0.7, 0.95, 0),
            (1.3, 1.0, 3000),
            (1.0, 0.5, 40),
        ] {
            let p = params(t, top_p, top_k);
            let mut differ = 0;
            for n in 0..300 {
                let (a, b) = (
                    sample(&logits, &p, 5, n),
                    sample_by_full_sort(&logits, &p, 5, n),
                );
                // Sums taken in another order may move a draw that sits on a boundary.
                if a != b {
                    differ += 1;
                }
            }
            assert!(
                differ <= 1,
                "t {t} top_p {top_p} top_k {top_k}: {differ} of 300 draws differ"
            );
        }
    }

    #[test]
    fn descending_keys_order_like_floats() {
        let v = [3.5f32, -1.0, 0.0, -0.0, 1.0, f32::NEG_INFINITY, -3.5, 1e-30];
        let mut by_key: Vec<usize> = (0..v.len()).collect();
        by_key.sort_by_key(|&i| ((descending_key(v[i]) as u64) << 32) | i as u64);
        let mut by_float: Vec<usize> = (0..v.len()).collect();
        by_float.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap().then(a.cmp(&b)));
        assert_eq!(by_key, by_float);
    }

    #[test]
    fn logprobs_are_normalized() {
        let logits = [1.0f32, 2.0, 3.0];
        let lp = token_logprob(&logits, 2, 3);
        let s: f64 = lp.top.iter().map(|(_, l)| (*l as f64).exp()).sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert_eq!(lp.top[0].0, 2);
        assert!((lp.logprob - lp.top[0].1).abs() < 1e-7);
    }
}
