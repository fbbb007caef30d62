//! The result record herd writes for one request (generate --json, batch output).

use serde_json::{json, Map, Value};

use crate::engine::RequestOutput;

/// `{id?, text, token_ids, finish_reason, usage, logprobs?, prompt_logprobs?}` for one
/// completion; for n > 1 (`outs`: the samples in order) the completions move into
/// `choices: [{index, text, token_ids, finish_reason, logprobs?}]`. `usage` counts the prompt
/// once and the completions summed, as OpenAI does; `prompt_tokens_details.cached_tokens` is the
/// prompt tokens of the first sample served from the prefix cache (the others share its blocks).
pub fn result_record(id: Option<Value>, outs: &[RequestOutput]) -> Value {
    let mut m = Map::new();
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    let Some(first) = outs.first() else {
        return error_record(m.remove("id"), "internal: a result without completions");
    };
    if outs.len() == 1 {
        completion_fields(&mut m, first);
    } else {
        let choices: Vec<Value> = outs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let mut c = Map::new();
                c.insert("index".into(), json!(i));
                completion_fields(&mut c, o);
                Value::Object(c)
            })
            .collect();
        m.insert("choices".into(), Value::Array(choices));
    }
    m.insert("usage".into(), usage(outs));
    if let Some(plp) = &first.prompt_logprobs {
        m.insert("prompt_logprobs".into(), json!(plp));
    }
    Value::Object(m)
}

/// `{prompt_tokens, completion_tokens, prompt_tokens_details: {cached_tokens}}` of one record's
/// completions (see [`result_record`]).
pub fn usage(outs: &[RequestOutput]) -> Value {
    let prompt = outs.first().map_or(0, |o| o.prompt_tokens);
    let cached = outs.first().map_or(0, |o| o.cached_tokens);
    let completion: usize = outs.iter().map(|o| o.token_ids.len()).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// One completion's `text, token_ids, finish_reason, logprobs?`.
fn completion_fields(m: &mut Map<String, Value>, out: &RequestOutput) {
    m.insert("text".into(), json!(out.text));
    m.insert("token_ids".into(), json!(out.token_ids));
    m.insert("finish_reason".into(), json!(out.finish_reason.as_str()));
    if let Some(lps) = &out.logprobs {
        let v: Vec<Value> = lps
            .iter()
            .map(|lp| {
                let top: Vec<Value> = lp.top.iter().map(|(id, l)| json!([id, l])).collect();
                json!({"token_id": lp.token_id, "logprob": lp.logprob, "top": top})
            })
            .collect();
        m.insert("logprobs".into(), Value::Array(v));
    }
}

/// Add `metadata` (copied from the request) to a record.
pub fn with_metadata(mut record: Value, metadata: Option<Value>) -> Value {
    if let (Some(meta), Value::Object(m)) = (metadata, &mut record) {
        m.insert("metadata".into(), meta);
    }
    record
}

/// The record of a request that could not run: same fields as a result (empty), plus `error`.
pub fn error_record(id: Option<Value>, message: &str) -> Value {
    let mut m = Map::new();
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    m.insert("text".into(), json!(""));
    m.insert("token_ids".into(), json!([]));
    m.insert("finish_reason".into(), json!("error"));
    m.insert(
        "usage".into(),
        json!({"prompt_tokens": 0, "completion_tokens": 0}),
    );
    m.insert("error".into(), json!(message));
    Value::Object(m)
}
