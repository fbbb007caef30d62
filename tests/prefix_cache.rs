//! Automatic prefix caching and n samples per prompt in the engine (CPU backend, random:tiny):
//! a request's result never depends on whether its prefix came from the cache, under batching,
//! chunked prefill and preemption; the pool never leaks a block.

mod common;

use common::*;
use herd::engine::{Engine, EngineConfig, RequestOutput, SamplingParams};

const MODEL: &str = "random:tiny";

/// A deterministic token stream (ids well inside the vocabulary, no stop tokens).
fn toks(seed: u64, n: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            1000 + (x % 50_000) as u32
        })
        .collect()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Records with shared prefixes (three "system prompts" of different lengths, one of them an
/// exact multiple of the block size), unshared ones, repeats, and mixed sampling settings.
fn requests() -> Vec<(Vec<u32>, SamplingParams, usize)> {
    let systems = [toks(1, 37), toks(2, 64), toks(3, 130)];
    let mut out = Vec::new();
    for i in 0..36u64 {
        let mut prompt = match i % 4 {
            3 => Vec::new(),
            k => systems[k as usize].clone(),
        };
        prompt.extend(toks(100 + i % 30, 3 + (i as usize * 7) % 23));
        let mut p = greedy(4 + (i as usize % 9));
        match i % 5 {
            1 => {
                p.temperature = 0.9;
                p.top_p = 0.95;
                p.top_k = 40;
                p.seed = Some(7 + i);
                p.logprobs = Some(2);
            }
            2 if i % 10 == 2 => p.prompt_logprobs = true,
            3 => {
                p.temperature = 1.0;
                p.seed = Some(1000 + i);
            }
            _ => {}
        }
        let n = if i % 7 == 6 { 3 } else { 1 };
        out.push((prompt, p, n));
    }
    out
}

fn engine_with(cache: bool, cfg: EngineConfig, blocks: usize, bs: usize) -> Engine {
    engine(
        MODEL,
        EngineConfig {
            prefix_cache: cache,
            ..cfg
        },
        blocks,
        bs,
    )
}

/// Run everything queued; outputs by id.
fn run(eng: &mut Engine) -> Vec<RequestOutput> {
    let mut outs = eng.run_to_completion().unwrap();
    outs.sort_by_key(|o| o.id);
    outs
}

/// The pool is idle and consistent: every block free or cached.
fn assert_no_leak(eng: &Engine, what: &str) {
    let p = eng.pool();
    p.check().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        p.free_count() + p.cached_count(),
        p.total(),
        "{what}: free + cached blocks must equal the pool size"
    );
}

fn assert_same(a: &[RequestOutput], b: &[RequestOutput], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: output count");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.token_ids, y.token_ids, "{what}: request {i} tokens");
        assert_eq!(x.text, y.text, "{what}: request {i} text");
        assert_eq!(
            x.finish_reason, y.finish_reason,
            "{what}: request {i} finish"
        );
        assert_eq!(x.logprobs, y.logprobs, "{what}: request {i} log-probs");
        assert_eq!(
            x.prompt_logprobs, y.prompt_logprobs,
            "{what}: request {i} prompt log-probs"
        );
    }
}

fn submit(eng: &mut Engine, reqs: &[(Vec<u32>, SamplingParams, usize)]) {
    for (p, s, n) in reqs {
        eng.add_request_n(p.clone(), s.clone(), *n).unwrap();
    }
}

#[test]
fn results_are_identical_with_and_without_the_cache() {
    let reqs = requests();
    let mut reference = engine_with(false, EngineConfig::default(), 256, 16);
    submit(&mut reference, &reqs);
    let want = run(&mut reference);
    assert_eq!(reference.stats().cached_prompt_tokens, 0);
    assert!(want.iter().all(|o| o.cached_tokens == 0));
    assert_no_leak(&reference, "no cache");

    let small = EngineConfig {
        max_batch_size: 5,
        max_batch_tokens: 40,
        prefill_chunk: 13,
        prefix_cache: true,
    };
    // 40 blocks of 8 = 320 positions: the longest request fits alone, not many together.
    for (what, cfg, blocks, bs) in [
        ("one batch", EngineConfig::default(), 256, 16),
        ("chunked prefill, small budget", small.clone(), 256, 16),
        ("tiny KV pool", EngineConfig::default(), 40, 8),
        ("tiny KV pool, small budget", small, 24, 8),
        ("block size 1", EngineConfig::default(), 2048, 1),
    ] {
        // (Without the cache these are the engine's batching invariants: tests/model_reference.)
        let mut eng = engine_with(true, cfg, blocks, bs);
        submit(&mut eng, &reqs);
        let got = run(&mut eng);
        assert_same(&got, &want, what);
        assert_no_leak(&eng, what);
        let st = eng.stats();
        assert!(
            st.cached_prompt_tokens > 0,
            "{what}: shared prefixes should hit"
        );
        if what.starts_with("tiny") {
            assert!(
                st.preemptions > 0,
                "{what}: the pool should force preemption"
            );
        }
        eprintln!(
            "{what}: prefill {} cached {} preemptions {} steps {}",
            st.prefill_tokens, st.cached_prompt_tokens, st.preemptions, st.steps
        );
    }
}

#[test]
fn a_second_identical_prompt_hits_every_full_block_but_the_last_token() {
    let mut eng = engine_with(true, EngineConfig::default(), 64, 16);
    // 40 tokens: 2 full blocks + 8; 48 tokens: 3 full blocks, the last one holds the last token.
    for len in [40usize, 48] {
        let prompt = toks(len as u64, len);
        eng.add_request(prompt.clone(), greedy(3)).unwrap();
        let first = run(&mut eng).remove(0);
        assert_eq!(first.cached_tokens, 0);
        eng.add_request(prompt, greedy(3)).unwrap();
        let second = run(&mut eng).remove(0);
        assert_eq!(second.cached_tokens, 32, "{len}-token prompt");
        assert_eq!(second.token_ids, first.token_ids);
        assert_no_leak(&eng, "sequential");
    }
    // The 48-token prompt computed 16 tokens the second time (its last block, for the last
    // token's logits): 40 + 8 + 48 + 16.
    assert_eq!(eng.stats().prefill_tokens, 40 + 8 + 48 + 16);
    assert_eq!(eng.stats().cached_prompt_tokens, 32 + 32);
}

#[test]
fn prompt_logprobs_requests_are_computed_in_full() {
    let mut eng = engine_with(true, EngineConfig::default(), 64, 16);
    let prompt = toks(9, 50);
    eng.add_request(prompt.clone(), greedy(2)).unwrap();
    run(&mut eng);
    let p = SamplingParams {
        prompt_logprobs: true,
        ..greedy(2)
    };
    eng.add_request(prompt.clone(), p.clone()).unwrap();
    let with = run(&mut eng).remove(0);
    assert_eq!(with.cached_tokens, 0, "prompt log-probs are never served");
    let mut plain = engine_with(false, EngineConfig::default(), 64, 16);
    plain.add_request(prompt, p).unwrap();
    let without = run(&mut plain).remove(0);
    assert_eq!(with.prompt_logprobs, without.prompt_logprobs);
    assert_eq!(with.prompt_logprobs.as_ref().map(Vec::len), Some(50));
    assert_no_leak(&eng, "prompt log-probs");
}

#[test]
fn blocks_being_written_are_waited_for_then_hit_from_the_next_step() {
    let mut eng = engine_with(true, EngineConfig::default(), 64, 16);
    let prompt = toks(5, 70); // 4 full blocks + 6
    let a = eng.add_request(prompt.clone(), greedy(2)).unwrap();
    let b = eng.add_request(prompt.clone(), greedy(2)).unwrap();
    eng.step().unwrap();
    // `b` did not compute the prefix `a` was writing in the same step: it waited.
    assert_eq!(eng.num_running(), 1);
    assert_eq!(eng.num_waiting(), 1);
    assert_eq!(eng.stats().prefill_tokens, 70);
    let mut outs = run(&mut eng);
    outs.sort_by_key(|o| o.id);
    assert_eq!((outs[0].id, outs[1].id), (a, b));
    assert_eq!(outs[0].cached_tokens, 0);
    // 4 blocks from the cache, 5 positions of the partial block copied from `a`'s; the last
    // prompt token computed.
    assert_eq!(outs[1].cached_tokens, 64 + 5);
    assert_eq!(eng.stats().prefill_tokens, 70 + 1);
    assert_eq!(outs[0].token_ids, outs[1].token_ids);
    assert_no_leak(&eng, "same step");
}

#[test]
fn a_preempted_request_hits_its_own_cached_blocks_when_resumed() {
    // 12 blocks of 4 = 48 positions; two 20-token prompts generating 14 tokens each cannot
    // both finish in the pool: one is preempted and comes back.
    let cfg = EngineConfig::default();
    let reqs: Vec<Vec<u32>> = (0..2).map(|i| toks(40 + i, 20)).collect();
    let mut want = Vec::new();
    for p in &reqs {
        let mut e = engine_with(false, cfg.clone(), 64, 4);
        e.add_request(p.clone(), greedy(14)).unwrap();
        want.push(run(&mut e).remove(0));
    }
    let mut eng = engine_with(true, cfg, 12, 4);
    for p in &reqs {
        eng.add_request(p.clone(), greedy(14)).unwrap();
    }
    let got = run(&mut eng);
    assert_same(&got, &want, "preempted");
    let st = eng.stats();
    assert!(st.preemptions > 0, "the pool should force preemption");
    assert!(
        st.cached_prompt_tokens > 0,
        "the resumed request should hit blocks it had written"
    );
    assert_no_leak(&eng, "preempted");
}

#[test]
fn n_samples_are_the_requests_with_seed_plus_i_and_share_the_prompt() {
    let prompt = toks(77, 45); // 2 full blocks of 16 + 13
    let p = SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        seed: Some(500),
        max_tokens: 12,
        ignore_eos: true,
        logprobs: Some(1),
        ..Default::default()
    };
    let mut eng = engine_with(true, EngineConfig::default(), 64, 16);
    let ids = eng.add_request_n(prompt.clone(), p.clone(), 4).unwrap();
    let outs = run(&mut eng);
    assert_eq!(outs.iter().map(|o| o.id).collect::<Vec<_>>(), ids);
    for (i, o) in outs.iter().enumerate() {
        let mut alone = engine_with(false, EngineConfig::default(), 64, 16);
        let single = SamplingParams {
            seed: Some(500 + i as u64),
            ..p.clone()
        };
        alone.add_request(prompt.clone(), single).unwrap();
        let a = run(&mut alone).remove(0);
        assert_same(std::slice::from_ref(o), &[a], &format!("sample {i}"));
        assert_eq!(o.cached_tokens, if i == 0 { 0 } else { 32 + 12 });
    }
    // The prompt's full blocks computed once; each other sample copies 12 positions of the
    // partial block and computes only the last prompt token.
    assert_eq!(eng.stats().prefill_tokens, 45 + 3);
    let distinct: std::collections::HashSet<_> = outs.iter().map(|o| &o.token_ids).collect();
    assert!(
        distinct.len() > 1,
        "different seeds should give different samples"
    );
    assert_no_leak(&eng, "n samples");
}

#[test]
fn n_samples_copy_the_partial_block_instead_of_computing_it() {
    // 40 tokens, blocks of 16: 2 full blocks + 8. Samples 1..3 take the full blocks from the
    // cache and a copy of sample 0's partial block (7 positions), computing only the last token.
    let prompt = toks(31, 40);
    let p = SamplingParams {
        temperature: 0.8,
        seed: Some(90),
        max_tokens: 10,
        ignore_eos: true,
        logprobs: Some(2),
        ..Default::default()
    };
    let mut eng = engine_with(true, EngineConfig::default(), 64, 16);
    eng.add_request_n(prompt.clone(), p.clone(), 4).unwrap();
    let got = run(&mut eng);
    assert_eq!(
        eng.stats().prefill_tokens,
        40 + 3,
        "40 + 3 x 1, not 40 + 3 x 8"
    );
    assert_eq!(eng.stats().cached_prompt_tokens, 3 * (32 + 7));
    assert_eq!(eng.stats().copied_blocks, 3);
    let mut plain = engine_with(false, EngineConfig::default(), 64, 16);
    plain.add_request_n(prompt, p, 4).unwrap();
    let want = run(&mut plain);
    assert_eq!(plain.stats().prefill_tokens, 4 * 40);
    assert_same(&got, &want, "copied partial block");
    assert_no_leak(&eng, "copy on write");
    assert_no_leak(&plain, "no cache");
}

#[test]
fn n_samples_under_preemption_in_a_tiny_pool_are_unchanged() {
    // n > 1 of prompts whose last block is partial (and one that is one token past a block),
    // in a pool too small for all samples at once: samples are preempted and resumed, copying
    // from whichever sample still runs.
    let reqs: Vec<(Vec<u32>, SamplingParams, usize)> =
        [(21usize, 3usize), (17, 4), (30, 2), (9, 3)]
            .iter()
            .enumerate()
            .map(|(i, &(len, n))| {
                let p = SamplingParams {
                    temperature: 1.0,
                    seed: Some(300 + i as u64),
                    max_tokens: 18,
                    ignore_eos: true,
                    logprobs: Some(1),
                    ..Default::default()
                };
                (toks(60 + i as u64, len), p, n)
            })
            .collect();
    let mut reference = engine_with(false, EngineConfig::default(), 256, 8);
    submit(&mut reference, &reqs);
    let want = run(&mut reference);
    for (what, cfg, blocks) in [
        ("tiny pool", EngineConfig::default(), 14),
        (
            "tiny pool, small budget",
            EngineConfig {
                max_batch_size: 8,
                max_batch_tokens: 32,
                prefill_chunk: 9,
                prefix_cache: true,
            },
            16,
        ),
    ] {
        let mut eng = engine_with(true, cfg, blocks, 8);
        submit(&mut eng, &reqs);
        let got = run(&mut eng);
        assert_same(&got, &want, what);
        let st = eng.stats();
        assert!(
            st.preemptions > 0,
            "{what}: the pool should force preemption"
        );
        assert!(
            st.copied_blocks > 0,
            "{what}: samples should copy partial blocks"
        );
        eprintln!(
            "{what}: prefill {} (no cache {}) cached {} copied blocks {} preemptions {}",
            st.prefill_tokens,
            reference.stats().prefill_tokens,
            st.cached_prompt_tokens,
            st.copied_blocks,
            st.preemptions
        );
        assert_no_leak(&eng, what);
    }
}

#[test]
fn n_must_be_at_least_one() {
    let mut eng = engine_with(true, EngineConfig::default(), 16, 16);
    assert!(eng.add_request_n(toks(1, 5), greedy(1), 0).is_err());
    assert!(!eng.has_unfinished());
}

// ---- herd batch and generate, as a user runs them ----

use serde_json::{json, Value};
use std::path::Path;

fn herd_batch(input: &Path, output: &Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec![
        "batch",
        "--model",
        MODEL,
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--overwrite",
    ];
    args.extend_from_slice(extra);
    let (code, _, err) = run_herd(&args);
    (code, err)
}

/// Records with the usage's cache detail taken out (the one thing the cache may change), and
/// OpenAI's `created` time.
fn without_cache_detail(mut recs: Vec<Value>) -> Vec<Value> {
    for r in &mut recs {
        let usage = match r.pointer_mut("/response/body") {
            Some(Value::Object(body)) => {
                body.remove("created");
                body.get_mut("usage")
            }
            _ => r.get_mut("usage"),
        };
        if let Some(Value::Object(u)) = usage {
            u.remove("prompt_tokens_details");
        }
    }
    recs
}

fn assert_same_records(got: Vec<Value>, want: &[Value], what: &str) {
    let got = without_cache_detail(got);
    assert_eq!(got.len(), want.len(), "{what}: record count");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g, w, "{what}");
    }
}

fn cached_of(r: &Value) -> u64 {
    let usage = if r["response"].is_object() {
        &r["response"]["body"]["usage"]
    } else {
        &r["usage"]
    };
    usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cached_tokens in {r}"))
}

fn system(k: usize) -> String {
    let topic = ["rivers", "prime numbers", "medieval trade routes"][k];
    format!(
        "You are an expert on {topic}. Answer precisely, cite your reasoning step by step, and \
         keep every answer short. {}",
        format!("Rule {k}: never guess about {topic}; say what is known. ").repeat(6 + 4 * k)
    )
}

/// herd JSONL records: three long shared system prompts, unshared prompts, n > 1, sampled and
/// greedy, log-probs, prompt log-probs.
fn herd_records() -> Vec<String> {
    (0..30)
        .map(|i| {
            let mut r = match i % 4 {
                3 => json!({"prompt": format!("An unshared prompt number {i}: tell me about {}", i * 7)}),
                k => json!({"messages": [
                    {"role": "system", "content": system(k)},
                    {"role": "user", "content": format!("Question {i}: why {}?", i * 3)},
                ]}),
            };
            r["id"] = json!(format!("r{i}"));
            r["max_tokens"] = json!(3 + i % 5);
            r["ignore_eos"] = json!(true);
            match i % 5 {
                1 => {
                    r["temperature"] = json!(0.8);
                    r["seed"] = json!(i);
                    r["logprobs"] = json!(2);
                }
                2 => r["temperature"] = json!(0.0),
                3 => {
                    r["temperature"] = json!(1.0);
                    r["seed"] = json!(100 + i);
                    r["n"] = json!(3);
                }
                _ => r["seed"] = json!(7),
            }
            if i == 10 {
                r["prompt_logprobs"] = json!(true);
            }
            r.to_string()
        })
        .collect()
}

fn openai_records() -> Vec<String> {
    (0..8)
        .map(|i| {
            let body = if i % 2 == 0 {
                json!({"model": MODEL, "messages": [
                    {"role": "system", "content": system(i % 3)},
                    {"role": "user", "content": format!("q{i}")},
                ], "max_tokens": 30, "ignore_eos": true, "seed": i, "n": 1 + i % 3, "logprobs": true, "top_logprobs": 1})
            } else {
                json!({"model": MODEL, "prompt": system(1) + &format!(" Finish this: {i}"),
                       "max_tokens": 30, "ignore_eos": true, "seed": i, "n": 2, "temperature": 0.7})
            };
            let url = if i % 2 == 0 {
                "/v1/chat/completions"
            } else {
                "/v1/completions"
            };
            json!({"custom_id": format!("c{i}"), "method": "POST", "url": url, "body": body})
                .to_string()
        })
        .collect()
}

#[test]
fn batch_output_is_the_same_with_and_without_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    for (name, lines) in [("herd", herd_records()), ("openai", openai_records())] {
        let input = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&input, lines.join("\n") + "\n").unwrap();
        let run = |tag: &str, extra: &[&str]| {
            let out = dir.path().join(format!("{name}-{tag}.jsonl"));
            let (code, err) = herd_batch(&input, &out, extra);
            assert_eq!(code, 0, "{name} {tag}: {err}");
            (jsonl(&out), err)
        };
        let (plain, err) = run("plain", &["--no-prefix-cache"]);
        assert!(
            err.contains("cached_prompt_tokens 0,"),
            "{name}: summary without the cache: {err}"
        );
        assert!(plain.iter().all(|r| cached_of(r) == 0));
        let (cached, err) = run("cached", &[]);
        assert!(!err.contains("cached_prompt_tokens 0,"), "{name}: {err}");
        assert!(
            cached.iter().filter(|r| cached_of(r) > 0).count() >= lines.len() / 2,
            "{name}: most records should hit the cache"
        );
        // A pool of 24 blocks of 16 tokens: the longest record fits alone, not many together.
        let (tiny, err) = run(
            "tiny-pool",
            &["--kv-cache-gb", "0.0002", "--log-level", "debug"],
        );
        assert!(
            err.contains("preempted"),
            "{name}: the pool should force preemption"
        );
        let want = without_cache_detail(plain);
        assert_same_records(cached, &want, &format!("{name}: with the cache"));
        assert_same_records(tiny, &want, &format!("{name}: tiny pool"));
    }
}

#[test]
fn n_choices_are_the_records_with_seed_plus_i() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let prompt = system(0) + " And one more thing:";
    let mut lines = vec![json!({"id": "n", "prompt": prompt, "n": 3, "seed": 40, "temperature": 1.0,
                                "max_tokens": 6, "ignore_eos": true, "logprobs": 1, "prompt_logprobs": true})
    .to_string()];
    for i in 0..3 {
        lines.push(
            json!({"id": format!("s{i}"), "prompt": prompt, "seed": 40 + i, "temperature": 1.0,
                   "max_tokens": 6, "ignore_eos": true, "logprobs": 1, "prompt_logprobs": true})
            .to_string(),
        );
    }
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let (code, err) = herd_batch(&input, &out, &[]);
    assert_eq!(code, 0, "{err}");
    let recs = jsonl(&out);
    let n = &recs[0];
    let choices = n["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    assert!(n.get("text").is_none());
    let mut completion = 0;
    for (i, c) in choices.iter().enumerate() {
        let single = &recs[1 + i];
        assert_eq!(c["index"], json!(i));
        for k in ["text", "token_ids", "finish_reason", "logprobs"] {
            assert_eq!(c[k], single[k], "choice {i} {k}");
        }
        completion += single["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert_eq!(n["prompt_logprobs"], recs[1]["prompt_logprobs"]);
    assert_eq!(n["usage"]["completion_tokens"], json!(completion));
    assert_eq!(
        n["usage"]["prompt_tokens"],
        recs[1]["usage"]["prompt_tokens"]
    );

    // generate --n: the same choices.
    let (code, stdout, err) = run_herd(&[
        "generate",
        "--model",
        MODEL,
        "--prompt",
        &prompt,
        "--n",
        "3",
        "--seed",
        "40",
        "--temperature",
        "1.0",
        "--max-tokens",
        "6",
        "--ignore-eos",
        "--json",
        "--logprobs",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    let g: Value = serde_json::from_str(stdout.trim()).unwrap();
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(
            g["choices"][i]["token_ids"], c["token_ids"],
            "generate choice {i}"
        );
    }
}

#[test]
fn n_out_of_range_or_with_a_csv_output_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let lines = [
        json!({"id": "zero", "prompt": "hi", "n": 0}).to_string(),
        json!({"id": "big", "prompt": "hi", "n": 129}).to_string(),
        json!({"id": "ok", "prompt": "hi", "n": 2, "max_tokens": 2}).to_string(),
    ];
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let (code, err) = herd_batch(&input, &out, &[]);
    assert_eq!(code, 0, "{err}");
    let recs = jsonl(&out);
    for r in &recs[..2] {
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .contains("`n` must be in 1..=128"),
            "{r}"
        );
    }
    assert_eq!(recs[2]["choices"].as_array().unwrap().len(), 2);
    // A CSV row holds one completion.
    let csv = dir.path().join("out.csv");
    let (code, _) = herd_batch(&input, &csv, &[]);
    assert_eq!(code, 0);
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(
        text.contains("a CSV output holds one completion per row"),
        "{text}"
    );
    let (code, err) = herd_batch(&input, &csv, &["--n", "2"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--n > 1 needs a JSONL output"), "{err}");
    let (code, err) = herd_batch(&input, &out, &["--n", "0"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run_herd(&["generate", "--model", MODEL, "--prompt", "hi", "--n", "2"]);
    assert_eq!(code, 2);
    assert!(err.contains("add --json"), "{err}");
}

#[test]
fn stats_csv_carries_cached_and_computed_prompt_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, herd_records()[..12].join("\n") + "\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let stats = dir.path().join("stats.csv");
    for extra in [&[][..], &["--no-prefix-cache"][..]] {
        let mut a = vec!["--stats-csv", stats.to_str().unwrap()];
        a.extend_from_slice(extra);
        let (code, err) = herd_batch(&input, &out, &a);
        assert_eq!(code, 0, "{err}");
    }
    let mut rdr = csv::Reader::from_path(&stats).unwrap();
    let head = rdr.headers().unwrap().clone();
    let col = |name: &str| head.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = rdr.records().map(Result::unwrap).collect();
    let num = |r: &csv::StringRecord, c: &str| r[col(c)].parse::<u64>().unwrap();
    assert_eq!(&rows[0][col("prefix_cache")], "true");
    assert_eq!(&rows[1][col("prefix_cache")], "false");
    assert!(num(&rows[0], "cached_prompt_tokens") > 0);
    assert_eq!(num(&rows[1], "cached_prompt_tokens"), 0);
    assert!(num(&rows[0], "computed_prompt_tokens") < num(&rows[1], "computed_prompt_tokens"));
    // Without the cache every prompt token of every sample is computed.
    assert!(num(&rows[1], "computed_prompt_tokens") >= num(&rows[1], "prompt_tokens"));
}

#[test]
fn admission_groups_records_by_prefix_within_the_read_ahead_window() {
    // Eight system prompts in turn; a pool that holds about four of them. Admitted in file order
    // (a window of 1) each prefix is evicted before it comes back; grouped, records sharing
    // one run together and hit. Same output either way.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let topics = [
        "rivers", "stars", "bread", "chess", "trains", "music", "glass", "maps",
    ];
    let lines: Vec<String> = (0..64)
        .map(|i| {
            let t = topics[i % 8];
            let sys = format!("You are an expert on {t}. ")
                + &format!("Always explain {t} with care and cite one fact about {t}. ").repeat(30);
            json!({"id": i, "messages": [{"role": "system", "content": sys},
                                         {"role": "user", "content": format!("q{i}")}],
                   "max_tokens": 3, "seed": i})
            .to_string()
        })
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let run = |ra: &str| {
        let out = dir.path().join(format!("out-{ra}.jsonl"));
        let extra = [
            "--read-ahead",
            ra,
            "--kv-cache-gb",
            "0.0008",
            "--max-batch-size",
            "2",
        ];
        let (code, err) = herd_batch(&input, &out, &extra);
        assert_eq!(code, 0, "{err}");
        let recs = jsonl(&out);
        let cached: u64 = recs.iter().map(cached_of).sum();
        (without_cache_detail(recs), cached)
    };
    let (fifo, fifo_cached) = run("1");
    let (grouped, grouped_cached) = run("64");
    assert_eq!(grouped, fifo, "grouping changes no result");
    eprintln!("cached prompt tokens: file order {fifo_cached}, grouped {grouped_cached}");
    assert!(
        grouped_cached > 4 * fifo_cached.max(1000),
        "grouped admission should hit far more: {grouped_cached} vs {fifo_cached}"
    );
}

#[test]
fn the_cuda_backend_on_the_emulated_device_gets_the_cache_through_the_same_block_tables() {
    // EMULATED (scripts/cuda-emu: herd's kernels as C++ on the CPU): proves the CUDA path reads
    // cached blocks through the block tables like the CPU backend, not a GPU's own rounding.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let lines: Vec<String> = (0..5)
        .map(|i| {
            json!({"id": i, "messages": [{"role": "system", "content": system(0)},
                                         {"role": "user", "content": format!("q{i}")}],
                   "max_tokens": 4, "seed": i, "n": 1 + i % 3, "logprobs": 1})
            .to_string()
        })
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let run = |tag: &str, extra: &[&str]| {
        let out = dir.path().join(format!("{tag}.jsonl"));
        let o = herd_on_emulated_device()
            .args([
                "batch",
                "--model",
                MODEL,
                "--device",
                "cuda",
                "--kv-cache-gb",
                "0.05",
            ])
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&out)
            .args(extra)
            .output()
            .expect("scripts/cuda-emu runs");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{tag}: {err}");
        jsonl(&out)
    };
    let cached = run("cached", &[]);
    let plain = run("plain", &["--no-prefix-cache"]);
    assert!(
        cached.iter().skip(1).all(|r| cached_of(r) > 0),
        "records after the first hit"
    );
    assert_same_records(cached, &without_cache_detail(plain), "emulated CUDA");
}

/// Token ids equal; log-probs within `tol` (tensor parallelism sums in another order).
fn assert_close_choices(got: &[Value], want: &[Value], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: record count");
    for (g, w) in got.iter().zip(want) {
        let (gc, wc) = (g["choices"].as_array(), w["choices"].as_array());
        let (gc, wc) = (gc.expect("n > 1 choices"), wc.expect("n > 1 choices"));
        assert_eq!(gc.len(), wc.len(), "{what}: choices");
        for (a, b) in gc.iter().zip(wc) {
            assert_eq!(a["token_ids"], b["token_ids"], "{what}: {}", g["id"]);
            let lp = |c: &Value| -> Vec<f64> {
                c["logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t["logprob"].as_f64().unwrap())
                    .collect()
            };
            for (x, y) in lp(a).iter().zip(lp(b)) {
                assert!((x - y).abs() <= tol, "{what}: {}: {x} vs {y}", g["id"]);
            }
        }
    }
}

#[test]
fn tensor_parallel_peers_copy_the_same_partial_blocks() {
    if std::env::var("HERD_NO_MPI").is_ok_and(|v| v == "1") {
        eprintln!("skipped: HERD_NO_MPI=1");
        return;
    }
    if !cfg!(feature = "mpi") {
        panic!("needs a build with MPI (cargo test --features mpi), or HERD_NO_MPI=1");
    }
    // Sampled n > 1 records sharing a system prompt: samples 1.. copy sample 0's partial block on
    // every rank (a peer that skipped the copy would attend over an empty block).
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let lines: Vec<String> = (0..4)
        .map(|i| {
            json!({"id": i, "prompt": system(i % 2) + &format!(" Question {i}: why?"), "n": 3,
                   "seed": 20 + i, "temperature": 1.0, "max_tokens": 6, "ignore_eos": true,
                   "logprobs": 1})
            .to_string()
        })
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let run = |tag: &str, tp: usize, extra: &[&str]| {
        let out = dir.path().join(format!("{tag}.jsonl"));
        let mut c = if tp > 1 {
            let mut c = std::process::Command::new("mpirun");
            c.args([
                "-np",
                &tp.to_string(),
                "--oversubscribe",
                "--bind-to",
                "none",
            ])
            .arg(env!("CARGO_BIN_EXE_herd"))
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
            c
        } else {
            std::process::Command::new(env!("CARGO_BIN_EXE_herd"))
        };
        let o = c
            .args(["batch", "--model", MODEL, "--tp", &tp.to_string()])
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&out)
            .args(extra)
            .env("RUST_LOG", "warn")
            .output()
            .expect("herd (under mpirun) runs");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(0), "{tag}: {err}");
        (jsonl(&out), err)
    };
    let (one, _) = run("tp1", 1, &["--no-prefix-cache"]);
    let (two, err) = run("tp2", 2, &[]);
    let (two_plain, plain_err) = run("tp2-plain", 2, &["--no-prefix-cache"]);
    let computed = |e: &str| -> u64 {
        let at = e
            .find("computed ")
            .unwrap_or_else(|| panic!("no summary in {e}"));
        e[at + 9..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("no count in {e}"))
    };
    assert!(
        computed(&err) < computed(&plain_err),
        "the cache should save prompt work: {err}"
    );
    assert_same_records(two.clone(), &without_cache_detail(two_plain), "tp 2");
    assert_close_choices(&without_cache_detail(two), &one, 1e-4, "tp 2 against tp 1");
}
