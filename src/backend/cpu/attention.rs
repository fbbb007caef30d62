//! Causal grouped-query attention over the paged KV cache, one (token, head) per task.

use rayon::prelude::*;

use super::{slot, CpuAct, CpuKv};
use crate::backend::AttnBatch;

pub fn paged_attention(
    q: &CpuAct,
    kv: &CpuKv,
    layer: usize,
    n_heads: usize,
    batch: &AttnBatch,
) -> CpuAct {
    let hd = kv.shape.head_dim;
    let bs = kv.shape.block_size;
    let group = n_heads / kv.shape.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let (kc, vc) = (&kv.k[layer], &kv.v[layer]);
    // Which sequence each row belongs to.
    let mut row_seq = vec![0usize; q.rows];
    for (si, s) in batch.seqs.iter().enumerate() {
        row_seq[s.token_start..s.token_start + s.n_tokens].fill(si);
    }
    let mut out = vec![0f32; q.rows * n_heads * hd];
    out.par_chunks_mut(hd)
        .enumerate()
        .for_each_init(Vec::new, |scores, (task, o)| {
            let (row, h) = (task / n_heads, task % n_heads);
            let s = &batch.seqs[row_seq[row]];
            let kvh = h / group;
            let qv = &q.data[row * q.cols + h * hd..row * q.cols + (h + 1) * hd];
            // Causal: a token sees every cached position up to its own.
            let n_ctx = s.position(row - s.token_start) + 1;
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for p in 0..n_ctx {
                let at = kv.at(slot(&s.block_table, bs, p), kvh);
                let d: f32 = qv
                    .iter()
                    .zip(&kc[at..at + hd])
                    .map(|(a, b)| a * b)
                    .sum::<f32>()
                    * scale;
                max = max.max(d);
                scores.push(d);
            }
            let mut denom = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                denom += *sc;
            }
            o.fill(0.0);
            for (p, &w) in scores.iter().enumerate() {
                let at = kv.at(slot(&s.block_table, bs, p), kvh);
                for (oi, vi) in o.iter_mut().zip(&vc[at..at + hd]) {
                    *oi += w * vi;
                }
            }
            let inv = 1.0 / denom;
            o.iter_mut().for_each(|x| *x *= inv);
        });
    CpuAct {
        rows: q.rows,
        cols: n_heads * hd,
        data: out,
    }
}
