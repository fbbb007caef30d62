//! The passes over a whole row of logits: its maximum, a histogram of the weights by bucket,
//! gathering a few buckets, the first k tokens in rank order. Written as fixed-width lane loops
//! the compiler vectorizes; on x86_64 with AVX2 and FMA they are compiled for those too, and the
//! two hottest (the histogram, the gather) are written out in AVX2 intrinsics.
//!
//! A token's bucket is `-64 x` rounded to nearest, with `x = (logit - max) / T <= 0` its
//! log-weight: a bucket spans a factor e^(1/64) of weight, and buckets are contiguous in rank
//! order (the bucket only grows as the logit falls, and tied logits share one). Tokens with
//! `x < -47.99` share the tail bucket, whose mass is bounded instead of summed.

use super::ranked::key;

/// Buckets per unit of log-weight.
const PER_UNIT: f64 = 64.0;
/// The tail bucket, the last: `-64 x` rounded to 3072 or more.
pub(super) const TAIL: usize = 3072;
pub(super) const BUCKETS: usize = TAIL + 1;
/// Length of the `mass` buffer of [`histogram`], a power of two (indices are masked, not
/// checked): the buckets, then the slots where tail tokens add their zeros.
pub(super) const MASS_LEN: usize = 4096;
/// 2^-68: a bound on the specified weight of a tail token, e^-47.99 (1 + 2^-52).
pub(super) const TAIL_WEIGHT: f64 = 3.3881317890172014e-21;
/// 2^-38: a bound on the relative error of a bucket's mass as [`histogram`] sums it (each token's
/// `e^x` as [`exp_near`] of its exact offset from the bucket's centre, times the centre's `e^c`)
/// against the sum of `f64::exp`. The polynomial's truncation is below (2^-7)^5 / 5! e^(1/128)
/// ~ 2.4e-13 ~ 2^-41.9; the roundings and `f64::exp`'s own error (< 1 ulp) are far smaller; the
/// tests measure it (2.4e-13).
pub(super) const EXP_ERR: f64 = 3.637978807091713e-12;

/// 1.5 * 2^52: adding it rounds an f64 of magnitude below 2^51 to an integer.
const MAGIC: f64 = 6755399441055744.0;

#[inline(always)]
fn madd<const FMA: bool>(a: f64, b: f64, c: f64) -> f64 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^(h / 64)` for |h| <= 1/2: Taylor to degree 4 in `d = h / 64` (relative error below
/// 2^-42), with the division folded into the coefficients. Branch-free, so that it vectorizes.
#[inline(always)]
fn exp_near<const FMA: bool>(h: f64) -> f64 {
    const U: f64 = 1.0 / PER_UNIT;
    let p = madd::<FMA>(h, U * U * U * U / 24.0, U * U * U / 6.0);
    let p = madd::<FMA>(p, h, U * U / 2.0);
    let p = madd::<FMA>(p, h, U);
    madd::<FMA>(p, h, 1.0)
}

/// A token's bucket and its weight relative to the bucket's centre, from `s = (max - logit) * 64
/// / T` (>= 0; the log-weight is `x = -s / 64`): the bucket `b` is `s` rounded to nearest, at
/// most [`TAIL`] (so monotone in the logit, and [`TAIL`] only for `s >= 3071.5`, `x < -47.99`);
/// otherwise `x` lies within 1/128 of the centre `c = -b / 64`, and the weight is `e^(x - c)`.
/// Branch-free (rounding through [`MAGIC`], whose low mantissa bits then hold `b`), so that it
/// vectorizes.
#[inline(always)]
fn bucket<const FMA: bool>(s: f64) -> (u16, f64) {
    let t = s.min(TAIL as f64) + MAGIC;
    let near = exp_near::<FMA>((t - MAGIC) - s);
    (t.to_bits() as u16, near)
}

/// `e^c` of each bucket's centre `c = -b / 64`, by `f64::exp`.
fn centre_weights() -> &'static [f64] {
    static W: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    W.get_or_init(|| (0..TAIL).map(|b| (-(b as f64) / PER_UNIT).exp()).collect())
}

/// `s` of a logit, as [`histogram`] computes it: exactly `-64 x`, with `x` the specified
/// log-weight `(logit - max) * inv_t` (negating a difference and scaling by 64 commute with
/// rounding; `k = 64 inv_t` is exact), so the offset `b - s` from the bucket is exact too.
#[inline(always)]
fn scaled(v: f32, max: f64, k: f64) -> f64 {
    (max - v as f64) * k
}

/// A token's weight as [`histogram`] counts it, with `k = 64 / T` (`None` in the tail, which is
/// not summed).
#[cfg(test)]
pub(super) fn weight_approx<const FMA: bool>(v: f32, max: f64, k: f64) -> Option<f64> {
    let (b, near) = bucket::<FMA>(scaled(v, max, k));
    (b < TAIL as u16).then(|| centre_weights()[b as usize] * near)
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// The largest logit (what a fold with `f32::max` gives, up to the sign of a zero maximum) and
/// whether any logit is NaN.
pub(super) fn max_nan(logits: &[f32]) -> (f32, bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { max_nan_avx2(logits) };
    }
    max_nan_body(logits)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn max_nan_avx2(logits: &[f32]) -> (f32, bool) {
    max_nan_body(logits)
}

#[inline(always)]
fn max_nan_body(logits: &[f32]) -> (f32, bool) {
    const W: usize = 16;
    let mut m = [f32::NEG_INFINITY; W];
    let mut nan = [0u32; W];
    let mut chunks = logits.chunks_exact(W);
    for l in &mut chunks {
        for j in 0..W {
            m[j] = if l[j] > m[j] { l[j] } else { m[j] };
            nan[j] |= l[j].is_nan() as u32;
        }
    }
    let mut best = f32::NEG_INFINITY;
    let mut any_nan = nan.iter().any(|&v| v != 0);
    for &v in m.iter().chain(chunks.remainder()) {
        best = if v > best { v } else { best };
        any_nan |= v.is_nan();
    }
    (best, any_nan)
}

/// Index of the first logit equal to `v` (`logits.len()` if none).
pub(super) fn position_of(logits: &[f32], v: f32) -> usize {
    const W: usize = 16;
    for (c, l) in logits.chunks(W).enumerate() {
        if l.iter().fold(false, |acc, &x| acc | (x == v)) {
            if let Some(j) = l.iter().position(|&x| x == v) {
                return c * W + j;
            }
        }
    }
    logits.len()
}

/// Fill `of_token` with each token's bucket (tail tokens: [`TAIL`] to `TAIL + 7`, spread so that
/// their additions of zero make no chain of dependent additions) and `mass` (zeroed) with the
/// approximate mass of each bucket but the tail (in its first [`BUCKETS`]).
pub(super) fn histogram(
    logits: &[f32],
    max: f64,
    inv_t: f64,
    of_token: &mut [u16],
    mass: &mut [f64; MASS_LEN],
) {
    // Equal lengths, which the AVX2 body's unchecked loads and stores rely on.
    let n = logits.len().min(of_token.len());
    let (logits, of_token) = (&logits[..n], &mut of_token[..n]);
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above); the slices have equal lengths.
        return unsafe { histogram_avx2(logits, max, inv_t, of_token, mass) };
    }
    histogram_body::<false>(logits, max, inv_t, of_token, mass)
}

/// [`histogram_body`] with FMA, written out in AVX2: the same operations in the same order, so
/// the same results bit for bit (the tests compare them), in fewer instructions than the
/// compiler finds (it packs the bucket ids from 64-bit lanes poorly). `logits` and `of_token`
/// must have equal lengths.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn histogram_avx2(
    logits: &[f32],
    max: f64,
    inv_t: f64,
    of_token: &mut [u16],
    mass: &mut [f64; MASS_LEN],
) {
    use std::arch::x86_64::*;
    const U: f64 = 1.0 / PER_UNIT;
    let k = inv_t * PER_UNIT;
    let (vmax, vk) = (_mm256_set1_pd(max), _mm256_set1_pd(k));
    let (top, magic) = (_mm256_set1_pd(TAIL as f64), _mm256_set1_pd(MAGIC));
    let tail_t = _mm256_set1_pd(TAIL as f64 + MAGIC);
    let c = [U * U * U * U / 24.0, U * U * U / 6.0, U * U / 2.0, U, 1.0].map(|c| _mm256_set1_pd(c));
    // Four tokens: (t, whose low bits hold the bucket; the weight near the centre, 0 in the tail).
    let four = |v: __m128| {
        let s = _mm256_mul_pd(_mm256_sub_pd(vmax, _mm256_cvtps_pd(v)), vk);
        let t = _mm256_add_pd(_mm256_min_pd(s, top), magic);
        let h = _mm256_sub_pd(_mm256_sub_pd(t, magic), s);
        let mut p = _mm256_fmadd_pd(h, c[0], c[1]);
        p = _mm256_fmadd_pd(p, h, c[2]);
        p = _mm256_fmadd_pd(p, h, c[3]);
        p = _mm256_fmadd_pd(p, h, c[4]);
        let in_tail = _mm256_cmp_pd(t, tail_t, _CMP_EQ_OQ);
        (_mm256_castpd_si256(t), _mm256_andnot_pd(in_tail, p))
    };
    let low_halves = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    let (tail16, spread) = (
        _mm_set1_epi16(TAIL as i16),
        _mm_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7),
    );
    const C: usize = 256;
    let mut near = [0f64; C];
    for (l, ids) in logits.chunks(C).zip(of_token.chunks_mut(C)) {
        let full = l.len() / 8 * 8;
        for j in (0..full).step_by(8) {
            // SAFETY: j + 8 <= full <= l.len() == ids.len() <= near.len() (equal lengths of
            // `logits` and `of_token`, chunked alike); unaligned loads and stores inside them.
            let (t0, e0) = four(_mm_loadu_ps(l.as_ptr().add(j)));
            let (t1, e1) = four(_mm_loadu_ps(l.as_ptr().add(j + 4)));
            _mm256_storeu_pd(near.as_mut_ptr().add(j), e0);
            _mm256_storeu_pd(near.as_mut_ptr().add(j + 4), e1);
            let b = _mm_packus_epi32(
                _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(t0, low_halves)),
                _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(t1, low_halves)),
            );
            let b = _mm_add_epi16(b, _mm_and_si128(_mm_cmpeq_epi16(b, tail16), spread));
            _mm_storeu_si128(ids.as_mut_ptr().add(j) as *mut __m128i, b);
        }
        for j in full..l.len() {
            let (b, w) = bucket::<true>(scaled(l[j], max, k));
            let is_tail = b == TAIL as u16;
            near[j] = if is_tail { 0.0 } else { w };
            ids[j] = b + is_tail as u16 * (j & 7) as u16;
        }
        for (&e, &id) in near.iter().zip(ids.iter()) {
            mass[id as usize & (MASS_LEN - 1)] += e;
        }
    }
    finish_histogram(mass);
}

/// Each bucket's sum of weights near its centre times the centre's weight; the tail slots zeroed.
fn finish_histogram(mass: &mut [f64; MASS_LEN]) {
    for (m, &w) in mass.iter_mut().zip(centre_weights()) {
        *m *= w;
    }
    mass[TAIL..].fill(0.0);
}

#[inline(always)]
pub(super) fn histogram_body<const FMA: bool>(
    logits: &[f32],
    max: f64,
    inv_t: f64,
    of_token: &mut [u16],
    mass: &mut [f64; MASS_LEN],
) {
    // An element-wise loop over a chunk (which vectorizes), then the scatter into the buckets. A
    // bucket sums `e^(x - c)` of its tokens; its mass is that times `e^c`.
    const C: usize = 256;
    let k = inv_t * PER_UNIT;
    let tail_id = TAIL as u16;
    let mut near = [0f64; C];
    for (l, ids) in logits.chunks(C).zip(of_token.chunks_mut(C)) {
        for (j, ((e, id), &v)) in near.iter_mut().zip(ids.iter_mut()).zip(l).enumerate() {
            let (b, w) = bucket::<FMA>(scaled(v, max, k));
            let is_tail = b == tail_id;
            *e = if is_tail { 0.0 } else { w };
            *id = b + is_tail as u16 * (j & 7) as u16;
        }
        for (&e, &id) in near.iter().zip(ids.iter()) {
            mass[id as usize & (MASS_LEN - 1)] += e;
        }
    }
    finish_histogram(mass);
}

/// The keys of the tokens in each of the buckets `groups` (at most [`GATHER_MAX`]), in token
/// order, in one pass.
pub(super) fn gather(logits: &[f32], of_token: &[u16], groups: &[u16]) -> Vec<Vec<u64>> {
    let n = groups.len().min(GATHER_MAX);
    let mut want = [u16::MAX; GATHER_MAX];
    want[..n].copy_from_slice(&groups[..n]);
    let mut keys = vec![Vec::new(); n];
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        unsafe { gather_avx2(logits, of_token, &want, &mut keys) };
        return keys;
    }
    gather_body(logits, of_token, &want, &mut keys);
    keys
}

/// Most buckets [`gather`] collects in one pass.
pub(super) const GATHER_MAX: usize = 4;

/// The bucket of a token from its entry in `of_token` (the tail's spread slots are the tail).
#[inline(always)]
fn bucket_of(v: u16) -> u16 {
    v.min(TAIL as u16)
}

/// Append token `i` to the keys of its bucket if that is one of `want`.
#[inline(always)]
fn gather_one(
    logits: &[f32],
    of_token: &[u16],
    want: &[u16; GATHER_MAX],
    keys: &mut [Vec<u64>],
    i: usize,
) {
    let b = bucket_of(of_token[i]);
    if let Some(k) = want.iter().position(|&g| g == b) {
        keys[k].push(key(logits, i));
    }
}

/// `gather_body` with a bit mask of the wanted tokens per 16 entries, so that only those are
/// visited (the wanted buckets can hold a token in most chunks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gather_avx2(
    logits: &[f32],
    of_token: &[u16],
    want: &[u16; GATHER_MAX],
    keys: &mut [Vec<u64>],
) {
    use std::arch::x86_64::*;
    let tail = _mm256_set1_epi16(TAIL as i16);
    let w = want.map(|g| _mm256_set1_epi16(g as i16));
    let n = of_token.len();
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n, an unaligned load of 16 u16 inside the slice.
        let v = _mm256_loadu_si256(of_token.as_ptr().add(i) as *const __m256i);
        let v = _mm256_min_epu16(v, tail);
        let hit = _mm256_or_si256(
            _mm256_or_si256(_mm256_cmpeq_epi16(v, w[0]), _mm256_cmpeq_epi16(v, w[1])),
            _mm256_or_si256(_mm256_cmpeq_epi16(v, w[2]), _mm256_cmpeq_epi16(v, w[3])),
        );
        // Two bits per entry.
        let mut m = _mm256_movemask_epi8(hit) as u32;
        while m != 0 {
            let j = m.trailing_zeros() as usize / 2;
            gather_one(logits, of_token, want, keys, i + j);
            m &= !(3 << (2 * j));
        }
        i += 16;
    }
    for i in i..n {
        gather_one(logits, of_token, want, keys, i);
    }
}

fn gather_body(logits: &[f32], of_token: &[u16], want: &[u16; GATHER_MAX], keys: &mut [Vec<u64>]) {
    const W: usize = 16;
    let wanted = |v: u16| want.iter().fold(false, |acc, &g| acc | (bucket_of(v) == g));
    let mut chunks = of_token.chunks_exact(W);
    for (c, ids) in (&mut chunks).enumerate() {
        if ids.iter().fold(0u16, |acc, &v| acc | wanted(v) as u16) != 0 {
            for j in 0..W {
                gather_one(logits, of_token, want, keys, c * W + j);
            }
        }
    }
    for i in of_token.len() - chunks.remainder().len()..of_token.len() {
        gather_one(logits, of_token, want, keys, i);
    }
}

/// The keys of the first `k` tokens in rank order (`0 < k < logits.len()`), in no particular
/// order; `None` if a logit is NaN. One pass: a buffer that, whenever full, is cut back to its
/// best k, after which a token must beat the k-th best logit so far to enter (a tie ranks after
/// it: the newcomer's id is larger). Chunks where none enters are skipped at once; the others
/// yield a bit mask of the tokens that enter, and only those are visited.
pub(super) fn top_keys(logits: &[f32], k: usize) -> Option<Vec<u64>> {
    const W: usize = 16;
    let cap = (2 * k).max(k + 1024);
    let mut keys = Vec::with_capacity(cap + W);
    // Once the buffer was cut: the logit of the k-th best key (until then every token enters).
    let mut bar = f32::NEG_INFINITY;
    let mut cut = false;
    for (c, l) in logits.chunks(W).enumerate() {
        // Most chunks hold no token that enters (NaN goes through, to be seen below).
        if cut && !l.iter().fold(false, |acc, &v| acc | (v > bar) | v.is_nan()) {
            continue;
        }
        let (mut enter, nan) = l.iter().enumerate().fold((0u32, 0u32), |(e, n), (j, &v)| {
            (
                e | (((v > bar) as u32) << j),
                n | ((v.is_nan() as u32) << j),
            )
        });
        if nan != 0 {
            return None;
        }
        if !cut {
            enter = (1u32 << l.len()) - 1;
        }
        while enter != 0 {
            keys.push(key(logits, c * W + enter.trailing_zeros() as usize));
            enter &= enter - 1;
        }
        if keys.len() >= cap {
            keys.select_nth_unstable(k - 1);
            keys.truncate(k);
            bar = logits[keys[k - 1] as u32 as usize];
            cut = true;
        }
    }
    if keys.len() > k {
        keys.select_nth_unstable(k - 1);
        keys.truncate(k);
    }
    Some(keys)
}
