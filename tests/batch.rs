//! `herd batch` as a user runs it: formats, error records, resume after kill -9 and SIGTERM,
//! replicas and the merge, memory bound.

mod common;

use common::jsonl;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

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

fn batch_cmd(input: &Path, output: &Path, extra: &[&str]) -> Command {
    let mut c = herd();
    c.arg("batch")
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(extra);
    c
}

fn run(mut c: Command) -> (i32, String) {
    let out: Output = c.output().expect("herd runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_lines(p: &Path, lines: &[String]) {
    std::fs::write(p, lines.join("\n") + "\n").unwrap();
}

fn tiny() -> [&'static str; 2] {
    ["--model", "random:tiny"]
}

fn llama30() -> String {
    common::fixture("models/llama30/hf")
        .to_string_lossy()
        .into_owned()
}

fn part_lines(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|s| s.matches('\n').count())
        .unwrap_or(0)
}

fn with_suffix(p: &Path, s: &str) -> PathBuf {
    let mut o = p.as_os_str().to_owned();
    o.push(s);
    PathBuf::from(o)
}

#[test]
fn herd_jsonl_round_trip_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let (inp, out) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    write_lines(
        &inp,
        &[
            json!({"id": "p", "prompt": "The capital of France is", "max_tokens": 4, "seed": 1, "metadata": {"src": "a", "n": [1, 2]}}).to_string(),
            json!({"id": 17, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}).to_string(),
            json!({"prompt_token_ids": [128000, 9906, 11], "max_tokens": 2, "logprobs": 2, "prompt_logprobs": true, "temperature": 0.7, "top_p": 0.5, "top_k": 3, "seed": 9}).to_string(),
            json!({"prompt": "Count: 1 2 3", "max_tokens": 50, "stop": ["4", "5"], "seed": 3}).to_string(),
        ],
    );
    let (code, err) = run(batch_cmd(&inp, &out, &tiny()));
    assert_eq!(code, 0, "{err}");
    let recs = jsonl(&out);
    assert_eq!(recs.len(), 4);
    assert_eq!(recs[0]["id"], "p");
    assert_eq!(recs[0]["metadata"], json!({"src": "a", "n": [1, 2]}));
    assert_eq!(recs[0]["usage"]["completion_tokens"], 4);
    assert_eq!(recs[0]["finish_reason"], "length");
    assert!(recs[0]["text"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(recs[0].get("error").is_none() && recs[0].get("logprobs").is_none());
    assert_eq!(recs[1]["id"], 17);
    assert!(recs[1]["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    // Default id: the line number.
    assert_eq!(recs[2]["id"], 3);
    assert_eq!(recs[2]["usage"]["prompt_tokens"], 3);
    let lps = recs[2]["logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), 2);
    assert_eq!(lps[0]["top"].as_array().unwrap().len(), 2);
    assert_eq!(recs[2]["prompt_logprobs"].as_array().unwrap().len(), 3);
    assert!(recs[2]["prompt_logprobs"][0].is_null());
    let t = recs[3]["text"].as_str().unwrap();
    assert!(!t.contains('4') && !t.contains('5'), "{t}");
    // The same output through `generate`: a record's own fields are what ran.
    let g = herd()
        .args([
            "generate",
            "--model",
            "random:tiny",
            "--prompt",
            "The capital of France is",
        ])
        .args(["--max-tokens", "4", "--seed", "1", "--json"])
        .output()
        .unwrap();
    let gv: Value = serde_json::from_slice(&g.stdout).unwrap();
    assert_eq!(gv["token_ids"], recs[0]["token_ids"]);
    // No leftovers beside the output but the state file.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["in.jsonl", "out.jsonl", "out.jsonl.state"]);
}

#[test]
fn every_line_gets_one_record_with_a_precise_error() {
    let dir = tempfile::tempdir().unwrap();
    let (inp, out) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let long = "word ".repeat(200);
    let lines = vec![
        json!({"id": "ok", "prompt": "Hello", "max_tokens": 2, "seed": 1}).to_string(),
        "{not json".to_string(),
        json!({"id": "none"}).to_string(),
        json!({"id": "two", "prompt": "a", "prompt_token_ids": [1]}).to_string(),
        json!({"id": "type", "prompt": "a", "max_tokens": "many"}).to_string(),
        json!({"id": "role", "messages": [{"role": "wizard", "content": "x"}]}).to_string(),
        json!({"id": "long", "prompt": long}).to_string(),
        json!({"id": "ok", "prompt": "again"}).to_string(),
        json!({"id": "temp", "prompt": "a", "temperature": -1}).to_string(),
        "[1, 2]".to_string(),
        String::new(), // blank lines are not records
        json!({"id": "last", "prompt_token_ids": [128000, 5], "max_tokens": 1}).to_string(),
    ];
    write_lines(&inp, &lines);
    let (code, err) = run(batch_cmd(
        &inp,
        &out,
        &[&tiny()[..], &["--max-seq-len", "64", "--max-tokens", "2"]].concat(),
    ));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("11 records (9 errors)"), "{err}");
    let recs = jsonl(&out);
    assert_eq!(recs.len(), 11);
    let e = |i: usize| recs[i]["error"].as_str().unwrap_or("").to_string();
    assert!(recs[0].get("error").is_none());
    assert!(e(1).starts_with("line 2: invalid JSON"), "{}", e(1));
    assert_eq!(recs[1]["id"], 2);
    assert!(e(2).contains("line 3: no prompt"), "{}", e(2));
    assert!(
        e(3).contains("not `prompt` and `prompt_token_ids`"),
        "{}",
        e(3)
    );
    assert!(
        e(4).contains("`max_tokens` must be a non-negative integer"),
        "{}",
        e(4)
    );
    assert!(e(5).contains("unknown chat role \"wizard\""), "{}", e(5));
    assert!(
        e(6).contains("line 7: prompt has") && e(6).contains("--truncate-prompt left"),
        "{}",
        e(6)
    );
    assert!(e(7).contains("line 8: duplicate id \"ok\""), "{}", e(7));
    assert!(e(8).contains("temperature must be >= 0"), "{}", e(8));
    assert!(e(9).contains("line 10: expected a JSON object"), "{}", e(9));
    assert_eq!(recs[10]["id"], "last");
    for (i, r) in recs.iter().enumerate() {
        let is_err = r.get("error").is_some();
        assert_eq!(r["finish_reason"] == "error", is_err, "record {i}");
    }
    // --fail-on-error: same records, distinct exit code.
    let out2 = dir.path().join("out2.jsonl");
    let (code, _) = run(batch_cmd(
        &inp,
        &out2,
        &[
            &tiny()[..],
            &[
                "--max-seq-len",
                "64",
                "--max-tokens",
                "2",
                "--fail-on-error",
            ],
        ]
        .concat(),
    ));
    assert_eq!(code, 5);
    assert_eq!(jsonl(&out2).len(), 11);
    // --truncate-prompt left: the long prompt runs, cut to fit.
    let out3 = dir.path().join("out3.jsonl");
    let (code, err) = run(batch_cmd(
        &inp,
        &out3,
        &[
            &tiny()[..],
            &[
                "--max-seq-len",
                "64",
                "--max-tokens",
                "2",
                "--truncate-prompt",
                "left",
            ],
        ]
        .concat(),
    ));
    assert_eq!(code, 0, "{err}");
    let r = &jsonl(&out3)[6];
    assert!(r.get("error").is_none(), "{r}");
    assert!(r["usage"]["prompt_tokens"].as_u64().unwrap() < 64);
}

#[test]
fn openai_batch_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (inp, out) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    write_lines(
        &inp,
        &[
            json!({"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "llama3", "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 3, "seed": 1, "logprobs": true, "top_logprobs": 2}}).to_string(),
            json!({"custom_id": "c2", "method": "POST", "url": "/v1/completions", "body": {"model": "llama3", "prompt": "Once upon", "max_tokens": 4, "temperature": 0, "logprobs": 1}}).to_string(),
            json!({"custom_id": "c3", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}).to_string(),
        ],
    );
    let (code, err) = run(batch_cmd(&inp, &out, &tiny()));
    assert_eq!(code, 0, "{err}");
    let recs = jsonl(&out);
    assert_eq!(recs.len(), 3);
    let chat = &recs[0];
    assert_eq!(chat["custom_id"], "c1");
    assert!(chat["error"].is_null());
    assert_eq!(chat["response"]["status_code"], 200);
    let body = &chat["response"]["body"];
    assert_eq!(body["object"], "chat.completion");
    // The answering model's name (--served-model-name), not the one the request named.
    assert_eq!(body["model"], "random:tiny");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert!(body["choices"][0]["message"]["content"].is_string());
    assert_eq!(body["usage"]["completion_tokens"], 3);
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 3);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    let comp = &recs[1]["response"]["body"];
    assert_eq!(comp["object"], "text_completion");
    assert!(comp["choices"][0]["text"].is_string());
    assert_eq!(comp["choices"][0]["finish_reason"], "length");
    assert_eq!(
        comp["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert_eq!(
        comp["usage"]["total_tokens"],
        comp["usage"]["prompt_tokens"].as_u64().unwrap() + 4
    );
    let bad = &recs[2];
    assert_eq!(bad["custom_id"], "c3");
    assert_eq!(bad["response"]["status_code"], 400);
    assert!(bad["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unsupported `url`"));
    // Ids are unique per request.
    let ids: HashSet<&str> = recs.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3);
}

#[test]
fn csv_in_csv_and_jsonl_out() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.csv");
    std::fs::write(
        &inp,
        "key,question,topic\nk1,\"Why is the sky blue?\",physics\nk2,\"A prompt, with a comma\nand a newline\",misc\nk3\n",
    )
    .unwrap();
    let out = dir.path().join("out.csv");
    let args = [
        &tiny()[..],
        &[
            "--prompt-column",
            "question",
            "--id-column",
            "key",
            "--max-tokens",
            "3",
            "--seed",
            "4",
        ],
    ]
    .concat();
    let (code, err) = run(batch_cmd(&inp, &out, &args));
    assert_eq!(code, 0, "{err}");
    let mut rdr = csv::Reader::from_path(&out).unwrap();
    assert_eq!(
        rdr.headers().unwrap().iter().collect::<Vec<_>>(),
        [
            "id",
            "text",
            "token_ids",
            "finish_reason",
            "prompt_tokens",
            "completion_tokens",
            "error",
            "topic"
        ]
    );
    let rows: Vec<csv::StringRecord> = rdr.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(&rows[0][0], "k1");
    assert_eq!(&rows[0][5], "3");
    assert_eq!(&rows[1][0], "k2");
    assert_eq!(&rows[1][7], "misc");
    assert_eq!(&rows[2][3], "error");
    // Row 3 starts on line 5 (row 2's prompt spans two lines).
    assert!(rows[2][6].contains("line 5"), "{:?}", &rows[2]);
    // The same input to JSONL: same texts.
    let out2 = dir.path().join("out.jsonl");
    let (code, err) = run(batch_cmd(&inp, &out2, &args));
    assert_eq!(code, 0, "{err}");
    let recs = jsonl(&out2);
    assert_eq!(recs[1]["text"].as_str().unwrap(), &rows[1][1]);
    // A CSV under another name: --input-format says what it is.
    let txt = dir.path().join("in.txt");
    std::fs::copy(&inp, &txt).unwrap();
    let out3 = dir.path().join("out3.jsonl");
    let (code, err) = run(batch_cmd(
        &txt,
        &out3,
        &[&args[..], &["--input-format", "csv"]].concat(),
    ));
    assert_eq!(code, 0, "{err}");
    assert_eq!(jsonl(&out3)[1]["text"], recs[1]["text"]);
    // A missing prompt column is a usage error.
    let (code, err) = run(batch_cmd(&inp, &dir.path().join("x.jsonl"), &tiny()));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no column `prompt`"), "{err}");
}

/// Seeded records on llama30 (token-id prompts), slow enough to interrupt.
fn seeded_input(dir: &Path, n: usize, max_tokens: usize) -> PathBuf {
    let p = dir.join("in.jsonl");
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let ids: Vec<u32> = (0..3 + i % 5).map(|j| (1 + (i * 31 + j * 7) % 300) as u32).collect();
            json!({"id": format!("r{i}"), "prompt_token_ids": ids, "max_tokens": max_tokens - i % 3, "seed": i, "temperature": 0.9}).to_string()
        })
        .collect();
    write_lines(&p, &lines);
    p
}

fn wait_for_lines(path: &Path, n: usize, child: &mut Child, limit: Duration) {
    let t = Instant::now();
    while part_lines(path) < n {
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before {n} lines"
        );
        assert!(t.elapsed() < limit, "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn kill9_at_random_points_then_resume_gives_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let inp = seeded_input(dir.path(), 40, 24);
    let m = llama30();
    let args = ["--model", &m, "--max-batch-size", "3", "--ignore-eos"];
    let reference = dir.path().join("ref.jsonl");
    let (code, err) = run(batch_cmd(&inp, &reference, &args));
    assert_eq!(code, 0, "{err}");
    let out = dir.path().join("out.jsonl");
    let part = with_suffix(&out, ".part-0");
    // Kill at a few points (after N lines are on disk), resuming each time.
    for n in [3, 11, 26] {
        let mut child = KillOnDrop(
            batch_cmd(&inp, &out, &args)
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_for_lines(&part, n, &mut child.0, Duration::from_secs(60));
        child.0.kill().unwrap(); // SIGKILL
        child.0.wait().unwrap();
        assert!(!out.exists());
    }
    // A torn last line, as a kill in the middle of a write leaves it.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&part)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"i\":39,\"e\":0,\"r\":{\"id\":\"r3").unwrap();
    drop(f);
    let (code, err) = run(batch_cmd(&inp, &out, &args));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        std::fs::read_to_string(&reference).unwrap()
    );
    let ids: Vec<String> = jsonl(&out)
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, (0..40).map(|i| format!("r{i}")).collect::<Vec<_>>());
    // Rerunning a complete output does nothing.
    let (code, err) = run(batch_cmd(&inp, &out, &args));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("already complete"), "{err}");
}

#[test]
fn sigterm_finishes_in_flight_records_then_resume_completes() {
    let dir = tempfile::tempdir().unwrap();
    let inp = seeded_input(dir.path(), 40, 24);
    let m = llama30();
    let args = [
        "--model",
        &m,
        "--max-batch-size",
        "2",
        "--ignore-eos",
        "--grace-period",
        "30",
    ];
    let reference = dir.path().join("ref.jsonl");
    let (code, err) = run(batch_cmd(&inp, &reference, &args));
    assert_eq!(code, 0, "{err}");
    let out = dir.path().join("out.jsonl");
    let part = with_suffix(&out, ".part-0");
    let mut child = KillOnDrop(
        batch_cmd(&inp, &out, &args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_for_lines(&part, 5, &mut child.0, Duration::from_secs(60));
    sigterm(&child.0);
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(4), "interrupted exit code");
    let stderr = read_stderr(&mut child.0);
    assert!(
        stderr.contains("rerun the same command to resume"),
        "{stderr}"
    );
    // It stopped admitting: not everything ran; what was in flight finished and is on disk.
    let done = part_lines(&part);
    assert!((5..40).contains(&done), "{done} records on disk");
    assert!(!out.exists());
    let (code, err) = run(batch_cmd(&inp, &out, &args));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("{done} records already done")),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        std::fs::read_to_string(&reference).unwrap()
    );
}

#[test]
fn sigterm_abandons_long_records_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    // Short records first, then ones far too long to finish within the grace period.
    let inp = dir.path().join("in.jsonl");
    let lines: Vec<String> = (0..30)
        .map(|i| {
            let max = if i < 6 { 2 } else { 100_000 };
            json!({"id": i, "prompt_token_ids": [5, 6, i + 1], "max_tokens": max, "seed": i})
                .to_string()
        })
        .collect();
    write_lines(&inp, &lines);
    let m = llama30();
    let out = dir.path().join("out.jsonl");
    let part = with_suffix(&out, ".part-0");
    let args = [
        "--model",
        &m,
        "--max-batch-size",
        "2",
        "--ignore-eos",
        "--grace-period",
        "1",
        "--max-seq-len",
        "8192",
    ];
    let mut child = KillOnDrop(
        batch_cmd(&inp, &out, &args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_for_lines(&part, 6, &mut child.0, Duration::from_secs(60));
    let t = Instant::now();
    sigterm(&child.0);
    let status = child.0.wait().unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(status.code(), Some(4), "{}", read_stderr(&mut child.0));
    // It waited for the in-flight records (1 s), then gave up on them.
    assert!((0.8..4.0).contains(&secs), "stopped after {secs:.2} s");
    // Everything finished before the signal is on disk, and the state says "not complete".
    assert_eq!(part_lines(&part), 6);
    let st: Value =
        serde_json::from_str(&std::fs::read_to_string(with_suffix(&out, ".part-0.state")).unwrap())
            .unwrap();
    assert_eq!(st["complete"], false);
    assert_eq!(st["records"], 6);
}

fn sigterm(child: &Child) {
    send_signal(child, "TERM");
}

fn send_signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// SIGUSR1 and SIGUSR2 (what mpirun forwards to every rank, what Slurm can send ahead of a time
/// limit) stop a run as SIGTERM does: in-flight records finish, exit 4, and a rerun completes.
#[test]
fn sigusr1_and_sigusr2_stop_like_sigterm_then_resume_completes() {
    let dir = tempfile::tempdir().unwrap();
    let inp = seeded_input(dir.path(), 40, 24);
    let m = llama30();
    let args = [
        "--model",
        &m,
        "--max-batch-size",
        "2",
        "--ignore-eos",
        "--grace-period",
        "30",
    ];
    let reference = dir.path().join("ref.jsonl");
    let (code, err) = run(batch_cmd(&inp, &reference, &args));
    assert_eq!(code, 0, "{err}");
    let out = dir.path().join("out.jsonl");
    let part = with_suffix(&out, ".part-0");
    for (sig, after) in [("USR1", 5), ("USR2", 12)] {
        let mut child = KillOnDrop(
            batch_cmd(&inp, &out, &args)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        wait_for_lines(&part, after, &mut child.0, Duration::from_secs(60));
        send_signal(&child.0, sig);
        let status = child.0.wait().unwrap();
        let stderr = read_stderr(&mut child.0);
        assert_eq!(status.code(), Some(4), "SIG{sig}: {status:?}: {stderr}");
        assert!(
            stderr.contains("rerun the same command to resume"),
            "{stderr}"
        );
        let done = part_lines(&part);
        assert!(
            (after..40).contains(&done),
            "SIG{sig}: {done} records on disk"
        );
    }
    let (code, err) = run(batch_cmd(&inp, &out, &args));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        std::fs::read_to_string(&reference).unwrap()
    );
}

fn read_stderr(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(e) = child.stderr.as_mut() {
        std::io::Read::read_to_string(e, &mut s).unwrap();
    }
    s
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

/// A second run on an output that a running batch writes is refused at once (exit 2, naming
/// the other run's host and pid), on every rank of a multi-rank run before any touches a file;
/// kill -9 of the holder leaves no stale lock: the next run resumes and completes.
#[test]
fn a_second_run_on_a_busy_output_is_refused_and_kill9_leaves_no_stale_lock() {
    let dir = tempfile::tempdir().unwrap();
    // Long records: the first run must still be running after the second ones are refused.
    let inp = seeded_input(dir.path(), 40, 200);
    let m = llama30();
    let args = ["--model", &m, "--max-batch-size", "2", "--ignore-eos"];
    let out = dir.path().join("out.jsonl");
    let part = with_suffix(&out, ".part-0");
    let lock = with_suffix(&out, ".lock");
    let mut first = KillOnDrop(
        batch_cmd(&inp, &out, &args)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_lines(&part, 3, &mut first.0, Duration::from_secs(60));
    let pid = first.0.id();
    let busy = format!(
        "is being written by another herd batch (host {}, pid {pid}",
        hostname()
    );

    // One process.
    let t = Instant::now();
    let (code, err) = run(batch_cmd(&inp, &out, &args));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&busy), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "refused only after {:?}",
        t.elapsed()
    );
    let holder: Value = serde_json::from_str(&std::fs::read_to_string(&lock).unwrap()).unwrap();
    assert_eq!(holder["pid"], pid);

    // Two ranks (the test world): both refuse, and rank 1 never touched its part.
    let world = tempfile::tempdir().unwrap();
    let ranks: Vec<KillOnDrop> = (0..2)
        .map(|r| {
            let mut c = batch_cmd(&inp, &out, &args);
            c.env(
                "HERD_BATCH_TEST_WORLD",
                format!("{r},2,{}", world.path().display()),
            );
            KillOnDrop(c.stderr(Stdio::piped()).spawn().unwrap())
        })
        .collect();
    for (r, mut c) in ranks.into_iter().enumerate() {
        let status = c.0.wait().unwrap();
        let e = read_stderr(&mut c.0);
        assert_eq!(status.code(), Some(2), "rank {r}: {e}");
        if r == 0 {
            assert!(e.contains(&busy), "{e}");
        }
    }
    assert!(!with_suffix(&out, ".part-1").exists());
    assert!(!with_suffix(&out, ".part-1.state").exists());
    assert!(
        first.0.try_wait().unwrap().is_none(),
        "the first run goes on"
    );

    // kill -9: the lock file stays behind, but the kernel dropped the lock with the process.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    assert!(lock.exists());
    let (code, err) = run(batch_cmd(&inp, &out, &args));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("records already done"), "it resumed: {err}");
    let ids: Vec<Value> = jsonl(&out).iter().map(|r| r["id"].clone()).collect();
    assert_eq!(
        ids,
        (0..40).map(|i| json!(format!("r{i}"))).collect::<Vec<_>>()
    );
    assert!(!lock.exists(), "a finished run removes its lock");
}

#[test]
fn replicas_write_parts_and_the_leader_merges_in_input_order() {
    let dir = tempfile::tempdir().unwrap();
    let inp = seeded_input(dir.path(), 25, 6);
    let m = llama30();
    let args = ["--model", &m, "--max-batch-size", "4"];
    let single = dir.path().join("single.jsonl");
    let (code, err) = run(batch_cmd(&inp, &single, &args));
    assert_eq!(code, 0, "{err}");
    let out = dir.path().join("multi.jsonl");
    let stats = dir.path().join("stats.csv");
    let barrier = tempfile::tempdir().unwrap();
    let dp = 3;
    let children: Vec<KillOnDrop> = (0..dp)
        .map(|r| {
            let mut c = batch_cmd(&inp, &out, &args);
            c.arg("--stats-csv").arg(&stats);
            c.env(
                "HERD_BATCH_TEST_WORLD",
                format!("{r},{dp},{}", barrier.path().display()),
            );
            KillOnDrop(c.stderr(Stdio::piped()).spawn().unwrap())
        })
        .collect();
    let mut leader_err = String::new();
    for (r, mut c) in children.into_iter().enumerate() {
        let status = c.0.wait().unwrap();
        let mut e = String::new();
        std::io::Read::read_to_string(c.0.stderr.as_mut().unwrap(), &mut e).unwrap();
        assert_eq!(status.code(), Some(0), "rank {r}: {e}");
        if r == 0 {
            leader_err = e;
        }
    }
    // Each replica did its share; the leader printed one line per replica.
    for r in 0..dp {
        assert!(
            leader_err.contains(&format!(
                "replica {r}: {} records",
                if r == 0 { 9 } else { 8 }
            )),
            "{leader_err}"
        );
    }
    // Same records as one replica, in input order (seeded: same texts).
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        std::fs::read_to_string(&single).unwrap()
    );
    for r in 0..dp {
        assert!(!with_suffix(&out, &format!(".part-{r}")).exists());
    }
    // Only the leader writes the stats: one row for the job, one per replica.
    let mut rdr = csv::Reader::from_path(&stats).unwrap();
    let h = rdr.headers().unwrap().clone();
    let col = |name: &str| h.iter().position(|c| c == name).unwrap();
    let rows: Vec<csv::StringRecord> = rdr.records().map(Result::unwrap).collect();
    let replicas: Vec<&str> = rows.iter().map(|r| &r[col("replica")]).collect();
    assert_eq!(replicas, ["all", "0", "1", "2"]);
    assert_eq!(&rows[0][col("records")], "25");
    assert!(
        rows[0][col("generated_tokens_per_s")]
            .parse::<f64>()
            .unwrap()
            > 0.0
    );
    assert!(!rows[0][col("machine")].is_empty());
    // The finished output is done whatever number of replicas reruns the job.
    let (code, err) = run(batch_cmd(&inp, &out, &args));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("already complete"), "{err}");
}

#[test]
fn settings_mismatch_is_refused_and_overwrite_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let inp = seeded_input(dir.path(), 3, 2);
    let m = llama30();
    let out = dir.path().join("out.jsonl");
    let (code, err) = run(batch_cmd(&inp, &out, &["--model", &m]));
    assert_eq!(code, 0, "{err}");
    let (code, err) = run(batch_cmd(&inp, &out, &["--model", &m, "--top-k", "5"]));
    assert_eq!(code, 2);
    assert!(
        err.contains("top_k") && err.contains("--overwrite"),
        "{err}"
    );
    let (code, err) = run(batch_cmd(
        &inp,
        &out,
        &["--model", &m, "--top-k", "5", "--overwrite"],
    ));
    assert_eq!(code, 0, "{err}");
    // An output that batch did not write is never clobbered silently.
    let foreign = dir.path().join("foreign.jsonl");
    std::fs::write(&foreign, "precious\n").unwrap();
    let (code, err) = run(batch_cmd(&inp, &foreign, &["--model", &m]));
    assert_eq!(code, 2, "{err}");
    assert_eq!(std::fs::read_to_string(&foreign).unwrap(), "precious\n");
    // A model that does not load has its own code.
    let (code, _) = run(batch_cmd(
        &inp,
        &dir.path().join("o.jsonl"),
        &["--model", "/nonexistent/model"],
    ));
    assert_eq!(code, 3);
}

fn peak_mb(stderr: &str) -> f64 {
    let at = stderr
        .find("peak memory ")
        .unwrap_or_else(|| panic!("{stderr}"));
    stderr[at + 12..]
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{stderr}"))
}

#[test]
fn memory_stays_bounded_on_an_input_far_larger_than_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let m = llama30();
    let make = |name: &str, n: usize| {
        let p = dir.path().join(name);
        let pad = "x".repeat(800);
        let mut s = String::with_capacity(n * 860);
        for i in 0..n {
            s += &json!({"prompt_token_ids": [1 + i % 300, 2, 3], "metadata": {"pad": pad}})
                .to_string();
            s.push('\n');
        }
        std::fs::write(&p, s).unwrap();
        p
    };
    let args = [
        "--model",
        &m,
        "--max-tokens",
        "1",
        "--max-batch-size",
        "256",
        "--read-ahead",
        "256",
    ];
    let small = make("small.jsonl", 500);
    let (code, err) = run(batch_cmd(&small, &dir.path().join("s.jsonl"), &args));
    assert_eq!(code, 0, "{err}");
    let base = peak_mb(&err);
    // 50 000 records, 43 MB of input and 45 MB of output: ~200 times the read-ahead window.
    let big = make("big.jsonl", 50_000);
    let out = dir.path().join("b.jsonl");
    let (code, err) = run(batch_cmd(
        &big,
        &out,
        &[&args[..], &["--log-interval", "0.5"]].concat(),
    ));
    assert_eq!(code, 0, "{err}");
    let peak = peak_mb(&err);
    // Without a terminal, progress comes as log lines.
    assert!(err.contains("/50000 records ("), "{err}");
    assert_eq!(part_lines(&out), 50_000);
    // The bound: what a 500-record run needs plus 25 MB (the ids' hashes, the done bits, buffers),
    // far less than the 43 MB input a non-streaming reader would hold.
    assert!(
        peak < base + 25.0,
        "peak {peak:.1} MB vs {base:.1} MB for 500 records"
    );
}

#[test]
fn record_chunks_concatenate_to_the_whole_run() {
    let dir = tempfile::tempdir().unwrap();
    let inp = seeded_input(dir.path(), 10, 3);
    // A blank line is not a record: chunks count records, not lines.
    let text = std::fs::read_to_string(&inp)
        .unwrap()
        .replacen('\n', "\n\n", 1);
    std::fs::write(&inp, text).unwrap();
    let m = llama30();
    let args = ["--model", &m];
    let whole = dir.path().join("whole.jsonl");
    let (code, err) = run(batch_cmd(&inp, &whole, &args));
    assert_eq!(code, 0, "{err}");
    let mut joined = String::new();
    for (k, range) in ["1-4", "5-8", "9-12", "13-20"].iter().enumerate() {
        let out = dir.path().join(format!("chunk-{k}.jsonl"));
        let (code, err) = run(batch_cmd(
            &inp,
            &out,
            &[&args[..], &["--records", range]].concat(),
        ));
        assert_eq!(code, 0, "{range}: {err}");
        joined += &std::fs::read_to_string(&out).unwrap();
    }
    assert_eq!(joined, std::fs::read_to_string(&whole).unwrap());
    let ids: Vec<Value> = jsonl(&dir.path().join("chunk-1.jsonl"))
        .iter()
        .map(|r| r["id"].clone())
        .collect();
    assert_eq!(ids, [json!("r4"), json!("r5"), json!("r6"), json!("r7")]);
    // Resuming a chunk's output with another range is refused; a nonsense range is a usage error.
    let out = dir.path().join("chunk-0.jsonl");
    let (code, err) = run(batch_cmd(
        &inp,
        &out,
        &[&args[..], &["--records", "1-5"]].concat(),
    ));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("records"), "{err}");
    for bad in ["0-3", "5-2", "x"] {
        let (code, err) = run(batch_cmd(
            &inp,
            &dir.path().join("b.jsonl"),
            &[&args[..], &["--records", bad]].concat(),
        ));
        assert_eq!(code, 2, "{bad}: {err}");
    }
}

#[test]
fn quiet_leaves_out_progress_lines_but_keeps_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let inp = seeded_input(dir.path(), 6, 3);
    let m = llama30();
    for quiet in [false, true] {
        let out = dir.path().join(format!("out-{quiet}.jsonl"));
        let mut args = vec!["--model", m.as_str(), "--log-interval", "0.000001"];
        if quiet {
            args.push("--quiet");
        }
        let (code, err) = run(batch_cmd(&inp, &out, &args));
        assert_eq!(code, 0, "{err}");
        assert_eq!(err.contains("/6 records ("), !quiet, "quiet {quiet}: {err}");
        assert!(
            err.contains("batch done: 6 records"),
            "quiet {quiet}: {err}"
        );
    }
}
