//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use herd::backend::cpu::CpuBackend;
use herd::engine::{Engine, EngineConfig};
use herd::model::llama::Llama;
use herd::model::loader::open_model;
use herd::model::shard::ShardPlan;
use serde_json::Value;

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// The real Llama 3 tokenizer; the tests need it (scripts/fetch-tokenizer puts it in the cache).
pub fn tokenizer() -> Arc<herd::tokenizer::Tokenizer> {
    match herd::tokenizer::load_default() {
        Ok(t) => Arc::new(t),
        Err(e) => panic!("{e}"),
    }
}

/// An engine over a checkpoint directory or built-in model on the CPU backend.
pub fn engine(model: &str, cfg: EngineConfig, kv_blocks: usize, block_size: usize) -> Engine {
    let src = open_model(model).unwrap_or_else(|e| panic!("{model}: {e}"));
    let llama = Llama::load(
        CpuBackend::default(),
        src.tensors.as_ref(),
        &src.cfg,
        ShardPlan::SOLO,
        kv_blocks,
        block_size,
    )
    .unwrap_or_else(|e| panic!("{model}: {e}"));
    Engine::new(Box::new(llama), tokenizer(), cfg)
}

pub fn reference(model: &str) -> Value {
    let p = fixture(&format!("models/{model}/reference.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn floats(v: &Value) -> Vec<Option<f64>> {
    v.as_array().unwrap().iter().map(|x| x.as_f64()).collect()
}

/// Run the `herd` binary (logs at warn) to completion: exit code, stdout, stderr.
pub fn run_herd(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("herd runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every line of a JSONL file, parsed (a test fails naming the file or the line).
pub fn jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// False (after saying so) when the MPI tests must be skipped (HERD_NO_MPI=1: this machine has
/// no MPI); panics when they cannot run but nobody said MPI is unavailable.
pub fn mpi_available() -> bool {
    if std::env::var("HERD_NO_MPI").is_ok_and(|v| v == "1") {
        eprintln!("skipped: HERD_NO_MPI=1");
        return false;
    }
    if !cfg!(feature = "mpi") {
        panic!(
            "this test needs a build with MPI: run `cargo test --features mpi` (scripts/test does), \
             or set HERD_NO_MPI=1 on a machine without an MPI library"
        );
    }
    true
}

/// `herd` on the emulated CUDA device (scripts/cuda-emu builds it when needed), logs at warn,
/// no emulator banner; add the arguments and environment.
pub fn herd_on_emulated_device() -> std::process::Command {
    let mut c =
        std::process::Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cuda-emu"));
    c.arg(env!("CARGO_BIN_EXE_herd"))
        .env("RUST_LOG", "warn")
        .env("CUDA_EMU_QUIET", "1");
    c
}
