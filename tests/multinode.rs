//! What many nodes need from herd, short of a cluster (scripts/ci-multinode runs the cluster):
//! a batch job resumed with another number of replicas (a requeue onto fewer or more nodes), and
//! the collective watchdog (`--collective-timeout`) ending a job whose peer stopped.
//!
//! The resume tests run ranks as separate processes meeting in a directory
//! (`HERD_BATCH_TEST_WORLD`, the same part files, states and merge as under MPI). The watchdog
//! tests need a build with the `mpi` feature and OpenMPI's `mpirun`, as tests/mpi.rs.

mod common;

use common::{jsonl, mpi_available};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

fn herd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_herd"));
    c.env("RUST_LOG", "warn");
    c
}

/// Kills the child if a test fails before waiting for it.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn llama30() -> String {
    common::fixture("models/llama30/hf")
        .to_string_lossy()
        .into_owned()
}

fn with_suffix(p: &Path, s: &str) -> PathBuf {
    let mut o = p.as_os_str().to_owned();
    o.push(s);
    PathBuf::from(o)
}

/// Whole lines in a file (0 when it does not exist).
fn lines_in(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|s| s.matches('\n').count())
        .unwrap_or(0)
}

/// Seeded records (token-id prompts, sampled at temperature 0.9): slow enough to interrupt,
/// and each one's text depends only on its own seed.
fn seeded_input(dir: &Path, n: usize) -> PathBuf {
    let p = dir.join("in.jsonl");
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let ids: Vec<u32> = (0..3 + i % 5)
                .map(|j| (1 + (i * 31 + j * 7) % 300) as u32)
                .collect();
            json!({"id": format!("r{i}"), "prompt_token_ids": ids, "max_tokens": 20 - i % 3,
                   "seed": i, "temperature": 0.9})
            .to_string()
        })
        .collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

const ARGS: [&str; 3] = ["--max-batch-size", "3", "--ignore-eos"];

fn batch(input: &Path, output: &Path, extra: &[&str]) -> Command {
    let mut c = herd();
    c.arg("batch")
        .arg("--model")
        .arg(llama30())
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(ARGS)
        .args(extra);
    c
}

/// `dp` ranks of one world (a fresh meeting directory each time), started at once.
fn spawn_world(input: &Path, output: &Path, dp: usize, meet: &Path) -> Vec<KillOnDrop> {
    let dir = tempfile::tempdir_in(meet).unwrap().keep();
    (0..dp)
        .map(|r| {
            let mut c = batch(input, output, &[]);
            if dp > 1 {
                c.env(
                    "HERD_BATCH_TEST_WORLD",
                    format!("{r},{dp},{}", dir.display()),
                );
            }
            KillOnDrop(c.stderr(Stdio::piped()).spawn().unwrap())
        })
        .collect()
}

/// Wait for every rank; each one's exit code and stderr.
fn wait_all(ranks: Vec<KillOnDrop>) -> Vec<(i32, String)> {
    ranks
        .into_iter()
        .map(|mut c| {
            let mut e = String::new();
            std::io::Read::read_to_string(c.0.stderr.as_mut().unwrap(), &mut e).unwrap();
            (c.0.wait().unwrap().code().unwrap_or(-1), e)
        })
        .collect()
}

/// SIGKILL every rank once each part holds at least `n` lines (a node dying mid-job).
fn kill_when(ranks: &mut [KillOnDrop], output: &Path, n: usize) {
    let t = Instant::now();
    while (0..ranks.len()).any(|r| lines_in(&with_suffix(output, &format!(".part-{r}"))) < n) {
        for c in ranks.iter_mut() {
            assert!(
                c.0.try_wait().unwrap().is_none(),
                "finished before {n} lines"
            );
        }
        assert!(t.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    for c in ranks.iter_mut() {
        c.0.kill().unwrap();
        c.0.wait().unwrap();
    }
}

/// The uninterrupted one-rank output.
fn reference(input: &Path, dir: &Path) -> String {
    let out = dir.join("ref.jsonl");
    let res = wait_all(spawn_world(input, &out, 1, dir));
    assert_eq!(res[0].0, 0, "{}", res[0].1);
    std::fs::read_to_string(out).unwrap()
}

fn resumed_count(stderr: &str) -> usize {
    let at = stderr
        .find("resuming: ")
        .unwrap_or_else(|| panic!("no resume line: {stderr}"));
    stderr[at + 10..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_job_of_2_replicas_killed_mid_run_resumes_on_1_without_redoing_or_losing_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let input = seeded_input(dir.path(), 30);
    let want = reference(&input, dir.path());
    let out = dir.path().join("out.jsonl");
    let mut ranks = spawn_world(&input, &out, 2, dir.path());
    kill_when(&mut ranks, &out, 4);
    drop(ranks);
    assert!(!out.exists());
    // Part 1 has no replica in the next world; a kill mid-write left its last line torn.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(with_suffix(&out, ".part-1"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"i\":29,\"e\":0,\"r\":{\"id\":\"r2").unwrap();
    drop(f);
    let done = lines_in(&with_suffix(&out, ".part-0")) + lines_in(&with_suffix(&out, ".part-1"));
    // Settings that change the records still refuse a resume, whatever the replica count.
    let res = wait_all(vec![KillOnDrop(
        batch(&input, &out, &["--top-k", "5"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )]);
    assert_eq!(res[0].0, 2, "{}", res[0].1);
    assert!(
        res[0].1.contains("top_k") && res[0].1.contains("--overwrite"),
        "{}",
        res[0].1
    );
    let res = wait_all(spawn_world(&input, &out, 1, dir.path()));
    let (code, err) = &res[0];
    assert_eq!(*code, 0, "{err}");
    assert!(
        err.contains("resuming with 1 replicas the parts of a run with 2 replicas (2 parts)"),
        "{err}"
    );
    // Every whole line of both parts counts as done (the torn one does not) ...
    assert_eq!(resumed_count(err), done, "{err}");
    // ... and the output is the uninterrupted run's, each record once, in input order.
    assert_eq!(std::fs::read_to_string(&out).unwrap(), want);
    assert_eq!(jsonl(&out).len(), 30);
    for k in 0..2 {
        assert!(!with_suffix(&out, &format!(".part-{k}")).exists());
        assert!(!with_suffix(&out, &format!(".part-{k}.state")).exists());
    }
}

#[test]
fn a_one_rank_job_killed_mid_run_resumes_on_3_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let input = seeded_input(dir.path(), 30);
    let want = reference(&input, dir.path());
    let out = dir.path().join("out.jsonl");
    let mut ranks = spawn_world(&input, &out, 1, dir.path());
    kill_when(&mut ranks, &out, 7);
    drop(ranks);
    let done = lines_in(&with_suffix(&out, ".part-0"));
    let res = wait_all(spawn_world(&input, &out, 3, dir.path()));
    for (r, (code, err)) in res.iter().enumerate() {
        assert_eq!(*code, 0, "rank {r}: {err}");
    }
    let leader = &res[0].1;
    assert!(
        leader.contains("resuming with 3 replicas the parts of a run with 1 replicas (1 parts)"),
        "{leader}"
    );
    // Replica 0 owns records 0, 3, 6, ...: those of them done before are not redone; the
    // summary counts each replica's resumed records, which add up to all that were done.
    let resumed: usize = (0..3)
        .map(|k| {
            let at = leader
                .find(&format!("replica {k}: "))
                .unwrap_or_else(|| panic!("{leader}"));
            let s = &leader[at..];
            let open = s.find('(').unwrap();
            s[open + 1..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    assert_eq!(resumed, done, "{leader}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), want);
    assert!(!with_suffix(&out, ".part-0").exists());
}

/// `herd ARGS` as `np` ranks under mpirun, with a fault injected into rank `rank` at its second
/// step as a tensor-parallel peer: exit code, stderr, seconds. Killed (and the test failed)
/// after 90 s: a hang is what these tests look for.
fn mpirun_fault(np: usize, rank: usize, args: &[&str], fault: &str) -> (i32, String, f64) {
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
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    .env("RUST_LOG", "warn")
    .env("HERD_TEST_FAIL_RANK", rank.to_string())
    .env("HERD_TEST_FAIL_AT", "step")
    .env("HERD_TEST_FAIL_HOW", fault)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = KillOnDrop(c.spawn().expect("mpirun starts (install openmpi-bin)"));
    let mut stderr = child.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut e = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut e);
        e
    });
    let code = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status.code().unwrap_or(-1);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "mpirun still running after 90 s: the job hangs"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    (code, reader.join().unwrap(), t0.elapsed().as_secs_f64())
}

#[test]
fn a_tensor_parallel_peer_stopped_with_sigstop_ends_the_job_naming_it() {
    if !mpi_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = seeded_input(dir.path(), 4);
    let (m, out) = (llama30(), dir.path().join("out.jsonl"));
    let (code, err, secs) = mpirun_fault(
        2,
        1,
        &[
            "--collective-timeout",
            "3",
            "batch",
            "--model",
            &m,
            "--tp",
            "2",
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
        "stop",
    );
    assert!(err.contains("rank 1: injected SIGSTOP at step"), "{err}");
    // The leader waits in the forward's all-reduce for the stopped peer, names both and the
    // collective, and ends the job with the failure code.
    assert!(
        err.contains("herd: error: rank 0 (")
            && err.contains(" in all_reduce_sum #")
            && err.contains("over replica 0 (world ranks 0-1) for rank 1 on node ")
            && err.contains("--collective-timeout 3 s"),
        "{err}"
    );
    assert_eq!(code, 1, "{err}");
    assert!(secs < 30.0, "took {secs:.1} s");
}

/// 2 replicas of tp 2: the last rank stops. Its replica leader (waiting in the forward) or the
/// world leader (waiting for replica 1 at the end, or beating to every rank) names it; the
/// others, which hear only from their replica and rank 0, never blame anyone else.
#[test]
fn a_stopped_rank_of_another_replica_is_named_and_no_other() {
    if !mpi_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = seeded_input(dir.path(), 6);
    let (m, out) = (llama30(), dir.path().join("out.jsonl"));
    let args = [
        "--collective-timeout",
        "3",
        "batch",
        "--model",
        &m,
        "--tp",
        "2",
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    let (code, err, secs) = mpirun_fault(4, 3, &args, "stop");
    assert!(err.contains("rank 3: injected SIGSTOP at step"), "{err}");
    let blamed: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("herd: error: rank ") && l.contains(" waited "))
        .collect();
    assert!(!blamed.is_empty(), "{err}");
    for l in &blamed {
        assert!(
            l.contains(" for rank 3 on node ")
                && (l.starts_with("herd: error: rank 0 (")
                    || l.starts_with("herd: error: rank 2 (")),
            "{err}"
        );
    }
    assert_eq!(code, 1, "{err}");
    assert!(secs < 30.0, "took {secs:.1} s");
}

#[test]
fn a_slow_but_live_peer_is_waited_for_past_the_timeout() {
    if !mpi_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = seeded_input(dir.path(), 4);
    let want = reference(&input, dir.path());
    let (m, out) = (llama30(), dir.path().join("out.jsonl"));
    // Rank 1 computes for 3 s at a step (its heartbeat goes on) against a 1 s timeout.
    let mut args = vec![
        "--collective-timeout",
        "1",
        "batch",
        "--model",
        &m,
        "--tp",
        "2",
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend(ARGS);
    let (code, err, secs) = mpirun_fault(2, 1, &args, "sleep:3");
    assert!(err.contains("injected 3 s pause at step"), "{err}");
    assert_eq!(code, 0, "{err}");
    assert!(secs >= 3.0);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), want);
}

#[test]
fn collective_timeout_must_be_positive() {
    for bad in ["0", "-3", "nan"] {
        let out = herd()
            .args(["--collective-timeout", bad, "doctor"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains("--collective-timeout must be"), "{err}");
    }
}
