//! Tests of the sampler; the fast paths against `reference.rs` (the rule as it was).

use super::*;
use std::time::Instant;

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

thread_local! {
    /// How often this thread's `sample` calls took the exact path.
    pub(super) static EXACT_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn exact_runs() -> usize {
    EXACT_RUNS.with(|c| c.get())
}

/// A small deterministic generator: uniform in [0, 1), and normal by Box-Muller.
struct Lcg(u64);

impl Lcg {
    fn new(seed: u64) -> Lcg {
        Lcg(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d)
    }
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() * n as f64) as usize % n
    }
    fn normal(&mut self) -> f64 {
        let (a, b) = (self.next().max(1e-300), self.next());
        (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
    }
}

/// Logit rows of the shapes the sampler meets (and some it should never meet).
const KINDS: [&str; 15] = [
    "flat", "tiny", "peaked", "ties", "equal", "masked", "few", "zeros", "huge", "nan", "negnan",
    "nan0", "inf", "neginf", "lowtail",
];

fn row(kind: &str, n: usize, seed: u64) -> Vec<f32> {
    let mut g = Lcg::new(seed);
    let normal =
        |g: &mut Lcg, s: f64, m: f64| (0..n).map(|_| (g.normal() * s + m) as f32).collect();
    let mut v: Vec<f32> = match kind {
        // Nearly flat: the nucleus is most of the vocabulary.
        "flat" => normal(&mut g, 0.01, 0.0),
        // Like random:tiny's logits: sd ~1, top-p 0.9 at T 0.6 keeps ~45k of 128k.
        "tiny" => normal(&mut g, 0.96, -12.0),
        // Like a trained model's: a bulk far below a few likely tokens.
        "peaked" | "lowtail" => normal(&mut g, 2.5, 0.0),
        // Many exact ties.
        "ties" => (0..n)
            .map(|_| (g.normal() * 4.0).round() as f32 / 2.0)
            .collect(),
        "equal" => vec![1.5; n],
        _ => normal(&mut g, 1.5, 3.0),
    };
    match kind {
        "peaked" => {
            for j in 0..8 {
                let i = g.below(n);
                v[i] = (8.0 + 10.0 * g.next() - j as f64) as f32;
            }
        }
        // Most of the vocabulary below e^-48 of the top at T 1: the tail bucket in play.
        "lowtail" => {
            for x in v.iter_mut() {
                *x -= 60.0;
            }
            for _ in 0..20 {
                let i = g.below(n);
                v[i] = (5.0 * g.next()) as f32;
            }
        }
        "masked" => {
            for x in v.iter_mut() {
                if g.next() < 0.7 {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        "few" => {
            for x in v.iter_mut() {
                *x = f32::NEG_INFINITY;
            }
            for _ in 0..3 {
                let i = g.below(n);
                v[i] = g.normal() as f32;
            }
        }
        "zeros" => {
            for x in v.iter_mut() {
                *x = match g.below(4) {
                    0 => 0.0,
                    1 => -0.0,
                    2 => 1.0,
                    _ => -1.0,
                };
            }
        }
        "huge" => {
            for x in v.iter_mut() {
                *x *= 1e30;
            }
            v[g.below(n)] = f32::MAX;
            v[g.below(n)] = f32::MIN;
        }
        "nan" => v[g.below(n)] = f32::NAN,
        "negnan" => v[g.below(n)] = -f32::NAN,
        "nan0" => v[0] = f32::NAN,
        "inf" => v[g.below(n)] = f32::INFINITY,
        "neginf" => {
            for x in v.iter_mut() {
                *x = f32::NEG_INFINITY;
            }
        }
        _ => {}
    }
    v
}

/// (temperature, top_p, top_k) combinations; `len` is the vocabulary size.
fn settings(len: usize) -> Vec<(f32, f32, usize)> {
    vec![
        (1.0, 1.0, 0),
        (0.6, 0.9, 0),
        (1.0, 1.0, 40),
        (0.7, 0.95, 50),
        (1e-6, 0.9, 0),
        (1e-6, 1.0, 0),
        (0.05, 1.0, 0),
        (100.0, 1.0, 0),
        (1e6, 0.9, 0),
        (1.0, 1e-6, 0),
        (1.0, 0.999_999_94, 0),
        (0.8, 0.999_999, 0),
        (1.0, 1.0, 2),
        (1.3, 0.8, 5),
        (1.0, 0.9, len / 3),
        (0.8, 0.95, 8192.min(len - 2)),
        (0.8, 0.95, 8193.min(len - 2)),
        (0.9, 1.0, len - 1),
        (1.0, 0.9, len),
        (1.0, 1.0, len + 5),
        (1.0, 0.5, 1),
        (0.0, 0.9, 0),
        (2.0, 0.3, 0),
    ]
}

/// The fast paths choose the reference's token for `draws` tokens of each row and setting.
fn check_against_reference(len: usize, rows_per_kind: u64, draws: u64) -> usize {
    let mut checked = 0;
    for kind in KINDS {
        for r in 0..rows_per_kind {
            let logits = row(kind, len, r * 31 + len as u64);
            for (t, top_p, top_k) in settings(len) {
                let p = params(t, top_p, top_k);
                for n in 0..draws {
                    let seed = r * 1000 + n * 7 + 1;
                    let want = reference::sample(&logits, &p, seed, n);
                    let got = sample(&logits, &p, seed, n);
                    assert_eq!(
                        got, want,
                        "{kind} row {r} vocab {len}: T {t} top_p {top_p} top_k {top_k} seed {seed} n {n}"
                    );
                    checked += 1;
                }
            }
        }
    }
    checked
}

#[test]
fn the_fast_paths_choose_the_reference_token_small_vocab() {
    assert_eq!(check_against_reference(256, 3, 30), 15 * 3 * 23 * 30);
}

#[test]
fn the_fast_paths_choose_the_reference_token_llama3_vocab() {
    assert_eq!(check_against_reference(128_256, 1, 3), 15 * 23 * 3);
}

#[test]
fn the_fast_paths_choose_the_reference_token_over_many_draws() {
    // The settings the engine meets most, many draws each, so that crossings land everywhere.
    for (kind, len) in [
        ("tiny", 128_256),
        ("peaked", 128_256),
        ("ties", 4096),
        ("tiny", 300),
    ] {
        let logits = row(kind, len, 5);
        for (t, top_p, top_k) in [
            (0.6, 0.9, 0),
            (1.0, 1.0, 0),
            (1.0, 1.0, 40),
            (0.8, 0.95, 40),
        ] {
            let p = params(t, top_p, top_k);
            let draws = if len > 100_000 { 40 } else { 2000 };
            for n in 0..draws {
                assert_eq!(
                    sample(&logits, &p, 77, n),
                    reference::sample(&logits, &p, 77, n),
                    "{kind} vocab {len}: T {t} top_p {top_p} top_k {top_k} n {n}"
                );
            }
        }
    }
}

#[test]
fn log_prob_reports_match_the_reference_bit_for_bit() {
    for kind in KINDS {
        for len in [1, 5, 256, 128_256] {
            let logits = row(kind, len, 11);
            let nan = logits.iter().any(|v| v.is_nan());
            for top_n in [0, 1, 5, 20, len - 1, len, len + 3] {
                if len > 1000 && top_n > 20 {
                    continue;
                }
                for token in [0, len as u32 / 2, len as u32 - 1] {
                    let got = token_logprob(&logits, token, top_n);
                    assert_eq!(got.top.len(), top_n.min(len));
                    if nan {
                        // The reference's comparator is no total order with NaN: its sort may
                        // panic (std since 1.81). Now: the rank order of the keys, NaN included.
                        let keys: Vec<u64> = got
                            .top
                            .iter()
                            .map(|t| ranked::key(&logits, t.0 as usize))
                            .collect();
                        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{kind} {len}");
                        let first = (0..len).map(|i| ranked::key(&logits, i)).min();
                        assert_eq!(keys.first().copied(), first.filter(|_| top_n > 0));
                        continue;
                    }
                    let want = reference::token_logprob(&logits, token, top_n);
                    assert_eq!(got.token_id, want.token_id);
                    assert_eq!(
                        got.logprob.to_bits(),
                        want.logprob.to_bits(),
                        "{kind} {len}"
                    );
                    for (g, w) in got.top.iter().zip(&want.top) {
                        assert_eq!((g.0, g.1.to_bits()), (w.0, w.1.to_bits()), "{kind} {len}");
                    }
                }
            }
            let (got, want) = (log_normalizer(&logits), reference::log_normalizer(&logits));
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{kind}"
            );
        }
    }
}

#[test]
fn top_logprobs_of_a_row_with_nan_do_not_panic() {
    // Issue 11 point 15 (found on the way): the old comparator made sort_by panic on NaN rows.
    let mut logits: Vec<f32> = (0..64).map(|i| (i % 7) as f32).collect();
    logits[3] = f32::NAN;
    logits[40] = -f32::NAN;
    let top = top_logprobs(&logits, log_normalizer(&logits), 64);
    assert_eq!(top.len(), 64);
    assert_eq!(top[0].0, 3, "a positive NaN ranks first");
    assert_eq!(top[63].0, 40, "a negative NaN ranks last");
    assert_eq!(top[1].0, 6, "then the largest logit, lowest id first");
}

#[test]
fn argmax_matches_the_reference() {
    for kind in KINDS {
        for len in [1, 2, 17, 256, 1000] {
            for r in 0..4 {
                let l = row(kind, len, r);
                assert_eq!(argmax(&l), reference::argmax(&l), "{kind} {len} {r}");
            }
        }
    }
    assert_eq!(argmax(&[]), 0);
    assert_eq!(argmax(&[-0.0, 0.0, 0.0]), 0);
    assert_eq!(argmax(&[f32::NAN, 5.0]), 0);
    assert_eq!(argmax(&[1.0, f32::NAN, 5.0, 5.0]), 2);
}

#[test]
fn the_fast_paths_settle_nearly_every_draw() {
    // The exact path is for NaN/inf rows and for draws within ~1e-10 of a boundary: on ordinary
    // rows it must almost never run, or the equality tests above would test it, not the fast paths.
    for kind in ["tiny", "peaked", "lowtail", "flat"] {
        let logits = row(kind, 128_256, 9);
        for (t, top_p, top_k) in [
            (0.6, 0.9, 0),
            (1.0, 1.0, 0),
            (1.0, 1.0, 40),
            (1.2, 0.95, 1000),
        ] {
            let p = params(t, top_p, top_k);
            let before = exact_runs();
            for n in 0..100 {
                sample(&logits, &p, 3, n);
            }
            let runs = exact_runs() - before;
            assert!(
                runs <= 1,
                "{kind} T {t} top_p {top_p} top_k {top_k}: {runs} exact runs in 100"
            );
        }
    }
    let before = exact_runs();
    sample(&row("nan", 1000, 1), &params(1.0, 0.9, 0), 1, 0);
    assert_eq!(exact_runs(), before + 1, "a NaN row takes the exact path");
}

#[test]
fn bucket_weights_stay_within_their_bound() {
    // Each token's weight as the histogram sums it, against the specified weight, over the range
    // that is summed (below e^-48 is the tail), densely and around every bucket's edges, at
    // several temperatures and maxima.
    let mut worst: f64 = 0.0;
    let mut summed = 0;
    for (max, t) in [
        (0.0f32, 1.0f32),
        (17.25, 0.6),
        (-3.5, 1.7),
        (1e4, 100.0),
        (2.0, 0.01),
        (3e4, 0.003),
        (-2e4, 7e-5),
    ] {
        let (max, inv_t) = (max as f64, 1.0 / t as f64);
        let k = 64.0 * inv_t;
        let mut check = |v: f32| {
            let want = ((v as f64 - max) * inv_t).exp();
            for got in [
                vocab::weight_approx::<false>(v, max, k),
                vocab::weight_approx::<true>(v, max, k),
            ]
            .into_iter()
            .flatten()
            {
                worst = worst.max((got / want - 1.0).abs());
                summed += 1;
            }
        };
        // Logits from the maximum down to 48 T below it, then around each bucket edge.
        let steps = 1 << 19;
        for i in 0..=steps {
            check((max - 48.0 * t as f64 * i as f64 / steps as f64) as f32);
        }
        for b in 0..=3072 {
            let edge = (max - b as f64 / k) as f32;
            let mut v = edge;
            for _ in 0..8 {
                check(v);
                v = f32::from_bits(v.to_bits() + 1);
            }
            let mut v = edge;
            for _ in 0..8 {
                v = f32::from_bits(v.to_bits().wrapping_sub(1));
                check(v);
            }
        }
    }
    assert!(summed > 6_000_000, "{summed}");
    assert!(
        worst < vocab::EXP_ERR / 4.0,
        "worst relative error {worst:e}"
    );
    println!("worst relative error {worst:e}");
}

#[test]
fn the_avx2_histogram_is_the_portable_one() {
    // The dispatched histogram (AVX2 + FMA where the CPU has them) against the portable body
    // with FMA: the same bucket of every token and the same masses, bit for bit. Without AVX2 the
    // dispatch runs the portable body without FMA: the same buckets, masses within 1e-12.
    #[cfg(target_arch = "x86_64")]
    let avx2 =
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    for (kind, len) in [
        ("tiny", 128_256),
        ("peaked", 1000),
        ("lowtail", 77),
        ("masked", 4099),
    ] {
        let logits = row(kind, len, 3);
        let max = vocab::max_nan(&logits).0 as f64;
        for t in [0.6f64, 1.0, 0.01, 30.0] {
            let run = |fma_body: bool| {
                let mut ids = vec![0u16; len];
                let mut mass = Box::new([0.0; vocab::MASS_LEN]);
                if fma_body {
                    vocab::histogram_body::<true>(&logits, max, 1.0 / t, &mut ids, &mut mass);
                } else {
                    vocab::histogram(&logits, max, 1.0 / t, &mut ids, &mut mass);
                }
                (ids, mass)
            };
            let (ids, mass) = run(false);
            let (want_ids, want_mass) = run(true);
            assert_eq!(ids, want_ids, "{kind} {len} T {t}");
            for (b, (m, w)) in mass.iter().zip(want_mass.iter()).enumerate() {
                if avx2 {
                    assert_eq!(m.to_bits(), w.to_bits(), "{kind} {len} T {t} bucket {b}");
                } else {
                    assert!((m - w).abs() <= 1e-12 * w, "{kind} {len} T {t} bucket {b}");
                }
            }
        }
    }
}

/// This thread's CPU time in ns (Linux: `clock_gettime(CLOCK_THREAD_CPUTIME_ID)`), so that
/// timings on a machine other work shares count only this thread's time; `None` elsewhere.
#[cfg(target_os = "linux")]
fn thread_cpu_ns() -> Option<u64> {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } == 0;
    ok.then(|| t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64)
}

#[cfg(not(target_os = "linux"))]
fn thread_cpu_ns() -> Option<u64> {
    None
}

/// Best of `runs` timings of `f` over `rows` calls, in ms per call: this thread's CPU time where
/// the system reports it, else wall time.
fn ms_per_call(runs: usize, rows: u64, mut f: impl FnMut(u64)) -> f64 {
    (0..runs)
        .map(|_| {
            let (cpu, wall) = (thread_cpu_ns(), Instant::now());
            for n in 0..rows {
                f(n);
            }
            let ns = match (cpu, thread_cpu_ns()) {
                (Some(a), Some(b)) => (b - a) as f64,
                _ => wall.elapsed().as_nanos() as f64,
            };
            ns * 1e-6 / rows as f64
        })
        .fold(f64::INFINITY, f64::min)
}

#[test]
#[ignore = "a speed check (speed is measured in benchmarks, not in the suite): scripts/bench-sampler runs it"]
fn sampling_a_llama3_row_selects_instead_of_sorting() {
    // Issue 11 point 15: ~5 ms per 128k row at T 0.6 / top-p 0.9 before (a sort of the nucleus);
    // now several times less in any build. Top-k 40 was never the problem: it must not be slower.
    // Best of several runs, as other work shares the machine; ratios, so build-independent.
    let logits = row("tiny", 128_256, 1);
    for (t, top_p, top_k, factor) in [(0.6, 0.9, 0, 4.0), (1.0, 1.0, 40, 1.0)] {
        let p = params(t, top_p, top_k);
        let new = ms_per_call(5, 8, |n| {
            sample(&logits, &p, 1, n);
        });
        let old = ms_per_call(5, 8, |n| {
            reference::sample(&logits, &p, 1, n);
        });
        assert!(
            new * factor < old,
            "T {t} top_p {top_p} top_k {top_k}: {new:.3} ms per row, reference {old:.3} ms"
        );
    }
}

/// `scripts/bench-sampler` runs this in a release build: ms per 128256-logit row for the
/// reference (the sampler before issue 11 point 15, "before") and the current one ("after"), in
/// this thread's CPU time, best of 5 runs of 50 rows (other work shares the machine). Rows: like
/// random:tiny's logits (nearly flat: top-p 0.9 at T 0.6 keeps ~45k tokens) and like a trained
/// model's (a bulk far below a few likely tokens). Prints `bench-sampler,case,version,ms` lines.
#[test]
#[ignore = "a benchmark: scripts/bench-sampler runs it in a release build"]
fn bench_sampler() {
    let len = 128_256;
    for (kind, shape) in [("tiny", "random:tiny-like"), ("peaked", "peaked")] {
        let logits = row(kind, len, 1);
        for (name, t, top_p, top_k) in [
            ("T0.6 top-p0.9", 0.6, 0.9, 0),
            ("T1 top-k40", 1.0, 1.0, 40),
            ("T1", 1.0, 1.0, 0),
            ("T0 (greedy)", 0.0, 1.0, 0),
        ] {
            let p = params(t, top_p, top_k);
            let before = ms_per_call(5, 50, |n| {
                std::hint::black_box(reference::sample(&logits, &p, 1, n));
            });
            let after = ms_per_call(5, 50, |n| {
                std::hint::black_box(sample(&logits, &p, 1, n));
            });
            println!("bench-sampler,{len} {shape} {name},before,{before:.4}");
            println!("bench-sampler,{len} {shape} {name},after,{after:.4}");
        }
        // The log-prob report: the normalizer and the top 20.
        let before = ms_per_call(5, 50, |n| {
            std::hint::black_box(reference::token_logprob(&logits, n as u32, 20));
        });
        let after = ms_per_call(5, 50, |n| {
            std::hint::black_box(token_logprob(&logits, n as u32, 20));
        });
        println!("bench-sampler,{len} {shape} log-probs top-20,before,{before:.4}");
        println!("bench-sampler,{len} {shape} log-probs top-20,after,{after:.4}");
    }
}

/// A structured output's mask: sampling among the allowed tokens is the rule over the whole row
/// with every other logit at -inf (the reference, which sorts everything), for sparse and dense
/// masks, every setting, greedy included.
#[test]
fn masked_sampling_is_the_rule_with_forbidden_tokens_at_minus_infinity() {
    let len = 3000;
    let mut checked = 0;
    for kind in ["tiny", "peaked", "ties", "flat"] {
        for r in 0..3u64 {
            let logits = row(kind, len, 77 + r);
            let mut g = Lcg::new(r + 5);
            // 3 allowed, about 1%, and about 90% of the vocabulary.
            for density in [0.0, 0.01, 0.9] {
                let mut allowed: Vec<u32> =
                    (0..len as u32).filter(|_| g.next() < density).collect();
                if allowed.len() < 3 {
                    allowed = vec![7, 1000, 2999];
                }
                let mut masked = vec![f32::NEG_INFINITY; len];
                for &t in &allowed {
                    masked[t as usize] = logits[t as usize];
                }
                for (t, top_p, top_k) in settings(len) {
                    let p = params(t, top_p, top_k);
                    for n in 0..4 {
                        let got = sample_masked(&logits, &allowed, &p, 31 + r, n);
                        let want = reference::sample(&masked, &p, 31 + r, n);
                        assert_eq!(
                            got, want,
                            "{kind} density {density} T {t} p {top_p} k {top_k}"
                        );
                        assert!(allowed.contains(&got));
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 1000);
    // One allowed token is taken as is (grammar-forced), whatever its logit.
    assert_eq!(
        sample_masked(&[9.0, -50.0], &[1], &params(1.0, 0.9, 0), 1, 0),
        1
    );
}
