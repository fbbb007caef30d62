//! The Llama 3 transformer, written once over the [`Backend`] trait.

use std::time::Instant;

use super::config::LlamaConfig;
use super::shard::ShardPlan;
use super::{with_masks, ModelError, ModelRunner, RowMasks, StepInput, StepOutput};
use crate::backend::{AttnBatch, Backend, KvShape, Replayed, RowSampling};
use crate::checkpoint::{Slice, TensorSource};

struct Layer<B: Backend> {
    attention_norm: B::Vector,
    /// This rank's rows of wq, wk and wv stacked: one GEMM gives `[q | k | v]` per token.
    wqkv: B::Matrix,
    wo: B::Matrix,
    ffn_norm: B::Vector,
    /// This rank's rows of w1 (gate) and w3 (up) stacked: one GEMM gives `[gate | up]`.
    w13: B::Matrix,
    w2: B::Matrix,
}

/// One rank's shard of a Llama model plus its KV cache.
pub struct Llama<B: Backend> {
    cfg: LlamaConfig,
    shard: ShardPlan,
    backend: B,
    tok_embeddings: B::Matrix,
    layers: Vec<Layer<B>>,
    norm: B::Vector,
    output: B::Matrix,
    inv_freq: Vec<f32>,
    kv: B::Kv,
    kv_shape: KvShape,
    load_seconds: f64,
}

/// Expected full shape of every tensor a config implies (Meta names).
pub fn tensor_specs(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (d, hd) = (cfg.dim, cfg.head_dim);
    let mut v = vec![
        ("tok_embeddings.weight".to_string(), vec![cfg.vocab_size, d]),
        ("norm.weight".to_string(), vec![d]),
    ];
    if !cfg.tie_embeddings {
        v.push(("output.weight".to_string(), vec![cfg.vocab_size, d]));
    }
    for l in 0..cfg.n_layers {
        let p = |s: &str| format!("layers.{l}.{s}");
        v.push((p("attention_norm.weight"), vec![d]));
        v.push((p("attention.wq.weight"), vec![cfg.n_heads * hd, d]));
        v.push((p("attention.wk.weight"), vec![cfg.n_kv_heads * hd, d]));
        v.push((p("attention.wv.weight"), vec![cfg.n_kv_heads * hd, d]));
        v.push((p("attention.wo.weight"), vec![d, cfg.n_heads * hd]));
        v.push((p("ffn_norm.weight"), vec![d]));
        v.push((p("feed_forward.w1.weight"), vec![cfg.ffn_dim, d]));
        v.push((p("feed_forward.w2.weight"), vec![d, cfg.ffn_dim]));
        v.push((p("feed_forward.w3.weight"), vec![cfg.ffn_dim, d]));
    }
    v
}

impl<B: Backend> Llama<B> {
    /// Load this rank's shard from `src` and allocate a KV pool of `kv_blocks` blocks.
    pub fn load(
        backend: B,
        src: &dyn TensorSource,
        cfg: &LlamaConfig,
        shard: ShardPlan,
        kv_blocks: usize,
        block_size: usize,
    ) -> Result<Self, ModelError> {
        ShardPlan::check(shard.tp, cfg).map_err(|e| ModelError::Config(e.to_string()))?;
        let t0 = Instant::now();
        // Check every shape first, so a wrong checkpoint fails before anything big is loaded.
        let specs = tensor_specs(cfg);
        for (name, want) in &specs {
            let got = src.shape(name)?;
            if &got != want {
                return Err(ModelError::Shape {
                    tensor: name.clone(),
                    got,
                    want: want.clone(),
                    origin: src.describe(),
                });
            }
        }
        let matrix = |name: &str, slice: Option<Slice>| -> Result<B::Matrix, ModelError> {
            let t = src.load(name, slice)?;
            backend
                .load_matrix(&t)
                .map_err(|e| ModelError::Backend(format!("{name}: {e}")))
        };
        // Projections of the same input, loaded as one weight (their rows stacked in order).
        let stacked = |parts: &[(String, Slice)]| -> Result<B::Matrix, ModelError> {
            let names = parts
                .iter()
                .map(|p| p.0.as_str())
                .collect::<Vec<_>>()
                .join(" + ");
            let tensors = parts
                .iter()
                .map(|(name, slice)| src.load(name, Some(*slice)))
                .collect::<Result<Vec<_>, _>>()?;
            backend
                .load_stacked(&tensors)
                .map_err(|e| ModelError::Backend(format!("{names}: {e}")))
        };
        let vector = |name: &str| -> Result<B::Vector, ModelError> {
            let t = src.load(name, None)?;
            backend
                .load_vector(&t)
                .map_err(|e| ModelError::Backend(format!("{name}: {e}")))
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let p = |s: &str| format!("layers.{l}.{s}");
            layers.push(Layer {
                attention_norm: vector(&p("attention_norm.weight"))?,
                wqkv: stacked(&[
                    (p("attention.wq.weight"), shard.wq(cfg)),
                    (p("attention.wk.weight"), shard.wkv(cfg)),
                    (p("attention.wv.weight"), shard.wkv(cfg)),
                ])?,
                wo: matrix(&p("attention.wo.weight"), Some(shard.wo(cfg)))?,
                ffn_norm: vector(&p("ffn_norm.weight"))?,
                w13: stacked(&[
                    (p("feed_forward.w1.weight"), shard.w13(cfg)),
                    (p("feed_forward.w3.weight"), shard.w13(cfg)),
                ])?,
                w2: matrix(&p("feed_forward.w2.weight"), Some(shard.w2(cfg)))?,
            });
        }
        let output_name = if cfg.tie_embeddings {
            "tok_embeddings.weight"
        } else {
            "output.weight"
        };
        let output = matrix(output_name, Some(shard.output(cfg)))?;
        let tok_embeddings = matrix("tok_embeddings.weight", None)?;
        let norm = vector("norm.weight")?;
        let kv_shape = KvShape {
            n_layers: cfg.n_layers,
            num_blocks: kv_blocks,
            block_size,
            n_kv_heads: shard.local_kv_heads(cfg),
            head_dim: cfg.head_dim,
        };
        let kv = backend
            .alloc_kv(kv_shape)
            .map_err(|e| ModelError::Backend(e.to_string()))?;
        Ok(Llama {
            cfg: cfg.clone(),
            shard,
            backend,
            tok_embeddings,
            layers,
            norm,
            output,
            inv_freq: cfg.rope_inv_freq(),
            kv,
            kv_shape,
            load_seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// Seconds spent loading weights.
    pub fn load_seconds(&self) -> f64 {
        self.load_seconds
    }
}

impl<B: Backend> ModelRunner for Llama<B> {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn kv_shape(&self) -> KvShape {
        self.kv_shape
    }

    fn backend_name(&self) -> String {
        self.backend.name()
    }

    fn forward(&mut self, step: &StepInput) -> Result<Vec<f32>, ModelError> {
        let batch = self.step_batch(step)?;
        self.copy_blocks(step);
        let backend_err = |e: crate::backend::BackendError| ModelError::Backend(e.to_string());
        // A backend that recorded this step's shape (a CUDA graph) runs it here.
        match self
            .backend
            .begin_step(&step.tokens, &batch, &step.logit_rows, None)
        {
            Some(Ok(Replayed::Logits(v))) => {
                self.backend.check().map_err(backend_err)?;
                return Ok(v);
            }
            Some(Ok(Replayed::Sampled(_))) => {
                return Err(ModelError::Backend(
                    "the backend sampled a step that asked for logits".into(),
                ))
            }
            Some(Err(e)) => return Err(backend_err(e)),
            None => {}
        }
        let logits = self.logits(step, &batch)?;
        let host = self.backend.take_to_host(logits);
        self.backend
            .check()
            .map_err(|e| ModelError::Backend(e.to_string()))?;
        Ok(host)
    }

    fn forward_sample(
        &mut self,
        step: &StepInput,
        rows: &[RowSampling],
    ) -> Result<StepOutput, ModelError> {
        let batch = self.step_batch(step)?;
        self.copy_blocks(step);
        let backend_err = |e: crate::backend::BackendError| ModelError::Backend(e.to_string());
        // A backend that recorded this step's shape (a CUDA graph) runs it here.
        if let Some(r) = self
            .backend
            .begin_step(&step.tokens, &batch, &step.logit_rows, Some(rows))
        {
            let out = match r.map_err(backend_err)? {
                Replayed::Sampled(s) => StepOutput::Sampled(s),
                Replayed::Logits(v) => StepOutput::Logits(v),
            };
            self.backend.check().map_err(backend_err)?;
            return Ok(out);
        }
        let logits = self.logits(step, &batch)?;
        let out = match self.backend.sample(&logits, rows) {
            Some(r) => StepOutput::Sampled(r.map_err(backend_err)?),
            None => StepOutput::Logits(self.backend.take_to_host(logits)),
        };
        self.backend.check().map_err(backend_err)?;
        Ok(out)
    }

    /// The forward is queued (a recorded step's one launch, or its kernels one by one, up to
    /// the logits) before `masks` runs on this thread, so the device computes while the host
    /// does; then the masks go up and the rows are sampled where the logits are.
    fn forward_sample_masked(
        &mut self,
        step: &StepInput,
        rows: &[RowSampling],
        masks: &mut dyn FnMut() -> RowMasks,
    ) -> Result<StepOutput, ModelError> {
        let batch = self.step_batch(step)?;
        self.copy_blocks(step);
        let backend_err = |e: crate::backend::BackendError| ModelError::Backend(e.to_string());
        // A recorded step is launched here (Some); else its kernels are queued one by one.
        let launched =
            self.backend
                .begin_step_deferred(&step.tokens, &batch, &step.logit_rows, rows);
        let logits = match launched {
            Some(r) => {
                r.map_err(backend_err)?;
                None
            }
            None => {
                let logits = self.logits(step, &batch)?;
                self.backend.logits_ready(&logits).map_err(backend_err)?;
                Some(logits)
            }
        };
        let words = masks();
        let rows = with_masks(rows, &words);
        let out = match (self.backend.sample_deferred(logits.as_ref(), &rows), logits) {
            (Some(r), _) => StepOutput::Sampled(r.map_err(backend_err)?),
            (None, Some(l)) => StepOutput::Logits(self.backend.take_to_host(l)),
            (None, None) => {
                return Err(ModelError::Backend(
                    "the backend launched a recorded step but cannot sample it".into(),
                ))
            }
        };
        self.backend.check().map_err(backend_err)?;
        Ok(out)
    }

    fn samples_on_device(&self) -> bool {
        self.backend.samples_on_device()
    }
}

impl<B: Backend> Llama<B> {
    /// The step's attention batch, after checking its tokens and plan.
    fn step_batch(&self, step: &StepInput) -> Result<AttnBatch, ModelError> {
        let cfg = &self.cfg;
        if let Some(&t) = step.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {t} is outside the vocabulary (size {})",
                cfg.vocab_size
            )));
        }
        let blocks = self.kv_shape.num_blocks;
        if let Some(&(a, b)) = step
            .kv_copies
            .iter()
            .find(|&&(a, b)| a == b || a as usize >= blocks || b as usize >= blocks)
        {
            return Err(ModelError::Input(format!(
                "KV block copy {a} -> {b} is not between two blocks of the {blocks} in the pool"
            )));
        }
        let batch = AttnBatch::new(step.seqs.clone());
        if batch.n_tokens() != step.tokens.len() {
            return Err(ModelError::Input(
                "step plan and token count disagree".into(),
            ));
        }
        Ok(batch)
    }

    /// The step's KV block copies, before anything of the step runs (step_batch checked them).
    fn copy_blocks(&mut self, step: &StepInput) {
        for &(src, dst) in &step.kv_copies {
            self.backend.copy_kv_block(&mut self.kv, src, dst);
        }
    }

    /// The forward pass up to the logits `[logit_rows, vocab]`, left where the backend keeps them.
    fn logits(&mut self, step: &StepInput, batch: &AttnBatch) -> Result<B::Act, ModelError> {
        let b = &self.backend;
        let cfg = &self.cfg;
        let n_heads = self.shard.local_heads(cfg);
        let comm_err = |e: crate::backend::BackendError| ModelError::Backend(e.to_string());
        let mut x = b.embed(&self.tok_embeddings, &step.tokens);
        // One GPU: each residual add rides on its projection's GEMM (x += a·Wᵀ). Tensor
        // parallel: the partial products are summed over the ranks first, and the add is fused
        // with the norm that follows it (x += down; h = norm(x)): `pending` is the branch output
        // not yet added to x. The same operations in the same order on the CPU either way.
        let solo = self.shard.tp == 1;
        let mut pending: Option<B::Act> = None;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = match pending.take() {
                Some(d) => b.add_rmsnorm(&mut x, &d, &layer.attention_norm, cfg.norm_eps),
                None => b.rmsnorm(&x, &layer.attention_norm, cfg.norm_eps),
            };
            let mut qkv = b.matmul(&h, &layer.wqkv);
            b.rope_store_kv(&mut qkv, n_heads, &self.inv_freq, &mut self.kv, l, batch);
            let attn = b.attention(&qkv, &self.kv, l, n_heads, batch);
            let h = if solo {
                b.matmul_add(&mut x, &attn, &layer.wo);
                b.rmsnorm(&x, &layer.ffn_norm, cfg.norm_eps)
            } else {
                let mut o = b.matmul(&attn, &layer.wo);
                b.all_reduce_sum(&mut o).map_err(comm_err)?;
                b.add_rmsnorm(&mut x, &o, &layer.ffn_norm, cfg.norm_eps)
            };
            let act = b.silu_mul(&b.matmul(&h, &layer.w13));
            if solo {
                b.matmul_add(&mut x, &act, &layer.w2);
            } else {
                let mut down = b.matmul(&act, &layer.w2);
                b.all_reduce_sum(&mut down).map_err(comm_err)?;
                pending = Some(down);
            }
        }
        if let Some(d) = pending {
            b.add_in_place(&mut x, &d);
        }
        // Only the rows that need logits go through the vocab projection.
        let x = b.select_rows(&x, &step.logit_rows);
        let x = b.rmsnorm(&x, &self.norm, cfg.norm_eps);
        b.all_gather_cols(b.matmul(&x, &self.output))
            .map_err(comm_err)
    }
}
