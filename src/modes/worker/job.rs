//! One AIME job record → prompt tokens and sampling parameters, as llama3_chat reads them:
//! `chat_context` (a list of messages, or that list as a JSON string) in the chat format with
//! `prompt_input` appended as a user message; or `text_context` as a raw completion prompt.

use serde_json::Value;

use crate::engine::SamplingParams;
use crate::tokenizer::{Message, Role, Tokenizer};

/// llama3_chat's sampling defaults for keys a job leaves out.
pub const DEFAULT_TOP_K: usize = 40;
pub const DEFAULT_TOP_P: f32 = 0.9;
pub const DEFAULT_TEMPERATURE: f32 = 0.8;
pub const DEFAULT_MAX_GEN_TOKENS: usize = 500;

/// A job ready for the engine.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub job_id: String,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Chat turns dropped to fit the context (0 when it fit).
    pub trimmed_turns: usize,
}

/// Why a job cannot run. `job_id` is `None` when the record has none (nothing to answer).
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{msg}")]
pub struct JobError {
    pub job_id: Option<String>,
    pub msg: String,
}

/// The job's id, if it has a usable one (a string, or a number as the server may send).
pub fn job_id(v: &Value) -> Option<String> {
    match v.get("job_id")? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Convert one job record; `max_len` is the longest sequence (prompt + answer) the engine allows.
pub fn parse_job(v: &Value, tok: &Tokenizer, max_len: usize) -> Result<Job, JobError> {
    let id = job_id(v);
    let fail = |msg: String| JobError {
        job_id: id.clone(),
        msg,
    };
    if !v.is_object() {
        return Err(fail(format!("a job must be a JSON object, got {v}")));
    }
    let Some(job_id) = id.clone() else {
        return Err(fail("the job has no job_id".into()));
    };
    let params = params(v).map_err(&fail)?;
    let prompt_input = match v.get("prompt_input") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()).filter(|s| !s.trim().is_empty()),
        Some(other) => return Err(fail(format!("prompt_input must be a string, got {other}"))),
    };
    let chat = match v.get("chat_context") {
        None | Some(Value::Null) => None,
        Some(c) => Some(chat_context(c).map_err(&fail)?),
    };
    let text = match v.get("text_context") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(fail(format!("text_context must be a string, got {other}"))),
    };
    // Room kept for the answer when trimming (as the console chat does).
    let room = params.max_tokens.min(max_len / 2).max(1);
    let (prompt, trimmed_turns) = match (chat, text) {
        (Some(_), Some(_)) => {
            return Err(fail(
                "give either chat_context or text_context, not both".into(),
            ))
        }
        (None, Some(text)) => {
            let mut t = text;
            if let Some(p) = prompt_input {
                t.push_str(&p);
            }
            if t.is_empty() {
                return Err(fail("text_context is empty".into()));
            }
            let ids = tok.encode(&t, true, false);
            if ids.len() >= max_len {
                return Err(fail(format!(
                    "text_context has {} tokens but the context holds {max_len}; shorten it",
                    ids.len()
                )));
            }
            (ids, 0)
        }
        (chat, None) => {
            let mut msgs = chat.unwrap_or_default();
            if let Some(p) = prompt_input {
                msgs.push(Message::new(Role::User, p));
            }
            if msgs.is_empty() {
                return Err(fail(
                    "the job has no chat_context, text_context or prompt_input".into(),
                ));
            }
            fit_dialog(msgs, tok, max_len, room).map_err(&fail)?
        }
    };
    let mut params = params;
    // max_gen_tokens is honoured exactly unless the context ends first.
    params.max_tokens = params.max_tokens.min(max_len - prompt.len());
    Ok(Job {
        job_id,
        prompt,
        params,
        trimmed_turns,
    })
}

fn chat_context(c: &Value) -> Result<Vec<Message>, String> {
    let parsed;
    let list = match c {
        Value::Array(a) => a,
        // Some clients send the list as a JSON string.
        Value::String(s) => {
            parsed = serde_json::from_str::<Value>(s)
                .map_err(|e| format!("chat_context is a string but not a JSON list: {e}"))?;
            parsed
                .as_array()
                .ok_or_else(|| "chat_context must be a list of messages".to_string())?
        }
        other => {
            return Err(format!(
                "chat_context must be a list of messages, got {other}"
            ))
        }
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
                format!("chat_context[{i}] needs a \"role\" string ({{\"role\": \"user\", \"content\": \"...\"}})")
            })?;
            let role = Role::parse(role).map_err(|e| format!("chat_context[{i}]: {e}"))?;
            let content = m
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("chat_context[{i}] needs a \"content\" string"))?;
            Ok(Message::new(role, content))
        })
        .collect()
}

/// Encode the dialog, dropping the oldest non-system messages until `room` tokens remain for the
/// answer. The last message is never dropped.
fn fit_dialog(
    mut msgs: Vec<Message>,
    tok: &Tokenizer,
    max_len: usize,
    room: usize,
) -> Result<(Vec<u32>, usize), String> {
    let mut dropped = 0;
    loop {
        let ids = tok.encode_dialog(&msgs);
        if ids.len() + room <= max_len {
            return Ok((ids, dropped));
        }
        let last = msgs.len().saturating_sub(1);
        match msgs[..last].iter().position(|m| m.role != Role::System) {
            Some(i) => {
                msgs.remove(i);
                dropped += 1;
            }
            None => {
                return Err(format!(
                    "the chat has {} tokens and the answer needs {room} more, but the context holds {max_len} \
                     (nothing left to trim but the system prompt and the last message)",
                    ids.len()
                ))
            }
        }
    }
}

fn params(v: &Value) -> Result<SamplingParams, String> {
    let top_k = match v.get("top_k") {
        None | Some(Value::Null) => DEFAULT_TOP_K,
        Some(x) => x
            .as_u64()
            .map(|k| k as usize)
            .ok_or_else(|| format!("top_k must be a non-negative integer, got {x}"))?,
    };
    let float = |key: &str, default: f32| -> Result<f32, String> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x
                .as_f64()
                .map(|f| f as f32)
                .ok_or_else(|| format!("{key} must be a number, got {x}")),
        }
    };
    let max_tokens = match v.get("max_gen_tokens") {
        None | Some(Value::Null) => DEFAULT_MAX_GEN_TOKENS,
        Some(x) => x
            .as_u64()
            .filter(|&n| n >= 1)
            .map(|n| n as usize)
            .ok_or_else(|| format!("max_gen_tokens must be an integer >= 1, got {x}"))?,
    };
    let seed = match v.get("seed") {
        None | Some(Value::Null) => None,
        Some(x) => Some(
            x.as_u64()
                .ok_or_else(|| format!("seed must be a non-negative integer, got {x}"))?,
        ),
    };
    let p = SamplingParams {
        temperature: float("temperature", DEFAULT_TEMPERATURE)?,
        top_p: float("top_p", DEFAULT_TOP_P)?,
        top_k,
        seed,
        max_tokens,
        // Structured output: the batch fields, when the job has them.
        constraint: v
            .as_object()
            .map(crate::modes::constraint_fields::parse)
            .transpose()?
            .flatten(),
        ..SamplingParams::default()
    };
    p.validate()?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tok() -> Tokenizer {
        match crate::tokenizer::load_default() {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn chat_context_list_string_and_prompt_input_agree() {
        let t = tok();
        let msgs =
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]);
        let a = parse_job(&json!({"job_id": "a", "chat_context": msgs}), &t, 512).unwrap();
        let b = parse_job(
            &json!({"job_id": "b", "chat_context": msgs.to_string()}),
            &t,
            512,
        )
        .unwrap();
        let c = parse_job(
            &json!({"job_id": "c", "chat_context": [{"role": "system", "content": "Be brief."}], "prompt_input": "Hi"}),
            &t,
            512,
        )
        .unwrap();
        assert_eq!(a.prompt, b.prompt);
        assert_eq!(a.prompt, c.prompt);
        let expected = t.encode_dialog(&[
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "Hi"),
        ]);
        assert_eq!(a.prompt, expected);
    }

    #[test]
    fn text_context_is_a_raw_completion_and_params_are_per_job() {
        let t = tok();
        let j = parse_job(
            &json!({"job_id": 7, "text_context": "Once upon", "top_k": 3, "top_p": 0.5,
                    "temperature": 0.1, "max_gen_tokens": 9, "unknown_key": [1]}),
            &t,
            512,
        )
        .unwrap();
        assert_eq!(j.job_id, "7");
        assert_eq!(j.prompt, t.encode("Once upon", true, false));
        assert_eq!(
            (
                j.params.top_k,
                j.params.top_p,
                j.params.temperature,
                j.params.max_tokens
            ),
            (3, 0.5, 0.1, 9)
        );
    }

    #[test]
    fn jobs_take_the_structured_output_fields() {
        let t = tok();
        let j = parse_job(
            &json!({"job_id": "s", "text_context": "x", "guided_regex": "[0-9]{3}"}),
            &t,
            512,
        )
        .unwrap();
        let c = j.params.constraint.expect("a constraint");
        assert_eq!(
            (c.field.as_str(), &c.kind),
            (
                "guided_regex",
                &crate::engine::constraint::ConstraintKind::Regex("[0-9]{3}".into())
            )
        );
        let e = parse_job(
            &json!({"job_id": "s", "text_context": "x", "response_format": {"type": "yaml"}}),
            &t,
            512,
        )
        .unwrap_err();
        assert_eq!(e.job_id.as_deref(), Some("s"));
        assert!(e.msg.starts_with("response_format: "), "{}", e.msg);
    }

    #[test]
    fn malformed_jobs_say_why() {
        let t = tok();
        let cases = [
            (json!({"job_id": "x", "chat_context": 5}), "chat_context"),
            (json!({"job_id": "x", "chat_context": "[oops"}), "JSON"),
            (
                json!({"job_id": "x", "chat_context": [{"role": "wizard", "content": "hi"}]}),
                "wizard",
            ),
            (
                json!({"job_id": "x", "prompt_input": "hi", "temperature": "hot"}),
                "temperature",
            ),
            (
                json!({"job_id": "x", "prompt_input": "hi", "max_gen_tokens": 0}),
                "max_gen_tokens",
            ),
            (json!({"job_id": "x"}), "no chat_context"),
        ];
        for (v, want) in cases {
            let e = parse_job(&v, &t, 512).unwrap_err();
            assert_eq!(e.job_id.as_deref(), Some("x"));
            assert!(e.msg.contains(want), "{} lacks {want}", e.msg);
        }
        assert_eq!(
            parse_job(&json!({"prompt_input": "hi"}), &t, 512)
                .unwrap_err()
                .job_id,
            None
        );
    }

    #[test]
    fn long_chats_lose_their_oldest_turns_but_keep_the_system_prompt() {
        let t = tok();
        let long = "word ".repeat(60);
        let v = json!({"job_id": "x", "max_gen_tokens": 20, "chat_context": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": long},
            {"role": "assistant", "content": long},
            {"role": "user", "content": "last"},
        ]});
        let j = parse_job(&v, &t, 100).unwrap();
        assert_eq!(j.trimmed_turns, 2);
        let want = t.encode_dialog(&[
            Message::new(Role::System, "S"),
            Message::new(Role::User, "last"),
        ]);
        assert_eq!(j.prompt, want);
        // A last message that cannot fit is an error, not a silent cut.
        let v = json!({"job_id": "y", "prompt_input": long, "max_gen_tokens": 20});
        assert!(parse_job(&v, &t, 40).unwrap_err().msg.contains("context"));
    }
}
