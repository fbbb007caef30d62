//! The CUDA backend: cudarc with the CUDA libraries loaded at run time, so the same binary builds
//! and runs on a machine without CUDA and says "no GPU" there.
//!
//! - `kernels/`: CUDA C, embedded with `include_str!`, compiled by NVRTC for the card's arch at
//!   first use and cached on disk (kernels.rs).
//! - gemm.rs: cuBLASLt bf16 × bf16 → f32 products.
//! - nccl.rs: the tensor-parallel communicator (NCCL, id sent over the replica's host comm).
//! - backend.rs: the [`crate::backend::Backend`] implementation.
//! - plan.rs: the memory plan under `--gpu-memory-utilization`.
//! - selftest.rs (kernels vs their CPU twins) / report: `herd doctor` sections.
//!
//! STATUS: run on one GPU (an NVIDIA H200: self-test and bench, results/gpu-check-*); tensor
//! parallel over NCCL only on the emulated device so far (see README "GPU").

mod arena;
mod backend;
mod flash_model;
mod gemm;
pub mod kernels;
pub mod nccl;
pub mod plan;
pub mod report;
mod sample_model;
pub mod selftest;
mod staging;

pub use backend::{
    attn_splits, counters, device_count, driver_present, graph_bucket, profile_kernels,
    take_kernel_profile, time_steps, CudaAct, CudaBackend, CudaKv, CudaMatrix, DeviceInfo,
    KernelTime, Numerics, StepCounters, MAX_TOP_LOGPROBS,
};
pub use nccl::{nccl_present, NcclComm, NCCL_MISSING};
pub use report::report;
