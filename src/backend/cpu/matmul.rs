//! `x · Wᵀ` with W kept in its stored dtype and widened a block of rows at a time.
//!
//! Every output element is one dot product computed by the same instruction sequence whatever the
//! batch, so a sequence's numbers never depend on what else is in the batch. Rows of W are
//! widened once per call and reused for every row of x: decode (few x rows) streams W once,
//! which is the memory-bound limit.

use rayon::prelude::*;

/// Weight rows widened per task: 16 rows of 8192 f32 = 512 KB, in L2 on current CPUs.
const ROW_BLOCK: usize = 16;

/// Up to this many x rows, bf16 weights are read straight into the dot product (converted in
/// registers) instead of being widened into a buffer first: decode streams each weight byte once.
const DIRECT_BF16_MAX_ROWS: usize = 4;

/// Storage of a CPU weight matrix.
pub enum MatrixData {
    /// bf16 bits, as stored in the checkpoint (zero-copy when mapped).
    Bf16(crate::checkpoint::Bytes),
    /// f32 (f16/f32 checkpoints are widened at load).
    F32(Vec<f32>),
    /// Matrices of one width stacked along their rows (fused projections: Q/K/V, gate/up), kept
    /// apart so that mapped checkpoint bytes stay mapped instead of being copied together.
    Stacked(Vec<CpuMatrix>),
}

/// A `[rows, cols]` weight matrix.
pub struct CpuMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: MatrixData,
}

impl CpuMatrix {
    /// Row `r` widened into `out` (`cols` long).
    pub fn widen_row(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        match &self.data {
            MatrixData::Bf16(b) => {
                let bytes = &b.as_slice()[2 * r * c..2 * (r + 1) * c];
                widen_bf16(bytes, out);
            }
            MatrixData::F32(v) => out.copy_from_slice(&v[r * c..(r + 1) * c]),
            MatrixData::Stacked(parts) => {
                let mut r = r;
                for p in parts {
                    if r < p.rows {
                        return p.widen_row(r, out);
                    }
                    r -= p.rows;
                }
            }
        }
    }
}

fn widen_bf16(bytes: &[u8], out: &mut [f32]) {
    // bf16 is the top half of an f32: widening is a shift, exact.
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
    }
}

/// `out[m, n] = Σ_k x[m, k] · w[n, k]`; `x` is `[m_rows, w.cols]`, the result `[m_rows, w.rows]`.
pub fn matmul(x: &[f32], m_rows: usize, w: &CpuMatrix) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m_rows * k, "matmul: x has wrong size");
    if let MatrixData::Stacked(parts) = &w.data {
        // Each part's columns, placed side by side: every element is still its own dot product.
        let mut out = vec![0f32; m_rows * n];
        let mut c0 = 0;
        for p in parts {
            let o = matmul(x, m_rows, p);
            for (dst, src) in out.chunks_exact_mut(n).zip(o.chunks_exact(p.rows.max(1))) {
                dst[c0..c0 + p.rows].copy_from_slice(src);
            }
            c0 += p.rows;
        }
        return out;
    }
    let dot = dot_kernel();
    let direct_bf16 = match (&w.data, dot_bf16_kernel()) {
        (MatrixData::Bf16(bytes), Some(f)) if m_rows <= DIRECT_BF16_MAX_ROWS => {
            Some((bytes.as_slice(), f))
        }
        _ => None,
    };
    let mut out = vec![0f32; m_rows * n];
    let out_ptr = OutPtr(out.as_mut_ptr());
    // Each task owns ROW_BLOCK output columns (weight rows) and writes them in every x row.
    (0..n.div_ceil(ROW_BLOCK)).into_par_iter().for_each_init(
        || vec![0f32; ROW_BLOCK * k],
        |wbuf, blk| {
            let n0 = blk * ROW_BLOCK;
            let nb = ROW_BLOCK.min(n - n0);
            let put = |m: usize, j: usize, v: f32| {
                // SAFETY: (m, n0 + j) is inside the m_rows x n output, and column n0 + j belongs
                // to this task alone, so no two threads write the same element.
                unsafe { *out_ptr.at(m * n + n0 + j) = v }
            };
            if let Some((wb, dot_bf16)) = direct_bf16 {
                for j in 0..nb {
                    let row = &wb[2 * (n0 + j) * k..2 * (n0 + j + 1) * k];
                    for m in 0..m_rows {
                        put(m, j, dot_bf16(&x[m * k..(m + 1) * k], row));
                    }
                }
                return;
            }
            for j in 0..nb {
                w.widen_row(n0 + j, &mut wbuf[j * k..(j + 1) * k]);
            }
            for m in 0..m_rows {
                let xr = &x[m * k..(m + 1) * k];
                for j in 0..nb {
                    put(m, j, dot(xr, &wbuf[j * k..(j + 1) * k]));
                }
            }
        },
    );
    out
}

/// The output buffer shared by the matmul tasks, which write disjoint columns of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: tasks write disjoint elements (see `matmul`), and the buffer outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `i` must be inside the buffer.
    unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

type DotFn = fn(&[f32], &[f32]) -> f32;
type DotBf16Fn = fn(&[f32], &[u8]) -> f32;

/// A dot product reading bf16 weights directly, bit-identical to `dot_kernel()` on the widened
/// row (same accumulators, same order; widening bf16 is exact). `None` where only the portable
/// kernel runs.
fn dot_bf16_kernel() -> Option<DotBf16Fn> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Some(dot_bf16_avx2_entry);
        }
    }
    None
}

/// The fastest dot product this CPU supports; chosen once per call, the same for every element.
fn dot_kernel() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return dot_avx2_entry;
        }
    }
    dot_portable
}

/// Eight partial sums in a fixed order, then a fixed reduction: deterministic and vectorizable.
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[8 * c + l] * b[8 * c + l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in 8 * chunks..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2_entry(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: only selected by dot_kernel() after checking avx2 and fma at run time.
    unsafe { dot_avx2(a, b) }
}

/// One body for both AVX2 dot products, so that they stay bit-identical: four independent
/// accumulators (hiding the FMA latency) over 32-element steps, then 8-element steps into the
/// first, a fixed reduction, a scalar tail. `$load8(i)` loads 8 lanes of the second operand from
/// element `i`, `$get(i)` one element.
macro_rules! avx2_dot_body {
    ($pa:ident, $n:expr, $load8:expr, $get:expr) => {{
        let n = $n;
        let load8 = $load8;
        let get = $get;
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut acc2 = _mm256_setzero_ps();
        let mut acc3 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 32 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps($pa.add(i)), load8(i), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps($pa.add(i + 8)), load8(i + 8), acc1);
            acc2 = _mm256_fmadd_ps(_mm256_loadu_ps($pa.add(i + 16)), load8(i + 16), acc2);
            acc3 = _mm256_fmadd_ps(_mm256_loadu_ps($pa.add(i + 24)), load8(i + 24), acc3);
            i += 32;
        }
        while i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps($pa.add(i)), load8(i), acc0);
            i += 8;
        }
        let acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
            + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
        while i < n {
            s += *$pa.add(i) * get(i);
            i += 1;
        }
        s
    }};
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    avx2_dot_body!(
        pa,
        a.len().min(b.len()),
        |i| _mm256_loadu_ps(pb.add(i)),
        |i| *pb.add(i)
    )
}

#[cfg(target_arch = "x86_64")]
fn dot_bf16_avx2_entry(a: &[f32], w: &[u8]) -> f32 {
    // SAFETY: only selected by dot_bf16_kernel() after checking avx2 and fma at run time.
    unsafe { dot_bf16_avx2(a, w) }
}

/// `dot_avx2` with the second operand as bf16 bytes, widened in registers (exact).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_avx2(a: &[f32], w: &[u8]) -> f32 {
    use std::arch::x86_64::*;
    let (pa, pw) = (a.as_ptr(), w.as_ptr());
    let load8 = |i: usize| {
        let raw = _mm_loadu_si128(pw.add(2 * i) as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
    };
    let get = |i: usize| {
        f32::from_bits((u16::from_le_bytes([*pw.add(2 * i), *pw.add(2 * i + 1)]) as u32) << 16)
    };
    avx2_dot_body!(pa, a.len().min(w.len() / 2), load8, get)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_naive_for_odd_shapes() {
        for &(m, n, k) in &[(1, 1, 1), (3, 17, 37), (5, 33, 64), (2, 40, 100)] {
            let x = pseudo(m * k, 1);
            let wf = pseudo(n * k, 7);
            let w = CpuMatrix {
                rows: n,
                cols: k,
                data: MatrixData::F32(wf.clone()),
            };
            let got = matmul(&x, m, &w);
            let want = naive(&x, m, &wf, n, k);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-4 * (1.0 + e.abs()), "{g} vs {e}");
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_other_rows() {
        let (n, k) = (50, 300);
        let w = CpuMatrix {
            rows: n,
            cols: k,
            data: MatrixData::F32(pseudo(n * k, 3)),
        };
        let x = pseudo(7 * k, 9);
        let all = matmul(&x, 7, &w);
        let one = matmul(&x[4 * k..5 * k], 1, &w);
        assert_eq!(&all[4 * n..5 * n], &one[..]);
    }

    #[test]
    fn bf16_rows_give_identical_results_at_any_batch_size() {
        // Crosses DIRECT_BF16_MAX_ROWS: the direct and the widened paths must agree bit for bit.
        let (n, k) = (37, 301);
        let bytes: Vec<u8> = pseudo(n * k, 11)
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        let w = CpuMatrix {
            rows: n,
            cols: k,
            data: MatrixData::Bf16(crate::checkpoint::Bytes::Owned(std::sync::Arc::new(bytes))),
        };
        let x = pseudo(9 * k, 4);
        let all = matmul(&x, 9, &w);
        for r in 0..9 {
            let one = matmul(&x[r * k..(r + 1) * k], 1, &w);
            assert_eq!(&all[r * n..(r + 1) * n], &one[..], "row {r}");
        }
    }

    #[test]
    fn a_stacked_weight_gives_exactly_each_part_side_by_side() {
        // Q/K/V-like parts of different heights; 1 row (direct bf16 path) and 6 rows (widened).
        let k = 96;
        let part = |n: usize, seed: u32| {
            let bytes: Vec<u8> = pseudo(n * k, seed)
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
                .collect();
            CpuMatrix {
                rows: n,
                cols: k,
                data: MatrixData::Bf16(crate::checkpoint::Bytes::Owned(std::sync::Arc::new(bytes))),
            }
        };
        let heights = [40, 8, 8];
        let stacked = CpuMatrix {
            rows: 56,
            cols: k,
            data: MatrixData::Stacked((0..3).map(|i| part(heights[i], i as u32 + 1)).collect()),
        };
        for m in [1, 6] {
            let x = pseudo(m * k, 2);
            let all = matmul(&x, m, &stacked);
            let mut c0 = 0;
            for (i, &n) in heights.iter().enumerate() {
                let one = matmul(&x, m, &part(n, i as u32 + 1));
                for r in 0..m {
                    assert_eq!(&all[r * 56 + c0..r * 56 + c0 + n], &one[r * n..(r + 1) * n]);
                }
                c0 += n;
            }
            let mut row = vec![0f32; k];
            let mut want = vec![0f32; k];
            stacked.widen_row(50, &mut row);
            part(8, 3).widen_row(2, &mut want);
            assert_eq!(row, want);
        }
    }

    #[test]
    fn portable_and_simd_dots_agree_closely() {
        let a = pseudo(1001, 5);
        let b = pseudo(1001, 6);
        let p = dot_portable(&a, &b);
        let s = dot_kernel()(&a, &b);
        assert!((p - s).abs() < 1e-3, "{p} vs {s}");
    }
}
