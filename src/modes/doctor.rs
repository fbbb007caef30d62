//! `herd doctor`: what this job sees, section by section (topology, GPU and CUDA libraries), and
//! with --selftest the CUDA kernels against their CPU twins. World rank 0 prints; every rank takes part.

use std::fmt::Write as _;

use std::io::Write as _;

use anyhow::{bail, Context, Result};

use super::host;
use crate::backend::cuda;
use crate::parallel::{self, World};
use crate::tokenizer;

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Tensor-parallel degree to check the world against (as the other modes' --tp).
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Also run every CUDA kernel against its CPU twin and a small model end-to-end
    /// (needs a GPU; exits non-zero when a check fails).
    #[arg(long)]
    pub selftest: bool,
}

impl DoctorArgs {
    /// The flags, before anything runs (exit code 2 naming the flag).
    pub fn validate(&self) -> Result<()> {
        super::setup::check_tp(self.tp)
    }
}

/// One titled block of the report; `lines` are "key: value" lines.
pub struct Section {
    pub title: &'static str,
    pub lines: Vec<String>,
}

/// The topology section: world, replicas, this rank's node, and every rank's place.
pub fn topology_section(world: &dyn World) -> Result<Section> {
    let c = parallel::cluster();
    let t = world.topology();
    let mut lines = vec![
        format!("world size: {}", t.world_size),
        format!(
            "tp: {} ({} replica{} of {} consecutive ranks)",
            t.tp,
            t.n_replicas,
            if t.n_replicas == 1 { "" } else { "s" },
            t.tp
        ),
        format!(
            "rank: {} (local rank {} of {} on {})",
            t.world_rank, c.local_rank, c.local_size, c.hostname
        ),
        format!(
            "launcher: {}",
            c.launcher.as_deref().unwrap_or("none (one process)")
        ),
        format!(
            "mpi: {}",
            match (&c.mpi_version, cfg!(feature = "mpi")) {
                (Some(v), _) => v.lines().next().unwrap_or(v).to_string(),
                (None, true) => "built in, not initialized (no launcher)".into(),
                (None, false) => "not built in (cargo feature mpi)".into(),
            }
        ),
    ];
    // Every rank's place, gathered to all (numbers only; hostnames differ per node id).
    let me = [
        t.world_rank as f32,
        c.local_rank as f32,
        c.node as f32,
        t.replica as f32,
        t.tp_rank as f32,
    ];
    let all = world.world_comm().all_gather(&me)?;
    for r in all.chunks(me.len()) {
        let mut s = String::new();
        let _ = write!(
            s,
            "  rank {:>3}: node {} local rank {} replica {} tp rank {}",
            r[0] as usize, r[2] as usize, r[1] as usize, r[3] as usize, r[4] as usize
        );
        lines.push(s);
    }
    Ok(Section {
        title: "topology",
        lines,
    })
}

/// The host section: this machine and this build, as a bug report or a results table needs them.
pub fn host_section() -> Section {
    let gb = |field| {
        host::meminfo(field).map_or("unknown".into(), |b| format!("{:.1} GB", b as f64 / 1e9))
    };
    let tokenizer = tokenizer::default_tokenizer_path();
    let tokenizer = if tokenizer.is_file() {
        format!(
            "{} (for checkpoints without their own; --tokenizer overrides)",
            tokenizer.display()
        )
    } else {
        // The loader's own message says where it looked and how to fetch it.
        match tokenizer::load_default() {
            Ok(_) => tokenizer.display().to_string(),
            Err(e) => format!("not found: {e}"),
        }
    };
    Section {
        title: "host",
        lines: vec![
            format!(
                "herd: {} (commit {})",
                env!("CARGO_PKG_VERSION"),
                env!("HERD_GIT_COMMIT")
            ),
            format!("cpu: {}", host::cpu_name()),
            format!(
                "cores: {} usable by this process, {} threads in herd's pool",
                host::cpus(),
                rayon::current_num_threads()
            ),
            format!(
                "memory: {} total, {} available",
                gb("MemTotal:"),
                gb("MemAvailable:")
            ),
            format!("tokenizer: {tokenizer}"),
        ],
    }
}

pub fn run(args: DoctorArgs) -> Result<()> {
    let world = parallel::cluster()
        .world(args.tp)
        .map_err(anyhow::Error::msg)?;
    let sections = vec![
        topology_section(world.as_ref())?,
        host_section(),
        Section {
            title: "gpu",
            lines: cuda::report().lines().map(str::to_string).collect(),
        },
    ];
    if world.topology().is_world_leader() {
        let mut out = String::new();
        for s in &sections {
            let _ = writeln!(out, "== {} ==", s.title);
            for l in &s.lines {
                let _ = writeln!(out, "{l}");
            }
        }
        emit(&out)?;
    }
    if args.selftest {
        if let Err(why) = cuda::device_count() {
            bail!("--selftest needs a GPU: {why}");
        }
        emit("\nself-test (GPU vs CPU twin; rel err = ‖gpu − cpu‖ / ‖cpu‖):\n")?;
        let (table, ok) = super::selftest::selftest().map_err(anyhow::Error::msg)?;
        emit(&table)?;
        if !ok {
            bail!("self-test FAILED (see the table above)");
        }
        emit("self-test passed\n")?;
    }
    Ok(())
}

/// Text to stdout; a stdout that cannot be written (a full disk, a closed pipe) is an error
/// (exit 1), not a panic as print! makes it.
fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing the report to stdout")
}
