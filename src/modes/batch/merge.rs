//! Merge the replicas' part files into the output, in input order.
//!
//! A first pass notes which part holds each record (2 bytes per record): record `i` is in part
//! `i % dp` of the world that wrote it, and a job resumed with another number of replicas has
//! parts of both worlds. Parts are in completion order, which is close to input order; records
//! read ahead of their turn are remembered by file offset only (16 bytes each), not by content,
//! so memory stays small however long the file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::state::{parse_part_line, Paths};

/// How the merged output is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// One JSON record per line.
    Jsonl,
    /// A table: [`RESULT_COLUMNS`], then the CSV input's other columns (or `metadata` as JSON).
    Csv,
}

impl OutputFormat {
    /// From the output file name: `.csv` writes CSV, anything else JSONL.
    pub fn from_path(p: &Path) -> OutputFormat {
        match p.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("csv") => OutputFormat::Csv,
            _ => OutputFormat::Jsonl,
        }
    }
}

struct Part {
    lines: BufReader<File>,
    /// A second handle to re-read records that came early.
    seek: BufReader<File>,
    pos: u64,
    eof: bool,
}

/// The columns of a CSV output before the input's own (`token_ids` as a JSON list).
pub const RESULT_COLUMNS: [&str; 7] = [
    "id",
    "text",
    "token_ids",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "error",
];

/// Sink of merged records.
enum Sink {
    Jsonl(BufWriter<File>),
    Csv {
        w: Box<csv::Writer<BufWriter<File>>>,
        /// The CSV input's other columns, each from the record's metadata; `None`: one
        /// `metadata` column holding it as JSON.
        extra: Option<Vec<String>>,
    },
}

fn cell(x: &Value) -> String {
    match x {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A record's result columns: a herd record, or an OpenAI batch answer (no token ids there).
fn result_cells(v: &Value) -> [String; 7] {
    if let Some(resp) = v.get("response") {
        let body = &resp["body"];
        let choice = &body["choices"][0];
        let text = choice["message"]["content"]
            .as_str()
            .or(choice["text"].as_str())
            .unwrap_or_default();
        let failed = !v["error"].is_null();
        return [
            cell(&v["custom_id"]),
            text.to_string(),
            String::new(),
            if failed {
                "error".into()
            } else {
                cell(&choice["finish_reason"])
            },
            cell(&body["usage"]["prompt_tokens"]),
            cell(&body["usage"]["completion_tokens"]),
            cell(&v["error"]["message"]),
        ];
    }
    [
        cell(&v["id"]),
        cell(&v["text"]),
        cell(&v["token_ids"]),
        cell(&v["finish_reason"]),
        cell(&v["usage"]["prompt_tokens"]),
        cell(&v["usage"]["completion_tokens"]),
        cell(&v["error"]),
    ]
}

impl Sink {
    fn csv(file: File, extra: Option<&[String]>) -> Result<Sink> {
        let mut w = csv::Writer::from_writer(BufWriter::with_capacity(1 << 16, file));
        let mut header: Vec<String> = RESULT_COLUMNS.iter().map(|c| c.to_string()).collect();
        match extra {
            // An input column named like a result column keeps its values under input_NAME.
            Some(cols) => header.extend(cols.iter().map(|c| {
                if RESULT_COLUMNS.contains(&c.as_str()) {
                    format!("input_{c}")
                } else {
                    c.clone()
                }
            })),
            None => header.push("metadata".into()),
        }
        w.write_record(&header)?;
        Ok(Sink::Csv {
            w: Box::new(w),
            extra: extra.map(<[String]>::to_vec),
        })
    }

    fn write(&mut self, record: &str) -> Result<()> {
        match self {
            Sink::Jsonl(w) => {
                w.write_all(record.as_bytes())?;
                w.write_all(b"\n")?;
            }
            Sink::Csv { w, extra } => {
                let v: Value = serde_json::from_str(record).context("a part record is not JSON")?;
                let mut row: Vec<String> = result_cells(&v).into();
                match extra {
                    Some(cols) => row.extend(cols.iter().map(|c| cell(&v["metadata"][c]))),
                    None => row.push(cell(&v["metadata"])),
                }
                w.write_record(&row)?;
            }
        }
        Ok(())
    }
}

/// No part holds the record.
const NOWHERE: u16 = u16::MAX;

/// Which of `parts` holds each of the `total` records (the first, should two hold it).
fn owners(paths: &Paths, parts: &[usize], total: u64) -> Result<Vec<u16>> {
    let len = usize::try_from(total).context("too many records to merge")?;
    let mut owner = vec![NOWHERE; len];
    for (slot, &k) in parts.iter().enumerate() {
        let p = paths.part(k);
        let file = File::open(&p).with_context(|| format!("opening {}", p.display()))?;
        for (n, line) in BufReader::with_capacity(1 << 16, file).lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", p.display()))?;
            let Some((i, _, _)) = parse_part_line(&line) else {
                bail!("{} has a damaged line (line {})", p.display(), n + 1);
            };
            if let Some(o) = owner.get_mut(i as usize).filter(|o| **o == NOWHERE) {
                *o = slot as u16;
            }
        }
    }
    Ok(owner)
}

/// Merge the `parts` (part numbers, of this world and of earlier ones) holding `total` records
/// into the output (via a temp file and a rename). `extra`: a CSV input's other columns, which a
/// CSV output keeps as columns.
pub fn merge(
    paths: &Paths,
    parts: &[usize],
    total: u64,
    format: OutputFormat,
    extra: Option<&[String]>,
) -> Result<()> {
    if parts.len() >= NOWHERE as usize {
        bail!("{} parts are more than herd merges", parts.len());
    }
    let owner = owners(paths, parts, total)?;
    let mut open_parts = Vec::with_capacity(parts.len());
    for &k in parts {
        let p = paths.part(k);
        let open = || File::open(&p).with_context(|| format!("opening {}", p.display()));
        open_parts.push(Part {
            lines: BufReader::with_capacity(1 << 16, open()?),
            seek: BufReader::new(open()?),
            pos: 0,
            eof: false,
        });
    }
    let tmp = paths.merge_tmp();
    let file = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    let mut sink = match format {
        OutputFormat::Jsonl => Sink::Jsonl(BufWriter::with_capacity(1 << 16, file)),
        OutputFormat::Csv => Sink::csv(file, extra)?,
    };
    // Records seen before their turn: index -> offset of their line in their part.
    let mut early: BTreeMap<u64, u64> = BTreeMap::new();
    let mut line = String::new();
    let mut next = 0u64;
    while next < total {
        let slot = owner[next as usize];
        if slot == NOWHERE {
            bail!(
                "record {next} is missing from every part of {} (rerun to finish it)",
                paths.output.display()
            );
        }
        let r = parts[slot as usize];
        let part = &mut open_parts[slot as usize];
        if let Some(off) = early.remove(&next) {
            part.seek.seek(SeekFrom::Start(off))?;
            line.clear();
            part.seek.read_line(&mut line)?;
        } else {
            loop {
                if part.eof {
                    bail!(
                        "record {next} is missing from {} (the part changed during the merge)",
                        paths.part(r).display()
                    );
                }
                line.clear();
                let off = part.pos;
                let n = part.lines.read_line(&mut line)?;
                part.pos += n as u64;
                if n == 0 {
                    part.eof = true;
                    continue;
                }
                let Some((i, _, _)) = parse_part_line(line.trim_end_matches('\n')) else {
                    bail!(
                        "{} has a damaged line at byte {off}",
                        paths.part(r).display()
                    );
                };
                // Only this part's copy of a record counts (a second copy elsewhere is never
                // written: a resume skips done records; this keeps the output right regardless).
                if i >= total || owner[i as usize] != slot {
                    continue;
                }
                match i.cmp(&next) {
                    std::cmp::Ordering::Equal => break,
                    std::cmp::Ordering::Greater => {
                        early.entry(i).or_insert(off);
                    }
                    std::cmp::Ordering::Less => {}
                }
            }
        }
        let Some((_, _, record)) = parse_part_line(line.trim_end_matches('\n')) else {
            bail!("{} has a damaged line", paths.part(r).display());
        };
        sink.write(record)?;
        next += 1;
    }
    let file = match sink {
        Sink::Jsonl(w) => w.into_inner().map_err(|e| e.into_error())?,
        Sink::Csv { w, .. } => w
            .into_inner()
            .map_err(|e| anyhow::anyhow!("writing the output: {e}"))?
            .into_inner()
            .map_err(|e| e.into_error())?,
    };
    file.sync_all()?;
    std::fs::rename(&tmp, &paths.output)
        .with_context(|| format!("writing {}", paths.output.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::state::part_line;
    use super::*;
    use serde_json::json;

    #[test]
    fn merges_out_of_order_parts_in_input_order() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths {
            output: dir.path().join("o.jsonl"),
        };
        // Part 0 holds 0, 2, 4 (written 4, 0, 2); part 1 holds 1, 3.
        let p0: String = [4, 0, 2]
            .iter()
            .map(|&i| part_line(i, false, &json!({"id": i})))
            .collect();
        let p1: String = [3, 1]
            .iter()
            .map(|&i| part_line(i, false, &json!({"id": i})))
            .collect();
        std::fs::write(paths.part(0), p0).unwrap();
        std::fs::write(paths.part(1), p1).unwrap();
        merge(&paths, &[0, 1], 5, OutputFormat::Jsonl, None).unwrap();
        let out = std::fs::read_to_string(&paths.output).unwrap();
        let ids: Vec<u64> = out
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["id"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ids, vec![0, 1, 2, 3, 4]);
        // A missing record is an error, not a silently short output.
        let err = merge(&paths, &[0, 1], 6, OutputFormat::Jsonl, None).unwrap_err();
        assert!(err.to_string().contains("record 5 is missing"), "{err}");
        // Parts of two worlds: 2 replicas wrote 0, 1, 3 (part 0: 0; part 1: 1, 3), then 3
        // replicas the rest (part 0: 3 again, 6; part 1: 4; part 2: 2, 5). Each record once.
        let lines = |ids: &[u64]| -> String {
            ids.iter()
                .map(|&i| part_line(i, false, &json!({"id": i})))
                .collect()
        };
        std::fs::write(paths.part(0), lines(&[0, 3, 6])).unwrap();
        std::fs::write(paths.part(1), lines(&[1, 3, 4])).unwrap();
        std::fs::write(paths.part(2), lines(&[5, 2])).unwrap();
        merge(&paths, &[0, 1, 2], 7, OutputFormat::Jsonl, None).unwrap();
        let out = std::fs::read_to_string(&paths.output).unwrap();
        let ids: Vec<u64> = out
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["id"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ids, vec![0, 1, 2, 3, 4, 5, 6]);
    }
}
