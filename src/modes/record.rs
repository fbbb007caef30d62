//! The result record herd writes for one request (generate --json, batch output).

use serde_json::{json, Map, Value};

use crate::engine::RequestOutput;

/// `{id?, text, token_ids, finish_reason, usage, logprobs?, prompt_logprobs?}`.
pub fn result_record(id: Option<Value>, out: &RequestOutput) -> Value {
    let mut m = Map::new();
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    m.insert("text".into(), json!(out.text));
    m.insert("token_ids".into(), json!(out.token_ids));
    m.insert("finish_reason".into(), json!(out.finish_reason.as_str()));
    m.insert(
        "usage".into(),
        json!({"prompt_tokens": out.prompt_tokens, "completion_tokens": out.token_ids.len()}),
    );
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
    if let Some(plp) = &out.prompt_logprobs {
        m.insert("prompt_logprobs".into(), json!(plp));
    }
    Value::Object(m)
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
