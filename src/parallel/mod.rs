//! Parallel layer: topology (world, replicas) and communicators.
//!
//! For now: the solo world of one rank. MPI and NCCL implementations plug in behind the same
//! interfaces.

pub mod topology;

pub use topology::Topology;

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("rank {rank}: {msg}")]
    Failed { rank: usize, msg: String },
}

/// Collectives over host memory within one tensor-parallel group.
pub trait HostComm: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum over all ranks, result on every rank.
    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<(), CommError>;
    /// Every rank's `x` concatenated in rank order (all `x` have the same length).
    fn all_gather(&self, x: &[f32]) -> Result<Vec<f32>, CommError>;
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
}

/// The whole job: its topology and the few world-wide operations modes need.
pub trait World: Send + Sync {
    fn topology(&self) -> &Topology;
    /// Wait until every rank of the world arrives.
    fn barrier(&self) -> Result<(), CommError>;
}

/// A world of one process (no launcher, no MPI).
pub struct SoloWorld {
    topo: Topology,
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
