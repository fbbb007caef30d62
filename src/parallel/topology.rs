//! Where a rank sits: the world, its replica (a tensor-parallel group of `tp` consecutive ranks)
//! and its place in that group. Replicas run side by side as data-parallel workers.

/// This rank's place in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub world_rank: usize,
    pub world_size: usize,
    /// Ranks per replica (tensor-parallel degree).
    pub tp: usize,
    /// Rank within the replica; 0 is the replica leader.
    pub tp_rank: usize,
    /// Which replica this rank belongs to.
    pub replica: usize,
    /// world_size / tp.
    pub n_replicas: usize,
    /// Rank among the processes on this node (picks the GPU).
    pub local_rank: usize,
}

impl Topology {
    /// A world of one process.
    pub fn solo() -> Self {
        Topology {
            world_rank: 0,
            world_size: 1,
            tp: 1,
            tp_rank: 0,
            replica: 0,
            n_replicas: 1,
            local_rank: 0,
        }
    }

    /// Split a world into replicas of `tp` consecutive ranks.
    pub fn new(
        world_rank: usize,
        world_size: usize,
        tp: usize,
        local_rank: usize,
    ) -> Result<Self, String> {
        if tp == 0 {
            return Err("--tp must be at least 1".into());
        }
        if !world_size.is_multiple_of(tp) {
            return Err(format!(
                "the world has {world_size} ranks, which is not a multiple of --tp {tp}: \
                 launch a multiple of {tp} ranks (e.g. -np {})",
                tp * (world_size / tp).max(1)
            ));
        }
        Ok(Topology {
            world_rank,
            world_size,
            tp,
            tp_rank: world_rank % tp,
            replica: world_rank / tp,
            n_replicas: world_size / tp,
            local_rank,
        })
    }

    /// Rank 0 of the world: merges outputs, speaks for the job.
    pub fn is_world_leader(&self) -> bool {
        self.world_rank == 0
    }

    /// Rank 0 of a replica: runs the engine loop and the I/O of its replica.
    pub fn is_replica_leader(&self) -> bool {
        self.tp_rank == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_are_consecutive_ranks() {
        let t = Topology::new(5, 8, 2, 1).unwrap();
        assert_eq!((t.replica, t.tp_rank, t.n_replicas), (2, 1, 4));
        assert!(!t.is_replica_leader());
        assert!(Topology::new(0, 6, 4, 0)
            .unwrap_err()
            .contains("multiple of --tp 4"));
    }
}
