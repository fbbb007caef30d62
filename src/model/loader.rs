//! Resolve `--model`: a checkpoint directory (Meta or HF layout) or a built-in `random:NAME`.

use std::path::{Path, PathBuf};

use super::config::LlamaConfig;
use super::llama::tensor_specs;
use super::ModelError;
use crate::checkpoint::{self, synthetic::SyntheticSource, Layout, QkHeads, TensorSource};

/// A model ready to load: its config, its tensors and where its tokenizer is.
pub struct ModelSource {
    pub cfg: LlamaConfig,
    pub tensors: Box<dyn TensorSource>,
    /// The checkpoint's own tokenizer file; `None` for built-in models (they use the cached
    /// Llama 3 tokenizer).
    pub tokenizer: Option<PathBuf>,
    /// Short name for logs and results ("random:1b", the directory name).
    pub label: String,
}

/// Seed of the built-in random models' weights (fixed, so every run and rank agrees).
pub const SYNTHETIC_SEED: u64 = 0x5eed_11a3;

pub fn open_model(spec: &str) -> Result<ModelSource, ModelError> {
    if let Some(name) = spec.strip_prefix("random:") {
        let cfg = LlamaConfig::preset(name)?;
        let tensors = Box::new(SyntheticSource::new(SYNTHETIC_SEED, tensor_specs(&cfg)));
        return Ok(ModelSource {
            cfg,
            tensors,
            tokenizer: None,
            label: spec.to_string(),
        });
    }
    let dir = Path::new(spec);
    if !dir.exists() {
        return Err(ModelError::Config(format!(
            "model '{spec}' not found: give a checkpoint directory (Meta: params.json + consolidated.*.pth; \
             HF: config.json + *.safetensors) or a built-in model (random:tiny, random:1b, random:8b, random:70b)"
        )));
    }
    let layout = checkpoint::detect(dir)?;
    let (cfg, tokenizer) = match &layout {
        // `herd convert --format meta` of an HF checkpoint carries its tokenizer.json.
        Layout::Meta { params, .. } => (
            LlamaConfig::from_meta_params(params)?,
            [dir.join("tokenizer.model"), dir.join("tokenizer.json")]
                .into_iter()
                .find(|p| p.exists()),
        ),
        // herd's per-rank layout keeps its source's config; tokenizer.model or tokenizer.json beside it.
        Layout::Ranked { config, .. } => {
            let cfg = if config.ends_with("params.json") {
                LlamaConfig::from_meta_params(config)?
            } else {
                LlamaConfig::from_hf_config(config)?
            };
            let tok = [dir.join("tokenizer.model"), dir.join("tokenizer.json")]
                .into_iter()
                .find(|p| p.exists());
            (cfg, tok)
        }
        Layout::Hf { config, .. } => {
            let tok = [
                dir.join("tokenizer.json"),
                dir.join("original/tokenizer.model"),
            ]
            .into_iter()
            .find(|p| p.exists())
            .unwrap_or_else(|| dir.join("tokenizer.json"));
            (LlamaConfig::from_hf_config(config)?, Some(tok))
        }
    };
    let heads = QkHeads {
        n_heads: cfg.n_heads,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
    };
    let tensors = checkpoint::open(dir, heads)?;
    let label = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.to_string());
    Ok(ModelSource {
        cfg,
        tensors,
        tokenizer: tokenizer.filter(|p| p.exists()),
        label,
    })
}
