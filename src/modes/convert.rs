//! `herd convert`: reshard a checkpoint for a tensor-parallel degree. An optimisation only: herd
//! loads any layout at any --tp; converted files just make each rank's load one contiguous map.
//!
//! - `--format safetensors` (default): `rank-RR-of-NN.safetensors` holding exactly what rank RR of
//!   a tp-N replica loads (KV heads replicated when tp > n_kv_heads), plus `herd-tp.json`, the
//!   source's config and its tokenizer.
//! - `--format meta`: Meta's `consolidated.NN.pth` for N model-parallel ranks (fairscale split) +
//!   `params.json` + `tokenizer.model`, as llama3_chat's convert_weights.py made them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::checkpoint::meta::split_dim;
use crate::checkpoint::ranked::{manifest_json, rank_file, write_safetensors, MANIFEST};
use crate::checkpoint::{self, pth_writer::write_pth, Layout, Slice, Tensor};
use crate::model::config::LlamaConfig;
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
    /// Source checkpoint directory (any layout herd reads).
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory (created; must be empty if it exists).
    #[arg(long)]
    pub output: PathBuf,
    /// Ranks to write files for.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    #[arg(long, value_enum, default_value = "safetensors")]
    pub format: Format,
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
    if spec.starts_with("random:") || !args.model.is_dir() {
        bail!("--model must be a checkpoint directory, got '{spec}'");
    }
    let src = open_model(&spec)?;
    let cfg = src.cfg.clone();
    let tp = args.tp;
    ShardPlan::check(tp, &cfg)?;
    if args.format == Format::Meta && tp > cfg.n_kv_heads {
        bail!(
            "--format meta cannot replicate KV heads: --tp {tp} exceeds n_kv_heads {} \
             (Meta's loader concatenates shards); use --format safetensors",
            cfg.n_kv_heads
        );
    }
    let out = &args.output;
    if out.exists()
        && std::fs::read_dir(out)
            .with_context(|| format!("reading {}", out.display()))?
            .next()
            .is_some()
    {
        bail!("--output {} exists and is not empty", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let layout = checkpoint::detect(&args.model)?;
    let src_config = match &layout {
        Layout::Meta { params, .. } => params.clone(),
        Layout::Hf { config, .. } | Layout::Ranked { config, .. } => config.clone(),
    };
    let src_is_meta = src_config.ends_with("params.json");
    if let Some(tok) = &src.tokenizer {
        let name = if tok.extension().is_some_and(|e| e == "json") {
            "tokenizer.json"
        } else {
            "tokenizer.model"
        };
        std::fs::copy(tok, out.join(name)).with_context(|| format!("copying {}", tok.display()))?;
    }
    let names: Vec<String> = tensor_specs(&cfg).into_iter().map(|(n, _)| n).collect();
    let mut bytes = 0usize;
    match args.format {
        Format::Safetensors => {
            let name = if src_is_meta {
                "params.json"
            } else {
                "config.json"
            };
            std::fs::copy(&src_config, out.join(name))?;
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
            if src_is_meta {
                std::fs::copy(&src_config, out.join("params.json"))?;
            } else {
                meta_params(&cfg, &out.join("params.json"))?;
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
