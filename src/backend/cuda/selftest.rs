//! `herd doctor --selftest`: every CUDA kernel against its CPU twin on random non-zero inputs
//! (device outputs poisoned with NaN first, so an unwritten element fails), then a small model
//! end-to-end against the CPU backend. Tolerances are stated per check.
//!
//! Comparisons use the normwise relative error ‖gpu − cpu‖ / ‖cpu‖ (and the largest absolute
//! difference, printed for information). f32 kernels must land near 1e-6; anything that passes
//! through bf16 (GEMM inputs, the KV cache) near 1e-3..1e-2.
//! NOTE: written without a GPU; the first GPU run is its first run.

use std::fmt::Write as _;

use super::{CudaBackend, Numerics};
use crate::backend::cpu::CpuBackend;
use crate::backend::{AttnBatch, Backend, KvShape, RowSampling, SeqSpan};
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
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    fn f(&mut self) -> f32 {
        let u = (self.next() >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
        let m = 0.05 + 0.95 * u;
        if self.next() & 1 == 0 {
            m
        } else {
            -m
        }
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
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
fn worse(a: f64, b: f64) -> f64 {
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
        // SiLU·mul and add (f32, precise expf).
        out.push(compare(
            "silu_mul",
            &gpu.to_host(&gpu.silu_mul(&xg, &yg)),
            &cpu.to_host(&cpu.silu_mul(&xc, &yc)),
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

    // The tensor-parallel logits reorder after NCCL's all-gather: a copy, exact. Its CPU twin is
    // the loop in CpuBackend::all_gather_cols. (Not yet run on a GPU.)
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
    out.extend(sampling_checks(gpu, &mut rng));
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
    let steps = [
        vec![(0usize, 37usize, 37usize), (1, 400, 400)],
        vec![(0, 1, 38), (1, 1, 401), (2, 20, 20)],
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
        let qv = rng.vec(rows * n_heads * hd);
        let kv_ = rng.vec(rows * 2 * hd);
        let vv = rng.vec(rows * 2 * hd);
        let act = |d: &Vec<f32>, c| crate::backend::cpu::CpuAct {
            rows,
            cols: c,
            data: d.clone(),
        };
        let (mut qc, mut kcc, vc) = (act(&qv, n_heads * hd), act(&kv_, 2 * hd), act(&vv, 2 * hd));
        let mut qg = gpu.act_from_host(rows, n_heads * hd, &qv);
        let mut kgg = gpu.act_from_host(rows, 2 * hd, &kv_);
        let vg = gpu.act_from_host(rows, 2 * hd, &vv);
        cpu.rope_store_kv(&mut qc, &mut kcc, &vc, &inv_freq, &mut kc, layer, &batch);
        gpu.rope_store_kv(&mut qg, &mut kgg, &vg, &inv_freq, &mut kg, layer, &batch);
        out.push(compare(
            &format!("rope q (head_dim {hd}, step {si})"),
            &gpu.to_host(&qg),
            &qc.data,
            1e-5,
        ));
        out.push(compare(
            &format!("rope k (head_dim {hd}, step {si})"),
            &gpu.to_host(&kgg),
            &kcc.data,
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

/// The GPU sampler against engine::sampler (the host twin) on random logits.
fn sampling_checks(gpu: &CudaBackend, rng: &mut Rng) -> Vec<Check> {
    use crate::engine::{sampler, SamplingParams};
    let (rows, vocab) = (48, 32000);
    let logits: Vec<f32> = (0..rows * vocab).map(|_| rng.f() * 6.0).collect();
    let params: Vec<RowSampling> = (0..rows)
        .map(|i| {
            let (temperature, top_p, top_k) = match i % 6 {
                0 => (0.0, 1.0, 0),
                1 => (0.7, 1.0, 50),
                2 => (1.0, 0.9, 0),
                3 => (1.3, 1.0, 0),
                4 => (0.8, 0.95, 40),
                _ => (1.0, 1.0, 1),
            };
            RowSampling {
                temperature,
                top_p,
                top_k,
                seed: 1000 + i as u64,
                n: i as u64 * 3,
                top_logprobs: 5,
            }
        })
        .collect();
    let lg = gpu.act_from_host(rows, vocab, &logits);
    let got = match gpu.sample(&lg, &params) {
        Some(Ok(g)) => g,
        other => {
            return vec![Check {
                name: "sample_rows".into(),
                rel_err: f64::NAN,
                max_abs: f64::NAN,
                tol: 0.0,
                pass: false,
                note: format!("{:?}", other.map(|r| r.map(|_| ()))),
            }]
        }
    };
    let mut mismatches = 0;
    let mut lp_err = 0f64;
    for (i, (p, g)) in params.iter().zip(&got).enumerate() {
        let row = &logits[i * vocab..(i + 1) * vocab];
        let sp = SamplingParams {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            ..Default::default()
        };
        let tok = sampler::sample(row, &sp, p.seed, p.n);
        let lp = sampler::token_logprob(row, tok, p.top_logprobs);
        if tok != g.token || lp.top.iter().map(|t| t.0).ne(g.top.iter().map(|t| t.0)) {
            mismatches += 1;
        }
        lp_err = worse(lp_err, (lp.logprob - g.logprob).abs() as f64);
        for (a, b) in lp.top.iter().zip(&g.top) {
            lp_err = worse(lp_err, (a.1 - b.1).abs() as f64);
        }
    }
    vec![
        Check {
            name: format!("sample tokens ({rows} rows: greedy, top-k, top-p, temperature)"),
            rel_err: mismatches as f64,
            max_abs: mismatches as f64,
            tol: 0.0,
            pass: mismatches == 0,
            note: format!("{mismatches} of {rows} rows differ from the host sampler"),
        },
        Check {
            name: "sample log-probs (chosen + top 5)".into(),
            rel_err: lp_err,
            max_abs: lp_err,
            tol: 1e-4,
            pass: lp_err.is_finite() && lp_err <= 1e-4,
            note: String::new(),
        },
    ]
}

/// A small Llama (head_dim 64: the kernels need a multiple of 32) end-to-end on both backends:
/// log-probs of the last row of every step within 2e-2, greedy tokens equal.
pub fn run_model(mut gpu: CudaBackend, numerics: Numerics) -> Vec<Check> {
    gpu.set_numerics(numerics);
    let (label, tol) = label_tol("tiny model", numerics);
    compare_models(gpu, &label, tol)
}

fn label_tol(what: &str, n: Numerics) -> (String, Tolerance) {
    match n {
        Numerics::Bf16 => (format!("{what} [bf16]"), TOL_BF16),
        Numerics::Accurate => (format!("{what} [accurate]"), TOL_ACCURATE),
    }
}

/// The end-to-end comparison against the CPU backend, for any backend (tests run it on a CPU
/// backend that rounds like the GPU does, to check the tolerance is honest).
pub fn compare_models<B: Backend>(gpu: B, label: &str, tol: Tolerance) -> Vec<Check> {
    use crate::checkpoint::SyntheticSource;
    use crate::model::llama::tensor_specs;
    use crate::model::LlamaConfig;
    let mut cfg = match LlamaConfig::preset("tiny") {
        Ok(c) => c,
        Err(e) => return vec![fail("model config", e.to_string())],
    };
    cfg.dim = 256;
    cfg.n_heads = 4;
    cfg.n_kv_heads = 2;
    cfg.head_dim = 64;
    cfg.ffn_dim = 512;
    let src = SyntheticSource::new(7, tensor_specs(&cfg));
    compare_models_on(gpu, &cfg, &src, label, tol)
}

/// The committed reference fixtures (tests/fixtures/models/*/hf), when run from the repository
/// root (scripts/gpu-check does): the acceptance check, CUDA vs CPU.
pub fn run_fixtures(numerics: Numerics) -> Vec<Check> {
    let mut out = Vec::new();
    let root = std::path::Path::new("tests/fixtures/models");
    let Ok(rd) = std::fs::read_dir(root) else {
        return out;
    };
    let mut dirs: Vec<_> = rd
        .flatten()
        .map(|e| e.path().join("hf"))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for dir in dirs {
        let label = dir.display().to_string();
        let src = match crate::model::loader::open_model(&label) {
            Ok(s) => s,
            Err(e) => {
                out.push(fail(&label, e.to_string()));
                continue;
            }
        };
        let (label, tol) = label_tol(&label, numerics);
        match CudaBackend::new(0) {
            Ok(mut g) => {
                g.set_numerics(numerics);
                out.extend(compare_models_on(
                    g,
                    &src.cfg,
                    src.tensors.as_ref(),
                    &label,
                    tol,
                ))
            }
            Err(e) => out.push(fail(&label, e.to_string())),
        }
    }
    out
}

/// End-to-end log-prob tolerances (max |Δ log-prob| vs the f32 CPU backend).
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    /// The CPU's 20 most likely tokens (what users see).
    pub top: f64,
    /// Every token of the vocabulary (unlikely tokens carry the largest roundings).
    pub all: f64,
}

/// `Numerics::Accurate`: f32-like, the 2e-2 with a wide margin.
pub const TOL_ACCURATE: Tolerance = Tolerance {
    top: 2e-2,
    all: 2e-2,
};
/// `Numerics::Bf16`: a CPU backend rounding exactly like the GPU (bf16 GEMM inputs, bf16 KV)
/// measures up to 0.205 (top-20) and 0.251 (whole vocabulary) on the committed fixtures, whose
/// tiny random models have sharp distributions (0.014 / 0.037 on the self-test's tiny model);
/// 1.5x that margin. The 2e-2 is met only by `Numerics::Accurate`.
pub const TOL_BF16: Tolerance = Tolerance { top: 0.3, all: 0.4 };

/// Prefill 40 tokens then 5 greedy decode steps on both backends; compare log-probs and tokens.
pub fn compare_models_on<B: Backend>(
    gpu: B,
    cfg: &crate::model::LlamaConfig,
    src: &dyn crate::checkpoint::TensorSource,
    label: &str,
    tol: Tolerance,
) -> Vec<Check> {
    use crate::model::llama::Llama;
    use crate::model::shard::ShardPlan;
    use crate::model::{ModelRunner, StepInput};
    let mut cpu_m = match Llama::load(CpuBackend::default(), src, cfg, ShardPlan::SOLO, 16, 16) {
        Ok(m) => m,
        Err(e) => return vec![fail("load (cpu)", e.to_string())],
    };
    let mut gpu_m = match Llama::load(gpu, src, cfg, ShardPlan::SOLO, 16, 16) {
        Ok(m) => m,
        Err(e) => return vec![fail("load (cuda)", e.to_string())],
    };
    let vocab = cfg.vocab_size as u32;
    let prompt: Vec<u32> = (0..40u32).map(|i| (1000 + i * 7919) % vocab).collect();
    let mut tokens = prompt.clone();
    let mut out = Vec::new();
    let mut greedy_equal = true;
    let mut worst = 0f64;
    let mut worst_all = 0f64;
    let mut computed = 0;
    for step in 0..6 {
        let n = tokens.len() - computed;
        let input = StepInput {
            tokens: tokens[computed..].to_vec(),
            seqs: vec![SeqSpan {
                token_start: 0,
                n_tokens: n,
                context_len: tokens.len(),
                block_table: (0..16).collect(),
            }],
            logit_rows: vec![n - 1],
        };
        let (lc, lg) = match (cpu_m.forward(&input), gpu_m.forward(&input)) {
            (Ok(a), Ok(b)) => (a, b),
            (a, b) => {
                out.push(fail(
                    &format!("forward step {step}"),
                    format!("cpu: {:?}, cuda: {:?}", a.err(), b.err()),
                ));
                return out;
            }
        };
        let norm = |l: &[f32]| crate::engine::sampler::log_normalizer(l);
        let (nc, ng) = (norm(&lc), norm(&lg));
        for (a, b) in lc.iter().zip(&lg) {
            worst_all = worse(worst_all, ((*a as f64 - nc) - (*b as f64 - ng)).abs());
        }
        // What users see: the log-probs of the CPU's 20 most likely tokens.
        for (t, lp) in crate::engine::sampler::top_logprobs(&lc, nc, 20) {
            worst = worse(worst, (lp as f64 - (lg[t as usize] as f64 - ng)).abs());
        }
        let (tc, tg) = (
            crate::engine::sampler::argmax(&lc),
            crate::engine::sampler::argmax(&lg),
        );
        greedy_equal &= tc == tg;
        computed = tokens.len();
        tokens.push(tc);
    }
    out.push(Check {
        name: format!("{label}: top-20 log-probs vs CPU (prefill 40 + 5 decode)"),
        rel_err: worst,
        max_abs: worst,
        tol: tol.top,
        pass: worst.is_finite() && worst <= tol.top,
        note: String::new(),
    });
    out.push(Check {
        name: format!("{label}: log-probs, whole vocabulary"),
        rel_err: worst_all,
        max_abs: worst_all,
        tol: tol.all,
        pass: worst_all.is_finite() && worst_all <= tol.all,
        note: String::new(),
    });
    out.push(Check {
        name: format!("{label}: greedy tokens vs CPU"),
        rel_err: if greedy_equal { 0.0 } else { 1.0 },
        max_abs: 0.0,
        tol: 0.0,
        pass: greedy_equal,
        note: String::new(),
    });
    out
}

fn fail(name: &str, note: String) -> Check {
    Check {
        name: name.into(),
        rel_err: f64::NAN,
        max_abs: f64::NAN,
        tol: 0.0,
        pass: false,
        note,
    }
}

/// The whole self-test on GPU 0 as a printable table; `Ok(true)` when every check passed.
pub fn selftest() -> Result<(String, bool), String> {
    let mut gpu = CudaBackend::new(0).map_err(|e| e.to_string())?;
    gpu.set_poison(true);
    let mut checks = run_kernels(&gpu);
    // The accurate mode's GEMM and attention against the CPU: f32-like tolerances.
    gpu.set_numerics(Numerics::Accurate);
    checks.extend(run_accurate_kernels(&gpu));
    for n in [Numerics::Bf16, Numerics::Accurate] {
        let model_gpu = CudaBackend::new(0).map_err(|e| e.to_string())?;
        checks.extend(run_model(model_gpu, n));
        checks.extend(run_fixtures(n));
    }
    Ok(format_checks(&checks))
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
    use crate::backend::cpu::GpuRounding;

    #[test]
    fn the_end_to_end_tolerance_holds_for_gpu_roundings() {
        let checks = compare_models(GpuRounding(CpuBackend::default()), "tiny", TOL_BF16);
        let (table, ok) = format_checks(&checks);
        println!("{table}");
        assert!(ok, "{table}");
        // Margin: the GPU adds only f32 reassociation on top of these roundings.
        assert!(checks[0].rel_err < TOL_BF16.top / 1.5, "{table}");
    }

    #[test]
    fn the_fixture_tolerance_holds_for_gpu_roundings() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
        for m in ["llama30", "llama31", "llama32tied"] {
            let dir = root.join(m).join("hf");
            let src =
                crate::model::loader::open_model(&dir.display().to_string()).expect("fixture");
            let checks = compare_models_on(
                GpuRounding(CpuBackend::default()),
                &src.cfg,
                src.tensors.as_ref(),
                m,
                TOL_BF16,
            );
            let (table, ok) = format_checks(&checks);
            println!("{table}");
            assert!(ok, "{table}");
        }
    }

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
