//! Llama model configuration from Meta `params.json` or HF `config.json`, and the built-in
//! synthetic presets (`random:tiny`, `random:1b`, `random:8b`, `random:70b`).

use std::path::Path;

use serde_json::Value;

/// Llama 3.1 "llama3" RoPE frequency scaling (Meta's `apply_scaling`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

impl RopeScaling {
    /// The constants Meta's reference uses for `use_scaled_rope: true` (Llama 3.1).
    pub const LLAMA31: RopeScaling = RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Hidden width of the SwiGLU FFN.
    pub ffn_dim: usize,
    pub norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// Llama 3.2 small models reuse the embedding matrix as the output projection.
    pub tie_embeddings: bool,
    /// Longest sequence (prompt + generation) the model supports.
    pub max_seq_len: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "unknown built-in model '{0}': choose random:tiny, random:1b, random:8b or random:70b"
    )]
    UnknownPreset(String),
}

/// FFN width exactly as Meta's `FeedForward.__init__` computes it (saturating, so that absurd
/// inputs reach [`LlamaConfig`]'s size check instead of overflowing; `multiple_of` 0 counts as 1).
pub fn meta_ffn_dim(dim: usize, multiple_of: usize, ffn_dim_multiplier: Option<f64>) -> usize {
    let mut hidden = dim.saturating_mul(8) / 3;
    if let Some(m) = ffn_dim_multiplier {
        hidden = (m * hidden as f64) as usize;
    }
    let multiple_of = multiple_of.max(1);
    multiple_of.saturating_mul(hidden.div_ceil(multiple_of))
}

/// Largest value accepted for any size in a config, and for the layer count: far beyond any
/// Llama (405B: dim 16384, 126 layers, 128256 tokens, 131072 positions). Larger values can only be
/// damage; they would overflow shape arithmetic or size allocations before the weights are read.
const MAX_SIZE: usize = 1 << 24;
const MAX_LAYERS: usize = 1 << 12;
const MAX_PARAMS: u128 = 1 << 48;

fn read_json(path: &Path) -> Result<Value, ConfigError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: p.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ConfigError::Invalid {
        path: p,
        msg: format!("not valid JSON: {e}"),
    })
}

/// A value from the file for an error message, cut short (a damaged file may hold megabytes).
fn shown(x: &Value) -> String {
    let s = x.to_string();
    match s.char_indices().nth(60) {
        None => s,
        Some((cut, _)) => format!("{}... ({} bytes)", &s[..cut], s.len()),
    }
}

struct Fields<'a> {
    path: String,
    v: &'a Value,
}

impl Fields<'_> {
    fn err(&self, msg: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            msg,
        }
    }
    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("missing integer field '{key}'")))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.err(format!(
                    "field '{key}' must be a non-negative integer, found {}",
                    shown(x)
                ))
            }),
        }
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x.as_f64().map(Some).ok_or_else(|| {
                self.err(format!(
                    "field '{key}' must be a number, found {}",
                    shown(x)
                ))
            }),
        }
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x.as_bool().map(Some).ok_or_else(|| {
                self.err(format!(
                    "field '{key}' must be true or false, found {}",
                    shown(x)
                ))
            }),
        }
    }
}

impl LlamaConfig {
    /// Meta's `params.json` (llama-models `ModelArgs`).
    pub fn from_meta_params(path: &Path) -> Result<Self, ConfigError> {
        let v = read_json(path)?;
        let f = Fields {
            path: path.display().to_string(),
            v: &v,
        };
        let dim = f.usize("dim")?;
        let n_heads = f.usize("n_heads")?;
        let n_kv_heads = f.opt_usize("n_kv_heads")?.unwrap_or(n_heads);
        let multiple_of = f.opt_usize("multiple_of")?.unwrap_or(256);
        if multiple_of == 0 {
            return Err(f.err("multiple_of must be positive".into()));
        }
        let ffn_dim = meta_ffn_dim(dim, multiple_of, f.opt_f64("ffn_dim_multiplier")?);
        let scaled = f.opt_bool("use_scaled_rope")?.unwrap_or(false);
        let rope_scaling = scaled.then(|| {
            let mut s = RopeScaling::LLAMA31;
            // llama-models writes a factor for 3.2 small models (32); 3.1 files omit it (8).
            if let Ok(Some(factor)) = f.opt_f64("rope_scaling_factor") {
                s.factor = factor;
            }
            s
        });
        let vocab = f.opt_usize("vocab_size")?.unwrap_or(0);
        if vocab == 0 {
            return Err(f.err("vocab_size must be set (Llama 3 uses 128256)".into()));
        }
        let cfg = LlamaConfig {
            dim,
            n_layers: f.usize("n_layers")?,
            n_heads,
            n_kv_heads,
            head_dim: dim / n_heads.max(1),
            vocab_size: vocab,
            ffn_dim,
            norm_eps: f.opt_f64("norm_eps")?.unwrap_or(1e-5) as f32,
            rope_theta: f.opt_f64("rope_theta")?.unwrap_or(500000.0),
            rope_scaling,
            tie_embeddings: false,
            max_seq_len: f
                .opt_usize("max_seq_len")?
                .unwrap_or(if scaled { 131072 } else { 8192 }),
        };
        cfg.validate().map_err(|m| f.err(m))?;
        Ok(cfg)
    }

    /// HF `config.json` (transformers `LlamaConfig`).
    pub fn from_hf_config(path: &Path) -> Result<Self, ConfigError> {
        let v = read_json(path)?;
        let f = Fields {
            path: path.display().to_string(),
            v: &v,
        };
        if let Some(mt) = v.get("model_type").and_then(Value::as_str) {
            if mt != "llama" {
                return Err(f.err(format!(
                    "model_type is {}, herd runs Llama models (model_type 'llama')",
                    shown(&Value::from(mt))
                )));
            }
        }
        let dim = f.usize("hidden_size")?;
        let n_heads = f.usize("num_attention_heads")?;
        let rope_scaling = match v.get("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(rs) => {
                let g = Fields {
                    path: f.path.clone(),
                    v: rs,
                };
                let kind = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if kind != "llama3" {
                    return Err(f.err(format!(
                        "rope_scaling type {} is not supported (herd supports 'llama3')",
                        shown(&Value::from(kind))
                    )));
                }
                let d = RopeScaling::LLAMA31;
                Some(RopeScaling {
                    factor: g.opt_f64("factor")?.unwrap_or(d.factor),
                    low_freq_factor: g.opt_f64("low_freq_factor")?.unwrap_or(d.low_freq_factor),
                    high_freq_factor: g.opt_f64("high_freq_factor")?.unwrap_or(d.high_freq_factor),
                    original_max_position_embeddings: g
                        .opt_f64("original_max_position_embeddings")?
                        .unwrap_or(d.original_max_position_embeddings),
                })
            }
        };
        let cfg = LlamaConfig {
            dim,
            n_layers: f.usize("num_hidden_layers")?,
            n_heads,
            n_kv_heads: f.opt_usize("num_key_value_heads")?.unwrap_or(n_heads),
            head_dim: f.opt_usize("head_dim")?.unwrap_or(dim / n_heads.max(1)),
            vocab_size: f.usize("vocab_size")?,
            ffn_dim: f.usize("intermediate_size")?,
            norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-5) as f32,
            rope_theta: f.opt_f64("rope_theta")?.unwrap_or(500000.0),
            rope_scaling,
            tie_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            max_seq_len: f.opt_usize("max_position_embeddings")?.unwrap_or(8192),
        };
        cfg.validate().map_err(|m| f.err(m))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.dim == 0 || self.n_layers == 0 || self.n_heads == 0 || self.n_kv_heads == 0 {
            return Err("dim, n_layers, n_heads and n_kv_heads must be positive".into());
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return Err(format!(
                "n_heads ({}) must be a multiple of n_kv_heads ({})",
                self.n_heads, self.n_kv_heads
            ));
        }
        let sizes = [
            ("dim", self.dim),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("ffn_dim", self.ffn_dim),
            ("max_seq_len", self.max_seq_len),
        ];
        for (name, v) in sizes {
            if v > MAX_SIZE {
                return Err(format!(
                    "{name} {v} is beyond any model herd loads (at most {MAX_SIZE}); damaged file?"
                ));
            }
        }
        if self.n_layers > MAX_LAYERS {
            return Err(format!(
                "n_layers {} is beyond any model herd loads (at most {MAX_LAYERS}); damaged file?",
                self.n_layers
            ));
        }
        if self.n_params_wide() > MAX_PARAMS {
            return Err(format!(
                "these sizes make {} parameters, beyond any model herd loads (at most {MAX_PARAMS}); damaged file?",
                self.n_params_wide()
            ));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return Err(format!(
                "head_dim ({}) must be even and positive",
                self.head_dim
            ));
        }
        Ok(())
    }

    /// A built-in synthetic model: real Llama shapes, weights generated from a seed.
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let llama3 = |dim, n_layers, n_heads, n_kv_heads, ffn_dim, tie, factor| LlamaConfig {
            dim,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim: dim / n_heads,
            vocab_size: 128256,
            ffn_dim,
            norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: Some(RopeScaling {
                factor,
                ..RopeScaling::LLAMA31
            }),
            tie_embeddings: tie,
            max_seq_len: 131072,
        };
        Ok(match name {
            // A few MB: tied 128256 x 64 embedding dominates.
            "tiny" => llama3(64, 2, 4, 2, 192, true, 8.0),
            // Llama 3.2 1B shapes.
            "1b" => llama3(2048, 16, 32, 8, 8192, true, 32.0),
            // Llama 3.1 8B / 70B shapes.
            "8b" => llama3(4096, 32, 32, 8, 14336, false, 8.0),
            "70b" => llama3(8192, 80, 64, 8, 28672, false, 8.0),
            other => return Err(ConfigError::UnknownPreset(format!("random:{other}"))),
        })
    }

    /// Number of parameters (for bandwidth and FLOP estimates).
    pub fn n_params(&self) -> usize {
        usize::try_from(self.n_params_wide()).unwrap_or(usize::MAX)
    }

    /// [`Self::n_params`] without overflow, for checking a config read from a file.
    fn n_params_wide(&self) -> u128 {
        let w = |x: usize| x as u128;
        let attn = w(self.dim) * w(self.head_dim) * (2 * w(self.n_heads) + 2 * w(self.n_kv_heads));
        let ffn = 3 * w(self.dim) * w(self.ffn_dim);
        let per_layer = attn + ffn + 2 * w(self.dim);
        let emb = w(self.vocab_size) * w(self.dim);
        per_layer * w(self.n_layers) + emb * if self.tie_embeddings { 1 } else { 2 } + w(self.dim)
    }

    /// RoPE inverse frequencies (one per rotated pair), with Llama 3.1 scaling when configured.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                // torch computes theta ** (2i/d) in float32; the f32 rounding of the exponent matters.
                let exponent = ((2 * i) as f32 / d as f32) as f64;
                let freq = (1.0 / self.rope_theta.powf(exponent)) as f32 as f64;
                let scaled = match &self.rope_scaling {
                    None => freq,
                    Some(s) => {
                        let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
                        let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / s.factor
                        } else {
                            let smooth = (s.original_max_position_embeddings / wavelen
                                - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * freq / s.factor + smooth * freq
                        }
                    }
                };
                scaled as f32
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ffn_dim_matches_meta_for_real_models() {
        // Llama 3 8B: dim 4096, multiple_of 1024, multiplier 1.3 -> 14336.
        assert_eq!(meta_ffn_dim(4096, 1024, Some(1.3)), 14336);
        // Llama 3 70B: dim 8192, multiple_of 4096, multiplier 1.3 -> 28672.
        assert_eq!(meta_ffn_dim(8192, 4096, Some(1.3)), 28672);
        // Llama 3.2 1B: dim 2048, multiple_of 256, multiplier 1.5 -> 8192.
        assert_eq!(meta_ffn_dim(2048, 256, Some(1.5)), 8192);
    }

    #[test]
    fn scaled_rope_leaves_high_frequencies_and_divides_low_ones() {
        let cfg = LlamaConfig::preset("8b").unwrap();
        let f = cfg.rope_inv_freq();
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0);
        let unscaled = LlamaConfig {
            rope_scaling: None,
            ..cfg.clone()
        }
        .rope_inv_freq();
        assert!((f[63] * 8.0 - unscaled[63]).abs() < 1e-12);
        assert!(f[40] < unscaled[40]);
    }

    #[test]
    fn presets_have_real_shapes() {
        let c = LlamaConfig::preset("8b").unwrap();
        let p = c.n_params() as f64 / 1e9;
        assert!((p - 8.03).abs() < 0.05, "{p}");
        let c = LlamaConfig::preset("70b").unwrap();
        let p = c.n_params() as f64 / 1e9;
        assert!((p - 70.55).abs() < 0.1, "{p}");
        assert!(LlamaConfig::preset("3b").is_err());
    }
}
