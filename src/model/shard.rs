//! Which part of every weight a tensor-parallel rank holds (Megatron / fairscale scheme).
//!
//! Column-parallel: wq wk wv w1 w3 (rows of the stored `[out, in]` matrix) and the output
//! projection (vocab rows). Row-parallel: wo w2 (columns), followed by an all-reduce. When
//! tp > n_kv_heads each KV head is replicated on tp / n_kv_heads ranks.

use super::config::LlamaConfig;
use crate::checkpoint::Slice;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardPlan {
    pub rank: usize,
    pub tp: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("--tp {tp} does not fit this model: {msg}")]
pub struct ShardError {
    pub tp: usize,
    pub msg: String,
}

impl ShardPlan {
    pub const SOLO: ShardPlan = ShardPlan { rank: 0, tp: 1 };

    /// Check that `tp` splits the model evenly.
    pub fn check(tp: usize, cfg: &LlamaConfig) -> Result<(), ShardError> {
        let err = |msg: String| Err(ShardError { tp, msg });
        if tp == 0 {
            return err("tp must be at least 1".into());
        }
        if !cfg.n_heads.is_multiple_of(tp) {
            return err(format!("n_heads {} is not divisible by {tp}", cfg.n_heads));
        }
        if tp > cfg.n_kv_heads && !tp.is_multiple_of(cfg.n_kv_heads) {
            return err(format!(
                "{tp} is not a multiple of n_kv_heads {}",
                cfg.n_kv_heads
            ));
        }
        if tp <= cfg.n_kv_heads && !cfg.n_kv_heads.is_multiple_of(tp) {
            return err(format!(
                "n_kv_heads {} is not divisible by {tp}",
                cfg.n_kv_heads
            ));
        }
        if !cfg.ffn_dim.is_multiple_of(tp) {
            return err(format!(
                "FFN width {} is not divisible by {tp}",
                cfg.ffn_dim
            ));
        }
        if !cfg.vocab_size.is_multiple_of(tp) {
            return err(format!(
                "vocab size {} is not divisible by {tp}",
                cfg.vocab_size
            ));
        }
        Ok(())
    }

    pub fn local_heads(&self, cfg: &LlamaConfig) -> usize {
        cfg.n_heads / self.tp
    }

    pub fn local_kv_heads(&self, cfg: &LlamaConfig) -> usize {
        (cfg.n_kv_heads / self.tp).max(1)
    }

    /// First global KV head held by this rank.
    fn first_kv_head(&self, cfg: &LlamaConfig) -> usize {
        if self.tp <= cfg.n_kv_heads {
            self.rank * cfg.n_kv_heads / self.tp
        } else {
            self.rank / (self.tp / cfg.n_kv_heads)
        }
    }

    fn part(&self, dim: usize, total: usize) -> Slice {
        let len = total / self.tp;
        Slice {
            dim,
            start: self.rank * len,
            len,
        }
    }

    /// Rows of wq held here.
    pub fn wq(&self, cfg: &LlamaConfig) -> Slice {
        self.part(0, cfg.n_heads * cfg.head_dim)
    }
    /// Rows of wk / wv held here.
    pub fn wkv(&self, cfg: &LlamaConfig) -> Slice {
        Slice {
            dim: 0,
            start: self.first_kv_head(cfg) * cfg.head_dim,
            len: self.local_kv_heads(cfg) * cfg.head_dim,
        }
    }
    /// Columns of wo held here.
    pub fn wo(&self, cfg: &LlamaConfig) -> Slice {
        self.part(1, cfg.n_heads * cfg.head_dim)
    }
    /// Rows of w1 / w3 held here.
    pub fn w13(&self, cfg: &LlamaConfig) -> Slice {
        self.part(0, cfg.ffn_dim)
    }
    /// Columns of w2 held here.
    pub fn w2(&self, cfg: &LlamaConfig) -> Slice {
        self.part(1, cfg.ffn_dim)
    }
    /// Vocab rows of the output projection held here.
    pub fn output(&self, cfg: &LlamaConfig) -> Slice {
        self.part(0, cfg.vocab_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_heads_replicate_when_tp_exceeds_them() {
        let cfg = LlamaConfig::preset("70b").unwrap(); // 64 heads, 8 kv heads
        for rank in 0..16 {
            let p = ShardPlan { rank, tp: 16 };
            assert_eq!(p.local_kv_heads(&cfg), 1);
            assert_eq!(p.wkv(&cfg).start, (rank / 2) * 128);
            // Every local q head maps to the local kv head: global q heads [4r, 4r+4) / 8 == r / 2.
            let q0 = rank * p.local_heads(&cfg);
            assert_eq!(q0 / 8, rank / 2);
        }
        assert!(ShardPlan::check(16, &cfg).is_ok());
        assert!(ShardPlan::check(3, &cfg).is_err());
    }
}
