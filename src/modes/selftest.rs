//! `herd doctor --selftest`: the CUDA kernels against their CPU twins (`backend::cuda::selftest`),
//! then what needs the layers above the backend: the GPU sampler against the engine's host
//! sampler, and a small model and the committed fixtures end-to-end against the CPU backend.
//! Tolerances are stated per check.

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::selftest::{
    fail, format_checks, run_accurate_kernels, run_kernels, worse, Check, Rng,
};
use crate::backend::cuda::{CudaBackend, Numerics};
use crate::backend::{Backend, RowSampling, SeqSpan};
use crate::engine::{sampler, SamplingParams};

/// The whole self-test on GPU 0 as a printable table; `Ok(true)` when every check passed.
pub fn selftest() -> Result<(String, bool), String> {
    let mut gpu = CudaBackend::new(0).map_err(|e| e.to_string())?;
    gpu.set_poison(true);
    let mut checks = run_kernels(&gpu);
    checks.extend(sampling_checks(&gpu));
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

/// The GPU sampler against engine::sampler (the host twin) on random logits.
pub fn sampling_checks(gpu: &CudaBackend) -> Vec<Check> {
    let rng = &mut Rng(0x5a3_91e5);
    let (rows, vocab) = (48, 32000);
    // Continuous logits, then logits on a grid of 13 values (thousands of exact ties: the token
    // among equals must still be the host sampler's).
    let continuous: Vec<f32> = (0..rows * vocab).map(|_| rng.f() * 6.0).collect();
    let tied: Vec<f32> = (0..rows * vocab)
        .map(|_| (rng.f() * 13.0).floor() * 0.5)
        .collect();
    let none = vec![None; rows];
    let mut checks = sampling_checks_on(gpu, &continuous, rows, vocab, &none, MIX, "");
    checks.extend(sampling_checks_on(
        gpu,
        &tied,
        rows,
        vocab,
        &none,
        MIX,
        ", tied logits",
    ));
    // Equal logits with top-p at an exact share of the mass (cum / total == top_p): the nucleus
    // ends on the prefix that reaches it, not one token later.
    let flat = vec![0.5f32; rows * 8];
    checks.extend(sampling_checks_on(
        gpu,
        &flat,
        rows,
        8,
        &none,
        &[(1.0, 0.5, 0), (1.0, 0.75, 0), (2.0, 0.25, 0), (1.0, 0.5, 6)],
        ", equal logits, top-p on a boundary",
    ));
    // Structured outputs' masks (sampler::sample_masked): rows with a random mask (dense, or a
    // few dozen tokens: fewer than top-k), one allowed token, and unmasked rows among them.
    let words = vocab.div_ceil(32);
    let masks: Vec<Option<Vec<u32>>> = (0..rows)
        .map(|i| {
            let mut m = vec![0u32; words];
            let mut allow = |j: usize| m[j / 32] |= 1 << (j % 32);
            match i % 8 {
                0 => return None,
                1 => allow((rng.bits() % vocab as u64) as usize),
                2 | 3 => (0..30).for_each(|_| allow((rng.bits() % vocab as u64) as usize)),
                _ => (0..vocab)
                    .filter(|_| rng.bits().is_multiple_of(3))
                    .for_each(allow),
            }
            Some(m)
        })
        .collect();
    let masks: Vec<Option<&[u32]>> = masks.iter().map(|m| m.as_deref()).collect();
    checks.extend(sampling_checks_on(
        gpu,
        &continuous,
        rows,
        vocab,
        &masks,
        MIX,
        ", masked rows",
    ));
    checks.extend(sampling_checks_on(
        gpu,
        &tied,
        rows,
        vocab,
        &masks,
        MIX,
        ", masked rows, tied logits",
    ));
    checks
}

/// (temperature, top_p, top_k) of the rows, in turn: greedy, top-k, top-p, temperature alone.
const MIX: &[(f32, f32, usize)] = &[
    (0.0, 1.0, 0),
    (0.7, 1.0, 50),
    (1.0, 0.9, 0),
    (1.3, 1.0, 0),
    (0.8, 0.95, 40),
    (1.0, 1.0, 1),
];

fn sampling_checks_on(
    gpu: &CudaBackend,
    logits: &[f32],
    rows: usize,
    vocab: usize,
    masks: &[Option<&[u32]>],
    mix: &[(f32, f32, usize)],
    what: &str,
) -> Vec<Check> {
    let params: Vec<RowSampling> = (0..rows)
        .map(|i| {
            let (temperature, top_p, top_k) = mix[i % mix.len()];
            RowSampling {
                temperature,
                top_p,
                top_k,
                seed: 1000 + i as u64,
                n: i as u64 * 3,
                top_logprobs: 5,
                mask: masks[i],
            }
        })
        .collect();
    let lg = gpu.act_from_host(rows, vocab, logits);
    // End the previous check's step: its staged parameters (a step of the same shape) would
    // otherwise be sampled with again.
    if let Err(e) = gpu.check() {
        return vec![fail(&format!("sample_rows{what}"), e.to_string())];
    }
    let got = match gpu.sample(&lg, &params) {
        Some(Ok(g)) => g,
        other => {
            return vec![Check {
                name: format!("sample_rows{what}"),
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
        let tok = match p.mask {
            Some(m) => {
                let allowed: Vec<u32> = (0..vocab as u32)
                    .filter(|&j| m[j as usize / 32] >> (j % 32) & 1 == 1)
                    .collect();
                sampler::sample_masked(row, &allowed, &sp, p.seed, p.n)
            }
            None => sampler::sample(row, &sp, p.seed, p.n),
        };
        // Log-probs of the raw distribution, mask or not (the engine's contract).
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
            name: format!("sample tokens ({rows} rows: greedy, top-k, top-p, temperature{what})"),
            rel_err: mismatches as f64,
            max_abs: mismatches as f64,
            tol: 0.0,
            pass: mismatches == 0,
            note: format!("{mismatches} of {rows} rows differ from the host sampler"),
        },
        Check {
            name: format!("sample log-probs (chosen + top 5{what})"),
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
            kv_copies: Vec::new(),
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
}
