//! The CUDA backend (cudarc; libraries loaded at run time, so this builds and runs without CUDA).
pub mod kernels;
