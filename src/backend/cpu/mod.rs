//! The CPU backend: the numerical reference. f32 arithmetic, weights kept in their stored dtype
//! and widened on use, both cores busy through rayon.

mod attention;
pub mod matmul;
mod rounding;

pub use rounding::GpuRounding;

use std::sync::Arc;

use rayon::prelude::*;

use super::{AttnBatch, Backend, BackendError, KvShape};
use crate::checkpoint::{DType, Tensor};
use crate::parallel::{HostComm, Solo};
pub use matmul::{CpuMatrix, MatrixData};

/// A row-major `[rows, cols]` f32 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuAct {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuAct {
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Paged KV cache: per layer, K and V as `[num_blocks, block_size, n_kv_heads, head_dim]` f32.
pub struct CpuKv {
    pub shape: KvShape,
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl CpuKv {
    /// Offset of (slot, head) in a layer's K or V buffer; slot = block * block_size + offset.
    #[inline]
    fn at(&self, slot: usize, head: usize) -> usize {
        (slot * self.shape.n_kv_heads + head) * self.shape.head_dim
    }
}

/// Slot of position `pos` in a block table.
#[inline]
fn slot(table: &[u32], block_size: usize, pos: usize) -> usize {
    table[pos / block_size] as usize * block_size + pos % block_size
}

pub struct CpuBackend {
    comm: Arc<dyn HostComm>,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend {
            comm: Arc::new(Solo),
        }
    }
}

impl CpuBackend {
    /// A backend whose collectives run over `comm` (tensor parallelism).
    pub fn with_comm(comm: Arc<dyn HostComm>) -> Self {
        CpuBackend { comm }
    }
}

impl Backend for CpuBackend {
    type Act = CpuAct;
    type Matrix = CpuMatrix;
    type Vector = Vec<f32>;
    type Kv = CpuKv;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn load_matrix(&self, t: &Tensor) -> Result<CpuMatrix, BackendError> {
        if t.shape.len() != 2 {
            return Err(BackendError::Unsupported(format!(
                "expected a 2-D weight, got shape {:?}",
                t.shape
            )));
        }
        let data = match t.dtype {
            DType::BF16 => MatrixData::Bf16(t.bytes.clone()),
            DType::F16 | DType::F32 => MatrixData::F32(t.to_f32_vec()),
        };
        Ok(CpuMatrix {
            rows: t.shape[0],
            cols: t.shape[1],
            data,
        })
    }

    fn load_vector(&self, t: &Tensor) -> Result<Vec<f32>, BackendError> {
        Ok(t.to_f32_vec())
    }

    fn load_stacked(&self, parts: &[Tensor]) -> Result<CpuMatrix, BackendError> {
        let parts = parts
            .iter()
            .map(|t| self.load_matrix(t))
            .collect::<Result<Vec<_>, _>>()?;
        let cols = parts.first().map_or(0, |p| p.cols);
        if let Some(p) = parts.iter().find(|p| p.cols != cols) {
            return Err(BackendError::Unsupported(format!(
                "cannot stack a weight of {} columns under one of {cols}",
                p.cols
            )));
        }
        Ok(CpuMatrix {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            data: MatrixData::Stacked(parts),
        })
    }

    fn alloc_kv(&self, shape: KvShape) -> Result<CpuKv, BackendError> {
        let per_layer = shape.num_blocks * shape.block_size * shape.n_kv_heads * shape.head_dim;
        // Zeroed allocations are mapped lazily: a large pool costs nothing until blocks are used.
        // Sizing against available memory is the caller's job (modes::setup checks it).
        let k = (0..shape.n_layers).map(|_| vec![0f32; per_layer]).collect();
        let v = (0..shape.n_layers).map(|_| vec![0f32; per_layer]).collect();
        Ok(CpuKv { shape, k, v })
    }

    fn copy_kv_block(&self, kv: &mut CpuKv, src: u32, dst: u32) {
        let s = kv.shape;
        let block = s.block_size * s.n_kv_heads * s.head_dim;
        let (src, dst) = (src as usize * block, dst as usize * block);
        for buf in kv.k.iter_mut().chain(kv.v.iter_mut()) {
            buf.copy_within(src..src + block, dst);
        }
    }

    fn embed(&self, table: &CpuMatrix, tokens: &[u32]) -> CpuAct {
        let cols = table.cols;
        let mut data = vec![0f32; tokens.len() * cols];
        for (row, &t) in data.chunks_exact_mut(cols).zip(tokens) {
            table.widen_row(t as usize, row);
        }
        CpuAct {
            rows: tokens.len(),
            cols,
            data,
        }
    }

    fn rmsnorm(&self, x: &CpuAct, w: &Vec<f32>, eps: f32) -> CpuAct {
        let mut out = x.clone();
        out.data.par_chunks_mut(x.cols).for_each(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for (v, g) in row.iter_mut().zip(w) {
                *v = *v * r * g;
            }
        });
        out
    }

    fn matmul(&self, x: &CpuAct, w: &CpuMatrix) -> CpuAct {
        CpuAct {
            rows: x.rows,
            cols: w.rows,
            data: matmul::matmul(&x.data, x.rows, w),
        }
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
        let hd = kv.shape.head_dim;
        let n_kv = kv.shape.n_kv_heads;
        // q's and k's heads are adjacent in each row: one rotation covers both.
        rotate(qkv, (n_heads + n_kv) * hd, hd, inv_freq, &batch.positions);
        let (k0, v0) = (n_heads * hd, (n_heads + n_kv) * hd);
        let bs = kv.shape.block_size;
        for s in &batch.seqs {
            for j in 0..s.n_tokens {
                let row = qkv.row(s.token_start + j);
                let at = kv.at(slot(&s.block_table, bs, s.position(j)), 0);
                kv.k[layer][at..at + n_kv * hd].copy_from_slice(&row[k0..v0]);
                kv.v[layer][at..at + n_kv * hd].copy_from_slice(&row[v0..v0 + n_kv * hd]);
            }
        }
    }

    fn attention(
        &self,
        q: &CpuAct,
        kv: &CpuKv,
        layer: usize,
        n_heads: usize,
        batch: &AttnBatch,
    ) -> CpuAct {
        attention::paged_attention(q, kv, layer, n_heads, batch)
    }

    fn silu_mul(&self, gate_up: &CpuAct) -> CpuAct {
        let f = gate_up.cols / 2;
        let mut data = vec![0f32; gate_up.rows * f];
        data.par_chunks_mut(f.max(1))
            .zip(gate_up.data.par_chunks(gate_up.cols.max(1)))
            .for_each(|(out, row)| {
                let (gate, up) = row.split_at(f);
                for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            });
        CpuAct {
            rows: gate_up.rows,
            cols: f,
            data,
        }
    }

    fn add_in_place(&self, x: &mut CpuAct, y: &CpuAct) {
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
    }

    fn select_rows(&self, x: &CpuAct, rows: &[usize]) -> CpuAct {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            data.extend_from_slice(x.row(r));
        }
        CpuAct {
            rows: rows.len(),
            cols: x.cols,
            data,
        }
    }

    fn all_reduce_sum(&self, x: &mut CpuAct) -> Result<(), BackendError> {
        self.comm
            .all_reduce_sum(&mut x.data)
            .map_err(|e| BackendError::Comm(e.to_string()))
    }

    fn all_gather_cols(&self, x: CpuAct) -> Result<CpuAct, BackendError> {
        let world = self.comm.size();
        if world == 1 {
            return Ok(x);
        }
        let all = self
            .comm
            .all_gather(&x.data)
            .map_err(|e| BackendError::Comm(e.to_string()))?;
        // all = [rank][rows][cols]; result = [rows][rank][cols]
        let (rows, cols) = (x.rows, x.cols);
        let mut data = vec![0f32; rows * cols * world];
        for r in 0..world {
            for i in 0..rows {
                let src = &all[(r * rows + i) * cols..(r * rows + i + 1) * cols];
                data[(i * world + r) * cols..(i * world + r + 1) * cols].copy_from_slice(src);
            }
        }
        Ok(CpuAct {
            rows,
            cols: cols * world,
            data,
        })
    }

    fn to_host(&self, x: &CpuAct) -> Vec<f32> {
        x.data.clone()
    }

    fn take_to_host(&self, x: CpuAct) -> Vec<f32> {
        x.data
    }
}

/// Rotate interleaved pairs (x[2i], x[2i+1]) of every head in the first `width` columns of
/// each row by position · inv_freq[i].
fn rotate(x: &mut CpuAct, width: usize, head_dim: usize, inv_freq: &[f32], positions: &[u32]) {
    let cols = x.cols;
    x.data
        .par_chunks_mut(cols)
        .zip(positions)
        .for_each(|(row, &pos)| {
            for head in row[..width].chunks_exact_mut(head_dim) {
                for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                    // The angle is rounded to f32 before cos/sin, as torch does.
                    let angle = pos as f32 * inv_freq[i];
                    let (s, c) = angle.sin_cos();
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * s;
                    pair[1] = a * s + b * c;
                }
            }
        });
}

#[cfg(test)]
mod copy_tests {
    use super::*;

    #[test]
    fn a_kv_block_copy_moves_every_layer_k_and_v_and_nothing_else() {
        let shape = KvShape {
            n_layers: 2,
            num_blocks: 3,
            block_size: 2,
            n_kv_heads: 2,
            head_dim: 4,
        };
        let b = CpuBackend::default();
        let mut kv = b.alloc_kv(shape).unwrap();
        for (i, buf) in kv.k.iter_mut().chain(kv.v.iter_mut()).enumerate() {
            for (j, x) in buf.iter_mut().enumerate() {
                *x = (i * 1000 + j) as f32;
            }
        }
        let before = (kv.k.clone(), kv.v.clone());
        b.copy_kv_block(&mut kv, 2, 0);
        let block = 2 * 2 * 4;
        for (got, was) in
            kv.k.iter()
                .chain(&kv.v)
                .zip(before.0.iter().chain(&before.1))
        {
            assert_eq!(got[..block], was[2 * block..]);
            assert_eq!(got[block..], was[block..]);
        }
    }
}
