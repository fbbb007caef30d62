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
    assert_eq!(code, 1);
    assert!(err.contains("wizard"), "{err}");
}

#[test]
fn errors_say_what_is_wrong_and_exit_nonzero() {
    let (code, _, err) = run(&["generate", "--model", "/nonexistent/model", "--prompt", "x"]);
    assert_eq!(code, 1);
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
    assert_eq!(code, 1);
    assert!(
        err.contains("params.json") || err.contains("config.json"),
        "{err}"
    );

    let (code, _, err) = run(&["generate", "--model", "random:7b", "--prompt", "x"]);
    assert_eq!(code, 1);
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
    assert_eq!(code, 1);
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
