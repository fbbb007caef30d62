//! CUDA C sources embedded in the binary, compiled by NVRTC at first use for the card's
//! architecture and cached on disk as PTX (`~/.cache/herd/kernels/<hash>.ptx`).

use std::hash::{Hash, Hasher};
use std::path::PathBuf;

/// Every kernel file, in the order they are concatenated after `common.cuh`.
pub const FILES: &[(&str, &str)] = &[
    ("elementwise.cu", include_str!("kernels/elementwise.cu")),
    ("rope_kv.cu", include_str!("kernels/rope_kv.cu")),
    ("attention.cu", include_str!("kernels/attention.cu")),
    ("sample.cu", include_str!("kernels/sample.cu")),
    ("gemv.cu", include_str!("kernels/gemv.cu")),
];

const COMMON: &str = include_str!("kernels/common.cuh");

/// Every `extern "C" __global__` entry point the backend loads.
pub const KERNELS: &[&str] = &[
    "embed_gather",
    "add_rmsnorm",
    "silu_mul",
    "add_in_place",
    "cast_bf16",
    "cast_bf16_split",
    "select_rows",
    "gather_cols_reorder",
    "rope_store_kv_bf16",
    "rope_store_kv_f32",
    "attn_partial_bf16",
    "attn_partial_f32",
    "attn_combine",
    "attn_prefill_bf16",
    "attn_prefill_f32",
    "sample_rows",
    "gemv_bf16",
];

/// The whole program: common helpers, then every kernel file (one NVRTC program, one module).
pub fn source() -> String {
    let mut s = String::from(COMMON);
    for (name, text) in FILES {
        s.push_str(&format!("\n// ---- {name} ----\n"));
        s.push_str(text);
    }
    s
}

/// NVRTC could not compile the kernels (or is missing).
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(
        "NVRTC (libnvrtc.so) was not found: install it with `pip install --target DIR \
         nvidia-cuda-nvrtc==13.0.88` and put DIR/nvidia/cu13/lib on LD_LIBRARY_PATH \
         (scripts/test does this for CI)"
    )]
    NoNvrtc,
    #[error("NVRTC failed for {arch}: {log}")]
    Failed { arch: String, log: String },
}

/// Is libnvrtc loadable? (cudarc panics on first use when it is not.)
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version, e.g. (13, 0).
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_present() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: nvrtcVersion writes two ints; the library is present (checked above).
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// Compile every kernel to PTX for `arch` (e.g. "compute_90"). Precise math (no fast-math):
/// expf, sincosf and division must round like the CPU reference.
pub fn compile_ptx(arch: &'static str) -> Result<String, CompileError> {
    if !nvrtc_present() {
        return Err(CompileError::NoNvrtc);
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        fmad: Some(true),
        options: vec!["--std=c++17".into()],
        name: Some("herd_kernels.cu".into()),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(source(), opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(e) => {
            let log = match &e {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                    log.to_string_lossy().into_owned()
                }
                other => format!("{other:?}"),
            };
            Err(CompileError::Failed {
                arch: arch.to_string(),
                log,
            })
        }
    }
}

/// NVRTC's `compute_XY` name for a compute capability; `None` for cards older than sm_80.
pub fn arch_for(major: i32, minor: i32) -> Option<&'static str> {
    Some(match (major, minor) {
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, _) => "compute_90",
        (10, _) => "compute_100",
        (12, _) => "compute_120",
        (8, _) => "compute_80",
        _ => return None,
    })
}

/// Where compiled kernels are cached: $HERD_CACHE/kernels or ~/.cache/herd/kernels.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("HERD_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/herd")))
        .unwrap_or_else(|| PathBuf::from(".herd-cache"));
    base.join("kernels")
}

/// PTX for `arch`, from the disk cache when the same sources and NVRTC made it before.
/// The cache key covers the source text, the arch and NVRTC's version: a changed kernel or
/// compiler never reuses stale PTX. A cache that cannot be written is only a slower start.
pub fn ptx_cached(arch: &'static str) -> Result<(String, PathBuf, bool), CompileError> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    source().hash(&mut h);
    arch.hash(&mut h);
    nvrtc_version().hash(&mut h);
    let path = cache_dir().join(format!("{:016x}-{arch}.ptx", h.finish()));
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok((text, path, true));
    }
    let ptx = compile_ptx(arch)?;
    if std::fs::create_dir_all(cache_dir()).is_ok() {
        // Write then rename: ranks starting together never read a half-written file.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok((ptx, path, false))
}
