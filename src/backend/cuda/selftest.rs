//! The kernel half of `herd doctor --selftest`: every CUDA kernel against its CPU twin on random
//! non-zero inputs (device outputs poisoned with NaN first, so an unwritten element fails).
//! Tolerances are stated per check. The checks that need the model or the engine (the sampler's
//! host twin, a whole model end-to-end) live with doctor, in `modes::selftest`.
//!
//! Comparisons use the normwise relative error ‖gpu − cpu‖ / ‖cpu‖ (and the largest absolute
//! difference, printed for information). f32 kernels must land near 1e-6; anything that passes
//! through bf16 (GEMM inputs, the KV cache) near 1e-3..1e-2.
//! NOTE: written without a GPU; the first GPU run is its first run.

use std::fmt::Write as _;

use super::CudaBackend;
use crate::backend::cpu::CpuBackend;
use crate::backend::{AttnBatch, Backend, KvShape, SeqSpan};
use crate::checkpoint::{Bytes, DType, Tensor};

/// One comparison's outcome.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    pub rel_err: f64,
    pub max_abs: f64,
    pub tol: f64,
    pub pass: bool,
    pub note: String,
}

/// Deterministic non-zero random numbers in ±[0.05, 1] (splitmix64).
pub struct Rng(pub u64);
impl Rng {
    pub fn bits(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    /// A number in ±[0.05, 1].
    pub fn f(&mut self) -> f32 {
        let u = (self.bits() >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
        let m = 0.05 + 0.95 * u;
        if self.bits() & 1 == 0 {
            m
        } else {
            -m
        }
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.bits() % n as u64) as usize
    }
}

fn bf16_tensor(rows: usize, cols: usize, rng: &mut Rng) -> Tensor {
    let bytes: Vec<u8> = (0..rows * cols)
        .flat_map(|_| half::bf16::from_f32(rng.f()).to_bits().to_le_bytes())
        .collect();
    Tensor {
        dtype: DType::BF16,
        shape: vec![rows, cols],
        bytes: Bytes::Owned(std::sync::Arc::new(bytes)),
    }
}

fn f32_tensor(v: &[f32]) -> Tensor {
    Tensor {
        dtype: DType::F32,
        shape: vec![v.len()],
        bytes: Bytes::Owned(std::sync::Arc::new(
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )),
    }
}

fn compare(name: &str, gpu: &[f32], cpu: &[f32], tol: f64) -> Check {
    let mut num = 0f64;
    let mut den = 0f64;
    let mut max_abs = 0f64;
    let mut nan = gpu.len() != cpu.len();
    for (g, c) in gpu.iter().zip(cpu) {
        if !g.is_finite() {
            nan = true;
        }
        let d = (*g as f64 - *c as f64).abs();
        num += d * d;
        den += (*c as f64) * (*c as f64);
        max_abs = max_abs.max(d);
    }
    let rel = if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    };
    Check {
        name: name.into(),
        rel_err: if nan { f64::NAN } else { rel },
        max_abs,
        tol,
        pass: !nan && rel <= tol,
        note: if nan {
            "NaN/unwritten output or wrong length".into()
        } else {
            String::new()
        },
    }
}

/// The larger error, NaN winning: `f64::max` returns the other operand when one is NaN, which
/// let NaN log-probs (a kernel that wrote nothing) pass a tolerance check.
pub fn worse(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Run every kernel check; the lines of a table and whether all passed.
pub fn run_kernels(gpu: &CudaBackend) -> Vec<Check> {
    let cpu = CpuBackend::default();
    let mut rng = Rng(0x5e1f_7e57);
    let mut out = Vec::new();

    // Embedding gather: widening bf16 is exact.
    let table = bf16_tensor(1000, 512, &mut rng);
    let (tc, tg) = (cpu.load_matrix(&table), gpu.load_matrix(&table));
    if let (Ok(tc), Ok(tg)) = (tc, tg) {
        let tokens: Vec<u32> = (0..37).map(|_| rng.below(1000) as u32).collect();
        out.push(compare(
            "embed_gather",
            &gpu.to_host(&gpu.embed(&tg, &tokens)),
            &cpu.to_host(&cpu.embed(&tc, &tokens)),
            0.0,
        ));
    }

    // RMSNorm and the fused residual add + RMSNorm (f32).
    let (rows, cols) = (9, 4096);
    let xv = rng.vec(rows * cols);
    let yv = rng.vec(rows * cols);
    let wv = rng.vec(cols);
    let w_t = f32_tensor(&wv);
    if let (Ok(wc), Ok(wg)) = (cpu.load_vector(&w_t), gpu.load_vector(&w_t)) {
        let xc = crate::backend::cpu::CpuAct {
            rows,
            cols,
            data: xv.clone(),
        };
        let xg = gpu.act_from_host(rows, cols, &xv);
        out.push(compare(
            "rmsnorm",
            &gpu.to_host(&gpu.rmsnorm(&xg, &wg, 1e-5)),
            &cpu.to_host(&cpu.rmsnorm(&xc, &wc, 1e-5)),
            1e-5,
        ));
        let (mut xc2, mut xg2) = (xc.clone(), gpu.act_from_host(rows, cols, &xv));
        let yc = crate::backend::cpu::CpuAct {
            rows,
            cols,
            data: yv.clone(),
        };
        let yg = gpu.act_from_host(rows, cols, &yv);
        let hc = cpu.add_rmsnorm(&mut xc2, &yc, &wc, 1e-5);
        let hg = gpu.add_rmsnorm(&mut xg2, &yg, &wg, 1e-5);
        out.push(compare(
            "add_rmsnorm (sum)",
            &gpu.to_host(&xg2),
            &xc2.data,
            1e-6,
        ));
        out.push(compare(
            "add_rmsnorm (norm)",
            &gpu.to_host(&hg),
            &hc.data,
            1e-5,
        ));
        // SiLU·mul (f32, precise expf) of a fused [gate | up]: x's rows are the gates, y's the ups.
        let gu: Vec<f32> = xv
            .chunks(cols)
            .zip(yv.chunks(cols))
            .flat_map(|(g, u)| g.iter().chain(u).copied())
            .collect();
        let guc = crate::backend::cpu::CpuAct {
            rows,
            cols: 2 * cols,
            data: gu.clone(),
        };
        out.push(compare(
            "silu_mul",
            &gpu.to_host(&gpu.silu_mul(&gpu.act_from_host(rows, 2 * cols, &gu))),
            &cpu.to_host(&cpu.silu_mul(&guc)),
            1e-5,
        ));
    }

    // GEMM: x is rounded to bf16 on the GPU (the CPU keeps it f32): ~2^-9 per element.
    for m in [1usize, 5, 64] {
        let (n, k) = (768, 1024);
        let w = bf16_tensor(n, k, &mut rng);
        let xv = rng.vec(m * k);
        if let (Ok(wc), Ok(wg)) = (cpu.load_matrix(&w), gpu.load_matrix(&w)) {
            let xc = crate::backend::cpu::CpuAct {
                rows: m,
                cols: k,
                data: xv.clone(),
            };
            let xg = gpu.act_from_host(m, k, &xv);
            out.push(compare(
                &format!("matmul bf16 m={m} n={n} k={k}"),
                &gpu.to_host(&gpu.matmul(&xg, &wg)),
                &cpu.to_host(&cpu.matmul(&xc, &wc)),
                1e-2,
            ));
        }
    }

    // herd's gemv kernel (HERD_GEMV=1: products of at most 4 rows), x in bf16 as above; and
    // with the residual added in the product (x += a·Wᵀ).
    let gemv_was = gpu.gemv();
    gpu.set_gemv(true);
    for m in [1usize, 3, 4] {
        let (n, k) = (300, 1028);
        let w = bf16_tensor(n, k, &mut rng);
        let xv = rng.vec(m * k);
        let resid = rng.vec(m * n);
        if let (Ok(wc), Ok(wg)) = (cpu.load_matrix(&w), gpu.load_matrix(&w)) {
            let act = |rows, cols, d: &Vec<f32>| crate::backend::cpu::CpuAct {
                rows,
                cols,
                data: d.clone(),
            };
            let (xc, xg) = (act(m, k, &xv), gpu.act_from_host(m, k, &xv));
            out.push(compare(
                &format!("gemv bf16 m={m} n={n} k={k}"),
                &gpu.to_host(&gpu.matmul(&xg, &wg)),
                &cpu.to_host(&cpu.matmul(&xc, &wc)),
                1e-2,
            ));
            let (mut rc, mut rg) = (act(m, n, &resid), gpu.act_from_host(m, n, &resid));
            cpu.matmul_add(&mut rc, &xc, &wc);
            gpu.matmul_add(&mut rg, &xg, &wg);
            out.push(compare(
                &format!("gemv bf16 m={m} n={n} k={k}, residual added"),
                &gpu.to_host(&rg),
                &rc.data,
                1e-2,
            ));
        }
    }
    gpu.set_gemv(gemv_was);

    // The tensor-parallel logits reorder after NCCL's all-gather: a copy, exact. Its CPU twin is
    // the loop in CpuBackend::all_gather_cols.
    {
        let (world, rows, cols) = (4usize, 3usize, 1000usize);
        let all = rng.vec(world * rows * cols);
        let mut want = vec![0f32; all.len()];
        for r in 0..world {
            for i in 0..rows {
                want[(i * world + r) * cols..(i * world + r + 1) * cols]
                    .copy_from_slice(&all[(r * rows + i) * cols..(r * rows + i + 1) * cols]);
            }
        }
        let got = gpu
            .reorder_gathered(&gpu.act_from_host(world * rows, cols, &all), world)
            .map(|a| gpu.to_host(&a))
            .unwrap_or_default();
        out.push(compare("gather_cols_reorder", &got, &want, 0.0));
    }

    out.extend(attention_checks(gpu, &cpu, &mut rng, 128));
    out.extend(attention_checks(gpu, &cpu, &mut rng, 16));
    out.extend(flash_checks(gpu, &mut rng));
    if let Err(e) = gpu.check() {
        out.push(Check {
            name: "asynchronous errors".into(),
            rel_err: f64::NAN,
            max_abs: f64::NAN,
            tol: 0.0,
            pass: false,
            note: e.to_string(),
        });
    }
    out
}

/// `Numerics::Accurate`: the split GEMM and the f32 KV cache, f32-like tolerances.
pub fn run_accurate_kernels(gpu: &CudaBackend) -> Vec<Check> {
    let cpu = CpuBackend::default();
    let mut rng = Rng(0xacc0_2a7e);
    let mut out = Vec::new();
    for m in [1usize, 33] {
        let (n, k) = (512, 1024);
        let w = bf16_tensor(n, k, &mut rng);
        let xv = rng.vec(m * k);
        if let (Ok(wc), Ok(wg)) = (cpu.load_matrix(&w), gpu.load_matrix(&w)) {
            let xc = crate::backend::cpu::CpuAct {
                rows: m,
                cols: k,
                data: xv.clone(),
            };
            let xg = gpu.act_from_host(m, k, &xv);
            // hi + lo keeps ~16 mantissa bits of x: ~1e-5.
            out.push(compare(
                &format!("matmul split bf16x2 [accurate] m={m}"),
                &gpu.to_host(&gpu.matmul(&xg, &wg)),
                &cpu.to_host(&cpu.matmul(&xc, &wc)),
                1e-4,
            ));
        }
    }
    for c in attention_checks(gpu, &cpu, &mut rng, 128) {
        let mut c = c;
        c.name = format!("{} [accurate]", c.name);
        // f32 KV: only reassociation differs.
        c.tol = 1e-5;
        c.pass = c.rel_err.is_finite() && c.rel_err <= c.tol;
        out.push(c);
    }
    out
}

/// RoPE + paged K/V write, then attention: a prefill step of two sequences, then a step that
/// mixes decode rows with a new prefill (split-K engages on the long context).
/// The tiled prefill kernel against the decode kernel on the same queries and cache: a chunk of
/// query rows (the last ones of a sequence) at context lengths 1 to 4097 with block size 16, so
/// that key tiles (16 positions) and blocks start, end and straddle everywhere. Within f32
/// rounding (both read the same bf16 cache; only the summation order differs).
fn flash_checks(gpu: &CudaBackend, rng: &mut Rng) -> Vec<Check> {
    let (hd, n_heads, n_kv, bs, longest) = (64usize, 4usize, 2usize, 16usize, 4097usize);
    let shape = KvShape {
        n_layers: 1,
        num_blocks: longest.div_ceil(bs) + 3,
        block_size: bs,
        n_kv_heads: n_kv,
        head_dim: hd,
    };
    let Ok(mut kv) = gpu.alloc_kv(shape) else {
        return vec![fail("flash prefill", "no KV cache".into())];
    };
    let mut table: Vec<u32> = (0..shape.num_blocks as u32).collect();
    for i in (1..table.len()).rev() {
        table.swap(i, rng.below(i + 1));
    }
    table.truncate(longest.div_ceil(bs));
    // Keys and values of every position, written as a prefill step writes them.
    let fill = AttnBatch::new(vec![SeqSpan {
        token_start: 0,
        n_tokens: longest,
        context_len: longest,
        block_table: table.clone(),
    }]);
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| 1e4f32.powf(-(i as f32) / 32.0))
        .collect();
    // Rows as the fused QKV GEMM gives them: [q | k | v].
    let width = (n_heads + 2 * n_kv) * hd;
    let mut qkv = gpu.act_from_host(longest, width, &rng.vec(longest * width));
    gpu.rope_store_kv(&mut qkv, n_heads, &inv_freq, &mut kv, 0, &fill);
    let mut out = Vec::new();
    // 80 rows: enough (row, head) blocks that the decode kernel runs one split and finishes
    // without attn_combine; 20 rows: several splits, combined.
    let cases = [1, 15, 16, 17, 1000, longest].map(|c| (c, c.min(20)));
    for (ctx, n) in cases.into_iter().chain([(1000, 80)]) {
        let batch = AttnBatch::new(vec![SeqSpan {
            token_start: 0,
            n_tokens: n,
            context_len: ctx,
            block_table: table[..ctx.div_ceil(bs)].to_vec(),
        }]);
        // Queries inside fused rows (a row stride wider than the query heads).
        let qg = gpu.act_from_host(n, width, &rng.vec(n * width));
        out.push(compare(
            &format!("flash prefill vs decode kernel (context {ctx}, {n} rows, block 16)"),
            &gpu.to_host(&gpu.attention_with(&qg, &kv, 0, n_heads, &batch, true)),
            &gpu.to_host(&gpu.attention_with(&qg, &kv, 0, n_heads, &batch, false)),
            1e-5,
        ));
    }
    out
}

fn attention_checks(gpu: &CudaBackend, cpu: &CpuBackend, rng: &mut Rng, hd: usize) -> Vec<Check> {
    let mut out = Vec::new();
    let shape = KvShape {
        n_layers: 2,
        num_blocks: 64,
        block_size: 16,
        n_kv_heads: 2,
        head_dim: hd,
    };
    let n_heads = 8;
    let (Ok(mut kc), Ok(mut kg)) = (cpu.alloc_kv(shape), gpu.alloc_kv(shape)) else {
        return out;
    };
    // Block tables from a shuffled pool, so pages are not in order.
    let mut pool: Vec<u32> = (0..shape.num_blocks as u32).collect();
    for i in (1..pool.len()).rev() {
        pool.swap(i, rng.below(i + 1));
    }
    let tables = [
        pool[0..4].to_vec(),
        pool[4..30].to_vec(),
        pool[30..32].to_vec(),
    ];
    let inv_freq: Vec<f32> = (0..64)
        .map(|i| 500000f32.powf(-(i as f32) / 64.0))
        .collect();
    // Prefill, mixed (both run the tiled prefill kernel), decode only (the decode kernel).
    let steps = [
        vec![(0usize, 37usize, 37usize), (1, 400, 400)],
        vec![(0, 1, 38), (1, 1, 401), (2, 20, 20)],
        vec![(0, 1, 39), (1, 1, 402), (2, 1, 21)],
    ];
    let layer = 1;
    for (si, plan) in steps.iter().enumerate() {
        let mut seqs = Vec::new();
        let mut start = 0;
        for &(s, n, ctx) in plan {
            seqs.push(SeqSpan {
                token_start: start,
                n_tokens: n,
                context_len: ctx,
                block_table: tables[s].clone(),
            });
            start += n;
        }
        let batch = AttnBatch::new(seqs);
        let rows = batch.n_tokens();
        // Rows as the fused QKV GEMM gives them: [q (8 heads) | k (2) | v (2)].
        let width = (n_heads + 4) * hd;
        let qkv = rng.vec(rows * width);
        let mut qc = crate::backend::cpu::CpuAct {
            rows,
            cols: width,
            data: qkv.clone(),
        };
        let mut qg = gpu.act_from_host(rows, width, &qkv);
        cpu.rope_store_kv(&mut qc, n_heads, &inv_freq, &mut kc, layer, &batch);
        gpu.rope_store_kv(&mut qg, n_heads, &inv_freq, &mut kg, layer, &batch);
        out.push(compare(
            &format!("rope q, k (head_dim {hd}, step {si})"),
            &gpu.to_host(&qg),
            &qc.data,
            1e-5,
        ));
        // K/V are stored in bf16 on the GPU: attention inherits ~2^-9 relative rounding.
        out.push(compare(
            &format!("attention paged GQA (head_dim {hd}, step {si}, {rows} rows)"),
            &gpu.to_host(&gpu.attention(&qg, &kg, layer, n_heads, &batch)),
            &cpu.to_host(&cpu.attention(&qc, &kc, layer, n_heads, &batch)),
            1e-2,
        ));
    }
    out
}

/// A check that could not run, with why.
pub fn fail(name: &str, note: String) -> Check {
    Check {
        name: name.into(),
        rel_err: f64::NAN,
        max_abs: f64::NAN,
        tol: 0.0,
        pass: false,
        note,
    }
}

/// A table of checks; whether all passed.
pub fn format_checks(checks: &[Check]) -> (String, bool) {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<58} {:>10} {:>10} {:>9}  result",
        "check", "rel err", "max abs", "tol"
    );
    let mut all = true;
    for c in checks {
        all &= c.pass;
        let _ = writeln!(
            s,
            "{:<58} {:>10.2e} {:>10.2e} {:>9.1e}  {}{}",
            c.name,
            c.rel_err,
            c.max_abs,
            c.tol,
            if c.pass { "ok" } else { "FAIL" },
            if c.note.is_empty() {
                String::new()
            } else {
                format!("  ({})", c.note)
            }
        );
    }
    (s, all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_log_probs_fail_the_model_checks() {
        assert!(worse(0.1, f64::NAN).is_nan());
        assert!(worse(f64::NAN, 0.1).is_nan());
        assert_eq!(worse(0.1, 0.2), 0.2);
    }

    #[test]
    fn the_checks_catch_unwritten_outputs() {
        let c = compare("x", &[1.0, f32::NAN], &[1.0, 2.0], 1.0);
        assert!(!c.pass);
        assert!(compare("y", &[1.0, 2.0], &[1.0, 2.0], 0.0).pass);
    }
}
