//! Random weights generated on demand, for benchmarks and tests without a checkpoint.
//!
//! Every element is a pure function of (seed, tensor name, flat element index), so any slice
//! can be generated alone and equals the same part of the full tensor, on any rank.

use super::{Bytes, CheckpointError, DType, Slice, Tensor, TensorSource};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

/// splitmix64 finalizer: a good 64-bit mix, cheap enough for billions of elements.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a, then mixed: names differ in few bytes ("layers.1" vs "layers.2").
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// f32 -> bf16 bits, round-to-nearest-even, for finite values of moderate size (all this
/// module makes); inlined here because it dominates generation time.
#[inline]
fn bf16_bits(f: f32) -> u16 {
    let x = f.to_bits();
    ((x + 0x7fff + ((x >> 16) & 1)) >> 16) as u16
}

/// How a tensor's values are drawn: `center + scale * u`, `u` uniform in [-1, 1).
#[derive(Clone, Copy, Debug)]
struct Dist {
    center: f32,
    scale: f32,
}

fn dist(name: &str, shape: &[usize]) -> Dist {
    // Uniform on [-a, a) has std a/sqrt(3).
    let uniform_std = |std: f32| Dist {
        center: 0.0,
        scale: std * 3f32.sqrt(),
    };
    if shape.len() <= 1 || name.contains("norm") {
        // Norm gains near 1 keep RMSNorm outputs at unit scale.
        Dist {
            center: 1.0,
            scale: 0.05,
        }
    } else {
        // 1/sqrt(fan_in) keeps each matmul output at the scale of its (normalized) input. The
        // embedding follows the same rule so that tied models (random:tiny, random:1b) get logits of
        // unit scale: varied text, not one token repeated.
        uniform_std(1.0 / (shape[1].max(1) as f32).sqrt())
    }
}

/// Elements generated per parallel task.
const CHUNK: usize = 1 << 16;

/// Synthetic bf16 weights for a fixed list of tensor names and shapes.
pub struct SyntheticSource {
    seed: u64,
    specs: Vec<(String, Vec<usize>)>,
    index: HashMap<String, usize>,
}

impl SyntheticSource {
    /// A source holding exactly `specs` (Meta names and full shapes), values fixed by `seed`.
    pub fn new(seed: u64, specs: Vec<(String, Vec<usize>)>) -> SyntheticSource {
        let index = specs
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        SyntheticSource { seed, specs, index }
    }

    /// The tensor list of a Llama model with these sizes, in Meta names.
    pub fn llama_specs(
        dim: usize,
        n_layers: usize,
        n_heads: usize,
        n_kv_heads: usize,
        ffn_dim: usize,
        vocab: usize,
    ) -> Vec<(String, Vec<usize>)> {
        let hd = dim / n_heads.max(1);
        let mut v = vec![("tok_embeddings.weight".to_string(), vec![vocab, dim])];
        for l in 0..n_layers {
            let p = format!("layers.{l}.");
            v.push((format!("{p}attention.wq.weight"), vec![n_heads * hd, dim]));
            v.push((
                format!("{p}attention.wk.weight"),
                vec![n_kv_heads * hd, dim],
            ));
            v.push((
                format!("{p}attention.wv.weight"),
                vec![n_kv_heads * hd, dim],
            ));
            v.push((format!("{p}attention.wo.weight"), vec![dim, n_heads * hd]));
            v.push((format!("{p}feed_forward.w1.weight"), vec![ffn_dim, dim]));
            v.push((format!("{p}feed_forward.w2.weight"), vec![dim, ffn_dim]));
            v.push((format!("{p}feed_forward.w3.weight"), vec![ffn_dim, dim]));
            v.push((format!("{p}attention_norm.weight"), vec![dim]));
            v.push((format!("{p}ffn_norm.weight"), vec![dim]));
        }
        v.push(("norm.weight".to_string(), vec![dim]));
        v.push(("output.weight".to_string(), vec![vocab, dim]));
        v
    }

    /// Element value at flat index `i` of a tensor with key `key`.
    #[inline]
    fn value(key: u64, d: Dist, i: u64) -> u16 {
        let r = mix(key ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // Top 24 bits -> [0, 1) exactly representable in f32, then to [-1, 1).
        let u = (r >> 40) as f32 * (1.0 / (1u64 << 24) as f32) * 2.0 - 1.0;
        bf16_bits(d.center + d.scale * u)
    }
}

impl TensorSource for SyntheticSource {
    fn names(&self) -> Vec<String> {
        self.specs.iter().map(|(n, _)| n.clone()).collect()
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>, CheckpointError> {
        self.index
            .get(name)
            .map(|&i| self.specs[i].1.clone())
            .ok_or_else(|| CheckpointError::Missing(name.to_string()))
    }

    fn load(&self, name: &str, slice: Option<Slice>) -> Result<Tensor, CheckpointError> {
        let full = self.shape(name)?;
        let s = slice.unwrap_or(Slice {
            dim: 0,
            start: 0,
            len: full.first().copied().unwrap_or(1),
        });
        let rank = full.len().max(1);
        let dims: Vec<usize> = if full.is_empty() {
            vec![1]
        } else {
            full.clone()
        };
        if s.dim >= rank || s.start.checked_add(s.len).is_none_or(|e| e > dims[s.dim]) {
            return Err(CheckpointError::Tensor {
                path: "synthetic".into(),
                tensor: name.to_string(),
                msg: format!("slice {s:?} is outside shape {full:?}"),
            });
        }
        let inner: usize = dims[s.dim + 1..].iter().product();
        let mut shape = full.clone();
        if !shape.is_empty() {
            shape[s.dim] = s.len;
        }
        let numel: usize = shape.iter().product();
        let key = mix(self.seed ^ name_hash(name));
        let d = dist(name, &full);
        // Output element o sits at (outer a, row b of the slice, inner c); its full index is
        // a*dims[dim]*inner + (start+b)*inner + c. Rows of `inner` elements are contiguous in both.
        let full_index = |o: usize| -> u64 {
            let row = o / inner.max(1);
            let c = o % inner.max(1);
            let (a, b) = (row / s.len.max(1), row % s.len.max(1));
            ((a * dims[s.dim] + s.start + b) * inner + c) as u64
        };
        let mut out = vec![0u8; numel * 2];
        out.par_chunks_mut(CHUNK * 2)
            .enumerate()
            .for_each(|(ci, chunk)| {
                let o0 = ci * CHUNK;
                let n = chunk.len() / 2;
                let mut o = o0;
                while o < o0 + n {
                    // One contiguous run: the rest of the current row.
                    let run = (inner - o % inner).min(o0 + n - o);
                    let f0 = full_index(o);
                    let dst = &mut chunk[2 * (o - o0)..2 * (o - o0 + run)];
                    for (k, e) in dst.chunks_exact_mut(2).enumerate() {
                        let v = Self::value(key, d, f0 + k as u64);
                        e.copy_from_slice(&v.to_le_bytes());
                    }
                    o += run;
                }
            });
        Ok(Tensor {
            dtype: DType::BF16,
            shape,
            bytes: Bytes::Owned(Arc::new(out)),
        })
    }

    fn describe(&self) -> String {
        format!(
            "synthetic random bf16 (seed {}, {} tensors)",
            self.seed,
            self.specs.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_half() {
        for i in 0..200_000u32 {
            let f = (i as f32 - 100_000.0) * 1.37e-5;
            assert_eq!(bf16_bits(f), half::bf16::from_f32(f).to_bits(), "{f}");
        }
        // Exact ties between two bf16 values round to even.
        for f in [
            1.0f32,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -0.0,
            0.0,
            3.0,
            0.1,
        ] {
            assert_eq!(bf16_bits(f), half::bf16::from_f32(f).to_bits(), "{f}");
        }
    }

    #[test]
    fn slice_equals_part_of_full() {
        let src = SyntheticSource::new(
            7,
            vec![
                ("a.weight".into(), vec![5, 7, 3]),
                ("n.norm.weight".into(), vec![11]),
            ],
        );
        let full = src.load("a.weight", None).unwrap().to_f32_vec();
        for dim in 0..3 {
            let n = [5, 7, 3][dim];
            for start in 0..n {
                for len in 0..=(n - start) {
                    let t = src
                        .load("a.weight", Some(Slice { dim, start, len }))
                        .unwrap();
                    let got = t.to_f32_vec();
                    let mut want = Vec::new();
                    for i in 0..5 {
                        for j in 0..7 {
                            for k in 0..3 {
                                let idx = [i, j, k];
                                if idx[dim] >= start && idx[dim] < start + len {
                                    want.push(full[(i * 7 + j) * 3 + k]);
                                }
                            }
                        }
                    }
                    assert_eq!(got, want, "dim {dim} start {start} len {len}");
                }
            }
        }
        let norm = src.load("n.norm.weight", None).unwrap().to_f32_vec();
        assert!(norm.iter().all(|&x| (0.9..=1.1).contains(&x)));
    }
}
