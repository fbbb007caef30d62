//! `herd batch`: a prompt file in, one result record per input record out — resumable, in input
//! order, in bounded memory, never losing a line.
//!
//! - [`input`]: the formats (herd JSONL, OpenAI batch JSONL, CSV), parsed into requests or errors.
//! - [`state`]: part files (append-only, torn-tail safe) and the resume state beside them.
//! - [`run`]: the scheduling loop: bounded read-ahead, the engine, signals, progress.
//! - [`merge`]: the world leader merges the replicas' parts into the output in input order.

pub mod input;
pub mod merge;
pub mod openai;
pub mod progress;
pub mod run;
pub mod state;
pub mod world;

use std::path::PathBuf;

use super::setup::ModelArgs;
use super::SamplingArgs;

/// Where a too-long prompt is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Truncate {
    /// Too-long prompts become error records.
    None,
    /// Drop the oldest tokens (the begin-of-text token is kept).
    Left,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BatchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt file: herd JSONL, OpenAI batch JSONL or CSV (detected; see --input-format).
    #[arg(long)]
    pub input: PathBuf,
    /// Result file: JSONL, or CSV when it ends in .csv. Parts and state files go beside it.
    #[arg(long)]
    pub output: PathBuf,
    /// Input format, when detection guesses wrong.
    #[arg(long, value_enum)]
    pub input_format: Option<input::InputFormat>,
    /// Only the FIRST-th to LAST-th input record, 1-based and inclusive (JSONL lines that are not
    /// blank, CSV data rows): one chunk of a large file, e.g. per Slurm array task. `FIRST-` runs
    /// to the end; a range past the end of the file gives an empty output.
    #[arg(long, value_name = "FIRST-LAST", value_parser = input::RecordRange::parse)]
    pub records: Option<input::RecordRange>,
    /// CSV: the column holding the prompt (default: `prompt`).
    #[arg(long)]
    pub prompt_column: Option<String>,
    /// CSV: the column holding the record id (default: the row number).
    #[arg(long)]
    pub id_column: Option<String>,
    /// Defaults for every record; a record's own fields override them.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Default: each generated token's log-prob and the top N alternatives.
    #[arg(long)]
    pub logprobs: Option<usize>,
    /// Default: each prompt token's log-prob.
    #[arg(long)]
    pub prompt_logprobs: bool,
    /// What to do with a prompt longer than the context.
    #[arg(long, value_enum, default_value = "none")]
    pub truncate_prompt: Truncate,
    /// Start over: delete the output, its parts and state instead of resuming.
    #[arg(long)]
    pub overwrite: bool,
    /// Exit with the record-errors code if any record failed.
    #[arg(long)]
    pub fail_on_error: bool,
    /// Seconds to finish in-flight records after a stop signal (SIGTERM, SIGINT, SIGUSR1,
    /// SIGUSR2; under mpirun send SIGUSR1) before abandoning them.
    #[arg(long, default_value_t = 20.0)]
    pub grace_period: f64,
    /// Seconds between progress lines when stderr is not a terminal (0 = none).
    #[arg(long, default_value_t = 30.0)]
    pub log_interval: f64,
    /// Append the run's summary to this CSV (created with a header if new).
    #[arg(long)]
    pub stats_csv: Option<PathBuf>,
    /// Records parsed and tokenized ahead of the engine (bounds memory).
    #[arg(long, default_value_t = 256)]
    pub read_ahead: usize,
}

pub use run::run;
