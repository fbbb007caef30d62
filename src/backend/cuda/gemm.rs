//! `x · Wᵀ` through cuBLASLt: bf16 operands, f32 accumulation, f32 output.
//!
//! cuBLAS is column-major. Row-major `W [n, k]` is column-major `Wᵀ (k × n)`, row-major
//! `X [m, k]` is column-major `Xᵀ (k × m)`, and row-major `D [m, n]` is column-major `Dᵀ (n × m)`.
//! So `Dᵀ = op(A) · B` with `A = W` transposed (`op(A) = W`, n × k) and `B = Xᵀ`: no copies.
//! NOTE: never run on a GPU yet.

use std::ffi::c_void;

use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

/// A cuBLASLt handle with its own workspace (Hopper wants 32 MiB).
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
}

// SAFETY: the handle is only used from the backend's one stream, by one thread at a time.
unsafe impl Send for Gemm {}
unsafe impl Sync for Gemm {}

pub const WORKSPACE_BYTES: usize = 32 << 20;

impl Gemm {
    pub fn new(stream: &std::sync::Arc<CudaStream>) -> Result<Self, String> {
        let handle = result::create_handle().map_err(|e| format!("cublasLtCreate: {e:?}"))?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(|e| format!("cuBLASLt workspace: {e}"))?;
        Ok(Gemm { handle, workspace })
    }

    /// `d[m, n] = x[m, k] · w[n, k]ᵀ`; `x` and `w` hold bf16 bits, `d` is f32.
    #[allow(clippy::too_many_arguments)]
    pub fn bf16_f32(
        &mut self,
        stream: &CudaStream,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u8>,
        d: &mut CudaSlice<f32>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<(), String> {
        let e = |what: &'static str| {
            move |err: result::CublasError| format!("cuBLASLt {what}: {err:?}")
        };
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        let f32t = sys::cudaDataType_t::CUDA_R_32F;
        unsafe {
            let a_l = result::create_matrix_layout(bf16, k as u64, n as u64, k as i64)
                .map_err(e("layout A"))?;
            let b_l = result::create_matrix_layout(bf16, k as u64, m as u64, k as i64)
                .map_err(e("layout B"))?;
            let d_l = result::create_matrix_layout(f32t, n as u64, m as u64, n as i64)
                .map_err(e("layout D"))?;
            let desc =
                result::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, f32t)
                    .map_err(e("desc"))?;
            let trans: i32 = 1; // CUBLAS_OP_T
            let r = (|| -> Result<(), String> {
                result::set_matmul_desc_attribute(
                    desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    (&trans) as *const i32 as *const c_void,
                    std::mem::size_of::<i32>(),
                )
                .map_err(e("transa"))?;
                let pref = result::create_matmul_pref().map_err(e("pref"))?;
                let ws = WORKSPACE_BYTES;
                let r2 = (|| -> Result<(), String> {
                    result::set_matmul_pref_attribute(
                        pref,
                        sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                        (&ws) as *const usize as *const c_void,
                        std::mem::size_of::<usize>(),
                    )
                    .map_err(e("workspace pref"))?;
                    // TODO(perf): cache the heuristic per (m, n, k); it costs tens of µs per call.
                    let heur = result::get_matmul_algo_heuristic(
                        self.handle,
                        desc,
                        a_l,
                        b_l,
                        d_l,
                        d_l,
                        pref,
                    )
                    .map_err(e("heuristic"))?;
                    let (alpha, beta) = (1f32, 0f32);
                    let (wp, _g1) = w.device_ptr(stream);
                    let (xp, _g2) = x.device_ptr(stream);
                    let (dp, _g3) = d.device_ptr_mut(stream);
                    let (wsp, _g4) = self.workspace.device_ptr_mut(stream);
                    result::matmul(
                        self.handle,
                        desc,
                        (&alpha) as *const f32 as *const c_void,
                        (&beta) as *const f32 as *const c_void,
                        wp as *const c_void,
                        a_l,
                        xp as *const c_void,
                        b_l,
                        dp as *const c_void,
                        d_l,
                        dp as *mut c_void,
                        d_l,
                        &heur.algo,
                        wsp as *mut c_void,
                        ws,
                        stream.cu_stream() as sys::cudaStream_t,
                    )
                    .map_err(e("matmul"))
                })();
                let _ = result::destroy_matmul_pref(pref);
                r2
            })();
            let _ = result::destroy_matmul_desc(desc);
            let _ = result::destroy_matrix_layout(a_l);
            let _ = result::destroy_matrix_layout(b_l);
            let _ = result::destroy_matrix_layout(d_l);
            r
        }
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        // SAFETY: created in new, destroyed once.
        unsafe {
            let _ = result::destroy_handle(self.handle);
        }
    }
}
