//! herd: Llama 3 / 3.1 inference for HPC clusters.
//!
//! Layers (dependencies point down only), see ARCHITECTURE.md:
//! `cli` → `modes` → `engine` → `model` → `backend` → `parallel` → `checkpoint`, `tokenizer`;
//! `exit` (the exit codes) sits below `cli` and `modes`, which both use it.

pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod engine;
pub mod exit;
pub mod model;
pub mod modes;
pub mod parallel;
pub mod tokenizer;
