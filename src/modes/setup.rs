//! Shared set-up of every mode that generates: model, tokenizer, backend, KV pool, engine.

use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::backend::cpu::{CpuBackend, GpuRounding};
use crate::backend::cuda::{self, plan, CudaBackend, Numerics};
use crate::backend::Backend;
use crate::backend::KvShape;
use crate::engine::{Engine, EngineConfig};
use crate::exit::{self, Coded};
use crate::model::llama::Llama;
use crate::model::loader::{open_model, ModelSource};
use crate::model::shard::ShardPlan;
use crate::model::tp::{follow, TpLeader};
use crate::model::{LlamaConfig, ModelRunner};
use crate::modes::host::meminfo;
use crate::parallel::{self, HostComm, SoloWorld, World};
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
    /// Where to run: auto (a GPU when one is present, else the cpu), cpu, or cuda.
    #[arg(long, env = "HERD_DEVICE", default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    pub device: String,
    /// Fraction of the GPU's memory herd may use for weights, activations and the KV cache, in (0, 1].
    #[arg(long, env = "HERD_GPU_MEMORY_UTILIZATION", default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// GPU precision: bf16 (bf16 GEMM inputs and KV cache, fastest) or accurate (GEMM inputs
    /// split into two bf16 halves and an f32 KV cache: f32-like log-probs, 2x GEMM FLOPs and KV bytes).
    #[arg(long, env = "HERD_GPU_NUMERICS", default_value = "bf16", value_parser = ["bf16", "accurate"])]
    pub gpu_numerics: String,
    /// Most sequences generated at once (continuous batching).
    #[arg(long, env = "HERD_MAX_BATCH_SIZE", default_value_t = 64)]
    pub max_batch_size: usize,
    /// Most tokens in one forward step (decode tokens + prefill chunks).
    #[arg(long, env = "HERD_MAX_BATCH_TOKENS", default_value_t = 1024)]
    pub max_batch_tokens: usize,
    /// Shorten the context (prompt + generation) below the model's own (at least 2, at most the model's).
    #[arg(long, env = "HERD_MAX_SEQ_LEN")]
    pub max_seq_len: Option<usize>,
    /// Memory for the KV cache in GB (default: 1 on the CPU; on a GPU, what --gpu-memory-utilization leaves).
    #[arg(long, env = "HERD_KV_CACHE_GB")]
    pub kv_cache_gb: Option<f64>,
    /// KV cache block size in tokens.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Turn off automatic prefix caching (sharing the KV blocks of prompts' common prefixes);
    /// results are the same either way, only the work differs.
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Tensor-parallel degree: ranks per replica (the world splits into world / tp replicas of
    /// consecutive ranks, each on one node).
    #[arg(long, env = "HERD_TP", default_value_t = 1)]
    pub tp: usize,
}

impl ModelArgs {
    /// Every model flag against its range, before anything loads (the checks that need the
    /// model's config run in [`start`] before the weights load). Errors name the flag and the
    /// limit (exit code 2).
    pub fn validate(&self) -> Result<()> {
        check_tp(self.tp)?;
        let u = self.gpu_memory_utilization;
        if !(u > 0.0 && u <= 1.0) {
            return Err(exit::usage(format!(
                "--gpu-memory-utilization must be in (0, 1] (a fraction of the GPU's memory), got {u}"
            )));
        }
        for (flag, v) in [
            ("--max-batch-size", self.max_batch_size),
            ("--max-batch-tokens", self.max_batch_tokens),
            ("--block-size", self.block_size),
        ] {
            if v == 0 {
                return Err(exit::usage(format!("{flag} must be at least 1")));
            }
        }
        if let Some(n) = self.max_seq_len.filter(|&n| n < 2) {
            return Err(exit::usage(format!(
                "--max-seq-len must be at least 2 (a prompt token and a generated one), got {n}"
            )));
        }
        if let Some(gb) = self.kv_cache_gb {
            if !(gb > 0.0 && gb.is_finite()) {
                return Err(exit::usage(format!(
                    "--kv-cache-gb must be a positive number of GB, got {gb}"
                )));
            }
            // The CPU's pool lives in host memory; a GPU's pool is checked against the card
            // before anything is allocated (load_cuda).
            let on_cpu = match self.device.as_str() {
                "cpu" => true,
                "cuda" => false,
                _ => cuda::device_count().is_err(),
            };
            if let Some(total) = meminfo("MemTotal:").filter(|_| on_cpu) {
                if gb * 1e9 > total as f64 {
                    return Err(exit::usage(format!(
                        "--kv-cache-gb {gb} is more than this machine's memory ({:.1} GB); lower it",
                        total as f64 / 1e9
                    )));
                }
            }
        }
        if let Some(t) = &self.tokenizer {
            if !t.is_file() {
                return Err(exit::usage(format!(
                    "--tokenizer {}: no such file (give a tokenizer.model or tokenizer.json)",
                    t.display()
                )));
            }
        }
        Ok(())
    }
}

/// `--tp` against the launch, by the topology's own rule (at least 1, a divisor of the world).
pub fn check_tp(tp: usize) -> Result<()> {
    let world = parallel::cluster().world_size;
    parallel::Topology::new(0, world, tp, 0)
        .map(drop)
        .map_err(exit::usage)
}

/// Bytes of memory the OS says are available (Linux), for sizing checks.
fn mem_available() -> Option<u64> {
    meminfo("MemAvailable:")
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

/// `--device`: true for the GPU. auto takes one when present and says why not otherwise.
fn use_cuda(args: &ModelArgs) -> Result<bool> {
    Ok(match args.device.as_str() {
        "cpu" => false,
        "cuda" => match cuda::device_count() {
            Ok(_) => true,
            Err(why) => {
                return Err(Coded::with(exit::MODEL)(anyhow::anyhow!(
                    "--device cuda: {why} (use --device cpu or auto)"
                )))
            }
        },
        "auto" => match cuda::device_count() {
            Ok(_) => true,
            Err(why) => {
                tracing::info!("{why}; running on the cpu");
                false
            }
        },
        other => {
            return Err(exit::usage(format!(
                "unknown --device '{other}': use auto, cpu or cuda"
            )))
        }
    })
}

/// Load this rank's shard of the model in `world` (collective: every rank calls it).
///
/// Replica leaders get `Some(engine)`, whose model broadcasts each step plan to the replica's
/// peers. Peers run the forward of every step they receive until the leader's engine is dropped
/// (shutdown message), then return `None`.
///
/// Errors carry their exit code: a flag that does not fit the model 2, anything else 3 (the
/// model could not be found, loaded or run).
pub fn start(args: &ModelArgs, world: &dyn World) -> Result<Option<Engine>> {
    args.validate()?;
    start_checked(args, world).map_err(Coded::with(exit::MODEL))
}

fn start_checked(args: &ModelArgs, world: &dyn World) -> Result<Option<Engine>> {
    let topo = world.topology().clone();
    if topo.tp != args.tp {
        bail!(
            "internal: the world was split for tp {} but --tp is {}",
            topo.tp,
            args.tp
        );
    }
    let on_gpu = use_cuda(args)?;
    if on_gpu && topo.tp > 1 && !cuda::nccl_present() {
        // The CUDA backend's collectives go through NCCL; MPI over host memory would defeat the
        // GPU. (NcclComm::new checks again, collectively, so that no rank waits on another.)
        bail!(
            "--tp {} on the GPU needs the NCCL communicator: {}; or use --tp 1 per GPU \
             (data-parallel replicas) or --device cpu",
            topo.tp,
            cuda::NCCL_MISSING
        );
    }
    let mut src = open_model(&args.model)?;
    // Before anything big is read: the flags that need the model's config.
    if let Some(n) = args.max_seq_len {
        if n > src.cfg.max_seq_len {
            return Err(exit::usage(format!(
                "--max-seq-len {n} is beyond the context of {} ({} tokens): positions past it were never trained",
                src.label, src.cfg.max_seq_len
            )));
        }
        src.cfg.max_seq_len = n;
    }
    let cfg = src.cfg.clone();
    ShardPlan::check(args.tp, &cfg).map_err(exit::usage)?;
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
    parallel::test_fault("load").map_err(anyhow::Error::msg)?;
    let comm = world.replica_comm();
    tracing::info!(
        world = topo.world_size,
        tp = topo.tp,
        replicas = topo.n_replicas,
        "topology"
    );
    let (mut model, seconds) = if on_gpu {
        load_cuda(args, &src, &cfg, shard, comm.as_ref())?
    } else {
        load_cpu(args, &src, &cfg, shard, comm.clone())?
    };
    report_load(world, seconds)?;
    let Some(tok) = tok else {
        follow(model.as_mut(), comm.as_ref(), |n| {
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
        prefix_cache: !args.no_prefix_cache,
    };
    let runner: Box<dyn ModelRunner> = if topo.tp > 1 {
        Box::new(TpLeader::new(model, comm))
    } else {
        model
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

/// The shape of one KV block of this rank (its share of the KV heads), for sizing the pool.
fn one_kv_block(args: &ModelArgs, cfg: &LlamaConfig, shard: &ShardPlan) -> KvShape {
    KvShape {
        n_layers: cfg.n_layers,
        num_blocks: 1,
        block_size: args.block_size,
        n_kv_heads: shard.local_kv_heads(cfg),
        head_dim: cfg.head_dim,
    }
}

/// Never more blocks than the batch could ever fill (+1 spare).
fn useful_kv_blocks(args: &ModelArgs, cfg: &LlamaConfig) -> usize {
    args.max_batch_size * cfg.max_seq_len.div_ceil(args.block_size) + 1
}

/// The CPU backend with a KV pool of `--kv-cache-gb` (default 1 GB), checked against host memory.
fn load_cpu(
    args: &ModelArgs,
    src: &ModelSource,
    cfg: &LlamaConfig,
    shard: ShardPlan,
    comm: Arc<dyn HostComm>,
) -> Result<(Box<dyn ModelRunner>, f64)> {
    let shape = one_kv_block(args, cfg, &shard);
    let block_bytes = shape.block_bytes(4);
    let budget = (args.kv_cache_gb.unwrap_or(1.0) * 1e9) as usize;
    let useful = useful_kv_blocks(args, cfg);
    let num_blocks = (budget / block_bytes).min(useful);
    if num_blocks == 0 {
        return Err(exit::usage(format!(
            "--kv-cache-gb {} holds no KV block ({} bytes each); raise it",
            args.kv_cache_gb.unwrap_or(1.0),
            block_bytes
        )));
    }
    // Each rank holds 1/tp of the layers plus the whole embedding table.
    let weights_bytes = (cfg.n_params() / shard.tp + cfg.vocab_size * cfg.dim) as u64 * 2;
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
        "loading"
    );
    let backend = CpuBackend::with_comm(comm);
    // A comparison aid, never a default: the reference with the CUDA backend's bf16 roundings, so
    // that the GPU can be held to a tight tolerance (tests/cuda_emu.rs) apart from what bf16 costs.
    if std::env::var("HERD_CPU_GPU_ROUNDING").is_ok_and(|v| v == "bf16") {
        tracing::warn!("HERD_CPU_GPU_ROUNDING=bf16: the CPU backend rounds GEMM inputs and the KV cache to bf16 like the GPU");
        return load_llama(
            GpuRounding(backend),
            src,
            cfg,
            shard,
            num_blocks,
            args.block_size,
        );
    }
    load_llama(backend, src, cfg, shard, num_blocks, args.block_size)
}

fn load_llama<B: Backend + 'static>(
    backend: B,
    src: &ModelSource,
    cfg: &LlamaConfig,
    shard: ShardPlan,
    num_blocks: usize,
    block_size: usize,
) -> Result<(Box<dyn ModelRunner>, f64)> {
    let model = Llama::load(
        backend,
        src.tensors.as_ref(),
        cfg,
        shard,
        num_blocks,
        block_size,
    )?;
    let seconds = model.load_seconds();
    Ok((Box::new(model), seconds))
}

/// The CUDA backend on this node's GPU `local_rank % device count`, with the replica's NCCL
/// communicator when tp > 1 and the memory plan made before anything big is allocated.
/// NOTE: never run on a GPU yet (the GPU choice and the NCCL set-up included).
fn load_cuda(
    args: &ModelArgs,
    src: &ModelSource,
    cfg: &LlamaConfig,
    shard: ShardPlan,
    comm: &dyn HostComm,
) -> Result<(Box<dyn ModelRunner>, f64)> {
    let n_gpus = cuda::device_count().map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?;
    let local_rank = parallel::cluster().local_rank;
    let ordinal = local_rank % n_gpus;
    if parallel::cluster().local_size > n_gpus {
        tracing::warn!(
            local_ranks = parallel::cluster().local_size,
            gpus = n_gpus,
            "more ranks on this node than GPUs: ranks share GPUs"
        );
    }
    let mut backend =
        CudaBackend::new(ordinal).map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?;
    if shard.tp > 1 {
        backend.init_tp(comm).map_err(|e| {
            anyhow::anyhow!(
                "--tp {} on GPU {ordinal} (local rank {local_rank}): {e}",
                shard.tp
            )
        })?;
    }
    let numerics = if args.gpu_numerics == "accurate" {
        Numerics::Accurate
    } else {
        Numerics::Bf16
    };
    backend.set_numerics(numerics);
    let kv_elem = numerics.kv_elem_bytes();
    let info = backend.info.clone();
    let shape = one_kv_block(args, cfg, &shard);
    let q_dim = (shard.local_heads(cfg) * cfg.head_dim) as u64;
    let kv_dim = (shape.n_kv_heads * cfg.head_dim) as u64;
    // With tp > 1 the logits live three times at once (the local shard, NCCL's all-gather buffer,
    // the reordered rows) instead of twice: count 1.5x the vocabulary. NCCL's own buffers are
    // not counted (the headroom under --gpu-memory-utilization covers them).
    let logit_vocab = if shard.tp > 1 {
        cfg.vocab_size + cfg.vocab_size / 2
    } else {
        cfg.vocab_size
    };
    // Decode graphs pad their rows up to a power of two (at most 256).
    let graph_rows = cuda::graph_bucket(args.max_batch_size.max(1))
        .min(256)
        .max(args.max_batch_size.max(1));
    // Token rows the activations are planned for: a step's chunk, or a padded graph's rows.
    let plan_rows = args.max_batch_tokens.max(graph_rows);
    let activations = plan::activation_bytes(
        plan_rows as u64,
        graph_rows as u64,
        cfg.dim as u64,
        cfg.ffn_dim as u64,
        q_dim,
        kv_dim,
        logit_vocab as u64,
        numerics == Numerics::Accurate,
    );
    if let Some(gb) = args
        .kv_cache_gb
        .filter(|gb| gb * 1e9 > info.total_bytes as f64)
    {
        return Err(exit::usage(format!(
            "--kv-cache-gb {gb} is more than the memory of {} ({:.1} GB); lower it",
            info.name,
            info.total_bytes as f64 / 1e9
        )));
    }
    let useful = useful_kv_blocks(args, cfg);
    let kv_cap = args
        .kv_cache_gb
        .map(|gb| ((gb * 1e9) as usize / shape.block_bytes(kv_elem)).max(1))
        .unwrap_or(usize::MAX);
    let p = plan::plan_memory(&plan::MemoryPlanInput {
        total_bytes: info.total_bytes,
        free_bytes: info.free_bytes,
        utilization: args.gpu_memory_utilization,
        weight_bytes: plan::weight_bytes(
            cfg.n_params() as u64,
            cfg.vocab_size as u64,
            cfg.dim as u64,
            shard.tp as u64,
            cfg.tie_embeddings,
        ),
        activation_bytes: activations,
        kv_block_bytes: shape.block_bytes(kv_elem) as u64,
        useful_blocks: useful.min(kv_cap) as u64,
    })
    .map_err(|e| anyhow::anyhow!("{} on {} ({}): {e}", args.model, info.name, backend.name()))?;
    tracing::info!(
        model = %src.label,
        gpu = %backend.name(),
        numerics = ?numerics,
        kernels = %backend.kernel_cache.0.display(),
        kernel_cache_hit = backend.kernel_cache.1,
        params_b = cfg.n_params() as f64 / 1e9,
        kv_blocks = p.kv_blocks,
        kv_gb = format!("{:.2}", p.kv_bytes as f64 / 1e9),
        budget_gb = format!("{:.2}", p.budget_bytes as f64 / 1e9),
        "loading"
    );
    backend
        .reserve_activations(activations as usize, args.max_batch_size, plan_rows)
        .map_err(|e| anyhow::anyhow!("{} on {}: {e}", args.model, info.name))?;
    load_llama(
        backend,
        src,
        cfg,
        shard,
        p.kv_blocks as usize,
        args.block_size,
    )
}
