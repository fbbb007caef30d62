//! `herd doctor`'s GPU section: driver and CUDA versions, each GPU with its memory, and the CUDA
//! libraries found (with their paths). Never panics without CUDA.

use std::path::PathBuf;

use super::backend::{device_count, driver_present};
use super::kernels;

/// Directories the dynamic loader searches for our libraries (LD_LIBRARY_PATH, then the usual
/// system ones), for reporting where a library was found.
fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect();
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/cuda/lib64",
        "/usr/local/nvidia/lib64",
        "/lib/x86_64-linux-gnu",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

/// First file named `libNAME.so*` in the search path.
pub fn find_library(name: &str) -> Option<PathBuf> {
    let prefix = format!("lib{name}.so");
    for d in search_dirs() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut hits: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .map(|n| n == prefix || n.starts_with(&format!("{prefix}.")))
                    .unwrap_or(false)
            })
            .collect();
        hits.sort();
        if let Some(h) = hits.into_iter().next() {
            return Some(h);
        }
    }
    None
}

fn lib_line(label: &str, file: &str, loadable: bool) -> String {
    let found = find_library(file);
    match (loadable, found) {
        (true, Some(p)) => format!("  {label:<9} found     {}\n", p.display()),
        (true, None) => format!(
            "  {label:<9} found     (path not found in LD_LIBRARY_PATH or system dirs)\n"
        ),
        // NCCL's package installs only libnccl.so.2, a name cudarc does not try.
        (false, Some(p)) => format!(
            "  {label:<9} MISSING   {} is there, but cudarc loads lib{file}.so or lib{file}.so.13: link lib{file}.so to it in a directory on LD_LIBRARY_PATH\n",
            p.display()
        ),
        (false, None) => format!(
            "  {label:<9} MISSING   (cudarc looks for lib{file}.so / lib{file}.so.13 on LD_LIBRARY_PATH)\n"
        ),
    }
}

/// The GPU / CUDA section of `herd doctor`, as text.
pub fn report() -> String {
    let mut s = String::from("GPU / CUDA\n");
    // SAFETY (all is_culib_present calls): they only try to dlopen the library.
    let cuda = driver_present();
    if cuda {
        let mut v = 0;
        let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
        if r == cudarc::driver::sys::CUresult::CUDA_SUCCESS {
            s.push_str(&format!(
                "  driver supports CUDA {}.{}\n",
                v / 1000,
                (v % 1000) / 10
            ));
        }
    }
    if let Ok(text) = std::fs::read_to_string("/proc/driver/nvidia/version") {
        if let Some(l) = text.lines().next() {
            s.push_str(&format!("  kernel module: {}\n", l.trim()));
        }
    }
    match device_count() {
        Err(e) => s.push_str(&format!("  {e}\n")),
        Ok(n) => {
            for i in 0..n {
                match cudarc::driver::CudaContext::new(i) {
                    Ok(ctx) => {
                        let name = ctx.name().unwrap_or_else(|_| "?".into());
                        let cc = ctx.compute_capability().unwrap_or((0, 0));
                        let (free, total) = ctx.mem_get_info().unwrap_or((0, 0));
                        s.push_str(&format!(
                            "  GPU {i}: {name}, compute capability {}.{}, {:.1} GB total, {:.1} GB free\n",
                            cc.0,
                            cc.1,
                            total as f64 / 1e9,
                            free as f64 / 1e9
                        ));
                    }
                    Err(e) => s.push_str(&format!("  GPU {i}: cannot open: {e}\n")),
                }
            }
        }
    }
    s.push_str("  libraries:\n");
    s.push_str(&lib_line("cuda", "cuda", cuda));
    s.push_str(&lib_line("nvrtc", "nvrtc", kernels::nvrtc_present()));
    if let Some((a, b)) = kernels::nvrtc_version() {
        s.push_str(&format!("            NVRTC version {a}.{b}\n"));
    }
    s.push_str(&lib_line("cublas", "cublas", unsafe {
        cudarc::cublas::sys::is_culib_present()
    }));
    s.push_str(&lib_line("cublasLt", "cublasLt", unsafe {
        cudarc::cublaslt::sys::is_culib_present()
    }));
    s.push_str(&lib_line("nccl", "nccl", unsafe {
        cudarc::nccl::sys::is_culib_present()
    }));
    s.push_str(&format!(
        "  kernel cache: {}\n",
        kernels::cache_dir().display()
    ));
    s
}
