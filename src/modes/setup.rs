//! Shared set-up of every mode that generates: model, tokenizer, backend, KV pool, engine.

use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::backend::cpu::CpuBackend;
use crate::backend::KvShape;
use crate::engine::{Engine, EngineConfig};
use crate::model::llama::Llama;
use crate::model::loader::open_model;
use crate::model::shard::ShardPlan;
use crate::model::tp::{follow, TpLeader};
use crate::model::ModelRunner;
use crate::parallel::{self, SoloWorld, World};
use crate::tokenizer::{self, Tokenizer};

/// Options every generating mode shares.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Checkpoint directory (Meta or HF layout) or a built-in model: random:tiny, random:1b, random:8b, random:70b.
    #[arg(long, env = "HERD_MODEL")]
    pub model: String,
    /// Tokenizer file (tokenizer.model or tokenizer.json); default: the checkpoint's own, else the cached Llama 3 tokenizer.
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// Where to run: auto or cpu.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Most sequences generated at once (continuous batching).
    #[arg(long, default_value_t = 64)]
    pub max_batch_size: usize,
    /// Most tokens in one forward step (decode tokens + prefill chunks).
    #[arg(long, default_value_t = 1024)]
    pub max_batch_tokens: usize,
    /// Override the context length (prompt + generation) the model allows.
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Memory for the KV cache in GB (default: 1 on the CPU).
    #[arg(long)]
    pub kv_cache_gb: Option<f64>,
    /// KV cache block size in tokens.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Tensor-parallel degree: ranks per replica (the world splits into world / tp replicas of
    /// consecutive ranks, each on one node).
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
}

/// Bytes of memory the OS says are available (Linux), for sizing checks.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn load_tokenizer(args: &ModelArgs, own: Option<&std::path::Path>) -> Result<Tokenizer> {
    let path = args.tokenizer.as_deref().or(own);
    match path {
        Some(p) => {
            Tokenizer::from_file(p).with_context(|| format!("loading tokenizer {}", p.display()))
        }
        None => Ok(tokenizer::load_default()?),
    }
}

/// Peak resident memory of this process in bytes (Linux VmHWM).
pub fn peak_rss() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Load the model for a world of one rank and wrap it in an engine.
pub fn build_engine(args: &ModelArgs) -> Result<Engine> {
    let world = SoloWorld::with_tp(args.tp).map_err(anyhow::Error::msg)?;
    start(args, &world)?.context("a world of one rank is its own replica leader")
}

/// Load this rank's shard of the model in `world` (collective: every rank calls it).
///
/// Replica leaders get `Some(engine)`, whose model broadcasts each step plan to the replica's
/// peers. Peers run the forward of every step they receive until the leader's engine is dropped
/// (shutdown message), then return `None`.
pub fn start(args: &ModelArgs, world: &dyn World) -> Result<Option<Engine>> {
    let topo = world.topology().clone();
    if topo.tp != args.tp {
        bail!(
            "internal: the world was split for tp {} but --tp is {}",
            topo.tp,
            args.tp
        );
    }
    match args.device.as_str() {
        "auto" | "cpu" => {}
        other => bail!("unknown --device '{other}': this build runs on the cpu (auto, cpu)"),
    }
    if args.block_size == 0 || args.max_batch_size == 0 || args.max_batch_tokens == 0 {
        bail!("--block-size, --max-batch-size and --max-batch-tokens must be at least 1");
    }
    let mut src = open_model(&args.model)?;
    if let Some(n) = args.max_seq_len {
        if n < 2 {
            bail!("--max-seq-len must be at least 2");
        }
        src.cfg.max_seq_len = n;
    }
    let cfg = src.cfg.clone();
    // Before anything big is read: does --tp split this model?
    ShardPlan::check(args.tp, &cfg)?;
    // Only leaders tokenize; peers never see text.
    let tok = if topo.is_replica_leader() {
        Some(Arc::new(load_tokenizer(args, src.tokenizer.as_deref())?))
    } else {
        None
    };
    // A checkpoint's own tokenizer must fit its vocabulary; the cached Llama 3 tokenizer stands in
    // for checkpoints that ship none (test fixtures with small vocabularies).
    let own_tokenizer = args.tokenizer.is_some() || src.tokenizer.is_some();
    if let Some(tok) = tok.as_ref().filter(|t| t.vocab_size() > cfg.vocab_size) {
        let msg = format!(
            "the tokenizer ({}) has {} tokens but the model's vocabulary is {}",
            tok.source().display(),
            tok.vocab_size(),
            cfg.vocab_size
        );
        if own_tokenizer {
            bail!("{msg}: wrong tokenizer for this checkpoint?");
        }
        if !args.model.starts_with("random:") {
            tracing::warn!(
                "{msg}; the checkpoint ships no tokenizer, text output may be meaningless"
            );
        }
    }
    let shard = ShardPlan {
        rank: topo.tp_rank,
        tp: topo.tp,
    };
    let shape = KvShape {
        n_layers: cfg.n_layers,
        num_blocks: 1,
        block_size: args.block_size,
        n_kv_heads: shard.local_kv_heads(&cfg),
        head_dim: cfg.head_dim,
    };
    let block_bytes = shape.block_bytes(4);
    let budget = (args.kv_cache_gb.unwrap_or(1.0) * 1e9) as usize;
    // Never more blocks than the batch could ever fill.
    let useful = args.max_batch_size * cfg.max_seq_len.div_ceil(args.block_size) + 1;
    let num_blocks = (budget / block_bytes).min(useful);
    if num_blocks == 0 {
        bail!(
            "--kv-cache-gb {} holds no KV block ({} bytes each); raise it",
            args.kv_cache_gb.unwrap_or(1.0),
            block_bytes
        );
    }
    // Each rank holds 1/tp of the layers plus the whole embedding table.
    let weights_bytes = (cfg.n_params() / args.tp + cfg.vocab_size * cfg.dim) as u64 * 2;
    if let Some(avail) = mem_available() {
        let need = weights_bytes + (num_blocks * block_bytes) as u64;
        let msg = format!(
            "{} needs about {:.1} GB of memory (weights {:.1} GB + KV cache {:.1} GB) but {:.1} GB are available; \
             lower --kv-cache-gb or use a machine with more memory",
            args.model,
            need as f64 / 1e9,
            weights_bytes as f64 / 1e9,
            (num_blocks * block_bytes) as f64 / 1e9,
            avail as f64 / 1e9
        );
        if need > avail {
            // Generated weights must fit in RAM; mapped ones would page from disk (slow, but it runs).
            if args.model.starts_with("random:") {
                bail!(msg);
            }
            tracing::warn!("{msg}");
        }
    }
    tracing::info!(
        model = %src.label,
        source = %src.tensors.describe(),
        params_b = cfg.n_params() as f64 / 1e9,
        kv_blocks = num_blocks,
        kv_tokens = num_blocks * args.block_size,
        world = topo.world_size,
        tp = topo.tp,
        replicas = topo.n_replicas,
        "loading"
    );
    parallel::test_fault("load").map_err(anyhow::Error::msg)?;
    let comm = world.replica_comm();
    let mut model = Llama::load(
        CpuBackend::with_comm(comm.clone()),
        src.tensors.as_ref(),
        &cfg,
        shard,
        num_blocks,
        args.block_size,
    )?;
    report_load(world, model.load_seconds())?;
    let Some(tok) = tok else {
        follow(&mut model, comm.as_ref(), |n| {
            // Fail on the second step, mid-generation, when a test asks.
            if n == 1 {
                parallel::test_fault("step")
            } else {
                Ok(())
            }
        })?;
        return Ok(None);
    };
    let engine_cfg = EngineConfig {
        max_batch_size: args.max_batch_size,
        max_batch_tokens: args.max_batch_tokens,
        prefill_chunk: args.max_batch_tokens.min(512),
    };
    let runner: Box<dyn ModelRunner> = if topo.tp > 1 {
        Box::new(TpLeader::new(model, comm))
    } else {
        Box::new(model)
    };
    Ok(Some(Engine::new(runner, tok, engine_cfg)))
}

/// Every rank's load time and peak host memory, logged by the world leader (one line per rank).
fn report_load(world: &dyn World, seconds: f64) -> Result<()> {
    let peak_gb = peak_rss().map_or(f32::NAN, |b| (b as f64 / 1e9) as f32);
    let all = world.world_comm().all_gather(&[seconds as f32, peak_gb])?;
    for (rank, r) in all.chunks(2).enumerate() {
        tracing::info!(
            rank,
            seconds = format!("{:.2}", r[0]),
            peak_host_gb = format!("{:.3}", r[1]),
            "loaded"
        );
    }
    Ok(())
}
