//! `herd bench`: decode throughput at several batch sizes, next to the memory-bandwidth limit
//! measured in the same run; one CSV row per batch size.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use rayon::prelude::*;

use super::setup::{build_engine, ModelArgs};
use crate::backend::cuda;
use crate::engine::{Event, SamplingParams};
use crate::exit;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batch sizes to measure (default: 1,16 on the cpu; 1,8,32,128,256 on a GPU).
    #[arg(long, value_delimiter = ',')]
    pub batch_sizes: Vec<usize>,
    /// Prompt lengths whose prefill is timed alone (default: none on the cpu; 512,2048 on a GPU).
    #[arg(long, value_delimiter = ',')]
    pub prefill_lens: Vec<usize>,
    /// Prompt length of every request (tokens).
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    pub gen_tokens: usize,
    /// Sampling of every request (seeded): temperature 0 = greedy, the default.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Append results to this CSV (created with a header if new).
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// GPU: after each batch size's measurement, run its decode again eagerly with every launch
    /// timed (CUDA events) and append one row per kernel (GEMMs per shape) to this CSV: where
    /// a decode step's device time goes, and each GEMM's bytes moved per second.
    #[arg(long)]
    pub kernel_profile: Option<PathBuf>,
}

impl BenchArgs {
    /// The flags, before anything loads (exit code 2 naming the flag).
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        for (flag, v) in [
            ("--batch-sizes", self.batch_sizes.as_slice()),
            ("--prefill-lens", self.prefill_lens.as_slice()),
            ("--prompt-len", &[self.prompt_len]),
            ("--gen-tokens", &[self.gen_tokens]),
        ] {
            if v.contains(&0) {
                return Err(exit::usage(format!(
                    "{flag}: every value must be at least 1"
                )));
            }
        }
        super::check_sampling_flags(&self.sampling(1, 0))?;
        if let Some(p) = &self.csv {
            super::check_output_file("--csv", p)?;
            check_csv_header("--csv", p, BENCH_HEADER)?;
        }
        if let Some(p) = &self.kernel_profile {
            if self.model.device == "cpu" {
                return Err(exit::usage(
                    "--kernel-profile times CUDA kernels: it needs --device cuda",
                ));
            }
            if self.model.tp > 1 {
                return Err(exit::usage(
                    "--kernel-profile runs one GPU's steps eagerly: use it with --tp 1",
                ));
            }
            super::check_output_file("--kernel-profile", p)?;
            check_csv_header("--kernel-profile", p, PROFILE_HEADER)?;
        }
        Ok(())
    }

    /// Request `r`'s sampling parameters, generating `max_tokens`.
    fn sampling(&self, max_tokens: usize, r: usize) -> SamplingParams {
        SamplingParams {
            max_tokens,
            ignore_eos: true,
            seed: Some(r as u64),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            ..Default::default()
        }
    }

    /// The sampling, as the CSV's `sampling` column and the log name it.
    fn sampling_label(&self) -> String {
        if self.temperature == 0.0 {
            return "greedy".into();
        }
        let mut s = format!("temperature {}", self.temperature);
        if self.top_p < 1.0 {
            s += &format!(" top_p {}", self.top_p);
        }
        if self.top_k > 0 {
            s += &format!(" top_k {}", self.top_k);
        }
        s
    }
}

const BENCH_HEADER: &str = "date,commit,machine,backend,model,batch,prompt_len,ms_per_step,tokens_per_s,bytes_per_step,achieved_gb_s,measured_bw_gb_s,bw_ratio,limit_tokens_per_s,achieved_gflop_s,kernel_peak_gflop_s,prefill_tokens_per_s,sampling";
const PROFILE_HEADER: &str = "date,commit,machine,model,step,kernel,calls_per_step,us_per_step,share_of_step,bytes_per_call,achieved_gb_s,bw_ratio";

/// A CSV that rows will be appended to: new, or with exactly this header (rows of another shape
/// would not line up with its columns). Exit code 2 naming the flag.
fn check_csv_header(flag: &str, path: &std::path::Path, header: &str) -> Result<()> {
    use std::io::{BufRead, Read};
    // A regular file only (not /dev/stdout or a pipe), and its first line only.
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return Ok(());
    }
    let mut first = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = std::io::BufReader::new(f.take(64 * 1024)).read_line(&mut first);
    }
    match first.lines().next() {
        None => Ok(()),
        Some(h) if h == header => Ok(()),
        Some(h) => Err(exit::usage(format!(
            "{flag} {}: its header has other columns ({}) than herd writes ({}): give a new file",
            path.display(),
            h.split(',').count(),
            header.split(',').count()
        ))),
    }
}

/// Host memory read bandwidth (GB/s): every thread sums its part of a 1 GiB buffer; best of 3.
pub fn measure_read_bandwidth() -> f64 {
    let n = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..n as u64).collect();
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let s: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .reduce(|| 0, u64::wrapping_add);
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((n * 8) as f64 / secs / 1e9);
    }
    best
}

/// Peak of the CPU matmul kernel (GFLOP/s) on cache-resident operands: the compute limit.
pub fn measure_matmul_peak() -> f64 {
    use crate::backend::cpu::{matmul::matmul, CpuMatrix, MatrixData};
    let (m, n, k) = (64, 512, 1024);
    let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.01).collect();
    let w = CpuMatrix {
        rows: n,
        cols: k,
        data: MatrixData::F32((0..n * k).map(|i| (i % 7) as f32 * 0.01).collect()),
    };
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        std::hint::black_box(matmul(&x, m, &w));
        best = best.max(2.0 * (m * n * k) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

pub fn run(mut args: BenchArgs) -> Result<()> {
    let on_gpu = match args.model.device.as_str() {
        "cpu" => false,
        "cuda" => true,
        _ => cuda::device_count().is_ok(),
    };
    if args.kernel_profile.is_some() && !on_gpu {
        return Err(exit::usage(
            "--kernel-profile times CUDA kernels, and no GPU is usable here (--device auto \
             chose the cpu)",
        ));
    }
    if args.batch_sizes.is_empty() {
        args.batch_sizes = if on_gpu {
            vec![1, 8, 32, 128, 256]
        } else {
            vec![1, 16]
        };
    }
    if args.prefill_lens.is_empty() && on_gpu {
        args.prefill_lens = vec![512, 2048];
    }
    let max_b = args.batch_sizes.iter().copied().max().unwrap_or(1);
    let mut margs = args.model.clone();
    margs.max_batch_size = margs.max_batch_size.max(max_b);
    // Host vs device time per step (two CUDA events, recorded by the backend each step).
    cuda::time_steps(on_gpu);
    let mut engine = build_engine(&margs)?;
    let cfg = engine.model().config().clone();
    let gpu = engine.model().backend_name().starts_with("cuda");
    // The two limits, measured in this run on this device: memory bandwidth and the matrix rate.
    let (bw, peak, machine) = if gpu {
        let b = cuda::CudaBackend::new(0).map_err(|e| anyhow::anyhow!("{e}"))?;
        // An emulated device (tests/cuda-emu) has no speed to measure: an 8192^3 GEMM on the
        // CPU would take hours. Its rows count launches; their rates mean nothing.
        let (bw, tflops) = if b.info.name.contains("emulated") {
            (f64::NAN, f64::NAN)
        } else {
            b.measure_limits().map_err(|e| anyhow::anyhow!("{e}"))?
        };
        eprintln!(
            "device-to-device copy {bw:.0} GB/s (read + write), bf16 GEMM 8192^3 {tflops:.0} TFLOP/s on {}",
            b.info.name
        );
        (bw, tflops * 1e3, format!("{} x1", b.info.name))
    } else {
        let bw = measure_read_bandwidth();
        let machine = super::host::machine_name();
        let peak = measure_matmul_peak();
        eprintln!(
            "host read bandwidth {bw:.1} GB/s, matmul kernel peak {peak:.1} GFLOP/s on {machine}"
        );
        (bw, peak, machine)
    };
    let weight_bytes = cfg.n_params() as f64 * 2.0;
    // Multiply-adds per token: every weight except the embedding lookup (tied: used once, as output).
    let emb = (cfg.vocab_size * cfg.dim) as f64;
    let matmul_params = cfg.n_params() as f64 - if cfg.tie_embeddings { 0.0 } else { emb };
    // K and V of one token across layers: f32 on the CPU, bf16 on the GPU.
    let kv_elem = if gpu && margs.gpu_numerics != "accurate" {
        2
    } else {
        4
    };
    let kv_token_bytes = (2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * kv_elem) as f64;
    let mut rows = Vec::new();
    let mut profile_rows = Vec::new();
    let mut prompts = Prompts(0);
    let sampling = args.sampling_label();
    eprintln!("sampling: {sampling} (seeded)");
    for &b in &args.batch_sizes {
        let t_prefill = Instant::now();
        start_batch(&mut engine, b, &args, &mut prompts)?;
        let prefill_s = t_prefill.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let steps0 = engine.stats().steps;
        let gen0 = engine.stats().generated_tokens;
        let dev0 = cuda::counters();
        engine.run_to_completion()?;
        let dev1 = cuda::counters();
        let secs = t0.elapsed().as_secs_f64();
        let steps = (engine.stats().steps - steps0).max(1);
        let tokens = engine.stats().generated_tokens - gen0;
        let ms_step = secs * 1e3 / steps as f64;
        let tok_s = tokens as f64 / secs;
        // Bytes a decode step must read: all weights once + each sequence's KV (mean context).
        let mean_ctx = args.prompt_len as f64 + args.gen_tokens as f64 / 2.0;
        let step_bytes = weight_bytes + b as f64 * mean_ctx * kv_token_bytes;
        let achieved = step_bytes / (ms_step / 1e3) / 1e9;
        let limit_tok_s = b as f64 * bw * 1e9 / step_bytes;
        let gflops = 2.0 * matmul_params * b as f64 / (ms_step / 1e3) / 1e9;
        if gpu {
            // What the host asked of the GPU per decode step (a decode graph replaces every
            // loose launch), and where the time went: the host's work until it waits for the
            // device, and the device's own time for the step (events).
            let per_step = |a: u64, b: u64| (b - a) as f64 / steps as f64;
            eprintln!(
                "batch {b:>4}: host {:.3} ms/step, device {:.3} ms/step; per step {:.1} kernel launches + {:.2} graph launches; {} launches per layer run eagerly",
                per_step(dev0.host_ns, dev1.host_ns) / 1e6,
                per_step(dev0.device_ns, dev1.device_ns) / 1e6,
                per_step(dev0.launches, dev1.launches),
                per_step(dev0.graph_launches, dev1.graph_launches),
                dev1.launches_per_layer
            );
        }
        eprintln!(
            "batch {b:>4}: {ms_step:8.2} ms/step  {tok_s:9.1} tok/s  {achieved:6.1} GB/s = {:.0}% of {bw:.1} GB/s (limit {limit_tok_s:.1} tok/s)  {gflops:.1} GFLOP/s = {:.0}% of kernel peak  prefill {:.0} tok/s",
            100.0 * achieved / bw,
            100.0 * gflops / peak,
            (b * args.prompt_len) as f64 / prefill_s
        );
        rows.push(format!(
            "{},{},{},{},{},{},{},{:.3},{:.2},{:.0},{:.2},{:.2},{:.3},{:.1},{:.2},{:.2},{:.1},{}",
            super::host::today_utc(),
            env!("HERD_GIT_COMMIT"),
            machine.replace(',', " "),
            engine.model().backend_name().replace(',', " "),
            margs.model,
            b,
            args.prompt_len,
            ms_step,
            tok_s,
            step_bytes,
            achieved,
            bw,
            achieved / bw,
            limit_tok_s,
            gflops,
            peak,
            (b * args.prompt_len) as f64 / prefill_s,
            sampling,
        ));
        if args.kernel_profile.is_some() {
            start_batch(&mut engine, b, &args, &mut prompts)?;
            let what = match sampling.as_str() {
                "greedy" => format!("decode batch {b}"),
                other => format!("decode batch {b} ({other})"),
            };
            profile_rows.extend(profile(&mut engine, &what, bw, &machine, &margs.model)?);
        }
    }
    // Prefill alone: one request of `len` prompt tokens and one generated token; the engine
    // chunks it as it always does (512 tokens per step). FLOPs: 2 per weight per token plus
    // causal attention (QK and PV: 2 * len^2 * q_dim per layer).
    for &len in &args.prefill_lens {
        add_prefill(&mut engine, len, &args, &mut prompts)?;
        let steps0 = engine.stats().steps;
        let t = Instant::now();
        engine.run_to_completion()?;
        let secs = t.elapsed().as_secs_f64();
        let steps = (engine.stats().steps - steps0).max(1);
        let q_dim = (cfg.n_heads * cfg.head_dim) as f64;
        let flops = 2.0 * matmul_params * len as f64
            + 2.0 * (len * len) as f64 * q_dim * cfg.n_layers as f64;
        let gflops = flops / secs / 1e9;
        let tok_s = len as f64 / secs;
        eprintln!(
            "prefill {len:>5}: {:8.2} ms  {tok_s:9.1} tok/s  {:.1} TFLOP/s = {:.0}% of the measured GEMM peak  ({steps} steps)",
            secs * 1e3,
            gflops / 1e3,
            100.0 * gflops / peak
        );
        let bytes = weight_bytes * steps as f64;
        rows.push(format!(
            "{},{},{},{},{},{},{},{:.3},{:.2},{:.0},{:.2},{:.2},{:.3},{:.1},{:.2},{:.2},{:.1},{}",
            super::host::today_utc(),
            env!("HERD_GIT_COMMIT"),
            machine.replace(',', " "),
            format!("{} prefill", engine.model().backend_name()).replace(',', " "),
            margs.model,
            1,
            len,
            secs * 1e3 / steps as f64,
            tok_s,
            bytes / steps as f64,
            bytes / secs / 1e9,
            bw,
            bytes / secs / 1e9 / bw,
            0.0,
            gflops,
            peak,
            tok_s,
            sampling,
        ));
        if args.kernel_profile.is_some() {
            add_prefill(&mut engine, len, &args, &mut prompts)?;
            let what = format!("prefill {len}");
            profile_rows.extend(profile(&mut engine, &what, bw, &machine, &margs.model)?);
        }
    }
    if let Some(path) = &args.csv {
        append_csv(path, BENCH_HEADER, &rows)?;
    }
    if let Some(path) = &args.kernel_profile {
        append_csv(path, PROFILE_HEADER, &profile_rows)?;
    }
    Ok(())
}

/// Append `rows` to the CSV at `path`, with `header` first when the file is new.
fn append_csv(path: &std::path::Path, header: &str, rows: &[String]) -> Result<()> {
    let new = !path.exists();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    if new {
        writeln!(f, "{header}")?;
    }
    for r in rows {
        writeln!(f, "{r}")?;
    }
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// Deterministic prompts, each distinct from its first token on (for 50 000 of them): the
/// prefix cache serves none of them, so every measured prompt token is computed.
struct Prompts(usize);

impl Prompts {
    fn next(&mut self, len: usize) -> Vec<u32> {
        let id = self.0;
        self.0 += 1;
        (0..len)
            .map(|i| 1000 + ((id * 7919 + i * 104729) % 50000) as u32)
            .collect()
    }
}

/// Add `b` requests and run until each has its first token (the prefill phase): what follows
/// is decode steps only.
fn start_batch(
    engine: &mut crate::engine::Engine,
    b: usize,
    args: &BenchArgs,
    prompts: &mut Prompts,
) -> Result<()> {
    for r in 0..b {
        engine.add_request(
            prompts.next(args.prompt_len),
            args.sampling(args.gen_tokens, r),
        )?;
    }
    let mut started = 0;
    while started < b {
        for ev in engine.step()? {
            if matches!(ev, Event::Token { .. }) {
                started += 1;
            }
        }
    }
    Ok(())
}

/// One request of `len` prompt tokens and one generated token: its prefill.
fn add_prefill(
    engine: &mut crate::engine::Engine,
    len: usize,
    args: &BenchArgs,
    prompts: &mut Prompts,
) -> Result<()> {
    engine.add_request(prompts.next(len), args.sampling(1, 1))?;
    Ok(())
}

/// The steps until `engine` is idle, run eagerly with every launch timed: one printed line and
/// one CSV row per kernel (GEMMs per shape), most time first. Launch gaps are not in the times
/// (each is between the events just before and after its launch), so the shares say where the
/// device works. `what` names the steps ("decode batch 16", "prefill 512").
fn profile(
    engine: &mut crate::engine::Engine,
    what: &str,
    bw: f64,
    machine: &str,
    model: &str,
) -> Result<Vec<String>> {
    cuda::take_kernel_profile();
    cuda::profile_kernels(true);
    let steps0 = engine.stats().steps;
    let r = engine.run_to_completion();
    cuda::profile_kernels(false);
    r?;
    let steps = (engine.stats().steps - steps0).max(1) as f64;
    let mut kernels: Vec<(String, cuda::KernelTime)> =
        cuda::take_kernel_profile().into_iter().collect();
    let emulated = machine.contains("emulated");
    if !emulated {
        kernels.sort_by(|a, b| b.1.ms.total_cmp(&a.1.ms));
    }
    let total_ms: f64 = kernels.iter().map(|k| k.1.ms).sum();
    if emulated {
        eprintln!("kernel profile, {what} ({steps} steps, eager) [emulated device: counts only]:");
    } else {
        eprintln!(
            "kernel profile, {what} ({steps} steps, eager, {:.3} ms/step in kernels):",
            total_ms / steps
        );
    }
    let mut rows = Vec::new();
    for (label, k) in &kernels {
        let calls = k.calls as f64 / steps;
        if emulated {
            // No speed figure from the emulator: the counts only.
            eprintln!("  {label:<36} {calls:6.1} calls/step");
            rows.push(format!(
                "{},{},{},{model},{what},{label},{calls:.2},,,{},,",
                super::host::today_utc(),
                env!("HERD_GIT_COMMIT"),
                machine.replace(',', " "),
                k.bytes_per_call,
            ));
            continue;
        }
        let gb_s = if k.bytes_per_call > 0 && k.ms > 0.0 {
            (k.bytes_per_call * k.calls) as f64 / (k.ms / 1e3) / 1e9
        } else {
            f64::NAN
        };
        eprintln!(
            "  {label:<36} {calls:6.1} calls/step {:9.1} us/step {:5.1}%{}",
            k.ms * 1e3 / steps,
            100.0 * k.ms / total_ms,
            if gb_s.is_nan() {
                String::new()
            } else {
                format!("  {gb_s:7.1} GB/s = {:.0}% of {bw:.0}", 100.0 * gb_s / bw)
            }
        );
        rows.push(format!(
            "{},{},{},{model},{what},{label},{calls:.2},{:.2},{:.4},{},{:.1},{:.3}",
            super::host::today_utc(),
            env!("HERD_GIT_COMMIT"),
            machine.replace(',', " "),
            k.ms * 1e3 / steps,
            k.ms / total_ms,
            k.bytes_per_call,
            gb_s,
            gb_s / bw,
        ));
    }
    Ok(rows)
}
