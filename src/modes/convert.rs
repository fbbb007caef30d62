//! `herd convert`: reshard a checkpoint for a tensor-parallel degree. An optimisation only: herd
//! loads any layout at any --tp; converted files just make each rank's load one contiguous map.
//!
//! - `--format safetensors` (default): `rank-RR-of-NN.safetensors` holding exactly what rank RR of
//!   a tp-N replica loads (KV heads replicated when tp > n_kv_heads), plus `herd-tp.json` and the
//!   source's config.
//! - `--format meta`: Meta's `consolidated.NN.pth` for N model-parallel ranks (fairscale split) +
//!   `params.json`, as llama3_chat's convert_weights.py made them.
//!
//! Both copy the tokenizer and generation files beside the weights ([`SIDE_FILES`]). A built-in
//! `random:NAME` converts too: its weights, a config.json and the tokenizer it runs with, so the
//! output is an ordinary checkpoint that gives the same tokens.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::checkpoint::meta::split_dim;
use crate::checkpoint::ranked::{manifest_json, rank_file, write_safetensors, MANIFEST};
use crate::checkpoint::{self, pth_writer::write_pth, Layout, Slice, Tensor};
use crate::exit::{self, Coded};
use crate::model::config::{LlamaConfig, RopeScaling};
use crate::model::llama::tensor_specs;
use crate::model::loader::open_model;
use crate::model::shard::ShardPlan;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One safetensors file per rank (herd's own layout).
    Safetensors,
    /// Meta consolidated.NN.pth files (torch.load reads them).
    Meta,
}

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Source: a checkpoint directory (any layout herd reads) or a built-in model (random:tiny,
    /// random:1b, random:8b, random:70b).
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory (created; must be empty if it exists).
    #[arg(long)]
    pub output: PathBuf,
    /// Ranks to write files for.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Files to write: per-rank safetensors (herd's own layout) or Meta consolidated.NN.pth.
    #[arg(long, value_enum, default_value = "safetensors")]
    pub format: Format,
}

impl ConvertArgs {
    /// The flags, before the source is read (exit code 2 naming the flag).
    pub fn validate(&self) -> Result<()> {
        if self.tp == 0 {
            return Err(exit::usage("--tp must be at least 1"));
        }
        let out = &self.output;
        if out.is_file() {
            return Err(exit::usage(format!(
                "--output {} is a file: give a directory (created if missing)",
                out.display()
            )));
        }
        if out.is_dir()
            && std::fs::read_dir(out)
                .with_context(|| format!("reading {}", out.display()))?
                .next()
                .is_some()
        {
            return Err(exit::usage(format!(
                "--output {} exists and is not empty",
                out.display()
            )));
        }
        Ok(())
    }
}

/// The part of `name` that rank `plan` loads (None: the whole tensor).
fn rank_slice(name: &str, plan: &ShardPlan, cfg: &LlamaConfig) -> Option<Slice> {
    let ends = |s: &str| name.ends_with(s);
    if ends("attention.wq.weight") {
        Some(plan.wq(cfg))
    } else if ends("attention.wk.weight") || ends("attention.wv.weight") {
        Some(plan.wkv(cfg))
    } else if ends("attention.wo.weight") {
        Some(plan.wo(cfg))
    } else if ends("feed_forward.w1.weight") || ends("feed_forward.w3.weight") {
        Some(plan.w13(cfg))
    } else if ends("feed_forward.w2.weight") {
        Some(plan.w2(cfg))
    } else if name == "output.weight" {
        Some(plan.output(cfg))
    } else {
        // Norms, and the embedding table every rank holds whole.
        None
    }
}

/// Files a checkpoint carries beside its weights and config, copied as they are when present.
pub const SIDE_FILES: &[&str] = &[
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
];

/// Copy [`SIDE_FILES`] from `dir`, and the tokenizer the model loads with when it is not one of
/// them (an HF checkpoint's `original/tokenizer.model`, the cached one `random:NAME` uses).
fn copy_side_files(dir: Option<&Path>, tokenizer: Option<PathBuf>, out: &Path) -> Result<()> {
    let copy = |from: &Path, name: &str| {
        std::fs::copy(from, out.join(name))
            .with_context(|| format!("copying {} to {}", from.display(), out.display()))
    };
    for name in SIDE_FILES {
        if let Some(p) = dir.map(|d| d.join(name)).filter(|p| p.is_file()) {
            copy(&p, name)?;
        }
    }
    if let Some(tok) = tokenizer {
        let name = if tok.extension().is_some_and(|e| e == "json") {
            "tokenizer.json"
        } else {
            "tokenizer.model"
        };
        if !out.join(name).exists() {
            copy(&tok, name)?;
        }
    }
    Ok(())
}

/// A transformers 5 `config.json` for a config with no file of its own (`random:NAME`), checked
/// by reading it back.
fn hf_config(cfg: &LlamaConfig, path: &Path) -> Result<()> {
    let rope = match &cfg.rope_scaling {
        None => serde_json::json!({"rope_type": "default", "rope_theta": cfg.rope_theta}),
        Some(s) => serde_json::json!({
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            // transformers 5 wants an integer here (8192, not 8192.0).
            "original_max_position_embeddings": s.original_max_position_embeddings as u64,
        }),
    };
    // The f32 eps as its shortest decimal (1e-5, not 9.99999974e-6).
    let eps: f64 = cfg.norm_eps.to_string().parse()?;
    let c = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_dim,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "rms_norm_eps": eps,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_seq_len,
        "dtype": "bfloat16",
    });
    std::fs::write(path, serde_json::to_string_pretty(&c)?)?;
    let back = LlamaConfig::from_hf_config(path)?;
    if back != *cfg {
        bail!("internal: config.json reads back as {back:?}, want {cfg:?}");
    }
    Ok(())
}

/// Meta params.json for a config that came from elsewhere (HF), checked by reading it back.
fn meta_params(cfg: &LlamaConfig, path: &Path) -> Result<()> {
    // Meta: h = int(mult · int(8·dim/3)), rounded up to a multiple_of. With multiple_of = ffn_dim
    // and mult = ffn_dim / int(8·dim/3), any 0 < h ≤ ffn_dim rounds to exactly ffn_dim.
    let h = (8 * cfg.dim / 3).max(1);
    let mut p = serde_json::json!({
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "multiple_of": cfg.ffn_dim,
        "ffn_dim_multiplier": cfg.ffn_dim as f64 / h as f64,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "use_scaled_rope": cfg.rope_scaling.is_some(),
        "max_seq_len": cfg.max_seq_len,
    });
    if let Some(s) = &cfg.rope_scaling {
        p["rope_scaling_factor"] = serde_json::json!(s.factor);
        if s.high_freq_factor != RopeScaling::LLAMA31.high_freq_factor {
            p["rope_high_freq_factor"] = serde_json::json!(s.high_freq_factor);
        }
    }
    std::fs::write(path, serde_json::to_string_pretty(&p)?)?;
    let back = LlamaConfig::from_meta_params(path)?;
    if back != *cfg {
        bail!(
            "this model's config cannot be written as Meta params.json exactly \
             (read back {back:?}, want {cfg:?}); use --format safetensors"
        );
    }
    Ok(())
}

pub fn run(args: ConvertArgs) -> Result<()> {
    if crate::parallel::cluster().world_rank != 0 {
        return Ok(()); // one writer; run it without a launcher
    }
    let t0 = Instant::now();
    let spec = args.model.to_string_lossy().into_owned();
    let synthetic = spec.starts_with("random:");
    if !synthetic && !args.model.is_dir() {
        return Err(Coded::with(exit::MODEL)(anyhow::anyhow!(
            "--model must be a checkpoint directory or random:NAME, got '{spec}'"
        )));
    }
    let src = open_model(&spec).map_err(|e| Coded::with(exit::MODEL)(e.into()))?;
    let cfg = src.cfg.clone();
    let tp = args.tp;
    ShardPlan::check(tp, &cfg).map_err(exit::usage)?;
    if args.format == Format::Meta && cfg.tie_embeddings {
        return Err(exit::usage(
            "--format meta cannot express tied embeddings (Meta's params.json has no such key); \
             use --format safetensors",
        ));
    }
    if args.format == Format::Meta && tp > cfg.n_kv_heads {
        return Err(exit::usage(format!(
            "--format meta cannot replicate KV heads: --tp {tp} exceeds n_kv_heads {} \
             (Meta's loader concatenates shards); use --format safetensors",
            cfg.n_kv_heads
        )));
    }
    let out = &args.output;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // The source's own config file; none for a built-in model.
    let src_config = if synthetic {
        None
    } else {
        Some(match checkpoint::detect(&args.model)? {
            Layout::Meta { params, .. } => params,
            Layout::Hf { config, .. } | Layout::Ranked { config, .. } => config,
        })
    };
    let src_is_meta = src_config
        .as_ref()
        .is_some_and(|c| c.ends_with("params.json"));
    // random:NAME runs with the cached Llama 3 tokenizer; the output carries a copy.
    let tokenizer = if synthetic {
        let cached = crate::tokenizer::default_tokenizer_path();
        if !cached.is_file() {
            tracing::warn!(
                "no tokenizer copied: {} does not exist (scripts/fetch-tokenizer puts it there)",
                cached.display()
            );
        }
        Some(cached).filter(|p| p.is_file())
    } else {
        src.tokenizer.clone()
    };
    copy_side_files((!synthetic).then_some(args.model.as_path()), tokenizer, out)?;
    let names: Vec<String> = tensor_specs(&cfg).into_iter().map(|(n, _)| n).collect();
    let mut bytes = 0usize;
    match args.format {
        Format::Safetensors => {
            match &src_config {
                Some(c) if src_is_meta => {
                    std::fs::copy(c, out.join("params.json"))?;
                }
                Some(c) => {
                    std::fs::copy(c, out.join("config.json"))?;
                }
                None => hf_config(&cfg, &out.join("config.json"))?,
            }
            let mut pieces: Vec<(String, Vec<usize>, Vec<Option<Slice>>)> = names
                .iter()
                .map(|n| Ok((n.clone(), src.tensors.shape(n)?, Vec::new())))
                .collect::<Result<_>>()?;
            for r in 0..tp {
                let plan = ShardPlan { rank: r, tp };
                let mut tensors: Vec<(String, Tensor)> = Vec::new();
                for (n, _, p) in pieces.iter_mut() {
                    let s = rank_slice(n, &plan, &cfg);
                    tensors.push((n.clone(), src.tensors.load(n, s)?));
                    p.push(s);
                }
                bytes += tensors
                    .iter()
                    .map(|t| t.1.bytes.as_slice().len())
                    .sum::<usize>();
                write_safetensors(&out.join(rank_file(r, tp)), &tensors)?;
            }
            std::fs::write(
                out.join(MANIFEST),
                serde_json::to_string_pretty(&manifest_json(tp, &pieces))?,
            )?;
        }
        Format::Meta => {
            match &src_config {
                Some(c) if src_is_meta => {
                    std::fs::copy(c, out.join("params.json"))?;
                }
                _ => meta_params(&cfg, &out.join("params.json"))?,
            }
            for r in 0..tp {
                let mut tensors: Vec<(String, Tensor)> = Vec::new();
                for n in &names {
                    let shape = src.tensors.shape(n)?;
                    let s = match split_dim(n).filter(|_| tp > 1) {
                        None => None,
                        // A damaged checkpoint may hold fewer dims than the split needs.
                        Some(d) => {
                            let Some(&size) = shape.get(d) else {
                                bail!(
                                    "{}: tensor '{n}' has shape {shape:?}, with no dim {d} to split",
                                    src.tensors.describe()
                                );
                            };
                            Some(Slice {
                                dim: d,
                                start: (r as u128 * size as u128 / tp as u128) as usize,
                                len: size / tp,
                            })
                        }
                    };
                    tensors.push((n.clone(), src.tensors.load(n, s)?));
                }
                bytes += tensors
                    .iter()
                    .map(|t| t.1.bytes.as_slice().len())
                    .sum::<usize>();
                write_pth(&out.join(format!("consolidated.{r:02}.pth")), &tensors)?;
            }
        }
    }
    tracing::info!(
        output = %out.display(),
        tp,
        format = ?args.format,
        gb = format!("{:.3}", bytes as f64 / 1e9),
        seconds = format!("{:.2}", t0.elapsed().as_secs_f64()),
        "converted"
    );
    Ok(())
}
