//! Command line: parse arguments, set up logging, dispatch to a mode.

use clap::{Parser, Subcommand};

use crate::modes;

/// Exit codes a job script can act on.
pub mod exit {
    /// Finished, every request answered.
    pub const OK: i32 = 0;
    /// Failed: bad input, missing file, model error (the message says what to do).
    pub const FAILED: i32 = 1;
    /// Wrong command line (clap's own code), or arguments that do not fit the job (e.g. a
    /// resume with different settings).
    pub const USAGE: i32 = 2;
    /// The model could not be loaded or failed while running.
    pub const MODEL: i32 = 3;
    /// Interrupted (SIGTERM/SIGINT): what was done is on disk; rerun the same command to resume.
    pub const INTERRUPTED: i32 = 4;
    /// Finished, but some records are error records (only with `--fail-on-error`).
    pub const RECORD_ERRORS: i32 = 5;

    /// An error that carries the exit code it should end the process with.
    #[derive(Debug)]
    pub struct Coded {
        pub code: i32,
        pub error: anyhow::Error,
    }

    impl Coded {
        /// Wrap an error with an exit code (use with `map_err`).
        pub fn with(code: i32) -> impl Fn(anyhow::Error) -> anyhow::Error {
            move |error| anyhow::Error::new(Coded { code, error })
        }
    }

    impl std::fmt::Display for Coded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:#}", self.error)
        }
    }

    impl std::error::Error for Coded {}
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
    /// Generate for every record of a prompt file (JSONL, OpenAI batch JSONL, CSV): resumable.
    Batch(modes::batch::BatchArgs),
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
        Command::Batch(a) => modes::batch::run(a),
    };
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("herd: error: {e:#}");
            e.downcast_ref::<exit::Coded>()
                .map_or(exit::FAILED, |c| c.code)
        }
    }
}
