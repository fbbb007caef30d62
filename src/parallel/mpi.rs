//! MPI through rsmpi (feature `mpi`): bring-up, the world and replica communicators, abort, and
//! the heartbeat thread of the collective watchdog (`watchdog.rs`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::request::{Request, StaticScope};
use mpi::topology::{Color, Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;

use super::launch::Cluster;
use super::watchdog::{self, Group, Watchdog};
use super::{CommError, HostComm, Topology, World};

/// This process's watchdog, when MPI gave the thread level its heartbeat thread needs.
static WATCHDOG: std::sync::OnceLock<Arc<Watchdog>> = std::sync::OnceLock::new();

/// Bytes of a host name in the bring-up exchange (longer names are cut).
const HOST_BYTES: usize = 64;

/// Initialize MPI and find this rank's node and local rank (the shared-memory split).
pub(crate) fn bring_up(
    launcher: Option<String>,
) -> Result<(Cluster, Universe, Option<Heartbeat>), String> {
    // Multiple: the heartbeat thread sends and receives while the main thread sits in a
    // collective. The main thread's calls still go one at a time through a Mutex per
    // communicator (all a library at Serialized would need).
    let (universe, level) =
        mpi::initialize_with_threading(Threading::Multiple).ok_or("MPI was already initialized")?;
    let world = universe.world();
    let world_rank = world.rank() as usize;
    let world_size = world.size() as usize;
    let shared = world.split_shared(world.rank());
    let local_rank = shared.rank() as usize;
    let local_size = shared.size() as usize;
    // The node's id: the world rank of its first process.
    let mut node = world.rank();
    shared.process_at_rank(0).broadcast_into(&mut node);
    let hostname = mpi::environment::processor_name().unwrap_or_else(|_| "unknown".into());
    // Every rank's host, so that a rank can name the node of a peer it waited for.
    let mut mine = [0u8; HOST_BYTES];
    let n = hostname.len().min(HOST_BYTES);
    mine[..n].copy_from_slice(&hostname.as_bytes()[..n]);
    let mut all = vec![0u8; HOST_BYTES * world_size];
    world.all_gather_into(&mine[..], &mut all[..]);
    let hosts: Vec<String> = all
        .chunks(HOST_BYTES)
        .map(|c| {
            String::from_utf8_lossy(c)
                .trim_end_matches('\0')
                .to_string()
        })
        .collect();
    let heartbeat = if level >= Threading::Multiple && world_size > 1 {
        let dog = Arc::new(Watchdog::new(world_rank, hosts.clone()));
        let _ = WATCHDOG.set(dog.clone());
        Some(Heartbeat::start(world.duplicate(), dog))
    } else {
        None
    };
    let cluster = Cluster {
        world_rank,
        world_size,
        local_rank,
        local_size,
        node: node as usize,
        hostname,
        hosts,
        watchdog: heartbeat.is_some(),
        launcher,
        mpi_version: mpi::environment::library_version()
            .ok()
            .map(|s| s.trim_end_matches('\0').trim().to_string()),
        mpi: true,
    };
    Ok((cluster, universe, heartbeat))
}

/// Tag of heartbeat messages (on a communicator of their own).
const BEAT_TAG: i32 = 7;
static ALIVE: u8 = 0;
static BYE: u8 = 1;

/// A communicator the heartbeat thread owns.
struct BeatComm(SimpleCommunicator);
// SAFETY: MPI is at Threading::Multiple whenever the heartbeat runs, and only its thread uses
// this communicator; the handle itself is a plain id.
unsafe impl Send for BeatComm {}

/// The heartbeat thread: beats to every other rank, hears theirs, and aborts the job when a
/// collective waits for a rank that fell silent (see `watchdog.rs`). Stops on drop, before MPI
/// is finalized: it says goodbye, then waits until every rank has, so that no rank beats to
/// one that already exited.
pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    fn start(comm: SimpleCommunicator, dog: Arc<Watchdog>) -> Heartbeat {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let comm = BeatComm(comm);
        let thread = std::thread::Builder::new()
            .name("herd-heartbeat".into())
            .spawn(move || beat(comm, &dog, &flag))
            .ok();
        Heartbeat { stop, thread }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn beat(comm: BeatComm, dog: &Watchdog, stop: &AtomicBool) {
    let comm = comm.0;
    let size = comm.size();
    let mut sends: Vec<Request<'static, u8, StaticScope>> = Vec::new();
    let mut leaving: Option<Request<'static, ()>> = None;
    // The last barrier is watched too: a rank that died before saying goodbye ends the wait.
    let everyone = Arc::new(Group {
        label: "the world".into(),
        members: (0..size as usize).collect(),
    });
    let mut last_wait = None;
    let mut last_beat: Option<Instant> = None;
    loop {
        // Finished sends leave; a peer that stopped reading keeps a few (bounded below).
        sends = sends.into_iter().filter_map(|r| r.test().err()).collect();
        let stopping = stop.load(Ordering::Relaxed);
        if leaving.is_none() {
            let due = last_beat.is_none_or(|t| t.elapsed() >= watchdog::beat_interval());
            if (due || stopping) && sends.len() < 64 * size as usize {
                let word = if stopping { &BYE } else { &ALIVE };
                for p in dog.partners() {
                    sends.push(comm.process_at_rank(p as i32).immediate_send_with_tag(
                        StaticScope,
                        word,
                        BEAT_TAG,
                    ));
                }
                last_beat = Some(Instant::now());
            }
            if stopping {
                // Past this barrier every rank has said goodbye and beats no more.
                leaving = Some(comm.immediate_barrier());
                last_wait = Some(dog.begin("the barrier before MPI_Finalize", 0, &everyone, None));
            }
        }
        while let Some((msg, status)) = comm
            .any_process()
            .immediate_matched_probe_with_tag(BEAT_TAG)
        {
            let mut word = 0u8;
            msg.matched_receive_into(&mut word);
            dog.heard(status.source_rank() as usize, word == BYE, Instant::now());
        }
        if let Some(msg) = dog.verdict(Instant::now(), watchdog::timeout()) {
            super::launch::say(&format!("herd: error: {msg}"));
            comm.abort(crate::exit::FAILED);
        }
        if let Some(req) = leaving.take() {
            match req.test() {
                Ok(_) => break,
                Err(req) => leaving = Some(req),
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(last_wait);
    // Sends to ranks that have all arrived at the barrier complete; wait a moment for them.
    let t = Instant::now();
    while !sends.is_empty() && t.elapsed() < Duration::from_secs(2) {
        sends = sends.into_iter().filter_map(|r| r.test().err()).collect();
        std::thread::sleep(Duration::from_millis(5));
    }
    // A request MPI never finished cannot be dropped (rsmpi panics): let it go.
    std::mem::forget(sends);
}

pub(crate) fn abort(code: i32) -> ! {
    SimpleCommunicator::world().abort(code)
}

/// Host collectives over an MPI communicator.
pub struct MpiComm {
    comm: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
    /// Who the collectives wait for, for the watchdog's message.
    group: Arc<Group>,
    /// Collectives so far (the watchdog names the n-th).
    calls: AtomicU64,
}

// SAFETY: MPI runs at Threading::Serialized and every call on the communicator holds the Mutex,
// so no two threads use MPI at the same time; the handle itself is a plain id.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

impl MpiComm {
    /// `comm` whose ranks are the world ranks `members`, called `label` in messages.
    fn new(comm: SimpleCommunicator, label: String, members: Vec<usize>) -> Self {
        MpiComm {
            rank: comm.rank() as usize,
            size: comm.size() as usize,
            comm: Mutex::new(comm),
            group: Arc::new(Group { label, members }),
            calls: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SimpleCommunicator> {
        // A poisoned lock only means another thread panicked mid-call; the handle is still valid.
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run collective `what` (rooted at group rank `root`, if any) under the watchdog.
    fn watched<T>(
        &self,
        what: &'static str,
        root: Option<usize>,
        f: impl FnOnce(&SimpleCommunicator) -> T,
    ) -> T {
        let c = self.lock();
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let root = root.and_then(|r| self.group.members.get(r).copied());
        let _wait = WATCHDOG.get().map(|d| d.begin(what, n, &self.group, root));
        f(&c)
    }
}

impl HostComm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn watch(&self, what: &'static str) -> Option<super::watchdog::WaitGuard<'static>> {
        if self.size == 1 {
            return None;
        }
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        WATCHDOG.get().map(|d| d.begin(what, n, &self.group, None))
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<(), CommError> {
        if self.size == 1 {
            return Ok(());
        }
        let send = x.to_vec();
        self.watched("all_reduce_sum", None, |c| {
            c.all_reduce_into(&send[..], x, SystemOperation::sum())
        });
        Ok(())
    }
    fn all_gather(&self, x: &[f32]) -> Result<Vec<f32>, CommError> {
        if self.size == 1 {
            return Ok(x.to_vec());
        }
        let mut out = vec![0f32; x.len() * self.size];
        self.watched("all_gather", None, |c| c.all_gather_into(x, &mut out[..]));
        Ok(out)
    }
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<(), CommError> {
        if self.size == 1 {
            return Ok(());
        }
        // Step plans travel this way: a peer waiting for its leader's next plan is watched too.
        self.watched("broadcast", Some(root), |c| {
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
        })
    }
}

/// The MPI world split into replicas.
pub struct MpiWorld {
    topo: Topology,
    world: Arc<MpiComm>,
    replica: Arc<MpiComm>,
}

impl MpiWorld {
    /// Collective: split into replicas of `tp` consecutive ranks.
    pub(crate) fn new(c: &Cluster, tp: usize) -> Result<Self, String> {
        let topo = Topology::new(c.world_rank, c.world_size, tp, c.local_rank)?;
        let world = SimpleCommunicator::world();
        let replica = world
            .split_by_color(Color::with_value(topo.replica as i32))
            .ok_or("MPI_Comm_split gave no communicator")?;
        let first = topo.replica * tp;
        match WATCHDOG.get() {
            Some(dog) => dog.add_partners(first..first + tp),
            None if c.world_size > 1 && c.world_rank == 0 => tracing::warn!(
                "this MPI library does not offer MPI_THREAD_MULTIPLE: no collective watchdog \
                 (--collective-timeout has no effect), so a rank lost without its launcher noticing \
                 can stall the job until its time limit"
            ),
            None => {}
        }
        let replica = MpiComm::new(
            replica,
            format!(
                "replica {} (world ranks {first}-{})",
                topo.replica,
                first + tp - 1
            ),
            (first..first + tp).collect(),
        );
        // A replica over several nodes works (its collectives cross the network every layer),
        // but is rarely what was meant: say so once, on the replica leader.
        let mut hosts: Vec<&str> = (first..first + tp)
            .filter_map(|r| c.hosts.get(r).map(String::as_str))
            .collect();
        hosts.dedup();
        if hosts.len() > 1 && topo.is_replica_leader() {
            tracing::warn!(
                "--tp {tp}: replica {} spans nodes {}: its tensor-parallel traffic crosses the \
                 network at every layer (fine on a fast interconnect; to keep replicas inside a node \
                 launch a multiple of {tp} ranks per node, e.g. srun --ntasks-per-node={tp})",
                topo.replica,
                hosts.join(", ")
            );
        }
        Ok(MpiWorld {
            topo,
            world: Arc::new(MpiComm::new(
                world,
                "the world".into(),
                (0..c.world_size).collect(),
            )),
            replica: Arc::new(replica),
        })
    }
}

impl World for MpiWorld {
    fn topology(&self) -> &Topology {
        &self.topo
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.world.watched("barrier", None, |c| c.barrier());
        Ok(())
    }
    fn replica_comm(&self) -> Arc<dyn HostComm> {
        self.replica.clone()
    }
    fn world_comm(&self) -> Arc<dyn HostComm> {
        self.world.clone()
    }
}
