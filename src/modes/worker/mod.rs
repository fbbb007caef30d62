//! `herd worker`: run as a worker of the AIME API Server (what llama3_chat's `--api_server` did),
//! with continuous batching: jobs that arrive mid-generation join the running batch at the next
//! step instead of waiting for the whole batch.
//!
//! Every replica leader is an independent worker with its own name; tensor-parallel peers follow
//! their leader's steps. Split by concern: [`protocol`] (bodies and the HTTP client), [`job`]
//! (job record → prompt and sampling), [`threads`] (job requests and the outbox off the
//! generation loop), [`serve`] (the loop).

pub mod job;
pub mod protocol;
pub mod serve;
pub mod threads;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::exit::{self, Coded};

use super::model_label;
use super::setup::{start, ModelArgs};
use protocol::{worker_name, ApiError, Client, Identity, LoginReply, ModelInfo};

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Base URL of the AIME API Server, e.g. https://api.example.com
    #[arg(long, env = "HERD_API_SERVER")]
    pub api_server: String,
    /// The worker key of the job type's endpoint (default: llama3_chat's published key).
    #[arg(long, env = "HERD_API_AUTH_KEY", default_value = protocol::DEFAULT_AUTH_KEY, hide_env_values = true)]
    pub api_auth_key: String,
    /// Job type of the endpoint to serve.
    #[arg(long, env = "HERD_JOB_TYPE", default_value = protocol::DEFAULT_JOB_TYPE)]
    pub job_type: String,
    /// Most progress updates per second per job.
    #[arg(long, default_value_t = 5.0)]
    pub progress_rate: f64,
    /// Seconds running jobs get to finish after SIGTERM (or SIGUSR1, SIGUSR2, Ctrl-C) before they
    /// are aborted (Slurm sends SIGKILL 30 s after SIGTERM by default).
    #[arg(long, default_value_t = 25.0)]
    pub shutdown_grace: f64,
    /// Seconds to keep trying to reach the server at start before giving up.
    #[arg(long, default_value_t = 60.0)]
    pub connect_timeout: f64,
}

/// "8B", "70B", "1.2B", "15M": the size label the server shows.
fn size_label(n_params: usize) -> String {
    let b = n_params as f64 / 1e9;
    if b >= 10.0 {
        format!("{}B", b as u64) // 70.6e9 parameters is "70B"
    } else if b >= 1.0 {
        format!("{b:.1}B").replace(".0B", "B")
    } else {
        format!("{:.0}M", n_params as f64 / 1e6)
    }
}

/// Ask `f` until it answers, for at most `within`; unreachable → wait and retry. A stop signal
/// while waiting ends the wait (exit code "interrupted": nothing had started).
fn with_retry<T>(
    url: &str,
    within: Duration,
    stop: &AtomicBool,
    mut f: impl FnMut() -> Result<T, ApiError>,
) -> Result<T> {
    let end = Instant::now() + within;
    let mut backoff = threads::Backoff::default();
    let mut logged = false;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if e.is_unreachable() && Instant::now() < end => {
                if !logged {
                    tracing::warn!("{e}; retrying for up to {:.0} s", within.as_secs_f64());
                    logged = true;
                }
                let wake = Instant::now() + backoff.delay().min(end.saturating_duration_since(Instant::now()));
                while Instant::now() < wake {
                    if stop.load(Ordering::Relaxed) {
                        return Err(Coded::with(exit::INTERRUPTED)(anyhow!(
                            "stop signal while waiting for the AIME API server at {url}; no job had been taken"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(100).min(wake.saturating_duration_since(Instant::now())));
                }
            }
            Err(e) if e.is_unreachable() => bail!(
                "the AIME API server at {url} is unreachable (gave up after {:.0} s; check --api-server / HERD_API_SERVER): {e}",
                within.as_secs_f64()
            ),
            Err(e) => return Err(e.into()),
        }
    }
}

impl WorkerArgs {
    /// The flags, before the server is asked or anything loads (exit code 2 naming the flag).
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        // Its inverse is the interval between updates.
        if !(self.progress_rate.is_finite() && self.progress_rate >= 1e-3) {
            return Err(exit::usage(format!(
                "--progress-rate must be a number of updates per second >= 0.001, got {}",
                self.progress_rate
            )));
        }
        super::check_seconds("--shutdown-grace", self.shutdown_grace)?;
        super::check_seconds("--connect-timeout", self.connect_timeout)?;
        let url = &self.api_server;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(exit::usage(format!(
                "--api-server must be an http:// or https:// URL, got '{url}'"
            )));
        }
        Ok(())
    }
}

pub fn run(args: WorkerArgs) -> Result<()> {
    let url = args.api_server.trim_end_matches('/').to_string();
    // Registered first: a stop signal during the (long) load must not kill the process half-way.
    // SIGUSR1/SIGUSR2 too: mpirun forwards those to every rank (see modes::signals).
    let term = Arc::new(AtomicBool::new(false));
    super::signals::on_stop(&term)?;

    let cluster = crate::parallel::cluster();
    let world = cluster.world(args.model.tp).map_err(anyhow::Error::msg)?;
    let topo = world.topology().clone();
    let gpu_name = "CPU".to_string();
    let mut identity = Identity {
        auth: worker_name(&cluster.hostname, topo.replica, topo.tp, &gpu_name),
        job_type: args.job_type.clone(),
        auth_key: args.api_auth_key.clone(),
        gpu_name,
        num_gpus: topo.tp,
        max_batch_size: args.model.max_batch_size,
        model: ModelInfo {
            label: model_label(&args.model.model),
            quantization: "bf16".into(),
            size: String::new(),
            family: "Llama".into(),
            kind: "LLM".into(),
            repo_name: model_label(&args.model.model),
        },
    };
    let within = Duration::from_secs_f64(args.connect_timeout);
    // Leaders check the server before the load (minutes for a big model) so that a wrong URL or
    // key fails at once.
    if topo.is_replica_leader() {
        let probe = Client::new(&url, identity.clone());
        if let LoginReply::Refused(msg) = with_retry(&url, within, &term, || probe.check_status())?
        {
            bail!("the AIME API server at {url} refuses this worker: {msg} (check --api-auth-key / HERD_API_AUTH_KEY and --job-type / HERD_JOB_TYPE)");
        }
    }
    let Some(mut engine) = start(&args.model, world.as_ref())? else {
        return Ok(()); // a tensor-parallel peer: the leader's engine finished
    };
    identity.model.size = size_label(engine.model().config().n_params());
    let client = Arc::new(Client::new(&url, identity));
    let request_timeout = match with_retry(&url, within, &term, || client.login())? {
        LoginReply::Accepted {
            request_timeout,
            server_version,
        } => {
            tracing::info!(
                worker = %client.identity().auth,
                server = %url,
                server_version = %server_version,
                job_type = %args.job_type,
                max_batch_size = args.model.max_batch_size,
                "logged in; waiting for jobs"
            );
            request_timeout
        }
        LoginReply::Refused(msg) => bail!(
            "the AIME API server at {url} refused the login: {msg} (check --api-auth-key / HERD_API_AUTH_KEY and --job-type / HERD_JOB_TYPE)"
        ),
    };
    let settings = serve::Settings {
        max_batch: args.model.max_batch_size,
        progress_interval: Duration::from_secs_f64(1.0 / args.progress_rate),
        heartbeat: Duration::from_secs(3),
        grace: Duration::from_secs_f64(args.shutdown_grace),
        request_timeout,
    };
    let t0 = Instant::now();
    let s = serve::serve(&mut engine, client, &settings, term)?;
    serve::log_prefix_cache(&engine);
    tracing::info!(
        jobs = s.jobs,
        failed = s.failed,
        generated_tokens = s.generated_tokens,
        seconds = format!("{:.1}", t0.elapsed().as_secs_f64()),
        "worker stopped"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(size_label(8_030_000_000), "8B");
        assert_eq!(size_label(70_600_000_000), "70B");
        assert_eq!(size_label(1_240_000_000), "1.2B");
        assert_eq!(size_label(15_000_000), "15M");
        assert_eq!(
            model_label("/models/Meta-Llama-3-8B-Instruct/"),
            "Meta-Llama-3-8B-Instruct"
        );
        assert_eq!(model_label("random:tiny"), "random:tiny");
    }
}
