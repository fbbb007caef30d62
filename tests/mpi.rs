//! Many ranks: `herd` under `mpirun`, compared with one rank. Tensor parallel (tp 2, tp 4 with
//! KV-head replication), data-parallel replicas, a Meta MP=2 checkpoint at tp 1/2/4, one rank
//! failing during load and during generation, errors before loading.
//!
//! These need a build with the `mpi` feature and OpenMPI's `mpirun` (scripts/test runs
//! `cargo test --features mpi` after .ci/run installed OpenMPI). In a build without the feature
//! they fail, so CI can never pass them by accident, unless `HERD_NO_MPI=1` says this machine has
//! no MPI (then they print "skipped" and pass).

mod common;

use common::mpi_available;

use std::process::Command;
use std::time::Instant;

use serde_json::Value;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
    secs: f64,
}

fn mpirun(np: usize, args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut c = mpirun_cmd(np, args, env);
    let t0 = Instant::now();
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("mpirun does not start ({e}); install openmpi-bin"));
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        secs: t0.elapsed().as_secs_f64(),
    }
}

fn mpirun_cmd(np: usize, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "-np",
        &np.to_string(),
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .arg(env!("CARGO_BIN_EXE_herd"))
    .args(args)
    // mpirun refuses root unless told (CI containers run as root).
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    .env("RUST_LOG", "warn");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn solo(args: &[&str]) -> Out {
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("herd runs");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        secs: t0.elapsed().as_secs_f64(),
    }
}

fn model(rel: &str) -> String {
    common::fixture(&format!("models/{rel}"))
        .to_string_lossy()
        .into_owned()
}

/// Greedy generation with every log-prob the record can hold.
fn gen_args<'a>(model: &'a str, tp: &'a str) -> Vec<&'a str> {
    vec![
        "generate",
        "--model",
        model,
        "--tp",
        tp,
        "--prompt-token-ids",
        "1,17,33,5,6,7,8,100,42",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
        "--logprobs",
        "3",
        "--prompt-logprobs",
    ]
}

/// Same structure; integers (token ids, counts) equal; other numbers within `tol`.
fn assert_close(a: &Value, b: &Value, tol: f64, path: &str) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if let (Some(x), Some(y)) = (x.as_i64(), y.as_i64()) {
                assert_eq!(x, y, "{path}");
            } else {
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                assert!((x - y).abs() <= tol, "{path}: {x} vs {y}");
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{path}: lengths");
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                assert_close(p, q, tol, &format!("{path}[{i}]"));
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            let mut kx: Vec<_> = x.keys().collect();
            let mut ky: Vec<_> = y.keys().collect();
            kx.sort();
            ky.sort();
            assert_eq!(kx, ky, "{path}: keys");
            for k in kx {
                assert_close(&x[k], &y[k], tol, &format!("{path}.{k}"));
            }
        }
        _ => assert_eq!(a, b, "{path}"),
    }
}

fn records(out: &Out) -> Vec<Value> {
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `np` ranks at `tp` give dp = np / tp records, each within 1e-4 of one rank on `reference`.
fn check_against_one_rank(rel: &str, reference: &str, np: usize, tp: usize) {
    check_dir_against_one_rank(&model(rel), reference, np, tp);
}

fn check_dir_against_one_rank(m: &str, reference: &str, np: usize, tp: usize) {
    let rel = m;
    let m = m.to_string();
    let r = model(reference);
    let want = records(&solo(&gen_args(&r, "1")));
    assert_eq!(want.len(), 1);
    let tp_s = tp.to_string();
    let out = mpirun(np, &gen_args(&m, &tp_s), &[]);
    let got = records(&out);
    assert_eq!(got.len(), np / tp, "one record per replica: {}", out.stdout);
    for (i, g) in got.iter().enumerate() {
        assert_close(
            g,
            &want[0],
            1e-4,
            &format!("{rel} np {np} tp {tp} replica {i}"),
        );
        // The generated tokens must be identical, not just close.
        assert_eq!(g["token_ids"], want[0]["token_ids"]);
    }
}

#[test]
fn tp2_matches_one_rank() {
    if mpi_available() {
        check_against_one_rank("llama30/meta", "llama30/meta", 2, 2);
    }
}

#[test]
fn tp4_replicates_kv_heads_and_matches_one_rank() {
    // llama31: 8 heads, 2 KV heads: at tp 4 each KV head lives on two ranks.
    if mpi_available() {
        check_against_one_rank("llama31/meta", "llama31/meta", 4, 4);
    }
}

#[test]
fn two_replicas_of_tp2_match_one_rank() {
    if mpi_available() {
        check_against_one_rank("llama31/hf", "llama31/meta", 4, 2);
    }
}

#[test]
fn two_replicas_of_one_rank_match_one_rank() {
    if mpi_available() {
        check_against_one_rank("llama30/hf", "llama30/meta", 2, 1);
    }
}

#[test]
fn meta_mp2_loads_at_tp_1_2_and_4() {
    if mpi_available() {
        for (np, tp) in [(1, 1), (2, 2), (4, 4)] {
            check_against_one_rank("llama31/meta-mp2", "llama31/meta", np, tp);
        }
    }
}

#[test]
fn converted_rank_files_load_at_their_tp() {
    if !mpi_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tp4");
    let st = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args([
            "convert",
            "--model",
            &model("llama31/meta"),
            "--tp",
            "4",
            "--output",
        ])
        .arg(&out)
        .status()
        .expect("herd runs");
    assert!(st.success());
    check_dir_against_one_rank(out.to_str().unwrap(), "llama31/meta", 4, 4);
}

fn assert_job_failed(out: &Out, needle: &str) {
    assert_ne!(out.code, 0, "the job must fail: {}", out.stderr);
    assert!(
        out.secs < 30.0,
        "the job took {:.1} s to end after a rank failed",
        out.secs
    );
    assert!(
        out.stderr.contains(needle),
        "stderr should name {needle:?}: {}",
        out.stderr
    );
}

#[test]
fn a_rank_failing_during_load_ends_the_job() {
    if !mpi_available() {
        return;
    }
    let m = model("llama31/meta");
    let env = [("HERD_TEST_FAIL_RANK", "1"), ("HERD_TEST_FAIL_AT", "load")];
    let out = mpirun(2, &gen_args(&m, "2"), &env);
    assert_job_failed(&out, "rank 1 of 2");
    assert!(
        out.stderr.contains("injected failure at load"),
        "{}",
        out.stderr
    );
    // A rank that just exits (no MPI_Abort of its own): mpirun still ends the job.
    let env = [
        ("HERD_TEST_FAIL_RANK", "1"),
        ("HERD_TEST_FAIL_AT", "load"),
        ("HERD_TEST_FAIL_HOW", "exit"),
    ];
    let out = mpirun(2, &gen_args(&m, "2"), &env);
    // The rank's own line can be lost when mpirun tears the job down before forwarding its
    // stderr; mpirun's report then names the rank instead ("Process name: [[job,1],...").
    if !out.stderr.contains("rank 1: injected exit at load") {
        assert_job_failed(&out, ",1]");
    } else {
        assert_job_failed(&out, "rank 1: injected exit at load");
    }
}

#[test]
fn a_rank_failing_during_generation_ends_the_job() {
    if !mpi_available() {
        return;
    }
    let m = model("llama31/meta");
    let env = [("HERD_TEST_FAIL_RANK", "1"), ("HERD_TEST_FAIL_AT", "step")];
    let out = mpirun(2, &gen_args(&m, "2"), &env);
    assert_job_failed(&out, "rank 1 of 2");
    assert!(
        out.stderr.contains("injected failure at step"),
        "{}",
        out.stderr
    );
}

#[test]
fn bad_splits_fail_before_loading() {
    if !mpi_available() {
        return;
    }
    let m = model("llama31/meta");
    let out = mpirun(3, &gen_args(&m, "2"), &[]);
    assert_job_failed(&out, "not a multiple of --tp 2");
    // 8 heads do not split 3 ways.
    let out = mpirun(3, &gen_args(&m, "3"), &[]);
    assert_job_failed(&out, "n_heads 8 is not divisible by 3");
}

#[test]
fn doctor_reports_the_topology() {
    if !mpi_available() {
        return;
    }
    let out = mpirun(4, &["doctor", "--tp", "2"], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for want in [
        "world size: 4",
        "tp: 2 (2 replicas",
        "mpi: ",
        "rank   3: node 0 local rank 3 replica 1 tp rank 1",
    ] {
        assert!(out.stdout.contains(want), "{want:?} in {}", out.stdout);
    }
    // Only rank 0 prints.
    assert_eq!(out.stdout.matches("== topology ==").count(), 1);
}

/// Without MPI built in, a launch of many tasks is refused (the variables are what mpirun sets).
#[test]
#[cfg(not(feature = "mpi"))]
fn a_build_without_mpi_refuses_to_run_under_a_launcher() {
    for var in ["OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "PMI_SIZE"] {
        let out = Command::new(env!("CARGO_BIN_EXE_herd"))
            .args(["doctor"])
            .env(var, "2")
            .output()
            .expect("herd runs");
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("built without MPI support"), "{err}");
    }
}

/// `herd batch` over 2 data-parallel replicas (and over 2 replicas of tp 2) gives the output of
/// one rank: same records, same order.
#[test]
fn batch_with_replicas_matches_one_rank() {
    if !mpi_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let lines: String = (0..13)
        .map(|i| {
            format!(
                "{{\"id\": \"r{i}\", \"prompt_token_ids\": [{}, {}, {}], \"max_tokens\": {}, \"temperature\": 0}}\n",
                i + 1,
                (i * 7) % 250,
                (i * 13) % 250,
                3 + i % 5
            )
        })
        .collect();
    std::fs::write(&input, lines).unwrap();
    let m = model("llama31/meta");
    let run = |np: usize, tp: &str, name: &str| {
        let out = dir.path().join(name);
        let args = [
            "batch",
            "--model",
            &m,
            "--tp",
            tp,
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ];
        let o = if np == 1 {
            solo(&args)
        } else {
            mpirun(np, &args, &[])
        };
        assert_eq!(o.code, 0, "np {np} tp {tp}: {}", o.stderr);
        std::fs::read_to_string(&out).unwrap()
    };
    let one = run(1, "1", "one.jsonl");
    assert_eq!(one.lines().count(), 13);
    assert_eq!(run(2, "1", "dp2.jsonl"), one, "2 replicas of tp 1");
    let tp2: Vec<Value> = run(4, "2", "dp2tp2.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (a, b) in one
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .zip(&tp2)
    {
        assert_eq!(a["id"], b["id"]);
        assert_eq!(
            a["token_ids"], b["token_ids"],
            "2 replicas of tp 2, record {}",
            a["id"]
        );
    }
}

/// Kills the child (mpirun, and so its ranks) if a test fails before waiting for it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Seeded records long enough that a replica always has some in flight.
fn long_records(path: &std::path::Path, n: usize, max_tokens: usize) {
    let lines: String = (0..n)
        .map(|i| {
            let ids: Vec<usize> = (0..3 + i % 4).map(|j| 1 + (i * 31 + j * 7) % 250).collect();
            format!(
                "{}\n",
                serde_json::json!({"id": format!("r{i}"), "prompt_token_ids": ids,
                    "max_tokens": max_tokens - i % 3, "seed": i, "temperature": 0.9})
            )
        })
        .collect();
    std::fs::write(path, lines).unwrap();
}

fn lines_in(paths: &[std::path::PathBuf]) -> usize {
    paths
        .iter()
        .map(|p| {
            std::fs::read_to_string(p)
                .map(|s| s.matches('\n').count())
                .unwrap_or(0)
        })
        .sum()
}

fn with_suffix(p: &std::path::Path, s: &str) -> std::path::PathBuf {
    let mut o = p.as_os_str().to_owned();
    o.push(s);
    o.into()
}

/// `kill -USR1 <mpirun>`: mpirun forwards the signal to every rank (a SIGTERM it would answer by
/// killing them within seconds); each replica finishes its in-flight records, all ranks leave
/// together with exit 4 and the summary is printed; the rerun completes every record exactly
/// once, as an uninterrupted run would have. With 2 replicas of tp 1, and 1 replica of tp 2 (a
/// tensor-parallel peer must survive the signal too).
#[test]
fn usr1_to_mpirun_ends_in_exit_4_and_a_rerun_completes_every_record_once() {
    if !mpi_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let n = 16;
    long_records(&input, n, 160);
    let m = model("llama31/meta");
    let args = |out: &std::path::Path, tp: &'static str| -> Vec<String> {
        [
            "batch",
            "--model",
            &m,
            "--tp",
            tp,
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--max-batch-size",
            "2",
            "--ignore-eos",
            "--grace-period",
            "60",
        ]
        .map(String::from)
        .to_vec()
    };
    let reference = dir.path().join("ref.jsonl");
    let r = solo(
        &args(&reference, "1")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let want = std::fs::read_to_string(&reference).unwrap();
    for tp in ["1", "2"] {
        let out = dir.path().join(format!("tp{tp}.jsonl"));
        let a = args(&out, tp);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let parts: Vec<_> = (0..2)
            .map(|r| with_suffix(&out, &format!(".part-{r}")))
            .collect();
        let mut job = KillOnDrop(
            mpirun_cmd(2, &a, &[])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("mpirun starts"),
        );
        let t = Instant::now();
        while lines_in(&parts) < 2 {
            assert!(
                job.0.try_wait().unwrap().is_none(),
                "tp {tp}: finished early"
            );
            assert!(t.elapsed().as_secs() < 120, "tp {tp}: no progress");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let at_signal = lines_in(&parts);
        let ok = Command::new("kill")
            .args(["-USR1", &job.0.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let status = job.0.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(job.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(4), "tp {tp}: {status:?}: {stderr}");
        // The leader's summary made it out: nobody was killed before it.
        assert!(stderr.contains("batch interrupted: "), "tp {tp}: {stderr}");
        // The records in flight at the signal were finished, not cut off.
        let done = lines_in(&parts);
        assert!(
            done > at_signal && done < n,
            "tp {tp}: {at_signal} records on disk at the signal, {done} after"
        );
        let o = mpirun(2, &a, &[]);
        assert_eq!(o.code, 0, "tp {tp}: {}", o.stderr);
        let got = std::fs::read_to_string(&out).unwrap();
        let ids: Vec<String> = got
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            ids,
            (0..n).map(|i| format!("r{i}")).collect::<Vec<_>>(),
            "tp {tp}"
        );
        assert_eq!(
            got, want,
            "tp {tp}: the resumed output differs from one uninterrupted run"
        );
    }
}

/// A second `mpirun -np 2 herd batch` on an output a running one writes is refused at once:
/// exit 2, the other run's host and pid named once (by rank 0), the first run unharmed.
#[test]
fn a_second_mpi_run_on_a_busy_output_is_refused() {
    if !mpi_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    long_records(&input, 48, 400);
    let out = dir.path().join("out.jsonl");
    let m = model("llama31/meta");
    let a = [
        "batch",
        "--model",
        &m,
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--max-batch-size",
        "2",
        "--ignore-eos",
    ];
    let parts: Vec<_> = (0..2)
        .map(|r| with_suffix(&out, &format!(".part-{r}")))
        .collect();
    let mut first = KillOnDrop(
        mpirun_cmd(2, &a, &[])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mpirun starts"),
    );
    let t = Instant::now();
    while lines_in(&parts) < 1 {
        assert!(first.0.try_wait().unwrap().is_none(), "finished early");
        assert!(t.elapsed().as_secs() < 120, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let second = mpirun(2, &a, &[]);
    assert_eq!(second.code, 2, "{}", second.stderr);
    let holder: Value =
        serde_json::from_str(&std::fs::read_to_string(with_suffix(&out, ".lock")).unwrap())
            .unwrap();
    let busy = format!(
        "is being written by another herd batch (host {}, pid {}",
        holder["host"].as_str().unwrap(),
        holder["pid"]
    );
    assert_eq!(second.stderr.matches(&busy).count(), 1, "{}", second.stderr);
    assert!(second.secs < 30.0, "refused after {:.1} s", second.secs);
    assert!(
        first.0.try_wait().unwrap().is_none(),
        "the first run goes on"
    );
    let ok = Command::new("kill")
        .args(["-USR1", &first.0.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    assert_eq!(first.0.wait().unwrap().code(), Some(4));
}

/// slurm/batch-1node.sbatch with LAUNCHER=mpirun, run by bash as Slurm would (a stand-in
/// `scontrol` on PATH): the SIGUSR1 that `--signal=B:USR1@120` sends the batch shell reaches every
/// rank through mpirun, herd exits 4 and the script requeues the job.
#[test]
fn the_batch_script_passes_usr1_to_mpirun_and_requeues() {
    if !mpi_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let calls = dir.path().join("scontrol-calls");
    let scontrol = bin.join("scontrol");
    std::fs::write(
        &scontrol,
        format!("#!/bin/sh\necho \"$*\" >> '{}'\n", calls.display()),
    )
    .unwrap();
    std::fs::set_permissions(
        &scontrol,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let input = dir.path().join("in.jsonl");
    long_records(&input, 48, 400);
    let out = dir.path().join("out.jsonl");
    let parts: Vec<_> = (0..2)
        .map(|r| with_suffix(&out, &format!(".part-{r}")))
        .collect();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/slurm/batch-1node.sbatch");
    let mut job = KillOnDrop(
        Command::new("bash")
            .arg(script)
            .env("PATH", path)
            .env("SLURM_JOB_ID", "77")
            .env("SLURM_NTASKS", "2")
            .env("LAUNCHER", "mpirun")
            .env("MODEL", model("llama31/meta"))
            .env("INPUT", &input)
            .env("OUTPUT", &out)
            .env("HERD", env!("CARGO_BIN_EXE_herd"))
            .env("HERD_ARGS", "--max-batch-size 2 --ignore-eos")
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("bash runs"),
    );
    let t = Instant::now();
    while lines_in(&parts) < 1 {
        assert!(job.0.try_wait().unwrap().is_none(), "finished early");
        assert!(t.elapsed().as_secs() < 120, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let ok = Command::new("kill")
        .args(["-USR1", &job.0.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let status = job.0.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(job.0.stdout.as_mut().unwrap(), &mut log).unwrap();
    std::io::Read::read_to_string(job.0.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert_eq!(status.code(), Some(4), "{log}");
    assert!(log.contains("batch interrupted: "), "{log}");
    assert!(log.contains("requeueing job 77"), "{log}");
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap_or_default(),
        "requeue 77\n"
    );
}
