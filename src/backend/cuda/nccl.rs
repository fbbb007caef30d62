//! The tensor-parallel communicator between the GPUs of one replica: NCCL, bootstrapped over the
//! replica's host communicator the way llm.c does it (the replica leader makes the unique id,
//! `broadcast_bytes` carries it to the peers, every rank calls ncclCommInitRank).
//!
//! NOTE: compiled without a GPU; nothing in this file has run on a GPU yet.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use cudarc::nccl::{result, sys, Id};

use crate::backend::BackendError;
use crate::parallel::HostComm;

/// What to tell a user whose machine has no loadable libnccl.
pub const NCCL_MISSING: &str =
    "NCCL not found: put libnccl.so on LD_LIBRARY_PATH; scripts/gpu-check shows how";

/// Bytes in an NCCL unique id (`ncclUniqueId::internal`).
const ID_BYTES: usize = 128;

/// Is libnccl loadable? cudarc panics on first use when it is not, so ask first.
/// Not yet run on a GPU.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen libnccl by its candidate names.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

fn nccl_err(what: &str, e: cudarc::nccl::result::NcclError) -> BackendError {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any result code;
    // the library is loaded (a communicator or id exists, so NCCL was found).
    let text = unsafe {
        let p = cudarc::nccl::sys::ncclGetErrorString(e.0);
        if p.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    BackendError::Comm(format!("NCCL {what}: {:?} {text}", e.0))
}

/// One rank's NCCL communicator over its replica, on the backend's stream (collectives are
/// ordered with the kernels; nothing synchronizes the host).
pub struct NcclComm {
    /// The raw communicator (not cudarc's `Comm`, whose Drop panics when ncclCommAbort reports
    /// an error, e.g. after a kernel fault: that panic replaced the real error message).
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
}

// SAFETY: an NCCL communicator may be used from any thread as long as no two threads use it at
// once. The backend that owns it is `!Sync` (RefCells) and is driven by one thread at a time, so
// moving it between threads (the `Send` a model runner needs) is all that is allowed here.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Collective over `host` (every rank of the replica calls it): agree that every rank has
    /// NCCL, make the id on rank 0, broadcast it, then ncclCommInitRank on `stream`.
    /// Not yet run on a GPU.
    pub fn new(stream: &Arc<CudaStream>, host: &dyn HostComm) -> Result<Self, BackendError> {
        let (rank, size) = (host.rank(), host.size());
        let comm_err = |e: crate::parallel::CommError| BackendError::Comm(e.to_string());
        // Every rank learns whether any rank lacks NCCL, so none waits for an id that never comes.
        let present = nccl_present();
        let mut missing = [if present { 0.0f32 } else { 1.0 }];
        host.all_reduce_sum(&mut missing).map_err(comm_err)?;
        if !present {
            return Err(BackendError::Unsupported(NCCL_MISSING.into()));
        }
        if missing[0] > 0.0 {
            return Err(BackendError::Unsupported(format!(
                "{NCCL_MISSING} (missing on {} other rank(s) of this replica)",
                missing[0] as usize
            )));
        }
        // More ranks on a node than GPUs puts two ranks of this group on one GPU, which NCCL
        // refuses with "Duplicate GPU detected": say so in herd's terms, on every rank, first.
        let ordinal = stream.context().ordinal();
        let node = crate::parallel::cluster().node;
        let mut ords = vec![0f32; size];
        let mut nodes = vec![0f32; size];
        ords[rank] = (ordinal + 1) as f32;
        nodes[rank] = (node + 1) as f32;
        host.all_reduce_sum(&mut ords).map_err(comm_err)?;
        host.all_reduce_sum(&mut nodes).map_err(comm_err)?;
        for a in 0..size {
            for b in a + 1..size {
                if ords[a] == ords[b] && nodes[a] == nodes[b] {
                    let gpus = super::device_count().unwrap_or(0);
                    return Err(BackendError::Unsupported(format!(
                        "tensor-parallel ranks {a} and {b} of this replica would share GPU {} of \
                         their node ({gpus} GPU(s) there for {} local ranks): NCCL needs one GPU \
                         per rank. Start at most one rank per GPU on each node (mpirun \
                         --map-by ppr:{gpus}:node, srun --ntasks-per-node={gpus})",
                        ords[a] as usize - 1,
                        crate::parallel::cluster().local_size,
                    )));
                }
            }
        }
        // The leader sends an empty id when it could not make one: the peers fail with it.
        let mut bytes = Vec::new();
        let mut made = Ok(());
        if rank == 0 {
            match Id::new() {
                Ok(id) => bytes = id.internal().iter().map(|&c| c as u8).collect(),
                Err(e) => made = Err(nccl_err("ncclGetUniqueId", e)),
            }
        }
        host.broadcast_bytes(0, &mut bytes).map_err(comm_err)?;
        made?;
        if bytes.len() != ID_BYTES {
            return Err(BackendError::Comm(format!(
                "the replica leader sent an NCCL id of {} bytes (expected {ID_BYTES}): it could \
                 not make one, see its error",
                bytes.len()
            )));
        }
        let mut internal = [0 as std::ffi::c_char; ID_BYTES];
        for (d, &s) in internal.iter_mut().zip(&bytes) {
            *d = s as std::ffi::c_char;
        }
        // ncclCommInitRank takes the GPU from the calling thread's current context.
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| BackendError::Comm(format!("CUDA: binding the context: {e}")))?;
        let id = sys::ncclUniqueId { internal };
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; the id is 128 bytes from the leader.
        unsafe {
            result::comm_init_rank(&mut comm, size as i32, id, rank as i32)
                .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        }
        Ok(NcclComm {
            comm,
            stream: stream.clone(),
            rank,
            size,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Element-wise sum of `count` f32 at device address `x` over the replica, in place.
    /// Not yet run on a GPU.
    pub fn all_reduce_sum(&self, x: u64, count: usize) -> Result<(), BackendError> {
        // SAFETY: `x` holds `count` f32 on this communicator's device, used on its stream.
        unsafe {
            result::all_reduce(
                x as *const std::ffi::c_void,
                x as *mut std::ffi::c_void,
                count,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| nccl_err("ncclAllReduce", e))?;
        Ok(())
    }

    /// Every rank's `count` f32 at `x` into `out` (`[rank][count]`, room for `out_len` f32).
    /// Not yet run on a GPU.
    pub fn all_gather(
        &self,
        x: u64,
        count: usize,
        out: u64,
        out_len: usize,
    ) -> Result<(), BackendError> {
        if out_len < count * self.size {
            return Err(BackendError::Comm(format!(
                "all-gather of {count} elements from {} ranks into a buffer of {out_len}",
                self.size,
            )));
        }
        // SAFETY: `x` holds count f32 and `out` size times that (checked above), both on
        // this communicator's device, used on its stream.
        unsafe {
            result::all_gather(
                x as *const std::ffi::c_void,
                out as *mut std::ffi::c_void,
                count,
                sys::ncclDataType_t::ncclFloat32,
                self.comm,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| nccl_err("ncclAllGather", e))?;
        Ok(())
    }
}

impl Drop for NcclComm {
    /// Abort (frees the communicator without waiting for peers that may be gone). Its error is
    /// only logged: the job is ending, usually because of an error already reported.
    fn drop(&mut self) {
        // SAFETY: made by ncclCommInitRank in `new`, aborted once.
        if let Err(e) = unsafe { result::comm_abort(self.comm) } {
            tracing::warn!("{}", nccl_err("ncclCommAbort", e));
        }
    }
}
