//! Which kind of file the input is: the extension is trusted (.jsonl / .json / .ndjson, .csv,
//! .tsv), the content decides herd vs OpenAI JSONL, and any other name is guessed from the
//! first lines, saying what was detected and why. A UTF-8 byte-order mark is skipped everywhere.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{bail, Result};
use serde_json::Value;

use super::input::InputFormat;

/// The UTF-8 byte-order mark some editors (Excel, Notepad) put at the start of a file.
const BOM: &[u8] = b"\xEF\xBB\xBF";
/// Detection looks at this many non-blank lines at most...
const SAMPLE_LINES: usize = 32;
/// ...within this many bytes (a binary file may have no newline at all).
const SAMPLE_BYTES: u64 = 4 << 20;
/// Top-level keys only an OpenAI batch line has.
const OPENAI_KEYS: [&str; 3] = ["custom_id", "url", "body"];
/// Top-level keys only a herd record has.
const HERD_KEYS: [&str; 3] = ["prompt", "messages", "prompt_token_ids"];

/// Opens `path` for reading, past a UTF-8 byte-order mark if it starts with one.
pub fn open_skipping_bom(path: &Path) -> std::io::Result<BufReader<Box<dyn Read + Send>>> {
    let file: Box<dyn Read + Send> = Box::new(std::fs::File::open(path)?);
    let mut r = BufReader::with_capacity(1 << 16, file);
    skip_bom(&mut r)?;
    Ok(r)
}

fn skip_bom(r: &mut impl BufRead) -> std::io::Result<()> {
    // A short first read cannot split the 3 bytes: BufReader fills up to its capacity.
    if r.fill_buf()?.starts_with(BOM) {
        r.consume(BOM.len());
    }
    Ok(())
}

fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
}

/// The field separator of a table input: a tab for a `.tsv` file, a comma for a `.csv` file;
/// under another name, a tab when the header line has tabs and no commas.
pub fn table_delimiter(path: &Path) -> std::io::Result<u8> {
    match extension(path).as_deref() {
        Some("tsv") => return Ok(b'\t'),
        Some("csv") => return Ok(b','),
        _ => {}
    }
    let mut r = open_skipping_bom(path)?.take(SAMPLE_BYTES);
    let mut first = Vec::new();
    r.read_until(b'\n', &mut first)?;
    Ok(if tab_separated(&first) { b'\t' } else { b',' })
}

fn tab_separated(header: &[u8]) -> bool {
    header.contains(&b'\t') && !header.contains(&b',')
}

/// The first non-blank lines of a file (BOM skipped), and whether it holds NUL bytes.
struct Sample {
    /// (1-based line number, content)
    lines: Vec<(u64, Vec<u8>)>,
    binary: bool,
}

fn sample(path: &Path) -> std::io::Result<Sample> {
    let mut r = open_skipping_bom(path)?.take(SAMPLE_BYTES);
    let mut lines = Vec::new();
    let mut binary = false;
    let mut n = 0u64;
    while lines.len() < SAMPLE_LINES {
        let mut buf = Vec::new();
        if r.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        n += 1;
        binary |= buf.contains(&0);
        // A line cut by the byte limit is not judged.
        if !buf.ends_with(b"\n") && r.limit() == 0 {
            break;
        }
        if !buf.iter().all(u8::is_ascii_whitespace) {
            lines.push((n, buf));
        }
    }
    Ok(Sample { lines, binary })
}

/// Why a line is not a JSON object (`None`: it is one).
fn not_an_object(line: &[u8]) -> Option<String> {
    match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(_)) => None,
        Ok(_) => Some("a JSON value but not an object".into()),
        Err(_) if std::str::from_utf8(line).is_err() => Some("not UTF-8 text".into()),
        Err(e) => Some(format!("not JSON: {e}")),
    }
}

/// A first line that opens a JSON array of records (`[` alone, or a whole array of objects).
fn is_json_array_start(line: &[u8]) -> bool {
    if line.trim_ascii() == b"[" {
        return true;
    }
    matches!(serde_json::from_slice::<Value>(line),
        Ok(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_object))
}

fn objects(s: &Sample) -> Vec<(u64, serde_json::Map<String, Value>)> {
    s.lines
        .iter()
        .filter_map(|(n, l)| match serde_json::from_slice(l) {
            Ok(Value::Object(m)) => Some((*n, m)),
            _ => None,
        })
        .collect()
}

/// JSONL is decided: herd or OpenAI, from every sampled line (vLLM's own test file has an OpenAI
/// line without `custom_id` first). `because` says why the file is JSONL.
fn jsonl_kind(path: &Path, s: &Sample, because: &str) -> Result<(InputFormat, String)> {
    if s.binary {
        bail!("a binary file (it holds NUL bytes), not JSONL ({because})");
    }
    if let Some((_, first)) = s.lines.first() {
        if is_json_array_start(first) {
            bail!(
                "one JSON array, not JSONL ({because}): give one object per line, e.g. \
                 jq -c '.[]' {} > prompts.jsonl",
                path.display()
            );
        }
    }
    let objs = objects(s);
    if objs.is_empty() {
        if let Some((n, l)) = s.lines.first() {
            let why = not_an_object(l).unwrap_or_default();
            let none = match s.lines.len() {
                1 => "its first line is not a JSON object".to_string(),
                k => format!("none of its first {k} lines is a JSON object"),
            };
            bail!(
                "not JSONL ({because}): {none} (line {n}: {why}). Give one JSON object per line, \
                 or name the format with --input-format."
            );
        }
        return Ok((InputFormat::Herd, format!("herd JSONL ({because}; empty)")));
    }
    let has =
        |m: &serde_json::Map<String, Value>, keys: &[&str]| keys.iter().any(|k| m.contains_key(*k));
    let openai = objs.iter().filter(|(_, m)| has(m, &OPENAI_KEYS)).count();
    let herd = objs.iter().filter(|(_, m)| has(m, &HERD_KEYS)).count();
    let n = objs.len();
    if openai > 0 && openai >= herd {
        let first = objs
            .iter()
            .find(|(_, m)| has(m, &OPENAI_KEYS))
            .map_or(0, |(l, _)| *l);
        Ok((
            InputFormat::Openai,
            format!(
                "OpenAI batch JSONL ({because}; `custom_id` / `url` / `body` on {openai} of its first {n} \
                 records, from line {first}{})",
                if herd > 0 {
                    format!("; {herd} have herd prompt fields")
                } else {
                    String::new()
                }
            ),
        ))
    } else {
        Ok((
            InputFormat::Herd,
            format!(
                "herd JSONL ({because}; {}of its first {n} records name `custom_id` / `url` / `body`)",
                if openai > 0 {
                    format!("only {openai} ")
                } else {
                    "none ".into()
                }
            ),
        ))
    }
}

/// The input's format and, in words, why (for the log).
pub fn detect(path: &Path) -> Result<(InputFormat, String)> {
    let s = sample(path)?;
    let ext = extension(path);
    match ext.as_deref() {
        Some("csv") => Ok((InputFormat::Csv, "CSV (the name ends in .csv)".into())),
        Some("tsv") => Ok((
            InputFormat::Csv,
            "TSV, tab-separated (the name ends in .tsv)".into(),
        )),
        Some(e @ ("jsonl" | "json" | "ndjson")) => {
            jsonl_kind(path, &s, &format!("the name ends in .{e}"))
        }
        _ => {
            if s.binary {
                bail!("a binary file (it holds NUL bytes), not a prompt file");
            }
            let named = match &ext {
                Some(e) => format!("guessed: .{e} is not .jsonl, .json, .csv or .tsv"),
                None => "guessed: the name has no .jsonl, .json, .csv or .tsv extension".into(),
            };
            if let Some((n, _)) = objects(&s).first() {
                return jsonl_kind(path, &s, &format!("{named}; line {n} is a JSON object"));
            }
            let Some((n, first)) = s.lines.first() else {
                return Ok((InputFormat::Herd, format!("herd JSONL ({named}; empty)")));
            };
            let table = if tab_separated(first) {
                "TSV, tab-separated"
            } else {
                "CSV"
            };
            Ok((
                InputFormat::Csv,
                format!("{table} ({named}; line {n} is not a JSON object, read as the header)"),
            ))
        }
    }
}

/// Detect the input's format and say in one log line what was detected and why. An error says
/// what the file is instead (the caller names the file).
pub fn detect_format(path: &Path) -> Result<InputFormat> {
    let (format, why) = detect(path)?;
    tracing::info!(
        "{}: read as {why}; --input-format overrides",
        path.display()
    );
    Ok(format)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect_bytes(name: &str, bytes: &[u8]) -> Result<(InputFormat, String)> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        detect(&p)
    }

    const OPENAI: &str =
        r#"{"custom_id":"a","method":"POST","url":"/v1/completions","body":{"prompt":"x"}}"#;

    #[test]
    fn extension_is_trusted() {
        let (f, why) = detect_bytes("a.csv", br#"{"prompt":"x"}"#).unwrap();
        assert_eq!(f, InputFormat::Csv, "{why}");
        // A comma in a JSONL file named .jsonl does not make it CSV.
        let (f, _) = detect_bytes("a.jsonl", b"{\"prompt\": \"a, b\"}\n").unwrap();
        assert_eq!(f, InputFormat::Herd);
        let (f, why) = detect_bytes("a.tsv", b"prompt\tid\nx\t1\n").unwrap();
        assert_eq!(f, InputFormat::Csv);
        assert!(why.contains("TSV"), "{why}");
    }

    #[test]
    fn a_bom_is_skipped() {
        let mut b = BOM.to_vec();
        b.extend_from_slice(OPENAI.as_bytes());
        assert_eq!(detect_bytes("a.jsonl", &b).unwrap().0, InputFormat::Openai);
        assert_eq!(detect_bytes("a.txt", &b).unwrap().0, InputFormat::Openai);
    }

    #[test]
    fn openai_is_decided_from_more_than_the_first_line() {
        // vLLM's run-batch test file: its first line has no custom_id.
        let first = r#"{"invalid_field":"request-1","method":"POST","url":"/v1/chat/completions","body":{"messages":[]}}"#;
        let text = format!("{first}\n{OPENAI}\n");
        assert_eq!(
            detect_bytes("a.jsonl", text.as_bytes()).unwrap().0,
            InputFormat::Openai
        );
        // A herd record that happens to come first does not decide it either.
        let text = format!("{{\"prompt\":\"x\"}}\n{OPENAI}\n{OPENAI}\n");
        assert_eq!(
            detect_bytes("a.jsonl", text.as_bytes()).unwrap().0,
            InputFormat::Openai
        );
        let text = format!("{{\"prompt\":\"x\"}}\n{{\"prompt\":\"y\"}}\n{OPENAI}\n");
        assert_eq!(
            detect_bytes("a.jsonl", text.as_bytes()).unwrap().0,
            InputFormat::Herd
        );
    }

    #[test]
    fn text_or_binary_named_jsonl_is_refused_not_read_as_csv() {
        let e = detect_bytes("a.jsonl", b"just some text, with a comma\nmore\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("not JSONL (the name ends in .jsonl)") && e.contains("line 1"),
            "{e}"
        );
        let e = detect_bytes("a.jsonl", b"\x7fELF\x02\x01\x01\0\0\0\n\0\0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("binary"), "{e}");
        for array in [
            &b"[\n  {\"prompt\": \"x\"},\n  {\"prompt\": \"y\"}\n]\n"[..],
            b"[{\"prompt\": \"x\"}, {\"prompt\": \"y\"}]\n",
        ] {
            let e = detect_bytes("a.json", array).unwrap_err().to_string();
            assert!(e.contains("one JSON array") && e.contains("jq -c"), "{e}");
        }
        // One bad line among good ones is the line's own error record, not a refusal.
        let ok = detect_bytes("a.jsonl", b"{oops\n{\"prompt\":\"x\"}\n").unwrap();
        assert_eq!(ok.0, InputFormat::Herd);
    }

    #[test]
    fn other_names_are_guessed_and_the_guess_says_why() {
        let (f, why) = detect_bytes("a.txt", b"q,prompt\n1,hi\n").unwrap();
        assert_eq!(f, InputFormat::Csv);
        assert!(why.starts_with("CSV (guessed: .txt"), "{why}");
        let (f, why) = detect_bytes("data", b"{\"prompt\":\"x\"}\n").unwrap();
        assert_eq!(f, InputFormat::Herd);
        assert!(
            why.contains("no .jsonl") && why.contains("line 1 is a JSON object"),
            "{why}"
        );
        let (f, why) = detect_bytes("a.dat", b"prompt\tid\nx\t1\n").unwrap();
        assert_eq!(f, InputFormat::Csv);
        assert!(why.starts_with("TSV"), "{why}");
    }

    #[test]
    fn the_delimiter_follows_the_name_then_the_header() {
        let dir = tempfile::tempdir().unwrap();
        for (name, body, want) in [
            ("a.tsv", "a,b\tc\n", b'\t'),
            ("a.csv", "a\tb\n", b','),
            ("a.txt", "a\tb\n", b'\t'),
            ("b.txt", "a\tb,c\n", b','),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            assert_eq!(table_delimiter(&p).unwrap(), want, "{name}");
        }
    }
}
