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
        // Without the cache these are the engine's batching invariants (tests/model_reference).
        for cache in [true] {
            let what = format!("{what}, cache {cache}");
            let mut eng = engine_with(cache, cfg.clone(), blocks, bs);
            submit(&mut eng, &reqs);
            let got = run(&mut eng);
            assert_same(&got, &want, &what);
            assert_no_leak(&eng, &what);
            let st = eng.stats();
            if cache {
                assert!(
                    st.cached_prompt_tokens > 0,
                    "{what}: shared prefixes should hit"
                );
            }
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
    assert_eq!(outs[1].cached_tokens, 64);
    assert_eq!(eng.stats().prefill_tokens, 70 + 6);
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
        assert_eq!(o.cached_tokens, if i == 0 { 0 } else { 32 });
    }
    // The prompt's full blocks computed once; each other sample computes its 13-token tail.
    assert_eq!(eng.stats().prefill_tokens, 45 + 3 * 13);
    let distinct: std::collections::HashSet<_> = outs.iter().map(|o| &o.token_ids).collect();
    assert!(
        distinct.len() > 1,
        "different seeds should give different samples"
    );
    assert_no_leak(&eng, "n samples");
}

#[test]
fn n_must_be_at_least_one() {
    let mut eng = engine_with(true, EngineConfig::default(), 16, 16);
    assert!(eng.add_request_n(toks(1, 5), greedy(1), 0).is_err());
    assert!(!eng.has_unfinished());
}
