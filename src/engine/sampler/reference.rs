//! The sampler and the log-prob report as they were before the selection-based fast paths (commit
//! 06b8087), kept verbatim as the specification they must match token for token, bit for bit.

#![cfg(test)]

use super::{descending_key, uniform};
use crate::engine::request::{SamplingParams, TokenLogprob};

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

/// Log-prob report for a chosen token.
pub fn token_logprob(logits: &[f32], token: u32, top_n: usize) -> TokenLogprob {
    let norm = log_normalizer(logits);
    TokenLogprob {
        token_id: token,
        logprob: (logits[token as usize] as f64 - norm) as f32,
        top: top_logprobs(logits, norm, top_n),
    }
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
