//! `x · Wᵀ` through cuBLASLt: bf16 operands, f32 accumulation, f32 output.
//!
//! cuBLAS is column-major. Row-major `W [n, k]` is column-major `Wᵀ (k × n)`, row-major
//! `X [m, k]` is column-major `Xᵀ (k × m)`, and row-major `D [m, n]` is column-major `Dᵀ (n × m)`.
//! So `Dᵀ = op(A) · B` with `A = W` transposed (`op(A) = W`, n × k) and `B = Xᵀ`: no copies.
//!
//! Plans are cached: one matmul descriptor for all, the layouts per shape, and the algorithm per
//! (m rounded up to a power of two, n, k), so that a step runs no heuristic and creates nothing
//! once its shapes have been seen (a decode step at batch 3 uses the batch-4 algorithm).
//! Run on an H200 (self-test, bench: results/gpu-check-nvidia-h200-2026-11-29).

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

/// A cuBLASLt handle with its own workspace (Hopper wants 32 MiB) and the plan cache.
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    _workspace: CudaSlice<u8>,
    ws_ptr: u64,
    /// COMPUTE_32F, scale f32, A transposed: the same for every product.
    desc: sys::cublasLtMatmulDesc_t,
    layouts: HashMap<(bool, u64, u64), sys::cublasLtMatrixLayout_t>,
    algos: HashMap<(u64, u64, u64), sys::cublasLtMatmulAlgo_t>,
}

// SAFETY: the handle is only used from the backend's one stream, by one thread at a time.
unsafe impl Send for Gemm {}
unsafe impl Sync for Gemm {}

pub const WORKSPACE_BYTES: usize = 32 << 20;

/// Layout cache entries kept at most: prefill steps bring new row counts; past this the cache
/// starts again (a few host objects each, never device memory).
const MAX_LAYOUTS: usize = 4096;

/// The m a product's algorithm is chosen for.
pub fn m_bucket(m: usize) -> usize {
    m.max(1).next_power_of_two()
}

fn err(what: &'static str) -> impl Fn(result::CublasError) -> String {
    move |e| format!("cuBLASLt {what}: {e:?}")
}

impl Gemm {
    pub fn new(stream: &std::sync::Arc<CudaStream>) -> Result<Self, String> {
        let handle = result::create_handle().map_err(err("create"))?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(|e| format!("cuBLASLt workspace: {e}"))?;
        let ws_ptr = workspace.device_ptr(stream).0;
        let f32t = sys::cudaDataType_t::CUDA_R_32F;
        let desc = unsafe {
            let desc =
                result::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, f32t)
                    .map_err(err("desc"))?;
            let trans: i32 = 1; // CUBLAS_OP_T
            if let Err(e) = result::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&trans) as *const i32 as *const c_void,
                std::mem::size_of::<i32>(),
            ) {
                let _ = result::destroy_matmul_desc(desc);
                return Err(err("transa")(e));
            }
            desc
        };
        Ok(Gemm {
            handle,
            _workspace: workspace,
            ws_ptr,
            desc,
            layouts: HashMap::new(),
            algos: HashMap::new(),
        })
    }

    /// A cached column-major layout: bf16 `rows × cols` (ld rows) or f32.
    fn layout(
        &mut self,
        bf16: bool,
        rows: u64,
        cols: u64,
    ) -> Result<sys::cublasLtMatrixLayout_t, String> {
        if let Some(&l) = self.layouts.get(&(bf16, rows, cols)) {
            return Ok(l);
        }
        let t = if bf16 {
            sys::cudaDataType_t::CUDA_R_16BF
        } else {
            sys::cudaDataType_t::CUDA_R_32F
        };
        let l = result::create_matrix_layout(t, rows, cols, rows as i64).map_err(err("layout"))?;
        self.layouts.insert((bf16, rows, cols), l);
        Ok(l)
    }

    /// Drop the layouts (not the algorithms) when the cache has grown past its bound.
    fn trim(&mut self) {
        if self.layouts.len() > MAX_LAYOUTS {
            for (_, l) in self.layouts.drain() {
                // SAFETY: created by layout(), destroyed once; no product is in flight on the host.
                unsafe {
                    let _ = result::destroy_matrix_layout(l);
                }
            }
        }
    }

    fn algo(&mut self, m: usize, n: usize, k: usize) -> Result<sys::cublasLtMatmulAlgo_t, String> {
        let mb = m_bucket(m) as u64;
        let key = (mb, n as u64, k as u64);
        if let Some(a) = self.algos.get(&key) {
            return Ok(*a);
        }
        let a_l = self.layout(true, k as u64, n as u64)?;
        let b_l = self.layout(true, k as u64, mb)?;
        let d_l = self.layout(false, n as u64, mb)?;
        let algo = unsafe {
            let pref = result::create_matmul_pref().map_err(err("pref"))?;
            let ws = WORKSPACE_BYTES;
            let r = result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws) as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            )
            .map_err(err("workspace pref"))
            .and_then(|()| {
                result::get_matmul_algo_heuristic(self.handle, self.desc, a_l, b_l, d_l, d_l, pref)
                    .map_err(err("heuristic"))
            });
            let _ = result::destroy_matmul_pref(pref);
            r?.algo
        };
        self.algos.insert(key, algo);
        Ok(algo)
    }

    /// `d[m, n] = x[m, k] · w[n, k]ᵀ` (`+ d` when `accumulate`: cuBLASLt's beta = 1 adds the
    /// residual for free); `x` and `w` are bf16 bits, `d` is f32; all device addresses.
    #[allow(clippy::too_many_arguments)]
    pub fn bf16_f32(
        &mut self,
        stream: &CudaStream,
        x: u64,
        w: u64,
        d: u64,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) -> Result<(), String> {
        self.trim();
        let algo = self.algo(m, n, k)?;
        let a_l = self.layout(true, k as u64, n as u64)?;
        let b_l = self.layout(true, k as u64, m as u64)?;
        let d_l = self.layout(false, n as u64, m as u64)?;
        let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
        unsafe {
            result::matmul(
                self.handle,
                self.desc,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                w as *const c_void,
                a_l,
                x as *const c_void,
                b_l,
                d as *const c_void,
                d_l,
                d as *mut c_void,
                d_l,
                &algo,
                self.ws_ptr as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(err("matmul"))
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        // SAFETY: created in new / layout, destroyed once.
        unsafe {
            for (_, l) in self.layouts.drain() {
                let _ = result::destroy_matrix_layout(l);
            }
            let _ = result::destroy_matmul_desc(self.desc);
            let _ = result::destroy_handle(self.handle);
        }
    }
}
