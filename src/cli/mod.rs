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
    /// Serve jobs of an AIME API Server (continuous batching; every replica leader is a worker).
    Worker(modes::worker::WorkerArgs),
    /// Measure decode throughput against the memory-bandwidth limit; write CSV.
    Bench(modes::bench::BenchArgs),
    /// Report what this rank sees: topology (world, replicas, local rank), host, MPI.
    Doctor(modes::doctor::DoctorArgs),
    /// Reshard a checkpoint for a tensor-parallel degree: one safetensors file per rank, or Meta consolidated.NN.pth files.
    Convert(modes::convert::ConvertArgs),
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
    };
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            let c = crate::parallel::cluster();
            if c.world_size > 1 {
                // One rank's fatal error ends the whole job (its peers may wait in a collective).
                eprintln!(
                    "herd: error: rank {} of {} ({}): {e:#}",
                    c.world_rank, c.world_size, c.hostname
                );
                crate::parallel::abort(exit::FAILED);
            }
            eprintln!("herd: error: {e:#}");
            exit::FAILED
        }
    }
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
        eprintln!("herd: error: rank {rank} ({host}) panicked");
        default(info);
        crate::parallel::abort(101);
    }));
}
