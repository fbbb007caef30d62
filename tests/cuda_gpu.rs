//! GPU-only tests: the self-test's kernel and model comparisons as `cargo test` cases. Where no
//! GPU is present they print "skipped: no GPU" and pass (CI has none; `scripts/gpu-check` runs
//! the same checks through `herd doctor --selftest` on a lent GPU machine).

use herd::backend::cuda::{self, selftest, CudaBackend};

fn gpu() -> Option<CudaBackend> {
    if let Err(why) = cuda::device_count() {
        println!("skipped: no GPU ({why})");
        return None;
    }
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) => panic!("a GPU is present but the CUDA backend failed to start: {e}"),
    }
}

#[test]
fn every_kernel_matches_its_cpu_twin() {
    let Some(mut b) = gpu() else { return };
    b.set_poison(true);
    let checks = selftest::run_kernels(&b);
    let (table, ok) = selftest::format_checks(&checks);
    println!("{table}");
    assert!(ok, "kernel self-test failed:\n{table}");
}

#[test]
fn tiny_model_matches_the_cpu_backend() {
    let Some(b) = gpu() else { return };
    let mut checks = herd::modes::selftest::run_model(b, cuda::Numerics::Bf16);
    if let Ok(b2) = CudaBackend::new(0) {
        checks.extend(herd::modes::selftest::run_model(
            b2,
            cuda::Numerics::Accurate,
        ));
    }
    let (table, ok) = selftest::format_checks(&checks);
    println!("{table}");
    assert!(ok, "model self-test failed:\n{table}");
}

#[test]
fn without_a_gpu_the_backend_says_so_and_does_not_panic() {
    if cuda::device_count().is_ok() {
        println!("skipped: a GPU is present");
        return;
    }
    let e = CudaBackend::new(0).err().expect("no GPU, so no backend");
    assert!(e.to_string().contains("no GPU"), "{e}");
    assert!(cuda::report().contains("no GPU"));
}
