//! Identity tests of herd's tokenizer against Meta's reference (`llama_models`).
//!
//! Needs the real tokenizer: run `scripts/fetch-tokenizer` first. Without it these
//! tests fail (never skip) with the fetch instructions. The expected ids come from
//! `scripts/make_tokenizer_fixtures.py`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use base64::Engine as _;
use herd::tokenizer::{
    default_tokenizer_path, load_default, Message, Role, StreamDecoder, Tokenizer,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixtures {
    docs: Vec<Doc>,
    dialogs: Vec<Dialog>,
}

#[derive(Deserialize)]
struct Doc {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Dialog {
    messages: Vec<Message>,
    ids: Vec<u32>,
}

fn tok() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| match load_default() {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    })
}

fn fixtures() -> &'static Fixtures {
    static FIX: OnceLock<Fixtures> = OnceLock::new();
    FIX.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tokenizer/meta_llama3.json.gz");
        let file = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(file)
            .read_to_end(&mut json)
            .unwrap_or_else(|e| panic!("cannot gunzip {}: {e}", path.display()));
        serde_json::from_slice(&json)
            .unwrap_or_else(|e| panic!("bad fixture {}: {e}", path.display()))
    })
}

/// Asserts equal id lists, reporting the first difference instead of both lists.
fn assert_ids(what: &str, got: &[u32], want: &[u32]) {
    if got == want {
        return;
    }
    let i = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let lo = i.saturating_sub(3);
    panic!(
        "{what}: ids differ at {i} (got {} ids, want {}): got {:?} want {:?}",
        got.len(),
        want.len(),
        &got[lo..(i + 4).min(got.len())],
        &want[lo..(i + 4).min(want.len())],
    );
}

#[test]
fn known_ids() {
    let t = tok();
    assert_eq!(
        t.encode("Hello, world!", true, false),
        [128000, 9906, 11, 1917, 0]
    );
    assert_eq!(t.encode("", true, true), [128000, 128001]);
    assert_eq!(t.vocab_size(), 128_256);
    assert_eq!(t.bos_id(), 128_000);
    assert_eq!(t.eos_id(), 128_001);
    assert_eq!(t.eom_id(), Some(128_008));
    assert_eq!(t.eot_id(), 128_009);
    assert_eq!(t.stop_ids(), [128_001, 128_008, 128_009]);
    assert_eq!(t.special_id("<|finetune_right_pad_id|>"), Some(128_004));
    assert_eq!(t.special_id("<|python_tag|>"), Some(128_010));
    assert_eq!(t.special_id("<|image|>"), Some(128_011));
    assert_eq!(t.special_id("<|reserved_special_token_2|>"), Some(128_012));
    assert_eq!(
        t.special_id("<|reserved_special_token_245|>"),
        Some(128_255)
    );
    assert_eq!(t.special_id("<|reserved_special_token_246|>"), None);
    assert_eq!(t.token_bytes(128_009), Some(&b"<|eot_id|>"[..]));
    assert_eq!(t.token_bytes(128_256), None);
    assert!(t.is_special(128_000) && !t.is_special(9906));
    // Special-token text in input is ordinary text, as with Meta's defaults.
    assert!(!t.encode("<|eot_id|>", false, false).contains(&128_009));
}

#[test]
fn meta_identity_documents() {
    let t = tok();
    let fx = fixtures();
    let bytes: usize = fx.docs.iter().map(|d| d.text.len()).sum();
    let start = Instant::now();
    let encoded: Vec<Vec<u32>> = fx
        .docs
        .iter()
        .map(|d| t.encode(&d.text, false, false))
        .collect();
    let elapsed = start.elapsed();
    println!(
        "encode: {} docs, {bytes} bytes in {:.1} ms ({:.1} MB/s)",
        fx.docs.len(),
        elapsed.as_secs_f64() * 1e3,
        bytes as f64 / elapsed.as_secs_f64() / 1e6,
    );
    assert!(bytes >= 1_000_000, "fixture has only {bytes} bytes");
    assert!(fx.docs.iter().any(|d| d.text.chars().count() > 450_000));
    for (i, (doc, got)) in fx.docs.iter().zip(&encoded).enumerate() {
        assert_ids(&format!("doc {i}"), got, &doc.ids);
        assert!(t.decode(got) == doc.text, "doc {i}: decode(encode(x)) != x");
    }
}

#[test]
fn meta_identity_dialogs() {
    let t = tok();
    for (i, d) in fixtures().dialogs.iter().enumerate() {
        let got = t.encode_dialog(&d.messages);
        assert_ids(&format!("dialog {i}"), &got, &d.ids);
        // The prompt is BOS, each message, then the open assistant header.
        let mut parts = vec![t.bos_id()];
        for m in &d.messages {
            parts.extend(t.encode_message(m));
        }
        parts.extend(t.encode_header(Role::Assistant));
        assert_eq!(parts, got, "dialog {i}");
    }
}

#[test]
fn chat_prompt_text() {
    let t = tok();
    let msgs = [
        Message::new(Role::System, " Be brief. "),
        Message::new(Role::User, "Hi"),
    ];
    let text = t.decode(&t.encode_dialog(&msgs));
    assert_eq!(
        text,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn huge_whitespace_run_does_not_overflow() {
    let t = tok();
    let text = " ".repeat(1_000_000);
    // Test threads have small stacks, which is where an unchunked regex would fail.
    let ids = t.encode(&text, false, false);
    assert_eq!(t.decode(&ids), text);
}

#[test]
fn stream_decoder_matches_decode() {
    let t = tok();
    let mut split_chars = 0;
    for doc in fixtures().docs.iter().filter(|d| d.text.len() < 50_000) {
        let mut d = StreamDecoder::new();
        let mut out = String::new();
        for &id in &doc.ids {
            let piece = d.push(t, id);
            assert!(!piece.contains('\u{FFFD}'), "half a character emitted");
            if piece.is_empty() && d.has_pending() {
                split_chars += 1;
            }
            out.push_str(&piece);
        }
        assert!(!d.has_pending());
        out.push_str(&d.finish());
        assert_eq!(out, doc.text);
    }
    // The fixtures do contain characters split across tokens (emoji, CJK).
    assert!(split_chars > 100, "only {split_chars} split characters");
}

#[test]
fn shared_across_threads() {
    let t = tok();
    let docs = &fixtures().docs;
    std::thread::scope(|s| {
        for k in 0..2 {
            s.spawn(move || {
                for d in docs
                    .iter()
                    .skip(k)
                    .step_by(7)
                    .filter(|d| d.text.len() < 20_000)
                {
                    assert_eq!(t.encode(&d.text, false, false), d.ids);
                }
            });
        }
    });
}

/// GPT-2's byte-to-unicode table, written independently of the library's.
fn byte_to_char() -> Vec<char> {
    let keep = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if keep(b) {
                char::from_u32(b).expect("below 256")
            } else {
                extra += 1;
                char::from_u32(255 + extra).expect("below 0x200")
            }
        })
        .collect()
}

/// Writes an HF-style tokenizer.json equivalent to Meta's tokenizer.model.
fn write_hf_json(meta: &Tokenizer, model: &Path, out: &Path) {
    let table = byte_to_char();
    let text = std::fs::read_to_string(model).expect("read tokenizer.model");
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut vocab = serde_json::Map::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let (tok, rank) = line.split_once(' ').expect("`token rank` line");
        let bytes = b64.decode(tok).expect("base64");
        let key: String = bytes.iter().map(|&b| table[b as usize]).collect();
        let rank: u32 = rank.parse().expect("rank");
        vocab.insert(key, rank.into());
    }
    let num_base = u32::try_from(vocab.len()).expect("fits u32");
    let added: Vec<serde_json::Value> = (num_base..meta.vocab_size() as u32)
        .map(|id| {
            let content = String::from_utf8(meta.token_bytes(id).expect("special").to_vec())
                .expect("utf-8 special");
            serde_json::json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "added_tokens": added,
        "model": {"type": "BPE", "ignore_merges": true, "vocab": vocab, "merges": []},
    });
    std::fs::write(out, serde_json::to_vec(&json).expect("json")).expect("write json");
}

#[test]
fn hf_tokenizer_json_matches_meta() {
    let meta = tok();
    let dir = tempfile::tempdir().expect("temp dir");
    let json_path = dir.path().join("tokenizer.json");
    write_hf_json(meta, &default_tokenizer_path(), &json_path);
    let hf = Tokenizer::from_file(&json_path).expect("load tokenizer.json");
    assert_eq!(hf.vocab_size(), meta.vocab_size());
    assert_eq!(hf.stop_ids(), meta.stop_ids());
    assert_eq!(hf.bos_id(), meta.bos_id());
    let mut specials = BTreeMap::new();
    for id in 128_000..128_256u32 {
        specials.insert(id, hf.token_bytes(id) == meta.token_bytes(id));
    }
    assert!(specials.values().all(|&same| same));
    let fx = fixtures();
    for (i, d) in fx.docs.iter().enumerate().step_by(3) {
        assert_ids(
            &format!("hf doc {i}"),
            &hf.encode(&d.text, false, false),
            &d.ids,
        );
    }
    for (i, d) in fx.dialogs.iter().enumerate() {
        assert_ids(
            &format!("hf dialog {i}"),
            &hf.encode_dialog(&d.messages),
            &d.ids,
        );
    }
}

/// Runs one test of this binary in a child process with a modified environment,
/// so the parent's threads never see the change.
fn run_child(test: &str, env: &[(&str, &str)]) {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = std::process::Command::new(exe);
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("HERD_TOK_TEST_CHILD", "1")
        .env_remove("HERD_TOKENIZER")
        .env_remove("HERD_CACHE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run child test");
    assert!(
        out.status.success(),
        "child {test} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn in_child() -> bool {
    std::env::var_os("HERD_TOK_TEST_CHILD").is_some()
}

#[test]
fn missing_tokenizer_error() {
    run_child(
        "child_missing_from_env",
        &[("HERD_TOKENIZER", "/nonexistent/herd/tok.model")],
    );
    run_child(
        "child_missing_in_cache",
        &[("HERD_CACHE", "/nonexistent/herd-cache")],
    );
    run_child(
        "child_xdg_cache",
        &[("XDG_CACHE_HOME", "/nonexistent/xdg"), ("HERD_CACHE", "")],
    );
}

#[test]
fn child_missing_from_env() {
    if !in_child() {
        return;
    }
    let err = load_default()
        .map(|_| ())
        .expect_err("file is missing")
        .to_string();
    assert!(err.contains("/nonexistent/herd/tok.model"), "{err}");
    assert!(err.contains("HERD_TOKENIZER"), "{err}");
    assert!(err.contains("run `scripts/fetch-tokenizer`"), "{err}");
}

#[test]
fn child_missing_in_cache() {
    if !in_child() {
        return;
    }
    let want = Path::new("/nonexistent/herd-cache/tokenizer.model");
    assert_eq!(default_tokenizer_path(), want);
    let err = load_default()
        .map(|_| ())
        .expect_err("file is missing")
        .to_string();
    assert!(err.contains(&*want.to_string_lossy()), "{err}");
    assert!(err.contains("run `scripts/fetch-tokenizer`"), "{err}");
}

#[test]
fn child_xdg_cache() {
    if !in_child() {
        return;
    }
    assert_eq!(
        default_tokenizer_path(),
        Path::new("/nonexistent/xdg/herd/tokenizer.model")
    );
}
