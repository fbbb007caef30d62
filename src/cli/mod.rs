//! Command line: parse arguments, set up logging, dispatch to a mode.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::modes;

use crate::exit;

#[derive(Parser, Debug)]
#[command(
    name = "herd",
    version,
    about = "Llama 3 / 3.1 inference for HPC clusters: batch generation, AIME API worker, console chat"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Flags of a job over many ranks, taken by every command.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Seconds a collective (or a tensor-parallel peer's wait for the next step plan) may wait for
    /// a rank that has gone silent (stopped, dead, or cut off: every rank sends a heartbeat every
    /// tenth of this) before the waiting rank aborts the job, naming itself, the collective and
    /// that rank (exit code 1). Waits on live ranks are never cut short.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = crate::parallel::watchdog::DEFAULT_TIMEOUT_S)]
    pub collective_timeout: f64,
}

impl ClusterArgs {
    /// Check the flags and put them in force for this process.
    pub fn apply(&self) -> anyhow::Result<()> {
        let t = self.collective_timeout;
        if !t.is_finite() || t <= 0.0 || t > 1e6 {
            return Err(exit::usage(format!(
                "--collective-timeout must be a number of seconds above 0 (and at most 1000000), not {t}"
            )));
        }
        crate::parallel::watchdog::set_timeout(t);
        Ok(())
    }
}

/// Logging flags, taken by every command.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LogArgs {
    /// Log warnings and errors only (RUST_LOG is ignored), and no progress bar or progress lines;
    /// batch's one-line summary at the end stays (it is the job's report).
    #[arg(long, global = true, conflicts_with = "log_level")]
    pub quiet: bool,
    /// Log level of every rank: error, warn, info, debug or trace (RUST_LOG is ignored). Without it
    /// or --quiet: RUST_LOG, else info on world rank 0 and errors only on the other ranks.
    #[arg(long, global = true, value_name = "LEVEL", value_parser = ["error", "warn", "info", "debug", "trace"])]
    pub log_level: Option<String>,
}

/// The command line as clap sees it. Every flag that takes a value accepts one that starts with
/// a minus (`--temperature -1`, `--stop -x`), so that herd's own check names the flag and the
/// range instead of clap reading `-1` as an unknown flag.
pub fn command() -> clap::Command {
    fn negatives(c: clap::Command) -> clap::Command {
        c.mut_args(|a| {
            if a.get_action().takes_values() && !a.is_positional() {
                a.allow_negative_numbers(true)
            } else {
                a
            }
        })
        .mut_subcommands(negatives)
    }
    negatives(Cli::command())
}

/// Parse the process's arguments (clap's error on a wrong command line).
pub fn parse() -> Result<Cli, clap::Error> {
    let mut cmd = command();
    let matches = cmd.try_get_matches_from_mut(std::env::args_os())?;
    Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
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

impl Command {
    /// Every flag of the command checked before anything loads (exit code 2 naming the flag).
    pub fn validate(&self) -> anyhow::Result<()> {
        match self {
            Command::Generate(a) => a.validate(),
            Command::Chat(a) => a.validate(),
            Command::Worker(a) => a.validate(),
            Command::Bench(a) => a.validate(),
            Command::Doctor(a) => a.validate(),
            Command::Convert(a) => a.validate(),
            Command::Batch(a) => a.validate(),
        }
    }
}

/// Logs go to stderr. Level: --log-level (every rank) or --quiet (warnings on world rank 0),
/// else RUST_LOG, else info on world rank 0 and errors only on the other ranks, so that a job's
/// log reads like one process's.
pub fn init_logging(log: &LogArgs) {
    modes::set_quiet(log.quiet);
    let leader = crate::parallel::cluster().world_rank == 0;
    let default = if leader { "info" } else { "error" };
    let flag = match (&log.log_level, log.quiet) {
        (Some(level), _) => Some(level.as_str()),
        (None, true) => Some(if leader { "warn" } else { "error" }),
        (None, false) => None,
    };
    let filter = match flag {
        Some(level) => tracing_subscriber::EnvFilter::new(level),
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Run the parsed command; the process exit code.
pub fn run(cli: Cli) -> i32 {
    let result = cli
        .cluster
        .apply()
        .and_then(|()| cli.command.validate())
        .and_then(|()| dispatch(cli.command));
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            let c = crate::parallel::cluster();
            let (code, together) = (exit::code_of(&e), exit::is_together(&e));
            if together && c.world_rank != 0 {
                return code; // rank 0 says why
            }
            // An interrupted run (every rank got the signal) ends rank by rank with its own code,
            // so the job script sees "resume", not a crash.
            if c.world_size > 1 && !together && code != exit::INTERRUPTED {
                // One rank's fatal error ends the whole job (its peers may wait in a collective).
                crate::parallel::say(&format!(
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

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Generate(a) => modes::generate::run(a),
        Command::Chat(a) => modes::chat::run(a),
        Command::Worker(a) => modes::worker::run(a),
        Command::Bench(a) => modes::bench::run(a),
        Command::Doctor(a) => modes::doctor::run(a),
        Command::Convert(a) => modes::convert::run(a),
        Command::Batch(a) => modes::batch::run(a),
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
        crate::parallel::say(&format!("herd: error: rank {rank} ({host}) panicked"));
        default(info);
        crate::parallel::abort(101);
    }));
}
