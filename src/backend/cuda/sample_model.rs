//! A sequential Rust port of the algorithm in `kernels/sample.cu` (bisection over the logits'
//! order-preserving keys instead of a sort), tested against the host sampler. It checks the
//! *algorithm* without a GPU; the CUDA code itself is checked by the self-test on a GPU.
//!
//! Two paths: `Path::F32`, the kernel as it is (top-k counted in integers, each bisection step
//! settled by f32 bounds where they can, by f64 masses where they cannot), and `Path::F64`, the
//! same walks with every mass in f64 (the kernel as it was). Their tokens must be equal in every
//! case: the f32 path only ever takes a branch the f64 computation would take.

#![cfg(test)]

use std::cell::Cell;

thread_local! {
    /// Exponentials computed so far on this thread: (f64, f32).
    static EXPS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    /// Bisection steps the f32 bounds could not settle (each one an f64 pass).
    static UNSURE: Cell<u64> = const { Cell::new(0) };
}

/// Relative bound (kernel: F32_REL) on the f32 path's mass against the f64 path's; see sample.cu
/// for the derivation (about 3e-7 in the worst case; 2^-20 leaves a margin of 3).
const F32_REL: f64 = 1.0 / (1u64 << 20) as f64;
/// Absolute bound per token (kernel: F32_ABS): a weight below e^-87 counts 0 on the f32 path.
const F32_ABS: f64 = 2.350_988_701_644_575e-38; // 2^-125

fn fkey(f: f32) -> u32 {
    // -0 and +0 compare equal on the host (partial_cmp): give them one key.
    let u = if f == 0.0 { 0 } else { f.to_bits() };
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

/// `exp(x)` as the f64 path has it (counted).
fn w64(x: f64) -> f64 {
    EXPS.with(|c| c.set((c.get().0 + 1, c.get().1)));
    x.exp()
}

/// `exp(x)` on the f32 path (kernel: w32): an f32 exp of the rounded argument, corrected by the
/// rounding (e^(x - xf) ~ 1 + (x - xf)); 0 below e^-87, NaN outside [-87, 0] otherwise (never
/// settles a decision).
fn w32(x: f64) -> f64 {
    EXPS.with(|c| c.set((c.get().0, c.get().1 + 1)));
    let xf = x as f32;
    if (-87.0..=0.0).contains(&xf) {
        let e = xf.exp();
        (e + e * (x - xf as f64) as f32) as f64
    } else if xf < -87.0 {
        0.0
    } else {
        f64::NAN
    }
}

/// The walks' test: a prefix mass passes `target` when it exceeds it (the token draw: the host
/// takes the first token whose running sum exceeds `u * total`) or, `ge`, reaches it (the top-p
/// cut: the host keeps the shortest prefix with `cum / total >= top_p`; with exactly equal
/// weights, `cum == top_p * total` happens and must end the nucleus there).
fn passes(mass: f64, target: f64, ge: bool) -> bool {
    if ge {
        mass >= target
    } else {
        mass > target
    }
}

/// Bounds on an f64 value: it lies in `[lo, hi]` (NaN bounds settle nothing).
#[derive(Clone, Copy)]
struct Bound {
    lo: f64,
    hi: f64,
}

struct Row<'a> {
    l: &'a [f32],
    /// The row's mask (bit j of word j / 32); `None`: every token allowed.
    m: Option<&'a [u32]>,
    mx: f32,
    inv_t: f64,
    cut_key: u32,
    cut_id: usize,
    /// Check every settled f32 decision against the f64 one (uncounted).
    check: bool,
    /// The f32 path's relative bound (F32_REL; a larger one leaves more steps to f64).
    rel: f64,
}

impl Row<'_> {
    fn x(&self, j: usize) -> f64 {
        (self.l[j] as f64 - self.mx as f64) * self.inv_t
    }
    fn allowed(&self, j: usize) -> bool {
        self.m
            .is_none_or(|m| m.get(j / 32).is_some_and(|w| w >> (j % 32) & 1 == 1))
    }
    fn cand(&self, j: usize) -> bool {
        if !self.allowed(j) {
            return false;
        }
        let k = fkey(self.l[j]);
        k > self.cut_key || (k == self.cut_key && j <= self.cut_id)
    }
    fn above(&self, t: u32) -> impl Iterator<Item = usize> + '_ {
        (0..self.l.len()).filter(move |&j| self.cand(j) && fkey(self.l[j]) > t)
    }
    fn mass_above(&self, t: u32) -> f64 {
        self.above(t).map(|j| w64(self.x(j))).sum()
    }
    /// `mass_above(t)` and the total, `mass_above(0)`, from one exp per candidate (kernel:
    /// mass_above_and_total); each sum in `mass_above`'s order.
    fn mass_above_and_total(&self, t: u32) -> (f64, f64) {
        let (mut above, mut total) = (0.0, 0.0);
        for j in self.above(0) {
            let w = w64(self.x(j));
            total += w;
            if fkey(self.l[j]) > t {
                above += w;
            }
        }
        (above, total)
    }
    fn mass_bound(&self, t: u32) -> Bound {
        let s: f64 = self.above(t).map(|j| w32(self.x(j))).sum();
        Bound {
            lo: s * (1.0 - self.rel),
            hi: s * (1.0 + self.rel) + self.l.len() as f64 * F32_ABS,
        }
    }
    fn count_above(&self, t: u32) -> usize {
        self.above(t).count()
    }
    /// Candidates at `key`, in id order.
    fn tied(&self, key: u32) -> Vec<usize> {
        (0..self.l.len())
            .filter(|&j| self.cand(j) && fkey(self.l[j]) == key)
            .collect()
    }

    /// The walk with every mass in f64: (key, id) of the token where the cumulative mass in
    /// rank order first exceeds `target` (`ge`: first reaches it).
    fn walk_to(&self, target: f64, ge: bool) -> (u32, usize) {
        let (mut lo, mut hi) = (self.cut_key as u64, 0xffff_ffffu64);
        while lo < hi {
            let mid = (lo + hi + 1) >> 1;
            if passes(self.mass_above((mid - 1) as u32), target, ge) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let key = lo as u32;
        self.tie_walk(key, target, self.mass_above(key), ge)
    }

    /// Among the candidates tied at `key`, in id order, the one whose inclusion passes `target`
    /// (`above`: the mass ranked before them).
    fn tie_walk(&self, key: u32, target: f64, above: f64, ge: bool) -> (u32, usize) {
        let mut cum = above;
        let mut last = None;
        for j in 0..self.l.len() {
            if !self.allowed(j) || fkey(self.l[j]) != key {
                continue;
            }
            if key == self.cut_key && j > self.cut_id {
                break;
            }
            let pj = w64(self.x(j));
            last = Some(j);
            if passes(cum + pj, target, ge) {
                return (key, j);
            }
            cum += pj;
        }
        (key, last.unwrap_or(0))
    }

    /// The same walk to `scale * total` (total: the f64 mass of every candidate), each bisection
    /// step settled by f32 bounds where they can, else by the f64 masses (kernel: walk).
    fn walk(&self, scale: f64, total: Bound, ge: bool) -> (u32, usize) {
        let (mut tlo, mut thi) = (scale * total.lo, scale * total.hi);
        let mut exact = false;
        let (mut lo, mut hi) = (self.cut_key as u64, 0xffff_ffffu64);
        while lo < hi {
            let mid = (lo + hi + 1) >> 1;
            let t = (mid - 1) as u32;
            let b = self.mass_bound(t);
            let yes = if b.lo > thi {
                true
            } else if b.hi < tlo {
                false
            } else {
                UNSURE.with(|c| c.set(c.get() + 1));
                let mass = if exact {
                    self.mass_above(t)
                } else {
                    let (mass, total) = self.mass_above_and_total(t);
                    tlo = scale * total;
                    (thi, exact) = (tlo, true);
                    mass
                };
                passes(mass, tlo, ge)
            };
            (lo, hi) = self.narrow((lo, hi), t, yes);
            if self.check {
                // What the f64 kernel decides here (not counted).
                let saved = EXPS.with(|c| c.get());
                let target = scale * self.mass_above(0);
                let f64_yes = passes(self.mass_above(t), target, ge);
                assert_eq!(yes, f64_yes, "f32 bound wrong at key {t:#x}");
                EXPS.with(|c| c.set(saved));
            }
        }
        let key = lo as u32;
        // One candidate at the key: it is the token whatever the masses (the f64 walk takes it
        // when its inclusion passes the target, and the last tied token when none does).
        if let [only] = self.tied(key)[..] {
            return (key, only);
        }
        let above = if exact {
            self.mass_above(key)
        } else {
            let (above, total) = self.mass_above_and_total(key);
            tlo = scale * total;
            above
        };
        self.tie_walk(key, tlo, above, ge)
    }

    /// The bisection's next interval after testing "candidates with key > t pass" (`yes`: the
    /// key sought is above t, else at most t), with lo at most the key sought. Jumps to the
    /// nearest candidate key on that side (kernel: the same pass finds them): no key in between
    /// changes the mass, so the key sought, the largest that passes, is a candidate's key (or
    /// lo when none passes), whatever keys the bisection tests.
    fn narrow(&self, (lo, hi): (u64, u64), t: u32, yes: bool) -> (u64, u64) {
        let keys = (0..self.l.len())
            .filter(|&j| self.cand(j))
            .map(|j| fkey(self.l[j]));
        if yes {
            let up = keys.filter(|&k| k > t).min().map_or(hi, |k| k as u64);
            (up.min(hi), hi)
        } else {
            let down = keys.filter(|&k| k <= t).max().map_or(lo, |k| k as u64);
            (lo, down.max(lo))
        }
    }

    /// The `k`-th candidate in rank order (1-based), by counting (kernel: top-k).
    fn kth(&self, k: usize) -> (u32, usize) {
        let (mut lo, mut hi) = (self.cut_key as u64, 0xffff_ffffu64);
        while lo < hi {
            let t = ((lo + hi + 1) >> 1) - 1;
            (lo, hi) = self.narrow((lo, hi), t as u32, self.count_above(t as u32) >= k);
        }
        let key = lo as u32;
        let above = if key == u32::MAX {
            0
        } else {
            self.count_above(key)
        };
        let tied = self.tied(key);
        // Past the end (never with finite logits): the last of them, as the kernel.
        let pos = (k - 1).checked_sub(above).unwrap_or(usize::MAX);
        let pos = pos.min(tied.len().saturating_sub(1));
        (key, tied.get(pos).copied().unwrap_or(0))
    }
}

/// How the walks decide: every mass in f64, or on f32 bounds (with this relative bound) where
/// they settle the step.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    F64,
    F32(f64),
}

/// The kernel's choice for one row; `m`: the row's mask (structured outputs); `check`: assert
/// that every step the f32 bounds settle goes the way the f64 masses would.
#[allow(clippy::too_many_arguments)]
fn sample(
    l: &[f32],
    m: Option<&[u32]>,
    temperature: f32,
    top_p: f32,
    top_k: usize,
    u: f64,
    path: Path,
    check: bool,
) -> u32 {
    let mut row = Row {
        l,
        m,
        mx: 0.0,
        inv_t: 0.0,
        cut_key: 0,
        cut_id: l.len() - 1,
        check,
        rel: match path {
            Path::F32(rel) => rel,
            Path::F64 => 0.0,
        },
    };
    // The best allowed token (ties: lowest id) and how many are allowed; none allowed: the
    // unmasked argmax, as the host does.
    let n_allowed = (0..l.len()).filter(|&j| row.allowed(j)).count();
    if n_allowed == 0 {
        row.m = None;
    }
    let best = (0..l.len())
        .filter(|&j| row.allowed(j))
        .fold(None, |b: Option<usize>, j| match b {
            Some(b) if l[j] > l[b] => Some(j),
            Some(b) => Some(b),
            None => Some(j),
        })
        .unwrap_or(0);
    let n_allowed = if row.m.is_some() { n_allowed } else { l.len() };
    if temperature == 0.0 || top_k == 1 || n_allowed == 1 {
        return best as u32;
    }
    row.mx = l[best];
    if top_k > 0 && top_k < n_allowed {
        let (k, i) = match path {
            Path::F64 => row.walk_to(top_k as f64 - 0.5, false),
            Path::F32(_) => row.kth(top_k),
        };
        row.cut_key = k;
        row.cut_id = i;
    }
    row.inv_t = 1.0 / temperature as f64;
    match path {
        Path::F64 => {
            let mut total = row.mass_above(0);
            if top_p < 1.0 {
                let (k, i) = row.walk_to(top_p as f64 * total, true);
                row.cut_key = k;
                row.cut_id = i;
                total = row.mass_above(0);
            }
            row.walk_to(u * total, false).1 as u32
        }
        Path::F32(_) => {
            if top_p < 1.0 {
                let (k, i) = row.walk(top_p as f64, row.mass_bound(0), true);
                row.cut_key = k;
                row.cut_id = i;
            }
            row.walk(u, row.mass_bound(0), false).1 as u32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fkey, sample, Path, Row, EXPS, F32_REL, UNSURE};
    use crate::engine::{sampler, SamplingParams};

    struct Rng(u64);
    impl Rng {
        fn bits(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 11
        }
        /// Uniform in [-1, 1).
        fn f(&mut self) -> f32 {
            ((self.bits() >> 22) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        }
        /// Roughly normal (sum of uniforms).
        fn normal(&mut self) -> f32 {
            (0..4).map(|_| self.f()).sum::<f32>() * 0.87
        }
    }

    /// One row checked three ways: the host sampler, the kernel's walks in f64 and on f32 bounds
    /// (every settled decision checked against f64).
    fn check_row(l: &[f32], words: Option<&[u32]>, t: f32, p: f32, k: usize, seed: u64, n: u64) {
        let params = SamplingParams {
            temperature: t,
            top_p: p,
            top_k: k,
            ..Default::default()
        };
        let want = match words {
            None => sampler::sample(l, &params, seed, n),
            Some(w) => {
                let allowed: Vec<u32> = (0..l.len() as u32)
                    .filter(|&j| w[j as usize / 32] >> (j % 32) & 1 == 1)
                    .collect();
                sampler::sample_masked(l, &allowed, &params, seed, n)
            }
        };
        let u = sampler::uniform(seed, n);
        let old = sample(l, words, t, p, k, u, Path::F64, false);
        let new = sample(l, words, t, p, k, u, Path::F32(F32_REL), true);
        // Most steps left to f64: the fallback's walks.
        let fallback = sample(l, words, t, p, k, u, Path::F32(0.5), true);
        let what = format!(
            "seed {seed} n {n} t {t} p {p} k {k} mask {}",
            words.is_some()
        );
        assert_eq!(old, want, "f64 kernel vs host: {what}");
        assert_eq!(new, want, "f32 kernel vs host: {what}");
        assert_eq!(
            fallback, want,
            "f32 kernel with f64 fallbacks vs host: {what}"
        );
    }

    #[test]
    fn the_kernels_algorithm_matches_the_host_sampler() {
        let mut rng = Rng(12345);
        let vocab: usize = 500;
        let mut checked = 0;
        for r in 0..300u64 {
            // Some rows with ties (quantized logits) to exercise the id-order walk.
            let mut l: Vec<f32> = (0..vocab).map(|_| rng.f() * 5.0).collect();
            if r % 3 == 0 {
                l.iter_mut().for_each(|x| *x = (*x * 2.0).round() / 2.0);
            }
            let (t, p, k) = match r % 5 {
                0 => (1.0, 1.0, 0),
                1 => (0.7, 1.0, 20),
                2 => (1.0, 0.9, 0),
                3 => (1.3, 0.8, 50),
                _ => (0.5, 1.0, 0),
            };
            for n in 0..5u64 {
                check_row(&l, None, t, p, k, r, n);
                // Masked (structured outputs): dense, sparse (fewer than top-k) and one token.
                let mut words = vec![0u32; vocab.div_ceil(32)];
                let hash =
                    |j: u64| (j ^ (r << 20 | n << 40)).wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
                for j in 0..vocab {
                    let keep = match r % 3 {
                        0 => hash(j as u64) % 2 == 0,
                        1 => hash(j as u64) % 40 == 0,
                        _ => j == (r as usize * 7) % vocab,
                    };
                    if keep {
                        words[j / 32] |= 1 << (j % 32);
                    }
                }
                check_row(&l, Some(&words), t, p, k, r, n);
                checked += 1;
            }
        }
        assert_eq!(checked, 1500);
    }

    /// Distributions at the edges of the f32 bounds: sharp and flat rows, temperatures far from
    /// 1 (many weights below e^-87, or all within a hair of each other), ties, -inf logits, top-k
    /// and top-p at their extremes, masks.
    #[test]
    fn the_f32_bounds_never_change_a_token() {
        let mut rng = Rng(777);
        let vocab: usize = 2048;
        let configs: &[(f32, f32, usize)] = &[
            (1.0, 1.0, 0),
            (1.0, 0.9, 0),
            (0.8, 0.95, 40),
            (1.0, 0.999_999, 0),
            (1.0, 1e-6, 0),
            (1.0, 1.0, 2),
            (1.0, 1.0, 2047),
            (0.7, 0.5, 1000),
            (50.0, 0.9, 0),
            (1e4, 1.0, 0),
            (1e4, 0.3, 100),
            (0.01, 1.0, 0),
            (0.01, 0.9, 30),
            (1e-4, 0.99, 0),
        ];
        let mut rows = 0;
        for shape in 0..7 {
            for (ci, &(t, p, k)) in configs.iter().enumerate() {
                let seed = shape * 100 + ci as u64;
                let l: Vec<f32> = (0..vocab)
                    .map(|j| match shape {
                        // Llama-like: a bell with a few strong tokens.
                        0 => rng.normal() * 2.5 + if j % 97 == 0 { 8.0 } else { 0.0 },
                        // Sharp: one token far above the rest.
                        1 => rng.f() * 3.0 + if j == 1234 { 40.0 } else { 0.0 },
                        // Flat: every logit within 1e-3 of each other.
                        2 => 1.0 + rng.f() * 1e-3,
                        // Exactly flat.
                        3 => 0.25,
                        // Ties on a coarse grid.
                        4 => (rng.f() * 6.0).round(),
                        // Huge spread (exps from 1 down to underflow) and some -inf.
                        5 if j % 13 == 0 => f32::NEG_INFINITY,
                        5 => rng.f() * 300.0,
                        // Ties in the bf16 grid, as a bf16 lm_head would give.
                        _ => f32::from_bits((rng.normal() * 3.0).to_bits() & 0xffff_0000),
                    })
                    .collect();
                let mut words = vec![0u32; vocab.div_ceil(32)];
                for j in 0..vocab {
                    if !rng.bits().is_multiple_of(3) {
                        words[j / 32] |= 1 << (j % 32);
                    }
                }
                for n in 0..8 {
                    check_row(&l, None, t, p, k, seed, n);
                    check_row(&l, Some(&words), t, p, k, seed, n);
                    rows += 2;
                }
            }
        }
        assert_eq!(rows, 7 * configs.len() * 16);
    }

    /// Rows built so that the draw lands within a hair (the f32 rounding of a logit, ~1e-7
    /// relative) of the boundary between the two first tokens: the f32 bounds must leave those
    /// steps to f64 (with no margin, f32 masses decide some of them the wrong way).
    #[test]
    fn draws_a_hair_from_a_boundary_are_left_to_f64() {
        let mut unsure = 0;
        for seed in 0..3000u64 {
            let u = sampler::uniform(seed, 0);
            if !(0.02..0.98).contains(&u) {
                continue;
            }
            // Weights 1 and w with 1 = u (1 + w): the first token's mass is the target.
            let w = 1.0 / u - 1.0;
            let mut l = vec![w.ln() as f32, 0.0];
            l.extend((0..30).map(|j| -20.0 - j as f32));
            UNSURE.with(|c| c.set(0));
            check_row(&l, None, 1.0, 1.0, 0, seed, 0);
            check_row(&l, None, 1.0, 0.999, 0, seed, 0);
            unsure += UNSURE.with(|c| c.get());
        }
        assert!(unsure > 100, "only {unsure} steps near the boundary");
    }

    /// The f32 bounds hold on every prefix of sharp, flat and spread rows, and are needed: the
    /// f32 masses differ from the f64 ones.
    #[test]
    fn the_f32_masses_lie_within_their_bounds() {
        let mut rng = Rng(4242);
        let (mut worst, mut differ) = (0f64, 0);
        for shape in 0..4 {
            let l: Vec<f32> = (0..4096)
                .map(|_| match shape {
                    0 => rng.normal() * 2.5,
                    1 => rng.f() * 1e-3,
                    2 => rng.f() * 90.0,
                    _ => rng.normal() * 30.0,
                })
                .collect();
            for inv_t in [1.0, 0.01, 100.0] {
                let mx = l.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let row = Row {
                    l: &l,
                    m: None,
                    mx,
                    inv_t,
                    cut_key: 0,
                    cut_id: l.len() - 1,
                    check: false,
                    rel: F32_REL,
                };
                for q in 0..64 {
                    let t = fkey(l[q * 61 % l.len()]) - 1;
                    let (b, m) = (row.mass_bound(t), row.mass_above(t));
                    assert!(b.lo <= m && m <= b.hi, "{} <= {m} <= {}", b.lo, b.hi);
                    let rel = (b.lo / (1.0 - F32_REL) - m).abs() / m;
                    worst = worst.max(rel);
                    differ += (rel > 0.0) as usize;
                }
            }
        }
        assert!(worst < F32_REL / 2.0, "worst relative error {worst}");
        assert!(differ > 100, "f32 masses equal to f64 ones: {differ}");
    }

    /// f64 exponentials per row, before (every mass in f64) and after, at vocab 128256 on
    /// Llama-like logits; the f32 path settles nearly every bisection step. Prints the table in
    /// sample.cu (run with --nocapture).
    #[test]
    fn the_f32_path_leaves_almost_no_f64_exps() {
        let vocab = 128_256;
        let mut rng = Rng(99);
        let configs: &[(&str, f32, f32, usize)] = &[
            ("temperature", 1.0, 1.0, 0),
            ("top-p 0.9", 1.0, 0.9, 0),
            ("top-k 50 + top-p 0.9", 0.8, 0.9, 50),
        ];
        let rows = 48;
        for &(name, t, p, k) in configs {
            let (mut old, mut new, mut new32, mut unsure) = (0, 0, 0, 0);
            for r in 0..rows {
                let l: Vec<f32> = (0..vocab)
                    .map(|j| rng.normal() * 2.5 + if j % 1009 == 0 { 9.0 } else { 0.0 })
                    .collect();
                let u = sampler::uniform(r, 3);
                let count = |path| {
                    EXPS.with(|c| c.set((0, 0)));
                    UNSURE.with(|c| c.set(0));
                    let tok = sample(&l, None, t, p, k, u, path, false);
                    (tok, EXPS.with(|c| c.get()), UNSURE.with(|c| c.get()))
                };
                let (a, e_old, _) = count(Path::F64);
                let (b, e_new, un) = count(Path::F32(F32_REL));
                assert_eq!(a, b, "{name} row {r}");
                old += e_old.0;
                new += e_new.0;
                new32 += e_new.1;
                unsure += un;
            }
            println!(
                "{name}: f64 exps per row {} -> {}, f32 exps {}, unsure steps {}",
                old / rows,
                new / rows,
                new32 / rows,
                unsure as f64 / rows as f64
            );
            // The f64 passes left are the rare unsure steps' (and never more than before).
            assert!(new <= old / 4, "{name}: {new} f64 exps against {old}");
        }
    }
}
