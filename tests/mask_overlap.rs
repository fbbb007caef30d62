//! Structured outputs on a device that samples (issue 15): a constrained step's masks are computed
//! on the host while the device runs its forward, then go up and the rows are sampled with them.
//! Shown here with a backend that records its calls (the CPU reference underneath; it "samples on
//! the device" with the host sampler) and the engine's "masks computed" log event, in one log:
//! per constrained step the forward is queued, then the masks are computed, then the rows are
//! sampled. Its outputs equal the plain CPU backend's, which masks on the host. The CPU runs
//! each kernel as it is called, so this proves the order of the calls, not an overlap in time
//! (that needs a GPU: scripts/gpu-check section 3).

mod common;

use std::sync::{Arc, Mutex};

use herd::backend::cpu::{CpuAct, CpuBackend, CpuKv, CpuMatrix};
use herd::backend::{AttnBatch, Backend, BackendError, KvShape, RowSampling, Sampled};
use herd::checkpoint::Tensor;
use herd::engine::constraint::{ConstraintKind, ConstraintSpec};
use herd::engine::{sampler, Engine, EngineConfig, RequestOutput, SamplingParams};
use herd::model::llama::Llama;
use herd::model::loader::open_model;
use herd::model::shard::ShardPlan;
use serde_json::json;

type Log = Arc<Mutex<Vec<String>>>;

fn note(log: &Log, what: impl Into<String>) {
    log.lock().unwrap().push(what.into());
}

/// The CPU backend, recording the calls that order a deferred step, and sampling "on the
/// device" (with the host sampler, so that its results can equal the CPU engine's).
struct Recording {
    cpu: CpuBackend,
    log: Log,
}

impl Recording {
    fn sample_host(&self, logits: &CpuAct, rows: &[RowSampling]) -> Vec<Sampled> {
        let vocab = logits.cols;
        rows.iter()
            .enumerate()
            .map(|(i, r)| {
                let row = &logits.data[i * vocab..(i + 1) * vocab];
                let p = SamplingParams {
                    temperature: r.temperature,
                    top_p: r.top_p,
                    top_k: r.top_k,
                    ..Default::default()
                };
                let token = match r.mask {
                    Some(words) => {
                        let allowed: Vec<u32> = (0..vocab as u32)
                            .filter(|&t| words[t as usize / 32] >> (t % 32) & 1 == 1)
                            .collect();
                        sampler::sample_masked(row, &allowed, &p, r.seed, r.n)
                    }
                    None => sampler::sample(row, &p, r.seed, r.n),
                };
                let lp = sampler::token_logprob(row, token, r.top_logprobs);
                Sampled {
                    token,
                    logprob: lp.logprob,
                    top: lp.top,
                }
            })
            .collect()
    }
}

impl Backend for Recording {
    type Act = CpuAct;
    type Matrix = CpuMatrix;
    type Vector = Vec<f32>;
    type Kv = CpuKv;
    fn name(&self) -> String {
        "cpu recording a device's calls".into()
    }
    fn load_matrix(&self, t: &Tensor) -> Result<CpuMatrix, BackendError> {
        self.cpu.load_matrix(t)
    }
    fn load_vector(&self, t: &Tensor) -> Result<Vec<f32>, BackendError> {
        self.cpu.load_vector(t)
    }
    fn load_stacked(&self, parts: &[Tensor]) -> Result<CpuMatrix, BackendError> {
        self.cpu.load_stacked(parts)
    }
    fn alloc_kv(&self, s: KvShape) -> Result<CpuKv, BackendError> {
        self.cpu.alloc_kv(s)
    }
    fn embed(&self, t: &CpuMatrix, tokens: &[u32]) -> CpuAct {
        note(&self.log, "forward queued");
        self.cpu.embed(t, tokens)
    }
    fn rmsnorm(&self, x: &CpuAct, w: &Vec<f32>, eps: f32) -> CpuAct {
        self.cpu.rmsnorm(x, w, eps)
    }
    fn matmul(&self, x: &CpuAct, w: &CpuMatrix) -> CpuAct {
        self.cpu.matmul(x, w)
    }
    fn rope_store_kv(
        &self,
        qkv: &mut CpuAct,
        n_heads: usize,
        inv_freq: &[f32],
        kv: &mut CpuKv,
        layer: usize,
        batch: &AttnBatch,
    ) {
        self.cpu
            .rope_store_kv(qkv, n_heads, inv_freq, kv, layer, batch)
    }
    fn copy_kv_block(&self, kv: &mut CpuKv, src: u32, dst: u32) {
        self.cpu.copy_kv_block(kv, src, dst)
    }
    fn attention(&self, q: &CpuAct, kv: &CpuKv, l: usize, h: usize, b: &AttnBatch) -> CpuAct {
        self.cpu.attention(q, kv, l, h, b)
    }
    fn silu_mul(&self, gate_up: &CpuAct) -> CpuAct {
        self.cpu.silu_mul(gate_up)
    }
    fn add_in_place(&self, x: &mut CpuAct, y: &CpuAct) {
        self.cpu.add_in_place(x, y)
    }
    fn select_rows(&self, x: &CpuAct, rows: &[usize]) -> CpuAct {
        self.cpu.select_rows(x, rows)
    }
    fn all_reduce_sum(&self, x: &mut CpuAct) -> Result<(), BackendError> {
        self.cpu.all_reduce_sum(x)
    }
    fn all_gather_cols(&self, x: CpuAct) -> Result<CpuAct, BackendError> {
        self.cpu.all_gather_cols(x)
    }
    fn to_host(&self, x: &CpuAct) -> Vec<f32> {
        note(&self.log, "logits to the host");
        self.cpu.to_host(x)
    }
    fn begin_step_deferred(
        &self,
        _tokens: &[u32],
        _batch: &AttnBatch,
        _logit_rows: &[usize],
        _sampling: &[RowSampling],
    ) -> Option<Result<(), BackendError>> {
        note(&self.log, "deferred step begins");
        None
    }
    fn logits_ready(&self, _logits: &CpuAct) -> Result<(), BackendError> {
        note(&self.log, "logits ready");
        Ok(())
    }
    fn sample(
        &self,
        logits: &CpuAct,
        rows: &[RowSampling],
    ) -> Option<Result<Vec<Sampled>, BackendError>> {
        let masked = rows.iter().filter(|r| r.mask.is_some()).count();
        note(&self.log, format!("sampled ({masked} masked)"));
        Some(Ok(self.sample_host(logits, rows)))
    }
    fn sample_deferred(
        &self,
        logits: Option<&CpuAct>,
        rows: &[RowSampling],
    ) -> Option<Result<Vec<Sampled>, BackendError>> {
        let masked = rows.iter().filter(|r| r.mask.is_some()).count();
        note(
            &self.log,
            format!("deferred rows sampled ({masked} masked)"),
        );
        logits.map(|l| Ok(self.sample_host(l, rows)))
    }
    fn samples_on_device(&self) -> bool {
        true
    }
}

/// The engine's log events, appended to the same log as the backend's calls.
struct Probe(Log);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Probe {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Msg(String);
        impl tracing::field::Visit for Msg {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        let mut m = Msg(String::new());
        event.record(&mut m);
        if m.0 == "masks computed" {
            note(&self.0, m.0);
        }
    }
}

fn requests() -> Vec<(String, SamplingParams)> {
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["name", "n"], "additionalProperties": false});
    let kinds = [
        Some(ConstraintKind::JsonSchema(schema)),
        Some(ConstraintKind::Regex("[0-9]{3,5}-[A-Z]{2}".into())),
        None,
        Some(ConstraintKind::Choice(vec!["north".into(), "south".into()])),
    ];
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, k)| {
            (
                format!("Record {i}:"),
                SamplingParams {
                    temperature: 1.0,
                    seed: Some(40 + i as u64),
                    // The unconstrained one outlives the others: steps with no mask at the end.
                    max_tokens: if i == 2 { 48 } else { 24 },
                    logprobs: (i == 1).then_some(2),
                    constraint: k.map(|k| Arc::new(ConstraintSpec::new("test", k))),
                    ..Default::default()
                },
            )
        })
        .collect()
}

/// Every request on `engine` at once; outputs in request order.
fn run(mut e: Engine) -> Vec<RequestOutput> {
    let tok = e.tokenizer().clone();
    let ids: Vec<u64> = requests()
        .into_iter()
        .map(|(p, sp)| e.add_request(tok.encode(&p, true, false), sp).unwrap())
        .collect();
    let mut done = e.run_to_completion().unwrap();
    done.sort_by_key(|o| ids.iter().position(|&i| i == o.id));
    done
}

#[test]
fn masks_are_computed_after_the_forward_is_queued_and_before_the_rows_are_sampled() {
    let log: Log = Arc::default();
    let src = open_model("random:tiny").unwrap();
    let llama = Llama::load(
        Recording {
            cpu: CpuBackend::default(),
            log: log.clone(),
        },
        src.tensors.as_ref(),
        &src.cfg,
        ShardPlan::SOLO,
        256,
        16,
    )
    .unwrap();
    let cfg = EngineConfig {
        max_batch_size: 4,
        ..Default::default()
    };
    let engine = Engine::new(Box::new(llama), common::tokenizer(), cfg.clone());
    use tracing_subscriber::layer::SubscriberExt;
    let sub = tracing_subscriber::registry().with(Probe(log.clone()));
    let device = tracing::subscriber::with_default(sub, || run(engine));
    let log = log.lock().unwrap().clone();

    // Each constrained step: begun deferred, its forward queued, its logits left where they
    // are, then the masks, then the rows sampled with them (one mask per constrained row).
    let deferred: Vec<usize> = (0..log.len())
        .filter(|&i| log[i] == "deferred step begins")
        .collect();
    assert!(deferred.len() >= 4, "{log:#?}");
    for &i in &deferred {
        assert_eq!(log[i + 1], "forward queued", "{:#?}", &log[i..]);
        assert_eq!(log[i + 2], "logits ready", "{:#?}", &log[i..]);
        assert_eq!(log[i + 3], "masks computed", "{:#?}", &log[i..]);
        assert!(
            log[i + 4].starts_with("deferred rows sampled (") && !log[i + 4].contains("(0 "),
            "{:#?}",
            &log[i..]
        );
    }
    // Masks are computed nowhere else on this backend, and no logits went to the host.
    let masks = log.iter().filter(|l| *l == "masks computed").count();
    assert_eq!(masks, deferred.len(), "{log:#?}");
    assert!(!log.iter().any(|l| l == "logits to the host"), "{log:#?}");
    // Unconstrained steps (the last ones, once the constrained requests are done) keep the
    // one-call path: sampled with no mask.
    assert!(log.iter().any(|l| l == "sampled (0 masked)"), "{log:#?}");

    // The same results as the CPU backend, which masks on the host.
    let host = run(common::engine("random:tiny", cfg, 256, 16));
    assert_eq!(device.len(), 4);
    for (d, h) in device.iter().zip(&host) {
        assert_eq!(d.token_ids, h.token_ids);
        assert_eq!(d.text, h.text);
        assert_eq!(d.finish_reason, h.finish_reason);
        assert_eq!(d.logprobs, h.logprobs);
    }
    assert!(
        regex::Regex::new("^[0-9]{3,5}-[A-Z]{2}$")
            .unwrap()
            .is_match(&device[1].text),
        "{}",
        device[1].text
    );
    assert!(["north", "south"].contains(&device[3].text.as_str()));
}
