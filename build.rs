//! Record the git commit in the binary, so benchmark results name the code that produced them.
//! `HERD_REVISION` overrides it where the source has no .git (a container build).
fn main() {
    let given = std::env::var("HERD_REVISION")
        .ok()
        .filter(|s| !s.is_empty() && s != "unknown");
    let commit = given.unwrap_or_else(git_commit);
    println!("cargo:rustc-env=HERD_GIT_COMMIT={commit}");
    println!("cargo:rerun-if-env-changed=HERD_REVISION");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}
