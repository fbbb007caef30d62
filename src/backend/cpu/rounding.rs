//! `GpuRounding`: the CPU reference with the CUDA backend's bf16 roundings (for comparisons).

use super::{CpuAct, CpuBackend, CpuKv, CpuMatrix};
use crate::backend::{AttnBatch, Backend, BackendError, KvShape};
use crate::checkpoint::Tensor;

/// Round every value to the nearest bf16 (what the GPU stores), kept in f32.
fn round_bf16(v: &mut [f32]) {
    for x in v {
        *x = half::bf16::from_f32(*x).to_f32();
    }
}

/// The CPU backend rounding where the CUDA backend's bf16 numerics round: GEMM inputs and the KV
/// cache in bf16, everything else f32. With it the CUDA backend can be held to a tight tolerance
/// (only f32 reassociation differs) while the plain CPU backend measures what bf16 costs.
pub struct GpuRounding(pub CpuBackend);

impl Backend for GpuRounding {
    type Act = CpuAct;
    type Matrix = CpuMatrix;
    type Vector = Vec<f32>;
    type Kv = CpuKv;
    fn name(&self) -> String {
        "cpu rounding like the GPU".into()
    }
    fn load_matrix(&self, t: &Tensor) -> Result<CpuMatrix, BackendError> {
        self.0.load_matrix(t)
    }
    fn load_vector(&self, t: &Tensor) -> Result<Vec<f32>, BackendError> {
        self.0.load_vector(t)
    }
    fn load_stacked(&self, parts: &[Tensor]) -> Result<CpuMatrix, BackendError> {
        self.0.load_stacked(parts)
    }
    fn alloc_kv(&self, s: KvShape) -> Result<CpuKv, BackendError> {
        self.0.alloc_kv(s)
    }
    fn embed(&self, t: &CpuMatrix, tokens: &[u32]) -> CpuAct {
        self.0.embed(t, tokens)
    }
    fn rmsnorm(&self, x: &CpuAct, w: &Vec<f32>, eps: f32) -> CpuAct {
        self.0.rmsnorm(x, w, eps)
    }
    fn matmul(&self, x: &CpuAct, w: &CpuMatrix) -> CpuAct {
        let mut xb = x.clone();
        round_bf16(&mut xb.data);
        self.0.matmul(&xb, w)
    }
    fn rope_store_kv(
        &self,
        qkv: &mut CpuAct,
        n_heads: usize,
        inv_freq: &[f32],
        kv: &mut CpuKv,
        layer: usize,
        batch: &AttnBatch,
    ) {
        self.0
            .rope_store_kv(qkv, n_heads, inv_freq, kv, layer, batch);
        round_bf16(&mut kv.k[layer]);
        round_bf16(&mut kv.v[layer]);
    }
    fn copy_kv_block(&self, kv: &mut CpuKv, src: u32, dst: u32) {
        self.0.copy_kv_block(kv, src, dst)
    }
    fn attention(&self, q: &CpuAct, kv: &CpuKv, l: usize, h: usize, b: &AttnBatch) -> CpuAct {
        self.0.attention(q, kv, l, h, b)
    }
    fn silu_mul(&self, gate_up: &CpuAct) -> CpuAct {
        self.0.silu_mul(gate_up)
    }
    fn add_in_place(&self, x: &mut CpuAct, y: &CpuAct) {
        self.0.add_in_place(x, y)
    }
    fn select_rows(&self, x: &CpuAct, rows: &[usize]) -> CpuAct {
        self.0.select_rows(x, rows)
    }
    fn all_reduce_sum(&self, x: &mut CpuAct) -> Result<(), BackendError> {
        self.0.all_reduce_sum(x)
    }
    fn all_gather_cols(&self, x: CpuAct) -> Result<CpuAct, BackendError> {
        self.0.all_gather_cols(x)
    }
    fn to_host(&self, x: &CpuAct) -> Vec<f32> {
        self.0.to_host(x)
    }
}
