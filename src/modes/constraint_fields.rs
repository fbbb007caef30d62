//! Structured-output request fields, one reader for herd records, OpenAI batch bodies and AIME
//! jobs, and the `generate` / `chat` flags.
//!
//! Spellings read: OpenAI's `response_format` (`{"type": "text" | "json_object" | "json_schema",
//! "json_schema": {"name", "schema", "strict"}}`); vLLM ≥ 0.12's `structured_outputs` (exactly one
//! of `json`, `regex`, `choice`, `grammar`, `json_object: true`); vLLM < 0.12's `guided_json`,
//! `guided_regex`, `guided_choice`, `guided_grammar` (+ `guided_whitespace_pattern`). A record
//! gives at most one of them. Every error starts with the field's name.

use std::sync::Arc;

use anyhow::Result;
use serde_json::{Map, Value};

use crate::engine::constraint::{ConstraintKind, ConstraintSpec};
use crate::exit;

/// Every field this reader takes (the record readers count the others as unknown).
pub const FIELDS: [&str; 8] = [
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_whitespace_pattern",
    // vLLM's choice of its own backend: herd has one, so any value changes nothing.
    "guided_decoding_backend",
];

/// The constraint a record asks for, if any.
pub fn parse(obj: &Map<String, Value>) -> Result<Option<Arc<ConstraintSpec>>, String> {
    let given = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let mut found: Vec<ConstraintSpec> = Vec::new();
    if let Some(v) = given("response_format") {
        found.extend(response_format(v).map_err(|e| format!("response_format: {e}"))?);
    }
    if let Some(v) = given("structured_outputs") {
        found.push(structured_outputs(v).map_err(|e| format!("structured_outputs: {e}"))?);
    }
    for (key, make) in [
        (
            "guided_json",
            json_schema as fn(&Value) -> Result<ConstraintKind, String>,
        ),
        ("guided_regex", regex),
        ("guided_choice", choice),
        ("guided_grammar", grammar),
    ] {
        if let Some(v) = given(key) {
            found.push(ConstraintSpec::new(
                key,
                make(v).map_err(|e| format!("{key}: {e}"))?,
            ));
        }
    }
    let ws = match given("guided_whitespace_pattern") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            return Err(format!(
                "guided_whitespace_pattern: must be a string (a regex), got {v}"
            ))
        }
    };
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|s| s.field.as_str()).collect();
        return Err(format!(
            "{}: give one structured-output field, not {}",
            names[0],
            names.join(" and ")
        ));
    }
    let Some(mut spec) = found.pop() else {
        if ws.is_some() {
            return Err(
                "guided_whitespace_pattern: given without guided_json or another JSON constraint"
                    .into(),
            );
        }
        return Ok(None);
    };
    if ws.is_some() {
        if !is_json(&spec.kind) {
            return Err(format!(
                "guided_whitespace_pattern: applies to JSON constraints, not to {}",
                spec.field
            ));
        }
        spec.whitespace_pattern = ws;
    }
    Ok(Some(Arc::new(spec)))
}

fn is_json(k: &ConstraintKind) -> bool {
    matches!(
        k,
        ConstraintKind::JsonSchema(_) | ConstraintKind::JsonObject
    )
}

/// OpenAI's `response_format`; `{"type": "text"}` constrains nothing.
fn response_format(v: &Value) -> Result<Option<ConstraintSpec>, String> {
    let Value::Object(o) = v else {
        return Err(format!(
            "must be an object such as {{\"type\": \"json_object\"}}, got {v}"
        ));
    };
    let kind = match o.get("type").and_then(Value::as_str) {
        Some("text") => return Ok(None),
        Some("json_object") => ConstraintKind::JsonObject,
        Some("json_schema") => {
            let Some(Value::Object(js)) = o.get("json_schema") else {
                return Err(
                    "type json_schema needs a \"json_schema\": {\"name\", \"schema\"} object"
                        .into(),
                );
            };
            let Some(schema) = js.get("schema") else {
                return Err("json_schema.schema is missing".into());
            };
            json_schema(schema).map_err(|e| format!("json_schema.schema: {e}"))?
        }
        Some(t) => {
            return Err(format!(
                "type {t:?} is not supported (text, json_object or json_schema)"
            ))
        }
        None => return Err("missing \"type\" (text, json_object or json_schema)".into()),
    };
    Ok(Some(ConstraintSpec::new("response_format", kind)))
}

/// vLLM ≥ 0.12's `structured_outputs`: exactly one kind, and the options herd implements.
fn structured_outputs(v: &Value) -> Result<ConstraintSpec, String> {
    let Value::Object(o) = v else {
        return Err(format!(
            "must be an object such as {{\"regex\": \"[0-9]+\"}}, got {v}"
        ));
    };
    let mut kinds = Vec::new();
    let mut whitespace_pattern = None;
    let mut whitespace_flexible = false;
    for (k, v) in o {
        if v.is_null() {
            continue;
        }
        match k.as_str() {
            "json" => kinds.push((k, json_schema(v))),
            "regex" => kinds.push((k, regex(v))),
            "choice" => kinds.push((k, choice(v))),
            "grammar" => kinds.push((k, grammar(v))),
            "json_object" => match v {
                Value::Bool(true) => kinds.push((k, Ok(ConstraintKind::JsonObject))),
                Value::Bool(false) => {}
                _ => return Err(format!("json_object must be true or false, got {v}")),
            },
            "whitespace_pattern" => match v {
                Value::String(s) => whitespace_pattern = Some(s.clone()),
                _ => return Err(format!("whitespace_pattern must be a string, got {v}")),
            },
            // vLLM's default (false) lets JSON have any whitespace; asked for explicitly, herd
            // does so too (unbounded: a weak model may fill max_tokens with it).
            "disable_any_whitespace" => match v {
                Value::Bool(b) => whitespace_flexible = !b,
                _ => return Err(format!("disable_any_whitespace must be a boolean, got {v}")),
            },
            // herd never falls back to another backend: nothing to disable.
            "disable_fallback" => {}
            "structural_tag" => return Err("structural_tag is not supported by herd".into()),
            other => {
                return Err(format!(
                    "unknown field `{other}` (json, regex, choice, grammar, json_object, whitespace_pattern)"
                ))
            }
        }
    }
    let (key, kind) = match kinds.len() {
        0 => return Err("give one of json, regex, choice, grammar or json_object".into()),
        1 => kinds.remove(0),
        _ => {
            let names: Vec<&str> = kinds.iter().map(|(k, _)| k.as_str()).collect();
            return Err(format!("give exactly one of {}", names.join(", ")));
        }
    };
    let kind = kind.map_err(|e| format!("{key}: {e}"))?;
    if (whitespace_pattern.is_some() || whitespace_flexible) && !is_json(&kind) {
        return Err(format!("whitespace options apply to JSON, not to {key}"));
    }
    Ok(ConstraintSpec {
        field: "structured_outputs".into(),
        kind,
        whitespace_pattern,
        whitespace_flexible,
    })
}

/// A schema as an object, or as a JSON string (vLLM accepts both).
fn json_schema(v: &Value) -> Result<ConstraintKind, String> {
    match v {
        Value::Object(_) | Value::Bool(_) => Ok(ConstraintKind::JsonSchema(v.clone())),
        Value::String(s) => serde_json::from_str::<Value>(s)
            .map_err(|e| format!("the schema string is not JSON: {e}"))
            .and_then(|s| json_schema(&s)),
        other => Err(format!("a JSON schema must be an object, got {other}")),
    }
}

fn regex(v: &Value) -> Result<ConstraintKind, String> {
    match v {
        Value::String(s) if !s.is_empty() => Ok(ConstraintKind::Regex(s.clone())),
        _ => Err(format!("must be a non-empty string (a regex), got {v}")),
    }
}

fn choice(v: &Value) -> Result<ConstraintKind, String> {
    let Value::Array(a) = v else {
        return Err(format!("must be a list of strings, got {v}"));
    };
    let c: Vec<String> = a
        .iter()
        .map(|x| x.as_str().map(str::to_string))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("must be a list of strings, got {v}"))?;
    if c.is_empty() {
        return Err("the list of choices is empty".into());
    }
    Ok(ConstraintKind::Choice(c))
}

fn grammar(v: &Value) -> Result<ConstraintKind, String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Ok(ConstraintKind::Lark(s.clone())),
        _ => Err(format!(
            "must be a non-empty string (a Lark grammar), got {v}"
        )),
    }
}

/// The structured-output flags of `generate` and `chat`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ConstraintArgs {
    /// Constrain the output to this JSON schema (a file holding the schema).
    #[arg(long, value_name = "FILE", help_heading = "Structured output")]
    pub json_schema: Option<std::path::PathBuf>,
    /// Constrain the output to a JSON object.
    #[arg(long, help_heading = "Structured output")]
    pub json_object: bool,
    /// Constrain the output to match this regular expression (Rust regex syntax), whole.
    #[arg(long, value_name = "REGEX", help_heading = "Structured output")]
    pub regex: Option<String>,
    /// Constrain the output to exactly one of these strings (repeat the flag).
    #[arg(long, value_name = "TEXT", help_heading = "Structured output")]
    pub choice: Vec<String>,
    /// Constrain the output to this Lark grammar (a file; llguidance's Lark dialect).
    #[arg(long, value_name = "FILE", help_heading = "Structured output")]
    pub grammar: Option<std::path::PathBuf>,
}

impl ConstraintArgs {
    /// The constraint the flags ask for; exit code 2 naming the flag when they are wrong.
    pub fn spec(&self) -> Result<Option<Arc<ConstraintSpec>>> {
        let read = |flag: &str, p: &std::path::Path| {
            std::fs::read_to_string(p)
                .map_err(|e| exit::usage(format!("{flag} {}: {e}", p.display())))
        };
        let mut found: Vec<ConstraintSpec> = Vec::new();
        if let Some(p) = &self.json_schema {
            let text = read("--json-schema", p)?;
            let v: Value = serde_json::from_str(&text).map_err(|e| {
                exit::usage(format!("--json-schema {}: not JSON: {e}", p.display()))
            })?;
            let kind = json_schema(&v).map_err(|e| exit::usage(format!("--json-schema: {e}")))?;
            found.push(ConstraintSpec::new("--json-schema", kind));
        }
        if self.json_object {
            found.push(ConstraintSpec::new(
                "--json-object",
                ConstraintKind::JsonObject,
            ));
        }
        if let Some(r) = &self.regex {
            let kind = regex(&Value::String(r.clone()))
                .map_err(|e| exit::usage(format!("--regex: {e}")))?;
            found.push(ConstraintSpec::new("--regex", kind));
        }
        if !self.choice.is_empty() {
            found.push(ConstraintSpec::new(
                "--choice",
                ConstraintKind::Choice(self.choice.clone()),
            ));
        }
        if let Some(p) = &self.grammar {
            let text = read("--grammar", p)?;
            let kind = grammar(&Value::String(text))
                .map_err(|e| exit::usage(format!("--grammar {}: {e}", p.display())))?;
            found.push(ConstraintSpec::new("--grammar", kind));
        }
        if found.len() > 1 {
            let names: Vec<&str> = found.iter().map(|s| s.field.as_str()).collect();
            return Err(exit::usage(format!(
                "give one structured-output flag, not {}",
                names.join(" and ")
            )));
        }
        Ok(found.pop().map(Arc::new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(v: Value) -> Result<Option<Arc<ConstraintSpec>>, String> {
        match v {
            Value::Object(o) => parse(&o),
            _ => unreachable!(),
        }
    }

    fn kind(v: Value) -> ConstraintKind {
        match p(v) {
            Ok(Some(s)) => s.kind.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_spelling_reads() {
        let schema = json!({"type": "object"});
        assert_eq!(
            kind(json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, "strict": true}}})),
            ConstraintKind::JsonSchema(schema.clone())
        );
        assert_eq!(
            kind(json!({"response_format": {"type": "json_object"}})),
            ConstraintKind::JsonObject
        );
        assert_eq!(p(json!({"response_format": {"type": "text"}})), Ok(None));
        assert_eq!(
            kind(json!({"structured_outputs": {"regex": "[0-9]+"}})),
            ConstraintKind::Regex("[0-9]+".into())
        );
        assert_eq!(
            kind(json!({"structured_outputs": {"choice": ["a", "b"]}})),
            ConstraintKind::Choice(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            kind(json!({"structured_outputs": {"json_object": true}})),
            ConstraintKind::JsonObject
        );
        assert_eq!(
            kind(json!({"guided_json": "{\"type\": \"object\"}"})),
            ConstraintKind::JsonSchema(schema)
        );
        assert_eq!(
            kind(json!({"guided_grammar": "start: \"x\""})),
            ConstraintKind::Lark("start: \"x\"".into())
        );
        let s = p(json!({"guided_json": {"type": "object"}, "guided_whitespace_pattern": " ?"}))
            .unwrap()
            .unwrap();
        assert_eq!(s.whitespace_pattern.as_deref(), Some(" ?"));
        assert_eq!(s.field, "guided_json");
        assert_eq!(p(json!({"prompt": "x"})), Ok(None));
    }

    #[test]
    fn errors_name_the_field() {
        let e = |v| p(v).unwrap_err();
        assert!(e(json!({"response_format": {"type": "yaml"}}))
            .starts_with("response_format: type \"yaml\""));
        assert!(
            e(json!({"response_format": {"type": "json_schema"}})).starts_with("response_format: ")
        );
        assert!(
            e(json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}))
                .starts_with("structured_outputs: give exactly one of")
        );
        assert!(e(json!({"structured_outputs": {"structural_tag": "x"}})).contains("not supported"));
        assert!(e(json!({"guided_choice": [1, 2]})).starts_with("guided_choice: "));
        assert!(e(json!({"guided_regex": "a", "guided_json": {}}))
            .contains("give one structured-output field"));
        assert!(
            e(json!({"guided_regex": "a", "guided_whitespace_pattern": " "}))
                .starts_with("guided_whitespace_pattern: ")
        );
    }
}
