//! scripts/install-deps decides what a fresh machine lacks. Its libclang check once matched
//! libclang-cpp.so.N (installed alone on many machines), skipped libclang-dev, and the first
//! command of the README then failed in rsmpi's bindgen ("Unable to find libclang").

use std::path::Path;
use std::process::Command;

/// What `install-deps --check` would install when `ldconfig -p` lists `libs` and the LLVM library
/// directory holds `llvm_files`.
fn missing_with(libs: &[&str], llvm_files: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut listing = format!("{} libs found in cache `/etc/ld.so.cache'\n", libs.len());
    for lib in libs {
        listing += &format!("\t{lib} (libc6,x86-64) => /lib/x86_64-linux-gnu/{lib}\n");
    }
    let listing_file = dir.path().join("listing");
    std::fs::write(&listing_file, listing).expect("write listing");
    let ldconfig = dir.path().join("ldconfig");
    std::fs::write(
        &ldconfig,
        format!("#!/bin/sh\ncat '{}'\n", listing_file.display()),
    )
    .expect("write fake ldconfig");
    let status = Command::new("chmod").arg("+x").arg(&ldconfig).status();
    assert!(status.is_ok_and(|s| s.success()));
    let llvm = dir.path().join("llvm-lib");
    std::fs::create_dir(&llvm).expect("llvm dir");
    for f in llvm_files {
        std::fs::write(llvm.join(f), b"").expect("llvm file");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-deps");
    let out = Command::new(script)
        .arg("--check")
        .env("LDCONFIG", &ldconfig)
        .env("LLVM_LIB_DIRS", &llvm)
        .env_remove("LIBCLANG_PATH")
        .output()
        .expect("run scripts/install-deps --check");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn libclang_cpp_alone_is_not_the_libclang_bindgen_loads() {
    let missing = missing_with(&["libclang-cpp.so.14"], &["libclang-cpp.so.14"]);
    assert!(
        missing.split_whitespace().any(|p| p == "libclang-dev"),
        "{missing}"
    );
}

#[test]
fn versioned_libclang_on_the_loader_path_counts() {
    for lib in [
        "libclang-14.so.1",
        "libclang-14.so",
        "libclang.so.1",
        "libclang-16.0.6.so",
    ] {
        let missing = missing_with(&["libclang-cpp.so.14", lib], &[]);
        assert!(!missing.contains("libclang-dev"), "{lib}: {missing}");
    }
}

#[test]
fn libclang_in_the_llvm_directory_counts() {
    let missing = missing_with(&["libclang-cpp.so.14"], &["libclang.so.1"]);
    assert!(!missing.contains("libclang-dev"), "{missing}");
}
