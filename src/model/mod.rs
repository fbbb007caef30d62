//! Model layer: Llama config, the forward pass over a Backend, the shard plan per rank.
//! It knows shapes and math, never requests: it runs one step, `forward(step) -> logits`.

pub mod config;
pub mod llama;
pub mod loader;
pub mod shard;
pub mod tp;

use crate::backend::KvShape;
pub use crate::backend::SeqSpan;
pub use crate::backend::{RowSampling, Sampled};
use crate::checkpoint::CheckpointError;
pub use config::LlamaConfig;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    ConfigFile(#[from] config::ConfigError),
    #[error("{origin}: tensor '{tensor}' has shape {got:?}, but the model config needs {want:?}")]
    Shape {
        tensor: String,
        got: Vec<usize>,
        want: Vec<usize>,
        origin: String,
    },
    #[error("{0}")]
    Config(String),
    #[error("backend: {0}")]
    Backend(String),
    #[error("{0}")]
    Input(String),
}

/// One packed forward step: every sequence's new tokens, where they go in the KV cache, and
/// which rows need logits.
#[derive(Clone, Debug, Default)]
pub struct StepInput {
    pub tokens: Vec<u32>,
    pub seqs: Vec<SeqSpan>,
    /// Rows (indices into `tokens`) whose next-token logits are wanted, in output order.
    pub logit_rows: Vec<usize>,
    /// KV blocks to copy `(src, dst)`, in order, before this step's forward reads or writes any
    /// (copy on write: n samples of a prompt take over its last, partial block).
    pub kv_copies: Vec<(u32, u32)>,
}

/// What the engine sees of a model: a step function over a paged KV pool.
pub trait ModelRunner: Send {
    fn config(&self) -> &LlamaConfig;
    fn kv_shape(&self) -> KvShape;
    fn backend_name(&self) -> String;
    /// Logits `[logit_rows.len(), vocab_size]`, row-major f32.
    fn forward(&mut self, step: &StepInput) -> Result<Vec<f32>, ModelError>;
    /// One step whose logit rows are all sampled with `rows` (one per logit row): backends that
    /// can sample where the logits live return the tokens (logits never cross to the host);
    /// others return the logits for the host sampler. Additive: the default is `forward`.
    fn forward_sample(
        &mut self,
        step: &StepInput,
        rows: &[RowSampling],
    ) -> Result<StepOutput, ModelError> {
        let _ = rows;
        Ok(StepOutput::Logits(self.forward(step)?))
    }
    /// `forward_sample` for rows with structured-output masks, which `masks` computes (one per
    /// row, `None`: unconstrained) while the device runs the forward: a backend that samples on
    /// the device queues the forward, calls `masks`, then samples with them. The default
    /// computes the masks first, then runs `forward_sample`.
    fn forward_sample_masked(
        &mut self,
        step: &StepInput,
        rows: &[RowSampling],
        masks: &mut dyn FnMut() -> RowMasks,
    ) -> Result<StepOutput, ModelError> {
        let words = masks();
        let rows = with_masks(rows, &words);
        self.forward_sample(step, &rows)
    }
    /// Whether `forward_sample` samples on the device, masks included (`RowSampling::mask`):
    /// the engine then hands a constrained step's masks to `forward_sample_masked`, which
    /// computes them while the forward runs.
    fn samples_on_device(&self) -> bool {
        false
    }
}

/// One allowed-token bitmask per sampled row (`RowSampling::mask`'s layout), `None` for a row
/// without a constraint.
pub type RowMasks = Vec<Option<Vec<u32>>>;

/// `rows` with `masks` attached, row by row.
pub fn with_masks<'a>(rows: &[RowSampling], masks: &'a [Option<Vec<u32>>]) -> Vec<RowSampling<'a>> {
    rows.iter()
        .enumerate()
        .map(|(i, r)| RowSampling {
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k,
            seed: r.seed,
            n: r.n,
            top_logprobs: r.top_logprobs,
            mask: masks.get(i).and_then(|m| m.as_deref()),
        })
        .collect()
}

/// What [`ModelRunner::forward_sample`] gives back.
#[derive(Clone, Debug)]
pub enum StepOutput {
    /// `[rows, vocab]` f32 logits, to be sampled on the host.
    Logits(Vec<f32>),
    /// One sampled token (with log-probs) per row, sampled on the device.
    Sampled(Vec<Sampled>),
}
