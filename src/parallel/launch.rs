//! Bring-up: find out whether a launcher (mpirun, srun) started this process, initialize MPI if
//! so, and learn where this rank sits (world rank, node, local rank).

use std::sync::{Arc, OnceLock};

use super::{SoloWorld, World};

/// What this process knows about the job before any mode runs.
#[derive(Debug)]
pub struct Cluster {
    pub world_rank: usize,
    pub world_size: usize,
    /// Rank among the processes on this node (picks the GPU).
    pub local_rank: usize,
    /// Processes on this node.
    pub local_size: usize,
    /// Index of this node (the world rank of its first process).
    pub node: usize,
    pub hostname: String,
    /// Every world rank's host, in rank order.
    pub hosts: Vec<String>,
    /// True when the collective watchdog runs (MPI up at the thread level it needs).
    pub watchdog: bool,
    /// The launcher variable that told us we run under one ("OMPI_COMM_WORLD_SIZE=2").
    pub launcher: Option<String>,
    /// MPI library version string, when MPI is up.
    pub mpi_version: Option<String>,
    pub(crate) mpi: bool,
}

impl Cluster {
    fn solo(launcher: Option<String>) -> Self {
        Cluster {
            world_rank: 0,
            world_size: 1,
            local_rank: 0,
            local_size: 1,
            node: 0,
            hosts: vec![hostname()],
            hostname: hostname(),
            watchdog: false,
            launcher,
            mpi_version: None,
            mpi: false,
        }
    }

    /// True when MPI was initialized (a launcher started us and this build has MPI).
    pub fn has_mpi(&self) -> bool {
        self.mpi
    }

    /// Split the world into replicas of `tp` ranks. Collective: every rank must call it, in the
    /// same order. Errors (same on every rank) before anything is loaded: a world that is not a
    /// multiple of tp, a replica that would span nodes.
    pub fn world(&self, tp: usize) -> Result<Arc<dyn World>, String> {
        #[cfg(feature = "mpi")]
        if self.mpi {
            return Ok(Arc::new(super::mpi::MpiWorld::new(self, tp)?));
        }
        Ok(Arc::new(SoloWorld::with_tp(tp)?))
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// Environment variables launchers set, with the number of tasks they announce.
const LAUNCHER_SIZE_VARS: &[&str] = &[
    "OMPI_COMM_WORLD_SIZE", // OpenMPI mpirun
    "PMI_SIZE",             // MPICH / Intel MPI hydra, srun --mpi=pmi2
    "PMIX_SIZE",            // some PMIx launchers
    "SLURM_STEP_NUM_TASKS", // srun (set per step; SLURM_NTASKS alone is the allocation)
    "MV2_COMM_WORLD_SIZE",  // MVAPICH
];

/// The launcher variable found, and whether it announces more than one task.
pub fn detect_launcher() -> Option<(String, usize)> {
    detect_launcher_in(|k| std::env::var(k).ok())
}

fn detect_launcher_in(get: impl Fn(&str) -> Option<String>) -> Option<(String, usize)> {
    let mut found: Option<(String, usize)> = None;
    for var in LAUNCHER_SIZE_VARS {
        if let Some(v) = get(var) {
            let n = v.trim().parse::<usize>().unwrap_or(0);
            if found.as_ref().is_none_or(|f| n > f.1) {
                found = Some((format!("{var}={v}"), n));
            }
        }
    }
    if found.is_none() {
        if let Some(r) = get("PMIX_RANK") {
            found = Some((format!("PMIX_RANK={r}"), 1));
        }
    }
    found
}

/// Finalizes MPI when dropped (keep it alive for the whole of `main`).
pub struct ClusterGuard {
    // Fields drop in order: the heartbeat stops before MPI is finalized.
    #[cfg(feature = "mpi")]
    _heartbeat: Option<super::mpi::Heartbeat>,
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

impl ClusterGuard {
    /// Finalize MPI now (call before `std::process::exit`, which runs no destructors).
    pub fn finalize(self) {}
}

/// One line to stderr in a single write, then a moment for the launcher to forward it: mpirun
/// relays each rank's stderr in chunks and prints its own abort notice as soon as it hears of
/// MPI_Abort, which otherwise can land in the middle of (or before) the rank's message.
pub fn say(line: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(format!("{line}\n").as_bytes());
    let _ = err.flush();
    drop(err);
    std::thread::sleep(std::time::Duration::from_millis(200));
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// Bring up the cluster: the first thing `main` does. Under a launcher with MPI built in, MPI is
/// initialized; without MPI built in, a launch of more than one task is refused (otherwise N
/// ranks would each silently run the whole job).
pub fn init() -> Result<ClusterGuard, String> {
    let launcher = detect_launcher();
    #[cfg(feature = "mpi")]
    if launcher.is_some() {
        let (cluster, universe, heartbeat) = super::mpi::bring_up(launcher.map(|l| l.0))?;
        let _ = CLUSTER.set(cluster);
        return Ok(ClusterGuard {
            _heartbeat: heartbeat,
            _universe: Some(universe),
        });
    }
    #[cfg(not(feature = "mpi"))]
    if let Some((var, n)) = &launcher {
        if *n > 1 {
            return Err(format!(
                "this herd was built without MPI support but runs under a launcher with {n} tasks ({var}): \
                 every task would run the whole job on its own. Rebuild with `cargo build --release --features mpi` \
                 (needs an MPI library, e.g. apt-get install libopenmpi-dev libclang-dev), or run one task."
            ));
        }
    }
    let _ = CLUSTER.set(Cluster::solo(launcher.map(|l| l.0)));
    Ok(ClusterGuard {
        #[cfg(feature = "mpi")]
        _heartbeat: None,
        #[cfg(feature = "mpi")]
        _universe: None,
    })
}

/// This process's place in the job (a world of one if [`init`] was never called).
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| Cluster::solo(None))
}

/// End the whole job now with `code`: MPI_Abort when MPI is up (every rank is killed within
/// seconds), else a plain exit.
pub fn abort(code: i32) -> ! {
    #[cfg(feature = "mpi")]
    if cluster().has_mpi() {
        super::mpi::abort(code);
    }
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launchers_are_recognized() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(a, _)| *a == k)
                    .map(|(_, b)| b.to_string())
            }
        };
        assert_eq!(detect_launcher_in(env(&[])), None);
        assert_eq!(
            detect_launcher_in(env(&[("OMPI_COMM_WORLD_SIZE", "4")])),
            Some(("OMPI_COMM_WORLD_SIZE=4".into(), 4))
        );
        // An sbatch script's own process (no srun step) is not a launch of many tasks.
        assert_eq!(detect_launcher_in(env(&[("SLURM_NTASKS", "8")])), None);
        assert_eq!(
            detect_launcher_in(env(&[("SLURM_STEP_NUM_TASKS", "2"), ("PMIX_RANK", "1")])),
            Some(("SLURM_STEP_NUM_TASKS=2".into(), 2))
        );
        assert_eq!(
            detect_launcher_in(env(&[("PMIX_RANK", "0")])),
            Some(("PMIX_RANK=0".into(), 1))
        );
    }
}
