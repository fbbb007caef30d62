//! Every CUDA kernel compiles with NVRTC for compute_80 and compute_90, no GPU needed.
//!
//! NVRTC comes from the PyPI wheels (scripts/test installs them into
//! ${HERD_CACHE:-~/.cache/herd}/nvrtc). libnvrtc is found through LD_LIBRARY_PATH, which the
//! dynamic loader reads at process start; when it is missing but the wheel directory exists,
//! this test re-runs itself with LD_LIBRARY_PATH set. Without NVRTC the test FAILS (CI installs
//! it): a kernel that does not compile must never pass unnoticed.

use herd::backend::cuda::kernels;

fn nvrtc_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("HERD_NVRTC_DIR") {
        return d.into();
    }
    let base = std::env::var_os("HERD_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/herd"))
        })
        .unwrap_or_default();
    base.join("nvrtc")
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    let lib = nvrtc_dir().join("nvidia/cu13/lib");
    if !kernels::nvrtc_present() {
        if std::env::var_os("HERD_NVRTC_CHILD").is_none() && lib.is_dir() {
            let mut path = lib.display().to_string();
            if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
                path = format!("{path}:{}", old.to_string_lossy());
            }
            let exe = std::env::current_exe().expect("test binary path");
            let out = std::process::Command::new(exe)
                .args([
                    "--exact",
                    "every_kernel_compiles_for_sm80_and_sm90",
                    "--nocapture",
                ])
                .env("LD_LIBRARY_PATH", path)
                .env("HERD_NVRTC_CHILD", "1")
                .output()
                .expect("re-running the test binary");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "NVRTC compile failed:\n{text}");
            assert!(text.contains("compiled"), "child ran no test:\n{text}");
            return;
        }
        panic!(
            "NVRTC not found. Install it (what scripts/test does):\n  pip install --target {} \
             nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96\nthen run with \
             LD_LIBRARY_PATH={} (or set HERD_NVRTC_DIR to the --target directory)",
            nvrtc_dir().display(),
            lib.display()
        );
    }
    let (major, minor) = kernels::nvrtc_version().expect("NVRTC version");
    assert_eq!(
        (major, minor),
        (13, 0),
        "pin NVRTC to 13.0.x: newer versions emit PTX the GPU machines' driver 580 rejects"
    );
    for arch in ["compute_80", "compute_90"] {
        let t = std::time::Instant::now();
        let ptx = match kernels::compile_ptx(arch) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        for k in kernels::KERNELS {
            assert!(
                ptx.contains(&format!(".entry {k}(")),
                "{arch}: kernel {k} missing from the PTX"
            );
        }
        println!(
            "compiled {} kernels for {arch} in {:.2} s ({} bytes of PTX)",
            kernels::KERNELS.len(),
            t.elapsed().as_secs_f64(),
            ptx.len()
        );
    }
}
