//! Backends: where tensors live and kernels run. `cpu` is the numerical reference; every other
//! backend's kernels are checked against it.
//!
//! The backend knows memory and kernels, never the model: the forward pass in `model/` is written
//! once against the [`Backend`] trait.

pub mod cpu;
pub mod cuda;

use crate::checkpoint::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    Unsupported(String),
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error("communication failed: {0}")]
    Comm(String),
}

/// Shape of the paged KV cache held by one rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub n_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    /// KV heads held by this rank.
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// Bytes of one block across all layers, K and V, at `elem_bytes` per element.
    pub fn block_bytes(&self, elem_bytes: usize) -> usize {
        2 * self.n_layers * self.block_size * self.n_kv_heads * self.head_dim * elem_bytes
    }
}

/// One sequence's part of a packed step: its new tokens are rows
/// `token_start..token_start + n_tokens` of the activations.
#[derive(Clone, Debug)]
pub struct SeqSpan {
    pub token_start: usize,
    pub n_tokens: usize,
    /// Tokens in the cache once this step has written its new ones (= position of the last new token + 1).
    pub context_len: usize,
    /// KV block ids holding positions `0..context_len`, in order.
    pub block_table: Vec<u32>,
}

impl SeqSpan {
    /// Position of this sequence's `j`-th new token.
    pub fn position(&self, j: usize) -> usize {
        self.context_len - self.n_tokens + j
    }
}

/// What attention needs to know about a packed step.
#[derive(Clone, Debug, Default)]
pub struct AttnBatch {
    pub seqs: Vec<SeqSpan>,
    /// Position of every token row.
    pub positions: Vec<u32>,
}

impl AttnBatch {
    pub fn new(seqs: Vec<SeqSpan>) -> Self {
        let mut positions = Vec::new();
        for s in &seqs {
            debug_assert_eq!(s.token_start, positions.len());
            positions.extend((0..s.n_tokens).map(|j| s.position(j) as u32));
        }
        AttnBatch { seqs, positions }
    }
    pub fn n_tokens(&self) -> usize {
        self.positions.len()
    }
}

/// Sampling parameters of one logits row, for backends that sample where the logits are
/// (see [`Backend::sample`]). Same meaning as the engine's `SamplingParams`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowSampling<'a> {
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
    /// The request's seed and how many tokens it has generated: the random number is
    /// `engine::sampler::uniform(seed, n)` on every device.
    pub seed: u64,
    pub n: u64,
    /// How many most-likely alternatives to report with their log-probs.
    pub top_logprobs: usize,
    /// Structured outputs: the allowed tokens, one bit per id (bit `j % 32` of word `j / 32`);
    /// the others are excluded as `engine::sampler::sample_masked` excludes them. `None`: all.
    pub mask: Option<&'a [u32]>,
}

/// A sampled token with its log-prob under the raw (temperature 1) distribution.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// A step a backend ran from a recording (see [`Backend::begin_step`]).
#[derive(Clone, Debug)]
pub enum Replayed {
    Sampled(Vec<Sampled>),
    /// `[logit_rows, vocab]` f32, row-major.
    Logits(Vec<f32>),
}

/// Kernels the Llama forward pass needs. Activations are row-major `[rows, cols]` matrices.
pub trait Backend: Send {
    type Act: Send;
    /// A 2-D weight `[out, in]` (used as `x · Wᵀ`).
    type Matrix: Send + Sync;
    /// A 1-D weight (norms).
    type Vector: Send + Sync;
    type Kv: Send;

    fn name(&self) -> String;
    fn load_matrix(&self, t: &Tensor) -> Result<Self::Matrix, BackendError>;
    fn load_vector(&self, t: &Tensor) -> Result<Self::Vector, BackendError>;
    /// One weight made of `parts` (2-D, one dtype and width) stacked along their rows: projections
    /// of the same input (Q/K/V, gate/up) run as one GEMM. The default copies them together.
    fn load_stacked(&self, parts: &[Tensor]) -> Result<Self::Matrix, BackendError> {
        let t = Tensor::concat_rows(parts).map_err(BackendError::Unsupported)?;
        self.load_matrix(&t)
    }
    fn alloc_kv(&self, shape: KvShape) -> Result<Self::Kv, BackendError>;

    /// Rows of `table` for each token.
    fn embed(&self, table: &Self::Matrix, tokens: &[u32]) -> Self::Act;
    fn rmsnorm(&self, x: &Self::Act, w: &Self::Vector, eps: f32) -> Self::Act;
    /// `x · Wᵀ`.
    fn matmul(&self, x: &Self::Act, w: &Self::Matrix) -> Self::Act;
    /// `qkv` is one GEMM's output, each row `[q (n_heads heads) | k | v (kv.shape.n_kv_heads
    /// heads each)]`: rotate q and k in place (interleaved pairs, Meta's convention) and write
    /// k, v into the paged cache.
    fn rope_store_kv(
        &self,
        qkv: &mut Self::Act,
        n_heads: usize,
        inv_freq: &[f32],
        kv: &mut Self::Kv,
        layer: usize,
        batch: &AttnBatch,
    );
    /// Copy KV block `src` to block `dst`, every layer, K and V (copy on write: a sequence takes
    /// over positions another one computed). Stream-ordered before the kernels launched after it.
    fn copy_kv_block(&self, kv: &mut Self::Kv, src: u32, dst: u32);
    /// Causal grouped-query attention of every query row over its sequence's cached keys/values.
    /// The query is the first `n_heads` heads of each row of `q`; a row may hold more (the
    /// fused `[q | k | v]`). The result is `[rows, n_heads * head_dim]`.
    fn attention(
        &self,
        q: &Self::Act,
        kv: &Self::Kv,
        layer: usize,
        n_heads: usize,
        batch: &AttnBatch,
    ) -> Self::Act;
    /// `silu(gate) * up` of a fused `[gate | up]` (each row: gate in its first half, up in the
    /// second), `[rows, cols / 2]`.
    fn silu_mul(&self, gate_up: &Self::Act) -> Self::Act;
    fn add_in_place(&self, x: &mut Self::Act, y: &Self::Act);
    fn select_rows(&self, x: &Self::Act, rows: &[usize]) -> Self::Act;
    /// Sum `x` over the tensor-parallel group (after row-parallel projections).
    fn all_reduce_sum(&self, x: &mut Self::Act) -> Result<(), BackendError>;
    /// Concatenate column shards over the tensor-parallel group (vocab-parallel logits).
    fn all_gather_cols(&self, x: Self::Act) -> Result<Self::Act, BackendError>;
    /// Copy to host memory as f32, row-major.
    fn to_host(&self, x: &Self::Act) -> Vec<f32>;
    /// Like `to_host`, for an activation no longer needed: a host backend hands its buffer over
    /// instead of copying it (the logits of a big batch are tens of MB per step).
    fn take_to_host(&self, x: Self::Act) -> Vec<f32> {
        self.to_host(&x)
    }

    // Additive methods with default implementations (the CPU backend keeps the defaults).

    /// `x += y`, then `rmsnorm(x)`: one fused kernel on the GPU.
    fn add_rmsnorm(
        &self,
        x: &mut Self::Act,
        y: &Self::Act,
        w: &Self::Vector,
        eps: f32,
    ) -> Self::Act {
        self.add_in_place(x, y);
        self.rmsnorm(x, w, eps)
    }
    /// Called before each forward pass with everything the step needs from the host, so that a
    /// device backend can send it in one copy. A backend that recorded a step of this shape may
    /// run it here: `Some` is then the step's result (sampled rows when `sampling` is given, one
    /// per logit row; else the logits) and the forward pass must be skipped. The CPU backend
    /// does nothing.
    fn begin_step(
        &self,
        _tokens: &[u32],
        _batch: &AttnBatch,
        _logit_rows: &[usize],
        _sampling: Option<&[RowSampling]>,
    ) -> Option<Result<Replayed, BackendError>> {
        None
    }
    /// `begin_step` for a step whose rows are sampled later, with masks not known yet
    /// (structured outputs: they are computed on the host while the device runs the forward).
    /// A backend that recorded this step's shape launches it here and answers `Some(Ok(()))`,
    /// its logits left on the device; on `None` the forward pass runs and hands its logits to
    /// [`Backend::logits_ready`]. Then [`Backend::sample_deferred`]. The default records
    /// nothing.
    fn begin_step_deferred(
        &self,
        _tokens: &[u32],
        _batch: &AttnBatch,
        _logit_rows: &[usize],
        _sampling: &[RowSampling],
    ) -> Option<Result<(), BackendError>> {
        None
    }
    /// A deferred step's forward pass is queued up to `logits` (a recording ends here and
    /// starts running). Nothing to do where kernels run as they are called.
    fn logits_ready(&self, _logits: &Self::Act) -> Result<(), BackendError> {
        Ok(())
    }
    /// Sample a deferred step's rows (masks included): `logits` from the forward pass, or
    /// `None` for the logits a launched recording left on the device. `None` back: "sample on
    /// the host", as from `sample`.
    fn sample_deferred(
        &self,
        logits: Option<&Self::Act>,
        rows: &[RowSampling],
    ) -> Option<Result<Vec<Sampled>, BackendError>> {
        logits.and_then(|l| self.sample(l, rows))
    }
    /// `x += a · Wᵀ` (the residual add of a projection): cuBLASLt adds it in the GEMM for free
    /// (beta = 1). The default is `matmul` then `add_in_place`.
    fn matmul_add(&self, x: &mut Self::Act, a: &Self::Act, w: &Self::Matrix) {
        let o = self.matmul(a, w);
        self.add_in_place(x, &o);
    }
    /// Sample every row of `logits` where it lives; `None` means "not supported here: copy the
    /// logits to the host and sample there" (the CPU backend, whose host sampler is the reference).
    fn sample(
        &self,
        _logits: &Self::Act,
        _rows: &[RowSampling],
    ) -> Option<Result<Vec<Sampled>, BackendError>> {
        None
    }
    /// Whether `sample` samples on the device (then a structured output's masks go with the
    /// step instead of being applied on the host).
    fn samples_on_device(&self) -> bool {
        false
    }
    /// Report a failure of asynchronous device work since the last check (kernel launches
    /// cannot return errors through the infallible methods above).
    fn check(&self) -> Result<(), BackendError> {
        Ok(())
    }
}
