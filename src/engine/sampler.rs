//! Per-request sampling: greedy, temperature, top-k, top-p; log-probs of the raw distribution.
//!
//! The random number for a request's n-th token is a pure function of (seed, n): a counter-based
//! generator, so a request's tokens never depend on the batch, on preemption, or on which rank or
//! device samples (a GPU sampler computes the same number).
//!
//! The rule (kept verbatim in `reference.rs`, the specification): candidates are all tokens, or
//! the `top_k` first in rank order (logit descending, ties to the lower id); weights are
//! `exp((logit - max) / T)` in f64; `total` is their sum; with `top_p < 1` the nucleus is the
//! shortest rank-order prefix whose running sum `cum` reaches `cum / total >= top_p`, and the token
//! is the first whose running sum exceeds `u * cum(nucleus)` (`u * total` without a nucleus).
//!
//! Sorting 128k candidates for that walk cost milliseconds per token. The walk only needs the
//! candidates near where the running sum crosses its target, so the fast paths select instead of
//! sorting (see `ranked.rs`, `vocab.rs`): a small top-k is collected in one pass; otherwise one
//! pass buckets every token by weight and sums each bucket's weight with a fast exp, and only the
//! bucket where a crossing happens is gathered and sorted. Sums the fast paths cannot reproduce
//! bit for bit (the rule's order of addition) are carried as proven bounds; a decision within a
//! bound's width of a boundary (about 1e-10 of the mass; rarely ever) goes to the exact path,
//! which follows the rule to the letter. So the token is the rule's token, always.

use super::request::{SamplingParams, TokenLogprob};
use ranked::{sum_slack, tri, Buckets, Found, Ranked, Span, Walk};

mod ranked;
#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;
mod vocab;

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

/// Index of the largest logit; ties go to the lowest id. NaN logits are passed over, except a NaN
/// at index 0, which wins (a comparison with it is never true).
pub fn argmax(logits: &[f32]) -> u32 {
    match logits.first() {
        None => 0,
        Some(v) if v.is_nan() => 0,
        Some(_) => vocab::position_of(logits, vocab::max_nan(logits).0) as u32,
    }
}

/// log-softmax normalizer: `logsumexp(logits)` in f64.
pub fn log_normalizer(logits: &[f32]) -> f64 {
    // The maximum as a fold with f32::max finds it (NaN passed over); the sign of a zero maximum
    // changes neither the sum nor the result.
    let max = vocab::max_nan(logits).0 as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln()
}

/// The `n` most likely tokens with their log-probs, most likely first (ties: lower id first), in
/// rank order as [`sample`] ranks (a NaN logit ranks by its sign bit: above +inf, or below -inf).
pub fn top_logprobs(logits: &[f32], norm: f64, n: usize) -> Vec<(u32, f32)> {
    let n = n.min(logits.len());
    if n == 0 {
        return Vec::new();
    }
    // One pass collects the first n (None: a NaN logit); else select among all keys.
    let mut keys = (n < logits.len())
        .then(|| vocab::top_keys(logits, n))
        .flatten()
        .unwrap_or_else(|| {
            let mut keys: Vec<u64> = (0..logits.len()).map(|i| ranked::key(logits, i)).collect();
            keys.select_nth_unstable(n - 1);
            keys.truncate(n);
            keys
        });
    keys.sort_unstable();
    keys.into_iter()
        .map(|k| {
            let i = k as u32;
            (i, (logits[i as usize] as f64 - norm) as f32)
        })
        .collect()
}

/// Choose the next token. `n` is how many tokens this request has generated so far.
pub fn sample(logits: &[f32], p: &SamplingParams, seed: u64, n: u64) -> u32 {
    if p.temperature == 0.0 || p.top_k == 1 || logits.is_empty() {
        return argmax(logits);
    }
    let rule = Rule {
        inv_t: 1.0 / p.temperature as f64,
        top_p: p.top_p,
        u: uniform(seed, n),
    };
    let len = logits.len();
    let fast = if !(rule.inv_t > 0.0 && rule.inv_t.is_finite()) || len > u32::MAX as usize {
        None
    } else if p.top_k > 0 && p.top_k < len {
        // Beyond some thousands of candidates, collecting and sorting them costs more than the
        // exact path's one selection over the keys (measured: k 5000 still faster, 20000 not).
        (p.top_k <= TOP_K_COLLECT)
            .then(|| top_k(logits, p.top_k, &rule))
            .flatten()
    } else {
        whole_vocab(logits, &rule)
    };
    fast.unwrap_or_else(|| exact(logits, p.top_k, &rule))
}

/// Choose the next token among `allowed` (ascending ids; a structured output's mask), as
/// [`sample`] would with every other logit at -inf: those weigh nothing and rank last, so the
/// candidates, sums and walk are the same over the allowed tokens alone, in id order (ties still
/// go to the lower id). One allowed token is taken without sampling (grammar-forced). (Where
/// rounding would walk the full row off its end, onto a forbidden token, this ends on the last
/// allowed one.) The engine never passes an empty `allowed`; it would get the unmasked argmax.
pub fn sample_masked(
    logits: &[f32],
    allowed: &[u32],
    p: &SamplingParams,
    seed: u64,
    n: u64,
) -> u32 {
    match allowed {
        [] => argmax(logits),
        [only] => *only,
        _ => {
            let picked: Vec<f32> = allowed.iter().map(|&t| logits[t as usize]).collect();
            allowed[sample(&picked, p, seed, n) as usize]
        }
    }
}

/// Largest top-k the one-pass collector takes; a larger one goes to the exact path.
const TOP_K_COLLECT: usize = 8192;

/// One row's sampling rule.
struct Rule {
    inv_t: f64,
    top_p: f32,
    /// The uniform number of this token.
    u: f64,
}

/// Top-k with `k` below the vocabulary: the k candidates collected in one pass, their weights and
/// prefix sums computed as specified; only `total`, which the rule sums in the order a selection
/// left the keys in, is known as bounds. `None`: NaN or infinite logits, or a bound too wide.
fn top_k(logits: &[f32], k: usize, rule: &Rule) -> Option<u32> {
    let keys = vocab::top_keys(logits, k)?;
    let first = *keys.iter().min()?;
    let max = logits[first as u32 as usize];
    if !max.is_finite() {
        return None;
    }
    // The first candidate holds the row's maximum, the rule's `max`.
    let max = max as f64;
    let sum: f64 = keys
        .iter()
        .map(|&key| ((logits[key as u32 as usize] as f64 - max) * rule.inv_t).exp())
        .sum();
    let slack = sum_slack(k);
    let total = Span {
        lo: sum * (1.0 - slack),
        hi: sum * (1.0 + slack),
    };
    decide(&mut Ranked::one(logits, max, rule.inv_t, keys), total, rule)
}

thread_local! {
    /// Per-thread buffers of [`whole_vocab`]: token buckets, bucket masses and their running sums.
    static SCRATCH: std::cell::RefCell<(Vec<u16>, Vec<f64>, Vec<f64>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Every token a candidate: one pass buckets the tokens by weight and sums each bucket with a
/// fast exp (`vocab.rs`); a walk gathers and sorts only the buckets where its test may flip.
/// `None`: NaN or infinite logits, or a decision too close to a boundary for the bounds.
fn whole_vocab(logits: &[f32], rule: &Rule) -> Option<u32> {
    let (max, nan) = vocab::max_nan(logits);
    if nan || !max.is_finite() {
        return None;
    }
    let max = max as f64;
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.try_borrow_mut().ok()?;
        let (of_token, mass, cum) = &mut *scratch;
        of_token.resize(logits.len(), 0);
        mass.clear();
        mass.resize(vocab::MASS_LEN, 0.0);
        let mass: &mut [f64; vocab::MASS_LEN] = mass.as_mut_slice().try_into().ok()?;
        vocab::histogram(logits, max, rule.inv_t, of_token, mass);
        let mass = &mass[..vocab::BUCKETS];
        cum.clear();
        let mut c = 0.0;
        cum.extend(mass.iter().map(|&m| {
            c += m;
            c
        }));
        let n = logits.len();
        let buckets = Buckets {
            of_token,
            mass,
            cum,
            // The fast exp's error, and the rounding of the bucket sums.
            rel: vocab::EXP_ERR + sum_slack(n + vocab::BUCKETS),
            // The tail tokens, none of them summed (at most every token).
            abs: (n + 1) as f64 * vocab::TAIL_WEIGHT,
        };
        // The rule's sums (total in token order, prefix sums in rank order) against the real ones.
        let slack = sum_slack(n);
        let total = Span {
            lo: (c * (1.0 - buckets.rel) - buckets.abs).max(0.0) * (1.0 - slack),
            hi: (c * (1.0 + buckets.rel) + buckets.abs) * (1.0 + slack),
        };
        decide(
            &mut Ranked::buckets(logits, max, rule.inv_t, buckets, slack),
            total,
            rule,
        )
    })
}

/// The rule to the letter: candidates and `total` as specified, then the walk over them sorted
/// lazily. Rows with NaN or infinite logits, and decisions the fast paths' bounds cannot settle.
fn exact(logits: &[f32], top_k: usize, rule: &Rule) -> u32 {
    #[cfg(test)]
    tests::EXACT_RUNS.with(|c| c.set(c.get() + 1));
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let weight = |i: u32| ((logits[i as usize] as f64 - max) * rule.inv_t).exp();
    let mut keys: Vec<u64> = (0..logits.len()).map(|i| ranked::key(logits, i)).collect();
    if top_k > 0 && top_k < keys.len() {
        keys.select_nth_unstable(top_k - 1);
        keys.truncate(top_k);
    }
    let total: f64 = keys.iter().map(|&k| weight(k as u32)).sum();
    let mut ranked = Ranked::one(logits, max, rule.inv_t, keys);
    // With exact spans every test answers yes or no: the walk is never unsure.
    let token = decide(&mut ranked, Span::exact(total), rule);
    debug_assert!(token.is_some(), "the exact walk was unsure");
    token.unwrap_or_else(|| ranked.last_id())
}

/// The rule's two walks over ranked candidates whose `total` lies in the given span. `None` when a
/// bound leaves the answer open.
fn decide(r: &mut Ranked, total: Span, rule: &Rule) -> Option<u32> {
    if rule.top_p < 1.0 {
        let p = rule.top_p as f64;
        // The nucleus ends near mass p total, and the token lies near u times that.
        r.prefetch(&[p * total.hi, rule.u * p * total.hi]);
        // The nucleus ends at the first prefix with `cum / total >= top_p`.
        let keep = |s: Span| tri(s.lo / total.hi >= p, s.hi / total.lo >= p);
        match r.walk(&keep, None) {
            Walk::Found(f) => pick(r, f.sum.scale(rule.u), Some(f)),
            // Rounding left the whole list a hair short of top_p: all of it is the nucleus.
            Walk::End { sum } => pick(r, sum.scale(rule.u), None),
            Walk::Stop | Walk::Unsure => None,
        }
    } else {
        pick(r, total.scale(rule.u), None)
    }
}

/// The first candidate whose prefix sum exceeds `target`; if none does before the nucleus' last
/// candidate `keep` (or at all), that candidate (or the last).
fn pick(r: &mut Ranked, target: Span, keep: Option<Found>) -> Option<u32> {
    let exceeds = |s: Span| tri(target.hi < s.lo, target.lo < s.hi);
    match r.walk(&exceeds, keep.map(|f| f.pos)) {
        Walk::Found(f) => Some(f.id),
        Walk::Stop => keep.map(|f| f.id),
        Walk::End { .. } => Some(r.last_id()),
        Walk::Unsure => None,
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
