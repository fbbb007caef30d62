//! Real-world inputs to `herd batch` (issue 11, points 7, 10, 12, 13): byte-order marks, names
//! and formats, vLLM's own test file, CSV lines and columns, special tokens in the text, and
//! record fields herd ignores (warned once, errors under --strict).

mod common;

use common::jsonl;

use std::path::Path;
use std::process::Command;

use herd::backend::KvShape;
use herd::engine::{Engine, EngineConfig, Event, SamplingParams};
use herd::model::{LlamaConfig, ModelError, ModelRunner, StepInput};
use serde_json::{json, Value};

fn batch(input: &Path, output: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_herd"))
        .env("RUST_LOG", "info")
        .args(["batch", "--model", "random:tiny", "--max-tokens", "2"])
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(extra)
        .output()
        .expect("herd runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn lines(values: &[Value]) -> String {
    values.iter().map(|v| v.to_string() + "\n").collect()
}

const BOM: &str = "\u{feff}";

// ---- point 7: detection ----

#[test]
fn a_byte_order_mark_is_skipped_in_jsonl_and_csv() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.jsonl");
    let body = lines(&[
        json!({"id": "a", "prompt": "Hello, world", "seed": 1}),
        json!({"id": "b", "prompt": "Hi", "seed": 2}),
    ]);
    std::fs::write(&inp, format!("{BOM}{body}")).unwrap();
    let out = dir.path().join("out.jsonl");
    let (code, err) = batch(&inp, &out, &[]);
    assert_eq!(code, 0, "{err}");
    let recs = jsonl(&out);
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0]["id"], "a", "{}", recs[0]);
    assert!(recs.iter().all(|r| r.get("error").is_none()), "{recs:?}");
    // The same content without the mark gives the same tokens.
    let plain = dir.path().join("plain.jsonl");
    std::fs::write(&plain, &body).unwrap();
    let out2 = dir.path().join("out2.jsonl");
    assert_eq!(batch(&plain, &out2, &[]).0, 0);
    assert_eq!(jsonl(&out2)[0]["token_ids"], recs[0]["token_ids"]);
    // CSV: the first column's name is not "\u{feff}prompt".
    let csv_in = dir.path().join("in.csv");
    std::fs::write(&csv_in, format!("{BOM}prompt,k\nHello,1\n")).unwrap();
    let out3 = dir.path().join("out3.jsonl");
    let (code, err) = batch(&csv_in, &out3, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(jsonl(&out3)[0]["metadata"], json!({"k": "1"}));
}

#[test]
fn text_or_binary_named_jsonl_is_refused_as_not_jsonl_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let txt = dir.path().join("notes.jsonl");
    std::fs::write(&txt, "Dear diary, today I wrote a prompt.\nAnother line.\n").unwrap();
    let (code, err) = batch(&txt, &out, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("notes.jsonl: not JSONL (the name ends in .jsonl)") && err.contains("line 1"),
        "{err}"
    );
    assert!(
        !err.contains("no column"),
        "a CSV error for a .jsonl file: {err}"
    );
    let bin = dir.path().join("blob.jsonl");
    std::fs::write(&bin, b"\x7fELF\x02\x01\x01\x00\x00\x00,\x00\n\x03\x00").unwrap();
    let (code, err) = batch(&bin, &out, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("binary"), "{err}");
    assert!(!out.exists());
}

#[test]
fn tsv_is_tab_separated_and_guesses_say_what_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let tsv = dir.path().join("in.tsv");
    std::fs::write(&tsv, "qid\tprompt\tnote\nq1\tHello, world\ta, b\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let (code, err) = batch(&tsv, &out, &["--id-column", "qid"]);
    assert_eq!(code, 0, "{err}");
    let r = &jsonl(&out)[0];
    assert_eq!(r["id"], "q1");
    assert_eq!(r["metadata"], json!({"note": "a, b"}));
    assert!(
        err.contains("read as TSV, tab-separated (the name ends in .tsv)"),
        "{err}"
    );
    // Another name: the guess and its reason, in one line.
    let txt = dir.path().join("in.txt");
    std::fs::write(&txt, lines(&[json!({"prompt": "Hi, there"})])).unwrap();
    let (code, err) = batch(&txt, &dir.path().join("o2.jsonl"), &[]);
    assert_eq!(code, 0, "{err}");
    let said: Vec<&str> = err.lines().filter(|l| l.contains("read as")).collect();
    assert_eq!(said.len(), 1, "{err}");
    assert!(
        said[0].contains("herd JSONL (guessed: .txt is not .jsonl")
            && said[0].contains("line 1 is a JSON object"),
        "{err}"
    );
}

/// vLLM's tests/entrypoints/openai/test_run_batch.py INVALID_INPUT_BATCH: the first line has
/// no custom_id, the second is a valid request.
#[test]
fn vllms_file_with_a_first_line_lacking_custom_id_is_answered_as_openai() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("vllm.jsonl");
    std::fs::write(
        &inp,
        lines(&[
            json!({"invalid_field": "request-1", "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "NousResearch/Meta-Llama-3-8B-Instruct",
                            "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                         {"role": "user", "content": "Hello world!"}],
                            "max_completion_tokens": 1000}}),
            json!({"custom_id": "request-2", "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "NousResearch/Meta-Llama-3-8B-Instruct",
                            "messages": [{"role": "system", "content": "You are an unhelpful assistant."},
                                         {"role": "user", "content": "Hello world!"}],
                            "max_completion_tokens": 2}}),
        ]),
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    let (code, err) = batch(&inp, &out, &[]);
    assert_eq!(code, 0, "{err}");
    let recs = jsonl(&out);
    assert_eq!(recs.len(), 2);
    // Line 1: an OpenAI error line for that line, not a herd "no prompt" record.
    assert!(recs[0]["custom_id"].is_null(), "{}", recs[0]);
    assert_eq!(recs[0]["response"]["status_code"], 400);
    let msg = recs[0]["error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("line 1: missing field `custom_id`"),
        "{msg}"
    );
    // Line 2: answered.
    assert_eq!(recs[1]["custom_id"], "request-2");
    assert_eq!(recs[1]["response"]["status_code"], 200);
    assert_eq!(
        recs[1]["response"]["body"]["object"], "chat.completion",
        "{}",
        recs[1]
    );
    assert!(err.contains("read as OpenAI batch JSONL"), "{err}");
}

// ---- point 12: CSV ----

#[test]
fn csv_errors_name_the_file_line_and_csv_output_keeps_token_ids_and_columns() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.csv");
    // Row 2 spans lines 3-5 (quoted newlines), so row 3 starts on line 6: rows and lines differ.
    std::fs::write(
        &inp,
        "qid,question,topic,text\n\
         k1,Why is the sky blue?,physics,t1\n\
         k2,\"A prompt, with a comma\nand a newline\nand another\",misc,t2\n\
         k3\n\
         k4,Last one,end,t4\n",
    )
    .unwrap();
    let args = [
        "--prompt-column",
        "question",
        "--id-column",
        "qid",
        "--seed",
        "4",
    ];
    let out = dir.path().join("out.csv");
    let (code, err) = batch(&inp, &out, &args);
    assert_eq!(code, 0, "{err}");
    let mut rdr = csv::Reader::from_path(&out).unwrap();
    let header: Vec<String> = rdr.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(
        header,
        [
            "id",
            "text",
            "token_ids",
            "finish_reason",
            "prompt_tokens",
            "completion_tokens",
            "error",
            "topic",
            // An input column named like a result column keeps its values under another name.
            "input_text",
        ]
    );
    let rows: Vec<csv::StringRecord> = rdr.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 4);
    assert_eq!(&rows[2][0], "k3");
    assert_eq!(&rows[2][3], "error");
    assert!(rows[2][6].starts_with("line 6: "), "{:?}", &rows[2]);
    // The default id stays the data row number.
    assert_eq!(&rows[1][7], "misc");
    assert_eq!(&rows[1][8], "t2");
    assert_eq!(&rows[3][0], "k4");
    // token_ids: the same list the JSONL output holds.
    let out2 = dir.path().join("out.jsonl");
    let (code, err) = batch(&inp, &out2, &args);
    assert_eq!(code, 0, "{err}");
    let recs = jsonl(&out2);
    let ids: Value = serde_json::from_str(&rows[1][2]).unwrap();
    assert_eq!(ids, recs[1]["token_ids"]);
    assert_eq!(ids.as_array().unwrap().len(), 2);
    assert_eq!(&rows[1][1], recs[1]["text"].as_str().unwrap());
    assert!(recs[2]["error"].as_str().unwrap().starts_with("line 6: "));
}

#[test]
fn csv_output_of_openai_input_has_the_answers() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.jsonl");
    std::fs::write(
        &inp,
        lines(&[
            json!({"custom_id": "c1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Once upon", "seed": 1}}),
            json!({"custom_id": "c2", "method": "POST", "url": "/v1/embeddings", "body": {}}),
        ]),
    )
    .unwrap();
    let out = dir.path().join("out.csv");
    let (code, err) = batch(&inp, &out, &[]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<csv::StringRecord> = csv::Reader::from_path(&out)
        .unwrap()
        .records()
        .map(Result::unwrap)
        .collect();
    assert_eq!(&rows[0][0], "c1");
    assert_eq!(&rows[0][3], "length");
    assert_eq!(&rows[0][5], "2");
    assert_eq!(&rows[1][3], "error");
    assert!(rows[1][6].contains("unsupported `url`"), "{:?}", rows[1]);
}

// ---- point 13: special tokens in the text ----

/// A model that answers by lookup: after token `a` comes `next(a)`, whatever else is in the
/// context (greedy sampling picks it). Lets a test make the engine emit any token it likes.
struct Scripted {
    cfg: LlamaConfig,
    script: Vec<(u32, u32)>,
    fallback: u32,
}

impl ModelRunner for Scripted {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }
    fn kv_shape(&self) -> KvShape {
        KvShape {
            n_layers: 1,
            num_blocks: 64,
            block_size: 16,
            n_kv_heads: 1,
            head_dim: 1,
        }
    }
    fn backend_name(&self) -> String {
        "scripted".into()
    }
    fn forward(&mut self, step: &StepInput) -> Result<Vec<f32>, ModelError> {
        let v = self.cfg.vocab_size;
        let mut out = vec![0.0f32; step.logit_rows.len() * v];
        for (r, &row) in step.logit_rows.iter().enumerate() {
            let last = step.tokens[row];
            let next = self
                .script
                .iter()
                .find(|(a, _)| *a == last)
                .map_or(self.fallback, |(_, b)| *b);
            out[r * v + next as usize] = 10.0;
        }
        Ok(out)
    }
}

#[test]
fn special_tokens_are_left_out_of_the_text_unless_kept() {
    let tok = common::tokenizer();
    let reserved = tok.special_id("<|reserved_special_token_163|>").unwrap();
    let hello = tok.encode("Hello", false, false);
    let world = tok.encode(" world", false, false);
    assert_eq!((hello.len(), world.len()), (1, 1));
    let (hello, world) = (hello[0], world[0]);
    // "I", then the script: Hello, a reserved special token, " world", end of turn.
    let prompt = vec![tok.bos_id(), 40];
    let script = vec![
        (40, hello),
        (hello, reserved),
        (reserved, world),
        (world, tok.eot_id()),
    ];
    let run = |params: SamplingParams| {
        let model = Scripted {
            cfg: LlamaConfig::preset("tiny").unwrap(),
            script: script.clone(),
            fallback: tok.eot_id(),
        };
        let mut engine = Engine::new(Box::new(model), tok.clone(), EngineConfig::default());
        let id = engine.add_request(prompt.clone(), params).unwrap();
        let mut streamed = String::new();
        loop {
            for ev in engine.step().unwrap() {
                match ev {
                    Event::Token { id: r, text, .. } if r == id => streamed.push_str(&text),
                    Event::Finished(out) => return (out, streamed),
                    _ => {}
                }
            }
        }
    };
    let greedy = SamplingParams {
        temperature: 0.0,
        max_tokens: 10,
        ..SamplingParams::default()
    };
    // The default, in every mode (batch, generate, chat, the worker): skipped.
    let (out, streamed) = run(greedy.clone());
    assert_eq!(out.token_ids, [hello, reserved, world, tok.eot_id()]);
    assert_eq!(out.text, "Hello world");
    assert_eq!(streamed, out.text);
    // Kept on request: the token ids are the same, the text shows it.
    let (kept, streamed) = run(SamplingParams {
        skip_special_tokens: false,
        ..greedy
    });
    assert_eq!(kept.token_ids, out.token_ids);
    assert_eq!(kept.text, "Hello<|reserved_special_token_163|> world");
    assert_eq!(streamed, kept.text);
}

#[test]
fn every_mode_skips_special_tokens_by_default_and_the_flag_keeps_them() {
    use clap::Parser;
    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        s: herd::modes::SamplingArgs,
    }
    let skip = |argv: &[&str]| {
        Args::parse_from(argv)
            .s
            .params(0.6, 0.9, 0)
            .skip_special_tokens
    };
    assert!(skip(&["x"]));
    assert!(!skip(&["x", "--keep-special-tokens"]));
    // The AIME worker's jobs take the engine's default.
    let tok = common::tokenizer();
    let job = herd::modes::worker::job::parse_job(
        &json!({"job_id": "j", "text_context": "Hi"}),
        &tok,
        512,
    )
    .unwrap();
    assert!(job.params.skip_special_tokens);
}

/// End to end on random:tiny, whose noise holds reserved special tokens at temperature 1
/// (seed 8: one at the 60th token).
#[test]
fn generate_and_batch_text_leave_out_the_special_tokens_the_ids_keep() {
    let tok = common::tokenizer();
    let gen = |extra: &[&str]| -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_herd"))
            .env("RUST_LOG", "warn")
            .args(["generate", "--model", "random:tiny", "--prompt", "Hello"])
            .args([
                "--max-tokens",
                "64",
                "--seed",
                "8",
                "--temperature",
                "1",
                "--json",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let ids = |r: &Value| -> Vec<u32> { common::ids(&r["token_ids"]) };
    let skipped = gen(&[]);
    let specials: Vec<u32> = ids(&skipped)
        .into_iter()
        .filter(|&i| tok.is_special(i))
        .collect();
    assert!(!specials.is_empty(), "the premise: specials were generated");
    let plain: Vec<u32> = ids(&skipped)
        .into_iter()
        .filter(|&i| !tok.is_special(i))
        .collect();
    assert_eq!(skipped["text"], tok.decode(&plain));
    let kept = gen(&["--keep-special-tokens"]);
    assert_eq!(kept["token_ids"], skipped["token_ids"]);
    assert_eq!(kept["text"], tok.decode(&ids(&kept)));
    assert!(kept["text"]
        .as_str()
        .unwrap()
        .contains("<|reserved_special_token_"));
    // Batch: the same request, the same rule.
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.jsonl");
    std::fs::write(
        &inp,
        lines(&[json!({"prompt": "Hello", "max_tokens": 64, "seed": 8, "temperature": 1})]),
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    let (code, err) = batch(&inp, &out, &[]);
    assert_eq!(code, 0, "{err}");
    let rec = &jsonl(&out)[0];
    assert_eq!(rec["token_ids"], skipped["token_ids"]);
    assert_eq!(rec["text"], skipped["text"]);
}

#[test]
fn batch_records_choose_and_the_flag_keeps_special_tokens() {
    // Through the binary: a record's `skip_special_tokens` and --keep-special-tokens reach
    // the engine (the resume state names the setting, so a rerun with the other is refused).
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.jsonl");
    std::fs::write(&inp, lines(&[json!({"prompt": "Hi", "seed": 1})])).unwrap();
    let out = dir.path().join("out.jsonl");
    assert_eq!(batch(&inp, &out, &[]).0, 0);
    let (code, err) = batch(&inp, &out, &["--keep-special-tokens"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("skip_special_tokens: was true, now false"),
        "{err}"
    );
}

// ---- point 10 (records): ignored inputs ----

#[test]
fn unknown_herd_fields_are_counted_once_and_strict_makes_them_errors() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.jsonl");
    let mut recs: Vec<Value> = (0..12)
        .map(|i| json!({"prompt": format!("p{i}"), "temprature": 0.2, "seed": i}))
        .collect();
    recs.push(json!({"prompt": "fine", "seed": 99, "metadata": {"temprature": 1}}));
    recs.push(json!({"prompt": "null is unset", "colour": null}));
    std::fs::write(&inp, lines(&recs)).unwrap();
    let out = dir.path().join("out.jsonl");
    let (code, err) = batch(&inp, &out, &[]);
    assert_eq!(code, 0, "{err}");
    let warned: Vec<&str> = err.lines().filter(|l| l.contains("temprature")).collect();
    assert_eq!(warned.len(), 1, "{err}");
    assert!(
        warned[0].contains(
            "12 records had unknown field `temprature` (ignored); --strict makes them errors"
        ),
        "{err}"
    );
    assert!(!err.contains("colour"), "{err}");
    assert!(jsonl(&out).iter().all(|r| r.get("error").is_none()));
    // --strict: the same records are error records, naming the field and the line.
    let out2 = dir.path().join("strict.jsonl");
    let (code, err) = batch(&inp, &out2, &["--strict"]);
    assert_eq!(code, 0, "{err}");
    let got = jsonl(&out2);
    assert_eq!(got.len(), 14);
    assert_eq!(
        got[3]["error"],
        "line 4: unknown field `temprature` (--strict)"
    );
    assert!(got[12].get("error").is_none() && got[13].get("error").is_none());
    assert!(err.contains("14 records (12 errors)"), "{err}");
}

#[test]
fn openai_fields_herd_does_not_implement_are_warned_or_strict_errors() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.jsonl");
    let req = |id: &str, extra: Value| {
        let mut body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "seed": 1});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body})
    };
    std::fs::write(
        &inp,
        lines(&[
            req("a", json!({"frequency_penalty": 0.5, "logit_bias": {"50256": -100}})),
            req("b", json!({"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "n": 1, "user": "u1"})),
            req("c", json!({"response_format": {"type": "json_object"}})),
            req("d", json!({"best_of": 3, "temprature": 1})),
        ]),
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    let (code, err) = batch(&inp, &out, &["--served-model-name", "llama-tiny"]);
    assert_eq!(code, 0, "{err}");
    for want in [
        "1 record set `frequency_penalty`, which herd does not implement (ignored); --strict makes them errors",
        "1 record set `logit_bias`, which herd does not implement (ignored)",
        "1 record set `best_of`, which herd does not implement (ignored)",
        "1 record had unknown field `body.temprature` (ignored)",
        "4 records named model `gpt-4o-mini`; answered by `llama-tiny`",
    ] {
        assert_eq!(err.matches(want).count(), 1, "{want}\n{err}");
    }
    // Neutral values (a penalty of 0, no bias, n 1) change nothing and are not reported.
    assert!(
        !err.contains("presence_penalty") && !err.contains("`user`"),
        "{err}"
    );
    let recs = jsonl(&out);
    for r in &recs {
        assert_eq!(r["response"]["status_code"], 200, "{r}");
        assert_eq!(r["response"]["body"]["model"], "llama-tiny");
    }
    let out2 = dir.path().join("strict.jsonl");
    let (code, err) = batch(&inp, &out2, &["--strict"]);
    assert_eq!(code, 0, "{err}");
    let recs = jsonl(&out2);
    let status: Vec<u64> = recs
        .iter()
        .map(|r| r["response"]["status_code"].as_u64().unwrap())
        .collect();
    // response_format is implemented (tests/structured.rs): no longer a note.
    assert_eq!(status, [400, 200, 200, 400]);
    let msg = recs[0]["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("`frequency_penalty` is not implemented")
            && msg.contains("`logit_bias` is not implemented"),
        "{msg}"
    );
    // The model name never fails a record; the default name is the model's.
    assert_eq!(recs[1]["response"]["body"]["model"], "random:tiny");
}

#[test]
fn logprobs_with_a_csv_output_are_warned_or_strict_errors() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.jsonl");
    std::fs::write(
        &inp,
        lines(&[
            json!({"prompt": "a", "logprobs": 2}),
            json!({"prompt": "b", "prompt_logprobs": true}),
            json!({"prompt": "c"}),
        ]),
    )
    .unwrap();
    let (code, err) = batch(&inp, &dir.path().join("out.csv"), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("2 records asked for log-probs, which a CSV output has no column for"),
        "{err}"
    );
    // A JSONL output holds them: nothing to say.
    let (code, err) = batch(&inp, &dir.path().join("out.jsonl"), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("log-probs"), "{err}");
    let out = dir.path().join("strict.csv");
    let (code, err) = batch(&inp, &out, &["--strict"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<csv::StringRecord> = csv::Reader::from_path(&out)
        .unwrap()
        .records()
        .map(Result::unwrap)
        .collect();
    let reasons: Vec<&str> = rows.iter().map(|r| &r[3]).collect();
    assert_eq!(reasons, ["error", "error", "length"]);
}
