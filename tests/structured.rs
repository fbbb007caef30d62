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
    let cfg = EngineConfig {
        max_batch_size: batch,
        ..Default::default()
    };
    let mut e = common::engine("random:tiny", cfg, 512, 16);
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
    done
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
