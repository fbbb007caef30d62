//! The GPU memory plan, made before anything big is allocated: weights + activations + the KV
//! block pool must fit under `--gpu-memory-utilization` of the card's memory. Pure arithmetic,
//! tested without a GPU.

/// What one rank needs besides the KV pool, and the card it runs on.
#[derive(Clone, Copy, Debug)]
pub struct MemoryPlanInput {
    pub total_bytes: u64,
    /// Free right now (other processes may hold some).
    pub free_bytes: u64,
    /// Fraction of `total_bytes` herd may use (0 < u <= 1).
    pub utilization: f64,
    pub weight_bytes: u64,
    pub activation_bytes: u64,
    /// One KV block across all layers, K and V.
    pub kv_block_bytes: u64,
    /// Most blocks worth having (the batch can never fill more).
    pub useful_blocks: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    pub kv_blocks: u64,
    pub kv_bytes: u64,
    pub budget_bytes: u64,
}

const GB: f64 = 1e9;

/// Blocks for the KV pool, or an error that names every number.
pub fn plan_memory(p: &MemoryPlanInput) -> Result<MemoryPlan, String> {
    if !(p.utilization > 0.0 && p.utilization <= 1.0) {
        return Err(format!(
            "--gpu-memory-utilization must be in (0, 1], got {}",
            p.utilization
        ));
    }
    // Memory others already hold is outside our share: budget = util * total - (total - free).
    let used_by_others = p.total_bytes.saturating_sub(p.free_bytes);
    let budget = ((p.total_bytes as f64 * p.utilization) as u64).saturating_sub(used_by_others);
    let fixed = p.weight_bytes + p.activation_bytes;
    let describe = || {
        format!(
            "weights {:.2} GB + activations {:.2} GB + at least one KV block {:.4} GB, \
             but the budget is {:.2} GB ({:.0}% of {:.2} GB total, {:.2} GB already in use by others)",
            p.weight_bytes as f64 / GB,
            p.activation_bytes as f64 / GB,
            p.kv_block_bytes as f64 / GB,
            budget as f64 / GB,
            p.utilization * 100.0,
            p.total_bytes as f64 / GB,
            used_by_others as f64 / GB
        )
    };
    if fixed + p.kv_block_bytes > budget || p.kv_block_bytes == 0 {
        return Err(format!(
            "the model does not fit on this GPU: {}; use more GPUs (--tp), a smaller \
             --max-batch-tokens, or raise --gpu-memory-utilization",
            describe()
        ));
    }
    let kv_blocks = ((budget - fixed) / p.kv_block_bytes).min(p.useful_blocks.max(1));
    Ok(MemoryPlan {
        kv_blocks,
        kv_bytes: kv_blocks * p.kv_block_bytes,
        budget_bytes: budget,
    })
}

/// Bytes of bf16 weights one rank uploads: its 1/tp share of the layers and of the output
/// projection, plus the whole embedding table (every rank looks tokens up). Tied embeddings are
/// one tensor on disk but two buffers on the GPU (the lookup table and the output matrix), and
/// `n_params` counts them once.
pub fn weight_bytes(n_params: u64, vocab: u64, dim: u64, tp: u64, tied: bool) -> u64 {
    let emb = vocab * dim;
    let params = if tp > 1 {
        // n_params/tp holds the output shard (untied: and 1/tp of the table, a small overcount).
        n_params / tp + emb
    } else if tied {
        n_params + emb
    } else {
        n_params
    };
    params * 2
}

/// Activation memory for a step of `tokens` rows (f32 between kernels), `logit_rows` rows of
/// logits, plus the cuBLASLt workspace and attention partials. Generous: the allocator is
/// stream-ordered and transient buffers overlap little. `split_gemm` (accurate numerics): every
/// GEMM runs on twice the rows (the hi and lo bf16 halves of its input) and its output buffer
/// keeps them, so GEMM inputs, outputs and the logits take twice the bytes.
#[allow(clippy::too_many_arguments)]
pub fn activation_bytes(
    tokens: u64,
    logit_rows: u64,
    dim: u64,
    ffn_dim: u64,
    q_dim: u64,
    kv_dim: u64,
    vocab: u64,
    split_gemm: bool,
) -> u64 {
    let rows = if split_gemm { 2 } else { 1 };
    // Live at once, per row: x, h, q, k, v, attn, o (dim-sized), gate, up, act (ffn-sized),
    // the bf16 copy of the largest GEMM input; then the logits.
    let per_row = 4 * (4 * dim + 2 * q_dim + 2 * kv_dim + 3 * ffn_dim) + 2 * ffn_dim;
    let attn_partials = tokens * q_dim * 4 * 2;
    rows * tokens * per_row
        + attn_partials
        + rows * logit_rows * vocab * 4 * 2
        + super::gemm::WORKSPACE_BYTES as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> MemoryPlanInput {
        MemoryPlanInput {
            total_bytes: 80_000_000_000,
            free_bytes: 79_000_000_000,
            utilization: 0.9,
            weight_bytes: 16_000_000_000,
            activation_bytes: 2_000_000_000,
            kv_block_bytes: 2_097_152,
            useful_blocks: 1 << 40,
        }
    }

    #[test]
    fn the_pool_takes_what_is_left() {
        let p = plan_memory(&input()).expect("fits");
        assert_eq!(p.budget_bytes, 72_000_000_000 - 1_000_000_000);
        assert_eq!(p.kv_blocks, (71_000_000_000 - 18_000_000_000) / 2_097_152);
        let mut few = input();
        few.useful_blocks = 100;
        assert_eq!(plan_memory(&few).expect("fits").kv_blocks, 100);
    }

    #[test]
    fn tied_embeddings_count_twice_on_one_gpu() {
        // Llama 3.2 1B shapes: n_params counts the tied table once.
        let (n, vocab, dim) = (1_235_814_400u64, 128_256u64, 2048u64);
        assert_eq!(weight_bytes(n, vocab, dim, 1, false), 2 * n);
        assert_eq!(weight_bytes(n, vocab, dim, 1, true), 2 * (n + vocab * dim));
        assert_eq!(
            weight_bytes(n, vocab, dim, 2, true),
            2 * (n / 2 + vocab * dim)
        );
    }

    #[test]
    fn accurate_numerics_double_the_gemm_buffers() {
        let a = |split| activation_bytes(1024, 64, 4096, 14336, 4096, 1024, 128_256, split);
        let ws = crate::backend::cuda::gemm::WORKSPACE_BYTES as u64;
        let attn = 1024 * 4096 * 4 * 2;
        assert_eq!(a(true) - ws - attn, 2 * (a(false) - ws - attn));
    }

    #[test]
    fn a_model_that_does_not_fit_names_the_numbers() {
        let mut i = input();
        i.weight_bytes = 140_000_000_000;
        let e = plan_memory(&i).unwrap_err();
        assert!(e.contains("weights 140.00 GB"), "{e}");
        assert!(e.contains("90% of 80.00 GB"), "{e}");
        assert!(plan_memory(&MemoryPlanInput {
            utilization: 1.5,
            ..input()
        })
        .is_err());
    }
}
