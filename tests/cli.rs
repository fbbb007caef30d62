//! The `herd` binary as a user runs it: generate, chat through piped stdin, errors and exit codes.

mod common;

use std::io::{BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn herd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_herd"));
    c.env("RUST_LOG", "warn");
    c
}

/// Kills the child if a test fails before waiting for it (no orphaned generators).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(args: &[&str]) -> (i32, String, String) {
    common::run_herd(args)
}

#[test]
fn generate_json_record_has_every_field() {
    let dir = common::fixture("models/llama31/meta");
    let (code, out, err) = run(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-token-ids",
        "5,6,7,8",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
        "--logprobs",
        "3",
        "--prompt-logprobs",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(out.trim()).expect("one JSON record");
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 6);
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["usage"]["completion_tokens"], 6);
    assert_eq!(v["logprobs"].as_array().unwrap().len(), 6);
    assert_eq!(v["logprobs"][0]["top"].as_array().unwrap().len(), 3);
    let plp = v["prompt_logprobs"].as_array().unwrap();
    assert_eq!(plp.len(), 4);
    assert!(plp[0].is_null() && plp[1].as_f64().unwrap() < 0.0);
    assert!(v["text"].is_string());
}

#[test]
fn generate_streams_text_from_a_text_prompt_and_messages() {
    let (code, out, err) = run(&[
        "generate",
        "--model",
        "random:tiny",
        "--prompt",
        "Hello",
        "--max-tokens",
        "5",
        "--seed",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.trim().is_empty());
    let (code, _, err) = run(&[
        "generate",
        "--model",
        "random:tiny",
        "--messages",
        r#"[{"role":"user","content":"Hi"}]"#,
        "--max-tokens",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&[
        "generate",
        "--model",
        "random:tiny",
        "--messages",
        r#"[{"role":"wizard","content":"Hi"}]"#,
    ]);
    assert_eq!(code, 2, "a bad --messages is a bad argument: {err}");
    assert!(
        err.contains("wizard") && err.contains("--messages"),
        "{err}"
    );
}

#[test]
fn errors_say_what_is_wrong_and_exit_nonzero() {
    let (code, _, err) = run(&["generate", "--model", "/nonexistent/model", "--prompt", "x"]);
    assert_eq!(code, 3, "a model that cannot be found: {err}");
    assert!(
        err.contains("/nonexistent/model") && err.contains("not found"),
        "{err}"
    );

    let empty = tempfile::tempdir().unwrap();
    let (code, _, err) = run(&[
        "generate",
        "--model",
        empty.path().to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert_eq!(code, 3, "a directory without a checkpoint: {err}");
    assert!(
        err.contains("params.json") || err.contains("config.json"),
        "{err}"
    );

    let (code, _, err) = run(&["generate", "--model", "random:7b", "--prompt", "x"]);
    assert_eq!(code, 3, "an unknown built-in model: {err}");
    assert!(err.contains("random:tiny"), "{err}");

    // A prompt longer than the context.
    let (code, _, err) = run(&[
        "generate",
        "--model",
        "random:tiny",
        "--max-seq-len",
        "8",
        "--prompt-token-ids",
        "1,2,3,4,5,6,7,8,9",
    ]);
    assert_eq!(
        code, 2,
        "a prompt that does not fit is a bad argument: {err}"
    );
    assert!(err.contains("9 tokens"), "{err}");

    let (code, _, _) = run(&["generate", "--no-such-flag"]);
    assert_eq!(code, 2);
}

#[test]
fn chat_over_piped_stdin_answers_and_understands_commands() {
    let mut child = herd()
        .args([
            "chat",
            "--model",
            "random:tiny",
            "--max-tokens",
            "8",
            "--seed",
            "2",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello\n/help\n/reset\n/system You are terse.\nHow are you?\n/bogus\n/quit\nnever read\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("commands: /reset"), "{text}");
    assert!(text.contains("(conversation reset)"), "{text}");
    assert!(text.contains("(system prompt set"), "{text}");
    assert!(text.contains("unknown command /bogus"), "{text}");
    // Two answers: the lines before the help text and after the system prompt change.
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 6, "{text}");
}

#[test]
fn chat_ctrl_c_stops_the_answer_not_the_program() {
    let mut child = KillOnDrop(
        herd()
            .args([
                "chat",
                "--model",
                "random:tiny",
                "--max-tokens",
                "1000000",
                "--ignore-eos",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdin = child.0.stdin.take().unwrap();
    stdin.write_all(b"Tell me a very long story\n").unwrap();
    stdin.flush().unwrap();
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    // Wait until the answer is streaming, then interrupt it.
    let mut first = [0u8; 1];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    let t0 = Instant::now();
    let pid = child.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    // The program must still be there to answer the next message.
    stdin.write_all(b"/help\n/quit\n").unwrap();
    drop(stdin);
    // Bytes, not a String: the first byte read above may have split a character.
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut stdout, &mut rest).unwrap();
    let rest = String::from_utf8_lossy(&rest);
    let status = child.0.wait().unwrap();
    assert!(status.success(), "chat exited with {status}");
    assert!(rest.contains("(stopped)"), "{rest}");
    assert!(rest.contains("commands: /reset"), "{rest}");
    assert!(t0.elapsed() < Duration::from_secs(30));
}

#[test]
fn chat_drops_the_oldest_turns_when_the_context_fills() {
    // A 96-token context: the system prompt (~40 tokens) plus one exchange fits, two do not.
    let out = herd()
        .args([
            "chat",
            "--model",
            "random:tiny",
            "--max-seq-len",
            "96",
            "--max-tokens",
            "8",
            "--seed",
            "4",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            let mut stdin = c.stdin.take().unwrap();
            stdin.write_all(
                b"first message with a few words in it\n\
                  second message with a few more words\n\
                  third message, still going on here\n",
            )?;
            // One message longer than the whole context is refused, not sent.
            stdin.write_all("very long ".repeat(80).as_bytes())?;
            stdin.write_all(b"\nfourth message after the long one\n")?;
            drop(stdin);
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.matches("too long for the context").count(),
        1,
        "{text}"
    );
}

// ---- Flags: every one checked before anything loads, named in the error, exit codes as the
// README's table says. ----

/// `herd ARGS` with stdout going to `stdout` (e.g. /dev/full): exit code and stderr.
fn run_to(args: &[&str], stdout: std::fs::File) -> (i32, String) {
    let out = herd()
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .output()
        .expect("herd runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn dev_full() -> std::fs::File {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full")
}

/// Files in `dir`, sorted (to show that a refused run left nothing behind).
fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn every_argument_and_command_has_help_text() {
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        let path = format!("{path} {}", cmd.get_name());
        if cmd.get_about().is_none() && cmd.get_long_about().is_none() {
            missing.push(format!("{path} (the command)"));
        }
        for a in cmd.get_arguments() {
            if a.get_help().is_none() && a.get_long_help().is_none() && !a.is_hide_set() {
                missing.push(format!("{path} --{}", a.get_id()));
            }
        }
        for sc in cmd.get_subcommands() {
            walk(sc, &path, missing);
        }
    }
    let mut cmd = herd::cli::command();
    cmd.build();
    let mut missing = Vec::new();
    walk(&cmd, "", &mut missing);
    assert!(missing.is_empty(), "arguments without help: {missing:#?}");
    // The walk sees every command and the flags of flattened structs.
    let names: Vec<&str> = cmd.get_subcommands().map(|c| c.get_name()).collect();
    for want in [
        "generate", "chat", "worker", "bench", "doctor", "convert", "batch",
    ] {
        assert!(names.contains(&want), "{names:?}");
    }
    let batch = cmd.find_subcommand("batch").unwrap();
    for flag in ["top_p", "tp", "max_tokens_cap", "quiet", "log_level"] {
        assert!(
            batch.get_arguments().any(|a| a.get_id() == flag),
            "batch --{flag}"
        );
    }
}

#[test]
fn every_command_takes_quiet_and_log_level() {
    let required: &[(&str, &[&str])] = &[
        ("generate", &["--model", "m", "--prompt", "x"]),
        ("chat", &["--model", "m"]),
        ("worker", &["--model", "m", "--api-server", "http://x"]),
        ("bench", &["--model", "m"]),
        ("doctor", &[]),
        ("convert", &["--model", "m", "--output", "o"]),
        ("batch", &["--model", "m", "--input", "i", "--output", "o"]),
    ];
    for (name, req) in required {
        for extra in [&["--quiet"][..], &["--log-level", "debug"][..]] {
            let argv: Vec<&str> = ["herd", name]
                .into_iter()
                .chain(req.iter().copied())
                .chain(extra.iter().copied())
                .collect();
            let r = herd::cli::command().try_get_matches_from(&argv);
            assert!(r.is_ok(), "{argv:?}: {:?}", r.err());
        }
    }
    let (code, _, err) = run(&["doctor", "--log-level", "loud"]);
    assert_eq!(code, 2);
    assert!(err.contains("--log-level"), "{err}");
    let (code, _, err) = run(&["doctor", "--quiet", "--log-level", "info"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn log_level_flags_beat_rust_log_which_still_works() {
    let gen = [
        "generate",
        "--model",
        "random:tiny",
        "--prompt-token-ids",
        "1,2,3",
        "--max-tokens",
        "2",
    ];
    let stderr = |args: &[&str], rust_log: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_herd"));
        c.args(gen).args(args).env_remove("RUST_LOG");
        if let Some(l) = rust_log {
            c.env("RUST_LOG", l);
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Default: info on rank 0 (the "done" line).
    assert!(stderr(&[], None).contains("INFO"));
    // RUST_LOG alone still sets the level.
    assert!(!stderr(&[], Some("warn")).contains("INFO"));
    // --quiet: warnings and errors only, whatever RUST_LOG says.
    let quiet = stderr(&["--quiet"], Some("debug"));
    assert!(
        !quiet.contains("INFO") && !quiet.contains("DEBUG"),
        "{quiet}"
    );
    // --log-level wins over RUST_LOG.
    assert!(stderr(&["--log-level", "info"], Some("error")).contains("INFO"));
}

#[test]
fn a_negative_number_reaches_herds_own_check() {
    // clap used to read `-1` as an unknown flag; now herd's range check names the flag.
    let (code, _, err) = run(&[
        "generate",
        "--model",
        "random:tiny",
        "--prompt",
        "x",
        "--temperature",
        "-1",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--temperature must be >= 0, got -1"), "{err}");
    // A negative value of an unsigned flag is clap's error, still naming the flag.
    let (code, _, err) = run(&[
        "generate",
        "--model",
        "random:tiny",
        "--prompt",
        "x",
        "--top-k",
        "-1",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--top-k"), "{err}");
}

/// Each command with one bad flag: exit 2, the flag named, quickly. The model is random:70b
/// (about 140 GB to generate), so a check that ran after loading would not answer in time.
#[test]
fn bad_flags_exit_2_naming_the_flag_before_anything_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let out_dir = t.join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let a_file = t.join("a-file");
    std::fs::write(&a_file, "x").unwrap();
    let jsonl = t.join("in.jsonl");
    std::fs::write(&jsonl, "{\"prompt\": \"hi\"}\n").unwrap();
    let csv = t.join("in.csv");
    std::fs::write(&csv, "question,qid\nhi,1\n").unwrap();
    let not_empty = t.join("not-empty");
    std::fs::create_dir(&not_empty).unwrap();
    std::fs::write(not_empty.join("x"), "x").unwrap();
    let p = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (out_dir_s, a_file_s, jsonl_s, csv_s) = (p(&out_dir), p(&a_file), p(&jsonl), p(&csv));
    let out_file = p(&out_dir.join("r.jsonl"));
    let under_file = p(&a_file.join("r.jsonl"));
    let m70 = ["--model", "random:70b"];
    let gen = |extra: &[&str]| -> Vec<String> {
        ["generate", "--model", "random:70b", "--prompt", "x"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let batch = |input: &str, extra: &[&str]| -> Vec<String> {
        ["batch", "--model", "random:70b", "--input", input]
            .iter()
            .copied()
            .chain(if extra.contains(&"--output") {
                vec![]
            } else {
                vec!["--output", out_file.as_str()]
            })
            .chain(extra.iter().copied())
            .map(|s| s.to_string())
            .collect()
    };
    let cmd = |v: &[&str]| -> Vec<String> { v.iter().map(|s| s.to_string()).collect() };
    let cases: Vec<(Vec<String>, &str)> = vec![
        // Sampling ranges (generate, chat and batch share them).
        (gen(&["--temperature", "-0.5"]), "--temperature"),
        (gen(&["--temperature", "nan"]), "--temperature"),
        (gen(&["--top-p", "1.5"]), "--top-p"),
        (gen(&["--top-p", "0"]), "--top-p"),
        (gen(&["--max-tokens", "0"]), "--max-tokens"),
        (gen(&["--stop", ""]), "--stop"),
        // Model flags (every generating command).
        (gen(&["--tp", "0"]), "--tp"),
        (gen(&["--tp", "2"]), "--tp"),
        (gen(&["--device", "gpu"]), "--device"),
        (
            gen(&["--gpu-memory-utilization", "2"]),
            "--gpu-memory-utilization",
        ),
        (
            gen(&["--gpu-memory-utilization", "0"]),
            "--gpu-memory-utilization",
        ),
        (gen(&["--block-size", "0"]), "--block-size"),
        (gen(&["--max-batch-size", "0"]), "--max-batch-size"),
        (gen(&["--max-batch-tokens", "0"]), "--max-batch-tokens"),
        (gen(&["--max-seq-len", "1"]), "--max-seq-len"),
        (gen(&["--kv-cache-gb", "0"]), "--kv-cache-gb"),
        (
            gen(&["--kv-cache-gb", "1e9", "--device", "cpu"]),
            "--kv-cache-gb",
        ),
        (
            gen(&["--tokenizer", "/nonexistent/tokenizer.model"]),
            "--tokenizer",
        ),
        // generate's own.
        (gen(&["--messages", "not json"]), "--messages"),
        (gen(&["--logprobs", "2"]), "--json"),
        (cmd(&["generate", "--model", "random:70b"]), "--prompt"),
        (
            cmd(&[
                "generate",
                "--model",
                "random:70b",
                "--messages",
                "[]",
                "--log-level",
                "x",
            ]),
            "--log-level",
        ),
        // chat.
        (
            cmd(&["chat", "--model", "random:70b", "--top-p", "1.5"]),
            "--top-p",
        ),
        (
            cmd(&["chat", "--model", "random:70b", "--max-tokens", "0"]),
            "--max-tokens",
        ),
        // batch: the issue's example first.
        (batch(&jsonl_s, &["--top-p", "1.5"]), "--top-p"),
        (batch(&jsonl_s, &["--max-tokens", "0"]), "--max-tokens"),
        (
            batch(&jsonl_s, &["--max-tokens-cap", "0"]),
            "--max-tokens-cap",
        ),
        (batch(&jsonl_s, &["--read-ahead", "0"]), "--read-ahead"),
        (batch(&jsonl_s, &["--grace-period", "-1"]), "--grace-period"),
        (batch(&jsonl_s, &["--log-interval", "-1"]), "--log-interval"),
        (
            batch(&jsonl_s, &["--grace-period", "1e20"]),
            "--grace-period",
        ),
        (batch(&jsonl_s, &["--block-size", "0"]), "--block-size"),
        (
            batch(&jsonl_s, &["--output", &out_dir_s, "--overwrite"]),
            "--output",
        ),
        (batch(&jsonl_s, &["--output", &under_file]), "--output"),
        (
            batch(&jsonl_s, &["--output", "/proc/herd-test/r.jsonl"]),
            "--output /proc/herd-test/r.jsonl: cannot create",
        ),
        // A directory that exists but takes no new files (even for root).
        (
            batch(&jsonl_s, &["--output", "/proc/r.jsonl"]),
            "--output /proc/r.jsonl: cannot write in /proc",
        ),
        (batch(&jsonl_s, &["--stats-csv", &out_dir_s]), "--stats-csv"),
        (
            batch(&jsonl_s, &["--prompt-column", "question"]),
            "--prompt-column",
        ),
        (batch(&csv_s, &[]), "pass --prompt-column"),
        (
            batch(
                &csv_s,
                &["--prompt-column", "question", "--id-column", "id"],
            ),
            "--id-column",
        ),
        (batch("/nonexistent/in.jsonl", &[]), "--input"),
        (batch(&out_dir_s, &[]), "--input"),
        // worker: before the (unreachable) server is asked, which would take the timeout.
        (
            cmd(&[
                "worker",
                m70[0],
                m70[1],
                "--api-server",
                "http://127.0.0.1:9",
                "--block-size",
                "0",
            ]),
            "--block-size",
        ),
        (
            cmd(&[
                "worker",
                m70[0],
                m70[1],
                "--api-server",
                "http://127.0.0.1:9",
                "--progress-rate",
                "0",
            ]),
            "--progress-rate",
        ),
        (
            cmd(&[
                "worker",
                m70[0],
                m70[1],
                "--api-server",
                "http://127.0.0.1:9",
                "--shutdown-grace",
                "-1",
            ]),
            "--shutdown-grace",
        ),
        (
            cmd(&[
                "worker",
                m70[0],
                m70[1],
                "--api-server",
                "http://127.0.0.1:9",
                "--connect-timeout",
                "nan",
            ]),
            "--connect-timeout",
        ),
        (
            cmd(&["worker", m70[0], m70[1], "--api-server", "ftp://x"]),
            "--api-server",
        ),
        // bench.
        (
            cmd(&["bench", m70[0], m70[1], "--batch-sizes", "1,0"]),
            "--batch-sizes",
        ),
        (
            cmd(&["bench", m70[0], m70[1], "--gen-tokens", "0"]),
            "--gen-tokens",
        ),
        (
            cmd(&["bench", m70[0], m70[1], "--csv", &out_dir_s]),
            "--csv",
        ),
        // An existing CSV with other columns: rows appended would not line up.
        (cmd(&["bench", m70[0], m70[1], "--csv", &csv_s]), "--csv"),
        (
            cmd(&[
                "bench",
                m70[0],
                m70[1],
                "--temperature",
                "1",
                "--top-p",
                "1.5",
            ]),
            "--top-p",
        ),
        (
            cmd(&[
                "bench",
                m70[0],
                m70[1],
                "--device",
                "cpu",
                "--kernel-profile",
                "k.csv",
            ]),
            "--kernel-profile",
        ),
        // --device auto on this machine (no GPU) chooses the cpu: refused before loading too.
        (
            cmd(&["bench", m70[0], m70[1], "--kernel-profile", "k.csv"]),
            "--kernel-profile",
        ),
        // doctor and convert.
        (cmd(&["doctor", "--tp", "0"]), "--tp"),
        (
            cmd(&[
                "convert",
                "--model",
                "/nonexistent",
                "--output",
                &p(&t.join("c")),
                "--tp",
                "0",
            ]),
            "--tp",
        ),
        (
            cmd(&[
                "convert",
                "--model",
                "/nonexistent",
                "--output",
                &p(&not_empty),
            ]),
            "--output",
        ),
        (
            cmd(&["convert", "--model", "/nonexistent", "--output", &a_file_s]),
            "--output",
        ),
    ];
    for (args, flag) in &cases {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let t0 = Instant::now();
        let (code, _, err) = run(&argv);
        assert_eq!(code, 2, "{argv:?}: {err}");
        assert!(err.contains(flag), "{argv:?} must name {flag}: {err}");
        assert!(!err.contains("panicked"), "{argv:?}: {err}");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{argv:?} took {:?}: checked after loading?",
            t0.elapsed()
        );
    }
    // Nothing was written beside the refused outputs.
    assert!(listing(&out_dir).is_empty(), "{:?}", listing(&out_dir));
    assert_eq!(listing(&not_empty), ["x"]);
}

/// Flags that need the model's config are checked after it is opened, before the weights load.
#[test]
fn flags_checked_against_the_model_exit_2() {
    let (code, _, err) = run(&[
        "generate",
        "--model",
        "random:tiny",
        "--prompt",
        "x",
        "--max-seq-len",
        "200000",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--max-seq-len 200000") && err.contains("131072"),
        "{err}"
    );
    // tiny has 4 heads and 2 KV heads: 4 ranks of tp 4 are fine, tp 3 is not (a world of 3
    // ranks is emulated by nothing here, so the check is convert's, which needs no launch).
    let tmp = tempfile::tempdir().unwrap();
    let src = common::fixture("models/llama31/meta");
    let (code, _, err) = run(&[
        "convert",
        "--model",
        src.to_str().unwrap(),
        "--output",
        tmp.path().join("o").to_str().unwrap(),
        "--tp",
        "3",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--tp 3"), "{err}");
}

/// A model directory that exists but whose checkpoint is cut short.
fn corrupt_checkpoint(dir: &std::path::Path) -> std::path::PathBuf {
    let src = common::fixture("models/llama31/meta");
    let dst = dir.join("corrupt");
    std::fs::create_dir(&dst).unwrap();
    std::fs::copy(src.join("params.json"), dst.join("params.json")).unwrap();
    let pth = std::fs::read(src.join("consolidated.00.pth")).unwrap();
    std::fs::write(dst.join("consolidated.00.pth"), &pth[..pth.len() / 3]).unwrap();
    dst
}

/// Answers every request with `{}` (an AIME server that accepts the worker's status check).
fn accepting_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 65536];
            let _ = std::io::Read::read(&mut s, &mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            );
        }
    });
    format!("http://127.0.0.1:{port}")
}

#[test]
fn a_model_that_cannot_be_found_or_loaded_exits_3_in_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let corrupt = corrupt_checkpoint(tmp.path());
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, "{\"prompt\": \"hi\"}\n").unwrap();
    let server = accepting_server();
    let models = [
        "/nonexistent/model",
        empty.to_str().unwrap(),
        corrupt.to_str().unwrap(),
        "random:7b",
    ];
    for (i, m) in models.iter().enumerate() {
        let out = tmp.path().join(format!("out-{i}.jsonl"));
        let runs: Vec<Vec<&str>> = vec![
            vec!["generate", "--model", m, "--prompt", "x"],
            vec!["chat", "--model", m],
            vec![
                "batch",
                "--model",
                m,
                "--input",
                input.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ],
            vec!["bench", "--model", m, "--batch-sizes", "1"],
            vec!["worker", "--model", m, "--api-server", &server],
        ];
        for argv in runs {
            let (code, _, err) = run(&argv);
            assert_eq!(code, 3, "{argv:?}: {err}");
            assert!(!err.contains("panicked"), "{argv:?}: {err}");
        }
    }
    for m in models {
        let out = tmp.path().join("converted");
        let (code, _, err) = run(&["convert", "--model", m, "--output", out.to_str().unwrap()]);
        assert_eq!(code, 3, "convert {m}: {err}");
    }
}

#[test]
fn output_that_cannot_be_written_exits_1() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, "{\"prompt\": \"hi\"}\n").unwrap();
    let gen = [
        "generate",
        "--model",
        "random:tiny",
        "--prompt",
        "x",
        "--max-tokens",
        "2",
    ];
    for extra in [&[][..], &["--json"][..]] {
        let argv: Vec<&str> = gen.iter().chain(extra).copied().collect();
        let (code, err) = run_to(&argv, dev_full());
        assert_eq!(code, 1, "{argv:?}: {err}");
        assert!(err.contains("No space left"), "{err}");
    }
    let mut chat = herd()
        .args(["chat", "--model", "random:tiny", "--max-tokens", "2"])
        .stdin(Stdio::piped())
        .stdout(dev_full())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    chat.stdin.take().unwrap().write_all(b"Hello\n").unwrap();
    let out = chat.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "chat: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let (code, err) = run_to(&["doctor"], dev_full());
    assert_eq!(code, 1, "doctor: {err}");
    assert!(!err.contains("panicked"), "{err}");
    // Files named by flags: the job runs, then writing its CSV fails.
    let (code, _, err) = run(&[
        "batch",
        "--model",
        "random:tiny",
        "--input",
        input.to_str().unwrap(),
        "--output",
        tmp.path().join("o.jsonl").to_str().unwrap(),
        "--max-tokens",
        "2",
        "--stats-csv",
        "/dev/full",
    ]);
    assert_eq!(code, 1, "batch: {err}");
    let (code, _, err) = run(&[
        "bench",
        "--model",
        "random:tiny",
        "--device",
        "cpu",
        "--batch-sizes",
        "1",
        "--prompt-len",
        "4",
        "--gen-tokens",
        "2",
        "--csv",
        "/dev/full",
    ]);
    assert_eq!(code, 1, "bench: {err}");
}

#[test]
fn successful_commands_exit_0() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, out, err) = run(&["doctor"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("== host =="), "{out}");
    let mut chat = herd()
        .args(["chat", "--model", "random:tiny", "--max-tokens", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    chat.stdin
        .take()
        .unwrap()
        .write_all(b"Hi\n/quit\n")
        .unwrap();
    let out = chat.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let (code, _, err) = run(&[
        "bench",
        "--model",
        "random:tiny",
        "--device",
        "cpu",
        "--batch-sizes",
        "1",
        "--prompt-len",
        "4",
        "--gen-tokens",
        "2",
        "--csv",
        tmp.path().join("b.csv").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn doctor_reports_the_host() {
    let (code, out, err) = run(&["doctor"]);
    assert_eq!(code, 0, "{err}");
    let host = out
        .split("== host ==")
        .nth(1)
        .and_then(|s| s.split("==").next())
        .unwrap_or_else(|| panic!("no host section: {out}"));
    for key in ["herd: ", "cpu: ", "cores: ", "memory: ", "tokenizer: "] {
        assert!(host.contains(key), "{key:?} in {host}");
    }
    assert!(
        host.contains(&format!("herd: {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{host}"
    );
    assert!(host.contains(" GB total"), "{host}");
    // Where the tokenizer is, or where it was looked for and how to get it.
    let out = Command::new(env!("CARGO_BIN_EXE_herd"))
        .arg("doctor")
        .env("HERD_TOKENIZER", "/nonexistent/tokenizer.model")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("tokenizer: not found") && text.contains("/nonexistent/tokenizer.model"),
        "{text}"
    );
}

/// A batch of records whose own max_tokens (herd, OpenAI max_tokens, OpenAI
/// max_completion_tokens, none) exceed the cap: none generates more.
#[test]
fn max_tokens_cap_bounds_every_record() {
    let tmp = tempfile::tempdir().unwrap();
    let herd_in = tmp.path().join("herd.jsonl");
    std::fs::write(
        &herd_in,
        "{\"id\": 1, \"prompt_token_ids\": [1, 2, 3], \"max_tokens\": 40}\n\
         {\"id\": 2, \"prompt_token_ids\": [1, 2, 3]}\n\
         {\"id\": 3, \"prompt_token_ids\": [1, 2, 3], \"max_tokens\": 2}\n",
    )
    .unwrap();
    let openai_in = tmp.path().join("openai.jsonl");
    let line = |id: &str, field: &str| {
        format!(
            "{{\"custom_id\": \"{id}\", \"method\": \"POST\", \"url\": \"/v1/completions\", \
             \"body\": {{\"model\": \"m\", \"prompt\": \"Hello\", \"{field}\": 40}}}}\n"
        )
    };
    std::fs::write(
        &openai_in,
        line("a", "max_tokens") + &line("b", "max_completion_tokens"),
    )
    .unwrap();
    let batch = |input: &std::path::Path, out: &str, extra: &[&str]| {
        let out = tmp.path().join(out);
        let argv: Vec<&str> = [
            "batch",
            "--model",
            "random:tiny",
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--ignore-eos",
            "--temperature",
            "0",
        ]
        .iter()
        .chain(extra)
        .copied()
        .collect();
        let (code, _, err) = run(&argv);
        assert_eq!(code, 0, "{err}");
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let n = |v: &Value| v["usage"]["completion_tokens"].as_u64().unwrap();
    // --max-tokens is only a default: the record's own 40 wins.
    let recs = batch(&herd_in, "default.jsonl", &["--max-tokens", "5"]);
    assert_eq!(recs.iter().map(n).collect::<Vec<_>>(), [40, 5, 2]);
    // --max-tokens-cap bounds them all; smaller requests stay as asked.
    let recs = batch(&herd_in, "capped.jsonl", &["--max-tokens-cap", "5"]);
    assert_eq!(recs.iter().map(n).collect::<Vec<_>>(), [5, 5, 2]);
    for r in &recs[..2] {
        assert_eq!(r["finish_reason"], "length");
    }
    // OpenAI bodies: max_tokens and max_completion_tokens alike.
    let recs = batch(&openai_in, "openai-out.jsonl", &["--max-tokens-cap", "3"]);
    let usage: Vec<u64> = recs
        .iter()
        .map(|r| {
            r["response"]["body"]["usage"]["completion_tokens"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(usage, [3, 3]);
}

#[test]
fn batch_output_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, "{\"prompt_token_ids\": [1, 2]}\n").unwrap();
    let go = |out: &std::path::Path, extra: &[&str]| {
        let argv: Vec<&str> = [
            "batch",
            "--model",
            "random:tiny",
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--max-tokens",
            "2",
        ]
        .iter()
        .chain(extra)
        .copied()
        .collect();
        run(&argv)
    };
    // Missing parents are created (as `out/x.jsonl` in a fresh checkout expects).
    let nested = tmp.path().join("a/b/c/out.jsonl");
    let (code, _, err) = go(&nested, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(&nested).unwrap().lines().count(), 1);
    // A directory as the output, even with --overwrite: refused before anything runs.
    let dir = tmp.path().join("a/b/c");
    let before = listing(&dir);
    let (code, _, err) = go(&dir, &["--overwrite"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--output") && err.contains("is a directory"),
        "{err}"
    );
    assert_eq!(listing(&dir), before, "no .part / .merging files");
}
