//! MPI through rsmpi (feature `mpi`): bring-up, the world and replica communicators, abort.

use std::sync::{Arc, Mutex, MutexGuard};

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::{Color, Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;

use super::launch::Cluster;
use super::{CommError, HostComm, Topology, World};

/// Initialize MPI and find this rank's node and local rank (the shared-memory split).
pub(crate) fn bring_up(launcher: Option<String>) -> Result<(Cluster, Universe), String> {
    // Serialized: every MPI call goes through a Mutex below, from whichever thread holds it.
    let (universe, _level) = mpi::initialize_with_threading(Threading::Serialized)
        .ok_or("MPI was already initialized")?;
    let world = universe.world();
    let world_rank = world.rank() as usize;
    let world_size = world.size() as usize;
    let shared = world.split_shared(world.rank());
    let local_rank = shared.rank() as usize;
    let local_size = shared.size() as usize;
    // The node's id: the world rank of its first process.
    let mut node = world.rank();
    shared.process_at_rank(0).broadcast_into(&mut node);
    let cluster = Cluster {
        world_rank,
        world_size,
        local_rank,
        local_size,
        node: node as usize,
        hostname: mpi::environment::processor_name().unwrap_or_else(|_| "unknown".into()),
        launcher,
        mpi_version: mpi::environment::library_version()
            .ok()
            .map(|s| s.trim_end_matches('\0').trim().to_string()),
        mpi: true,
    };
    Ok((cluster, universe))
}

pub(crate) fn abort(code: i32) -> ! {
    SimpleCommunicator::world().abort(code)
}

/// Host collectives over an MPI communicator.
pub struct MpiComm {
    comm: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
}

// SAFETY: MPI runs at Threading::Serialized and every call on the communicator holds the Mutex,
// so no two threads use MPI at the same time; the handle itself is a plain id.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

impl MpiComm {
    fn new(comm: SimpleCommunicator) -> Self {
        MpiComm {
            rank: comm.rank() as usize,
            size: comm.size() as usize,
            comm: Mutex::new(comm),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SimpleCommunicator> {
        // A poisoned lock only means another thread panicked mid-call; the handle is still valid.
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl HostComm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<(), CommError> {
        if self.size == 1 {
            return Ok(());
        }
        let send = x.to_vec();
        self.lock()
            .all_reduce_into(&send[..], x, SystemOperation::sum());
        Ok(())
    }
    fn all_gather(&self, x: &[f32]) -> Result<Vec<f32>, CommError> {
        if self.size == 1 {
            return Ok(x.to_vec());
        }
        let mut out = vec![0f32; x.len() * self.size];
        self.lock().all_gather_into(x, &mut out[..]);
        Ok(out)
    }
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<(), CommError> {
        if self.size == 1 {
            return Ok(());
        }
        let c = self.lock();
        let p = c.process_at_rank(root as i32);
        let mut len = buf.len() as u64;
        p.broadcast_into(&mut len);
        let len = usize::try_from(len).map_err(|_| CommError::Failed {
            rank: self.rank,
            msg: format!("broadcast of {len} bytes does not fit in memory"),
        })?;
        buf.resize(len, 0);
        if len > 0 {
            p.broadcast_into(&mut buf[..]);
        }
        Ok(())
    }
}

/// The MPI world split into replicas.
pub struct MpiWorld {
    topo: Topology,
    world: Arc<MpiComm>,
    replica: Arc<MpiComm>,
}

impl MpiWorld {
    /// Collective: split into replicas of `tp` consecutive ranks and check none spans nodes.
    pub(crate) fn new(c: &Cluster, tp: usize) -> Result<Self, String> {
        let topo = Topology::new(c.world_rank, c.world_size, tp, c.local_rank)?;
        let world = SimpleCommunicator::world();
        let replica = world
            .split_by_color(Color::with_value(topo.replica as i32))
            .ok_or("MPI_Comm_split gave no communicator")?;
        let replica = MpiComm::new(replica);
        // Every rank learns every replica peer's node; all of them see the same list, so all
        // fail together with the same message.
        let nodes = replica
            .all_gather(&[c.node as f32])
            .map_err(|e| e.to_string())?;
        if nodes.iter().any(|&n| n != nodes[0]) {
            return Err(format!(
                "--tp {tp}: replica {} (world ranks {}..{}) would span nodes; tensor parallelism stays \
                 inside one node: launch a multiple of {tp} ranks per node (e.g. --map-by ppr:{tp}:node, \
                 srun --ntasks-per-node={tp}) or lower --tp",
                topo.replica,
                topo.replica * tp,
                topo.replica * tp + tp - 1
            ));
        }
        Ok(MpiWorld {
            topo,
            world: Arc::new(MpiComm::new(world)),
            replica: Arc::new(replica),
        })
    }
}

impl World for MpiWorld {
    fn topology(&self) -> &Topology {
        &self.topo
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.world.lock().barrier();
        Ok(())
    }
    fn replica_comm(&self) -> Arc<dyn HostComm> {
        self.replica.clone()
    }
    fn world_comm(&self) -> Arc<dyn HostComm> {
        self.world.clone()
    }
}
