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
    mx: f32,
    inv_t: f64,
    cut_key: u32,
    cut_id: usize,
}

impl Row<'_> {
    fn p(&self, j: usize) -> f64 {
        ((self.l[j] as f64 - self.mx as f64) * self.inv_t).exp()
    }
    fn cand(&self, j: usize) -> bool {
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
            if fkey(self.l[j]) != key {
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

/// The kernel's choice for one row.
pub fn sample(l: &[f32], temperature: f32, top_p: f32, top_k: usize, u: f64) -> u32 {
    let best = crate::engine::sampler::argmax(l) as usize;
    if temperature == 0.0 || top_k == 1 {
        return best as u32;
    }
    let mx = l[best];
    let mut row = Row {
        l,
        mx,
        inv_t: 0.0,
        cut_key: 0,
        cut_id: l.len() - 1,
    };
    if top_k > 0 && top_k < l.len() {
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
        let vocab = 500;
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
                let got = super::sample(&l, t, p, k, sampler::uniform(r, n));
                assert_eq!(got, want, "row {r} n {n} t {t} p {p} k {k}");
                checked += 1;
            }
        }
        assert_eq!(checked, 1500);
    }
}
