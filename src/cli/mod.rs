//! Command line: parse arguments, set up logging, dispatch to a mode.

use clap::{Parser, Subcommand};

use crate::modes;

/// Exit codes a job script can act on.
pub mod exit {
    /// Finished, every request answered.
    pub const OK: i32 = 0;
    /// Failed: bad input, missing file, model error (the message says what to do).
    pub const FAILED: i32 = 1;
    /// Wrong command line (clap's own code).
    pub const USAGE: i32 = 2;
}

#[derive(Parser, Debug)]
#[command(
    name = "herd",
    version,
    about = "Llama 3 / 3.1 inference for HPC clusters: batch generation, AIME API worker, console chat"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate one completion (streamed, or one JSON record with --json).
    Generate(modes::generate::GenerateArgs),
    /// Interactive console chat.
    Chat(modes::chat::ChatArgs),
    /// Measure decode throughput against the memory-bandwidth limit; write CSV.
    Bench(modes::bench::BenchArgs),
    /// Check the GPU, CUDA libraries and kernels (--selftest: kernels vs the CPU reference).
    Doctor(modes::doctor::DoctorArgs),
}

/// Logs go to stderr; RUST_LOG overrides the level (default info).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Run the parsed command; the process exit code.
pub fn run(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Generate(a) => modes::generate::run(a),
        Command::Chat(a) => modes::chat::run(a),
        Command::Bench(a) => modes::bench::run(a),
        Command::Doctor(a) => modes::doctor::run(a),
    };
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("herd: error: {e:#}");
            exit::FAILED
        }
    }
}
