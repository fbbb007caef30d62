//! `herd batch`: a prompt file in, one result record per input record out — resumable, in input
//! order, in bounded memory, never losing a line.
//!
//! - [`input`]: the formats (herd JSONL, OpenAI batch JSONL, CSV), parsed into requests or errors;
//!   [`detect`] tells them apart, [`ignored`] counts what records give that herd ignores.
//! - [`state`]: part files (append-only, torn-tail safe) and the resume state beside them.
//! - [`run`]: the scheduling loop: bounded read-ahead, the engine, signals, progress.
//! - [`merge`]: the world leader merges the replicas' parts into the output in input order.

pub mod detect;
pub mod ignored;
pub mod input;
pub mod merge;
pub mod openai;
pub mod progress;
pub mod run;
pub mod state;
pub mod world;

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::setup::ModelArgs;
use super::{check_output_file, SamplingArgs};
use crate::engine::SamplingParams;
use crate::exit;

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
    /// Input format, when detection guesses wrong (detection trusts a .jsonl/.json, .csv or .tsv
    /// name, then the content; its log line says what it found and why).
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
    /// No record generates more than N tokens, whatever its own max_tokens (or an OpenAI body's
    /// max_tokens / max_completion_tokens) asks; --max-tokens is only a default.
    #[arg(long, value_name = "N")]
    pub max_tokens_cap: Option<usize>,
    /// Default: each generated token's log-prob and the top N alternatives.
    #[arg(long)]
    pub logprobs: Option<usize>,
    /// Default: each prompt token's log-prob.
    #[arg(long)]
    pub prompt_logprobs: bool,
    /// Default completions per prompt (a record's `n` overrides it); sample i uses seed + i.
    /// Records with n > 1 answer with `choices` (JSONL output only).
    #[arg(long, default_value_t = 1)]
    pub n: usize,
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
    /// What herd would ignore in a record (an unknown field, an OpenAI field herd does not
    /// implement, log-probs with a CSV output) makes it an error record instead of a warning.
    #[arg(long)]
    pub strict: bool,
    /// The model name in OpenAI answers (default: the model directory's name, or random:NAME).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
}

impl BatchArgs {
    /// The model name OpenAI answers carry.
    pub fn served_model(&self) -> String {
        self.served_model_name
            .clone()
            .unwrap_or_else(|| super::model_label(&self.model.model))
    }

    /// Every flag, the input's format and CSV columns, and the output path, checked before
    /// anything loads or any state file is touched. Errors name the flag (exit code 2).
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.sampling.validate()?;
        if self.max_tokens_cap == Some(0) {
            return Err(exit::usage("--max-tokens-cap must be at least 1"));
        }
        if self.read_ahead == 0 {
            return Err(exit::usage("--read-ahead must be at least 1"));
        }
        if !(1..=input::MAX_N as usize).contains(&self.n) {
            return Err(exit::usage(format!(
                "--n must be in 1..={} (completions per prompt), got {}",
                input::MAX_N,
                self.n
            )));
        }
        if self.n > 1 && merge::OutputFormat::from_path(&self.output) == merge::OutputFormat::Csv {
            return Err(exit::usage(
                "--n > 1 needs a JSONL output (a CSV row holds one completion): --output *.jsonl",
            ));
        }
        super::check_seconds("--grace-period", self.grace_period)?;
        super::check_seconds("--log-interval", self.log_interval)?;
        let shown = self.input.display();
        if self.input.is_dir() {
            return Err(exit::usage(format!(
                "--input {shown} is a directory: give a prompt file"
            )));
        }
        let format = match self.input_format {
            Some(f) => f,
            // The run says what was detected and why; here only whether it can be read.
            None => {
                detect::detect(&self.input)
                    .with_context(|| format!("--input {shown}"))
                    .map_err(exit::Coded::with(exit::USAGE))?
                    .0
            }
        };
        if format == input::InputFormat::Csv {
            let reader = input::RecordReader::open(&self.input, format)
                .with_context(|| format!("--input {shown}"))
                .map_err(exit::Coded::with(exit::USAGE))?;
            self.check_csv_columns(reader.headers())?;
        } else {
            if !self.input.is_file() {
                return Err(exit::usage(format!("--input {shown}: no such file")));
            }
            for (flag, set) in [
                ("--prompt-column", self.prompt_column.is_some()),
                ("--id-column", self.id_column.is_some()),
            ] {
                if set {
                    return Err(exit::usage(format!(
                        "{flag} applies to CSV input, but {shown} is {} JSONL (see --input-format)",
                        format.as_str()
                    )));
                }
            }
        }
        check_output_file("--output", &self.output)?;
        if let Some(p) = &self.stats_csv {
            check_output_file("--stats-csv", p)?;
        }
        Ok(())
    }

    /// `--prompt-column` / `--id-column` against the CSV header.
    fn check_csv_columns(&self, header: &[String]) -> Result<()> {
        let has = |c: &str| header.iter().any(|h| h == c);
        let columns = header.join(", ");
        let prompt = self.prompt_column.as_deref().unwrap_or("prompt");
        if !has(prompt) {
            return Err(exit::usage(format!(
                "{} has no column `{prompt}` (columns: {columns}); pass --prompt-column",
                self.input.display()
            )));
        }
        if let Some(id) = self.id_column.as_deref().filter(|c| !has(c)) {
            return Err(exit::usage(format!(
                "{} has no column `{id}` (columns: {columns}); check --id-column",
                self.input.display()
            )));
        }
        Ok(())
    }
}

/// A record's parameters under `--max-tokens-cap` (`cap`), whatever the record asked.
pub fn cap_max_tokens(params: &mut SamplingParams, cap: Option<usize>) {
    if let Some(cap) = cap {
        params.max_tokens = params.max_tokens.min(cap);
    }
}

pub use run::run;
