//! The CUDA backend on the emulated CUDA device (tests/cuda-emu, run through scripts/cuda-emu):
//! herd's kernels, its cuBLASLt GEMMs, NCCL across MPI ranks and the memory plan all execute in
//! CI, on any machine, and are compared with the CPU backend. Everything here is EMULATED: it
//! proves logic, launch geometry, layouts, synchronisation, memory safety and the NCCL protocol;
//! it proves nothing about speed or about a GPU's own rounding.
//!
//! The emulator must build here (g++, x86-64): when it cannot, these tests fail; they never skip.
//! The first test to run builds it into the herd cache (~1 minute on 2 cores); later runs reuse it.

mod common;

use common::{jsonl, mpi_available};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// `scripts/cuda-emu CMD ARGS` with `env`; panics when the emulator cannot be built or run.
fn emu_cmd(cmd: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(root().join("scripts/cuda-emu"));
    c.arg(cmd)
        .args(args)
        .env("RUST_LOG", "warn")
        .env("CUDA_EMU_QUIET", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn run(mut c: Command) -> Out {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("scripts/cuda-emu does not start: {e}"));
    let o = Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !o.stderr.contains("the emulator did not build"),
        "the emulated CUDA device does not build here:\n{}",
        o.stderr
    );
    o
}

fn herd_emu(args: &[&str], env: &[(&str, &str)]) -> Out {
    run(emu_cmd(env!("CARGO_BIN_EXE_herd"), args, env))
}

/// One scenario of tests/cuda-emu/probe.cpp: it must report "the emulator behaved as expected",
/// and the emulator's own message must contain `needle`.
fn probe(scenario: &str, needle: &str) {
    let o = run(emu_cmd(
        "sh",
        &[
            "-c",
            &format!("\"$CUDA_EMU_DIR\"/cuda-emu-probe {scenario}"),
        ],
        &[],
    ));
    assert_eq!(o.code, 0, "probe {scenario}:\n{}", o.all());
    assert!(
        o.stdout.contains("the emulator behaved as expected"),
        "probe {scenario}:\n{}",
        o.all()
    );
    assert!(
        o.stderr.contains(needle),
        "probe {scenario}: the emulator did not say {needle:?}:\n{}",
        o.all()
    );
}

// ---------------------------------------------------------------- the emulator can fail

#[test]
fn out_of_bounds_and_freed_pointers_fail() {
    probe("oob-pointer", "is 0 bytes past the end of allocation");
    probe("use-after-free", "which was freed: use after free");
    // A kernel reading one row past its input faults on the guard page.
    probe("kernel-overrun", "kernel select_rows");
    probe("copy-overrun", "run 4 bytes past its end");
}

#[test]
fn a_wrong_cublaslt_leading_dimension_fails() {
    probe("cublaslt-ld", "a column-major matrix needs ld >= rows");
    probe(
        "cublaslt-ld",
        "matrix A (16 x 8, ld 32, CUDA_R_16BF) spans 480 bytes",
    );
}

#[test]
fn launch_limits_and_warp_rules_are_enforced() {
    probe("launch-bounds", "__launch_bounds__(128)");
    probe("grid-limit", "grid y and z are at most 65535");
    probe("partial-warp", "which has only 4 lanes");
}

#[test]
fn module_load_checks_herds_ptx_against_the_kernels_it_runs() {
    probe("ptx-mismatch", ".entry embed_gather: the PTX parameters");
}

/// Issue 10's ground: stream capture records launches and copies, a graph replays them (twice,
/// giving twice the effect), and what CUDA refuses in a capture is refused (the legacy NULL
/// stream, a copy of pageable memory, a launch on the legacy stream meanwhile).
#[test]
fn stream_capture_and_graphs_replay_and_refuse_what_cuda_refuses() {
    probe(
        "graph",
        "the legacy/per-thread default stream cannot be captured",
    );
}

/// The device runs a stream's work when the host waits for it (as a GPU runs it later): a read
/// of an async copy's pinned destination before waiting sees poison, a pinned source overwritten
/// before the copy ran sends the new bytes, pageable memory is staged at the call. So a missing
/// stream synchronization in herd shows up as wrong results here.
#[test]
fn stream_work_runs_when_the_host_waits() {
    probe("async", "queued work runs when the host waits");
}

#[test]
fn device_memory_is_bounded() {
    probe("out-of-memory", "cuMemAlloc of 0 bytes");
}

/// A copy of the kernel sources with the `__syncthreads()` between attention's per-warp writes
/// to shared memory and their merge removed: the emulator must fail the self-test (threads read
/// shared memory other warps have not written yet: poisoned NaN), while the other kernels pass.
#[test]
fn a_kernel_missing_one_syncthreads_fails_the_selftest() {
    let src = root().join("src/backend/cuda/kernels");
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    let att = dir.path().join("attention.cu");
    let text = std::fs::read_to_string(&att).unwrap();
    let anchor = "s_acc[w][lane * per + e] = acc[e];\n    __syncthreads();\n";
    assert!(
        text.contains(anchor),
        "attention.cu changed: update this test's anchor"
    );
    std::fs::write(
        &att,
        text.replace(anchor, "s_acc[w][lane * per + e] = acc[e];\n"),
    )
    .unwrap();
    let kdir = dir.path().to_string_lossy().into_owned();
    let o = herd_emu(
        &["doctor", "--selftest"],
        &[("CUDA_EMU_KERNELS", kdir.as_str())],
    );
    assert_ne!(
        o.code,
        0,
        "the self-test passed without the barrier:\n{}",
        o.all()
    );
    let lines: Vec<&str> = o.stdout.lines().collect();
    let failed: Vec<&&str> = lines.iter().filter(|l| l.contains("FAIL")).collect();
    assert!(
        failed.iter().any(|l| l.starts_with("attention paged GQA")),
        "{}",
        o.all()
    );
    // The model checks see the NaN log-probs too (f64::max used to drop NaN, and only the greedy
    // token check failed).
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("tiny model [bf16]: top-20 log-probs") && l.contains("FAIL")),
        "{}",
        o.all()
    );
    // Kernels that do not use the removed barrier still pass.
    for ok in [
        "embed_gather",
        "rmsnorm",
        "silu_mul",
        "rope q",
        "sample tokens",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(ok) && l.contains("  ok")),
            "{ok} should still pass:\n{}",
            o.all()
        );
    }
}

// ---------------------------------------------------------------- herd on the emulated device

#[test]
fn doctor_selftest_passes_on_the_emulated_device() {
    let o = herd_emu(&["doctor", "--selftest"], &[]);
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(o.stdout.contains("self-test passed"), "{}", o.all());
    // Both numerics modes, the kernels, the tiny model and every committed fixture.
    for what in [
        "attention paged GQA (head_dim 16, step 1, 22 rows)",
        "sample tokens",
        "matmul split bf16x2 [accurate]",
        "tiny model [bf16]: greedy tokens vs CPU",
        "llama31/hf [accurate]: greedy tokens vs CPU",
    ] {
        assert!(o.stdout.contains(what), "{what} missing:\n{}", o.stdout);
    }
    // Labelled: this is not a GPU.
    assert!(o.stdout.contains("emulated"), "{}", o.stdout);
}

/// One batch input with every reference prompt of a fixture, greedy, with log-probs.
fn fixture_input(dir: &Path, model: &str) -> PathBuf {
    let reference = common::reference(model);
    let lines: Vec<String> = reference["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json!({"id": i.to_string(), "prompt_token_ids": p["prompt_token_ids"], "max_tokens": 16,
                   "temperature": 0, "logprobs": 2, "prompt_logprobs": true})
            .to_string()
        })
        .collect();
    let p = dir.join(format!("{model}.jsonl"));
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn batch(model_dir: &str, input: &Path, output: &Path, device: &[&str]) -> Vec<Value> {
    batch_env(model_dir, input, output, device, &[])
}

fn batch_env(
    model_dir: &str,
    input: &Path,
    output: &Path,
    device: &[&str],
    env: &[(&str, &str)],
) -> Vec<Value> {
    let mut args = vec![
        "batch",
        "--model",
        model_dir,
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--kv-cache-gb",
        "0.05",
        "--ignore-eos",
    ];
    args.extend_from_slice(device);
    let o = herd_emu(&args, env);
    assert_eq!(o.code, 0, "herd {args:?}:\n{}", o.all());
    jsonl(output)
}

/// Largest |Δ prompt log-prob| and the generated tokens compared up to the first step where the
/// CPU's top-2 gap is within `tol` (past it, either token is a correct greedy choice).
fn compare_records(cpu: &[Value], gpu: &[Value], tol: f64, what: &str) -> f64 {
    assert_eq!(cpu.len(), gpu.len(), "{what}: record count");
    let mut worst = 0f64;
    for (c, g) in cpu.iter().zip(gpu) {
        let (cp, gp) = (
            c["prompt_logprobs"].as_array().unwrap(),
            g["prompt_logprobs"].as_array().unwrap(),
        );
        assert_eq!(cp.len(), gp.len(), "{what}: prompt log-prob count");
        for (a, b) in cp.iter().zip(gp).skip(1) {
            worst = worst.max((a.as_f64().unwrap() - b.as_f64().unwrap()).abs());
        }
        let (cl, gl) = (
            c["logprobs"].as_array().unwrap(),
            g["logprobs"].as_array().unwrap(),
        );
        for (step, (a, b)) in cl.iter().zip(gl).enumerate() {
            let top = a["top"].as_array().unwrap();
            let gap = top[0][1].as_f64().unwrap() - top[1][1].as_f64().unwrap();
            if gap <= tol {
                break;
            }
            assert_eq!(
                a["token_id"], b["token_id"],
                "{what}, record {}: greedy token {step} differs though the CPU's top-2 gap is {gap:.3}",
                c["id"]
            );
            worst =
                worst.max((a["logprob"].as_f64().unwrap() - b["logprob"].as_f64().unwrap()).abs());
        }
    }
    worst
}

/// The committed fixtures (HF and Meta layouts, Llama 3.0, 3.1 and 3.2 with tied embeddings) on
/// `--device cuda` against `--device cpu`. `--gpu-numerics accurate`: the 2e-3 on every
/// log-prob. bf16: these tiny random models have sharp distributions, and a CPU backend that
/// rounds exactly like the GPU (bf16 GEMM inputs and KV cache) already differs from the f32 CPU
/// by up to 0.25 on them (selftest.rs, the_fixture_tolerance_holds_for_gpu_roundings); the
/// emulated GPU must stay within the self-test's bound of 0.4 for arbitrary tokens.
#[test]
fn fixtures_on_the_emulated_device_match_the_cpu_backend() {
    let dir = tempfile::tempdir().unwrap();
    for (model, layout) in [
        ("llama30", "hf"),
        ("llama30", "meta"),
        ("llama31", "hf"),
        ("llama31", "meta"),
        ("llama32tied", "hf"),
    ] {
        let m = common::fixture(&format!("models/{model}/{layout}"))
            .to_string_lossy()
            .into_owned();
        let input = fixture_input(dir.path(), model);
        let out = |tag: &str| dir.path().join(format!("{model}-{layout}-{tag}.jsonl"));
        let cpu = batch(&m, &input, &out("cpu"), &["--device", "cpu"]);
        // The reference with the GPU's bf16 roundings (GEMM inputs, KV cache) takes most of the
        // bf16 error away: measured (emulated) 2.9e-2 / 6.6e-2 / 5.6e-2 for llama30 / llama31 /
        // llama32tied, against 0.16 / 0.39 / 0.22 versus the f32 reference. The rest is f32
        // summation order flipping a bf16 rounding: the device matches to ~1e-6 up to the first
        // flip, and this CPU reference at --tp 2 differs from itself at --tp 1 by 0 / 3.1e-2 /
        // 3.5e-2 the same way (results/cuda-emu-bf16-tolerance.md). Bound: 0.1. Issue 12's 5e-2
        // is tested on a model with unit-scale logits (below).
        let cpu_bf16 = batch_env(
            &m,
            &input,
            &out("cpu-bf16"),
            &["--device", "cpu"],
            &[("HERD_CPU_GPU_ROUNDING", "bf16")],
        );
        for (numerics, reference, tol) in [
            ("accurate", &cpu, 2e-3),
            ("bf16", &cpu_bf16, 0.1),
            ("bf16", &cpu, 0.4),
        ] {
            let gpu = batch(
                &m,
                &input,
                &out(numerics),
                &["--device", "cuda", "--gpu-numerics", numerics],
            );
            let against = if std::ptr::eq(reference, &cpu) {
                "CPU"
            } else {
                "CPU rounding like the GPU"
            };
            let what = format!("{model}/{layout} [{numerics}] vs {against}");
            let worst = compare_records(reference, &gpu, tol, &what);
            eprintln!("{what}: max |Δ log-prob| = {worst:.2e} (emulated)");
            assert!(worst <= tol, "{what}: {worst} > {tol}");
        }
    }
}

/// Issue 12's bf16 bound, 5e-2 on every prompt log-prob against the f32 CPU backend, on a model
/// whose logits have the unit scale of a real one: random:tiny (Llama 3's 128k vocabulary, tied
/// embeddings), prompts of 7 to 300 tokens so that attention splits over the 132 emulated SMs.
/// Measured (emulated): 2.3e-2. The committed fixtures above cannot be held to it: their logits
/// are so sharp (log-probs down to -39) that the GPU's own bf16 roundings, done on the CPU
/// (HERD_CPU_GPU_ROUNDING=bf16), already move them by up to 0.39 from f32.
#[test]
fn bf16_log_probs_are_within_5e_2_of_the_f32_cpu_on_a_unit_scale_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = 5u64;
    let lines: Vec<String> = [7usize, 40, 200, 300]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut ids = vec![128000u32];
            ids.extend((0..n).map(|_| {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                1000 + ((rng >> 33) % 99_000) as u32
            }));
            json!({"id": i.to_string(), "prompt_token_ids": ids, "max_tokens": 8,
                   "temperature": 0, "logprobs": 2, "prompt_logprobs": true})
            .to_string()
        })
        .collect();
    let input = dir.path().join("tiny.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let cpu = batch(
        "random:tiny",
        &input,
        &dir.path().join("cpu.jsonl"),
        &["--device", "cpu"],
    );
    let gpu = batch(
        "random:tiny",
        &input,
        &dir.path().join("gpu.jsonl"),
        &["--device", "cuda", "--gpu-numerics", "bf16"],
    );
    let what = "random:tiny [bf16] vs CPU";
    let worst = compare_records(&cpu, &gpu, 5e-2, what);
    eprintln!("{what}: max |Δ log-prob| = {worst:.2e} (emulated)");
    assert!(worst <= 5e-2, "{what}: {worst} > 5e-2");
    // Not vacuous: bf16 does move these log-probs (measured 2.3e-2).
    assert!(
        worst > 1e-4,
        "{what}: {worst}: is the device really computing in bf16?"
    );
}

// ---------------------------------------------------------------- failures herd must report

/// A kernel that faults (CUDA_EMU_FAULT: the third add_rmsnorm launch touches a bad address, as a
/// bug would) makes the context's error sticky. herd must stop with an error that says so and
/// names the kernel, not panic at the next allocation with "the memory plan underestimated the
/// activations" (what it did before). The device runs queued work when the host waits, so the
/// fault surfaces at herd's next synchronization, which names every kernel launched since the last
/// good one; with CUDA_LAUNCH_BLOCKING=1 (honoured by the emulator as by a driver) each launch runs
/// before it returns and herd names the faulting kernel as the last launched.
#[test]
fn a_kernel_fault_is_an_error_naming_the_kernel_not_a_panic() {
    let m = common::fixture("models/llama31/hf")
        .to_string_lossy()
        .into_owned();
    for blocking in ["0", "1"] {
        let o = herd_emu(
            &[
                "generate",
                "--model",
                &m,
                "--device",
                "cuda",
                "--kv-cache-gb",
                "0.05",
                "--prompt-token-ids",
                "1,17,33",
                "--max-tokens",
                "2",
                "--json",
            ],
            &[
                ("CUDA_EMU_FAULT", "add_rmsnorm:3"),
                ("CUDA_LAUNCH_BLOCKING", blocking),
            ],
        );
        // The README's table: 3, the model failed while running.
        assert_eq!(o.code, 3, "{}", o.all());
        assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
        assert!(!o.stderr.contains("memory plan"), "{}", o.stderr);
        assert!(
            o.stderr
                .contains("an illegal memory access was encountered"),
            "{}",
            o.stderr
        );
        let named = if blocking == "1" {
            o.stderr.contains("the last launched: add_rmsnorm")
        } else {
            o.stderr.contains("failed, one of ") && o.stderr.contains(" add_rmsnorm,")
        };
        assert!(named, "CUDA_LAUNCH_BLOCKING={blocking}: {}", o.stderr);
    }
}

/// The memory plan against the emulated device's memory (CUDA_EMU_MEMORY_GB): 40 MB cannot hold
/// the activations (the cuBLASLt workspace alone is 32 MiB), and herd says so with every number
/// before loading anything; 60 MB runs.
#[test]
fn the_memory_plan_refuses_a_device_too_small_and_fits_one_just_large_enough() {
    let m = common::fixture("models/llama31/hf")
        .to_string_lossy()
        .into_owned();
    let args = [
        "generate",
        "--model",
        m.as_str(),
        "--device",
        "cuda",
        "--prompt-token-ids",
        "1,17,33",
        "--max-tokens",
        "2",
        "--json",
    ];
    let o = herd_emu(&args, &[("CUDA_EMU_MEMORY_GB", "0.04")]);
    assert_ne!(o.code, 0, "{}", o.all());
    assert!(
        o.stderr.contains("the model does not fit on this GPU")
            && o.stderr
                .contains("but the budget is 0.04 GB (90% of 0.04 GB total"),
        "{}",
        o.all()
    );
    let o = herd_emu(&args, &[("CUDA_EMU_MEMORY_GB", "0.06")]);
    assert_eq!(o.code, 0, "{}", o.all());
}

// ---------------------------------------------------------------- NCCL across MPI ranks

fn mpirun_emu(np: usize, args: &[&str], env: &[(&str, &str)]) -> Out {
    let np = np.to_string();
    let mut full = vec!["-np", np.as_str(), "--oversubscribe", "--bind-to", "none"];
    full.push(env!("CARGO_BIN_EXE_herd"));
    full.extend_from_slice(args);
    run(emu_cmd("mpirun", &full, env))
}

/// The collective watchdog on the GPU path: a tensor-parallel peer stopped (SIGSTOP, a hung or
/// cut-off rank) while the leader waits in the step's NCCL all-reduce ends the job, naming the
/// peer, within the timeout; it does not hang until the NCCL (here: the emulator's) timeout.
#[test]
fn a_stopped_tp_peer_waited_for_in_nccl_is_named_by_the_watchdog() {
    if !mpi_available() {
        return;
    }
    let m = common::fixture("models/llama31/hf")
        .to_string_lossy()
        .into_owned();
    let mut args = vec!["--collective-timeout", "3"];
    args.extend(generate_args(&m, "2", "bf16"));
    let t0 = Instant::now();
    let o = mpirun_emu(
        2,
        &args,
        &[
            ("CUDA_EMU_DEVICES", "2"),
            // Without the watchdog the leader would wait this long in the emulated all-reduce.
            ("CUDA_EMU_NCCL_TIMEOUT", "120"),
            ("HERD_TEST_FAIL_RANK", "1"),
            ("HERD_TEST_FAIL_AT", "step"),
            ("HERD_TEST_FAIL_HOW", "stop"),
        ],
    );
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        o.stderr.contains("rank 1: injected SIGSTOP at step"),
        "{}",
        o.all()
    );
    assert!(
        o.stderr.contains("herd: error: rank 0 (")
            && o.stderr
                .contains("in a step's forward (its NCCL collectives on the GPU) #")
            && o.stderr
                .contains("over replica 0 (world ranks 0-1) for rank 1 on node "),
        "{}",
        o.all()
    );
    assert_eq!(o.code, 1, "{}", o.all());
    assert!(secs < 60.0, "took {secs:.1} s");
}

fn generate_args<'a>(model: &'a str, tp: &'a str, numerics: &'a str) -> Vec<&'a str> {
    vec![
        "generate",
        "--model",
        model,
        "--tp",
        tp,
        "--device",
        "cuda",
        "--gpu-numerics",
        numerics,
        "--kv-cache-gb",
        "0.05",
        "--prompt-token-ids",
        "1,17,33,5,6,7,8,100,42,77,3,250,9",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
        "--logprobs",
        "3",
        "--prompt-logprobs",
    ]
}

fn max_logprob_diff(a: &Value, b: &Value) -> f64 {
    let mut worst = 0f64;
    let pa = a["prompt_logprobs"].as_array().unwrap();
    let pb = b["prompt_logprobs"].as_array().unwrap();
    assert_eq!(pa.len(), pb.len());
    for (x, y) in pa.iter().zip(pb).skip(1) {
        worst = worst.max((x.as_f64().unwrap() - y.as_f64().unwrap()).abs());
    }
    for (x, y) in a["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(b["logprobs"].as_array().unwrap())
    {
        for (p, q) in x["top"]
            .as_array()
            .unwrap()
            .iter()
            .zip(y["top"].as_array().unwrap())
        {
            assert_eq!(p[0], q[0], "top alternatives differ: {x} vs {y}");
            worst = worst.max((p[1].as_f64().unwrap() - q[1].as_f64().unwrap()).abs());
        }
    }
    worst
}

/// `mpirun -np 2 --tp 2` and `-np 4 --tp 4` on the emulated device (NCCL all-reduce and
/// all-gather across the ranks through the emulator's shared memory) give the tp 1 result.
#[test]
fn tensor_parallel_on_the_emulated_device_equals_one_rank() {
    if !mpi_available() {
        return;
    }
    for (model, np) in [
        ("llama31/hf", 2usize),
        ("llama31/hf", 4),
        ("llama30/meta", 2),
    ] {
        let m = common::fixture(&format!("models/{model}"))
            .to_string_lossy()
            .into_owned();
        for (numerics, tol) in [("accurate", 1e-3), ("bf16", 5e-2)] {
            let one = herd_emu(&generate_args(&m, "1", numerics), &[]);
            assert_eq!(one.code, 0, "{}", one.all());
            let want: Value = serde_json::from_str(one.stdout.trim()).unwrap();
            let tp = np.to_string();
            let devices = np.to_string();
            let many = mpirun_emu(
                np,
                &generate_args(&m, &tp, numerics),
                &[("CUDA_EMU_DEVICES", devices.as_str())],
            );
            assert_eq!(many.code, 0, "{}", many.all());
            let got: Value = serde_json::from_str(many.stdout.trim())
                .unwrap_or_else(|e| panic!("{e}: {}", many.all()));
            assert_eq!(
                got["token_ids"], want["token_ids"],
                "{model} tp {np} [{numerics}]"
            );
            let worst = max_logprob_diff(&got, &want);
            eprintln!(
                "{model} tp {np} [{numerics}]: max |Δ log-prob| vs tp 1 = {worst:.2e} (emulated)"
            );
            assert!(
                worst <= tol,
                "{model} tp {np} [{numerics}]: {worst} > {tol}"
            );
        }
    }
}

/// Two ranks of one replica on a node with one GPU would share it; NCCL refuses that with
/// "Duplicate GPU detected" (ncclInvalidUsage, all herd used to report). herd must say what is
/// wrong and what to do, on every rank, before NCCL is tried.
#[test]
fn two_ranks_of_a_replica_on_one_gpu_are_refused_clearly() {
    if !mpi_available() {
        return;
    }
    let m = common::fixture("models/llama31/hf")
        .to_string_lossy()
        .into_owned();
    let o = mpirun_emu(
        2,
        &generate_args(&m, "2", "bf16"),
        &[("CUDA_EMU_DEVICES", "1")],
    );
    assert_ne!(o.code, 0, "{}", o.all());
    assert!(
        o.stderr.contains("would share GPU 0") && o.stderr.contains("one GPU per rank"),
        "{}",
        o.all()
    );
    assert!(!o.stderr.contains("ncclInvalidUsage"), "{}", o.all());
}

/// A kernel fault at tp 2: dropping the NCCL communicator after the error used cudarc's Comm,
/// whose Drop panics when ncclCommAbort reports the CUDA error ("Error when aborting Comm."),
/// and that panic replaced the real message. The error must be what every rank reports.
#[test]
fn a_kernel_fault_at_tp2_is_reported_not_hidden_by_a_panic_in_drop() {
    if !mpi_available() {
        return;
    }
    let m = common::fixture("models/llama31/hf")
        .to_string_lossy()
        .into_owned();
    let o = mpirun_emu(
        2,
        &generate_args(&m, "2", "bf16"),
        &[
            ("CUDA_EMU_DEVICES", "2"),
            ("CUDA_EMU_FAULT", "attn_partial_bf16"),
        ],
    );
    assert_ne!(o.code, 0, "{}", o.all());
    assert!(!o.stderr.contains("panicked"), "{}", o.all());
    assert!(
        o.stderr
            .contains("an illegal memory access was encountered")
            && o.stderr.contains("attn_partial_bf16"),
        "{}",
        o.all()
    );
}

// ---------------------------------------------------------------- batch mode, call counts

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lines_in(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|s| s.matches('\n').count())
        .unwrap_or(0)
}

/// Seeded sampling on the emulated device (the GPU sampler) is reproducible, and a run killed
/// with SIGKILL resumes to the uninterrupted result, as on the CPU.
#[test]
fn seeded_batch_on_the_emulated_device_repeats_and_resumes_after_kill9() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.jsonl");
    let lines: Vec<String> = (0..16)
        .map(|i| {
            let ids: Vec<u32> = (0..3 + i % 5)
                .map(|j| (1 + (i * 31 + j * 7) % 300) as u32)
                .collect();
            json!({"id": format!("r{i}"), "prompt_token_ids": ids, "max_tokens": 12 - i % 3,
                   "seed": i, "temperature": 0.9, "top_p": 0.95})
            .to_string()
        })
        .collect();
    std::fs::write(&inp, lines.join("\n") + "\n").unwrap();
    let m = common::fixture("models/llama30/hf")
        .to_string_lossy()
        .into_owned();
    let args = |out: &Path| -> Vec<String> {
        [
            "batch",
            "--model",
            &m,
            "--device",
            "cuda",
            "--kv-cache-gb",
            "0.05",
            "--max-batch-size",
            "3",
            "--ignore-eos",
            "--input",
            inp.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run_to_end = |out: &Path| {
        let a = args(out);
        let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        let o = herd_emu(&a, &[]);
        assert_eq!(o.code, 0, "{}", o.all());
        std::fs::read_to_string(out).unwrap()
    };
    let first = run_to_end(&dir.path().join("a.jsonl"));
    let second = run_to_end(&dir.path().join("b.jsonl"));
    assert_eq!(
        first, second,
        "a seeded run on the emulated device is not reproducible"
    );
    let recs: Vec<Value> = first
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 16);
    let out = dir.path().join("c.jsonl");
    let part = dir.path().join("c.jsonl.part-0");
    for n in [2, 7] {
        let a = args(&out);
        let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        let mut child = KillOnDrop(
            emu_cmd(env!("CARGO_BIN_EXE_herd"), &a, &[])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let t = Instant::now();
        while lines_in(&part) < n {
            assert!(
                child.0.try_wait().unwrap().is_none(),
                "finished before {n} lines"
            );
            assert!(t.elapsed() < Duration::from_secs(300), "no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
        child.0.kill().unwrap(); // SIGKILL (scripts/cuda-emu execs herd: this is herd)
        child.0.wait().unwrap();
        assert!(!out.exists());
    }
    assert_eq!(run_to_end(&out), first);
}

/// CUDA_EMU_STATS writes every API call's count at exit (issue 10 measures launches with it).
#[test]
fn stats_count_every_api_call() {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    let m = common::fixture("models/llama30/hf")
        .to_string_lossy()
        .into_owned();
    let s = stats.to_string_lossy().into_owned();
    let o = herd_emu(
        &[
            "generate",
            "--model",
            &m,
            "--device",
            "cuda",
            "--kv-cache-gb",
            "0.05",
            "--prompt-token-ids",
            "1,2,3",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ],
        // Eager steps: the launches below are counted one by one (a decode graph replays them
        // in one cuGraphLaunch; tests/cuda_graphs.rs counts that).
        &[("CUDA_EMU_STATS", s.as_str()), ("HERD_CUDA_GRAPHS", "0")],
    );
    assert_eq!(o.code, 0, "{}", o.all());
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let calls = &v["calls"];
    // 2 layers: per step at least embed, 2 norms + 2 rope + 2 attention (x2: partial, combine)
    // + 2 silu per layer, the final norm and sampling; 4 steps (prefill + 3 decodes).
    let launches = calls["cuLaunchKernel"].as_u64().unwrap_or(0);
    assert!(launches >= 4 * 12, "{v}");
    assert!(
        calls["cublasLtMatmul"].as_u64().unwrap_or(0) >= 4 * 2 * 4,
        "{v}"
    );
    assert_eq!(calls["cuModuleLoadData"].as_u64(), Some(1), "{v}");
    assert!(
        calls["cuMemcpyDtoHAsync_v2"].as_u64().unwrap_or(0) >= 4,
        "{v}"
    );
    // The most device memory in use at once, within the device.
    let peak = v["peak_device_bytes"].as_u64().unwrap_or(0);
    assert!(peak > 0 && Some(peak) <= v["device_bytes"].as_u64(), "{v}");
}
