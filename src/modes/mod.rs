//! Modes: everything that talks to the outside world (console, files, sockets) and owns every
//! user-visible format and error message.

pub mod batch;
pub mod bench;
pub mod chat;
pub mod constraint_fields;
pub mod convert;
pub mod doctor;
pub mod generate;
pub mod host;
pub mod record;
pub mod selftest;
pub mod setup;
pub mod signals;
pub mod worker;

use std::path::Path;

use anyhow::Result;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::engine::SamplingParams;

static QUIET: AtomicBool = AtomicBool::new(false);

/// `--quiet`: besides logs, no progress output (batch's bar and periodic lines); set once by cli.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether `--quiet` was given.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}
use crate::exit;

/// A model's name for the outside world (the AIME server, OpenAI answers): a checkpoint
/// directory's last component, else the argument (`random:tiny`).
pub fn model_label(model: &str) -> String {
    let p = std::path::Path::new(model.trim_end_matches('/'));
    match p.file_name().and_then(|n| n.to_str()) {
        Some(n) if !model.starts_with("random:") => n.to_string(),
        _ => model.to_string(),
    }
}

/// Sampling flags shared by the generating modes; unset flags take the mode's defaults.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Sampling temperature, >= 0 (0 = greedy).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens whose probabilities reach P, in (0, 1] (1 = off).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed of the random stream (same seed, same prompt, same parameters: same tokens).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the output contains this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Generate through end-of-turn tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Keep special tokens (`<|reserved_special_token_163|>`, `<|eot_id|>` with --ignore-eos) in
    /// the text; by default they are left out, as HF and vLLM do (token ids are unchanged).
    #[arg(long)]
    pub keep_special_tokens: bool,
}

impl SamplingArgs {
    pub fn params(&self, temperature: f32, top_p: f32, top_k: usize) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.unwrap_or(temperature),
            top_p: self.top_p.unwrap_or(top_p),
            top_k: self.top_k.unwrap_or(top_k),
            seed: self.seed,
            max_tokens: self.max_tokens.unwrap_or(256),
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            skip_special_tokens: !self.keep_special_tokens,
            ..SamplingParams::default()
        }
    }

    /// The flags against the engine's own rule for a request (one rule for flags and records),
    /// before anything loads; the error names the flag (exit code 2).
    pub fn validate(&self) -> Result<()> {
        // Neutral defaults: only what the user set can fail.
        check_sampling_flags(&self.params(0.0, 1.0, 0))
    }
}

/// Sampling parameters that came from flags, against the engine's rule for a request; the error
/// names the flag (exit code 2).
pub fn check_sampling_flags(p: &SamplingParams) -> Result<()> {
    p.validate().map_err(|why| {
        // The engine's reason starts with the field ("top_p must be ..."): name the flag.
        let (field, rest) = why.split_once(' ').unwrap_or((why.as_str(), ""));
        exit::usage(format!("--{} {rest}", field.replace('_', "-")))
    })
}

/// A flag in seconds: a number >= 0 that `Duration::from_secs_f64` takes (it panics on NaN,
/// negatives and overflow). Exit code 2 naming the flag.
pub fn check_seconds(flag: &str, v: f64) -> Result<()> {
    if (0.0..1e9).contains(&v) {
        Ok(())
    } else {
        Err(exit::usage(format!(
            "{flag} must be a number of seconds >= 0 (and below 1e9), got {v}"
        )))
    }
}

/// A file herd will write (`--output`, `--stats-csv`, `--csv`), checked before anything loads:
/// not a directory, and its directory exists or can be made (missing parents are created, as
/// `out/results.jsonl` in a fresh checkout expects) and takes new files. Errors name the flag
/// (exit code 2).
pub fn check_output_file(flag: &str, path: &Path) -> Result<()> {
    let shown = path.display();
    if path.as_os_str().is_empty() {
        return Err(exit::usage(format!("{flag} is empty: give a file name")));
    }
    if path.is_dir() || path.as_os_str().to_string_lossy().ends_with('/') {
        return Err(exit::usage(format!(
            "{flag} {shown} is a directory: give a file name"
        )));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Some(file) = dir.ancestors().find(|a| a.exists()).filter(|a| !a.is_dir()) {
        return Err(exit::usage(format!(
            "{flag} {shown}: {} is not a directory",
            file.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| {
        exit::usage(format!(
            "{flag} {shown}: cannot create its directory {}: {e}",
            dir.display()
        ))
    })?;
    // Write access, tried for real (permission bits say nothing about read-only mounts or root).
    let name = path
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy());
    // Named by host and pid: every rank of a job probes, on a file system the nodes may share.
    let probe = dir.join(format!(
        ".{name}.herd-probe-{}-{}",
        crate::parallel::cluster().hostname,
        std::process::id()
    ));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(exit::usage(format!(
            "{flag} {shown}: cannot write in {}: {e}",
            dir.display()
        ))),
    }
}
