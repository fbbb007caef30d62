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
        /// Every rank of the world ends this way, having agreed on it: no MPI_Abort, and only
        /// world rank 0 prints the message.
        pub together: bool,
    }

    impl Coded {
        /// Wrap an error with an exit code (use with `map_err`).
        pub fn with(code: i32) -> impl Fn(anyhow::Error) -> anyhow::Error {
            move |error| {
                anyhow::Error::new(Coded {
                    code,
                    error,
                    together: false,
                })
            }
        }

        /// An end every rank of the world reaches with the same code, at the same time (e.g.
        /// batch's interrupted run, or its refused output).
        pub fn together(code: i32) -> impl Fn(anyhow::Error) -> anyhow::Error {
            move |error| {
                anyhow::Error::new(Coded {
                    code,
                    error,
                    together: true,
                })
            }
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
    /// Serve jobs of an AIME API Server (continuous batching; every replica leader is a worker).
    Worker(modes::worker::WorkerArgs),
    /// Measure decode throughput against the memory-bandwidth limit; write CSV.
    Bench(modes::bench::BenchArgs),
    /// Report what this rank sees: topology, host, MPI, GPUs and CUDA libraries (--selftest: kernels vs the CPU reference).
    Doctor(modes::doctor::DoctorArgs),
    /// Reshard a checkpoint for a tensor-parallel degree: one safetensors file per rank, or Meta consolidated.NN.pth files.
    Convert(modes::convert::ConvertArgs),
    /// Generate for every record of a prompt file (JSONL, OpenAI batch JSONL, CSV): resumable.
    Batch(modes::batch::BatchArgs),
}

/// Logs go to stderr; RUST_LOG overrides the level (default info on world rank 0, errors only on
/// the other ranks, so a job's log reads like one process's).
pub fn init_logging() {
    let default = if crate::parallel::cluster().world_rank == 0 {
        "info"
    } else {
        "error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
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
        Command::Worker(a) => modes::worker::run(a),
        Command::Bench(a) => modes::bench::run(a),
        Command::Doctor(a) => modes::doctor::run(a),
        Command::Convert(a) => modes::convert::run(a),
        Command::Batch(a) => modes::batch::run(a),
    };
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            let c = crate::parallel::cluster();
            let (code, together) = e
                .downcast_ref::<exit::Coded>()
                .map_or((exit::FAILED, false), |c| (c.code, c.together));
            if together && c.world_rank != 0 {
                return code; // rank 0 says why
            }
            // An interrupted run (every rank got the signal) ends rank by rank with its own code,
            // so the job script sees "resume", not a crash.
            if c.world_size > 1 && !together && code != exit::INTERRUPTED {
                // One rank's fatal error ends the whole job (its peers may wait in a collective).
                say(&format!(
                    "herd: error: rank {} of {} ({}): {e:#}",
                    c.world_rank, c.world_size, c.hostname
                ));
                crate::parallel::abort(code);
            }
            eprintln!("herd: error: {e:#}");
            code
        }
    }
}

/// One line to stderr in a single write, then a moment for the launcher to forward it: mpirun
/// relays each rank's stderr in chunks and prints its own abort notice as soon as it hears of
/// MPI_Abort, which otherwise can land in the middle of (or before) the rank's message.
fn say(line: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(format!("{line}\n").as_bytes());
    let _ = err.flush();
    drop(err);
    std::thread::sleep(std::time::Duration::from_millis(200));
}

/// Under a launcher, a panic on any rank aborts the job instead of leaving peers in a collective.
pub fn abort_on_panic() {
    let c = crate::parallel::cluster();
    if c.world_size <= 1 {
        return;
    }
    let (rank, host) = (c.world_rank, c.hostname.clone());
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        say(&format!("herd: error: rank {rank} ({host}) panicked"));
        default(info);
        crate::parallel::abort(101);
    }));
}
