//! Parallel layer: topology (world, replicas, local rank), the bring-up of the cluster and the
//! host communicators behind one interface: [`Solo`] and MPI (CPU backend; feature `mpi`). The
//! CUDA backend's NCCL communicator (`backend::cuda::nccl`) is bootstrapped over a [`HostComm`].

pub mod launch;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod topology;
pub mod watchdog;

use std::sync::Arc;

pub use launch::{abort, cluster, init, say, Cluster, ClusterGuard};
pub use topology::Topology;

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("rank {rank}: {msg}")]
    Failed { rank: usize, msg: String },
}

/// Collectives over host memory within one group of ranks (a replica, or the world).
pub trait HostComm: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum over all ranks, result on every rank.
    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<(), CommError>;
    /// Every rank's `x` concatenated in rank order (all `x` have the same length).
    fn all_gather(&self, x: &[f32]) -> Result<Vec<f32>, CommError>;
    /// `root`'s bytes on every rank (`buf` is resized on the others). Carries step plans.
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<(), CommError>;
    /// Put work that waits on this group's peers outside these host collectives (a step's NCCL
    /// collectives, and the stream synchronization that waits for them) under the collective
    /// watchdog until the guard drops: a stopped or dead peer then ends the job, named, instead
    /// of hanging it. `None` where there is no watchdog (one rank, no MPI).
    fn watch(&self, what: &'static str) -> Option<watchdog::WaitGuard<'static>> {
        let _ = what;
        None
    }
}

/// A group of one: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

impl HostComm for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _x: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }
    fn all_gather(&self, x: &[f32]) -> Result<Vec<f32>, CommError> {
        Ok(x.to_vec())
    }
    fn broadcast_bytes(&self, _root: usize, _buf: &mut Vec<u8>) -> Result<(), CommError> {
        Ok(())
    }
}

/// The whole job: its topology and the few world-wide operations modes need.
pub trait World: Send + Sync {
    fn topology(&self) -> &Topology;
    /// Wait until every rank of the world arrives.
    fn barrier(&self) -> Result<(), CommError>;
    /// The collectives of this rank's replica (its tensor-parallel group).
    fn replica_comm(&self) -> Arc<dyn HostComm> {
        Arc::new(Solo)
    }
    /// Collectives over the whole world (load reports, merges).
    fn world_comm(&self) -> Arc<dyn HostComm> {
        Arc::new(Solo)
    }
}

/// A world of one process (no launcher, no MPI).
pub struct SoloWorld {
    topo: Topology,
}

impl SoloWorld {
    /// One process whose replica would need `tp` ranks: an error unless tp is 1.
    pub fn with_tp(tp: usize) -> Result<Self, String> {
        Ok(SoloWorld {
            topo: Topology::new(0, 1, tp, 0)?,
        })
    }
}

impl Default for SoloWorld {
    fn default() -> Self {
        SoloWorld {
            topo: Topology::solo(),
        }
    }
}

impl World for SoloWorld {
    fn topology(&self) -> &Topology {
        &self.topo
    }
    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
}

/// Test hook: `HERD_TEST_FAIL_RANK=R HERD_TEST_FAIL_AT=POINT` makes world rank R fail at `point`
/// ("load", "step"); `HERD_TEST_FAIL_HOW=exit` makes it exit on the spot instead of returning an
/// error (a crash that never reaches MPI_Abort), `stop` stops the process with SIGSTOP (a hung
/// or cut-off peer), `sleep:S` keeps it busy for S seconds and goes on (a slow but live peer).
/// Used by the failure tests in tests/mpi.rs and tests/multinode.rs.
pub fn test_fault(point: &str) -> Result<(), String> {
    let at = std::env::var("HERD_TEST_FAIL_AT").unwrap_or_default();
    let rank = std::env::var("HERD_TEST_FAIL_RANK")
        .ok()
        .and_then(|r| r.parse::<usize>().ok());
    if at != point || rank != Some(cluster().world_rank) {
        return Ok(());
    }
    let how = std::env::var("HERD_TEST_FAIL_HOW").unwrap_or_default();
    let rank = cluster().world_rank;
    if how == "exit" {
        eprintln!("herd: rank {rank}: injected exit at {point}");
        std::process::exit(3);
    }
    if how == "stop" {
        eprintln!("herd: rank {rank}: injected SIGSTOP at {point}");
        // SAFETY: raise only sends a signal to this process.
        unsafe { libc::raise(libc::SIGSTOP) };
        return Ok(());
    }
    if let Some(secs) = how
        .strip_prefix("sleep:")
        .and_then(|s| s.parse::<f64>().ok())
    {
        eprintln!("herd: rank {rank}: injected {secs} s pause at {point}");
        std::thread::sleep(std::time::Duration::from_secs_f64(secs));
        return Ok(());
    }
    Err(format!("injected failure at {point} (HERD_TEST_FAIL_AT)"))
}
