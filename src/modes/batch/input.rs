//! Input formats: herd JSONL, OpenAI batch JSONL and CSV, read as a stream of records.
//!
//! Parsing one record never fails the run: whatever is wrong with a line becomes an error item
//! for that line (which the writer turns into an error record), so every input record produces
//! exactly one output record.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde_json::{Map, Value};

pub use super::detect::detect_format;
use super::detect::{open_skipping_bom, table_delimiter};
use super::ignored::Ignored;
use crate::engine::SamplingParams;
use crate::modes::constraint_fields;
use crate::tokenizer::{Message, Role, Tokenizer};

/// Which kind of file the input is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    /// One herd request object per line.
    Herd,
    /// OpenAI Batch API lines (`custom_id`, `method`, `url`, `body`).
    Openai,
    /// A table with a prompt column: comma-separated, or tab-separated when named .tsv (or,
    /// under another name, when its header line has tabs and no commas).
    Csv,
}

impl InputFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            InputFormat::Herd => "herd",
            InputFormat::Openai => "openai",
            InputFormat::Csv => "csv",
        }
    }
}

/// Which OpenAI endpoint a request names; decides the shape of its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenAiEndpoint {
    Chat,
    Completions,
}

/// What an OpenAI request needs beside its prompt to be answered in OpenAI's format.
#[derive(Clone, Debug)]
pub struct OpenAiInfo {
    pub endpoint: OpenAiEndpoint,
}

/// A prompt ready for the engine.
#[derive(Clone, Debug)]
pub struct Ready {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Completions of this prompt (samples with seeds seed, seed + 1, ...).
    pub n: usize,
    pub openai: Option<OpenAiInfo>,
}

/// One input record, parsed.
#[derive(Debug)]
pub struct Item {
    /// 0-based record number (blank lines are not records).
    pub index: u64,
    /// 1-based line of the file where the record starts, for messages.
    pub line: u64,
    /// The record's id: its own, or the line number.
    pub id: Value,
    pub metadata: Option<Value>,
    pub body: Result<Ready, String>,
}

/// How records become engine requests.
#[derive(Clone, Debug)]
pub struct ParseOptions {
    pub format: InputFormat,
    /// Defaults from the command line; a record's own fields override them.
    pub defaults: SamplingParams,
    /// Default completions per prompt (`--n`).
    pub n: usize,
    /// Longest sequence the engine accepts (prompt + generation).
    pub max_len: usize,
    /// Drop a too-long prompt's oldest tokens instead of failing the record.
    pub truncate_left: bool,
    pub prompt_column: Option<String>,
    pub id_column: Option<String>,
    /// What herd ignores in a record becomes that record's error (`--strict`).
    pub strict: bool,
    /// The output is CSV, which holds no log-probs.
    pub csv_output: bool,
    /// The model name OpenAI answers carry (`--served-model-name`).
    pub served_model: String,
}

/// A chunk of the input's records, 1-based and inclusive (`--records FIRST-LAST`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRange {
    pub first: u64,
    /// `None`: to the end of the file.
    pub last: Option<u64>,
}

impl RecordRange {
    pub fn parse(s: &str) -> Result<RecordRange, String> {
        let bad = || format!("`{s}`: expected FIRST-LAST or FIRST- (1-based record numbers)");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let first: u64 = a.trim().parse().map_err(|_| bad())?;
        let last = match b.trim() {
            "" => None,
            b => Some(b.parse::<u64>().map_err(|_| bad())?),
        };
        if first == 0 {
            return Err(format!("`{s}`: records are numbered from 1"));
        }
        if last.is_some_and(|l| l < first) {
            return Err(format!("`{s}`: LAST is before FIRST"));
        }
        Ok(RecordRange { first, last })
    }

    /// Whether the 0-based file record `i` is in the range.
    pub fn contains(&self, i: u64) -> bool {
        i + 1 >= self.first && self.last.is_none_or(|l| i < l)
    }

    /// Whether the 0-based file record `i` lies after the range (reading can stop).
    pub fn is_past(&self, i: u64) -> bool {
        self.last.is_some_and(|l| i >= l)
    }

    /// How many of a file's `total` records fall in the range.
    pub fn count_of(&self, total: u64) -> u64 {
        let end = self.last.map_or(total, |l| l.min(total));
        end.saturating_sub(self.first - 1)
    }

    pub fn label(&self) -> String {
        match self.last {
            Some(l) => format!("{}-{l}", self.first),
            None => format!("{}-", self.first),
        }
    }
}

/// Number of records in the file (a fast pass, for the progress bar and the merge check).
pub fn count_records(path: &Path, format: InputFormat) -> std::io::Result<u64> {
    let file = open_skipping_bom(path)?;
    match format {
        InputFormat::Csv => {
            let mut rdr = table_reader(path, file)?;
            let mut rec = csv::ByteRecord::new();
            let mut n = 0;
            // A malformed row still counts as a record (it becomes an error record).
            loop {
                match rdr.read_byte_record(&mut rec) {
                    Ok(true) => n += 1,
                    Ok(false) => break,
                    Err(e) if e.is_io_error() => return Err(std::io::Error::other(e)),
                    Err(_) => n += 1,
                }
            }
            Ok(n)
        }
        _ => {
            let mut r = file;
            let mut n = 0;
            let mut blank = true;
            loop {
                let chunk = r.fill_buf()?;
                if chunk.is_empty() {
                    break;
                }
                for &b in chunk {
                    if b == b'\n' {
                        if !blank {
                            n += 1;
                        }
                        blank = true;
                    } else if !b.is_ascii_whitespace() {
                        blank = false;
                    }
                }
                let len = chunk.len();
                r.consume(len);
            }
            Ok(n + u64::from(!blank))
        }
    }
}

/// Raw records in file order, before any parsing of their content.
pub enum RawRecord {
    /// A JSONL line (may be invalid UTF-8 or invalid JSON).
    Line(Vec<u8>),
    /// A CSV row: its 1-based number among the data rows (the default id), and its fields or
    /// why they could not be read.
    Row {
        row: u64,
        fields: Result<Vec<String>, String>,
    },
}

/// A CSV reader of a table input (flexible: a short row is that record's error, not the run's).
fn table_reader<R: Read>(path: &Path, r: R) -> std::io::Result<csv::Reader<R>> {
    Ok(csv::ReaderBuilder::new()
        .flexible(true)
        .delimiter(table_delimiter(path)?)
        .from_reader(r))
}

/// The columns of a CSV input copied to each record (all but the prompt and id columns), in the
/// file's order: the CSV output gives each its own column. `None` for JSONL input.
pub fn extra_columns(
    path: &Path,
    format: InputFormat,
    prompt_column: Option<&str>,
    id_column: Option<&str>,
) -> anyhow::Result<Option<Vec<String>>> {
    if format != InputFormat::Csv {
        return Ok(None);
    }
    let reader = RecordReader::open(path, format)?;
    let prompt = prompt_column.unwrap_or("prompt");
    let mut cols: Vec<String> = Vec::new();
    for h in reader.headers() {
        if h != prompt && Some(h.as_str()) != id_column && !cols.contains(h) {
            cols.push(h.clone());
        }
    }
    Ok(Some(cols))
}

/// Streams records (one at a time; nothing is held beyond the current record).
pub struct RecordReader {
    inner: ReaderKind,
    /// JSONL: lines read; CSV: data rows read.
    line: u64,
}

enum ReaderKind {
    Lines(BufReader<Box<dyn Read + Send>>),
    Csv {
        rdr: csv::Reader<BufReader<Box<dyn Read + Send>>>,
        headers: Vec<String>,
    },
}

impl RecordReader {
    pub fn open(path: &Path, format: InputFormat) -> anyhow::Result<RecordReader> {
        let file = open_skipping_bom(path)?;
        let inner = match format {
            InputFormat::Csv => {
                let mut rdr = table_reader(path, file)?;
                let headers = rdr
                    .headers()
                    .map_err(|e| anyhow::anyhow!("reading the CSV header: {e}"))?
                    .iter()
                    .map(|h| h.trim().to_string())
                    .collect();
                ReaderKind::Csv { rdr, headers }
            }
            _ => ReaderKind::Lines(file),
        };
        Ok(RecordReader { inner, line: 0 })
    }

    /// CSV column names (empty for JSONL).
    pub fn headers(&self) -> &[String] {
        match &self.inner {
            ReaderKind::Csv { headers, .. } => headers,
            ReaderKind::Lines(_) => &[],
        }
    }

    /// The next record and the 1-based line of the file where it starts; `None` at the end.
    pub fn next_record(&mut self) -> std::io::Result<Option<(u64, RawRecord)>> {
        match &mut self.inner {
            ReaderKind::Lines(r) => loop {
                let mut buf = Vec::new();
                if r.read_until(b'\n', &mut buf)? == 0 {
                    return Ok(None);
                }
                self.line += 1;
                if buf.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some((self.line, RawRecord::Line(buf))));
            },
            ReaderKind::Csv { rdr, .. } => {
                let mut rec = csv::ByteRecord::new();
                // Where the record starts: a quoted field may span lines, so rows and lines differ.
                let start = rdr.position().line();
                let row = self.line + 1;
                match rdr.read_byte_record(&mut rec) {
                    Ok(false) => Ok(None),
                    Ok(true) => {
                        self.line = row;
                        let line = rec.position().map_or(start, csv::Position::line);
                        let fields: Result<Vec<String>, String> = rec
                            .iter()
                            .enumerate()
                            .map(|(i, f)| {
                                String::from_utf8(f.to_vec())
                                    .map_err(|_| format!("column {} is not valid UTF-8", i + 1))
                            })
                            .collect();
                        Ok(Some((line, RawRecord::Row { row, fields })))
                    }
                    Err(e) if e.is_io_error() => Err(std::io::Error::other(e)),
                    Err(e) => {
                        self.line = row;
                        let line = e.position().map_or(start, csv::Position::line);
                        let fields = Err(e.to_string());
                        Ok(Some((line, RawRecord::Row { row, fields })))
                    }
                }
            }
        }
    }
}

/// A record's id and content, before tokenization.
pub struct Parsed {
    /// The record's own id, or its line number (both take part in the duplicate check).
    pub id: Value,
    pub metadata: Option<Value>,
    pub content: Result<Content, String>,
    /// What herd ignored in it (counted over the run; errors under `--strict`).
    pub notes: Vec<Ignored>,
}

impl Parsed {
    fn failed(id: Value, msg: String) -> Parsed {
        Parsed {
            id,
            metadata: None,
            content: Err(msg),
            notes: Vec::new(),
        }
    }
}

/// What to tokenize and how to sample it.
pub struct Content {
    pub prompt: PromptSpec,
    pub params: SamplingParams,
    pub n: usize,
    pub openai: Option<OpenAiInfo>,
}

pub enum PromptSpec {
    Text(String),
    Messages(Vec<Message>),
    Ids(Vec<u32>),
}

/// Parse one raw record (cheap: no tokenization).
pub fn parse_record(raw: RawRecord, line: u64, opts: &ParseOptions, headers: &[String]) -> Parsed {
    let default_id = Value::from(line);
    let mut parsed = match raw {
        RawRecord::Line(bytes) => {
            let text = match std::str::from_utf8(&bytes) {
                Ok(t) => t,
                Err(e) => {
                    return Parsed::failed(
                        default_id,
                        format!("line {line}: not valid UTF-8 ({e})"),
                    )
                }
            };
            let v: Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(e) => {
                    return Parsed::failed(default_id, format!("line {line}: invalid JSON: {e}"))
                }
            };
            let Value::Object(obj) = v else {
                return Parsed::failed(default_id, format!("line {line}: expected a JSON object"));
            };
            match opts.format {
                InputFormat::Openai => parse_openai(obj, line, opts),
                _ => parse_herd(obj, line, default_id, opts),
            }
        }
        RawRecord::Row { row, fields } => parse_csv_row(fields, row, line, opts, headers),
    };
    if opts.csv_output {
        if let Ok(c) = &parsed.content {
            if c.n > 1 {
                parsed.content = Err(format!(
                    "line {line}: n = {}: a CSV output holds one completion per row; write JSONL \
                     (--output *.jsonl) for n > 1",
                    c.n
                ));
                return parsed;
            }
            if c.params.logprobs.is_some() || c.params.prompt_logprobs {
                parsed.notes.push(Ignored::LogprobsInCsv);
            }
        }
    }
    if opts.strict && parsed.content.is_ok() {
        let errors: Vec<String> = parsed
            .notes
            .iter()
            .filter_map(Ignored::strict_error)
            .collect();
        if !errors.is_empty() {
            parsed.content = Err(format!("line {line}: {} (--strict)", errors.join("; ")));
        }
    }
    parsed
}

/// Fields of a herd record.
const HERD_FIELDS: [&str; 16] = [
    "id",
    "metadata",
    "prompt",
    "messages",
    "prompt_token_ids",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "logprobs",
    "prompt_logprobs",
    "ignore_eos",
    "skip_special_tokens",
    "n",
];

/// Most completions one record may ask for (OpenAI's limit).
pub const MAX_N: u64 = 128;

/// A record's `n`, checked.
fn opt_n(obj: &Map<String, Value>) -> Result<Option<usize>, String> {
    match opt_uint(obj, "n")? {
        Some(n) if !(1..=MAX_N).contains(&n) => Err(format!(
            "`n` must be in 1..={MAX_N} (completions of the prompt), got {n}"
        )),
        n => Ok(n.map(|n| n as usize)),
    }
}

/// Fields of `obj` not in `known` (a null value sets nothing and is not reported), by name
/// (serde_json's map keeps the file's order: llguidance turns on `preserve_order`).
fn unknown_fields(obj: &Map<String, Value>, known: &[&str]) -> Vec<Ignored> {
    let mut fields: Vec<(&String, &Value)> = obj.iter().collect();
    fields.sort_by_key(|(k, _)| k.as_str());
    fields
        .into_iter()
        .filter(|(k, v)| {
            !v.is_null()
                && !known.contains(&k.as_str())
                && !constraint_fields::FIELDS.contains(&k.as_str())
        })
        .map(|(k, _)| Ignored::UnknownField(k.clone()))
        .collect()
}

fn parse_herd(
    mut obj: Map<String, Value>,
    line: u64,
    default_id: Value,
    opts: &ParseOptions,
) -> Parsed {
    let d = &opts.defaults;
    let notes = unknown_fields(&obj, &HERD_FIELDS);
    let metadata = obj.remove("metadata");
    let (id, id_err) = match obj.remove("id") {
        None | Some(Value::Null) => (default_id, None),
        Some(v @ (Value::String(_) | Value::Number(_))) => (v, None),
        Some(other) => (
            default_id,
            Some(format!(
                "field `id` must be a string or a number, got {}",
                type_name(&other)
            )),
        ),
    };
    let content =
        (|| {
            if let Some(e) = id_err {
                return Err(e);
            }
            let present: Vec<&str> = ["prompt", "messages", "prompt_token_ids"]
                .into_iter()
                .filter(|k| obj.get(*k).is_some_and(|v| !v.is_null()))
                .collect();
            let prompt =
                match present.as_slice() {
                    [] => return Err(
                        "no prompt: give exactly one of `prompt`, `messages` or `prompt_token_ids`"
                            .to_string(),
                    ),
                    ["prompt"] => PromptSpec::Text(string_field(&obj, "prompt")?),
                    ["messages"] => PromptSpec::Messages(messages_field(&obj["messages"])?),
                    ["prompt_token_ids"] => {
                        PromptSpec::Ids(ids_field(&obj["prompt_token_ids"], "prompt_token_ids")?)
                    }
                    many => {
                        return Err(format!(
                    "give exactly one of `prompt`, `messages` or `prompt_token_ids`, not {}",
                    many.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(" and ")
                ))
                    }
                };
            let mut p = d.clone();
            if let Some(n) = opt_uint(&obj, "max_tokens")? {
                p.max_tokens = n as usize;
            }
            if let Some(x) = opt_f32(&obj, "temperature")? {
                p.temperature = x;
            }
            if let Some(x) = opt_f32(&obj, "top_p")? {
                p.top_p = x;
            }
            if let Some(n) = opt_uint(&obj, "top_k")? {
                p.top_k = n as usize;
            }
            if let Some(n) = opt_uint(&obj, "seed")? {
                p.seed = Some(n);
            }
            if let Some(s) = opt_stop(&obj, "stop")? {
                p.stop = s;
            }
            if let Some(n) = opt_uint(&obj, "logprobs")? {
                p.logprobs = Some(n as usize);
            }
            if let Some(b) = opt_bool(&obj, "prompt_logprobs")? {
                p.prompt_logprobs = b;
            }
            if let Some(b) = opt_bool(&obj, "ignore_eos")? {
                p.ignore_eos = b;
            }
            if let Some(b) = opt_bool(&obj, "skip_special_tokens")? {
                p.skip_special_tokens = b;
            }
            p.constraint = constraint_fields::parse(&obj)?;
            Ok(Content {
                prompt,
                params: p,
                n: opt_n(&obj)?.unwrap_or(opts.n),
                openai: None,
            })
        })()
        .map_err(|e| format!("line {line}: {e}"));
    Parsed {
        id,
        metadata,
        content,
        notes,
    }
}

/// Top-level fields of an OpenAI batch line.
const OPENAI_LINE_FIELDS: [&str; 4] = ["custom_id", "method", "url", "body"];

/// Body fields herd reads (`top_k`, `ignore_eos`, `skip_special_tokens`, `stop_token_ids`:
/// vLLM's extensions).
const OPENAI_BODY_FIELDS: [&str; 16] = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "logprobs",
    "top_logprobs",
    "n",
    "ignore_eos",
    "skip_special_tokens",
    "stop_token_ids",
];
/// Body fields that do not change the answer of a batch request.
const OPENAI_INERT_FIELDS: [&str; 6] = [
    "user",
    "store",
    "metadata",
    "service_tier",
    "stream",
    "stream_options",
];

/// OpenAI and vLLM request fields herd does not implement, with the value that changes nothing
/// (`None`: any value changes the answer). Set to anything else, they are reported.
fn unimplemented_default(key: &str) -> Option<Option<Value>> {
    use serde_json::json;
    Some(match key {
        "frequency_penalty" | "presence_penalty" | "min_p" | "min_tokens" | "length_penalty" => {
            Some(json!(0))
        }
        "repetition_penalty" | "best_of" => Some(json!(1)),
        "logit_bias" => Some(json!({})),
        "echo" | "use_beam_search" | "include_stop_str_in_output" => Some(json!(false)),
        "suffix" => Some(json!("")),
        "tools" | "functions" | "modalities" | "bad_words" => Some(json!([])),
        "tool_choice" | "function_call" => Some(json!("none")),
        "parallel_tool_calls" => None,
        "reasoning_effort"
        | "prediction"
        | "audio"
        | "web_search_options"
        | "prompt_logprobs"
        | "truncate_prompt_tokens"
        | "logits_processors" => None,
        _ => return None,
    })
}

/// What herd ignores in an OpenAI line and its body.
fn openai_notes(obj: &Map<String, Value>, body: Option<&Map<String, Value>>) -> Vec<Ignored> {
    let mut notes = unknown_fields(obj, &OPENAI_LINE_FIELDS);
    let Some(body) = body else {
        return notes;
    };
    let mut fields: Vec<(&String, &Value)> = body.iter().collect();
    fields.sort_by_key(|(k, _)| k.as_str());
    for (k, v) in fields {
        if v.is_null()
            || OPENAI_BODY_FIELDS.contains(&k.as_str())
            || OPENAI_INERT_FIELDS.contains(&k.as_str())
            || constraint_fields::FIELDS.contains(&k.as_str())
        {
            continue;
        }
        match unimplemented_default(k) {
            // Equal as numbers too: 0 and 0.0 are both "no penalty".
            Some(Some(neutral))
                if *v == neutral || (v.as_f64().is_some() && v.as_f64() == neutral.as_f64()) => {}
            Some(_) => notes.push(Ignored::Unimplemented(k.clone())),
            None => notes.push(Ignored::UnknownField(format!("body.{k}"))),
        }
    }
    notes
}

fn parse_openai(obj: Map<String, Value>, line: u64, opts: &ParseOptions) -> Parsed {
    let d = &opts.defaults;
    // A line without a usable custom_id is still answered (an error line), with a null id.
    let (id, id_err) = match obj.get("custom_id") {
        Some(Value::String(s)) => (Value::String(s.clone()), None),
        Some(other) => (
            Value::Null,
            Some(format!(
                "field `custom_id` must be a string, got {}",
                type_name(other)
            )),
        ),
        None => (Value::Null, Some("missing field `custom_id`".to_string())),
    };
    let body_obj = match obj.get("body") {
        Some(Value::Object(b)) => Some(b),
        _ => None,
    };
    let mut notes = openai_notes(&obj, body_obj);
    if let Some(m) = body_obj
        .and_then(|b| b.get("model"))
        .and_then(Value::as_str)
    {
        if m != opts.served_model {
            notes.push(Ignored::OtherModel(m.to_string()));
        }
    }
    let content = (|| {
        if let Some(e) = id_err {
            return Err(e);
        }
        match obj.get("method") {
            None => {}
            Some(Value::String(m)) if m.eq_ignore_ascii_case("POST") => {}
            Some(other) => return Err(format!("`method` must be \"POST\", got {other}")),
        }
        let endpoint = match obj.get("url").and_then(Value::as_str) {
            Some("/v1/chat/completions") => OpenAiEndpoint::Chat,
            Some("/v1/completions") => OpenAiEndpoint::Completions,
            Some(u) => {
                return Err(format!(
                    "unsupported `url` {u:?}: herd answers /v1/chat/completions and /v1/completions"
                ))
            }
            None => return Err("missing `url` (/v1/chat/completions or /v1/completions)".into()),
        };
        let Some(Value::Object(body)) = obj.get("body") else {
            return Err("missing `body` object".into());
        };
        let n = opt_n(body)?.unwrap_or(opts.n);
        let prompt = match endpoint {
            OpenAiEndpoint::Chat => match body.get("messages") {
                Some(v) => PromptSpec::Messages(messages_field(v)?),
                None => return Err("chat request without `body.messages`".into()),
            },
            OpenAiEndpoint::Completions => match body.get("prompt") {
                Some(Value::String(s)) => PromptSpec::Text(s.clone()),
                Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                    PromptSpec::Text(a[0].as_str().unwrap_or_default().to_string())
                }
                Some(v @ Value::Array(a)) if a.iter().all(Value::is_number) && !a.is_empty() => {
                    PromptSpec::Ids(ids_field(v, "prompt")?)
                }
                Some(_) => {
                    return Err(
                        "`body.prompt` must be a string or a list of token ids (one prompt per request)"
                            .into(),
                    )
                }
                None => return Err("completion request without `body.prompt`".into()),
            },
        };
        let mut p = d.clone();
        let max = match opt_uint(body, "max_completion_tokens")? {
            Some(n) => Some(n),
            None => opt_uint(body, "max_tokens")?,
        };
        if let Some(n) = max {
            p.max_tokens = n as usize;
        }
        if let Some(x) = opt_f32(body, "temperature")? {
            p.temperature = x;
        }
        if let Some(x) = opt_f32(body, "top_p")? {
            p.top_p = x;
        }
        if let Some(n) = opt_uint(body, "top_k")? {
            p.top_k = n as usize;
        }
        if let Some(n) = opt_uint(body, "seed")? {
            p.seed = Some(n);
        }
        if let Some(s) = opt_stop(body, "stop")? {
            p.stop = s;
        }
        if let Some(b) = opt_bool(body, "ignore_eos")? {
            p.ignore_eos = b;
        }
        if let Some(b) = opt_bool(body, "skip_special_tokens")? {
            p.skip_special_tokens = b;
        }
        if let Some(v) = body.get("stop_token_ids").filter(|v| !v.is_null()) {
            p.stop_token_ids = ids_field(v, "stop_token_ids")?;
        }
        p.constraint = constraint_fields::parse(body)?;
        match endpoint {
            OpenAiEndpoint::Chat => {
                if opt_bool(body, "logprobs")? == Some(true) {
                    p.logprobs = Some(opt_uint(body, "top_logprobs")?.unwrap_or(0) as usize);
                }
            }
            OpenAiEndpoint::Completions => {
                if let Some(n) = opt_uint(body, "logprobs")? {
                    p.logprobs = Some(n as usize);
                }
            }
        }
        Ok(Content {
            prompt,
            params: p,
            n,
            openai: Some(OpenAiInfo { endpoint }),
        })
    })()
    .map_err(|e| format!("line {line}: {e}"));
    Parsed {
        id,
        metadata: None,
        content,
        notes,
    }
}

/// A CSV row: `row` is its number among the data rows (the default id), `line` the file line
/// where it starts (for messages: a quoted field may span lines).
fn parse_csv_row(
    fields: Result<Vec<String>, String>,
    row: u64,
    line: u64,
    opts: &ParseOptions,
    headers: &[String],
) -> Parsed {
    let default_id = Value::from(row);
    let fields = match fields {
        Ok(f) => f,
        Err(e) => return Parsed::failed(default_id, format!("line {line}: {e}")),
    };
    let col = |name: &str| headers.iter().position(|h| h == name);
    let id = opts
        .id_column
        .as_deref()
        .and_then(col)
        .and_then(|i| fields.get(i))
        .filter(|s| !s.is_empty())
        .map(|s| Value::String(s.clone()))
        .unwrap_or(default_id);
    let prompt_name = opts.prompt_column.as_deref().unwrap_or("prompt");
    let prompt_i = col(prompt_name);
    let mut meta = Map::new();
    for (i, h) in headers.iter().enumerate() {
        if Some(i) != prompt_i && Some(h.as_str()) != opts.id_column.as_deref() {
            if let Some(f) = fields.get(i) {
                meta.insert(h.clone(), Value::String(f.clone()));
            }
        }
    }
    let content = match prompt_i.and_then(|i| fields.get(i)) {
        Some(p) => Ok(Content {
            prompt: PromptSpec::Text(p.clone()),
            params: opts.defaults.clone(),
            n: opts.n,
            openai: None,
        }),
        None => Err(format!(
            "line {line}: has {} fields, no `{prompt_name}` column value",
            fields.len()
        )),
    };
    Parsed {
        id,
        metadata: (!meta.is_empty()).then_some(Value::Object(meta)),
        content,
        notes: Vec::new(),
    }
}

/// Tokenize a parsed record's prompt and apply the context-length rule.
pub fn prepare(content: Content, tok: &Tokenizer, opts: &ParseOptions) -> Result<Ready, String> {
    let mut prompt = match content.prompt {
        PromptSpec::Text(t) => tok.encode(&t, true, false),
        PromptSpec::Messages(m) => tok.encode_dialog(&m),
        PromptSpec::Ids(ids) => ids,
    };
    let max_len = opts.max_len;
    if prompt.len() >= max_len {
        if !opts.truncate_left {
            return Err(format!(
                "prompt has {} tokens but the context holds {max_len} (prompt + generation); \
                 shorten it or pass --truncate-prompt left",
                prompt.len()
            ));
        }
        // Leave room for the generation, but keep at least half the context for the prompt.
        let keep = max_len
            .saturating_sub(content.params.max_tokens)
            .max(max_len / 2)
            .clamp(1, max_len - 1);
        let bos = tok.bos_id();
        if prompt.first() == Some(&bos) && keep > 1 {
            let tail = prompt.split_off(prompt.len() - (keep - 1));
            prompt = std::iter::once(bos).chain(tail).collect();
        } else {
            prompt = prompt.split_off(prompt.len() - keep);
        }
    }
    Ok(Ready {
        prompt,
        params: content.params,
        n: content.n,
        openai: content.openai,
    })
}

/// Ids seen so far, as 64-bit hashes: about 16 bytes per record, never the records themselves.
#[derive(Default)]
pub struct IdSet(HashSet<u64>);

impl IdSet {
    /// Record `id`; false if it was already seen.
    pub fn insert(&mut self, id: &Value) -> bool {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        // The type matters: 7 and "7" are different ids.
        match id {
            Value::String(s) => (0u8, s.as_str()).hash(&mut h),
            other => (1u8, other.to_string()).hash(&mut h),
        }
        self.0.insert(h.finish())
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn string_field(obj: &Map<String, Value>, key: &str) -> Result<String, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(format!(
            "field `{key}` must be a string, got {}",
            type_name(v)
        )),
        None => Err(format!("missing field `{key}`")),
    }
}

fn messages_field(v: &Value) -> Result<Vec<Message>, String> {
    let Value::Array(items) = v else {
        return Err(format!(
            "`messages` must be a list of {{\"role\", \"content\"}} objects, got {}",
            type_name(v)
        ));
    };
    if items.is_empty() {
        return Err("`messages` is empty".into());
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.get("role") {
                Some(Value::String(r)) => {
                    Role::parse(r).map_err(|e| format!("messages[{i}]: {e}"))?
                }
                Some(v) => {
                    return Err(format!(
                        "messages[{i}].role must be a string, got {}",
                        type_name(v)
                    ))
                }
                None => return Err(format!("messages[{i}] has no `role`")),
            };
            let content = match m.get("content") {
                Some(Value::String(c)) => c.clone(),
                // OpenAI content parts: only text parts are supported.
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type"), p.get("text")) {
                        (Some(t), Some(Value::String(s))) if t == "text" => Ok(s.as_str()),
                        _ => Err(format!(
                            "messages[{i}].content: only text parts are supported"
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
                Some(v) => {
                    return Err(format!(
                        "messages[{i}].content must be a string, got {}",
                        type_name(v)
                    ))
                }
                None => return Err(format!("messages[{i}] has no `content`")),
            };
            Ok(Message { role, content })
        })
        .collect()
}

fn ids_field(v: &Value, key: &str) -> Result<Vec<u32>, String> {
    let Value::Array(items) = v else {
        return Err(format!(
            "`{key}` must be a list of token ids, got {}",
            type_name(v)
        ));
    };
    items
        .iter()
        .map(|x| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("`{key}` must hold non-negative integer token ids, got {x}"))
        })
        .collect()
}

fn opt_uint(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("field `{key}` must be a non-negative integer, got {v}")),
    }
}

fn opt_f32(obj: &Map<String, Value>, key: &str) -> Result<Option<f32>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(|x| Some(x as f32))
            .ok_or_else(|| format!("field `{key}` must be a number, got {v}")),
    }
}

fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(format!("field `{key}` must be true or false, got {v}")),
    }
}

fn opt_stop(obj: &Map<String, Value>, key: &str) -> Result<Option<Vec<String>>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("field `{key}` must be a string or a list of strings"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(v) => Err(format!(
            "field `{key}` must be a string or a list of strings, got {}",
            type_name(v)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(format: InputFormat) -> ParseOptions {
        ParseOptions {
            format,
            defaults: SamplingParams::default(),
            n: 1,
            max_len: 100,
            truncate_left: false,
            prompt_column: None,
            id_column: None,
            strict: false,
            csv_output: false,
            served_model: "m".into(),
        }
    }

    fn parse(line: &str, format: InputFormat) -> Parsed {
        parse_record(
            RawRecord::Line(line.as_bytes().to_vec()),
            3,
            &opts(format),
            &[],
        )
    }

    #[test]
    fn herd_fields_override_defaults() {
        let p = parse(
            r#"{"id":"a","prompt_token_ids":[1,2],"max_tokens":5,"temperature":0,"stop":"x","logprobs":2,"metadata":{"k":1}}"#,
            InputFormat::Herd,
        );
        assert_eq!(p.id, "a");
        assert_eq!(p.metadata.unwrap()["k"], 1);
        let c = p.content.unwrap();
        assert_eq!(c.params.max_tokens, 5);
        assert_eq!(c.params.temperature, 0.0);
        assert_eq!(c.params.stop, vec!["x".to_string()]);
        assert_eq!(c.params.logprobs, Some(2));
        assert!(matches!(c.prompt, PromptSpec::Ids(ref v) if v == &[1, 2]));
    }

    #[test]
    fn herd_errors_are_precise() {
        let err = |l: &str| parse(l, InputFormat::Herd).content.err().unwrap();
        assert!(err("{").contains("line 3: invalid JSON"));
        assert!(err(r#"{"id":1}"#).contains("no prompt"));
        assert!(err(r#"{"prompt":"a","messages":[]}"#).contains("`prompt` and `messages`"));
        assert!(err(r#"{"prompt":"a","max_tokens":"5"}"#).contains("`max_tokens` must be"));
        assert!(err(r#"{"messages":[{"role":"wizard","content":"x"}]}"#).contains("wizard"));
        assert!(err(r#"{"prompt_token_ids":[1,-2]}"#).contains("token ids"));
        assert!(err(r#"{"id":[1],"prompt":"a"}"#).contains("`id` must be"));
        // The default id is the line number.
        assert_eq!(parse(r#"{"prompt":"a"}"#, InputFormat::Herd).id, 3);
    }

    #[test]
    fn openai_chat_and_completion() {
        let p = parse(
            r#"{"custom_id":"r1","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":7,"logprobs":true,"top_logprobs":2}}"#,
            InputFormat::Openai,
        );
        assert_eq!(p.id, "r1");
        let c = p.content.unwrap();
        assert_eq!((c.params.max_tokens, c.params.logprobs), (7, Some(2)));
        assert_eq!(c.openai.unwrap().endpoint, OpenAiEndpoint::Chat);
        let p = parse(
            r#"{"custom_id":"r2","method":"POST","url":"/v1/embeddings","body":{}}"#,
            InputFormat::Openai,
        );
        assert!(p.content.err().unwrap().contains("unsupported `url`"));
    }

    #[test]
    fn ignored_fields_are_notes_and_strict_makes_them_the_error() {
        let notes = |l: &str, f: InputFormat| parse(l, f).notes;
        assert_eq!(
            notes(
                r#"{"prompt":"a","temprature":1,"colour":null}"#,
                InputFormat::Herd
            ),
            [Ignored::UnknownField("temprature".into())]
        );
        let line = |body: &str| {
            format!(r#"{{"custom_id":"c","url":"/v1/completions","body":{{"prompt":"a",{body}}}}}"#)
        };
        // Neutral values change nothing: 0 and 0.0, an empty bias, the text format.
        let neutral = line(
            r#""frequency_penalty":0.0,"presence_penalty":0,"logit_bias":{},"response_format":{"type":"text"},"user":"u","model":"m""#,
        );
        assert!(notes(&neutral, InputFormat::Openai).is_empty());
        let set = line(r#""presence_penalty":0.1,"foo":1,"model":"gpt""#);
        assert_eq!(
            notes(&set, InputFormat::Openai),
            [
                Ignored::UnknownField("body.foo".into()),
                Ignored::Unimplemented("presence_penalty".into()),
                Ignored::OtherModel("gpt".into()),
            ]
        );
        let mut o = opts(InputFormat::Openai);
        o.strict = true;
        let p = parse_record(RawRecord::Line(set.into_bytes()), 3, &o, &[]);
        assert_eq!(
            p.content.err().unwrap(),
            "line 3: unknown field `body.foo`; `presence_penalty` is not implemented by herd (--strict)"
        );
        // The model name alone never fails a record.
        let p = parse_record(
            RawRecord::Line(line(r#""model":"gpt""#).into_bytes()),
            3,
            &o,
            &[],
        );
        assert!(p.content.is_ok());
        // vLLM's extensions are read, not ignored.
        let p = parse(
            &line(
                r#""top_k":5,"ignore_eos":true,"skip_special_tokens":false,"stop_token_ids":[7]"#,
            ),
            InputFormat::Openai,
        );
        assert!(p.notes.is_empty());
        let c = p.content.unwrap().params;
        assert_eq!(
            (c.top_k, c.ignore_eos, c.skip_special_tokens),
            (5, true, false)
        );
        assert_eq!(c.stop_token_ids, [7]);
    }

    #[test]
    fn duplicate_ids_distinguish_types() {
        let mut s = IdSet::default();
        assert!(s.insert(&Value::from(7)));
        assert!(s.insert(&Value::from("7")));
        assert!(!s.insert(&Value::from(7)));
    }
}
