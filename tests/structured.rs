//! Structured outputs on random:tiny (random weights: only the constraint makes an output valid),
//! checked by validators nobody here wrote: the `jsonschema` crate and the `regex` crate.

mod common;

use std::sync::Arc;

use herd::engine::constraint::{ConstraintKind, ConstraintSpec};
use herd::engine::{EngineConfig, FinishReason, RequestOutput, SamplingParams};
use serde_json::{json, Value};

fn spec(kind: ConstraintKind) -> Option<Arc<ConstraintSpec>> {
    Some(Arc::new(ConstraintSpec::new("test", kind)))
}

fn params(seed: u64, max_tokens: usize, c: Option<Arc<ConstraintSpec>>) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        max_tokens,
        constraint: c,
        ..Default::default()
    }
}

/// Run every (prompt, params) on one engine; outputs in request order.
fn run(reqs: &[(&str, SamplingParams)], batch: usize) -> Vec<RequestOutput> {
    run_with_blocks(reqs, batch, 512).0
}

/// The same with a KV pool of `blocks` blocks of 16 tokens; also the preemption count.
fn run_with_blocks(
    reqs: &[(&str, SamplingParams)],
    batch: usize,
    blocks: usize,
) -> (Vec<RequestOutput>, u64) {
    let cfg = EngineConfig {
        max_batch_size: batch,
        ..Default::default()
    };
    let mut e = common::engine("random:tiny", cfg, blocks, 16);
    let tok = e.tokenizer().clone();
    let ids: Vec<u64> = reqs
        .iter()
        .map(|(p, sp)| {
            e.add_request(tok.encode(p, true, false), sp.clone())
                .unwrap_or_else(|err| panic!("{err}"))
        })
        .collect();
    let mut done = e.run_to_completion().unwrap();
    done.sort_by_key(|o| ids.iter().position(|&i| i == o.id));
    (done, e.stats().preemptions)
}

fn schemas() -> Vec<Value> {
    vec![
        json!({"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "ok": {"type": "boolean"}},
            "required": ["name", "age", "ok"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "point": {"type": "object", "properties": {
                "x": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.25},
                "y": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["x", "y"], "additionalProperties": false}},
            "required": ["color", "point"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
            "items": {"type": "array", "maxItems": 3, "items": {
                "type": "object", "properties": {
                    "id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
                "required": ["id", "qty"], "additionalProperties": false}}},
            "required": ["items"], "additionalProperties": false}),
    ]
}

#[test]
fn json_schema_outputs_validate_and_stop_at_temperature_one() {
    let reqs: Vec<(&str, SamplingParams)> = schemas()
        .into_iter()
        .enumerate()
        .flat_map(|(i, s)| {
            (0..4).map(move |k| {
                (
                    "Give me JSON:",
                    params(
                        100 * i as u64 + k,
                        400,
                        spec(ConstraintKind::JsonSchema(s.clone())),
                    ),
                )
            })
        })
        .collect();
    let outs = run(&reqs, 16);
    for ((_, p), out) in reqs.iter().zip(&outs) {
        let ConstraintKind::JsonSchema(schema) = &p.constraint.as_ref().unwrap().kind else {
            unreachable!()
        };
        let v: Value = serde_json::from_str(&out.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", out.text));
        let validator = jsonschema::validator_for(schema).unwrap();
        let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{}: {errors:?}", out.text);
        assert_eq!(out.finish_reason, FinishReason::Stop, "{}", out.text);
    }
}

/// The whole text matches `re` (anchored), checked by the `regex` crate.
fn full_match(re: &str, text: &str) -> bool {
    regex::Regex::new(&format!("^(?:{re})$"))
        .unwrap()
        .is_match(text)
}

#[test]
fn regex_choice_and_grammar_outputs_match_and_stop() {
    let re = "[A-Z]{3}-[0-9]{2,4}( ok| fail)?";
    let choices = vec![
        "yes".to_string(),
        "no".into(),
        "maybe later".into(),
        "{\"a\"}".into(),
    ];
    let lark = r#"start: "(" expr ")"
expr: NUM | NUM "+" NUM
NUM: /[0-9]{1,3}/"#;
    let mut reqs = Vec::new();
    for k in 0..6 {
        reqs.push((
            "Code:",
            params(k, 64, spec(ConstraintKind::Regex(re.into()))),
        ));
        reqs.push((
            "Answer:",
            params(k, 64, spec(ConstraintKind::Choice(choices.clone()))),
        ));
        reqs.push((
            "Sum:",
            params(k, 64, spec(ConstraintKind::Lark(lark.into()))),
        ));
    }
    let outs = run(&reqs, 32);
    let mut seen = std::collections::HashSet::new();
    for ((_, p), out) in reqs.iter().zip(&outs) {
        assert_eq!(out.finish_reason, FinishReason::Stop, "{:?}", out.text);
        match &p.constraint.as_ref().unwrap().kind {
            ConstraintKind::Regex(r) => assert!(full_match(r, &out.text), "{:?}", out.text),
            ConstraintKind::Choice(c) => {
                assert!(c.contains(&out.text), "{:?}", out.text);
                seen.insert(out.text.clone());
            }
            ConstraintKind::Lark(_) => assert!(
                full_match(r"\([0-9]{1,3}(\+[0-9]{1,3})?\)", &out.text),
                "{:?}",
                out.text
            ),
            _ => unreachable!(),
        }
    }
    // Temperature 1 over random logits: the choice is sampled, not always the same.
    assert!(seen.len() > 1, "{seen:?}");
}

#[test]
fn json_whitespace_is_bounded_by_default() {
    // Any object: unbounded in size, so it may end at max_tokens; whitespace is the point here.
    let reqs: Vec<(&str, SamplingParams)> = (0..6)
        .map(|k| ("JSON:", params(k, 48, spec(ConstraintKind::JsonObject))))
        .collect();
    for out in run(&reqs, 8) {
        assert!(out.text.starts_with('{'), "{:?}", out.text);
        // Outside strings only ", " and ": " carry a space; a random model never gets a newline,
        // a tab or a run of spaces in (strings escape control characters).
        assert!(
            !out.text.contains('\n') && !out.text.contains('\t'),
            "{:?}",
            out.text
        );
        if out.finish_reason == FinishReason::Stop {
            let v: Value = serde_json::from_str(&out.text).unwrap();
            assert!(v.is_object());
        }
    }
}

#[test]
fn seeded_runs_are_reproducible_and_batch_invariant() {
    let s = schemas();
    let reqs: Vec<(&str, SamplingParams)> = (0..8)
        .map(|k| {
            let c = match k % 3 {
                0 => spec(ConstraintKind::JsonSchema(s[k as usize % s.len()].clone())),
                1 => spec(ConstraintKind::Regex(
                    "[a-z]{2,9}@[a-z]{3,6}\\.(com|org)".into(),
                )),
                _ => None,
            };
            ("Hello", params(7 + k, 40, c))
        })
        .collect();
    let one = run(&reqs, 1);
    let many = run(&reqs, 16);
    let again = run(&reqs, 16);
    // 4 blocks of 16 tokens for 8 sequences of up to 42: some are preempted and recomputed,
    // keeping their matchers.
    let (preempted, n) = run_with_blocks(&reqs, 16, 4);
    assert!(n > 0, "no preemption");
    for (a, d) in one.iter().zip(&preempted) {
        assert_eq!(
            a.token_ids, d.token_ids,
            "preemption changed a structured output"
        );
    }
    for ((a, b), c) in one.iter().zip(&many).zip(&again) {
        assert_eq!(
            a.token_ids, b.token_ids,
            "batch size changed a structured output"
        );
        assert_eq!(
            b.token_ids, c.token_ids,
            "a seeded structured run is not reproducible"
        );
        assert_eq!(a.text, b.text);
    }
}

#[test]
fn logprobs_are_the_raw_distribution() {
    let c = spec(ConstraintKind::Choice(vec!["yes".into(), "no".into()]));
    let mut p = params(3, 8, c.clone());
    p.logprobs = Some(5);
    let mut free = params(3, 1, None);
    free.logprobs = Some(5);
    let outs = run(&[("Yes or no?", p), ("Yes or no?", free)], 4);
    let lp = &outs[0].logprobs.as_ref().unwrap()[0];
    let raw = &outs[1].logprobs.as_ref().unwrap()[0];
    // Same row, same top alternatives: the mask changed the pick, not the reported distribution.
    assert_eq!(lp.top, raw.top);
    let chosen = lp.token_id;
    assert!(
        ["yes", "no"].contains(&outs[0].text.as_str()),
        "{}",
        outs[0].text
    );
    // The chosen token's log-prob is its raw one: below the top token's unless it is the top.
    if lp.top[0].0 != chosen {
        assert!(lp.logprob < lp.top[0].1);
    }
}

#[test]
fn bad_constraints_are_refused_naming_the_field() {
    let mut e = common::engine("random:tiny", EngineConfig::default(), 64, 16);
    let bad = [
        ConstraintKind::JsonSchema(json!({"type": "object", "properties": {"a": {"type": "wat"}}})),
        ConstraintKind::Regex("[a-".into()),
        ConstraintKind::Lark("start: undefined_rule".into()),
        ConstraintKind::JsonSchema(json!(17)),
    ];
    for k in bad {
        let p = SamplingParams {
            constraint: Some(Arc::new(ConstraintSpec::new("response_format", k))),
            ..Default::default()
        };
        let err = e
            .add_request(vec![128000, 9906], p)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("response_format: "), "{err}");
    }
    // The engine goes on: a good request still runs.
    let ok = params(1, 8, spec(ConstraintKind::Regex("[0-9]{3}".into())));
    e.add_request(vec![128000, 9906], ok).unwrap();
    let out = e.run_to_completion().unwrap();
    assert!(full_match("[0-9]{3}", &out[0].text), "{}", out[0].text);
}

fn write_lines(path: &std::path::Path, values: &[Value]) {
    let s: String = values.iter().map(|v| v.to_string() + "\n").collect();
    std::fs::write(path, s).unwrap();
}

#[test]
fn batch_files_take_every_spelling_and_bad_lines_become_error_records() {
    let dir = tempfile::tempdir().unwrap();
    let schema = schemas().remove(0);
    let inp = dir.path().join("in.jsonl");
    write_lines(
        &inp,
        &[
            json!({"id": "rf", "prompt": "x", "seed": 1, "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema, "strict": true}}}),
            json!({"id": "so", "prompt": "x", "seed": 2, "structured_outputs": {"regex": "[a-f]{4}"}}),
            json!({"id": "gc", "prompt": "x", "seed": 3, "guided_choice": ["alpha", "beta"]}),
            json!({"id": "gj", "prompt": "x", "seed": 4, "guided_json": schema}),
            json!({"id": "bad-schema", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}}}),
            json!({"id": "bad-regex", "prompt": "x", "guided_regex": "(unclosed"}),
            json!({"id": "bad-grammar", "prompt": "x", "structured_outputs": {"grammar": "start: nope"}}),
            json!({"id": "two", "prompt": "x", "guided_regex": "a", "guided_choice": ["b"]}),
            json!({"id": "after", "prompt": "x", "seed": 5, "structured_outputs": {"choice": ["ok"]}}),
        ],
    );
    let out = dir.path().join("out.jsonl");
    let (code, _, err) = common::run_herd(&[
        "batch",
        "--model",
        "random:tiny",
        "--temperature",
        "1",
        "--max-tokens",
        "200",
        "--input",
        inp.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let recs = common::jsonl(&out);
    let by_id = |id: &str| {
        recs.iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("{id}"))
    };
    let validator = jsonschema::validator_for(&schema).unwrap();
    for id in ["rf", "gj"] {
        let r = by_id(id);
        assert_eq!(r["finish_reason"], "stop", "{r}");
        let v: Value = serde_json::from_str(r["text"].as_str().unwrap()).unwrap();
        assert!(validator.is_valid(&v), "{r}");
    }
    assert!(full_match(
        "[a-f]{4}",
        by_id("so")["text"].as_str().unwrap()
    ));
    assert!(["alpha", "beta"].contains(&by_id("gc")["text"].as_str().unwrap()));
    assert_eq!(by_id("after")["text"], "ok");
    for (id, line, field) in [
        ("bad-schema", 5, "response_format: "),
        ("bad-regex", 6, "guided_regex: "),
        ("bad-grammar", 7, "structured_outputs: "),
        ("two", 8, "guided_regex: give one structured-output field"),
    ] {
        let r = by_id(id);
        let msg = r["error"].as_str().unwrap_or_else(|| panic!("{r}"));
        assert!(msg.starts_with(&format!("line {line}: {field}")), "{msg}");
        eprintln!("{msg}");
    }
    // OpenAI batch bodies: response_format json_object and a bad one.
    let oai = dir.path().join("oai.jsonl");
    let req = |id: &str, extra: Value| {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "seed": 9, "max_tokens": 64});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body})
    };
    write_lines(
        &oai,
        &[
            req(
                "a",
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}}),
            ),
            req("b", json!({"response_format": {"type": "xml"}})),
            req(
                "c",
                json!({"structured_outputs": {"choice": ["red", "green"]}}),
            ),
        ],
    );
    let out2 = dir.path().join("oai-out.jsonl");
    let (code, _, err) = common::run_herd(&[
        "batch",
        "--model",
        "random:tiny",
        "--temperature",
        "1",
        "--strict",
        "--input",
        oai.to_str().unwrap(),
        "--output",
        out2.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let recs = common::jsonl(&out2);
    let text = |i: usize| {
        recs[i]["response"]["body"]["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let v: Value = serde_json::from_str(&text(0)).unwrap();
    assert!(validator.is_valid(&v), "{v}");
    assert_eq!(
        recs[0]["response"]["body"]["choices"][0]["finish_reason"],
        "stop"
    );
    assert_eq!(recs[1]["response"]["status_code"], 400);
    let msg = recs[1]["error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("line 2: response_format: type \"xml\""),
        "{msg}"
    );
    assert!(["red", "green"].contains(&text(2).as_str()), "{}", text(2));
}

#[test]
fn generate_flags_constrain_and_bad_ones_exit_2() {
    let (code, out, err) = common::run_herd(&[
        "generate",
        "--model",
        "random:tiny",
        "--prompt",
        "Hi",
        "--temperature",
        "1",
        "--seed",
        "4",
        "--regex",
        "[0-9]{4}-[0-9]{2}",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let rec: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(
        full_match("[0-9]{4}-[0-9]{2}", rec["text"].as_str().unwrap()),
        "{rec}"
    );
    assert_eq!(rec["finish_reason"], "stop");
    let (code, out, err) = common::run_herd(&[
        "generate",
        "--model",
        "random:tiny",
        "--prompt",
        "Hi",
        "--temperature",
        "1",
        "--choice",
        "left",
        "--choice",
        "right",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let rec: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(
        ["left", "right"].contains(&rec["text"].as_str().unwrap()),
        "{rec}"
    );
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("s.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"a": {"type": "wat"}}}"#,
    )
    .unwrap();
    let (code, _, err) = common::run_herd(&[
        "generate",
        "--model",
        "random:tiny",
        "--prompt",
        "Hi",
        "--json-schema",
        schema.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--json-schema: "), "{err}");
    let (code, _, err) = common::run_herd(&[
        "generate",
        "--model",
        "random:tiny",
        "--prompt",
        "Hi",
        "--regex",
        "a",
        "--json-object",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("give one structured-output flag"), "{err}");
}

/// The cost of structured outputs: mask compute time per token and decode throughput with and
/// without a JSON-schema constraint, appended to results/structured-cpu.csv. Run on purpose:
/// `HERD_BENCH_MODEL=random:tiny HERD_MACHINE="..." cargo test --test structured -- --ignored`.
#[test]
#[ignore]
fn bench_mask_cost_and_throughput() {
    let model = std::env::var("HERD_BENCH_MODEL").unwrap_or_else(|_| "random:tiny".into());
    let machine = std::env::var("HERD_MACHINE").unwrap_or_else(|_| "unnamed".into());
    let gen: usize = std::env::var("HERD_BENCH_TOKENS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    // A free-text field keeps a random model going (it rarely closes the string), so both runs
    // generate about as many tokens; every token is still masked.
    let schema = json!({"type": "object", "properties": {
        "answer": {"type": "string"}, "score": {"type": "integer"}},
        "required": ["answer", "score"], "additionalProperties": false});
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results/structured-cpu.csv");
    let new = !path.exists();
    let mut csv = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    use std::io::Write;
    if new {
        writeln!(csv, "machine,build,model,batch,gen_tokens,constraint,generated_tokens,wall_s,tokens_per_s,masks,mask_us_mean,throughput_vs_free,forced_tokens_skip_forward").unwrap();
    }
    let build = if cfg!(debug_assertions) {
        "test-profile"
    } else {
        "release"
    };
    for batch in [1usize, 16] {
        let mut free_tps = 0.0;
        // Free, constrained, free, constrained: the first run warms caches; rows for all four.
        for constrained in [false, true, false, true] {
            let cfg = EngineConfig {
                max_batch_size: batch,
                ..Default::default()
            };
            let mut e = common::engine(&model, cfg, 64 * batch.max(4), 16);
            let tok = e.tokenizer().clone();
            if constrained {
                // Build the trie and factory before the clock starts (once per model, ~0.5 s).
                let s = ConstraintSpec::new("bench", ConstraintKind::JsonSchema(schema.clone()));
                e.grammars().compile(&s).unwrap();
            }
            for k in 0..batch {
                let mut p = params(k as u64, gen, None);
                if constrained {
                    p.constraint = spec(ConstraintKind::JsonSchema(schema.clone()));
                } else {
                    p.ignore_eos = true;
                }
                e.add_request(tok.encode("Describe the weather as JSON:", true, false), p)
                    .unwrap();
            }
            let t0 = std::time::Instant::now();
            let outs = e.run_to_completion().unwrap();
            let wall = t0.elapsed().as_secs_f64();
            let n: usize = outs.iter().map(|o| o.token_ids.len()).sum();
            let tps = n as f64 / wall;
            let st = e.stats();
            let mask_us = if st.masks > 0 {
                st.mask_seconds / st.masks as f64 * 1e6
            } else {
                0.0
            };
            if !constrained {
                free_tps = tps;
            }
            writeln!(
                csv,
                "{machine},{build},{model},{batch},{gen},{},{n},{wall:.3},{tps:.1},{},{mask_us:.1},{:.3},yes",
                if constrained { "json_schema" } else { "none" },
                st.masks,
                tps / free_tps
            )
            .unwrap();
        }
    }
}

/// On the CUDA backend (the emulated device: the real kernels, run on the CPU) a constrained step
/// samples on the device: the masks go up once its forward is launched and the sampling kernel
/// applies them, so its decode steps replay the decode graph that ends at the logits (the host
/// path, logits copied back and masked there, runs no graph). The same flags, valid outputs.
#[test]
fn constraints_run_on_the_emulated_cuda_device() {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("s.json");
    std::fs::write(&schema, schemas()[2].to_string()).unwrap();
    let cases: [(&[&str], &str); 3] = [
        (&["--regex", "[0-9]{4}-[A-Z]{2}"], "regex"),
        (&["--choice", "north", "--choice", "south"], "choice"),
        (&["--json-schema", schema.to_str().unwrap()], "schema"),
    ];
    for (flags, what) in cases {
        let stats = dir.path().join(format!("stats-{what}.json"));
        let out = common::herd_on_emulated_device()
            .args([
                "generate",
                "--model",
                "random:tiny",
                "--device",
                "cuda",
                "--kv-cache-gb",
                "0.05",
                "--prompt",
                "Hi",
                "--temperature",
                "1",
                "--seed",
                "3",
                "--max-tokens",
                "200",
                "--json",
            ])
            .args(flags)
            .env("CUDA_EMU_STATS", &stats)
            .output()
            .expect("scripts/cuda-emu runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what}: {stderr}");
        let rec: Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: {e}: {stderr}"));
        let text = rec["text"].as_str().unwrap();
        assert_eq!(rec["finish_reason"], "stop", "{what}: {rec}");
        let calls: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
        // The regex's eight characters are eight one-token decode steps (the choice and this
        // schema are mostly grammar-forced: a few multi-token steps, too few for a graph; the
        // first step of a shape runs eagerly, the second is captured).
        if what == "regex" {
            let graphs = calls["calls"]["cuGraphLaunch"].as_u64().unwrap_or(0);
            assert!(graphs > 0, "{what}: no decode graph ran: {calls}");
        }
        match what {
            "regex" => assert!(full_match("[0-9]{4}-[A-Z]{2}", text), "{text}"),
            "choice" => assert!(["north", "south"].contains(&text), "{text}"),
            _ => {
                let v: Value = serde_json::from_str(text).unwrap();
                assert!(
                    jsonschema::validator_for(&schemas()[2])
                        .unwrap()
                        .is_valid(&v),
                    "{text}"
                );
            }
        }
    }
}

/// A batch of constrained records (schema, regex with log-probs, choice) beside an unconstrained
/// one on the emulated device: the decode graph that ends at the logits, replayed while the host
/// computes the masks, gives exactly the tokens and log-probs of eager steps (HERD_CUDA_GRAPHS=0).
#[test]
fn constrained_batches_replay_the_logits_graph_exactly_as_eager_steps() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let re = "[0-9]{3,6}-[A-Z]{2}";
    let mut recs = Vec::new();
    for i in 0..2 {
        recs.push(
            json!({"id": format!("s{i}"), "prompt": format!("Person {i}:"), "seed": 10 + i,
            "max_tokens": 60, "response_format": {"type": "json_schema",
                "json_schema": {"name": "p", "schema": schemas()[2]}}}),
        );
        recs.push(
            json!({"id": format!("r{i}"), "prompt": format!("Code {i}:"), "seed": 20 + i,
            "max_tokens": 20, "logprobs": 2, "structured_outputs": {"regex": re}}),
        );
    }
    recs.push(
        json!({"id": "c", "prompt": "Dir:", "seed": 30, "max_tokens": 8,
        "guided_choice": ["north", "south", "east"]}),
    );
    recs.push(json!({"id": "free", "prompt": "Hello", "seed": 5, "max_tokens": 12}));
    write_lines(&input, &recs);
    let run = |tag: &str, graphs: &str| {
        let out = dir.path().join(format!("out-{tag}.jsonl"));
        let stats = dir.path().join(format!("stats-{tag}.json"));
        let o = common::herd_on_emulated_device()
            .args(["batch", "--model", "random:tiny", "--device", "cuda"])
            .args([
                "--kv-cache-gb",
                "0.05",
                "--max-batch-size",
                "8",
                "--temperature",
                "1",
            ])
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&out)
            .env("HERD_CUDA_GRAPHS", graphs)
            .env("CUDA_EMU_STATS", &stats)
            .output()
            .expect("scripts/cuda-emu runs");
        assert!(
            o.status.success(),
            "{tag}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let calls: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
        let graphs = calls["calls"]["cuGraphLaunch"].as_u64().unwrap_or(0);
        let recs: Vec<Value> = common::jsonl(&out)
            .into_iter()
            .map(|r| {
                json!({"id": r["id"], "token_ids": r["token_ids"], "logprobs": r["logprobs"],
                       "text": r["text"], "finish_reason": r["finish_reason"]})
            })
            .collect();
        (recs, graphs)
    };
    let (eager, eager_graphs) = run("eager", "0");
    let (graph, graph_launches) = run("graph", "1");
    assert_eq!(eager_graphs, 0);
    assert!(graph_launches > 0, "no decode step replayed a graph");
    assert_eq!(graph, eager, "graph replay differs from eager steps");
    assert_eq!(graph.len(), 6);
    for r in &graph {
        let id = r["id"].as_str().unwrap();
        let text = r["text"].as_str().unwrap();
        if id.starts_with('r') {
            assert!(full_match(re, text), "{id}: {text}");
            assert_eq!(r["finish_reason"], "stop", "{r}");
        } else if id == "c" {
            assert!(["north", "south", "east"].contains(&text), "{text}");
        }
    }
}

/// The driver calls of a constrained `herd generate` of `tokens` tokens on the emulated device.
fn constrained_calls(dir: &std::path::Path, tokens: usize) -> Value {
    let stats = dir.join(format!("stats-{tokens}.json"));
    let out = common::herd_on_emulated_device()
        .args([
            "generate",
            "--model",
            "random:tiny",
            "--device",
            "cuda",
            "--kv-cache-gb",
            "0.05",
            "--prompt",
            "Hi",
            "--temperature",
            "1",
            "--seed",
            "5",
            "--regex",
            "[0-9]{200}",
            "--max-tokens",
            &tokens.to_string(),
            "--json",
        ])
        .env("CUDA_EMU_STATS", &stats)
        .output()
        .expect("scripts/cuda-emu runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let rec: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(rec["finish_reason"], "length", "{rec}");
    assert_eq!(rec["usage"]["completion_tokens"], tokens, "{rec}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    v["calls"].clone()
}

/// A constrained decode step on the device overlaps its masks with its forward: the forward is
/// the decode graph without its sampling (one launch, queued before the masks are computed on
/// the host), then one more upload (the sampling rows and masks, from pinned memory), the
/// sampling kernel, and the one download (tokens, not logits). Nothing allocated, no event.
/// Counted as the difference between a 40-token and a 16-token run of a regex with no forced
/// token (every step is one decode step). EMULATED: counts, not timings.
#[test]
fn a_constrained_decode_step_is_one_graph_launch_one_sampling_kernel_two_uploads_one_download() {
    let dir = tempfile::tempdir().unwrap();
    let short = constrained_calls(dir.path(), 16);
    let long = constrained_calls(dir.path(), 40);
    let per = |names: &[&str]| {
        names
            .iter()
            .map(|n| long[n].as_u64().unwrap_or(0) as i64 - short[n].as_u64().unwrap_or(0) as i64)
            .sum::<i64>()
    };
    let report = format!("16 tokens: {short}\n40 tokens: {long}");
    let steps = 24;
    assert_eq!(per(&["cuGraphLaunch"]), steps, "{report}");
    assert_eq!(per(&["cuLaunchKernel"]), steps, "{report}");
    assert_eq!(per(&["cublasLtMatmul"]), 0, "{report}");
    assert_eq!(
        per(&["cuMemcpyHtoDAsync_v2", "cuMemcpyHtoD_v2"]),
        2 * steps,
        "{report}"
    );
    assert_eq!(
        per(&["cuMemcpyDtoHAsync_v2", "cuMemcpyDtoH_v2"]),
        steps,
        "{report}"
    );
    for alloc in [
        ["cuMemAllocAsync", "cuMemAlloc_v2"],
        ["cuMemFreeAsync", "cuMemFree_v2"],
        ["cuMemHostAlloc", "cuMemFreeHost"],
    ] {
        assert_eq!(per(&alloc), 0, "{alloc:?}\n{report}");
    }
    assert_eq!(per(&["cuEventCreate"]), 0, "{report}");
    assert_eq!(per(&["cublasLtMatmulAlgoGetHeuristic"]), 0, "{report}");
}

#[test]
fn chat_answers_follow_the_flags_and_a_bad_one_exits_2_before_the_first_message() {
    use std::io::Write;
    let chat = |flags: &[&str], input: &str| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_herd"))
            .args(["chat", "--model", "random:tiny", "--temperature", "1"])
            .args(flags)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = c.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = chat(&["--choice", "alpha", "--choice", "beta"], "hello\nagain\n");
    assert_eq!(code, 0, "{err}");
    let answers: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(answers.len(), 2, "{out}");
    assert!(
        answers.iter().all(|a| ["alpha", "beta"].contains(a)),
        "{out}"
    );
    let (code, out, err) = chat(&["--regex", "("], "hello\n");
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("--regex: "), "{err}");
}

#[test]
fn forced_tokens_skip_the_forward_and_logprobs_keep_one_entry_per_token() {
    let schema = schemas().remove(1);
    let c = spec(ConstraintKind::JsonSchema(schema.clone()));
    let mut e = common::engine("random:tiny", EngineConfig::default(), 64, 16);
    let tok = e.tokenizer().clone();
    e.add_request(tok.encode("JSON:", true, false), params(5, 200, c.clone()))
        .unwrap();
    let out = e.run_to_completion().unwrap().remove(0);
    let v: Value = serde_json::from_str(&out.text).unwrap();
    assert!(
        jsonschema::validator_for(&schema).unwrap().is_valid(&v),
        "{v}"
    );
    // The keys and punctuation are forced: far fewer forwards than tokens (one prefill step).
    let steps = e.stats().steps as usize;
    assert!(
        steps < out.token_ids.len(),
        "{steps} steps for {} tokens",
        out.token_ids.len()
    );
    // With log-probs every token is sampled (a forced one would have none): one entry each.
    let mut p = params(5, 200, c);
    p.logprobs = Some(2);
    e.add_request(tok.encode("JSON:", true, false), p).unwrap();
    let out2 = e.run_to_completion().unwrap().remove(0);
    assert_eq!(out2.logprobs.unwrap().len(), out2.token_ids.len());
}
