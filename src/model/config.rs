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
    /// A key whose value changes the model's output in a way herd does not implement.
    #[error("{path}: {key} = {value} is not supported: {why}")]
    Unsupported {
        path: String,
        key: String,
        value: String,
        why: String,
    },
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

/// One JSON object of a config file, read key by key; messages name the file and the key.
struct Fields<'a> {
    path: &'a str,
    /// Prefix of key names in messages: "" at the top, "rope_parameters." inside that object.
    prefix: String,
    v: &'a Value,
}

impl<'a> Fields<'a> {
    fn top(path: &'a str, v: &'a Value) -> Result<Self, ConfigError> {
        let f = Fields {
            path,
            prefix: String::new(),
            v,
        };
        if !v.is_object() {
            return Err(f.err(format!("must be a JSON object, found {}", brief(v))));
        }
        Ok(f)
    }
    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
    /// The value of `key`; JSON null reads as absent (transformers writes `"rope_scaling": null`).
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.v.get(key).filter(|x| !x.is_null())
    }
    /// The keys with a non-null value.
    fn keys(&self) -> impl Iterator<Item = &'a str> {
        self.v
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, x)| !x.is_null())
            .map(|(k, _)| k.as_str())
    }
    fn err(&self, msg: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_string(),
            msg,
        }
    }
    fn unsupported(&self, key: &str, why: impl Into<String>) -> ConfigError {
        ConfigError::Unsupported {
            path: self.path.to_string(),
            key: self.name(key),
            value: self.get(key).map_or("null".into(), brief),
            why: why.into(),
        }
    }
    /// Stop at `key` when it is set (not null) to a value `ok` rejects.
    fn refuse_unless(
        &self,
        key: &str,
        ok: fn(&Value) -> bool,
        why: &str,
    ) -> Result<(), ConfigError> {
        match self.get(key) {
            Some(x) if !ok(x) => Err(self.unsupported(key, why)),
            _ => Ok(()),
        }
    }
    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("missing integer field '{}'", self.name(key))))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.err(format!(
                    "field '{}' must be a non-negative integer, found {}",
                    self.name(key),
                    brief(x)
                ))
            }),
        }
    }
    fn f64(&self, key: &str) -> Result<f64, ConfigError> {
        self.opt_f64(key)?
            .ok_or_else(|| self.err(format!("missing number '{}'", self.name(key))))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x.as_f64().map(Some).ok_or_else(|| {
                self.err(format!(
                    "field '{}' must be a number, found {}",
                    self.name(key),
                    brief(x)
                ))
            }),
        }
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x.as_bool().map(Some).ok_or_else(|| {
                self.err(format!(
                    "field '{}' must be true or false, found {}",
                    self.name(key),
                    brief(x)
                ))
            }),
        }
    }
    fn opt_str(&self, key: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x.as_str().map(Some).ok_or_else(|| {
                self.err(format!(
                    "field '{}' must be a string, found {}",
                    self.name(key),
                    brief(x)
                ))
            }),
        }
    }
    /// The object under `key`; None when absent or null.
    fn object(&self, key: &str) -> Result<Option<Fields<'a>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(x) if x.is_object() => Ok(Some(Fields {
                path: self.path,
                prefix: format!("{}.", self.name(key)),
                v: x,
            })),
            Some(x) => Err(self.err(format!(
                "field '{}' must be an object, found {}",
                self.name(key),
                brief(x)
            ))),
        }
    }
}

/// A JSON value for a message, cut short if long (a quantization_config can be large).
fn brief(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(200) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s,
    }
}

fn is_false(x: &Value) -> bool {
    x == &Value::Bool(false)
}

fn never(_: &Value) -> bool {
    false
}

/// A key herd refuses unless `ok` accepts its value, and why (for the message).
type Refusal = (&'static str, fn(&Value) -> bool, &'static str);

/// llama-models `ModelArgs` fields of models herd does not run (Llama 3.2 Vision, Llama 4) and of
/// checkpoint variants (quantized, LoRA). Each changes the forward pass; absent, null or the
/// value that turns it off is fine.
const META_REFUSED: &[Refusal] = &[
    (
        "quantization_args",
        never,
        "a quantized checkpoint: herd runs bf16/f16/f32 weights; use the unquantized checkpoint",
    ),
    (
        "lora_args",
        never,
        "a LoRA checkpoint: merge the adapter into the weights first",
    ),
    (
        "moe_args",
        never,
        "mixture-of-experts layers (Llama 4): herd runs dense Llama 3 models",
    ),
    (
        "ffn_exp",
        never,
        "the FFN width of mixture-of-experts layers (Llama 4): herd runs dense Llama 3 models",
    ),
    (
        "attention_chunk_size",
        never,
        "chunked local attention (Llama 4): herd attends over the whole context",
    ),
    (
        "nope_layer_interval",
        never,
        "layers without RoPE (Llama 4): herd applies RoPE in every layer",
    ),
    (
        "use_qk_norm",
        is_false,
        "RMS-normed queries and keys (Llama 4): not in herd's attention",
    ),
    (
        "attn_temperature_tuning",
        is_false,
        "attention temperature tuning (Llama 4): not in herd's attention",
    ),
    (
        "vision_chunk_size",
        |x| x.as_i64().is_some_and(|n| n <= 0),
        "an image model (Llama 3.2 Vision): herd runs text-only Llama models",
    ),
    (
        "vision_num_cross_attention_layers",
        |x| x.as_i64().is_some_and(|n| n <= 0),
        "an image model (Llama 3.2 Vision): herd runs text-only Llama models",
    ),
    (
        "vision_model",
        never,
        "an image model: herd runs text-only Llama models",
    ),
    (
        "vision_args",
        never,
        "an image model (Llama 4): herd runs text-only Llama models",
    ),
];

/// transformers `LlamaConfig` (and generic `PreTrainedConfig`) keys with values herd does not
/// implement. `pretraining_tp` is not here: transformers 4 split each projection into that many
/// slices and added them up (the same sum in another order, last-bit rounding only) and
/// transformers 5 ignores it; herd ignores it too.
const HF_REFUSED: &[Refusal] = &[
    (
        "hidden_act",
        |x| matches!(x.as_str(), Some("silu" | "swish")),
        "herd's FFN is SwiGLU with SiLU (transformers' 'silu' or 'swish')",
    ),
    (
        "attention_bias",
        is_false,
        "herd's attention projections have no bias terms (Llama 3 has none)",
    ),
    (
        "mlp_bias",
        is_false,
        "herd's FFN projections have no bias terms (Llama 3 has none)",
    ),
    (
        "partial_rotary_factor",
        |x| x.as_f64() == Some(1.0),
        "herd rotates the whole head (partial rotary embeddings are not Llama 3)",
    ),
    (
        "quantization_config",
        never,
        "a quantized checkpoint: herd runs bf16/f16/f32 weights; use the unquantized checkpoint",
    ),
];

fn refuse(f: &Fields, table: &[Refusal]) -> Result<(), ConfigError> {
    table
        .iter()
        .try_for_each(|(key, ok, why)| f.refuse_unless(key, *ok, why))
}

/// RoPE as one config object states it: its base (if it names one) and its scaling.
struct Rope {
    theta: Option<f64>,
    scaling: Option<RopeScaling>,
}

/// A transformers RoPE object: `rope_scaling` (transformers 4) or `rope_parameters`
/// (transformers 5). Only the types herd implements, with exactly their parameters: a stray key
/// is refused, since transformers would ignore it with a warning and run something else.
fn rope_object(g: &Fields) -> Result<Rope, ConfigError> {
    let kind = match (g.opt_str("rope_type")?, g.opt_str("type")?) {
        (Some(a), Some(b)) if a != b => {
            return Err(g.err(format!(
                "{} is '{a}' but {} is '{b}': a RoPE object has one type",
                g.name("rope_type"),
                g.name("type")
            )))
        }
        (a, b) => a.or(b),
    };
    const DEFAULT: &[&str] = &["rope_type", "type", "rope_theta"];
    const LLAMA3: &[&str] = &[
        "rope_type",
        "type",
        "rope_theta",
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ];
    let known = match kind.unwrap_or("default") {
        "default" => DEFAULT,
        "llama3" => LLAMA3,
        _ => {
            let key = if g.get("rope_type").is_some() {
                "rope_type"
            } else {
                "type"
            };
            return Err(g.unsupported(
                key,
                "herd implements rope_type 'default' (Llama 3) and 'llama3' (Llama 3.1 / 3.2), \
                 not linear, dynamic, yarn, longrope or others",
            ));
        }
    };
    if let Some(k) = g.keys().find(|k| !known.contains(k)) {
        let why = match kind {
            Some(t) => format!("not a parameter of rope_type '{t}' as herd implements it"),
            None => "this RoPE object names no rope_type, so it is 'default' and transformers \
                     would silently ignore the key: name the type ('llama3' for Llama 3.1 / 3.2)"
                .into(),
        };
        return Err(g.unsupported(k, why));
    }
    let scaling = if known == LLAMA3 {
        // No defaults: transformers refuses a llama3 object without all four as well.
        let missing: Vec<&str> = LLAMA3[3..]
            .iter()
            .copied()
            .filter(|k| g.get(k).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(g.err(format!(
                "{} has rope_type 'llama3' but lacks {}",
                g.prefix.trim_end_matches('.'),
                missing.join(", ")
            )));
        }
        Some(RopeScaling {
            factor: g.f64("factor")?,
            low_freq_factor: g.f64("low_freq_factor")?,
            high_freq_factor: g.f64("high_freq_factor")?,
            original_max_position_embeddings: g.f64("original_max_position_embeddings")?,
        })
    } else {
        None
    };
    Ok(Rope {
        theta: g.opt_f64("rope_theta")?,
        scaling,
    })
}

/// RoPE base and scaling of a transformers config: top-level `rope_theta` + `rope_scaling`
/// (transformers 4, the meta-llama Hub files) or `rope_parameters` (transformers 5). A file may
/// carry both spellings only if they say the same.
fn hf_rope(f: &Fields) -> Result<(f64, Option<RopeScaling>), ConfigError> {
    let legacy = f
        .object("rope_scaling")?
        .map(|g| rope_object(&g))
        .transpose()?;
    let current = f
        .object("rope_parameters")?
        .map(|g| rope_object(&g))
        .transpose()?;
    if let (Some(a), Some(b)) = (&legacy, &current) {
        if a.scaling != b.scaling {
            return Err(f.err(format!(
                "rope_scaling {} and rope_parameters {} disagree: keep one \
                 (transformers 5 writes only rope_parameters)",
                brief(&f.v["rope_scaling"]),
                brief(&f.v["rope_parameters"])
            )));
        }
    }
    let thetas = [
        ("rope_theta", f.opt_f64("rope_theta")?),
        (
            "rope_scaling.rope_theta",
            legacy.as_ref().and_then(|r| r.theta),
        ),
        (
            "rope_parameters.rope_theta",
            current.as_ref().and_then(|r| r.theta),
        ),
    ];
    let mut given = thetas.iter().filter_map(|(k, t)| t.map(|t| (*k, t)));
    let Some((first, theta)) = given.next() else {
        return Err(f.err(
            "no rope_theta (top level or in rope_parameters): herd does not guess the RoPE base \
             (transformers would use 10000, Llama 3 uses 500000)"
                .into(),
        ));
    };
    if let Some((other, t)) = given.find(|(_, t)| *t != theta) {
        return Err(f.err(format!(
            "{first} = {theta} but {other} = {t}: a config.json gives one RoPE base"
        )));
    }
    let scaling = current.or(legacy).and_then(|r| r.scaling);
    Ok((theta, scaling))
}

impl LlamaConfig {
    /// Meta's `params.json` (llama-models `ModelArgs`). Missing keys take `ModelArgs`' own
    /// defaults (they are Meta's, not guesses); keys `ModelArgs` does not know are ignored, as
    /// llama-models ignores them; keys of models or variants herd does not run are refused.
    pub fn from_meta_params(path: &Path) -> Result<Self, ConfigError> {
        let v = read_json(path)?;
        Self::from_meta_json(&path.display().to_string(), &v)
    }

    fn from_meta_json(path: &str, v: &Value) -> Result<Self, ConfigError> {
        let f = Fields::top(path, v)?;
        refuse(&f, META_REFUSED)?;
        let dim = f.usize("dim")?;
        let n_heads = f.usize("n_heads")?;
        if n_heads == 0 || dim % n_heads != 0 {
            return Err(f.err(format!(
                "dim ({dim}) must be a positive multiple of n_heads ({n_heads}): \
                 Meta's head_dim is dim / n_heads"
            )));
        }
        let head_dim = dim / n_heads;
        // llama-models' Llama 3 attention always uses dim / n_heads; another value is another model.
        if let Some(hd) = f.opt_usize("head_dim")? {
            if hd != head_dim {
                return Err(f.unsupported(
                    "head_dim",
                    format!("Meta's Llama 3 uses head_dim = dim / n_heads = {head_dim}"),
                ));
            }
        }
        let n_kv_heads = f.opt_usize("n_kv_heads")?.unwrap_or(n_heads);
        let multiple_of = f.opt_usize("multiple_of")?.unwrap_or(256);
        if multiple_of == 0 {
            return Err(f.err("multiple_of must be positive".into()));
        }
        let ffn_dim = meta_ffn_dim(dim, multiple_of, f.opt_f64("ffn_dim_multiplier")?);
        let scaled = f.opt_bool("use_scaled_rope")?.unwrap_or(false);
        let rope_scaling = if scaled {
            // llama-models' apply_scaling: factor 8 and high_freq_factor 4 unless params.json
            // names them (Llama 3.2's small models name factor 32).
            let d = RopeScaling::LLAMA31;
            Some(RopeScaling {
                factor: f.opt_f64("rope_scaling_factor")?.unwrap_or(d.factor),
                high_freq_factor: f
                    .opt_f64("rope_high_freq_factor")?
                    .unwrap_or(d.high_freq_factor),
                ..d
            })
        } else {
            None
        };
        let vocab = f.opt_usize("vocab_size")?.unwrap_or(0);
        if vocab == 0 {
            return Err(f.err("vocab_size must be set (Llama 3 uses 128256)".into()));
        }
        let cfg = LlamaConfig {
            dim,
            n_layers: f.usize("n_layers")?,
            n_heads,
            n_kv_heads,
            head_dim,
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

    /// HF `config.json` (transformers `LlamaConfig`), as transformers 4 or 5 writes it. Missing
    /// keys take transformers' defaults where those are Llama 3's; a missing `rope_theta` or
    /// `rms_norm_eps` is an error (transformers' defaults, 10000 and 1e-6, are not Llama 3's).
    /// Unknown keys are ignored, as transformers ignores them; values herd does not implement
    /// are refused.
    pub fn from_hf_config(path: &Path) -> Result<Self, ConfigError> {
        let v = read_json(path)?;
        Self::from_hf_json(&path.display().to_string(), &v)
    }

    fn from_hf_json(path: &str, v: &Value) -> Result<Self, ConfigError> {
        let f = Fields::top(path, v)?;
        f.refuse_unless(
            "model_type",
            |x| x.as_str() == Some("llama"),
            "herd runs Llama models (model_type 'llama')",
        )?;
        refuse(&f, HF_REFUSED)?;
        if f.opt_usize("pretraining_tp")? == Some(0) {
            return Err(f.err("pretraining_tp must be at least 1".into()));
        }
        let (rope_theta, rope_scaling) = hf_rope(&f)?;
        let norm_eps = f.opt_f64("rms_norm_eps")?.ok_or_else(|| {
            f.err(
                "no rms_norm_eps: herd does not guess it (transformers would use 1e-6, \
                 Llama 3 uses 1e-5)"
                    .into(),
            )
        })?;
        let dim = f.usize("hidden_size")?;
        let n_heads = f.usize("num_attention_heads")?;
        let cfg = LlamaConfig {
            dim,
            n_layers: f.usize("num_hidden_layers")?,
            n_heads,
            n_kv_heads: f.opt_usize("num_key_value_heads")?.unwrap_or(n_heads),
            head_dim: f.opt_usize("head_dim")?.unwrap_or(dim / n_heads.max(1)),
            vocab_size: f.usize("vocab_size")?,
            ffn_dim: f.usize("intermediate_size")?,
            norm_eps: norm_eps as f32,
            rope_theta,
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
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
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
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim ({}) must be even and positive",
                self.head_dim
            ));
        }
        if self.vocab_size == 0 || self.ffn_dim == 0 || self.max_seq_len == 0 {
            return Err("vocab size, FFN width and context length must be positive".into());
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(self.rope_theta) {
            return Err(format!("rope_theta ({}) must be positive", self.rope_theta));
        }
        if !positive(self.norm_eps as f64) {
            return Err(format!("norm eps ({}) must be positive", self.norm_eps));
        }
        if let Some(s) = &self.rope_scaling {
            // The llama3 rule divides by high - low and by both factors.
            if !(positive(s.factor)
                && positive(s.low_freq_factor)
                && positive(s.original_max_position_embeddings)
                && s.high_freq_factor.is_finite()
                && s.high_freq_factor > s.low_freq_factor)
            {
                return Err(format!(
                    "llama3 RoPE scaling needs factor, low_freq_factor and \
                     original_max_position_embeddings positive and high_freq_factor above \
                     low_freq_factor, found {s:?}"
                ));
            }
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

    use serde_json::json;

    /// llama31's config.json as the meta-llama Hub files spell it (transformers 4).
    fn hf_legacy() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "attention_bias": false,
            "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "head_dim": 16,
            "hidden_act": "silu", "hidden_size": 128, "initializer_range": 0.02,
            "intermediate_size": 192, "max_position_embeddings": 131072, "mlp_bias": false,
            "model_type": "llama", "num_attention_heads": 8, "num_hidden_layers": 2,
            "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
            "transformers_version": "4.45.0", "use_cache": true, "vocab_size": 256
        })
    }

    /// The same model as transformers 5 saves it: RoPE only inside rope_parameters.
    fn hf_tf5() -> Value {
        let mut v = hf_legacy();
        let o = v.as_object_mut().unwrap();
        o.remove("rope_theta");
        o.remove("rope_scaling");
        o.remove("torch_dtype");
        o.insert("dtype".into(), json!("bfloat16"));
        o.insert("pad_token_id".into(), Value::Null);
        o.insert(
            "rope_parameters".into(),
            json!({"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0,
                "rope_type": "llama3"}),
        );
        v
    }

    /// `v` with `key` (a top-level key, or "object.key") set to `x`; null removes it.
    fn with(mut v: Value, key: &str, x: Value) -> Value {
        let (obj, k) = match key.split_once('.') {
            Some((o, k)) => (&mut v[o], k),
            None => (&mut v, key),
        };
        let o = obj.as_object_mut().unwrap();
        if x.is_null() {
            o.remove(k);
        } else {
            o.insert(k.into(), x);
        }
        v
    }

    fn hf(v: &Value) -> Result<LlamaConfig, ConfigError> {
        LlamaConfig::from_hf_json("m/config.json", v)
    }

    fn meta(v: &Value) -> Result<LlamaConfig, ConfigError> {
        LlamaConfig::from_meta_json("m/params.json", v)
    }

    fn meta_base() -> Value {
        json!({"dim": 128, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "vocab_size": 256,
            "multiple_of": 64, "ffn_dim_multiplier": 0.5, "norm_eps": 1e-05,
            "rope_theta": 500000.0, "use_scaled_rope": true})
    }

    /// The load stops with a message naming the file, the key and its value.
    #[track_caller]
    fn refused(r: Result<LlamaConfig, ConfigError>, key: &str, value: &str) {
        match r {
            Err(e @ ConfigError::Unsupported { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.starts_with("m/") && msg.contains(&format!("{key} = {value} ")),
                    "{msg}"
                );
            }
            other => panic!("{key} = {value}: expected a refusal, got {other:?}"),
        }
    }

    #[track_caller]
    fn invalid(r: Result<LlamaConfig, ConfigError>, words: &[&str]) {
        let msg = r.expect_err("expected an error").to_string();
        assert!(words.iter().all(|w| msg.contains(w)), "{msg}");
    }

    #[test]
    fn transformers5_rope_parameters_read_like_rope_scaling() {
        let old = hf(&hf_legacy()).unwrap();
        assert_eq!(old.rope_scaling, Some(RopeScaling::LLAMA31));
        assert_eq!(hf(&hf_tf5()).unwrap(), old);
        // Not the defaults: every value comes from rope_parameters.
        let v = json!({"rope_type": "llama3", "rope_theta": 250000.0, "factor": 16.0,
            "low_freq_factor": 2.0, "high_freq_factor": 8.0,
            "original_max_position_embeddings": 4096});
        let c = hf(&with(hf_tf5(), "rope_parameters", v)).unwrap();
        assert_eq!(c.rope_theta, 250000.0);
        assert_eq!(
            c.rope_scaling,
            Some(RopeScaling {
                factor: 16.0,
                low_freq_factor: 2.0,
                high_freq_factor: 8.0,
                original_max_position_embeddings: 4096.0
            })
        );
        // Llama 3.0: the "default" type, theta only.
        let v = json!({"rope_type": "default", "rope_theta": 10000.0});
        let c = hf(&with(hf_tf5(), "rope_parameters", v)).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling), (10000.0, None));
        // The older spelling of the type key, and a null rope_scaling beside rope_parameters.
        let v = with(hf_legacy(), "rope_scaling.rope_type", Value::Null);
        let v = with(v, "rope_scaling.type", json!("llama3"));
        assert_eq!(hf(&v).unwrap(), old);
        assert_eq!(
            hf(&with(hf_tf5(), "rope_scaling", json!(null))).unwrap(),
            old
        );
    }

    #[test]
    fn both_rope_spellings_must_agree() {
        let both = with(
            hf_tf5(),
            "rope_scaling",
            hf_legacy()["rope_scaling"].clone(),
        );
        let both = with(both, "rope_theta", json!(500000.0));
        assert_eq!(hf(&both).unwrap(), hf(&hf_legacy()).unwrap());
        // transformers 5 takes the base from the top level when rope_parameters has none.
        let v = with(hf_tf5(), "rope_parameters.rope_theta", Value::Null);
        let v = with(v, "rope_theta", json!(500000.0));
        assert_eq!(hf(&v).unwrap(), hf(&hf_legacy()).unwrap());

        invalid(
            hf(&with(both.clone(), "rope_scaling.factor", json!(32.0))),
            &["rope_scaling", "rope_parameters", "disagree"],
        );
        let v = json!({"rope_type": "default", "rope_theta": 500000.0});
        invalid(hf(&with(both.clone(), "rope_parameters", v)), &["disagree"]);
        invalid(
            hf(&with(both, "rope_theta", json!(10000.0))),
            &["rope_theta = 10000", "rope_parameters.rope_theta = 500000"],
        );
    }

    #[test]
    fn numbers_herd_would_have_to_guess_are_errors() {
        let v = with(hf_tf5(), "rope_parameters.rope_theta", Value::Null);
        invalid(
            hf(&v),
            &["m/config.json", "no rope_theta", "10000", "500000"],
        );
        let v = with(hf_legacy(), "rope_theta", Value::Null);
        invalid(hf(&v), &["no rope_theta"]);
        invalid(
            hf(&with(hf_legacy(), "rms_norm_eps", Value::Null)),
            &["no rms_norm_eps", "1e-6"],
        );
        for k in [
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ] {
            let v = with(hf_tf5(), &format!("rope_parameters.{k}"), Value::Null);
            invalid(
                hf(&v),
                &[&format!(
                    "rope_parameters has rope_type 'llama3' but lacks {k}"
                )],
            );
        }
        let v = with(hf_tf5(), "rope_parameters.high_freq_factor", json!(1.0));
        invalid(hf(&v), &["high_freq_factor above low_freq_factor"]);
        let v = with(hf_tf5(), "rope_parameters.rope_theta", json!(-1.0));
        invalid(hf(&v), &["rope_theta (-1) must be positive"]);
        let v = with(hf_tf5(), "rope_parameters", json!(8.0));
        invalid(hf(&v), &["'rope_parameters' must be an object, found 8.0"]);
    }

    #[test]
    fn hf_keys_herd_does_not_implement_stop_the_load() {
        for t in ["linear", "dynamic", "yarn", "longrope", "su", "mrope"] {
            let v = with(hf_tf5(), "rope_parameters.rope_type", json!(t));
            refused(hf(&v), "rope_parameters.rope_type", &format!("\"{t}\""));
            let v = with(hf_legacy(), "rope_scaling.rope_type", json!(t));
            refused(hf(&v), "rope_scaling.rope_type", &format!("\"{t}\""));
        }
        let v = with(hf_legacy(), "rope_scaling.rope_type", Value::Null);
        let v = with(v, "rope_scaling.type", json!("dynamic"));
        refused(hf(&v), "rope_scaling.type", "\"dynamic\"");
        let v = with(hf_legacy(), "rope_scaling.type", json!("linear"));
        invalid(
            hf(&v),
            &["rope_type is 'llama3' but rope_scaling.type is 'linear'"],
        );
        // Keys the implemented types do not have (transformers would warn and ignore them).
        let v = with(hf_tf5(), "rope_parameters.attention_factor", json!(2.0));
        refused(hf(&v), "rope_parameters.attention_factor", "2.0");
        let v = with(
            hf_tf5(),
            "rope_parameters.partial_rotary_factor",
            json!(0.5),
        );
        refused(hf(&v), "rope_parameters.partial_rotary_factor", "0.5");
        // A factor with no type: transformers would run unscaled RoPE without a word.
        let v = with(hf_legacy(), "rope_scaling", json!({"factor": 8.0}));
        refused(hf(&v), "rope_scaling.factor", "8.0");
        let v = json!({"rope_type": "default", "rope_theta": 5e5, "factor": 8.0});
        refused(
            hf(&with(hf_tf5(), "rope_parameters", v)),
            "rope_parameters.factor",
            "8.0",
        );

        let cases = [
            ("attention_bias", json!(true), "true"),
            ("mlp_bias", json!(true), "true"),
            ("hidden_act", json!("gelu"), "\"gelu\""),
            ("hidden_act", json!("relu"), "\"relu\""),
            ("partial_rotary_factor", json!(0.5), "0.5"),
            ("model_type", json!("mistral"), "\"mistral\""),
            ("model_type", json!("llama4"), "\"llama4\""),
            (
                "quantization_config",
                json!({"quant_method": "awq"}),
                "{\"quant_method\":\"awq\"}",
            ),
        ];
        for (key, x, shown) in cases {
            refused(hf(&with(hf_tf5(), key, x.clone())), key, shown);
            refused(hf(&with(hf_legacy(), key, x)), key, shown);
        }
    }

    #[test]
    fn hf_keys_that_do_not_change_the_output_are_accepted() {
        let base = hf(&hf_tf5()).unwrap();
        for (key, x) in [
            // transformers 4 summed the same products in slices; transformers 5 ignores it.
            ("pretraining_tp", json!(2)),
            ("hidden_act", json!("swish")),
            ("attention_bias", json!(false)),
            ("partial_rotary_factor", json!(1.0)),
            ("quantization_config", Value::Null),
            ("attention_dropout", json!(0.1)),
            ("_name_or_path", json!("meta-llama/Llama-3.1-8B")),
            ("some_future_key", json!({"x": 1})),
        ] {
            assert_eq!(hf(&with(hf_tf5(), key, x)).unwrap(), base, "{key}");
        }
        invalid(
            hf(&with(hf_tf5(), "pretraining_tp", json!(0))),
            &["pretraining_tp must be at least 1"],
        );
        invalid(hf(&with(hf_tf5(), "attention_bias", json!("no"))), &[]);
        invalid(
            hf(&json!([1, 2])),
            &["m/config.json", "must be a JSON object"],
        );
    }

    #[test]
    fn meta_keys_herd_does_not_implement_stop_the_load() {
        let cases = [
            (
                "quantization_args",
                json!({"scheme": "int4_weight_int8_dynamic_activation"}),
            ),
            ("lora_args", json!({"rank": 8, "scale": 2.0})),
            ("moe_args", json!({"num_experts": 16})),
            ("ffn_exp", json!(4.0)),
            ("attention_chunk_size", json!(8192)),
            ("nope_layer_interval", json!(4)),
            ("use_qk_norm", json!(true)),
            ("attn_temperature_tuning", json!(true)),
            ("vision_chunk_size", json!(560)),
            ("vision_num_cross_attention_layers", json!(8)),
            (
                "vision_model",
                json!({"cross_attention_adapter": {"num_layers": 8}}),
            ),
            ("head_dim", json!(32)),
        ];
        for (key, x) in cases {
            let shown = brief(&x);
            refused(meta(&with(meta_base(), key, x)), key, &shown);
        }
        invalid(
            meta(&with(meta_base(), "n_heads", json!(6))),
            &["dim (128) must be a positive multiple of n_heads (6)"],
        );
        // The llama-models defaults of those fields are fine.
        let base = meta(&meta_base()).unwrap();
        for (key, x) in [
            ("use_qk_norm", json!(false)),
            ("vision_chunk_size", json!(-1)),
            ("vision_max_num_chunks", json!(4)),
            ("vision_num_cross_attention_layers", json!(-1)),
            ("quantization_args", Value::Null),
            ("head_dim", json!(16)),
            ("max_batch_size", json!(32)),
            ("some_future_key", json!(1)),
        ] {
            assert_eq!(meta(&with(meta_base(), key, x)).unwrap(), base, "{key}");
        }
    }

    #[test]
    fn meta_rope_scaling_keys_are_read_not_swallowed() {
        let c = meta(&meta_base()).unwrap();
        assert_eq!(c.rope_scaling, Some(RopeScaling::LLAMA31));
        let v = with(meta_base(), "rope_scaling_factor", json!(32.0));
        let v = with(v, "rope_high_freq_factor", json!(2.0));
        let s = meta(&v).unwrap().rope_scaling.unwrap();
        assert_eq!((s.factor, s.high_freq_factor), (32.0, 2.0));
        // A malformed factor used to be dropped for the default 8.
        let v = with(meta_base(), "rope_scaling_factor", json!("32"));
        invalid(
            meta(&v),
            &["'rope_scaling_factor' must be a number, found \"32\""],
        );
        // Without use_scaled_rope llama-models applies no scaling, whatever the factor says.
        let v = with(meta_base(), "use_scaled_rope", json!(false));
        let v = with(v, "rope_scaling_factor", json!(32.0));
        assert_eq!(meta(&v).unwrap().rope_scaling, None);
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
