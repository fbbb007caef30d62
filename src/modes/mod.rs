//! Modes: everything that talks to the outside world (console, files, sockets) and owns every
//! user-visible format and error message.

pub mod batch;
pub mod bench;
pub mod chat;
pub mod convert;
pub mod doctor;
pub mod generate;
pub mod host;
pub mod record;
pub mod setup;
pub mod signals;
pub mod worker;

use crate::engine::SamplingParams;

/// Sampling flags shared by the generating modes; unset flags take the mode's defaults.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// 0 = greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    /// 0 = off.
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
            ..SamplingParams::default()
        }
    }
}
