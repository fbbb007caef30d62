//! A sequential Rust port of the algorithm in `kernels/sample.cu` (bisection over the logits'
//! order-preserving keys instead of a sort), tested against the host sampler. It checks the
//! *algorithm* without a GPU; the CUDA code itself is checked by the self-test on a GPU.

#![cfg(test)]

fn fkey(f: f32) -> u32 {
    // -0 and +0 compare equal on the host (partial_cmp): give them one key.
    let u = if f == 0.0 { 0 } else { f.to_bits() };
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

struct Row<'a> {
    l: &'a [f32],
    /// The row's mask (bit j of word j / 32); `None`: every token allowed.
    m: Option<&'a [u32]>,
    mx: f32,
    inv_t: f64,
    cut_key: u32,
    cut_id: usize,
}

impl Row<'_> {
    fn p(&self, j: usize) -> f64 {
        ((self.l[j] as f64 - self.mx as f64) * self.inv_t).exp()
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
    fn mass_above(&self, t: u32) -> f64 {
        (0..self.l.len())
            .filter(|&j| self.cand(j) && fkey(self.l[j]) > t)
            .map(|j| self.p(j))
            .sum()
    }
    /// (key, id) of the token where the cumulative mass in rank order first exceeds `target`.
    fn walk_to(&self, target: f64) -> (u32, usize) {
        let (mut lo, mut hi) = (self.cut_key as u64, 0xffff_ffffu64);
        while lo < hi {
            let mid = (lo + hi + 1) >> 1;
            if self.mass_above((mid - 1) as u32) > target {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let key = lo as u32;
        let mut cum = if key == u32::MAX {
            0.0
        } else {
            self.mass_above(key)
        };
        let mut last = None;
        for j in 0..self.l.len() {
            if !self.allowed(j) || fkey(self.l[j]) != key {
                continue;
            }
            if key == self.cut_key && j > self.cut_id {
                break;
            }
            let pj = self.p(j);
            last = Some(j);
            if target < cum + pj {
                return (key, j);
            }
            cum += pj;
        }
        (key, last.unwrap_or(0))
    }
}

/// The kernel's choice for one row; `m`: the row's mask (structured outputs).
pub fn sample(
    l: &[f32],
    m: Option<&[u32]>,
    temperature: f32,
    top_p: f32,
    top_k: usize,
    u: f64,
) -> u32 {
    let mut row = Row {
        l,
        m,
        mx: 0.0,
        inv_t: 0.0,
        cut_key: 0,
        cut_id: l.len() - 1,
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
        let (k, i) = row.walk_to(top_k as f64 - 0.5);
        row.cut_key = k;
        row.cut_id = i;
    }
    row.inv_t = 1.0 / temperature as f64;
    let mut total = row.mass_above(0);
    if top_p < 1.0 {
        let (k, i) = row.walk_to(top_p as f64 * total);
        row.cut_key = k;
        row.cut_id = i;
        total = row.mass_above(0);
    }
    row.walk_to(u * total).1 as u32
}

#[cfg(test)]
mod tests {
    use crate::engine::{sampler, SamplingParams};

    #[test]
    fn the_kernels_algorithm_matches_the_host_sampler() {
        let mut s = 12345u64;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let vocab: usize = 500;
        let mut checked = 0;
        for r in 0..300 {
            // Some rows with ties (quantized logits) to exercise the id-order walk.
            let mut l: Vec<f32> = (0..vocab).map(|_| rnd() * 5.0).collect();
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
            let params = SamplingParams {
                temperature: t,
                top_p: p,
                top_k: k,
                ..Default::default()
            };
            for n in 0..5u64 {
                let want = sampler::sample(&l, &params, r, n);
                let got = super::sample(&l, None, t, p, k, sampler::uniform(r, n));
                assert_eq!(got, want, "row {r} n {n} t {t} p {p} k {k}");
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
                let allowed: Vec<u32> = (0..vocab as u32)
                    .filter(|&j| words[j as usize / 32] >> (j % 32) & 1 == 1)
                    .collect();
                let want = sampler::sample_masked(&l, &allowed, &params, r, n);
                let got = super::sample(&l, Some(&words), t, p, k, sampler::uniform(r, n));
                assert_eq!(got, want, "masked: row {r} n {n} t {t} p {p} k {k}");
                checked += 1;
            }
        }
        assert_eq!(checked, 1500);
    }
}
