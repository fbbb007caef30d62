//! Answers in OpenAI's batch output format, so files made for the OpenAI Batch API or vLLM's
//! run-batch work unchanged: `{id, custom_id, response: {status_code, request_id, body}, error}`.
//!
//! Ids are derived from the record number, so a resumed run writes the same ids.

use serde_json::{json, Map, Value};

use super::input::{OpenAiEndpoint, OpenAiInfo};
use crate::engine::{RequestOutput, TokenLogprob};
use crate::tokenizer::Tokenizer;

fn token_str(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tok.token_bytes(id).map(<[u8]>::to_vec).unwrap_or_default();
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

fn chat_logprobs(tok: &Tokenizer, lps: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|lp| {
            let (s, b) = token_str(tok, lp.token_id);
            let top: Vec<Value> = lp
                .top
                .iter()
                .map(|&(id, l)| {
                    let (s, b) = token_str(tok, id);
                    json!({"token": s, "logprob": l, "bytes": b})
                })
                .collect();
            json!({"token": s, "logprob": lp.logprob, "bytes": b, "top_logprobs": top})
        })
        .collect();
    json!({ "content": content })
}

fn completion_logprobs(tok: &Tokenizer, lps: &[TokenLogprob]) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let mut text_offset = Vec::new();
    let mut off = 0usize;
    for lp in lps {
        let (s, _) = token_str(tok, lp.token_id);
        text_offset.push(off);
        off += s.len();
        tokens.push(s);
        token_logprobs.push(lp.logprob);
        let mut top = Map::new();
        for &(id, l) in &lp.top {
            top.insert(token_str(tok, id).0, json!(l));
        }
        top_logprobs.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset})
}

/// A finished request (its `n` completions, in order) as an OpenAI batch output line. `model`
/// is the name of the model that answered (`--served-model-name`), whatever the request named.
pub fn success(
    index: u64,
    custom_id: &Value,
    info: &OpenAiInfo,
    model: &str,
    created: u64,
    tok: &Tokenizer,
    outs: &[RequestOutput],
) -> Value {
    let mut usage = crate::modes::record::usage(outs);
    let total = usage["prompt_tokens"].as_u64().unwrap_or(0)
        + usage["completion_tokens"].as_u64().unwrap_or(0);
    usage["total_tokens"] = json!(total);
    let choices: Vec<Value> = outs
        .iter()
        .enumerate()
        .map(|(i, out)| {
            let finish = out.finish_reason.as_str();
            match info.endpoint {
                OpenAiEndpoint::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": out.text},
                    "logprobs": out.logprobs.as_deref().map(|l| chat_logprobs(tok, l)),
                    "finish_reason": finish,
                }),
                OpenAiEndpoint::Completions => json!({
                    "index": i,
                    "text": out.text,
                    "logprobs": out.logprobs.as_deref().map(|l| completion_logprobs(tok, l)),
                    "finish_reason": finish,
                }),
            }
        })
        .collect();
    let (id, object) = match info.endpoint {
        OpenAiEndpoint::Chat => (format!("chatcmpl-{index}"), "chat.completion"),
        OpenAiEndpoint::Completions => (format!("cmpl-{index}"), "text_completion"),
    };
    let body = json!({
        "id": id,
        "object": object,
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    });
    json!({
        "id": format!("batch_req_{index}"),
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": format!("req_{index}"), "body": body},
        "error": null,
    })
}

/// A request that could not run, as OpenAI reports a 400: in `response.body.error` and `error`.
pub fn failure(index: u64, custom_id: &Value, message: &str) -> Value {
    json!({
        "id": format!("batch_req_{index}"),
        "custom_id": custom_id,
        "response": {
            "status_code": 400,
            "request_id": format!("req_{index}"),
            "body": {"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}},
        },
        "error": {"code": "invalid_request", "message": message},
    })
}
