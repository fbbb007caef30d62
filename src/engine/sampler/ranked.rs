//! Candidates in rank order (logit descending, ties to the lower id) and the prefix sums of their
//! weights, as the specified walk sees them, without sorting more of them than a decision needs.
//!
//! The candidates come in groups that are contiguous in rank order: one group holding them all
//! (a top-k set, or every token on the exact path), or the buckets of [`super::vocab`]. A group is
//! gathered and sorted only when a walk must look inside it. Every prefix sum is known as a
//! [`Span`] around the value the specified code computes: exactly (span of width 0) inside a single
//! group, within proven error bounds where earlier buckets enter only through their approximate
//! mass. A test on a span answers yes, no, or unsure; unsure sends the caller to the exact path.

use super::descending_key;

/// Bounds on a value of the specified computation: it lies in `[lo, hi]`. Width 0 when exact.
#[derive(Clone, Copy, Debug)]
pub(super) struct Span {
    pub lo: f64,
    pub hi: f64,
}

impl Span {
    pub fn exact(v: f64) -> Span {
        Span { lo: v, hi: v }
    }

    /// `u * value` for a `u >= 0`: rounding is monotone, so the bounds carry over.
    pub fn scale(self, u: f64) -> Span {
        Span {
            lo: u * self.lo,
            hi: u * self.hi,
        }
    }
}

/// The answer of a monotone test on a span: no for every value in it, yes for every value, or
/// it depends on where in the span the true value lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tri {
    No,
    Unsure,
    Yes,
}

/// `sure`: the test holds at the span's least favourable end; `maybe`: at its most favourable.
pub(super) fn tri(sure: bool, maybe: bool) -> Tri {
    if sure {
        Tri::Yes
    } else if maybe {
        Tri::Unsure
    } else {
        Tri::No
    }
}

/// Relative bound (with a margin of 4 or more) on the rounding of a recursive f64 sum of up to `n`
/// non-negative terms, in any order, together with a few more roundings on top (Higham: a sum of
/// n terms is within gamma(n - 1) ~ (n - 1) 2^-53 of the exact sum).
pub(super) fn sum_slack(n: usize) -> f64 {
    (n as f64 + 64.0) * (-50f64).exp2()
}

/// Position of a candidate: group, rank inside the group.
pub(super) type Pos = (usize, usize);

/// The candidate a walk stopped at, with the bounds on its prefix sum.
#[derive(Clone, Copy, Debug)]
pub(super) struct Found {
    pub pos: Pos,
    pub id: u32,
    pub sum: Span,
}

pub(super) enum Walk {
    /// The first candidate whose prefix sum passes the test.
    Found(Found),
    /// The walk reached the stop position before any candidate passed.
    Stop,
    /// No candidate passes; `sum` bounds the prefix sum over all of them.
    End { sum: Span },
    /// The bounds cannot tell which candidate passes first.
    Unsure,
}

/// The weight the specified code gives a token: `exp((logit - max) / T)` in f64.
#[derive(Clone, Copy)]
struct Weights<'a> {
    logits: &'a [f32],
    max: f64,
    inv_t: f64,
}

impl Weights<'_> {
    fn of(&self, id: u32) -> f64 {
        ((self.logits[id as usize] as f64 - self.max) * self.inv_t).exp()
    }
}

/// A group of candidates, sorted lazily from the front.
struct Group {
    keys: Vec<u64>,
    /// `keys[..sorted]` are the group's first candidates, in rank order.
    sorted: usize,
    /// `cum[j]`: the sequential sum of the weights of `keys[..=j]`, as the specified walk adds them.
    cum: Vec<f64>,
}

impl Group {
    fn new(keys: Vec<u64>) -> Group {
        Group {
            keys,
            sorted: 0,
            cum: Vec::new(),
        }
    }

    /// Sort at least `keys[..=r]`: growing prefixes (256, then 8 times more), each a selection
    /// then a sort of the prefix, so a walk that ends early never sorts the whole group.
    fn sort_through(&mut self, r: usize, w: &Weights) {
        while self.sorted <= r {
            let len = self.keys.len();
            let from = self.sorted;
            let to = if from == 0 { 256 } else { from * 8 }.min(len);
            if to < len {
                self.keys[from..].select_nth_unstable(to - from - 1);
            }
            self.keys[from..to].sort_unstable();
            let mut acc = self.cum.last().copied().unwrap_or(0.0);
            for &key in &self.keys[from..to] {
                acc += w.of(key as u32);
                self.cum.push(acc);
            }
            self.sorted = to;
        }
    }
}

/// The whole vocabulary split in buckets (see [`super::vocab`]).
pub(super) struct Buckets<'a> {
    /// Bucket of each token.
    pub of_token: &'a [u16],
    /// Computed approximate mass of each bucket (0 for the tail bucket, the last).
    pub mass: &'a [f64],
    /// `cum[g]`: computed sum of `mass[..=g]`.
    pub cum: &'a [f64],
    /// The real sum of the specified weights of buckets `..=g` lies within
    /// `cum[g] * (1 +- rel) +- abs`.
    pub rel: f64,
    pub abs: f64,
}

pub(super) struct Ranked<'a> {
    w: Weights<'a>,
    buckets: Option<Buckets<'a>>,
    /// Relative slack on prefix sums: the specified sums in rank order against the real ones (0
    /// with a single group, whose prefix sums are computed exactly as specified).
    slack: f64,
    /// Groups gathered so far: (group, its candidates).
    groups: Vec<(usize, Group)>,
}

impl<'a> Ranked<'a> {
    /// All candidates in one group, given as keys in any order.
    pub fn one(logits: &'a [f32], max: f64, inv_t: f64, keys: Vec<u64>) -> Ranked<'a> {
        Ranked {
            w: Weights { logits, max, inv_t },
            buckets: None,
            slack: 0.0,
            groups: vec![(0, Group::new(keys))],
        }
    }

    /// Every token a candidate, in buckets; `slack` bounds the rounding of the specified sums.
    pub fn buckets(
        logits: &'a [f32],
        max: f64,
        inv_t: f64,
        buckets: Buckets<'a>,
        slack: f64,
    ) -> Ranked<'a> {
        Ranked {
            w: Weights { logits, max, inv_t },
            buckets: Some(buckets),
            slack,
            groups: Vec::new(),
        }
    }

    /// The last candidate in rank order.
    pub fn last_id(&self) -> u32 {
        let max_key = match &self.buckets {
            None => self.groups[0].1.keys.iter().copied().max(),
            Some(_) => {
                let l = self.w.logits;
                (0..l.len()).map(|i| key(l, i)).max()
            }
        };
        max_key.map_or(0, |k| k as u32)
    }

    /// Walk the candidates in rank order to the first whose prefix sum passes `test` (monotone:
    /// once yes, yes for every larger sum), stopping at `stop` if it comes first.
    pub fn walk(&mut self, test: &dyn Fn(Span) -> Tri, stop: Option<Pos>) -> Walk {
        let Some(b) = self.buckets.take() else {
            let w = self.walk_group(0, None, Span::exact(0.0), test, stop);
            return w.unwrap_or_else(|| {
                let cum = &self.groups[0].1.cum;
                Walk::End {
                    sum: Span::exact(cum.last().copied().unwrap_or(0.0)),
                }
            });
        };
        let w = self.walk_buckets(&b, test, stop);
        self.buckets = Some(b);
        w
    }

    fn walk_buckets(&mut self, b: &Buckets, test: &dyn Fn(Span) -> Tri, stop: Option<Pos>) -> Walk {
        let n = b.cum.len();
        let slack = self.slack;
        let end_of = |c: f64| prefix(mass_span(b, c), 0.0, slack);
        // Whole buckets for which the test says no even at the upper bound of their end: skipped
        // (prefix sums only grow along the walk).
        let mut g = b.cum.partition_point(|&c| test(end_of(c)) == Tri::No);
        while g < n {
            if stop.is_some_and(|s| s.0 < g) {
                return Walk::Stop;
            }
            // A bucket with no mass is empty, but for the tail, whose mass is not summed.
            if g == n - 1 || b.mass[g] > 0.0 {
                let base = mass_span(b, if g == 0 { 0.0 } else { b.cum[g - 1] });
                if let Some(w) = self.walk_group(g, Some(b), base, test, stop) {
                    return w;
                }
            }
            g += 1;
        }
        if stop.is_some() {
            return Walk::Stop;
        }
        Walk::End {
            sum: end_of(b.cum[n - 1]),
        }
    }

    /// Walk inside group `g` (`None`: no candidate in it passes). `base` bounds the real mass of
    /// the groups before it.
    fn walk_group(
        &mut self,
        g: usize,
        buckets: Option<&Buckets>,
        base: Span,
        test: &dyn Fn(Span) -> Tri,
        stop: Option<Pos>,
    ) -> Option<Walk> {
        let gi = self.gather(g, buckets);
        let (w, slack) = (self.w, self.slack);
        let group = &mut self.groups[gi].1;
        for r in 0..group.keys.len() {
            if stop == Some((g, r)) {
                return Some(Walk::Stop);
            }
            group.sort_through(r, &w);
            let sum = prefix(base, group.cum[r], slack);
            match test(sum) {
                Tri::No => {}
                Tri::Unsure => return Some(Walk::Unsure),
                Tri::Yes => {
                    return Some(Walk::Found(Found {
                        pos: (g, r),
                        id: group.keys[r] as u32,
                        sum,
                    }))
                }
            }
        }
        None
    }

    /// Index in `self.groups` of group `g`, gathering its candidates on first use.
    fn gather(&mut self, g: usize, buckets: Option<&Buckets>) -> usize {
        if let Some(i) = self.groups.iter().position(|(h, _)| *h == g) {
            return i;
        }
        if let Some(b) = buckets {
            self.gather_buckets(b, &[g]);
        } else {
            self.groups.push((g, Group::new(Vec::new())));
        }
        self.groups.len() - 1
    }

    /// Gather, in one pass, the buckets (not gathered yet) where the running computed mass first
    /// reaches each of `masses`: where walks for those targets will most likely look.
    pub fn prefetch(&mut self, masses: &[f64]) {
        let Some(b) = self.buckets.take() else {
            return;
        };
        let mut want: Vec<usize> = Vec::new();
        for &m in masses {
            let g = b.cum.partition_point(|&c| c < m).min(b.cum.len() - 1);
            if !want.contains(&g) && !self.groups.iter().any(|(h, _)| *h == g) {
                want.push(g);
            }
        }
        self.gather_buckets(&b, &want);
        self.buckets = Some(b);
    }

    fn gather_buckets(&mut self, b: &Buckets, groups: &[usize]) {
        for groups in groups.chunks(super::vocab::GATHER_MAX) {
            let ids: Vec<u16> = groups.iter().map(|&g| g as u16).collect();
            let keys = super::vocab::gather(self.w.logits, b.of_token, &ids);
            for (&g, keys) in groups.iter().zip(keys) {
                self.groups.push((g, Group::new(keys)));
            }
        }
    }
}

/// Bounds on the real sum of the specified weights of the buckets whose computed cumulative mass
/// is `c`.
fn mass_span(b: &Buckets, c: f64) -> Span {
    Span {
        lo: (c * (1.0 - b.rel) - b.abs).max(0.0),
        hi: c * (1.0 + b.rel) + b.abs,
    }
}

/// Bounds on a specified prefix sum whose real value is a mass within `base` plus `p`, the
/// sequential sum of the group's weights so far (exact as specified inside one group). With
/// `base` 0 and `slack` 0 this is `p` itself, bit for bit.
fn prefix(base: Span, p: f64, slack: f64) -> Span {
    Span {
        lo: (base.lo + p) * (1.0 - slack),
        hi: (base.hi + p) * (1.0 + slack),
    }
}

/// The rank-order key of token `i`: descending logit in the high half, id in the low half.
pub(super) fn key(logits: &[f32], i: usize) -> u64 {
    ((descending_key(logits[i]) as u64) << 32) | i as u64
}
