//! `CudaBackend`: the [`Backend`] trait on one GPU. Weights bf16, activations f32 between
//! kernels (accuracy first: the residual stream stays f32 like the CPU reference; GEMM inputs
//! are cast to bf16 on the way in), KV cache bf16, f32 logits and softmax.
//! NOTE: this file has compiled but never run on a GPU (no GPU was lent while writing it).

use std::cell::RefCell;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};

use super::gemm::Gemm;
use super::kernels;
use super::nccl::NcclComm;
use crate::backend::{AttnBatch, Backend, BackendError, KvShape, RowSampling, Sampled};
use crate::checkpoint::{DType, Tensor};

/// A row-major `[rows, cols]` f32 matrix on the GPU.
pub struct CudaAct {
    pub rows: usize,
    pub cols: usize,
    /// `None` when its allocation failed: the error is noted, `check` reports it, and every
    /// kernel that would use the buffer is skipped.
    buf: Option<CudaSlice<f32>>,
}

/// A `[rows, cols]` bf16 weight on the GPU (raw bits).
pub struct CudaMatrix {
    pub rows: usize,
    pub cols: usize,
    buf: CudaSlice<u8>,
}

/// The paged KV pool: K and V each `[layer, slot, kv_head, head_dim]`, one allocation each;
/// bf16 (half the bytes attention must read) or f32 (`Numerics::Accurate`).
pub struct CudaKv {
    pub shape: KvShape,
    store: KvStore,
}

enum KvStore {
    Bf16 {
        k: CudaSlice<u16>,
        v: CudaSlice<u16>,
    },
    F32 {
        k: CudaSlice<f32>,
        v: CudaSlice<f32>,
    },
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
    fn per_layer(&self) -> usize {
        let s = self.shape;
        s.num_blocks * s.block_size * s.n_kv_heads * s.head_dim
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
    sample: CudaFunction,
}

/// Per-step attention metadata, uploaded once per step and reused by every layer.
struct BatchMeta {
    host: (Vec<u32>, Vec<i64>, Vec<u32>, Vec<u32>),
    positions: CudaSlice<u32>,
    slots: CudaSlice<i64>,
    row_table: CudaSlice<u32>,
    tables: CudaSlice<u32>,
    row_ctx: CudaSlice<u32>,
    max_ctx: usize,
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

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    f: Funcs,
    gemm: RefCell<Gemm>,
    meta: RefCell<Option<BatchMeta>>,
    inv_freq: RefCell<Option<(Vec<f32>, CudaSlice<f32>)>>,
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
        let stream = ctx.default_stream();
        let cc = ctx.compute_capability().map_err(be)?;
        let arch = kernels::arch_for(cc.0, cc.1).ok_or_else(|| {
            BackendError::Unsupported(format!(
                "GPU compute capability {}.{} is older than 8.0 (Ampere): bf16 kernels need sm_80+",
                cc.0, cc.1
            ))
        })?;
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
            sample: load("sample_rows")?,
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
        Ok(CudaBackend {
            ctx,
            stream,
            f,
            gemm: RefCell::new(gemm),
            meta: RefCell::new(None),
            inv_freq: RefCell::new(None),
            err: RefCell::new(None),
            launched: RefCell::new(Vec::new()),
            poison: false,
            numerics: Numerics::Bf16,
            tp: None,
            info,
            kernel_cache: (path, hit),
        })
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
    /// self-test can check it on one GPU. Not yet run on a GPU.
    pub fn reorder_gathered(&self, all: &CudaAct, world: usize) -> Result<CudaAct, BackendError> {
        if world == 0 || !all.rows.is_multiple_of(world) {
            return Err(BackendError::Comm(format!(
                "{} gathered rows do not split into {world} ranks",
                all.rows
            )));
        }
        let (rows, cols) = (all.rows / world, all.cols);
        let mut out = self.act(rows, cols * world);
        if rows * cols == 0 {
            return Ok(out);
        }
        let (Some(src), Some(dst)) = (all.buf.as_ref(), out.buf.as_mut()) else {
            return Err(self.take_err());
        };
        let (r, c, w) = (rows as i32, cols as i32, world as i32);
        unsafe {
            self.stream
                .launch_builder(&self.f.gather_cols_reorder)
                .arg(src)
                .arg(dst)
                .arg(&r)
                .arg(&c)
                .arg(&w)
                .launch(cfg((rows as u32, world as u32, 1), 256))
        }
        .map_err(be)?;
        self.launched("gather_cols_reorder");
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
            Ok(_) => self.launched(kernel),
            Err(e) => self.driver_failed(e, &format!("launching {kernel}")),
        }
    }

    fn launched(&self, kernel: &'static str) {
        let mut l = self.launched.borrow_mut();
        // Each kernel once, in the order of their latest launch.
        l.retain(|&k| k != kernel);
        l.push(kernel);
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

    /// A fresh, uninitialized device buffer of `n` elements (every kernel writes all of its
    /// output, so zeroing would only cost a pass of bandwidth; the self-test poisons outputs
    /// instead to prove it). Stream-ordered allocation (cuMemAllocAsync pool) makes this cheap.
    /// `None` when the driver refuses: the failure is noted for `check` (never a panic).
    fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
        what: &str,
    ) -> Option<CudaSlice<T>> {
        // SAFETY: callers only hand the buffer to kernels that write every element before
        // anything reads it.
        match unsafe { self.stream.alloc::<T>(n.max(1)) } {
            Ok(b) => Some(b),
            Err(e) => {
                let bytes = n.max(1) * std::mem::size_of::<T>();
                self.driver_failed(e, &format!("allocating {bytes} bytes for {what}"));
                None
            }
        }
    }

    fn act(&self, rows: usize, cols: usize) -> CudaAct {
        let buf = if self.poison {
            self.upload(
                &vec![f32::NAN; (rows * cols).max(1)],
                "a poisoned activation",
            )
        } else {
            self.alloc::<f32>(rows * cols, "an activation")
        };
        CudaAct { rows, cols, buf }
    }

    /// Upload host data (small per-step tables); `None` (noted) when the driver refuses.
    fn upload<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        data: &[T],
        what: &str,
    ) -> Option<CudaSlice<T>> {
        if data.is_empty() {
            return self.alloc::<T>(1, what);
        }
        match self.stream.clone_htod(data) {
            Ok(b) => Some(b),
            Err(e) => {
                let bytes = std::mem::size_of_val(data);
                self.driver_failed(e, &format!("uploading {bytes} bytes of {what}"));
                None
            }
        }
    }

    /// An f32 host slice as a device activation (tests, self-test).
    pub fn act_from_host(&self, rows: usize, cols: usize, data: &[f32]) -> CudaAct {
        assert_eq!(data.len(), rows * cols);
        CudaAct {
            rows,
            cols,
            buf: self.upload(data, "an activation"),
        }
    }

    /// Step metadata for `batch`, uploaded only when it changed since the last call: every
    /// layer's rope and attention of one step share it.
    fn with_meta<R>(
        &self,
        batch: &AttnBatch,
        block_size: usize,
        f: impl FnOnce(&BatchMeta) -> R,
    ) -> Option<R> {
        let mut slots = Vec::with_capacity(batch.n_tokens());
        let mut row_table = Vec::with_capacity(batch.n_tokens());
        let mut tables = Vec::new();
        let mut max_ctx = 0;
        for s in &batch.seqs {
            let off = tables.len() as u32;
            tables.extend_from_slice(&s.block_table);
            for j in 0..s.n_tokens {
                let pos = s.position(j);
                let blk = s.block_table.get(pos / block_size).copied().unwrap_or(0) as i64;
                slots.push(blk * block_size as i64 + (pos % block_size) as i64);
                row_table.push(off);
            }
            max_ctx = max_ctx.max(s.context_len);
        }
        let host = (batch.positions.clone(), slots, row_table, tables);
        let mut meta = self.meta.borrow_mut();
        if meta.as_ref().map(|m| m.host != host).unwrap_or(true) {
            let row_ctx: Vec<u32> = host.0.iter().map(|p| p + 1).collect();
            *meta = None;
            *meta = Some(BatchMeta {
                positions: self.upload(&host.0, "positions")?,
                slots: self.upload(&host.1, "KV slots")?,
                row_table: self.upload(&host.2, "block-table offsets")?,
                tables: self.upload(&host.3, "block tables")?,
                row_ctx: self.upload(&row_ctx, "context lengths")?,
                max_ctx,
                host,
            });
        }
        meta.as_ref().map(f)
    }

    fn inv_freq_dev<R>(&self, inv_freq: &[f32], f: impl FnOnce(&CudaSlice<f32>) -> R) -> Option<R> {
        let mut c = self.inv_freq.borrow_mut();
        if c.as_ref()
            .map(|(h, _)| h.as_slice() != inv_freq)
            .unwrap_or(true)
        {
            *c = None;
            *c = Some((
                inv_freq.to_vec(),
                self.upload(inv_freq, "RoPE frequencies")?,
            ));
        }
        c.as_ref().map(|(_, d)| f(d))
    }

    /// `x` cast to bf16 (the GEMM's operand): `[m, k]`, or `[2m, k]` (hi rows then lo rows)
    /// when `split`.
    fn to_bf16(&self, x: &CudaAct, split: bool) -> Option<CudaSlice<u16>> {
        let n = x.rows * x.cols;
        let xb = x.buf.as_ref()?;
        let mut out = self.alloc::<u16>(if split { 2 * n } else { n }, "a bf16 GEMM input")?;
        let n64 = n as u64;
        let (f, name) = if split {
            (&self.f.cast_bf16_split, "cast_bf16_split")
        } else {
            (&self.f.cast_bf16, "cast_bf16")
        };
        let r = unsafe {
            self.stream
                .launch_builder(f)
                .arg(xb)
                .arg(&mut out)
                .arg(&n64)
                .launch(grid_for(n, self.info.sm_count))
        };
        self.launch_note(r, name);
        Some(out)
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
        let bytes: Vec<u8> = host.iter().flat_map(|v| v.to_le_bytes()).collect();
        let w = self.stream.clone_htod(&bytes).map_err(be)?;
        let mut d = self.stream.alloc_zeros::<f32>(s * s).map_err(be)?;
        let secs = time(&mut || {
            self.gemm
                .borrow_mut()
                .bf16_f32(&self.stream, &x, &w, &mut d, s, s, s)
                .map_err(BackendError::Unsupported)
        })?;
        Ok((bw, 2.0 * (s * s * s) as f64 / secs / 1e12))
    }
}

impl Backend for CudaBackend {
    type Act = CudaAct;
    type Matrix = CudaMatrix;
    type Vector = CudaSlice<f32>;
    type Kv = CudaKv;

    fn name(&self) -> String {
        format!(
            "cuda:{} ({}, sm_{}{})",
            self.info.ordinal,
            self.info.name,
            self.info.compute_capability.0,
            self.info.compute_capability.1
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
        Ok(CudaMatrix {
            rows: t.shape[0],
            cols: t.shape[1],
            buf,
        })
    }

    fn load_vector(&self, t: &Tensor) -> Result<CudaSlice<f32>, BackendError> {
        self.stream
            .clone_htod(&t.to_f32_vec())
            .map_err(|e| BackendError::OutOfMemory(e.to_string()))
    }

    fn alloc_kv(&self, shape: KvShape) -> Result<CudaKv, BackendError> {
        if shape.head_dim > 256 || !shape.head_dim.is_multiple_of(2) || shape.head_dim == 0 {
            return Err(BackendError::Unsupported(format!(
                "the CUDA kernels need an even head_dim of at most 256, got {}",
                shape.head_dim
            )));
        }
        let n = shape.n_layers
            * shape.num_blocks
            * shape.block_size
            * shape.n_kv_heads
            * shape.head_dim;
        let oom = |e: cudarc::driver::DriverError| {
            BackendError::OutOfMemory(format!(
                "KV cache of {} bytes: {e}",
                2 * n * self.numerics.kv_elem_bytes()
            ))
        };
        let store = match self.numerics {
            Numerics::Bf16 => KvStore::Bf16 {
                k: self.stream.alloc_zeros::<u16>(n).map_err(oom)?,
                v: self.stream.alloc_zeros::<u16>(n).map_err(oom)?,
            },
            Numerics::Accurate => KvStore::F32 {
                k: self.stream.alloc_zeros::<f32>(n).map_err(oom)?,
                v: self.stream.alloc_zeros::<f32>(n).map_err(oom)?,
            },
        };
        Ok(CudaKv { shape, store })
    }

    fn embed(&self, table: &CudaMatrix, tokens: &[u32]) -> CudaAct {
        let mut out = self.act(tokens.len(), table.cols);
        if tokens.is_empty() {
            return out;
        }
        let (Some(tok), Some(ob)) = (self.upload(tokens, "token ids"), out.buf.as_mut()) else {
            return out;
        };
        let dim = table.cols as i32;
        let r = unsafe {
            self.stream
                .launch_builder(&self.f.embed)
                .arg(&table.buf)
                .arg(&tok)
                .arg(ob)
                .arg(&dim)
                .launch(cfg((tokens.len() as u32, 1, 1), 256))
        };
        self.launch_note(r, "embed_gather");
        out
    }

    fn rmsnorm(&self, x: &CudaAct, w: &CudaSlice<f32>, eps: f32) -> CudaAct {
        let mut out = self.act(x.rows, x.cols);
        // add_rmsnorm with y = null writes x only when y is given: x is read-only here.
        let null: u64 = 0;
        let cols = x.cols as i32;
        if x.rows == 0 {
            return out;
        }
        let (Some(xb), Some(ob)) = (x.buf.as_ref(), out.buf.as_mut()) else {
            return out;
        };
        let r = unsafe {
            self.stream
                .launch_builder(&self.f.add_rmsnorm)
                .arg(xb)
                .arg(&null)
                .arg(w)
                .arg(ob)
                .arg(&cols)
                .arg(&eps)
                .launch(cfg((x.rows as u32, 1, 1), 512))
        };
        self.launch_note(r, "add_rmsnorm");
        out
    }

    fn add_rmsnorm(&self, x: &mut CudaAct, y: &CudaAct, w: &CudaSlice<f32>, eps: f32) -> CudaAct {
        let mut out = self.act(x.rows, x.cols);
        let cols = x.cols as i32;
        if x.rows == 0 {
            return out;
        }
        let (Some(xb), Some(yb), Some(ob)) = (x.buf.as_mut(), y.buf.as_ref(), out.buf.as_mut())
        else {
            return out;
        };
        let r = unsafe {
            self.stream
                .launch_builder(&self.f.add_rmsnorm)
                .arg(xb)
                .arg(yb)
                .arg(w)
                .arg(ob)
                .arg(&cols)
                .arg(&eps)
                .launch(cfg((x.rows as u32, 1, 1), 512))
        };
        self.launch_note(r, "add_rmsnorm");
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
        let (Some(xb), Some(ob)) = (self.to_bf16(x, split), out.buf.as_mut()) else {
            return out;
        };
        let r = self
            .gemm
            .borrow_mut()
            .bf16_f32(&self.stream, &xb, &w.buf, ob, m, w.rows, w.cols);
        if self.note(r, "matmul").is_some() {
            self.launched("cublasLtMatmul");
        }
        if split {
            let n = x.rows * w.rows;
            let n64 = n as u64;
            let (mut hi, mut lo) = ob.split_at_mut(n);
            let r = unsafe {
                self.stream
                    .launch_builder(&self.f.add_in_place)
                    .arg(&mut hi)
                    .arg(&mut lo)
                    .arg(&n64)
                    .launch(grid_for(n, self.info.sm_count))
            };
            self.launch_note(r, "add_in_place (split GEMM sum)");
        }
        out
    }

    fn rope_store_kv(
        &self,
        q: &mut CudaAct,
        k: &mut CudaAct,
        v: &CudaAct,
        inv_freq: &[f32],
        kv: &mut CudaKv,
        layer: usize,
        batch: &AttnBatch,
    ) {
        let s = kv.shape;
        if q.rows == 0 {
            return;
        }
        let per_layer = kv.per_layer();
        let range = layer * per_layer..(layer + 1) * per_layer;
        let n_heads = (q.cols / s.head_dim) as i32;
        let (n_kv, hd) = (s.n_kv_heads as i32, s.head_dim as i32);
        let launch_cfg = cfg((q.rows as u32, 1, 1), 256);
        let (Some(qb), Some(kb), Some(vb)) = (q.buf.as_mut(), k.buf.as_mut(), v.buf.as_ref())
        else {
            return;
        };
        self.with_meta(batch, s.block_size, |m| {
            self.inv_freq_dev(inv_freq, |inv| {
                macro_rules! launch {
                    ($f:expr, $kc:expr, $vc:expr) => {{
                        let mut kc = $kc.slice_mut(range.clone());
                        let mut vc = $vc.slice_mut(range.clone());
                        unsafe {
                            self.stream
                                .launch_builder($f)
                                .arg(qb)
                                .arg(kb)
                                .arg(vb)
                                .arg(inv)
                                .arg(&m.positions)
                                .arg(&m.slots)
                                .arg(&mut kc)
                                .arg(&mut vc)
                                .arg(&n_heads)
                                .arg(&n_kv)
                                .arg(&hd)
                                .launch(launch_cfg)
                        }
                    }};
                }
                let (r, name) = match &mut kv.store {
                    KvStore::Bf16 { k: kc, v: vc } => {
                        (launch!(&self.f.rope_bf16, kc, vc), "rope_store_kv_bf16")
                    }
                    KvStore::F32 { k: kc, v: vc } => {
                        (launch!(&self.f.rope_f32, kc, vc), "rope_store_kv_f32")
                    }
                };
                self.launch_note(r, name);
            })
        });
    }

    fn attention(
        &self,
        q: &CudaAct,
        kv: &CudaKv,
        layer: usize,
        n_heads: usize,
        batch: &AttnBatch,
    ) -> CudaAct {
        let s = kv.shape;
        let hd = s.head_dim;
        let mut out = self.act(q.rows, n_heads * hd);
        if q.rows == 0 {
            return out;
        }
        let per_layer = kv.per_layer();
        let (Some(qb), Some(ob)) = (q.buf.as_ref(), out.buf.as_mut()) else {
            return out;
        };
        self.with_meta(batch, s.block_size, |m| {
            // Split the context so that the grid has at least ~2 blocks per SM, but never
            // give a split fewer than 64 positions (the partials would cost more than they save).
            let blocks = q.rows * n_heads;
            let want = (2 * self.info.sm_count as usize).div_ceil(blocks);
            let splits = want.min(m.max_ctx.div_ceil(64)).clamp(1, 32);
            let (Some(mut acc), Some(mut ml)) = (
                self.alloc::<f32>(blocks * splits * hd, "attention partials"),
                self.alloc::<f32>(blocks * splits * 2, "attention partial maxima"),
            ) else {
                return;
            };
            let range = layer * per_layer..(layer + 1) * per_layer;
            let (nh, nkv, hdi, bs) = (
                n_heads as i32,
                s.n_kv_heads as i32,
                hd as i32,
                s.block_size as i32,
            );
            let scale = 1.0 / (hd as f32).sqrt();
            let launch_cfg = cfg((q.rows as u32, n_heads as u32, splits as u32), 128);
            macro_rules! launch {
                ($f:expr, $kc:expr, $vc:expr) => {{
                    let kc = $kc.slice(range.clone());
                    let vc = $vc.slice(range.clone());
                    unsafe {
                        self.stream
                            .launch_builder($f)
                            .arg(&kc)
                            .arg(&vc)
                            .arg(qb)
                            .arg(&m.row_ctx)
                            .arg(&m.row_table)
                            .arg(&m.tables)
                            .arg(&mut acc)
                            .arg(&mut ml)
                            .arg(&nh)
                            .arg(&nkv)
                            .arg(&hdi)
                            .arg(&bs)
                            .arg(&scale)
                            .launch(launch_cfg)
                    }
                }};
            }
            let (r, name) = match &kv.store {
                KvStore::Bf16 { k: kc, v: vc } => (
                    launch!(&self.f.attn_partial_bf16, kc, vc),
                    "attn_partial_bf16",
                ),
                KvStore::F32 { k: kc, v: vc } => (
                    launch!(&self.f.attn_partial_f32, kc, vc),
                    "attn_partial_f32",
                ),
            };
            self.launch_note(r, name);
            let sp = splits as i32;
            let r = unsafe {
                self.stream
                    .launch_builder(&self.f.attn_combine)
                    .arg(&acc)
                    .arg(&ml)
                    .arg(ob)
                    .arg(&sp)
                    .arg(&hdi)
                    .launch(cfg((blocks as u32, 1, 1), hd.min(256) as u32))
            };
            self.launch_note(r, "attn_combine");
        });
        out
    }

    fn silu_mul(&self, gate: &CudaAct, up: &CudaAct) -> CudaAct {
        let mut out = self.act(gate.rows, gate.cols);
        let n = gate.rows * gate.cols;
        let n64 = n as u64;
        let (Some(gb), Some(ub), Some(ob)) = (gate.buf.as_ref(), up.buf.as_ref(), out.buf.as_mut())
        else {
            return out;
        };
        let r = unsafe {
            self.stream
                .launch_builder(&self.f.silu_mul)
                .arg(gb)
                .arg(ub)
                .arg(ob)
                .arg(&n64)
                .launch(grid_for(n, self.info.sm_count))
        };
        self.launch_note(r, "silu_mul");
        out
    }

    fn add_in_place(&self, x: &mut CudaAct, y: &CudaAct) {
        let n = x.rows * x.cols;
        let n64 = n as u64;
        let (Some(xb), Some(yb)) = (x.buf.as_mut(), y.buf.as_ref()) else {
            return;
        };
        let r = unsafe {
            self.stream
                .launch_builder(&self.f.add_in_place)
                .arg(xb)
                .arg(yb)
                .arg(&n64)
                .launch(grid_for(n, self.info.sm_count))
        };
        self.launch_note(r, "add_in_place");
    }

    fn select_rows(&self, x: &CudaAct, rows: &[usize]) -> CudaAct {
        let mut out = self.act(rows.len(), x.cols);
        if rows.is_empty() {
            return out;
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let (Some(idx), Some(xb), Some(ob)) = (
            self.upload(&idx, "row indices"),
            x.buf.as_ref(),
            out.buf.as_mut(),
        ) else {
            return out;
        };
        let cols = x.cols as i32;
        let r = unsafe {
            self.stream
                .launch_builder(&self.f.select_rows)
                .arg(xb)
                .arg(&idx)
                .arg(ob)
                .arg(&cols)
                .launch(cfg((rows.len() as u32, 1, 1), 256))
        };
        self.launch_note(r, "select_rows");
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
        let Some(xb) = x.buf.as_mut() else {
            return Err(self.take_err());
        };
        tp.all_reduce_sum(&mut xb.slice_mut(0..n))
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
        let mut all = self.act(x.rows * world, x.cols);
        if n > 0 {
            let (Some(xb), Some(ab)) = (x.buf.as_ref(), all.buf.as_mut()) else {
                return Err(self.take_err());
            };
            tp.all_gather(&xb.slice(0..n), ab)?;
        }
        self.reorder_gathered(&all, world)
    }

    fn to_host(&self, x: &CudaAct) -> Vec<f32> {
        let n = x.rows * x.cols;
        let Some(xb) = x.buf.as_ref() else {
            return vec![f32::NAN; n];
        };
        match self.stream.clone_dtoh(xb) {
            Ok(mut v) => {
                v.truncate(n);
                v
            }
            Err(e) => {
                self.driver_failed(e, "copying to the host");
                vec![f32::NAN; n]
            }
        }
    }

    fn sample(
        &self,
        logits: &CudaAct,
        rows: &[RowSampling],
    ) -> Option<Result<Vec<Sampled>, BackendError>> {
        // More alternatives than the kernel's passes are worth: sample on the host instead.
        if rows.iter().any(|r| r.top_logprobs > MAX_TOP_LOGPROBS) {
            return None;
        }
        Some(self.sample_rows(logits, rows))
    }

    /// The first failure of this step, if any. Kernel faults are asynchronous and sticky: the
    /// stream is synchronized here so that a fault in this step's kernels is reported with this
    /// step (naming the kernels it can be in), not at some later, unrelated call.
    fn check(&self) -> Result<(), BackendError> {
        if self.err.borrow().is_none() {
            match self.stream.synchronize() {
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
        if rows.len() != logits.rows {
            return Err(BackendError::Unsupported(format!(
                "{} sampling rows for {} logits rows",
                rows.len(),
                logits.rows
            )));
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // struct SampleRow in sample.cu: f32, f32, u32, u32, u64, u64 = 32 bytes, 8-aligned.
        let mut params: Vec<u64> = Vec::with_capacity(rows.len() * 4);
        for r in rows {
            params.push(r.temperature.to_bits() as u64 | ((r.top_p.to_bits() as u64) << 32));
            let top_k = r.top_k.min(u32::MAX as usize) as u64;
            params.push(top_k | ((r.top_logprobs as u64) << 32));
            params.push(r.seed);
            params.push(r.n);
        }
        let max_top = rows
            .iter()
            .map(|r| r.top_logprobs)
            .max()
            .unwrap_or(0)
            .max(1);
        let n = rows.len();
        let bufs = (
            logits.buf.as_ref(),
            self.upload(&params, "sampling parameters"),
            self.alloc::<u32>(n, "sampled tokens"),
            self.alloc::<f32>(n, "sampled log-probs"),
            self.alloc::<u32>(n * max_top, "top token ids"),
            self.alloc::<f32>(n * max_top, "top log-probs"),
        );
        let (
            Some(lb),
            Some(params),
            Some(mut tok),
            Some(mut lp),
            Some(mut top_id),
            Some(mut top_lp),
        ) = bufs
        else {
            return Err(self.take_err());
        };
        let (vocab, mt) = (logits.cols as i32, max_top as i32);
        unsafe {
            self.stream
                .launch_builder(&self.f.sample)
                .arg(lb)
                .arg(&vocab)
                .arg(&params)
                .arg(&mt)
                .arg(&mut tok)
                .arg(&mut lp)
                .arg(&mut top_id)
                .arg(&mut top_lp)
                .launch(cfg((n as u32, 1, 1), 1024))
        }
        .map_err(be)?;
        self.launched("sample_rows");
        let copy = |what| {
            move |e| {
                self.driver_failed(e, what);
                self.take_err()
            }
        };
        let tok = self
            .stream
            .clone_dtoh(&tok)
            .map_err(copy("copying sampled tokens"))?;
        let lp = self
            .stream
            .clone_dtoh(&lp)
            .map_err(copy("copying log-probs"))?;
        let top_id = self
            .stream
            .clone_dtoh(&top_id)
            .map_err(copy("copying top ids"))?;
        let top_lp = self
            .stream
            .clone_dtoh(&top_lp)
            .map_err(copy("copying top log-probs"))?;
        Ok((0..n)
            .map(|i| Sampled {
                token: tok[i],
                logprob: lp[i],
                top: (0..rows[i].top_logprobs)
                    .map(|t| (top_id[i * max_top + t], top_lp[i * max_top + t]))
                    .collect(),
            })
            .collect())
    }
}
