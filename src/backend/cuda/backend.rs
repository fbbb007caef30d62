//! `CudaBackend`: the [`Backend`] trait on one GPU. Weights bf16, activations f32 between
//! kernels (accuracy first: the residual stream stays f32 like the CPU reference; GEMM inputs
//! are cast to bf16 on the way in), KV cache bf16, f32 logits and softmax.
//!
//! A step has no host overhead beyond its launches: activations live in an arena sized by the
//! memory plan (no allocation per buffer), everything the step needs from the host goes up in one
//! copy from a pinned buffer and the sampled tokens come back in one, cuBLASLt plans are cached,
//! and a decode step (every row one new token, all rows sampled) is a CUDA graph captured once
//! per batch-size bucket and replayed with one launch. A structured-output step is deferred: its
//! forward (the graph that ends at the logits) runs while the host computes the masks, which
//! then go up in a second copy, followed by the sampling kernel.
//! NOTE: the graph, arena and staging paths have run on the emulated device only.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

use super::arena::{Arena, DevBuf};
use super::gemm::{m_bucket, Gemm};
use super::kernels;
use super::nccl::NcclComm;
use super::staging::{OutLayout, SamplingLayout, StepData, StepLayout};
use crate::backend::{AttnBatch, Backend, BackendError, KvShape, Replayed, RowSampling, Sampled};
use crate::checkpoint::{DType, Tensor};

/// A row-major `[rows, cols]` f32 matrix on the GPU.
pub struct CudaAct {
    pub rows: usize,
    pub cols: usize,
    /// `None` when its allocation failed: the error is noted, `check` reports it, and every
    /// kernel that would use the buffer is skipped.
    buf: Option<DevBuf>,
    /// The same values as the next GEMM's bf16 operand (hi/lo halves with accurate numerics),
    /// written by the kernel that made them or by the first GEMM that needed them; dropped
    /// when the values change in place.
    b16: RefCell<Option<DevBuf>>,
}

impl CudaAct {
    fn new(rows: usize, cols: usize, buf: Option<DevBuf>) -> Self {
        CudaAct {
            rows,
            cols,
            buf,
            b16: RefCell::new(None),
        }
    }
    /// The values change: the bf16 copy no longer holds.
    fn changed(&mut self) {
        *self.b16.get_mut() = None;
    }
}

/// A `[rows, cols]` bf16 weight on the GPU (raw bits).
pub struct CudaMatrix {
    pub rows: usize,
    pub cols: usize,
    _buf: CudaSlice<u8>,
    ptr: u64,
}

/// The paged KV pool: K and V each `[layer, slot, kv_head, head_dim]`, one allocation each;
/// bf16 (half the bytes attention must read) or f32 (`Numerics::Accurate`).
pub struct CudaKv {
    pub shape: KvShape,
    _k: CudaSlice<u8>,
    _v: CudaSlice<u8>,
    k: u64,
    v: u64,
    elem: usize,
}

/// How much precision the GPU keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Numerics {
    /// bf16 GEMM inputs and KV cache (f32 accumulation): the fast path.
    Bf16,
    /// GEMM inputs split into bf16 hi + lo (one GEMM of 2m rows: the weights are still read once)
    /// and an f32 KV cache: f32-like results, twice the GEMM FLOPs and KV bytes.
    Accurate,
}

impl Numerics {
    /// Bytes per KV cache element.
    pub fn kv_elem_bytes(self) -> usize {
        match self {
            Numerics::Bf16 => 2,
            Numerics::Accurate => 4,
        }
    }
}

impl CudaKv {
    /// Byte offset of `layer` in K (and V).
    fn layer_at(&self, layer: usize) -> u64 {
        let s = self.shape;
        (layer * s.num_blocks * s.block_size * s.n_kv_heads * s.head_dim * self.elem) as u64
    }
}

struct Funcs {
    embed: CudaFunction,
    add_rmsnorm: CudaFunction,
    silu_mul: CudaFunction,
    add_in_place: CudaFunction,
    cast_bf16: CudaFunction,
    cast_bf16_split: CudaFunction,
    select_rows: CudaFunction,
    gather_cols_reorder: CudaFunction,
    rope_bf16: CudaFunction,
    rope_f32: CudaFunction,
    attn_partial_bf16: CudaFunction,
    attn_partial_f32: CudaFunction,
    attn_combine: CudaFunction,
    attn_prefill_bf16: CudaFunction,
    attn_prefill_f32: CudaFunction,
    sample: CudaFunction,
    gemv: CudaFunction,
}

/// Facts about the card, for logs, doctor and bench.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub compute_capability: (i32, i32),
    pub sm_count: u32,
    pub arch: &'static str,
}

/// Page-locked host memory (copies from it are truly asynchronous and can be captured).
struct Pinned {
    _mem: cudarc::driver::PinnedHostSlice<u8>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the memory is only touched by the backend's thread, between stream synchronizations.
unsafe impl Send for Pinned {}

impl Pinned {
    fn new(ctx: &Arc<CudaContext>, len: usize, write_combined: bool) -> Result<Self, String> {
        let flags = if write_combined {
            cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED
        } else {
            0
        };
        // SAFETY: bytes; every byte is written before it is read.
        let mut mem = unsafe { ctx.alloc_pinned_with_flags::<u8>(len, flags) }
            .map_err(|e| format!("pinned host buffer of {len} bytes: {e}"))?;
        let ptr = mem.as_mut_ptr().map_err(|e| e.to_string())?;
        Ok(Pinned {
            _mem: mem,
            ptr,
            len,
        })
    }
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr/len describe the allocation this struct owns.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// The staging buffers: step data up, sampled results down (pinned on the host, a device
/// allocation of their own each, grown when a step needs more; growing drops the graphs, which
/// point into them). And a constrained step's sampling rows with their masks, sent after its
/// forward was launched (no graph points into those: they grow without dropping any).
#[derive(Default)]
struct Staging {
    up_host: Option<Pinned>,
    up_dev: Option<DevBuf>,
    down_host: Option<Pinned>,
    down_dev: Option<DevBuf>,
    mask_host: Option<Pinned>,
    mask_dev: Option<DevBuf>,
}

/// The current step's tables on the device (the staging buffer) and what they hold.
struct Staged {
    layout: StepLayout,
    base: u64,
    tokens: Vec<u32>,
    positions: Vec<u32>,
    logit_rows: Vec<usize>,
    /// Top log-probs slots per row in the output (at least 1).
    top: usize,
    /// A deferred step whose graph was launched: where it leaves the logits (address, columns).
    launched: Option<(u64, usize)>,
}

impl Staged {
    fn at(&self, off: usize) -> u64 {
        self.base + off as u64
    }
}

/// Device addresses of a step's attention tables.
struct Meta {
    rows: usize,
    positions: u64,
    slots: u64,
    row_table: u64,
    row_ctx: u64,
    tables: u64,
    /// Uploaded for this call only (ops called outside a staged step: the self-test).
    _own: Vec<DevBuf>,
}

/// A captured step: (rows bucket, logit rows bucket, top log-probs slots) -> graph.
type GraphKey = (usize, usize, usize);

/// A step whose every sequence runs at most this many new tokens is "small": decode, or a
/// structured output's forced tokens run as one chunk. Small steps use the split-context
/// decode attention kernel (a few rows per sequence: re-reading K/V per row costs little) and
/// may replay a graph; longer chunks (prompts) use the tiled prefill kernel, eagerly.
pub const SMALL_STEP_TOKENS: usize = 16;

/// Rows the gemv kernel takes (GEMV_MAX_ROWS in gemv.cu) and its warps per block (GEMV_WARPS).
const GEMV_MAX_ROWS: usize = 4;
const GEMV_WARPS: usize = 8;

/// Query rows per block of the tiled prefill kernel (FP_ROWS in attention.cu).
const PREFILL_ROWS: usize = 16;
/// The largest head_dim the tiled prefill kernel takes (FP_MAX_HD in attention.cu).
const PREFILL_MAX_HEAD_DIM: usize = 128;

/// Whether every sequence of `batch` runs at most [`SMALL_STEP_TOKENS`] new tokens.
pub fn small_step(batch: &AttnBatch) -> bool {
    batch.seqs.iter().all(|s| s.n_tokens <= SMALL_STEP_TOKENS)
}

struct Graph {
    exec: cudarc::driver::CudaGraph,
    /// Where a graph without sampling (a tensor-parallel follower's step) leaves its logits:
    /// (device address, columns).
    logits: Option<(u64, usize)>,
}
// SAFETY: launched only from the backend's thread.
unsafe impl Send for Graph {}

/// What the CUDA backends of this process asked of the driver, for bench and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepCounters {
    /// Kernels launched one by one (cuLaunchKernel), cuBLASLt products included.
    pub launches: u64,
    pub graph_launches: u64,
    pub graph_captures: u64,
    /// Buffers the arena could not serve (each one a device allocation).
    pub arena_misses: u64,
    pub steps: u64,
    /// Launches of one transformer layer, as last counted (from one layer's RoPE to the next).
    pub launches_per_layer: u64,
    /// With [`time_steps`] on: host time from a step's start to its synchronization, and the
    /// device's time for the step's work (CUDA events), summed over steps.
    pub host_ns: u64,
    pub device_ns: u64,
}

static COUNTERS: std::sync::Mutex<StepCounters> = std::sync::Mutex::new(StepCounters {
    launches: 0,
    graph_launches: 0,
    graph_captures: 0,
    arena_misses: 0,
    steps: 0,
    launches_per_layer: 0,
    host_ns: 0,
    device_ns: 0,
});
static TIME_STEPS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The counters of every CUDA backend of this process so far.
pub fn counters() -> StepCounters {
    COUNTERS.lock().map(|c| *c).unwrap_or_default()
}

/// Time every step from now on (bench): two CUDA events per backend, recorded each step.
pub fn time_steps(on: bool) {
    TIME_STEPS.store(on, std::sync::atomic::Ordering::Relaxed);
}

static PROFILE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static PROFILE_DATA: std::sync::Mutex<BTreeMap<String, KernelTime>> =
    std::sync::Mutex::new(BTreeMap::new());

/// One kind of kernel's share of the profiled steps (see [`profile_kernels`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelTime {
    pub calls: u64,
    /// Device time between the events recorded just before and just after each launch.
    pub ms: f64,
    /// Bytes a call must move at least (GEMMs: weights, input, output; 0 where not counted).
    pub bytes_per_call: u64,
}

/// Time every launch from now on (`herd bench --kernel-profile`): steps run eagerly (no graph
/// replay: a graph is one launch), each launch between two CUDA events; the totals per kernel
/// (GEMMs per shape) accumulate until [`take_kernel_profile`].
pub fn profile_kernels(on: bool) {
    PROFILE.store(on, std::sync::atomic::Ordering::Relaxed);
}

fn profiling() -> bool {
    PROFILE.load(std::sync::atomic::Ordering::Relaxed)
}

/// The per-kernel totals since the last call, and start afresh.
pub fn take_kernel_profile() -> BTreeMap<String, KernelTime> {
    PROFILE_DATA
        .lock()
        .map(|mut d| std::mem::take(&mut *d))
        .unwrap_or_default()
}

/// Event pairs around the launches since the last synchronization (profiling only).
#[derive(Default)]
struct LaunchTimer {
    /// Reused pairs (created once each): `pending` of them are in flight.
    events: Vec<(cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>,
    /// The label and bytes of each in-flight pair, in order.
    pending: Vec<(String, u64)>,
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    f: Funcs,
    gemm: RefCell<Gemm>,
    arena: Option<Arena>,
    staging: RefCell<Staging>,
    staged: RefCell<Option<Staged>>,
    /// Block size of the KV cache (set by alloc_kv; staging computes slots with it).
    block_size: Cell<usize>,
    inv_freq: RefCell<Option<(Vec<f32>, DevBuf)>>,
    graphs: RefCell<HashMap<GraphKey, Graph>>,
    /// Shapes that ran once eagerly (the next one of each is captured).
    warmed: RefCell<std::collections::HashSet<GraphKey>>,
    capturing: Cell<Option<GraphKey>>,
    /// Products of at most GEMV_MAX_ROWS rows go to herd's weight-streaming kernel instead of
    /// cuBLASLt (HERD_GEMV=1: an A/B for the bench; off by default until a GPU measured it).
    gemv: Cell<bool>,
    /// Steps of at most this many logit rows run as graphs (0: never; HERD_CUDA_GRAPHS=0).
    graph_rows: usize,
    /// ... and of at most this many token rows (padded): what the activation arena holds.
    graph_tokens: usize,
    /// Launches when layer 0's RoPE ran this step (launches per layer = at layer 1's minus it).
    layer0_launches: Cell<u64>,
    arena_warned: Cell<bool>,
    /// With time_steps: when this step began on the host, and its two events.
    step_t0: Cell<Option<std::time::Instant>>,
    step_events: RefCell<Option<(cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>>,
    /// With profile_kernels: the events around each launch of the step.
    timer: RefCell<LaunchTimer>,
    /// First asynchronous failure since the last `check` (sticky, like CUDA's own errors).
    err: RefCell<Option<String>>,
    /// Kernels launched since the stream last synchronized without error: a kernel fault
    /// surfaces at a later call, and is in one of these.
    launched: RefCell<Vec<&'static str>>,
    /// Fill every fresh output with NaN first (self-test: an unwritten element shows up).
    poison: bool,
    numerics: Numerics,
    /// The replica's NCCL communicator when tp > 1 (`None`: one GPU per replica).
    tp: Option<NcclComm>,
    pub info: DeviceInfo,
    /// Where the kernels' PTX came from (cache file) and whether it was a cache hit.
    pub kernel_cache: (std::path::PathBuf, bool),
}

fn be(e: impl std::fmt::Display) -> BackendError {
    BackendError::Unsupported(format!("CUDA: {e}"))
}

/// Is libcuda loadable? `CudaContext::new` panics without it, so ask first.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda by its candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Number of GPUs, or why there are none ("no GPU: ...").
pub fn device_count() -> Result<usize, String> {
    if !driver_present() {
        return Err("no GPU: the CUDA driver (libcuda.so) is not installed".into());
    }
    cudarc::driver::result::init().map_err(|e| format!("no GPU: cuInit failed: {e}"))?;
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err("no GPU: the CUDA driver sees no device".into()),
        Err(e) => Err(format!("no GPU: {e}")),
    }
}

fn grid_for(n: usize, sm: u32) -> LaunchConfig {
    // Grid-stride loops: a few waves of 256-thread blocks are enough to saturate bandwidth.
    let blocks = n.div_ceil(256).clamp(1, sm as usize * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Context splits of the decode attention kernel for `rows` query rows: enough (row, head,
/// split) blocks for ~2 per SM. A function of the row bucket only, so that an eager step and
/// the graph of its bucket split (and so round) exactly alike; the kernel leaves a split with no
/// positions empty, which the combine skips.
pub fn attn_splits(rows: usize, n_heads: usize, sm: u32) -> usize {
    let blocks = m_bucket(rows) * n_heads.max(1);
    (2 * sm as usize).div_ceil(blocks).clamp(1, 32)
}

/// Rows of a decode graph for a step of `n` rows: the next power of two.
pub fn graph_bucket(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

/// Launch a kernel with the given arguments (each a reference to a local), noting the result.
macro_rules! launch {
    ($self:expr, $f:expr, $name:expr, $cfg:expr; $($a:expr),* $(,)?) => {{
        let mut b = $self.stream.launch_builder($f);
        $( b.arg($a); )*
        // SAFETY: every kernel's parameter list matches these arguments (the emulated device
        // checks it against the PTX at load), and every pointer is a live device buffer.
        let timed = $self.time_launch_begin();
        let r = unsafe { b.launch($cfg) };
        $self.time_launch_end(timed, $name, 0);
        $self.launch_note(r, $name);
    }};
}

impl CudaBackend {
    /// Open GPU `ordinal`, compile (or load cached) kernels, create the cuBLASLt handle.
    pub fn new(ordinal: usize) -> Result<Self, BackendError> {
        let n = device_count().map_err(BackendError::Unsupported)?;
        if ordinal >= n {
            return Err(BackendError::Unsupported(format!(
                "GPU {ordinal} requested but only {n} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(be)?;
        // One stream, synchronized by hand: cudarc's per-buffer read/write events (two created
        // and destroyed per allocation) buy nothing here.
        // SAFETY: all work goes to `stream` (NCCL included); nothing is shared across streams.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own: graphs cannot be captured on the legacy default stream.
        let stream = ctx.new_stream().map_err(be)?;
        let cc = ctx.compute_capability().map_err(be)?;
        let arch = kernels::arch_for(cc.0, cc.1).ok_or_else(|| {
            BackendError::Unsupported(format!(
                "GPU compute capability {}.{} is older than 8.0 (Ampere): bf16 kernels need sm_80+",
                cc.0, cc.1
            ))
        })?;
        keep_pool_memory(&ctx);
        let (ptx, path, hit) = kernels::ptx_cached(arch).map_err(be)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(be)?;
        let load = |name: &str| module.load_function(name).map_err(be);
        let f = Funcs {
            embed: load("embed_gather")?,
            add_rmsnorm: load("add_rmsnorm")?,
            silu_mul: load("silu_mul")?,
            add_in_place: load("add_in_place")?,
            cast_bf16: load("cast_bf16")?,
            cast_bf16_split: load("cast_bf16_split")?,
            select_rows: load("select_rows")?,
            gather_cols_reorder: load("gather_cols_reorder")?,
            rope_bf16: load("rope_store_kv_bf16")?,
            rope_f32: load("rope_store_kv_f32")?,
            attn_partial_bf16: load("attn_partial_bf16")?,
            attn_partial_f32: load("attn_partial_f32")?,
            attn_combine: load("attn_combine")?,
            attn_prefill_bf16: load("attn_prefill_bf16")?,
            attn_prefill_f32: load("attn_prefill_f32")?,
            sample: load("sample_rows")?,
            gemv: load("gemv_bf16")?,
        };
        let (free, total) = ctx.mem_get_info().map_err(be)?;
        let sm = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(be)?;
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().map_err(be)?,
            total_bytes: total as u64,
            free_bytes: free as u64,
            compute_capability: cc,
            sm_count: sm.max(1) as u32,
            arch,
        };
        let gemm = Gemm::new(&stream).map_err(BackendError::Unsupported)?;
        let graphs_on = std::env::var("HERD_CUDA_GRAPHS").map_or(true, |v| v != "0");
        let gemv_on = std::env::var("HERD_GEMV").is_ok_and(|v| v == "1");
        Ok(CudaBackend {
            ctx,
            stream,
            f,
            gemm: RefCell::new(gemm),
            arena: None,
            staging: RefCell::new(Staging::default()),
            staged: RefCell::new(None),
            block_size: Cell::new(0),
            inv_freq: RefCell::new(None),
            graphs: RefCell::new(HashMap::new()),
            warmed: RefCell::new(Default::default()),
            capturing: Cell::new(None),
            graph_rows: if graphs_on { 256 } else { 0 },
            graph_tokens: 256,
            gemv: Cell::new(gemv_on),
            layer0_launches: Cell::new(0),
            arena_warned: Cell::new(false),
            step_t0: Cell::new(None),
            step_events: RefCell::new(None),
            timer: RefCell::new(LaunchTimer::default()),
            err: RefCell::new(None),
            launched: RefCell::new(Vec::new()),
            poison: false,
            numerics: Numerics::Bf16,
            tp: None,
            info,
            kernel_cache: (path, hit),
        })
    }

    /// Set aside the memory plan's activation bytes as the arena every step's buffers come
    /// from, and graphs for steps of up to `max_batch` logit rows (rounded up to a power of
    /// two, at most 256) and `max_rows` token rows (the plan's, padded rows included). Call
    /// once, after the plan and before loading.
    pub fn reserve_activations(
        &mut self,
        bytes: usize,
        max_batch: usize,
        max_rows: usize,
    ) -> Result<(), BackendError> {
        // The plan's figure includes the cuBLASLt workspace, which the GEMM holds itself.
        let bytes = bytes
            .saturating_sub(super::gemm::WORKSPACE_BYTES)
            .max(1 << 20);
        // SAFETY: bytes handed out by the arena are written by kernels before they are read.
        let mem = unsafe { self.stream.alloc::<u8>(bytes) }.map_err(|e| {
            BackendError::OutOfMemory(format!("activation arena of {bytes} bytes: {e}"))
        })?;
        let base = mem.device_ptr(&self.stream).0;
        self.arena = Some(Arena::new(mem, base, bytes));
        if self.graph_rows > 0 {
            self.graph_rows = graph_bucket(max_batch).min(256);
        }
        self.graph_tokens = max_rows;
        Ok(())
    }

    fn count(&self, f: impl FnOnce(&mut StepCounters)) {
        if let Ok(mut c) = COUNTERS.lock() {
            f(&mut c);
        }
    }

    /// A step begins (bench timing: its host clock and its first event).
    fn step_started(&self) {
        self.count(|c| c.steps += 1);
        if !TIME_STEPS.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut ev = self.step_events.borrow_mut();
        if ev.is_none() {
            let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
            if let (Ok(a), Ok(b)) = (self.ctx.new_event(timed), self.ctx.new_event(timed)) {
                *ev = Some((a, b));
            }
        }
        if let Some((a, _)) = ev.as_ref() {
            if a.record(&self.stream).is_ok() {
                self.step_t0.set(Some(std::time::Instant::now()));
            }
        }
    }

    /// Profiling: record the event before a launch; `Some(pair index)` when timed.
    fn time_launch_begin(&self) -> Option<usize> {
        if !profiling() || self.capturing.get().is_some() {
            return None;
        }
        let mut t = self.timer.borrow_mut();
        let i = t.pending.len();
        if i == t.events.len() {
            let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
            let pair = (
                self.ctx.new_event(timed).ok()?,
                self.ctx.new_event(timed).ok()?,
            );
            t.events.push(pair);
        }
        t.events[i].0.record(&self.stream).ok()?;
        Some(i)
    }

    /// Profiling: record the event after the launch begun at `i`.
    fn time_launch_end(&self, i: Option<usize>, label: impl Into<String>, bytes: u64) {
        let Some(i) = i else { return };
        let mut t = self.timer.borrow_mut();
        if t.events[i].1.record(&self.stream).is_ok() {
            t.pending.push((label.into(), bytes));
        }
    }

    /// Profiling: after a synchronization, add each timed launch to the totals.
    fn flush_launch_times(&self) {
        let mut t = self.timer.borrow_mut();
        if t.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut t.pending);
        let Ok(mut data) = PROFILE_DATA.lock() else {
            return;
        };
        for ((label, bytes), (a, b)) in pending.into_iter().zip(&t.events) {
            let ms = a.elapsed_ms(b).unwrap_or(f32::NAN) as f64;
            let e = data.entry(label).or_default();
            e.calls += 1;
            e.ms += ms;
            e.bytes_per_call = bytes;
        }
    }

    /// Wait for the stream; the first wait of a timed step adds its host and device times.
    fn sync(&self) -> Result<(), cudarc::driver::DriverError> {
        let Some(t0) = self.step_t0.take() else {
            let r = self.stream.synchronize();
            self.flush_launch_times();
            return r;
        };
        let host = t0.elapsed().as_nanos() as u64;
        let ev = self.step_events.borrow();
        let Some((a, b)) = ev.as_ref() else {
            return self.stream.synchronize();
        };
        b.record(&self.stream)?;
        self.stream.synchronize()?;
        self.flush_launch_times();
        let dev = (a.elapsed_ms(b)? as f64 * 1e6) as u64;
        self.count(|c| {
            c.host_ns += host;
            c.device_ns += dev;
        });
        Ok(())
    }

    /// Products of at most 4 rows on herd's gemv kernel instead of cuBLASLt (HERD_GEMV=1 sets
    /// it at start; the self-test checks both).
    pub fn set_gemv(&self, on: bool) {
        self.gemv.set(on);
    }

    /// Whether products of at most 4 rows run on herd's gemv kernel.
    pub fn gemv(&self) -> bool {
        self.gemv.get()
    }

    /// Choose the precision (before `alloc_kv`: the KV cache's dtype follows it).
    pub fn set_numerics(&mut self, n: Numerics) {
        self.numerics = n;
    }

    pub fn numerics(&self) -> Numerics {
        self.numerics
    }

    /// Use `comm` (this replica's NCCL communicator, built on this backend's stream) for
    /// `all_reduce_sum` and `all_gather_cols`. Not yet run on a GPU.
    pub fn set_tp_comm(&mut self, comm: NcclComm) {
        self.tp = Some(comm);
    }

    /// Build this replica's NCCL communicator over `host` (collective: every rank of the
    /// replica calls it) and use it; a replica of one needs none. Not yet run on a GPU.
    pub fn init_tp(&mut self, host: &dyn crate::parallel::HostComm) -> Result<(), BackendError> {
        if host.size() > 1 {
            let comm = NcclComm::new(&self.stream, host)?;
            self.set_tp_comm(comm);
            // NCCL allocated its buffers: the memory plan must see what is left.
            if let Ok((free, _)) = self.ctx.mem_get_info() {
                self.info.free_bytes = free as u64;
            }
        }
        Ok(())
    }

    /// `all` = `[world][rows][cols]` (an all-gather's output, `all.rows` = world × rows) as
    /// `[rows][world][cols]`: the `gather_cols_reorder` kernel, separate from NCCL so that the
    /// self-test can check it on one GPU (it passed on an H200).
    pub fn reorder_gathered(&self, all: &CudaAct, world: usize) -> Result<CudaAct, BackendError> {
        if world == 0 || !all.rows.is_multiple_of(world) {
            return Err(BackendError::Comm(format!(
                "{} gathered rows do not split into {world} ranks",
                all.rows
            )));
        }
        let (rows, cols) = (all.rows / world, all.cols);
        let out = self.act(rows, cols * world);
        if rows * cols == 0 {
            return Ok(out);
        }
        let (Some(src), Some(dst)) = (all.buf.as_ref(), out.buf.as_ref()) else {
            return Err(self.take_err());
        };
        let (r, c, w) = (rows as i32, cols as i32, world as i32);
        launch!(self, &self.f.gather_cols_reorder, "gather_cols_reorder",
            cfg((rows as u32, world as u32, 1), 256); &src.ptr, &dst.ptr, &r, &c, &w);
        Ok(out)
    }

    /// Ranks in this GPU's tensor-parallel group (1 without a communicator).
    pub fn tp_size(&self) -> usize {
        self.tp.as_ref().map_or(1, |c| c.size())
    }

    /// Poison every fresh output with NaN (the self-test sets this).
    pub fn set_poison(&mut self, on: bool) {
        self.poison = on;
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    fn note<T, E: std::fmt::Display>(&self, r: Result<T, E>, what: &str) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.fail(format!("{what}: {e}"));
                None
            }
        }
    }

    /// Keep the first failure (later ones are usually its consequences).
    fn fail(&self, msg: String) {
        let mut err = self.err.borrow_mut();
        if err.is_none() {
            *err = Some(msg);
        }
    }

    /// The noted failure as an error (for the fallible methods).
    fn take_err(&self) -> BackendError {
        let e = self.err.borrow_mut().take();
        BackendError::Unsupported(format!(
            "CUDA: {}",
            e.unwrap_or_else(|| "a device buffer is missing (no error was noted)".into())
        ))
    }

    /// A launch result: a refused launch is noted (a sticky error from an earlier kernel names
    /// that kernel's candidates); an accepted one is remembered until the next good
    /// synchronization (its own fault, if any, appears later).
    fn launch_note<T>(&self, r: Result<T, cudarc::driver::DriverError>, kernel: &'static str) {
        match r {
            Ok(_) => {
                self.count(|c| c.launches += 1);
                self.launched(kernel)
            }
            Err(e) => self.driver_failed(e, &format!("launching {kernel}")),
        }
    }

    fn launched(&self, kernel: &'static str) {
        let mut l = self.launched.borrow_mut();
        // Each kernel once, in the order of their latest launch.
        if l.last() != Some(&kernel) {
            l.retain(|&k| k != kernel);
            l.push(kernel);
        }
    }

    /// A driver call failed: out of memory means the memory plan was wrong; any other error
    /// (a sticky kernel fault: illegal address, launch failure) comes from a kernel launched
    /// since the last good synchronization, which the message names.
    fn driver_failed(&self, e: cudarc::driver::DriverError, what: &str) {
        use cudarc::driver::sys::CUresult;
        let msg = if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            format!(
                "{what}: out of memory; the memory plan under --gpu-memory-utilization \
                 underestimated the activations: lower it or --max-batch-tokens"
            )
        } else {
            let l = self.launched.borrow();
            if l.is_empty() {
                format!("{what}: {e}")
            } else {
                format!(
                    "{what}: {e}: a kernel launched since the last good synchronization failed, \
                     one of {} (the last launched: {}; with CUDA_LAUNCH_BLOCKING=1 the last \
                     launched is the one)",
                    l.join(", "),
                    l[l.len() - 1]
                )
            }
        };
        self.fail(msg);
    }

    /// A failed collective: when a kernel of this step faulted (NCCL then reports only an
    /// "unhandled cuda error"), the fault is the error, naming the kernels it can be in.
    fn comm_failed(&self, e: BackendError) -> BackendError {
        if self.err.borrow().is_none() {
            if let Err(de) = self.stream.synchronize() {
                self.driver_failed(de, "before a collective");
            }
        }
        if self.err.borrow().is_some() {
            return self.take_err();
        }
        e
    }

    /// A stream-ordered allocation of its own (persistent buffers, and what the arena cannot
    /// serve). `None` (noted) when the driver refuses.
    fn alloc_own(&self, bytes: usize, what: &str) -> Option<DevBuf> {
        let bytes = bytes.max(1);
        // SAFETY: callers only hand the buffer to kernels or copies that write it before
        // anything reads it.
        match unsafe { self.stream.alloc::<u8>(bytes) } {
            Ok(b) => {
                let p = b.device_ptr(&self.stream).0;
                Some(DevBuf::owned(b, p, bytes))
            }
            Err(e) => {
                self.driver_failed(e, &format!("allocating {bytes} bytes for {what}"));
                None
            }
        }
    }

    /// A step buffer of `bytes`, uninitialized (every kernel writes all of its output, so
    /// zeroing would only cost a pass of bandwidth; the self-test poisons outputs instead to
    /// prove it): from the arena, else an allocation of its own.
    fn alloc(&self, bytes: usize, what: &str) -> Option<DevBuf> {
        if let Some(a) = self.arena.as_ref() {
            if let Some(b) = a.take(bytes) {
                return Some(b);
            }
            self.count(|c| c.arena_misses += 1);
            if !self.arena_warned.replace(true) {
                let (used, _, cap) = a.usage();
                tracing::warn!(
                    bytes,
                    used,
                    cap,
                    what,
                    "the activation arena is full: allocating instead (the memory plan \
                     underestimated this step)"
                );
            }
        }
        self.alloc_own(bytes, what)
    }

    fn act(&self, rows: usize, cols: usize) -> CudaAct {
        let n = rows * cols;
        let buf = self.alloc(4 * n, "an activation");
        if self.poison {
            if let Some(b) = buf.as_ref() {
                // SAFETY: b holds at least n f32s.
                let r = unsafe {
                    cudarc::driver::sys::cuMemsetD32Async(
                        b.ptr,
                        0x7fc0_0000,
                        n.max(1),
                        self.stream.cu_stream(),
                    )
                    .result()
                };
                let _ = self.note(r, "poisoning an activation");
            }
        }
        CudaAct::new(rows, cols, buf)
    }

    /// A bf16 twin for a fresh output of `n` values that its kernel fills as well (bf16
    /// numerics only): `(address or 0 for none, the buffer)`.
    fn twin(&self, n: usize) -> (u64, Option<DevBuf>) {
        if self.numerics != Numerics::Bf16 || n == 0 {
            return (0, None);
        }
        let b = self.alloc(2 * n, "a bf16 GEMM input");
        (b.as_ref().map_or(0, |b| b.ptr), b)
    }

    /// Host data into `dst` (pageable: outside graphs only; steps go through the staging
    /// buffer).
    fn copy_up<T: cudarc::driver::DeviceRepr>(&self, dst: &DevBuf, data: &[T], what: &str) -> bool {
        // SAFETY: dst holds at least size_of_val(data) bytes; a pageable source is copied
        // before the call returns.
        let r = unsafe {
            cudarc::driver::result::memcpy_htod_async(dst.ptr, data, self.stream.cu_stream())
        };
        match r {
            Ok(()) => true,
            Err(e) => {
                let bytes = std::mem::size_of_val(data);
                self.driver_failed(e, &format!("uploading {bytes} bytes of {what}"));
                false
            }
        }
    }

    /// Upload host data as a step buffer; `None` (noted) when the driver refuses.
    fn upload<T: cudarc::driver::DeviceRepr>(&self, data: &[T], what: &str) -> Option<DevBuf> {
        let b = self.alloc(std::mem::size_of_val(data), what)?;
        self.copy_up(&b, data, what).then_some(b)
    }

    /// An f32 host slice as a device activation (tests, self-test).
    pub fn act_from_host(&self, rows: usize, cols: usize, data: &[f32]) -> CudaAct {
        assert_eq!(data.len(), rows * cols);
        CudaAct::new(rows, cols, self.upload(data, "an activation"))
    }

    /// Make sure the staging buffers hold `up` and `down` bytes. Growing moves them, so the
    /// graphs (which point into them) are dropped and captured again.
    fn staging_room(&self, up: usize, down: usize) -> Result<(), BackendError> {
        let mut st = self.staging.borrow_mut();
        let has = |p: &Option<Pinned>, want: usize| p.as_ref().is_some_and(|p| p.len >= want);
        if has(&st.up_host, up) && has(&st.down_host, down) {
            return Ok(());
        }
        self.graphs.borrow_mut().clear();
        let st = &mut *st;
        self.grow_pinned_pair(
            (&mut st.up_host, &mut st.up_dev),
            up,
            64 << 10,
            true,
            "the step staging buffer",
        )?;
        self.grow_pinned_pair(
            (&mut st.down_host, &mut st.down_dev),
            down,
            16 << 10,
            false,
            "the sampled-token buffer",
        )
    }

    /// A pinned host buffer and its device twin holding at least `bytes` (else both replaced by
    /// a power of two of at least `min`: rarely). Write-combined for host-to-device only.
    fn grow_pinned_pair(
        &self,
        (host, dev): (&mut Option<Pinned>, &mut Option<DevBuf>),
        bytes: usize,
        min: usize,
        write_combined: bool,
        what: &str,
    ) -> Result<(), BackendError> {
        if host.as_ref().is_some_and(|p| p.len >= bytes) {
            return Ok(());
        }
        let want = bytes.next_power_of_two().max(min);
        *host = None;
        *dev = None;
        *host = Some(Pinned::new(&self.ctx, want, write_combined).map_err(be)?);
        *dev = Some(self.alloc_own(want, what).ok_or_else(|| self.take_err())?);
        Ok(())
    }

    /// Send `bytes` of the pinned `host` buffer to `dev`, on the stream (one copy). The host
    /// buffer must not be written again before the stream's next synchronization.
    fn upload_pinned(
        &self,
        host: &Pinned,
        dev: &DevBuf,
        bytes: usize,
        what: &str,
    ) -> Result<(), BackendError> {
        // SAFETY: a pinned source of at least `bytes` (the callers packed that many into it)
        // and a device buffer at least as large (grown together by grow_pinned_pair).
        unsafe {
            cudarc::driver::sys::cuMemcpyHtoDAsync_v2(
                dev.ptr,
                host.ptr as *const std::ffi::c_void,
                bytes,
                self.stream.cu_stream(),
            )
            .result()
        }
        .map_err(|e| {
            self.driver_failed(e, what);
            self.take_err()
        })
    }

    /// Pack the step into the pinned buffer and send it with one copy.
    fn stage(&self, d: &StepData<'_>, top: usize) -> Result<(), BackendError> {
        *self.staged.borrow_mut() = None;
        let layout = d.layout();
        let out = OutLayout {
            rows: layout.logit_rows,
            top,
        };
        self.staging_room(layout.end, out.end())?;
        let mut st = self.staging.borrow_mut();
        let st = &mut *st;
        let (Some(host), Some(dev)) = (st.up_host.as_mut(), st.up_dev.as_ref()) else {
            return Err(be("the staging buffer is missing"));
        };
        d.pack(&layout, host.bytes());
        // The host buffer is not written again before the next step's synchronization.
        self.upload_pinned(host, dev, layout.end, "uploading the step")?;
        *self.staged.borrow_mut() = Some(Staged {
            layout,
            base: dev.ptr,
            tokens: d.tokens.to_vec(),
            positions: d.batch.positions.clone(),
            logit_rows: d.logit_rows.to_vec(),
            top,
            launched: None,
        });
        Ok(())
    }

    /// A small step (see [`small_step`]) may replay a graph: logits at each sequence's last row,
    /// at most `graph_rows` rows, and either every logit row sampled on the device, or (a
    /// tensor-parallel follower, which only takes part in the collectives) no sampling at all.
    /// Rows and logit rows are padded to their buckets; the staged tables say which row is
    /// whose. The NCCL calls are captured with the rest; every rank captures and replays at the
    /// same steps (the key and the warm-up depend on the step's shape), so the collectives stay
    /// in order. A deferred step (sampled after its graph, with masks) and a follower's have the
    /// graph that ends at the logits: top log-probs slots 0 in the key.
    fn graph_key(
        &self,
        batch: &AttnBatch,
        logit_rows: &[usize],
        sampling: Option<&[RowSampling]>,
        deferred: bool,
    ) -> Option<GraphKey> {
        let n = batch.n_tokens();
        let last_rows = batch.seqs.iter().map(|s| s.token_start + s.n_tokens - 1);
        let small = n > 0
            && small_step(batch)
            && batch.seqs.iter().all(|s| s.n_tokens > 0)
            && logit_rows.iter().copied().eq(last_rows);
        let top = match sampling {
            Some(rows)
                if rows.len() == logit_rows.len()
                    && rows.iter().all(|r| r.top_logprobs <= MAX_TOP_LOGPROBS) =>
            {
                if deferred {
                    0
                } else {
                    top_slots(rows)
                }
            }
            None if self.tp_size() > 1 => 0,
            _ => return None,
        };
        let bucket = graph_bucket(n);
        // Profiling times launches one by one: a replayed graph would be one launch.
        let logit_bucket = graph_bucket(logit_rows.len());
        (small
            && bucket <= self.graph_tokens
            && logit_bucket <= self.graph_rows
            && self.err.borrow().is_none()
            && !profiling())
        .then_some((bucket, logit_bucket, top))
    }

    /// Stage a step and, for a decode step whose graph exists, run it (one launch). A deferred
    /// step's graph ends at the logits: `Ok(None)`, they stay on the device for
    /// `sample_deferred`.
    fn begin(
        &self,
        tokens: &[u32],
        batch: &AttnBatch,
        logit_rows: &[usize],
        sampling: Option<&[RowSampling]>,
        deferred: bool,
    ) -> Option<Result<Option<Replayed>, BackendError>> {
        self.abandon_capture();
        self.step_started();
        let bs = self.block_size.get();
        if bs == 0 || tokens.len() != batch.n_tokens() {
            // No KV cache yet, or a malformed step: the ops report it (or run unstaged).
            return None;
        }
        let key = self.graph_key(batch, logit_rows, sampling, deferred);
        let (pad, pad_logits) = key.map_or((0, 0), |(b, l, _)| (b, l));
        let top = sampling.map_or(1, top_slots);
        let d = StepData {
            tokens,
            batch,
            logit_rows,
            sampling,
            block_size: bs,
            pad_rows: pad,
            pad_logit_rows: pad_logits,
        };
        if let Err(e) = self.stage(&d, top) {
            return Some(Err(e));
        }
        let key = key?;
        if let Some(g) = self.graphs.borrow().get(&key) {
            if let Err(e) = g.exec.launch() {
                self.driver_failed(e, "launching the decode graph");
                return Some(Err(self.take_err()));
            }
            self.count(|c| c.graph_launches += 1);
            self.launched("the decode graph");
            let r = match (sampling, g.logits) {
                (Some(_), Some(at)) if deferred => {
                    if let Some(s) = self.staged.borrow_mut().as_mut() {
                        s.launched = Some(at);
                    }
                    return Some(Ok(None));
                }
                (Some(_), None) if deferred => Err(be("a deferred decode graph without logits")),
                (Some(rows), _) => self.fetch_sampled(rows).map(Replayed::Sampled),
                (None, Some((ptr, cols))) => {
                    let n = logit_rows.len();
                    self.logits_to_host(ptr, n * cols).map(Replayed::Logits)
                }
                (None, None) => Err(be("a decode graph without logits")),
            };
            return Some(r.map(Some));
        }
        // A step that brings a row bucket or a logit-row bucket not seen before runs eagerly: it
        // sets up what a graph then only uses (the RoPE table in the very first step, the
        // cuBLASLt plans of its GEMM shapes: layers at the row bucket, the logits at the
        // logit-row one). A new shape whose two buckets were both seen is captured at once
        // (a structured batch's forced chunks and finishing sequences bring many shapes);
        // otherwise its second step is.
        let mut warmed = self.warmed.borrow_mut();
        let plans_ready =
            warmed.iter().any(|k| k.0 == key.0) && warmed.iter().any(|k| k.1 == key.1);
        let first = warmed.insert(key);
        drop(warmed);
        if first && !plans_ready {
            return None;
        }
        // Capture this step: the forward pass's work is recorded, not run, until sample().
        match self
            .stream
            .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL)
        {
            Ok(()) => self.capturing.set(Some(key)),
            Err(e) => tracing::debug!("not capturing the decode step: {e}"),
        }
        None
    }

    /// End a capture the forward pass did not finish (an error on the way): discard it.
    fn abandon_capture(&self) {
        if self.capturing.take().is_some() {
            let r = self
                .stream
                .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
            if let Err(e) = r {
                tracing::debug!("discarding an unfinished capture: {e}");
            }
        }
    }

    /// Finish the capture begun by `begin` (the sampling kernel was its last work), keep the
    /// graph and run it.
    fn finish_capture(
        &self,
        key: GraphKey,
        logits: Option<(u64, usize)>,
    ) -> Result<(), BackendError> {
        self.capturing.set(None);
        let g = self
            .stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        let g = match g {
            Ok(Some(g)) => g,
            Ok(None) => return Err(be("capturing the decode step gave no graph")),
            Err(e) => {
                self.driver_failed(e, "capturing the decode step");
                return Err(self.take_err());
            }
        };
        if self.err.borrow().is_some() {
            return Err(self.take_err());
        }
        g.launch().map_err(|e| {
            self.driver_failed(e, "launching the decode graph");
            self.take_err()
        })?;
        self.count(|c| {
            c.graph_launches += 1;
            c.graph_captures += 1;
        });
        self.graphs
            .borrow_mut()
            .insert(key, Graph { exec: g, logits });
        Ok(())
    }

    /// `n` f32 at `ptr` to the host: one copy, one synchronization (a failure is noted too).
    fn logits_to_host(&self, ptr: u64, n: usize) -> Result<Vec<f32>, BackendError> {
        let mut v = vec![0f32; n];
        // SAFETY: ptr holds at least n f32s; the copy completes at the synchronization below.
        let r = unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut v, ptr, self.stream.cu_stream())
        };
        match r.and_then(|()| self.sync()) {
            Ok(()) => {
                self.launched.borrow_mut().clear();
                Ok(v)
            }
            Err(e) => {
                self.driver_failed(e, "copying to the host");
                Err(be(self.err.borrow().clone().unwrap_or_default()))
            }
        }
    }

    /// The sampled rows of the staged step: one copy down, one synchronization.
    fn fetch_sampled(&self, rows: &[RowSampling]) -> Result<Vec<Sampled>, BackendError> {
        let (lrows, top) = match self.staged.borrow().as_ref() {
            Some(s) => (s.layout.logit_rows, s.top),
            None => return Err(be("no staged step to fetch")),
        };
        let out = OutLayout { rows: lrows, top };
        let mut st = self.staging.borrow_mut();
        let st = &mut *st;
        let (Some(host), Some(dev)) = (st.down_host.as_mut(), st.down_dev.as_ref()) else {
            return Err(be("the sampled-token buffer is missing"));
        };
        // SAFETY: both buffers hold out.end() bytes (staging_room); the host reads after the
        // stream synchronization below.
        let r = unsafe {
            cudarc::driver::sys::cuMemcpyDtoHAsync_v2(
                host.ptr as *mut std::ffi::c_void,
                dev.ptr,
                out.end(),
                self.stream.cu_stream(),
            )
            .result()
        };
        if let Err(e) = r.and_then(|()| self.sync()) {
            self.driver_failed(e, "copying the sampled tokens");
            return Err(self.take_err());
        }
        self.launched.borrow_mut().clear();
        let b = host.bytes();
        let u32_at = |at: usize, i: usize| {
            u32::from_le_bytes([
                b[at + 4 * i],
                b[at + 4 * i + 1],
                b[at + 4 * i + 2],
                b[at + 4 * i + 3],
            ])
        };
        let f32_at = |at: usize, i: usize| f32::from_bits(u32_at(at, i));
        Ok(rows
            .iter()
            .enumerate()
            .map(|(i, r)| Sampled {
                token: u32_at(out.token(), i),
                logprob: f32_at(out.logprob(), i),
                top: (0..r.top_logprobs)
                    .map(|t| {
                        (
                            u32_at(out.top_id(), i * top + t),
                            f32_at(out.top_lp(), i * top + t),
                        )
                    })
                    .collect(),
            })
            .collect())
    }

    /// The step's attention tables: the staged ones when `batch` is the staged step, else
    /// uploaded for this call (ops driven one by one: the self-test).
    fn meta(&self, batch: &AttnBatch, rows: usize, block_size: usize) -> Option<Meta> {
        if let Some(s) = self
            .staged
            .borrow()
            .as_ref()
            .filter(|s| s.positions == batch.positions && s.layout.rows == rows)
        {
            let l = &s.layout;
            return Some(Meta {
                rows: l.rows,
                positions: s.at(l.positions),
                slots: s.at(l.slots),
                row_table: s.at(l.row_table),
                row_ctx: s.at(l.row_ctx),
                tables: s.at(l.tables),
                _own: Vec::new(),
            });
        }
        let d = StepData {
            tokens: &vec![0; batch.n_tokens()],
            batch,
            logit_rows: &[],
            sampling: None,
            block_size,
            pad_rows: 0,
            pad_logit_rows: 0,
        };
        let l = d.layout();
        let mut host = vec![0u8; l.end];
        d.pack(&l, &mut host);
        let buf = self.upload(&host, "attention tables")?;
        Some(Meta {
            rows: l.rows,
            positions: buf.ptr + l.positions as u64,
            slots: buf.ptr + l.slots as u64,
            row_table: buf.ptr + l.row_table as u64,
            row_ctx: buf.ptr + l.row_ctx as u64,
            tables: buf.ptr + l.tables as u64,
            _own: vec![buf],
        })
    }

    /// The RoPE frequency table on the device (uploaded once; a buffer of its own).
    fn inv_freq_dev(&self, inv_freq: &[f32]) -> Option<u64> {
        let mut c = self.inv_freq.borrow_mut();
        if c.as_ref()
            .map(|(h, _)| h.as_slice() != inv_freq)
            .unwrap_or(true)
        {
            *c = None;
            let b = self.alloc_own(std::mem::size_of_val(inv_freq), "RoPE frequencies")?;
            if !self.copy_up(&b, inv_freq, "RoPE frequencies") {
                return None;
            }
            *c = Some((inv_freq.to_vec(), b));
        }
        c.as_ref().map(|(_, d)| d.ptr)
    }

    /// `out = a · Wᵀ` (`accumulate`: `out += a · Wᵀ`) for `m` bf16 rows `a`, one cuBLASLt call
    /// (or, with [`Self::set_gemv`] and at most GEMV_MAX_ROWS rows, herd's gemv kernel).
    fn gemm_bf16(&self, a: u64, w: &CudaMatrix, out: u64, m: usize, accumulate: bool) {
        let (n, k) = (w.rows, w.cols);
        // At least: the weights and the bf16 input once, the f32 output written (and read when
        // accumulating) — the profile's bytes.
        let bytes = (2 * n * k + 2 * m * k + if accumulate { 8 } else { 4 } * m * n) as u64;
        let label = |kind: &str| {
            format!(
                "{kind} m={m} n={n} k={k}{}",
                if accumulate { " +=" } else { "" }
            )
        };
        if self.gemv.get()
            && m <= GEMV_MAX_ROWS
            && k.is_multiple_of(4)
            && a.is_multiple_of(8)
            && w.ptr.is_multiple_of(8)
        {
            let (mi, ni, ki, acc) = (m as i32, n as i32, k as i32, accumulate as i32);
            let timed = self.time_launch_begin();
            let mut b = self.stream.launch_builder(&self.f.gemv);
            b.arg(&a)
                .arg(&w.ptr)
                .arg(&out)
                .arg(&mi)
                .arg(&ni)
                .arg(&ki)
                .arg(&acc);
            // SAFETY: gemv_bf16(x, w, out, m, n, k, accumulate) with live device buffers of
            // m*k bf16, n*k bf16 and m*n f32 (the emulated device checks the parameter list).
            let r = unsafe {
                b.launch(cfg(
                    (n.div_ceil(GEMV_WARPS) as u32, 1, 1),
                    32 * GEMV_WARPS as u32,
                ))
            };
            if timed.is_some() {
                self.time_launch_end(timed, label("gemv"), bytes);
            }
            return self.launch_note(r, "gemv_bf16");
        }
        let timed = self.time_launch_begin();
        let r = self.gemm.borrow_mut().bf16_f32(
            &self.stream,
            a,
            w.ptr,
            out,
            m,
            w.rows,
            w.cols,
            accumulate,
        );
        if timed.is_some() {
            self.time_launch_end(timed, label("gemm"), bytes);
        }
        match r {
            Ok(()) => {
                self.count(|c| c.launches += 1);
                self.launched("cublasLtMatmul");
            }
            // cuBLASLt only says "execution failed" when an earlier kernel faulted: the
            // stream's sticky error names the kernels it can be in.
            Err(e) => match self.stream.synchronize() {
                Err(de) => self.driver_failed(de, "matmul"),
                Ok(()) => self.fail(format!("matmul: {e}")),
            },
        }
    }

    /// `x` cast to bf16 (the GEMM's operand): `[m, k]`, or `[2m, k]` (hi rows then lo rows)
    /// when `split`.
    fn to_bf16(&self, x: &CudaAct, split: bool) -> Option<u64> {
        if let Some(b) = x.b16.borrow().as_ref() {
            return Some(b.ptr);
        }
        let n = x.rows * x.cols;
        let xb = x.buf.as_ref()?;
        let out = self.alloc(if split { 4 * n } else { 2 * n }, "a bf16 GEMM input")?;
        let n64 = n as u64;
        let (f, name) = if split {
            (&self.f.cast_bf16_split, "cast_bf16_split")
        } else {
            (&self.f.cast_bf16, "cast_bf16")
        };
        launch!(self, f, name, grid_for(n, self.info.sm_count); &xb.ptr, &out.ptr, &n64);
        let p = out.ptr;
        *x.b16.borrow_mut() = Some(out);
        Some(p)
    }

    /// Attention with the tiled prefill kernel (`flash`) or the split-context decode kernel
    /// (the self-test compares the two).
    pub fn attention_with(
        &self,
        q: &CudaAct,
        kv: &CudaKv,
        layer: usize,
        n_heads: usize,
        batch: &AttnBatch,
        flash: bool,
    ) -> CudaAct {
        let s = kv.shape;
        let hd = s.head_dim;
        let out = self.act(q.rows, n_heads * hd);
        if q.rows == 0 {
            return out;
        }
        let (Some(qb), Some(ob)) = (q.buf.as_ref(), out.buf.as_ref()) else {
            return out;
        };
        let Some(m) = self.meta(batch, q.rows, s.block_size) else {
            return out;
        };
        let scale = 1.0 / (hd as f32).sqrt();
        let (nh, nkv, hdi, bs) = (
            n_heads as i32,
            s.n_kv_heads as i32,
            hd as i32,
            s.block_size as i32,
        );
        // Floats per row of q: the query heads come first, k and v may follow (fused qkv).
        let q_stride = q.cols as i32;
        let at = kv.layer_at(layer);
        let (kc, vc) = (kv.k + at, kv.v + at);
        if flash {
            let (f, name) = match self.numerics {
                Numerics::Bf16 => (&self.f.attn_prefill_bf16, "attn_prefill_bf16"),
                Numerics::Accurate => (&self.f.attn_prefill_f32, "attn_prefill_f32"),
            };
            let (t16, twin) = self.twin(q.rows * n_heads * hd);
            let rows = q.rows as i32;
            let tiles = q.rows.div_ceil(PREFILL_ROWS) as u32;
            launch!(self, f, name, cfg((tiles, n_heads as u32, 1), 128);
                &kc, &vc, &qb.ptr, &q_stride, &m.row_ctx, &m.row_table, &m.tables, &ob.ptr, &t16,
                &rows, &nh, &nkv, &hdi, &bs, &scale);
            *out.b16.borrow_mut() = twin;
            return out;
        }
        let blocks = q.rows * n_heads;
        let splits = attn_splits(q.rows, n_heads, self.info.sm_count);
        let (Some(acc), Some(ml)) = (
            self.alloc(4 * blocks * splits * hd, "attention partials"),
            self.alloc(4 * blocks * splits * 2, "attention partial maxima"),
        ) else {
            return out;
        };
        let (f, name) = match self.numerics {
            Numerics::Bf16 => (&self.f.attn_partial_bf16, "attn_partial_bf16"),
            Numerics::Accurate => (&self.f.attn_partial_f32, "attn_partial_f32"),
        };
        let (t16, twin) = self.twin(q.rows * n_heads * hd);
        // One split (enough rows to fill the card): the kernel writes the result itself.
        launch!(self, f, name, cfg((q.rows as u32, n_heads as u32, splits as u32), 128);
            &kc, &vc, &qb.ptr, &q_stride, &m.row_ctx, &m.row_table, &m.tables, &acc.ptr, &ml.ptr,
            &ob.ptr, &t16, &nh, &nkv, &hdi, &bs, &scale);
        if splits > 1 {
            let sp = splits as i32;
            launch!(self, &self.f.attn_combine, "attn_combine",
                cfg((blocks as u32, 1, 1), hd.min(256) as u32); &acc.ptr, &ml.ptr, &ob.ptr, &t16, &sp, &hdi);
        }
        *out.b16.borrow_mut() = twin;
        out
    }

    /// Device-to-device copy bandwidth (GB/s, bytes read + written) and bf16 GEMM rate
    /// (TFLOP/s), measured now with events: the limits bench compares against.
    pub fn measure_limits(&self) -> Result<(f64, f64), BackendError> {
        let n = 1usize << 30; // 1 GiB each way: far larger than L2
        let src = self.stream.alloc_zeros::<u8>(n).map_err(be)?;
        let mut dst = self.stream.alloc_zeros::<u8>(n).map_err(be)?;
        let time = |f: &mut dyn FnMut() -> Result<(), BackendError>| -> Result<f64, BackendError> {
            f()?; // warm-up
            let mut best = f64::MAX;
            for _ in 0..5 {
                // Default flags: cudarc's `None` means CU_EVENT_DISABLE_TIMING.
                let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
                let a = self.ctx.new_event(timed).map_err(be)?;
                let b = self.ctx.new_event(timed).map_err(be)?;
                a.record(&self.stream).map_err(be)?;
                f()?;
                b.record(&self.stream).map_err(be)?;
                b.synchronize().map_err(be)?;
                best = best.min(a.elapsed_ms(&b).map_err(be)? as f64 / 1e3);
            }
            Ok(best)
        };
        let secs = time(&mut || self.stream.memcpy_dtod(&src, &mut dst).map_err(be))?;
        let bw = 2.0 * n as f64 / secs / 1e9;
        drop((src, dst));
        let s = 8192usize;
        // Random-ish non-zero operands: a GEMM on zeros runs faster than on real data.
        let host: Vec<u16> = (0..s * s)
            .map(|i| {
                half::bf16::from_f32(((i * 2654435761usize) % 1000) as f32 * 1e-3 - 0.5).to_bits()
            })
            .collect();
        let x = self.stream.clone_htod(&host).map_err(be)?;
        let w = self.stream.clone_htod(&host).map_err(be)?;
        let d = self.stream.alloc_zeros::<f32>(s * s).map_err(be)?;
        let (xp, wp, dp) = (
            x.device_ptr(&self.stream).0,
            w.device_ptr(&self.stream).0,
            d.device_ptr(&self.stream).0,
        );
        let secs = time(&mut || {
            self.gemm
                .borrow_mut()
                .bf16_f32(&self.stream, xp, wp, dp, s, s, s, false)
                .map_err(BackendError::Unsupported)
        })?;
        Ok((bw, 2.0 * (s * s * s) as f64 / secs / 1e12))
    }
}

/// Top log-prob slots per row a step's output holds (at least 1: the kernel's layout).
fn top_slots(rows: &[RowSampling]) -> usize {
    rows.iter()
        .map(|r| r.top_logprobs)
        .max()
        .unwrap_or(0)
        .max(1)
}

/// Keep freed pool memory instead of returning it to the OS after every synchronization (the
/// default release threshold is 0): allocations outside the arena then cost no remapping.
fn keep_pool_memory(ctx: &Arc<CudaContext>) {
    use cudarc::driver::sys;
    let pools = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED);
    if pools.unwrap_or(0) == 0 {
        return;
    }
    // SAFETY: the device is the context's; the attribute takes a u64 (cuuint64_t).
    unsafe {
        let mut pool = std::ptr::null_mut();
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS
        {
            let mut keep = u64::MAX;
            let r = sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep) as *mut u64 as *mut std::ffi::c_void,
            );
            if r != sys::CUresult::CUDA_SUCCESS {
                tracing::debug!("cuMemPoolSetAttribute(RELEASE_THRESHOLD): {r:?}");
            }
        }
    }
}

impl Backend for CudaBackend {
    type Act = CudaAct;
    type Matrix = CudaMatrix;
    type Vector = CudaSlice<f32>;
    type Kv = CudaKv;

    fn name(&self) -> String {
        format!(
            "cuda:{} ({}, sm_{}{}){}",
            self.info.ordinal,
            self.info.name,
            self.info.compute_capability.0,
            self.info.compute_capability.1,
            if self.gemv.get() { " gemv" } else { "" }
        )
    }

    fn load_matrix(&self, t: &Tensor) -> Result<CudaMatrix, BackendError> {
        if t.shape.len() != 2 {
            return Err(BackendError::Unsupported(format!(
                "expected a 2-D weight, got shape {:?}",
                t.shape
            )));
        }
        // bf16 goes up straight from the (mapped) checkpoint slice; other dtypes are rounded to
        // bf16 on the host first.
        let buf = match t.dtype {
            DType::BF16 => self.stream.clone_htod(t.bytes.as_slice()),
            DType::F16 | DType::F32 => {
                let b: Vec<u8> = (0..t.numel())
                    .flat_map(|i| half::bf16::from_f32(t.get_f32(i)).to_bits().to_le_bytes())
                    .collect();
                self.stream.clone_htod(&b)
            }
        }
        .map_err(|e| BackendError::OutOfMemory(format!("uploading a {:?} weight: {e}", t.shape)))?;
        let ptr = buf.device_ptr(&self.stream).0;
        Ok(CudaMatrix {
            rows: t.shape[0],
            cols: t.shape[1],
            _buf: buf,
            ptr,
        })
    }

    fn load_vector(&self, t: &Tensor) -> Result<CudaSlice<f32>, BackendError> {
        self.stream
            .clone_htod(&t.to_f32_vec())
            .map_err(|e| BackendError::OutOfMemory(e.to_string()))
    }

    fn alloc_kv(&self, shape: KvShape) -> Result<CudaKv, BackendError> {
        // The prefill kernel keeps a tile of 32 keys, values and 16 queries in 48 KB of shared
        // memory: head_dim 128 at most (every Llama 3 has 64 or 128).
        if shape.head_dim > PREFILL_MAX_HEAD_DIM
            || !shape.head_dim.is_multiple_of(2)
            || shape.head_dim == 0
        {
            return Err(BackendError::Unsupported(format!(
                "the CUDA kernels need an even head_dim of at most {PREFILL_MAX_HEAD_DIM}, got {}",
                shape.head_dim
            )));
        }
        let elem = self.numerics.kv_elem_bytes();
        let bytes = shape.n_layers
            * shape.num_blocks
            * shape.block_size
            * shape.n_kv_heads
            * shape.head_dim
            * elem;
        let oom = |e: cudarc::driver::DriverError| {
            BackendError::OutOfMemory(format!("KV cache of {} bytes: {e}", 2 * bytes))
        };
        let k = self.stream.alloc_zeros::<u8>(bytes.max(1)).map_err(oom)?;
        let v = self.stream.alloc_zeros::<u8>(bytes.max(1)).map_err(oom)?;
        let (kp, vp) = (k.device_ptr(&self.stream).0, v.device_ptr(&self.stream).0);
        self.block_size.set(shape.block_size);
        Ok(CudaKv {
            shape,
            _k: k,
            _v: v,
            k: kp,
            v: vp,
            elem,
        })
    }

    fn begin_step(
        &self,
        tokens: &[u32],
        batch: &AttnBatch,
        logit_rows: &[usize],
        sampling: Option<&[RowSampling]>,
    ) -> Option<Result<Replayed, BackendError>> {
        let r = self.begin(tokens, batch, logit_rows, sampling, false)?;
        Some(r.and_then(|r| r.ok_or_else(|| be("a step not deferred was left unsampled"))))
    }

    fn begin_step_deferred(
        &self,
        tokens: &[u32],
        batch: &AttnBatch,
        logit_rows: &[usize],
        sampling: &[RowSampling],
    ) -> Option<Result<(), BackendError>> {
        let r = self.begin(tokens, batch, logit_rows, Some(sampling), true)?;
        Some(r.and_then(|r| match r {
            None => Ok(()),
            Some(_) => Err(be("a deferred step was sampled before its masks")),
        }))
    }

    /// A deferred step being captured ends here, before its sampling: the graph runs now.
    fn logits_ready(&self, logits: &CudaAct) -> Result<(), BackendError> {
        let Some(key) = self.capturing.get() else {
            return Ok(());
        };
        let Some(lb) = logits.buf.as_ref() else {
            self.abandon_capture();
            return Err(self.take_err());
        };
        self.finish_capture(key, Some((lb.ptr, logits.cols)))
    }

    fn sample_deferred(
        &self,
        logits: Option<&CudaAct>,
        rows: &[RowSampling],
    ) -> Option<Result<Vec<Sampled>, BackendError>> {
        // More alternatives than the kernel's passes are worth: sample on the host instead
        // (such a step runs eagerly: no graph is keyed for it).
        if rows.iter().any(|r| r.top_logprobs > MAX_TOP_LOGPROBS) && logits.is_some() {
            return None;
        }
        Some(self.sample_masked(logits, rows))
    }

    fn embed(&self, table: &CudaMatrix, tokens: &[u32]) -> CudaAct {
        let staged = self.staged.borrow();
        let staged = staged.as_ref().filter(|s| s.tokens == tokens);
        let rows = staged.map_or(tokens.len(), |s| s.layout.rows);
        let out = self.act(rows, table.cols);
        if rows == 0 {
            return out;
        }
        let own;
        let tok = match staged {
            Some(s) => s.at(s.layout.tokens),
            None => {
                own = self.upload(tokens, "token ids");
                match own.as_ref() {
                    Some(b) => b.ptr,
                    None => return out,
                }
            }
        };
        let Some(ob) = out.buf.as_ref() else {
            return out;
        };
        let dim = table.cols as i32;
        launch!(self, &self.f.embed, "embed_gather", cfg((rows as u32, 1, 1), 256);
            &table.ptr, &tok, &ob.ptr, &dim);
        out
    }

    fn rmsnorm(&self, x: &CudaAct, w: &CudaSlice<f32>, eps: f32) -> CudaAct {
        let out = self.act(x.rows, x.cols);
        // add_rmsnorm with y = null writes x only when y is given: x is read-only here.
        let null: u64 = 0;
        let cols = x.cols as i32;
        if x.rows == 0 {
            return out;
        }
        let (Some(xb), Some(ob)) = (x.buf.as_ref(), out.buf.as_ref()) else {
            return out;
        };
        let (t16, twin) = self.twin(x.rows * x.cols);
        launch!(self, &self.f.add_rmsnorm, "add_rmsnorm", cfg((x.rows as u32, 1, 1), 512);
            &xb.ptr, &null, w, &ob.ptr, &t16, &cols, &eps);
        *out.b16.borrow_mut() = twin;
        out
    }

    fn add_rmsnorm(&self, x: &mut CudaAct, y: &CudaAct, w: &CudaSlice<f32>, eps: f32) -> CudaAct {
        x.changed();
        let out = self.act(x.rows, x.cols);
        let cols = x.cols as i32;
        if x.rows == 0 {
            return out;
        }
        let (Some(xb), Some(yb), Some(ob)) = (x.buf.as_ref(), y.buf.as_ref(), out.buf.as_ref())
        else {
            return out;
        };
        let (t16, twin) = self.twin(x.rows * x.cols);
        launch!(self, &self.f.add_rmsnorm, "add_rmsnorm", cfg((x.rows as u32, 1, 1), 512);
            &xb.ptr, &yb.ptr, w, &ob.ptr, &t16, &cols, &eps);
        *out.b16.borrow_mut() = twin;
        out
    }

    fn matmul(&self, x: &CudaAct, w: &CudaMatrix) -> CudaAct {
        let split = self.numerics == Numerics::Accurate;
        let m = if split { 2 * x.rows } else { x.rows };
        // Split: rows 0..m of the result come from hi, m..2m from lo; their sum is the product.
        let mut out = self.act(m, w.rows);
        out.rows = x.rows;
        if x.rows == 0 {
            return out;
        }
        let (Some(xb), Some(ob)) = (self.to_bf16(x, split), out.buf.as_ref()) else {
            return out;
        };
        self.gemm_bf16(xb, w, ob.ptr, m, false);
        if split {
            let n = x.rows * w.rows;
            let n64 = n as u64;
            let lo = ob.at::<f32>(n);
            launch!(self, &self.f.add_in_place, "add_in_place (split GEMM sum)",
                grid_for(n, self.info.sm_count); &ob.ptr, &lo, &n64);
        }
        out
    }

    /// `x += a · Wᵀ` in the GEMM (beta = 1): no product buffer, no add kernel. The accurate
    /// numerics' split GEMM sums two halves first: matmul then add there.
    fn matmul_add(&self, x: &mut CudaAct, a: &CudaAct, w: &CudaMatrix) {
        x.changed();
        if self.numerics == Numerics::Accurate || a.rows != x.rows || x.cols != w.rows {
            let o = self.matmul(a, w);
            return self.add_in_place(x, &o);
        }
        if a.rows == 0 {
            return;
        }
        let (Some(ab), Some(xb)) = (self.to_bf16(a, false), x.buf.as_ref()) else {
            return;
        };
        self.gemm_bf16(ab, w, xb.ptr, a.rows, true);
    }

    fn rope_store_kv(
        &self,
        qkv: &mut CudaAct,
        n_heads: usize,
        inv_freq: &[f32],
        kv: &mut CudaKv,
        layer: usize,
        batch: &AttnBatch,
    ) {
        let s = kv.shape;
        qkv.changed();
        if qkv.rows == 0 {
            return;
        }
        let (nh, n_kv, hd) = (n_heads as i32, s.n_kv_heads as i32, s.head_dim as i32);
        let Some(b) = qkv.buf.as_ref() else {
            return;
        };
        let (Some(m), Some(inv)) = (
            self.meta(batch, qkv.rows, s.block_size),
            self.inv_freq_dev(inv_freq),
        ) else {
            return;
        };
        // Count one layer's launches: from layer 0's RoPE to layer 1's.
        let launches = counters().launches;
        match layer {
            0 => self.layer0_launches.set(launches),
            1 => self.count(|c| c.launches_per_layer = launches - self.layer0_launches.get()),
            _ => {}
        }
        let at = kv.layer_at(layer);
        let (kc, vc) = (kv.k + at, kv.v + at);
        let (f, name) = match self.numerics {
            Numerics::Bf16 => (&self.f.rope_bf16, "rope_store_kv_bf16"),
            Numerics::Accurate => (&self.f.rope_f32, "rope_store_kv_f32"),
        };
        launch!(self, f, name, cfg((m.rows as u32, 1, 1), 256);
            &b.ptr, &inv, &m.positions, &m.slots, &kc, &vc, &nh, &n_kv, &hd);
    }

    fn copy_kv_block(&self, kv: &mut CudaKv, src: u32, dst: u32) {
        // One layer's block is contiguous ([layer, slot, kv_head, head_dim], bf16 or f32).
        let s = kv.shape;
        let bytes = s.block_size * s.n_kv_heads * s.head_dim * kv.elem;
        for layer in 0..s.n_layers {
            let at = kv.layer_at(layer);
            for base in [kv.k, kv.v] {
                let (from, to) = (
                    base + at + src as u64 * bytes as u64,
                    base + at + dst as u64 * bytes as u64,
                );
                // SAFETY: both ranges lie inside the KV allocation (block ids < num_blocks,
                // checked by the model) and do not overlap (src != dst).
                let r = unsafe {
                    cudarc::driver::sys::cuMemcpyDtoDAsync_v2(
                        to,
                        from,
                        bytes,
                        self.stream.cu_stream(),
                    )
                    .result()
                };
                if let Err(e) = r {
                    self.driver_failed(e, "copying a KV block");
                    return;
                }
            }
        }
    }

    /// Steps with prompt chunks (a sequence with more than [`SMALL_STEP_TOKENS`] new tokens) use
    /// the tiled prefill kernel; small steps the split-context decode kernel (eagerly and in a
    /// graph alike, so that a replay gives exactly the eager step's numbers).
    fn attention(
        &self,
        q: &CudaAct,
        kv: &CudaKv,
        layer: usize,
        n_heads: usize,
        batch: &AttnBatch,
    ) -> CudaAct {
        self.attention_with(q, kv, layer, n_heads, batch, !small_step(batch))
    }

    fn silu_mul(&self, gate_up: &CudaAct) -> CudaAct {
        let f = gate_up.cols / 2;
        let out = self.act(gate_up.rows, f);
        let n = gate_up.rows * f;
        let (n64, f64_) = (n as u64, f as u64);
        let (Some(gb), Some(ob)) = (gate_up.buf.as_ref(), out.buf.as_ref()) else {
            return out;
        };
        let (t16, twin) = self.twin(n);
        launch!(self, &self.f.silu_mul, "silu_mul", grid_for(n, self.info.sm_count);
            &gb.ptr, &ob.ptr, &t16, &n64, &f64_);
        *out.b16.borrow_mut() = twin;
        out
    }

    fn add_in_place(&self, x: &mut CudaAct, y: &CudaAct) {
        x.changed();
        let n = x.rows * x.cols;
        let n64 = n as u64;
        let (Some(xb), Some(yb)) = (x.buf.as_ref(), y.buf.as_ref()) else {
            return;
        };
        launch!(self, &self.f.add_in_place, "add_in_place", grid_for(n, self.info.sm_count);
            &xb.ptr, &yb.ptr, &n64);
    }

    fn select_rows(&self, x: &CudaAct, rows: &[usize]) -> CudaAct {
        let staged = self.staged.borrow();
        let staged = staged
            .as_ref()
            .filter(|s| s.logit_rows == rows && s.layout.rows == x.rows);
        let n = staged.map_or(rows.len(), |s| s.layout.logit_rows);
        let out = self.act(n, x.cols);
        if n == 0 {
            return out;
        }
        let own;
        let idx = match staged {
            Some(s) => s.at(s.layout.logit_idx),
            None => {
                let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
                own = self.upload(&idx, "row indices");
                match own.as_ref() {
                    Some(b) => b.ptr,
                    None => return out,
                }
            }
        };
        let (Some(xb), Some(ob)) = (x.buf.as_ref(), out.buf.as_ref()) else {
            return out;
        };
        let cols = x.cols as i32;
        launch!(self, &self.f.select_rows, "select_rows", cfg((n as u32, 1, 1), 256);
            &xb.ptr, &idx, &ob.ptr, &cols);
        out
    }

    /// Sum over the replica's GPUs through NCCL, in place (identity on one GPU).
    /// Not yet run on a GPU.
    fn all_reduce_sum(&self, x: &mut CudaAct) -> Result<(), BackendError> {
        let Some(tp) = self.tp.as_ref().filter(|c| c.size() > 1) else {
            return Ok(());
        };
        // Only the first rows * cols elements: the buffer may be larger (the split GEMM's).
        let n = x.rows * x.cols;
        if n == 0 {
            return Ok(());
        }
        let Some(xb) = x.buf.as_ref() else {
            return Err(self.take_err());
        };
        tp.all_reduce_sum(xb.ptr, n)
            .map_err(|e| self.comm_failed(e))
    }

    /// The vocab-sharded logits `[rows, cols]` of every rank as `[rows, cols * tp]`, rank r's
    /// shard in columns r*cols..(r+1)*cols (identity on one GPU): NCCL all-gather into
    /// `[rank][rows][cols]`, then the `gather_cols_reorder` kernel. Not yet run on a GPU.
    fn all_gather_cols(&self, x: CudaAct) -> Result<CudaAct, BackendError> {
        let Some(tp) = self.tp.as_ref().filter(|c| c.size() > 1) else {
            return Ok(x);
        };
        let world = tp.size();
        let n = x.rows * x.cols;
        let all = self.act(x.rows * world, x.cols);
        if n > 0 {
            let (Some(xb), Some(ab)) = (x.buf.as_ref(), all.buf.as_ref()) else {
                return Err(self.take_err());
            };
            tp.all_gather(xb.ptr, n, ab.ptr, ab.bytes / 4)
                .map_err(|e| self.comm_failed(e))?;
        }
        self.reorder_gathered(&all, world)
    }

    fn to_host(&self, x: &CudaAct) -> Vec<f32> {
        // A staged step padded for a graph: only its real logit rows go back.
        let rows = match self.staged.borrow().as_ref() {
            Some(s) if s.layout.logit_rows == x.rows => s.logit_rows.len(),
            _ => x.rows,
        };
        let n = rows * x.cols;
        let Some(xb) = x.buf.as_ref() else {
            return vec![f32::NAN; n];
        };
        // A captured follower step ends here: run its graph, then copy.
        if let Some(key) = self.capturing.get() {
            if let Err(e) = self.finish_capture(key, Some((xb.ptr, x.cols))) {
                self.fail(e.to_string());
                return vec![f32::NAN; n];
            }
        }
        self.logits_to_host(xb.ptr, n)
            .unwrap_or_else(|_| vec![f32::NAN; n])
    }

    fn sample(
        &self,
        logits: &CudaAct,
        rows: &[RowSampling],
    ) -> Option<Result<Vec<Sampled>, BackendError>> {
        // More alternatives than the kernel's passes are worth: sample on the host instead.
        if rows.iter().any(|r| r.top_logprobs > MAX_TOP_LOGPROBS) {
            self.abandon_capture();
            return None;
        }
        Some(self.sample_rows(logits, rows))
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    /// The first failure of this step, if any. Kernel faults are asynchronous and sticky: the
    /// stream is synchronized here so that a fault in this step's kernels is reported with this
    /// step (naming the kernels it can be in), not at some later, unrelated call.
    fn check(&self) -> Result<(), BackendError> {
        self.abandon_capture();
        *self.staged.borrow_mut() = None;
        // Nothing launched since the last good synchronization (a replayed step's results
        // were fetched with one): nothing to wait for.
        if self.err.borrow().is_none() && !self.launched.borrow().is_empty() {
            match self.sync() {
                Ok(()) => self.launched.borrow_mut().clear(),
                Err(e) => self.driver_failed(e, "finishing the step's kernels"),
            }
        }
        if self.err.borrow().is_some() {
            return Err(self.take_err());
        }
        Ok(())
    }
}

/// Most top log-probs the GPU sampler reports (OpenAI's limit is 20).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl CudaBackend {
    fn sample_rows(
        &self,
        logits: &CudaAct,
        rows: &[RowSampling],
    ) -> Result<Vec<Sampled>, BackendError> {
        let staged_rows = self
            .staged
            .borrow()
            .as_ref()
            .map(|s| (s.layout.logit_rows, s.logit_rows.len(), s.top));
        let staged = staged_rows.filter(|&(l, n, _)| l == logits.rows && n == rows.len());
        let n_logits = staged.map_or(rows.len(), |s| s.0);
        if n_logits != logits.rows {
            self.abandon_capture();
            return Err(BackendError::Unsupported(format!(
                "{} sampling rows for {} logits rows",
                rows.len(),
                logits.rows
            )));
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if staged.is_none() {
            // Ops driven one by one (the self-test): stage the parameters now.
            let batch = AttnBatch::default();
            let idx: Vec<usize> = (0..rows.len()).collect();
            let d = StepData {
                tokens: &[],
                batch: &batch,
                logit_rows: &idx,
                sampling: Some(rows),
                block_size: 1,
                pad_rows: 0,
                pad_logit_rows: 0,
            };
            self.stage(&d, top_slots(rows))?;
        }
        let (params, stage, top, out_ptr) = {
            let s = self.staged.borrow();
            let Some(s) = s.as_ref() else {
                return Err(be("no staged step"));
            };
            let st = self.staging.borrow();
            let Some(dev) = st.down_dev.as_ref() else {
                return Err(be("the sampled-token buffer is missing"));
            };
            (s.at(s.layout.params), s.base, s.top, dev.ptr)
        };
        let Some(lb) = logits.buf.as_ref() else {
            self.abandon_capture();
            return Err(self.take_err());
        };
        self.launch_sample(lb.ptr, logits.cols, n_logits, params, stage, top, out_ptr);
        if let Some(key) = self.capturing.get() {
            self.finish_capture(key, None)?;
        }
        self.fetch_sampled(rows)
    }

    /// The sampling kernel over `n_logits` rows of logits at `logits`: parameters at `params`,
    /// masks found from `stage`, results into the output buffer at `out_ptr`.
    #[allow(clippy::too_many_arguments)] // a kernel launch: every input is needed
    fn launch_sample(
        &self,
        logits: u64,
        cols: usize,
        n_logits: usize,
        params: u64,
        stage: u64,
        top: usize,
        out_ptr: u64,
    ) {
        let out = OutLayout {
            rows: n_logits,
            top,
        };
        let (vocab, mt) = (cols as i32, top as i32);
        let (tok, lp, tid, tlp) = (
            out_ptr + out.token() as u64,
            out_ptr + out.logprob() as u64,
            out_ptr + out.top_id() as u64,
            out_ptr + out.top_lp() as u64,
        );
        launch!(self, &self.f.sample, "sample_rows", cfg((n_logits as u32, 1, 1), 1024);
            &logits, &vocab, &params, &stage, &mt, &tok, &lp, &tid, &tlp);
    }

    /// Sample a deferred step (its forward launched: `logits`, or its graph's): the sampling
    /// rows and their masks go up in one more copy from pinned memory, then the sampling kernel,
    /// then the one copy down.
    fn sample_masked(
        &self,
        logits: Option<&CudaAct>,
        rows: &[RowSampling],
    ) -> Result<Vec<Sampled>, BackendError> {
        let (n_logits, n_real, top, launched) = match self.staged.borrow().as_ref() {
            Some(s) => (s.layout.logit_rows, s.logit_rows.len(), s.top, s.launched),
            None => return Err(be("no staged step to sample")),
        };
        let (ptr, cols) = match (logits, launched) {
            (Some(l), _) if l.rows == n_logits => match l.buf.as_ref() {
                Some(b) => (b.ptr, l.cols),
                None => return Err(self.take_err()),
            },
            (None, Some(at)) => at,
            _ => return Err(be("the deferred step's logits are not where it left them")),
        };
        if rows.len() != n_real {
            return Err(BackendError::Unsupported(format!(
                "{} sampling rows for {n_real} logits rows",
                rows.len()
            )));
        }
        let l = SamplingLayout::new(rows, n_logits);
        self.mask_room(l.end)?;
        let dev = {
            let mut st = self.staging.borrow_mut();
            let st = &mut *st;
            let (Some(host), Some(dev)) = (st.mask_host.as_mut(), st.mask_dev.as_ref()) else {
                return Err(be("the mask staging buffer is missing"));
            };
            l.pack(rows, host.bytes());
            // Not written again before this step's synchronization (fetch_sampled).
            self.upload_pinned(host, dev, l.end, "uploading the masks")?;
            dev.ptr
        };
        let out_ptr = match self.staging.borrow().down_dev.as_ref() {
            Some(d) => d.ptr,
            None => return Err(be("the sampled-token buffer is missing")),
        };
        self.launch_sample(ptr, cols, n_logits, dev, dev, top, out_ptr);
        self.fetch_sampled(rows)
    }

    /// Make sure the mask staging buffers hold `bytes` (grown to a power of two: rarely).
    fn mask_room(&self, bytes: usize) -> Result<(), BackendError> {
        let mut st = self.staging.borrow_mut();
        let st = &mut *st;
        self.grow_pinned_pair(
            (&mut st.mask_host, &mut st.mask_dev),
            bytes,
            64 << 10,
            true,
            "the mask staging buffer",
        )
    }
}
