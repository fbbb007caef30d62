//! A decode step with no host overhead (issue 13), on the emulated CUDA device (tests/cuda-emu):
//! what herd asks of the driver per decode step, counted by CUDA_EMU_STATS as the difference
//! between a 48-token and a 16-token run (load, prefill and the one capture cancel out), and
//! graph replay against eager steps. EMULATED: counts and exact results, never timings.

mod common;

use common::mpi_available;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `herd ARGS` on the emulated device with `env`; (exit code, stdout + stderr).
fn herd_emu(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut c = common::herd_on_emulated_device();
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("scripts/cuda-emu does not start: {e}"));
    let all = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !all.contains("the emulator did not build"),
        "the emulated CUDA device does not build here:\n{all}"
    );
    (out.status.code().unwrap_or(-1), all)
}

/// The JSON record `herd generate --json` printed among `out`'s lines.
fn json_record(out: &str) -> Value {
    let line = out
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON in:\n{out}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// The API call counts an emulated run wrote to its CUDA_EMU_STATS file.
fn emu_calls(stats: &Path) -> Value {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(stats).unwrap()).unwrap();
    v["calls"].clone()
}

fn model(name: &str) -> String {
    common::fixture(&format!("models/{name}/hf"))
        .to_string_lossy()
        .into_owned()
}

/// The API call counts of `herd generate` producing `tokens` tokens (temperature sampling with
/// log-probs: the step downloads those too).
fn generate_calls(dir: &Path, tokens: usize, extra_env: &[(&str, &str)]) -> Value {
    let stats = dir.join(format!("stats-{tokens}.json"));
    let s = stats.to_string_lossy().into_owned();
    let n = tokens.to_string();
    let m = model("llama30");
    let mut env = vec![("CUDA_EMU_STATS", s.as_str())];
    env.extend_from_slice(extra_env);
    let (code, out) = herd_emu(
        &[
            "generate",
            "--model",
            &m,
            "--device",
            "cuda",
            "--kv-cache-gb",
            "0.05",
            "--prompt-token-ids",
            "1,2,3,4,5,6,7",
            "--max-tokens",
            &n,
            "--temperature",
            "0.8",
            "--seed",
            "7",
            "--logprobs",
            "3",
            "--ignore-eos",
            "--json",
        ],
        &env,
    );
    assert_eq!(code, 0, "{out}");
    emu_calls(&stats)
}

fn count(calls: &Value, names: &[&str]) -> u64 {
    names.iter().map(|n| calls[n].as_u64().unwrap_or(0)).sum()
}

/// The numbers, per decode step: exactly one graph launch and nothing launched loose,
/// no allocation or free, no event created, at most one copy each way, no cuBLASLt heuristic.
#[test]
fn a_decode_step_is_one_graph_launch_one_upload_one_download() {
    let dir = tempfile::tempdir().unwrap();
    let short = generate_calls(dir.path(), 16, &[]);
    let long = generate_calls(dir.path(), 48, &[]);
    let steps = 32u64;
    let per = |names: &[&str]| count(&long, names) as f64 / 1.0 - count(&short, names) as f64;
    let report = format!("16 tokens: {short}\n48 tokens: {long}");
    assert_eq!(per(&["cuGraphLaunch"]), steps as f64, "{report}");
    assert_eq!(per(&["cuLaunchKernel"]), 0.0, "{report}");
    assert_eq!(per(&["cublasLtMatmul"]), 0.0, "{report}");
    for alloc in [
        ["cuMemAllocAsync", "cuMemAlloc_v2"],
        ["cuMemFreeAsync", "cuMemFree_v2"],
        ["cuMemHostAlloc", "cuMemFreeHost"],
    ] {
        assert_eq!(per(&alloc), 0.0, "{alloc:?}\n{report}");
    }
    assert_eq!(per(&["cuEventCreate"]), 0.0, "{report}");
    assert!(
        per(&["cuMemcpyHtoDAsync_v2", "cuMemcpyHtoD_v2"]) <= steps as f64,
        "{report}"
    );
    assert!(
        per(&["cuMemcpyDtoHAsync_v2", "cuMemcpyDtoH_v2"]) <= steps as f64,
        "{report}"
    );
    assert_eq!(per(&["cublasLtMatmulAlgoGetHeuristic"]), 0.0, "{report}");
    assert_eq!(
        per(&[
            "cublasLtMatrixLayoutCreate",
            "cublasLtMatmulDescCreate",
            "cublasLtMatmulPreferenceCreate"
        ]),
        0.0,
        "{report}"
    );
    // One capture for the one batch size, in both runs.
    assert_eq!(count(&long, &["cuStreamBeginCapture_v2"]), 1, "{report}");
}

/// Eager steps (HERD_CUDA_GRAPHS=0) do what the graphs replace: launches one by one, so the
/// counts above mean something.
#[test]
fn without_graphs_a_decode_step_launches_its_kernels_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let off = [("HERD_CUDA_GRAPHS", "0")];
    let short = generate_calls(dir.path(), 16, &off);
    let long = generate_calls(dir.path(), 48, &off);
    let per = |n: &str| count(&long, &[n]) - count(&short, &[n]);
    assert_eq!(count(&long, &["cuGraphLaunch"]), 0);
    // llama30 has 2 layers. Per layer: norm, the fused QKV GEMM (no cast kernel: the norm
    // writes its bf16 operand), RoPE + KV write, attention (partials, combine), the output GEMM,
    // residual + norm, the fused gate/up GEMM, SiLU x up, the down GEMM = 10 (13 with separate
    // q, k, v and gate, up GEMMs; 20 before the bf16 operands were written by the producing
    // kernels; the residual adds ride on the output and down GEMMs). Per step: embed, row
    // selection, final norm, the logits GEMM, sampling = 5.
    let launches = per("cuLaunchKernel") + per("cublasLtMatmul");
    assert_eq!(launches, 32 * (2 * 10 + 5), "{long}");
    assert_eq!(per("cublasLtMatmul"), 32 * (2 * 4 + 1), "{long}");
    // The arena and the staging buffer hold for eager steps too.
    assert_eq!(per("cuMemAllocAsync"), 0, "{long}");
    assert_eq!(per("cuMemcpyHtoDAsync_v2"), 32, "{long}");
    assert_eq!(per("cuMemcpyDtoHAsync_v2"), 32, "{long}");
    assert_eq!(per("cublasLtMatmulAlgoGetHeuristic"), 0, "{long}");
}

/// `herd bench --kernel-profile` times every launch of a decode step, eagerly: on the emulated
/// device the counts are checked (its times mean nothing and are left out).
#[test]
fn the_kernel_profile_counts_each_launch_of_an_eager_decode_step() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("kernels.csv");
    let (code, out) = herd_emu(
        &[
            "bench",
            "--model",
            "random:tiny",
            "--device",
            "cuda",
            "--kv-cache-gb",
            "0.05",
            "--batch-sizes",
            "2",
            "--prefill-lens",
            "20",
            "--prompt-len",
            "4",
            "--gen-tokens",
            "4",
            "--kernel-profile",
            &csv.to_string_lossy(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("[emulated device: counts only]"), "{out}");
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let all: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let rows: Vec<&Vec<&str>> = all
        .iter()
        .filter(|r| r[col("step")] == "decode batch 2")
        .collect();
    let calls = |pred: &dyn Fn(&str) -> bool| -> f64 {
        rows.iter()
            .filter(|r| pred(r[col("kernel")]))
            .map(|r| r[col("calls_per_step")].parse::<f64>().unwrap())
            .sum()
    };
    // random:tiny has 2 layers: 10 launches each + 5 per step; 4 GEMMs per layer + the logits.
    assert_eq!(calls(&|_| true), 25.0, "{text}");
    assert_eq!(calls(&|k| k.starts_with("gemm m=2 ")), 9.0, "{text}");
    assert_eq!(calls(&|k| k == "gemm m=2 n=128256 k=64"), 1.0, "{text}");
    assert_eq!(calls(&|k| k == "sample_rows"), 1.0, "{text}");
    // The prefill of 20 tokens (more than a small step's 16): one step, the same launches, its
    // attention the tiled prefill kernel.
    let prefill = |k: &str| {
        all.iter()
            .filter(|r| r[col("step")] == "prefill 20" && r[col("kernel")] == k)
            .map(|r| r[col("calls_per_step")].parse::<f64>().unwrap())
            .sum::<f64>()
    };
    assert_eq!(prefill("attn_prefill_bf16"), 2.0, "{text}");
    assert_eq!(prefill("gemm m=20 n=384 k=64"), 2.0, "{text}");
    assert_eq!(prefill("attn_partial_bf16"), 0.0, "{text}");
    for r in &all {
        assert_eq!(r[col("us_per_step")], "", "no emulated timings: {text}");
    }
}

/// Records of a batch run, keyed fields only (ids, tokens, log-probs).
fn batch_records(
    dir: &Path,
    model_dir: &str,
    input: &Path,
    tag: &str,
    env: &[(&str, &str)],
) -> Vec<Value> {
    let out = dir.join(format!("out-{tag}.jsonl"));
    let stats = dir.join(format!("stats-{tag}.json"));
    let s = stats.to_string_lossy().into_owned();
    let mut env = env.to_vec();
    env.push(("CUDA_EMU_STATS", s.as_str()));
    let (code, all) = herd_emu(
        &[
            "batch",
            "--model",
            model_dir,
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--device",
            "cuda",
            "--kv-cache-gb",
            "0.05",
            "--max-batch-size",
            "8",
            "--ignore-eos",
        ],
        &env,
    );
    assert_eq!(code, 0, "{all}");
    let calls = emu_calls(&stats);
    let graphs = calls["cuGraphLaunch"].as_u64().unwrap_or(0);
    if env
        .iter()
        .any(|(k, v)| *k == "HERD_CUDA_GRAPHS" && *v == "0")
    {
        assert_eq!(graphs, 0, "{calls}");
    } else {
        assert!(graphs > 0, "no decode step replayed a graph: {calls}");
    }
    common::jsonl(&out)
        .into_iter()
        .map(|r| {
            json!({"id": r["id"], "token_ids": r["token_ids"], "logprobs": r["logprobs"],
                   "text": r["text"], "finish_reason": r["finish_reason"]})
        })
        .collect()
}

/// Graph replay gives exactly the eager step's tokens and log-probs: several sequences of
/// different lengths (batch buckets 1 to 8 with padding rows, prefill mixed with decode),
/// temperature, top-k and top-p sampling with seeds, on three fixtures.
#[test]
fn graph_replay_gives_exactly_the_eager_tokens_and_logprobs() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..7)
        .map(|i| {
            let prompt: Vec<u32> = (0..3 + 5 * i)
                .map(|j| (j * 37 + i * 11 + 1) % 300)
                .collect();
            let (temperature, top_p, top_k) = match i % 3 {
                0 => (0.0, 1.0, 0),
                1 => (0.9, 0.9, 0),
                _ => (1.2, 1.0, 20),
            };
            json!({"id": i.to_string(), "prompt_token_ids": prompt, "max_tokens": 6 + 3 * i,
                   "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": 100 + i,
                   "logprobs": 2})
            .to_string()
        })
        .collect();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    for name in ["llama30", "llama31", "llama32tied"] {
        let m = model(name);
        let eager = batch_records(
            dir.path(),
            &m,
            &input,
            &format!("{name}-eager"),
            &[("HERD_CUDA_GRAPHS", "0")],
        );
        let graph = batch_records(dir.path(), &m, &input, &format!("{name}-graph"), &[]);
        assert_eq!(eager.len(), 7, "{name}");
        assert_eq!(
            graph, eager,
            "{name}: graph replay differs from eager steps"
        );
    }
}

/// A one-token prompt makes the very first step decode-shaped: it must run eagerly (its graph
/// is captured from the second step of that shape, once the RoPE table and the GEMM plans
/// exist: a capture cannot upload them), and the tokens equal the eager run's.
#[test]
fn a_decode_shaped_first_step_runs_eagerly_then_replays() {
    let m = model("llama31");
    let run = |env: &[(&str, &str)]| {
        let (code, out) = herd_emu(
            &[
                "generate",
                "--model",
                &m,
                "--device",
                "cuda",
                "--kv-cache-gb",
                "0.05",
                "--prompt-token-ids",
                "5",
                "--max-tokens",
                "6",
                "--temperature",
                "0.7",
                "--seed",
                "3",
                "--logprobs",
                "2",
                "--ignore-eos",
                "--json",
            ],
            env,
        );
        assert_eq!(code, 0, "{out}");
        json_record(&out)
    };
    assert_eq!(run(&[]), run(&[("HERD_CUDA_GRAPHS", "0")]));
}

/// HERD_GEMV=1 (products of at most 4 rows on herd's gemv kernel instead of cuBLASLt, an A/B for
/// the GPU bench): greedy tokens equal the CPU backend's, and graph replay equals eager steps.
#[test]
fn the_gemv_kernel_gives_the_cpu_greedy_tokens_in_graphs_and_eagerly() {
    let m = model("llama31");
    let args = [
        "generate",
        "--model",
        &m,
        "--kv-cache-gb",
        "0.05",
        "--prompt-token-ids",
        "1,2,3,4,5",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ];
    let tokens = |out: &str| json_record(out)["token_ids"].clone();
    let cpu = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(args)
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    assert!(cpu.status.success());
    let want = tokens(&String::from_utf8_lossy(&cpu.stdout));
    let stats = tempfile::tempdir().unwrap();
    for graphs in ["1", "0"] {
        let s = stats.path().join(format!("stats-{graphs}.json"));
        let s = s.to_string_lossy().into_owned();
        let mut a = args.to_vec();
        a.extend(["--device", "cuda"]);
        let env = [
            ("HERD_GEMV", "1"),
            ("HERD_CUDA_GRAPHS", graphs),
            ("CUDA_EMU_STATS", s.as_str()),
        ];
        let (code, out) = herd_emu(&a, &env);
        assert_eq!(code, 0, "{out}");
        assert_eq!(tokens(&out), want, "graphs {graphs}: {out}");
        // Decode products (one row) ran on the gemv kernel, not cuBLASLt: only the prompt's
        // 5-row products and the first logits call cuBLASLt.
        let calls = emu_calls(Path::new(&s));
        let gemm = calls["cublasLtMatmul"].as_u64().unwrap_or(0);
        assert!(
            gemm <= 2 * 4 + 1,
            "graphs {graphs}: {gemm} cuBLASLt calls: {calls}"
        );
    }
}

/// A structured output's grammar-forced tokens run as one chunk per sequence (a few rows): such
/// "small" steps replay graphs too (keyed by rows and logit rows), with the decode attention
/// kernel eagerly and in the graph, so the text equals the eager run's exactly. With
/// `--max-batch-size 1` a chunk has more token rows than the batch has sequences: still graphed
/// (the activation arena holds the plan's token rows).
#[test]
fn forced_token_chunks_replay_graphs_and_equal_the_eager_steps() {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("s.json");
    std::fs::write(
        &schema,
        json!({"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3}},
            "required": ["name", "age", "tags"], "additionalProperties": false})
        .to_string(),
    )
    .unwrap();
    let run = |graphs: bool| {
        let stats = dir.path().join(format!("stats-{graphs}.json"));
        let s = stats.to_string_lossy().into_owned();
        let mut env = vec![("CUDA_EMU_STATS", s.as_str())];
        if !graphs {
            env.push(("HERD_CUDA_GRAPHS", "0"));
        }
        let (code, out) = herd_emu(
            &[
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
                "11",
                "--max-batch-size",
                "1",
                "--max-tokens",
                "120",
                "--json-schema",
                &schema.to_string_lossy(),
                "--json",
            ],
            &env,
        );
        assert_eq!(code, 0, "{out}");
        (json_record(&out), emu_calls(&stats))
    };
    let (graph, calls) = run(true);
    let (eager, eager_calls) = run(false);
    assert_eq!(graph["finish_reason"], "stop", "{graph}");
    assert_eq!(
        graph["text"], eager["text"],
        "graph replay differs from eager steps"
    );
    assert_eq!(graph["token_ids"], eager["token_ids"]);
    assert_eq!(count(&eager_calls, &["cuGraphLaunch"]), 0);
    // Decode steps (1 row) and forced chunks (2, 4, 8 rows...) are different shapes: more than
    // one graph captured, and replayed more often than captured.
    let captures = count(&calls, &["cuStreamBeginCapture_v2"]);
    assert!(captures >= 2, "{calls}");
    assert!(count(&calls, &["cuGraphLaunch"]) > captures, "{calls}");
}

/// `--tp 2` on two emulated GPUs producing `tokens` tokens: (the JSON result, the API calls of
/// both ranks summed).
fn tp2_generate(dir: &Path, tokens: usize, graphs: bool) -> (String, Value) {
    let tag = format!("{tokens}-{graphs}");
    let stats_dir = dir.join(&tag);
    std::fs::create_dir_all(&stats_dir).unwrap();
    let stats = stats_dir
        .join("stats-%p.json")
        .to_string_lossy()
        .into_owned();
    let m = model("llama31");
    let n = tokens.to_string();
    let mut c = Command::new(root().join("scripts/cuda-emu"));
    c.args(["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none"])
        .args(["-x", "HERD_CUDA_GRAPHS"])
        .arg(env!("CARGO_BIN_EXE_herd"))
        .args([
            "generate",
            "--model",
            &m,
            "--tp",
            "2",
            "--device",
            "cuda",
            "--kv-cache-gb",
            "0.05",
            "--prompt-token-ids",
            "1,17,33,5",
            "--max-tokens",
            &n,
            "--temperature",
            "0.7",
            "--seed",
            "4",
            "--logprobs",
            "3",
            "--ignore-eos",
            "--json",
        ])
        .env("RUST_LOG", "warn")
        .env("CUDA_EMU_QUIET", "1")
        .env("CUDA_EMU_DEVICES", "2")
        .env("CUDA_EMU_STATS", &stats)
        .env("HERD_CUDA_GRAPHS", if graphs { "1" } else { "0" })
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    let out = c.output().expect("scripts/cuda-emu mpirun");
    let all = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    let json = json_record(&all).to_string();
    let mut sum = serde_json::Map::new();
    let mut ranks = 0;
    for e in std::fs::read_dir(&stats_dir).unwrap() {
        let calls = emu_calls(&e.unwrap().path());
        ranks += 1;
        for (k, n) in calls.as_object().unwrap() {
            let have = sum.get(k).and_then(Value::as_u64).unwrap_or(0);
            sum.insert(k.clone(), json!(have + n.as_u64().unwrap_or(0)));
        }
    }
    assert_eq!(ranks, 2, "{all}");
    (json, Value::Object(sum))
}

/// Tensor parallel: both ranks capture the decode step with its NCCL collectives and replay it
/// (the follower's graph ends at the gathered logits, the leader's at the sampled tokens): per
/// decode step and rank one graph launch and nothing loose, at most one copy each way; the
/// result equals eager steps'.
#[test]
fn tensor_parallel_decode_steps_replay_graphs_with_their_collectives() {
    if !mpi_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, short) = tp2_generate(dir.path(), 16, true);
    let (long_json, long) = tp2_generate(dir.path(), 48, true);
    let (eager_json, eager) = tp2_generate(dir.path(), 48, false);
    assert_eq!(
        long_json, eager_json,
        "graph replay differs from eager steps at tp 2"
    );
    assert_eq!(count(&eager, &["cuGraphLaunch"]), 0);
    let per = |n: &[&str]| count(&long, n) as i64 - count(&short, n) as i64;
    let report = format!("16: {short}\n48: {long}");
    let (steps, ranks) = (32, 2);
    assert_eq!(per(&["cuGraphLaunch"]), steps * ranks, "{report}");
    assert_eq!(per(&["cuLaunchKernel"]), 0, "{report}");
    assert_eq!(per(&["ncclAllReduce", "ncclAllGather"]), 0, "{report}");
    assert_eq!(per(&["cuMemAllocAsync", "cuMemFreeAsync"]), 0, "{report}");
    assert_eq!(per(&["cuEventCreate"]), 0, "{report}");
    assert!(per(&["cuMemcpyHtoDAsync_v2"]) <= steps * ranks, "{report}");
    assert!(per(&["cuMemcpyDtoHAsync_v2"]) <= steps * ranks, "{report}");
}
